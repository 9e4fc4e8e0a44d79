//! A private PostgreSQL cluster for development and tests, without Docker.
//!
//! [`PgCluster::start`] finds the server binaries (`PATH`, then
//! `/usr/lib/postgresql/*/bin`), runs them as an unprivileged user when the caller is root
//! (Postgres refuses to run as root), creates a cluster in a temporary (or given) directory
//! and starts it on a free loopback port. The cluster is stopped and its temporary
//! directory removed when the handle drops — and also when the owning process dies by
//! panic, Ctrl-C or SIGKILL, because a small watchdog process outlives it and cleans up.
//!
//! [`testdb`] builds on it: one cluster per test binary, a fresh migrated database per test.
//! [`devcerts`] issues throw-away certificates for TLS on the agent link.
#![forbid(unsafe_code)]

pub mod devcerts;
pub mod testdb;

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's package for the server binaries; named in the error when they are missing.
pub const SERVER_PACKAGE_HINT: &str = "install the PostgreSQL server package, e.g. `apt-get install postgresql` \
     (Debian/Ubuntu), `dnf install postgresql-server` (Fedora) or `brew install postgresql` (macOS)";

/// How long a cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found in PATH or /usr/lib/postgresql/*/bin; {SERVER_PACKAGE_HINT}"
    )]
    NotInstalled,
    #[error(
        "running as root, but no unprivileged user (`postgres` or `nobody`) exists to run PostgreSQL"
    )]
    NoUnprivilegedUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {output}")]
    Command { what: String, output: String },
    #[error("postgres did not become ready within {secs}s; last log lines:\n{log}")]
    StartTimeout { secs: u64, log: String },
    #[error("postgres exited during start-up; last log lines:\n{log}")]
    Exited { log: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Durability trade-off of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync on, as in production: for running the system and for benchmarks.
    Durable,
    /// fsync and synchronous commit off: for tests, where a crash loses nothing of value.
    Fast,
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Keep data here between runs (created if missing). `None`: a temporary directory
    /// removed on stop.
    pub data_dir: Option<PathBuf>,
    pub durability: Durability,
    /// Fixed port; `None` picks a free one.
    pub port: Option<u16>,
    pub max_connections: u32,
    /// Extra server settings (`-c name=value`), e.g. `shared_preload_libraries`.
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            data_dir: None,
            durability: Durability::Fast,
            port: None,
            max_connections: 200,
            settings: Vec::new(),
        }
    }
}

/// A running private cluster. Stops (and removes its temporary directory) on drop.
#[derive(Debug)]
pub struct PgCluster {
    /// Holds `data/`, the log and the socket; removed on stop unless `keep_dir`.
    root: PathBuf,
    keep_dir: bool,
    port: u16,
    postgres: Option<Child>,
    watchdog: Option<Child>,
    /// What it was started with, to start it again after [`PgCluster::crash`].
    restart: Option<(Binaries, RunAs, ClusterOptions)>,
    /// The superuser's password for TCP connections (`None` for a cluster an older
    /// version created with trust everywhere).
    password: Option<String>,
}

/// File in the cluster's root holding the superuser's password.
const PASSWORD_FILE: &str = "superuser-password";

/// The server binaries of one installation.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub bin_dir: PathBuf,
}

impl Binaries {
    /// `PATH` first, then the newest `/usr/lib/postgresql/<version>/bin`.
    pub fn find() -> Result<Self> {
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("initdb").is_file() {
                    // Debian links initdb/pg_ctl into PATH but not `postgres`; follow the
                    // link to the real bin directory.
                    let real =
                        fs::canonicalize(dir.join("initdb")).map_err(io("resolving initdb"))?;
                    if let Some(bin_dir) = real.parent()
                        && bin_dir.join("postgres").is_file()
                    {
                        return Ok(Self {
                            bin_dir: bin_dir.to_owned(),
                        });
                    }
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, bin_dir)| Self { bin_dir })
            .ok_or(Error::NotInstalled)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Who runs the server: ourselves, or (as root) an unprivileged user.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
    switch: bool,
}

impl RunAs {
    fn detect() -> Result<Self> {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return Ok(Self {
                uid: euid.as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                switch: false,
            });
        }
        for name in ["postgres", "nobody"] {
            if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
                return Ok(Self {
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                    switch: true,
                });
            }
        }
        Err(Error::NoUnprivilegedUser)
    }

    fn command(&self, program: &Path) -> Command {
        if self.switch {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={}", self.uid))
                .arg(format!("--regid={}", self.gid))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    fn own(&self, path: &Path) -> Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .map_err(io(format!("chown {}", path.display())))?;
        }
        Ok(())
    }
}

/// Writes `text` to a new file readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

impl PgCluster {
    /// Creates (if needed) and starts a cluster; returns once it accepts connections.
    pub fn start(options: ClusterOptions) -> Result<Self> {
        let bins = Binaries::find()?;
        let run_as = RunAs::detect()?;
        let (root, keep_dir) = match &options.data_dir {
            Some(dir) => (dir.clone(), true),
            None => (
                std::env::temp_dir()
                    .join(format!("streamspace-pg-{}", uuid::Uuid::new_v4().simple())),
                false,
            ),
        };
        fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", root.display())))?;
        run_as.own(&root)?;

        let mut cluster = Self {
            root,
            keep_dir,
            port: 0,
            postgres: None,
            watchdog: None,
            restart: Some((bins.clone(), run_as, options.clone())),
            password: None,
        };
        let data = cluster.data_dir();
        let password_file = cluster.root.join(PASSWORD_FILE);
        if !data.join("PG_VERSION").is_file() {
            // TCP connections need the superuser's password (random, kept 0600 in the
            // root, which is 0700): other local users cannot reach the cluster. The Unix
            // socket lives in that root too, so trust on it reaches only its owner.
            let password = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            write_private(&password_file, &password)?;
            run_as.own(&password_file)?;
            let out = run_as
                .command(&bins.path("initdb"))
                .args([
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg("--no-sync")
                .arg(format!("--pwfile={}", password_file.display()))
                .arg("--pgdata")
                .arg(&data)
                .stdin(Stdio::null())
                .output()
                .map_err(io("running initdb"))?;
            if !out.status.success() {
                return Err(Error::Command {
                    what: "initdb".into(),
                    output: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }

        cluster.password = fs::read_to_string(&password_file)
            .ok()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty());

        let mut last_err = None;
        for _ in 0..3 {
            let port = match options.port {
                Some(p) => p,
                None => free_port()?,
            };
            match cluster.spawn(&bins, run_as, port, &options) {
                Ok(()) => return Ok(cluster),
                // A port taken between our probe and the server's bind: try another.
                Err(e @ Error::Exited { .. }) if options.port.is_none() => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(Error::NotInstalled))
    }

    fn spawn(
        &mut self,
        bins: &Binaries,
        run_as: RunAs,
        port: u16,
        options: &ClusterOptions,
    ) -> Result<()> {
        let log_path = self.root.join("postgres.log");
        let log = fs::File::create(&log_path).map_err(io("creating postgres.log"))?;
        let mut cmd = run_as.command(&bins.path("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            .arg("-c")
            .arg(format!("max_connections={}", options.max_connections))
            .args(["-c", "shared_buffers=128MB"]);
        for (name, value) in &options.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        if options.durability == Durability::Fast {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        // Own process group: a terminal's Ctrl-C reaches us, and we stop the server in
        // order, instead of the signal racing our clean-up.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("log handle"))?)
            .stderr(log);
        let child = cmd.spawn().map_err(io("starting postgres"))?;
        let pid = child.id();
        self.postgres = Some(child);
        self.port = port;
        self.watchdog = Some(self.spawn_watchdog(pid)?);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.postgres.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.postgres = None;
                self.kill_watchdog();
                return Err(Error::Exited {
                    log: tail(&log_path),
                });
            }
            if self.is_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::StartTimeout {
                    secs: START_TIMEOUT.as_secs(),
                    log: tail(&log_path),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The watchdog polls our pid; once we are gone (however we died) it stops the server
    /// and removes a temporary directory.
    fn spawn_watchdog(&self, pg_pid: u32) -> Result<Child> {
        let remove = if self.keep_dir {
            String::new()
        } else {
            self.root.display().to_string()
        };
        Command::new("sh")
            .arg("-c")
            .arg(
                r#"while kill -0 "$0" 2>/dev/null; do sleep 0.2; done
                   kill -INT "$1" 2>/dev/null
                   i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
                   kill -KILL "$1" 2>/dev/null
                   [ -n "$2" ] && rm -rf "$2"
                   exit 0"#,
            )
            .arg(std::process::id().to_string())
            .arg(pg_pid.to_string())
            .arg(remove)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting the clean-up watchdog"))
    }

    fn kill_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// `postmaster.pid` says `ready` on its 8th line once connections are accepted.
    fn is_ready(&self) -> bool {
        fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
            .unwrap_or(false)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `dbname` as the superuser `postgres` (with its password).
    pub fn url(&self, dbname: &str) -> String {
        match &self.password {
            Some(pw) => format!("postgres://postgres:{pw}@127.0.0.1:{}/{dbname}", self.port),
            None => format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port),
        }
    }

    /// [`PgCluster::url`] with the password masked, for printing.
    pub fn display_url(&self, dbname: &str) -> String {
        let pw = if self.password.is_some() { ":***" } else { "" };
        format!("postgres://postgres{pw}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Where the superuser's password is kept.
    pub fn password_file(&self) -> PathBuf {
        self.root.join(PASSWORD_FILE)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Crashes the server the way `pg_ctl stop -m immediate` does (SIGQUIT: no checkpoint,
    /// every connection dropped, crash recovery on the next start) and waits until it is
    /// gone. The data directory stays; [`PgCluster::restart`] brings it back.
    pub fn crash(&mut self) {
        self.kill_watchdog();
        if let Some(mut child) = self.postgres.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data (after [`PgCluster::crash`]);
    /// returns once it accepts connections, crash recovery done.
    pub fn restart(&mut self) -> Result<()> {
        if self.postgres.is_some() {
            return Ok(());
        }
        let (bins, run_as, options) = self.restart.clone().ok_or(Error::NotInstalled)?;
        let port = self.port;
        self.spawn(&bins, run_as, port, &options)
    }

    /// Fast shutdown (SIGINT), waiting for the server to exit; then removes a temporary
    /// directory. Calling it twice is harmless.
    pub fn stop(&mut self) {
        self.kill_watchdog();
        if let Some(mut child) = self.postgres.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        if !self.keep_dir {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
