//! The gateway's one error type, and its two renderings at the edge: an
//! `application/problem+json` response (RFC 9457) for REST and a `tonic::Status` for gRPC.
//! Every message is written for the person who has to act on it.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or breaks a limit.
    #[error("{0}")]
    Invalid(String),
    /// 401: no, or no valid, credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: authenticated, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404: does not exist, or belongs to someone else.
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the current state forbids the change.
    #[error("{0}")]
    Conflict(String),
    /// 409: what should be created exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// 413.
    #[error("{0}")]
    TooLarge(String),
    /// 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: an `Idempotency-Key` reused for a different request.
    #[error("{0}")]
    IdempotencyMismatch(String),
    /// 429.
    #[error("rate limit exceeded; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    /// 429: a per-user quota is used up; waiting alone does not help.
    #[error("{0}")]
    QuotaExceeded(String),
    /// 503: nothing can serve the request now; retry later.
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// 500: details are logged, not shown.
    #[error("internal error")]
    Internal(String),
}

impl From<streamspace_core::Error> for ApiError {
    fn from(e: streamspace_core::Error) -> Self {
        use streamspace_core::Error as E;
        match e {
            E::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            E::CommandNotFound(id) => ApiError::NotFound(format!("command {id} not found")),
            E::Conflict(msg) => ApiError::Conflict(msg),
            E::InvalidInput(msg) => ApiError::Invalid(msg),
            E::InvalidTransition { .. } => ApiError::Conflict(e.to_string()),
            E::QuotaExceeded(msg) => ApiError::QuotaExceeded(msg),
            E::NoEligibleAgent(msg) => ApiError::Unavailable {
                message: msg,
                retry_after: None,
            },
            E::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => ApiError::Unavailable {
                message: "the database is unreachable; retry shortly".into(),
                retry_after: Some(Duration::from_secs(1)),
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) | ApiError::AlreadyExists(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::IdempotencyMismatch(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } | ApiError::QuotaExceeded(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid-request",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed(_) => "method-not-allowed",
            ApiError::Conflict(_) => "state-conflict",
            ApiError::AlreadyExists(_) => "already-exists",
            ApiError::TooLarge(_) => "too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::IdempotencyMismatch(_) => "idempotency-key-reused",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::QuotaExceeded(_) => "quota-exceeded",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after } => Some(*retry_after),
            ApiError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What the caller is shown. Internal details stay in the log.
    fn detail(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "an internal error occurred; it has been logged, retry later".into()
            }
            other => other.to_string(),
        }
    }

    fn log(&self) {
        if let ApiError::Internal(detail) = self {
            tracing::error!(error = %detail, "request failed");
        }
    }

    /// The gRPC rendering, mirroring the REST status.
    pub fn into_status(self) -> tonic::Status {
        use tonic::Code;
        self.log();
        let code = match &self {
            ApiError::Invalid(_) | ApiError::TooLarge(_) | ApiError::UnsupportedMediaType(_) => {
                Code::InvalidArgument
            }
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::Forbidden(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::MethodNotAllowed(_) => Code::Unimplemented,
            ApiError::Conflict(_) | ApiError::IdempotencyMismatch(_) => Code::FailedPrecondition,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::RateLimited { .. } | ApiError::QuotaExceeded(_) => Code::ResourceExhausted,
            ApiError::Unavailable { .. } => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        };
        let mut status = tonic::Status::new(code, self.detail());
        if let Some(after) = self.retry_after()
            && let Ok(v) = after.as_secs().max(1).to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

/// The `application/problem+json` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `urn:streamspace:problem:not-found`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let problem = Problem {
            kind: format!("urn:streamspace:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: self.detail(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, after.as_secs().max(1).into());
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
