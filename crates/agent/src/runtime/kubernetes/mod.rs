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
    Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions, PropagationPolicy,
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
mod home;
mod objects;
mod observe;
mod operations;
mod repair;
mod waits;
mod writes;

use observe::*;
use operations::*;
use writes::*;

pub use config::*;

/// Shown as the writer of every object (`metadata.managedFields`).
const FIELD_MANAGER: &str = "streamspace-agent";
/// Events buffered for slow subscribers before they lag (and fall back to heartbeats).
const EVENT_BUFFER: usize = 256;
/// Attempts for a write that races with another writer (409 on create or update).
const WRITE_ATTEMPTS: usize = 5;
/// Container waiting reasons that say the pod is failing (reported as `failed`).
const TROUBLE_REASONS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CrashLoopBackOff",
];
/// Of those, the ones that will not cure themselves: a start that meets one fails at
/// once and is not retried until someone fixes the template or the image. A failed
/// pull is not among them: registries throttle and blip, so a start keeps trying it
/// until its ready timeout and then fails retryably.
const PERMANENT_REASONS: [&str; 4] = [
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CrashLoopBackOff",
];
/// On a Deployment: the JSON of the `StartSession` it was made from, so a wake can
/// re-apply it from the current template.
const ANNOTATION_START_SPEC: &str = "streamspace.io/start-spec";
/// On a Deployment a failed start scaled to zero: why it failed.
const ANNOTATION_FAILED: &str = "streamspace.io/failed";
/// On a retained home volume: when (RFC 3339) the agent may delete it.
const ANNOTATION_DELETE_AFTER: &str = "streamspace.io/delete-after";

/// RFC 1123 label: what a namespace, and (starting with a letter) a Service name, must be.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what most object names (a Secret's, for one) must be.
fn is_dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && !part.ends_with('-')
        })
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
    service_cache: Store<Service>,
    claim_cache: Store<PersistentVolumeClaim>,
    /// How long a stopped session's home volume is kept (zero: deleted with it).
    home_retention: Duration,
    /// Sessions whose Service a repair task is re-applying.
    repairing: Mutex<std::collections::HashSet<String>>,
    /// Services re-applied after drift, for tests and logs.
    services_repaired: std::sync::atomic::AtomicU64,
    /// Bumped after every cache change; waiters re-check when it moves.
    changed: watch::Sender<u64>,
    events: broadcast::Sender<Observation>,
    busy: Mutex<Busy>,
    /// The state each known session was last reported in (by an operation's result or
    /// an event). A cache change that moves a session away from it is news.
    reported: Mutex<HashMap<String, SessionState>>,
    /// Whether `reported` has been seeded from the first complete caches.
    seeded: Mutex<bool>,
    /// Per watch (Deployments, Pods, Services, claims): whether its last event was an
    /// error. While one is failing its cache may be stale, so inventory asks the API
    /// server instead and drift is not repaired.
    watch_failing: [std::sync::atomic::AtomicBool; 4],
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
        let (service_cache, service_writer) = reflector::store();
        let (claim_cache, claim_writer) = reflector::store();
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
            service_cache,
            claim_cache,
            home_retention: Duration::from_secs(config.home_retention_secs),
            repairing: Mutex::default(),
            services_repaired: Default::default(),
            changed,
            events,
            busy: Mutex::default(),
            reported: Mutex::default(),
            seeded: Mutex::new(false),
            watch_failing: Default::default(),
        });
        let mut tasks = vec![
            tokio::spawn(follow(
                inner.clone(),
                inner.deployments.clone(),
                deployment_writer,
                0,
            )),
            tokio::spawn(follow(inner.clone(), inner.pods.clone(), pod_writer, 1)),
            tokio::spawn(follow(
                inner.clone(),
                inner.services.clone(),
                service_writer,
                2,
            )),
            tokio::spawn(follow(inner.clone(), inner.claims.clone(), claim_writer, 3)),
        ];
        if !inner.home_retention.is_zero() {
            tasks.push(tokio::spawn(home::sweep_loop(inner.clone())));
        }
        Self { inner, tasks }
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// How many times a session's Service was found missing or changed and applied again.
    pub fn services_repaired(&self) -> u64 {
        self.inner
            .services_repaired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes the retained home volumes whose retention has ended now, rather than at
    /// the next periodic sweep; returns how many.
    pub async fn sweep_homes(&self) -> usize {
        self.inner.sweep_homes().await
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
        inner.repair_drift();
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
        assert_eq!(catalog["firefox-browser"].memory, "2Gi");
        assert_eq!(catalog["firefox-browser"].cpu, "1");
        let bad = KubernetesConfig {
            namespace: Some("Bad_NS".into()),
            ..KubernetesConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
