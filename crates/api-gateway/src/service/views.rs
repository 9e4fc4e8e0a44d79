//! What clients send and receive, shared by REST (as JSON, with OpenAPI schemas) and gRPC
//! (converted to protobuf messages). Request types deny unknown fields, so a client that
//! tries to set the owner, agent or state of a session is told so instead of ignored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use streamspace_core::agents::AgentRecord;
use streamspace_core::api::SessionRecord;
use streamspace_core::queue::CommandRecord;
use utoipa::ToSchema;

/// Resource overrides; Kubernetes quantities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesView {
    /// Memory, e.g. `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16, example = "512Mi")]
    pub memory: Option<String>,
    /// CPU, e.g. `250m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16, example = "250m")]
    pub cpu: Option<String>,
}

/// `POST /api/v1/sessions`. Owner, agent and state are decided by the server.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// Template name, e.g. `firefox-browser`.
    #[schema(
        max_length = 32,
        pattern = "^[a-z][a-z0-9-]{0,31}$",
        example = "firefox-browser"
    )]
    pub template: String,
    #[serde(default)]
    pub resources: Option<ResourcesView>,
    /// Only agents of this cluster; names an offline agent's cluster to queue for it.
    #[serde(default)]
    #[schema(max_length = 63)]
    pub cluster: Option<String>,
    /// Only agents of this region.
    #[serde(default)]
    #[schema(max_length = 63)]
    pub region: Option<String>,
}

/// A session as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// `{user}-{template}-{8 hex}`.
    pub id: String,
    pub user_id: String,
    pub template: String,
    pub agent_id: String,
    /// `pending`, `starting`, `running`, `hibernating`, `hibernated`, `waking`,
    /// `terminating`, `terminated` or `failed`.
    pub state: String,
    pub resources: ResourcesView,
    pub url: Option<String>,
    pub status_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub terminated_at: Option<DateTime<Utc>>,
}

impl From<SessionRecord> for SessionView {
    fn from(r: SessionRecord) -> Self {
        Self {
            resources: serde_json::from_value(r.resources).unwrap_or_default(),
            id: r.id,
            user_id: r.user_id,
            template: r.template,
            agent_id: r.agent_id,
            state: r.state,
            url: r.url,
            status_message: r.status_message,
            created_at: r.created_at,
            updated_at: r.updated_at,
            terminated_at: r.terminated_at,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// `202` to a create: the session and its `start_session` command are committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionAccepted {
    pub id: String,
    /// Always `pending`.
    pub state: String,
    pub agent_id: String,
    /// The `start_session` command; follow it at `/api/v1/commands/{command_id}`.
    pub command_id: String,
}

/// `202` to a delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionStopAccepted {
    pub id: String,
    /// `terminating` when a stop was queued; `terminated` when the start had never been
    /// delivered and was cancelled instead.
    pub state: String,
    /// The `stop_session` command, when one was queued.
    pub command_id: Option<String>,
    /// The `start_session` command cancelled instead of stopping anything.
    pub cancelled_command_id: Option<String>,
}

/// `202` to hibernate or wake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionCommandAccepted {
    pub id: String,
    /// `hibernating` or `waking`.
    pub state: String,
    pub command_id: String,
}

/// A command as the API shows it (lease details are internal).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    pub command_id: String,
    pub session_id: Option<String>,
    pub agent_id: String,
    /// `start_session`, `stop_session`, `hibernate_session` or `wake_session`.
    pub action: String,
    /// `pending`, `sent`, `ack`, `completed`, `failed` or `cancelled`.
    pub status: String,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// What the agent reported on completion.
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

impl From<CommandRecord> for CommandView {
    fn from(r: CommandRecord) -> Self {
        Self {
            command_id: r.command_id,
            session_id: r.session_id,
            agent_id: r.agent_id,
            action: r.action,
            status: r.status,
            error_message: r.error_message,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            created_at: r.created_at,
            sent_at: r.sent_at,
            acknowledged_at: r.acknowledged_at,
            completed_at: r.completed_at,
            updated_at: r.updated_at,
            result: r.result,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandList {
    pub commands: Vec<CommandView>,
}

/// An agent with its derived liveness and load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub agent_id: String,
    pub cluster: String,
    pub region: String,
    /// Derived: connected to a dispatcher and heartbeating within the offline bound.
    pub online: bool,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub connected_at: Option<DateTime<Utc>>,
    pub disconnected_at: Option<DateTime<Utc>>,
    pub agent_version: Option<String>,
    /// Sessions on the agent that are not terminated or failed.
    pub active_sessions: i64,
    /// `null`: unlimited.
    pub max_sessions: Option<i32>,
    pub created_at: DateTime<Utc>,
}

impl From<AgentRecord> for AgentView {
    fn from(r: AgentRecord) -> Self {
        Self {
            agent_id: r.agent_id,
            cluster: r.cluster,
            region: r.region,
            online: r.online,
            last_heartbeat_at: r.last_heartbeat_at,
            connected_at: r.connected_at,
            disconnected_at: r.disconnected_at,
            agent_version: r.agent_version,
            active_sessions: r.active_sessions,
            max_sessions: r.max_sessions,
            created_at: r.created_at,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// `POST /api/v1/admin/agents`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgentRequest {
    /// 1-63 lower-case letters, digits or dashes, starting with a letter or digit.
    #[schema(
        max_length = 63,
        pattern = "^[a-z0-9][a-z0-9-]{0,62}$",
        example = "agent-eu-1"
    )]
    pub agent_id: String,
    /// Defaults to `default`.
    #[serde(default)]
    #[schema(max_length = 63)]
    pub cluster: Option<String>,
    /// Defaults to `default`.
    #[serde(default)]
    #[schema(max_length = 63)]
    pub region: Option<String>,
    /// Most sessions the agent takes; absent: unlimited.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub max_sessions: Option<i32>,
}

/// A new agent credential. The token is shown here only; it is stored hashed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedCredentialView {
    pub credential_id: String,
    pub agent_id: String,
    pub token: String,
}

/// One event of a session watch.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionEventView {
    /// The state this event reports.
    pub state: String,
    /// The freshest view of the session; may be ahead of `state`.
    pub session: SessionView,
}

/// One event of a command watch.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandEventView {
    /// The status this event reports.
    pub status: String,
    /// The freshest view of the command; may be ahead of `status`.
    pub command: CommandView,
}
