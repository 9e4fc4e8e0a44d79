//! Server-side apply and the `metadata.managedFields` every client write keeps.
//!
//! Each entry is one field manager's claim: `operation: Apply` entries hold exactly the
//! fields the manager applied last; `operation: Update` entries the fields that
//! manager's creates, replaces and patches set. A write takes the fields it changes away
//! from every other entry, as on a cluster. An apply removes the fields its manager
//! applied last time but no longer applies (unless another manager owns them too), then
//! merges the new configuration. Conflicts are not modelled: every apply is forced.

use serde_json::{Map, Value, json};

use crate::fields::{self, FieldSet, ListKind, Path};
use crate::store::now;

/// Who writes and how, for `managedFields`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Writer<'a> {
    /// The `fieldManager` query parameter, or what the API server derives from the
    /// client's user agent when it is absent.
    pub manager: &'a str,
    pub apply: bool,
    /// `status` or `scale` for writes through a subresource.
    pub subresource: Option<&'static str>,
}

/// One `managedFields` entry, parsed.
#[derive(Clone, Debug)]
struct Entry {
    raw: Value,
    manager: String,
    apply: bool,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn is(&self, writer: &Writer<'_>) -> bool {
        self.manager == writer.manager
            && self.apply == writer.apply
            && self.subresource.as_deref() == writer.subresource
    }
}

fn entries(object: &Value) -> Vec<Entry> {
    object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|raw| Entry {
            manager: raw["manager"].as_str().unwrap_or_default().to_owned(),
            apply: raw["operation"] == "Apply",
            subresource: raw["subresource"].as_str().map(str::to_owned),
            fields: fields::from_fields_v1(&raw["fieldsV1"]),
            raw: raw.clone(),
        })
        .collect()
}

fn render(entry: &Entry, api_version: &Value) -> Value {
    let mut raw = json!({
        "manager": entry.manager,
        "operation": if entry.apply { "Apply" } else { "Update" },
        "apiVersion": api_version,
        "time": now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields::to_fields_v1(&entry.fields),
    });
    if let Some(sub) = &entry.subresource {
        raw["subresource"] = json!(sub);
    }
    raw
}

/// Updates `new`'s `managedFields` for a write from `old` (`None` on create). `applied`
/// is the applied configuration's field set on an apply. Entries nothing happened to
/// are kept as they were, timestamps included, so a write that changes nothing stays a
/// no-op.
pub(crate) fn record(
    old: Option<&Value>,
    new: &mut Value,
    writer: &Writer<'_>,
    applied: Option<FieldSet>,
) {
    let status = writer.subresource == Some("status");
    let empty = json!({});
    let before = fields::tracked_view(old.unwrap_or(&empty), status);
    let after = fields::tracked_view(new, status);
    let (mut touched, mut added) = (Vec::new(), FieldSet::new());
    fields::diff(&before, &after, &[], &mut touched, &mut added);

    let mut list = old.map(entries).unwrap_or_default();
    let mut changed = false;
    for entry in list.iter_mut().filter(|e| !e.is(writer)) {
        let before = entry.fields.len();
        entry
            .fields
            .retain(|f| !touched.iter().any(|t| fields::overlaps(f, t)));
        if entry.fields.len() != before {
            entry.raw = Value::Null;
            changed = true;
        }
    }
    let mine = match list.iter().position(|e| e.is(writer)) {
        Some(i) => i,
        None => {
            list.push(Entry {
                raw: Value::Null,
                manager: writer.manager.to_owned(),
                apply: writer.apply,
                subresource: writer.subresource.map(str::to_owned),
                fields: FieldSet::new(),
            });
            list.len() - 1
        }
    };
    let own = match applied {
        Some(set) => set,
        None => {
            let mut set = list[mine].fields.clone();
            set.retain(|f| !touched.iter().any(|t| fields::overlaps(f, t)));
            set.extend(added);
            set
        }
    };
    if own != list[mine].fields {
        list[mine].fields = own;
        list[mine].raw = Value::Null;
        changed = true;
    }
    if !changed {
        match old.and_then(|o| o.pointer("/metadata/managedFields")) {
            Some(kept) => new["metadata"]["managedFields"] = kept.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove("managedFields");
                }
            }
        }
        return;
    }
    let api_version = new.get("apiVersion").cloned().unwrap_or(Value::Null);
    let rendered: Vec<Value> = list
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| match &e.raw {
            Value::Null => render(e, &api_version),
            raw => raw.clone(),
        })
        .collect();
    if rendered.is_empty() {
        if let Some(m) = new["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        new["metadata"]["managedFields"] = Value::Array(rendered);
    }
}

/// The result of applying `config` as `manager` to `live` (`{}` when the object does not
/// exist yet), and the field set the manager owns afterwards.
pub(crate) fn apply(live: &Value, config: &Value, manager: &str) -> (Value, FieldSet) {
    let view = fields::tracked_view(config, false);
    let mut applied = FieldSet::new();
    fields::collect(&view, &[], &mut applied);

    let all = entries(live);
    let previous = all
        .iter()
        .find(|e| e.manager == manager && e.apply && e.subresource.is_none())
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: FieldSet = all
        .iter()
        .filter(|e| !(e.manager == manager && e.apply && e.subresource.is_none()))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();

    let mut result = live.clone();
    let mut dropped: Vec<&Path> = previous
        .iter()
        .filter(|f| !applied.contains(*f) && !others.contains(*f))
        .collect();
    // Deepest first, so an item's fields go before the item.
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in dropped {
        if path.last().is_some_and(|t| t == ".") {
            let item = &path[..path.len() - 1];
            if others.iter().any(|o| o.starts_with(item)) {
                continue; // another manager still owns part of the item
            }
            remove(&mut result, item);
        } else {
            remove(&mut result, path);
        }
    }
    merge(&mut result, &view, &[]);
    for field in ["apiVersion", "kind"] {
        if let Some(v) = config.get(field) {
            result[field] = v.clone();
        }
    }
    for field in ["name", "namespace", "resourceVersion"] {
        if let Some(v) = config.pointer(&format!("/metadata/{field}")) {
            result["metadata"][field] = v.clone();
        }
    }
    (result, applied)
}

/// Finds the index of the list item a `k:` or `v:` token names.
fn find_item(items: &[Value], token: &str) -> Option<usize> {
    if let Some(key) = token.strip_prefix("k:") {
        let wanted: Map<String, Value> = serde_json::from_str(key).ok()?;
        items
            .iter()
            .position(|i| wanted.iter().all(|(k, v)| i.get(k) == Some(v)))
    } else {
        let wanted: Value = serde_json::from_str(token.strip_prefix("v:")?).ok()?;
        items.iter().position(|i| *i == wanted)
    }
}

/// Removes the value at `path`, and any map or list the removal leaves empty. A key
/// field of a list item is never removed on its own: the item goes whole or not at all.
fn remove(root: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    if let Some(parent_token) = parent_path.last()
        && parent_token.starts_with("k:")
        && last
            .strip_prefix("f:")
            .is_some_and(|f| parent_token.contains(&format!("{{\"{f}\":")))
    {
        return;
    }
    let Some(parent) = navigate(root, parent_path) else {
        return;
    };
    let removed = match parent {
        Value::Object(map) => last
            .strip_prefix("f:")
            .is_some_and(|f| map.remove(f).is_some()),
        Value::Array(items) => match find_item(items, last) {
            Some(i) => {
                items.remove(i);
                true
            }
            None => false,
        },
        _ => false,
    };
    let now_empty = match parent {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    // Emptied containers go too, but never the top-level `spec` or `metadata`.
    if removed && now_empty && parent_path.len() > 1 {
        remove(root, parent_path);
    }
}

fn navigate<'a>(root: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut node = root;
    for token in path {
        node = match node {
            Value::Object(map) => map.get_mut(token.strip_prefix("f:")?)?,
            Value::Array(items) => {
                let i = find_item(items, token)?;
                items.get_mut(i)?
            }
            _ => return None,
        };
    }
    Some(node)
}

/// Merges an applied configuration into the live object: maps field by field, keyed
/// lists item by item, set-like lists as a union, anything else replaced.
fn merge(dst: &mut Value, src: &Value, path: &[String]) {
    match src {
        Value::Object(map) => {
            if !dst.is_object() {
                *dst = Value::Object(Map::new());
            }
            let Value::Object(target) = dst else { return };
            for (k, v) in map {
                if v.is_null() {
                    target.remove(k);
                    continue;
                }
                let mut p = path.to_vec();
                p.push(format!("f:{k}"));
                merge(target.entry(k.clone()).or_insert(Value::Null), v, &p);
            }
        }
        Value::Array(items) => match fields::list_kind(path) {
            ListKind::Keyed(key) if items.iter().all(|i| i.get(key).is_some()) => {
                if !dst
                    .as_array()
                    .is_some_and(|d| d.iter().all(|i| i.get(key).is_some()))
                {
                    *dst = Value::Array(Vec::new());
                }
                let Value::Array(target) = dst else { return };
                for item in items {
                    let token = fields::key_token(key, item);
                    let mut p = path.to_vec();
                    p.push(token.clone());
                    match find_item(target, &token) {
                        Some(i) => merge(&mut target[i], item, &p),
                        None => target.push(item.clone()),
                    }
                }
            }
            ListKind::Set => {
                if !dst.is_array() {
                    *dst = Value::Array(Vec::new());
                }
                let Value::Array(target) = dst else { return };
                for item in items {
                    if !target.contains(item) {
                        target.push(item.clone());
                    }
                }
            }
            _ => *dst = src.clone(),
        },
        other => *dst = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(labels: Value, containers: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "d", "labels": labels},
               "spec": {"replicas": 1, "template": {"spec": {"containers": containers}}}})
    }

    fn applied_by(object: &mut Value, old: Option<&Value>, manager: &str, set: FieldSet) {
        record(
            old,
            object,
            &Writer {
                manager,
                apply: true,
                subresource: None,
            },
            Some(set),
        );
    }

    #[test]
    fn a_field_no_longer_applied_is_removed_and_others_are_kept() {
        let first = deployment(
            json!({"a": "1", "b": "2"}),
            json!([{"name": "app", "image": "x", "env": [{"name": "E", "value": "1"}]},
                   {"name": "side", "image": "y"}]),
        );
        let (mut live, set) = apply(&json!({}), &first, "mgr");
        applied_by(&mut live, None, "mgr", set);
        // Someone else's label stays when the manager stops applying its own.
        live["metadata"]["labels"]["other"] = json!("3");
        let second = deployment(json!({"a": "1"}), json!([{"name": "app", "image": "x2"}]));
        let (out, _) = apply(&live, &second, "mgr");
        assert_eq!(out["metadata"]["labels"], json!({"a": "1", "other": "3"}));
        let containers = out.pointer("/spec/template/spec/containers").unwrap();
        assert_eq!(containers.as_array().unwrap().len(), 1, "{containers}");
        assert_eq!(containers[0]["image"], "x2");
        assert!(containers[0].get("env").is_none(), "{containers}");
    }

    #[test]
    fn a_first_status_write_takes_nothing_from_the_spec_owners() {
        let config = deployment(json!({"a": "1"}), json!([{"name": "app", "image": "x"}]));
        let (mut live, set) = apply(&json!({}), &config, "mgr");
        applied_by(&mut live, None, "mgr", set.clone());
        let mut with_status = live.clone();
        with_status["status"] = json!({"replicas": 1});
        record(
            Some(&live),
            &mut with_status,
            &Writer {
                manager: "controller",
                apply: false,
                subresource: Some("status"),
            },
            None,
        );
        let entries = entries(&with_status);
        assert_eq!(entries[0].fields, set, "the applier keeps its fields");
        assert_eq!(entries[1].subresource.as_deref(), Some("status"));
        assert_eq!(
            entries[1].fields.iter().collect::<Vec<_>>(),
            [&vec!["f:status".to_owned(), "f:replicas".to_owned()]]
        );
    }

    #[test]
    fn an_update_takes_the_fields_it_changes_from_the_applier() {
        let config = deployment(json!({"a": "1"}), json!([{"name": "app", "image": "x"}]));
        let (mut live, set) = apply(&json!({}), &config, "mgr");
        applied_by(&mut live, None, "mgr", set);
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(0);
        record(
            Some(&live),
            &mut scaled,
            &Writer {
                manager: "agent",
                apply: false,
                subresource: Some("scale"),
            },
            None,
        );
        let managed = scaled["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(managed.len(), 2, "{managed:?}");
        assert_eq!(managed[1]["operation"], "Update");
        assert_eq!(managed[1]["subresource"], "scale");
        assert_eq!(
            managed[1]["fieldsV1"],
            json!({"f:spec": {"f:replicas": {}}})
        );
        assert!(managed[0]["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        // The applier re-applies without replicas: the scaled value stays.
        let without = {
            let mut c = config.clone();
            c["spec"].as_object_mut().unwrap().remove("replicas");
            c
        };
        let (out, _) = apply(&scaled, &without, "mgr");
        assert_eq!(out["spec"]["replicas"], 0);
    }
}
