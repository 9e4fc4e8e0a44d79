//! What a new agent process does with the sessions an earlier one left behind.

use std::fs;
use std::sync::Arc;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::spawn::{INTENT_EXTENSION, SESSION_ID_ENV};
use super::{Inner, RecordState, Session, SessionRecord, lock, procfs, validate_session_id};
use crate::error::Error;
use crate::runtime::journal::Effect;

impl Inner {
    /// Finishes what an earlier agent left between spawning a process and recording it:
    /// for every spawn intent without a record, kills the processes that carry the
    /// session id in their environment. Nobody was told of such a session; the start
    /// command is redelivered and spawns it afresh, so exactly one process remains.
    fn recover_abandoned_spawns(&self) -> Result<(), Error> {
        let entries =
            fs::read_dir(&self.sessions_dir).map_err(|e| Error::io(&self.sessions_dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != INTENT_EXTENSION) {
                continue;
            }
            let Some(session_id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
            else {
                let _ = fs::remove_file(&path);
                continue;
            };
            // A record means the pid was written down: adoption below handles it.
            if validate_session_id(&session_id).is_ok() && !self.record_path(&session_id).exists() {
                let leftovers = procfs::processes_with_env(SESSION_ID_ENV, &session_id);
                for (pid, st) in &leftovers {
                    let result = if st.pgrp == *pid {
                        killpg(Pid::from_raw(*pid), Signal::SIGKILL)
                    } else {
                        kill(Pid::from_raw(*pid), Signal::SIGKILL)
                    };
                    if let Err(e) = result {
                        tracing::warn!(session_id, pid, error = %e, "cannot kill a half-started session process");
                    }
                }
                if !leftovers.is_empty() {
                    let pids: Vec<String> = leftovers.iter().map(|(p, _)| p.to_string()).collect();
                    self.journal.record(
                        Effect::Kill,
                        &session_id,
                        &format!(
                            "pids={} signal=SIGKILL reason=abandoned-start",
                            pids.join(",")
                        ),
                    );
                    tracing::info!(
                        session_id,
                        pids = %pids.join(","),
                        "killed the unrecorded process of a start an earlier agent abandoned"
                    );
                }
                let _ = fs::remove_file(self.log_path(&session_id));
            }
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove spawn intent");
            }
        }
        Ok(())
    }

    /// Reads the records left by an earlier agent process: adopts sessions whose process
    /// still lives and is still theirs, and deletes the other records.
    pub(super) fn adopt_recorded_sessions(&self) -> Result<(), Error> {
        self.recover_abandoned_spawns()?;
        let entries =
            fs::read_dir(&self.sessions_dir).map_err(|e| Error::io(&self.sessions_dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let record: SessionRecord = match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "deleting unreadable session record");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            let session_id = record.session_id.clone();
            let ours = validate_session_id(&session_id).is_ok()
                && path.file_stem().is_some_and(|stem| *stem == *session_id)
                && procfs::is_same_live_process(record.pid, record.start_ticks)
                && procfs::cmdline(record.pid)
                    .is_some_and(|argv| argv.iter().any(|a| a.contains(&session_id)));
            let mut session = Session {
                record,
                child: None,
            };
            if !ours {
                tracing::info!(
                    session_id,
                    pid = session.record.pid,
                    "forgetting session whose process is gone"
                );
                self.forget(&session);
                continue;
            }
            if session.record.state == RecordState::Starting {
                // The earlier agent died before this session was ready; nobody was told
                // about it, and the start command will be redelivered. Start clean.
                let _ = killpg(session.pgid(), Signal::SIGKILL);
                self.journal.record(
                    Effect::Kill,
                    &session_id,
                    &format!(
                        "pgid={} signal=SIGKILL reason=abandoned-start",
                        session.record.pid
                    ),
                );
                tracing::info!(
                    session_id,
                    "killed a session an earlier agent left half-started"
                );
                self.forget(&session);
                continue;
            }
            // Believe the processes, not the record: someone may have sent SIGCONT.
            let stopped = procfs::group_members(session.record.pid)
                .iter()
                .all(|(_, st)| st.is_stopped());
            session.record.state = if stopped {
                RecordState::Hibernated
            } else {
                RecordState::Running
            };
            if let Err(e) = self.write_record(&session.record) {
                tracing::warn!(session_id, error = %e, "cannot update adopted session record");
            }
            tracing::info!(session_id, pid = session.record.pid, state = ?session.record.state, "adopted session from an earlier agent");
            lock(&self.ports).insert(session.record.port);
            self.publish(session.observation());
            lock(&self.slots).insert(session_id, Arc::new(tokio::sync::Mutex::new(Some(session))));
        }
        Ok(())
    }
}
