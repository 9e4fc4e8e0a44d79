//! The dispatcher's configuration, with documented defaults.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use streamspace_core::config::DatabaseConfig;
use streamspace_core::queue::QueueConfig;

use crate::tls::TlsConfig;

/// Default agent heartbeat interval, told to each agent in `Welcome`.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// Default silence after which an agent counts as offline: three heartbeats.
pub const DEFAULT_OFFLINE_AFTER_MS: u64 = 15_000;
/// Default number of commands outstanding per agent connection. It bounds what one
/// agent runs at once (across sessions) and what one round trip can carry: a backlog of
/// 10,000 drains in 1.3 s at 256 against 1.7 s at 64 (docs/performance.md).
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;
/// Default per-session pipeline depth: a session's oldest unfinished command and up to 15
/// queued behind it travel together to agents that can run them in order.
pub const DEFAULT_PIPELINE_DEPTH: u32 = 16;
/// Default interval of the polling safety net behind LISTEN/NOTIFY. Only a lost
/// notification waits for it: retries wake their connection when their backoff ends, and
/// a reconnected listener sweeps every connection.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 10_000;
/// Default number of failed database probes in a row before the replica gives up its
/// agents: three heartbeat intervals, the same bound that makes an agent offline.
pub const DEFAULT_DB_FAILURES_BEFORE_UNREADY: u32 = 3;
/// Largest gRPC message either side may send.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherConfig {
    pub database: DatabaseConfig,
    pub queue: QueueConfig,
    /// Address of the agent-facing gRPC server. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address of the HTTP side (`/metrics`, `/healthz`). Port 0 picks a free port.
    pub metrics_listen: SocketAddr,
    /// Name of this replica; lease owners and logs carry it. Defaults to host-pid.
    pub dispatcher_id: String,
    pub heartbeat_interval_ms: u64,
    pub offline_after_ms: u64,
    pub max_in_flight: u32,
    /// Commands of one session delivered together (the oldest unfinished one and those
    /// queued right behind it), to agents whose `Hello` lists the `pipeline` capability;
    /// 1 turns pipelining off. See docs/protocol.md, "Pipelining".
    pub pipeline_depth: u32,
    pub poll_interval_ms: u64,
    pub max_message_bytes: usize,
    /// Consecutive failed database probes (one per heartbeat interval, each bounded by it)
    /// after which this replica reports not-ready and ends its agent streams, so agents
    /// fail over to a replica that can reach the database.
    pub db_failures_before_unready: u32,
    pub maintenance: MaintenanceConfig,
    /// `[tls]`: the agent link over TLS (mutual with `client_ca_file`). Unset: plaintext,
    /// for loopback and trusted networks only.
    pub tls: Option<TlsConfig>,
    /// JSON log lines instead of human-readable ones.
    pub log_json: bool,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            database: DatabaseConfig {
                application_name: "streamspace-command-dispatcher".into(),
                ..DatabaseConfig::default()
            },
            queue: QueueConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 7002)),
            dispatcher_id: default_dispatcher_id(),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            offline_after_ms: DEFAULT_OFFLINE_AFTER_MS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            pipeline_depth: DEFAULT_PIPELINE_DEPTH,
            poll_interval_ms: DEFAULT_POLL_INTERVAL_MS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            db_failures_before_unready: DEFAULT_DB_FAILURES_BEFORE_UNREADY,
            maintenance: MaintenanceConfig::default(),
            tls: None,
            log_json: false,
        }
    }
}

fn default_dispatcher_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "dispatcher".into());
    format!("{host}-{}", std::process::id())
}

impl DispatcherConfig {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn offline_after(&self) -> Duration {
        Duration::from_millis(self.offline_after_ms)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms < 50 {
            return Err("heartbeat_interval_ms must be at least 50".into());
        }
        if self.offline_after_ms < 2 * self.heartbeat_interval_ms {
            return Err(format!(
                "offline_after_ms ({}) must be at least twice heartbeat_interval_ms ({}) or healthy agents would flap",
                self.offline_after_ms, self.heartbeat_interval_ms
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 10_000 {
            return Err("max_in_flight must be 1..=10000".into());
        }
        if self.pipeline_depth == 0 || self.pipeline_depth > 1_000 {
            return Err("pipeline_depth must be 1..=1000 (1: no pipelining)".into());
        }
        if self.db_failures_before_unready == 0 {
            return Err("db_failures_before_unready must be at least 1".into());
        }
        if self.poll_interval_ms == 0 {
            return Err("poll_interval_ms must be positive".into());
        }
        if self.queue.lease < self.offline_after() {
            return Err(format!(
                "queue.lease ({:?}) must be at least offline_after_ms, or live leases would be rescued between heartbeats",
                self.queue.lease
            ));
        }
        Ok(())
    }
}

/// Background upkeep of the queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// How often expired leases are rescued and expired commands failed. 5 s against the
    /// default 30 s lease: a dead connection's work returns at most 5 s after its lease
    /// ran out, and an idle replica spends two statements per interval on it.
    pub rescue_interval_ms: u64,
    /// How often terminal commands past retention are pruned.
    pub prune_interval_ms: u64,
    /// How long terminal commands, and ended sessions without open commands, are kept.
    pub retention_hours: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            rescue_interval_ms: 5_000,
            prune_interval_ms: 60_000,
            retention_hours: 24 * 7,
        }
    }
}
