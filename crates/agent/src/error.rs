//! The agent library's error type. The binary wraps it in `anyhow` at its edge.

use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration that cannot work; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The state directory (or a file in it) could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(transparent)]
    Core(#[from] streamspace_core::Error),

    /// The agent stopped before what was awaited happened.
    #[error("the agent stopped")]
    Stopped,

    /// The agent's task panicked or was cancelled.
    #[error("agent task failed: {0}")]
    Task(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}
