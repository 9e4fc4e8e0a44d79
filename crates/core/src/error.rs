//! The one error type of `streamspace-core`. Services convert it to HTTP or gRPC status at
//! their edge, once.

use crate::command::{CommandId, CommandStatus};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or a statement failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The schema is behind this build; the message names what is missing.
    #[error(
        "database schema is behind this build: {} not applied ({}); start with --migrate or run `cargo xtask migrate`",
        if missing.len() == 1 { "migration" } else { "migrations" },
        missing.join(", ")
    )]
    MigrationsPending { missing: Vec<String> },

    /// An applied migration differs from the file this build carries.
    #[error(
        "migration {version} was applied with different contents than this build carries; refusing to guess"
    )]
    MigrationChanged { version: i64 },

    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The lease presented no longer holds the command: it was released, rescued or
    /// re-leased, or the command already moved on. Nothing was changed.
    #[error("stale lease for {command_id}: the command is {current} under another lease or none")]
    StaleLease {
        command_id: CommandId,
        current: CommandStatus,
    },

    #[error("command {0} not found")]
    CommandNotFound(CommandId),

    /// The agent connection this step belongs to is no longer the agent's current one (a
    /// newer connection took over, or it was closed). Nothing was changed; the step's
    /// connection must end itself.
    #[error("connection {epoch} of agent {agent_id} was superseded by a newer connection")]
    Superseded { agent_id: String, epoch: i64 },

    /// The command cannot make the requested move from where it stands.
    #[error("command {command_id} is {current}; cannot {attempted}")]
    InvalidTransition {
        command_id: CommandId,
        current: CommandStatus,
        attempted: &'static str,
    },

    /// The same idempotency key was used for a different command.
    #[error("idempotency key {key:?} was already used for a different command ({existing})")]
    IdempotencyConflict { key: String, existing: CommandId },

    /// Something named by the caller does not exist.
    #[error("{0} not found")]
    NotFound(String),

    /// The request conflicts with what exists (e.g. a duplicate id).
    #[error("conflict: {0}")]
    Conflict(String),

    /// Input that the caller must fix.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// No agent can take a new session right now; the message says what was looked for.
    #[error("no eligible agent: {0}")]
    NoEligibleAgent(String),

    /// The caller already has as many active sessions as allowed.
    #[error("{0}")]
    QuotaExceeded(String),
}
