//! A [`SessionRuntime`] wrapper that makes chosen calls of a real runtime fail, for fault
//! injection in tests and chaos runs: a transient Kubernetes 429/5xx, a listing that times
//! out during a reconnect, a start that fails once. Calls that are not failed go to the
//! wrapped runtime unchanged, so effects stay real.
//!
//! Not for production: only the agent's `fault_injection` setting (chaos runs) builds
//! one, and the agent then logs a warning at start-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;
use streamspace_core::command::{HibernateSession, StartSession, StopSession, WakeSession};
use tokio::sync::broadcast;

use super::{Observation, RuntimeError, SessionRuntime, async_trait};

/// A runtime operation that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Start,
    Stop,
    Hibernate,
    Wake,
    List,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Start, Op::Stop, Op::Hibernate, Op::Wake, Op::List];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Hibernate => "hibernate",
            Op::Wake => "wake",
            Op::List => "list",
        }
    }
}

/// When an operation fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Never,
    /// The next `n` calls fail, then calls pass again.
    Next(u32),
    Always,
    /// Each call fails with this probability (0.0–1.0).
    Probability(f64),
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    schedule: Schedule,
    retryable: bool,
}

#[derive(Debug, Default)]
struct State {
    plans: HashMap<Op, Plan>,
    calls: HashMap<Op, u64>,
    injected: HashMap<Op, u64>,
}

/// The wrapper. Cheap to share (`Arc`); faults can be changed while it runs.
#[derive(Debug)]
pub struct FaultyRuntime {
    inner: Arc<dyn SessionRuntime>,
    state: Mutex<State>,
}

impl FaultyRuntime {
    pub fn new(inner: Arc<dyn SessionRuntime>) -> Self {
        Self {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// From now on, `op` fails per `schedule`, with a retryable or permanent error.
    pub fn set(&self, op: Op, schedule: Schedule, retryable: bool) {
        self.lock().plans.insert(
            op,
            Plan {
                schedule,
                retryable,
            },
        );
    }

    /// The next `n` calls of `op` fail retryably.
    pub fn fail_next(&self, op: Op, n: u32) {
        self.set(op, Schedule::Next(n), true);
    }

    /// `op` passes through again.
    pub fn heal(&self, op: Op) {
        self.set(op, Schedule::Never, true);
    }

    /// Calls of `op` so far, failed ones included.
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Calls of `op` failed by this wrapper so far.
    pub fn injected(&self, op: Op) -> u64 {
        self.lock().injected.get(&op).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the call and decides whether it fails.
    fn check(&self, op: Op) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        *state.calls.entry(op).or_default() += 1;
        let Some(plan) = state.plans.get_mut(&op) else {
            return Ok(());
        };
        let fail = match &mut plan.schedule {
            Schedule::Never => false,
            Schedule::Always => true,
            Schedule::Next(0) => false,
            Schedule::Next(n) => {
                *n -= 1;
                true
            }
            Schedule::Probability(p) => rand::rng().random_bool(p.clamp(0.0, 1.0)),
        };
        if !fail {
            return Ok(());
        }
        let retryable = plan.retryable;
        *state.injected.entry(op).or_default() += 1;
        let message = format!("injected fault: {} failed", op.as_str());
        tracing::warn!(op = op.as_str(), retryable, "injecting a runtime fault");
        Err(if retryable {
            RuntimeError::retryable(message)
        } else {
            RuntimeError::permanent(message)
        })
    }
}

#[async_trait]
impl SessionRuntime for FaultyRuntime {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Vec<String> {
        self.inner.capabilities()
    }

    async fn start(
        &self,
        session_id: &str,
        spec: &StartSession,
    ) -> Result<Observation, RuntimeError> {
        self.check(Op::Start)?;
        self.inner.start(session_id, spec).await
    }

    async fn stop(
        &self,
        session_id: &str,
        spec: &StopSession,
    ) -> Result<Observation, RuntimeError> {
        self.check(Op::Stop)?;
        self.inner.stop(session_id, spec).await
    }

    async fn hibernate(
        &self,
        session_id: &str,
        spec: &HibernateSession,
    ) -> Result<Observation, RuntimeError> {
        self.check(Op::Hibernate)?;
        self.inner.hibernate(session_id, spec).await
    }

    async fn wake(
        &self,
        session_id: &str,
        spec: &WakeSession,
    ) -> Result<Observation, RuntimeError> {
        self.check(Op::Wake)?;
        self.inner.wake(session_id, spec).await
    }

    async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        self.check(Op::List)?;
        self.inner.list().await
    }

    fn subscribe(&self) -> broadcast::Receiver<Observation> {
        self.inner.subscribe()
    }
}
