//! Admission as the API server's built-in validation and defaulting do it, for the fields
//! a session workload uses. Anything not checked here is accepted as written.

use serde_json::{Map, Value, json};

use crate::resource::ResourceKind;
use crate::status::{ApiError, Cause};

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUANTITY_MSG: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

/// A resource quantity such as `512Mi`, `250m`, `1.5` or `1e3`.
pub(crate) fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|exp| exp.strip_prefix(['+', '-']).unwrap_or(exp))
        .is_some_and(|exp| !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit()));
    number_ok && suffix_ok
}

/// Checks that the body is a JSON object of the path's kind, the way the decoder does.
pub(crate) fn check_type(kind: ResourceKind, object: &Value) -> Result<(), ApiError> {
    let Some(map) = object.as_object() else {
        return Err(ApiError::bad_request(format!(
            "{} in version \"v1\" cannot be handled as a {}: the body is not a JSON object",
            kind.kind(),
            kind.kind()
        )));
    };
    if let Some(v) = map.get("apiVersion").and_then(Value::as_str)
        && v != kind.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({})",
            kind.api_version()
        )));
    }
    if let Some(k) = map.get("kind").and_then(Value::as_str)
        && k != kind.kind()
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            kind.kind()
        )));
    }
    check_quantities(kind, object)
}

/// Quantities are parsed while decoding, so a malformed one is a 400, not a 422.
fn check_quantities(kind: ResourceKind, object: &Value) -> Result<(), ApiError> {
    let mut maps: Vec<&Value> = Vec::new();
    let containers = match kind {
        ResourceKind::Deployment => object.pointer("/spec/template/spec/containers"),
        ResourceKind::Pod => object.pointer("/spec/containers"),
        _ => None,
    };
    for c in containers.and_then(Value::as_array).into_iter().flatten() {
        maps.extend(c.pointer("/resources/requests"));
        maps.extend(c.pointer("/resources/limits"));
    }
    if kind == ResourceKind::PersistentVolumeClaim {
        maps.extend(object.pointer("/spec/resources/requests"));
    }
    if kind == ResourceKind::ResourceQuota {
        maps.extend(object.pointer("/spec/hard"));
    }
    for map in maps.into_iter().filter_map(Value::as_object) {
        for q in map.values() {
            let ok = match q {
                Value::String(s) => is_quantity(s),
                Value::Number(_) => true,
                _ => false,
            };
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "{} in version \"v1\" cannot be handled as a {}: {QUANTITY_MSG}",
                    kind.kind(),
                    kind.kind()
                )));
            }
        }
    }
    Ok(())
}

fn check_metadata(kind: ResourceKind, object: &Value, causes: &mut Vec<Cause>) {
    let name = object.pointer("/metadata/name").and_then(Value::as_str);
    match name {
        None | Some("") => causes.push(Cause {
            reason: "FieldValueRequired",
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        }),
        Some(name) => {
            let (ok, msg) = match kind {
                ResourceKind::Service => (is_dns1035_label(name), DNS1035_LABEL_MSG),
                _ => (is_dns1123_subdomain(name), DNS1123_SUBDOMAIN_MSG),
            };
            if !ok {
                causes.push(Cause::invalid("metadata.name", &json!(name), msg));
            }
        }
    }
    check_labels(
        "metadata.labels",
        object.pointer("/metadata/labels"),
        causes,
    );
}

fn check_labels(field: &str, labels: Option<&Value>, causes: &mut Vec<Cause>) {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in labels {
        if !is_label_key(k) {
            causes.push(Cause::invalid(
                field,
                &json!(k),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        match v.as_str() {
            Some(s) if is_label_value(s) => {}
            _ => causes.push(Cause::invalid(field, v, LABEL_VALUE_MSG)),
        }
    }
}

fn check_containers(path: &str, spec: Option<&Value>, causes: &mut Vec<Cause>) {
    let containers = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        causes.push(Cause::required(format!("{path}.containers")));
        return;
    };
    for (i, c) in containers.iter().enumerate() {
        let at = format!("{path}.containers[{i}]");
        match c.get("name").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required(format!("{at}.name"))),
            Some(n) if !is_dns1123_label(n) => causes.push(Cause::invalid(
                format!("{at}.name"),
                &json!(n),
                DNS1123_LABEL_MSG,
            )),
            Some(_) => {}
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            causes.push(Cause::required(format!("{at}.image")));
        }
        for (j, p) in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                causes.push(Cause::invalid(
                    format!("{at}.ports[{j}].containerPort"),
                    &json!(port),
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
    }
}

/// Full validation of a create or update; `old` is the stored object on update.
pub(crate) fn validate(kind: ResourceKind, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    check_metadata(kind, object, &mut causes);
    match kind {
        ResourceKind::Deployment => validate_deployment(object, old, &mut causes),
        ResourceKind::Service => validate_service(object, old, &mut causes),
        ResourceKind::PersistentVolumeClaim => validate_pvc(object, old, &mut causes),
        ResourceKind::Pod => check_containers("spec", object.get("spec"), &mut causes),
        ResourceKind::ResourceQuota => validate_quota(object, &mut causes),
    }
    causes
}

fn validate_quota(object: &Value, causes: &mut Vec<Cause>) {
    for (name, value) in object
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let negative = match value {
            Value::String(s) => s.trim_start().starts_with('-'),
            Value::Number(n) => n.as_f64().is_some_and(|n| n < 0.0),
            _ => false,
        };
        if negative {
            causes.push(Cause::invalid(
                format!("spec.hard[{name}]"),
                value,
                "must be greater than or equal to 0",
            ));
        }
    }
}

fn validate_deployment(object: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    if let Some(r) = object.pointer("/spec/replicas").and_then(Value::as_i64)
        && r < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &json!(r),
            "must be greater than or equal to 0",
        ));
    }
    let selector = object.pointer("/spec/selector");
    let match_labels = selector
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object);
    let has_expressions = selector
        .and_then(|s| s.get("matchExpressions"))
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty());
    if match_labels.is_none_or(Map::is_empty) && !has_expressions {
        causes.push(Cause::required("spec.selector"));
    }
    let template_labels = object.pointer("/spec/template/metadata/labels");
    check_labels("spec.template.metadata.labels", template_labels, causes);
    if let Some(wanted) = match_labels {
        let labels = template_labels.and_then(Value::as_object);
        let matches = wanted
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        if !matches {
            causes.push(Cause::invalid(
                "spec.template.metadata.labels",
                template_labels.unwrap_or(&Value::Null),
                "`selector` does not match template `labels`",
            ));
        }
    }
    check_containers(
        "spec.template.spec",
        object.pointer("/spec/template/spec"),
        causes,
    );
    if let Some(policy) = object
        .pointer("/spec/template/spec/restartPolicy")
        .and_then(Value::as_str)
        && policy != "Always"
    {
        causes.push(Cause::not_supported(
            "spec.template.spec.restartPolicy",
            &json!(policy),
            &["Always"],
        ));
    }
    if let Some(old) = old
        && old.pointer("/spec/selector") != selector
    {
        causes.push(Cause::immutable(
            "spec.selector",
            selector.unwrap_or(&Value::Null),
        ));
    }
}

fn validate_service(object: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let ty = object
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    const TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !TYPES.contains(&ty) {
        causes.push(Cause::not_supported("spec.type", &json!(ty), &TYPES));
    }
    let ports = object.pointer("/spec/ports").and_then(Value::as_array);
    if ty != "ExternalName" && ports.is_none_or(Vec::is_empty) {
        causes.push(Cause::required("spec.ports"));
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &json!(port),
                "must be between 1 and 65535, inclusive",
            ));
        }
    }
    if let Some(old) = old {
        let old_ip = old.pointer("/spec/clusterIP");
        let new_ip = object.pointer("/spec/clusterIP");
        if new_ip.is_some() && new_ip != old_ip {
            causes.push(Cause::immutable(
                "spec.clusterIPs[0]",
                new_ip.unwrap_or(&Value::Null),
            ));
        }
    }
}

fn validate_pvc(object: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    if object
        .pointer("/spec/accessModes")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        causes.push(Cause::required("spec.accessModes"));
    }
    if object.pointer("/spec/resources/requests/storage").is_none() {
        causes.push(Cause::required("spec.resources[storage]"));
    }
    if let Some(old) = old {
        // Only the storage request may change after creation (volume expansion).
        let strip = |v: &Value| {
            let mut spec = v.get("spec").cloned().unwrap_or(Value::Null);
            if let Some(s) = spec.as_object_mut() {
                s.remove("resources");
                s.remove("volumeName");
            }
            spec
        };
        if strip(old) != strip(object) {
            causes.push(Cause {
                reason: "FieldValueForbidden",
                field: "spec".into(),
                message: "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into(),
            });
        }
    }
}

fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.entry(key.to_owned()).or_insert(value);
}

fn default_pod_spec(spec: &mut Value) {
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "securityContext", json!({}));
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split_once(':'));
            let pull = match tag {
                None | Some((_, "latest")) => "Always",
                Some(_) => "IfNotPresent",
            };
            set_default(c, "imagePullPolicy", json!(pull));
            set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_default(c, "terminationMessagePolicy", json!("File"));
            set_default(c, "resources", json!({}));
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    set_default(p, "protocol", json!("TCP"));
                }
            }
        }
    }
}

/// The defaults the API server fills in on write, so clients read back what a cluster
/// would show them.
pub(crate) fn apply_defaults(kind: ResourceKind, object: &mut Value) {
    let Some(spec) = object
        .as_object_mut()
        .map(|o| o.entry("spec").or_insert_with(|| json!({})))
    else {
        return;
    };
    match kind {
        ResourceKind::Deployment => {
            if let Some(map) = spec.as_object_mut() {
                set_default(map, "replicas", json!(1));
                set_default(map, "revisionHistoryLimit", json!(10));
                set_default(map, "progressDeadlineSeconds", json!(600));
                set_default(
                    map,
                    "strategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
                );
            }
            if let Some(pod_spec) = spec.pointer_mut("/template/spec") {
                default_pod_spec(pod_spec);
            }
        }
        ResourceKind::Pod => default_pod_spec(spec),
        ResourceKind::Service => {
            if let Some(map) = spec.as_object_mut() {
                set_default(map, "type", json!("ClusterIP"));
                set_default(map, "sessionAffinity", json!("None"));
                set_default(map, "ipFamilies", json!(["IPv4"]));
                set_default(map, "ipFamilyPolicy", json!("SingleStack"));
                set_default(map, "internalTrafficPolicy", json!("Cluster"));
                if let Some(ports) = map.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(p, "protocol", json!("TCP"));
                        let port = p.get("port").cloned().unwrap_or(Value::Null);
                        set_default(p, "targetPort", port);
                    }
                }
            }
        }
        ResourceKind::PersistentVolumeClaim => {
            if let Some(map) = spec.as_object_mut() {
                set_default(map, "volumeMode", json!("Filesystem"));
                set_default(map, "storageClassName", json!("standard"));
            }
        }
        ResourceKind::ResourceQuota => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_the_api_server() {
        for ok in ["512Mi", "250m", "1", "1.5", "2Gi", "1e3", "100k", ".5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["512MB", "", "abc", "1..2", "Mi", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn names_and_labels_follow_rfc_1123() {
        assert!(is_dns1123_subdomain("sess-1.home"));
        assert!(!is_dns1123_subdomain("Sess"));
        assert!(!is_dns1035_label("1abc"));
        assert!(is_label_value("alice_01"));
        assert!(!is_label_value("alice@example.com"));
        assert!(is_label_key("app.kubernetes.io/name"));
    }
}
