//! `cargo xtask bench`: throughput of the durable queue on a private PostgreSQL with fsync
//! on, through the same `CommandQueue` calls the services make. Prints a table and writes
//! `target/bench/queue.json`. Compare ratios between runs, not single times: the machine
//! is shared and noisy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use streamspace_core::CommandQueue;
use streamspace_core::command::{CommandKind, StopSession};
use streamspace_core::queue::{ClaimParams, Completion, NewCommand, QueueConfig};
use streamspace_devpg::{ClusterOptions, Durability, PgCluster};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub commands: usize,
    /// Sessions the commands are spread over (0: none, so no per-session ordering).
    pub sessions: usize,
    pub claimers: usize,
    pub batch: i64,
}

#[derive(Debug, serde::Serialize)]
struct Figure {
    case: String,
    commands: usize,
    sessions: usize,
    claimers: usize,
    batch: i64,
    enqueue_per_s: f64,
    drain_per_s: f64,
}

pub async fn run(opts: BenchOptions, out: &std::path::Path) -> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start(ClusterOptions {
            durability: Durability::Durable,
            ..Default::default()
        })
    })
    .await??;
    let mut figures = Vec::new();
    for sessions in [0, opts.sessions] {
        let case = if sessions == 0 {
            "independent commands"
        } else {
            "per-session FIFO"
        };
        let db = format!("bench_{}", figures.len());
        let admin = sqlx::PgPool::connect(&cluster.url("postgres")).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(opts.claimers as u32 + 2)
            .connect(&cluster.url(&db))
            .await?;
        streamspace_core::db::ensure_schema(&pool, streamspace_core::db::SchemaPolicy::Migrate)
            .await?;
        crate::stack::register_agent(&pool, "bench").await?;
        let queue = CommandQueue::new(pool.clone(), QueueConfig::default())?;

        let cmds: Vec<NewCommand> = (0..opts.commands)
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
        let enqueue_per_s = opts.commands as f64 / started.elapsed().as_secs_f64();

        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..opts.claimers {
            let queue = queue.clone();
            let done = done.clone();
            let (total, batch) = (opts.commands, opts.batch);
            tasks.spawn(async move {
                let owner = format!("bench-{n}");
                while done.load(Ordering::Relaxed) < total {
                    let claimed = queue
                        .command_claim(ClaimParams {
                            agent_id: "bench",
                            owner: &owner,
                            limit: batch,
                            epoch: None,
                        })
                        .await?;
                    if claimed.commands.is_empty() {
                        tokio::task::yield_now().await;
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
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.context("claimer")??;
        }
        let drain_per_s = opts.commands as f64 / started.elapsed().as_secs_f64();
        println!(
            "{case:>22}: enqueue {enqueue_per_s:>9.0}/s  claim+complete {drain_per_s:>9.0}/s  ({} commands, {sessions} sessions, {} claimers, batch {})",
            opts.commands, opts.claimers, opts.batch
        );
        figures.push(Figure {
            case: case.into(),
            commands: opts.commands,
            sessions,
            claimers: opts.claimers,
            batch: opts.batch,
            enqueue_per_s,
            drain_per_s,
        });
        pool.close().await;
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let doc = serde_json::json!({
        "generated_at": chrono::Utc::now().to_rfc3339(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "postgres": "private cluster, fsync on",
        "figures": figures,
    });
    std::fs::write(out, serde_json::to_string_pretty(&doc)?)?;
    println!("written to {}", out.display());
    Ok(())
}
