//! Claims: the volume binder (one default storage class that provisions
//! `pvc_bind_delay` after a claim appears), the PVC protection controller (a claim being
//! deleted goes only once no scheduled, unfinished pod mounts it), and what the
//! scheduler says about a pod whose claims are not ready.

use serde_json::{Value, json};

use super::Reconciled;
use crate::admission::PVC_PROTECTION_FINALIZER;
use crate::resource::ResourceKind;
use crate::store::{Store, uid_of};

/// The claims a pod's volumes name, in volume order.
fn claims_of(pod: &Value) -> Vec<&str> {
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.pointer("/persistentVolumeClaim/claimName")?.as_str())
        .collect()
}

/// Binds pending claims once they have waited `pvc_bind_delay`; asks to be woken when
/// the next one is due.
pub(super) fn bind_claims(store: &mut Store, out: &mut Reconciled) -> bool {
    let mut changed = false;
    let now = tokio::time::Instant::now();
    let delay = store.settings.pvc_bind_delay;
    let mut pending = Vec::new();
    for key in store.keys(ResourceKind::PersistentVolumeClaim) {
        let Some(pvc) = store.get(&key).cloned() else {
            continue;
        };
        if pvc.pointer("/status/phase").and_then(Value::as_str) != Some("Pending") {
            continue;
        }
        let uid = uid_of(&pvc).to_owned();
        let due = *store.claims_seen.entry(uid.clone()).or_insert(now) + delay;
        if due > now {
            out.wake_at(due);
            pending.push(uid);
            continue;
        }
        let mut bound = pvc.clone();
        bound["spec"]["volumeName"] = json!(format!("pvc-{uid}"));
        bound["status"] = json!({
            "phase": "Bound",
            "accessModes": pvc.pointer("/spec/accessModes").cloned().unwrap_or(json!([])),
            "capacity": { "storage": pvc.pointer("/spec/resources/requests/storage").cloned().unwrap_or(Value::Null) },
        });
        store.update(key.0, bound);
        changed = true;
    }
    store.claims_seen.retain(|uid, _| pending.contains(uid));
    changed
}

/// Whether a pod keeps a claim in use: it was scheduled and has not finished.
fn mounts(pod: &Value, claim: &str) -> bool {
    let scheduled = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    scheduled
        && !matches!(phase, Some("Failed") | Some("Succeeded"))
        && claims_of(pod).contains(&claim)
}

/// The PVC protection controller: lets a claim being deleted go once no pod uses it.
pub(super) fn release_claims(store: &mut Store) -> bool {
    let mut changed = false;
    for key in store.keys(ResourceKind::PersistentVolumeClaim) {
        let Some(pvc) = store.get(&key).cloned() else {
            continue;
        };
        let protected = pvc
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x == PVC_PROTECTION_FINALIZER));
        if pvc.pointer("/metadata/deletionTimestamp").is_none() || !protected {
            continue;
        }
        let in_use = store
            .list(ResourceKind::Pod, Some(&key.1))
            .into_iter()
            .any(|p| mounts(p, &key.2));
        if in_use {
            continue;
        }
        let mut released = pvc;
        if let Some(f) = released["metadata"]["finalizers"].as_array_mut() {
            f.retain(|x| x != PVC_PROTECTION_FINALIZER);
        }
        store.update(key.0, released);
        changed = true;
    }
    changed
}

/// Why the scheduler cannot place the pod yet, in its words; `None` when its claims
/// are all bound.
pub(super) fn unschedulable_reason(store: &Store, pod: &Value) -> Option<String> {
    let namespace = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut unbound = false;
    for claim in claims_of(pod) {
        let key = (
            ResourceKind::PersistentVolumeClaim,
            namespace.to_owned(),
            claim.to_owned(),
        );
        match store.get(&key) {
            None => {
                return Some(format!(
                    "0/1 nodes are available: persistentvolumeclaim {claim:?} not found."
                ));
            }
            Some(pvc) if pvc.pointer("/metadata/deletionTimestamp").is_some() => {
                return Some(format!(
                    "0/1 nodes are available: persistentvolumeclaim {claim:?} is being deleted."
                ));
            }
            Some(pvc) => {
                unbound |= pvc.pointer("/status/phase").and_then(Value::as_str) != Some("Bound");
            }
        }
    }
    unbound.then(|| {
        "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims.".to_owned()
    })
}
