//! Claim: lease an agent's next deliverable commands to one connection.

use chrono::{DateTime, Utc};

use super::{CommandQueue, MAX_CLAIM_BATCH, secs};
use crate::command::{Command, CommandId, CommandKind, CommandStatus, Lease};
use crate::error::{Error, Result};
use crate::telemetry::{METRICS, add};

/// What to claim, and for whom.
#[derive(Clone, Debug)]
pub struct ClaimParams<'a> {
    pub agent_id: &'a str,
    /// The connection that will deliver the commands, e.g. `dispatcher-1/agent-a/7`.
    /// Releasing by owner returns exactly its leases.
    pub owner: &'a str,
    /// At most this many commands (the free part of the agent's in-flight window).
    pub limit: i64,
    /// When set, claim only while this is still the agent's current connection (this
    /// epoch, held by `owner`), so a superseded or closed connection can never take work.
    pub epoch: Option<i64>,
    /// Per-session pipelining: with a session's oldest unfinished command, also claim up
    /// to `pipeline_depth - 1` commands queued right behind it (each [`Command::after`]
    /// its predecessor). 1 claims heads only, for agents that cannot run pipelined
    /// commands.
    pub pipeline_depth: i64,
}

/// A row that was claimed but could not be decoded. It is already `failed`, with the
/// reason in `error_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub command_id: String,
    pub reason: String,
}

/// The result of a claim: deliverable commands in acceptance order, plus the rows that
/// were quarantined on the way.
#[derive(Clone, Debug, Default)]
pub struct ClaimBatch {
    pub commands: Vec<Command>,
    pub quarantined: Vec<Quarantined>,
}

struct ClaimedRow {
    command_id: String,
    seq: i64,
    agent_id: String,
    session_id: Option<String>,
    action: String,
    payload: serde_json::Value,
    attempts: i32,
    max_attempts: i32,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    trace_context: Option<String>,
    lease_token: i64,
    lease_owner: String,
    after_command_id: Option<String>,
}

impl ClaimedRow {
    fn decode(self) -> Result<Command, (String, i64, String)> {
        let fail = |reason: String| (self.command_id.clone(), self.lease_token, reason);
        let command_id: CommandId = self.command_id.parse().map_err(|e| fail(format!("{e}")))?;
        let after = match &self.after_command_id {
            Some(id) => Some(id.parse().map_err(|e| fail(format!("predecessor: {e}")))?),
            None => None,
        };
        let kind = CommandKind::decode(&self.action, &self.payload)
            .map_err(|e| fail(format!("cannot decode stored command: {e}")))?;
        Ok(Command {
            lease: Some(Lease {
                command_id: command_id.clone(),
                token: self.lease_token,
                agent_id: self.agent_id.clone(),
                owner: self.lease_owner,
            }),
            command_id,
            seq: self.seq,
            agent_id: self.agent_id,
            session_id: self.session_id,
            kind,
            status: CommandStatus::Sent,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            created_at: self.created_at,
            expires_at: self.expires_at,
            trace_context: self.trace_context,
            after,
        })
    }
}

impl CommandQueue {
    /// Leases up to `limit` deliverable commands of one agent to `owner`, oldest first.
    ///
    /// Deliverable means: `pending`, due (`next_attempt_at` passed), not expired, and no
    /// earlier command of the same session still unfinished (the session's head). Rows
    /// locked by a concurrent claimer are skipped, never waited for. Undecodable rows are
    /// quarantined here, so one bad row never stops the rest of the queue.
    ///
    /// With `pipeline_depth` > 1, each claimed head brings the unbroken run of deliverable
    /// commands queued right behind it in its session (at most `pipeline_depth - 1`; the
    /// run ends at the first one that is not pending, not due, expired, for another agent
    /// or locked), so one round trip delivers a whole stretch of a session's backlog. The
    /// heads come first in the `limit`; followers share the rest, shallowest first, so
    /// every session gets its next command before any gets a deep run.
    pub async fn command_claim(&self, params: ClaimParams<'_>) -> Result<ClaimBatch> {
        if !(1..=MAX_CLAIM_BATCH).contains(&params.limit) {
            return Err(Error::InvalidInput(format!(
                "claim limit must be 1..={MAX_CLAIM_BATCH}, got {}",
                params.limit
            )));
        }
        let rows = sqlx::query_as!(
            ClaimedRow,
            r#"
            WITH fence AS (
                -- The connection must still be the agent's current one. FOR SHARE makes
                -- this a real fence, not a snapshot check: a concurrent connect or
                -- disconnect (an UPDATE of this row) either commits first, and then this
                -- claim re-reads the row and takes nothing, or waits until this claim
                -- commits, and then the clean-up that follows it sees (and releases) every
                -- lease taken here. A claim cancelled mid-flight can therefore never leave
                -- a lease whose owner is already gone.
                SELECT 1 FROM agents a
                WHERE a.agent_id = $1 AND a.connection_epoch = $5 AND a.connected_owner = $3
                FOR SHARE
            ), heads AS (
                SELECT c.command_id, c.session_id, c.seq
                FROM agent_commands c
                WHERE c.agent_id = $1
                  AND c.status = 'pending'
                  -- Only the oldest open command of each session (or one without a
                  -- session): the partial claim index holds just these, so a claim reads
                  -- O(limit) rows however deep the backlogs behind them (migration 6).
                  AND c.session_head
                  AND c.next_attempt_at <= now()
                  AND (c.expires_at IS NULL OR c.expires_at > now())
                  AND ($5::int8 IS NULL OR EXISTS (SELECT 1 FROM fence))
                  AND NOT EXISTS (
                      SELECT 1 FROM agent_commands e
                      WHERE e.session_id = c.session_id
                        AND e.seq < c.seq
                        AND e.status IN ('pending', 'sent', 'ack'))
                ORDER BY c.seq
                LIMIT $2
                FOR UPDATE OF c SKIP LOCKED
            ), queued AS (
                -- The open commands right behind each claimed head, in session order.
                SELECT f.command_id, f.session_id, f.seq,
                       row_number() OVER w AS depth,
                       bool_and(f.status = 'pending' AND f.agent_id = $1
                                AND f.next_attempt_at <= now()
                                AND (f.expires_at IS NULL OR f.expires_at > now())) OVER w
                           AS deliverable
                FROM heads h
                CROSS JOIN LATERAL (
                    SELECT e.command_id, e.session_id, e.seq, e.status, e.agent_id,
                           e.next_attempt_at, e.expires_at
                    FROM agent_commands e
                    WHERE e.session_id = h.session_id AND e.seq > h.seq
                      AND e.status IN ('pending', 'sent', 'ack')
                    ORDER BY e.seq
                    LIMIT greatest($6::int8 - 1, 0)
                ) f
                WINDOW w AS (PARTITION BY f.session_id ORDER BY f.seq)
            ), locked AS (
                SELECT c.command_id, q.session_id, q.seq, q.depth
                FROM agent_commands c JOIN queued q ON q.command_id = c.command_id
                WHERE q.deliverable
                ORDER BY q.depth, q.seq
                LIMIT greatest($2 - (SELECT count(*) FROM heads), 0)
                FOR UPDATE OF c SKIP LOCKED
            ), followers AS (
                -- Only an unbroken run: a follower whose predecessor was skipped (locked
                -- elsewhere, or cut by the limit) must wait for its own turn.
                -- A session's locked depths are distinct, so its run is unbroken exactly
                -- while each depth equals its rank among them.
                SELECT r.command_id, r.session_id, r.seq
                FROM (SELECT l.command_id, l.session_id, l.seq, l.depth,
                             row_number() OVER (PARTITION BY l.session_id ORDER BY l.depth)
                                 AS rank
                      FROM locked l) r
                WHERE r.depth = r.rank
            ), claimed AS (
                SELECT u.command_id,
                       lag(u.command_id) OVER (PARTITION BY u.session_id ORDER BY u.seq)
                           AS after_command_id
                FROM (SELECT command_id, session_id, seq FROM heads
                      UNION ALL
                      SELECT command_id, session_id, seq FROM followers) u
            )
            UPDATE agent_commands c
            SET status = 'sent',
                lease_owner = $3,
                lease_token = nextval('agent_command_lease_token_seq'),
                lease_expires_at = now() + make_interval(secs => $4),
                -- The clock, not the transaction start: the claim's snapshot is taken after
                -- its transaction starts, so only the clock orders it after the completions
                -- it saw.
                sent_at = clock_timestamp(),
                attempts = c.attempts + 1,
                updated_at = now()
            FROM claimed
            WHERE c.command_id = claimed.command_id
            RETURNING c.command_id, c.seq, c.agent_id, c.session_id, c.action, c.payload,
                      c.attempts, c.max_attempts, c.created_at, c.expires_at, c.trace_context,
                      c.lease_token AS "lease_token!", c.lease_owner AS "lease_owner!",
                      -- A head whose session has no other claimed command has no
                      -- predecessor; lag() over a session of NULL (no session) is NULL.
                      CASE WHEN c.session_id IS NULL THEN NULL
                           ELSE claimed.after_command_id END AS after_command_id
            "#,
            params.agent_id,
            params.limit,
            params.owner,
            secs(self.config.lease),
            params.epoch,
            params.pipeline_depth.max(1),
        )
        .fetch_all(&self.pool)
        .await?;

        let mut batch = ClaimBatch::default();
        let mut bad = Vec::new();
        for row in rows {
            match row.decode() {
                Ok(cmd) => batch.commands.push(cmd),
                Err(b) => bad.push(b),
            }
        }
        batch.commands.sort_by_key(|c| c.seq);
        add(&METRICS.commands_claimed, batch.commands.len() as u64);
        for c in &batch.commands {
            crate::telemetry::record_delivery(c.attempts, c.created_at);
        }
        if !bad.is_empty() {
            // The decoded commands are leased already: a failed quarantine must not drop
            // them. The undecodable rows stay `sent` under this claim's lease; nobody
            // renews it (the holder never learns of them), so they expire, are rescued
            // and are quarantined by a later claim.
            match self.command_quarantine(bad).await {
                Ok(q) => batch.quarantined = q,
                Err(e) => {
                    tracing::error!(error = %e, "quarantining undecodable commands failed; they are retried after their lease expires")
                }
            }
        }
        Ok(batch)
    }

    /// When the earliest of `agent_id`'s session heads waiting out a retry backoff is due
    /// (`None`: none is waiting). A new connection reads it once, so retries scheduled
    /// before it are claimed when due rather than at the next poll.
    pub async fn command_next_due(&self, agent_id: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar!(
            r#"
            SELECT min(next_attempt_at) FROM agent_commands
            WHERE agent_id = $1 AND status = 'pending' AND session_head
              AND next_attempt_at > now()
            "#,
            agent_id,
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// `sent → failed` for rows that cannot be decoded, fenced by the claim's token.
    async fn command_quarantine(
        &self,
        bad: Vec<(String, i64, String)>,
    ) -> Result<Vec<Quarantined>> {
        let (ids, (tokens, reasons)): (Vec<String>, (Vec<i64>, Vec<String>)) = bad
            .into_iter()
            .map(|(id, token, reason)| (id, (token, reason)))
            .unzip();
        let rows = sqlx::query!(
            r#"
            UPDATE agent_commands c
            SET status = 'failed', error_message = q.reason, completed_at = now(),
                updated_at = now()
            FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS q(command_id, token, reason)
            WHERE c.command_id = q.command_id AND c.lease_token = q.token AND c.status = 'sent'
            RETURNING c.command_id, q.reason AS "reason!"
            "#,
            &ids,
            &tokens,
            &reasons,
        )
        .fetch_all(&self.pool)
        .await?;
        let quarantined: Vec<Quarantined> = rows
            .into_iter()
            .map(|r| Quarantined {
                command_id: r.command_id,
                reason: r.reason,
            })
            .collect();
        for q in &quarantined {
            tracing::error!(command_id = %q.command_id, reason = %q.reason, "command quarantined: moved to failed");
        }
        add(&METRICS.commands_quarantined, quarantined.len() as u64);
        add(&METRICS.commands_failed, quarantined.len() as u64);
        Ok(quarantined)
    }
}
