//! The patch types kube-rs sends, applied to the stored JSON. Server-side apply on a
//! main resource is `crate::apply`'s; here it only reaches `/scale`, as a merge.

use serde_json::{Map, Value};

use crate::status::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchType {
    /// RFC 6902 (`application/json-patch+json`).
    Json,
    /// RFC 7386 (`application/merge-patch+json`).
    Merge,
    /// Kubernetes strategic merge (`application/strategic-merge-patch+json`).
    StrategicMerge,
    /// Server-side apply (`application/apply-patch+yaml`; the body must be JSON, which is
    /// what kube-rs sends).
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        Some(match essence {
            "application/json-patch+json" => PatchType::Json,
            "application/merge-patch+json" => PatchType::Merge,
            "application/strategic-merge-patch+json" => PatchType::StrategicMerge,
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => PatchType::Apply,
            _ => return None,
        })
    }
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Applies a patch body to `doc`; the caller validates the result as an update.
pub(crate) fn apply(ty: PatchType, doc: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let mut out = doc.clone();
    match ty {
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            json_patch::patch(&mut out, &patch).map_err(|e| ApiError {
                code: axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                reason: "Invalid",
                message: format!(
                    "the server rejected our request due to an error in our request: {e}"
                ),
                details: None,
            })?;
        }
        PatchType::Merge => {
            let patch = parse(body)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            json_patch::merge(&mut out, &patch);
        }
        PatchType::StrategicMerge | PatchType::Apply => {
            let patch = parse(body)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("patch must be a JSON object"));
            }
            strategic_merge(&mut out, &patch);
        }
    }
    Ok(out)
}

/// The key lists of objects are merged by, for the list fields a session workload uses
/// (containers, env, ports, volumes, conditions). Other lists are replaced, as for a
/// field without a patch strategy.
fn merge_key(items: &[Value]) -> Option<&'static str> {
    ["name", "containerPort", "port", "type", "mountPath"]
        .into_iter()
        .find(|k| !items.is_empty() && items.iter().all(|i| i.get(*k).is_some()))
}

fn strategic_merge(doc: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let Value::Object(doc_map) = doc else { return };
    for (k, v) in patch_map {
        if k.starts_with('$') {
            continue; // directives such as $retainKeys and $setElementOrder are hints
        }
        match v {
            Value::Null => {
                doc_map.remove(k);
            }
            Value::Object(_) => strategic_merge(doc_map.entry(k.clone()).or_insert(Value::Null), v),
            Value::Array(items) => {
                let existing = doc_map.get(k).and_then(Value::as_array).cloned();
                let merged = match (existing, merge_key(items)) {
                    (Some(mut base), Some(key))
                        if merge_key(&base) == Some(key) || base.is_empty() =>
                    {
                        for item in items {
                            let id = item.get(key);
                            let delete =
                                item.get("$patch").and_then(Value::as_str) == Some("delete");
                            match base.iter().position(|b| b.get(key) == id) {
                                Some(i) if delete => {
                                    base.remove(i);
                                }
                                Some(i) => strategic_merge(&mut base[i], item),
                                None if delete => {}
                                None => base.push(item.clone()),
                            }
                        }
                        base
                    }
                    _ => items.clone(),
                };
                doc_map.insert(k.clone(), Value::Array(merged));
            }
            other => {
                doc_map.insert(k.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_named_lists_and_replaces_scalars() {
        let doc = json!({"spec": {"replicas": 1, "containers": [
            {"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let patch = json!({"spec": {"replicas": 0, "containers": [{"name": "b", "image": "z"}]}});
        let out = apply(
            PatchType::StrategicMerge,
            &doc,
            patch.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 0);
        assert_eq!(out["spec"]["containers"][0]["image"], "x");
        assert_eq!(out["spec"]["containers"][1]["image"], "z");
    }

    #[test]
    fn merge_patch_replaces_lists_and_json_patch_tests_fail_loudly() {
        let doc = json!({"a": [1, 2], "b": 1});
        let out = apply(PatchType::Merge, &doc, br#"{"a":[3],"b":null}"#).unwrap();
        assert_eq!(out, json!({"a": [3]}));
        let err = apply(
            PatchType::Json,
            &doc,
            br#"[{"op":"test","path":"/b","value":2}]"#,
        )
        .unwrap_err();
        assert_eq!(err.code.as_u16(), 422);
    }
}
