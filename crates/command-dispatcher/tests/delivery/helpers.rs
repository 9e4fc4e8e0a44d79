//! Test harness: a dispatcher on a fresh database, registered agents, and a raw protocol
//! client for edge cases the real agent never produces.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use streamspace_command_dispatcher::{App, DispatcherConfig};
use streamspace_core::CommandQueue;
use streamspace_core::agents::{self, NewAgent};
use streamspace_core::command::{CommandKind, StopSession};
use streamspace_core::config::Secret;
use streamspace_core::db::{self, SchemaPolicy};
use streamspace_core::queue::{NewCommand, QueueConfig};
use streamspace_faultnet::FaultProxy;
use streamspace_proto::agent::v1::{self as pb, agent_message::Msg, dispatcher_message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// A `StopSession` command for `session` of `agent`.
pub fn stop(agent: &str, session: &str) -> NewCommand {
    NewCommand::new(
        agent,
        Some(session.into()),
        CommandKind::StopSession(StopSession::default()),
    )
}

/// A dispatcher running in this process.
pub struct TestDispatcher {
    pub addr: SocketAddr,
    /// `/metrics` and `/healthz`.
    pub http_addr: SocketAddr,
    pub pool: PgPool,
    pub queue: CommandQueue,
    pub config: DispatcherConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Fast liveness settings so tests about silence finish quickly.
pub fn fast_config(url: &str) -> DispatcherConfig {
    DispatcherConfig {
        database: streamspace_core::config::DatabaseConfig {
            url: Secret::new(url.to_owned()),
            max_connections: 20,
            ..Default::default()
        },
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        heartbeat_interval_ms: 200,
        offline_after_ms: 600,
        poll_interval_ms: 200,
        queue: QueueConfig {
            lease: Duration::from_secs(5),
            ..QueueConfig::default()
        },
        ..DispatcherConfig::default()
    }
}

impl TestDispatcher {
    /// A dispatcher on a fresh database.
    pub async fn start() -> Self {
        let url = streamspace_devpg::testdb::fresh_database_url(&db::MIGRATOR).await;
        Self::start_with(fast_config(&url)).await
    }

    pub async fn start_with(config: DispatcherConfig) -> Self {
        let direct = config.database.url.expose().clone();
        Self::start_on(config, &direct).await
    }

    /// A dispatcher whose database URL is `config`'s (e.g. through a fault proxy), while
    /// the test's own pool uses `direct_url`, so the test can watch the database while the
    /// dispatcher's connections are broken.
    pub async fn start_on(config: DispatcherConfig, direct_url: &str) -> Self {
        let app = App::build(config.clone(), SchemaPolicy::Require)
            .await
            .expect("dispatcher builds");
        let addr = app.grpc_addr();
        let http_addr = app.http_addr();
        let pool = sqlx::PgPool::connect(direct_url).await.unwrap();
        let queue = CommandQueue::new(pool.clone(), config.queue.clone()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            http_addr,
            pool,
            queue,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value of one sample on `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.http_addr))
            .await
            .expect("metrics reachable")
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The status code of `GET /readyz`.
    pub async fn readiness(&self) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.http_addr))
            .await
            .expect("readyz reachable")
            .status()
            .as_u16()
    }

    /// Graceful shutdown; waits until the server has stopped.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("dispatcher task")
                .expect("dispatcher stopped cleanly");
        }
    }

    /// Registers an agent and returns its credential.
    pub async fn agent(&self, agent_id: &str) -> String {
        register_agent(&self.pool, agent_id).await
    }

    pub async fn enqueue(&self, cmds: &[NewCommand]) {
        let mut conn = self.pool.acquire().await.unwrap();
        CommandQueue::command_enqueue_many(&mut conn, cmds)
            .await
            .unwrap();
    }

    pub async fn statuses(&self, ids: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for id in ids {
            let s: (String,) =
                sqlx::query_as("SELECT status FROM agent_commands WHERE command_id = $1")
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            out.push(s.0);
        }
        out
    }

    pub async fn agent_online(&self, agent_id: &str) -> bool {
        agents::agent_get(&self.pool, agent_id, self.config.offline_after())
            .await
            .unwrap()
            .is_some_and(|a| a.online)
    }
}

pub async fn register_agent(pool: &PgPool, agent_id: &str) -> String {
    agents::agent_create(
        pool,
        &NewAgent {
            agent_id: agent_id.into(),
            cluster: "default".into(),
            region: "default".into(),
            max_sessions: None,
        },
    )
    .await
    .unwrap();
    agents::credential_issue(pool, agent_id)
        .await
        .unwrap()
        .token
        .expose()
        .clone()
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

pub async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .expect("connect to dispatcher")
}

/// A raw protocol client: sends exactly what a test tells it to.
pub struct RawAgent {
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub rx: tonic::Streaming<pb::DispatcherMessage>,
    pub welcome: pb::Welcome,
}

pub fn hello(sessions: Vec<pb::SessionObservation>) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Msg::Hello(pb::Hello {
            agent_version: "test".into(),
            protocol_version: pb::PROTOCOL_VERSION,
            capabilities: vec![],
            sessions,
            runtime: "raw".into(),
            ..Default::default()
        })),
    }
}

/// An open Connect stream: what the client sends, what the dispatcher answers.
pub type Opened = (
    mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::DispatcherMessage>,
);

/// Opens a Connect stream with `token` and sends `first`; returns the call's result.
pub async fn open(
    url: &str,
    token: Option<&str>,
    first: pb::AgentMessage,
) -> Result<Opened, tonic::Status> {
    open_on(channel(url).await, token, first).await
}

/// [`open`] over an existing channel (TLS, for instance).
pub async fn open_on(
    channel: Channel,
    token: Option<&str>,
    first: pb::AgentMessage,
) -> Result<Opened, tonic::Status> {
    let (tx, rx) = mpsc::channel(1024);
    tx.send(first).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let response = client.connect(request).await?;
    Ok((tx, response.into_inner()))
}

impl RawAgent {
    /// Connects without capabilities: one command per session outstanding at a time.
    pub async fn connect(url: &str, token: &str) -> Self {
        Self::connect_with(url, token, hello(vec![])).await
    }

    /// Connects as an agent that runs pipelined commands.
    pub async fn connect_pipelining(url: &str, token: &str) -> Self {
        let mut first = hello(vec![]);
        if let Some(Msg::Hello(h)) = &mut first.msg {
            h.capabilities = vec![pb::PIPELINE_CAPABILITY.to_owned()];
        }
        Self::connect_with(url, token, first).await
    }

    pub async fn connect_with(url: &str, token: &str, first: pb::AgentMessage) -> Self {
        let (tx, mut rx) = open(url, Some(token), first).await.expect("connect");
        let welcome = match rx
            .message()
            .await
            .expect("welcome")
            .expect("stream open")
            .msg
        {
            Some(dispatcher_message::Msg::Welcome(w)) => w,
            other => panic!("expected Welcome, got {other:?}"),
        };
        Self { tx, rx, welcome }
    }

    /// The next pushed command, failing after `limit`.
    pub async fn next_command(&mut self, limit: Duration) -> pb::Command {
        loop {
            let msg = tokio::time::timeout(limit, self.rx.message())
                .await
                .expect("a command within the limit")
                .expect("stream healthy")
                .expect("stream open");
            if let Some(dispatcher_message::Msg::Command(c)) = msg.msg {
                return c;
            }
        }
    }

    /// Whether a command arrives within `limit` (`None`: none did).
    pub async fn maybe_command(&mut self, limit: Duration) -> Option<pb::Command> {
        match tokio::time::timeout(limit, self.rx.message()).await {
            Ok(Ok(Some(pb::DispatcherMessage {
                msg: Some(dispatcher_message::Msg::Command(c)),
            }))) => Some(c),
            _ => None,
        }
    }

    pub async fn send(&self, msg: Msg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("stream open");
    }

    pub async fn ack(&self, c: &pb::Command) {
        self.send(Msg::Ack(pb::Ack {
            command_id: c.command_id.clone(),
            lease_token: c.lease_token,
        }))
        .await;
    }

    pub async fn complete(&self, c: &pb::Command) {
        self.send(Msg::Result(pb::CommandResult {
            command_id: c.command_id.clone(),
            lease_token: c.lease_token,
            outcome: Some(pb::command_result::Outcome::Completed(pb::Completed {
                session: None,
            })),
        }))
        .await;
    }

    pub async fn fail(&self, c: &pb::Command, retryable: bool) {
        self.send(Msg::Result(pb::CommandResult {
            command_id: c.command_id.clone(),
            lease_token: c.lease_token,
            outcome: Some(pb::command_result::Outcome::Failed(pb::Failed {
                message: "injected".into(),
                retryable,
            })),
        }))
        .await;
    }

    pub async fn not_run(&self, c: &pb::Command) {
        self.send(Msg::Result(pb::CommandResult {
            command_id: c.command_id.clone(),
            lease_token: c.lease_token,
            outcome: Some(pb::command_result::Outcome::NotRun(pb::NotRun {
                reason: "the command before it failed".into(),
            })),
        }))
        .await;
    }

    pub async fn heartbeat(&self) {
        self.send(Msg::Heartbeat(pb::Heartbeat::default())).await;
    }

    /// The status the stream ends with (`Ok` for a clean end), failing after `limit`.
    pub async fn end_status(&mut self, limit: Duration) -> tonic::Code {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.message()).await {
                Err(_) => panic!("the stream did not end within {limit:?}"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return tonic::Code::Ok,
                Ok(Err(status)) => return status.code(),
            }
        }
    }

    /// Waits until the dispatcher closes the stream (or `limit` passes).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.message()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
            }
        }
    }
}

/// A fresh database, and a fault proxy in front of its server.
pub async fn database_behind_proxy() -> (String, FaultProxy) {
    let url = streamspace_devpg::testdb::fresh_database_url(&db::MIGRATOR).await;
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let target: SocketAddr = format!("{}:{}", options.get_host(), options.get_port())
        .parse()
        .expect("the test database listens on an IP address");
    let proxy = FaultProxy::start(target).await.unwrap();
    (url, proxy)
}

/// A dispatcher whose database connections go through `proxy`; `tweak` adjusts the fast
/// test configuration.
pub async fn dispatcher_behind(
    url: &str,
    proxy: &FaultProxy,
    tweak: impl FnOnce(&mut DispatcherConfig),
) -> TestDispatcher {
    let mut config = fast_config(&proxy.rewrite_url(url));
    config.database.acquire_timeout_secs = 1;
    config.maintenance.rescue_interval_ms = 100;
    tweak(&mut config);
    TestDispatcher::start_on(config, url).await
}

/// Sends a heartbeat every `every` until the returned task is aborted or the stream goes:
/// what a live agent does, so the dispatcher keeps the connection (and its leases) alive.
pub fn keep_beating(tx: &mpsc::Sender<pb::AgentMessage>, every: Duration) -> JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let beat = pb::AgentMessage {
                msg: Some(Msg::Heartbeat(pb::Heartbeat::default())),
            };
            if tx.send(beat).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// The connection the database names as the agent's current one (`None`: not connected).
pub async fn connected_owner(pool: &PgPool, agent_id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT connected_owner FROM agents WHERE agent_id = $1")
        .bind(agent_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The agent's `last_heartbeat_at`, as microseconds (for "a newer heartbeat was recorded").
pub async fn last_heartbeat(pool: &PgPool, agent_id: &str) -> i64 {
    let (at,): (Option<i64>,) = sqlx::query_as(
        "SELECT (extract(epoch FROM last_heartbeat_at) * 1000000)::int8 FROM agents WHERE agent_id = $1",
    )
    .bind(agent_id)
    .fetch_one(pool)
    .await
    .unwrap();
    at.unwrap_or(0)
}
