//! 4.2 — resource use of each service idle, with 10 and with 50 sessions.

use std::time::Duration;

use super::{Ctx, user_api};
use crate::report::{ScenarioReport, Target};
use crate::resources::{cpu_millicores, rss_mib};

const WINDOW: Duration = Duration::from_secs(3);

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(1, 1).await?;
    let result = async {
        let api = user_api(&stack, "erin").await?;
        let services = [
            ("api-gateway", stack.gateway_pid(), 500.0, 1024.0),
            (
                "command-dispatcher",
                stack.dispatchers[0]
                    .proc
                    .as_ref()
                    .and_then(|p| p.pid())
                    .map(|p| p.as_raw()),
                500.0,
                1024.0,
            ),
            (
                "agent",
                stack.agents[0]
                    .proc
                    .as_ref()
                    .and_then(|p| p.pid())
                    .map(|p| p.as_raw()),
                200.0,
                512.0,
            ),
        ];
        let mut created = 0;
        for (label, sessions) in [("idle", 0), ("10 sessions", 10), ("50 sessions", 50)] {
            while created < sessions {
                let (id, _) = api.create_session("firefox-browser").await?;
                api.wait_state(&id, "running", Duration::from_secs(60))
                    .await?;
                created += 1;
            }
            let pids: Vec<i32> = services.iter().map(|s| s.1.unwrap_or(0)).collect();
            let cpu = cpu_millicores(&pids, WINDOW).await;
            for ((name, pid, cpu_limit, mem_limit), cpu) in services.iter().zip(cpu) {
                let pid = pid.unwrap_or(0);
                r.metric(
                    &format!("{name} CPU, {label}"),
                    cpu.unwrap_or(f64::NAN),
                    "millicores",
                    Target::AtMost { value: *cpu_limit },
                );
                r.metric(
                    &format!("{name} RSS, {label}"),
                    rss_mib(pid).unwrap_or(f64::NAN),
                    "MiB",
                    Target::AtMost { value: *mem_limit },
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}
