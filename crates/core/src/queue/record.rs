//! Reading commands back: one command, or a session's history.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::CommandQueue;
use crate::command::CommandId;
use crate::error::Result;

/// A stored command exactly as the table holds it; every nullable column is an `Option`.
/// `action` stays a string, since stored rows may carry words this build does not know.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CommandRecord {
    pub command_id: String,
    pub seq: i64,
    pub agent_id: String,
    pub session_id: Option<String>,
    pub action: String,
    pub payload: serde_json::Value,
    pub status: String,
    pub error_message: Option<String>,
    pub result: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_token: Option<i64>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub trace_context: Option<String>,
    /// The oldest open command of its session (or one without a session): only a head is
    /// claimable. Meaningful while the command is open (migration 6).
    pub session_head: bool,
}

impl CommandQueue {
    pub async fn command_get(
        exec: impl PgExecutor<'_>,
        command_id: &CommandId,
    ) -> Result<Option<CommandRecord>> {
        Ok(sqlx::query_as!(
            CommandRecord,
            "SELECT * FROM agent_commands WHERE command_id = $1",
            command_id.as_str()
        )
        .fetch_optional(exec)
        .await?)
    }

    /// A session's commands in acceptance order.
    pub async fn command_list_for_session(
        exec: impl PgExecutor<'_>,
        session_id: &str,
    ) -> Result<Vec<CommandRecord>> {
        Ok(sqlx::query_as!(
            CommandRecord,
            "SELECT * FROM agent_commands WHERE session_id = $1 ORDER BY seq",
            session_id
        )
        .fetch_all(exec)
        .await?)
    }
}
