//! 4.1 — twenty sessions created in parallel: all running, no errors, sessions per minute.

use std::time::{Duration, Instant};

use super::{Ctx, user_api};
use crate::report::{ScenarioReport, Target};

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(1, 1).await?;
    let result = async {
        let api = user_api(&stack, "dave").await?;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let api = api.clone();
            tasks.spawn(async move {
                let (id, _) = api.create_session("firefox-browser").await?;
                api.wait_state(&id, "running", Duration::from_secs(120))
                    .await?;
                anyhow::Ok(())
            });
        }
        let mut errors = 0;
        while let Some(done) = tasks.join_next().await {
            if !matches!(done, Ok(Ok(()))) {
                errors += 1;
            }
        }
        let elapsed = started.elapsed();
        r.metric(
            "sessions running",
            (20 - errors) as f64,
            "sessions",
            Target::Equals { value: 20.0 },
        );
        r.metric(
            "errors",
            errors as f64,
            "errors",
            Target::Equals { value: 0.0 },
        );
        r.metric(
            "time until all running",
            elapsed.as_secs_f64(),
            "s",
            Target::Info,
        );
        r.metric(
            "throughput",
            20.0 / elapsed.as_secs_f64() * 60.0,
            "sessions/min",
            Target::AtLeast { value: 10.0 },
        );
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}
