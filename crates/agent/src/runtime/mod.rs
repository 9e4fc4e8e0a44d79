//! The seam between the agent and whatever actually runs sessions: the [`SessionRuntime`]
//! trait, the [`Observation`] it reports, and its error type.
//!
//! The agent's executor calls a runtime one command at a time per session (never two
//! operations on the same session concurrently from the executor), but runtimes must still
//! be safe to call concurrently and every operation must be idempotent: the dispatcher
//! delivers at least once, and the agent's own memory of finished commands is bounded, so
//! a runtime is the last line of defence against doubled effects.

pub mod faulty;
pub mod journal;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod process;
mod procfs;
pub mod record;

use std::fmt;

use streamspace_core::command::{HibernateSession, StartSession, StopSession, WakeSession};
use streamspace_proto::agent::v1 as proto;
use tokio::sync::broadcast;

/// Runtimes implement [`SessionRuntime`] with this attribute, so the trait stays
/// object-safe (`Arc<dyn SessionRuntime>`). It is the `async-trait` crate, re-exported by
/// tonic; re-exporting it here spares implementors (and the workspace) another dependency.
pub use tonic::async_trait;

#[cfg(feature = "kubernetes")]
pub use kubernetes::{
    BASELINE_CAPABILITIES, KubeTemplate, KubernetesConfig, KubernetesRuntime, SecurityProfile,
};
pub use process::{Catalog, Effects, ProcessRuntime, ProcessRuntimeConfig, Template};
pub use record::RecordRuntime;

/// Where a session stands, as its runtime sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Created, not yet ready to serve.
    Starting,
    /// Ready: its URL answers.
    Running,
    /// Kept, but consuming no compute (scaled to zero, or stopped with SIGSTOP).
    Hibernated,
    /// Gone (or never existed).
    Stopped,
    /// Died or could not be made ready; [`Observation::message`] says why.
    Failed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Running => "running",
            SessionState::Hibernated => "hibernated",
            SessionState::Stopped => "stopped",
            SessionState::Failed => "failed",
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SessionState> for proto::SessionState {
    fn from(state: SessionState) -> Self {
        match state {
            SessionState::Starting => proto::SessionState::Starting,
            SessionState::Running => proto::SessionState::Running,
            SessionState::Hibernated => proto::SessionState::Hibernated,
            SessionState::Stopped => proto::SessionState::Stopped,
            SessionState::Failed => proto::SessionState::Failed,
        }
    }
}

/// What a runtime observed about one session at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub session_id: String,
    pub state: SessionState,
    /// Where the session answers, once it has an address.
    pub url: Option<String>,
    /// Human-readable detail, e.g. why it failed.
    pub message: Option<String>,
}

impl Observation {
    pub fn new(session_id: impl Into<String>, state: SessionState) -> Self {
        Self {
            session_id: session_id.into(),
            state,
            url: None,
            message: None,
        }
    }

    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

impl From<Observation> for proto::SessionObservation {
    fn from(obs: Observation) -> Self {
        proto::SessionObservation {
            session_id: obs.session_id,
            state: proto::SessionState::from(obs.state) as i32,
            url: obs.url.unwrap_or_default(),
            message: obs.message.unwrap_or_default(),
        }
    }
}

/// Why a runtime operation did not take effect, and whether trying again may help.
///
/// `retryable` is reported to the dispatcher as-is: `true` for conditions that may pass
/// (a timeout, a conflict, an API server hiccup), `false` for ones that will not (an
/// unknown template, an invalid session id).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RuntimeError {
    pub message: String,
    pub retryable: bool,
}

impl RuntimeError {
    /// A failure that trying again may cure.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that will happen again, however often it is tried.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// Runs sessions: the agent's only way to create, stop, hibernate and wake them.
///
/// Contract for implementors:
/// - **Idempotent.** `start` is create-or-get (a running session is returned as it is);
///   `stop` is delete-if-exists (an unknown session is `Ok` with state `Stopped`);
///   `hibernate` of a hibernated session and `wake` of a running one are `Ok` without effect.
/// - **Truthful results.** The returned [`Observation`] is what the runtime saw after the
///   operation took effect; it is what the dispatcher records.
/// - **Own changes only on [`subscribe`](Self::subscribe).** Changes the runtime notices on
///   its own (a process died, a pod was evicted) are published there; results of the
///   operations above are not (the caller already has them).
/// - **Cancellation-tolerant.** The agent may drop an operation's future at shutdown; a
///   runtime must not be left in a state that the next call cannot repair.
#[async_trait]
pub trait SessionRuntime: fmt::Debug + Send + Sync + 'static {
    /// Short name sent in `Hello.runtime`: `"process"`, `"kubernetes"` or `"record"`.
    fn name(&self) -> &'static str;

    /// Extra capabilities advertised in `Hello` (e.g. `template:firefox-browser`).
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }

    /// Creates the session from `spec`, or returns it as it is when it already exists.
    async fn start(
        &self,
        session_id: &str,
        spec: &StartSession,
    ) -> Result<Observation, RuntimeError>;

    /// Removes the session if it exists; `Ok` with state `Stopped` either way.
    async fn stop(&self, session_id: &str, spec: &StopSession)
    -> Result<Observation, RuntimeError>;

    /// Keeps the session but stops it consuming compute.
    async fn hibernate(
        &self,
        session_id: &str,
        spec: &HibernateSession,
    ) -> Result<Observation, RuntimeError>;

    /// Brings a hibernated session back and waits until it is ready.
    async fn wake(&self, session_id: &str, spec: &WakeSession)
    -> Result<Observation, RuntimeError>;

    /// Every session this runtime runs now (the inventory sent in `Hello` and heartbeats).
    async fn list(&self) -> Result<Vec<Observation>, RuntimeError>;

    /// Changes observed on the runtime's own initiative, as they are seen. A receiver that
    /// lags loses events; the agent then relies on the next heartbeat's full inventory.
    fn subscribe(&self) -> broadcast::Receiver<Observation>;
}
