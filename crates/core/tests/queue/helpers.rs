//! Shared set-up for the queue tests.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use streamspace_core::agents::{self, ConnectInfo};
use streamspace_core::command::{CommandKind, StopSession};
use streamspace_core::queue::{ClaimBatch, ClaimParams, NewCommand, QueueConfig};
use streamspace_core::sessions::Reporter;
use streamspace_core::{CommandQueue, db};

pub async fn pool() -> PgPool {
    streamspace_devpg::testdb::fresh_database(&db::MIGRATOR).await
}

pub async fn queue_with(config: QueueConfig) -> CommandQueue {
    let pool = pool().await;
    add_agent(&pool, "agent-a").await;
    add_agent(&pool, "agent-b").await;
    CommandQueue::new(pool, config).expect("valid queue config")
}

pub async fn queue() -> CommandQueue {
    queue_with(QueueConfig::default()).await
}

pub async fn add_agent(pool: &PgPool, agent_id: &str) {
    sqlx::query("INSERT INTO agents (agent_id) VALUES ($1)")
        .bind(agent_id)
        .execute(pool)
        .await
        .expect("insert agent");
}

pub fn stop(agent: &str, session: Option<&str>) -> NewCommand {
    NewCommand::new(
        agent,
        session.map(str::to_owned),
        CommandKind::StopSession(StopSession::default()),
    )
}

pub async fn enqueue(q: &CommandQueue, cmd: &NewCommand) {
    let mut conn = q.pool().acquire().await.expect("connection");
    CommandQueue::command_enqueue(&mut conn, cmd)
        .await
        .expect("enqueue");
}

pub async fn claim(q: &CommandQueue, agent: &str, owner: &str, limit: i64) -> ClaimBatch {
    q.command_claim(ClaimParams {
        agent_id: agent,
        owner,
        limit,
        epoch: None,
        pipeline_depth: 1,
    })
    .await
    .expect("claim")
}

pub async fn status_of(q: &CommandQueue, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, error_message FROM agent_commands WHERE command_id = $1")
        .bind(id)
        .fetch_one(q.pool())
        .await
        .expect("command row")
}

/// Polls `f` until it yields `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects `agent` as a dispatcher would (a new epoch held by `owner`) and returns the
/// reporter that the connection's writes are fenced by.
pub async fn connect(
    q: &CommandQueue,
    agent: &'static str,
    owner: &'static str,
) -> Reporter<'static> {
    let epoch = agents::agent_connect(q.pool(), agent, owner, &ConnectInfo::default())
        .await
        .expect("connect");
    Reporter {
        agent_id: agent,
        epoch,
        owner,
    }
}

/// Claims as the connection `reporter` (fenced by its epoch and owner).
pub async fn claim_as(q: &CommandQueue, reporter: Reporter<'_>, limit: i64) -> ClaimBatch {
    q.command_claim(ClaimParams {
        agent_id: reporter.agent_id,
        owner: reporter.owner,
        limit,
        epoch: Some(reporter.epoch),
        pipeline_depth: 1,
    })
    .await
    .expect("claim")
}
