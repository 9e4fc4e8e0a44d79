//! Field sets as server-side apply tracks them: the leaf paths of an object, in the
//! tokens of `metadata.managedFields[].fieldsV1` (`f:name` a field, `k:{"name":"x"}` a
//! list item by its key, `v:"x"` a member of a set-like list, `.` the list item itself),
//! the diff of two objects in those terms, and the list semantics the merge follows.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A path of `fieldsV1` tokens from the object's root.
pub(crate) type Path = Vec<String>;
/// A set of owned paths; leaves only, plus `.` markers for list items.
pub(crate) type FieldSet = BTreeSet<Path>;

/// How a list merges and is owned, as the Kubernetes schemas declare it for the fields
/// a session workload uses. Lists not named here are atomic: owned and replaced whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListKind {
    /// Items identified by one key field (`containers` by `name`).
    Keyed(&'static str),
    /// Scalars with set semantics (`finalizers`).
    Set,
    Atomic,
}

/// The list semantics of the list at `path`.
pub(crate) fn list_kind(path: &[String]) -> ListKind {
    let field = path
        .last()
        .map_or("", |t| t.strip_prefix("f:").unwrap_or(""));
    let in_item = path
        .len()
        .checked_sub(2)
        .is_some_and(|i| path[i].starts_with("k:"));
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => ListKind::Keyed("name"),
        "volumeMounts" => ListKind::Keyed("mountPath"),
        // Container ports sit inside a container item; a Service's directly in its spec.
        "ports" if in_item => ListKind::Keyed("containerPort"),
        "ports" => ListKind::Keyed("port"),
        "conditions" => ListKind::Keyed("type"),
        "ownerReferences" => ListKind::Keyed("uid"),
        "finalizers" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// The list's kind, falling back to atomic when an item lacks the key (such a list is
/// invalid on a cluster; here it is simply replaced whole).
fn effective_kind(path: &[String], lists: &[&[Value]]) -> ListKind {
    match list_kind(path) {
        ListKind::Keyed(key) if lists.iter().all(|l| l.iter().all(|i| i.get(key).is_some())) => {
            ListKind::Keyed(key)
        }
        ListKind::Keyed(_) => ListKind::Atomic,
        other => other,
    }
}

/// `k:{"name":"x"}` for an item of a keyed list.
pub(crate) fn key_token(key: &str, item: &Value) -> String {
    let mut map = Map::new();
    map.insert(
        key.to_owned(),
        item.get(key).cloned().unwrap_or(Value::Null),
    );
    format!("k:{}", Value::Object(map))
}

/// `v:"x"` for a member of a set-like list.
pub(crate) fn value_token(item: &Value) -> String {
    format!("v:{item}")
}

fn child(path: &[String], token: String) -> Path {
    let mut p = path.to_vec();
    p.push(token);
    p
}

/// The parts of an object field ownership covers: for the main resource its spec (and
/// any other top-level data) and the metadata a client sets; for `/status`, the status.
/// Identity and server-set metadata are nobody's.
pub(crate) fn tracked_view(object: &Value, status: bool) -> Value {
    let Some(map) = object.as_object() else {
        return json!({});
    };
    let mut view = Map::new();
    for (k, v) in map {
        match k.as_str() {
            "status" if status => {
                view.insert(k.clone(), v.clone());
            }
            "apiVersion" | "kind" | "status" => {}
            "metadata" if !status => {
                let mut meta = Map::new();
                for f in ["labels", "annotations", "ownerReferences", "finalizers"] {
                    if let Some(x) = v.get(f) {
                        meta.insert(f.to_owned(), x.clone());
                    }
                }
                if !meta.is_empty() {
                    view.insert(k.clone(), Value::Object(meta));
                }
            }
            _ if !status => {
                view.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    Value::Object(view)
}

/// Every leaf path `value` sets under `path`. Nulls set nothing, and nobody owns the
/// root itself.
pub(crate) fn collect(value: &Value, path: &[String], out: &mut FieldSet) {
    match value {
        Value::Null => {}
        _ if path.is_empty() && !value.is_object() => {}
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                collect(v, &child(path, format!("f:{k}")), out);
            }
        }
        Value::Array(items) => match effective_kind(path, &[items]) {
            ListKind::Keyed(key) => {
                for item in items {
                    let item_path = child(path, key_token(key, item));
                    out.insert(child(&item_path, ".".into()));
                    collect(item, &item_path, out);
                }
            }
            ListKind::Set => {
                for item in items {
                    out.insert(child(path, value_token(item)));
                }
            }
            ListKind::Atomic => {
                out.insert(path.to_vec());
            }
        },
        _ if path.is_empty() => {}
        _ => {
            out.insert(path.to_vec());
        }
    }
}

/// The fields of a whole object (see [`tracked_view`]).
#[cfg(test)]
fn fields_of(object: &Value, status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    collect(&tracked_view(object, status), &[], &mut out);
    out
}

/// What changed from `old` to `new`: `touched` are the paths whose value changed, was
/// added or went away (whoever owned them loses them); `added` the leaves `new` sets
/// there (the writer of an update owns them).
pub(crate) fn diff(
    old: &Value,
    new: &Value,
    path: &[String],
    touched: &mut Vec<Path>,
    added: &mut FieldSet,
) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            // An empty map is a leaf of its own: filling or emptying it changes it. (The
            // root is nobody's, so it is never reported.)
            if a.is_empty() != b.is_empty() && !path.is_empty() {
                touched.push(path.to_vec());
                if b.is_empty() {
                    added.insert(path.to_vec());
                }
            }
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = child(path, format!("f:{k}"));
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(x, y, &p, touched, added),
                    (Some(_), None) => touched.push(p),
                    (None, Some(y)) => {
                        touched.push(p.clone());
                        collect(y, &p, added);
                    }
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => match effective_kind(path, &[a, b]) {
            ListKind::Keyed(key) => {
                let token = |i: &Value| key_token(key, i);
                for x in a {
                    let p = child(path, token(x));
                    match b.iter().find(|y| token(y) == token(x)) {
                        Some(y) => diff(x, y, &p, touched, added),
                        None => touched.push(p),
                    }
                }
                for y in b.iter().filter(|y| !a.iter().any(|x| token(x) == token(y))) {
                    let p = child(path, token(y));
                    touched.push(p.clone());
                    added.insert(child(&p, ".".into()));
                    collect(y, &p, added);
                }
            }
            ListKind::Set => {
                for x in a.iter().filter(|x| !b.contains(x)) {
                    touched.push(child(path, value_token(x)));
                }
                for y in b.iter().filter(|y| !a.contains(y)) {
                    let p = child(path, value_token(y));
                    touched.push(p.clone());
                    added.insert(p);
                }
            }
            ListKind::Atomic => {
                touched.push(path.to_vec());
                collect(new, path, added);
            }
        },
        _ if path.is_empty() => {}
        _ => {
            touched.push(path.to_vec());
            collect(new, path, added);
        }
    }
}

/// Whether two paths overlap: one is the other or lies inside it.
pub(crate) fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The `fieldsV1` tree of a set: nested objects of tokens, `{}` at the leaves.
pub(crate) fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for token in path {
            let next = node
                .entry(token.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !next.is_object() {
                *next = Value::Object(Map::new());
            }
            let Value::Object(map) = next else { break };
            node = map;
        }
    }
    Value::Object(root)
}

/// The set a `fieldsV1` tree describes.
pub(crate) fn from_fields_v1(tree: &Value) -> FieldSet {
    fn walk(node: &Map<String, Value>, path: &mut Path, out: &mut FieldSet) {
        for (token, sub) in node {
            path.push(token.clone());
            match sub.as_object() {
                Some(map) if !map.is_empty() => walk(map, path, out),
                _ => {
                    out.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    if let Some(map) = tree.as_object() {
        walk(map, &mut Vec::new(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(tokens: &[&str]) -> Path {
        tokens.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn keyed_lists_own_items_and_their_fields() {
        let object = json!({"metadata": {"name": "x", "labels": {"a": "1"}, "finalizers": ["f"]},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}],
                                     "args": ["x"]}]}});
        let set = fields_of(&object, false);
        let c = r#"k:{"name":"c"}"#;
        assert!(set.contains(&p(&["f:metadata", "f:labels", "f:a"])));
        assert!(set.contains(&p(&["f:metadata", r#"f:finalizers"#, r#"v:"f""#])));
        assert!(set.contains(&p(&["f:spec", "f:containers", c, "."])));
        assert!(set.contains(&p(&["f:spec", "f:containers", c, "f:image"])));
        assert!(set.contains(&p(&["f:spec", "f:containers", c, "f:args"])));
        assert!(set.contains(&p(&[
            "f:spec",
            "f:containers",
            c,
            "f:ports",
            r#"k:{"containerPort":80}"#,
            "f:containerPort"
        ])));
        assert!(
            !set.iter()
                .any(|p| p.contains(&"f:name".to_owned()) && p.len() == 2)
        );
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
    }

    #[test]
    fn diff_reports_changed_added_and_removed_paths() {
        let old = json!({"spec": {"replicas": 1, "containers": [{"name": "a", "image": "x"}]}});
        let new = json!({"spec": {"replicas": 2, "containers": [{"name": "b", "image": "y"}]}});
        let (mut touched, mut added) = (Vec::new(), FieldSet::new());
        diff(&old, &new, &[], &mut touched, &mut added);
        assert!(touched.contains(&p(&["f:spec", "f:replicas"])));
        assert!(touched.contains(&p(&["f:spec", "f:containers", r#"k:{"name":"a"}"#])));
        assert!(added.contains(&p(&[
            "f:spec",
            "f:containers",
            r#"k:{"name":"b"}"#,
            "f:image"
        ])));
        assert!(!added.iter().any(|p| p.iter().any(|t| t.contains(r#""a""#))));
    }
}
