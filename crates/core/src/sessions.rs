//! Sessions as the control plane sees them, and how agent reports move them.
//!
//! Command outcomes move sessions inside the database (trigger
//! `agent_commands_follow_session`, migration 2), so a command and its session never
//! disagree. This module covers what the agent observes on its own — crashes, evictions —
//! and the reconciliation when an agent says hello.

use std::collections::HashSet;

use sqlx::PgPool;

use crate::command::{CommandKind, StopSession};
use crate::error::Result;
use crate::queue::{CommandQueue, NewCommand};

/// Session states, as stored in `sessions.state`.
pub const SESSION_STATES: [&str; 9] = [
    "pending",
    "starting",
    "running",
    "hibernating",
    "hibernated",
    "waking",
    "terminating",
    "terminated",
    "failed",
];

/// What an agent's runtime observed about one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub session_id: String,
    pub state: ObservedState,
    pub url: Option<String>,
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservedState {
    Starting,
    Running,
    Hibernated,
    Stopped,
    Failed,
}

/// What reconciliation did after an agent's hello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Sessions the agent runs that the database says should not exist: a `stop_session`
    /// was queued for each.
    pub orphans_stopped: Vec<String>,
    /// Sessions the database thought were running on this agent that the agent does not
    /// know: marked `failed` with a reason.
    pub lost: Vec<String>,
}

/// Applies observations reported by `agent_id`'s runtime. Only sessions of that agent in a
/// settled state (`running`, `hibernated`) are moved: a session with a command in flight is
/// left to the command's outcome. Returns the ids that changed.
pub async fn session_observe(
    pool: &PgPool,
    agent_id: &str,
    observations: &[Observation],
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut states = Vec::new();
    let mut messages = Vec::new();
    for o in observations {
        let state = match o.state {
            ObservedState::Failed | ObservedState::Stopped => "failed",
            ObservedState::Hibernated => "hibernated",
            ObservedState::Running => "running",
            ObservedState::Starting => continue,
        };
        ids.push(o.session_id.clone());
        states.push(state.to_owned());
        messages.push(o.message.clone().unwrap_or_else(|| match o.state {
            ObservedState::Stopped => "the session stopped without a stop command".to_owned(),
            _ => "reported by the agent".to_owned(),
        }));
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let changed = sqlx::query_scalar!(
        r#"
        UPDATE sessions s
        SET state = o.state,
            status_message = CASE WHEN o.state = 'failed' THEN o.message ELSE s.status_message END,
            updated_at = now()
        FROM UNNEST($2::text[], $3::text[], $4::text[]) AS o(id, state, message)
        WHERE s.id = o.id AND s.agent_id = $1
          AND s.state IN ('running', 'hibernated')
          AND s.state <> o.state
          AND NOT EXISTS (
              SELECT 1 FROM agent_commands c
              WHERE c.session_id = s.id AND c.status IN ('pending', 'sent', 'ack'))
        RETURNING s.id
        "#,
        agent_id,
        &ids,
        &states,
        &messages,
    )
    .fetch_all(pool)
    .await?;
    for id in &changed {
        tracing::warn!(agent_id, session_id = %id, "session state changed by agent observation");
    }
    Ok(changed)
}

/// Reconciles the database with the inventory an agent reported in its hello.
///
/// Nothing is destroyed merely because the agent was offline: a session the database
/// still wants is never stopped, and only settled sessions with no command in flight are
/// declared lost.
pub async fn session_reconcile(
    pool: &PgPool,
    agent_id: &str,
    inventory: &[Observation],
) -> Result<Reconciliation> {
    let reported: Vec<String> = inventory
        .iter()
        .filter(|o| !matches!(o.state, ObservedState::Stopped))
        .map(|o| o.session_id.clone())
        .collect();
    let mut tx = pool.begin().await?;

    // Orphans: running on the agent, but terminated, failed or unknown here, and no stop
    // already queued.
    let orphans = sqlx::query_scalar!(
        r#"
        SELECT r.id AS "id!"
        FROM UNNEST($2::text[]) AS r(id)
        LEFT JOIN sessions s ON s.id = r.id
        WHERE (s.id IS NULL OR s.state IN ('terminated', 'failed') OR s.agent_id <> $1)
          AND NOT EXISTS (
              SELECT 1 FROM agent_commands c
              WHERE c.session_id = r.id AND c.agent_id = $1 AND c.action = 'stop_session'
                AND c.status IN ('pending', 'sent', 'ack'))
        "#,
        agent_id,
        &reported,
    )
    .fetch_all(&mut *tx)
    .await?;
    let stops: Vec<NewCommand> = orphans
        .iter()
        .map(|id| {
            NewCommand::new(
                agent_id,
                Some(id.clone()),
                CommandKind::StopSession(StopSession::default()),
            )
        })
        .collect();
    if !stops.is_empty() {
        CommandQueue::command_enqueue_many(&mut tx, &stops).await?;
    }

    // Lost: settled here, unknown to the agent, nothing in flight that could explain it.
    let reported_set: HashSet<&str> = reported.iter().map(String::as_str).collect();
    let candidates = sqlx::query_scalar!(
        r#"
        SELECT s.id FROM sessions s
        WHERE s.agent_id = $1 AND s.state IN ('running', 'hibernated')
          AND NOT EXISTS (
              SELECT 1 FROM agent_commands c
              WHERE c.session_id = s.id AND c.status IN ('pending', 'sent', 'ack'))
        "#,
        agent_id,
    )
    .fetch_all(&mut *tx)
    .await?;
    let lost: Vec<String> = candidates
        .into_iter()
        .filter(|id| !reported_set.contains(id.as_str()))
        .collect();
    if !lost.is_empty() {
        sqlx::query!(
            r#"
            UPDATE sessions
            SET state = 'failed', updated_at = now(),
                status_message = 'the agent reconnected without this session (lost while it was away)'
            WHERE id = ANY($1) AND agent_id = $2
            "#,
            &lost,
            agent_id,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    for id in &orphans {
        tracing::warn!(agent_id, session_id = %id, "orphan session on agent: stop queued");
    }
    for id in &lost {
        tracing::warn!(agent_id, session_id = %id, "session lost by agent: marked failed");
    }
    Ok(Reconciliation {
        orphans_stopped: orphans,
        lost,
    })
}
