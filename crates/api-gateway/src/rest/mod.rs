//! The REST edge (axum): routes, their OpenAPI description, health and metrics. Handlers
//! only translate HTTP to the shared [`Api`] and back; errors become problem+json here,
//! once.

mod extract;
pub mod metrics;
pub mod openapi;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::{IntoParams, OpenApi};

use crate::auth::Verifier;
use crate::error::{ApiError, Problem};
use crate::service::Api;
use crate::service::views::*;
use extract::{AdminAuthed, ApiJson, ApiPath, ApiQuery, Authed};
use metrics::HttpMetrics;

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub api: Api,
    pub verifier: Arc<Verifier>,
    pub metrics: Arc<HttpMetrics>,
}

/// The whole REST application, middleware included. Tests call it without a socket.
pub fn router(state: AppState) -> Router {
    let config = state.api.config().http.clone();
    let routes = Router::new()
        .route("/api/v1/sessions", post(create_session).get(list_sessions))
        .route(
            "/api/v1/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route("/api/v1/sessions/{id}/hibernate", put(hibernate_session))
        .route("/api/v1/sessions/{id}/wake", put(wake_session))
        .route("/api/v1/sessions/{id}/commands", get(list_session_commands))
        .route("/api/v1/commands/{command_id}", get(get_command))
        .route(
            "/api/v1/admin/agents",
            get(list_agents).post(register_agent),
        )
        .route("/api/v1/admin/agents/{agent_id}", get(get_agent))
        .route(
            "/api/v1/admin/agents/{agent_id}/credentials",
            post(issue_credential),
        )
        .route(
            "/api/v1/admin/agents/{agent_id}/credentials/{credential_id}",
            delete(revoke_credential),
        )
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());

    let request_id = header::HeaderName::from_static("x-request-id");
    routes
        // Each request in its span, continuing the client's trace (traceparent back).
        .layer(axum::middleware::from_fn(extract::trace_request))
        // Counts and times every request by route and status.
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
        // Bodies beyond the cap are refused (413) before they are buffered.
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                // Every request gets an id (kept if the client sent one) …
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                // … that the trace span and log lines carry …
                .layer(TraceLayer::new_for_http())
                // … and that is echoed to the client for support requests.
                .layer(PropagateRequestIdLayer::new(request_id))
                // A request past the deadline is answered as problem+json …
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    ApiError::Unavailable {
                        message: "the request took longer than this server allows (http.request_timeout_ms); retry".into(),
                        retry_after: Some(Duration::from_secs(1)),
                    }
                }))
                // … so that no request holds a connection or a transaction forever.
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                    config.request_timeout_ms,
                ))),
        )
}

fn location(id: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&format!("/api/v1/sessions/{id}"))
        .map_err(|e| ApiError::Internal(format!("location header: {e}")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// At most this many sessions, newest first (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// Create a session and its `start_session` command (one transaction); picks the agent.
#[utoipa::path(
    post, path = "/api/v1/sessions", tag = "sessions",
    params(openapi::IdempotencyKey),
    request_body = CreateSessionRequest,
    responses(
        (status = 202, description = "session and start command committed", body = SessionAccepted,
         headers(("Location" = String, description = "the session's URL"))),
        (status = 400, description = "invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "no eligible agent; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_session(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiJson(req): ApiJson<CreateSessionRequest>,
) -> Result<Response, ApiError> {
    let answer = state.api.create_session(&caller, req).await?;
    let loc = location(&answer.id)?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, loc)],
        Json(answer),
    )
        .into_response())
}

/// The caller's sessions, newest first.
#[utoipa::path(
    get, path = "/api/v1/sessions", tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "the caller's sessions", body = SessionList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_sessions(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<SessionList>, ApiError> {
    Ok(Json(state.api.list_sessions(&caller, params.limit).await?))
}

/// One of the caller's sessions.
#[utoipa::path(
    get, path = "/api/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id", max_length = 128)),
    responses(
        (status = 200, description = "the session", body = SessionView),
        (status = 400, description = "invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such session of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_session(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionView>, ApiError> {
    Ok(Json(state.api.get_session(&caller, &id).await?))
}

/// Stop a session: queues `stop_session` for its agent, also while the agent is down. A
/// session whose start was never delivered ends at once (the start is cancelled).
#[utoipa::path(
    delete, path = "/api/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id", max_length = 128), openapi::IdempotencyKey),
    responses(
        (status = 202, description = "stop queued (or start cancelled)", body = SessionStopAccepted),
        (status = 400, description = "invalid id or key", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such session of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already terminating or terminated", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn delete_session(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let answer = state.api.delete_session(&caller, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Hibernate a running session (`hibernate_session`).
#[utoipa::path(
    put, path = "/api/v1/sessions/{id}/hibernate", tag = "sessions",
    params(("id" = String, Path, description = "session id", max_length = 128), openapi::IdempotencyKey),
    responses(
        (status = 202, description = "hibernate queued", body = SessionCommandAccepted),
        (status = 400, description = "invalid id or key", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such session of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is not running", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn hibernate_session(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let answer = state.api.hibernate_session(&caller, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Wake a hibernated session (`wake_session`).
#[utoipa::path(
    put, path = "/api/v1/sessions/{id}/wake", tag = "sessions",
    params(("id" = String, Path, description = "session id", max_length = 128), openapi::IdempotencyKey),
    responses(
        (status = 202, description = "wake queued", body = SessionCommandAccepted),
        (status = 400, description = "invalid id or key", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such session of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is not hibernated", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn wake_session(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let answer = state.api.wake_session(&caller, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// A session's commands in acceptance order.
#[utoipa::path(
    get, path = "/api/v1/sessions/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "session id", max_length = 128)),
    responses(
        (status = 200, description = "the session's commands", body = CommandList),
        (status = 400, description = "invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such session of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_session_commands(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CommandList>, ApiError> {
    Ok(Json(state.api.list_session_commands(&caller, &id).await?))
}

/// A command's status and history fields.
#[utoipa::path(
    get, path = "/api/v1/commands/{command_id}", tag = "commands",
    params(("command_id" = String, Path, description = "command id (`cmd-…`)", max_length = 128)),
    responses(
        (status = 200, description = "the command", body = CommandView),
        (status = 400, description = "invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such command of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_command(
    State(state): State<AppState>,
    Authed(caller): Authed,
    ApiPath(command_id): ApiPath<String>,
) -> Result<Json<CommandView>, ApiError> {
    Ok(Json(state.api.get_command(&caller, &command_id).await?))
}

/// Every agent with derived online/offline, last heartbeat and load (admin).
#[utoipa::path(
    get, path = "/api/v1/admin/agents", tag = "admin",
    responses(
        (status = 200, description = "all agents", body = AgentList),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_agents(
    State(state): State<AppState>,
    AdminAuthed(caller): AdminAuthed,
) -> Result<Json<AgentList>, ApiError> {
    Ok(Json(state.api.list_agents(&caller).await?))
}

/// One agent (admin).
#[utoipa::path(
    get, path = "/api/v1/admin/agents/{agent_id}", tag = "admin",
    params(("agent_id" = String, Path, description = "agent id", max_length = 128)),
    responses(
        (status = 200, description = "the agent", body = AgentView),
        (status = 400, description = "invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such agent", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_agent(
    State(state): State<AppState>,
    AdminAuthed(caller): AdminAuthed,
    ApiPath(agent_id): ApiPath<String>,
) -> Result<Json<AgentView>, ApiError> {
    Ok(Json(state.api.get_agent(&caller, &agent_id).await?))
}

/// Register an agent (admin).
#[utoipa::path(
    post, path = "/api/v1/admin/agents", tag = "admin",
    params(openapi::IdempotencyKey),
    request_body = RegisterAgentRequest,
    responses(
        (status = 201, description = "registered", body = AgentView),
        (status = 400, description = "invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the agent exists already", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn register_agent(
    State(state): State<AppState>,
    AdminAuthed(caller): AdminAuthed,
    ApiJson(req): ApiJson<RegisterAgentRequest>,
) -> Result<Response, ApiError> {
    let answer = state.api.register_agent(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Issue a credential for an agent (admin). The token is in this answer only.
#[utoipa::path(
    post, path = "/api/v1/admin/agents/{agent_id}/credentials", tag = "admin",
    params(("agent_id" = String, Path, description = "agent id", max_length = 128), openapi::IdempotencyKey),
    responses(
        (status = 201, description = "issued; the token is shown once", body = IssuedCredentialView),
        (status = 400, description = "invalid id or key", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such agent", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "this idempotency key already issued a credential", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn issue_credential(
    State(state): State<AppState>,
    AdminAuthed(caller): AdminAuthed,
    ApiPath(agent_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let answer = state.api.issue_credential(&caller, &agent_id).await?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Revoke an agent credential (admin); connections using it are refused from now on.
#[utoipa::path(
    delete, path = "/api/v1/admin/agents/{agent_id}/credentials/{credential_id}", tag = "admin",
    params(
        ("agent_id" = String, Path, description = "agent id", max_length = 128),
        ("credential_id" = String, Path, description = "credential id", max_length = 128),
        openapi::IdempotencyKey,
    ),
    responses(
        (status = 204, description = "revoked"),
        (status = 400, description = "invalid id or key", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such credential of the agent", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "idempotency key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn revoke_credential(
    State(state): State<AppState>,
    AdminAuthed(caller): AdminAuthed,
    ApiPath((agent_id, credential_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .api
        .revoke_credential(&caller, &agent_id, &credential_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This document.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "the OpenAPI 3 document", content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    let doc = openapi::ApiDoc::openapi();
    match doc.to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::Internal(format!("rendering OpenAPI: {e}")).into_response(),
    }
}

/// Liveness: the process serves requests.
#[utoipa::path(
    get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "alive", content_type = "application/json"))
)]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the database answers and its schema is current.
#[utoipa::path(
    get, path = "/readyz", tag = "meta", security(()),
    responses(
        (status = 200, description = "ready", content_type = "application/json"),
        (status = 503, description = "database unreachable or migrations pending", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let missing = streamspace_core::db::pending_migrations(state.api.pool())
        .await
        .map_err(|e| ApiError::Unavailable {
            message: format!("the database is not usable: {e}"),
            retry_after: Some(Duration::from_secs(1)),
        })?;
    if !missing.is_empty() {
        return Err(ApiError::Unavailable {
            message: format!(
                "database migrations pending: {}; run the gateway with --migrate or `cargo xtask migrate`",
                missing.join(", ")
            ),
            retry_after: Some(Duration::from_secs(5)),
        });
    }
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// The internal listener's router: `/metrics` only. It is not on the API port, so
/// unauthenticated API clients cannot read it or grow it.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Prometheus text: the pipeline counters of this process and per-route request metrics.
async fn metrics_text(State(state): State<AppState>) -> Response {
    let _scrape = streamspace_core::telemetry::scrape_lock().await;
    let pool = state.api.pool();
    let idle = pool.num_idle() as f64;
    ::metrics::gauge!("streamspace_db_pool_connections", "state" => "idle").set(idle);
    ::metrics::gauge!("streamspace_db_pool_connections", "state" => "in_use")
        .set((f64::from(pool.size()) - idle).max(0.0));
    use streamspace_core::telemetry::{publish_counter, publish_gauge};
    publish_counter(
        "streamspace_api_watch_reads_total",
        "rows read for notified changes (one per change, shared by its watchers)",
        state.api.watch_reads(),
    );
    if let Some(jwks) = state.verifier.jwks() {
        use std::sync::atomic::Ordering::Relaxed;
        publish_gauge(
            "streamspace_api_jwks_keys",
            "signing keys held from the JWKS",
            jwks.key_count() as f64,
        );
        publish_counter(
            "streamspace_api_jwks_fetches_total",
            "JWKS fetches (start-up, periodic, unknown kid)",
            jwks.fetches.load(Relaxed),
        );
        publish_counter(
            "streamspace_api_jwks_fetch_failures_total",
            "JWKS fetches that failed (the previous keys stayed)",
            jwks.fetch_failures.load(Relaxed),
        );
    }
    let text = streamspace_core::telemetry::render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound(
        "no such route; the API lives under /api/v1 (see /api/v1/openapi.json)".into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed(
        "this route does not support that method (see /api/v1/openapi.json)".into(),
    )
}
