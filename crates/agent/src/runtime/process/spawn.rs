//! Spawning a session's process, and the files that let a restarted agent find it again:
//! the record (`<id>.json`, written once the pid is known) and, before that, the spawn
//! intent (`<id>.spawning`).
//!
//! The order is what makes an agent crash at any instant recoverable: intent, spawn,
//! record, remove intent. A crash before the record leaves the intent, and the next agent
//! kills whatever process carries the session id in its environment (nobody was told of
//! it; the start command is redelivered and spawns afresh).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use streamspace_core::command::StartSession;
use tokio::process::Command;

use super::{Inner, RecordState, RuntimeError, Session, SessionRecord, Template, lock, procfs};
use crate::private_fs;
use crate::runtime::journal::{self, Effect};

/// Extension of the spawn-intent file.
pub(super) const INTENT_EXTENSION: &str = "spawning";
/// The environment variable that names a session in each of its processes.
pub(super) const SESSION_ID_ENV: &str = "SESSION_ID";
/// The port the session must listen on.
pub(super) const SESSION_PORT_ENV: &str = "SESSION_PORT";
/// What a session inherits from the agent's environment; nothing else. In particular not
/// `STREAMSPACE_CREDENTIAL`, with which a session could connect as the agent and receive
/// other users' commands.
const INHERITED_ENV: [&str; 10] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM",
];
/// Prefixes a start command's `env` may not set: the agent's own settings, and the dynamic
/// loader's (which would run code of the requester's choosing inside the session).
const FORBIDDEN_ENV_PREFIXES: [&str; 3] = ["STREAMSPACE_", "LD_", "DYLD_"];

/// Checks the variables a start command asks for: plain names, none reserved.
pub(super) fn validate_env(env: &BTreeMap<String, String>) -> Result<(), RuntimeError> {
    for key in env.keys() {
        let plain = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plain {
            return Err(RuntimeError::permanent(format!(
                "invalid environment variable name {key:?}: expected [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        let upper = key.to_ascii_uppercase();
        if let Some(prefix) = FORBIDDEN_ENV_PREFIXES
            .iter()
            .find(|p| upper.starts_with(*p))
        {
            return Err(RuntimeError::permanent(format!(
                "environment variable {key:?} is not allowed in a session ({prefix}* is reserved)"
            )));
        }
        if key == SESSION_ID_ENV || key == SESSION_PORT_ENV {
            return Err(RuntimeError::permanent(format!(
                "environment variable {key:?} is set by the runtime"
            )));
        }
    }
    Ok(())
}

impl Inner {
    pub(super) fn record_path(&self, session_id: &str) -> PathBuf {
        self.sessions_dir.join(format!("{session_id}.json"))
    }

    /// `<id>.spawning`: present from just before a session's process is spawned until its
    /// record (with the pid) is written.
    pub(super) fn intent_path(&self, session_id: &str) -> PathBuf {
        self.sessions_dir
            .join(format!("{session_id}.{INTENT_EXTENSION}"))
    }

    pub(super) fn log_path(&self, session_id: &str) -> PathBuf {
        self.sessions_dir.join(format!("{session_id}.log"))
    }

    /// Writes the record atomically (temporary file, then rename), so a crash never
    /// leaves a half-written record for the next agent to misread.
    pub(super) fn write_record(&self, record: &SessionRecord) -> Result<(), RuntimeError> {
        let path = self.record_path(&record.session_id);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| RuntimeError::retryable(format!("encoding session record: {e}")))?;
        private_fs::write(&tmp, &json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| RuntimeError::retryable(format!("writing {}: {e}", path.display())))
    }

    /// A port for a new session: free right now, and not given to another live session.
    /// Another program may still take it before the session binds it; the session then
    /// fails to start, and the retryable failure sends the command round again.
    fn allocate_port(&self) -> Result<u16, RuntimeError> {
        let mut ports = lock(&self.ports);
        for _ in 0..16 {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| RuntimeError::retryable(format!("cannot find a free port: {e}")))?
                .port();
            if ports.insert(port) {
                return Ok(port);
            }
        }
        Err(RuntimeError::retryable("cannot find a free port"))
    }

    #[tracing::instrument(name = "spawn session process", skip_all, fields(session_id = %session_id, template = %template_name))]
    pub(super) fn spawn(
        &self,
        session_id: &str,
        template_name: &str,
        template: &Template,
        spec: &StartSession,
    ) -> Result<Session, RuntimeError> {
        validate_env(&spec.env)?;
        let port = self.allocate_port()?;
        // Until the record names the pid, the intent file is all a restarted agent would
        // have to find the process by (see `recover_abandoned_spawns`).
        let intent = self.intent_path(session_id);
        if let Err(e) = private_fs::write(&intent, b"") {
            lock(&self.ports).remove(&port);
            return Err(RuntimeError::retryable(format!(
                "writing {}: {e}",
                intent.display()
            )));
        }
        let result = self.spawn_on(session_id, template_name, template, spec, port);
        if result.is_err() {
            lock(&self.ports).remove(&port);
        }
        // Recorded (or never spawned): the intent has served its purpose. Failing to
        // remove it is harmless, since a record or no process is what recovery then finds.
        if let Err(e) = fs::remove_file(&intent) {
            tracing::warn!(path = %intent.display(), error = %e, "cannot remove spawn intent");
        }
        result
    }

    fn spawn_on(
        &self,
        session_id: &str,
        template_name: &str,
        template: &Template,
        spec: &StartSession,
        port: u16,
    ) -> Result<Session, RuntimeError> {
        let agent = self.config.agent_exe.display().to_string();
        let expand = |s: &str| {
            s.replace("{session}", session_id)
                .replace("{port}", &port.to_string())
                .replace("{agent}", &agent)
        };
        let log_path = self.log_path(session_id);
        let log = private_fs::create(&log_path).map_err(|e| {
            RuntimeError::retryable(format!("creating {}: {e}", log_path.display()))
        })?;
        let log_err = log
            .try_clone()
            .map_err(|e| RuntimeError::retryable(format!("opening {}: {e}", log_path.display())))?;
        let program = expand(&template.program);
        if resolve_program(&program).is_none() {
            return Err(RuntimeError::permanent(format!(
                "cannot start {program:?} for template {template_name:?}: not found or not executable"
            )));
        }
        // Its own POSIX session, not only its own group: when the agent dies, a group
        // whose parent is in the same session becomes orphaned, and the kernel sends
        // SIGHUP + SIGCONT to an orphaned group with a stopped member — every hibernated
        // session would die (found by `cargo xtask chaos --scenario agent-kill`). A group
        // in a session of its own is orphaned from birth and gets no such signal.
        // `setsid(1)` execs in place (the child is not a group leader), so the pid stays
        // the session's. Without it, a process group is the fallback.
        let setsid = resolve_program("setsid");
        let mut command = match &setsid {
            Some(setsid) => {
                let mut c = Command::new(setsid);
                c.arg(&program);
                c
            }
            None => {
                let mut c = Command::new(&program);
                c.process_group(0);
                c
            }
        };
        command
            .args(template.args.iter().map(|a| expand(a)))
            .env_clear()
            .envs(
                INHERITED_ENV
                    .iter()
                    .filter_map(|k| Some((k, std::env::var_os(k)?))),
            )
            .envs(template.env.iter().map(|(k, v)| (k, expand(v))))
            .envs(&spec.env)
            .env(SESSION_ID_ENV, session_id)
            .env(SESSION_PORT_ENV, port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Its own group (and session): Ctrl-C on the agent's terminal and an agent
            // crash leave it running, and stop can signal every process it started at once.
            .kill_on_drop(false);
        let child = command.spawn().map_err(|e| {
            let message = format!("cannot start {program:?} for template {template_name:?}: {e}");
            match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                    RuntimeError::permanent(message)
                }
                _ => RuntimeError::retryable(message),
            }
        })?;
        // A freshly spawned child has not been waited for, so its pid is known.
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err(RuntimeError::retryable("spawned process has no pid"));
        };
        self.journal.record(
            Effect::Spawn,
            session_id,
            &format!("pid={pid} port={port} template={template_name}"),
        );
        let record = SessionRecord {
            session_id: session_id.to_owned(),
            pid,
            port,
            url: format!("http://{}:{port}/", self.config.advertise_host),
            template: template_name.to_owned(),
            state: RecordState::Starting,
            start_ticks: procfs::stat(pid).map(|st| st.start_ticks),
            started_unix_ms: journal::unix_ms(),
        };
        let session = Session {
            record,
            child: Some(child),
        };
        if let Err(e) = self.write_record(&session.record) {
            // Unrecorded, it could not be found after a restart: do not leave it running.
            let _ = killpg(session.pgid(), Signal::SIGKILL);
            self.journal.record(
                Effect::Kill,
                session_id,
                &format!("pgid={pid} reason=unrecorded"),
            );
            lock(&self.ports).remove(&port);
            return Err(e);
        }
        tracing::info!(
            session_id,
            pid,
            port,
            template = template_name,
            "session process spawned"
        );
        Ok(session)
    }
}

/// `program` as it would be executed: a path that names an executable file, or the first
/// executable of that name on `PATH`.
pub(super) fn resolve_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}
