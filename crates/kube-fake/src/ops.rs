//! The API verbs — create, replace, patch, delete, and the `scale` and `status`
//! subresources — with the API server's preconditions, defaulting and answers.

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission;
use crate::apply::{self, Writer};
use crate::fields::FieldSet;
use crate::patch::{self, PatchType};
use crate::resource::ResourceKind;
use crate::status::{self, ApiError};
use crate::store::{Key, Store, now, rv_of, uid_of};
use crate::validate;

/// The finalizer foreground deletion parks an owner behind until its dependents are gone.
pub(crate) const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// How a client write is made: by whom (for `managedFields`) and whether for real.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Write<'a> {
    pub writer: Writer<'a>,
    pub dry_run: bool,
}

/// The subresources served for the modelled kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subresource {
    Status,
    Scale,
}

impl Subresource {
    pub fn parse(kind: ResourceKind, s: &str) -> Option<Self> {
        match (kind, s) {
            (_, "status") => Some(Subresource::Status),
            (ResourceKind::Deployment, "scale") => Some(Subresource::Scale),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
        }
    }
}

fn random_suffix(len: usize) -> String {
    // The alphabet the API server uses for generated names: no vowels, no look-alikes.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(len)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn name_of(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn initial_status(kind: ResourceKind) -> Value {
    match kind {
        ResourceKind::Deployment => json!({}),
        ResourceKind::Service => json!({"loadBalancer": {}}),
        ResourceKind::PersistentVolumeClaim => json!({"phase": "Pending"}),
        ResourceKind::Pod => json!({"phase": "Pending", "qosClass": "BestEffort"}),
        ResourceKind::ResourceQuota => json!({}),
    }
}

/// Create: the object gets its namespace, uid, creation time, first generation, defaults
/// and the status a fresh object has, whatever the client sent as status; then the
/// admission chain decides.
pub(crate) fn create(
    store: &mut Store,
    kind: ResourceKind,
    namespace: &str,
    object: Value,
    write: &Write<'_>,
) -> Result<Value, ApiError> {
    create_with(store, kind, namespace, object, write, None)
}

/// Create, with the applied configuration's field set when a server-side apply creates.
fn create_with(
    store: &mut Store,
    kind: ResourceKind,
    namespace: &str,
    mut object: Value,
    write: &Write<'_>,
    applied: Option<FieldSet>,
) -> Result<Value, ApiError> {
    validate::check_type(kind, &object)?;
    if let Some(ns) = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        && !ns.is_empty()
        && ns != namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if rv_of(&object).is_some() {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let meta = object
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
    {
        let generated = format!("{prefix}{}", random_suffix(5));
        meta.insert("name".into(), json!(generated));
    }
    let causes = validate::validate(kind, &object, None);
    let name = name_of(&object).to_owned();
    if !causes.is_empty() {
        return Err(ApiError::invalid_object(kind, &name, causes));
    }
    let key: Key = (kind, namespace.to_owned(), name.clone());
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(kind, &name));
    }
    validate::apply_defaults(kind, &mut object);
    stamp_new(store, kind, namespace, &mut object);
    admission::admit_create(store, kind, namespace, &mut object)?;
    apply::record(None, &mut object, &write.writer, applied);
    if write.dry_run {
        return Ok(object);
    }
    Ok(store.insert(kind, object))
}

/// Server-set metadata and status of a new object.
pub(crate) fn stamp_new(
    store: &mut Store,
    kind: ResourceKind,
    namespace: &str,
    object: &mut Value,
) {
    let meta = &mut object["metadata"];
    meta["namespace"] = json!(namespace);
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = json!(now());
    if let Some(m) = meta.as_object_mut() {
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("managedFields");
        m.remove("generation");
    }
    if kind == ResourceKind::Deployment {
        meta["generation"] = json!(1);
    }
    let mut status = initial_status(kind);
    if kind == ResourceKind::Pod
        && let Some(existing) = object.get("status").and_then(Value::as_object)
    {
        // Pods made by the built-in controller arrive with their first status.
        status = Value::Object(existing.clone());
    }
    object["status"] = status;
    if kind == ResourceKind::Service {
        let spec = &mut object["spec"];
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP");
        if ty != "ExternalName"
            && spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            let ip = store.allocate_cluster_ip();
            spec["clusterIP"] = json!(ip);
        }
        if let Some(ip) = spec.get("clusterIP").cloned() {
            spec["clusterIPs"] = json!([ip]);
        }
    }
}

fn check_rv(kind: ResourceKind, name: &str, new: &Value, old: &Value) -> Result<(), ApiError> {
    match rv_of(new) {
        Some(rv) if Some(rv) != rv_of(old) => Err(ApiError::stale(kind, name)),
        _ => Ok(()),
    }
}

/// The one update path of every verb: precondition on `resourceVersion`, server-owned
/// metadata kept, status or spec kept depending on the endpoint, validation, defaults,
/// generation bumped when the spec changed, `managedFields` brought up to date.
pub(crate) fn write_update(
    store: &mut Store,
    kind: ResourceKind,
    old: &Value,
    mut new: Value,
    write: &Write<'_>,
    applied: Option<FieldSet>,
) -> Result<Value, ApiError> {
    let status_only = write.writer.subresource == Some("status");
    let name = name_of(old).to_owned();
    validate::check_type(kind, &new)?;
    if name_of(&new) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&new)
        )));
    }
    check_rv(kind, &name, &new, old)?;
    if status_only {
        let status = new.get("status").cloned().unwrap_or(Value::Null);
        new = old.clone();
        new["status"] = status;
    } else {
        // The main resource ignores status; only `/status` writes it.
        new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
        let causes = validate::validate(kind, &new, Some(old));
        if !causes.is_empty() {
            return Err(ApiError::invalid_object(kind, &name, causes));
        }
        validate::apply_defaults(kind, &mut new);
    }
    new["apiVersion"] = json!(kind.api_version());
    new["kind"] = json!(kind.kind());
    for field in [
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if kind == ResourceKind::Deployment && new.get("spec") != old.get("spec") {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    // Client-sent managedFields are ignored; the server keeps its own.
    apply::record(Some(old), &mut new, &write.writer, applied);
    if write.dry_run {
        return Ok(new);
    }
    Ok(store.update(kind, new))
}

pub(crate) fn get<'a>(store: &'a Store, key: &Key) -> Result<&'a Value, ApiError> {
    store
        .get(key)
        .ok_or_else(|| ApiError::not_found(key.0, &key.2))
}

/// The `autoscaling/v1` `Scale` view of a Deployment.
pub(crate) fn scale_of(deployment: &Value) -> Value {
    let selector = deployment
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = &deployment["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": { "replicas": deployment.pointer("/spec/replicas").cloned().unwrap_or(json!(1)) },
        "status": {
            "replicas": deployment.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

/// Writes a `Scale` back to its Deployment.
fn write_scale(
    store: &mut Store,
    key: &Key,
    scale: &Value,
    write: &Write<'_>,
) -> Result<Value, ApiError> {
    let old = get(store, key)?.clone();
    check_rv(key.0, &key.2, scale, &old)?;
    let replicas = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
    match replicas.as_i64() {
        Some(r) if r >= 0 => {}
        _ => {
            return Err(ApiError::invalid(
                "Scale.autoscaling",
                &key.2,
                "autoscaling",
                vec![status::Cause::invalid(
                    "spec.replicas",
                    &replicas,
                    "must be greater than or equal to 0",
                )],
            ));
        }
    }
    let mut new = old.clone();
    new["spec"]["replicas"] = replicas;
    let updated = write_update(store, key.0, &old, new, write, None)?;
    Ok(scale_of(&updated))
}

pub(crate) fn replace(
    store: &mut Store,
    key: &Key,
    sub: Option<Subresource>,
    body: Value,
    write: &Write<'_>,
) -> Result<Value, ApiError> {
    if sub == Some(Subresource::Scale) {
        return write_scale(store, key, &body, write);
    }
    let old = get(store, key)?.clone();
    write_update(store, key.0, &old, body, write, None)
}

/// Patch; `Ok((201, …))` when a server-side apply created the object.
pub(crate) fn patch(
    store: &mut Store,
    key: &Key,
    sub: Option<Subresource>,
    ty: PatchType,
    body: &[u8],
    write: &Write<'_>,
) -> Result<(StatusCode, Value), ApiError> {
    if ty == PatchType::Apply && sub.is_none() {
        return server_side_apply(store, key, body, write);
    }
    let old = get(store, key)?.clone();
    if sub == Some(Subresource::Scale) {
        let scale = patch::apply(ty, &scale_of(&old), body)?;
        return write_scale(store, key, &scale, write).map(|s| (StatusCode::OK, s));
    }
    let mut new = patch::apply(ty, &old, body)?;
    keep_version_unless_given(&mut new, &old);
    write_update(store, key.0, &old, new, write, None).map(|o| (StatusCode::OK, o))
}

/// A patch that does not mention `resourceVersion` applies to whatever is stored; one
/// that does is a precondition, checked by the update path.
fn keep_version_unless_given(new: &mut Value, old: &Value) {
    if rv_of(new) == rv_of(old) || new.pointer("/metadata/resourceVersion").is_none() {
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    }
}

/// Server-side apply: creates the object when absent (201), otherwise drops what the
/// manager no longer applies and merges the rest (see [`apply`]).
fn server_side_apply(
    store: &mut Store,
    key: &Key,
    body: &[u8],
    write: &Write<'_>,
) -> Result<(StatusCode, Value), ApiError> {
    let config: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    if !config.is_object() {
        return Err(ApiError::bad_request("patch must be a JSON object"));
    }
    validate::check_type(key.0, &config)?;
    if let Some(name) = config.pointer("/metadata/name").and_then(Value::as_str)
        && name != key.2
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.2
        )));
    }
    let manager = write.writer.manager;
    match store.get(key).cloned() {
        None => {
            let (mut object, applied) = apply::apply(&json!({}), &config, manager);
            object["metadata"]["name"] = json!(key.2);
            create_with(store, key.0, &key.1, object, write, Some(applied))
                .map(|o| (StatusCode::CREATED, o))
        }
        Some(old) => {
            let (mut new, applied) = apply::apply(&old, &config, manager);
            keep_version_unless_given(&mut new, &old);
            write_update(store, key.0, &old, new, write, Some(applied)).map(|o| (StatusCode::OK, o))
        }
    }
}

/// `DeleteOptions`, from the body kube-rs sends and/or the query string.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteOptions {
    #[serde(default)]
    pub propagation_policy: Option<String>,
    #[serde(default)]
    pub orphan_dependents: Option<bool>,
    #[serde(default)]
    pub preconditions: Option<Preconditions>,
    #[serde(default)]
    pub dry_run: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Foreground,
    Background,
    Orphan,
}

impl DeleteOptions {
    pub fn propagation(&self) -> Result<Propagation, ApiError> {
        match (self.propagation_policy.as_deref(), self.orphan_dependents) {
            (Some("Foreground"), _) => Ok(Propagation::Foreground),
            (Some("Background"), _) => Ok(Propagation::Background),
            (Some("Orphan"), _) | (None, Some(true)) => Ok(Propagation::Orphan),
            // apps/v1 and core/v1 both default to deleting dependents in the background.
            (None, _) => Ok(Propagation::Background),
            (Some(other), _) => Err(ApiError::invalid(
                "DeleteOptions",
                "",
                "",
                vec![status::Cause::not_supported(
                    "propagationPolicy",
                    &json!(other),
                    &["Foreground", "Background", "Orphan"],
                )],
            )),
        }
    }
}

/// Delete with preconditions and propagation. Returns the status code and body the API
/// server answers: the object while its deletion is pending (202), the removed Pod, or
/// a `Success` status for the other kinds.
pub(crate) fn delete(
    store: &mut Store,
    key: &Key,
    options: &DeleteOptions,
) -> Result<(StatusCode, Value), ApiError> {
    let (kind, _, name) = key;
    let object = get(store, key)?.clone();
    let policy = options.propagation()?;
    if let Some(pre) = &options.preconditions {
        if let Some(uid) = &pre.uid
            && uid != uid_of(&object)
        {
            return Err(ApiError::conflict(
                *kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    uid_of(&object)
                ),
            ));
        }
        if let Some(rv) = &pre.resource_version
            && Some(rv.as_str()) != rv_of(&object)
        {
            return Err(ApiError::conflict(
                *kind,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    rv_of(&object).unwrap_or_default()
                ),
            ));
        }
    }
    if !options.dry_run.is_empty() {
        return Ok((StatusCode::OK, object));
    }
    if object.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok((StatusCode::ACCEPTED, object));
    }
    Ok(delete_with(store, key, policy))
}

/// The deletion itself, shared by the API, the garbage collector and test hooks.
pub(crate) fn delete_with(
    store: &mut Store,
    key: &Key,
    policy: Propagation,
) -> (StatusCode, Value) {
    let Some(object) = store.get(key).cloned() else {
        return (StatusCode::NOT_FOUND, Value::Null);
    };
    let uid = uid_of(&object).to_owned();
    let mut finalizers: Vec<Value> = object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match policy {
        Propagation::Orphan => {
            for dep_key in store.dependents_of(&uid) {
                if let Some(dep) = store.get(&dep_key).cloned() {
                    let mut dep = dep;
                    if let Some(refs) = dep["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(&uid));
                    }
                    store.update(dep_key.0, dep);
                }
            }
        }
        // Like the real server, foreground deletion always parks the owner behind the
        // finalizer; the garbage collector removes it once no dependent is left.
        Propagation::Foreground => finalizers.push(json!(FOREGROUND_FINALIZER)),
        Propagation::Background => {}
    }
    if finalizers.is_empty() {
        let removed = store.remove(key).unwrap_or(Value::Null);
        let body = match key.0 {
            ResourceKind::Pod => removed,
            kind => status::success(kind, &key.2, &uid),
        };
        return (StatusCode::OK, body);
    }
    let mut marked = object;
    marked["metadata"]["deletionTimestamp"] = json!(now());
    marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    marked["metadata"]["finalizers"] = Value::Array(finalizers);
    (StatusCode::ACCEPTED, store.update(key.0, marked))
}
