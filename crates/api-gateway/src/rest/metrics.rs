//! Request counters and latency per route and status, rendered in Prometheus text format
//! next to the pipeline counters of `streamspace_core::telemetry`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

#[derive(Debug, Default)]
struct Stat {
    count: u64,
    seconds: f64,
}

/// Per (method, route, status) counts and total latency.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    stats: Mutex<BTreeMap<(String, String, u16), Stat>>,
}

impl HttpMetrics {
    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        // A poisoned map is still a map of plain numbers.
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let stat = stats
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default();
        stat.count += 1;
        stat.seconds += seconds;
    }

    pub fn render(&self) -> String {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP streamspace_api_requests_total REST requests by method, route and status\n# TYPE streamspace_api_requests_total counter"
        );
        for ((method, route, status), stat) in stats.iter() {
            let _ = writeln!(
                out,
                "streamspace_api_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                stat.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP streamspace_api_request_duration_seconds_sum total REST request time by method, route and status\n# TYPE streamspace_api_request_duration_seconds_sum counter"
        );
        for ((method, route, status), stat) in stats.iter() {
            let _ = writeln!(
                out,
                "streamspace_api_request_duration_seconds_sum{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {:.6}",
                stat.seconds
            );
        }
        out
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
    let method = method_label(req.method()).to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    metrics.record(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
