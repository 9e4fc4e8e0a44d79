//! A stand-in for the Kubernetes API server, for testing the agent's Kubernetes runtime
//! where no cluster can run.
//!
//! [`FakeCluster`] serves plain HTTP on loopback and speaks the real REST paths, verbs,
//! status codes, `Status` bodies, `resourceVersion` concurrency, watch streams,
//! server-side apply with `managedFields`, and deletion propagation for namespaced
//! `apps/v1` Deployments (with `/scale` and `/status`) and `v1` Services,
//! PersistentVolumeClaims, Pods and ResourceQuotas, so the unmodified kube-rs client
//! talks to it through a generated kubeconfig. A small built-in controller makes it
//! behave like a cluster: Deployments get Pods (through admission: quotas and an image
//! policy webhook can refuse them, which the Deployment reports as `ReplicaFailure`),
//! claims bind after a moment and are protected while in use, Pods become ready (or fail
//! to pull, crash, or get OOM-killed), scaling to zero removes them, rollouts that stall
//! exceed their progress deadline, garbage collection follows owner references. Test
//! hooks change the world out of band, impose pod states, deny verbs (403), throttle
//! (429), read and write files in pods' volumes, and record every request in an audit
//! log.
//!
//! Besides the Kubernetes paths, the server answers a few test-only paths under
//! `/fake/v1/` (bearer token required, never audited), for drivers that run the
//! `streamspace-kube-fake` binary as a process:
//!
//! - `PUT` / `GET /fake/v1/namespaces/{ns}/pods/{pod}/files/{path…}`: write or read
//!   `/{path…}` in the pod (see [`FakeCluster::write_file`]); 204 / 200 with the bytes,
//!   404 with `{"message": …}` when the pod or file is absent, 409 when the pod is not
//!   running, 400 for a path with `..`.
//! - `POST /fake/v1/throttle?count=N`: [`FakeCluster::throttle`]; 204.
//!
//! What it does not model is listed in `docs/kubernetes.md`.
#![forbid(unsafe_code)]

mod admission;
mod api;
mod apply;
mod controller;
mod fields;
mod files;
mod hooks;
mod ops;
mod patch;
mod quantity;
mod quota;
mod resource;
mod selector;
mod status;
mod store;
mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use controller::PodState;
pub use ops::Propagation;
pub use resource::ResourceKind;

use store::Store;

/// Default delay between a pod's creation and its containers running.
pub const DEFAULT_POD_READY_DELAY: Duration = Duration::from_millis(200);
/// Default image prefix whose pull fails (`ErrImagePull`, then `ImagePullBackOff`).
pub const DEFAULT_FAIL_IMAGE_PREFIX: &str = "fail/";
/// Default image prefix whose container crashes (`CrashLoopBackOff`, never ready).
pub const DEFAULT_CRASH_IMAGE_PREFIX: &str = "crash/";
/// Default image prefix whose container starts, then is OOM-killed and crash-loops.
pub const DEFAULT_OOM_IMAGE_PREFIX: &str = "oom/";
/// Default image prefix the pretend image policy webhook refuses.
pub const DEFAULT_ADMISSION_DENY_IMAGE_PREFIX: &str = "denied/";
/// Default delay from a claim's creation to its binding.
pub const DEFAULT_PVC_BIND_DELAY: Duration = Duration::from_millis(50);
/// Default bearer token the kubeconfig carries and the server requires.
pub const DEFAULT_TOKEN: &str = "streamspace-kube-fake-token";

/// Errors of the test hooks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the fake API server: {0}")]
    Bind(#[source] std::io::Error),
    #[error("writing the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the fake API server refused the object: {code} {message}")]
    Api { code: u16, message: String },
    #[error("decoding a stored object: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("pods {name:?} not found in namespace {namespace:?}")]
    PodNotFound { namespace: String, name: String },
    #[error("pod {namespace}/{name} is not running (phase {phase})")]
    PodNotRunning {
        namespace: String,
        name: String,
        phase: String,
    },
    #[error("persistentvolumeclaims {name:?} not found in namespace {namespace:?}")]
    ClaimNotFound { namespace: String, name: String },
    #[error("invalid file path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A rule that answers 403 Forbidden, like a Role that lacks the permission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`) or `*`.
    pub verb: String,
    /// Resource as RBAC names it (`deployments`, `deployments/scale`, `pods`) or `*`.
    pub resource: String,
}

impl Denial {
    pub fn new(verb: &str, resource: &str) -> Self {
        Self {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
        }
    }

    /// Parses `verb:resource`, the form the binary's `--deny` flag takes.
    pub fn parse(s: &str) -> Option<Self> {
        let (verb, resource) = s.split_once(':')?;
        Some(Self::new(verb.trim(), resource.trim()))
    }

    fn matches(&self, verb: &str, resource: &str) -> bool {
        (self.verb == "*" || self.verb == verb)
            && (self.resource == "*" || self.resource == resource)
    }
}

/// One request as the audit log records it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuditEntry {
    /// RBAC verb.
    pub verb: String,
    /// API group, empty for the core group.
    pub group: String,
    /// Resource, with the subresource after a slash (`deployments/scale`).
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The HTTP status answered.
    pub code: u16,
}

/// How the stand-in behaves; everything but the token can be changed while it runs.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Bearer token required on every request.
    pub token: String,
    /// The user named in 403 messages.
    pub user: String,
    /// Delay from a pod's creation to its containers running (or failing to pull).
    pub pod_ready_delay: Duration,
    /// Images starting with one of these never pull.
    pub fail_image_prefixes: Vec<String>,
    /// Images starting with one of these crash in a loop and never become ready.
    pub crash_image_prefixes: Vec<String>,
    /// Images starting with one of these run, then are OOM-killed (`OOMKilled`, exit
    /// code 137) and crash-loop; never ready.
    pub oom_image_prefixes: Vec<String>,
    /// Pods with an image starting with one of these are refused by the pretend
    /// validating webhook `images.policy.streamspace.test`.
    pub admission_deny_image_prefixes: Vec<String>,
    /// Delay from a claim's creation to its binding; pods mounting it wait.
    pub pvc_bind_delay: Duration,
    /// Requests answered 403.
    pub denials: Vec<Denial>,
    /// Interval of `BOOKMARK` events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Events kept for watches that resume from a version; older ones get 410 Gone.
    pub history_limit: usize,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            token: DEFAULT_TOKEN.into(),
            user: "system:serviceaccount:streamspace:streamspace-agent".into(),
            pod_ready_delay: DEFAULT_POD_READY_DELAY,
            fail_image_prefixes: vec![DEFAULT_FAIL_IMAGE_PREFIX.into()],
            crash_image_prefixes: vec![DEFAULT_CRASH_IMAGE_PREFIX.into()],
            oom_image_prefixes: vec![DEFAULT_OOM_IMAGE_PREFIX.into()],
            admission_deny_image_prefixes: vec![DEFAULT_ADMISSION_DENY_IMAGE_PREFIX.into()],
            pvc_bind_delay: DEFAULT_PVC_BIND_DELAY,
            denials: Vec::new(),
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
        }
    }
}

/// State shared by the HTTP handlers, the controller loop and the test hooks.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Mutex<Store>,
    token: String,
    user: String,
    bookmark_interval: Duration,
    /// Wakes the controller loop after a write.
    wake: Notify,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock can only come from a bug in the stand-in; the
        // store stays consistent (every change is applied whole), so keep serving.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running stand-in API server.
#[derive(Debug)]
pub struct FakeCluster {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl FakeCluster {
    /// Starts on `127.0.0.1` with a free port.
    pub async fn start(config: FakeConfig) -> Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts on `addr` (port 0 picks a free one; see [`FakeCluster::addr`]).
    pub async fn bind(addr: SocketAddr, config: FakeConfig) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let (stop, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared {
            token: config.token.clone(),
            user: config.user.clone(),
            bookmark_interval: config.bookmark_interval,
            store: Mutex::new(Store::new(config.clone(), config.history_limit)),
            wake: Notify::new(),
            shutdown: shutdown.clone(),
        });
        let controller = tokio::spawn(controller_loop(shared.clone()));
        let app = api::router(shared.clone());
        let mut until = shutdown;
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = until.wait_for(|stop| *stop).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "fake API server failed");
            }
            let _ = controller.await;
        });
        Ok(Self {
            addr,
            shared,
            stop,
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the kubeconfig's `server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig with one context pointing at this server, a token user and
    /// `namespace` as the default namespace.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-fake\n  cluster:\n    server: {url}\nusers:\n- name: kube-fake\n  user:\n    token: {token}\ncontexts:\n- name: kube-fake\n  context:\n    cluster: kube-fake\n    user: kube-fake\n    namespace: {namespace}\ncurrent-context: kube-fake\n",
            url = self.url(),
            token = self.shared.token,
        )
    }

    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(namespace)).map_err(|source| Error::Kubeconfig {
            path: path.display().to_string(),
            source,
        })
    }

    /// The stored object, as a `GET` would return it.
    pub fn get(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The stored object decoded into its typed form (e.g. a k8s-openapi struct).
    pub fn get_as<K: DeserializeOwned>(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<K>> {
        self.get(kind, namespace, name)
            .map(serde_json::from_value)
            .transpose()
            .map_err(Error::from)
    }

    /// Every stored object of `kind` in `namespace`, sorted by name.
    pub fn list(&self, kind: ResourceKind, namespace: &str) -> Vec<Value> {
        self.shared
            .lock()
            .list(kind, Some(namespace))
            .into_iter()
            .cloned()
            .collect()
    }

    /// Creates an object as another client would (someone's `kubectl create`, which is
    /// also its field manager), through validation and admission.
    pub fn create_out_of_band(
        &self,
        kind: ResourceKind,
        namespace: &str,
        object: Value,
    ) -> Result<Value> {
        let write = ops::Write {
            writer: apply::Writer {
                manager: "kubectl-create",
                apply: false,
                subresource: None,
            },
            dry_run: false,
        };
        let created = ops::create(&mut self.shared.lock(), kind, namespace, object, &write)
            .map_err(|e| Error::Api {
                code: e.code.as_u16(),
                message: e.message,
            })?;
        self.shared.wake.notify_one();
        Ok(created)
    }

    /// Deletes an object as another client would (`kubectl delete`); false when absent.
    pub fn delete_out_of_band(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
        propagation: Propagation,
    ) -> bool {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let (code, _) = ops::delete_with(&mut self.shared.lock(), &key, propagation);
        self.shared.wake.notify_one();
        code != axum::http::StatusCode::NOT_FOUND
    }

    /// Imposes a pod state, as the kubelet or an eviction would report it; false when
    /// the pod does not exist.
    pub fn set_pod_state(&self, namespace: &str, name: &str, state: PodState) -> bool {
        let key = (ResourceKind::Pod, namespace.to_owned(), name.to_owned());
        let found = controller::set_pod_state(&mut self.shared.lock(), &key, &state);
        self.shared.wake.notify_one();
        found
    }

    /// Changes how long new pods take to start.
    pub fn set_pod_ready_delay(&self, delay: Duration) {
        self.shared.lock().settings.pod_ready_delay = delay;
    }

    /// Changes how long claims take to bind, counted from their creation; claims
    /// already waiting are held to the new delay.
    pub fn set_pvc_bind_delay(&self, delay: Duration) {
        self.shared.lock().settings.pvc_bind_delay = delay;
        self.shared.wake.notify_one();
    }

    /// Writes `contents` at the absolute `path` of the running pod's (first) container:
    /// into the claim mounted there (kept with the claim), another volume mounted there
    /// (kept with the pod), or else the container's own filesystem (gone with the pod).
    pub fn write_file(
        &self,
        namespace: &str,
        pod: &str,
        path: &str,
        contents: &[u8],
    ) -> Result<()> {
        files::write(&mut self.shared.lock(), namespace, pod, path, contents)
    }

    /// Reads what [`FakeCluster::write_file`] wrote where `path` resolves now; `None`
    /// when no such file exists.
    pub fn read_file(&self, namespace: &str, pod: &str, path: &str) -> Result<Option<Vec<u8>>> {
        files::read(&self.shared.lock(), namespace, pod, path)
    }

    /// Answers the next `count` non-watch requests `429 Too Many Requests` with
    /// `Retry-After: 1`, as an overloaded API server's flow control does. Replaces any
    /// count still pending.
    pub fn throttle(&self, count: u32) {
        self.shared.lock().throttle = count;
    }

    /// Answers 403 to matching requests from now on.
    pub fn deny(&self, denial: Denial) {
        self.shared.lock().settings.denials.push(denial);
    }

    pub fn clear_denials(&self) {
        self.shared.lock().settings.denials.clear();
    }

    /// Every request served so far, in order.
    pub fn audit_log(&self) -> Vec<AuditEntry> {
        self.shared.lock().audit.clone()
    }

    pub fn clear_audit_log(&self) {
        self.shared.lock().audit.clear();
    }

    /// The last `resourceVersion` handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().current_rv()
    }

    /// Waits until `condition` holds for the object (`None` when absent), checking after
    /// every change rather than on a timer; gives up after `timeout` and returns false.
    pub async fn wait_for(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
        timeout: Duration,
        condition: impl Fn(Option<&Value>) -> bool,
    ) -> bool {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut rx = {
            let store = self.shared.lock();
            if condition(store.get(&key)) {
                return true;
            }
            store.subscribe()
        };
        let check = async {
            loop {
                match rx.recv().await {
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                    _ => {
                        if condition(self.shared.lock().get(&key)) {
                            return true;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(timeout, check).await.unwrap_or(false)
    }

    /// Stops serving: watches end, the controller stops, the port is released.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        // Dropped without `shutdown`: still stop the background tasks.
        let _ = self.stop.send(true);
    }
}

/// Resolves once shutdown is requested (or its sender is gone). The guard `wait_for`
/// returns is dropped here, so callers stay `Send`.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs the controllers after every write and when they asked to be woken (a claim due
/// to bind, a progress deadline), and schedules each pod's lifecycle steps.
async fn controller_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let out = controller::reconcile(&mut shared.lock());
        for timer in out.timers {
            tokio::spawn(pod_lifecycle(shared.clone(), timer));
        }
        let due = out.wake_at;
        tokio::select! {
            _ = shared.wake.notified() => {}
            // Modelled time passing in the cluster, not a wait for another event.
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// One pod's simulated kubelet: each step after its delay, then the controllers rerun.
async fn pod_lifecycle(shared: Arc<Shared>, first: controller::PodTimer) {
    let mut shutdown = shared.shutdown.clone();
    let mut next = Some(first);
    while let Some(timer) = next {
        tokio::select! {
            // The delay imitates container start-up; it is the behaviour being modelled,
            // not a wait for some other event.
            _ = tokio::time::sleep(timer.delay) => {}
            _ = stopped(&mut shutdown) => return,
        }
        next = controller::progress_pod(&mut shared.lock(), &timer);
        shared.wake.notify_one();
    }
}
