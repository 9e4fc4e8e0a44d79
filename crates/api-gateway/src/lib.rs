//! The StreamSpace API gateway: the public REST (axum) and gRPC (tonic) API for sessions,
//! their commands and agent administration, with authentication, ownership, idempotent
//! retries and rate limits.
//!
//! Both edges share one service layer ([`service::Api`]); every change is one
//! transaction that moves the session and enqueues its command, so a 202 means the
//! command is committed. The gateway never talks to agents: the command-dispatcher
//! delivers what it queues.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod error;
pub mod grpc;
pub mod grpc_metrics;
pub mod jwks;
pub mod ratelimit;
pub mod rest;
pub mod service;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use streamspace_core::api::idempotency;
use streamspace_core::db::{self, SchemaPolicy};
use streamspace_proto::api::v1::agent_admin_service_server::AgentAdminServiceServer;
use streamspace_proto::api::v1::session_service_server::SessionServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch as signal;

pub use config::GatewayConfig;

use auth::Verifier;
use rest::AppState;
use service::Api;
use watch::ChangeHub;

/// How often stored idempotent answers past retention are pruned.
const IDEMPOTENCY_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// A built gateway, bound to its addresses, not yet serving.
#[derive(Debug)]
pub struct App {
    state: AppState,
    hub: Arc<ChangeHub>,
    http: TcpListener,
    grpc: TcpListener,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    metrics: TcpListener,
    metrics_addr: SocketAddr,
    shutdown_tx: signal::Sender<bool>,
}

impl App {
    /// Validates the configuration, connects to the database, checks the schema (or
    /// migrates, per `policy`) and binds both listeners.
    pub async fn build(config: GatewayConfig, policy: SchemaPolicy) -> anyhow::Result<Self> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        // Before anything records: histograms recorded earlier would be lost.
        let _ = streamspace_core::telemetry::metrics_handle();
        let verifier = Arc::new(
            Verifier::new(&config.auth)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?,
        );
        if let Some(jwks) = verifier.jwks() {
            // Tokens are refused until the keys are in; an unreachable provider at
            // start-up is retried on the first token and by the periodic refresh.
            if !jwks.refresh().await {
                tracing::warn!(
                    "the JWKS could not be fetched at start-up; tokens are refused until it can"
                );
            }
        }
        if config.auth.dev_tokens {
            tracing::warn!(
                "auth.dev_tokens is on: development tokens can be minted; never use this configuration in production"
            );
        }
        let pool = db::connect(&config.database)
            .await
            .context("connecting to the database")?;
        db::ensure_schema(&pool, policy).await?;
        let http = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding {}", config.http.listen))?;
        let grpc = TcpListener::bind(config.grpc.listen)
            .await
            .with_context(|| format!("binding {}", config.grpc.listen))?;
        let metrics = TcpListener::bind(config.http.metrics_listen)
            .await
            .with_context(|| format!("binding {}", config.http.metrics_listen))?;
        let metrics_addr = metrics.local_addr()?;
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        let (shutdown_tx, shutdown) = signal::channel(false);
        let hub = Arc::new(ChangeHub::default());
        let api = Api::new(pool, config, hub.clone(), shutdown);
        let state = AppState {
            api,
            verifier,
            metrics: Arc::default(),
        };
        Ok(Self {
            state,
            hub,
            http,
            grpc,
            http_addr,
            grpc_addr,
            metrics,
            metrics_addr,
            shutdown_tx,
        })
    }

    /// The bound REST address (useful when configured with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound address of the internal `/metrics` listener.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The REST router of this app, for calling it without a socket.
    pub fn router(&self) -> axum::Router {
        rest::router(self.state.clone())
    }

    /// The internal listener's router (`/metrics`), for calling it without a socket.
    pub fn metrics_router(&self) -> axum::Router {
        rest::metrics_router(self.state.clone())
    }

    /// Serves REST and gRPC until `stop` resolves, then stops in order: report
    /// NOT_SERVING, end watches, finish in-flight requests, stop background tasks.
    pub async fn run_until_stopped(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            state,
            hub,
            http,
            grpc,
            metrics,
            shutdown_tx,
            ..
        } = self;
        let api = state.api.clone();
        let config = api.config().clone();

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<SessionServiceServer<grpc::SessionServiceImpl>>()
            .await;
        health_reporter
            .set_serving::<AgentAdminServiceServer<grpc::AgentAdminServiceImpl>>()
            .await;
        // The server as a whole (the empty name load balancers ask by default).
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        // Reflection describes what this server serves: the public API, not the agent
        // protocol that shares the generated-code crate.
        let descriptors = api_descriptors()?;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(descriptors.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building gRPC reflection")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building gRPC reflection")?;
        let interceptor = grpc::AuthInterceptor::new(state.verifier.clone());
        let max = config.grpc.max_message_bytes;
        let sessions = tonic::service::interceptor::InterceptedService::new(
            SessionServiceServer::new(grpc::SessionServiceImpl::new(api.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            interceptor.clone(),
        );
        let admin = tonic::service::interceptor::InterceptedService::new(
            AgentAdminServiceServer::new(grpc::AgentAdminServiceImpl::new(api.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            interceptor,
        );

        let shutdown = shutdown_tx.subscribe();
        let jwks_refresh = state.verifier.jwks().map(|jwks| {
            let every = Duration::from_secs(config.auth.jwks_refresh_secs.max(1));
            tokio::spawn(jwks.refresh_every(every))
        });
        let background = [
            tokio::spawn(hub.run(api.pool().clone(), shutdown.clone())),
            tokio::spawn(prune_idempotency(
                api.pool().clone(),
                Duration::from_secs(config.idempotency.retention_hours * 3600),
                shutdown.clone(),
            )),
        ];

        tokio::spawn(async move {
            stop.await;
            tracing::info!("shutting down: NOT_SERVING, ending watches, draining requests");
            health_reporter
                .set_not_serving::<SessionServiceServer<grpc::SessionServiceImpl>>()
                .await;
            health_reporter
                .set_not_serving::<AgentAdminServiceServer<grpc::AgentAdminServiceImpl>>()
                .await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let _ = shutdown_tx.send(true);
        });

        let stopped = |mut rx: signal::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let metrics_server = tokio::spawn(
            axum::serve(metrics, rest::metrics_router(state.clone()))
                .with_graceful_shutdown(stopped(shutdown.clone()))
                .into_future(),
        );
        // Answers go out at once, not after the client's delayed ACK of an earlier write.
        let http = http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let rest = axum::serve(http, rest::router(state))
            .with_graceful_shutdown(stopped(shutdown.clone()));
        let grpc_server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // One client cannot take the whole server: streams and in-flight calls per
            // connection are bounded, and so is each call's time.
            .max_concurrent_streams(Some(config.grpc.max_concurrent_streams))
            .concurrency_limit_per_connection(config.grpc.max_concurrent_requests_per_connection)
            .timeout(Duration::from_millis(config.grpc.request_timeout_ms))
            // Watches are long-lived streams: find dead clients at the HTTP/2 layer too.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(grpc_metrics::GrpcMetricsLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(sessions)
            .add_service(admin)
            // `serve_with_incoming` ignores the builder's `tcp_nodelay`: set it here.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                stopped(shutdown.clone()),
            );
        let (rest_result, grpc_result) = tokio::join!(rest.into_future(), grpc_server);
        for task in background {
            let _ = task.await;
        }
        if let Some(task) = jwks_refresh {
            task.abort();
        }
        if let Ok(Err(e)) = metrics_server.await {
            tracing::warn!(error = %e, "metrics listener failed");
        }
        rest_result.context("REST server")?;
        grpc_result.context("gRPC server")?;
        tracing::info!("api-gateway stopped");
        Ok(())
    }
}

/// The descriptors of the public API only (the shared set also holds the agent protocol).
fn api_descriptors() -> anyhow::Result<prost_types::FileDescriptorSet> {
    let mut set: prost_types::FileDescriptorSet =
        prost::Message::decode(streamspace_proto::FILE_DESCRIPTOR_SET)
            .context("decoding the API descriptors")?;
    set.file.retain(|f| f.package() != "streamspace.agent.v1");
    Ok(set)
}

/// Forgets stored idempotent answers past retention, until shutdown.
async fn prune_idempotency(
    pool: sqlx::PgPool,
    retention: Duration,
    mut shutdown: signal::Receiver<bool>,
) {
    loop {
        match idempotency::idempotency_prune(&pool, retention, 10_000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "stored idempotent answers pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning idempotent answers failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(IDEMPOTENCY_PRUNE_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

pub use streamspace_core::telemetry::shutdown_signal;
