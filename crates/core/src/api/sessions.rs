//! Sessions as users create and change them.
//!
//! Each operation runs on the caller's connection, inside the caller's transaction, and
//! moves the session row together with enqueuing its command. The session row is locked
//! (`FOR UPDATE`) before its state is judged, so two concurrent requests on one session
//! are decided one after the other. Afterwards the session follows its commands by
//! itself (trigger `agent_commands_follow_session`, migration 2).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngCore;
use sqlx::{PgConnection, PgExecutor, PgPool};

use super::changes::Snapshot;
use super::placement::{Placement, agent_choose};
use crate::command::{
    CommandId, CommandKind, HibernateSession, Resources, StartSession, StopSession, WakeSession,
};
use crate::error::{Error, Result};
use crate::queue::{CommandQueue, CommandRecord, NewCommand};

/// A session row; every nullable column is an `Option`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub template: String,
    pub agent_id: String,
    /// One of [`crate::sessions::SESSION_STATES`].
    pub state: String,
    pub resources: serde_json::Value,
    pub url: Option<String>,
    pub status_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub terminated_at: Option<DateTime<Utc>>,
}

/// A session to create. Inputs are validated by the caller's edge; the database enforces
/// the rest.
#[derive(Clone, Debug)]
pub struct NewSession {
    pub user_id: String,
    pub template: String,
    pub resources: Option<Resources>,
    pub placement: Placement,
    /// The offline bound that decides which agents count as online.
    pub offline_after: Duration,
    /// W3C `traceparent` of the request, carried by the start command.
    pub trace_context: Option<String>,
    /// At most this many of the user's sessions may be active (not terminated or failed);
    /// `None`: no limit.
    pub max_active_per_user: Option<u32>,
}

/// A created session and its start command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionCreated {
    pub id: String,
    pub agent_id: String,
    pub command_id: CommandId,
}

/// What a stop did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionStop {
    /// `stop_session` queued for the session's agent; the session is `terminating`.
    Queued { command_id: CommandId },
    /// The start had never been delivered: it was cancelled and the session is
    /// `terminated` without the cluster being touched.
    StartCancelled { start_command_id: CommandId },
}

/// The `{user}-{template}-{8 hex}` shape of session ids, kept from the original system.
/// The user part is reduced to what a Kubernetes name allows (lower-case letters, digits,
/// dashes; starting with a letter), so ids can name workloads directly.
pub fn session_id_new(user_id: &str, template: &str) -> String {
    let mut user: String = user_id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while user.contains("--") {
        user = user.replace("--", "-");
    }
    let mut user: String = user.trim_matches('-').chars().take(20).collect();
    user = user.trim_end_matches('-').to_owned();
    if !user.starts_with(|c: char| c.is_ascii_lowercase()) {
        user.insert(0, 'u');
    }
    let mut suffix = [0u8; 4];
    rand::rng().fill_bytes(&mut suffix);
    format!("{user}-{template}-{}", hex::encode(suffix))
}

/// A transaction that creates sessions for one user. When a quota applies it is begun
/// holding the user's quota lock, taken in the same round trip as its `BEGIN`: two
/// concurrent creates by one user are counted one after the other (other users are not
/// held up), and every statement the create runs takes its snapshot after the lock was
/// granted, so it sees what the previous holder committed.
pub struct CreateTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    user_id: String,
    quota_locked: bool,
}

impl std::fmt::Debug for CreateTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateTx")
            .field("user_id", &self.user_id)
            .field("quota_locked", &self.quota_locked)
            .finish_non_exhaustive()
    }
}

impl CreateTx {
    /// Begins the transaction for creating `new` (see the type's docs).
    pub async fn begin(pool: &PgPool, new: &NewSession) -> Result<Self> {
        let quota_locked = new.max_active_per_user.is_some();
        let tx = if quota_locked {
            // A simple-protocol query takes no parameters; the key is an integer computed
            // here, so nothing the user sent is spliced into the SQL.
            let key = quota_lock_key(&new.user_id);
            pool.begin_with(sqlx::AssertSqlSafe(format!(
                "BEGIN; SELECT pg_advisory_xact_lock({key})"
            )))
            .await?
        } else {
            pool.begin().await?
        };
        Ok(Self {
            tx,
            user_id: new.user_id.clone(),
            quota_locked,
        })
    }

    /// The transaction's connection, for what else the request writes in it.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    pub fn into_inner(self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        self.tx
    }
}

/// The advisory lock key of `user_id`'s session quota: the first 8 bytes of a SHA-256,
/// the same on every gateway and every version.
fn quota_lock_key(user_id: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("session-quota:{user_id}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn quota_exceeded(active: i64, max: u32) -> Error {
    Error::QuotaExceeded(format!(
        "you already have {active} active sessions, the most allowed is {max}; stop one first"
    ))
}

/// Creates a session on the chosen agent and enqueues its `start_session`, in `tx`.
/// [`Error::QuotaExceeded`] when the user already has `max_active_per_user` active
/// sessions; [`Error::NoEligibleAgent`] when no agent qualifies.
///
/// The common case is one statement: the user's active count, placement
/// (`streamspace_placement`, migration 8) and the session's insert. It leaves the rest
/// to the general path below: an agent with `max_sessions` (its last places are taken
/// under its lock), no eligible agent (the error says why), a session id collision.
pub async fn session_create(tx: &mut CreateTx, new: &NewSession) -> Result<SessionCreated> {
    if tx.user_id != new.user_id || (new.max_active_per_user.is_some() && !tx.quota_locked) {
        return Err(Error::InvalidInput(
            "a session create must run in a CreateTx begun for the same request".into(),
        ));
    }
    let conn = tx.conn();
    let resources = serde_json::to_value(new.resources.clone().unwrap_or_default())
        .map_err(|e| Error::InvalidInput(format!("resources: {e}")))?;
    let max = new
        .max_active_per_user
        .map(|m| i32::try_from(m).unwrap_or(i32::MAX));
    let candidate = session_id_new(&new.user_id, &new.template);
    let first = sqlx::query!(
        r#"
        WITH quota AS (
            SELECT CASE WHEN $5::int4 IS NULL THEN 0
                        ELSE (SELECT count(*) FROM sessions
                              WHERE user_id = $2 AND state NOT IN ('terminated', 'failed'))
                   END AS active
        ), chosen AS (
            SELECT p.agent_id, p.max_sessions
            FROM streamspace_placement($6, $7, $8, '{}') p
        ), inserted AS (
            -- Only an uncapped agent: a capped one's last places are taken under its lock.
            INSERT INTO sessions (id, user_id, template, agent_id, resources)
            SELECT $1, $2, $3, c.agent_id, $4::jsonb
            FROM chosen c, quota q
            WHERE c.max_sessions IS NULL AND ($5::int4 IS NULL OR q.active < $5::int4)
            ON CONFLICT (id) DO NOTHING
            RETURNING agent_id
        )
        SELECT q.active AS "active!", (SELECT agent_id FROM inserted) AS inserted_on
        FROM quota q
        "#,
        candidate,
        new.user_id,
        new.template,
        resources,
        max,
        new.placement.cluster,
        new.placement.region,
        new.offline_after.as_secs_f64(),
    )
    .fetch_one(&mut *conn)
    .await?;
    if let Some(m) = new.max_active_per_user
        && first.active >= i64::from(m)
    {
        return Err(quota_exceeded(first.active, m));
    }
    let (id, agent_id) = match first.inserted_on {
        Some(agent_id) => (candidate, agent_id),
        None => {
            let agent_id = agent_choose(conn, &new.placement, new.offline_after).await?;
            (
                session_insert(conn, new, &agent_id, &resources).await?,
                agent_id,
            )
        }
    };
    let mut start = NewCommand::new(
        agent_id.clone(),
        Some(id.clone()),
        CommandKind::StartSession(StartSession {
            template: new.template.clone(),
            user_id: Some(new.user_id.clone()),
            resources: new.resources.clone(),
            home_volume: false,
            env: Default::default(),
        }),
    );
    start.trace_context = new.trace_context.clone();
    let enqueued = CommandQueue::command_enqueue(conn, &start).await?;
    Ok(SessionCreated {
        id,
        agent_id,
        command_id: enqueued.command_id,
    })
}

/// Inserts the session row under a fresh id on `agent_id`; returns the id.
async fn session_insert(
    conn: &mut PgConnection,
    new: &NewSession,
    agent_id: &str,
    resources: &serde_json::Value,
) -> Result<String> {
    // A collision of the 32 random bits within one user's template is unlikely; a few
    // fresh draws make it practically impossible.
    for _ in 0..4 {
        let candidate = session_id_new(&new.user_id, &new.template);
        let inserted = sqlx::query!(
            r#"
            INSERT INTO sessions (id, user_id, template, agent_id, resources)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (id) DO NOTHING
            "#,
            candidate,
            new.user_id,
            new.template,
            agent_id,
            resources,
        )
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(candidate);
        }
    }
    Err(Error::Conflict(
        "could not allocate a unique session id".into(),
    ))
}

/// One of `user_id`'s sessions.
pub async fn session_get(
    exec: impl PgExecutor<'_>,
    user_id: &str,
    id: &str,
) -> Result<Option<SessionRecord>> {
    Ok(sqlx::query_as!(
        SessionRecord,
        r#"
        SELECT id, user_id, template, agent_id, state, resources, url, status_message,
               created_at, updated_at, terminated_at
        FROM sessions WHERE id = $1 AND user_id = $2
        "#,
        id,
        user_id,
    )
    .fetch_optional(exec)
    .await?)
}

/// `user_id`'s sessions, newest first, at most `limit`.
pub async fn session_list(
    exec: impl PgExecutor<'_>,
    user_id: &str,
    limit: i64,
) -> Result<Vec<SessionRecord>> {
    Ok(sqlx::query_as!(
        SessionRecord,
        r#"
        SELECT id, user_id, template, agent_id, state, resources, url, status_message,
               created_at, updated_at, terminated_at
        FROM sessions WHERE user_id = $1
        ORDER BY created_at DESC, id
        LIMIT $2
        "#,
        user_id,
        limit,
    )
    .fetch_all(exec)
    .await?)
}

/// One of `user_id`'s sessions together with the snapshot it was read in, so a watcher
/// can tell which later change notifications it has already seen.
pub async fn session_get_snapshot(
    pool: &PgPool,
    user_id: &str,
    id: &str,
) -> Result<Option<(SessionRecord, Snapshot)>> {
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let snapshot = Snapshot::current(&mut tx).await?;
    let record = session_get(&mut *tx, user_id, id).await?;
    tx.commit().await?;
    Ok(record.map(|r| (r, snapshot)))
}

/// The session locked for a change, or `NotFound` (also for another user's session).
async fn session_lock(
    conn: &mut PgConnection,
    user_id: &str,
    id: &str,
) -> Result<(String, String)> {
    let row = sqlx::query!(
        r#"SELECT agent_id, state FROM sessions WHERE id = $1 AND user_id = $2 FOR UPDATE"#,
        id,
        user_id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| (r.agent_id, r.state))
        .ok_or_else(|| Error::NotFound(format!("session {id}")))
}

async fn session_set_state(conn: &mut PgConnection, id: &str, state: &str) -> Result<()> {
    sqlx::query!(
        "UPDATE sessions SET state = $2, updated_at = now() WHERE id = $1",
        id,
        state,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Stops one of `user_id`'s sessions, in the caller's transaction.
///
/// When the session's start was never delivered, the start is cancelled and the session
/// ends here (`terminated`) without a stop command: the cluster was never touched. Else a
/// `stop_session` is queued for the session's own agent, also while that agent is down.
/// A terminating or terminated session is a [`Error::Conflict`].
pub async fn session_stop(
    conn: &mut PgConnection,
    user_id: &str,
    id: &str,
    trace_context: Option<String>,
) -> Result<SessionStop> {
    let (agent_id, state) = session_lock(conn, user_id, id).await?;
    match state.as_str() {
        "terminating" => {
            return Err(Error::Conflict(format!(
                "session {id} is already terminating; follow its stop command instead of sending another"
            )));
        }
        "terminated" => {
            return Err(Error::Conflict(format!(
                "session {id} is already terminated"
            )));
        }
        _ => {}
    }
    // Only these states can have a start that was never sent; `starting`, `running`,
    // `hibernated` and `failed` come after the start was delivered (or ended), so they skip
    // the look.
    let start_may_be_unsent = matches!(state.as_str(), "pending" | "hibernating" | "waking");
    if start_may_be_unsent && let Some(start) = start_never_sent(conn, id).await? {
        // The dispatcher may claim the start between our look and the cancel; the cancel
        // is conditional on `pending`, and when it loses that race we queue a stop below.
        match CommandQueue::command_cancel(
            conn,
            &start,
            "the session was stopped before its start was delivered",
        )
        .await
        {
            Ok(()) => {
                // Whatever was accepted behind the start waits behind it (per-session
                // FIFO), so none of it was sent either: it goes with the start.
                for later in open_commands_after(conn, id, &start).await? {
                    CommandQueue::command_cancel(
                        conn,
                        &later,
                        "the session was stopped before its start was delivered",
                    )
                    .await?;
                }
                sqlx::query!(
                    r#"
                    UPDATE sessions
                    SET state = 'terminated', terminated_at = now(), updated_at = now(),
                        status_message = 'stopped before it was started'
                    WHERE id = $1
                    "#,
                    id,
                )
                .execute(&mut *conn)
                .await?;
                return Ok(SessionStop::StartCancelled {
                    start_command_id: start,
                });
            }
            Err(Error::InvalidTransition { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let mut stop = NewCommand::new(
        agent_id,
        Some(id.to_owned()),
        CommandKind::StopSession(StopSession::default()),
    );
    stop.trace_context = trace_context;
    let enqueued = CommandQueue::command_enqueue(conn, &stop).await?;
    session_set_state(conn, id, "terminating").await?;
    Ok(SessionStop::Queued {
        command_id: enqueued.command_id,
    })
}

/// The open commands of session `id` accepted after `command`, oldest first.
async fn open_commands_after(
    conn: &mut PgConnection,
    id: &str,
    command: &CommandId,
) -> Result<Vec<CommandId>> {
    let rows = sqlx::query_scalar!(
        r#"
        SELECT command_id FROM agent_commands
        WHERE session_id = $1 AND status IN ('pending', 'sent', 'ack')
          AND seq > (SELECT seq FROM agent_commands WHERE command_id = $2)
        ORDER BY seq
        "#,
        id,
        command.as_str(),
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(|c| stored_command_id(&c)).collect()
}

/// A command id read back from the database.
fn stored_command_id(id: &str) -> Result<CommandId> {
    id.parse()
        .map_err(|e| Error::InvalidInput(format!("stored command id: {e}")))
}

/// The state session `id` will be in once its accepted commands have run: the target of
/// its newest open command, or (with none open) the target of its current state. Called
/// with the session row locked, so no command of the session is accepted meanwhile.
async fn intended_state(conn: &mut PgConnection, id: &str, state: &str) -> Result<&'static str> {
    // An ended session stays ended, whatever still runs out behind it.
    match state {
        "terminated" => return Ok("terminated"),
        "failed" => return Ok("failed"),
        _ => {}
    }
    let newest_open = sqlx::query_scalar!(
        r#"
        SELECT action FROM agent_commands
        WHERE session_id = $1 AND status IN ('pending', 'sent', 'ack')
        ORDER BY seq DESC
        LIMIT 1
        "#,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match newest_open.as_deref() {
        Some("start_session" | "wake_session") => "running",
        Some("hibernate_session") => "hibernated",
        Some("stop_session") => "terminated",
        _ => match state {
            "pending" | "starting" | "running" | "waking" => "running",
            "hibernating" | "hibernated" => "hibernated",
            _ => "terminated",
        },
    })
}

/// The session's start command when it is pending and was never handed to an agent.
async fn start_never_sent(conn: &mut PgConnection, id: &str) -> Result<Option<CommandId>> {
    let row = sqlx::query_scalar!(
        r#"
        SELECT command_id FROM agent_commands
        WHERE session_id = $1 AND action = 'start_session'
          AND status = 'pending' AND sent_at IS NULL
        ORDER BY seq DESC
        LIMIT 1
        "#,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.as_deref().map(stored_command_id).transpose()
}

/// Hibernates a session that is, or will be once its accepted commands have run,
/// `running`: queues a `hibernate_session` for the session's agent and marks the session
/// `hibernating`.
pub async fn session_hibernate(
    conn: &mut PgConnection,
    user_id: &str,
    id: &str,
    trace_context: Option<String>,
) -> Result<CommandId> {
    session_change(
        conn,
        user_id,
        id,
        "running",
        "hibernating",
        CommandKind::HibernateSession(HibernateSession::default()),
        trace_context,
    )
    .await
}

/// Wakes a session that is, or will be once its accepted commands have run, `hibernated`:
/// queues a `wake_session` for the session's agent and marks the session `waking`.
pub async fn session_wake(
    conn: &mut PgConnection,
    user_id: &str,
    id: &str,
    trace_context: Option<String>,
) -> Result<CommandId> {
    session_change(
        conn,
        user_id,
        id,
        "hibernated",
        "waking",
        CommandKind::WakeSession(WakeSession::default()),
        trace_context,
    )
    .await
}

async fn session_change(
    conn: &mut PgConnection,
    user_id: &str,
    id: &str,
    from: &str,
    to: &str,
    kind: CommandKind,
    trace_context: Option<String>,
) -> Result<CommandId> {
    let (agent_id, state) = session_lock(conn, user_id, id).await?;
    let intended = intended_state(conn, id, &state).await?;
    if intended != from {
        let now = if intended == state {
            format!("session {id} is {state}")
        } else {
            format!(
                "session {id} is {state} and will be {intended} once its accepted commands have run"
            )
        };
        return Err(Error::Conflict(format!(
            "{now}; only a session that is (or will be) {from} can be sent {}",
            kind.action()
        )));
    }
    let mut cmd = NewCommand::new(agent_id, Some(id.to_owned()), kind);
    cmd.trace_context = trace_context;
    let enqueued = CommandQueue::command_enqueue(conn, &cmd).await?;
    session_set_state(conn, id, to).await?;
    Ok(enqueued.command_id)
}

/// A command of one of `user_id`'s sessions; `None` also for another user's command.
pub async fn command_get_for_user(
    exec: impl PgExecutor<'_>,
    user_id: &str,
    command_id: &CommandId,
) -> Result<Option<CommandRecord>> {
    Ok(sqlx::query_as!(
        CommandRecord,
        r#"
        SELECT c.* FROM agent_commands c
        JOIN sessions s ON s.id = c.session_id
        WHERE c.command_id = $1 AND s.user_id = $2
        "#,
        command_id.as_str(),
        user_id,
    )
    .fetch_optional(exec)
    .await?)
}

/// A command together with the snapshot it was read in (see [`session_get_snapshot`]).
pub async fn command_get_snapshot(
    pool: &PgPool,
    command_id: &CommandId,
) -> Result<Option<(CommandRecord, Snapshot)>> {
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let snapshot = Snapshot::current(&mut tx).await?;
    let record = CommandQueue::command_get(&mut *tx, command_id).await?;
    tx.commit().await?;
    Ok(record.map(|r| (r, snapshot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_keep_the_original_shape_and_are_kubernetes_names() {
        let id = session_id_new("alice", "firefox-browser");
        let (head, hex) = id.rsplit_once('-').unwrap();
        assert_eq!(head, "alice-firefox-browser");
        assert_eq!(hex.len(), 8);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));

        let id = session_id_new("Bob.Smith@Example.com", "xterm");
        assert!(id.starts_with("bob-smith-example-co-xterm-"), "{id}");
        let id = session_id_new("42", "xterm");
        assert!(id.starts_with("u42-xterm-"), "{id}");
        let id = session_id_new("@@@", "xterm");
        assert!(id.starts_with("u-xterm-"), "{id}");
        let id = session_id_new(&"x".repeat(100), "xterm");
        assert!(id.len() <= 20 + 1 + 5 + 1 + 8, "{id}");
    }
}
