//! gRPC requests as a tower layer on the gateway's tonic server: each call runs in its
//! request span (continuing the caller's `traceparent` metadata, and answering with the
//! span's own), and is counted and timed by method and status code (the REST side has
//! its own middleware, `rest::metrics` and `rest::extract::trace_request`).
//!
//! The code is the `grpc-status` the response starts with: a call that fails before its
//! first message answers with it at once (trailers-only); one that starts normally is
//! counted `0` (OK) — a server stream that fails later does not change that. Methods are
//! labelled by path, except calls the server does not implement (`12`), which are
//! labelled `unknown` so made-up paths cannot grow the label set.

use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

/// Wraps the gRPC server's services; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let started = Instant::now();
        let client = req
            .headers()
            .get("traceparent")
            .and_then(|v| crate::service::parse_traceparent(v.as_bytes()));
        let span = crate::service::request_span(path.trim_start_matches('/'));
        streamspace_core::telemetry::continue_trace(&span, client.as_deref());
        req.extensions_mut()
            .insert(crate::service::RequestSpan(span.clone()));
        let call = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(async move {
            let mut response = tracing::Instrument::instrument(call, span.clone()).await;
            if let Ok(r) = &mut response
                && let Some(value) = streamspace_core::telemetry::traceparent_of(&span)
                    .and_then(|t| http::HeaderValue::from_str(&t).ok())
            {
                r.headers_mut().insert("traceparent", value);
            }
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u8>().ok())
                    .unwrap_or(0)
                    .to_string(),
                Err(_) => "transport".to_owned(),
            };
            let method = if code == "12" {
                "unknown".to_owned()
            } else {
                path
            };
            let labels = [("method", method), ("code", code)];
            metrics::counter!("streamspace_grpc_requests_total", &labels).increment(1);
            metrics::histogram!("streamspace_grpc_request_duration_seconds", &labels)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}
