//! The agent link over mutual TLS, as `deploy/` runs it: the dispatcher serves a
//! certificate from a private CA and requires each agent's certificate to name the agent
//! its credential belongs to. Sessions run over it; an agent presenting another agent's
//! certificate is refused while its commands wait; with its own certificate back, they run.

use std::time::Duration;

use super::{Ctx, until, user_api};
use crate::report::{ScenarioReport, Target};
use crate::stack::{Stack, StackOptions};

const LIMIT: Duration = Duration::from_secs(60);

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions {
        echo: ctx.echo,
        agent_link_tls: true,
        ..StackOptions::new(ctx.database_url.clone(), ctx.run_dir.clone(), 1, 1)
    })
    .await?;
    let result = steps(&mut stack, r).await;
    stack.stop().await;
    result
}

async fn steps(stack: &mut Stack, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let api = user_api(stack, "carol").await?;
    let url = stack.dispatcher_url(0);
    r.check(
        "agent dials the dispatcher over TLS",
        url.starts_with("https://"),
        "https://…",
        &url,
    );
    let (first, _) = api.create_session("firefox-browser").await?;
    let waited = api.wait_state(&first, "running", LIMIT).await?;
    r.metric(
        "session running over mutual TLS",
        waited.as_secs_f64(),
        "s",
        Target::AtMost { value: 30.0 },
    );

    // The same credential with a certificate naming another agent.
    stack.kill_agent(0).await;
    let tls = stack
        .tls
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the stack has no TLS"))?;
    let wrong = tls.client("impostor", &["local-99"])?;
    stack.agents[0].tls_identity_override = Some(wrong);
    stack.spawn_agent(0).await?;
    let queued = api.hibernate(&first).await?;
    r.check(
        "hibernate accepted while the agent is refused",
        queued.status == 202,
        "HTTP 202",
        format!("HTTP {}", queued.status),
    );
    let refusal = "but the credential is agent";
    let agent = &stack.agents[0];
    until("the agent told why it was refused", LIMIT, || async {
        Ok(agent
            .proc
            .as_ref()
            .is_some_and(|p| p.recent_output().contains(refusal))
            .then_some(()))
    })
    .await?;
    let online = stack.agent_online(&agent.agent_id).await?;
    let state = api.session_state(&first).await?;
    r.check(
        "a certificate naming another agent is refused",
        !online && state != "hibernated",
        "agent offline, hibernate not applied",
        format!("online={online}, session {state}"),
    );

    // Its own certificate again: the queued command runs.
    stack.kill_agent(0).await;
    stack.agents[0].tls_identity_override = None;
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    let waited = api.wait_state(&first, "hibernated", LIMIT).await?;
    r.metric(
        "queued command applied once the right certificate is back",
        waited.as_secs_f64(),
        "s",
        Target::AtMost { value: 30.0 },
    );
    Ok(())
}
