//! 3.4 — three agents, fifteen sessions: placement is balanced within two sessions.

use std::collections::HashMap;
use std::time::Duration;

use super::{Ctx, user_api};
use crate::report::{ScenarioReport, Target};

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(1, 3).await?;
    let result = async {
        let api = user_api(&stack, "carol").await?;
        let mut per_agent: HashMap<String, usize> = stack
            .agents
            .iter()
            .map(|a| (a.agent_id.clone(), 0))
            .collect();
        let mut ids = Vec::new();
        for _ in 0..15 {
            let (id, _) = api.create_session("firefox-browser").await?;
            ids.push(id);
        }
        for id in &ids {
            api.wait_state(id, "running", Duration::from_secs(60))
                .await?;
            let agent = api.session(id).await?["agent_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *per_agent.entry(agent).or_default() += 1;
        }
        let max = per_agent.values().max().copied().unwrap_or(0);
        let min = per_agent.values().min().copied().unwrap_or(0);
        for (agent, n) in &per_agent {
            r.metric(
                &format!("sessions on {agent}"),
                *n as f64,
                "sessions",
                Target::Info,
            );
        }
        r.metric(
            "spread (max - min)",
            (max - min) as f64,
            "sessions",
            Target::AtMost { value: 2.0 },
        );
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}
