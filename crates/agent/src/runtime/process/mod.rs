//! `ProcessRuntime`: a session is a local child process started from a template catalog,
//! so the whole system runs on one machine with no cluster.
//!
//! Each session runs in its own process group (so it survives an agent crash, and so a
//! stop reaches every process it started) and is recorded as JSON in
//! `<state_dir>/sessions/<id>.json`. Its output goes to `<state_dir>/sessions/<id>.log`
//! rather than a pipe: a pipe would break (SIGPIPE) when the agent dies, killing the very
//! sessions a restart is meant to find again.
//!
//! | operation | effect |
//! |---|---|
//! | start | spawn `program args…`, wait until its port accepts TCP (create-or-get) |
//! | stop | SIGTERM to the group, SIGKILL after the grace period (delete-if-exists) |
//! | hibernate | SIGSTOP to the group |
//! | wake | SIGCONT to the group, wait until its port accepts TCP again |
//!
//! A new `ProcessRuntime` over the same state directory **adopts** the sessions whose
//! recorded process still lives (same pid, same start time, session id in its command
//! line) and deletes the records of the others; a start it interrupted between spawn and
//! record is finished off through the spawn intent ([`spawn`]). Every real effect is
//! appended to the [`journal`](super::journal).
//!
//! Modules: [`catalog`] (templates and settings), [`spawn`] (spawning and the on-disk
//! record), [`adopt`] (what a restarted agent finds); this file holds the runtime's
//! operations, the per-session slots and the liveness monitor.

mod adopt;
mod catalog;
mod spawn;

pub use catalog::{Catalog, ProcessRuntimeConfig, Template, default_agent_exe};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use streamspace_core::command::{HibernateSession, StartSession, StopSession, WakeSession};
use tokio::process::Child;
use tokio::sync::{OwnedMutexGuard, broadcast};
use tokio::time::Instant;

use super::journal::{Effect, Journal};
pub use super::journal::{Effects, JOURNAL_FILE};
use super::{Observation, RuntimeError, SessionRuntime, SessionState, async_trait, procfs};
use crate::error::Error;
use crate::private_fs;

/// How long a session may take to accept connections after it was spawned or woken.
pub const DEFAULT_READY_TIMEOUT_MS: u64 = 10_000;
/// How long a stopped session gets between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the monitor looks for sessions that died on their own.
pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_millis(500);
/// Templates of the default catalog; all run the agent's own `serve-session` server.
pub const DEFAULT_TEMPLATES: [&str; 3] = ["firefox-browser", "chrome-browser", "desktop-xfce"];

/// How often readiness and process states are polled while an operation waits on them.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Upper bound on waiting for processes to react to SIGSTOP, SIGCONT or SIGKILL, which
/// they cannot ignore; only a process stuck in the kernel takes this long.
const SIGNAL_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of a session's output quoted when it fails.
const OUTPUT_TAIL_LINES: usize = 5;
/// Events buffered for slow subscribers before they lag (and fall back to heartbeats).
const EVENT_BUFFER: usize = 256;

/// What is recorded on disk per session, so a restarted agent can find it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SessionRecord {
    session_id: String,
    /// Leader of the session's process group; the group id equals it.
    pid: i32,
    port: u16,
    url: String,
    template: String,
    state: RecordState,
    /// `/proc/<pid>/stat` start time, so a recycled pid is never mistaken for the session.
    #[serde(default)]
    start_ticks: Option<u64>,
    started_unix_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordState {
    Starting,
    Running,
    Hibernated,
}

impl From<RecordState> for SessionState {
    fn from(state: RecordState) -> Self {
        match state {
            RecordState::Starting => SessionState::Starting,
            RecordState::Running => SessionState::Running,
            RecordState::Hibernated => SessionState::Hibernated,
        }
    }
}

/// A live session.
#[derive(Debug)]
struct Session {
    record: SessionRecord,
    /// The handle to reap it by; `None` for a session adopted from an earlier agent process
    /// (whose parent is now init, which reaps it).
    child: Option<Child>,
}

impl Session {
    fn observation(&self) -> Observation {
        Observation::new(&self.record.session_id, self.record.state.into())
            .with_url(&self.record.url)
    }

    fn pgid(&self) -> Pid {
        Pid::from_raw(self.record.pid)
    }

    /// Why the session's main process is gone, or `None` while it lives. Reaps our own
    /// child as a side effect, so no zombie stays behind.
    fn exit_reason(&mut self) -> Option<String> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(session_id = %self.record.session_id, error = %e, "cannot query the session process");
                    None
                }
            },
            None => (!procfs::is_same_live_process(self.record.pid, self.record.start_ticks))
                .then(|| "exit status unknown (adopted from an earlier agent)".to_owned()),
        }
    }

    /// Whether any process of the session's group still runs (zombies do not count).
    fn group_alive(&mut self) -> bool {
        let _ = self.exit_reason();
        !procfs::group_members(self.record.pid).is_empty()
    }
}

/// One session's slot: its lock serialises operations on the session, and the monitor
/// skips a slot that is busy. `None` means no session (the slot is then removed).
type Slot = Arc<tokio::sync::Mutex<Option<Session>>>;

#[derive(Debug)]
struct Inner {
    config: ProcessRuntimeConfig,
    sessions_dir: PathBuf,
    slots: Mutex<HashMap<String, Slot>>,
    /// The inventory, readable without waiting for a busy slot: a long start must never
    /// delay a heartbeat.
    view: Mutex<BTreeMap<String, Observation>>,
    /// Ports handed to live sessions, so two sessions are never given the same one.
    ports: Mutex<HashSet<u16>>,
    events: broadcast::Sender<Observation>,
    journal: Journal,
}

/// Sessions as local process groups. See the module documentation.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

/// Locks a std mutex. Poisoning only means another thread panicked while holding it; the
/// maps it guards are updated in single steps, so their contents stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProcessRuntime {
    /// Opens the state directory, adopts the sessions still running from an earlier agent
    /// process, and starts the liveness monitor. Must run inside a tokio runtime.
    pub async fn open(config: ProcessRuntimeConfig) -> Result<Self, Error> {
        for (name, template) in &config.catalog.0 {
            template.validate(name)?;
        }
        let sessions_dir = config.state_dir.join("sessions");
        for dir in [&config.state_dir, &sessions_dir] {
            private_fs::create_dir(dir).map_err(|e| Error::io(dir, e))?;
        }
        let journal =
            Journal::open(&config.state_dir).map_err(|e| Error::io(&config.state_dir, e))?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let inner = Arc::new(Inner {
            config,
            sessions_dir,
            slots: Mutex::new(HashMap::new()),
            view: Mutex::new(BTreeMap::new()),
            ports: Mutex::new(HashSet::new()),
            events,
            journal,
        });
        inner.adopt_recorded_sessions()?;
        tokio::spawn(monitor(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Effects this runtime has had since it was opened (the journal has all of them).
    pub fn effects(&self) -> Effects {
        self.inner.journal.effects()
    }

    pub fn state_dir(&self) -> &Path {
        &self.inner.config.state_dir
    }

    /// The pid (= process group id) of a session's main process, if it runs here; `None`
    /// also while an operation on the session is in progress.
    pub fn pid(&self, session_id: &str) -> Option<i32> {
        let slot = lock(&self.inner.slots).get(session_id).cloned()?;
        let guard = slot.try_lock().ok()?;
        guard.as_ref().map(|s| s.record.pid)
    }
}

#[async_trait]
impl SessionRuntime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> Vec<String> {
        self.inner
            .config
            .catalog
            .names()
            .map(|name| format!("template:{name}"))
            .collect()
    }

    async fn start(
        &self,
        session_id: &str,
        spec: &StartSession,
    ) -> Result<Observation, RuntimeError> {
        validate_session_id(session_id)?;
        let inner = &self.inner;
        let template = inner
            .config
            .catalog
            .get(&spec.template)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = inner.config.catalog.names().collect();
                RuntimeError::permanent(format!(
                    "unknown template {:?} (known: {})",
                    spec.template,
                    known.join(", ")
                ))
            })?;
        let mut guard = inner.lock_slot(session_id).await;
        match guard.as_ref().map(|s| s.record.state) {
            // Create-or-get: the session exists; report it as it is.
            Some(RecordState::Running | RecordState::Hibernated) => {
                return Ok(guard
                    .as_ref()
                    .map(Session::observation)
                    .unwrap_or_else(|| Observation::new(session_id, SessionState::Stopped)));
            }
            // An earlier start was abandoned mid-way (its caller went away); finish it.
            Some(RecordState::Starting) => {}
            None => {
                let session = inner.spawn(session_id, &spec.template, &template, spec)?;
                inner.publish(session.observation());
                *guard = Some(session);
            }
        }
        let timeout = Duration::from_millis(template.ready_timeout_ms);
        inner.finish_start(&mut guard, timeout, "started").await
    }

    async fn stop(
        &self,
        session_id: &str,
        _spec: &StopSession,
    ) -> Result<Observation, RuntimeError> {
        let stopped = Observation::new(session_id, SessionState::Stopped);
        // An id that could never have been started cannot exist: delete-if-exists is done.
        if validate_session_id(session_id).is_err() {
            return Ok(stopped);
        }
        let inner = &self.inner;
        let mut guard = inner.lock_slot(session_id).await;
        if guard.is_none() {
            inner.release_slot(&guard);
            return Ok(stopped);
        }
        inner.terminate(&mut guard, "stop").await?;
        Ok(stopped)
    }

    async fn hibernate(
        &self,
        session_id: &str,
        _spec: &HibernateSession,
    ) -> Result<Observation, RuntimeError> {
        let inner = &self.inner;
        let mut guard = inner.lock_slot(session_id).await;
        let Some(session) = guard.as_mut() else {
            inner.release_slot(&guard);
            return Err(unknown_session(session_id));
        };
        match session.record.state {
            RecordState::Hibernated => return Ok(session.observation()),
            RecordState::Starting => {
                return Err(RuntimeError::retryable(format!(
                    "session {session_id} is still starting"
                )));
            }
            RecordState::Running => {}
        }
        signal_group(session.pgid(), Signal::SIGSTOP)?;
        inner.journal.record(
            Effect::Sigstop,
            session_id,
            &format!("pgid={}", session.record.pid),
        );
        // Report hibernated only once every process of the group is really stopped.
        let pgid = session.record.pid;
        let frozen = poll_until(SIGNAL_SETTLE_TIMEOUT, || {
            procfs::group_members(pgid)
                .iter()
                .all(|(_, st)| st.is_stopped())
        })
        .await;
        if !frozen {
            return Err(RuntimeError::retryable(format!(
                "session {session_id}: processes did not stop within {} ms of SIGSTOP",
                SIGNAL_SETTLE_TIMEOUT.as_millis()
            )));
        }
        session.record.state = RecordState::Hibernated;
        inner.write_record(&session.record)?;
        let obs = session.observation();
        inner.publish(obs.clone());
        Ok(obs)
    }

    async fn wake(
        &self,
        session_id: &str,
        _spec: &WakeSession,
    ) -> Result<Observation, RuntimeError> {
        let inner = &self.inner;
        let mut guard = inner.lock_slot(session_id).await;
        let Some(session) = guard.as_mut() else {
            inner.release_slot(&guard);
            return Err(unknown_session(session_id));
        };
        match session.record.state {
            RecordState::Running => return Ok(session.observation()),
            RecordState::Starting => {
                return Err(RuntimeError::retryable(format!(
                    "session {session_id} is still starting"
                )));
            }
            RecordState::Hibernated => {}
        }
        signal_group(session.pgid(), Signal::SIGCONT)?;
        inner.journal.record(
            Effect::Sigcont,
            session_id,
            &format!("pgid={}", session.record.pid),
        );
        let timeout = inner
            .config
            .catalog
            .get(&session.record.template)
            .map_or(DEFAULT_READY_TIMEOUT_MS, |t| t.ready_timeout_ms);
        session.record.state = RecordState::Starting;
        inner
            .finish_start(&mut guard, Duration::from_millis(timeout), "woken")
            .await
    }

    async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        Ok(lock(&self.inner.view).values().cloned().collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Observation> {
        self.inner.events.subscribe()
    }
}

impl Inner {
    /// Locks the slot of `session_id`, creating it when needed. A slot removed while we
    /// waited for it is stale (its session ended); we then start over with the current one,
    /// so two callers can never work on two different slots of one session.
    async fn lock_slot(&self, session_id: &str) -> OwnedMutexGuard<Option<Session>> {
        loop {
            let slot = lock(&self.slots)
                .entry(session_id.to_owned())
                .or_default()
                .clone();
            let guard = slot.clone().lock_owned().await;
            let current = lock(&self.slots)
                .get(session_id)
                .is_some_and(|s| Arc::ptr_eq(s, &slot));
            if current {
                return guard;
            }
        }
    }

    /// Removes an empty slot from the map (called with its guard held).
    fn release_slot(&self, guard: &OwnedMutexGuard<Option<Session>>) {
        if guard.is_some() {
            return;
        }
        let slot = OwnedMutexGuard::mutex(guard);
        let mut slots = lock(&self.slots);
        let id = slots
            .iter()
            .find(|(_, s)| Arc::ptr_eq(s, slot))
            .map(|(id, _)| id.clone());
        if let Some(id) = id {
            slots.remove(&id);
        }
    }

    fn publish(&self, obs: Observation) {
        lock(&self.view).insert(obs.session_id.clone(), obs);
    }

    fn forget(&self, session: &Session) {
        lock(&self.view).remove(&session.record.session_id);
        lock(&self.ports).remove(&session.record.port);
        for path in [
            self.record_path(&session.record.session_id),
            self.log_path(&session.record.session_id),
        ] {
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove session file");
            }
        }
    }

    /// Waits until a starting (or waking) session accepts connections, then records it as
    /// running. On failure the session is killed and forgotten, and the error says why.
    async fn finish_start(
        &self,
        guard: &mut OwnedMutexGuard<Option<Session>>,
        timeout: Duration,
        verb: &str,
    ) -> Result<Observation, RuntimeError> {
        let Some(session) = guard.as_mut() else {
            return Err(RuntimeError::retryable("session vanished while starting"));
        };
        let session_id = session.record.session_id.clone();
        let port = session.record.port;
        let deadline = Instant::now() + timeout;
        let failure = loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break None;
            }
            if let Some(status) = session.exit_reason() {
                break Some(format!(
                    "session process exited before it was ready ({status})"
                ));
            }
            if Instant::now() >= deadline {
                break Some(format!(
                    "session not ready within {} ms: nothing accepted connections on port {port}",
                    timeout.as_millis()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        if let Some(reason) = failure {
            let output = self.output_tail(&session_id);
            self.terminate(guard, "not-ready").await?;
            tracing::warn!(session_id, reason, output, "session failed to start");
            let mut message = reason;
            if !output.is_empty() {
                message.push_str("; last output: ");
                message.push_str(&output);
            }
            return Err(RuntimeError::retryable(message));
        }
        session.record.state = RecordState::Running;
        self.write_record(&session.record)?;
        let obs = session.observation();
        self.publish(obs.clone());
        tracing::info!(session_id, url = %session.record.url, "session {verb}");
        Ok(obs)
    }

    /// Ends the session in `guard`: SIGTERM to its group (and SIGCONT, so a hibernated
    /// group can act on it), SIGKILL after the grace period, then forgets it. Children
    /// never outlive this; if some process cannot be killed, the session is kept and the
    /// error is retryable.
    async fn terminate(
        &self,
        guard: &mut OwnedMutexGuard<Option<Session>>,
        reason: &str,
    ) -> Result<(), RuntimeError> {
        let Some(session) = guard.as_mut() else {
            return Ok(());
        };
        let session_id = session.record.session_id.clone();
        let pgid = session.pgid();
        let grace = if reason == "stop" {
            self.config.stop_grace
        } else {
            // A session that failed to start gets no courtesy: it never served anyone.
            Duration::ZERO
        };
        if session.group_alive() {
            let first = if grace.is_zero() {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            signal_group(pgid, first)?;
            signal_group(pgid, Signal::SIGCONT)?;
            self.journal.record(
                Effect::Kill,
                &session_id,
                &format!("pgid={pgid} signal={} reason={reason}", first.as_str()),
            );
            if first == Signal::SIGTERM
                && !poll_until_mut(grace, session, |s| !s.group_alive()).await
            {
                tracing::warn!(session_id, %pgid, grace_ms = grace.as_millis() as u64, "session ignored SIGTERM; sending SIGKILL");
                signal_group(pgid, Signal::SIGKILL)?;
            }
            if !poll_until_mut(SIGNAL_SETTLE_TIMEOUT, session, |s| !s.group_alive()).await {
                return Err(RuntimeError::retryable(format!(
                    "session {session_id}: processes of group {pgid} survived SIGKILL"
                )));
            }
        }
        // Reap our own child now rather than leaving a zombie until the monitor's next look.
        let _ = session.exit_reason();
        self.forget(session);
        **guard = None;
        self.release_slot(guard);
        tracing::info!(session_id, reason, "session ended");
        Ok(())
    }

    /// The last lines the session wrote, on one line, for error messages.
    fn output_tail(&self, session_id: &str) -> String {
        let path = self.log_path(session_id);
        let Ok(mut file) = fs::File::open(&path) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join(" | ")
    }

    /// One look at every idle session: one whose main process died is cleaned up, forgotten
    /// and reported as `Failed`. Busy slots are skipped; the operation holding them sees
    /// the death itself.
    async fn check_sessions(&self) {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            let Ok(mut guard) = slot.try_lock_owned() else {
                continue;
            };
            let Some(session) = guard.as_mut() else {
                continue;
            };
            let Some(status) = session.exit_reason() else {
                continue;
            };
            let session_id = session.record.session_id.clone();
            let output = self.output_tail(&session_id);
            let mut message = format!("session process exited unexpectedly: {status}");
            if !output.is_empty() {
                message.push_str("; last output: ");
                message.push_str(&output);
            }
            tracing::warn!(session_id, message, "session died");
            // Its main process is gone; whatever it left running in its group goes too.
            if let Err(e) = self.terminate(&mut guard, "died").await {
                tracing::warn!(session_id, error = %e, "cannot clean up after a dead session");
                continue;
            }
            let _ = self
                .events
                .send(Observation::new(session_id, SessionState::Failed).with_message(message));
        }
    }
}

async fn monitor(inner: Weak<Inner>) {
    let Some(interval) = inner.upgrade().map(|i| i.config.monitor_interval) else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // The runtime holds the only strong references; once it is dropped, stop.
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.check_sessions().await;
    }
}

fn unknown_session(session_id: &str) -> RuntimeError {
    RuntimeError::permanent(format!("no session {session_id} runs on this agent"))
}

/// Session ids become file names and appear in command lines, so they are kept plain.
fn validate_session_id(session_id: &str) -> Result<(), RuntimeError> {
    let valid = (1..=128).contains(&session_id.len())
        && !session_id.starts_with(['.', '-'])
        && session_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(RuntimeError::permanent(format!(
            "invalid session id {session_id:?}: expected 1-128 of [A-Za-z0-9._-], not starting with '.' or '-'"
        )))
    }
}

/// Signals a whole process group; a group that no longer exists is not an error.
fn signal_group(pgid: Pid, signal: Signal) -> Result<(), RuntimeError> {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(RuntimeError::retryable(format!(
            "cannot send {} to process group {pgid}: {e}",
            signal.as_str()
        ))),
    }
}

/// Polls `done` until it holds or `timeout` passes; true when it held.
async fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn poll_until_mut(
    timeout: Duration,
    session: &mut Session,
    mut done: impl FnMut(&mut Session) -> bool,
) -> bool {
    poll_until(timeout, || done(session)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_plain() {
        for ok in ["s1", "sess-0193a", "a.b_c-d"] {
            assert!(validate_session_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(validate_session_id(bad).is_err(), "{bad:?}");
        }
    }
}
