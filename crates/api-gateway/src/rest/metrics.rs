//! Request counters and latency histograms per route and status, rendered in Prometheus
//! text format next to the pipeline counters of `streamspace_core::telemetry`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Per (method, route, status) request counts and a latency histogram, through the
/// process's `metrics` recorder (rendered with everything else on `/metrics`).
#[derive(Debug, Default)]
pub struct HttpMetrics;

impl HttpMetrics {
    fn record(&self, method: &'static str, route: String, status: u16, seconds: f64) {
        let labels = [
            ("method", method.to_owned()),
            ("route", route),
            ("status", status.to_string()),
        ];
        ::metrics::counter!("streamspace_api_requests_total", &labels).increment(1);
        ::metrics::histogram!("streamspace_api_request_duration_seconds", &labels).record(seconds);
    }
}

/// The method as a label: the standard ones by name, anything else `OTHER` — a method is
/// any token a client sends, and each new one would otherwise add series (memory) for
/// unauthenticated callers.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *method {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Middleware: times the request and records it under its route template (never the raw
/// path, so ids do not explode the label set).
pub async fn track(State(metrics): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    metrics.record(
        method,
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
