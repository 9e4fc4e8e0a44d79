//! One agent connection: the hello/welcome handshake, the delivery loop that claims and
//! pushes commands, the reader that admits the agent's reports (applied by
//! [`crate::reports`]), and the clean-up when it ends.
//!
//! Invariants:
//! - One writer per stream: everything outbound goes through one bounded `mpsc`, so HTTP/2
//!   flow control is the backpressure.
//! - **Every step is fenced by the connection's epoch**: the handshake's lease hand-over
//!   and reconciliation, registration here, claims, lease renewal, reports and clean-up.
//!   A superseded connection — even one whose handshake is still running when a newer one
//!   completes — ends itself and writes nothing.
//! - **The connection touches only what it holds.** `in_flight` is exactly the leases it
//!   pushed and has no result for; only reports for those are written, only those are
//!   renewed. A lease it does not know of (a claim whose reply was lost) expires and is
//!   rescued.
//! - Clean-up is fenced by epoch: it never marks a newer connection offline.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use streamspace_core::agents::{self, AgentIdentity, ConnectInfo};
use streamspace_core::command::{CommandId, Lease};
use streamspace_core::queue::{ClaimParams, Completion, Failure};
use streamspace_core::sessions::{self, Observation, Reporter};
use streamspace_proto::agent::v1::{self as pb, agent_message::Msg, dispatcher_message};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::Shared;
use crate::convert;
use crate::registry::ConnectionHandle;
use crate::reports::{self, Report};

/// How long a new connection waits for the time its agent's earliest retry is due.
const NEXT_DUE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent may take to send `Hello` after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most messages read into one batch.
const MAX_REPORT_BATCH: usize = 512;
/// First pause before writing failed reports again; doubles up to [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(2);
/// Bound on the clean-up's database writes; past it the leases expire and are rescued.
const CLEAN_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// One message (or the final status) for the agent. Boxed in the channel: tokio allocates
/// a channel's slots 32 at a time, and 32 unboxed slots are 5 KB per connection whether
/// or not anything waits in them (heaptrack, `docs/performance.md`).
pub type Outgoing = Box<Result<pb::DispatcherMessage, Status>>;

type Outbound = mpsc::Sender<Outgoing>;

/// Counts a handshake from authentication to `Welcome` (or failure) on `/metrics`.
struct HandshakeGauge<'a>(&'a Shared);

impl<'a> HandshakeGauge<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared
            .stats
            .handshakes_in_progress
            .fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for HandshakeGauge<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .handshakes_in_progress
            .fetch_sub(1, Ordering::SeqCst);
    }
}

/// The most sessions (and commands in progress) one agent may list in a `Hello` or
/// `Heartbeat`: an inventory is applied row by row, so an unbounded one from a single
/// credential would tie up the database for every other agent.
pub const MAX_INVENTORY: usize = 10_000;

/// Performs the handshake and starts serving the connection; returns the outbound stream.
pub async fn accept(
    shared: Arc<Shared>,
    identity: AgentIdentity,
    mut inbound: Streaming<pb::AgentMessage>,
) -> Result<ReceiverStream<Outgoing>, Status> {
    let _gauge = HandshakeGauge::new(&shared);
    let agent_id = identity.agent_id.clone();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::AgentMessage {
            msg: Some(Msg::Hello(hello)),
        }))) => hello,
        Ok(Ok(Some(_))) => return Err(Status::invalid_argument("the first message must be Hello")),
        Ok(Ok(None)) => return Err(Status::cancelled("stream closed before Hello")),
        Ok(Err(status)) => return Err(status),
        Err(_) => {
            return Err(Status::deadline_exceeded(
                "no Hello within 10s of connecting",
            ));
        }
    };
    if hello.sessions.len() > MAX_INVENTORY || hello.commands_in_progress.len() > MAX_INVENTORY {
        return Err(Status::invalid_argument(format!(
            "Hello lists {} sessions and {} commands in progress; at most {MAX_INVENTORY} of each",
            hello.sessions.len(),
            hello.commands_in_progress.len()
        )));
    }
    if hello.protocol_version != pb::PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "agent speaks protocol version {}; this dispatcher speaks {}",
            hello.protocol_version,
            pb::PROTOCOL_VERSION
        )));
    }

    let owner = format!(
        "{}/{}/{}",
        shared.config.dispatcher_id,
        agent_id,
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let info = ConnectInfo {
        agent_version: hello.agent_version.clone(),
        capabilities: serde_json::json!({ "capabilities": hello.capabilities, "runtime": hello.runtime }),
    };
    // From the connect on, the database may name this connection the agent's current one
    // (even when the connect's reply is lost): whatever fails before the stream is served
    // must undo that, or the agent shows online with nobody holding its stream.
    let result = async {
        let epoch = agents::agent_connect(shared.queue.pool(), &agent_id, &owner, &info)
            .await
            .map_err(|e| internal(&agent_id, e))?;
        metrics::counter!("streamspace_dispatcher_agent_connects_total").increment(1);
        let served = handshake(
            &shared,
            &agent_id,
            &identity.credential_id,
            &owner,
            epoch,
            &hello,
            inbound,
        )
        .await;
        if served.is_err() {
            shared.registry.unregister(&agent_id, epoch);
        }
        served
    }
    .await;
    if result.is_err()
        && let Err(e) = agents::agent_disconnect_owner(shared.queue.pool(), &agent_id, &owner).await
    {
        tracing::error!(agent_id, owner, error = %e, "undoing a failed handshake failed; the agent shows offline once its heartbeat ages");
    }
    result
}

/// The fenced steps after `agent_connect`: hand over older connections' leases, reconcile
/// the inventory, register, welcome. A step that finds the connection superseded ends the
/// handshake with `ABORTED` and has written nothing.
async fn handshake(
    shared: &Arc<Shared>,
    agent_id: &str,
    credential_id: &str,
    owner: &str,
    epoch: i64,
    hello: &pb::Hello,
    inbound: Streaming<pb::AgentMessage>,
) -> Result<ReceiverStream<Outgoing>, Status> {
    let pool = shared.queue.pool();
    let superseded = |e: streamspace_core::Error| match e {
        streamspace_core::Error::Superseded { .. } => {
            tracing::info!(
                agent_id,
                epoch,
                "handshake superseded by a newer connection; ending it"
            );
            Status::aborted("superseded by a newer connection of this agent")
        }
        other => internal(agent_id, other),
    };

    // Whatever older connections of this agent held goes back to the queue now, not when
    // their leases expire: the agent is here, on this connection.
    let released = shared
        .queue
        .command_release_superseded(agent_id, epoch, owner, &hello.commands_in_progress)
        .await
        .map_err(superseded)?;
    if !released.requeued.is_empty() || !released.failed.is_empty() {
        tracing::info!(
            agent_id,
            requeued = released.requeued.len(),
            failed = released.failed.len(),
            "returned leases of a previous connection"
        );
    }

    let reporter = Reporter {
        agent_id,
        epoch,
        owner,
    };
    let inventory: Vec<Observation> = hello
        .sessions
        .iter()
        .filter_map(convert::observation)
        .collect();
    if hello.inventory_unknown {
        // Unknown is not empty: nothing is marked lost, no orphan is stopped.
        tracing::warn!(
            agent_id,
            "the agent could not list its sessions; reconciliation skipped until it reconnects with an inventory"
        );
    } else {
        match sessions::session_reconcile(pool, reporter, &inventory).await {
            Ok(_) => {}
            Err(e @ streamspace_core::Error::Superseded { .. }) => return Err(superseded(e)),
            // Not needed for delivery; the next connection reconciles again.
            Err(e) => {
                tracing::error!(agent_id, error = %e, "reconciling the agent's sessions failed")
            }
        }
    }

    let (close_tx, close_rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    let handle = ConnectionHandle {
        epoch,
        wake: wake.clone(),
        close: close_tx,
    };
    if let Err(newer) = shared.registry.register(agent_id, handle) {
        tracing::info!(
            agent_id,
            epoch,
            newer,
            "a newer connection is already served here; ending this one"
        );
        return Err(Status::aborted(
            "superseded by a newer connection of this agent",
        ));
    }

    let capacity = shared.config.max_in_flight as usize + 32;
    let (tx, rx) = mpsc::channel(capacity);
    let welcome = pb::DispatcherMessage {
        msg: Some(dispatcher_message::Msg::Welcome(pb::Welcome {
            agent_id: agent_id.to_owned(),
            connection_epoch: epoch,
            heartbeat_interval_ms: u32::try_from(shared.config.heartbeat_interval_ms)
                .unwrap_or(u32::MAX),
            max_in_flight: shared.config.max_in_flight,
            max_message_bytes: u32::try_from(shared.config.max_message_bytes).unwrap_or(u32::MAX),
            protocol_version: pb::PROTOCOL_VERSION,
        })),
    };
    tx.send(Box::new(Ok(welcome)))
        .await
        .map_err(|_| Status::cancelled("agent went away during handshake"))?;
    tracing::info!(
        agent_id,
        epoch,
        owner,
        sessions = inventory.len(),
        inventory_unknown = hello.inventory_unknown,
        "agent connected"
    );

    let conn = Connection {
        shared: shared.clone(),
        agent_id: agent_id.to_owned(),
        credential_id: credential_id.to_owned(),
        owner: owner.to_owned(),
        epoch,
        wake,
        pipeline_depth: if hello
            .capabilities
            .iter()
            .any(|c| c == pb::PIPELINE_CAPABILITY)
        {
            i64::from(shared.config.pipeline_depth)
        } else {
            1
        },
        retry_due: Mutex::new(None),
        in_flight: Mutex::new(HashMap::new()),
        last_heartbeat: Mutex::new(None),
    };
    tokio::spawn(Arc::new(conn).run(inbound, tx, close_rx));
    Ok(ReceiverStream::new(rx))
}

fn internal(agent_id: &str, e: streamspace_core::Error) -> Status {
    tracing::error!(agent_id, error = %e, "agent handshake failed");
    Status::unavailable("the dispatcher cannot reach its database; retry")
}

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    AgentClosed,
    StreamError(Status),
    Silent(Duration),
    Superseded,
    /// The credential the connection was made with has been revoked.
    Revoked,
    Shutdown,
    /// This replica cannot reach its database (see [`crate::health`]).
    DatabaseLost,
    /// This connection's own heartbeat writes kept failing.
    HeartbeatsFailing(u32),
}

struct Connection {
    shared: Arc<Shared>,
    agent_id: String,
    /// The credential the connection was made with; checked on every heartbeat.
    credential_id: String,
    /// Lease owner of every command claimed through this connection.
    owner: String,
    epoch: i64,
    wake: Arc<Notify>,
    /// Commands of one session claimed together: the configured depth when the agent can
    /// run pipelined commands (its `Hello` lists [`PIPELINE_CAPABILITY`]), else 1.
    pipeline_depth: i64,
    /// When the delivery loop must claim again although nobody woke it: the end of the
    /// earliest retry backoff this connection knows of.
    retry_due: Mutex<Option<Instant>>,
    /// Leases pushed on this connection whose result has not been written: command id →
    /// lease token.
    in_flight: Mutex<HashMap<String, i64>>,
    /// When the agent's last heartbeat arrived, to measure the gaps between them.
    last_heartbeat: Mutex<Option<Instant>>,
}

impl Connection {
    async fn run(
        self: Arc<Self>,
        inbound: Streaming<pb::AgentMessage>,
        tx: Outbound,
        close_rx: watch::Receiver<bool>,
    ) {
        let delivery = tokio::spawn(self.clone().deliver(tx.clone()));
        let ended = self.read(inbound, close_rx).await;
        delivery.abort();
        let _ = delivery.await;
        if tokio::time::timeout(CLEAN_UP_TIMEOUT, self.clean_up(&ended))
            .await
            .is_err()
        {
            tracing::error!(agent_id = %self.agent_id, epoch = self.epoch, "clean-up timed out; leases will be rescued on expiry");
        }
        // Tell the agent why, so it can tell "go elsewhere" from "someone else is you".
        let status = match &ended {
            Ended::Superseded => Some(Status::aborted(
                "superseded by a newer connection of this agent",
            )),
            Ended::Silent(d) => Some(Status::unavailable(format!(
                "no message from the agent for {d:?}"
            ))),
            Ended::Shutdown => Some(Status::unavailable("dispatcher shutting down; reconnect")),
            Ended::Revoked => Some(Status::unauthenticated(
                "the agent credential of this connection was revoked",
            )),
            Ended::DatabaseLost => Some(Status::unavailable(
                "dispatcher lost its database; reconnect (to another replica)",
            )),
            Ended::HeartbeatsFailing(n) => Some(Status::unavailable(format!(
                "dispatcher could not record {n} heartbeats in a row; reconnect"
            ))),
            Ended::AgentClosed | Ended::StreamError(_) => None,
        };
        if let Some(status) = status {
            let _ = tx.try_send(Box::new(Err(status)));
        }
        // Dropping the last sender ends the response stream; the agent reconnects.
        drop(tx);
    }

    /// Claims deliverable commands whenever woken (notification, a result freeing the
    /// window, or the poll interval) and pushes them, up to `max_in_flight` outstanding.
    async fn deliver(self: Arc<Self>, tx: Outbound) {
        let max = self.shared.config.max_in_flight as usize;
        let mut shutdown = self.shared.shutdown.clone();
        let mut db_ok = self.shared.db_ok.clone();
        // Retries scheduled before this connection (by an earlier one) are due when they
        // are due, not at the next poll. Read beside the loop: a slow answer must not hold
        // up the first claim.
        let this = Arc::downgrade(&self);
        let queue = self.shared.queue.clone();
        let agent_id = self.agent_id.clone();
        tokio::spawn(async move {
            let read = tokio::time::timeout(NEXT_DUE_TIMEOUT, queue.command_next_due(&agent_id));
            match read.await {
                Ok(Ok(Some(due))) => {
                    if let Some(this) = this.upgrade() {
                        this.wake_at(due);
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(agent_id, error = %e, "reading the next retry time failed; the poll finds it")
                }
                Err(_) => {
                    tracing::warn!(
                        agent_id,
                        "reading the next retry time timed out; the poll finds it"
                    )
                }
            }
        });
        loop {
            if *shutdown.borrow() {
                return;
            }
            let free = max.saturating_sub(self.in_flight_len());
            if free > 0 && *self.shared.db_ok.borrow() {
                let params = ClaimParams {
                    agent_id: &self.agent_id,
                    owner: &self.owner,
                    limit: free as i64,
                    epoch: Some(self.epoch),
                    pipeline_depth: self.pipeline_depth,
                };
                match self.shared.queue.command_claim(params).await {
                    Ok(batch) => {
                        for cmd in &batch.commands {
                            let token = cmd.lease.as_ref().map_or(0, |l| l.token);
                            self.lock_in_flight()
                                .insert(cmd.command_id.to_string(), token);
                            // One span per delivery, in the trace of the request that
                            // made the command; the agent's execution is its child.
                            let span = tracing::info_span!(
                                "deliver command",
                                otel.kind = "producer",
                                agent_id = %self.agent_id,
                                command_id = %cmd.command_id,
                                session_id = cmd.session_id.as_deref().unwrap_or(""),
                                action = cmd.kind.action().as_str(),
                                attempt = cmd.attempts,
                                trace_id = tracing::field::Empty,
                            );
                            streamspace_core::telemetry::continue_trace(
                                &span,
                                cmd.trace_context.as_deref(),
                            );
                            span.in_scope(|| tracing::debug!("delivering"));
                            let mut command = convert::command_to_proto(cmd);
                            if let Some(own) = streamspace_core::telemetry::traceparent_of(&span) {
                                command.trace_context = own;
                            }
                            drop(span);
                            let msg = pb::DispatcherMessage {
                                msg: Some(dispatcher_message::Msg::Command(command)),
                            };
                            if tx.send(Box::new(Ok(msg))).await.is_err() {
                                return; // the stream is gone; clean-up releases the leases
                            }
                        }
                        // A quarantined row is terminal now, so the command behind it in
                        // its session may have become deliverable: look again at once.
                        if !batch.quarantined.is_empty() {
                            continue;
                        }
                    }
                    // A claim that committed but whose reply was lost leaves leases this
                    // connection never learns of; they are not renewed, so they expire
                    // and are rescued.
                    Err(e) => {
                        tracing::error!(agent_id = %self.agent_id, error = %e, "claim failed")
                    }
                }
            }
            let due = *self.retry_due.lock().unwrap_or_else(|p| p.into_inner());
            tokio::select! {
                () = self.wake.notified() => {
                    metrics::counter!("streamspace_dispatcher_claim_wakeups_total", "cause" => "notify").increment(1);
                }
                () = sleep_until_some(due) => {
                    let mut next = self.retry_due.lock().unwrap_or_else(|p| p.into_inner());
                    if next.is_some_and(|n| n <= Instant::now()) {
                        *next = None;
                    }
                    metrics::counter!("streamspace_dispatcher_claim_wakeups_total", "cause" => "retry_due").increment(1);
                }
                () = tokio::time::sleep(self.shared.config.poll_interval()) => {
                    metrics::counter!("streamspace_dispatcher_claim_wakeups_total", "cause" => "poll").increment(1);
                }
                // The database is back: claim now rather than at the next poll.
                Ok(()) = db_ok.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Reads the agent's messages until the stream ends, the agent falls silent, the
    /// connection is superseded, its replica loses the database, or the dispatcher shuts
    /// down. Reports that arrive together are applied together, in stream order; reports
    /// whose write failed are written again after a backoff.
    async fn read(
        &self,
        mut inbound: Streaming<pb::AgentMessage>,
        mut close_rx: watch::Receiver<bool>,
    ) -> Ended {
        let silence = self.shared.config.offline_after();
        let mut shutdown = self.shared.shutdown.clone();
        let mut db_ok = self.shared.db_ok.clone();
        let mut backlog: VecDeque<Report> = VecDeque::new();
        let mut retry_delay = RETRY_BASE;
        let mut retry_at: Option<Instant> = None;
        let mut heard = Instant::now();
        let mut failed_heartbeats = 0u32;
        loop {
            let first = tokio::select! {
                r = inbound.message() => Some(r),
                () = tokio::time::sleep_until(heard + silence) => return Ended::Silent(silence),
                () = sleep_until_some(retry_at) => None,
                _ = close_rx.wait_for(|c| *c) => return Ended::Superseded,
                _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
                _ = db_ok.wait_for(|ok| !*ok) => return Ended::DatabaseLost,
            };
            let mut heartbeat = false;
            if let Some(first) = first {
                let first = match first {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ended::AgentClosed,
                    Err(status) => return Ended::StreamError(status),
                };
                heard = Instant::now();
                heartbeat |= self.admit(first, &mut backlog);
                for _ in 1..MAX_REPORT_BATCH {
                    match inbound.message().now_or_never() {
                        Some(Ok(Some(m))) => heartbeat |= self.admit(m, &mut backlog),
                        _ => break,
                    }
                }
            }
            // Reports first, then the heartbeat that followed them on the stream: a
            // recorded heartbeat means every report sent before it was written (unless that
            // write failed and is being retried).
            let step = async {
                let applied = self.apply(&mut backlog).await;
                let beat = if heartbeat {
                    self.heartbeat().await
                } else {
                    Ok(None)
                };
                (beat, applied)
            };
            let (beat, applied) = tokio::select! {
                r = step => r,
                _ = close_rx.wait_for(|c| *c) => return Ended::Superseded,
                _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
                _ = db_ok.wait_for(|ok| !*ok) => return Ended::DatabaseLost,
            };
            match beat {
                Ok(None) => failed_heartbeats = 0,
                Ok(Some(end)) => return end,
                Err(e) => {
                    failed_heartbeats += 1;
                    self.shared
                        .stats
                        .heartbeat_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(agent_id = %self.agent_id, error = %e, failed_heartbeats, "recording a heartbeat failed");
                    if failed_heartbeats >= self.shared.config.db_failures_before_unready {
                        return Ended::HeartbeatsFailing(failed_heartbeats);
                    }
                }
            }
            match applied {
                Ok(()) => {
                    retry_delay = RETRY_BASE;
                    retry_at = None;
                }
                Err(e) => {
                    self.shared
                        .stats
                        .report_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(agent_id = %self.agent_id, error = %e, pending = backlog.len(), retry_in_ms = retry_delay.as_millis() as u64,
                        "writing the agent's reports failed; kept in order and retried");
                    retry_at = Some(Instant::now() + retry_delay);
                    retry_delay = (retry_delay * 2).min(RETRY_CAP);
                }
            }
        }
    }

    /// Turns one message into reports at the end of `backlog`. Acks and results count only
    /// for a lease this connection holds (pushed, no result written yet); anything else
    /// is not this connection's to touch. Returns whether the message was a heartbeat.
    fn admit(&self, m: pb::AgentMessage, backlog: &mut VecDeque<Report>) -> bool {
        match m.msg {
            Some(Msg::Ack(a)) => {
                if let Some(lease) = self.held(&a.command_id, a.lease_token) {
                    backlog.push_back(Report::Ack(lease));
                }
            }
            Some(Msg::Result(r)) => {
                let Some(lease) = self.held(&r.command_id, r.lease_token) else {
                    return false;
                };
                match r.outcome {
                    Some(pb::command_result::Outcome::Completed(c)) => {
                        let observed = c.session.as_ref().and_then(convert::observation);
                        backlog.push_back(Report::Completed(
                            Completion {
                                lease,
                                result: convert::completion_details(&c),
                            },
                            observed,
                        ));
                    }
                    Some(pb::command_result::Outcome::Failed(f)) => {
                        backlog.push_back(Report::Failed(Failure {
                            lease,
                            message: f.message,
                            retryable: f.retryable,
                        }));
                    }
                    Some(pb::command_result::Outcome::NotRun(n)) => {
                        tracing::debug!(agent_id = %self.agent_id, command_id = %r.command_id, reason = %n.reason, "pipelined command not run; back to the queue");
                        backlog.push_back(Report::NotRun(lease));
                    }
                    None => {
                        tracing::warn!(agent_id = %self.agent_id, command_id = %r.command_id, "result without an outcome ignored");
                    }
                }
            }
            Some(Msg::Heartbeat(h)) => {
                // The gap since the previous heartbeat: the configured interval when all
                // is well; more is lag (a busy agent, a slow network, a stalled runtime).
                let now = Instant::now();
                let previous = self
                    .last_heartbeat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(now);
                if let Some(previous) = previous {
                    metrics::histogram!("streamspace_dispatcher_heartbeat_gap_seconds")
                        .record((now - previous).as_secs_f64());
                }
                if h.sessions.len() > MAX_INVENTORY {
                    tracing::warn!(agent_id = %self.agent_id, sessions = h.sessions.len(), "heartbeat inventory over the limit ignored");
                } else if !h.inventory_unknown {
                    let observed: Vec<Observation> =
                        h.sessions.iter().filter_map(convert::observation).collect();
                    if !observed.is_empty() {
                        backlog.push_back(Report::Observations(observed));
                    }
                }
                return true;
            }
            Some(Msg::SessionStatus(s)) => {
                if let Some(o) = s.session.as_ref().and_then(convert::observation) {
                    backlog.push_back(Report::Observations(vec![o]));
                }
            }
            Some(Msg::Hello(_)) => {
                tracing::warn!(agent_id = %self.agent_id, "repeated Hello ignored");
            }
            None => {}
        }
        false
    }

    /// The lease of a report, if this connection holds it under that token.
    fn held(&self, command_id: &str, token: i64) -> Option<Lease> {
        if self.lock_in_flight().get(command_id) != Some(&token) {
            self.shared
                .stats
                .reports_for_unheld_leases
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(agent_id = %self.agent_id, command_id, token, "report for a lease this connection does not hold ignored");
            return None;
        }
        match command_id.parse::<CommandId>() {
            Ok(command_id) => Some(Lease {
                command_id,
                token,
                agent_id: self.agent_id.clone(),
                owner: self.owner.clone(),
            }),
            Err(e) => {
                tracing::warn!(agent_id = %self.agent_id, error = %e, "report with an invalid command id ignored");
                None
            }
        }
    }

    /// Records liveness (fenced by epoch) and renews exactly the leases in flight; or
    /// says why this connection must end (superseded, or its credential revoked).
    async fn heartbeat(&self) -> Result<Option<Ended>, streamspace_core::Error> {
        let pool = self.shared.queue.pool();
        match agents::agent_heartbeat_checked(pool, &self.agent_id, self.epoch, &self.credential_id)
            .await?
        {
            agents::Beat::Recorded => {}
            agents::Beat::Superseded => return Ok(Some(Ended::Superseded)),
            agents::Beat::Revoked => return Ok(Some(Ended::Revoked)),
        }
        let held: Vec<(String, i64)> = self
            .lock_in_flight()
            .iter()
            .map(|(id, token)| (id.clone(), *token))
            .collect();
        self.shared
            .queue
            .command_lease_extend(&self.owner, &held)
            .await?;
        Ok(None)
    }

    /// Writes the backlog; commands whose result was written leave the in-flight window
    /// (only under the token they were pushed with).
    async fn apply(&self, backlog: &mut VecDeque<Report>) -> Result<(), streamspace_core::Error> {
        if backlog.is_empty() {
            return Ok(());
        }
        let reporter = Reporter {
            agent_id: &self.agent_id,
            epoch: self.epoch,
            owner: &self.owner,
        };
        let mut written = reports::Written::default();
        let result = reports::apply(&self.shared.queue, reporter, backlog, &mut written).await;
        if let Some(due) = written.retry_due {
            self.wake_at(due);
        }
        let finished = written.finished;
        if !finished.is_empty() {
            let mut in_flight = self.lock_in_flight();
            for (id, token) in &finished {
                if in_flight.get(id) == Some(token) {
                    in_flight.remove(id);
                }
            }
            drop(in_flight);
            // The window has room again, and the next command of each session may now be
            // deliverable.
            self.wake.notify_one();
        }
        result
    }

    async fn clean_up(&self, ended: &Ended) {
        let agent_id = &self.agent_id;
        // Bounded labels: why streams end, never which agent (flapping shows as rate).
        let reason = match ended {
            Ended::Superseded => "superseded",
            Ended::Silent(_) => "silent",
            Ended::Shutdown => "shutdown",
            Ended::Revoked => "revoked",
            Ended::DatabaseLost => "database_lost",
            Ended::HeartbeatsFailing(_) => "heartbeats_failing",
            Ended::AgentClosed => "agent_closed",
            Ended::StreamError(_) => "stream_error",
        };
        metrics::counter!("streamspace_dispatcher_agent_disconnects_total", "reason" => reason)
            .increment(1);
        match ended {
            Ended::Silent(d) => tracing::warn!(
                agent_id,
                epoch = self.epoch,
                "agent silent for {d:?}; closing its stream"
            ),
            Ended::StreamError(s) => {
                tracing::info!(agent_id, epoch = self.epoch, status = %s, "agent stream failed")
            }
            Ended::DatabaseLost | Ended::HeartbeatsFailing(_) => {
                tracing::warn!(agent_id, epoch = self.epoch, reason = ?ended, "closing the agent's stream: no database")
            }
            Ended::Revoked => tracing::warn!(
                agent_id,
                epoch = self.epoch,
                credential_id = %self.credential_id,
                "the connection's credential was revoked; closing its stream"
            ),
            other => {
                tracing::info!(agent_id, epoch = self.epoch, reason = ?other, "agent connection ended")
            }
        }
        self.shared.registry.unregister(agent_id, self.epoch);
        let pool = self.shared.queue.pool();
        // Disconnect first: once it is recorded, no claim of this connection can commit
        // (claims are fenced by the owner), so the release below sees every lease it took.
        if let Err(e) = agents::agent_disconnect(pool, agent_id, self.epoch).await {
            tracing::error!(agent_id, error = %e, "recording the disconnect failed");
        }
        match self.shared.queue.command_release_owner(&self.owner).await {
            Ok(r) if !r.requeued.is_empty() => {
                tracing::info!(
                    agent_id,
                    requeued = r.requeued.len(),
                    "released the connection's undelivered leases"
                )
            }
            Ok(_) => {}
            // The leases expire and are rescued instead.
            Err(e) => {
                tracing::error!(agent_id, error = %e, "releasing leases failed; they will be rescued on expiry")
            }
        }
    }

    /// Makes the delivery loop claim again at `due` (a retry's backoff ends), unless it
    /// is already due to wake earlier.
    fn wake_at(&self, due: chrono::DateTime<chrono::Utc>) {
        let wait = (due - chrono::Utc::now()).to_std().unwrap_or_default();
        let at = Instant::now() + wait;
        let mut next = self.retry_due.lock().unwrap_or_else(|p| p.into_inner());
        if next.is_none_or(|n| at < n) {
            *next = Some(at);
            drop(next);
            // The loop re-reads the time it sleeps until.
            self.wake.notify_one();
        }
    }

    fn in_flight_len(&self) -> usize {
        self.lock_in_flight().len()
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // Single inserts/removes only: a poisoned map is still consistent.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
