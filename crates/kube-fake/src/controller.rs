//! The built-in "cluster": a Deployment controller that keeps pods at `spec.replicas`
//! and reports their readiness, a pretend kubelet that moves pods from `Pending` to
//! `Running`/ready (or to an image-pull or crash failure), a volume binder, and the
//! garbage collector that carries out deletion propagation through owner references.

use std::time::Duration;

use serde_json::{Value, json};

use crate::ops::{self, FOREGROUND_FINALIZER, Propagation};
use crate::resource::ResourceKind;
use crate::store::{Key, Store, key_of, now, uid_of};

/// A pod's next lifecycle step, due after `delay`.
#[derive(Clone, Debug)]
pub(crate) struct PodTimer {
    pub key: Key,
    pub uid: String,
    pub step: PodStep,
    pub delay: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PodStep {
    /// The containers start (or their image pull fails).
    Start,
    /// A failed pull turns into back-off, as the kubelet reports it on retry.
    BackOff,
}

/// Runs the controllers until nothing changes; returns the pod steps to schedule.
pub(crate) fn reconcile(store: &mut Store) -> Vec<PodTimer> {
    let mut timers = Vec::new();
    // Each pass only moves the world forward, so this terminates; the bound guards
    // against a bug turning into a hung test.
    for _ in 0..100 {
        let mut changed = collect_garbage(store);
        changed |= bind_volumes(store);
        changed |= sync_deployments(store, &mut timers);
        if !changed {
            break;
        }
    }
    timers
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
                } else {
                    for dep in dependents {
                        let pending = store
                            .get(&dep)
                            .is_some_and(|d| d.pointer("/metadata/deletionTimestamp").is_some());
                        if !pending {
                            ops::delete_with(store, &dep, Propagation::Background);
                        }
                    }
                }
                changed = true;
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

/// The stand-in has one default storage class that provisions immediately.
fn bind_volumes(store: &mut Store) -> bool {
    let mut changed = false;
    for key in store.keys(ResourceKind::PersistentVolumeClaim) {
        let Some(pvc) = store.get(&key).cloned() else {
            continue;
        };
        if pvc.pointer("/status/phase").and_then(Value::as_str) != Some("Pending") {
            continue;
        }
        let mut bound = pvc.clone();
        bound["spec"]["volumeName"] = json!(format!("pvc-{}", uid_of(&pvc)));
        bound["status"] = json!({
            "phase": "Bound",
            "accessModes": pvc.pointer("/spec/accessModes").cloned().unwrap_or(json!([])),
            "capacity": { "storage": pvc.pointer("/spec/resources/requests/storage").cloned().unwrap_or(Value::Null) },
        });
        store.update(key.0, bound);
        changed = true;
    }
    changed
}

/// A short, stable hash of the pod template, like the `pod-template-hash` label.
fn template_hash(template: &Value) -> String {
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

fn sync_deployments(store: &mut Store, timers: &mut Vec<PodTimer>) -> bool {
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
        let pods: Vec<Value> = store
            .list(ResourceKind::Pod, Some(&key.1))
            .into_iter()
            .filter(|p| controlled_by(p, &uid))
            .cloned()
            .collect();
        // The real controller leaves a Deployment being deleted to the garbage collector.
        if deployment.pointer("/metadata/deletionTimestamp").is_none() {
            let desired = deployment
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
                .max(0) as usize;
            let mut active: Vec<&Value> = pods.iter().filter(|p| is_active(p)).collect();
            // A changed template replaces its pods (the Recreate strategy; rolling
            // updates are not modelled).
            for stale in active.iter().filter(|p| {
                p.pointer("/metadata/labels/pod-template-hash")
                    .and_then(Value::as_str)
                    != Some(hash.as_str())
            }) {
                ops::delete_with(
                    store,
                    &key_of(ResourceKind::Pod, stale),
                    Propagation::Background,
                );
                changed = true;
            }
            active.retain(|p| {
                p.pointer("/metadata/labels/pod-template-hash")
                    .and_then(Value::as_str)
                    == Some(hash.as_str())
            });
            // Scale down the newest first, as the ReplicaSet controller prefers.
            active.sort_by_key(|p| {
                std::cmp::Reverse(
                    p.pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0),
                )
            });
            if active.len() > desired {
                for extra in &active[..active.len() - desired] {
                    ops::delete_with(
                        store,
                        &key_of(ResourceKind::Pod, extra),
                        Propagation::Background,
                    );
                }
                changed = true;
            }
            for _ in active.len()..desired {
                timers.push(create_pod(store, &deployment, &template, &hash));
                changed = true;
            }
        }
        changed |= update_deployment_status(store, &key, &hash);
    }
    changed
}

fn create_pod(store: &mut Store, deployment: &Value, template: &Value, hash: &str) -> PodTimer {
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
    let mut spec = template.get("spec").cloned().unwrap_or(json!({}));
    // Scheduling is not modelled: every pod lands on the one pretend node at once.
    spec["nodeName"] = json!("fake-node");
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
        "status": {
            "phase": "Pending",
            "qosClass": qos_class(template),
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}],
        },
    });
    ops::stamp_new(store, ResourceKind::Pod, &namespace, &mut pod);
    let pod = store.insert(ResourceKind::Pod, pod);
    PodTimer {
        key: key_of(ResourceKind::Pod, &pod),
        uid: uid_of(&pod).to_owned(),
        step: PodStep::Start,
        delay: store.settings.pod_ready_delay,
    }
}

fn qos_class(template: &Value) -> &'static str {
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

fn update_deployment_status(store: &mut Store, key: &Key, hash: &str) -> bool {
    let Some(deployment) = store.get(key).cloned() else {
        return false;
    };
    let uid = uid_of(&deployment);
    let pods: Vec<&Value> = store
        .list(ResourceKind::Pod, Some(&key.1))
        .into_iter()
        .filter(|p| controlled_by(p, uid) && is_active(p))
        .collect();
    let desired = deployment
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let replicas = pods.len() as i64;
    let updated = pods
        .iter()
        .filter(|p| {
            p.pointer("/metadata/labels/pod-template-hash")
                .and_then(Value::as_str)
                == Some(hash)
        })
        .count() as i64;
    let ready = pods.iter().filter(|p| is_ready(p)).count() as i64;
    let unavailable = (desired - ready).max(0);
    let old_status = deployment.get("status").cloned().unwrap_or(json!({}));
    let condition = |ty: &str, status: &str, reason: &str, message: String| {
        let previous = old_status
            .get("conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == ty))
            .filter(|c| c["status"] == status && c["reason"] == reason);
        // Keep the old timestamps while the condition holds, so an unchanged deployment
        // does not churn resource versions.
        let (transition, update) = match previous {
            Some(p) => (p["lastTransitionTime"].clone(), p["lastUpdateTime"].clone()),
            None => (json!(now()), json!(now())),
        };
        json!({"type": ty, "status": status, "reason": reason, "message": message,
               "lastTransitionTime": transition, "lastUpdateTime": update})
    };
    let available = if ready >= desired {
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
        )
    } else {
        condition(
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
        )
    };
    let name = key.2.as_str();
    let progressing = if updated == replicas && ready == replicas {
        condition(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{name}-{hash}\" has successfully progressed."),
        )
    } else {
        condition(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{name}-{hash}\" is progressing."),
        )
    };
    let mut status = json!({
        "observedGeneration": deployment.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "conditions": [available, progressing],
    });
    // Zero counts are omitted, as the real API's omitempty does.
    for (field, value) in [
        ("replicas", replicas),
        ("updatedReplicas", updated),
        ("readyReplicas", ready),
        ("availableReplicas", ready),
        ("unavailableReplicas", unavailable),
    ] {
        if value != 0 {
            status[field] = json!(value);
        }
    }
    if status == old_status {
        return false;
    }
    let mut new = deployment.clone();
    new["status"] = status;
    store.update(ResourceKind::Deployment, new);
    true
}

fn image_matches(pod: &Value, prefixes: &[String]) -> Option<String> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("image").and_then(Value::as_str))
        .find(|image| prefixes.iter().any(|p| image.starts_with(p.as_str())))
        .map(str::to_owned)
}

fn container_names(pod: &Value) -> Vec<(String, String)> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["image"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn conditions(ready: bool, reason: Option<&str>, names: &[(String, String)]) -> Value {
    let t = now();
    let (status, reason, message) = if ready {
        ("True", Value::Null, Value::Null)
    } else {
        let names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        (
            "False",
            json!(reason.unwrap_or("ContainersNotReady")),
            json!(format!(
                "containers with unready status: [{}]",
                names.join(" ")
            )),
        )
    };
    let cond = |ty: &str, s: &str| {
        let mut c = json!({"type": ty, "status": s, "lastTransitionTime": t});
        if s == "False" {
            c["reason"] = reason.clone();
            c["message"] = message.clone();
        }
        c
    };
    json!([
        cond("PodReadyToStartContainers", "True"),
        cond("Initialized", "True"),
        cond("Ready", status),
        cond("ContainersReady", status),
        cond("PodScheduled", "True"),
    ])
}

/// Carries out a pod's lifecycle step; returns the step after it, if any.
pub(crate) fn progress_pod(store: &mut Store, timer: &PodTimer) -> Option<PodTimer> {
    let pod = store.get(&timer.key).cloned()?;
    if uid_of(&pod) != timer.uid || pod.pointer("/metadata/deletionTimestamp").is_some() {
        return None;
    }
    let names = container_names(&pod);
    let mut new = pod.clone();
    let failing = image_matches(&pod, &store.settings.fail_image_prefixes);
    match timer.step {
        PodStep::Start => {
            // A test may have set the pod's state already; the pretend kubelet defers.
            if pod.pointer("/status/containerStatuses").is_some() {
                return None;
            }
            let host_ip = "10.0.0.10";
            new["status"]["hostIP"] = json!(host_ip);
            new["status"]["hostIPs"] = json!([{"ip": host_ip}]);
            new["status"]["startTime"] = json!(now());
            if let Some(image) = failing {
                new["status"]["conditions"] = conditions(false, None, &names);
                new["status"]["containerStatuses"] = container_statuses(&names, |_, img| {
                    waiting(
                        "ErrImagePull",
                        &format!(
                            "failed to pull and unpack image \"{img}\": rpc error: code = NotFound desc = {image}: not found"
                        ),
                    )
                });
                store.update(ResourceKind::Pod, new);
                return Some(PodTimer {
                    step: PodStep::BackOff,
                    ..timer.clone()
                });
            }
            let ip = store.allocate_pod_ip();
            new["status"]["podIP"] = json!(ip);
            new["status"]["podIPs"] = json!([{"ip": ip}]);
            new["status"]["phase"] = json!("Running");
            if image_matches(&pod, &store.settings.crash_image_prefixes).is_some() {
                new["status"]["conditions"] = conditions(false, None, &names);
                new["status"]["containerStatuses"] = container_statuses(&names, |name, _| {
                    waiting(
                        "CrashLoopBackOff",
                        &format!("back-off 10s restarting failed container={name}"),
                    )
                });
                for cs in new["status"]["containerStatuses"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    cs["restartCount"] = json!(1);
                    cs["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error"}});
                }
            } else {
                new["status"]["conditions"] = conditions(true, None, &names);
                new["status"]["containerStatuses"] =
                    container_statuses(&names, |_, _| json!({"running": {"startedAt": now()}}));
                for cs in new["status"]["containerStatuses"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    cs["ready"] = json!(true);
                    cs["started"] = json!(true);
                }
            }
            store.update(ResourceKind::Pod, new);
            None
        }
        PodStep::BackOff => {
            let still_pulling = pod
                .pointer("/status/containerStatuses/0/state/waiting/reason")
                .and_then(Value::as_str)
                == Some("ErrImagePull");
            if !still_pulling {
                return None;
            }
            new["status"]["containerStatuses"] = container_statuses(&names, |_, img| {
                waiting(
                    "ImagePullBackOff",
                    &format!("Back-off pulling image \"{img}\""),
                )
            });
            store.update(ResourceKind::Pod, new);
            None
        }
    }
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

fn container_statuses(names: &[(String, String)], state: impl Fn(&str, &str) -> Value) -> Value {
    Value::Array(
        names
            .iter()
            .map(|(name, image)| {
                json!({
                    "name": name,
                    "image": image,
                    "imageID": "",
                    "ready": false,
                    "started": false,
                    "restartCount": 0,
                    "state": state(name, image),
                })
            })
            .collect(),
    )
}

/// A pod state a test imposes, as if the kubelet or an eviction had reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Running with every container ready.
    Ready,
    /// Running, but its containers are not ready (e.g. a crashing container).
    NotReady { reason: String, message: String },
    /// Still `Pending`, containers waiting (e.g. `ErrImagePull`).
    Waiting { reason: String, message: String },
    /// `Failed`, with the pod-level reason (e.g. `Evicted`).
    Failed { reason: String, message: String },
}

pub(crate) fn set_pod_state(store: &mut Store, key: &Key, state: &PodState) -> bool {
    let Some(pod) = store.get(key).cloned() else {
        return false;
    };
    let names = container_names(&pod);
    let mut new = pod.clone();
    let status = &mut new["status"];
    match state {
        PodState::Ready => {
            status["phase"] = json!("Running");
            if status.get("podIP").is_none() {
                let ip = store.allocate_pod_ip();
                new["status"]["podIP"] = json!(ip);
                new["status"]["podIPs"] = json!([{"ip": ip}]);
            }
            new["status"]["conditions"] = conditions(true, None, &names);
            new["status"]["containerStatuses"] =
                container_statuses(&names, |_, _| json!({"running": {"startedAt": now()}}));
            for cs in new["status"]["containerStatuses"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                cs["ready"] = json!(true);
                cs["started"] = json!(true);
            }
        }
        PodState::NotReady { reason, message } => {
            status["phase"] = json!("Running");
            status["conditions"] = conditions(false, None, &names);
            status["containerStatuses"] =
                container_statuses(&names, |_, _| waiting(reason, message));
        }
        PodState::Waiting { reason, message } => {
            status["phase"] = json!("Pending");
            status["conditions"] = conditions(false, None, &names);
            status["containerStatuses"] =
                container_statuses(&names, |_, _| waiting(reason, message));
        }
        PodState::Failed { reason, message } => {
            status["phase"] = json!("Failed");
            status["reason"] = json!(reason);
            status["message"] = json!(message);
            status["conditions"] = conditions(false, Some("PodFailed"), &names);
            status["containerStatuses"] = container_statuses(
                &names,
                |_, _| json!({"terminated": {"exitCode": 137, "reason": reason}}),
            );
        }
    }
    store.update(ResourceKind::Pod, new);
    true
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
}
