//! The dispatcher's small HTTP side: `/metrics` (Prometheus text: the queue counters of
//! this process plus its live agent connections) and `/healthz` (alive). Agents never use
//! it; probes and scrapers do.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut text = streamspace_core::telemetry::METRICS.render_prometheus();
    text.push_str(
        "# HELP streamspace_dispatcher_agent_connections agent streams held by this replica\n\
         # TYPE streamspace_dispatcher_agent_connections gauge\n",
    );
    text.push_str(&format!(
        "streamspace_dispatcher_agent_connections {}\n",
        shared.registry.len()
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
