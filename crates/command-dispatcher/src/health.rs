//! Whether this replica can reach its database, and what follows when it cannot.
//!
//! A replica that lost PostgreSQL must not keep its agents: the database soon shows them
//! offline and rescues their leases, yet no other replica can take over while the streams
//! stay open here. So one probe per heartbeat interval (bounded by that interval, so a
//! black-holed connection counts as a failure instead of hanging) decides: after
//! `db_failures_before_unready` failures in a row the replica reports `NOT_SERVING` (gRPC
//! health and `/readyz`), ends every agent stream with `UNAVAILABLE`, and refuses new ones;
//! the first successful probe makes it ready again.
//!
//! The probe has a connection of its own, outside the pool: during an outage it must not
//! take pool capacity from real work, and a probe that timed out closes its connection
//! instead of handing a half-answered one back to the pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::{Connection, PgConnection};
use streamspace_core::db;
use streamspace_proto::agent::v1::agent_service_server::AgentServiceServer;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;

use crate::Shared;
use crate::service::AgentServiceImpl;

#[derive(Debug)]
pub(crate) struct DbHealth {
    shared: Arc<Shared>,
    db_ok: watch::Sender<bool>,
    health: HealthReporter,
}

impl DbHealth {
    pub fn new(shared: Arc<Shared>, db_ok: watch::Sender<bool>, health: HealthReporter) -> Self {
        Self {
            shared,
            db_ok,
            health,
        }
    }

    pub async fn run(self) {
        let interval = self.shared.config.heartbeat_interval();
        let threshold = self.shared.config.db_failures_before_unready;
        let mut failures = 0u32;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let options = self.shared.queue.pool().connect_options();
        let mut conn: Option<PgConnection> = None;
        loop {
            ticker.tick().await;
            // The connection is taken for the probe and given back only when it answered;
            // one that failed or timed out is dropped (closed), not reused.
            let probe = async {
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => PgConnection::connect_with(&options).await?,
                };
                let writable = db::probe_writable(&mut c).await.map_err(|e| match e {
                    streamspace_core::Error::Database(e) => e,
                    other => sqlx::Error::Protocol(other.to_string()),
                })?;
                Ok::<_, sqlx::Error>((writable, c))
            };
            let error = match tokio::time::timeout(interval, probe).await {
                Ok(Ok((writable, c))) => {
                    conn = Some(c);
                    (!writable).then(|| "the database is in recovery (read-only)".to_owned())
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {interval:?}")),
            };
            match error {
                None => {
                    failures = 0;
                    if !*self.db_ok.borrow() {
                        tracing::info!("database reachable again; ready for agents");
                        self.db_ok.send_replace(true);
                        if !*self.shared.shutdown.borrow() {
                            set_serving(&self.health, true).await;
                        }
                    }
                }
                Some(error) => {
                    failures += 1;
                    self.shared
                        .stats
                        .db_probe_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(failures, threshold, %error, "database probe failed");
                    if failures >= threshold && *self.db_ok.borrow() {
                        tracing::error!(
                            failures,
                            "database unreachable; not ready: ending agent streams so agents fail over"
                        );
                        set_serving(&self.health, false).await;
                        self.db_ok.send_replace(false);
                    }
                }
            }
        }
    }
}

/// Reports the agent service and the server as a whole (the empty service name, which
/// load balancers and `grpc_health_probe` ask by default) serving or not.
pub(crate) async fn set_serving(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    if serving {
        health
            .set_serving::<AgentServiceServer<AgentServiceImpl>>()
            .await;
    } else {
        health
            .set_not_serving::<AgentServiceServer<AgentServiceImpl>>()
            .await;
    }
    health.set_service_status("", status).await;
}
