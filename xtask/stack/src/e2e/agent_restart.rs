//! 3.1 — agent restart during 5 active sessions: reconnect time, every session still known
//! and running, commands queued meanwhile processed.

use std::time::{Duration, Instant};

use super::{Ctx, user_api};
use crate::report::{ScenarioReport, Target};
use crate::stack::session_pids;

const LIMIT: Duration = Duration::from_secs(60);

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(1, 1).await?;
    let result = async {
        let api = user_api(&stack, "alice").await?;
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(api.create_session("firefox-browser").await?.0);
        }
        for id in &ids {
            api.wait_state(id, "running", LIMIT).await?;
        }
        let pids_before = session_pids(&stack.agents[0].state_dir);

        stack.kill_agent(0).await;
        let queued = api.hibernate(&ids[0]).await?;
        r.check(
            "hibernate accepted while the agent is down",
            queued.status == 202,
            "HTTP 202",
            format!("HTTP {}", queued.status),
        );

        let restarted = Instant::now();
        stack.spawn_agent(0).await?;
        stack.wait_agent_online(0).await?;
        r.metric(
            "agent reconnection",
            restarted.elapsed().as_secs_f64(),
            "s",
            Target::AtMost { value: 30.0 },
        );

        let waited = api.wait_state(&ids[0], "hibernated", LIMIT).await?;
        r.metric(
            "queued command processed after reconnect",
            waited.as_secs_f64() * 1000.0,
            "ms",
            Target::Info,
        );
        let mut running = 0;
        for id in &ids[1..] {
            if api.session_state(id).await? == "running" {
                running += 1;
            }
        }
        r.metric(
            "sessions still running",
            running as f64,
            "sessions",
            Target::Equals { value: 4.0 },
        );
        let pids_after = session_pids(&stack.agents[0].state_dir);
        let mut a = pids_before.clone();
        let mut b = pids_after.clone();
        a.sort_unstable();
        b.sort_unstable();
        r.check(
            "restarted agent found all 5 session processes",
            a == b && a.len() == 5,
            "the same 5 pids",
            format!("before {a:?}, after {b:?}"),
        );
        let lost: (i64,) = sqlx::query_as("SELECT count(*) FROM sessions WHERE state = 'failed'")
            .fetch_one(&stack.pool)
            .await?;
        r.metric(
            "sessions lost",
            lost.0 as f64,
            "sessions",
            Target::Equals { value: 0.0 },
        );
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}
