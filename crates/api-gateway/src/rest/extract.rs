//! Extractors that turn every rejection into a problem+json [`ApiError`]: the caller
//! (bearer token, idempotency key, trace context), JSON bodies, paths and queries.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::AppState;
use crate::error::ApiError;
use crate::service::{Caller, RequestSpan, parse_idempotency_key, parse_traceparent};

/// Runs each request in its span — a child of the client's `traceparent` — and answers
/// with the span's own `traceparent`, so a client can find the request's trace.
pub async fn trace_request(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let client = req
        .headers()
        .get("traceparent")
        .and_then(|v| parse_traceparent(v.as_bytes()));
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = crate::service::request_span(&format!("{} {route}", req.method()));
    streamspace_core::telemetry::continue_trace(&span, client.as_deref());
    req.extensions_mut().insert(RequestSpan(span.clone()));
    let mut response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if let Some(value) = streamspace_core::telemetry::traceparent_of(&span)
        .and_then(|t| axum::http::HeaderValue::from_str(&t).ok())
    {
        response.headers_mut().insert("traceparent", value);
    }
    response
}

/// The authenticated caller of a request.
#[derive(Debug)]
pub struct Authed(pub Caller);

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = match parts.headers.get(axum::http::header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::Unauthenticated("the Authorization header is not valid text".into())
            })?),
        };
        let principal = state.verifier.verify_header(auth).await?;
        let idempotency_key = parts
            .headers
            .get("idempotency-key")
            .map(|v| parse_idempotency_key(v.as_bytes()))
            .transpose()?;
        let traceparent = parts
            .headers
            .get("traceparent")
            .and_then(|v| parse_traceparent(v.as_bytes()));
        let route = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let operation = format!("{} {route}", parts.method);
        let span = parts.extensions.get::<RequestSpan>().map(|s| s.0.clone());
        Ok(Authed(Caller::new(
            principal,
            idempotency_key,
            traceparent,
            &operation,
            span,
        )))
    }
}

/// An authenticated caller with the admin role, checked before the body is read.
#[derive(Debug)]
pub struct AdminAuthed(pub Caller);

impl FromRequestParts<AppState> for AdminAuthed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Authed(caller) = Authed::from_request_parts(parts, state).await?;
        caller.principal.require_admin()?;
        Ok(AdminAuthed(caller))
    }
}

/// `axum::Json` with problem+json rejections: 413 over the body limit, 415 without a JSON
/// content type, 400 naming the field otherwise (unknown fields included).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(
            "the request body is larger than this server accepts (http.max_body_bytes)".into(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
            "send the body as JSON with `Content-Type: application/json`".into(),
        ),
        _ => ApiError::Invalid(format!("invalid JSON body: {}", rejection.body_text())),
    }
}

/// `axum::extract::Path` with problem+json rejections.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e: PathRejection| {
                ApiError::Invalid(format!("invalid path: {}", e.body_text()))
            })
    }
}

/// `axum::extract::Query` with problem+json rejections.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| {
                ApiError::Invalid(format!("invalid query: {}", e.body_text()))
            })
    }
}
