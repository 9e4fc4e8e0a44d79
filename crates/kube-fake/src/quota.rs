//! ResourceQuota: what a pod uses of the compute resources a quota can limit, the quota
//! admission check a pod create must pass, and the quota controller that keeps
//! `status.hard` and `status.used` current.
//!
//! Tracked resources: `pods` (and `count/pods`), `requests.cpu` and `cpu`,
//! `requests.memory` and `memory`, `limits.cpu`, `limits.memory`. A pod counts from its
//! creation until it is terminal (`Failed`/`Succeeded`) or being deleted. Other hard
//! resources are shown with `used: 0` and never enforced.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::quantity::Quantity;
use crate::resource::ResourceKind;
use crate::status::ApiError;
use crate::store::Store;

/// Quantities by resource name, sorted as the API server prints them.
pub(crate) type ResourceList = BTreeMap<String, Quantity>;

/// The compute resources a container must state when a quota tracks them.
const COMPUTE: [&str; 6] = [
    "cpu",
    "memory",
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
];

fn containers<'a>(pod: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    pod.pointer(&format!("/spec/{field}"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A container's request or limit for `resource`. A request left out defaults to the
/// limit, as pod defaulting does on a cluster.
fn container_amount(container: &Value, which: &str, resource: &str) -> Option<Quantity> {
    let read = |w: &str| {
        container
            .pointer(&format!("/resources/{w}/{resource}"))
            .and_then(|v| match v {
                Value::String(s) => Quantity::parse(s),
                Value::Number(n) => Quantity::parse(&n.to_string()),
                _ => None,
            })
    };
    match which {
        "requests" => read("requests").or_else(|| read("limits")),
        _ => read("limits"),
    }
}

/// The pod's total: the sum over its containers, or the largest init container when
/// that is larger (init containers run one at a time, before the others).
fn pod_amount(pod: &Value, which: &str, resource: &str) -> Option<Quantity> {
    let sum = containers(pod, "containers")
        .filter_map(|c| container_amount(c, which, resource))
        .reduce(Quantity::add);
    let init = containers(pod, "initContainers")
        .filter_map(|c| container_amount(c, which, resource))
        .reduce(Quantity::max);
    match (sum, init) {
        (Some(s), Some(i)) => Some(s.max(i)),
        (s, i) => s.or(i),
    }
}

/// What one pod uses of the tracked resources.
pub(crate) fn pod_usage(pod: &Value) -> ResourceList {
    let mut usage = ResourceList::new();
    usage.insert("pods".into(), Quantity::count(1));
    usage.insert("count/pods".into(), Quantity::count(1));
    for resource in ["cpu", "memory"] {
        if let Some(q) = pod_amount(pod, "requests", resource) {
            usage.insert(resource.into(), q);
            usage.insert(format!("requests.{resource}"), q);
        }
        if let Some(q) = pod_amount(pod, "limits", resource) {
            usage.insert(format!("limits.{resource}"), q);
        }
    }
    usage
}

/// Whether a pod still counts against quota. A real cluster stops counting a pod being
/// deleted only once its grace period is over; the stand-in has no grace periods.
fn counts(pod: &Value) -> bool {
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    pod.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(phase, Some("Failed") | Some("Succeeded"))
}

/// What the counted pods of `namespace` use together.
fn namespace_usage(store: &Store, namespace: &str) -> ResourceList {
    let mut total = ResourceList::new();
    for pod in store
        .list(ResourceKind::Pod, Some(namespace))
        .into_iter()
        .filter(|p| counts(p))
    {
        for (resource, q) in pod_usage(pod) {
            let sum = total.get(&resource).map_or(q, |t| t.add(q));
            total.insert(resource, sum);
        }
    }
    total
}

/// `spec.hard` parsed; entries that are not quantities are skipped (validation refuses
/// them on write).
fn hard_of(quota: &Value) -> ResourceList {
    quota
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(name, v)| {
            let q = match v {
                Value::String(s) => Quantity::parse(s),
                Value::Number(n) => Quantity::parse(&n.to_string()),
                _ => None,
            }?;
            Some((name.clone(), q))
        })
        .collect()
}

/// `limits.memory=2Gi,requests.memory=2Gi`, as the quota admission prints a list.
fn pretty(list: &ResourceList, names: &[&String]) -> String {
    names
        .iter()
        .map(|n| format!("{n}={}", list.get(*n).copied().unwrap_or(Quantity::ZERO)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The compute resources a quota tracks that some container of the pod leaves out.
fn missing_resources(pod: &Value, hard: &ResourceList) -> Vec<String> {
    let mut missing: Vec<String> = Vec::new();
    for resource in COMPUTE.iter().filter(|r| hard.contains_key(**r)) {
        let (which, name) = match resource.split_once('.') {
            Some((which, name)) => (which, name),
            None => ("requests", *resource),
        };
        let stated = containers(pod, "containers")
            .chain(containers(pod, "initContainers"))
            .all(|c| container_amount(c, which, name).is_some());
        if !stated {
            missing.push((*resource).to_owned());
        }
    }
    missing
}

/// The quota admission of a pod create: every quota in the namespace must have room for
/// the pod. The error is the API server's, word for word.
pub(crate) fn admit(store: &Store, namespace: &str, pod: &Value) -> Result<(), ApiError> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let requested = pod_usage(pod);
    let mut used: Option<ResourceList> = None;
    for quota in store.list(ResourceKind::ResourceQuota, Some(namespace)) {
        let quota_name = quota
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let hard = hard_of(quota);
        let missing = missing_resources(pod, &hard);
        if !missing.is_empty() {
            return Err(ApiError::admission_forbidden(
                ResourceKind::Pod,
                name,
                &format!(
                    "failed quota: {quota_name}: must specify {}",
                    missing.join(",")
                ),
            ));
        }
        let used = used.get_or_insert_with(|| namespace_usage(store, namespace));
        let exceeded: Vec<&String> = requested
            .iter()
            .filter(|(resource, req)| {
                hard.get(*resource).is_some_and(|limit| {
                    let now = used.get(*resource).copied().unwrap_or(Quantity::ZERO);
                    now.add(**req) > *limit
                })
            })
            .map(|(resource, _)| resource)
            .collect();
        if !exceeded.is_empty() {
            return Err(ApiError::admission_forbidden(
                ResourceKind::Pod,
                name,
                &format!(
                    "exceeded quota: {quota_name}, requested: {}, used: {}, limited: {}",
                    pretty(&requested, &exceeded),
                    pretty(used, &exceeded),
                    pretty(&hard, &exceeded),
                ),
            ));
        }
    }
    Ok(())
}

fn render(list: impl Iterator<Item = (String, Quantity)>) -> Value {
    Value::Object(
        list.map(|(k, q)| (k, json!(q.to_string())))
            .collect::<Map<_, _>>(),
    )
}

/// The quota controller: `status.hard` mirrors `spec.hard` and `status.used` what the
/// namespace's counted pods use, both in canonical form. Returns whether anything changed.
pub(crate) fn sync_status(store: &mut Store) -> bool {
    let mut changed = false;
    for key in store.keys(ResourceKind::ResourceQuota) {
        let Some(quota) = store.get(&key).cloned() else {
            continue;
        };
        let hard = hard_of(&quota);
        let usage = namespace_usage(store, &key.1);
        let used = hard.keys().map(|k| {
            let q = usage.get(k).copied().unwrap_or(Quantity::ZERO);
            (k.clone(), q)
        });
        let status = json!({
            "hard": render(hard.iter().map(|(k, q)| (k.clone(), *q))),
            "used": render(used),
        });
        if quota.get("status") != Some(&status) {
            let mut new = quota;
            new["status"] = status;
            store.update(ResourceKind::ResourceQuota, new);
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(requests: Value, limits: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "resources": {"requests": requests, "limits": limits}},
        ]}})
    }

    #[test]
    fn usage_sums_containers_and_defaults_requests_to_limits() {
        let p = json!({"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}}},
            {"name": "b", "resources": {"requests": {"memory": "512Mi"}, "limits": {"memory": "512Mi"}}},
        ], "initContainers": [
            {"name": "i", "resources": {"limits": {"memory": "4Gi"}}},
        ]}});
        let usage = pod_usage(&p);
        assert_eq!(usage["pods"].to_string(), "1");
        assert_eq!(usage["requests.memory"].to_string(), "4Gi", "init max");
        assert_eq!(usage["memory"].to_string(), "4Gi");
        assert_eq!(usage["requests.cpu"].to_string(), "500m");
        assert_eq!(usage["limits.cpu"].to_string(), "500m");
    }

    #[test]
    fn a_container_without_a_tracked_resource_is_missing_it() {
        let hard: ResourceList = [("limits.memory".to_owned(), Quantity::count(1))].into();
        let without = pod(json!({"memory": "1Gi"}), json!({}));
        assert_eq!(missing_resources(&without, &hard), ["limits.memory"]);
        let with = pod(json!({}), json!({"memory": "1Gi"}));
        assert!(missing_resources(&with, &hard).is_empty());
    }
}
