//! The Deployment controller, with the ReplicaSet in between folded in: keeps
//! `spec.replicas` pods of the current template (creating them through the admission
//! chain), and reports status as the real controller does — counts,
//! `observedGeneration`, and the `Available`, `Progressing` (including the progress
//! deadline) and `ReplicaFailure` conditions.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::Reconciled;
use crate::admission;
use crate::ops::{self, Propagation};
use crate::resource::ResourceKind;
use crate::store::{Key, Store, key_of, now, uid_of};

/// A short, stable hash of the pod template, like the `pod-template-hash` label.
pub(super) fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    // FNV-1a over the canonical JSON: stable across runs, no extra dependency.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in template.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (0..10)
        .map(|i| ALPHABET[((h >> (i * 6)) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn is_active(pod: &Value) -> bool {
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    pod.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(phase, Some("Failed") | Some("Succeeded"))
}

fn controlled_by(pod: &Value, uid: &str) -> bool {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r["uid"] == uid && r["controller"] == true)
        })
}

fn pod_hash(pod: &Value) -> Option<&str> {
    pod.pointer("/metadata/labels/pod-template-hash")
        .and_then(Value::as_str)
}

pub(super) fn sync(store: &mut Store, out: &mut Reconciled) -> bool {
    let mut changed = false;
    for key in store.keys(ResourceKind::Deployment) {
        let Some(deployment) = store.get(&key).cloned() else {
            continue;
        };
        let uid = uid_of(&deployment).to_owned();
        let template = deployment
            .pointer("/spec/template")
            .cloned()
            .unwrap_or(json!({}));
        let hash = template_hash(&template);
        let mut failure = None;
        // The real controller leaves a Deployment being deleted to the garbage collector.
        if deployment.pointer("/metadata/deletionTimestamp").is_none() {
            let desired = deployment
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
                .max(0) as usize;
            let pods: Vec<Value> = store
                .list(ResourceKind::Pod, Some(&key.1))
                .into_iter()
                .filter(|p| controlled_by(p, &uid) && is_active(p))
                .cloned()
                .collect();
            // A changed template replaces its pods (the Recreate strategy; rolling
            // updates are not modelled).
            let (mut current, stale): (Vec<&Value>, Vec<&Value>) = pods
                .iter()
                .partition(|p| pod_hash(p) == Some(hash.as_str()));
            for pod in stale {
                ops::delete_with(
                    store,
                    &key_of(ResourceKind::Pod, pod),
                    Propagation::Background,
                );
                changed = true;
            }
            // Scale down the newest first, as the ReplicaSet controller prefers.
            current.sort_by_key(|p| {
                std::cmp::Reverse(
                    p.pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0),
                )
            });
            if current.len() > desired {
                for extra in &current[..current.len() - desired] {
                    ops::delete_with(
                        store,
                        &key_of(ResourceKind::Pod, extra),
                        Propagation::Background,
                    );
                }
                changed = true;
            }
            // Creates stop at the first refusal, which becomes the failure condition;
            // every later pass tries again.
            for _ in current.len()..desired {
                match create_pod(store, &deployment, &template, &hash) {
                    Ok(()) => changed = true,
                    Err(message) => {
                        failure = Some(message);
                        break;
                    }
                }
            }
        }
        changed |= update_status(store, &key, &hash, failure, out);
    }
    changed
}

/// Creates one pod of the template through the admission chain; the refusal's message
/// otherwise, as the ReplicaSet controller records it.
fn create_pod(
    store: &mut Store,
    deployment: &Value,
    template: &Value,
    hash: &str,
) -> Result<(), String> {
    let meta = &deployment["metadata"];
    let name = format!(
        "{}-{hash}-{}",
        meta["name"].as_str().unwrap_or_default(),
        &template_hash(&json!(uuid::Uuid::new_v4().to_string()))[..5]
    );
    let namespace = meta["namespace"].as_str().unwrap_or_default().to_owned();
    let mut labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    labels["pod-template-hash"] = json!(hash);
    let spec = template.get("spec").cloned().unwrap_or(json!({}));
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
        "status": { "phase": "Pending", "qosClass": qos_class(template) },
    });
    ops::stamp_new(store, ResourceKind::Pod, &namespace, &mut pod);
    admission::admit_create(store, ResourceKind::Pod, &namespace, &mut pod)
        .map_err(|e| e.message)?;
    store.insert(ResourceKind::Pod, pod);
    Ok(())
}

pub(super) fn qos_class(template: &Value) -> &'static str {
    let containers = template
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let any = containers.iter().any(|c| {
        c.pointer("/resources/requests").is_some() || c.pointer("/resources/limits").is_some()
    });
    let guaranteed = !containers.is_empty()
        && containers.iter().all(|c| {
            let limits = c.pointer("/resources/limits");
            let requests = c.pointer("/resources/requests").or(limits);
            ["cpu", "memory"].iter().all(|r| {
                limits.and_then(|l| l.get(r)).is_some()
                    && limits.and_then(|l| l.get(r)) == requests.and_then(|q| q.get(r))
            })
        });
    match (any, guaranteed) {
        (_, true) => "Guaranteed",
        (true, false) => "Burstable",
        (false, false) => "BestEffort",
    }
}

/// `maxSurge`/`maxUnavailable` resolved against `replicas`: a count as written, a
/// percentage rounded up for surge and down for unavailability.
fn resolve(value: Option<&Value>, replicas: i64, round_up: bool) -> i64 {
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(pct) if round_up => (replicas * pct + 99) / 100,
            Some(pct) => replicas * pct / 100,
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

/// How many of `replicas` may be unavailable while the Deployment still counts as
/// available: none for `Recreate`, the rolling update's `maxUnavailable` otherwise.
fn max_unavailable(deployment: &Value, replicas: i64) -> i64 {
    let strategy = deployment.pointer("/spec/strategy");
    let rolling = strategy
        .and_then(|s| s.get("type"))
        .and_then(Value::as_str)
        .is_none_or(|t| t == "RollingUpdate");
    if !rolling || replicas == 0 {
        return 0;
    }
    let params = strategy.and_then(|s| s.get("rollingUpdate"));
    let pct = json!("25%");
    let surge = resolve(
        Some(params.and_then(|p| p.get("maxSurge")).unwrap_or(&pct)),
        replicas,
        true,
    );
    let mut unavailable = resolve(
        Some(params.and_then(|p| p.get("maxUnavailable")).unwrap_or(&pct)),
        replicas,
        false,
    );
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    unavailable.min(replicas)
}

/// Sets a condition the way the controller's `SetDeploymentCondition` does: one already
/// there with the same status and reason stays as it is; a new one keeps the old
/// `lastTransitionTime` when only the reason changed.
fn set_condition(conditions: &mut Vec<Value>, ty: &str, status: &str, reason: &str, message: &str) {
    let existing = conditions.iter().position(|c| c["type"] == ty);
    let t = json!(now());
    let mut condition = json!({"type": ty, "status": status, "reason": reason, "message": message,
                               "lastUpdateTime": t, "lastTransitionTime": t});
    if let Some(i) = existing {
        let old = &conditions[i];
        if old["status"] == status && old["reason"] == reason {
            return;
        }
        if old["status"] == status {
            condition["lastTransitionTime"] = old["lastTransitionTime"].clone();
        }
        conditions[i] = condition;
    } else {
        conditions.push(condition);
    }
}

fn count(status: &Value, field: &str) -> i64 {
    status.get(field).and_then(Value::as_i64).unwrap_or(0)
}

/// The counts the status reports, and the rollout's state derived from them.
struct Counts {
    desired: i64,
    replicas: i64,
    updated: i64,
    ready: i64,
    available: i64,
}

fn update_status(
    store: &mut Store,
    key: &Key,
    hash: &str,
    failure: Option<String>,
    out: &mut Reconciled,
) -> bool {
    let Some(deployment) = store.get(key).cloned() else {
        return false;
    };
    let uid = uid_of(&deployment).to_owned();
    let pods: Vec<&Value> = store
        .list(ResourceKind::Pod, Some(&key.1))
        .into_iter()
        .filter(|p| controlled_by(p, &uid) && is_active(p))
        .collect();
    let desired = deployment
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let ready = pods.iter().filter(|p| is_ready(p)).count() as i64;
    let counts = Counts {
        desired,
        replicas: pods.len() as i64,
        updated: pods.iter().filter(|p| pod_hash(p) == Some(hash)).count() as i64,
        ready,
        // minReadySeconds is not modelled: ready is available.
        available: ready,
    };
    let old_status = deployment.get("status").cloned().unwrap_or(json!({}));
    let mut conditions: Vec<Value> = old_status
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();

    if counts.available >= desired - max_unavailable(&deployment, desired) {
        set_condition(
            &mut conditions,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        );
    } else {
        set_condition(
            &mut conditions,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        );
    }
    progressing(
        store,
        &deployment,
        &format!("{}-{hash}", key.2),
        &counts,
        &old_status,
        &mut conditions,
        out,
    );
    match failure {
        Some(message) => set_condition(
            &mut conditions,
            "ReplicaFailure",
            "True",
            "FailedCreate",
            &message,
        ),
        None => conditions.retain(|c| c["type"] != "ReplicaFailure"),
    }

    let mut status = json!({
        "observedGeneration": deployment.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "conditions": conditions,
    });
    // Zero counts are omitted, as the real API's omitempty does.
    for (field, value) in [
        ("replicas", counts.replicas),
        ("updatedReplicas", counts.updated),
        ("readyReplicas", counts.ready),
        ("availableReplicas", counts.available),
        ("unavailableReplicas", (desired - counts.available).max(0)),
    ] {
        if value != 0 {
            status[field] = json!(value);
        }
    }
    if status == old_status {
        return false;
    }
    let mut new = deployment;
    new["status"] = status;
    store.update(ResourceKind::Deployment, new);
    true
}

/// The `Progressing` condition, as the controller's rollout status sync keeps it: a new
/// template starts a rollout (`NewReplicaSetCreated`); any gain in updated, ready or
/// available pods is progress (`ReplicaSetUpdated`, deadline restarted); all of them
/// there completes it (`NewReplicaSetAvailable`, which scaling alone does not undo); no
/// progress for `progressDeadlineSeconds` fails it (`ProgressDeadlineExceeded`).
fn progressing(
    store: &mut Store,
    deployment: &Value,
    rs: &str,
    c: &Counts,
    old_status: &Value,
    conditions: &mut Vec<Value>,
    out: &mut Reconciled,
) {
    let Some(deadline) = deployment
        .pointer("/spec/progressDeadlineSeconds")
        .and_then(Value::as_u64)
        .filter(|d| *d != i32::MAX as u64)
    else {
        return;
    };
    let uid = uid_of(deployment).to_owned();
    let named = format!("ReplicaSet {rs:?}");
    let current = conditions
        .iter()
        .find(|c| c["type"] == "Progressing")
        .cloned();
    let now_at = Instant::now();
    let new_rollout = current
        .as_ref()
        .is_none_or(|c| !c["message"].as_str().is_some_and(|m| m.contains(&named)));
    if new_rollout {
        conditions.retain(|c| c["type"] != "Progressing");
        set_condition(
            conditions,
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            &format!("Created new replica set {rs:?}"),
        );
        store.progress_marks.insert(uid.clone(), now_at);
    }
    let reason = |c: &Option<Value>| {
        c.as_ref()
            .and_then(|c| c["reason"].as_str().map(str::to_owned))
    };
    let complete_already = !new_rollout
        && reason(&current).as_deref() == Some("NewReplicaSetAvailable")
        && c.replicas == c.updated;
    if complete_already {
        return;
    }
    let complete = c.updated == c.desired && c.replicas == c.desired && c.available == c.desired;
    let old_replicas = count(old_status, "replicas") - count(old_status, "updatedReplicas");
    let progressed = c.updated > count(old_status, "updatedReplicas")
        || c.ready > count(old_status, "readyReplicas")
        || c.available > count(old_status, "availableReplicas")
        || c.replicas - c.updated < old_replicas;
    let mark = *store.progress_marks.entry(uid.clone()).or_insert(now_at);
    let due = mark + Duration::from_secs(deadline);
    if complete {
        set_condition(
            conditions,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("{named} has successfully progressed."),
        );
        store.progress_marks.remove(&uid);
    } else if progressed {
        // Progress refreshes lastUpdateTime even when the reason stays the same.
        let transition = conditions
            .iter()
            .find(|c| c["type"] == "Progressing" && c["status"] == "True")
            .map(|c| c["lastTransitionTime"].clone());
        conditions.retain(|c| c["type"] != "Progressing");
        set_condition(
            conditions,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("{named} is progressing."),
        );
        if let (Some(t), Some(c)) = (
            transition,
            conditions.iter_mut().find(|c| c["type"] == "Progressing"),
        ) {
            c["lastTransitionTime"] = t;
        }
        store.progress_marks.insert(uid, now_at);
        out.wake_at(now_at + Duration::from_secs(deadline));
    } else if reason(&current).as_deref() == Some("ProgressDeadlineExceeded") || now_at >= due {
        set_condition(
            conditions,
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            &format!("{named} has timed out progressing."),
        );
    } else {
        // The deadline is modelled time passing: wake the controllers when it comes.
        out.wake_at(due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_label_safe() {
        let t = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(template_hash(&t), template_hash(&t.clone()));
        assert_ne!(template_hash(&t), template_hash(&json!({})));
        assert!(template_hash(&t).bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn qos_follows_requests_and_limits() {
        let none = json!({"spec": {"containers": [{"name": "a"}]}});
        let burst = json!({"spec": {"containers": [{"name": "a", "resources": {"requests": {"memory": "1Mi"}}}]}});
        let guaranteed = json!({"spec": {"containers": [{"name": "a", "resources": {"limits": {"memory": "1Mi", "cpu": "1"}}}]}});
        assert_eq!(qos_class(&none), "BestEffort");
        assert_eq!(qos_class(&burst), "Burstable");
        assert_eq!(qos_class(&guaranteed), "Guaranteed");
    }

    #[test]
    fn max_unavailable_follows_the_strategy() {
        let rolling = json!({"spec": {"strategy": {"type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}}});
        assert_eq!(max_unavailable(&rolling, 1), 0, "25% of one rounds down");
        assert_eq!(max_unavailable(&rolling, 4), 1);
        let recreate = json!({"spec": {"strategy": {"type": "Recreate"}}});
        assert_eq!(max_unavailable(&recreate, 4), 0);
        let zero =
            json!({"spec": {"strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}}});
        assert_eq!(
            max_unavailable(&zero, 3),
            1,
            "both zero means one unavailable"
        );
    }
}
