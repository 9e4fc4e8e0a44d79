//! Fenced transitions reported by the agent: ack, complete, fail.
//!
//! Each takes a batch (the dispatcher flushes reports in short windows) and applies it in
//! one statement whose `WHERE` requires the presented lease token and a legal source state.
//! Items that did not apply are classified afterwards: a repeat of a report that already
//! took effect under the same lease is a harmless [`Outcome::Duplicate`]; anything else is
//! a [`Rejection`] naming where the command stands now.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{CommandQueue, secs};
use crate::command::{CommandId, CommandStatus, Lease};
use crate::error::{Error, Result};
use crate::telemetry::{METRICS, add};

/// The agent's success report for one leased command.
#[derive(Clone, Debug)]
pub struct Completion {
    pub lease: Lease,
    /// Details for the record (e.g. the session URL), stored in `result`.
    pub result: Option<serde_json::Value>,
}

/// The agent's failure report for one leased command.
#[derive(Clone, Debug)]
pub struct Failure {
    pub lease: Lease,
    pub message: String,
    /// Whether trying again may help; if so and attempts remain, the command returns to
    /// `pending` after a backoff.
    pub retryable: bool,
}

/// Why a report changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub command_id: CommandId,
    /// Where the command stands now; `None` when it does not exist.
    pub current: Option<CommandStatus>,
}

impl Rejection {
    pub fn into_error(self) -> Error {
        match self.current {
            None => Error::CommandNotFound(self.command_id),
            Some(current) => Error::StaleLease {
                command_id: self.command_id,
                current,
            },
        }
    }
}

/// What became of one report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The same report under the same lease had already been applied.
    Duplicate,
    Rejected(Rejection),
}

/// What became of one failure report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Back to `pending`, due again at this time.
    Retrying {
        next_attempt_at: DateTime<Utc>,
    },
    /// Final: `failed` with the reason in `error_message`.
    Failed,
    Duplicate,
    Rejected(Rejection),
}

impl CommandQueue {
    /// `sent → ack` for each lease. Repeating an ack is harmless.
    pub async fn command_ack(&self, leases: &[Lease]) -> Result<Vec<(CommandId, Outcome)>> {
        let (ids, tokens, agents, owners) = split(leases);
        let applied = sqlx::query_scalar!(
            r#"
            UPDATE agent_commands c
            SET status = 'ack', acknowledged_at = coalesce(c.acknowledged_at, now()),
                updated_at = now()
            FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[])
                 AS l(command_id, token, agent_id, owner)
            WHERE c.command_id = l.command_id AND c.lease_token = l.token
              AND c.agent_id = l.agent_id AND c.lease_owner = l.owner
              AND c.status IN ('sent', 'ack')
            RETURNING c.command_id
            "#,
            &ids,
            &tokens,
            &agents,
            &owners,
        )
        .fetch_all(&self.pool)
        .await?;
        self.classify(leases, applied, &[]).await
    }

    /// `sent|ack → completed` for each lease.
    pub async fn command_complete(
        &self,
        completions: &[Completion],
    ) -> Result<Vec<(CommandId, Outcome)>> {
        let leases: Vec<Lease> = completions.iter().map(|c| c.lease.clone()).collect();
        let (ids, tokens, agents, owners) = split(&leases);
        let results: Vec<serde_json::Value> = completions
            .iter()
            .map(|c| c.result.clone().unwrap_or(serde_json::Value::Null))
            .collect();
        let applied = sqlx::query!(
            r#"
            UPDATE agent_commands c
            SET status = 'completed', completed_at = now(), updated_at = now(),
                acknowledged_at = coalesce(c.acknowledged_at, now()),
                result = CASE WHEN jsonb_typeof(l.result) = 'null' THEN NULL ELSE l.result END,
                error_message = NULL
            FROM UNNEST($1::text[], $2::int8[], $3::jsonb[], $4::text[], $5::text[])
                 AS l(command_id, token, result, agent_id, owner)
            WHERE c.command_id = l.command_id AND c.lease_token = l.token
              AND c.agent_id = l.agent_id AND c.lease_owner = l.owner
              AND c.status IN ('sent', 'ack')
            RETURNING c.command_id AS "command_id!",
                      extract(epoch FROM c.completed_at - c.created_at)::float8 AS "seconds!",
                      c.trace_context
            "#,
            &ids,
            &tokens,
            &results,
            &agents,
            &owners,
        )
        .fetch_all(&self.pool)
        .await?;
        for row in &applied {
            crate::telemetry::record_completion(row.seconds);
            crate::telemetry::result_applied(&row.command_id, row.trace_context.as_deref());
        }
        let applied: Vec<String> = applied.into_iter().map(|r| r.command_id).collect();
        let n = applied.len() as u64;
        let out = self
            .classify(&leases, applied, &[CommandStatus::Completed])
            .await?;
        add(&METRICS.commands_completed, n);
        Ok(out)
    }

    /// One completion; a stale lease is [`Error::StaleLease`], a duplicate is `Ok`.
    pub async fn command_complete_one(&self, completion: Completion) -> Result<()> {
        single(self.command_complete(&[completion]).await?)
    }

    /// One ack; a stale lease is [`Error::StaleLease`], a duplicate is `Ok`.
    pub async fn command_ack_one(&self, lease: Lease) -> Result<()> {
        single(self.command_ack(&[lease]).await?)
    }

    /// `sent|ack → pending` (retryable, attempts left: due again after an exponential,
    /// jittered backoff) or `→ failed` (permanent, or attempts exhausted).
    pub async fn command_fail(
        &self,
        failures: &[Failure],
    ) -> Result<Vec<(CommandId, FailureOutcome)>> {
        let leases: Vec<Lease> = failures.iter().map(|f| f.lease.clone()).collect();
        let (ids, tokens, agents, owners) = split(&leases);
        let messages: Vec<String> = failures.iter().map(|f| f.message.clone()).collect();
        let retryable: Vec<bool> = failures.iter().map(|f| f.retryable).collect();
        let rows = sqlx::query!(
            r#"
            WITH input AS (
                SELECT l.command_id, l.token, l.message, l.retryable, l.agent_id, l.owner
                FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::bool[], $7::text[], $8::text[])
                     AS l(command_id, token, message, retryable, agent_id, owner)
            ), decided AS (
                SELECT c.command_id, i.message, c.attempts, c.max_attempts,
                       (i.retryable AND c.attempts < c.max_attempts) AS retry
                FROM agent_commands c JOIN input i
                  ON c.command_id = i.command_id AND c.lease_token = i.token
                 AND c.agent_id = i.agent_id AND c.lease_owner = i.owner
                WHERE c.status IN ('sent', 'ack')
                FOR UPDATE OF c
            )
            UPDATE agent_commands c
            SET status = CASE WHEN d.retry THEN 'pending' ELSE 'failed' END,
                error_message = CASE
                    WHEN d.retry THEN format('attempt %s of %s failed, will retry: %s',
                                             d.attempts, d.max_attempts, d.message)
                    WHEN d.attempts >= d.max_attempts AND d.max_attempts > 1
                        THEN format('gave up after %s attempts: %s', d.attempts, d.message)
                    ELSE d.message END,
                next_attempt_at = CASE WHEN d.retry
                    THEN now() + make_interval(secs => least($6::float8,
                             $5::float8 * power(2, greatest(d.attempts - 1, 0)))
                             * (0.5 + random() * 0.5))
                    ELSE c.next_attempt_at END,
                completed_at = CASE WHEN d.retry THEN NULL ELSE now() END,
                acknowledged_at = coalesce(c.acknowledged_at, now()),
                lease_owner = CASE WHEN d.retry THEN NULL ELSE c.lease_owner END,
                lease_token = CASE WHEN d.retry THEN NULL ELSE c.lease_token END,
                lease_expires_at = CASE WHEN d.retry THEN NULL ELSE c.lease_expires_at END,
                updated_at = now()
            FROM decided d
            WHERE c.command_id = d.command_id
            RETURNING c.command_id, c.status, c.next_attempt_at, c.trace_context
            "#,
            &ids,
            &tokens,
            &messages,
            &retryable,
            secs(self.config.retry_base),
            secs(self.config.retry_cap),
            &agents,
            &owners,
        )
        .fetch_all(&self.pool)
        .await?;

        let mut applied: HashMap<String, FailureOutcome> = HashMap::new();
        for row in rows {
            crate::telemetry::result_applied(&row.command_id, row.trace_context.as_deref());
            let outcome = if row.status == "pending" {
                add(&METRICS.commands_retried, 1);
                FailureOutcome::Retrying {
                    next_attempt_at: row.next_attempt_at,
                }
            } else {
                add(&METRICS.commands_failed, 1);
                FailureOutcome::Failed
            };
            applied.insert(row.command_id, outcome);
        }
        let applied_ids: Vec<String> = applied.keys().cloned().collect();
        let classified = self
            .classify(&leases, applied_ids, &[CommandStatus::Failed])
            .await?;
        Ok(classified
            .into_iter()
            .map(|(id, outcome)| {
                let outcome = match outcome {
                    Outcome::Applied => applied
                        .remove(id.as_str())
                        .unwrap_or(FailureOutcome::Failed),
                    Outcome::Duplicate => FailureOutcome::Duplicate,
                    Outcome::Rejected(r) => FailureOutcome::Rejected(r),
                };
                (id, outcome)
            })
            .collect())
    }

    /// `sent|ack → pending` without counting the attempt, for pipelined commands the agent
    /// did not run because the command it was queued behind did not complete there. They
    /// are due again at once, and stay behind that command in their session: whatever
    /// became of it (retrying, failed), they are delivered only after it.
    pub async fn command_not_run(&self, leases: &[Lease]) -> Result<Vec<(CommandId, Outcome)>> {
        let (ids, tokens, agents, owners) = split(leases);
        let applied = sqlx::query_scalar!(
            r#"
            UPDATE agent_commands c
            SET status = 'pending',
                attempts = greatest(c.attempts - 1, 0),
                next_attempt_at = now(),
                acknowledged_at = coalesce(c.acknowledged_at, now()),
                lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                updated_at = now()
            FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[])
                 AS l(command_id, token, agent_id, owner)
            WHERE c.command_id = l.command_id AND c.lease_token = l.token
              AND c.agent_id = l.agent_id AND c.lease_owner = l.owner
              AND c.status IN ('sent', 'ack')
            RETURNING c.command_id
            "#,
            &ids,
            &tokens,
            &agents,
            &owners,
        )
        .fetch_all(&self.pool)
        .await?;
        add(&METRICS.commands_not_run, applied.len() as u64);
        self.classify(leases, applied, &[]).await
    }

    /// Turns "these ids were applied" into one outcome per lease, in input order. Leases
    /// not applied are looked up: if the command already sits in one of `done` under the
    /// same token, the report is a duplicate; otherwise it is rejected.
    async fn classify(
        &self,
        leases: &[Lease],
        applied: Vec<String>,
        done: &[CommandStatus],
    ) -> Result<Vec<(CommandId, Outcome)>> {
        let applied: std::collections::HashSet<String> = applied.into_iter().collect();
        let missing: Vec<String> = leases
            .iter()
            .filter(|l| !applied.contains(l.command_id.as_str()))
            .map(|l| l.command_id.to_string())
            .collect();
        let mut current: HashMap<String, (CommandStatus, Option<i64>)> = HashMap::new();
        if !missing.is_empty() {
            let rows = sqlx::query!(
                "SELECT command_id, status, lease_token FROM agent_commands WHERE command_id = ANY($1)",
                &missing,
            )
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                let status = row
                    .status
                    .parse()
                    .map_err(|e| Error::InvalidInput(format!("stored status: {e}")))?;
                current.insert(row.command_id, (status, row.lease_token));
            }
        }
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let id = lease.command_id.as_str();
            let outcome = if applied.contains(id) {
                Outcome::Applied
            } else {
                match current.get(id) {
                    Some((status, token))
                        if done.contains(status) && *token == Some(lease.token) =>
                    {
                        Outcome::Duplicate
                    }
                    other => {
                        if other.is_some() {
                            add(&METRICS.stale_lease_rejections, 1);
                            tracing::warn!(command_id = id, token = lease.token, current = ?other.map(|o| o.0), "report under a stale lease ignored");
                        }
                        Outcome::Rejected(Rejection {
                            command_id: lease.command_id.clone(),
                            current: other.map(|(s, _)| *s),
                        })
                    }
                }
            };
            out.push((lease.command_id.clone(), outcome));
        }
        Ok(out)
    }
}

/// Column arrays of a batch of leases: ids, tokens, agent ids, owners.
fn split(leases: &[Lease]) -> (Vec<String>, Vec<i64>, Vec<String>, Vec<String>) {
    let mut out = (
        Vec::with_capacity(leases.len()),
        Vec::with_capacity(leases.len()),
        Vec::with_capacity(leases.len()),
        Vec::with_capacity(leases.len()),
    );
    for l in leases {
        out.0.push(l.command_id.to_string());
        out.1.push(l.token);
        out.2.push(l.agent_id.clone());
        out.3.push(l.owner.clone());
    }
    out
}

fn single(mut outcomes: Vec<(CommandId, Outcome)>) -> Result<()> {
    match outcomes.pop().map(|(_, o)| o) {
        Some(Outcome::Applied | Outcome::Duplicate) | None => Ok(()),
        Some(Outcome::Rejected(r)) => Err(r.into_error()),
    }
}
