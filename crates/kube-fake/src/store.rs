//! The object store: every object by `(resource, namespace, name)`, one global
//! `resourceVersion` counter, and the event history that watches replay and follow.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::files::FileStore;
use crate::resource::ResourceKind;
use crate::{AuditEntry, FakeConfig as Settings};

/// Where an object lives: `(resource, namespace, name)`. Ordered like etcd keys, so lists
/// come back sorted by namespace and name as a real server returns them.
pub(crate) type Key = (ResourceKind, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: ResourceKind,
    pub namespace: String,
    pub event_type: EventType,
    pub object: Value,
    /// The object before a `MODIFIED` change, so a watch with a selector can report an
    /// object entering or leaving the selection as `ADDED` or `DELETED`, as the real
    /// watch cache does.
    pub previous: Option<Value>,
}

#[derive(Debug)]
pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    /// The last `resourceVersion` handed out; every write takes the next one.
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    events: broadcast::Sender<Arc<Event>>,
    pub audit: Vec<AuditEntry>,
    pub settings: Settings,
    /// How many more non-watch requests are answered 429.
    pub throttle: u32,
    /// Contents of volumes and container filesystems (test hooks).
    pub files: FileStore,
    /// When each pending claim was first seen, by uid: it binds `pvc_bind_delay` later.
    pub claims_seen: HashMap<String, Instant>,
    /// When each Deployment (by uid) last made rollout progress, for its progress
    /// deadline; kept here rather than read from `lastUpdateTime`, which has only
    /// second precision.
    pub progress_marks: HashMap<String, Instant>,
    next_pod_ip: u32,
    next_cluster_ip: u32,
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn key_of(kind: ResourceKind, object: &Value) -> Key {
    let meta = |f: &str| {
        object
            .pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (kind, meta("namespace"), meta("name"))
}

pub(crate) fn uid_of(object: &Value) -> &str {
    object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn rv_of(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The object without the fields a write always changes, to tell a no-op write apart.
fn comparable(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    copy
}

impl Store {
    pub fn new(settings: Settings, history_limit: usize) -> Self {
        // Capacity bounds how far a slow watch may fall behind before it is told its
        // history expired (410), which is what the real watch cache does too.
        let (events, _) = broadcast::channel(4096);
        Self {
            objects: BTreeMap::new(),
            // Real clusters never start at 0, and clients must treat versions as opaque.
            rv: 1000,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            events,
            audit: Vec::new(),
            settings,
            throttle: 0,
            files: FileStore::default(),
            claims_seen: HashMap::new(),
            progress_marks: HashMap::new(),
            next_pod_ip: 10,
            next_cluster_ip: 10,
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    /// The oldest version a watch may resume after without missing an event.
    pub fn oldest_resumable_rv(&self) -> u64 {
        self.history.front().map_or(self.rv, |e| e.rv - 1)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Events after `rv` still in the history, oldest first.
    pub fn history_after(&self, rv: u64) -> impl Iterator<Item = &Arc<Event>> {
        self.history.iter().filter(move |e| e.rv > rv)
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    pub fn list(&self, kind: ResourceKind, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v)
            .collect()
    }

    pub fn keys(&self, kind: ResourceKind) -> Vec<Key> {
        self.objects
            .keys()
            .filter(|(k, _, _)| *k == kind)
            .cloned()
            .collect()
    }

    /// Every object of a modelled kind whose `metadata.uid` is `uid`.
    pub fn uid_exists(&self, uid: &str) -> bool {
        self.objects.values().any(|o| uid_of(o) == uid)
    }

    /// Objects that list `uid` among their owner references.
    pub fn dependents_of(&self, uid: &str) -> Vec<Key> {
        self.objects
            .iter()
            .filter(|(_, o)| owner_uids(o).any(|u| u == uid))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, kind: ResourceKind, ty: EventType, object: Value, previous: Option<Value>) {
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            namespace: object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            event_type: ty,
            object,
            previous,
        });
        if self.history.len() >= self.history_limit {
            self.history.pop_front();
        }
        self.history.push_back(event.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    pub fn allocate_cluster_ip(&mut self) -> String {
        let n = self.next_cluster_ip;
        self.next_cluster_ip += 1;
        format!("10.96.{}.{}", n / 250, n % 250 + 1)
    }

    pub fn allocate_pod_ip(&mut self) -> String {
        let n = self.next_pod_ip;
        self.next_pod_ip += 1;
        format!("10.244.{}.{}", n / 250, n % 250 + 1)
    }

    /// Stores a new object (already stamped with uid and timestamps) and announces it.
    pub fn insert(&mut self, kind: ResourceKind, mut object: Value) -> Value {
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(kind, &object);
        self.objects.insert(key, object.clone());
        self.emit(kind, EventType::Added, object.clone(), None);
        object
    }

    /// Stores a changed object. A write that changes nothing keeps the old version and
    /// emits no event, as the real server does. An object marked for deletion whose last
    /// finalizer is gone is removed.
    pub fn update(&mut self, kind: ResourceKind, mut object: Value) -> Value {
        let key = key_of(kind, &object);
        let Some(old) = self.objects.get(&key).cloned() else {
            return self.insert(kind, object);
        };
        if comparable(&old) == comparable(&object) {
            return old;
        }
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), object.clone());
        self.emit(kind, EventType::Modified, object.clone(), Some(old));
        let finalizers_left = object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if object.pointer("/metadata/deletionTimestamp").is_some() && !finalizers_left {
            return self.remove(&key).unwrap_or(object);
        }
        object
    }

    /// Removes an object for good and announces it with a fresh version.
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(key.0, EventType::Deleted, object.clone(), None);
        Some(object)
    }
}

/// The uids an object names in `metadata.ownerReferences`.
pub(crate) fn owner_uids(object: &Value) -> impl Iterator<Item = &str> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("uid").and_then(Value::as_str))
}
