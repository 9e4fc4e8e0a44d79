//! Executes delivered commands through the [`SessionRuntime`]: serially within a session,
//! concurrently across sessions, and at most once per `command_id` in this process.
//!
//! The executor outlives connections. A command that finishes while the agent is
//! disconnected keeps its outcome here; the dispatcher redelivers it after the reconnect
//! and the stored outcome is re-sent under the new lease token, without executing again.
//! A *retryable* failure is the exception: it is not final (the queue scheduled another
//! attempt), so its redelivery under a new lease runs the runtime again — idempotently.
//!
//! Per command the executor remembers a [`Phase`]:
//!
//! ```text
//!  delivered ──▶ Received ──start──▶ Queued ──worker──▶ Running ──▶ Done(outcome)
//!                                      │
//!                                      └── Cancel ──▶ Done(failed "cancelled: …")
//! ```
//!
//! Each session with work has one worker task draining that session's FIFO queue; the
//! worker ends when the queue is empty, so idle sessions cost nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use streamspace_core::CommandKind;
use streamspace_proto::agent::v1 as proto;
use streamspace_proto::agent::v1::agent_message::Msg;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::executions::ExecutionLog;
use crate::runtime::journal::unix_ms;
use crate::runtime::{Observation, SessionRuntime};

/// How a command ended, as reported in `CommandResult`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed(Observation),
    Failed { message: String, retryable: bool },
}

impl Outcome {
    fn permanent(message: impl Into<String>) -> Self {
        Outcome::Failed {
            message: message.into(),
            retryable: false,
        }
    }

    fn into_proto(self) -> proto::command_result::Outcome {
        match self {
            Outcome::Completed(obs) => {
                proto::command_result::Outcome::Completed(proto::Completed {
                    session: Some(obs.into()),
                })
            }
            Outcome::Failed { message, retryable } => {
                proto::command_result::Outcome::Failed(proto::Failed { message, retryable })
            }
        }
    }
}

/// Where one command stands in this agent process.
#[derive(Clone, Debug)]
enum Phase {
    /// Acked (or being acked); not yet handed to its session's queue.
    Received,
    /// Waiting behind earlier commands of its session; a `Cancel` can still drop it.
    Queued,
    Running,
    Done(Outcome),
}

#[derive(Clone, Debug)]
struct Entry {
    /// The newest lease the dispatcher delivered this command under; results always carry
    /// it, because a report under an older token is ignored.
    lease_token: i64,
    phase: Phase,
    /// The session the command acts on, when it has one.
    session_id: Option<String>,
    /// When it finished, in [`State::finish_seq`] order (0 while not finished).
    finished_seq: u64,
    /// It finished while no connection could take its result (or sending failed): the
    /// agent still holds a result the dispatcher has not seen.
    unreported: bool,
}

#[derive(Clone, Debug)]
struct Job {
    command_id: String,
    session_id: String,
    kind: CommandKind,
    deadline_unix_ms: i64,
    /// W3C `traceparent` of the delivery, so the execution joins the command's trace.
    trace_context: Option<String>,
    /// The agent executing it (for the span and its log lines).
    agent_id: String,
    /// Pipelined: run only once this command (the previous one of the session) completed
    /// here; otherwise answer `NotRun`.
    after: Option<String>,
}

/// A newly delivered command, to be started (queued) after its `Ack` went out, so the
/// result of a fast command can never overtake its acknowledgement.
#[derive(Debug)]
#[must_use = "a ticket that is not started leaves its command waiting forever"]
pub(crate) struct Ticket(Job);

/// What to do with a delivered command.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// To send now, in order; the `Ack` comes first.
    pub messages: Vec<proto::AgentMessage>,
    pub ticket: Option<Ticket>,
}

#[derive(Debug, Default)]
struct State {
    commands: HashMap<String, Entry>,
    /// Ids of `Done` commands, oldest first, for forgetting beyond the bound.
    done_order: VecDeque<String>,
    /// FIFO of each session that has a worker; a session is present exactly while its
    /// worker runs.
    sessions: HashMap<String, VecDeque<Job>>,
    /// The current connection's writer; `None` while disconnected.
    outbound: Option<mpsc::Sender<proto::AgentMessage>>,
    /// The agent's id as the dispatcher named it, for the execution spans.
    agent_id: String,
    /// Counts finished commands; heartbeats use it to tell which listings are stale.
    finish_seq: u64,
    /// Set at shutdown: nothing new starts.
    draining: bool,
}

#[derive(Debug)]
struct Inner {
    runtime: Arc<dyn SessionRuntime>,
    /// Where each runtime call is recorded, when the agent has a state directory.
    executions: Option<ExecutionLog>,
    remembered: usize,
    state: Mutex<State>,
    /// Commands executing right now, for draining at shutdown.
    running: watch::Sender<usize>,
}

/// The command executor. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub(crate) struct Executor {
    inner: Arc<Inner>,
}

impl Executor {
    /// `remembered` bounds how many finished commands are kept for redelivery.
    pub fn new(runtime: Arc<dyn SessionRuntime>, remembered: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                runtime,
                executions: None,
                remembered: remembered.max(1),
                state: Mutex::new(State::default()),
                running: watch::channel(0).0,
            }),
        }
    }

    /// Records every runtime call in `<state_dir>/executions.log` (see
    /// [`crate::executions`]). Call before the executor is shared.
    pub fn with_execution_log(mut self, state_dir: &std::path::Path) -> Self {
        match ExecutionLog::open(state_dir) {
            Ok(log) => match Arc::get_mut(&mut self.inner) {
                Some(inner) => inner.executions = Some(log),
                None => {
                    tracing::warn!("execution log not attached: the executor is already shared")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, dir = %state_dir.display(), "cannot open the execution log; executions are not recorded")
            }
        }
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Results from now on go to `outbound` (the new connection's writer); `agent_id`
    /// is what the dispatcher welcomed this agent as.
    pub fn attach(&self, outbound: mpsc::Sender<proto::AgentMessage>, agent_id: &str) {
        let mut state = self.state();
        state.outbound = Some(outbound);
        state.agent_id = agent_id.to_owned();
    }

    /// The connection is gone: results are kept, not sent, until redelivery.
    pub fn detach(&self) {
        self.state().outbound = None;
    }

    /// Commands acked and not yet finished.
    pub fn in_progress(&self) -> u32 {
        let state = self.state();
        let n = state
            .commands
            .values()
            .filter(|e| !matches!(e.phase, Phase::Done(_)))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Ids of the commands this process holds for the dispatcher: acked and not finished,
    /// or finished with a result it may not have seen. Sent in `Hello`, so a reconnect hands
    /// their leases to the new connection without counting an attempt.
    pub fn held_commands(&self) -> Vec<String> {
        let state = self.state();
        let mut ids: Vec<String> = state
            .commands
            .iter()
            .filter(|(_, e)| !matches!(e.phase, Phase::Done(_)) || e.unreported)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// A mark to take before listing the runtime's sessions; see [`Self::fresh_inventory`].
    pub fn finish_mark(&self) -> u64 {
        self.state().finish_seq
    }

    /// `listed` without the sessions the listing may be stale for: those with a command
    /// queued or running now, or one that finished after `mark` was taken. Their state is
    /// reported by the command's result, and a heartbeat sent after that result must not
    /// carry an older observation of the same session.
    pub fn fresh_inventory(&self, listed: Vec<Observation>, mark: u64) -> Vec<Observation> {
        let state = self.state();
        let mut busy: std::collections::HashSet<&str> =
            state.sessions.keys().map(String::as_str).collect();
        for id in state.done_order.iter().rev() {
            let Some(entry) = state.commands.get(id) else {
                continue;
            };
            if entry.finished_seq <= mark {
                break;
            }
            if let Some(session) = &entry.session_id {
                busy.insert(session);
            }
        }
        listed
            .into_iter()
            .filter(|o| !busy.contains(o.session_id.as_str()))
            .collect()
    }

    /// Decides what a delivered command needs: an `Ack` always, plus the stored result
    /// when it already finished (redelivery), or a ticket when it is new — or when its
    /// earlier attempt failed retryably and this is the retry.
    pub fn on_command(&self, cmd: proto::Command) -> Delivery {
        let mut state = self.state();
        if state.draining {
            // Not acked: the lease is released when the stream closes and another
            // connection gets it.
            return Delivery::default();
        }
        let ack = message(Msg::Ack(proto::Ack {
            command_id: cmd.command_id.clone(),
            lease_token: cmd.lease_token,
        }));
        let mut delivery = Delivery {
            messages: vec![ack],
            ticket: None,
        };
        let retry = state.commands.get(&cmd.command_id).is_some_and(|e| {
            e.lease_token != cmd.lease_token
                && matches!(
                    e.phase,
                    Phase::Done(Outcome::Failed {
                        retryable: true,
                        ..
                    })
                )
        });
        if retry {
            tracing::info!(command_id = %cmd.command_id, lease_token = cmd.lease_token, attempt = cmd.attempt, "retrying a command whose last attempt failed retryably");
            state.commands.remove(&cmd.command_id);
            state.done_order.retain(|id| id != &cmd.command_id);
        }
        if let Some(entry) = state.commands.get_mut(&cmd.command_id) {
            entry.lease_token = cmd.lease_token;
            if let Phase::Done(outcome) = &entry.phase {
                entry.unreported = false;
                tracing::info!(command_id = %cmd.command_id, lease_token = cmd.lease_token, "redelivered command already finished; re-sending its result");
                delivery
                    .messages
                    .push(result(&cmd.command_id, cmd.lease_token, outcome.clone()));
            } else {
                tracing::info!(command_id = %cmd.command_id, lease_token = cmd.lease_token, "redelivered command still in progress; will report under the new lease");
            }
            return delivery;
        }
        match decode(&cmd) {
            Ok(mut job) => {
                job.agent_id = state.agent_id.clone();
                state.commands.insert(
                    cmd.command_id.clone(),
                    Entry {
                        lease_token: cmd.lease_token,
                        phase: Phase::Received,
                        session_id: Some(job.session_id.clone()),
                        finished_seq: 0,
                        unreported: false,
                    },
                );
                delivery.ticket = Some(Ticket(job));
            }
            Err(outcome) => {
                tracing::warn!(command_id = %cmd.command_id, action = %cmd.action, ?outcome, "command refused");
                delivery
                    .messages
                    .push(result(&cmd.command_id, cmd.lease_token, outcome.clone()));
                state.finish(
                    &cmd.command_id,
                    cmd.lease_token,
                    outcome,
                    self.inner.remembered,
                );
            }
        }
        delivery
    }

    /// Queues a new command behind earlier ones of its session, starting the session's
    /// worker when it has none.
    pub fn start(&self, Ticket(job): Ticket) {
        let mut state = self.state();
        if let Some(entry) = state.commands.get_mut(&job.command_id) {
            entry.phase = Phase::Queued;
        }
        let session_id = job.session_id.clone();
        match state.sessions.get_mut(&session_id) {
            Some(queue) => queue.push_back(job),
            None => {
                state
                    .sessions
                    .insert(session_id.clone(), VecDeque::from([job]));
                tokio::spawn(worker(self.inner.clone(), session_id));
            }
        }
    }

    /// Sends a delivery's messages through `outbound`, then starts its command (also when
    /// sending failed: the command was received, and its result will be re-sent on
    /// redelivery).
    pub async fn deliver(&self, cmd: proto::Command, outbound: &mpsc::Sender<proto::AgentMessage>) {
        let delivery = self.on_command(cmd);
        for msg in delivery.messages {
            if outbound.send(msg).await.is_err() {
                break;
            }
        }
        if let Some(ticket) = delivery.ticket {
            self.start(ticket);
        }
    }

    /// Drops a command that has not started yet and returns its (failed) result; a command
    /// already running, finished or unknown is left alone.
    pub fn on_cancel(&self, cancel: &proto::Cancel) -> Option<proto::AgentMessage> {
        let mut state = self.state();
        let entry = state.commands.get(&cancel.command_id)?;
        if !matches!(entry.phase, Phase::Queued | Phase::Received) {
            tracing::info!(command_id = %cancel.command_id, "cancel ignored: the command already started");
            return None;
        }
        let lease_token = entry.lease_token;
        for queue in state.sessions.values_mut() {
            queue.retain(|job| job.command_id != cancel.command_id);
        }
        let outcome = Outcome::permanent(format!("cancelled: {}", cancel.reason));
        tracing::info!(command_id = %cancel.command_id, reason = %cancel.reason, "command cancelled before it started");
        state.finish(
            &cancel.command_id,
            lease_token,
            outcome.clone(),
            self.inner.remembered,
        );
        Some(result(&cancel.command_id, lease_token, outcome))
    }

    /// Stops starting commands and waits up to `grace` for running ones to finish and
    /// hand their results to the writer. Queued commands stay unexecuted (and unreported:
    /// the dispatcher redelivers them).
    pub async fn drain(&self, grace: Duration) {
        self.state().draining = true;
        let mut running = self.inner.running.subscribe();
        if tokio::time::timeout(grace, running.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                running = *running.borrow(),
                grace_ms = grace.as_millis() as u64,
                "commands still running at shutdown; their results will be re-sent on redelivery to a new agent process"
            );
        }
    }
}

/// Locks a std mutex that is never held across an await. Poisoning means a panic while
/// held; every update of [`State`] is a single step, so the data is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn finish(&mut self, command_id: &str, lease_token: i64, outcome: Outcome, remembered: usize) {
        self.finish_seq += 1;
        let session_id = self
            .commands
            .get(command_id)
            .and_then(|e| e.session_id.clone());
        self.commands.insert(
            command_id.to_owned(),
            Entry {
                lease_token,
                phase: Phase::Done(outcome),
                session_id,
                finished_seq: self.finish_seq,
                unreported: self.outbound.is_none(),
            },
        );
        self.done_order.push_back(command_id.to_owned());
        // Forget the oldest results beyond the bound. A redelivery of a forgotten command
        // executes again, which the runtime's idempotence makes harmless.
        while self.done_order.len() > remembered {
            if let Some(old) = self.done_order.pop_front() {
                self.commands.remove(&old);
            }
        }
    }
}

fn message(msg: Msg) -> proto::AgentMessage {
    proto::AgentMessage { msg: Some(msg) }
}

fn result(command_id: &str, lease_token: i64, outcome: Outcome) -> proto::AgentMessage {
    message(Msg::Result(proto::CommandResult {
        command_id: command_id.to_owned(),
        lease_token,
        outcome: Some(outcome.into_proto()),
    }))
}

/// Turns a delivered command into a job, or the permanent failure to report.
fn decode(cmd: &proto::Command) -> Result<Job, Outcome> {
    // An empty payload means "no fields", not malformed JSON.
    let payload = if cmd.payload_json.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_str(&cmd.payload_json).map_err(|e| {
            Outcome::permanent(format!("invalid payload JSON for {}: {e}", cmd.action))
        })?
    };
    let kind = CommandKind::decode(&cmd.action, &payload)
        .map_err(|e| Outcome::permanent(e.to_string()))?;
    let session_id = cmd
        .session_id
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Outcome::permanent(format!("{} needs a session_id", cmd.action)))?;
    Ok(Job {
        command_id: cmd.command_id.clone(),
        session_id,
        kind,
        deadline_unix_ms: cmd.deadline_unix_ms,
        trace_context: Some(cmd.trace_context.clone()).filter(|t| !t.is_empty()),
        agent_id: String::new(),
        after: Some(cmd.after_command_id.clone()).filter(|a| !a.is_empty()),
    })
}

/// What a session's worker does next.
enum Step {
    Run(Job),
    /// Answer `NotRun` (through the connection's writer, if there is one).
    NotRun(
        proto::AgentMessage,
        Option<mpsc::Sender<proto::AgentMessage>>,
    ),
}

/// Runs one session's commands in arrival order until its queue is empty.
///
/// A pipelined command (`after` set) runs only if the command it was queued behind
/// completed here. If that one failed, was cancelled, or is unknown (this process never
/// ran it), the command is not run: its entry is forgotten (a redelivery runs it) and
/// `NotRun` tells the dispatcher to queue it again behind its predecessor. Nothing of a
/// session's later commands can therefore take effect before an earlier one's retry.
async fn worker(inner: Arc<Inner>, session_id: String) {
    loop {
        let step = {
            let mut state = lock(&inner.state);
            let next = if state.draining {
                None
            } else {
                state
                    .sessions
                    .get_mut(&session_id)
                    .and_then(VecDeque::pop_front)
            };
            let Some(job) = next else {
                // Removed under the same lock `start` pushes under, so no job is stranded.
                state.sessions.remove(&session_id);
                return;
            };
            if let Some(after) = &job.after
                && !matches!(
                    state.commands.get(after).map(|e| &e.phase),
                    Some(Phase::Done(Outcome::Completed(_)))
                )
            {
                let reason = match state.commands.get(after).map(|e| &e.phase) {
                    Some(Phase::Done(Outcome::Failed { .. })) => {
                        format!("the command before it ({after}) failed")
                    }
                    Some(_) => format!("the command before it ({after}) has not finished"),
                    None => format!("the command before it ({after}) is unknown here"),
                };
                let lease_token = state
                    .commands
                    .remove(&job.command_id)
                    .map_or(0, |e| e.lease_token);
                tracing::info!(command_id = %job.command_id, %reason, "pipelined command not run");
                let msg = message(Msg::Result(proto::CommandResult {
                    command_id: job.command_id.clone(),
                    lease_token,
                    outcome: Some(proto::command_result::Outcome::NotRun(proto::NotRun {
                        reason,
                    })),
                }));
                Step::NotRun(msg, state.outbound.clone())
            } else {
                if let Some(entry) = state.commands.get_mut(&job.command_id) {
                    entry.phase = Phase::Running;
                }
                inner.running.send_modify(|n| *n += 1);
                Step::Run(job)
            }
        };
        let job = match step {
            Step::Run(job) => job,
            Step::NotRun(msg, outbound) => {
                // Unsent (no connection): the dispatcher gets the lease back with the
                // connection, or at its expiry, without an attempt counted either way.
                if let Some(outbound) = outbound {
                    let _ = outbound.send(msg).await;
                }
                continue;
            }
        };
        let command_id = job.command_id.clone();
        let action = job.kind.action();
        let outcome = execute(&inner.runtime, job).await;
        if let Some(log) = &inner.executions {
            let result = match &outcome {
                Outcome::Completed(_) => "completed",
                Outcome::Failed {
                    retryable: true, ..
                } => "retryable",
                Outcome::Failed { .. } => "failed",
            };
            log.record(&command_id, &session_id, action.as_str(), result);
        }
        let (msg, outbound) = {
            let mut state = lock(&inner.state);
            // The entry cannot have been evicted: only Done entries are, and this one
            // is Running. Fall back to the job's own lease for robustness anyway.
            let lease_token = state.commands.get(&command_id).map_or(0, |e| e.lease_token);
            state.finish(&command_id, lease_token, outcome.clone(), inner.remembered);
            (
                result(&command_id, lease_token, outcome),
                state.outbound.clone(),
            )
        };
        if let Some(outbound) = outbound
            && outbound.send(msg).await.is_err()
        {
            tracing::debug!(
                command_id,
                "connection closed before the result was sent; kept for redelivery"
            );
            if let Some(entry) = lock(&inner.state).commands.get_mut(&command_id) {
                entry.unreported = true;
            }
        }
        // Counted down only after the result is with the writer, so draining at shutdown
        // waits for results to be queued, not just computed.
        inner.running.send_modify(|n| *n -= 1);
    }
}

async fn execute(runtime: &Arc<dyn SessionRuntime>, job: Job) -> Outcome {
    if job.deadline_unix_ms > 0 && unix_ms() > job.deadline_unix_ms {
        return Outcome::permanent("deadline passed before the command could start");
    }
    let span = tracing::info_span!(
        "execute command",
        otel.kind = "consumer",
        agent_id = %job.agent_id,
        command_id = %job.command_id,
        session_id = %job.session_id,
        action = %job.kind.action(),
        trace_id = tracing::field::Empty,
    );
    // A child of the dispatcher's delivery: the command's one trace, however long after
    // its acceptance it runs. Runtime calls (Kubernetes requests, spawns) nest inside.
    streamspace_core::telemetry::continue_trace(&span, job.trace_context.as_deref());
    // Its own task, so a panicking runtime fails this command instead of killing the
    // session's worker and stranding the commands behind it.
    let runtime = runtime.clone();
    let Job {
        session_id, kind, ..
    } = job;
    let call = tokio::spawn(
        async move {
            tracing::info!("executing");
            let started = std::time::Instant::now();
            let (operation, result) = match &kind {
                CommandKind::StartSession(spec) => {
                    ("start", runtime.start(&session_id, spec).await)
                }
                CommandKind::StopSession(spec) => ("stop", runtime.stop(&session_id, spec).await),
                CommandKind::HibernateSession(spec) => {
                    ("hibernate", runtime.hibernate(&session_id, spec).await)
                }
                CommandKind::WakeSession(spec) => ("wake", runtime.wake(&session_id, spec).await),
            };
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) if e.retryable => "retryable",
                Err(_) => "permanent",
            };
            crate::metrics::record_operation(operation, outcome, started.elapsed().as_secs_f64());
            result
        }
        .instrument(span.clone()),
    );
    let outcome = match call.await {
        Ok(Ok(obs)) => Outcome::Completed(obs),
        Ok(Err(e)) => Outcome::Failed {
            message: e.message,
            retryable: e.retryable,
        },
        Err(e) => Outcome::Failed {
            message: format!("runtime operation panicked: {e}"),
            retryable: true,
        },
    };
    span.in_scope(|| tracing::info!(?outcome, "executed"));
    outcome
}

#[cfg(test)]
mod tests;
