//! The agent's reports — acks, results, session observations — applied in stream order,
//! with failed writes kept and retried.
//!
//! Invariants:
//! - **Stream order.** Reports are applied in the order the agent sent them. Consecutive
//!   reports of one kind are batched (one statement per kind), but a batch never reaches
//!   past a report of the other kind: an observation sent before a result is applied
//!   before it, so a stale `hibernated` can never overwrite the `running` a later wake
//!   result set. A completion's own observation is applied right after the completions of
//!   its batch (the last one per session wins), so a drain costs a few statements per
//!   batch, not per command. A heartbeat is recorded only after the reports that
//!   preceded it on the stream were written, so a recorded heartbeat vouches for them.
//! - **Nothing is dropped on a database error.** A segment whose write fails stays at the
//!   head of the backlog, with everything after it, and is written again (every write is
//!   idempotent: a repeated ack or result under the same lease is a duplicate, an
//!   observation a no-op). Its commands stay in the connection's in-flight set meanwhile,
//!   so their leases keep being renewed.

use std::collections::{HashSet, VecDeque};

use chrono::{DateTime, Utc};

use streamspace_core::command::{CommandId, Lease};
use streamspace_core::queue::{Completion, Failure, FailureOutcome, Outcome};
use streamspace_core::sessions::{self, Observation, Reporter};
use streamspace_core::{CommandQueue, Error};

/// One report admitted from the stream (its lease is held by the connection).
#[derive(Debug)]
pub(crate) enum Report {
    Ack(Lease),
    /// A completion, with what the runtime observed once it took effect.
    Completed(Completion, Option<Observation>),
    Failed(Failure),
    /// A pipelined command the agent did not run (its predecessor did not complete).
    NotRun(Lease),
    Observations(Vec<Observation>),
}

impl Report {
    /// Reports about commands are batched together; observations together.
    fn is_command(&self) -> bool {
        !matches!(self, Report::Observations(_))
    }
}

/// A command whose result was written (applied, duplicate or refused as stale): the
/// connection no longer holds its lease.
pub(crate) type Finished = (String, i64);

/// What writing a backlog left for the connection to do.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// Results written: these leases are no longer held.
    pub finished: Vec<Finished>,
    /// The earliest time a failed command written here is due again, so the delivery
    /// loop wakes for it rather than waiting for its poll.
    pub retry_due: Option<DateTime<Utc>>,
}

/// Writes the backlog from its head, one same-kind segment at a time, removing each
/// segment once written. Stops at the first failed write, leaving that segment and the
/// rest in place, and returns the error; `written` collects what was written so far.
pub(crate) async fn apply(
    queue: &CommandQueue,
    reporter: Reporter<'_>,
    backlog: &mut VecDeque<Report>,
    written: &mut Written,
) -> Result<(), Error> {
    while let Some(front) = backlog.front() {
        let commands = front.is_command();
        let len = backlog
            .iter()
            .take_while(|r| r.is_command() == commands)
            .count();
        let segment = backlog.range(..len);
        if commands {
            write_command_reports(queue, reporter, segment, written).await?;
        } else {
            let observations: Vec<Observation> = segment
                .flat_map(|r| match r {
                    Report::Observations(o) => o.clone(),
                    _ => Vec::new(),
                })
                .collect();
            sessions::session_observe(queue.pool(), reporter, &observations).await?;
        }
        backlog.drain(..len);
    }
    Ok(())
}

async fn write_command_reports<'a>(
    queue: &CommandQueue,
    reporter: Reporter<'_>,
    segment: impl Iterator<Item = &'a Report>,
    written: &mut Written,
) -> Result<(), Error> {
    let finished = &mut written.finished;
    let agent_id = reporter.agent_id;
    let mut acks = Vec::new();
    let mut completions = Vec::new();
    let mut observed = Vec::new();
    let mut failures = Vec::new();
    let mut not_run = Vec::new();
    for r in segment {
        match r {
            Report::Ack(lease) => acks.push(lease.clone()),
            Report::Completed(c, o) => {
                completions.push(c.clone());
                observed.extend(o.clone());
            }
            Report::Failed(f) => failures.push(f.clone()),
            Report::NotRun(lease) => not_run.push(lease.clone()),
            Report::Observations(_) => {}
        }
    }
    // An ack whose result is in the same batch needs no write of its own: every result
    // statement accepts `sent` as well as `ack` and records the acknowledgement time. In a
    // fast drain most acks travel with their result, so this halves the row updates.
    if !acks.is_empty() {
        let resulted: HashSet<(&str, i64)> = completions
            .iter()
            .map(|c| &c.lease)
            .chain(failures.iter().map(|f| &f.lease))
            .chain(not_run.iter())
            .map(|l| (l.command_id.as_str(), l.token))
            .collect();
        acks.retain(|l| !resulted.contains(&(l.command_id.as_str(), l.token)));
    }
    if !acks.is_empty() {
        log_rejections(agent_id, "ack", queue.command_ack(&acks).await?);
    }
    if !completions.is_empty() {
        log_rejections(
            agent_id,
            "completion",
            queue.command_complete(&completions).await?,
        );
        if !observed.is_empty() {
            sessions::session_observe(queue.pool(), reporter, &observed).await?;
        }
        finished.extend(
            completions
                .iter()
                .map(|c| (c.lease.command_id.to_string(), c.lease.token)),
        );
    }
    if !failures.is_empty() {
        for (id, outcome) in queue.command_fail(&failures).await? {
            match outcome {
                FailureOutcome::Retrying { next_attempt_at } => {
                    tracing::info!(agent_id, command_id = %id, %next_attempt_at, "command failed; will retry");
                    written.retry_due = Some(
                        written
                            .retry_due
                            .map_or(next_attempt_at, |d| d.min(next_attempt_at)),
                    );
                }
                FailureOutcome::Failed => {
                    tracing::warn!(agent_id, command_id = %id, "command failed")
                }
                FailureOutcome::Duplicate => {}
                FailureOutcome::Rejected(r) => {
                    tracing::info!(agent_id, command_id = %id, current = ?r.current, "failure report under a stale lease ignored")
                }
            }
        }
        finished.extend(
            failures
                .iter()
                .map(|f| (f.lease.command_id.to_string(), f.lease.token)),
        );
    }
    // Last: a command not run goes back behind its predecessor, whose outcome (written
    // above when it came in the same batch) decides when it is delivered again.
    if !not_run.is_empty() {
        log_rejections(agent_id, "not-run", queue.command_not_run(&not_run).await?);
        finished.extend(not_run.iter().map(|l| (l.command_id.to_string(), l.token)));
    }
    Ok(())
}

fn log_rejections(agent_id: &str, what: &str, outcomes: Vec<(CommandId, Outcome)>) {
    for (id, outcome) in outcomes {
        if let Outcome::Rejected(r) = outcome {
            tracing::info!(agent_id, command_id = %id, current = ?r.current, "{what} under a stale lease ignored");
        }
    }
}
