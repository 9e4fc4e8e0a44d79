//! The gRPC edge (tonic, `streamspace.api.v1`): `SessionService` and
//! `AgentAdminService` over the same [`Api`] as REST. An interceptor verifies the bearer
//! token; errors become `tonic::Status` here, once, mirroring the REST statuses.

use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::Stream;
use streamspace_proto::api::v1 as pb;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Principal, Refusal, Verifier};
use crate::error::ApiError;
use crate::service::views::*;
use crate::service::{Api, Caller, parse_idempotency_key, parse_traceparent};

/// Verifies `authorization: Bearer <JWT>` and leaves the [`Principal`] in the request.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    verifier: Arc<Verifier>,
}

impl AuthInterceptor {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self { verifier }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::Unauthenticated("the authorization metadata is not valid text".into())
                    .into_status()
            })?),
        };
        match self.verifier.verify_header_cached(header) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
            }
            // Only a JWKS refresh can decide, and an interceptor cannot wait: the handler
            // finishes the check (`caller`) before it does anything.
            Err(Refusal::UnknownKey) => {
                let token = header.unwrap_or_default().to_owned();
                req.extensions_mut().insert(PendingToken {
                    verifier: self.verifier.clone(),
                    header: token,
                });
            }
            Err(Refusal::Invalid(e)) => return Err(e.into_status()),
        }
        Ok(req)
    }
}

/// A token whose key the interceptor did not have yet.
#[derive(Clone)]
struct PendingToken {
    verifier: Arc<Verifier>,
    header: String,
}

/// The caller of a request the interceptor let through: its principal, once verified.
async fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let principal = match req.extensions().get::<Principal>() {
        Some(p) => p.clone(),
        None => {
            let pending = req
                .extensions()
                .get::<PendingToken>()
                .cloned()
                .ok_or_else(|| Status::unauthenticated("missing credentials"))?;
            pending
                .verifier
                .verify_header(Some(&pending.header))
                .await
                .map_err(ApiError::into_status)?
        }
    };
    let idempotency_key = req
        .metadata()
        .get("idempotency-key")
        .map(|v| parse_idempotency_key(v.as_bytes()))
        .transpose()
        .map_err(ApiError::into_status)?;
    let traceparent = req
        .metadata()
        .get("traceparent")
        .and_then(|v| parse_traceparent(v.as_bytes()));
    let operation = req.extensions().get::<tonic::GrpcMethod>().map_or_else(
        || "grpc".to_owned(),
        |m| format!("{}/{}", m.service(), m.method()),
    );
    let span = req
        .extensions()
        .get::<crate::service::RequestSpan>()
        .map(|s| s.0.clone());
    Ok(Caller::new(
        principal,
        idempotency_key,
        traceparent,
        &operation,
        span,
    ))
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_default()
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn session_pb(s: SessionView) -> pb::Session {
    pb::Session {
        id: s.id,
        user_id: s.user_id,
        template: s.template,
        agent_id: s.agent_id,
        state: s.state,
        resources: Some(pb::Resources {
            memory: s.resources.memory.unwrap_or_default(),
            cpu: s.resources.cpu.unwrap_or_default(),
        }),
        url: s.url.unwrap_or_default(),
        status_message: s.status_message.unwrap_or_default(),
        created_at: time(s.created_at),
        updated_at: time(s.updated_at),
        terminated_at: opt_time(s.terminated_at),
    }
}

fn command_pb(c: CommandView) -> pb::Command {
    pb::Command {
        command_id: c.command_id,
        session_id: c.session_id.unwrap_or_default(),
        agent_id: c.agent_id,
        action: c.action,
        status: c.status,
        error_message: c.error_message.unwrap_or_default(),
        attempts: c.attempts,
        max_attempts: c.max_attempts,
        created_at: time(c.created_at),
        sent_at: opt_time(c.sent_at),
        acknowledged_at: opt_time(c.acknowledged_at),
        completed_at: opt_time(c.completed_at),
        updated_at: time(c.updated_at),
        result_json: c.result.map(|r| r.to_string()).unwrap_or_default(),
    }
}

fn agent_pb(a: AgentView) -> pb::Agent {
    pb::Agent {
        agent_id: a.agent_id,
        cluster: a.cluster,
        region: a.region,
        online: a.online,
        last_heartbeat_at: opt_time(a.last_heartbeat_at),
        connected_at: opt_time(a.connected_at),
        disconnected_at: opt_time(a.disconnected_at),
        agent_version: a.agent_version.unwrap_or_default(),
        active_sessions: a.active_sessions,
        max_sessions: a.max_sessions.unwrap_or(0),
        created_at: time(a.created_at),
    }
}

/// `SessionService`.
#[derive(Clone, Debug)]
pub struct SessionServiceImpl {
    api: Api,
}

impl SessionServiceImpl {
    pub fn new(api: Api) -> Self {
        Self { api }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::session_service_server::SessionService for SessionServiceImpl {
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let caller = caller(&req).await?;
        let r = req.into_inner();
        let resources = r
            .resources
            .map(|res| ResourcesView {
                memory: opt(&res.memory),
                cpu: opt(&res.cpu),
            })
            .filter(|res| res.memory.is_some() || res.cpu.is_some());
        let answer = self
            .api
            .create_session(
                &caller,
                CreateSessionRequest {
                    template: r.template,
                    resources,
                    cluster: opt(&r.cluster),
                    region: opt(&r.region),
                },
            )
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::CreateSessionResponse {
            id: answer.id,
            state: answer.state,
            agent_id: answer.agent_id,
            command_id: answer.command_id,
        }))
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = caller(&req).await?;
        let limit = Some(req.into_inner().limit).filter(|l| *l != 0);
        let list = self
            .api
            .list_sessions(&caller, limit)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: list.sessions.into_iter().map(session_pb).collect(),
        }))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = caller(&req).await?;
        let s = self
            .api
            .get_session(&caller, &req.into_inner().id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(session_pb(s)))
    }

    async fn delete_session(
        &self,
        req: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let caller = caller(&req).await?;
        let a = self
            .api
            .delete_session(&caller, &req.into_inner().id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::DeleteSessionResponse {
            id: a.id,
            state: a.state,
            command_id: a.command_id.unwrap_or_default(),
            cancelled_command_id: a.cancelled_command_id.unwrap_or_default(),
        }))
    }

    async fn hibernate_session(
        &self,
        req: Request<pb::HibernateSessionRequest>,
    ) -> Result<Response<pb::SessionCommandResponse>, Status> {
        let caller = caller(&req).await?;
        let a = self
            .api
            .hibernate_session(&caller, &req.into_inner().id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::SessionCommandResponse {
            id: a.id,
            state: a.state,
            command_id: a.command_id,
        }))
    }

    async fn wake_session(
        &self,
        req: Request<pb::WakeSessionRequest>,
    ) -> Result<Response<pb::SessionCommandResponse>, Status> {
        let caller = caller(&req).await?;
        let a = self
            .api
            .wake_session(&caller, &req.into_inner().id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::SessionCommandResponse {
            id: a.id,
            state: a.state,
            command_id: a.command_id,
        }))
    }

    async fn get_command(
        &self,
        req: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        let caller = caller(&req).await?;
        let c = self
            .api
            .get_command(&caller, &req.into_inner().command_id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(command_pb(c)))
    }

    async fn list_session_commands(
        &self,
        req: Request<pb::ListSessionCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let caller = caller(&req).await?;
        let list = self
            .api
            .list_session_commands(&caller, &req.into_inner().session_id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::ListCommandsResponse {
            commands: list.commands.into_iter().map(command_pb).collect(),
        }))
    }

    type WatchSessionStream = EventStream<pb::SessionEvent>;

    async fn watch_session(
        &self,
        req: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let caller = caller(&req).await?;
        let rx = self
            .api
            .watch_session(&caller, &req.into_inner().id)
            .await
            .map_err(ApiError::into_status)?;
        let stream = ReceiverStream::new(rx).map(|event| {
            event
                .map(|e| pb::SessionEvent {
                    state: e.state,
                    session: Some(session_pb(e.session)),
                })
                .map_err(ApiError::into_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchCommandStream = EventStream<pb::CommandEvent>;

    async fn watch_command(
        &self,
        req: Request<pb::WatchCommandRequest>,
    ) -> Result<Response<Self::WatchCommandStream>, Status> {
        let caller = caller(&req).await?;
        let rx = self
            .api
            .watch_command(&caller, &req.into_inner().command_id)
            .await
            .map_err(ApiError::into_status)?;
        let stream = ReceiverStream::new(rx).map(|event| {
            event
                .map(|e| pb::CommandEvent {
                    status: e.status,
                    command: Some(command_pb(e.command)),
                })
                .map_err(ApiError::into_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `AgentAdminService`.
#[derive(Clone, Debug)]
pub struct AgentAdminServiceImpl {
    api: Api,
}

impl AgentAdminServiceImpl {
    pub fn new(api: Api) -> Self {
        Self { api }
    }
}

#[tonic::async_trait]
impl pb::agent_admin_service_server::AgentAdminService for AgentAdminServiceImpl {
    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = caller(&req).await?;
        let list = self
            .api
            .list_agents(&caller)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: list.agents.into_iter().map(agent_pb).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let caller = caller(&req).await?;
        let a = self
            .api
            .get_agent(&caller, &req.into_inner().agent_id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(agent_pb(a)))
    }

    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let caller = caller(&req).await?;
        let r = req.into_inner();
        let a = self
            .api
            .register_agent(
                &caller,
                RegisterAgentRequest {
                    agent_id: r.agent_id,
                    cluster: opt(&r.cluster),
                    region: opt(&r.region),
                    max_sessions: Some(r.max_sessions).filter(|m| *m != 0),
                },
            )
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(agent_pb(a)))
    }

    async fn issue_credential(
        &self,
        req: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssuedCredential>, Status> {
        let caller = caller(&req).await?;
        let c = self
            .api
            .issue_credential(&caller, &req.into_inner().agent_id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::IssuedCredential {
            credential_id: c.credential_id,
            agent_id: c.agent_id,
            token: c.token,
        }))
    }

    async fn revoke_credential(
        &self,
        req: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        let caller = caller(&req).await?;
        let r = req.into_inner();
        self.api
            .revoke_credential(&caller, &r.agent_id, &r.credential_id)
            .await
            .map_err(ApiError::into_status)?;
        Ok(Response::new(pb::RevokeCredentialResponse {}))
    }
}
