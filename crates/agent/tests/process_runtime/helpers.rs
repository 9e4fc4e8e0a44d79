//! Test helpers: a runtime over a temporary state directory that kills whatever it left
//! behind on drop (also when a test fails), and small `/proc` and HTTP probes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use streamspace_agent::runtime::process::{Catalog, ProcessRuntimeConfig, Template};
use streamspace_agent::runtime::{ProcessRuntime, SessionRuntime};
use streamspace_core::command::StartSession;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Generous bound for anything a test waits on; reaching it is a failure, not a timing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A state directory whose recorded sessions are killed when it is dropped, so a failing
/// test never leaves processes behind.
pub struct StateDir {
    dir: TempDir,
    /// Groups started in this directory, including ones whose record is already gone.
    seen: std::sync::Mutex<Vec<i32>>,
}

impl StateDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            seen: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self, catalog: Catalog) -> ProcessRuntimeConfig {
        let mut config = ProcessRuntimeConfig::new(self.path());
        config.agent_exe = agent_exe();
        config.catalog = catalog;
        config.monitor_interval = Duration::from_millis(50);
        config
    }

    pub async fn runtime(&self, catalog: Catalog) -> ProcessRuntime {
        ProcessRuntime::open(self.config(catalog)).await.unwrap()
    }

    /// Remembers a session's group for clean-up.
    pub fn track(&self, pgid: i32) {
        self.seen.lock().unwrap().push(pgid);
    }

    pub fn record_exists(&self, session: &str) -> bool {
        self.path()
            .join("sessions")
            .join(format!("{session}.json"))
            .exists()
    }

    pub fn journal_count(&self, effect: &str, session: &str) -> usize {
        streamspace_agent::runtime::journal::read(self.path())
            .unwrap()
            .iter()
            .filter(|e| e.effect == effect && e.session_id == session)
            .count()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let mut pgids = self.seen.lock().unwrap().clone();
        if let Ok(entries) = std::fs::read_dir(self.path().join("sessions")) {
            for entry in entries.flatten() {
                let Ok(text) = std::fs::read_to_string(entry.path()) else {
                    continue;
                };
                if let Some(pid) = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["pid"].as_i64())
                {
                    pgids.push(pid as i32);
                }
            }
        }
        for pgid in pgids {
            if !group_members(pgid).is_empty() {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

pub fn agent_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_streamspace-agent"))
}

/// The default catalog plus test templates.
pub fn catalog() -> Catalog {
    let sh = |script: &str, ready_ms: u64| Template {
        program: "sh".into(),
        // `sh -c SCRIPT NAME`: NAME becomes $0, which puts the session id in the command
        // line the runtime checks on adoption.
        args: vec!["-c".into(), script.into(), "{session}".into()],
        env: [("AGENT".to_owned(), "{agent}".to_owned())].into(),
        ready_timeout_ms: ready_ms,
    };
    Catalog::default()
        // A session with a second process in its group, to prove stop reaches all.
        .with(
            "with-helper",
            sh("sleep 300 & exec \"$AGENT\" serve-session --session \"$0\" --port \"$SESSION_PORT\"", 10_000),
        )
        // Ignores SIGTERM (inherited across exec), so stop must escalate to SIGKILL.
        .with(
            "stubborn",
            sh("trap '' TERM; sleep 300 & exec \"$AGENT\" serve-session --session \"$0\" --port \"$SESSION_PORT\"", 10_000),
        )
        // Never listens.
        .with("never-ready", sh("exec sleep 30", 300))
        // Dies before it listens, saying why.
        .with("crashes", sh("echo 'boom: no display' >&2; exit 3", 10_000))
}

pub fn start(template: &str) -> StartSession {
    StartSession {
        template: template.into(),
        user_id: Some("tester".into()),
        resources: None,
        home_volume: false,
        env: Default::default(),
    }
}

/// `(state, pgrp)` from `/proc/<pid>/stat`, or `None` when the process is gone.
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Live (non-zombie) processes of group `pgid`, with their states.
pub fn group_members(pgid: i32) -> Vec<(i32, char)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (state, pgrp) = proc_stat(pid)?;
            (pgrp == pgid && state != 'Z' && state != 'X').then_some((pid, state))
        })
        .collect()
}

/// Processes whose command line mentions `needle` (zombies excluded).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                && proc_stat(*pid).is_some_and(|(s, _)| s != 'Z')
        })
        .collect()
}

/// Polls `check` until it holds, failing the test at [`DEADLINE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET url` over a plain TCP connection: (status code, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Starts `session` and remembers its group for clean-up; returns (url, pid).
pub async fn started(
    dir: &StateDir,
    rt: &ProcessRuntime,
    session: &str,
    template: &str,
) -> (String, i32) {
    let obs = rt.start(session, &start(template)).await.unwrap();
    let pid = rt.pid(session).unwrap();
    dir.track(pid);
    (obs.url.unwrap(), pid)
}
