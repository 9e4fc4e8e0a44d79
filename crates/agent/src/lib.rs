//! The StreamSpace agent: dials the command-dispatcher, executes the commands it pushes
//! through a [`SessionRuntime`](runtime::SessionRuntime), and reports results, heartbeats
//! and session status back up the same stream.
//!
//! - [`Agent`] owns the connection loop (reconnect with backoff, `Hello`/`Welcome`,
//!   heartbeats) and is built from an [`AgentConfig`];
//! - the executor runs commands serially per session, concurrently across sessions, and
//!   never twice per `command_id`;
//! - [`runtime`] holds the `SessionRuntime` trait and the local [`ProcessRuntime`]
//!   (`runtime::ProcessRuntime`).
//!
//! In-process use (tests):
//!
//! ```no_run
//! # async fn demo() -> streamspace_agent::Result<()> {
//! use streamspace_agent::{Agent, AgentConfig};
//! let config = AgentConfig::new("http://127.0.0.1:7001", "agent-token", "/tmp/agent-state");
//! let mut agent = Agent::build(config).await?.spawn();
//! let connected = agent.wait_connected(None).await?;
//! println!("connected as {} (epoch {})", connected.agent_id, connected.epoch);
//! agent.shutdown().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod agent;
pub mod backoff;
pub mod config;
mod error;
pub mod executions;
mod executor;
pub mod liveness;
pub mod metrics;
mod private_fs;
pub mod runtime;
pub mod serve_session;

pub use agent::{Agent, Connected, ConnectionState, RunningAgent};
pub use config::{AgentConfig, RuntimeKind};
pub use error::{Error, Result};
pub use runtime::ProcessRuntime;
