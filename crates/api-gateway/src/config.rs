//! The gateway's configuration, with documented defaults. Loaded in layers by
//! `streamspace_core::config::load` (defaults → TOML file → `STREAMSPACE_*` variables).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use streamspace_core::config::{DatabaseConfig, Secret};

/// Default REST listener.
pub const DEFAULT_HTTP_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 8080);
/// `/metrics`, on a listener of its own: scrapers reach it, API clients do not.
pub const DEFAULT_METRICS_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 8081);
/// Default gRPC listener.
pub const DEFAULT_GRPC_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 9090);
/// Largest accepted REST request body. Session requests are a few hundred bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest accepted gRPC message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// A request that takes longer than this is answered with a timeout.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Agents silent this long count as offline (the dispatcher's default).
pub const DEFAULT_OFFLINE_AFTER_MS: u64 = 15_000;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub placement: PlacementConfig,
    pub idempotency: IdempotencyConfig,
    pub limits: SessionLimits,
    /// JSON log lines instead of human-readable ones.
    pub log_json: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            database: DatabaseConfig {
                application_name: "streamspace-api-gateway".into(),
                ..DatabaseConfig::default()
            },
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            placement: PlacementConfig::default(),
            idempotency: IdempotencyConfig::default(),
            limits: SessionLimits::default(),
            log_json: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// REST listener. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The internal listener of `/metrics` (not served on `listen`). Port 0 picks a free
    /// port.
    pub metrics_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP_LISTEN.into(),
            metrics_listen: DEFAULT_METRICS_LISTEN.into(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// gRPC listener. Port 0 picks a free port.
    pub listen: SocketAddr,
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams (calls and watches) one connection may open.
    pub max_concurrent_streams: u32,
    /// Unary calls (and the opening of a watch) running at once per connection; more wait.
    pub max_concurrent_requests_per_connection: usize,
    /// Limit on a unary call (and on opening a watch, not on the watch itself).
    pub request_timeout_ms: u64,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_GRPC_LISTEN.into(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams: 128,
            max_concurrent_requests_per_connection: 64,
            request_timeout_ms: 30_000,
        }
    }
}

/// How bearer JWTs are verified (and, for development only, minted).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted signature algorithms (`HS256`, `HS384`, `HS512`, `RS256`, …, `ES256`,
    /// `ES384`, `EdDSA`). `none` does not exist here.
    pub algorithms: Vec<String>,
    /// Shared secret for the HS* algorithms, at least 32 bytes.
    pub hmac_secret: Option<Secret<String>>,
    /// PEM public key for the RS*/PS*/ES*/EdDSA algorithms.
    pub public_key_pem: Option<String>,
    /// The identity provider's JWKS URL (`https://…`): keys for the RS*/PS*/ES*/EdDSA
    /// algorithms, selected by the token's `kid`, refreshed periodically and on an
    /// unknown `kid`.
    pub jwks_url: Option<String>,
    /// PEM CA bundle to verify the JWKS server with (default: the WebPKI roots).
    pub jwks_ca_file: Option<std::path::PathBuf>,
    /// How often the JWKS is fetched again.
    pub jwks_refresh_secs: u64,
    /// Least time between two fetches caused by unknown `kid`s.
    pub jwks_min_refresh_interval_ms: u64,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Claim holding the role(s): a string or an array of strings.
    pub role_claim: String,
    /// Role value that grants the admin endpoints.
    pub admin_role: String,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    pub leeway_secs: u64,
    /// Enables `streamspace-api-gateway mint-token` (HS* secret required). Development
    /// only: never set it in production configuration.
    pub dev_tokens: bool,
    /// Lifetime of minted development tokens, in seconds.
    pub dev_token_ttl_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithms: vec!["HS256".into()],
            hmac_secret: None,
            public_key_pem: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh_secs: 300,
            jwks_min_refresh_interval_ms: 10_000,
            issuer: "streamspace".into(),
            audience: "streamspace-api".into(),
            role_claim: "roles".into(),
            admin_role: "admin".into(),
            leeway_secs: 30,
            dev_tokens: false,
            dev_token_ttl_secs: 12 * 3600,
        }
    }
}

/// Per-user token buckets, one for reads and one for changes. A bucket holds `burst`
/// requests and refills at `per_second`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub read_per_second: f64,
    pub read_burst: u32,
    pub write_per_second: f64,
    pub write_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // Generous for reads: scripts poll session state in tight loops.
            read_per_second: 500.0,
            read_burst: 1000,
            write_per_second: 20.0,
            write_burst: 60,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// An agent silent this long is offline and gets no new sessions; keep it equal to the
    /// dispatchers' `offline_after_ms`.
    pub offline_after_ms: u64,
    /// `Retry-After` (seconds) sent with 503 when no agent is eligible.
    pub retry_after_secs: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            offline_after_ms: DEFAULT_OFFLINE_AFTER_MS,
            retry_after_secs: 5,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a stored answer is replayed for a repeated `Idempotency-Key`.
    pub retention_hours: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retention_hours: 24,
        }
    }
}

/// The most a session may ask for; larger `resources` are refused with 400.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionLimits {
    /// A Kubernetes quantity, e.g. `32Gi`.
    pub max_memory: String,
    /// A Kubernetes quantity of cores, e.g. `16` or `500m`.
    pub max_cpu: String,
    /// Active (not terminated or failed) sessions one user may have; 0: no limit.
    pub max_active_sessions_per_user: u32,
    /// Watches (REST or gRPC) one user may hold open on this gateway at once; 0: no
    /// limit. Each costs a task and a database read per change.
    pub max_watches_per_user: u32,
    /// Tighter maxima for some templates, by template name (`limits.templates.NAME.max_memory`);
    /// a template not listed is held to `max_memory`/`max_cpu`.
    pub templates: BTreeMap<String, TemplateLimits>,
}

/// The most a session of one template may ask for.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateLimits {
    pub max_memory: Option<String>,
    pub max_cpu: Option<String>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_memory: "32Gi".into(),
            max_cpu: "16".into(),
            max_active_sessions_per_user: 100,
            max_watches_per_user: 32,
            templates: BTreeMap::new(),
        }
    }
}

/// A Kubernetes quantity (`512Mi`, `250m`, `2`, `1.5G`) as a number of base units
/// (bytes, cores); `None` when it is not one.
pub fn parse_quantity(value: &str) -> Option<f64> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let factor = match unit {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * factor).filter(|v| v.is_finite())
}

impl GatewayConfig {
    pub fn offline_after(&self) -> Duration {
        Duration::from_millis(self.placement.offline_after_ms)
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.http.max_body_bytes < 1024 {
            return Err("http.max_body_bytes must be at least 1024".into());
        }
        if self.grpc.max_concurrent_streams == 0
            || self.grpc.max_concurrent_requests_per_connection == 0
            || self.grpc.request_timeout_ms == 0
        {
            return Err("grpc.max_concurrent_streams, grpc.max_concurrent_requests_per_connection and grpc.request_timeout_ms must be positive".into());
        }
        if self.grpc.max_message_bytes < 1024 {
            return Err("grpc.max_message_bytes must be at least 1024".into());
        }
        if self.http.request_timeout_ms == 0 {
            return Err("http.request_timeout_ms must be positive".into());
        }
        if self.placement.offline_after_ms == 0 {
            return Err("placement.offline_after_ms must be positive".into());
        }
        let r = &self.rate_limit;
        if r.enabled
            && (r.read_per_second <= 0.0
                || r.write_per_second <= 0.0
                || r.read_burst == 0
                || r.write_burst == 0)
        {
            return Err("rate_limit: per_second and burst values must be positive".into());
        }
        if self.idempotency.retention_hours == 0 {
            return Err("idempotency.retention_hours must be positive".into());
        }
        let per_template = self.limits.templates.iter().flat_map(|(t, l)| {
            [
                (
                    format!("limits.templates.{t}.max_memory"),
                    l.max_memory.as_ref(),
                ),
                (format!("limits.templates.{t}.max_cpu"), l.max_cpu.as_ref()),
            ]
        });
        for (name, value) in [
            (
                "limits.max_memory".to_owned(),
                Some(&self.limits.max_memory),
            ),
            ("limits.max_cpu".to_owned(), Some(&self.limits.max_cpu)),
        ]
        .into_iter()
        .chain(per_template)
        {
            let Some(value) = value else { continue };
            if parse_quantity(value).is_none_or(|v| v <= 0.0) {
                return Err(format!(
                    "{name} {value:?} must be a positive Kubernetes quantity, e.g. 32Gi or 16"
                ));
            }
        }
        crate::auth::Verifier::new(&self.auth).map(|_| ())
    }
}
