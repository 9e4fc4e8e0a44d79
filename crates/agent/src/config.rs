//! The agent's settings: one [`AgentConfig`], loaded in layers by
//! [`streamspace_core::config::load`] (defaults → TOML file → `STREAMSPACE_` environment).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use streamspace_core::config::Secret;

use crate::error::{Error, Result};
#[cfg(feature = "kubernetes")]
use crate::runtime::kubernetes::KubernetesConfig;
use crate::runtime::process::{
    Catalog, DEFAULT_MONITOR_INTERVAL, ProcessRuntimeConfig, Template, default_agent_exe,
};

/// Built without the `kubernetes` feature, the agent still accepts a `[kubernetes]`
/// section (one configuration file serves both builds) and ignores it; asking for
/// `runtime = "kubernetes"` is refused by [`AgentConfig::validate`].
#[cfg(not(feature = "kubernetes"))]
pub type KubernetesConfig = serde::de::IgnoredAny;

/// Why an agent built without the `kubernetes` feature refuses `runtime = "kubernetes"`.
#[cfg(not(feature = "kubernetes"))]
pub(crate) fn built_without_kubernetes() -> Error {
    Error::Config(
        "runtime = \"kubernetes\" needs an agent built with the `kubernetes` feature \
         (a default one); this binary was built without it (`--no-default-features`)"
            .into(),
    )
}

pub const DEFAULT_DISPATCHER_URL: &str = "http://127.0.0.1:7001";
pub const DEFAULT_STATE_DIR: &str = ".streamspace/agent";
pub const DEFAULT_RECONNECT_BASE_MS: u64 = 100;
pub const DEFAULT_RECONNECT_CAP_MS: u64 = 10_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 5_000;
pub const DEFAULT_STOP_GRACE_MS: u64 = 5_000;
pub const DEFAULT_REMEMBERED_COMMANDS: usize = 10_000;

/// Which [`SessionRuntime`](crate::runtime::SessionRuntime) runs the sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// Local child processes ([`ProcessRuntime`](crate::runtime::ProcessRuntime)).
    #[default]
    Process,
    /// Deployments, Services and PVCs through the Kubernetes API
    /// ([`KubernetesRuntime`](crate::runtime::KubernetesRuntime)), configured by the
    /// `[kubernetes]` section.
    Kubernetes,
    /// Nothing runs: sessions are remembered in memory
    /// ([`RecordRuntime`](crate::runtime::RecordRuntime)). For measuring the pipeline
    /// (`cargo xtask bench`), never for serving users.
    Record,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Kubernetes => "kubernetes",
            RuntimeKind::Record => "record",
        }
    }
}

/// Everything the agent can be told. Every key has a default (the constants above), so an
/// empty file is valid; only `credential` must be set for the dispatcher to accept it.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The command-dispatcher's gRPC address, `http://…` or `https://…` (TLS with the
    /// WebPKI roots).
    pub dispatcher_url: String,
    /// The bearer token identifying this agent. Never logged.
    pub credential: Secret<String>,
    /// Allows `http://` (plaintext: the credential and every command in clear) to a host
    /// other than the loopback interface. Off by default; `--insecure` sets it.
    pub insecure: bool,
    /// For `https://`: PEM file of the CA that signed the dispatcher's certificate
    /// (default: the WebPKI roots).
    pub tls_ca_file: Option<PathBuf>,
    /// For `https://` with mutual TLS: the agent's PEM certificate chain and private key.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Where the runtime keeps its session records and effect journal (and the liveness
    /// file `alive`).
    pub state_dir: PathBuf,
    /// How often the liveness file is rewritten (`streamspace-agent alive` checks it).
    pub liveness_interval_ms: u64,
    pub runtime: RuntimeKind,
    /// Reconnect backoff: first retry immediate, then full jitter under
    /// `min(cap, base · 2^(n-1))`.
    pub reconnect_base_ms: u64,
    pub reconnect_cap_ms: u64,
    /// Limit on establishing the connection and on waiting for `Welcome`.
    pub connect_timeout_ms: u64,
    /// HTTP/2 PING every interval (also while idle); the connection is dropped when an
    /// answer takes longer than the timeout, so a black-holed dispatcher is noticed.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// At shutdown, how long commands already executing may take to finish and report.
    pub shutdown_grace_ms: u64,
    /// Finished commands remembered for idempotent redelivery (oldest forgotten first).
    pub remembered_commands: usize,
    /// Log JSON lines instead of human-readable text.
    pub log_json: bool,
    /// Where to serve `/metrics` (Prometheus text); unset (the default) serves none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Process runtime: between SIGTERM and SIGKILL when a session is stopped.
    pub stop_grace_ms: u64,
    /// Process runtime: host name put in session URLs.
    pub advertise_host: String,
    /// Process runtime: the executable substituted for `{agent}` in templates; by default
    /// the agent's own executable.
    pub session_server: Option<PathBuf>,
    /// Process runtime: templates added to (or replacing entries of) the default catalog
    /// (`firefox-browser`, `chrome-browser`, `desktop-xfce`).
    pub templates: BTreeMap<String, Template>,
    /// Kubernetes runtime: cluster access, namespace and its template catalog.
    pub kubernetes: KubernetesConfig,
    /// Chaos runs only: make runtime calls fail on purpose. Off by default; an agent with
    /// it on says so loudly at start-up. Never set it in production.
    pub fault_injection: FaultInjectionConfig,
}

/// Runtime fault injection for chaos runs (`runtime::faulty::FaultyRuntime`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultInjectionConfig {
    /// Probability (0.0–1.0) that a `start`, `stop`, `hibernate`, `wake` or `list` call
    /// fails with a retryable error before reaching the runtime. 0 turns it off.
    pub runtime_failure_rate: f64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            dispatcher_url: DEFAULT_DISPATCHER_URL.to_owned(),
            credential: Secret::new(String::new()),
            insecure: false,
            liveness_interval_ms: crate::liveness::ALIVE_INTERVAL.as_millis() as u64,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            runtime: RuntimeKind::Process,
            reconnect_base_ms: DEFAULT_RECONNECT_BASE_MS,
            reconnect_cap_ms: DEFAULT_RECONNECT_CAP_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
            keepalive_timeout_ms: DEFAULT_KEEPALIVE_TIMEOUT_MS,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            remembered_commands: DEFAULT_REMEMBERED_COMMANDS,
            log_json: false,
            metrics_listen: None,
            stop_grace_ms: DEFAULT_STOP_GRACE_MS,
            advertise_host: "127.0.0.1".to_owned(),
            session_server: None,
            templates: BTreeMap::new(),
            kubernetes: KubernetesConfig::default(),
            fault_injection: FaultInjectionConfig::default(),
        }
    }
}

/// The host of a URL without its scheme: `host[:port][/…]`, IPv6 in brackets.
fn url_host(rest: &str) -> &str {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// `localhost`, `127.0.0.0/8` or `::1`: traffic that never leaves the machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl AgentConfig {
    /// Loads defaults, then `file`, then `STREAMSPACE_*` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let config: Self = streamspace_core::config::load(file)?;
        config.validate()?;
        Ok(config)
    }

    /// Defaults plus the three settings every deployment (and test) gives.
    pub fn new(
        dispatcher_url: impl Into<String>,
        credential: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            dispatcher_url: dispatcher_url.into(),
            credential: Secret::new(credential.into()),
            state_dir: state_dir.into(),
            ..Self::default()
        }
    }

    /// Rejects settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !(self.dispatcher_url.starts_with("http://")
            || self.dispatcher_url.starts_with("https://"))
        {
            return bad(format!(
                "dispatcher_url {:?} must start with http:// or https://",
                self.dispatcher_url
            ));
        }
        if let Some(rest) = self.dispatcher_url.strip_prefix("http://") {
            let host = url_host(rest);
            if !self.insecure && !is_loopback(host) {
                return bad(format!(
                    "dispatcher_url {:?} is plaintext to {host:?}, which is not this machine: the \
                     credential and every command would cross the network in clear. Use \
                     https:// (with tls_ca_file for a private CA), or set insecure = true \
                     (--insecure) on a network you trust",
                    self.dispatcher_url
                ));
            }
            if self.tls_ca_file.is_some() || self.tls_cert_file.is_some() {
                return bad(format!(
                    "tls_* files are set but dispatcher_url {:?} is http://; use https://",
                    self.dispatcher_url
                ));
            }
        }
        let rate = self.fault_injection.runtime_failure_rate;
        if !(0.0..=1.0).contains(&rate) {
            return bad(format!(
                "fault_injection.runtime_failure_rate must be 0.0..=1.0, got {rate}"
            ));
        }
        let credential = self.credential.expose();
        if credential.is_empty() {
            return bad("credential is not set (STREAMSPACE_CREDENTIAL)".into());
        }
        // It travels in an HTTP header; say so here rather than fail on every dial.
        if !credential.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("credential must be printable ASCII without spaces".into());
        }
        if self.reconnect_base_ms == 0 || self.reconnect_cap_ms < self.reconnect_base_ms {
            return bad("reconnect_base_ms must be positive and at most reconnect_cap_ms".into());
        }
        for (key, value) in [
            ("liveness_interval_ms", self.liveness_interval_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
        ] {
            if value == 0 {
                return bad(format!("{key} must be positive"));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad("tls_cert_file and tls_key_file must be set together".into());
        }
        if self.remembered_commands == 0 {
            return bad("remembered_commands must be positive".into());
        }
        if self.runtime == RuntimeKind::Kubernetes {
            #[cfg(feature = "kubernetes")]
            self.kubernetes.validate()?;
            #[cfg(not(feature = "kubernetes"))]
            return Err(built_without_kubernetes());
        }
        Ok(())
    }

    pub fn reconnect_base(&self) -> Duration {
        Duration::from_millis(self.reconnect_base_ms)
    }

    pub fn reconnect_cap(&self) -> Duration {
        Duration::from_millis(self.reconnect_cap_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The process runtime's settings derived from these.
    pub fn process_runtime_config(&self) -> ProcessRuntimeConfig {
        ProcessRuntimeConfig {
            state_dir: self.state_dir.clone(),
            catalog: Catalog::default_with(self.templates.clone()),
            agent_exe: self
                .session_server
                .clone()
                .unwrap_or_else(default_agent_exe),
            stop_grace: Duration::from_millis(self.stop_grace_ms),
            monitor_interval: DEFAULT_MONITOR_INTERVAL,
            advertise_host: self.advertise_host.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_sets_the_documented_keys() {
        let config: AgentConfig = streamspace_core::config::load_from(
            None,
            env(&[
                ("STREAMSPACE_DISPATCHER_URL", "http://10.0.0.1:7001"),
                ("STREAMSPACE_INSECURE", "true"),
                ("STREAMSPACE_CREDENTIAL", "tok-123"),
                ("STREAMSPACE_STATE_DIR", "/var/lib/ss"),
                ("STREAMSPACE_TEMPLATES__SLEEPY__PROGRAM", "sleep"),
                (
                    "STREAMSPACE_TEMPLATES__SLEEPY__ARGS",
                    "[\"30\", \"{session}\"]",
                ),
            ]),
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.dispatcher_url, "http://10.0.0.1:7001");
        assert_eq!(config.credential.expose(), "tok-123");
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/ss"));
        assert_eq!(config.reconnect_base_ms, DEFAULT_RECONNECT_BASE_MS);
        assert_eq!(config.templates["sleepy"].args, ["30", "{session}"]);
        let catalog = config.process_runtime_config().catalog;
        assert!(catalog.get("firefox-browser").is_some() && catalog.get("sleepy").is_some());
        assert!(!format!("{config:?}").contains("tok-123"));
    }

    #[test]
    fn unknown_keys_and_missing_credential_are_refused() {
        let err = streamspace_core::config::load_from::<AgentConfig>(
            None,
            env(&[("STREAMSPACE_RECONNECT_CAPS_MS", "1")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("reconnect_caps_ms"), "{err}");
        let err = AgentConfig::default().validate().unwrap_err();
        assert!(err.to_string().contains("credential"), "{err}");
        let mut config = AgentConfig::new("grpc://x", "t", "/tmp");
        assert!(config.validate().is_err());
        config.dispatcher_url = "http://localhost:1".into();
        config.validate().unwrap();
    }

    #[test]
    fn plaintext_leaves_the_machine_only_when_told_insecure() {
        let mut config = AgentConfig::new("http://dispatcher.example:7001", "t", "/tmp");
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("insecure") && err.contains("https://"),
            "{err}"
        );
        for url in [
            "http://127.0.0.1:7001",
            "http://127.8.9.1:7001/",
            "http://localhost:7001",
            "http://[::1]:7001",
        ] {
            config.dispatcher_url = url.into();
            config.validate().unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for url in [
            "http://10.0.0.1:7001",
            "http://[fd00::1]:7001",
            "http://127.0.0.1.nip.io",
        ] {
            config.dispatcher_url = url.into();
            assert!(config.validate().is_err(), "{url} accepted");
        }
        config.insecure = true;
        config.validate().unwrap();
        config.dispatcher_url = "https://dispatcher.example:7001".into();
        config.insecure = false;
        config.validate().unwrap();
        // TLS files with a plaintext URL are a mistake, not a choice.
        config.dispatcher_url = "http://127.0.0.1:7001".into();
        config.tls_ca_file = Some("/etc/ca.pem".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
    }

    /// An agent built without the Kubernetes client reads the same configuration files
    /// (a `[kubernetes]` section is accepted and ignored) but refuses to run that runtime
    /// with an error that says why, instead of starting something else.
    #[cfg(not(feature = "kubernetes"))]
    #[test]
    fn without_the_kubernetes_feature_its_runtime_is_refused_by_name() {
        let config: AgentConfig = streamspace_core::config::load_from(
            None,
            env(&[
                ("STREAMSPACE_CREDENTIAL", "t"),
                ("STREAMSPACE_RUNTIME", "kubernetes"),
                ("STREAMSPACE_KUBERNETES__NAMESPACE", "sessions"),
            ]),
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`kubernetes` feature"), "{err}");
        let config = AgentConfig {
            runtime: RuntimeKind::Record,
            ..config
        };
        config.validate().unwrap();
    }
}
