//! Transitions driven by the pipeline itself rather than by agent reports: lease release,
//! renewal and rescue, cancel, expiry and pruning.

use std::time::Duration;

use sqlx::PgConnection;

use super::{CommandQueue, secs};
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
    /// Returns every lease of `owner` to the queue (its connection closed cleanly).
    ///
    /// A command the agent never acknowledged does not count as an attempt: it may never
    /// have reached the agent. An acknowledged one does, so a command that crashes its agent
    /// every time ends `failed` after `max_attempts` instead of looping forever.
    pub async fn command_release_owner(&self, owner: &str) -> Result<Released> {
        let rows = sqlx::query!(
            r#"
            WITH held AS (
                SELECT command_id,
                       CASE WHEN status = 'sent' THEN attempts - 1 ELSE attempts END AS attempts
                FROM agent_commands
                WHERE lease_owner = $1 AND status IN ('sent', 'ack')
                FOR UPDATE
            )
            UPDATE agent_commands c
            SET status = CASE WHEN h.attempts < c.max_attempts THEN 'pending' ELSE 'failed' END,
                attempts = greatest(h.attempts, 0),
                error_message = CASE WHEN h.attempts < c.max_attempts THEN c.error_message
                    ELSE format('gave up after %s attempts: the agent connection closed before a result', h.attempts)
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
            owner,
        )
        .fetch_all(&self.pool)
        .await?;
        let released = split_released(rows.into_iter().map(|r| (r.command_id, r.status)));
        add(&METRICS.leases_released, released.requeued.len() as u64);
        add(&METRICS.commands_failed, released.failed.len() as u64);
        Ok(released)
    }

    /// Returns the leases of `agent_id` held by any owner other than `keep_owner`: a new
    /// connection of the agent supersedes every older one, wherever it was held.
    pub async fn command_release_agent_except(
        &self,
        agent_id: &str,
        keep_owner: &str,
    ) -> Result<Released> {
        let owners = sqlx::query_scalar!(
            r#"
            SELECT DISTINCT lease_owner AS "lease_owner!" FROM agent_commands
            WHERE agent_id = $1 AND status IN ('sent', 'ack') AND lease_owner <> $2
            "#,
            agent_id,
            keep_owner,
        )
        .fetch_all(&self.pool)
        .await?;
        let mut all = Released::default();
        for owner in owners {
            let r = self.command_release_owner(&owner).await?;
            all.requeued.extend(r.requeued);
            all.failed.extend(r.failed);
        }
        Ok(all)
    }

    /// Extends every lease `owner` holds by the configured lease length; called while the
    /// connection is alive (on heartbeats). Returns how many leases were extended.
    pub async fn command_lease_extend(&self, owner: &str) -> Result<u64> {
        let done = sqlx::query!(
            r#"
            UPDATE agent_commands
            SET lease_expires_at = now() + make_interval(secs => $2)
            WHERE lease_owner = $1 AND status IN ('sent', 'ack')
            "#,
            owner,
            secs(self.config.lease),
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
                SELECT command_id FROM agent_commands
                WHERE status IN ('sent', 'ack') AND lease_expires_at < now()
                ORDER BY lease_expires_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE agent_commands c
            SET status = CASE WHEN c.attempts < c.max_attempts THEN 'pending' ELSE 'failed' END,
                error_message = CASE WHEN c.attempts < c.max_attempts THEN c.error_message
                    ELSE format('gave up after %s attempts: lease expired without a result', c.attempts)
                    END,
                completed_at = CASE WHEN c.attempts < c.max_attempts THEN NULL ELSE now() END,
                next_attempt_at = now(),
                lease_owner = CASE WHEN c.attempts < c.max_attempts THEN NULL ELSE c.lease_owner END,
                lease_token = CASE WHEN c.attempts < c.max_attempts THEN NULL ELSE c.lease_token END,
                lease_expires_at = CASE WHEN c.attempts < c.max_attempts THEN NULL ELSE c.lease_expires_at END,
                updated_at = now()
            FROM expired
            WHERE c.command_id = expired.command_id
            RETURNING c.command_id, c.status
            "#,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
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
        let done = sqlx::query!(
            r#"
            UPDATE agent_commands
            SET status = 'cancelled', error_message = $2, completed_at = now(), updated_at = now()
            WHERE command_id = $1 AND status = 'pending'
            "#,
            command_id.as_str(),
            reason,
        )
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 1 {
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
        let expired = sqlx::query_scalar!(
            r#"
            UPDATE agent_commands
            SET status = 'failed', completed_at = now(), updated_at = now(),
                error_message = format('expired at %s before it could be delivered', expires_at)
            WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= now()
            RETURNING command_id
            "#,
        )
        .fetch_all(&self.pool)
        .await?;
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
