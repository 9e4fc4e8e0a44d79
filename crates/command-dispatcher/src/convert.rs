//! Conversions between protocol messages and the core model.

use streamspace_core::Command;
use streamspace_core::sessions::{Observation, ObservedState};
use streamspace_proto::agent::v1 as pb;

/// A leased command as pushed to the agent.
pub fn command_to_proto(cmd: &Command) -> pb::Command {
    pb::Command {
        command_id: cmd.command_id.to_string(),
        session_id: cmd.session_id.clone(),
        action: cmd.kind.action().as_str().to_owned(),
        payload_json: cmd.kind.payload().to_string(),
        lease_token: cmd.lease.as_ref().map_or(0, |l| l.token),
        attempt: u32::try_from(cmd.attempts).unwrap_or(0),
        deadline_unix_ms: cmd.expires_at.map_or(0, |t| t.timestamp_millis()),
        trace_context: cmd.trace_context.clone().unwrap_or_default(),
        after_command_id: cmd
            .after
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// An observation from the agent; `None` for an unspecified state or empty id.
pub fn observation(o: &pb::SessionObservation) -> Option<Observation> {
    let state = match pb::SessionState::try_from(o.state).ok()? {
        pb::SessionState::Unspecified => return None,
        pb::SessionState::Starting => ObservedState::Starting,
        pb::SessionState::Running => ObservedState::Running,
        pb::SessionState::Hibernated => ObservedState::Hibernated,
        pb::SessionState::Stopped => ObservedState::Stopped,
        pb::SessionState::Failed => ObservedState::Failed,
    };
    if o.session_id.is_empty() {
        return None;
    }
    Some(Observation {
        session_id: o.session_id.clone(),
        state,
        url: (!o.url.is_empty()).then(|| o.url.clone()),
        message: (!o.message.is_empty()).then(|| o.message.clone()),
    })
}

/// The `result` stored with a completed command.
pub fn completion_details(c: &pb::Completed) -> Option<serde_json::Value> {
    let s = c.session.as_ref()?;
    let state = pb::SessionState::try_from(s.state)
        .map(|st| {
            st.as_str_name()
                .trim_start_matches("SESSION_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    Some(serde_json::json!({
        "session": {
            "session_id": s.session_id,
            "state": state,
            "url": (!s.url.is_empty()).then(|| s.url.clone()),
            "message": (!s.message.is_empty()).then(|| s.message.clone()),
        }
    }))
}
