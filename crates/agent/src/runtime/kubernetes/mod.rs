//! `KubernetesRuntime`: a session is one Deployment (one replica), one ClusterIP Service
//! and, when asked, a PersistentVolumeClaim `{id}-home`, in one namespace, through kube-rs.
//!
//! | operation | effect |
//! |---|---|
//! | start | create-or-get PVC, Deployment, Service; wait until a pod is ready |
//! | stop | delete Deployment and Service (foreground), the PVC only when asked; wait until gone |
//! | hibernate | `/scale` to 0; wait until no pod runs |
//! | wake | `/scale` to 1; wait until a pod is ready |
//!
//! Every object carries `app=streamspace-session, session=…, user=…, template=…`. An
//! object that already exists is adopted when those labels say it is this session's, and
//! refused otherwise; a delete that finds nothing succeeds. The Service is owned by the
//! Deployment, so the cluster's garbage collector removes it with the Deployment; the PVC
//! is not owned, so it outlives a stop unless the command asks to delete it.
//!
//! Waiting is event-driven: two reflectors (labelled Deployments and Pods) keep local
//! caches current from watch streams, and every change wakes the waiters, which re-check
//! the caches. The same changes feed [`SessionRuntime::subscribe`]: a session whose state
//! moves without an operation of ours (a pod crash, an eviction, someone deleting the
//! Deployment) is published as an [`Observation`], so the database follows the cluster.
//! Each operation waits until the caches show its own result, so its own changes are
//! never mistaken for someone else's.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use streamspace_core::command::{HibernateSession, StartSession, StopSession, WakeSession};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Observation, RuntimeError, SessionRuntime, SessionState, async_trait};
use crate::error::Error;

mod config;
mod objects;

pub use config::*;

/// Shown as the writer of every object (`metadata.managedFields`).
const FIELD_MANAGER: &str = "streamspace-agent";
/// Events buffered for slow subscribers before they lag (and fall back to heartbeats).
const EVENT_BUFFER: usize = 256;
/// Attempts for a write that races with another writer (409 on create or update).
const WRITE_ATTEMPTS: usize = 5;
/// Container waiting reasons that will not cure themselves: a start that ends on one of
/// them is not worth retrying until someone fixes the template or the image.
const HOPELESS_REASONS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CrashLoopBackOff",
];

/// RFC 1123 label: what a namespace, and (starting with a letter) a Service name, must be.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
}

/// Session ids name the Deployment, the Service (a DNS-1035 label) and `{id}-home`.
fn validate_session_id(id: &str) -> Result<(), RuntimeError> {
    if is_dns_label(id) && id.len() <= 63 - "-home".len() {
        Ok(())
    } else {
        Err(RuntimeError::permanent(format!(
            "session id {id:?} cannot name Kubernetes objects: it must be 1-58 lower-case letters, digits or dashes, starting with a letter"
        )))
    }
}

/// A label value from arbitrary text (user ids may be e-mail addresses): invalid
/// characters become `-`, at most 63 characters, alphanumeric at both ends.
fn label_value(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn is_ours(meta: &ObjectMeta, session: &str) -> bool {
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label("app") == Some(APP_LABEL) && label("session") == Some(session)
}

fn session_of(meta: &ObjectMeta) -> Option<&str> {
    let labels = meta.labels.as_ref()?;
    if labels.get("app").map(String::as_str) != Some(APP_LABEL) {
        return None;
    }
    labels.get("session").map(String::as_str)
}

/// The API failure of one call, as a [`RuntimeError`] naming the verb and resource.
fn api_failure(e: kube::Error, verb: &str, resource: &str, name: &str, ns: &str) -> RuntimeError {
    match &e {
        kube::Error::Api(s) if s.code == 403 => RuntimeError::permanent(format!(
            "kubernetes RBAC forbids the agent to {verb} {resource} in namespace {ns} ({name}): {}; grant `{verb}` on `{resource}` in the agent's Role",
            s.message
        )),
        // Conflicts, throttling and server trouble pass; so may an expired token.
        kube::Error::Api(s) if matches!(s.code, 401 | 409 | 429) || s.code >= 500 => {
            RuntimeError::retryable(format!(
                "kubernetes {verb} {resource} {ns}/{name}: {}",
                s.message
            ))
        }
        kube::Error::Api(s) => RuntimeError::permanent(format!(
            "kubernetes {verb} {resource} {ns}/{name}: {} ({})",
            s.message, s.code
        )),
        other => {
            RuntimeError::retryable(format!("kubernetes {verb} {resource} {ns}/{name}: {other}"))
        }
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// What the pods of one session say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PodView {
    Ready {
        pod: String,
        ip: Option<String>,
    },
    /// A pod is failing with a reason the kubelet (or an eviction) gave.
    Failing {
        pod: String,
        reason: String,
        message: String,
    },
    /// A pod exists but is not ready; `detail` says why when the cluster says.
    Pending {
        pod: String,
        detail: Option<String>,
    },
    None,
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// The first reason a container gives for not running (waiting, or crashed last time).
fn container_trouble(pod: &Pod) -> Option<(String, String)> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.clone()?;
        Some((reason, waiting.message.clone().unwrap_or_default()))
    })
}

/// Why the scheduler has not placed a pod, if it said.
fn unschedulable(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_deref().unwrap_or_default()
            )
        })
}

fn pod_view<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> PodView {
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    // Newest first, so a replacement pod speaks before the one it replaced.
    pods.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
    });
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    let active: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && !matches!(pod_phase(p), "Failed" | "Succeeded")
        })
        .collect();
    if let Some(p) = active.iter().find(|p| pod_is_ready(p)) {
        return PodView::Ready {
            pod: name(p),
            ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        };
    }
    if let Some((p, (reason, message))) = active
        .iter()
        .find_map(|p| container_trouble(p).map(|t| (p, t)))
        .filter(|(_, (reason, _))| HOPELESS_REASONS.contains(&reason.as_str()))
    {
        return PodView::Failing {
            pod: name(p),
            reason,
            message,
        };
    }
    if let Some(p) = active.first() {
        let detail = container_trouble(p)
            .map(|(r, m)| format!("{r}: {m}"))
            .or_else(|| unschedulable(p));
        return PodView::Pending {
            pod: name(p),
            detail,
        };
    }
    if let Some(p) = pods.iter().find(|p| pod_phase(p) == "Failed") {
        let status = p.status.as_ref();
        return PodView::Failing {
            pod: name(p),
            reason: status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "Failed".into()),
            message: status.and_then(|s| s.message.clone()).unwrap_or_default(),
        };
    }
    PodView::None
}

fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// A running count of operations per session; while one runs, the session's changes
/// are the operation's own and are not published.
#[derive(Debug, Default)]
struct Busy(HashMap<String, usize>);

/// What the runtime shares with its watch tasks.
struct Inner {
    namespace: String,
    cluster_domain: String,
    catalog: BTreeMap<String, KubeTemplate>,
    operation_timeout: Duration,
    home_volume_size: String,
    home_storage_class: Option<String>,
    deployments: Api<Deployment>,
    services: Api<Service>,
    claims: Api<PersistentVolumeClaim>,
    pods: Api<Pod>,
    deployment_cache: Store<Deployment>,
    pod_cache: Store<Pod>,
    /// Bumped after every cache change; waiters re-check when it moves.
    changed: watch::Sender<u64>,
    events: broadcast::Sender<Observation>,
    busy: Mutex<Busy>,
    /// The state each known session was last reported in (by an operation's result or
    /// an event). A cache change that moves a session away from it is news.
    reported: Mutex<HashMap<String, SessionState>>,
    /// Whether `reported` has been seeded from the first complete caches.
    seeded: Mutex<bool>,
    /// Per watch (Deployments, Pods): whether its last event was an error. While one is
    /// failing its cache may be stale, so inventory asks the API server instead.
    watch_failing: [std::sync::atomic::AtomicBool; 2],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent, so a panic elsewhere does not
    // poison their meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks a session busy for as long as it lives (also when the operation is dropped).
struct BusyGuard<'a> {
    inner: &'a Inner,
    session: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.inner.busy);
        if let Some(n) = busy.0.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                busy.0.remove(&self.session);
            }
        }
    }
}

/// Runs sessions as Kubernetes workloads. See the module documentation.
pub struct KubernetesRuntime {
    inner: Arc<Inner>,
    /// The two reflector tasks; aborted when the runtime is dropped.
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for KubernetesRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesRuntime")
            .field("namespace", &self.inner.namespace)
            .field("templates", &self.inner.catalog.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Drop for KubernetesRuntime {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubernetesRuntime {
    /// Connects as `config` says (kubeconfig or in-cluster) and starts watching the
    /// namespace's session objects. Fails only on configuration; an unreachable API
    /// server shows up in the operations, which retry.
    pub async fn connect(config: &KubernetesConfig) -> Result<Self, Error> {
        config.validate()?;
        let client_config = config.client_config().await?;
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client_config.default_namespace.clone());
        let client = Client::try_from(client_config)
            .map_err(|e| Error::Config(format!("kubernetes runtime: building the client: {e}")))?;
        Ok(Self::with_client(client, &namespace, config))
    }

    /// A runtime over an existing client, in `namespace`.
    pub fn with_client(client: Client, namespace: &str, config: &KubernetesConfig) -> Self {
        let (deployment_cache, deployment_writer) = reflector::store();
        let (pod_cache, pod_writer) = reflector::store();
        let (changed, _) = watch::channel(0);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let inner = Arc::new(Inner {
            namespace: namespace.to_owned(),
            cluster_domain: config.cluster_domain.clone(),
            catalog: config.catalog(),
            operation_timeout: Duration::from_millis(config.operation_timeout_ms),
            home_volume_size: config.home_volume_size.clone(),
            home_storage_class: config.home_storage_class.clone(),
            deployments: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client.clone(), namespace),
            claims: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client, namespace),
            deployment_cache,
            pod_cache,
            changed,
            events,
            busy: Mutex::default(),
            reported: Mutex::default(),
            seeded: Mutex::new(false),
            watch_failing: Default::default(),
        });
        let tasks = vec![
            tokio::spawn(follow(
                inner.clone(),
                inner.deployments.clone(),
                deployment_writer,
                0,
            )),
            tokio::spawn(follow(inner.clone(), inner.pods.clone(), pod_writer, 1)),
        ];
        Self { inner, tasks }
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }
}

/// Keeps one cache current from its watch, waking waiters and publishing news after
/// every change. Watch errors are retried with kube-runtime's default backoff. Cached
/// objects drop their `managedFields` (never read here, often the largest part of an
/// object). `which` indexes `Inner::watch_failing`.
async fn follow<K>(
    inner: Arc<Inner>,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    which: usize,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let config = watcher::Config::default().labels(SESSION_SELECTOR);
    let mut stream = watcher(api, config)
        .default_backoff()
        .modify(|obj| obj.managed_fields_mut().clear())
        .reflect(writer)
        .boxed();
    while let Some(item) = stream.next().await {
        let failing = item.is_err();
        inner.watch_failing[which].store(failing, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = item {
            tracing::warn!(error = %e, "kubernetes watch failed; retrying");
            continue;
        }
        inner.changed.send_modify(|n| *n = n.wrapping_add(1));
        inner.publish_news();
    }
}

impl Inner {
    fn busy(&self, session: &str) -> BusyGuard<'_> {
        *lock(&self.busy).0.entry(session.to_owned()).or_insert(0) += 1;
        BusyGuard {
            inner: self,
            session: session.to_owned(),
        }
    }

    /// The session's address: its Service's DNS name, with the scheme of its template and,
    /// when the template uses one, the user and per-session password the container checks.
    fn url(&self, session: &str, deployment: &Deployment) -> String {
        let port = self.port_of(deployment);
        let host = format!(
            "{session}.{}.svc.{}:{port}",
            self.namespace, self.cluster_domain
        );
        let Some(template) = self.template_of(deployment) else {
            return format!("http://{host}");
        };
        let password = template.password_env.as_ref().and_then(|var| {
            deployment
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref()?
                .containers
                .first()?
                .env
                .as_ref()?
                .iter()
                .find(|e| &e.name == var)?
                .value
                .clone()
        });
        match password {
            Some(password) => format!(
                "{}://{}:{password}@{host}",
                template.url_scheme, template.url_user
            ),
            None => format!("{}://{host}", template.url_scheme),
        }
    }

    fn fail(&self, e: kube::Error, verb: &str, resource: &str, name: &str) -> RuntimeError {
        api_failure(e, verb, resource, name, &self.namespace)
    }

    fn cached_deployment(&self, session: &str) -> Option<Arc<Deployment>> {
        self.deployment_cache
            .get(&ObjectRef::new(session).within(&self.namespace))
    }

    fn cached_pods(&self, session: &str) -> Vec<Arc<Pod>> {
        self.pod_cache
            .state()
            .into_iter()
            .filter(|p| is_ours(&p.metadata, session))
            .collect()
    }

    fn port_of(&self, deployment: &Deployment) -> u16 {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(DEFAULT_PORT)
    }

    /// A session's state from a Deployment and its pods.
    fn observe(
        &self,
        session: &str,
        deployment: Option<&Deployment>,
        pods: &[&Pod],
    ) -> Observation {
        let Some(deployment) = deployment else {
            return Observation::new(session, SessionState::Stopped);
        };
        if deployment.metadata.deletion_timestamp.is_some() {
            return Observation::new(session, SessionState::Stopped).with_message("being deleted");
        }
        if replicas(deployment) == 0 {
            return Observation::new(session, SessionState::Hibernated);
        }
        let url = self.url(session, deployment);
        match pod_view(pods.iter().copied()) {
            PodView::Ready { pod, ip } => Observation::new(session, SessionState::Running)
                .with_url(url)
                .with_message(match ip {
                    Some(ip) => format!("pod {pod} ({ip})"),
                    None => format!("pod {pod}"),
                }),
            PodView::Failing {
                pod,
                reason,
                message,
            } => Observation::new(session, SessionState::Failed)
                .with_url(url)
                .with_message(format!("pod {pod}: {reason}: {message}")),
            PodView::Pending { pod, detail } => Observation::new(session, SessionState::Starting)
                .with_url(url)
                .with_message(match detail {
                    Some(d) => format!("pod {pod}: {d}"),
                    None => format!("pod {pod} is not ready yet"),
                }),
            PodView::None => Observation::new(session, SessionState::Starting)
                .with_url(url)
                .with_message("no pod yet"),
        }
    }

    fn observe_cached(&self, session: &str) -> Observation {
        let deployment = self.cached_deployment(session);
        let pods = self.cached_pods(session);
        let pods: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
        self.observe(session, deployment.as_deref(), &pods)
    }

    /// Records what an operation reported, so the caches catching up are not news.
    fn settle(&self, session: &str, state: SessionState) {
        let mut reported = lock(&self.reported);
        if state == SessionState::Stopped {
            reported.remove(session);
        } else {
            reported.insert(session.to_owned(), state);
        }
    }

    /// Publishes every session whose cached state moved away from what was last
    /// reported, except sessions an operation is working on.
    fn publish_news(&self) {
        if !self.caches_ready() {
            return;
        }
        let deployments = self.deployment_cache.state();
        let mut current: BTreeMap<String, Observation> = BTreeMap::new();
        for d in &deployments {
            if let Some(session) = session_of(&d.metadata) {
                current.insert(session.to_owned(), self.observe_cached(session));
            }
        }
        let busy = lock(&self.busy);
        let mut reported = lock(&self.reported);
        let mut seeded = lock(&self.seeded);
        if !*seeded {
            // The first complete picture is the inventory `Hello` already carries.
            for (session, obs) in &current {
                reported.insert(session.clone(), obs.state);
            }
            *seeded = true;
            return;
        }
        let mut news = Vec::new();
        for (session, obs) in &current {
            if busy.0.contains_key(session) {
                continue;
            }
            if reported.get(session) != Some(&obs.state) {
                reported.insert(session.clone(), obs.state);
                news.push(obs.clone());
            }
        }
        let gone: Vec<String> = reported
            .keys()
            .filter(|s| !current.contains_key(*s) && !busy.0.contains_key(*s))
            .cloned()
            .collect();
        for session in gone {
            reported.remove(&session);
            news.push(
                Observation::new(&session, SessionState::Stopped).with_message(format!(
                    "deployment {}/{session} was deleted outside StreamSpace",
                    self.namespace
                )),
            );
        }
        drop((busy, reported, seeded));
        for obs in news {
            tracing::info!(session = %obs.session_id, state = %obs.state, message = ?obs.message, "session changed in the cluster");
            // No subscriber is fine: the next heartbeat carries the inventory.
            let _ = self.events.send(obs);
        }
    }

    fn caches_ready(&self) -> bool {
        // A store is ready once its first list has been applied.
        futures_util::FutureExt::now_or_never(self.deployment_cache.wait_until_ready())
            .is_some_and(|r| r.is_ok())
            && futures_util::FutureExt::now_or_never(self.pod_cache.wait_until_ready())
                .is_some_and(|r| r.is_ok())
    }

    /// Re-checks `check` after every cache change until it yields, or `timeout` passes
    /// (`Ok(None)`). Never polls on a timer: the deadline is the only timer.
    async fn wait_until<T, F, Fut>(
        &self,
        timeout: Duration,
        mut check: F,
    ) -> Result<Option<T>, RuntimeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, RuntimeError>>,
    {
        let deadline = Instant::now() + timeout;
        let mut changes = self.changed.subscribe();
        let ready = async {
            self.deployment_cache.wait_until_ready().await.is_ok()
                && self.pod_cache.wait_until_ready().await.is_ok()
        };
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(true) => {}
            Ok(false) => return Err(RuntimeError::retryable("the kubernetes watch stopped")),
            Err(_) => {
                return Err(RuntimeError::retryable(format!(
                    "the kubernetes watches of namespace {} did not sync within {timeout:?}",
                    self.namespace
                )));
            }
        }
        loop {
            // Mark before checking, so a change during the check wakes the next wait.
            changes.borrow_and_update();
            if let Some(found) = check().await? {
                return Ok(Some(found));
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(RuntimeError::retryable("the kubernetes watch stopped"));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    /// Creates `object`, or returns the existing one when it is this session's.
    async fn create_or_get<K>(
        &self,
        api: &Api<K>,
        resource: &str,
        session: &str,
        object: &K,
    ) -> Result<K, RuntimeError>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        for _ in 0..WRITE_ATTEMPTS {
            match api.create(&params, object).await {
                Ok(created) => return Ok(created),
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => return Err(self.fail(e, "create", resource, &name)),
            }
            match api.get_opt(&name).await {
                Ok(Some(existing)) if is_ours(existing.meta(), session) => return Ok(existing),
                Ok(Some(existing)) => {
                    return Err(RuntimeError::permanent(format!(
                        "{resource} {}/{name} already exists and does not belong to session {session} (labels {:?}); refusing to adopt it",
                        self.namespace,
                        existing.meta().labels.clone().unwrap_or_default()
                    )));
                }
                // Deleted between our create and get: create again.
                Ok(None) => {}
                Err(e) => return Err(self.fail(e, "get", resource, &name)),
            }
        }
        Err(RuntimeError::retryable(format!(
            "{resource} {}/{name} kept changing while being created",
            self.namespace
        )))
    }

    /// Deletes the named object if it exists and is this session's; returns its uid.
    async fn delete_if_ours<K>(
        &self,
        api: &Api<K>,
        resource: &str,
        session: &str,
        name: &str,
        propagation: PropagationPolicy,
    ) -> Result<Option<String>, RuntimeError>
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        for _ in 0..WRITE_ATTEMPTS {
            let existing = match api.get_opt(name).await {
                Ok(Some(existing)) => existing,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e, "get", resource, name)),
            };
            if !is_ours(existing.meta(), session) {
                return Err(RuntimeError::permanent(format!(
                    "{resource} {}/{name} does not belong to session {session}; refusing to delete it",
                    self.namespace
                )));
            }
            let uid = existing.meta().uid.clone();
            let params = DeleteParams {
                propagation_policy: Some(propagation.clone()),
                // Only the object we inspected: never a same-named successor.
                preconditions: Some(Preconditions {
                    uid: uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => return Ok(uid),
                Err(e) if status_code(&e) == Some(404) => return Ok(None),
                // The uid precondition failed: it was replaced; look again.
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => return Err(self.fail(e, "delete", resource, name)),
            }
        }
        Err(RuntimeError::retryable(format!(
            "{resource} {}/{name} kept changing while being deleted",
            self.namespace
        )))
    }

    /// Waits until the caches show the Deployment `uid` scaled up with a ready pod.
    async fn wait_ready(
        &self,
        session: &str,
        uid: &str,
        timeout: Duration,
    ) -> Result<Observation, RuntimeError> {
        let found = self
            .wait_until(timeout, || async {
                let seen = self
                    .cached_deployment(session)
                    .is_some_and(|d| d.metadata.uid.as_deref() == Some(uid) && replicas(&d) > 0);
                let obs = self.observe_cached(session);
                Ok((seen && obs.state == SessionState::Running).then_some(obs))
            })
            .await?;
        if let Some(obs) = found {
            return Ok(obs);
        }
        // Fail with the pod's own words, as `kubectl describe` would show them.
        let pods = self.cached_pods(session);
        let (why, hopeless) = match pod_view(pods.iter().map(|p| p.as_ref())) {
            PodView::Failing {
                pod,
                reason,
                message,
            } => {
                let hopeless = HOPELESS_REASONS.contains(&reason.as_str());
                (format!("pod {pod}: {reason}: {message}"), hopeless)
            }
            PodView::Pending { pod, detail } => (
                format!(
                    "pod {pod}: {}",
                    detail.unwrap_or_else(|| "not ready".into())
                ),
                false,
            ),
            PodView::Ready { pod, .. } => (format!("pod {pod} became ready too late"), false),
            PodView::None => ("no pod was created".to_owned(), false),
        };
        let message = format!("session {session} not ready within {timeout:?}: {why}");
        Err(if hopeless {
            RuntimeError::permanent(message)
        } else {
            RuntimeError::retryable(message)
        })
    }

    /// Sets the Deployment's replicas through `/scale`, on the version just read, so a
    /// concurrent change is noticed (409) and the decision re-made on fresh data.
    async fn scale(&self, session: &str, to: i32) -> Result<Deployment, RuntimeError> {
        for _ in 0..WRITE_ATTEMPTS {
            let deployment = match self.deployments.get_opt(session).await {
                Ok(Some(d)) => d,
                Ok(None) => return Err(unknown_session(session)),
                Err(e) => return Err(self.fail(e, "get", "deployments", session)),
            };
            if !is_ours(&deployment.metadata, session) {
                return Err(RuntimeError::permanent(format!(
                    "deployment {}/{session} does not belong to session {session}",
                    self.namespace
                )));
            }
            if deployment.metadata.deletion_timestamp.is_some() {
                return Err(RuntimeError::permanent(format!(
                    "session {session} is being stopped"
                )));
            }
            if replicas(&deployment) == to {
                return Ok(deployment);
            }
            let patch = json!({
                "metadata": {"resourceVersion": deployment.metadata.resource_version},
                "spec": {"replicas": to},
            });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match self
                .deployments
                .patch_scale(session, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let mut scaled = deployment;
                    if let Some(spec) = scaled.spec.as_mut() {
                        spec.replicas = Some(to);
                    }
                    return Ok(scaled);
                }
                Err(e) if status_code(&e) == Some(409) => continue,
                Err(e) if status_code(&e) == Some(404) => return Err(unknown_session(session)),
                Err(e) => return Err(self.fail(e, "patch", "deployments/scale", session)),
            }
        }
        Err(RuntimeError::retryable(format!(
            "deployment {}/{session} kept changing while being scaled",
            self.namespace
        )))
    }

    fn template(&self, name: &str) -> Result<&KubeTemplate, RuntimeError> {
        self.catalog.get(name).ok_or_else(|| {
            RuntimeError::permanent(format!(
                "unknown template {name:?} (this agent has: {})",
                self.catalog.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    fn template_of(&self, deployment: &Deployment) -> Option<&KubeTemplate> {
        let name = deployment
            .metadata
            .annotations
            .as_ref()?
            .get("streamspace.io/template")?;
        self.catalog.get(name)
    }

    fn ready_timeout_of(&self, deployment: &Deployment) -> Duration {
        Duration::from_millis(
            self.template_of(deployment)
                .map_or(DEFAULT_READY_TIMEOUT_MS, |t| t.ready_timeout_ms),
        )
    }

    async fn start(&self, session: &str, spec: &StartSession) -> Result<Observation, RuntimeError> {
        let template = self.template(&spec.template)?;
        if spec.home_volume {
            self.create_or_get(
                &self.claims,
                "persistentvolumeclaims",
                session,
                &self.claim_for(session, spec),
            )
            .await?;
        }
        let wanted = self.deployment_for(session, spec, template);
        let mut deployment = None;
        for _ in 0..WRITE_ATTEMPTS {
            let d = self
                .create_or_get(&self.deployments, "deployments", session, &wanted)
                .await?;
            if d.metadata.deletion_timestamp.is_none() {
                deployment = Some(d);
                break;
            }
            // A stop of this session is still finishing: let it, then start afresh.
            let uid = d.metadata.uid.clone().unwrap_or_default();
            self.wait_deployment_gone(session, &uid).await?;
        }
        let deployment = deployment.ok_or_else(|| {
            RuntimeError::retryable(format!(
                "deployment {}/{session} kept being deleted",
                self.namespace
            ))
        })?;
        self.create_or_get(
            &self.services,
            "services",
            session,
            &self.service_for(session, spec, template, &deployment),
        )
        .await?;
        let uid = deployment.metadata.uid.clone().unwrap_or_default();
        if replicas(&deployment) == 0 {
            // Create-or-get: a hibernated session is returned as it is.
            self.wait_until(self.operation_timeout, || async {
                Ok(self
                    .cached_deployment(session)
                    .filter(|d| d.metadata.uid.as_deref() == Some(uid.as_str()))
                    .map(|_| ()))
            })
            .await?;
            return Ok(Observation::new(session, SessionState::Hibernated));
        }
        self.wait_ready(
            session,
            &uid,
            Duration::from_millis(template.ready_timeout_ms),
        )
        .await
    }

    /// Waits until the Deployment `uid` is gone from the API and from the cache.
    async fn wait_deployment_gone(&self, session: &str, uid: &str) -> Result<(), RuntimeError> {
        let gone = self
            .wait_until(self.operation_timeout, || async {
                let cached = self
                    .cached_deployment(session)
                    .is_some_and(|d| d.metadata.uid.as_deref() == Some(uid));
                if cached {
                    return Ok(None);
                }
                match self.deployments.get_opt(session).await {
                    Ok(Some(d)) if d.metadata.uid.as_deref() == Some(uid) => Ok(None),
                    Ok(_) => Ok(Some(())),
                    Err(e) => Err(self.fail(e, "get", "deployments", session)),
                }
            })
            .await?;
        gone.ok_or_else(|| {
            RuntimeError::retryable(format!(
                "deployment {}/{session} still exists {:?} after its deletion",
                self.namespace, self.operation_timeout
            ))
        })
    }

    async fn stop(&self, session: &str, spec: &StopSession) -> Result<Observation, RuntimeError> {
        // The Service first: it is the Deployment's dependent, so deleting the Deployment
        // first would leave its removal to the garbage collector's timing, and whether
        // this agent ever deletes a Service would depend on a race.
        self.delete_if_ours(
            &self.services,
            "services",
            session,
            session,
            PropagationPolicy::Foreground,
        )
        .await?;
        let deployment_uid = self
            .delete_if_ours(
                &self.deployments,
                "deployments",
                session,
                session,
                PropagationPolicy::Foreground,
            )
            .await?;
        let claim = format!("{session}-home");
        let claim_uid = if spec.delete_home {
            self.delete_if_ours(
                &self.claims,
                "persistentvolumeclaims",
                session,
                &claim,
                PropagationPolicy::Background,
            )
            .await?
        } else {
            None
        };
        if let Some(uid) = deployment_uid {
            self.wait_deployment_gone(session, &uid).await?;
        }
        if let Some(uid) = claim_uid {
            // A claim in use is held by its protection finalizer until its pod is gone.
            let gone = self
                .wait_until(self.operation_timeout, || async {
                    match self.claims.get_opt(&claim).await {
                        Ok(Some(c)) if c.metadata.uid.as_deref() == Some(uid.as_str()) => Ok(None),
                        Ok(_) => Ok(Some(())),
                        Err(e) => Err(self.fail(e, "get", "persistentvolumeclaims", &claim)),
                    }
                })
                .await?;
            if gone.is_none() {
                return Err(RuntimeError::retryable(format!(
                    "persistentvolumeclaim {}/{claim} still exists after its deletion",
                    self.namespace
                )));
            }
        }
        Ok(Observation::new(session, SessionState::Stopped))
    }

    async fn hibernate(&self, session: &str) -> Result<Observation, RuntimeError> {
        let deployment = self.scale(session, 0).await?;
        let uid = deployment.metadata.uid.clone().unwrap_or_default();
        // Hibernated means consuming nothing: wait until no pod of the session runs.
        let done = self
            .wait_until(self.operation_timeout, || async {
                let scaled = self.cached_deployment(session).is_some_and(|d| {
                    d.metadata.uid.as_deref() == Some(uid.as_str()) && replicas(&d) == 0
                });
                let running = self
                    .cached_pods(session)
                    .iter()
                    .any(|p| !matches!(pod_phase(p), "Failed" | "Succeeded"));
                Ok((scaled && !running).then_some(()))
            })
            .await?;
        match done {
            Some(()) => Ok(Observation::new(session, SessionState::Hibernated)),
            None => Err(RuntimeError::retryable(format!(
                "session {session}'s pods still run {:?} after scaling to zero",
                self.operation_timeout
            ))),
        }
    }

    async fn wake(&self, session: &str) -> Result<Observation, RuntimeError> {
        let deployment = self.scale(session, 1).await?;
        let uid = deployment.metadata.uid.clone().unwrap_or_default();
        self.wait_ready(session, &uid, self.ready_timeout_of(&deployment))
            .await
    }

    /// The sessions in the cluster: from the watch caches while both are synced and
    /// healthy (heartbeats cost the API server nothing), else from the API server.
    async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        let watches_ok = !self
            .watch_failing
            .iter()
            .any(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        if watches_ok && self.caches_ready() {
            let pods = self.pod_cache.state();
            return Ok(self
                .deployment_cache
                .state()
                .iter()
                .filter_map(|d| {
                    let session = session_of(&d.metadata)?;
                    let own: Vec<&Pod> = pods
                        .iter()
                        .map(|p| p.as_ref())
                        .filter(|p| is_ours(&p.metadata, session))
                        .collect();
                    Some(self.observe(session, Some(d), &own))
                })
                .collect());
        }
        let params = ListParams::default().labels(SESSION_SELECTOR);
        let deployments = self
            .deployments
            .list(&params)
            .await
            .map_err(|e| self.fail(e, "list", "deployments", SESSION_SELECTOR))?;
        let pods = self
            .pods
            .list(&params)
            .await
            .map_err(|e| self.fail(e, "list", "pods", SESSION_SELECTOR))?;
        Ok(deployments
            .items
            .iter()
            .filter_map(|d| {
                let session = session_of(&d.metadata)?;
                let own: Vec<&Pod> = pods
                    .items
                    .iter()
                    .filter(|p| is_ours(&p.metadata, session))
                    .collect();
                Some(self.observe(session, Some(d), &own))
            })
            .collect())
    }
}

fn unknown_session(session: &str) -> RuntimeError {
    RuntimeError::permanent(format!("no session {session} runs on this agent"))
}

#[async_trait]
impl SessionRuntime for KubernetesRuntime {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn capabilities(&self) -> Vec<String> {
        self.inner
            .catalog
            .keys()
            .map(|t| format!("template:{t}"))
            .collect()
    }

    async fn start(
        &self,
        session_id: &str,
        spec: &StartSession,
    ) -> Result<Observation, RuntimeError> {
        validate_session_id(session_id)?;
        let _busy = self.inner.busy(session_id);
        let result = self.inner.start(session_id, spec).await;
        let state = match &result {
            Ok(obs) => obs.state,
            Err(_) => self.inner.observe_cached(session_id).state,
        };
        self.inner.settle(session_id, state);
        result
    }

    async fn stop(
        &self,
        session_id: &str,
        spec: &StopSession,
    ) -> Result<Observation, RuntimeError> {
        validate_session_id(session_id)?;
        let _busy = self.inner.busy(session_id);
        let result = self.inner.stop(session_id, spec).await;
        if let Ok(obs) = &result {
            self.inner.settle(session_id, obs.state);
        }
        result
    }

    async fn hibernate(
        &self,
        session_id: &str,
        _spec: &HibernateSession,
    ) -> Result<Observation, RuntimeError> {
        validate_session_id(session_id)?;
        let _busy = self.inner.busy(session_id);
        let result = self.inner.hibernate(session_id).await;
        if let Ok(obs) = &result {
            self.inner.settle(session_id, obs.state);
        }
        result
    }

    async fn wake(
        &self,
        session_id: &str,
        _spec: &WakeSession,
    ) -> Result<Observation, RuntimeError> {
        validate_session_id(session_id)?;
        let _busy = self.inner.busy(session_id);
        let result = self.inner.wake(session_id).await;
        let state = match &result {
            Ok(obs) => obs.state,
            Err(_) => self.inner.observe_cached(session_id).state,
        };
        self.inner.settle(session_id, state);
        result
    }

    async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        self.inner.list().await
    }

    fn subscribe(&self) -> broadcast::Receiver<Observation> {
        self.inner.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_must_name_kubernetes_objects() {
        assert!(validate_session_id("admin-firefox-browser-1a2b3c4d").is_ok());
        for bad in ["", "Upper", "1abc", "a_b", "trailing-", &"a".repeat(59)] {
            assert!(validate_session_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_values_are_sanitised() {
        assert_eq!(label_value("alice@example.com"), "alice-example.com");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"a".repeat(80)).len(), 63);
        assert_eq!(label_value(""), "");
    }

    #[test]
    fn config_defaults_and_catalog() {
        let config = KubernetesConfig::default();
        config.validate().unwrap();
        let catalog = config.catalog();
        assert_eq!(catalog["firefox-browser"].memory, "512Mi");
        assert_eq!(catalog["firefox-browser"].cpu, "250m");
        let bad = KubernetesConfig {
            namespace: Some("Bad_NS".into()),
            ..KubernetesConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
