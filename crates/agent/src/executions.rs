//! The execution log: one line per runtime call the executor made for a command, appended
//! to `<state_dir>/executions.log` as `<unix_ms> <command_id> <session_id> <action>
//! <outcome>` (`completed`, `retryable` or `failed`).
//!
//! With the runtime's effect journal (`journal.log`: what happened to the machine) it lets
//! a checker outside the agent account for every execution: which command ran, how often,
//! in what order per session. Lines are written with one `write` on an `O_APPEND` file, so
//! they never interleave; the log survives agent restarts.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::runtime::journal::unix_ms;

pub const EXECUTIONS_FILE: &str = "executions.log";

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    pub at_ms: i64,
    pub command_id: String,
    pub session_id: String,
    pub action: String,
    pub outcome: String,
}

#[derive(Debug)]
pub(crate) struct ExecutionLog {
    file: Mutex<File>,
}

impl ExecutionLog {
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        crate::private_fs::create_dir(state_dir)?;
        let file = crate::private_fs::append(&state_dir.join(EXECUTIONS_FILE))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    pub fn record(&self, command_id: &str, session_id: &str, action: &str, outcome: &str) {
        let line = format!(
            "{} {command_id} {session_id} {action} {outcome}\n",
            unix_ms()
        );
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot append to the execution log");
        }
    }
}

/// Every execution recorded in `state_dir`, oldest first; none when there is no log.
pub fn read(state_dir: &Path) -> io::Result<Vec<Execution>> {
    let path: PathBuf = state_dir.join(EXECUTIONS_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let mut parts = line.split(' ');
        let (Some(at), Some(command_id), Some(session_id), Some(action), Some(outcome)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        let Ok(at_ms) = at.parse() else { continue };
        out.push(Execution {
            at_ms,
            command_id: command_id.to_owned(),
            session_id: session_id.to_owned(),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
        });
    }
    Ok(out)
}
