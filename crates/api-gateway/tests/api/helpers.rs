//! Test harness: a gateway on a fresh database, serving gRPC on a loopback port and
//! answering REST through its router without a socket; agents registered and "connected"
//! through core calls; tokens minted or forged.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::Value;
use sqlx::PgPool;
use streamspace_api_gateway::config::GatewayConfig;
use streamspace_api_gateway::{App, auth};
use streamspace_core::agents::{self, ConnectInfo, NewAgent};
use streamspace_core::config::{DatabaseConfig, Secret};
use streamspace_core::db::{self, SchemaPolicy};
use streamspace_core::queue::{ClaimParams, Completion, QueueConfig};
use streamspace_core::{CommandQueue, command::Lease};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

pub const SECRET: &str = "test-secret-of-at-least-thirty-two-bytes!";

/// A gateway running in this process.
pub struct TestGateway {
    pub pool: PgPool,
    pub queue: CommandQueue,
    pub config: GatewayConfig,
    pub grpc_addr: SocketAddr,
    router: axum::Router,
    metrics_router: axum::Router,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A REST answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// Asserts a problem+json answer with `status`; returns its detail.
    pub fn problem(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{:?}",
            self.body
        );
        assert_eq!(self.body["status"], status.as_u16());
        let detail = self.body["detail"].as_str().expect("detail").to_owned();
        assert!(!detail.is_empty());
        detail
    }

    pub fn str(&self, key: &str) -> String {
        self.body[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}", self.body))
            .to_owned()
    }
}

pub fn test_config(url: &str) -> GatewayConfig {
    let mut config = GatewayConfig {
        database: DatabaseConfig {
            url: Secret::new(url.to_owned()),
            max_connections: 20,
            ..Default::default()
        },
        ..Default::default()
    };
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.grpc.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.auth.hmac_secret = Some(Secret::new(SECRET.to_owned()));
    config.auth.dev_tokens = true;
    config
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A gateway on a fresh database, with `adjust` applied to the test configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut GatewayConfig)) -> Self {
        let url = streamspace_devpg::testdb::fresh_database_url(&db::MIGRATOR).await;
        let mut config = test_config(&url);
        adjust(&mut config);
        let app = App::build(config.clone(), SchemaPolicy::Require)
            .await
            .expect("gateway builds");
        let router = app.router();
        let metrics_router = app.metrics_router();
        let grpc_addr = app.grpc_addr();
        let pool = PgPool::connect(&url).await.unwrap();
        let queue = CommandQueue::new(pool.clone(), QueueConfig::default()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            pool,
            queue,
            config,
            grpc_addr,
            router,
            metrics_router,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown; waits until both servers have stopped.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("gateway task")
                .expect("gateway stopped cleanly");
        }
    }

    pub fn token(&self, user: &str) -> String {
        auth::mint_dev_token(&self.config.auth, user, false).unwrap()
    }

    pub fn admin_token(&self, user: &str) -> String {
        auth::mint_dev_token(&self.config.auth, user, true).unwrap()
    }

    /// `/metrics` from the internal listener's router: status and text.
    pub async fn metrics(&self) -> (StatusCode, String) {
        let req = Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .unwrap();
        let response = self.metrics_router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// A REST call through the router, without a socket.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.send(req).await
    }

    pub async fn send(&self, req: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None, &[]).await
    }

    pub async fn create(&self, token: &str, body: Value) -> Answer {
        self.call(
            Method::POST,
            "/api/v1/sessions",
            Some(token),
            Some(body),
            &[],
        )
        .await
    }

    /// Creates a `firefox-browser` session and returns `(id, command_id)`.
    pub async fn create_ok(&self, token: &str) -> (String, String) {
        let a = self
            .create(token, serde_json::json!({"template": "firefox-browser"}))
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
        (a.str("id"), a.str("command_id"))
    }

    /// Registers an agent (never connected: offline).
    pub async fn agent(&self, agent_id: &str, cluster: &str) {
        agents::agent_create(
            &self.pool,
            &NewAgent {
                agent_id: agent_id.into(),
                cluster: cluster.into(),
                region: "default".into(),
                max_sessions: None,
            },
        )
        .await
        .unwrap();
    }

    /// Registers an agent and records a live connection with a fresh heartbeat: online,
    /// exactly as the dispatcher records it.
    pub async fn online_agent(&self, agent_id: &str, cluster: &str) {
        self.agent(agent_id, cluster).await;
        agents::agent_connect(
            &self.pool,
            agent_id,
            "test-dispatcher",
            &ConnectInfo::default(),
        )
        .await
        .unwrap();
    }

    /// The dispatcher's path for one pending command of `agent_id`: claim it, ack it,
    /// complete it (with `result`). Returns the completed command's id.
    pub async fn deliver(&self, agent_id: &str, result: Option<Value>) -> String {
        let lease = self.claim(agent_id).await;
        self.queue.command_ack_one(lease.clone()).await.unwrap();
        let id = lease.command_id.to_string();
        self.queue
            .command_complete_one(Completion { lease, result })
            .await
            .unwrap();
        id
    }

    /// Claims the next deliverable command of `agent_id`, as a dispatcher does.
    pub async fn claim(&self, agent_id: &str) -> Lease {
        let batch = self
            .queue
            .command_claim(ClaimParams {
                agent_id,
                owner: "test-dispatcher",
                limit: 1,
                epoch: None,
                pipeline_depth: 1,
            })
            .await
            .unwrap();
        let cmd = batch
            .commands
            .into_iter()
            .next()
            .expect("a deliverable command");
        cmd.lease.expect("claimed commands carry a lease")
    }

    pub async fn session_state(&self, id: &str) -> String {
        sqlx::query_scalar::<_, String>("SELECT state FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// `(action, status, error_message)` of a session's commands in order.
    pub async fn commands_of(&self, id: &str) -> Vec<(String, String, Option<String>)> {
        sqlx::query_as(
            "SELECT action, status, error_message FROM agent_commands WHERE session_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the gateway")
    }
}
