//! Child processes of the stack: started with prefixed, coloured logs, watched, and
//! stopped (or killed, paused, resumed) on demand. A crashed child is reported with its
//! last log lines.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Lines of output kept per child for crash reports.
const RECENT_LINES: usize = 40;
const COLOURS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

/// Where the binaries of this build live (next to this executable).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the stack binary")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the stack binary has no directory")
}

/// How a supervised child is started.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Echo the child's output to the terminal (quiet in e2e runs).
    pub echo: bool,
}

/// A running child.
#[derive(Debug)]
pub struct Supervised {
    pub spec: Spec,
    child: Child,
    recent: Arc<Mutex<VecDeque<String>>>,
    /// The log pumps; they end at EOF, after the child exits.
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

impl Supervised {
    pub fn start(spec: Spec, colour_index: usize) -> anyhow::Result<Self> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            // Short errors: a crash report shows the error, not a backtrace.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Our own Ctrl-C handling stops children in order; the terminal's SIGINT must
            // not race it.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
        let recent = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT_LINES)));
        let colour = COLOURS[colour_index % COLOURS.len()];
        let prefix = format!("\x1b[{colour}m{:>14} |\x1b[0m", spec.name);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                out,
                prefix.clone(),
                spec.echo,
                recent.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, prefix, spec.echo, recent.clone())));
        }
        Ok(Self {
            spec,
            child,
            recent,
            pumps,
        })
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.id().map(|id| Pid::from_raw(id as i32))
    }

    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("child already exited")?;
        signal::kill(pid, sig).with_context(|| format!("sending {sig} to {}", self.spec.name))
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// After the child exited: its last lines, once its output has been read to the end.
    pub async fn final_output(&mut self) -> String {
        for p in self.pumps.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
        }
        self.recent_output()
    }

    /// The last lines the child printed.
    pub fn recent_output(&self) -> String {
        let lines = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL, and wait for the exit.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill().await;
        }
    }

    /// Waits for the child to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }
}

async fn pump(
    stream: impl tokio::io::AsyncRead + Unpin,
    prefix: String,
    echo: bool,
    recent: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            // A closed stdout (the terminal or a pipe went away) must not stop the pump:
            // the recent lines are still needed for crash reports.
            let _ = writeln!(std::io::stdout().lock(), "{prefix} {line}");
        }
        let mut r = recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == RECENT_LINES {
            r.pop_front();
        }
        r.push_back(line);
    }
}
