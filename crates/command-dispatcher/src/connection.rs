//! One agent connection: the hello/welcome handshake, the delivery loop that claims and
//! pushes commands, the reader that applies the agent's reports, and the clean-up that
//! returns the connection's leases when it ends.
//!
//! Invariants:
//! - One writer per stream: everything outbound goes through one bounded `mpsc`, so HTTP/2
//!   flow control is the backpressure.
//! - Claims name this connection's epoch: once superseded, it can never take new work.
//! - Clean-up is fenced by epoch: it never marks a newer connection offline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use streamspace_core::agents::{self, AgentIdentity, ConnectInfo};
use streamspace_core::command::{CommandId, Lease};
use streamspace_core::queue::{ClaimParams, Completion, Failure, FailureOutcome, Outcome};
use streamspace_core::sessions::{self, Observation};
use streamspace_proto::agent::v1::{self as pb, agent_message::Msg, dispatcher_message};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::Shared;
use crate::convert;
use crate::registry::ConnectionHandle;

/// How long an agent may take to send `Hello` after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most reports applied in one batch (one statement per kind).
const MAX_REPORT_BATCH: usize = 512;

type Outbound = mpsc::Sender<Result<pb::DispatcherMessage, Status>>;

/// Performs the handshake and starts serving the connection; returns the outbound stream.
pub async fn accept(
    shared: Arc<Shared>,
    identity: AgentIdentity,
    mut inbound: Streaming<pb::AgentMessage>,
) -> Result<ReceiverStream<Result<pb::DispatcherMessage, Status>>, Status> {
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
    let pool = shared.queue.pool();
    let epoch = agents::agent_connect(pool, &agent_id, &owner, &info)
        .await
        .map_err(internal)?;

    let (close_tx, close_rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    shared.registry.register(
        &agent_id,
        ConnectionHandle {
            epoch,
            wake: wake.clone(),
            close: close_tx,
        },
    );

    // Whatever older connections of this agent held goes back to the queue now, not when
    // their leases expire: the agent is here, on this connection.
    let released = shared
        .queue
        .command_release_agent_except(&agent_id, &owner)
        .await
        .map_err(internal)?;
    if !released.requeued.is_empty() {
        tracing::info!(
            agent_id,
            count = released.requeued.len(),
            "returned leases of a previous connection"
        );
    }
    let inventory: Vec<Observation> = hello
        .sessions
        .iter()
        .filter_map(convert::observation)
        .collect();
    if let Err(e) = sessions::session_reconcile(pool, &agent_id, &inventory).await {
        tracing::error!(agent_id, error = %e, "reconciling the agent's sessions failed");
    }

    let capacity = shared.config.max_in_flight as usize + 32;
    let (tx, rx) = mpsc::channel(capacity);
    let welcome = pb::DispatcherMessage {
        msg: Some(dispatcher_message::Msg::Welcome(pb::Welcome {
            agent_id: agent_id.clone(),
            connection_epoch: epoch,
            heartbeat_interval_ms: u32::try_from(shared.config.heartbeat_interval_ms)
                .unwrap_or(u32::MAX),
            max_in_flight: shared.config.max_in_flight,
            max_message_bytes: u32::try_from(shared.config.max_message_bytes).unwrap_or(u32::MAX),
            protocol_version: pb::PROTOCOL_VERSION,
        })),
    };
    tx.send(Ok(welcome))
        .await
        .map_err(|_| Status::cancelled("agent went away during handshake"))?;
    tracing::info!(
        agent_id,
        epoch,
        owner,
        sessions = inventory.len(),
        "agent connected"
    );

    let conn = Connection {
        shared,
        agent_id,
        owner,
        epoch,
        wake,
        in_flight: Arc::new(Mutex::new(HashSet::new())),
    };
    tokio::spawn(conn.run(inbound, tx, close_rx));
    Ok(ReceiverStream::new(rx))
}

fn internal(e: streamspace_core::Error) -> Status {
    tracing::error!(error = %e, "agent handshake failed");
    Status::unavailable("the dispatcher cannot reach its database; retry")
}

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    AgentClosed,
    StreamError(Status),
    Silent(Duration),
    Superseded,
    Shutdown,
}

struct Connection {
    shared: Arc<Shared>,
    agent_id: String,
    /// Lease owner of every command claimed through this connection.
    owner: String,
    epoch: i64,
    wake: Arc<Notify>,
    /// Commands pushed on this connection whose result has not arrived.
    in_flight: Arc<Mutex<HashSet<String>>>,
}

impl Connection {
    async fn run(
        self,
        inbound: Streaming<pb::AgentMessage>,
        tx: Outbound,
        close_rx: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        let delivery = tokio::spawn(this.clone().deliver(tx.clone()));
        let ended = this.read(inbound, close_rx).await;
        delivery.abort();
        let _ = delivery.await;
        this.clean_up(&ended).await;
        // Tell the agent why, so it can tell "go elsewhere" from "someone else is you".
        let status = match &ended {
            Ended::Superseded => Some(Status::aborted(
                "superseded by a newer connection of this agent",
            )),
            Ended::Silent(d) => Some(Status::unavailable(format!(
                "no message from the agent for {d:?}"
            ))),
            Ended::Shutdown => Some(Status::unavailable("dispatcher shutting down; reconnect")),
            Ended::AgentClosed | Ended::StreamError(_) => None,
        };
        if let Some(status) = status {
            let _ = tx.try_send(Err(status));
        }
        // Dropping the last sender ends the response stream; the agent reconnects.
        drop(tx);
    }

    /// Claims deliverable commands whenever woken (notification, a result freeing the
    /// window, or the poll interval) and pushes them, up to `max_in_flight` outstanding.
    async fn deliver(self: Arc<Self>, tx: Outbound) {
        let max = self.shared.config.max_in_flight as usize;
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let free = max.saturating_sub(self.in_flight_len());
            if free > 0 {
                let params = ClaimParams {
                    agent_id: &self.agent_id,
                    owner: &self.owner,
                    limit: free as i64,
                    epoch: Some(self.epoch),
                };
                match self.shared.queue.command_claim(params).await {
                    Ok(batch) => {
                        for cmd in &batch.commands {
                            self.lock_in_flight().insert(cmd.command_id.to_string());
                            tracing::debug!(agent_id = %self.agent_id, command_id = %cmd.command_id, attempt = cmd.attempts, "delivering");
                            let msg = pb::DispatcherMessage {
                                msg: Some(dispatcher_message::Msg::Command(
                                    convert::command_to_proto(cmd),
                                )),
                            };
                            if tx.send(Ok(msg)).await.is_err() {
                                return; // the stream is gone; clean-up releases the leases
                            }
                        }
                        // A quarantined row is terminal now, so the command behind it in
                        // its session may have become deliverable: look again at once.
                        if !batch.quarantined.is_empty() {
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::error!(agent_id = %self.agent_id, error = %e, "claim failed")
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.shared.config.poll_interval()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Reads the agent's messages until the stream ends, the agent falls silent, the
    /// connection is superseded, or the dispatcher shuts down. Reports that arrive together
    /// are applied together.
    async fn read(
        &self,
        mut inbound: Streaming<pb::AgentMessage>,
        mut close_rx: watch::Receiver<bool>,
    ) -> Ended {
        let silence = self.shared.config.offline_after();
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            let first = tokio::select! {
                r = tokio::time::timeout(silence, inbound.message()) => r,
                _ = close_rx.wait_for(|c| *c) => return Ended::Superseded,
                _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
            };
            let first = match first {
                Err(_) => return Ended::Silent(silence),
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => return Ended::AgentClosed,
                Ok(Err(status)) => return Ended::StreamError(status),
            };
            let mut batch = vec![first];
            while batch.len() < MAX_REPORT_BATCH {
                match inbound.message().now_or_never() {
                    Some(Ok(Some(m))) => batch.push(m),
                    _ => break,
                }
            }
            if let Err(ended) = self.apply(batch).await {
                return ended;
            }
        }
    }

    async fn apply(&self, batch: Vec<pb::AgentMessage>) -> Result<(), Ended> {
        let mut acks = Vec::new();
        let mut completions = Vec::new();
        let mut failures = Vec::new();
        let mut observations = Vec::new();
        let mut heartbeat = false;
        for m in batch {
            match m.msg {
                Some(Msg::Ack(a)) => {
                    if let Some(lease) = self.lease(&a.command_id, a.lease_token) {
                        acks.push(lease);
                    }
                }
                Some(Msg::Result(r)) => {
                    let Some(lease) = self.lease(&r.command_id, r.lease_token) else {
                        continue;
                    };
                    match r.outcome {
                        Some(pb::command_result::Outcome::Completed(c)) => {
                            if let Some(o) = c.session.as_ref().and_then(convert::observation) {
                                observations.push(o);
                            }
                            completions.push(Completion {
                                lease,
                                result: convert::completion_details(&c),
                            });
                        }
                        Some(pb::command_result::Outcome::Failed(f)) => {
                            failures.push(Failure {
                                lease,
                                message: f.message,
                                retryable: f.retryable,
                            });
                        }
                        None => {
                            tracing::warn!(agent_id = %self.agent_id, command_id = %r.command_id, "result without an outcome ignored");
                        }
                    }
                }
                Some(Msg::Heartbeat(h)) => {
                    heartbeat = true;
                    observations.extend(h.sessions.iter().filter_map(convert::observation));
                }
                Some(Msg::SessionStatus(s)) => {
                    observations.extend(s.session.as_ref().and_then(convert::observation));
                }
                Some(Msg::Hello(_)) => {
                    tracing::warn!(agent_id = %self.agent_id, "repeated Hello ignored");
                }
                None => {}
            }
        }
        let queue = &self.shared.queue;
        let pool = queue.pool();
        let log_err = |what: &str, e: streamspace_core::Error| {
            tracing::error!(agent_id = %self.agent_id, error = %e, "applying {what} failed");
        };
        if heartbeat {
            match agents::agent_heartbeat(pool, &self.agent_id, self.epoch).await {
                Ok(true) => {
                    if let Err(e) = queue.command_lease_extend(&self.owner).await {
                        log_err("lease renewal", e);
                    }
                }
                Ok(false) => return Err(Ended::Superseded),
                Err(e) => log_err("heartbeat", e),
            }
        }
        if !acks.is_empty() {
            match queue.command_ack(&acks).await {
                Ok(out) => self.log_rejections("ack", out),
                Err(e) => log_err("acks", e),
            }
        }
        let finished: Vec<String> = completions
            .iter()
            .map(|c| c.lease.command_id.to_string())
            .chain(failures.iter().map(|f| f.lease.command_id.to_string()))
            .collect();
        if !completions.is_empty() {
            match queue.command_complete(&completions).await {
                Ok(out) => self.log_rejections("completion", out),
                Err(e) => log_err("completions", e),
            }
        }
        if !failures.is_empty() {
            match queue.command_fail(&failures).await {
                Ok(out) => {
                    for (id, outcome) in out {
                        match outcome {
                            FailureOutcome::Retrying { next_attempt_at } => {
                                tracing::info!(agent_id = %self.agent_id, command_id = %id, %next_attempt_at, "command failed; will retry")
                            }
                            FailureOutcome::Failed => {
                                tracing::warn!(agent_id = %self.agent_id, command_id = %id, "command failed")
                            }
                            FailureOutcome::Duplicate => {}
                            FailureOutcome::Rejected(r) => {
                                tracing::info!(agent_id = %self.agent_id, command_id = %id, current = ?r.current, "failure report under a stale lease ignored")
                            }
                        }
                    }
                }
                Err(e) => log_err("failures", e),
            }
        }
        if !observations.is_empty()
            && let Err(e) = sessions::session_observe(pool, &self.agent_id, &observations).await
        {
            log_err("session observations", e);
        }
        if !finished.is_empty() {
            let mut in_flight = self.lock_in_flight();
            for id in &finished {
                in_flight.remove(id);
            }
            drop(in_flight);
            // The window has room again, and the next command of each session may now be
            // deliverable.
            self.wake.notify_one();
        }
        Ok(())
    }

    fn lease(&self, command_id: &str, token: i64) -> Option<Lease> {
        match command_id.parse::<CommandId>() {
            Ok(command_id) => Some(Lease { command_id, token }),
            Err(e) => {
                tracing::warn!(agent_id = %self.agent_id, error = %e, "report with an invalid command id ignored");
                None
            }
        }
    }

    fn log_rejections(&self, what: &str, outcomes: Vec<(CommandId, Outcome)>) {
        for (id, outcome) in outcomes {
            if let Outcome::Rejected(r) = outcome {
                tracing::info!(agent_id = %self.agent_id, command_id = %id, current = ?r.current, "{what} under a stale lease ignored");
            }
        }
    }

    async fn clean_up(&self, ended: &Ended) {
        let agent_id = &self.agent_id;
        match ended {
            Ended::Silent(d) => tracing::warn!(
                agent_id,
                epoch = self.epoch,
                "agent silent for {d:?}; closing its stream"
            ),
            Ended::StreamError(s) => {
                tracing::info!(agent_id, epoch = self.epoch, status = %s, "agent stream failed")
            }
            other => {
                tracing::info!(agent_id, epoch = self.epoch, reason = ?other, "agent connection ended")
            }
        }
        self.shared.registry.unregister(agent_id, self.epoch);
        let pool = self.shared.queue.pool();
        if let Err(e) = agents::agent_disconnect(pool, agent_id, self.epoch).await {
            tracing::error!(agent_id, error = %e, "recording the disconnect failed");
        }
        match self.shared.queue.command_release_owner(&self.owner).await {
            Ok(r) if !r.requeued.is_empty() || !r.failed.is_empty() => {
                tracing::info!(
                    agent_id,
                    requeued = r.requeued.len(),
                    failed = r.failed.len(),
                    "released the connection's leases"
                )
            }
            Ok(_) => {}
            // The leases expire and are rescued instead.
            Err(e) => {
                tracing::error!(agent_id, error = %e, "releasing leases failed; they will be rescued on expiry")
            }
        }
    }

    fn in_flight_len(&self) -> usize {
        self.lock_in_flight().len()
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Single inserts/removes only: a poisoned set is still consistent.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}
