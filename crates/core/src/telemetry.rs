//! Logging set-up, the process-wide counters every service exports, and the one
//! shutdown signal every service waits on.
//!
//! The pipeline counters are plain atomics (tests read them directly); at scrape time they
//! are handed to the `metrics` recorder, and `metrics-exporter-prometheus` renders them
//! with every histogram and gauge ([`render_metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Whether spans are exported (set once by [`init_tracing`]); while false, the trace
/// helpers return at once, so tracing that is off costs a load of this flag.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps the trace exporter alive; dropping it flushes the spans not yet exported.
/// Hold it in `main` until the service has shut down.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn tracing_exported(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces at shutdown failed: {e}");
        }
    }
}

/// Whether the standard `OTEL_*` variables ask for traces over OTLP: an endpoint is set,
/// and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The OTLP (gRPC) trace pipeline: batch export to the configured endpoint, the
/// `service` name unless `OTEL_SERVICE_NAME` says otherwise, resource attributes from
/// `OTEL_RESOURCE_ATTRIBUTES`, the sampler from `OTEL_TRACES_SAMPLER`. Must run inside
/// a tokio runtime (the exporter's channel lives on it).
fn otlp_provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global `tracing` subscriber: human-readable by default, JSON lines when
/// `json` is set; the filter comes from `RUST_LOG`, else `default_filter`. When the
/// standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported over OTLP/gRPC
/// as `service` (W3C trace context); otherwise no exporter exists and spans cost what
/// `tracing` spans cost. Call it inside a tokio runtime. Calling it twice is harmless
/// (the second call keeps the first subscriber).
pub fn init_tracing(service: &str, default_filter: &str, json: bool) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let _ = metrics_handle();
    let mut guard = TelemetryGuard::default();
    let otel = if otlp_requested() {
        match otlp_provider(service) {
            Ok(provider) => {
                let tracer = provider.tracer(service.to_owned());
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                guard.provider = Some(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("OTLP trace export not started ({e}); continuing without it");
                None
            }
        }
    } else {
        None
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if installed.is_err() {
        // Another subscriber was first (tests): this one's exporter would see nothing.
        guard.provider = None;
    }
    EXPORTING.store(guard.provider.is_some(), Ordering::Relaxed);
    guard
}

/// Makes `span` a child of the W3C `traceparent` (`00-<trace>-<span>-<flags>`) when it
/// is one, so the span joins the trace of whoever sent it — the request that created a
/// command, hours ago if the agent was down. Also records the span's trace id in its
/// `trace_id` field (when the span declares one), so log lines in the span carry it.
/// Without an exporter it does nothing.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(traceparent) = traceparent {
        let carrier =
            std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// The W3C `traceparent` naming `span`, when spans are exported (and `span` is
/// sampled-in or not); `None` without an exporter, so callers pass on what they got.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Upper bounds (seconds) of every latency histogram: from a millisecond (a command
/// delivered to a connected agent) to an hour (one queued while its agent was down).
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0, 3600.0,
];

static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// The process's metrics recorder (the `metrics` facade, rendered by
/// `metrics-exporter-prometheus`), installed on first use; call it at start-up, before
/// anything records. Histograms get [`LATENCY_BUCKETS`].
pub fn metrics_handle() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
        let builder = match builder.set_buckets(&LATENCY_BUCKETS) {
            Ok(b) => b,
            Err(_) => metrics_exporter_prometheus::PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was installed before; /metrics shows only the counters"
            );
        }
        describe_metrics();
        handle
    })
}

/// Help texts and units of the facade's metrics, and their first (zero) samples, so a
/// scrape shows every series from the start — an alert on a counter that has never
/// moved still finds it.
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_histogram!(
        "streamspace_command_accept_to_delivered_seconds",
        Unit::Seconds,
        "time from a command's acceptance to its first delivery to an agent"
    );
    describe_histogram!(
        "streamspace_command_accept_to_completed_seconds",
        Unit::Seconds,
        "time from a command's acceptance to its completion"
    );
    describe_counter!(
        "streamspace_command_redeliveries_total",
        "deliveries of a command after its first (retries, lapsed leases)"
    );
    metrics::counter!("streamspace_command_redeliveries_total").increment(0);
}

/// The standard process metrics (`process_*`, as Prometheus client libraries name
/// them), read from `/proc/self` at scrape time; nothing where there is no `/proc`.
fn record_process_metrics() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        metrics::gauge!("process_resident_memory_bytes").set(rss * 1024.0);
    }
    if let Some(virt) = kib("VmSize:") {
        metrics::gauge!("process_virtual_memory_bytes").set(virt * 1024.0);
    }
    if let Some(threads) = kib("Threads:") {
        metrics::gauge!("process_threads").set(threads);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
    // utime and stime (fields 14 and 15) in clock ticks of 1/100 s (USER_HZ on Linux);
    // the fields after the command name, which may hold spaces, in parentheses.
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, after)) = stat.rsplit_once(')')
    {
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
            metrics::gauge!("process_cpu_seconds_total").set((user + system) as f64 / 100.0);
        }
    }
}

/// Everything this process measures, in Prometheus text format: the pipeline counters
/// and whatever was recorded through the `metrics` facade (histograms, gauges), and the
/// process's own resource use.
pub fn render_metrics() -> String {
    record_process_metrics();
    METRICS.publish();
    metrics_handle().render()
}

/// Records how long a command waited from acceptance to its first delivery, or counts
/// a redelivery (a later attempt, or a lease that lapsed).
pub(crate) fn record_delivery(attempt: i32, accepted: chrono::DateTime<chrono::Utc>) {
    if attempt <= 1 {
        let waited = (chrono::Utc::now() - accepted).to_std().unwrap_or_default();
        metrics::histogram!("streamspace_command_accept_to_delivered_seconds")
            .record(waited.as_secs_f64());
    } else {
        metrics::counter!("streamspace_command_redeliveries_total").increment(1);
    }
}

/// Marks, in the command's trace, that its result was written (a span of the writing
/// service, a child of the span the command was accepted in). Nothing while no traces
/// are exported.
pub(crate) fn result_applied(command_id: &str, trace_context: Option<&str>) {
    if !EXPORTING.load(Ordering::Relaxed) || trace_context.is_none() {
        return;
    }
    let span = tracing::info_span!("apply result", command_id, trace_id = tracing::field::Empty);
    continue_trace(&span, trace_context);
}

/// Records how long a command took from acceptance to its completion.
pub(crate) fn record_completion(seconds: f64) {
    metrics::histogram!("streamspace_command_accept_to_completed_seconds").record(seconds.max(0.0));
}

/// Process-wide counters of the command pipeline.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Rows that could not be decoded and were moved to `failed`.
    pub commands_quarantined: AtomicU64,
    pub commands_enqueued: AtomicU64,
    pub commands_claimed: AtomicU64,
    pub commands_completed: AtomicU64,
    pub commands_failed: AtomicU64,
    pub commands_retried: AtomicU64,
    /// Pipelined commands the agent did not run (their predecessor did not complete),
    /// returned to the queue without an attempt.
    pub commands_not_run: AtomicU64,
    /// Transitions refused because the presented lease was stale.
    pub stale_lease_rejections: AtomicU64,
    pub leases_released: AtomicU64,
    pub leases_rescued: AtomicU64,
    pub commands_expired: AtomicU64,
    pub commands_pruned: AtomicU64,
    pub sessions_pruned: AtomicU64,
}

/// The counters of this process.
pub static METRICS: Metrics = Metrics {
    commands_quarantined: AtomicU64::new(0),
    commands_enqueued: AtomicU64::new(0),
    commands_claimed: AtomicU64::new(0),
    commands_completed: AtomicU64::new(0),
    commands_failed: AtomicU64::new(0),
    commands_retried: AtomicU64::new(0),
    commands_not_run: AtomicU64::new(0),
    stale_lease_rejections: AtomicU64::new(0),
    leases_released: AtomicU64::new(0),
    leases_rescued: AtomicU64::new(0),
    commands_expired: AtomicU64::new(0),
    commands_pruned: AtomicU64::new(0),
    sessions_pruned: AtomicU64::new(0),
};

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    fn rows(&self) -> [(&'static str, &'static str, &AtomicU64); 13] {
        [
            (
                "streamspace_commands_quarantined_total",
                "rows moved to failed because they could not be decoded",
                &self.commands_quarantined,
            ),
            (
                "streamspace_commands_enqueued_total",
                "commands accepted into the queue",
                &self.commands_enqueued,
            ),
            (
                "streamspace_commands_claimed_total",
                "command deliveries leased to a connection",
                &self.commands_claimed,
            ),
            (
                "streamspace_commands_completed_total",
                "commands completed",
                &self.commands_completed,
            ),
            (
                "streamspace_commands_failed_total",
                "commands that ended failed",
                &self.commands_failed,
            ),
            (
                "streamspace_commands_retried_total",
                "failed attempts scheduled for retry",
                &self.commands_retried,
            ),
            (
                "streamspace_commands_not_run_total",
                "pipelined commands returned unrun because their predecessor did not complete",
                &self.commands_not_run,
            ),
            (
                "streamspace_stale_lease_rejections_total",
                "transitions refused for a stale lease",
                &self.stale_lease_rejections,
            ),
            (
                "streamspace_leases_released_total",
                "leases released by a closing connection",
                &self.leases_released,
            ),
            (
                "streamspace_leases_rescued_total",
                "expired leases rescued",
                &self.leases_rescued,
            ),
            (
                "streamspace_commands_expired_total",
                "commands that expired before delivery",
                &self.commands_expired,
            ),
            (
                "streamspace_commands_pruned_total",
                "terminal commands pruned",
                &self.commands_pruned,
            ),
            (
                "streamspace_sessions_pruned_total",
                "ended sessions pruned after the retention",
                &self.sessions_pruned,
            ),
        ]
    }

    /// Hands the counters to the `metrics` recorder (as absolute values), which renders
    /// them with everything else.
    pub fn publish(&self) {
        for (name, help, value) in self.rows() {
            publish_counter(name, help, value.load(Ordering::Relaxed));
        }
    }
}

/// Held by a `/metrics` handler from publishing its values to rendering them. The
/// recorder is one per process; a process holding several services (tests) must not let
/// one's scrape render values another has just published.
static SCRAPE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Serializes this process's scrapes; hold the guard until [`render_metrics`] returned.
pub async fn scrape_lock() -> tokio::sync::MutexGuard<'static, ()> {
    SCRAPE.lock().await
}

/// Publishes a counter kept elsewhere (an atomic) through the `metrics` recorder.
pub fn publish_counter(name: &'static str, help: &'static str, value: u64) {
    metrics::describe_counter!(name, help);
    metrics::counter!(name).absolute(value);
}

/// Publishes a gauge read at scrape time through the `metrics` recorder.
pub fn publish_gauge(name: &'static str, help: &'static str, value: f64) {
    metrics::describe_gauge!(name, help);
    metrics::gauge!(name).set(value);
}

/// Resolves on SIGINT or SIGTERM: the one shutdown trigger of every service binary.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
