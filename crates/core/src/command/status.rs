//! The command state machine.
//!
//! ```text
//!            claim                ack               complete
//! pending ─────────▶ sent ─────────────▶ ack ─────────────────▶ completed
//!   │  ▲              │  │                │ │
//!   │  │ release /    │  └── fail ────────┼─┴──▶ failed   (non-retryable, attempts
//!   │  │ rescue /     │                   │                exhausted, or undecodable)
//!   │  │ retry        │                   │
//!   │  └──────────────┴───────────────────┘
//!   ├── cancel ──▶ cancelled
//!   └── expire ──▶ failed
//! ```
//!
//! `completed`, `failed` and `cancelled` are terminal. Every transition is applied by the
//! queue as a conditional UPDATE whose `WHERE` names the legal source states (and, for
//! leased states, the fencing token), so a late or stale writer can never move a command
//! backwards. [`Transition`] is the list of those moves; `docs/state_machine.md` explains
//! them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a command stands. The words are the original system's, stored as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Accepted and waiting for delivery (also after a release, rescue or retry).
    Pending,
    /// Leased to one agent connection and pushed to it.
    Sent,
    /// The agent confirmed receipt and is executing it.
    Ack,
    /// The agent reported success. Terminal.
    Completed,
    /// Gave up: the agent reported a permanent failure, attempts ran out, the command
    /// expired, or the stored row could not be decoded. Terminal.
    Failed,
    /// Withdrawn before delivery. Terminal.
    Cancelled,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 6] = [
        CommandStatus::Pending,
        CommandStatus::Sent,
        CommandStatus::Ack,
        CommandStatus::Completed,
        CommandStatus::Failed,
        CommandStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "pending",
            CommandStatus::Sent => "sent",
            CommandStatus::Ack => "ack",
            CommandStatus::Completed => "completed",
            CommandStatus::Failed => "failed",
            CommandStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CommandStatus::Completed | CommandStatus::Failed | CommandStatus::Cancelled
        )
    }

    /// Whether the command is held under a lease by one agent connection.
    pub fn is_leased(self) -> bool {
        matches!(self, CommandStatus::Sent | CommandStatus::Ack)
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status word the schema's CHECK constraint should have made impossible.
#[derive(Debug, thiserror::Error)]
#[error("unknown command status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for CommandStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CommandStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Every legal move of the state machine. The queue implements each as one conditional
/// UPDATE; [`Transition::sources`] is exactly the `status IN (…)` of its `WHERE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `pending → sent`: leased to a connection and delivered.
    Claim,
    /// `sent → ack`: the agent confirmed receipt (fenced).
    Ack,
    /// `sent|ack → completed` (fenced).
    Complete,
    /// `sent|ack → pending` with backoff, or `→ failed` when attempts are exhausted or the
    /// failure is permanent (fenced).
    Fail,
    /// `sent|ack → pending` (or `failed` when attempts are exhausted): the connection
    /// closed or its lease expired.
    Release,
    /// `sent → failed`: the row could not be decoded (fenced).
    Quarantine,
    /// `pending → cancelled`.
    Cancel,
    /// `pending → failed`: past `expires_at` before it could be delivered.
    Expire,
}

impl Transition {
    /// States a command may be in for this transition to apply.
    pub fn sources(self) -> &'static [CommandStatus] {
        use CommandStatus::*;
        match self {
            Transition::Claim | Transition::Cancel | Transition::Expire => &[Pending],
            Transition::Ack | Transition::Quarantine => &[Sent],
            Transition::Complete | Transition::Fail | Transition::Release => &[Sent, Ack],
        }
    }

    /// States the transition may lead to.
    pub fn targets(self) -> &'static [CommandStatus] {
        use CommandStatus::*;
        match self {
            Transition::Claim => &[Sent],
            Transition::Ack => &[Ack],
            Transition::Complete => &[Completed],
            Transition::Fail | Transition::Release => &[Pending, Failed],
            Transition::Quarantine | Transition::Expire => &[Failed],
            Transition::Cancel => &[Cancelled],
        }
    }

    /// Whether `from → to` is a legal move of this transition.
    pub fn allows(self, from: CommandStatus, to: CommandStatus) -> bool {
        self.sources().contains(&from) && self.targets().contains(&to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_TRANSITIONS: [Transition; 8] = [
        Transition::Claim,
        Transition::Ack,
        Transition::Complete,
        Transition::Fail,
        Transition::Release,
        Transition::Quarantine,
        Transition::Cancel,
        Transition::Expire,
    ];

    #[test]
    fn terminal_states_have_no_way_out() {
        for t in ALL_TRANSITIONS {
            for from in t.sources() {
                assert!(!from.is_terminal(), "{t:?} leaves terminal state {from}");
            }
        }
    }

    #[test]
    fn no_transition_moves_backwards_into_sent_or_ack_except_claim_and_ack() {
        for t in ALL_TRANSITIONS {
            for to in t.targets() {
                if to.is_leased() {
                    assert!(matches!(t, Transition::Claim | Transition::Ack), "{t:?}");
                }
            }
        }
    }

    #[test]
    fn status_words_round_trip() {
        for st in CommandStatus::ALL {
            assert_eq!(st.as_str().parse::<CommandStatus>().unwrap(), st);
        }
        assert!("done".parse::<CommandStatus>().is_err());
    }

    #[test]
    fn allows_checks_both_ends() {
        assert!(Transition::Complete.allows(CommandStatus::Ack, CommandStatus::Completed));
        assert!(!Transition::Complete.allows(CommandStatus::Pending, CommandStatus::Completed));
        assert!(!Transition::Cancel.allows(CommandStatus::Sent, CommandStatus::Cancelled));
    }
}
