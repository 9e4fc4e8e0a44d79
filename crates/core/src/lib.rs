//! The heart of the StreamSpace control plane: the command model and its state machine,
//! the durable Postgres command queue, and the configuration/telemetry helpers every
//! service shares.
//!
//! This crate knows nothing of tonic, axum or Kubernetes. All SQL of the project lives
//! here and is checked at compile time against `migrations/`.
#![forbid(unsafe_code)]

pub mod agents;
pub mod api;
pub mod command;
pub mod config;
pub mod db;
pub mod error;
pub mod queue;
pub mod sessions;
pub mod telemetry;

pub use command::{Action, Command, CommandId, CommandKind, CommandStatus};
pub use error::{Error, Result};
pub use queue::CommandQueue;
