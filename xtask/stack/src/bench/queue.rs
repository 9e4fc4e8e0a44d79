//! The queue alone: bulk enqueue, then claimers looping `command_claim` ->
//! `command_complete`, through the same `CommandQueue` calls the dispatcher makes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use streamspace_core::CommandQueue;
use streamspace_core::command::{CommandKind, StopSession};
use streamspace_core::queue::{ClaimParams, Completion, NewCommand, QueueConfig};

use super::{Env, Run};

const COMMANDS: usize = 50_000;
const SESSIONS: usize = 500;
const CLAIMERS: usize = 4;
const BATCH: i64 = 256;
/// What the dispatcher claims with (its default `pipeline_depth`): with each session head,
/// up to 15 commands queued behind it. `STREAMSPACE_BENCH_QUEUE_PIPELINE_DEPTH` overrides
/// it (1: heads only, as before pipelining).
const PIPELINE_DEPTH: i64 = 16;

fn pipeline_depth() -> i64 {
    std::env::var("STREAMSPACE_BENCH_QUEUE_PIPELINE_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PIPELINE_DEPTH)
}

pub async fn independent(env: &Env) -> anyhow::Result<Run> {
    let (enqueue, drain) = drain(env, COMMANDS, 0).await?;
    let mut details = json!({ "commands": COMMANDS, "claimers": CLAIMERS, "batch": BATCH,
                              "enqueue_per_s": enqueue });
    // The full profile repeats the drain with the status-change NOTIFY trigger (migration
    // 3, for watches) switched off: what that trigger costs the queue.
    if env.full() {
        let (_, without_notify) = drain_with(env, COMMANDS, 0, false).await?;
        details["without_notify_trigger_per_s"] = json!(without_notify);
        details["with_over_without_notify"] = json!(drain / without_notify);
    }
    Ok(Run {
        value: drain,
        secondary: None,
        details,
    })
}

/// 500 sessions x 100 commands; the full profile adds the depth series (20k, 50k, 200k
/// commands over the same 500 sessions), which shows whether a claim's cost grows with
/// the backlog.
pub async fn fifo_deep(env: &Env) -> anyhow::Result<Run> {
    let (enqueue, value) = drain(env, COMMANDS, SESSIONS).await?;
    let mut series = Vec::new();
    if env.full() {
        for commands in [20_000, 50_000, 200_000] {
            let (enqueue, drain) = drain(env, commands, SESSIONS).await?;
            series.push(json!({ "commands": commands, "sessions": SESSIONS,
                                "per_session": commands / SESSIONS,
                                "enqueue_per_s": enqueue, "drain_per_s": drain }));
        }
    }
    Ok(Run {
        value,
        secondary: None,
        details: json!({ "commands": COMMANDS, "sessions": SESSIONS, "claimers": CLAIMERS,
                         "batch": BATCH, "pipeline_depth": pipeline_depth(),
                         "enqueue_per_s": enqueue, "depth_series": series }),
    })
}

/// `(enqueue/s, claim+complete/s)` for `commands` spread round-robin over `sessions`
/// (0: no session) in a fresh database.
pub async fn drain(env: &Env, commands: usize, sessions: usize) -> anyhow::Result<(f64, f64)> {
    drain_with(env, commands, sessions, true).await
}

/// [`drain`], optionally with the status-change NOTIFY trigger disabled (an experiment:
/// the services need it for watches).
async fn drain_with(
    env: &Env,
    commands: usize,
    sessions: usize,
    notify_trigger: bool,
) -> anyhow::Result<(f64, f64)> {
    let url = env.fresh_database().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(CLAIMERS as u32 + 2)
        .connect(&url)
        .await?;
    streamspace_core::db::ensure_schema(&pool, streamspace_core::db::SchemaPolicy::Migrate).await?;
    crate::stack::register_agent(&pool, "bench").await?;
    if !notify_trigger {
        sqlx::query("ALTER TABLE agent_commands DISABLE TRIGGER agent_commands_notify_change")
            .execute(&pool)
            .await?;
    }
    let queue = CommandQueue::new(pool.clone(), QueueConfig::default())?;

    let cmds: Vec<NewCommand> = (0..commands)
        .map(|i| {
            let session = (sessions > 0).then(|| format!("s-{}", i % sessions));
            NewCommand::new(
                "bench",
                session,
                CommandKind::StopSession(StopSession::default()),
            )
        })
        .collect();
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    for chunk in cmds.chunks(1_000) {
        CommandQueue::command_enqueue_many(&mut conn, chunk).await?;
    }
    drop(conn);
    let enqueue_per_s = commands as f64 / started.elapsed().as_secs_f64();
    sqlx::query("CHECKPOINT").execute(&pool).await?;

    if env.pgss {
        pgss_reset(&mut *pool.acquire().await?).await?;
    }
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let depth = pipeline_depth();
    // A claimer that found nothing waits for another's completion (which may have made
    // the next commands of its sessions deliverable), as the dispatcher's delivery loop
    // waits for a wake-up; spinning on empty claims would bill the drain for them.
    let completed = Arc::new(tokio::sync::Notify::new());
    for n in 0..CLAIMERS {
        let queue = queue.clone();
        let done = done.clone();
        let completed = completed.clone();
        tasks.spawn(async move {
            let owner = format!("bench-{n}");
            while done.load(Ordering::Relaxed) < commands {
                let claimed = queue
                    .command_claim(ClaimParams {
                        agent_id: "bench",
                        owner: &owner,
                        limit: BATCH,
                        epoch: None,
                        pipeline_depth: depth,
                    })
                    .await?;
                if claimed.commands.is_empty() {
                    // The bound covers a completion that landed between the claim and
                    // this wait.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(5),
                        completed.notified(),
                    )
                    .await;
                    continue;
                }
                let completions: Vec<Completion> = claimed
                    .commands
                    .iter()
                    .filter_map(|c| c.lease.clone())
                    .map(|lease| Completion {
                        lease,
                        result: None,
                    })
                    .collect();
                queue.command_complete(&completions).await?;
                done.fetch_add(completions.len(), Ordering::Relaxed);
                completed.notify_waiters();
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("claimer")??;
    }
    let drain_per_s = commands as f64 / started.elapsed().as_secs_f64();
    if env.pgss {
        print_top_statements(
            &pool,
            &format!("the drain ({commands} commands, {sessions} sessions)"),
        )
        .await?;
    }
    pool.close().await;
    Ok((enqueue_per_s, drain_per_s))
}

/// Starts `pg_stat_statements` afresh (`--pgss`).
pub async fn pgss_reset(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Prints the statements of `what` by total execution time, with their calls (`--pgss`).
pub async fn print_top_statements(pool: &sqlx::PgPool, what: &str) -> anyhow::Result<()> {
    let rows: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls, total_exec_time,
                mean_exec_time
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await?;
    println!("top statements of {what}:");
    for (query, calls, total, mean) in rows {
        println!("  {total:>9.1} ms total  {calls:>6} calls  {mean:>7.2} ms mean  {query}");
    }
    Ok(())
}
