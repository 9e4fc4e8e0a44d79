//! What the workload did, as a client saw it: one record per logical request (its retries
//! under the same `Idempotency-Key` included), classified Jepsen-style.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// How a request ended, as far as the client can know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// `202 Accepted`: the command is committed.
    Ok { command_id: String },
    /// A definite rejection (4xx): nothing was committed.
    Fail { status: u16, message: String },
    /// Unknown: a timeout, a cut connection, a 5xx; retries under the same key did not
    /// settle it either.
    Info { error: String },
}

/// What the request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Create,
    Hibernate,
    Wake,
    Delete,
}

#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub user: String,
    pub transport: &'static str,
    pub op: Op,
    /// Empty for a create whose answer never arrived.
    pub session_id: String,
    pub idempotency_key: String,
    pub outcome: Outcome,
    /// Attempts under the key; more than one means at least one `info` on the way.
    pub tries: u32,
    /// An `info` that a retry under the same key turned into `ok`.
    pub recovered: bool,
    /// For a delete that cancelled the undelivered start instead of queueing a stop.
    pub cancelled_command_id: Option<String>,
    pub at_ms: u64,
    pub latency_ms: u64,
}

/// Every record of a run, shared by the workload's tasks.
#[derive(Debug, Default)]
pub struct History {
    records: Mutex<Vec<Record>>,
}

impl History {
    pub fn push(&self, r: Record) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
    }

    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
