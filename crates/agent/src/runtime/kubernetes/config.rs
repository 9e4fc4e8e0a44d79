//! The `[kubernetes]` configuration: the cluster to use and the session templates.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Toleration;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};

use super::{is_dns_label, is_dns_subdomain};
use crate::error::Error;

/// The `app` label value that marks an object as a StreamSpace session's.
pub const APP_LABEL: &str = "streamspace-session";
/// Selects every session object the runtime manages.
pub const SESSION_SELECTOR: &str = "app=streamspace-session";
/// Port a template's container serves on, unless the template says otherwise.
pub const DEFAULT_PORT: u16 = 3000;
/// Resources of a template that names none: what one browser tab-heavy session needs
/// (the original system's 512Mi/250m got browsers OOM-killed on ordinary pages).
pub const DEFAULT_MEMORY: &str = "2Gi";
pub const DEFAULT_CPU: &str = "1";
/// Size of the memory-backed `/dev/shm` of a template that names none. Chromium and
/// Firefox keep rendering buffers there; the container runtime's 64 MiB default makes
/// tabs crash. It counts against the memory limit.
pub const DEFAULT_SHM_SIZE: &str = "1Gi";
/// Access mode of a home volume: one node mounts it (a session has one pod).
pub const DEFAULT_HOME_ACCESS_MODE: &str = "ReadWriteOnce";
/// The access modes a home volume may ask for.
pub const HOME_ACCESS_MODES: [&str; 3] = ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"];
/// How long a session's pod may take to become ready (image pulls are slow).
pub const DEFAULT_READY_TIMEOUT_MS: u64 = 300_000;
/// How long a stop or hibernate may take until the cluster shows it done.
pub const DEFAULT_OPERATION_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_HOME_VOLUME_SIZE: &str = "10Gi";
pub const DEFAULT_HOME_MOUNT_PATH: &str = "/config";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Templates of the default catalog (linuxserver.io images: see [`KubeTemplate::linuxserver`]).
pub const DEFAULT_TEMPLATES: [(&str, &str); 3] = [
    ("firefox-browser", "lscr.io/linuxserver/firefox:latest"),
    ("chrome-browser", "lscr.io/linuxserver/chromium:latest"),
    ("desktop-xfce", "lscr.io/linuxserver/webtop:ubuntu-xfce"),
];

/// How to run one kind of session on Kubernetes.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubeTemplate {
    pub image: String,
    /// The port the container serves the session on; the Service exposes it.
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Memory request and limit (the command's `resources` override it).
    #[serde(default = "default_memory")]
    pub memory: String,
    /// CPU request and limit (the command's `resources` override it).
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// How long the pod may take to become ready after start or wake.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// Where the home volume is mounted.
    #[serde(default = "default_home_mount_path")]
    pub home_mount_path: String,
    /// Whether each session gets a home volume (a PersistentVolumeClaim `{id}-home`) that
    /// survives hibernation; without one, hibernating loses the container's files. A
    /// command may ask for one even when this is off.
    #[serde(default = "default_true")]
    pub home_volume: bool,
    /// Size of the home volume; unset means `kubernetes.home_volume_size`.
    #[serde(default)]
    pub home_size: Option<String>,
    /// Storage class of the home volume; unset means `kubernetes.home_storage_class`.
    #[serde(default)]
    pub home_storage_class: Option<String>,
    /// `ReadWriteOnce` (default), `ReadWriteOncePod` or `ReadWriteMany`.
    #[serde(default = "default_home_access_mode")]
    pub home_access_mode: String,
    /// Size of the memory-backed `/dev/shm`; empty means none (the runtime's 64 MiB).
    #[serde(default = "default_shm_size")]
    pub shm_size: String,
    /// Secrets (in the sessions' namespace) to pull the image with.
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    /// Node labels a session's pod must match (e.g. a pool of session nodes).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints a session's pod tolerates, as Kubernetes spells them
    /// (`{ key = "dedicated", operator = "Equal", value = "sessions", effect = "NoSchedule" }`).
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of a session's pod, so sessions outrank (or yield to) batch work.
    #[serde(default)]
    pub priority_class: Option<String>,
    /// Whether the cluster autoscaler may evict a live session to scale a node down.
    /// Off by default: an eviction ends the user's session.
    #[serde(default)]
    pub safe_to_evict: bool,
    /// How the session's container is confined (default `restricted`).
    #[serde(default)]
    pub security: SecurityProfile,
    /// Under `restricted`: the uid (and gid, and `fsGroup`) the container runs as.
    #[serde(default = "default_run_as_user")]
    pub run_as_user: i64,
    /// The variable the image reads its access password from (`PASSWORD` for the
    /// linuxserver.io images, `VNC_PW` for kasmweb). Set, every session gets a random
    /// password there, and its URL carries it (`scheme://user:password@host:port`): only
    /// whoever holds the URL — its owner, through the API — gets in.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The user name the image expects with that password.
    #[serde(default = "default_url_user")]
    pub url_user: String,
    /// `http` or `https`: what the container serves on its port.
    #[serde(default = "default_url_scheme")]
    pub url_scheme: String,
}

/// How a session's container is confined: the Pod Security level its pod meets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityProfile {
    /// Pod Security `restricted`: never root (`run_as_user`), no privilege escalation,
    /// every capability dropped, the runtime's default seccomp profile. For images built
    /// to run unprivileged.
    #[default]
    Restricted,
    /// Pod Security `baseline`: for images that start as root and drop to a user
    /// themselves (the linuxserver.io images' s6 init): root at start with only the
    /// capabilities that needs, no privilege escalation, the default seccomp profile.
    Baseline,
}

/// What a `baseline` session may keep: what an init needs to chown its home and switch
/// to its user.
pub const BASELINE_CAPABILITIES: [&str; 6] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
    "SETGID",
    "SETUID",
];
/// The uid a `restricted` session runs as unless its template says otherwise.
pub const DEFAULT_RUN_AS_USER: i64 = 1000;

fn default_true() -> bool {
    true
}
fn default_home_access_mode() -> String {
    DEFAULT_HOME_ACCESS_MODE.into()
}
fn default_shm_size() -> String {
    DEFAULT_SHM_SIZE.into()
}

fn default_run_as_user() -> i64 {
    DEFAULT_RUN_AS_USER
}
fn default_url_user() -> String {
    "user".into()
}
fn default_url_scheme() -> String {
    "http".into()
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_memory() -> String {
    DEFAULT_MEMORY.into()
}
fn default_cpu() -> String {
    DEFAULT_CPU.into()
}
fn default_ready_timeout_ms() -> u64 {
    DEFAULT_READY_TIMEOUT_MS
}
fn default_home_mount_path() -> String {
    DEFAULT_HOME_MOUNT_PATH.into()
}

impl KubeTemplate {
    /// A template with every default but the image.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            port: DEFAULT_PORT,
            env: BTreeMap::new(),
            memory: DEFAULT_MEMORY.into(),
            cpu: DEFAULT_CPU.into(),
            ready_timeout_ms: DEFAULT_READY_TIMEOUT_MS,
            home_mount_path: DEFAULT_HOME_MOUNT_PATH.into(),
            home_volume: true,
            home_size: None,
            home_storage_class: None,
            home_access_mode: DEFAULT_HOME_ACCESS_MODE.into(),
            shm_size: DEFAULT_SHM_SIZE.into(),
            image_pull_secrets: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            priority_class: None,
            safe_to_evict: false,
            security: SecurityProfile::Restricted,
            run_as_user: DEFAULT_RUN_AS_USER,
            password_env: None,
            url_user: default_url_user(),
            url_scheme: default_url_scheme(),
        }
    }

    /// A linuxserver.io image: it starts as root (`baseline`), serves on 3000 and takes
    /// basic-auth credentials from `CUSTOM_USER`/`PASSWORD`.
    pub fn linuxserver(image: impl Into<String>) -> Self {
        let mut t = Self::new(image);
        t.security = SecurityProfile::Baseline;
        t.password_env = Some("PASSWORD".into());
        t.url_user = "abc".into();
        t.env.insert("CUSTOM_USER".into(), "abc".into());
        t
    }

    pub(super) fn validate(&self, name: &str) -> Result<(), Error> {
        let bad = |what: &str| {
            Err(Error::Config(format!(
                "kubernetes template {name:?}: {what}"
            )))
        };
        if self.image.trim().is_empty() {
            return bad("empty image");
        }
        if self.port == 0 {
            return bad("port must be positive");
        }
        if self.ready_timeout_ms == 0 {
            return bad("ready_timeout_ms must be positive");
        }
        if !self.home_mount_path.starts_with('/') {
            return bad("home_mount_path must be absolute");
        }
        if self.security == SecurityProfile::Restricted && self.run_as_user <= 0 {
            return bad(
                "run_as_user must be a non-root uid (above 0) under security = \"restricted\"",
            );
        }
        if !HOME_ACCESS_MODES.contains(&self.home_access_mode.as_str()) {
            return bad(&format!(
                "home_access_mode must be one of {}",
                HOME_ACCESS_MODES.join(", ")
            ));
        }
        if let Some(bad_name) = self
            .image_pull_secrets
            .iter()
            .find(|name| !is_dns_subdomain(name))
        {
            return bad(&format!(
                "image_pull_secrets entry {bad_name:?} is not a valid Secret name"
            ));
        }
        if !matches!(self.url_scheme.as_str(), "http" | "https") {
            return bad("url_scheme must be http or https");
        }
        if let Some(var) = &self.password_env
            && (var.is_empty() || self.env.contains_key(var))
        {
            return bad("password_env must name a variable the template's env does not set");
        }
        Ok(())
    }
}

/// The `[kubernetes]` section of the agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file. Unset: `$KUBECONFIG` or `~/.kube/config` when present,
    /// otherwise the pod's service account (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; unset means its current context.
    pub context: Option<String>,
    /// Namespace of the session objects; unset means the kubeconfig context's namespace,
    /// or the service account's namespace in-cluster.
    pub namespace: Option<String>,
    /// Templates added to (or replacing entries of) the default catalog.
    pub templates: BTreeMap<String, KubeTemplate>,
    /// Limit on a stop or hibernate taking effect.
    pub operation_timeout_ms: u64,
    /// Size of a home volume.
    pub home_volume_size: String,
    /// Storage class of home volumes; unset means the cluster's default class.
    pub home_storage_class: Option<String>,
    /// Cluster DNS domain, for session URLs (`http://{id}.{ns}.svc.{domain}:{port}`).
    pub cluster_domain: String,
    /// How long a stopped session's home volume is kept before it is deleted; 0 (the
    /// default) deletes it with the session. Kept volumes carry the time they may go in
    /// the annotation `streamspace.io/delete-after`; the agent deletes them after it.
    pub home_retention_secs: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            namespace: None,
            templates: BTreeMap::new(),
            operation_timeout_ms: DEFAULT_OPERATION_TIMEOUT_MS,
            home_volume_size: DEFAULT_HOME_VOLUME_SIZE.into(),
            home_storage_class: None,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            home_retention_secs: 0,
        }
    }
}

impl KubernetesConfig {
    /// The default catalog with the configured templates added or replacing entries.
    pub fn catalog(&self) -> BTreeMap<String, KubeTemplate> {
        let mut catalog: BTreeMap<String, KubeTemplate> = DEFAULT_TEMPLATES
            .into_iter()
            .map(|(name, image)| (name.to_owned(), KubeTemplate::linuxserver(image)))
            .collect();
        catalog.extend(self.templates.clone());
        catalog
    }

    pub fn validate(&self) -> Result<(), Error> {
        for (name, template) in &self.templates {
            template.validate(name)?;
        }
        if self.operation_timeout_ms == 0 {
            return Err(Error::Config(
                "kubernetes.operation_timeout_ms must be positive".into(),
            ));
        }
        if let Some(ns) = &self.namespace
            && !is_dns_label(ns)
        {
            return Err(Error::Config(format!(
                "kubernetes.namespace {ns:?} is not a valid namespace name"
            )));
        }
        Ok(())
    }

    /// The kube-rs client configuration this section describes.
    pub(super) async fn client_config(&self) -> Result<kube::Config, Error> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let fail = |what: &str, e: &dyn fmt::Display| {
            Error::Config(format!("kubernetes runtime: {what}: {e}"))
        };
        match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| fail(&format!("reading kubeconfig {}", path.display()), &e))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| fail(&format!("using kubeconfig {}", path.display()), &e))
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| fail("loading the kubeconfig", &e)),
            // $KUBECONFIG or ~/.kube/config when present, else the service account.
            None => kube::Config::infer()
                .await
                .map_err(|e| fail("no kubeconfig and not running in a cluster", &e)),
        }
    }
}
