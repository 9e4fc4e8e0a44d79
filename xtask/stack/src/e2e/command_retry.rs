//! 3.2 — command sent while the agent is down: the seed report, step by step, then its
//! follow-ups (a backlog in per-session FIFO order, and a large backlog drained).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Ctx, Profile, until, user_api};
use crate::chaos::history::{Op, Outcome};
use crate::chaos::workload::Client;
use crate::report::{ScenarioReport, Target};
use crate::stack::{Stack, StackOptions, session_pids};

const LIMIT: Duration = Duration::from_secs(60);

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    // One user sends the whole backlog, far faster than a person: the gateway's per-user
    // rate limit (tested on its own) would refuse most of it.
    let mut stack = Stack::start(StackOptions {
        echo: ctx.echo,
        gateway_env: vec![("STREAMSPACE_RATE_LIMIT__ENABLED".into(), "false".into())],
        ..StackOptions::new(ctx.database_url.clone(), ctx.run_dir.clone(), 1, 1)
    })
    .await?;
    let result = steps(ctx, &mut stack, r).await;
    stack.stop().await;
    result
}

async fn steps(ctx: &Ctx, stack: &mut Stack, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let api = user_api(stack, "admin").await?;

    // Phase 1: a session, running.
    let (session, _) = api.create_session("firefox-browser").await?;
    let started = api.wait_state(&session, "running", LIMIT).await?;
    r.metric(
        "session start time",
        started.as_secs_f64(),
        "s",
        Target::AtMost { value: 60.0 },
    );
    let pids = session_pids(&stack.agents[0].state_dir);
    r.check(
        "session process running",
        pids.len() == 1,
        "one session process",
        format!("{} found", pids.len()),
    );

    // Phase 3: the agent dies.
    stack.kill_agent(0).await;

    // Phase 4: DELETE while the agent is down.
    let answer = api.delete_session(&session).await?;
    r.check(
        "API accepts command (agent down)",
        answer.status == 202,
        "HTTP 202",
        format!("HTTP {}", answer.status),
    );
    r.metric(
        "DELETE latency",
        answer.latency.as_secs_f64() * 1000.0,
        "ms",
        Target::AtMost { value: 50.0 },
    );
    let stop_id = crate::api::str_field(&answer.body, "command_id")?;

    // Phase 5: the seed report's own query.
    let row: (String, Option<String>, String, String, Option<String>) = sqlx::query_as(
        "SELECT command_id, session_id, action, status, error_message
         FROM agent_commands
         WHERE session_id = $1
         ORDER BY created_at DESC
         LIMIT 1",
    )
    .bind(&session)
    .fetch_one(&stack.pool)
    .await?;
    r.check(
        "command queued: pending, NULL error_message",
        row.0 == stop_id && row.2 == "stop_session" && row.3 == "pending" && row.4.is_none(),
        "the stop_session row pending with NULL error_message",
        format!("{row:?}"),
    );

    // Phase 6: the agent comes back.
    let reconnect = Instant::now();
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    r.metric(
        "agent reconnection",
        reconnect.elapsed().as_secs_f64(),
        "s",
        Target::AtMost { value: 30.0 },
    );

    // Phase 7: the command is processed.
    let pool = stack.pool.clone();
    let id = stop_id.clone();
    let (_, processed) = until("the stop command to complete", LIMIT, || {
        let pool = pool.clone();
        let id = id.clone();
        async move {
            let s: (String,) =
                sqlx::query_as("SELECT status FROM agent_commands WHERE command_id = $1")
                    .bind(&id)
                    .fetch_one(&pool)
                    .await?;
            Ok((s.0 == "completed").then_some(()))
        }
    })
    .await?;
    r.metric(
        "command processed after reconnect",
        processed.as_secs_f64() * 1000.0,
        "ms",
        Target::AtMost { value: 30_000.0 },
    );

    // Phase 8: the session is gone, in the database and on the machine.
    let state = api.session_state(&session).await?;
    r.check(
        "session terminated",
        state == "terminated",
        "state terminated",
        format!("state {state}"),
    );
    let alive: Vec<i32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    r.check(
        "session process gone",
        alive.is_empty(),
        "no session process",
        format!("still running: {alive:?}"),
    );
    let lost: (i64,) =
        sqlx::query_as("SELECT count(*) FROM agent_commands WHERE status <> 'completed'")
            .fetch_one(&stack.pool)
            .await?;
    r.metric(
        "commands lost",
        lost.0 as f64,
        "commands",
        Target::Equals { value: 0.0 },
    );

    backlog_in_order(ctx, stack, r).await?;
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // A zombie has no /proc/<pid>/stat state other than Z; treat it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 2..].chars().next())
                .is_some_and(|c| c != 'Z')
        })
        .unwrap_or(false)
}

/// Follow-ups: many commands queued while the agent is down are all processed after it
/// reconnects, each session's in acceptance order; then a large backlog is drained.
async fn backlog_in_order(
    ctx: &Ctx,
    stack: &mut Stack,
    r: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let api = user_api(stack, "fifo").await?;
    let (sessions, per_session, big_sessions, big_per_session) = match ctx.profile {
        Profile::Quick => (6, 10, 10, 100),
        Profile::Full => (6, 10, 20, 500),
    };
    let mut ids = Vec::new();
    for _ in 0..sessions.max(big_sessions) {
        ids.push(api.create_session("firefox-browser").await?.0);
    }
    for id in &ids {
        api.wait_state(id, "running", LIMIT).await?;
    }
    let token = stack.mint_token("fifo", false).await?;
    let clients = Arc::new([
        Client::rest(stack.gateway_url(), token.clone()),
        Client::grpc(&stack.gateway_grpc_url(), token)?,
    ]);

    for (label, n_sessions, per) in [
        ("FIFO backlog", sessions, per_session),
        ("drain", big_sessions, big_per_session),
    ] {
        stack.kill_agent(0).await;
        // Alternating hibernate/wake per session, sent through the gateway as users would
        // (half REST, half gRPC): accepted against each session's intended state while the
        // agent is down. Sessions in parallel, each one's requests in order.
        let started = Instant::now();
        let mut senders = tokio::task::JoinSet::new();
        for (k, id) in ids[..n_sessions].iter().enumerate() {
            let clients = clients.clone();
            let id = id.clone();
            senders.spawn(async move {
                let mut accepted = (0usize, 0usize);
                let mut refused = Vec::new();
                for round in 0..per {
                    let op = if round % 2 == 0 {
                        Op::Hibernate
                    } else {
                        Op::Wake
                    };
                    let client = &clients[(round + k) % 2];
                    let record = client.request("fifo", op, &id, started).await;
                    match record.outcome {
                        Outcome::Ok { .. } if client.transport() == "rest" => accepted.0 += 1,
                        Outcome::Ok { .. } => accepted.1 += 1,
                        other => refused.push(format!("{id} {op:?}: {other:?}")),
                    }
                }
                (accepted, refused)
            });
        }
        let (mut rest, mut grpc, mut refused) = (0, 0, Vec::new());
        while let Some(sent) = senders.join_next().await {
            let ((r, g), mut bad) = sent?;
            rest += r;
            grpc += g;
            refused.append(&mut bad);
        }
        r.check(
            &format!("{label}: every request accepted by the gateway (agent down)"),
            refused.is_empty(),
            "all 202",
            format!(
                "{rest} over REST, {grpc} over gRPC accepted; {} refused {:?}",
                refused.len(),
                refused.iter().take(3).collect::<Vec<_>>()
            ),
        );
        let total = rest + grpc;
        let restarted = Instant::now();
        stack.spawn_agent(0).await?;
        stack.wait_agent_online(0).await?;
        let pool = stack.pool.clone();
        let (_, drained) = until(
            &format!("{total} queued commands to complete"),
            Duration::from_secs(600),
            || {
                let pool = pool.clone();
                async move {
                    let open: (i64,) = sqlx::query_as(
                        "SELECT count(*) FROM agent_commands WHERE status <> 'completed'",
                    )
                    .fetch_one(&pool)
                    .await?;
                    Ok((open.0 == 0).then_some(()))
                }
            },
        )
        .await?;
        let elapsed = restarted.elapsed().as_secs_f64();
        r.metric(
            &format!("{label}: commands queued during downtime"),
            total as f64,
            "commands",
            Target::AtLeast { value: 50.0 },
        );
        r.metric(
            &format!("{label}: drain time after restart"),
            elapsed,
            "s",
            Target::Info,
        );
        r.metric(
            &format!("{label}: drain rate"),
            total as f64 / drained.as_secs_f64().max(1e-9),
            "commands/s",
            Target::Info,
        );

        // Order: in each session, completion follows acceptance order.
        let rows: Vec<(String, i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT session_id, seq, completed_at FROM agent_commands
             WHERE action IN ('hibernate_session', 'wake_session') AND completed_at IS NOT NULL
             ORDER BY session_id, seq",
        )
        .fetch_all(&stack.pool)
        .await?;
        let mut out_of_order = 0;
        let mut last: HashMap<&str, chrono::DateTime<chrono::Utc>> = HashMap::new();
        for (s, _, done) in &rows {
            if let Some(prev) = last.insert(s.as_str(), *done)
                && prev > *done
            {
                out_of_order += 1;
            }
        }
        r.metric(
            &format!("{label}: completed out of per-session order"),
            out_of_order as f64,
            "commands",
            Target::Equals { value: 0.0 },
        );
    }
    for id in &ids {
        api.delete_session(id).await?;
    }
    Ok(())
}
