//! The pretend scheduler and kubelet: a pending pod is bound to the one pretend node once
//! its claims are bound, then moves to `Running`/ready after a delay, or fails the way
//! its image prefix says (a pull that never succeeds, a crash loop, an OOM kill); and
//! the pod states tests impose.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Reconciled, volumes};
use crate::resource::ResourceKind;
use crate::store::{Key, Store, now, uid_of};

/// The one node every schedulable pod lands on.
const NODE: &str = "fake-node";
/// The node's address, reported as the pods' `hostIP`.
const HOST_IP: &str = "10.0.0.10";
/// The exit code of a container the kernel's OOM killer ended (128 + SIGKILL).
const OOM_EXIT_CODE: i64 = 137;

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
    /// A container that started is killed for exceeding its memory limit.
    OomKill,
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
    /// Running, every container killed by the OOM killer and restarting in back-off:
    /// `lastState.terminated` says `OOMKilled` with exit code 137, `state.waiting`
    /// `CrashLoopBackOff`; the pod is not ready.
    OomKilled,
}

fn is_pending_unbound(pod: &Value) -> bool {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        && pod.pointer("/metadata/deletionTimestamp").is_none()
        && pod.pointer("/status/phase").and_then(Value::as_str) == Some("Pending")
}

/// Replaces (or adds) the `PodScheduled` condition; false when it already says that.
fn set_scheduled(
    pod: &mut Value,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) -> bool {
    let conditions = pod["status"]
        .as_object_mut()
        .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
    let Some(Value::Array(conditions)) = conditions else {
        return false;
    };
    let existing = conditions.iter().position(|c| c["type"] == "PodScheduled");
    if let Some(i) = existing {
        let c = &conditions[i];
        if c["status"] == status
            && c.get("reason").and_then(Value::as_str) == reason
            && c.get("message").and_then(Value::as_str) == message
        {
            return false;
        }
    }
    let mut condition = json!({"type": "PodScheduled", "status": status,
                               "lastProbeTime": null, "lastTransitionTime": now()});
    if let Some(reason) = reason {
        condition["reason"] = json!(reason);
    }
    if let Some(message) = message {
        condition["message"] = json!(message);
    }
    match existing {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    true
}

/// The scheduler: binds pending pods whose volumes are ready to the pretend node and
/// starts their lifecycle; the others get `PodScheduled=False` with the scheduler's
/// reason. Node selectors, affinity, taints and resources are not evaluated.
pub(super) fn schedule(store: &mut Store, out: &mut Reconciled) -> bool {
    let mut changed = false;
    for key in store.keys(ResourceKind::Pod) {
        let Some(pod) = store.get(&key).cloned() else {
            continue;
        };
        if !is_pending_unbound(&pod) {
            continue;
        }
        let mut new = pod.clone();
        match volumes::unschedulable_reason(store, &pod) {
            Some(message) => {
                if set_scheduled(&mut new, "False", Some("Unschedulable"), Some(&message)) {
                    store.update(ResourceKind::Pod, new);
                    changed = true;
                }
            }
            None => {
                new["spec"]["nodeName"] = json!(NODE);
                set_scheduled(&mut new, "True", None, None);
                store.update(ResourceKind::Pod, new);
                out.timers.push(PodTimer {
                    uid: uid_of(&pod).to_owned(),
                    key,
                    step: PodStep::Start,
                    delay: store.settings.pod_ready_delay,
                });
                changed = true;
            }
        }
    }
    changed
}

/// Why an image reference cannot be parsed, in the container runtime's words: the
/// kubelet then reports `InvalidImageName` and never tries to pull.
fn invalid_reference(image: &str) -> Option<&'static str> {
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        return Some("invalid reference format");
    }
    // The repository: without a digest or tag, and without a registry host (the first
    // component, when it looks like one, may hold upper-case letters).
    let name = image.split('@').next().unwrap_or(image);
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let name = match name[last_slash..].rfind(':') {
        Some(i) => &name[..last_slash + i],
        None => name,
    };
    let path = match name.split_once('/') {
        Some((host, rest)) if host.contains(['.', ':']) || host == "localhost" => rest,
        _ => name,
    };
    path.chars()
        .any(|c| c.is_ascii_uppercase())
        .then_some("invalid reference format: repository name must be lowercase")
}

fn image_matches(image: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| image.starts_with(p.as_str()))
}

/// `(name, image)` of every container.
fn containers(pod: &Value) -> Vec<(String, String)> {
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

/// The pod's conditions once scheduled; `ready` decides `Ready` and `ContainersReady`.
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

fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

fn status_of(name: &str, image: &str, state: Value) -> Value {
    json!({
        "name": name,
        "image": image,
        "imageID": "",
        "ready": false,
        "started": false,
        "restartCount": 0,
        "state": state,
    })
}

fn running(name: &str, image: &str, ready: bool) -> Value {
    let mut cs = status_of(name, image, json!({"running": {"startedAt": now()}}));
    cs["ready"] = json!(ready);
    cs["started"] = json!(true);
    cs
}

/// A container that ended (`reason`, `exit_code`) and now waits out the kubelet's
/// restart back-off, worded as the kubelet words it.
fn restarting(pod: &Value, name: &str, image: &str, reason: &str, exit_code: i64) -> Value {
    let meta = &pod["metadata"];
    let message = format!(
        "back-off 10s restarting failed container={name} pod={}_{}({})",
        meta["name"].as_str().unwrap_or_default(),
        meta["namespace"].as_str().unwrap_or_default(),
        meta["uid"].as_str().unwrap_or_default(),
    );
    let mut cs = status_of(name, image, waiting("CrashLoopBackOff", &message));
    let t = now();
    cs["restartCount"] = json!(1);
    cs["lastState"] = json!({"terminated": {
        "exitCode": exit_code, "reason": reason, "startedAt": t, "finishedAt": t,
        "containerID": format!("containerd://{}", uuid::Uuid::new_v4().simple()),
    }});
    cs
}

fn with_ip(store: &mut Store, pod: &mut Value) {
    if pod.pointer("/status/podIP").is_none() {
        let ip = store.allocate_pod_ip();
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{"ip": ip}]);
    }
}

/// Carries out a pod's lifecycle step; returns the step after it, if any.
pub(crate) fn progress_pod(store: &mut Store, timer: &PodTimer) -> Option<PodTimer> {
    let pod = store.get(&timer.key).cloned()?;
    if uid_of(&pod) != timer.uid || pod.pointer("/metadata/deletionTimestamp").is_some() {
        return None;
    }
    let names = containers(&pod);
    let settings = store.settings.clone();
    let failing = names
        .iter()
        .map(|(_, image)| image)
        .find(|image| image_matches(image, &settings.fail_image_prefixes))
        .cloned();
    let crashes = |image: &str| image_matches(image, &settings.crash_image_prefixes);
    let ooms = |image: &str| image_matches(image, &settings.oom_image_prefixes);
    let any_oom = names.iter().any(|(_, i)| ooms(i));
    let any_crash = names.iter().any(|(_, i)| crashes(i));
    let delay = settings.pod_ready_delay;
    let mut new = pod.clone();
    match timer.step {
        PodStep::Start => {
            // A test may have set the pod's state already; the pretend kubelet defers.
            if pod.pointer("/status/containerStatuses").is_some() {
                return None;
            }
            new["status"]["hostIP"] = json!(HOST_IP);
            new["status"]["hostIPs"] = json!([{"ip": HOST_IP}]);
            new["status"]["startTime"] = json!(now());
            if let Some((img, why)) = names
                .iter()
                .find_map(|(_, img)| invalid_reference(img).map(|why| (img.clone(), why)))
            {
                new["status"]["conditions"] = conditions(false, None, &names);
                let message = format!(
                    "Failed to apply default image tag \"{img}\": couldn't parse image name \"{img}\": {why}"
                );
                new["status"]["containerStatuses"] = names
                    .iter()
                    .map(|(name, image)| {
                        status_of(name, image, waiting("InvalidImageName", &message))
                    })
                    .collect();
                store.update(ResourceKind::Pod, new);
                return None;
            }
            if let Some(image) = failing {
                new["status"]["conditions"] = conditions(false, None, &names);
                new["status"]["containerStatuses"] = names
                    .iter()
                    .map(|(name, img)| {
                        status_of(name, img, waiting(
                            "ErrImagePull",
                            &format!(
                                "failed to pull and unpack image \"{img}\": rpc error: code = NotFound desc = {image}: not found"
                            ),
                        ))
                    })
                    .collect();
                store.update(ResourceKind::Pod, new);
                return Some(PodTimer {
                    step: PodStep::BackOff,
                    delay,
                    ..timer.clone()
                });
            }
            with_ip(store, &mut new);
            new["status"]["phase"] = json!("Running");
            let ready = !any_oom && !any_crash;
            new["status"]["conditions"] = conditions(ready, None, &names);
            // A container bound for the OOM killer runs first; a crashing one has
            // already crashed by the time anyone looks.
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(name, image)| {
                    if crashes(image) {
                        restarting(&pod, name, image, "Error", 1)
                    } else {
                        running(name, image, ready)
                    }
                })
                .collect();
            store.update(ResourceKind::Pod, new);
            any_oom.then(|| PodTimer {
                step: PodStep::OomKill,
                delay,
                ..timer.clone()
            })
        }
        PodStep::BackOff => {
            let still_pulling = pod
                .pointer("/status/containerStatuses/0/state/waiting/reason")
                .and_then(Value::as_str)
                == Some("ErrImagePull");
            if !still_pulling {
                return None;
            }
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(name, img)| {
                    status_of(
                        name,
                        img,
                        waiting(
                            "ImagePullBackOff",
                            &format!("Back-off pulling image \"{img}\""),
                        ),
                    )
                })
                .collect();
            store.update(ResourceKind::Pod, new);
            None
        }
        PodStep::OomKill => {
            // Unless a test imposed another state meanwhile, the running containers of
            // an OOM image are killed.
            let untouched = pod
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .is_some_and(|c| c.iter().all(|s| s.get("lastState").is_none()));
            if !untouched || pod.pointer("/status/phase") != Some(&json!("Running")) {
                return None;
            }
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(name, image)| {
                    if ooms(image) {
                        restarting(&pod, name, image, "OOMKilled", OOM_EXIT_CODE)
                    } else if crashes(image) {
                        restarting(&pod, name, image, "Error", 1)
                    } else {
                        running(name, image, false)
                    }
                })
                .collect();
            store.update(ResourceKind::Pod, new);
            None
        }
    }
}

/// Imposes `state` on the pod; false when it does not exist.
pub(crate) fn set_pod_state(store: &mut Store, key: &Key, state: &PodState) -> bool {
    let Some(pod) = store.get(key).cloned() else {
        return false;
    };
    let names = containers(&pod);
    let mut new = pod.clone();
    match state {
        PodState::Ready => {
            new["status"]["phase"] = json!("Running");
            with_ip(store, &mut new);
            new["status"]["conditions"] = conditions(true, None, &names);
            new["status"]["containerStatuses"] =
                names.iter().map(|(n, i)| running(n, i, true)).collect();
        }
        PodState::NotReady { reason, message } => {
            new["status"]["phase"] = json!("Running");
            new["status"]["conditions"] = conditions(false, None, &names);
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(n, i)| status_of(n, i, waiting(reason, message)))
                .collect();
        }
        PodState::Waiting { reason, message } => {
            new["status"]["phase"] = json!("Pending");
            new["status"]["conditions"] = conditions(false, None, &names);
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(n, i)| status_of(n, i, waiting(reason, message)))
                .collect();
        }
        PodState::Failed { reason, message } => {
            new["status"]["phase"] = json!("Failed");
            new["status"]["reason"] = json!(reason);
            new["status"]["message"] = json!(message);
            new["status"]["conditions"] = conditions(false, Some("PodFailed"), &names);
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(n, i)| {
                    status_of(
                        n,
                        i,
                        json!({"terminated": {"exitCode": 137, "reason": reason}}),
                    )
                })
                .collect();
        }
        PodState::OomKilled => {
            new["status"]["phase"] = json!("Running");
            with_ip(store, &mut new);
            new["status"]["conditions"] = conditions(false, None, &names);
            new["status"]["containerStatuses"] = names
                .iter()
                .map(|(n, i)| restarting(&pod, n, i, "OOMKilled", OOM_EXIT_CODE))
                .collect();
        }
    }
    store.update(ResourceKind::Pod, new);
    true
}

#[cfg(test)]
mod reference_tests {
    use super::invalid_reference;

    #[test]
    fn image_references_parse_like_the_container_runtime_parses_them() {
        for ok in [
            "nginx",
            "nginx:1.27-alpine",
            "lscr.io/linuxserver/firefox:latest",
            "Registry.Example.com:5000/team/app:V1",
            "kasmweb/chrome@sha256:abc",
        ] {
            assert_eq!(invalid_reference(ok), None, "{ok}");
        }
        for bad in ["Nginx", "team/App:1", "nginx latest", ""] {
            assert!(invalid_reference(bad).is_some(), "{bad}");
        }
    }
}
