//! The test-only HTTP paths under `/fake/v1/`, for drivers that run the stand-in as a
//! process and cannot call [`crate::FakeCluster`]'s hooks: files in pods and throttling.
//! They are not Kubernetes paths: the bearer token is required as everywhere, but they
//! are neither authorized by deny rules, throttled, nor written to the audit log.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::api::authorized;
use crate::status::ApiError;
use crate::{Error, Shared, files};

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/fake/v1/namespaces/{namespace}/pods/{pod}/files/{*path}",
            get(read_file).put(write_file),
        )
        .route("/fake/v1/throttle", post(throttle))
}

fn message(code: StatusCode, message: String) -> Response {
    (code, axum::Json(json!({ "message": message }))).into_response()
}

fn error(e: &Error) -> Response {
    let code = match e {
        Error::PodNotFound { .. } | Error::ClaimNotFound { .. } => StatusCode::NOT_FOUND,
        Error::PodNotRunning { .. } => StatusCode::CONFLICT,
        Error::InvalidPath { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    message(code, e.to_string())
}

async fn write_file(
    State(shared): State<Arc<Shared>>,
    Path((namespace, pod, path)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return ApiError::unauthorized().into_response();
    }
    match files::write(
        &mut shared.lock(),
        &namespace,
        &pod,
        &format!("/{path}"),
        &body,
    ) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

async fn read_file(
    State(shared): State<Arc<Shared>>,
    Path((namespace, pod, path)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return ApiError::unauthorized().into_response();
    }
    let path = format!("/{path}");
    match files::read(&shared.lock(), &namespace, &pod, &path) {
        Ok(Some(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            format!("no file {path} in pod {namespace}/{pod}"),
        ),
        Err(e) => error(&e),
    }
}

async fn throttle(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return ApiError::unauthorized().into_response();
    }
    let Some(count) = query.get("count").and_then(|c| c.parse::<u32>().ok()) else {
        return message(
            StatusCode::BAD_REQUEST,
            "count must be a non-negative integer".into(),
        );
    };
    shared.lock().throttle = count;
    StatusCode::NO_CONTENT.into_response()
}
