//! Logging set-up, the process-wide counters every service exports, and the one
//! shutdown signal every service waits on.
//!
//! Counters are plain atomics so that `core` stays free of any exporter; services render
//! them on `/metrics` in Prometheus text format via [`Metrics::render_prometheus`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber: human-readable by default, JSON lines when
/// `json` is set; the filter comes from `RUST_LOG`, else `default_filter`.
/// Calling it twice is harmless (the second call keeps the first subscriber).
pub fn init_tracing(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
    fn rows(&self) -> [(&'static str, &'static str, &AtomicU64); 12] {
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

    /// The counters in Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in self.rows() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
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
