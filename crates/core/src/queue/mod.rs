//! The durable command queue on Postgres (`agent_commands`).
//!
//! Every operation is one of the state machine's [`Transition`]s applied as a conditional,
//! set-based statement: batches of rows per statement, never a row per round trip, so the
//! queue keeps up with many agents on a small machine.
//!
//! Guarantees, each enforced in SQL rather than by callers:
//! - **Per-session FIFO**: a command is claimable only when every earlier command (by
//!   `seq`) of its session is terminal. Commands without a session, or of different
//!   sessions, never wait on each other.
//! - **One holder at a time**: a claim leases each row to one owner with a fresh fencing
//!   token from a sequence; ack/complete/fail present the token, and a stale token changes
//!   nothing ([`crate::Error::StaleLease`]).
//! - **Loud, isolated failure**: a row that cannot be decoded is moved to `failed` with the
//!   reason, logged with its `command_id` and counted; the rest of the batch is delivered.
//! - **Nothing waits forever**: released and rescued leases return to `pending`; retries
//!   back off exponentially up to `max_attempts`; expired commands fail with a reason.
//!
//! [`Transition`]: crate::command::Transition

mod claim;
mod enqueue;
mod maintenance;
mod notify;
mod record;
mod stats;
mod transition;

use std::time::Duration;

use sqlx::PgPool;

use crate::error::{Error, Result};

pub use claim::{ClaimBatch, ClaimParams, Quarantined};
pub use enqueue::{Enqueued, NewCommand};
pub use maintenance::{Released, Rescued};
pub use notify::{CommandListener, Wakeup};
pub use record::CommandRecord;
pub use stats::{QueueDepth, queue_depth};
pub use transition::{Completion, Failure, FailureOutcome, Outcome, Rejection};

/// Channel on which enqueue announces new work; the payload is the agent id. It is a hint
/// only: listeners must also poll, since notifications are lost while they reconnect.
pub const NOTIFY_CHANNEL: &str = "streamspace_commands";

/// Default lease length. A crashed dispatcher's commands return to the queue this long
/// after its last renewal: seconds, not the hour some queues use.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default first retry delay; doubles with each attempt.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);
/// Default ceiling of the retry delay.
pub const DEFAULT_RETRY_CAP: Duration = Duration::from_secs(300);
/// Default attempts before a retryable failure becomes final.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;
/// Largest claim batch accepted.
pub const MAX_CLAIM_BATCH: i64 = 10_000;

/// Tuning of the queue. Validated by [`CommandQueue::new`].
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// How long a claim holds a command before it may be rescued (renewed while the
    /// holding connection is alive).
    #[serde(with = "duration_ms")]
    pub lease: Duration,
    /// First retry delay; attempt `n` waits about `retry_base * 2^(n-1)` with jitter.
    #[serde(with = "duration_ms")]
    pub retry_base: Duration,
    /// Ceiling of the retry delay.
    #[serde(with = "duration_ms")]
    pub retry_cap: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            retry_base: DEFAULT_RETRY_BASE,
            retry_cap: DEFAULT_RETRY_CAP,
        }
    }
}

/// Durations in configuration are whole milliseconds.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl QueueConfig {
    fn validate(&self) -> Result<()> {
        if self.lease < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "queue.lease must be at least 100ms, got {:?}",
                self.lease
            )));
        }
        if self.retry_base.is_zero() || self.retry_cap < self.retry_base {
            return Err(Error::Config(format!(
                "queue.retry_base must be > 0 and <= queue.retry_cap (got {:?} and {:?})",
                self.retry_base, self.retry_cap
            )));
        }
        Ok(())
    }
}

/// Handle on the queue: a pool plus validated tuning. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CommandQueue {
    pool: PgPool,
    config: QueueConfig,
}

impl CommandQueue {
    pub fn new(pool: PgPool, config: QueueConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { pool, config })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
