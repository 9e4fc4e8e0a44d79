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

/// Removes the bench's own knobs (`STREAMSPACE_BENCH_…`) from a service's environment:
/// they are not settings of any service, and services refuse unknown settings.
pub fn without_bench_knobs(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("STREAMSPACE_BENCH_") {
            cmd.env_remove(k);
        }
    }
}

impl Supervised {
    pub fn start(spec: Spec, colour_index: usize) -> anyhow::Result<Self> {
        let mut cmd = Command::new(&spec.program);
        without_bench_knobs(&mut cmd);
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

/// When `up` restarts a service that exited, and when it gives up: exponential backoff
/// from `backoff` (doubling per restart within `window`, at most `backoff_cap`), and a
/// crash loop — `limit` restarts within `window` — ends the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub backoff: Duration,
    pub backoff_cap: Duration,
    pub limit: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            limit: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// What to do about a service that just exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Restart it after this delay; this is its `number`-th restart since `up` began.
    After { delay: Duration, number: usize },
    /// It is crash-looping; the reason says how.
    GiveUp(String),
}

/// One service's restarts.
#[derive(Clone, Debug, Default)]
pub struct RestartHistory {
    recent: VecDeque<std::time::Instant>,
    total: usize,
}

impl RestartHistory {
    /// Decides about an exit at `now`, and counts the restart it grants.
    pub fn on_exit(&mut self, now: std::time::Instant, policy: &RestartPolicy) -> Restart {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= policy.limit {
            return Restart::GiveUp(format!(
                "it exited again after {} restarts within {} s",
                self.recent.len(),
                policy.window.as_secs()
            ));
        }
        let doublings = u32::try_from(self.recent.len()).unwrap_or(u32::MAX).min(16);
        let delay = policy
            .backoff
            .saturating_mul(1 << doublings)
            .min(policy.backoff_cap);
        self.recent.push_back(now);
        self.total += 1;
        Restart::After {
            delay,
            number: self.total,
        }
    }
}

/// How a process ended, the way a person says it: `SIGKILL`, `exit code 3`.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => Signal::try_from(sig)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("signal {sig}")),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(4),
            limit: 3,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_then_a_crash_loop_gives_up() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(
            h.on_exit(t0, &p),
            Restart::After {
                delay: s(1),
                number: 1
            }
        );
        assert_eq!(
            h.on_exit(t0 + s(2), &p),
            Restart::After {
                delay: s(2),
                number: 2
            }
        );
        assert_eq!(
            h.on_exit(t0 + s(5), &p),
            Restart::After {
                delay: s(4),
                number: 3
            }
        );
        let Restart::GiveUp(why) = h.on_exit(t0 + s(10), &p) else {
            panic!("a fourth exit within the window is a crash loop");
        };
        assert!(why.contains("3 restarts within 60 s"), "{why}");
    }

    #[test]
    fn restarts_outside_the_window_are_forgotten() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        for i in 0..3 {
            h.on_exit(t0 + Duration::from_secs(i), &p);
        }
        // A minute of quiet: back to the first backoff, and the count goes on.
        assert_eq!(
            h.on_exit(t0 + Duration::from_secs(120), &p),
            Restart::After {
                delay: Duration::from_secs(1),
                number: 4
            }
        );
    }

    #[test]
    fn exits_are_described_by_signal_or_code() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            describe_exit(std::process::ExitStatus::from_raw(9)),
            "SIGKILL"
        );
        assert_eq!(
            describe_exit(std::process::ExitStatus::from_raw(3 << 8)),
            "exit code 3"
        );
    }
}
