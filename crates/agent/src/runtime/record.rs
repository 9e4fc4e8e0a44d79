//! A runtime whose only effect is remembering what it was told: sessions are entries in a
//! map, nothing is spawned or created anywhere.
//!
//! It exists to measure the command pipeline itself (gateway → queue → dispatcher → agent →
//! result) without a `fork` or an API server in every figure: `cargo xtask bench` runs its
//! agents with `runtime = "record"`. Sessions live in the agent's memory only, so an agent
//! that restarts reports none of them (the dispatcher then marks them lost), and nobody can
//! open a session's URL (`record://<id>`). Not for serving users.

use std::collections::HashMap;
use std::sync::Mutex;

use streamspace_core::command::{HibernateSession, StartSession, StopSession, WakeSession};
use tokio::sync::broadcast;

use super::{Observation, RuntimeError, SessionRuntime, SessionState, async_trait};

/// See the module documentation.
#[derive(Debug)]
pub struct RecordRuntime {
    sessions: Mutex<HashMap<String, SessionState>>,
    changes: broadcast::Sender<Observation>,
}

impl Default for RecordRuntime {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            changes: broadcast::channel(16).0,
        }
    }
}

impl RecordRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn observe(session_id: &str, state: SessionState) -> Observation {
        let obs = Observation::new(session_id, state);
        match state {
            SessionState::Running => obs.with_url(format!("record://{session_id}")),
            _ => obs,
        }
    }

    /// Applies `change` to the session's entry under the lock and reports where it stands.
    fn update(
        &self,
        session_id: &str,
        change: impl FnOnce(Option<SessionState>) -> Result<Option<SessionState>, RuntimeError>,
    ) -> Result<Observation, RuntimeError> {
        let mut sessions = self
            .sessions
            .lock()
            .map_err(|_| RuntimeError::permanent("record runtime state poisoned"))?;
        let next = change(sessions.get(session_id).copied())?;
        match next {
            Some(state) => {
                sessions.insert(session_id.to_owned(), state);
                Ok(Self::observe(session_id, state))
            }
            None => {
                sessions.remove(session_id);
                Ok(Self::observe(session_id, SessionState::Stopped))
            }
        }
    }
}

#[async_trait]
impl SessionRuntime for RecordRuntime {
    fn name(&self) -> &'static str {
        "record"
    }

    async fn start(
        &self,
        session_id: &str,
        _spec: &StartSession,
    ) -> Result<Observation, RuntimeError> {
        self.update(session_id, |now| {
            Ok(Some(now.unwrap_or(SessionState::Running)))
        })
    }

    async fn stop(
        &self,
        session_id: &str,
        _spec: &StopSession,
    ) -> Result<Observation, RuntimeError> {
        self.update(session_id, |_| Ok(None))
    }

    async fn hibernate(
        &self,
        session_id: &str,
        _spec: &HibernateSession,
    ) -> Result<Observation, RuntimeError> {
        self.update(session_id, |now| match now {
            Some(_) => Ok(Some(SessionState::Hibernated)),
            None => Err(RuntimeError::permanent(format!(
                "session {session_id} does not exist"
            ))),
        })
    }

    async fn wake(
        &self,
        session_id: &str,
        _spec: &WakeSession,
    ) -> Result<Observation, RuntimeError> {
        self.update(session_id, |now| match now {
            Some(_) => Ok(Some(SessionState::Running)),
            None => Err(RuntimeError::permanent(format!(
                "session {session_id} does not exist"
            ))),
        })
    }

    async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        let sessions = self
            .sessions
            .lock()
            .map_err(|_| RuntimeError::permanent("record runtime state poisoned"))?;
        Ok(sessions
            .iter()
            .map(|(id, state)| Self::observe(id, *state))
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Observation> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn operations_are_idempotent_and_listed() {
        let rt = RecordRuntime::new();
        let start = StartSession {
            template: "any".into(),
            user_id: None,
            resources: None,
            home_volume: false,
            env: Default::default(),
        };
        assert_eq!(
            rt.start("s-1", &start).await.unwrap().state,
            SessionState::Running
        );
        rt.hibernate("s-1", &HibernateSession::default())
            .await
            .unwrap();
        assert_eq!(
            rt.start("s-1", &start).await.unwrap().state,
            SessionState::Hibernated,
            "start of an existing session returns it as it is"
        );
        assert_eq!(rt.list().await.unwrap().len(), 1);
        rt.stop("s-1", &StopSession::default()).await.unwrap();
        assert_eq!(
            rt.stop("s-1", &StopSession::default()).await.unwrap().state,
            SessionState::Stopped
        );
        assert!(rt.list().await.unwrap().is_empty());
        assert!(
            !rt.wake("s-1", &WakeSession::default())
                .await
                .unwrap_err()
                .retryable
        );
    }
}
