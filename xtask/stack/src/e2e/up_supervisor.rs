//! `up` supervises like a cluster would: the real `streamspace-stack up` process, as a
//! person runs it. Its agent is SIGKILLed (the seed report by hand): `up` restarts it, the
//! stack keeps serving, and a stop accepted while the agent was down completes. Then the
//! agent is killed again and again: `up` ends with a message naming it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::Ctx;
use crate::api::Api;
use crate::report::ScenarioReport;
use crate::supervisor::bin_dir;

/// Generous bound for anything this scenario waits on; reaching it is a failure.
const LIMIT: Duration = Duration::from_secs(120);
/// The crash-loop bound `up` is started with here.
const CRASH_LOOP_RESTARTS: usize = 3;

/// The `up` process and every line it printed so far.
struct Up {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    exited_at: Option<Instant>,
}

impl Up {
    fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        let mut child = Command::new(bin_dir()?.join("streamspace-stack"))
            .arg("up")
            .arg("--fresh")
            .arg("--dir")
            .arg(ctx.run_dir.join("up"))
            .args(["--restart-backoff-ms", "200"])
            .args(["--crash-loop-restarts", &CRASH_LOOP_RESTARTS.to_string()])
            .args(["--crash-loop-window-s", "600"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting streamspace-stack up")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            let echo = ctx.echo;
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if echo {
                        println!("{line}");
                    }
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        Ok(Self {
            child,
            lines,
            exited_at: None,
        })
    }

    /// The first line printed after line `from` that contains `needle`, and its index.
    async fn line(&mut self, from: usize, needle: &str) -> anyhow::Result<(usize, String)> {
        let deadline = Instant::now() + LIMIT;
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((i, l)) = lines
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| l.contains(needle))
                {
                    return Ok((i, l.clone()));
                }
            }
            // Once up has exited, its last lines may still be on their way through the pipe.
            if let Some(status) = self.child.try_wait()? {
                let exited_at = *self.exited_at.get_or_insert_with(Instant::now);
                if exited_at.elapsed() > Duration::from_secs(5) {
                    bail!(
                        "up exited ({status}) before printing {needle:?}:\n{}",
                        self.tail()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "up did not print {needle:?} within {LIMIT:?}:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn printed(&self) -> usize {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The pid in a pid file once it differs from `not` (a restarted service writes its own).
async fn pid_other_than(path: &std::path::Path, not: Option<i32>) -> anyhow::Result<i32> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| Some(*p) != not)
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not name a new process within {LIMIT:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut up = Up::start(ctx)?;
    let result = steps(ctx, &mut up, r).await;
    if up.child.try_wait()?.is_none() {
        // Ctrl-C, as a person stops it.
        if let Some(pid) = up.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
        }
        let _ = tokio::time::timeout(LIMIT, up.child.wait()).await;
    }
    result
}

async fn steps(ctx: &Ctx, up: &mut Up, r: &mut ScenarioReport) -> anyhow::Result<()> {
    up.line(0, "StreamSpace is running").await?;
    let (_, rest) = up.line(0, "REST API").await?;
    let base = rest
        .split_whitespace()
        .nth(2)
        .and_then(|u| u.strip_suffix("/api/v1"))
        .context("the banner's REST line")?
        .to_owned();
    let (_, token) = up.line(0, "export STREAMSPACE_TOKEN=").await?;
    let token = token
        .trim()
        .trim_start_matches("export STREAMSPACE_TOKEN=")
        .to_owned();
    let api = Api::new(base, token);
    let (session, _) = api.create_session("firefox-browser").await?;
    api.wait_state(&session, "running", LIMIT).await?;

    // The seed by hand: kill -9 the agent, DELETE at once, watch it complete.
    let pid_file = ctx.run_dir.join("up/run/pids/local-1.pid");
    let agent = pid_other_than(&pid_file, None).await?;
    let mark = up.printed();
    kill(Pid::from_raw(agent), Signal::SIGKILL)?;
    let stop = api.delete_session(&session).await?;
    r.check(
        "DELETE accepted while the agent is down",
        stop.status == 202,
        "HTTP 202",
        format!("HTTP {}", stop.status),
    );
    let (_, exited) = up.line(mark, "local-1 | exited").await?;
    r.check(
        "up reports the kill and schedules a restart",
        exited.contains("(SIGKILL); restart 1 in"),
        "local-1 | exited (SIGKILL); restart 1 in …",
        exited.trim(),
    );
    let restarted = pid_other_than(&pid_file, Some(agent)).await?;
    let stopped = api.wait_state(&session, "terminated", LIMIT).await;
    r.check(
        "the stop completes after the restart",
        stopped.is_ok(),
        "terminated",
        match &stopped {
            Ok(_) => format!("terminated (agent pid {agent} -> {restarted})"),
            Err(e) => format!("{e:#}"),
        },
    );
    let serving = match api.create_session("firefox-browser").await {
        Ok((again, _)) => api.wait_state(&again, "running", LIMIT).await.map(|_| ()),
        Err(e) => Err(e),
    };
    r.check(
        "the stack keeps serving",
        serving.is_ok(),
        "a new session runs",
        match &serving {
            Ok(()) => "a new session runs".to_owned(),
            Err(e) => format!("{e:#}"),
        },
    );

    // A crash loop: the agent dies as soon as it is back, again and again.
    // Restart 1 is behind us; restarts 2..=limit, then one exit too many.
    let mut pid = restarted;
    for kill_number in 1..=CRASH_LOOP_RESTARTS {
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        if kill_number == CRASH_LOOP_RESTARTS {
            break;
        }
        pid = pid_other_than(&pid_file, Some(pid)).await?;
    }
    let (_, gave_up) = up.line(mark, "crash-looping").await?;
    let status = tokio::time::timeout(LIMIT, up.child.wait())
        .await
        .context("up did not end after the crash loop")??;
    r.check(
        "a crash loop ends up, naming the service",
        gave_up.contains("local-1 is crash-looping") && !status.success(),
        "local-1 is crash-looping …; non-zero exit",
        format!("{} ({status})", gave_up.trim()),
    );
    up.line(mark, "stopped; nothing left running").await?;
    Ok(())
}
