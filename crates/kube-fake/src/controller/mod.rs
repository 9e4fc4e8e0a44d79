//! The built-in "cluster": the Deployment controller (`deployment`), the pretend
//! scheduler and kubelet (`kubelet`), the volume binder and PVC protection (`volumes`),
//! the quota controller, and the garbage collector that carries out deletion
//! propagation through owner references.

mod deployment;
mod kubelet;
mod volumes;

use serde_json::Value;
use tokio::time::Instant;

use crate::ops::{self, FOREGROUND_FINALIZER, Propagation};
use crate::quota;
use crate::resource::ResourceKind;
use crate::store::{Store, uid_of};

pub use kubelet::PodState;
pub(crate) use kubelet::{PodTimer, progress_pod, set_pod_state};

/// What a reconcile asks of the loop that runs it: pod lifecycle steps to schedule, and
/// when to run again even if nothing is written meanwhile (a claim due to bind, a
/// progress deadline). Both model time passing in a cluster.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    pub timers: Vec<PodTimer>,
    pub wake_at: Option<Instant>,
}

impl Reconciled {
    fn wake_at(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// Runs the controllers until nothing changes.
pub(crate) fn reconcile(store: &mut Store) -> Reconciled {
    let mut out = Reconciled::default();
    // Each pass only moves the world forward, so this terminates; the bound guards
    // against a bug turning into a hung test.
    for _ in 0..100 {
        let mut changed = collect_garbage(store);
        changed |= volumes::bind_claims(store, &mut out);
        changed |= volumes::release_claims(store);
        changed |= deployment::sync(store, &mut out);
        changed |= kubelet::schedule(store, &mut out);
        changed |= quota::sync_status(store);
        if !changed {
            break;
        }
    }
    forget_the_gone(store);
    out
}

/// Drops what the controllers remember about objects that no longer exist: progress
/// marks, and the files of deleted pods and claims.
fn forget_the_gone(store: &mut Store) {
    let live = |store: &Store, kind: ResourceKind| -> std::collections::HashSet<String> {
        store
            .list(kind, None)
            .into_iter()
            .map(|o| uid_of(o).to_owned())
            .collect()
    };
    let deployments = live(store, ResourceKind::Deployment);
    store
        .progress_marks
        .retain(|uid, _| deployments.contains(uid));
    let pods = live(store, ResourceKind::Pod);
    let claims = live(store, ResourceKind::PersistentVolumeClaim);
    store.files.retain(&pods, &claims);
}

fn collect_garbage(store: &mut Store) -> bool {
    let mut changed = false;
    for kind in ResourceKind::ALL {
        for key in store.keys(kind) {
            let Some(object) = store.get(&key).cloned() else {
                continue;
            };
            let uid = uid_of(&object).to_owned();
            let waiting_for_dependents = object
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x == FOREGROUND_FINALIZER));
            if object.pointer("/metadata/deletionTimestamp").is_some() && waiting_for_dependents {
                let dependents = store.dependents_of(&uid);
                if dependents.is_empty() {
                    let mut done = object.clone();
                    if let Some(f) = done["metadata"]["finalizers"].as_array_mut() {
                        f.retain(|x| x != FOREGROUND_FINALIZER);
                    }
                    store.update(kind, done);
                    changed = true;
                } else {
                    for dep in dependents {
                        let pending = store
                            .get(&dep)
                            .is_some_and(|d| d.pointer("/metadata/deletionTimestamp").is_some());
                        if !pending {
                            ops::delete_with(store, &dep, Propagation::Background);
                            changed = true;
                        }
                    }
                }
                continue;
            }
            // A dependent whose every modelled owner is gone is garbage. Owners of kinds
            // the stand-in does not model are assumed to exist.
            let refs: Vec<Value> = object
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let dangling = !refs.is_empty()
                && refs.iter().all(|r| {
                    let modelled = ResourceKind::from_type(
                        r.get("apiVersion")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                        r.get("kind").and_then(Value::as_str).unwrap_or_default(),
                    )
                    .is_some();
                    let uid = r.get("uid").and_then(Value::as_str).unwrap_or_default();
                    modelled && !store.uid_exists(uid)
                });
            if dangling && object.pointer("/metadata/deletionTimestamp").is_none() {
                ops::delete_with(store, &key, Propagation::Background);
                changed = true;
            }
        }
    }
    changed
}
