//! Transitions driven by the pipeline itself rather than by agent reports: lease release,
//! renewal and rescue, cancel, expiry and pruning.

use std::time::Duration;

use sqlx::PgConnection;

use super::{CommandQueue, NOTIFY_CHANNEL, secs};
use crate::command::{CommandId, CommandStatus};
use crate::error::{Error, Result};
use crate::telemetry::{METRICS, add};

/// Leases given up by a closing connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Back to `pending`, deliverable again at once.
    pub requeued: Vec<String>,
    /// Attempts exhausted: now `failed`.
    pub failed: Vec<String>,
}

/// Leases taken back from holders that stopped renewing them.
pub type Rescued = Released;

impl CommandQueue {
    /// Returns the leases of `owner` that the agent never acknowledged (its connection
    /// closed): `pending` again at once, without counting an attempt — they may never have
    /// reached the agent.
    ///
    /// Acknowledged commands are left leased: the agent may still be executing them, and
    /// only that agent can ever run them. When it reconnects, its handshake hands them back
    /// ([`command_release_superseded`](Self::command_release_superseded)) — without an
    /// attempt for the ones it says it still runs, so a flapping connection never fails a
    /// long start — and if it never comes back they expire and are rescued, counted.
    pub async fn command_release_owner(&self, owner: &str) -> Result<Released> {
        let rows = sqlx::query!(
            r#"
            WITH held AS (
                SELECT command_id FROM agent_commands
                WHERE lease_owner = $1 AND status = 'sent'
                FOR UPDATE
            )
            UPDATE agent_commands c
            SET status = 'pending',
                attempts = greatest(c.attempts - 1, 0),
                next_attempt_at = now(),
                lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                updated_at = now()
            FROM held h
            WHERE c.command_id = h.command_id
            RETURNING c.command_id, c.status, c.agent_id
            "#,
            owner,
        )
        .fetch_all(&self.pool)
        .await?;
        let agents = distinct_agents(rows.iter().map(|r| r.agent_id.as_str()));
        let released = split_released(rows.into_iter().map(|r| (r.command_id, r.status)));
        add(&METRICS.leases_released, released.requeued.len() as u64);
        self.notify_agents(&agents).await;
        Ok(released)
    }

    /// The handshake step of connection `epoch` (held by `owner`): returns every lease of
    /// `agent_id` held by an older connection, wherever it was held.
    ///
    /// Fenced: only while `epoch`/`owner` is still the agent's current connection (the
    /// agent row is locked `FOR SHARE` for the statement, so a newer connect waits for it
    /// or wins outright); otherwise [`Error::Superseded`] and nothing changes. A command the
    /// agent never acknowledged, or one the agent says it is still running
    /// (`in_progress`: it survived a flap), or one pipelined behind its session's
    /// unfinished head (it had not started), goes back without an attempt counted; any
    /// other acknowledged one counts the attempt the lost connection took (the agent lost
    /// it: most likely it crashed running it), and fails when attempts are exhausted.
    pub async fn command_release_superseded(
        &self,
        agent_id: &str,
        epoch: i64,
        owner: &str,
        in_progress: &[String],
    ) -> Result<Released> {
        let mut tx = self.pool.begin().await?;
        let current = sqlx::query_scalar!(
            r#"
            SELECT 1 AS "one!" FROM agents
            WHERE agent_id = $1 AND connection_epoch = $2 AND connected_owner = $3
            FOR SHARE
            "#,
            agent_id,
            epoch,
            owner,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if current.is_none() {
            return Err(Error::Superseded {
                agent_id: agent_id.to_owned(),
                epoch,
            });
        }
        let rows = sqlx::query!(
            r#"
            WITH held AS (
                -- Not counted: never acknowledged, still running in the agent process
                -- that came back, or pipelined behind its session's head (it cannot have
                -- started while the head was unfinished).
                SELECT command_id,
                       CASE WHEN status = 'sent' OR command_id = ANY($3) OR NOT session_head
                            THEN attempts - 1
                            ELSE attempts END AS attempts
                FROM agent_commands
                WHERE agent_id = $1 AND status IN ('sent', 'ack') AND lease_owner <> $2
                FOR UPDATE
            )
            UPDATE agent_commands c
            SET status = CASE WHEN h.attempts < c.max_attempts THEN 'pending' ELSE 'failed' END,
                attempts = greatest(h.attempts, 0),
                error_message = CASE WHEN h.attempts < c.max_attempts THEN c.error_message
                    ELSE format('gave up after %s attempts: the agent came back without a result', h.attempts)
                    END,
                completed_at = CASE WHEN h.attempts < c.max_attempts THEN NULL ELSE now() END,
                next_attempt_at = now(),
                lease_owner = CASE WHEN h.attempts < c.max_attempts THEN NULL ELSE c.lease_owner END,
                lease_token = CASE WHEN h.attempts < c.max_attempts THEN NULL ELSE c.lease_token END,
                lease_expires_at = CASE WHEN h.attempts < c.max_attempts THEN NULL ELSE c.lease_expires_at END,
                updated_at = now()
            FROM held h
            WHERE c.command_id = h.command_id
            RETURNING c.command_id, c.status
            "#,
            agent_id,
            owner,
            in_progress,
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let released = split_released(rows.into_iter().map(|r| (r.command_id, r.status)));
        add(&METRICS.leases_released, released.requeued.len() as u64);
        add(&METRICS.commands_failed, released.failed.len() as u64);
        Ok(released)
    }

    /// Extends the given leases of `owner` — exactly the commands the holding connection
    /// knows it has outstanding — by the configured lease length. A lease the connection
    /// does not know of (a claim whose reply was lost, a report it gave up writing) is not
    /// renewed: it expires and is rescued. Returns how many leases were extended.
    pub async fn command_lease_extend(&self, owner: &str, leases: &[(String, i64)]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, tokens): (Vec<String>, Vec<i64>) = leases.iter().cloned().unzip();
        let done = sqlx::query!(
            r#"
            UPDATE agent_commands c
            SET lease_expires_at = now() + make_interval(secs => $2)
            FROM UNNEST($3::text[], $4::int8[]) AS l(command_id, token)
            WHERE c.command_id = l.command_id AND c.lease_token = l.token
              AND c.lease_owner = $1 AND c.status IN ('sent', 'ack')
            "#,
            owner,
            secs(self.config.lease),
            &ids,
            &tokens,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Takes back leases that expired (their holder crashed or was cut off) — `pending`
    /// again, or `failed` when attempts are exhausted. Fresh leases are left alone.
    pub async fn command_rescue_expired(&self, limit: i64) -> Result<Rescued> {
        let rows = sqlx::query!(
            r#"
            WITH expired AS (
                -- A pipelined command queued behind its session's head (not the head
                -- itself) never started: the lost agent runs a session strictly in order,
                -- so it gets its attempt back. The head pays for the lost attempt.
                SELECT command_id,
                       CASE WHEN session_head THEN attempts ELSE greatest(attempts - 1, 0) END
                           AS attempts
                FROM agent_commands
                WHERE status IN ('sent', 'ack') AND lease_expires_at < now()
                ORDER BY lease_expires_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE agent_commands c
            SET status = CASE WHEN x.attempts < c.max_attempts THEN 'pending' ELSE 'failed' END,
                attempts = x.attempts,
                error_message = CASE WHEN x.attempts < c.max_attempts THEN c.error_message
                    ELSE format('gave up after %s attempts: lease expired without a result', x.attempts)
                    END,
                completed_at = CASE WHEN x.attempts < c.max_attempts THEN NULL ELSE now() END,
                next_attempt_at = now(),
                lease_owner = CASE WHEN x.attempts < c.max_attempts THEN NULL ELSE c.lease_owner END,
                lease_token = CASE WHEN x.attempts < c.max_attempts THEN NULL ELSE c.lease_token END,
                lease_expires_at = CASE WHEN x.attempts < c.max_attempts THEN NULL ELSE c.lease_expires_at END,
                updated_at = now()
            FROM expired x
            WHERE c.command_id = x.command_id
            RETURNING c.command_id, c.status, c.agent_id
            "#,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        // Every replica learns: the agent may be connected to another one, and a failed
        // row may have unblocked the next command of its session.
        self.notify_agents(&distinct_agents(rows.iter().map(|r| r.agent_id.as_str())))
            .await;
        let rescued = split_released(rows.into_iter().map(|r| (r.command_id, r.status)));
        for id in &rescued.requeued {
            tracing::warn!(command_id = %id, "expired lease rescued: command is pending again");
        }
        add(&METRICS.leases_rescued, rescued.requeued.len() as u64);
        add(&METRICS.commands_failed, rescued.failed.len() as u64);
        Ok(rescued)
    }

    /// `pending → cancelled`, within the caller's transaction (the gateway cancels a start
    /// that was never sent in the same transaction that ends the session).
    pub async fn command_cancel(
        conn: &mut PgConnection,
        command_id: &CommandId,
        reason: &str,
    ) -> Result<()> {
        let done = sqlx::query_scalar!(
            r#"
            UPDATE agent_commands
            SET status = 'cancelled', error_message = $2, completed_at = now(), updated_at = now()
            WHERE command_id = $1 AND status = 'pending'
            RETURNING agent_id
            "#,
            command_id.as_str(),
            reason,
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(agent_id) = done {
            // The next command of the session may be deliverable now; delivered at commit.
            sqlx::query!("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, agent_id)
                .execute(&mut *conn)
                .await?;
            return Ok(());
        }
        let status = sqlx::query_scalar!(
            "SELECT status FROM agent_commands WHERE command_id = $1",
            command_id.as_str()
        )
        .fetch_optional(&mut *conn)
        .await?;
        match status {
            None => Err(Error::CommandNotFound(command_id.clone())),
            Some(s) => Err(Error::InvalidTransition {
                command_id: command_id.clone(),
                current: s.parse().unwrap_or(CommandStatus::Failed),
                attempted: "cancel (only pending commands can be cancelled)",
            }),
        }
    }

    /// `pending → failed` for commands past `expires_at`. Returns their ids.
    pub async fn command_expire(&self) -> Result<Vec<String>> {
        let rows = sqlx::query!(
            r#"
            UPDATE agent_commands
            SET status = 'failed', completed_at = now(), updated_at = now(),
                error_message = format('expired at %s before it could be delivered', expires_at)
            WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= now()
            RETURNING command_id, agent_id
            "#,
        )
        .fetch_all(&self.pool)
        .await?;
        self.notify_agents(&distinct_agents(rows.iter().map(|r| r.agent_id.as_str())))
            .await;
        let expired: Vec<String> = rows.into_iter().map(|r| r.command_id).collect();
        for id in &expired {
            tracing::warn!(command_id = %id, "command expired before delivery");
        }
        add(&METRICS.commands_expired, expired.len() as u64);
        add(&METRICS.commands_failed, expired.len() as u64);
        Ok(expired)
    }

    /// Deletes up to `limit` terminal commands that ended more than `retention` ago.
    /// Terminal rows never block anything, so pruning cannot change delivery order.
    pub async fn command_prune(&self, retention: Duration, limit: i64) -> Result<u64> {
        let done = sqlx::query!(
            r#"
            DELETE FROM agent_commands
            WHERE command_id IN (
                SELECT command_id FROM agent_commands
                WHERE status IN ('completed', 'failed', 'cancelled')
                  AND completed_at < now() - make_interval(secs => $1)
                LIMIT $2)
            "#,
            secs(retention),
            limit,
        )
        .execute(&self.pool)
        .await?;
        add(&METRICS.commands_pruned, done.rows_affected());
        Ok(done.rows_affected())
    }

    /// Deletes up to `limit` sessions that ended (`terminated` or `failed`) more than
    /// `retention` ago and have no open command, so ended sessions do not pile up. A
    /// session a command is still about to act on stays.
    pub async fn session_prune(&self, retention: Duration, limit: i64) -> Result<u64> {
        let done = sqlx::query!(
            r#"
            DELETE FROM sessions
            WHERE id IN (
                SELECT s.id FROM sessions s
                WHERE s.state IN ('terminated', 'failed')
                  AND s.updated_at < now() - make_interval(secs => $1)
                  AND NOT EXISTS (
                      SELECT 1 FROM agent_commands c
                      WHERE c.session_id = s.id
                        AND c.status NOT IN ('completed', 'failed', 'cancelled'))
                LIMIT $2
                FOR UPDATE SKIP LOCKED)
            "#,
            secs(retention),
            limit,
        )
        .execute(&self.pool)
        .await?;
        add(&METRICS.sessions_pruned, done.rows_affected());
        Ok(done.rows_affected())
    }
}

impl CommandQueue {
    /// Wakes whichever replica holds each agent's stream. A hint: a lost notification
    /// costs one poll interval, so a failure is logged, not returned.
    async fn notify_agents(&self, agents: &[String]) {
        if agents.is_empty() {
            return;
        }
        if let Err(e) = sqlx::query!(
            "SELECT pg_notify($1, a) FROM UNNEST($2::text[]) AS a",
            NOTIFY_CHANNEL,
            agents,
        )
        .execute(&self.pool)
        .await
        {
            tracing::warn!(error = %e, "notifying replicas failed; they find the work on their next poll");
        }
    }
}

fn distinct_agents<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    let set: std::collections::BTreeSet<&str> = ids.collect();
    set.into_iter().map(str::to_owned).collect()
}

fn split_released(rows: impl Iterator<Item = (String, String)>) -> Released {
    let mut out = Released::default();
    for (id, status) in rows {
        if status == "pending" {
            out.requeued.push(id);
        } else {
            out.failed.push(id);
        }
    }
    out
}
