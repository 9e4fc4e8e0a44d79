//! The command model: what a user asked an agent to do, and where it stands.
//!
//! A command is one [`CommandKind`] (the action and its typed payload), addressed to one
//! agent and usually one session. Its life is the [`CommandStatus`] state machine, drawn in
//! `docs/state_machine.md`; the queue ([`crate::queue`]) is the only code that moves it.

mod hibernate_session;
mod start_session;
mod status;
mod stop_session;
mod wake_session;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use hibernate_session::HibernateSession;
pub use start_session::{Resources, StartSession};
pub use status::{CommandStatus, Transition};
pub use stop_session::StopSession;
pub use wake_session::WakeSession;

/// Largest accepted command payload, in bytes of JSON. Payloads travel in every delivery,
/// so they are kept small; large data belongs in templates, not commands.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// A command's identity, shown and stored as `cmd-<id>`.
///
/// New ids are UUIDv7 (time-ordered, globally unique: the original's 8 hex digits could
/// collide). Ids written by other tools are accepted when they are `cmd-` followed by 1–64
/// lower-case letters, digits or dashes, the same rule the schema enforces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommandId(String);

impl CommandId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(format!("cmd-{}", uuid::Uuid::now_v7().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a command id.
#[derive(Debug, thiserror::Error)]
#[error("invalid command id {0:?}: expected `cmd-` followed by 1-64 of [0-9a-z-]")]
pub struct InvalidCommandId(String);

impl FromStr for CommandId {
    type Err = InvalidCommandId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = s.strip_prefix("cmd-").is_some_and(|rest| {
            (1..=64).contains(&rest.len())
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
        });
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidCommandId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for CommandId {
    type Error = InvalidCommandId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CommandId> for String {
    fn from(id: CommandId) -> Self {
        id.0
    }
}

/// The action words, exactly as stored in `agent_commands.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    StartSession,
    StopSession,
    HibernateSession,
    WakeSession,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::StartSession,
        Action::StopSession,
        Action::HibernateSession,
        Action::WakeSession,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::StartSession => "start_session",
            Action::StopSession => "stop_session",
            Action::HibernateSession => "hibernate_session",
            Action::WakeSession => "wake_session",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An action word this build does not know.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown action {0:?} (known: start_session, stop_session, hibernate_session, wake_session)"
)]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

/// What a command does: the action together with its typed payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandKind {
    StartSession(StartSession),
    StopSession(StopSession),
    HibernateSession(HibernateSession),
    WakeSession(WakeSession),
}

/// Why a stored action/payload pair cannot be turned into a [`CommandKind`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    UnknownAction(#[from] UnknownAction),
    #[error("invalid payload for {action}: {source}")]
    Payload {
        action: Action,
        #[source]
        source: serde_json::Error,
    },
}

impl CommandKind {
    pub fn action(&self) -> Action {
        match self {
            CommandKind::StartSession(_) => Action::StartSession,
            CommandKind::StopSession(_) => Action::StopSession,
            CommandKind::HibernateSession(_) => Action::HibernateSession,
            CommandKind::WakeSession(_) => Action::WakeSession,
        }
    }

    /// Decodes a stored `(action, payload)` pair.
    pub fn decode(action: &str, payload: &serde_json::Value) -> Result<Self, DecodeError> {
        let action: Action = action.parse()?;
        let wrap = |source| DecodeError::Payload { action, source };
        Ok(match action {
            Action::StartSession => {
                CommandKind::StartSession(StartSession::deserialize(payload).map_err(wrap)?)
            }
            Action::StopSession => {
                CommandKind::StopSession(StopSession::deserialize(payload).map_err(wrap)?)
            }
            Action::HibernateSession => {
                CommandKind::HibernateSession(HibernateSession::deserialize(payload).map_err(wrap)?)
            }
            Action::WakeSession => {
                CommandKind::WakeSession(WakeSession::deserialize(payload).map_err(wrap)?)
            }
        })
    }

    /// The payload as stored in `agent_commands.payload`.
    pub fn payload(&self) -> serde_json::Value {
        let value = match self {
            CommandKind::StartSession(p) => serde_json::to_value(p),
            CommandKind::StopSession(p) => serde_json::to_value(p),
            CommandKind::HibernateSession(p) => serde_json::to_value(p),
            CommandKind::WakeSession(p) => serde_json::to_value(p),
        };
        // Payload types are plain structs of strings, numbers and maps with string keys,
        // which serde_json always represents.
        value.unwrap_or(serde_json::Value::Null)
    }
}

/// A command as the queue hands it out: decoded, leased, ready to deliver.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub command_id: CommandId,
    /// Position in the global acceptance order; per-session FIFO follows it.
    pub seq: i64,
    pub agent_id: String,
    pub session_id: Option<String>,
    pub kind: CommandKind,
    pub status: CommandStatus,
    /// Delivery attempts so far, this one included.
    pub attempts: i32,
    pub max_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub trace_context: Option<String>,
    /// The lease under which this copy was handed out; every transition must present it.
    pub lease: Option<Lease>,
    /// Pipelined behind this command of the same session, claimed in the same batch: the
    /// agent runs this one only once that one completed (see `ClaimParams::pipeline_depth`).
    pub after: Option<CommandId>,
}

/// Proof that one holder may move a sent command forward. Tokens come from one database
/// sequence, so a token is never reused: after a release or rescue, the old token matches
/// nothing. A transition must also name the command's agent and the lease's owner (the
/// connection that claimed it), so a report can only ever touch a row that the reporting
/// connection holds — not another agent's row whose token it guessed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub command_id: CommandId,
    pub token: i64,
    /// The agent the command is for.
    pub agent_id: String,
    /// The connection that holds the lease (`ClaimParams::owner`).
    pub owner: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_sort_by_time() {
        let a = CommandId::generate();
        let b = CommandId::generate();
        assert!(a < b, "{a} should sort before {b}");
        assert_eq!(a.as_str().parse::<CommandId>().unwrap(), a);
        assert_eq!(a.as_str().len(), "cmd-".len() + 32);
    }

    #[test]
    fn seed_style_ids_are_accepted_and_garbage_rejected() {
        assert!("cmd-26acdfcf".parse::<CommandId>().is_ok());
        for bad in [
            "",
            "cmd-",
            "26acdfcf",
            "cmd-ABC",
            "cmd-a b",
            &format!("cmd-{}", "a".repeat(65)),
        ] {
            assert!(bad.parse::<CommandId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn action_words_round_trip() {
        for action in Action::ALL {
            assert_eq!(action.as_str().parse::<Action>().unwrap(), action);
            assert_eq!(serde_json::to_value(action).unwrap(), action.as_str());
        }
        assert!("reboot_cluster".parse::<Action>().is_err());
    }

    #[test]
    fn empty_payloads_decode_for_actions_without_required_fields() {
        let empty = serde_json::json!({});
        for action in [
            Action::StopSession,
            Action::HibernateSession,
            Action::WakeSession,
        ] {
            let kind = CommandKind::decode(action.as_str(), &empty).unwrap();
            assert_eq!(kind.action(), action);
        }
        let err = CommandKind::decode("start_session", &empty).unwrap_err();
        assert!(err.to_string().contains("template"), "{err}");
    }

    #[test]
    fn payload_round_trips_through_storage_form() {
        let kind = CommandKind::StartSession(StartSession {
            template: "firefox-browser".into(),
            user_id: Some("admin".into()),
            resources: Some(Resources {
                memory: Some("512Mi".into()),
                cpu: Some("250m".into()),
            }),
            home_volume: false,
            env: Default::default(),
        });
        let stored = kind.payload();
        assert_eq!(CommandKind::decode("start_session", &stored).unwrap(), kind);
    }
}
