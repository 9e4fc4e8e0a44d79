//! The StreamSpace agent: dials the command-dispatcher, executes the commands it pushes
//! through a [`SessionRuntime`](runtime::SessionRuntime), and reports results, heartbeats
//! and session status back up the same stream.
//!
//! This first part holds [`runtime`]: the `SessionRuntime` trait and the local
//! [`ProcessRuntime`]; the connection loop and executor follow.
#![forbid(unsafe_code)]

pub mod config;
mod error;
pub mod runtime;
pub mod serve_session;

pub use config::{AgentConfig, RuntimeKind};
pub use error::{Error, Result};
pub use runtime::ProcessRuntime;
