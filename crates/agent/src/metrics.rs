//! The agent's `/metrics` (Prometheus text) on `metrics_listen`, when set: the runtime's
//! operation latency and outcomes, the commands it executed, its link to the dispatcher —
//! next to the shared process counters.

use std::net::SocketAddr;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

/// Records one runtime call: `operation` (`start`, `stop`, `hibernate`, `wake`, `list`)
/// and how it ended (`ok`, `retryable`, `permanent`), with its latency.
pub fn record_operation(operation: &'static str, outcome: &'static str, seconds: f64) {
    let labels = [("operation", operation), ("outcome", outcome)];
    metrics::histogram!("streamspace_agent_runtime_operation_seconds", &labels).record(seconds);
}

/// Sets whether the agent holds a stream to a dispatcher, and counts the ones it opened.
pub fn set_connected(connected: bool) {
    metrics::gauge!("streamspace_agent_connected").set(if connected { 1.0 } else { 0.0 });
    if connected {
        metrics::counter!("streamspace_agent_connects_total").increment(1);
    }
}

async fn render() -> impl IntoResponse {
    let _scrape = streamspace_core::telemetry::scrape_lock().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        streamspace_core::telemetry::render_metrics(),
    )
}

/// Serves `/metrics` on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(render));
    tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    Ok(bound)
}
