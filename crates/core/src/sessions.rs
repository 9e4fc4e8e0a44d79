//! Sessions as the control plane sees them, and how agent reports move them.
//!
//! Command outcomes move sessions inside the database (trigger
//! `agent_commands_follow_session`, migration 2), so a command and its session never
//! disagree. This module covers what the agent observes on its own — crashes, evictions —
//! and the reconciliation when an agent says hello.

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

/// The agent connection a report or a reconciliation comes from. Every write made on its
/// behalf is fenced by it: once a newer connection of the agent exists (or this one was
/// closed), the write changes nothing.
#[derive(Clone, Copy, Debug)]
pub struct Reporter<'a> {
    pub agent_id: &'a str,
    pub epoch: i64,
    /// The connection's lease owner, as stored in `agents.connected_owner`.
    pub owner: &'a str,
}

/// Applies observations reported by an agent's runtime, in the order given: when one
/// session is observed more than once, the last observation is the one that counts. Only
/// sessions of that agent in a settled state (`running`, `hibernated`) are moved: a session
/// with a command in flight is left to the command's outcome. Fenced by the reporting
/// connection (a superseded connection changes nothing). Returns the ids that changed.
pub async fn session_observe(
    pool: &PgPool,
    reporter: Reporter<'_>,
    observations: &[Observation],
) -> Result<Vec<String>> {
    // Last observation per session wins; `UPDATE … FROM` with two source rows for one
    // target row would apply an arbitrary one.
    let mut last: Vec<&Observation> = Vec::new();
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for o in observations {
        match at.get(o.session_id.as_str()) {
            Some(&i) => last[i] = o,
            None => {
                at.insert(&o.session_id, last.len());
                last.push(o);
            }
        }
    }
    let mut ids = Vec::new();
    let mut states = Vec::new();
    let mut messages = Vec::new();
    for o in last {
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
          AND EXISTS (
              SELECT 1 FROM agents a
              WHERE a.agent_id = $1 AND a.connection_epoch = $5 AND a.connected_owner = $6)
        RETURNING s.id
        "#,
        reporter.agent_id,
        &ids,
        &states,
        &messages,
        reporter.epoch,
        reporter.owner,
    )
    .fetch_all(pool)
    .await?;
    for id in &changed {
        tracing::warn!(agent_id = reporter.agent_id, session_id = %id, "session state changed by agent observation");
    }
    Ok(changed)
}

/// Reconciles the database with the inventory an agent reported when it connected.
///
/// Call it only with a *known* inventory: an agent that could not list its sessions says
/// so ("inventory unknown"), and then nothing is reconciled — unknown is not empty.
///
/// Nothing is destroyed merely because the agent was offline: a session the database
/// still wants is never stopped, and only settled sessions with no command in flight are
/// declared lost (checked in the same statement that marks them, so a command accepted
/// meanwhile wins). Orphan stops are queued only for sessions that are this agent's or
/// unknown everywhere; a session of another agent that this one reports is logged and
/// left alone. Fenced by the reporting connection: a superseded connection gets
/// [`Error::Superseded`](crate::Error::Superseded) and changes nothing.
pub async fn session_reconcile(
    pool: &PgPool,
    reporter: Reporter<'_>,
    inventory: &[Observation],
) -> Result<Reconciliation> {
    let agent_id = reporter.agent_id;
    let reported: Vec<String> = inventory
        .iter()
        .filter(|o| !matches!(o.state, ObservedState::Stopped))
        .map(|o| o.session_id.clone())
        .collect();
    let mut tx = pool.begin().await?;
    // Held to the commit: a newer connection's connect waits for this reconciliation, or
    // has already won and this one changes nothing.
    let current = sqlx::query_scalar!(
        r#"
        SELECT 1 AS "one!" FROM agents
        WHERE agent_id = $1 AND connection_epoch = $2 AND connected_owner = $3
        FOR SHARE
        "#,
        agent_id,
        reporter.epoch,
        reporter.owner,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if current.is_none() {
        return Err(crate::Error::Superseded {
            agent_id: agent_id.to_owned(),
            epoch: reporter.epoch,
        });
    }

    // Orphans: running on the agent, but terminated, failed or unknown here, and no stop
    // already queued.
    let orphans = sqlx::query!(
        r#"
        SELECT r.id AS "id!", s.agent_id AS "owner_agent?"
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
    let mut stop_ids = Vec::new();
    for row in orphans {
        match row.owner_agent {
            Some(other) if other != agent_id => {
                tracing::error!(agent_id, session_id = %row.id, assigned_to = %other,
                    "agent reports a session assigned to another agent; left alone");
            }
            _ => stop_ids.push(row.id),
        }
    }
    let stops: Vec<NewCommand> = stop_ids
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

    // Lost: settled here, unknown to the agent, nothing in flight that could explain it —
    // decided and applied by one statement, so a concurrently accepted command (which
    // moves the session out of `running`/`hibernated` first) is never overwritten.
    let lost = sqlx::query_scalar!(
        r#"
        UPDATE sessions s
        SET state = 'failed', updated_at = now(),
            status_message = 'the agent reconnected without this session (lost while it was away)'
        WHERE s.agent_id = $1 AND s.state IN ('running', 'hibernated')
          AND NOT (s.id = ANY($2))
          AND NOT EXISTS (
              SELECT 1 FROM agent_commands c
              WHERE c.session_id = s.id AND c.status IN ('pending', 'sent', 'ack'))
        RETURNING s.id
        "#,
        agent_id,
        &reported,
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    for id in &stop_ids {
        tracing::warn!(agent_id, session_id = %id, "orphan session on agent: stop queued");
    }
    for id in &lost {
        tracing::warn!(agent_id, session_id = %id, "session lost by agent: marked failed");
    }
    Ok(Reconciliation {
        orphans_stopped: stop_ids,
        lost,
    })
}
