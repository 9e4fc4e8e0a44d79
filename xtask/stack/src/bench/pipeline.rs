//! The whole pipeline with real processes: dispatcher and agent (`record` runtime), the
//! database in between. Times come from the database's own timestamps where a hop ends
//! there (`connected_at`, `acknowledged_at`, `completed_at`), so polling for the end of a
//! run adds nothing to the figure.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use streamspace_core::CommandQueue;
use streamspace_core::command::{CommandKind, StopSession};
use streamspace_core::queue::NewCommand;

use super::{Env, Run};
use crate::stack::{Stack, StackOptions};

const DRAIN_COMMANDS: usize = 10_000;

/// Settings of every benchmark stack: agents run the `record` runtime; the gateway has
/// no rate limit and a per-user quota high enough for the load. For experiments, every
/// `STREAMSPACE_BENCH_DISPATCHER_<SETTING>` variable of the bench's environment becomes
/// the dispatchers' `STREAMSPACE_<SETTING>` (e.g. `STREAMSPACE_BENCH_DISPATCHER_PIPELINE_DEPTH=1`).
pub fn record_stack_options(url: String, env: &Env, agents: usize, gateway: bool) -> StackOptions {
    StackOptions {
        gateway,
        dispatcher_env: std::env::vars()
            .filter_map(|(k, v)| {
                let setting = k.strip_prefix("STREAMSPACE_BENCH_DISPATCHER_")?;
                Some((format!("STREAMSPACE_{setting}"), v))
            })
            .collect(),
        agent_env: vec![("STREAMSPACE_RUNTIME".into(), "record".into())],
        gateway_env: vec![
            ("STREAMSPACE_RATE_LIMIT__ENABLED".into(), "false".into()),
            (
                "STREAMSPACE_LIMITS__MAX_ACTIVE_SESSIONS_PER_USER".into(),
                "1000000".into(),
            ),
        ],
        ..StackOptions::new(url, env.scratch("stack"), 1, agents)
    }
}

async fn record_stack(env: &Env, agents: usize, gateway: bool) -> anyhow::Result<Stack> {
    let url = env.fresh_database().await?;
    Stack::start(record_stack_options(url, env, agents, gateway)).await
}

/// Polls `check` every 20 ms until it is true, failing after `limit`.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the dispatcher has recorded the end of `agent`'s connection. On a timeout
/// the error carries the dispatchers' last log lines: once in about 45 agent kills the
/// connection was still recorded 30 s later, and the benchmark kept nothing to say why.
async fn wait_offline(stack: &Stack, agent: &str) -> anyhow::Result<()> {
    let pool = &stack.pool;
    let waited = until(
        "the agent's connection to end",
        Duration::from_secs(30),
        || async {
            let owner: Option<String> =
                sqlx::query_scalar("SELECT connected_owner FROM agents WHERE agent_id = $1")
                    .bind(agent)
                    .fetch_one(pool)
                    .await?;
            Ok(owner.is_none())
        },
    )
    .await;
    waited.map_err(|e| {
        let logs: Vec<String> = stack
            .dispatchers
            .iter()
            .filter_map(|d| d.proc.as_ref())
            .map(|p| p.recent_output())
            .collect();
        anyhow::anyhow!("{e}; the dispatchers' last log lines:\n{}", logs.join("\n"))
    })
}

/// Waits until `n` commands are completed; any command that failed is an error. Polls
/// only "is anything still open?" (an index probe), so the wait adds next to nothing to
/// the database load it measures; the full count runs once, at the end.
pub async fn wait_completed(pool: &PgPool, n: usize, limit: Duration) -> anyhow::Result<()> {
    until(&format!("{n} completed commands"), limit, || async {
        let open: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM agent_commands WHERE status IN ('pending', 'sent', 'ack'))",
        )
        .fetch_one(pool)
        .await?;
        Ok(!open)
    })
    .await?;
    let (done, failed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'completed'),
                count(*) FILTER (WHERE status IN ('failed', 'cancelled'))
         FROM agent_commands",
    )
    .fetch_one(pool)
    .await?;
    if failed > 0 {
        bail!("{failed} commands failed");
    }
    if (done as usize) < n {
        bail!("nothing left open, but only {done} of {n} commands completed");
    }
    Ok(())
}

fn stops(agent: &str, n: usize, session: impl Fn(usize) -> String) -> Vec<NewCommand> {
    (0..n)
        .map(|i| {
            NewCommand::new(
                agent,
                Some(session(i)),
                CommandKind::StopSession(StopSession::default()),
            )
        })
        .collect()
}

async fn enqueue_all(pool: &PgPool, cmds: &[NewCommand]) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    for chunk in cmds.chunks(1_000) {
        CommandQueue::command_enqueue_many(&mut conn, chunk).await?;
    }
    Ok(())
}

async fn seconds_between(pool: &PgPool, sql: &'static str, agent: &str) -> anyhow::Result<f64> {
    let (from, to): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        sqlx::query_as(sql).bind(agent).fetch_one(pool).await?;
    let (Some(from), Some(to)) = (from, to) else {
        bail!("missing timestamps for {sql}");
    };
    Ok((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6)
}

/// 10,000 commands queued while the agent is down, spread over `sessions` sessions
/// (`None`: one session each); seconds from the agent's connect to the last completion.
async fn drain(env: &Env, sessions: Option<usize>) -> anyhow::Result<Run> {
    let mut stack = record_stack(env, 1, false).await?;
    let result = async {
        let agent = stack.agents[0].agent_id.clone();
        stack.kill_agent(0).await;
        wait_offline(&stack, &agent).await?;
        let cmds = stops(&agent, DRAIN_COMMANDS, |i| match sessions {
            Some(n) => format!("d-{}", i % n),
            None => format!("w-{i}"),
        });
        enqueue_all(&stack.pool, &cmds).await?;
        sqlx::query("CHECKPOINT").execute(&stack.pool).await?;
        if env.pgss {
            super::queue::pgss_reset(&mut *stack.pool.acquire().await?).await?;
        }
        let spawned = Instant::now();
        stack.spawn_agent(0).await?;
        wait_completed(&stack.pool, DRAIN_COMMANDS, Duration::from_secs(600)).await?;
        let spawn_to_last = spawned.elapsed().as_secs_f64();
        if env.pgss {
            super::queue::print_top_statements(&stack.pool, "the drain").await?;
        }
        let value = seconds_between(
            &stack.pool,
            "SELECT a.connected_at, (SELECT max(completed_at) FROM agent_commands)
             FROM agents a WHERE a.agent_id = $1",
            &agent,
        )
        .await?;
        Ok(Run {
            value,
            secondary: None,
            details: json!({
                "commands": DRAIN_COMMANDS,
                "sessions": sessions.unwrap_or(DRAIN_COMMANDS),
                "commands_per_s": DRAIN_COMMANDS as f64 / value,
                "agent_spawn_to_last_completion_s": spawn_to_last,
            }),
        })
    }
    .await;
    stack.stop().await;
    result
}

pub async fn drain_wide(env: &Env) -> anyhow::Result<Run> {
    drain(env, None).await
}

pub async fn drain_deep(env: &Env) -> anyhow::Result<Run> {
    drain(env, Some(20)).await
}

/// Commands accepted in bulk while the agent is connected, each for its own session:
/// completions per second from the first acceptance to the last completion.
pub async fn e2e_throughput(env: &Env) -> anyhow::Result<Run> {
    let n = if env.full() { 50_000 } else { 20_000 };
    let mut stack = record_stack(env, 1, false).await?;
    let result = async {
        let agent = stack.agents[0].agent_id.clone();
        let cmds = stops(&agent, n, |i| format!("t-{i}"));
        enqueue_all(&stack.pool, &cmds).await?;
        wait_completed(&stack.pool, n, Duration::from_secs(600)).await?;
        let seconds = seconds_between(
            &stack.pool,
            "SELECT min(created_at), max(completed_at) FROM agent_commands
             WHERE agent_id = $1",
            &agent,
        )
        .await?;
        Ok(Run {
            value: n as f64 / seconds,
            secondary: None,
            details: json!({ "commands": n, "seconds": seconds }),
        })
    }
    .await;
    stack.stop().await;
    result
}

/// An agent process started while one command waits for it: milliseconds from the spawn
/// to the connection the dispatcher records, and to the command's acknowledgement.
/// Median of five restarts.
pub async fn reconnect(env: &Env) -> anyhow::Result<Run> {
    let mut stack = record_stack(env, 1, false).await?;
    let result = async {
        let agent = stack.agents[0].agent_id.clone();
        let (mut online, mut delivered) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            stack.kill_agent(0).await;
            wait_offline(&stack, &agent).await?;
            let cmd = stops(&agent, 1, |_| "r-1".into()).remove(0);
            enqueue_all(&stack.pool, std::slice::from_ref(&cmd)).await?;
            let spawned_at = Utc::now();
            stack.spawn_agent(0).await?;
            let pool = stack.pool.clone();
            let id = cmd.command_id.to_string();
            until(
                "the command to be acknowledged",
                Duration::from_secs(30),
                || {
                    let (pool, id) = (pool.clone(), id.clone());
                    async move {
                        let acked: Option<DateTime<Utc>> = sqlx::query_scalar(
                            "SELECT acknowledged_at FROM agent_commands WHERE command_id = $1",
                        )
                        .bind(&id)
                        .fetch_one(&pool)
                        .await?;
                        Ok(acked.is_some())
                    }
                },
            )
            .await?;
            let (connected, acked): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
                sqlx::query_as(
                    "SELECT (SELECT connected_at FROM agents WHERE agent_id = $1),
                        (SELECT acknowledged_at FROM agent_commands WHERE command_id = $2)",
                )
                .bind(&agent)
                .bind(&id)
                .fetch_one(&stack.pool)
                .await?;
            let ms = |t: Option<DateTime<Utc>>| -> anyhow::Result<f64> {
                let t = t.context("missing timestamp")?;
                Ok((t - spawned_at).num_microseconds().unwrap_or(0) as f64 / 1e3)
            };
            online.push(ms(connected)?);
            delivered.push(ms(acked)?);
        }
        Ok(Run {
            value: median(&mut online.clone()),
            secondary: Some(median(&mut delivered.clone())),
            details: json!({ "spawn_to_online_ms": online, "spawn_to_first_ack_ms": delivered }),
        })
    }
    .await;
    stack.stop().await;
    result
}

/// Gateway, dispatcher and agent running with nothing to do: committed and rolled-back
/// transactions per second in their database (PostgreSQL's own counters; the two reads
/// that take the measurement are subtracted).
pub async fn idle(env: &Env) -> anyhow::Result<Run> {
    let window = Duration::from_secs(if env.full() { 60 } else { 10 });
    // Three stacks, each adding one service, so the figure can be attributed: the
    // dispatcher alone, then with its agent, then with the gateway. They idle side by
    // side, each in its own database (PostgreSQL counts transactions per database).
    let (dispatcher, with_agent, all) = tokio::try_join!(
        idle_rate(env, window, 0, false),
        idle_rate(env, window, 1, false),
        idle_rate(env, window, 1, true),
    )?;
    Ok(Run {
        value: all.0,
        secondary: None,
        details: json!({
            "transactions": all.1, "seconds": all.2,
            "services": ["api-gateway", "command-dispatcher", "agent"],
            "per_s_by_stack": {
                "dispatcher alone": dispatcher.0,
                "dispatcher + connected agent": with_agent.0,
                "dispatcher + agent + gateway": all.0,
            },
            "per_s_attributed": {
                "dispatcher (its own loops)": dispatcher.0,
                "a connected agent (its heartbeats, through the dispatcher)": with_agent.0 - dispatcher.0,
                "gateway": all.0 - with_agent.0,
            },
        }),
    })
}

/// `(transactions/s, transactions, seconds)` of a stack with `agents` agents (and the
/// gateway, or not) doing nothing for `window`.
async fn idle_rate(
    env: &Env,
    window: Duration,
    agents: usize,
    gateway: bool,
) -> anyhow::Result<(f64, i64, f64)> {
    let mut stack = record_stack(env, agents, gateway).await?;
    let result = async {
        // Let start-up traffic (handshakes, first heartbeats) pass and be counted before
        // the first reading. Backends report their transaction counts lazily: one that went
        // idle within a second of its last report waits up to PGSTAT_IDLE_INTERVAL (10 s)
        // for the next, and `pg_stat_force_next_flush()` only hurries the caller. With a
        // 3 s settle the start-up burst was reported inside the window: 51 transactions
        // counted against 24 that the server's statement log shows (parse or execute) in
        // that window.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let mut conn = stack.pool.acquire().await?;
        if env.pgss {
            super::queue::pgss_reset(&mut conn).await?;
        }
        let read = "SELECT xact_commit + xact_rollback FROM pg_stat_database
                    WHERE datname = current_database()";
        // Connections opened count too: a new backend's start-up runs transactions.
        let opened = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()";
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut *conn)
            .await?;
        let before: i64 = sqlx::query_scalar(read).fetch_one(&mut *conn).await?;
        let opened_before: i64 = sqlx::query_scalar(opened).fetch_one(&mut *conn).await?;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        // Backends flush their counters at least once a second while idle.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut *conn)
            .await?;
        let after: i64 = sqlx::query_scalar(read).fetch_one(&mut *conn).await?;
        let opened_after: i64 = sqlx::query_scalar(opened).fetch_one(&mut *conn).await?;
        println!(
            "idle, {agents} agent(s), gateway {gateway}: {} transactions, {} connections opened",
            after - before,
            opened_after - opened_before
        );
        let seconds = started.elapsed().as_secs_f64();
        if env.pgss {
            super::queue::print_top_statements(
                &stack.pool,
                &format!("idle, {agents} agent(s), gateway {gateway}, {seconds:.0} s"),
            )
            .await?;
        }
        // Counted inside the window: the first read and the second flush request.
        let own = 2;
        let xacts = (after - before - own).max(0);
        Ok((xacts as f64 / seconds, xacts, seconds))
    }
    .await;
    stack.stop().await;
    result
}

pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile (sorts `v`).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}
