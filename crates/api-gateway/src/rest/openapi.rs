//! The OpenAPI 3 document, generated from the handlers' annotations and the view types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::error::Problem;
use crate::service::views::*;

/// The `Idempotency-Key` header accepted by every POST, PUT and DELETE.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IdempotencyKey {
    /// A retry with the same key returns the first answer and changes nothing; the same
    /// key with a different request is refused (422). 1-255 visible ASCII characters.
    #[param(rename = "Idempotency-Key", max_length = 255, min_length = 1)]
    idempotency_key: Option<String>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "StreamSpace API",
        version = "1",
        description = "Sessions, their commands, and agent administration. Errors are application/problem+json."
    ),
    paths(
        super::create_session,
        super::list_sessions,
        super::get_session,
        super::delete_session,
        super::hibernate_session,
        super::wake_session,
        super::list_session_commands,
        super::get_command,
        super::list_agents,
        super::get_agent,
        super::register_agent,
        super::issue_credential,
        super::revoke_credential,
        super::openapi_json,
        super::healthz,
        super::readyz,
    ),
    components(schemas(
        Problem,
        ResourcesView,
        CreateSessionRequest,
        SessionView,
        SessionList,
        SessionAccepted,
        SessionStopAccepted,
        SessionCommandAccepted,
        CommandView,
        CommandList,
        AgentView,
        AgentList,
        RegisterAgentRequest,
        IssuedCredentialView,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "sessions", description = "the caller's sessions"),
        (name = "commands", description = "command status and history"),
        (name = "admin", description = "agent administration (admin role)"),
        (name = "meta", description = "health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;
