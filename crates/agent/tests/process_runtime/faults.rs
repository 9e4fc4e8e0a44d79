//! The real agent against the real dispatcher and PostgreSQL, with faults injected into
//! the runtime ([`FaultyRuntime`] around the real process runtime): a start that fails
//! retryably once, a listing that fails during a reconnect.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use streamspace_agent::runtime::faulty::{FaultyRuntime, Op, Schedule};
use streamspace_agent::runtime::{ProcessRuntime, SessionRuntime};
use streamspace_agent::{Agent, AgentConfig, RunningAgent};
use streamspace_command_dispatcher::{App, DispatcherConfig};
use streamspace_core::CommandQueue;
use streamspace_core::agents::{self, NewAgent};
use streamspace_core::command::{CommandKind, StartSession};
use streamspace_core::config::{DatabaseConfig, Secret};
use streamspace_core::db::{self, SchemaPolicy};
use streamspace_core::queue::{NewCommand, QueueConfig};
use tokio::sync::oneshot;

use crate::helpers::*;

/// A dispatcher on a fresh database, in this process.
struct Dispatcher {
    url: String,
    pool: PgPool,
    _stop: oneshot::Sender<()>,
}

impl Dispatcher {
    async fn start(tweak: impl FnOnce(&mut DispatcherConfig)) -> Self {
        let db_url = streamspace_devpg::testdb::fresh_database_url(&db::MIGRATOR).await;
        let mut config = DispatcherConfig {
            database: DatabaseConfig {
                url: Secret::new(db_url.clone()),
                ..DatabaseConfig::default()
            },
            listen: ([127, 0, 0, 1], 0).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            heartbeat_interval_ms: 200,
            offline_after_ms: 600,
            poll_interval_ms: 200,
            queue: QueueConfig {
                lease: Duration::from_secs(5),
                ..QueueConfig::default()
            },
            ..DispatcherConfig::default()
        };
        tweak(&mut config);
        let app = App::build(config, SchemaPolicy::Require).await.unwrap();
        let url = format!("http://{}", app.grpc_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            pool: PgPool::connect(&db_url).await.unwrap(),
            _stop: stop,
        }
    }

    /// Registers `agent_id` and returns its credential.
    async fn agent(&self, agent_id: &str) -> String {
        agents::agent_create(
            &self.pool,
            &NewAgent {
                agent_id: agent_id.into(),
                cluster: "default".into(),
                region: "default".into(),
                max_sessions: None,
            },
        )
        .await
        .unwrap();
        agents::credential_issue(&self.pool, agent_id)
            .await
            .unwrap()
            .token
            .expose()
            .clone()
    }

    /// A session row as the gateway writes it, plus its start command; returns the
    /// command id.
    async fn start_session(&self, session: &str) -> String {
        sqlx::query(
            "INSERT INTO sessions (id, user_id, template, agent_id, state) \
             VALUES ($1, 'tester', 'firefox-browser', 'agent-a', 'pending')",
        )
        .bind(session)
        .execute(&self.pool)
        .await
        .unwrap();
        let cmd = NewCommand::new(
            "agent-a",
            Some(session.into()),
            CommandKind::StartSession(StartSession {
                template: "firefox-browser".into(),
                user_id: Some("tester".into()),
                resources: None,
                home_volume: false,
                env: Default::default(),
            }),
        );
        let mut conn = self.pool.acquire().await.unwrap();
        CommandQueue::command_enqueue(&mut conn, &cmd)
            .await
            .unwrap();
        cmd.command_id.to_string()
    }

    /// `(status, attempts)` of a command once it is terminal.
    async fn finished(&self, command_id: &str) -> (String, i32) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (status, attempts): (String, i32) =
                sqlx::query_as("SELECT status, attempts FROM agent_commands WHERE command_id = $1")
                    .bind(command_id)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                return (status, attempts);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "command {command_id} still {status} after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn session_state(&self, session: &str) -> (String, Option<String>) {
        sqlx::query_as("SELECT state, status_message FROM sessions WHERE id = $1")
            .bind(session)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// The real process runtime in `dir`, behind a fault injector.
async fn faulty_runtime(dir: &StateDir) -> (Arc<ProcessRuntime>, Arc<FaultyRuntime>) {
    let process = Arc::new(dir.runtime(catalog()).await);
    let faulty = Arc::new(FaultyRuntime::new(process.clone()));
    (process, faulty)
}

async fn connected_agent(
    d: &Dispatcher,
    token: &str,
    dir: &StateDir,
    rt: &Arc<FaultyRuntime>,
) -> RunningAgent {
    let config = AgentConfig::new(&d.url, token, dir.path());
    let mut agent = Agent::new(config, rt.clone()).unwrap().spawn();
    agent.wait_connected(None).await.unwrap();
    agent
}

/// Defect 1: the executor used to keep a retryable failure as the command's final
/// outcome, so every redelivery replayed it without calling the runtime, and a transient
/// error became a permanent failure after `max_attempts`. The retry now runs the runtime
/// again (idempotently: one spawn).
#[tokio::test]
async fn regression_retry_reexecutes() {
    let d = Dispatcher::start(|c| {
        c.queue.retry_base = Duration::from_millis(50);
        c.queue.retry_cap = Duration::from_millis(400);
    })
    .await;
    let token = d.agent("agent-a").await;
    let dir = StateDir::new();
    let (process, faulty) = faulty_runtime(&dir).await;
    faulty.fail_next(Op::Start, 1);
    let agent = connected_agent(&d, &token, &dir, &faulty).await;

    let id = d.start_session("s-retry").await;
    let (status, attempts) = d.finished(&id).await;
    if let Some(pid) = process.pid("s-retry") {
        dir.track(pid);
    }
    assert_eq!(
        (status.as_str(), attempts),
        ("completed", 2),
        "the retry ran the runtime again and succeeded"
    );
    assert_eq!(faulty.calls(Op::Start), 2);
    assert_eq!(faulty.injected(Op::Start), 1);
    assert_eq!(dir.journal_count("spawn", "s-retry"), 1, "one real effect");
    assert_eq!(d.session_state("s-retry").await.0, "running");
    agent.shutdown().await.unwrap();
}

/// Defect 3: an agent whose runtime could not list its sessions at reconnect used to say
/// "I run nothing": every running session was marked failed, and at the next reconnect
/// stopped as an orphan. Unknown is now said as unknown and changes nothing.
#[tokio::test]
async fn regression_failed_list_keeps_sessions() {
    let d = Dispatcher::start(|_| {}).await;
    let token = d.agent("agent-a").await;
    let dir = StateDir::new();
    let (process, faulty) = faulty_runtime(&dir).await;
    let agent = connected_agent(&d, &token, &dir, &faulty).await;
    let id = d.start_session("s-kept").await;
    assert_eq!(d.finished(&id).await.0, "completed");
    let pid = process.pid("s-kept").expect("the session runs");
    dir.track(pid);
    agent.shutdown().await.unwrap();

    // The agent comes back while its runtime cannot list (a Kubernetes API hiccup).
    faulty.set(Op::List, Schedule::Always, true);
    let agent = connected_agent(&d, &token, &dir, &faulty).await;
    // Reconciliation ran before Welcome; let heartbeats (also unlisted) come in too.
    let listed = faulty.calls(Op::List);
    eventually("two more heartbeats without an inventory", || {
        faulty.calls(Op::List) >= listed + 2
    })
    .await;
    assert_eq!(
        d.session_state("s-kept").await,
        ("running".to_owned(), None),
        "an unknown inventory changed the session"
    );
    agent.shutdown().await.unwrap();

    // Listing works again: the session is reported and nothing is stopped.
    faulty.heal(Op::List);
    let agent = connected_agent(&d, &token, &dir, &faulty).await;
    assert_eq!(d.session_state("s-kept").await.0, "running");
    let (stops,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM agent_commands WHERE session_id = 's-kept' AND action = 'stop_session'",
    )
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(stops, 0, "no stop queued for a live session");
    assert_eq!(
        process.pid("s-kept"),
        Some(pid),
        "the session process lives on"
    );
    assert!(
        process
            .list()
            .await
            .unwrap()
            .iter()
            .any(|o| o.session_id == "s-kept")
    );
    agent.shutdown().await.unwrap();
}
