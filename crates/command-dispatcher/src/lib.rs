//! The command-dispatcher: holds one gRPC stream per connected agent, delivers the
//! agent's deliverable commands from the Postgres queue, and turns acks, results,
//! heartbeats and session reports into fenced state transitions.
//!
//! Several replicas may run against one database: each delivers only for the agents
//! connected to it, and the queue's leases make concurrent delivery impossible.
#![forbid(unsafe_code)]

mod auth;
mod config;
mod connection;
mod convert;
mod health;
mod http;
mod maintenance;
mod registry;
mod reports;
mod service;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use anyhow::Context;
use streamspace_core::CommandQueue;
use streamspace_core::db::{self, SchemaPolicy};
use streamspace_core::queue::{CommandListener, Wakeup};
use streamspace_proto::agent::v1::agent_service_server::AgentServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{DispatcherConfig, MaintenanceConfig};
pub use connection::MAX_INVENTORY;
pub use maintenance::{CommandPruner, LeaseRescuer};
pub use tls::{HANDSHAKE_TIMEOUT, TlsConfig};

use registry::Registry;

/// HTTP/2 streams one agent connection may open: its `Connect` and a few health checks.
const MAX_STREAMS_PER_CONNECTION: u32 = 8;
/// Limit on a `Connect` call up to its response (authentication and the handshake), not
/// on the stream that follows.
const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Shared state of one dispatcher replica.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: DispatcherConfig,
    pub queue: CommandQueue,
    pub registry: Registry,
    /// Flips to `true` once shutdown begins: connections stop claiming and close.
    pub shutdown: watch::Receiver<bool>,
    /// `true` while the database answers ([`health::DbHealth`]); connections end when it
    /// turns `false`, so agents fail over to a replica that can reach the database.
    pub db_ok: watch::Receiver<bool>,
    pub stats: ReplicaStats,
    /// The agent link's TLS, when configured.
    pub tls: Option<Arc<tls::TlsState>>,
}

/// Counters and gauges of this replica (the queue's own counters are process-wide, in
/// `streamspace_core::telemetry`), rendered on `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ReplicaStats {
    /// Connections between authentication and `Welcome`.
    pub handshakes_in_progress: AtomicI64,
    /// Calls whose agent went away before the handshake finished (the handshake still
    /// runs to its end, and undoes or cleans up what it recorded).
    pub handshakes_abandoned: AtomicU64,
    /// Agent reports (acks, results, observations) whose write failed and is retried.
    pub report_write_errors: AtomicU64,
    /// Acks and results for a lease this connection does not hold, ignored.
    pub reports_for_unheld_leases: AtomicU64,
    /// Heartbeat (liveness and lease renewal) writes that failed.
    pub heartbeat_write_errors: AtomicU64,
    /// Database probes that failed or timed out.
    pub db_probe_failures: AtomicU64,
    /// TLS handshakes that failed or timed out (a client without a valid certificate,
    /// a plaintext client on a TLS port).
    pub tls_handshake_failures: AtomicU64,
}

/// A built dispatcher, bound to its address, not yet serving.
#[derive(Debug)]
pub struct App {
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    db_ok_tx: watch::Sender<bool>,
}

impl App {
    /// Connects to the database, checks the schema (or migrates, per `policy`) and binds
    /// the gRPC listener.
    pub async fn build(config: DispatcherConfig, policy: SchemaPolicy) -> anyhow::Result<Self> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        // Before anything records: histograms recorded earlier would be lost.
        let _ = streamspace_core::telemetry::metrics_handle();
        let pool = db::connect(&config.database)
            .await
            .context("connecting to the database")?;
        db::ensure_schema(&pool, policy).await?;
        let queue = CommandQueue::new(pool, config.queue.clone())?;
        let tls = match config.tls.clone() {
            Some(t) => Some(Arc::new(
                tls::TlsState::load(t).context("loading the agent link's TLS files")?,
            )),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let http_listener = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("binding {}", config.metrics_listen))?;
        let http_addr = http_listener.local_addr()?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (db_ok_tx, db_ok) = watch::channel(true);
        let shared = Arc::new(Shared {
            config,
            queue,
            registry: Registry::default(),
            shutdown,
            db_ok,
            stats: ReplicaStats::default(),
            tls,
        });
        Ok(Self {
            shared,
            listener,
            addr,
            http_listener,
            http_addr,
            shutdown_tx,
            db_ok_tx,
        })
    }

    /// The bound gRPC address (useful when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of `/metrics` and `/healthz`.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Serves until `stop` resolves, then shuts down in order: report NOT_SERVING, stop
    /// claiming, release every lease, close the streams (agents reconnect elsewhere).
    pub async fn run_until_stopped(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            shared,
            listener,
            http_listener,
            shutdown_tx,
            db_ok_tx,
            ..
        } = self;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health::set_serving(&health_reporter, true).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(streamspace_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building gRPC reflection")?;

        let max = shared.config.max_message_bytes;
        let agents = AgentServiceServer::new(service::AgentServiceImpl::new(shared.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        let mut background = vec![
            tokio::spawn(wake_on_notify(shared.clone())),
            tokio::spawn(
                health::DbHealth::new(shared.clone(), db_ok_tx, health_reporter.clone()).run(),
            ),
            tokio::spawn(LeaseRescuer::new(shared.clone()).run()),
            tokio::spawn(CommandPruner::new(shared.clone()).run()),
            tokio::spawn({
                let app = http::router(shared.clone());
                async move {
                    if let Err(e) = axum::serve(http_listener, app).await {
                        tracing::error!(error = %e, "metrics server failed");
                    }
                }
            }),
        ];

        let mut shutdown_rx = shared.shutdown.clone();
        let stopping = async move {
            stop.await;
            tracing::info!("shutting down: no new claims, releasing leases, closing agent streams");
            health::set_serving(&health_reporter, false).await;
            let _ = shutdown_tx.send(true);
        };
        tokio::spawn(stopping);
        let server_done = async move {
            let _ = shutdown_rx.wait_for(|s| *s).await;
        };

        let router = tonic::transport::Server::builder()
            // Long-lived streams: detect dead peers at the HTTP/2 layer as well.
            .http2_keepalive_interval(Some(shared.config.heartbeat_interval()))
            .http2_keepalive_timeout(Some(shared.config.heartbeat_interval()))
            .tcp_keepalive(Some(std::time::Duration::from_secs(30)))
            .tcp_nodelay(true)
            // An agent holds one stream; a few more leave room for health checks. A
            // handshake (authentication, lease hand-over) is bounded in time.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .timeout(HANDSHAKE_LIMIT)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(agents);
        let result = match shared.tls.clone() {
            Some(tls) => {
                background.push(tokio::spawn(tls.clone().watch_files()));
                let (incoming, accepting) = tls::incoming(listener, shared.clone(), tls);
                background.push(accepting);
                router
                    .serve_with_incoming_shutdown(incoming, server_done)
                    .await
            }
            None => {
                // `serve_with_incoming` ignores the builder's `tcp_nodelay`: set it on the
                // incoming connections, or a command pushed right after a small frame waits
                // for the peer's delayed ACK (~40 ms).
                let incoming = tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(std::time::Duration::from_secs(30)));
                router
                    .serve_with_incoming_shutdown(incoming, server_done)
                    .await
            }
        };
        for task in background {
            task.abort();
        }
        result.context("gRPC server")?;
        tracing::info!("command-dispatcher stopped");
        Ok(())
    }
}

/// Routes queue notifications to the connections they concern; after the listener
/// (re)connects, wakes every connection, since notifications may have been missed.
async fn wake_on_notify(shared: Arc<Shared>) {
    let mut listener = CommandListener::new(shared.queue.pool().clone());
    loop {
        match listener.recv().await {
            Wakeup::Agent(agent_id) => shared.registry.wake(&agent_id),
            Wakeup::Resync => shared.registry.wake_all(),
        }
    }
}

pub use streamspace_core::telemetry::shutdown_signal;
