//! The agent: keeps one `AgentService.Connect` stream to the dispatcher up (reconnecting
//! forever), and wires it to the [`Executor`] and the [`SessionRuntime`].
//!
//! Per connection: `Hello` is queued before the call is made, so it is the stream's first
//! message; the dispatcher's `Welcome` must follow within the connect timeout. Everything
//! the agent sends goes through one bounded channel whose receiver *is* the request
//! stream, so HTTP/2 flow control is the backpressure and no two tasks write the stream.
//! Heartbeats and runtime events run in their own tasks, so neither a long command nor a
//! slow read delays them.

use std::sync::Arc;
use std::time::Duration;

use streamspace_core::config::Secret;
use streamspace_proto::agent::v1 as proto;
use streamspace_proto::agent::v1::PROTOCOL_VERSION;
use streamspace_proto::agent::v1::agent_message::Msg;
use streamspace_proto::agent::v1::agent_service_client::AgentServiceClient;
use streamspace_proto::agent::v1::dispatcher_message::Msg as Inbound;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, RuntimeKind};
use crate::error::{Error, Result};
use crate::executor::Executor;
#[cfg(feature = "kubernetes")]
use crate::runtime::KubernetesRuntime;
use crate::runtime::faulty::{FaultyRuntime, Op as FaultOp, Schedule};
use crate::runtime::{Observation, ProcessRuntime, RecordRuntime, SessionRuntime};

/// Messages queued for the writer before `send` waits. Small: beyond it, HTTP/2 flow
/// control should slow the producers down rather than memory absorbing a stalled peer.
const OUTBOUND_BUFFER: usize = 256;
/// Heartbeat interval used when `Welcome` carries none.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Largest message accepted from the dispatcher.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// At shutdown, how long to wait for the dispatcher to end its side after ours closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the agent has a live, welcomed stream. Watch it with [`Agent::connection`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Dialling, or waiting to redial; `last_error` says why the previous attempt ended.
    Disconnected { last_error: Option<String> },
    /// Welcomed by the dispatcher.
    Connected(Connected),
    /// `run` returned (shutdown).
    Stopped,
}

/// What the dispatcher's `Welcome` said about the current connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connected {
    pub agent_id: String,
    /// The dispatcher's connection epoch: grows with every accepted connection.
    pub epoch: i64,
    /// Welcomed connections of this agent process so far, this one included.
    pub connections: u64,
    pub heartbeat_interval: Duration,
    pub max_in_flight: u32,
}

impl ConnectionState {
    pub fn connected(&self) -> Option<&Connected> {
        match self {
            ConnectionState::Connected(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected().is_some()
    }
}

/// The agent. Build it with [`Agent::new`] (any runtime) or [`Agent::build`] (the runtime
/// the configuration names), then [`run`](Agent::run) it or [`spawn`](Agent::spawn) it.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    runtime: Arc<dyn SessionRuntime>,
    executor: Executor,
    state: watch::Sender<ConnectionState>,
    endpoint: Endpoint,
    /// `Bearer <credential>`; wrapped so that debug output never shows it.
    authorization: Secret<MetadataValue<Ascii>>,
}

impl Agent {
    /// An agent that executes commands through `runtime`. Validates `config`.
    pub fn new(config: AgentConfig, runtime: Arc<dyn SessionRuntime>) -> Result<Self> {
        config.validate()?;
        let endpoint = endpoint(&config)?;
        let authorization = format!("Bearer {}", config.credential.expose())
            .parse()
            .map(Secret::new)
            .map_err(|_| Error::Config("credential is not a valid header value".into()))?;
        let executor = Executor::new(runtime.clone(), config.remembered_commands)
            .with_execution_log(&config.state_dir);
        let (state, _) = watch::channel(ConnectionState::Disconnected { last_error: None });
        Ok(Self {
            config,
            runtime,
            executor,
            state,
            endpoint,
            authorization,
        })
    }

    /// An agent with the runtime `config.runtime` names (opening its state directory and
    /// adopting sessions left by an earlier agent process).
    pub async fn build(config: AgentConfig) -> Result<Self> {
        config.validate()?;
        let runtime: Arc<dyn SessionRuntime> = match config.runtime {
            RuntimeKind::Process => {
                Arc::new(ProcessRuntime::open(config.process_runtime_config()).await?)
            }
            #[cfg(feature = "kubernetes")]
            RuntimeKind::Kubernetes => {
                Arc::new(KubernetesRuntime::connect(&config.kubernetes).await?)
            }
            // `validate` refuses it already; kept for the match to be exhaustive.
            #[cfg(not(feature = "kubernetes"))]
            RuntimeKind::Kubernetes => return Err(crate::config::built_without_kubernetes()),
            RuntimeKind::Record => {
                tracing::warn!(
                    "runtime \"record\": sessions are only remembered, nothing runs (benchmarks only)"
                );
                Arc::new(RecordRuntime::new())
            }
        };
        let rate = config.fault_injection.runtime_failure_rate;
        let runtime: Arc<dyn SessionRuntime> = if rate > 0.0 {
            tracing::warn!(
                runtime_failure_rate = rate,
                "FAULT INJECTION ON: runtime calls fail on purpose (chaos runs only)"
            );
            let faulty = FaultyRuntime::new(runtime);
            for op in FaultOp::ALL {
                faulty.set(op, Schedule::Probability(rate), true);
            }
            Arc::new(faulty)
        } else {
            runtime
        };
        Self::new(config, runtime)
    }

    /// Follows the connection state; use it to wait until the agent is connected.
    pub fn connection(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    pub fn runtime(&self) -> Arc<dyn SessionRuntime> {
        self.runtime.clone()
    }

    /// Runs [`run`](Agent::run) on a task, for tests and embedders.
    pub fn spawn(self) -> RunningAgent {
        let (stop, stop_rx) = watch::channel(false);
        let connection = self.connection();
        let runtime = self.runtime();
        RunningAgent {
            stop,
            connection,
            runtime,
            task: tokio::spawn(self.run(stop_rx)),
        }
    }

    /// Dials, serves and redials until `shutdown` becomes true (or its sender is dropped).
    /// Then it stops dialling, lets running commands finish for `shutdown_grace_ms` and
    /// report, and closes the stream cleanly. Sessions keep running.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut backoff = Backoff::new(self.config.reconnect_base(), self.config.reconnect_cap());
        let mut connections = 0u64;
        tracing::info!(dispatcher = %self.config.dispatcher_url, runtime = self.runtime.name(), "agent starting");
        if let Some(addr) = self.config.metrics_listen {
            let _ = streamspace_core::telemetry::metrics_handle();
            match crate::metrics::serve(addr, shutdown.clone()).await {
                Ok(bound) => tracing::info!(%bound, "serving /metrics"),
                Err(e) => {
                    return Err(crate::error::Error::Config(format!(
                        "metrics_listen {addr}: cannot listen: {e}"
                    )));
                }
            }
        }
        let alive = tokio::spawn(crate::liveness::keep_alive(
            self.config.state_dir.clone(),
            Duration::from_millis(self.config.liveness_interval_ms),
        ));
        loop {
            if stop_requested(&shutdown) {
                break;
            }
            let ended = self.serve_connection(&mut shutdown, &mut connections).await;
            if ended.stopping {
                break;
            }
            let delay = if ended.rejected {
                tracing::error!(reason = %ended.reason, retry_in_ms = backoff.cap().as_millis() as u64,
                    "the dispatcher rejected this agent's credential; retrying at the cap interval until an operator fixes it");
                backoff.cap()
            } else {
                // A superseded stream keeps backing off: resetting would make two
                // processes sharing one credential take the stream from each other
                // in a tight loop.
                if ended.superseded {
                    tracing::error!(
                        "another connection of this agent took over; is a second process using the same credential?"
                    );
                } else if ended.welcomed {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(reason = %ended.reason, retry_in_ms = delay.as_millis() as u64, "disconnected from the dispatcher");
                delay
            };
            self.state.send_replace(ConnectionState::Disconnected {
                last_error: Some(ended.reason),
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wait_for_stop(&mut shutdown) => break,
            }
        }
        alive.abort();
        self.state.send_replace(ConnectionState::Stopped);
        tracing::info!("agent stopped");
        Ok(())
    }

    /// One connection, from dial to close.
    async fn serve_connection(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        connections: &mut u64,
    ) -> Ended {
        let dial = async {
            // TLS files are read again on every dial, so a renewed client certificate
            // (cert-manager rotates them) is presented without a restart. Unreadable now:
            // the ones read before.
            let endpoint = if self.config.dispatcher_url.starts_with("https://") {
                endpoint(&self.config).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "re-reading the TLS files failed; using the previous ones");
                    self.endpoint.clone()
                })
            } else {
                self.endpoint.clone()
            };
            let channel = endpoint.connect().await.map_err(|e| {
                Ended::failed(format!("cannot reach the dispatcher: {}", error_chain(&e)))
            })?;
            self.open_stream(channel).await
        };
        let (outbound, mut inbound, welcome) = tokio::select! {
            r = dial => match r {
                Ok(opened) => opened,
                Err(ended) => return ended,
            },
            _ = wait_for_stop(shutdown) => return Ended::stopping(),
        };

        *connections += 1;
        let heartbeat_interval = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT_INTERVAL,
            ms => Duration::from_millis(ms.into()),
        };
        let connected = Connected {
            agent_id: welcome.agent_id.clone(),
            epoch: welcome.connection_epoch,
            connections: *connections,
            heartbeat_interval,
            max_in_flight: welcome.max_in_flight,
        };
        tracing::info!(agent_id = %connected.agent_id, epoch = connected.epoch, heartbeat_ms = heartbeat_interval.as_millis() as u64,
            max_in_flight = connected.max_in_flight, "connected to the dispatcher");
        self.executor
            .attach(outbound.sender.clone(), &connected.agent_id);
        self.state
            .send_replace(ConnectionState::Connected(connected));
        crate::metrics::set_connected(true);

        let ping = Arc::new(Notify::new());
        let helpers = [
            tokio::spawn(heartbeats(
                outbound.sender.clone(),
                self.runtime.clone(),
                self.executor.clone(),
                heartbeat_interval,
                ping.clone(),
            )),
            tokio::spawn(forward_events(
                outbound.sender.clone(),
                outbound.events,
                ping.clone(),
            )),
        ];

        let mut ended = loop {
            tokio::select! {
                biased;
                _ = wait_for_stop(shutdown) => break Ended::stopping(),
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => self.handle(msg, &outbound.sender, &ping).await,
                    Ok(None) => break Ended::failed("the dispatcher closed the stream".into()),
                    Err(status) => break Ended::from_status(&status),
                },
            }
        };
        ended.welcomed = true;
        crate::metrics::set_connected(false);

        if ended.stopping {
            // Running commands finish and queue their results while the stream is still
            // open; commands not yet started are left for redelivery.
            self.executor.drain(self.config.shutdown_grace()).await;
        }
        self.executor.detach();
        for helper in helpers {
            helper.abort();
            let _ = helper.await;
        }
        // Dropping the last sender ends the request stream: a clean close the dispatcher
        // sees at once, releasing the leases this connection still holds.
        drop(outbound.sender);
        if ended.stopping {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        }
        ended
    }

    /// Queues `Hello`, makes the call with the credential, and waits for `Welcome`.
    async fn open_stream(
        &self,
        channel: Channel,
    ) -> Result<
        (
            Outbound,
            Streaming<proto::DispatcherMessage>,
            proto::Welcome,
        ),
        Ended,
    > {
        let (sender, receiver) = mpsc::channel(OUTBOUND_BUFFER);
        // Subscribed before the inventory is taken, so no change falls between the two.
        let events = self.runtime.subscribe();
        // Unknown is not empty: a failed listing says so, and the dispatcher then changes
        // no session state (an empty list would read as "every session was lost").
        let (inventory, inventory_unknown) = match self.runtime.list().await {
            Ok(sessions) => (sessions, false),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list sessions; Hello says the inventory is unknown");
                (Vec::new(), true)
            }
        };
        let mut capabilities: Vec<String> = streamspace_core::Action::ALL
            .iter()
            .map(|a| a.as_str().to_owned())
            .collect();
        capabilities.push(streamspace_proto::agent::v1::PIPELINE_CAPABILITY.to_owned());
        capabilities.extend(self.runtime.capabilities());
        let hello = proto::Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            capabilities,
            sessions: inventory.iter().cloned().map(Into::into).collect(),
            runtime: self.runtime.name().to_owned(),
            inventory_unknown,
            commands_in_progress: self.executor.held_commands(),
        };
        // The channel is empty and its receiver alive: this cannot fail.
        let _ = sender.try_send(message(Msg::Hello(hello)));

        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        request
            .metadata_mut()
            .insert("authorization", self.authorization.expose().clone());
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let timeout = self.config.connect_timeout();
        let handshake = async {
            let mut inbound = client
                .connect(request)
                .await
                .map_err(|s| Ended::from_status(&s))?
                .into_inner();
            match inbound.message().await {
                Ok(Some(proto::DispatcherMessage {
                    msg: Some(Inbound::Welcome(welcome)),
                })) => Ok((inbound, welcome)),
                Ok(Some(other)) => Err(Ended::failed(format!(
                    "protocol violation: expected Welcome first, got {other:?}"
                ))),
                Ok(None) => Err(Ended::failed(
                    "the dispatcher closed the stream before Welcome".into(),
                )),
                Err(status) => Err(Ended::from_status(&status)),
            }
        };
        let (inbound, welcome) =
            tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| {
                    Ended::failed(format!("no Welcome within {} ms", timeout.as_millis()))
                })??;
        if welcome.protocol_version != 0 && welcome.protocol_version != PROTOCOL_VERSION {
            return Err(Ended::failed(format!(
                "the dispatcher speaks protocol version {}, this agent {PROTOCOL_VERSION}",
                welcome.protocol_version
            )));
        }
        Ok((Outbound { sender, events }, inbound, welcome))
    }

    async fn handle(
        &self,
        msg: proto::DispatcherMessage,
        outbound: &mpsc::Sender<proto::AgentMessage>,
        ping: &Notify,
    ) {
        match msg.msg {
            Some(Inbound::Command(cmd)) => {
                tracing::debug!(command_id = %cmd.command_id, action = %cmd.action, attempt = cmd.attempt, "command received");
                self.executor.deliver(cmd, outbound).await;
            }
            Some(Inbound::Cancel(cancel)) => {
                if let Some(result) = self.executor.on_cancel(&cancel) {
                    let _ = outbound.send(result).await;
                }
            }
            // Answered by the heartbeat task, with the inventory, at once.
            Some(Inbound::Ping(_)) => ping.notify_one(),
            Some(Inbound::Welcome(_)) => tracing::warn!("ignoring a second Welcome"),
            None => tracing::debug!("ignoring an empty dispatcher message"),
        }
    }
}

/// An agent running on its own task, returned by [`Agent::spawn`].
#[derive(Debug)]
pub struct RunningAgent {
    stop: watch::Sender<bool>,
    connection: watch::Receiver<ConnectionState>,
    runtime: Arc<dyn SessionRuntime>,
    task: JoinHandle<Result<()>>,
}

impl RunningAgent {
    pub fn connection(&self) -> watch::Receiver<ConnectionState> {
        self.connection.clone()
    }

    pub fn runtime(&self) -> Arc<dyn SessionRuntime> {
        self.runtime.clone()
    }

    /// Waits until the agent has a welcomed connection whose epoch is above `after`
    /// (`None`: any), and returns it. Errors when the agent stopped first.
    pub async fn wait_connected(&mut self, after: Option<i64>) -> Result<Connected> {
        let state = self
            .connection
            .wait_for(|s| {
                matches!(s, ConnectionState::Stopped)
                    || s.connected()
                        .is_some_and(|c| after.is_none_or(|e| c.epoch > e))
            })
            .await
            .map_err(|_| Error::Stopped)?;
        state.connected().cloned().ok_or(Error::Stopped)
    }

    /// Asks the agent to stop and waits for it.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.map_err(|e| Error::Task(e.to_string()))?
    }
}

/// The writer side of one connection.
struct Outbound {
    sender: mpsc::Sender<proto::AgentMessage>,
    events: broadcast::Receiver<Observation>,
}

/// Why a connection ended.
#[derive(Debug)]
struct Ended {
    reason: String,
    /// The dispatcher refused the credential.
    rejected: bool,
    /// A `Welcome` was received, so the backoff starts over.
    welcomed: bool,
    /// Shutdown was requested.
    stopping: bool,
    /// The dispatcher closed the stream because a newer connection of this agent took
    /// over (`ABORTED`): most likely another process runs with the same credential.
    superseded: bool,
}

impl Ended {
    fn failed(reason: String) -> Self {
        Self {
            reason,
            rejected: false,
            welcomed: false,
            stopping: false,
            superseded: false,
        }
    }

    fn stopping() -> Self {
        Self {
            stopping: true,
            ..Self::failed("shutting down".into())
        }
    }

    fn from_status(status: &Status) -> Self {
        Self {
            rejected: matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            superseded: status.code() == Code::Aborted,
            ..Self::failed(format!("{:?}: {}", status.code(), status.message()))
        }
    }
}

fn message(msg: Msg) -> proto::AgentMessage {
    proto::AgentMessage { msg: Some(msg) }
}

fn stop_requested(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Resolves once shutdown is requested; a dropped sender counts as a request, so an
/// embedder that forgets its handle does not leave an agent running forever.
async fn wait_for_stop(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sends a heartbeat every `interval`, and at once whenever `ping` is notified.
async fn heartbeats(
    outbound: mpsc::Sender<proto::AgentMessage>,
    runtime: Arc<dyn SessionRuntime>,
    executor: Executor,
    interval: Duration,
    ping: Arc<Notify>,
) {
    // The first tick is one interval out: `Hello` just carried the inventory.
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = ping.notified() => {}
        }
        let mark = executor.finish_mark();
        let (sessions, inventory_unknown) = match runtime.list().await {
            // Without the sessions whose command finished while listing: the result already
            // sent says where they stand, and this listing may be older.
            Ok(listed) => (executor.fresh_inventory(listed, mark), false),
            // Liveness only; neither an empty nor a repeated old inventory, both of which
            // would be read as observations.
            Err(e) => {
                tracing::warn!(error = %e, "cannot list sessions; heartbeat says the inventory is unknown");
                (Vec::new(), true)
            }
        };
        let heartbeat = proto::Heartbeat {
            sessions: sessions.into_iter().map(Into::into).collect(),
            commands_in_progress: executor.in_progress(),
            inventory_unknown,
        };
        if outbound
            .send(message(Msg::Heartbeat(heartbeat)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Sends each change the runtime observed on its own as `SessionStatus`, as it is seen.
async fn forward_events(
    outbound: mpsc::Sender<proto::AgentMessage>,
    mut events: broadcast::Receiver<Observation>,
    ping: Arc<Notify>,
) {
    loop {
        match events.recv().await {
            Ok(obs) => {
                tracing::info!(session_id = %obs.session_id, state = %obs.state, message = obs.message.as_deref().unwrap_or(""), "session status changed");
                let status = proto::SessionStatus {
                    session: Some(obs.into()),
                };
                if outbound
                    .send(message(Msg::SessionStatus(status)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Some changes were lost; a heartbeat now carries the full truth.
                tracing::warn!(missed, "session events lagged; sending a full inventory");
                ping.notify_one();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn endpoint(config: &AgentConfig) -> Result<Endpoint> {
    let keepalive = Duration::from_millis(config.keepalive_interval_ms);
    let mut endpoint = Endpoint::from_shared(config.dispatcher_url.clone())
        .map_err(|e| Error::Config(format!("dispatcher_url {:?}: {e}", config.dispatcher_url)))?
        .connect_timeout(config.connect_timeout())
        // HTTP/2 PINGs, also while no stream is active, notice a black-holed peer that
        // TCP alone would take many minutes to give up on.
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(Duration::from_millis(config.keepalive_timeout_ms))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(keepalive))
        .tcp_nodelay(true);
    if config.dispatcher_url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls_config(config)?)
            .map_err(|e| Error::Config(format!("dispatcher TLS: {e}")))?;
    }
    Ok(endpoint)
}

/// Server verification against the configured CA (else the WebPKI roots), plus the
/// agent's own certificate when mutual TLS is configured. Read at start-up (a missing file
/// fails it) and again before every dial.
fn tls_config(config: &AgentConfig) -> Result<ClientTlsConfig> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| Error::io(path, e));
    let mut tls = ClientTlsConfig::new();
    tls = match &config.tls_ca_file {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// A transport error with its causes, which tonic keeps in `source()`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Some layers already include their cause in their own message.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
