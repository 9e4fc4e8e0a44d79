//! API errors, answered as `Status` objects with the codes and reasons a real API server uses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::resource::ResourceKind;

/// One invalid field, as listed in a 422 answer's `details.causes`.
#[derive(Clone, Debug)]
pub(crate) struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".into(),
        }
    }

    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Self {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {shown}: {detail}"),
        }
    }

    pub fn immutable(field: impl Into<String>, value: &Value) -> Self {
        Self::invalid(field, value, "field is immutable")
    }

    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Self {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        }
    }
}

/// An error answered to the client as a `Status` object.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

fn details(kind: ResourceKind, name: &str) -> Value {
    json!({ "name": name, "group": kind.group(), "kind": kind.plural() })
}

impl ApiError {
    pub fn not_found(kind: ResourceKind, name: &str) -> Self {
        Self {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message: format!("{} {name:?} not found", kind.qualified_plural()),
            details: Some(details(kind, name)),
        }
    }

    pub fn unknown_path() -> Self {
        Self {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: None,
        }
    }

    pub fn already_exists(kind: ResourceKind, name: &str) -> Self {
        Self {
            code: StatusCode::CONFLICT,
            reason: "AlreadyExists",
            message: format!("{} {name:?} already exists", kind.qualified_plural()),
            details: Some(details(kind, name)),
        }
    }

    /// Optimistic concurrency: the writer's `resourceVersion` is not the stored one.
    pub fn conflict(kind: ResourceKind, name: &str, why: &str) -> Self {
        Self {
            code: StatusCode::CONFLICT,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                kind.qualified_plural()
            ),
            details: Some(details(kind, name)),
        }
    }

    pub fn stale(kind: ResourceKind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 with every cause, worded like the API server's field errors.
    pub fn invalid(kind_name: &str, name: &str, group: &str, causes: Vec<Cause>) -> Self {
        let parts: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let kind_only = kind_name.split('.').next().unwrap_or(kind_name);
        Self {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message: format!("{kind_name} {name:?} is invalid: {joined}"),
            details: Some(json!({
                "name": name,
                "group": group,
                "kind": kind_only,
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason,
                    "message": c.message,
                    "field": c.field,
                })).collect::<Vec<_>>(),
            })),
        }
    }

    pub fn invalid_object(kind: ResourceKind, name: &str, causes: Vec<Cause>) -> Self {
        Self::invalid(&kind.qualified_kind(), name, kind.group(), causes)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    pub fn forbidden(
        user: &str,
        verb: &str,
        kind: ResourceKind,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Self {
        let subject = match name {
            Some(name) => format!("{} {name:?}", kind.qualified_plural()),
            None => kind.qualified_plural(),
        };
        let resource = match subresource {
            Some(sub) => format!("{}/{sub}", kind.plural()),
            None => kind.plural().to_owned(),
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_owned(),
        };
        Self {
            code: StatusCode::FORBIDDEN,
            reason: "Forbidden",
            message: format!(
                "{subject} is forbidden: User {user:?} cannot {verb} resource {resource:?} in API group {:?} {scope}",
                kind.group()
            ),
            details: Some(details(kind, name.unwrap_or_default())),
        }
    }

    /// An admission plugin (ResourceQuota) refused the object.
    pub fn admission_forbidden(kind: ResourceKind, name: &str, why: &str) -> Self {
        Self {
            code: StatusCode::FORBIDDEN,
            reason: "Forbidden",
            message: format!("{} {name:?} is forbidden: {why}", kind.qualified_plural()),
            details: Some(details(kind, name)),
        }
    }

    /// A validating admission webhook refused the object. A webhook that sets no code is
    /// answered 400 with no reason, which is what the API server makes of it.
    pub fn webhook_denied(webhook: &str, why: &str) -> Self {
        Self {
            code: StatusCode::BAD_REQUEST,
            reason: "",
            message: format!("admission webhook {webhook:?} denied the request: {why}"),
            details: None,
        }
    }

    /// Load shedding: the client should retry after a second (`Retry-After: 1`).
    pub fn too_many_requests() -> Self {
        Self {
            code: StatusCode::TOO_MANY_REQUESTS,
            reason: "TooManyRequests",
            message:
                "the server has received too many requests and has asked us to try again later"
                    .into(),
            details: Some(json!({ "retryAfterSeconds": 1 })),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: StatusCode::UNAUTHORIZED,
            reason: "Unauthorized",
            message: "Unauthorized".into(),
            details: None,
        }
    }

    pub fn method_not_allowed() -> Self {
        Self {
            code: StatusCode::METHOD_NOT_ALLOWED,
            reason: "MethodNotAllowed",
            message: "the server does not allow this method on the requested resource".into(),
            details: None,
        }
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self {
            code: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"
            ),
            details: None,
        }
    }

    /// A watch asked to resume from a version older than the retained history.
    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self {
            code: StatusCode::GONE,
            reason: "Expired",
            message: format!("too old resource version: {requested} ({oldest})"),
            details: None,
        }
    }

    /// The `Status` object itself, for bodies and watch `ERROR` events.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        // An empty reason is left out, as the API server's `omitempty` does.
        if self.reason.is_empty()
            && let Some(map) = status.as_object_mut()
        {
            map.remove("reason");
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = (self.code == StatusCode::TOO_MANY_REQUESTS)
            .then_some([(axum::http::header::RETRY_AFTER, "1")]);
        (self.code, retry, axum::Json(self.to_status())).into_response()
    }
}

/// The `Status` a successful delete answers for kinds that do not return the object.
pub(crate) fn success(kind: ResourceKind, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": { "name": name, "group": kind.group(), "kind": kind.plural(), "uid": uid },
    })
}
