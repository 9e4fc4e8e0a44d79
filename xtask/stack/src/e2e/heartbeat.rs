//! 3.3 — heartbeat and health: a paused (SIGSTOP) agent and a network partition (a loopback
//! proxy the run controls) are both noticed; no new session is assigned to the unhealthy
//! agent; after healing the agent is online again and the work queued meanwhile runs.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{Ctx, until, user_api};
use crate::proxy::Proxy;
use crate::report::{ScenarioReport, Target};
use crate::stack::{OFFLINE_AFTER, Stack};

const LIMIT: Duration = Duration::from_secs(90);

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(1, 2).await?;
    let result = steps(&mut stack, r).await;
    stack.stop().await;
    result
}

async fn wait_online(stack: &Stack, agent: &str, online: bool) -> anyhow::Result<Duration> {
    let pool = stack.pool.clone();
    let (_, t) = until(&format!("{agent} online={online}"), LIMIT, || {
        let pool = pool.clone();
        let agent = agent.to_owned();
        async move {
            let a = streamspace_core::agents::agent_get(&pool, &agent, OFFLINE_AFTER).await?;
            Ok((a.is_some_and(|a| a.online) == online).then_some(()))
        }
    })
    .await?;
    Ok(t)
}

async fn steps(stack: &mut Stack, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let api = user_api(stack, "bob").await?;
    let victim = stack.agents[0].agent_id.clone();
    // Two sessions, one per agent (least-loaded placement alternates).
    let (s1, _) = api.create_session("firefox-browser").await?;
    let (s2, _) = api.create_session("firefox-browser").await?;
    api.wait_state(&s1, "running", LIMIT).await?;
    api.wait_state(&s2, "running", LIMIT).await?;
    let on_victim = if api.session(&s1).await?["agent_id"] == victim.as_str() {
        s1
    } else {
        s2
    };

    // Paused process: heartbeats stop.
    stack.signal_agent(0, Signal::SIGSTOP)?;
    let to_offline = wait_online(stack, &victim, false).await?;
    r.metric(
        "SIGSTOP: time to offline",
        to_offline.as_secs_f64(),
        "s",
        Target::AtMost { value: 60.0 },
    );
    let mut assigned_to_victim = 0;
    for _ in 0..3 {
        let a = api
            .call(
                reqwest::Method::POST,
                "/api/v1/sessions",
                Some(serde_json::json!({"template": "firefox-browser"})),
            )
            .await?;
        if a.body["agent_id"] == victim.as_str() {
            assigned_to_victim += 1;
        }
    }
    r.metric(
        "new sessions assigned to the offline agent",
        assigned_to_victim as f64,
        "sessions",
        Target::Equals { value: 0.0 },
    );
    let stop = api.delete_session(&on_victim).await?;
    r.check(
        "stop accepted for the offline agent's session",
        stop.status == 202,
        "HTTP 202",
        format!("HTTP {}", stop.status),
    );

    let resumed = Instant::now();
    stack.signal_agent(0, Signal::SIGCONT)?;
    let to_online = wait_online(stack, &victim, true).await?;
    r.metric(
        "SIGCONT: time to online",
        to_online.as_secs_f64(),
        "s",
        Target::AtMost { value: 30.0 },
    );
    api.wait_state(&on_victim, "terminated", LIMIT).await?;
    r.metric(
        "SIGCONT: queued stop processed",
        resumed.elapsed().as_secs_f64(),
        "s",
        Target::Info,
    );

    // Network partition through a proxy.
    let proxy = Proxy::start(stack.dispatchers[0].port).await?;
    stack.kill_agent(0).await;
    stack.agents[0].url_override = Some(format!("http://127.0.0.1:{}", proxy.port));
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    proxy.cut();
    let partition_offline = wait_online(stack, &victim, false).await?;
    r.metric(
        "partition: time to offline",
        partition_offline.as_secs_f64(),
        "s",
        Target::AtMost { value: 60.0 },
    );
    let (s3, _) = api.create_session("firefox-browser").await?;
    let placed = api.session(&s3).await?;
    r.check(
        "partition: new session placed on the healthy agent",
        placed["agent_id"] != victim.as_str(),
        "another agent",
        format!("agent {}", placed["agent_id"]),
    );
    proxy.heal();
    let healed = wait_online(stack, &victim, true).await?;
    r.metric(
        "partition healed: time to online",
        healed.as_secs_f64(),
        "s",
        Target::AtMost { value: 30.0 },
    );
    Ok(())
}
