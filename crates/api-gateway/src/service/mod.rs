//! The one service layer behind both REST and gRPC: authorization, input limits, rate
//! limits, idempotent retries, and the calls into `streamspace-core`. The edges only
//! translate requests into [`Caller`] + arguments and results into their wire format.

pub mod views;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool};
use streamspace_core::CommandId;
use streamspace_core::agents::{self, NewAgent};
use streamspace_core::api::{
    IdempotencyClaim, NewSession, Placement, SessionStop, idempotency, request_fingerprint,
    sessions,
};
use streamspace_core::command::Resources;
use streamspace_core::queue::CommandQueue;
use tokio::sync::{mpsc, watch};

use crate::auth::Principal;
use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::ratelimit::{Class, RateLimiter};
use crate::watch::ChangeHub;
use views::*;

/// Longest accepted id in a path or message (session, command, agent, credential).
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Default and largest page of a session list.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;

/// Who is asking, and the request-scoped extras both edges carry.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    /// `Idempotency-Key` header / `idempotency-key` metadata, already validated.
    pub idempotency_key: Option<String>,
    /// W3C `traceparent` stored with the command this request causes: the request's own
    /// span when traces are exported (so delivery and execution join its trace), else
    /// the caller's as sent.
    pub traceparent: Option<String>,
    /// The request's span (`api-gateway` in the trace), a child of the caller's
    /// `traceparent`; it ends when the request's work does.
    pub span: tracing::Span,
}

impl Caller {
    /// A caller for one request named `operation` (`POST /api/v1/sessions`,
    /// `streamspace.v1.SessionService/CreateSession`), in `span` when the edge made one
    /// already (REST), else in a new one continuing the caller's trace.
    pub fn new(
        principal: Principal,
        idempotency_key: Option<String>,
        client_traceparent: Option<String>,
        operation: &str,
        span: Option<tracing::Span>,
    ) -> Self {
        let span = span.unwrap_or_else(|| {
            let span = request_span(operation);
            streamspace_core::telemetry::continue_trace(&span, client_traceparent.as_deref());
            span
        });
        span.record("user", principal.user_id.as_str());
        let traceparent = streamspace_core::telemetry::traceparent_of(&span).or(client_traceparent);
        Self {
            principal,
            idempotency_key,
            traceparent,
            span,
        }
    }
}

/// The span of one API request, made by the edge (REST middleware, gRPC layer) and
/// found by the handler in the request's extensions.
#[derive(Clone, Debug)]
pub struct RequestSpan(pub tracing::Span);

/// The span of one API request (`api-gateway` in a trace).
pub fn request_span(operation: &str) -> tracing::Span {
    tracing::info_span!(
        "api request",
        otel.name = operation,
        otel.kind = "server",
        user = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    )
}

/// Validates an `Idempotency-Key`: 1-255 visible ASCII characters.
pub fn parse_idempotency_key(raw: &[u8]) -> Result<String, ApiError> {
    let valid = !raw.is_empty()
        && raw.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && raw.iter().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(ApiError::Invalid(format!(
            "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters, e.g. a UUID"
        )));
    }
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// A `traceparent` worth keeping: the W3C shape, else nothing.
pub fn parse_traceparent(raw: &[u8]) -> Option<String> {
    (raw.len() == 55 && raw.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-'))
        .then(|| String::from_utf8_lossy(raw).into_owned())
}

/// The shared service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    config: GatewayConfig,
    limiter: RateLimiter,
    hub: Arc<ChangeHub>,
    shutdown: watch::Receiver<bool>,
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ApiError::Invalid(format!(
            "{what} must be 1-{MAX_ID_LEN} characters"
        )));
    }
    Ok(())
}

fn parse_command_id(id: &str) -> Result<CommandId, ApiError> {
    check_id("command id", id)?;
    // A string that cannot be a command id names no command.
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("command {id} not found")))
}

fn check_template(template: &str) -> Result<(), ApiError> {
    let b = template.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if !valid {
        return Err(ApiError::Invalid(format!(
            "template {template:?} must be 1-32 lower-case letters, digits or dashes, starting with a letter (e.g. firefox-browser)"
        )));
    }
    Ok(())
}

fn check_location(what: &str, value: &str) -> Result<(), ApiError> {
    let b = value.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !valid {
        return Err(ApiError::Invalid(format!(
            "{what} {value:?} must be 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// A requested resource: a positive Kubernetes quantity of at most 16 characters, no
/// larger than the maximum configured for `template` (or for every session).
fn check_quantity(what: &str, value: &str, max: &str, template: &str) -> Result<(), ApiError> {
    let parsed = (value.len() <= 16)
        .then(|| crate::config::parse_quantity(value))
        .flatten()
        .filter(|v| *v > 0.0);
    let Some(parsed) = parsed else {
        return Err(ApiError::Invalid(format!(
            "resources.{what} {value:?} must be a positive Kubernetes quantity of at most 16 characters, e.g. 512Mi or 250m"
        )));
    };
    if crate::config::parse_quantity(max).is_some_and(|limit| parsed > limit) {
        return Err(ApiError::Invalid(format!(
            "resources.{what} {value:?} is more than a {template} session may have ({max})"
        )));
    }
    Ok(())
}

impl Api {
    pub fn new(
        pool: PgPool,
        config: GatewayConfig,
        hub: Arc<ChangeHub>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                limiter: RateLimiter::new(config.rate_limit.clone()),
                pool,
                config,
                hub,
                shutdown,
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    fn admit(&self, caller: &Caller, class: Class) -> Result<(), ApiError> {
        self.inner.limiter.admit(&caller.principal.user_id, class)
    }

    /// Maps a core error, adding the configured `Retry-After` to "no eligible agent".
    fn core_error(&self, e: streamspace_core::Error) -> ApiError {
        match ApiError::from(e) {
            ApiError::Unavailable {
                message,
                retry_after: None,
            } => ApiError::Unavailable {
                message,
                retry_after: Some(Duration::from_secs(
                    self.inner.config.placement.retry_after_secs,
                )),
            },
            other => other,
        }
    }

    /// Starts a change: opens the transaction and claims the caller's idempotency key.
    /// `Ok((tx, Some(answer)))` means the key answered this request before: return that.
    async fn begin<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        operation: &str,
        params: &impl Serialize,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Option<T>), ApiError> {
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(|e| self.core_error(e.into()))?;
        let replay = self.claim_key(&mut tx, caller, operation, params).await?;
        Ok((tx, replay))
    }

    /// Claims the caller's `Idempotency-Key` (if any) in the request's transaction: the
    /// stored answer when this very request was answered before.
    async fn claim_key<T: DeserializeOwned>(
        &self,
        conn: &mut sqlx::PgConnection,
        caller: &Caller,
        operation: &str,
        params: &impl Serialize,
    ) -> Result<Option<T>, ApiError> {
        let Some(key) = &caller.idempotency_key else {
            return Ok(None);
        };
        let fingerprint = request_fingerprint(operation, params);
        match idempotency::idempotency_claim(conn, &caller.principal.user_id, key, &fingerprint)
            .await
            .map_err(|e| self.core_error(e))?
        {
            IdempotencyClaim::Fresh => Ok(None),
            IdempotencyClaim::Replay(answer) => {
                let answer = serde_json::from_value(answer).map_err(|e| {
                    ApiError::Internal(format!("stored idempotent answer does not decode: {e}"))
                })?;
                Ok(Some(answer))
            }
            IdempotencyClaim::Mismatch => Err(ApiError::IdempotencyMismatch(format!(
                "Idempotency-Key {key:?} was already used for a different request; use a new key for a new request"
            ))),
        }
    }

    /// Finishes a change: stores the answer under the caller's key and commits.
    async fn commit<T: Serialize>(
        &self,
        caller: &Caller,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        answer: &T,
    ) -> Result<(), ApiError> {
        if let Some(key) = &caller.idempotency_key {
            let value = serde_json::to_value(answer)
                .map_err(|e| ApiError::Internal(format!("encoding the answer: {e}")))?;
            idempotency::idempotency_store(&mut tx, &caller.principal.user_id, key, &value)
                .await
                .map_err(|e| self.core_error(e))?;
        }
        tx.commit().await.map_err(|e| self.core_error(e.into()))
    }

    // ------------------------------------------------------------------ sessions

    pub async fn create_session(
        &self,
        caller: &Caller,
        req: CreateSessionRequest,
    ) -> Result<SessionAccepted, ApiError> {
        self.admit(caller, Class::Write)?;
        check_template(&req.template)?;
        if let Some(r) = &req.resources {
            let limits = &self.inner.config.limits;
            let template = limits.templates.get(&req.template);
            if let Some(m) = &r.memory {
                let max = template.and_then(|t| t.max_memory.as_ref());
                check_quantity(
                    "memory",
                    m,
                    max.unwrap_or(&limits.max_memory),
                    &req.template,
                )?;
            }
            if let Some(c) = &r.cpu {
                let max = template.and_then(|t| t.max_cpu.as_ref());
                check_quantity("cpu", c, max.unwrap_or(&limits.max_cpu), &req.template)?;
            }
        }
        for (what, v) in [("cluster", &req.cluster), ("region", &req.region)] {
            if let Some(v) = v {
                check_location(what, v)?;
            }
        }
        let new = NewSession {
            user_id: caller.principal.user_id.clone(),
            template: req.template.clone(),
            resources: req
                .resources
                .clone()
                .filter(|r| r.memory.is_some() || r.cpu.is_some())
                .map(|r| Resources {
                    memory: r.memory,
                    cpu: r.cpu,
                }),
            placement: Placement {
                cluster: req.cluster.clone(),
                region: req.region.clone(),
            },
            offline_after: self.inner.config.offline_after(),
            trace_context: caller.traceparent.clone(),
            max_active_per_user: Some(self.inner.config.limits.max_active_sessions_per_user)
                .filter(|max| *max > 0),
        };
        let mut tx = sessions::CreateTx::begin(&self.inner.pool, &new)
            .await
            .map_err(|e| self.core_error(e))?;
        if let Some(answer) = self
            .claim_key(tx.conn(), caller, "create_session", &req)
            .await?
        {
            return Ok(answer);
        }
        let created = sessions::session_create(&mut tx, &new)
            .await
            .map_err(|e| self.core_error(e))?;
        let answer = SessionAccepted {
            id: created.id,
            state: "pending".into(),
            agent_id: created.agent_id,
            command_id: created.command_id.to_string(),
        };
        self.commit(caller, tx.into_inner(), &answer).await?;
        tracing::info!(session_id = %answer.id, agent_id = %answer.agent_id, command_id = %answer.command_id, user = %caller.principal.user_id, "session created");
        Ok(answer)
    }

    pub async fn list_sessions(
        &self,
        caller: &Caller,
        limit: Option<u32>,
    ) -> Result<SessionList, ApiError> {
        self.admit(caller, Class::Read)?;
        let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(ApiError::Invalid(format!(
                "limit must be 1-{MAX_LIST_LIMIT}"
            )));
        }
        let rows = sessions::session_list(
            &self.inner.pool,
            &caller.principal.user_id,
            i64::from(limit),
        )
        .await
        .map_err(|e| self.core_error(e))?;
        Ok(SessionList {
            sessions: rows.into_iter().map(SessionView::from).collect(),
        })
    }

    pub async fn get_session(&self, caller: &Caller, id: &str) -> Result<SessionView, ApiError> {
        self.admit(caller, Class::Read)?;
        check_id("session id", id)?;
        sessions::session_get(&self.inner.pool, &caller.principal.user_id, id)
            .await
            .map_err(|e| self.core_error(e))?
            .map(SessionView::from)
            .ok_or_else(|| ApiError::NotFound(format!("session {id} not found")))
    }

    pub async fn delete_session(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<SessionStopAccepted, ApiError> {
        self.admit(caller, Class::Write)?;
        check_id("session id", id)?;
        let (mut tx, replay) = self.begin(caller, "delete_session", &id).await?;
        if let Some(answer) = replay {
            return Ok(answer);
        }
        let stop = sessions::session_stop(
            &mut tx,
            &caller.principal.user_id,
            id,
            caller.traceparent.clone(),
        )
        .await
        .map_err(|e| self.core_error(e))?;
        let answer = match stop {
            SessionStop::Queued { command_id } => SessionStopAccepted {
                id: id.to_owned(),
                state: "terminating".into(),
                command_id: Some(command_id.to_string()),
                cancelled_command_id: None,
            },
            SessionStop::StartCancelled { start_command_id } => SessionStopAccepted {
                id: id.to_owned(),
                state: "terminated".into(),
                command_id: None,
                cancelled_command_id: Some(start_command_id.to_string()),
            },
        };
        self.commit(caller, tx, &answer).await?;
        tracing::info!(session_id = %id, state = %answer.state, command_id = ?answer.command_id, "session stop accepted");
        Ok(answer)
    }

    pub async fn hibernate_session(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<SessionCommandAccepted, ApiError> {
        self.change_session(caller, id, "hibernate_session", "hibernating")
            .await
    }

    pub async fn wake_session(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<SessionCommandAccepted, ApiError> {
        self.change_session(caller, id, "wake_session", "waking")
            .await
    }

    async fn change_session(
        &self,
        caller: &Caller,
        id: &str,
        operation: &str,
        state: &str,
    ) -> Result<SessionCommandAccepted, ApiError> {
        self.admit(caller, Class::Write)?;
        check_id("session id", id)?;
        let (mut tx, replay) = self.begin(caller, operation, &id).await?;
        if let Some(answer) = replay {
            return Ok(answer);
        }
        let user = &caller.principal.user_id;
        let trace = caller.traceparent.clone();
        let conn: &mut PgConnection = &mut tx;
        let command_id = if operation == "hibernate_session" {
            sessions::session_hibernate(conn, user, id, trace).await
        } else {
            sessions::session_wake(conn, user, id, trace).await
        }
        .map_err(|e| self.core_error(e))?;
        let answer = SessionCommandAccepted {
            id: id.to_owned(),
            state: state.to_owned(),
            command_id: command_id.to_string(),
        };
        self.commit(caller, tx, &answer).await?;
        tracing::info!(session_id = %id, %command_id, operation, "session change accepted");
        Ok(answer)
    }

    // ------------------------------------------------------------------ commands

    pub async fn get_command(
        &self,
        caller: &Caller,
        command_id: &str,
    ) -> Result<CommandView, ApiError> {
        self.admit(caller, Class::Read)?;
        let id = parse_command_id(command_id)?;
        self.command_visible(caller, &id)
            .await?
            .map(CommandView::from)
            .ok_or_else(|| ApiError::NotFound(format!("command {command_id} not found")))
    }

    /// A command the caller may see: one of their sessions', or any for an admin.
    async fn command_visible(
        &self,
        caller: &Caller,
        id: &CommandId,
    ) -> Result<Option<streamspace_core::queue::CommandRecord>, ApiError> {
        let found = if caller.principal.admin {
            CommandQueue::command_get(&self.inner.pool, id).await
        } else {
            sessions::command_get_for_user(&self.inner.pool, &caller.principal.user_id, id).await
        };
        found.map_err(|e| self.core_error(e))
    }

    pub async fn list_session_commands(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<CommandList, ApiError> {
        self.admit(caller, Class::Read)?;
        check_id("session id", session_id)?;
        let pool = &self.inner.pool;
        if sessions::session_get(pool, &caller.principal.user_id, session_id)
            .await
            .map_err(|e| self.core_error(e))?
            .is_none()
        {
            return Err(ApiError::NotFound(format!(
                "session {session_id} not found"
            )));
        }
        let rows = CommandQueue::command_list_for_session(pool, session_id)
            .await
            .map_err(|e| self.core_error(e))?;
        Ok(CommandList {
            commands: rows.into_iter().map(CommandView::from).collect(),
        })
    }

    // ------------------------------------------------------------------ watches

    /// The session now, then each state change in order, until it is terminated, the
    /// receiver is dropped or the gateway shuts down.
    pub async fn watch_session(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<mpsc::Receiver<Result<SessionEventView, ApiError>>, ApiError> {
        self.admit(caller, Class::Read)?;
        check_id("session id", id)?;
        let permit = self.admit_watch(caller)?;
        crate::watch::watch_session(
            self.inner.hub.clone(),
            self.inner.pool.clone(),
            caller.principal.user_id.clone(),
            id.to_owned(),
            self.inner.shutdown.clone(),
            permit,
        )
        .await
        .map_err(|e| self.core_error(e))?
        .ok_or_else(|| ApiError::NotFound(format!("session {id} not found")))
    }

    /// The command now, then each status change in order, until it is terminal.
    pub async fn watch_command(
        &self,
        caller: &Caller,
        command_id: &str,
    ) -> Result<mpsc::Receiver<Result<CommandEventView, ApiError>>, ApiError> {
        self.admit(caller, Class::Read)?;
        let id = parse_command_id(command_id)?;
        if self.command_visible(caller, &id).await?.is_none() {
            return Err(ApiError::NotFound(format!(
                "command {command_id} not found"
            )));
        }
        let permit = self.admit_watch(caller)?;
        crate::watch::watch_command(
            self.inner.hub.clone(),
            self.inner.pool.clone(),
            id,
            self.inner.shutdown.clone(),
            permit,
        )
        .await
        .map_err(|e| self.core_error(e))?
        .ok_or_else(|| ApiError::NotFound(format!("command {command_id} not found")))
    }

    /// A place for one more open watch of the caller (`limits.max_watches_per_user`).
    fn admit_watch(&self, caller: &Caller) -> Result<crate::watch::WatchPermit, ApiError> {
        self.inner.hub.admit_watch(
            &caller.principal.user_id,
            self.inner.config.limits.max_watches_per_user,
        )
    }

    /// Database reads made for notified changes (one per change, however many watch it).
    pub fn watch_reads(&self) -> u64 {
        self.inner.hub.reads()
    }

    /// Watches `user_id` holds open on this gateway.
    pub fn open_watches(&self, user_id: &str) -> u32 {
        self.inner.hub.open_watches(user_id)
    }

    // ------------------------------------------------------------------ agents (admin)

    pub async fn list_agents(&self, caller: &Caller) -> Result<AgentList, ApiError> {
        caller.principal.require_admin()?;
        self.admit(caller, Class::Read)?;
        let rows = agents::agent_list(&self.inner.pool, self.inner.config.offline_after())
            .await
            .map_err(|e| self.core_error(e))?;
        Ok(AgentList {
            agents: rows.into_iter().map(AgentView::from).collect(),
        })
    }

    pub async fn get_agent(&self, caller: &Caller, agent_id: &str) -> Result<AgentView, ApiError> {
        caller.principal.require_admin()?;
        self.admit(caller, Class::Read)?;
        check_id("agent id", agent_id)?;
        agents::agent_get(
            &self.inner.pool,
            agent_id,
            self.inner.config.offline_after(),
        )
        .await
        .map_err(|e| self.core_error(e))?
        .map(AgentView::from)
        .ok_or_else(|| ApiError::NotFound(format!("agent {agent_id} not found")))
    }

    pub async fn register_agent(
        &self,
        caller: &Caller,
        req: RegisterAgentRequest,
    ) -> Result<AgentView, ApiError> {
        caller.principal.require_admin()?;
        self.admit(caller, Class::Write)?;
        if !agents::valid_agent_id(&req.agent_id) {
            return Err(ApiError::Invalid(format!(
                "agent_id {:?} must be 1-63 lower-case letters, digits or dashes, starting with a letter or digit",
                req.agent_id
            )));
        }
        for (what, v) in [("cluster", &req.cluster), ("region", &req.region)] {
            if let Some(v) = v {
                check_location(what, v)?;
            }
        }
        if req.max_sessions.is_some_and(|m| m < 0) {
            return Err(ApiError::Invalid(
                "max_sessions must not be negative".into(),
            ));
        }
        let (mut tx, replay) = self.begin(caller, "register_agent", &req).await?;
        if let Some(answer) = replay {
            return Ok(answer);
        }
        let new = NewAgent {
            agent_id: req.agent_id.clone(),
            cluster: req.cluster.clone().unwrap_or_else(|| "default".into()),
            region: req.region.clone().unwrap_or_else(|| "default".into()),
            max_sessions: req.max_sessions,
        };
        agents::agent_create(&mut *tx, &new)
            .await
            .map_err(|e| match e {
                streamspace_core::Error::Conflict(msg) => ApiError::AlreadyExists(msg),
                other => self.core_error(other),
            })?;
        let answer = agents::agent_get(&mut *tx, &req.agent_id, self.inner.config.offline_after())
            .await
            .map_err(|e| self.core_error(e))?
            .map(AgentView::from)
            .ok_or_else(|| ApiError::Internal("registered agent not readable".into()))?;
        self.commit(caller, tx, &answer).await?;
        tracing::info!(agent_id = %answer.agent_id, by = %caller.principal.user_id, "agent registered");
        Ok(answer)
    }

    /// Issues a credential. A retry with the same `Idempotency-Key` does not show the
    /// token again (it is stored only hashed): it answers 409 naming the credential.
    pub async fn issue_credential(
        &self,
        caller: &Caller,
        agent_id: &str,
    ) -> Result<IssuedCredentialView, ApiError> {
        caller.principal.require_admin()?;
        self.admit(caller, Class::Write)?;
        check_id("agent id", agent_id)?;
        #[derive(Serialize, serde::Deserialize)]
        struct Issued {
            credential_id: String,
        }
        let (mut tx, replay) = self
            .begin::<Issued>(caller, "issue_credential", &agent_id)
            .await?;
        if let Some(earlier) = replay {
            return Err(ApiError::AlreadyExists(format!(
                "this Idempotency-Key already issued credential {} for agent {agent_id}; its token was shown once and is not stored. Revoke it and issue a new one if the token was lost",
                earlier.credential_id
            )));
        }
        let issued = agents::credential_issue(&mut *tx, agent_id)
            .await
            .map_err(|e| self.core_error(e))?;
        self.commit(
            caller,
            tx,
            &Issued {
                credential_id: issued.credential_id.clone(),
            },
        )
        .await?;
        tracing::info!(agent_id, credential_id = %issued.credential_id, by = %caller.principal.user_id, "agent credential issued");
        Ok(IssuedCredentialView {
            credential_id: issued.credential_id,
            agent_id: issued.agent_id,
            token: issued.token.expose().clone(),
        })
    }

    pub async fn revoke_credential(
        &self,
        caller: &Caller,
        agent_id: &str,
        credential_id: &str,
    ) -> Result<(), ApiError> {
        caller.principal.require_admin()?;
        self.admit(caller, Class::Write)?;
        check_id("agent id", agent_id)?;
        check_id("credential id", credential_id)?;
        // Revoking is naturally idempotent (revoking twice keeps the first time), so the
        // key needs no stored answer beyond "done".
        let (mut tx, replay) = self
            .begin::<()>(caller, "revoke_credential", &(agent_id, credential_id))
            .await?;
        if replay.is_some() {
            return Ok(());
        }
        agents::credential_revoke(&mut *tx, agent_id, credential_id)
            .await
            .map_err(|e| self.core_error(e))?;
        self.commit(caller, tx, &()).await?;
        tracing::info!(agent_id, credential_id, by = %caller.principal.user_id, "agent credential revoked");
        Ok(())
    }
}
