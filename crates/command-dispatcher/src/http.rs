//! The dispatcher's small HTTP side: `/metrics` (Prometheus text: the queue counters of
//! this process plus this replica's connections and fault counters), `/healthz` (alive)
//! and `/readyz` (can reach its database; 503 otherwise). Agents never use it; probes and
//! scrapers do.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn ready(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if *shared.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if *shared.db_ok.borrow() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
    }
}

/// Bounds the queue read a scrape makes: a slow database must not hold scrapes open.
const QUEUE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The (agent, status) pairs reported before, so one that emptied reads 0 rather than
/// keeping its last value.
static QUEUE_SERIES: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Sets the queue gauges from the database: open commands by agent and status, and the
/// age of each agent's oldest pending command. The same numbers on every replica (they
/// are the database's): aggregate them with `max`, not `sum`.
async fn update_queue_gauges(shared: &Shared) {
    let read = tokio::time::timeout(
        QUEUE_READ_TIMEOUT,
        streamspace_core::queue::queue_depth(shared.queue.pool()),
    )
    .await;
    let depth = match read {
        Ok(Ok(depth)) => depth,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "reading the queue depth for /metrics failed");
            metrics::counter!("streamspace_queue_depth_read_errors_total").increment(1);
            return;
        }
        Err(_) => {
            metrics::counter!("streamspace_queue_depth_read_errors_total").increment(1);
            return;
        }
    };
    let mut series = QUEUE_SERIES.lock().unwrap_or_else(|p| p.into_inner());
    let mut now = std::collections::BTreeSet::new();
    let mut ages: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for d in &depth {
        metrics::gauge!("streamspace_queue_commands", "agent_id" => d.agent_id.clone(), "status" => d.status.clone())
            .set(d.commands as f64);
        now.insert((d.agent_id.clone(), d.status.clone()));
        if d.status == "pending" {
            ages.insert(d.agent_id.clone(), d.oldest_pending_age_seconds);
        }
    }
    for (agent, status) in series.difference(&now) {
        metrics::gauge!("streamspace_queue_commands", "agent_id" => agent.clone(), "status" => status.clone())
            .set(0.0);
    }
    let agents: std::collections::BTreeSet<&String> =
        series.iter().chain(now.iter()).map(|(a, _)| a).collect();
    for agent in agents {
        let age = ages.get(agent).copied().unwrap_or(0.0);
        metrics::gauge!("streamspace_queue_oldest_pending_age_seconds", "agent_id" => agent.clone())
            .set(age);
    }
    series.extend(now);
}

/// Sets `streamspace_agent_online{agent_id}` (1 online, 0 offline) for every registered
/// agent, by the database's view (a heartbeat within `offline_after_ms`), and
/// `streamspace_agent_active_sessions{agent_id}`. Agents are few (one per cluster), so
/// the label set stays bounded.
async fn update_agent_gauges(shared: &Shared) {
    let read = tokio::time::timeout(
        QUEUE_READ_TIMEOUT,
        streamspace_core::agents::agent_list(shared.queue.pool(), shared.config.offline_after()),
    )
    .await;
    match read {
        Ok(Ok(agents)) => {
            for a in agents {
                metrics::gauge!("streamspace_agent_online", "agent_id" => a.agent_id.clone())
                    .set(if a.online { 1.0 } else { 0.0 });
                metrics::gauge!("streamspace_agent_active_sessions", "agent_id" => a.agent_id)
                    .set(a.active_sessions as f64);
            }
        }
        _ => metrics::counter!("streamspace_queue_depth_read_errors_total").increment(1),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let _scrape = streamspace_core::telemetry::scrape_lock().await;
    update_queue_gauges(&shared).await;
    update_agent_gauges(&shared).await;
    let pool = shared.queue.pool();
    let idle = pool.num_idle() as f64;
    metrics::gauge!("streamspace_db_pool_connections", "state" => "idle").set(idle);
    metrics::gauge!("streamspace_db_pool_connections", "state" => "in_use")
        .set((f64::from(pool.size()) - idle).max(0.0));
    use streamspace_core::telemetry::{publish_counter, publish_gauge};
    publish_gauge(
        "streamspace_dispatcher_agent_connections",
        "agent streams held by this replica",
        shared.registry.len() as f64,
    );
    let stats = &shared.stats;
    publish_gauge(
        "streamspace_dispatcher_handshakes_in_progress",
        "agent connections authenticated and not yet welcomed",
        stats.handshakes_in_progress.load(Ordering::Relaxed).max(0) as f64,
    );
    publish_gauge(
        "streamspace_dispatcher_database_ready",
        "1 while this replica can reach its database",
        f64::from(u8::from(*shared.db_ok.borrow())),
    );
    let counters = [
        (
            "streamspace_dispatcher_report_write_errors_total",
            "agent report writes that failed and are retried",
            &stats.report_write_errors,
        ),
        (
            "streamspace_dispatcher_reports_for_unheld_leases_total",
            "acks and results for a lease the connection does not hold, ignored",
            &stats.reports_for_unheld_leases,
        ),
        (
            "streamspace_dispatcher_heartbeat_write_errors_total",
            "agent heartbeat writes (liveness, lease renewal) that failed",
            &stats.heartbeat_write_errors,
        ),
        (
            "streamspace_dispatcher_db_probe_failures_total",
            "database readiness probes that failed or timed out",
            &stats.db_probe_failures,
        ),
        (
            "streamspace_dispatcher_tls_handshake_failures_total",
            "agent TLS handshakes that failed or timed out",
            &stats.tls_handshake_failures,
        ),
        (
            "streamspace_dispatcher_handshakes_abandoned_total",
            "Connect calls the agent left before the handshake finished",
            &stats.handshakes_abandoned,
        ),
    ];
    let tls_counters = shared.tls.as_ref().map(|tls| {
        [
            (
                "streamspace_dispatcher_tls_reloads_total",
                "changes of the TLS files that took effect",
                &tls.reloads,
            ),
            (
                "streamspace_dispatcher_tls_reload_failures_total",
                "changes of the TLS files that could not be used (the previous ones stay)",
                &tls.reload_failures,
            ),
        ]
    });
    for (name, help, value) in counters
        .into_iter()
        .chain(tls_counters.into_iter().flatten())
    {
        publish_counter(name, help, value.load(Ordering::Relaxed));
    }
    let text = streamspace_core::telemetry::render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
