//! A whole StreamSpace system on this machine: a private PostgreSQL (or a given
//! database), command-dispatchers, agents (process runtime) and the api-gateway, each a
//! real child process configured through `STREAMSPACE_*` variables.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use sqlx::PgPool;
use streamspace_core::agents::{self, NewAgent};
use streamspace_devpg::devcerts::{DevCa, IssuedFiles};

use crate::supervisor::{Spec, Supervised, bin_dir};

/// Development-only gateway settings: dev tokens on (signed with the stack's own random
/// secret, [`StackOptions::signing_secret`]). Never used outside `up` and e2e runs.
pub const GATEWAY_DEV_ENV: &[(&str, &str)] = &[("STREAMSPACE_AUTH__DEV_TOKENS", "true")];

/// A fresh random HMAC secret (64 hex digits).
pub fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The signing secret kept in `path` (created 0600 with a random one on first use), so the
/// tokens `up` printed keep working when it is started again on the same directory — and
/// no secret is a constant in the source.
pub fn signing_secret_in(path: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Ok(secret) = std::fs::read_to_string(path) {
        let secret = secret.trim().to_owned();
        if secret.len() >= 32 {
            return Ok(secret);
        }
    }
    let secret = random_secret();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(secret)
}

/// How long a service may take to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Offline bound the stack configures (and status checks assume).
pub const OFFLINE_AFTER: Duration = Duration::from_secs(15);

/// What to start.
#[derive(Clone, Debug)]
pub struct StackOptions {
    pub database_url: String,
    /// Working files (agent state, logs) go here.
    pub run_dir: PathBuf,
    pub dispatchers: usize,
    pub agents: usize,
    pub gateway: bool,
    /// Echo children's logs to the terminal.
    pub echo: bool,
    /// Extra `STREAMSPACE_*` settings for every dispatcher.
    pub dispatcher_env: Vec<(String, String)>,
    /// Extra `STREAMSPACE_*` settings for every agent (runtime selection, templates).
    pub agent_env: Vec<(String, String)>,
    /// Prefer the services' documented default ports (REST 8080, gRPC 9090, dispatcher
    /// 7001) when free; e2e runs use any free ports.
    pub default_ports: bool,
    /// The services' database URL when it differs from `database_url` (which the stack's
    /// own pool uses), e.g. through a fault proxy.
    pub service_database_url: Option<String>,
    /// Extra `STREAMSPACE_*` settings for the gateway.
    pub gateway_env: Vec<(String, String)>,
    /// Put a loopback proxy between each agent and its dispatcher (to partition or cut
    /// them); the proxy is `AgentProc::proxy`.
    pub agent_proxies: bool,
    /// The gateway's HMAC signing secret (development tokens are minted with it).
    pub signing_secret: String,
    /// Agent ⇄ dispatcher over mutual TLS, with certificates from a CA the stack makes
    /// (`run_dir/tls`): the dispatcher's for `localhost`, one per agent naming its id.
    pub agent_link_tls: bool,
}

impl StackOptions {
    /// What e2e scenarios use: free ports, a gateway, nothing extra.
    pub fn new(database_url: String, run_dir: PathBuf, dispatchers: usize, agents: usize) -> Self {
        Self {
            database_url,
            run_dir,
            dispatchers,
            agents,
            gateway: true,
            echo: false,
            dispatcher_env: vec![],
            agent_env: vec![],
            default_ports: false,
            service_database_url: None,
            gateway_env: vec![],
            agent_proxies: false,
            signing_secret: random_secret(),
            agent_link_tls: false,
        }
    }
}

/// One service of the stack, by role and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceId {
    Dispatcher(usize),
    Agent(usize),
    Gateway,
}

/// A service whose process ended (see [`Stack::reap_exited`]).
#[derive(Debug)]
pub struct Exited {
    pub service: ServiceId,
    pub name: String,
    pub status: std::process::ExitStatus,
    /// Its last lines of output.
    pub output: String,
}

/// One agent of the stack.
#[derive(Debug)]
pub struct AgentProc {
    pub agent_id: String,
    pub credential: String,
    pub state_dir: PathBuf,
    /// Which dispatcher it dials (index into `dispatchers`).
    pub dispatcher: usize,
    /// Dial this URL instead (e.g. a proxy in front of the dispatcher).
    pub url_override: Option<String>,
    /// The agent's connection epoch when its current process was spawned.
    pub epoch_at_spawn: i64,
    pub proc: Option<Supervised>,
    /// With `StackOptions::agent_proxies`: the proxy it dials its dispatcher through.
    pub proxy: Option<crate::proxy::Proxy>,
    /// With `StackOptions::agent_link_tls`: present this certificate instead of the one
    /// naming the agent (to show a wrong one refused).
    pub tls_identity_override: Option<IssuedFiles>,
}

#[derive(Debug)]
pub struct DispatcherProc {
    pub name: String,
    pub port: u16,
    pub proc: Option<Supervised>,
}

#[derive(Debug)]
pub struct GatewayProc {
    pub http_port: u16,
    pub grpc_port: u16,
    pub proc: Option<Supervised>,
}

/// A running stack. Dropping it kills every child (`kill_on_drop`); [`Stack::stop`] does it
/// in order and also ends the agents' session processes.
#[derive(Debug)]
pub struct Stack {
    pub options: StackOptions,
    pub pool: PgPool,
    pub dispatchers: Vec<DispatcherProc>,
    pub agents: Vec<AgentProc>,
    pub gateway: Option<GatewayProc>,
    /// With `StackOptions::agent_link_tls`: the stack's CA and the dispatchers' certificate.
    pub tls: Option<StackTls>,
    colour: usize,
}

/// The certificates of a stack whose agent link is mutual TLS.
#[derive(Debug)]
pub struct StackTls {
    pub dir: PathBuf,
    pub ca: DevCa,
    pub ca_file: PathBuf,
    pub server: IssuedFiles,
}

impl StackTls {
    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = DevCa::new("streamspace local stack CA")?;
        let ca_file = ca.write_ca(&dir)?;
        let server = ca
            .server(&["localhost", "127.0.0.1"])?
            .write(&dir, "dispatcher")?;
        Ok(Self {
            dir,
            ca,
            ca_file,
            server,
        })
    }

    /// A client certificate naming `names`, written as `<stem>.pem`/`.key`.
    pub fn client(&self, stem: &str, names: &[&str]) -> anyhow::Result<IssuedFiles> {
        Ok(self.ca.client(names)?.write(&self.dir, stem)?)
    }
}

/// `preferred` when `use_preferred` and it is free (the documented defaults, so `up` has
/// stable addresses), else any free port.
fn port(use_preferred: bool, preferred: u16) -> anyhow::Result<u16> {
    if use_preferred && TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    free_port()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Stack {
    /// Starts every service and waits until each is healthy.
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.run_dir)
            .with_context(|| format!("creating {}", options.run_dir.display()))?;
        let pool = PgPool::connect(&options.database_url)
            .await
            .context("connecting to the database")?;
        streamspace_core::db::ensure_schema(&pool, streamspace_core::db::SchemaPolicy::Migrate)
            .await?;
        let tls = if options.agent_link_tls {
            Some(StackTls::new(options.run_dir.join("tls"))?)
        } else {
            None
        };
        let mut stack = Self {
            options,
            pool,
            dispatchers: Vec::new(),
            agents: Vec::new(),
            gateway: None,
            tls,
            colour: 0,
        };
        for i in 0..stack.options.dispatchers {
            let port = port(stack.options.default_ports && i == 0, 7001)?;
            stack.dispatchers.push(DispatcherProc {
                name: format!("dispatcher-{}", i + 1),
                port,
                proc: None,
            });
            stack.start_dispatcher(i).await?;
        }
        if stack.options.gateway {
            stack.start_gateway().await?;
        }
        for i in 0..stack.options.agents {
            let agent_id = format!("local-{}", i + 1);
            let credential = register_agent(&stack.pool, &agent_id).await?;
            let state_dir = stack.options.run_dir.join("agents").join(&agent_id);
            let dispatcher = i % stack.dispatchers.len().max(1);
            let proxy = if stack.options.agent_proxies {
                Some(crate::proxy::Proxy::start(stack.dispatchers[dispatcher].port).await?)
            } else {
                None
            };
            let url_override = proxy.as_ref().map(|p| stack.dispatcher_url_at(p.port));
            stack.agents.push(AgentProc {
                agent_id,
                credential,
                state_dir,
                dispatcher,
                url_override,
                epoch_at_spawn: 0,
                proc: None,
                proxy,
                tls_identity_override: None,
            });
            stack.start_agent(i).await?;
        }
        Ok(stack)
    }

    fn next_colour(&mut self) -> usize {
        self.colour += 1;
        self.colour
    }

    fn database_env(&self) -> Vec<(String, String)> {
        vec![(
            "STREAMSPACE_DATABASE__URL".into(),
            self.options
                .service_database_url
                .clone()
                .unwrap_or_else(|| self.options.database_url.clone()),
        )]
    }

    /// (Re)starts dispatcher `i` on its port and waits until it accepts connections.
    pub async fn start_dispatcher(&mut self, i: usize) -> anyhow::Result<()> {
        let colour = self.next_colour();
        let d = &self.dispatchers[i];
        let mut env = self.database_env();
        env.push(("STREAMSPACE_LISTEN".into(), format!("127.0.0.1:{}", d.port)));
        env.push(("STREAMSPACE_METRICS_LISTEN".into(), "127.0.0.1:0".into()));
        env.push(("STREAMSPACE_DISPATCHER_ID".into(), d.name.clone()));
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("STREAMSPACE_TLS__CERT_FILE", &tls.server.cert),
                ("STREAMSPACE_TLS__KEY_FILE", &tls.server.key),
                ("STREAMSPACE_TLS__CLIENT_CA_FILE", &tls.ca_file),
            ] {
                env.push((key.into(), path.display().to_string()));
            }
        }
        env.extend(self.options.dispatcher_env.iter().cloned());
        let spec = Spec {
            name: d.name.clone(),
            program: bin_dir()?.join("streamspace-command-dispatcher"),
            args: vec![],
            env,
            echo: self.options.echo,
        };
        let port = d.port;
        let mut proc = Supervised::start(spec, colour)?;
        wait_for_port(&mut proc, port).await?;
        self.write_pid_file(&proc);
        self.dispatchers[i].proc = Some(proc);
        Ok(())
    }

    pub fn dispatcher_url(&self, i: usize) -> String {
        self.dispatcher_url_at(self.dispatchers[i].port)
    }

    /// The URL an agent dials for a dispatcher (or a proxy in front of one) on `port`:
    /// `https://localhost` (the name in the dispatcher's certificate) under TLS.
    fn dispatcher_url_at(&self, port: u16) -> String {
        if self.tls.is_some() {
            format!("https://localhost:{port}")
        } else {
            format!("http://127.0.0.1:{port}")
        }
    }

    /// (Re)starts agent `i` and, when `wait_online`, waits until the database shows it
    /// online.
    pub async fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_agent(i).await?;
        self.wait_agent_online(i).await
    }

    pub async fn spawn_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.note_epoch(i).await?;
        let colour = self.next_colour();
        let url = match &self.agents[i].url_override {
            Some(u) => u.clone(),
            None => self.dispatcher_url(self.agents[i].dispatcher),
        };
        let a = &self.agents[i];
        std::fs::create_dir_all(&a.state_dir)?;
        let mut tls_env = Vec::new();
        if let Some(tls) = &self.tls {
            let identity = match &a.tls_identity_override {
                Some(files) => files.clone(),
                None => tls.client(&a.agent_id, &[&a.agent_id])?,
            };
            for (key, path) in [
                ("STREAMSPACE_TLS_CA_FILE", &tls.ca_file),
                ("STREAMSPACE_TLS_CERT_FILE", &identity.cert),
                ("STREAMSPACE_TLS_KEY_FILE", &identity.key),
            ] {
                tls_env.push((key.to_owned(), path.display().to_string()));
            }
        }
        let spec = Spec {
            name: a.agent_id.clone(),
            program: bin_dir()?.join("streamspace-agent"),
            args: vec![],
            env: vec![
                ("STREAMSPACE_DISPATCHER_URL".into(), url),
                ("STREAMSPACE_CREDENTIAL".into(), a.credential.clone()),
                (
                    "STREAMSPACE_STATE_DIR".into(),
                    a.state_dir.display().to_string(),
                ),
            ]
            .into_iter()
            .chain(tls_env)
            .chain(self.options.agent_env.iter().cloned())
            .collect(),
            echo: self.options.echo,
        };
        let proc = Supervised::start(spec, colour)?;
        self.write_pid_file(&proc);
        self.agents[i].proc = Some(proc);
        Ok(())
    }

    /// Records the agent's current epoch, so `wait_agent_online` can wait for a newer one.
    async fn note_epoch(&mut self, i: usize) -> anyhow::Result<()> {
        let a = agents::agent_get(&self.pool, &self.agents[i].agent_id, OFFLINE_AFTER).await?;
        self.agents[i].epoch_at_spawn = a.map_or(0, |a| a.connection_epoch);
        Ok(())
    }

    /// Waits until agent `i`'s process has a connection newer than any before it was
    /// spawned, and the database shows it online. (Checking "online" alone could see the
    /// previous, already dead connection before the dispatcher noticed its end.)
    pub async fn wait_agent_online(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let before = self.agents[i].epoch_at_spawn;
        loop {
            let a = agents::agent_get(&self.pool, &self.agents[i].agent_id, OFFLINE_AFTER).await?;
            if a.is_some_and(|a| a.online && a.connection_epoch > before) {
                return Ok(());
            }
            if let Some(p) = self.agents[i].proc.as_mut()
                && let Some(status) = p.exited()
            {
                bail!(
                    "{} exited with {status} during start-up:\n{}",
                    p.spec.name.clone(),
                    p.final_output().await
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not come online within {START_TIMEOUT:?}",
                    self.agents[i].agent_id
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn agent_online(&self, agent_id: &str) -> anyhow::Result<bool> {
        Ok(agents::agent_get(&self.pool, agent_id, OFFLINE_AFTER)
            .await?
            .is_some_and(|a| a.online))
    }

    /// SIGKILLs the gateway and waits until it is gone.
    pub async fn kill_gateway(&mut self) {
        if let Some(mut p) = self.gateway.as_mut().and_then(|g| g.proc.take()) {
            p.kill().await;
        }
    }

    /// (Re)starts the gateway — on its earlier ports when it ran before — and waits
    /// until it accepts connections.
    pub async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let colour = self.next_colour();
        let (http_port, grpc_port) = match &self.gateway {
            Some(g) => (g.http_port, g.grpc_port),
            None => (
                port(self.options.default_ports, 8080)?,
                port(self.options.default_ports, 9090)?,
            ),
        };
        // The stack's defaults first, so `gateway_env` (inside `gateway_env()`, pushed
        // after them) can override any of them: the later setting wins.
        let mut env = vec![
            (
                "STREAMSPACE_HTTP__LISTEN".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            (
                "STREAMSPACE_GRPC__LISTEN".into(),
                format!("127.0.0.1:{grpc_port}"),
            ),
            (
                "STREAMSPACE_HTTP__METRICS_LISTEN".into(),
                "127.0.0.1:0".into(),
            ),
        ];
        env.extend(self.gateway_env());
        let spec = Spec {
            name: "api-gateway".into(),
            program: bin_dir()?.join("streamspace-api-gateway"),
            args: vec![],
            env,
            echo: self.options.echo,
        };
        let mut proc = Supervised::start(spec, colour)?;
        wait_for_port(&mut proc, http_port).await?;
        self.write_pid_file(&proc);
        self.gateway = Some(GatewayProc {
            http_port,
            grpc_port,
            proc: Some(proc),
        });
        Ok(())
    }

    pub fn gateway_url(&self) -> String {
        self.gateway
            .as_ref()
            .map(|g| format!("http://127.0.0.1:{}", g.http_port))
            .unwrap_or_default()
    }

    pub fn gateway_grpc_url(&self) -> String {
        self.gateway
            .as_ref()
            .map(|g| format!("http://127.0.0.1:{}", g.grpc_port))
            .unwrap_or_default()
    }

    pub fn gateway_pid(&self) -> Option<i32> {
        self.gateway
            .as_ref()?
            .proc
            .as_ref()?
            .pid()
            .map(|p| p.as_raw())
    }

    /// A development token for `user` (admin when `admin`), minted by the gateway's own
    /// command with the stack's development signing key.
    pub async fn mint_token(&self, user: &str, admin: bool) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(bin_dir()?.join("streamspace-api-gateway"));
        crate::supervisor::without_bench_knobs(&mut cmd);
        cmd.arg("mint-token").arg("--user").arg(user);
        if admin {
            cmd.arg("--admin");
        }
        cmd.envs(self.gateway_env());
        let out = cmd
            .output()
            .await
            .context("running streamspace-api-gateway mint-token")?;
        if !out.status.success() {
            bail!(
                "mint-token failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Settings shared by the gateway process and its `mint-token` command.
    fn gateway_env(&self) -> Vec<(String, String)> {
        let mut env = self.database_env();
        env.extend(
            GATEWAY_DEV_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env.push((
            "STREAMSPACE_AUTH__HMAC_SECRET".into(),
            self.options.signing_secret.clone(),
        ));
        env.extend(self.options.gateway_env.iter().cloned());
        env
    }

    /// Sends `sig` to agent `i` (SIGKILL to crash it, SIGSTOP/SIGCONT to black-hole it).
    pub fn signal_agent(&self, i: usize, sig: Signal) -> anyhow::Result<()> {
        self.agents[i]
            .proc
            .as_ref()
            .context("agent not running")?
            .signal(sig)
    }

    /// SIGKILLs agent `i` and waits until it is gone.
    pub async fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents[i].proc.take() {
            p.kill().await;
        }
    }

    /// Pids of every process of the stack's services (not their sessions).
    pub fn service_pids(&self) -> Vec<i32> {
        self.dispatchers
            .iter()
            .filter_map(|d| d.proc.as_ref())
            .chain(self.agents.iter().filter_map(|a| a.proc.as_ref()))
            .chain(self.gateway.iter().filter_map(|g| g.proc.as_ref()))
            .filter_map(|p| p.pid().map(|p| p.as_raw()))
            .collect()
    }

    pub async fn kill_dispatcher(&mut self, i: usize) {
        if let Some(mut p) = self.dispatchers[i].proc.take() {
            p.kill().await;
        }
    }

    /// `<run_dir>/pids/<name>.pid` holds a service's current pid, so a person (or a test)
    /// can signal it: `kill -9 $(cat …/pids/local-1.pid)`.
    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.options
            .run_dir
            .join("pids")
            .join(format!("{name}.pid"))
    }

    fn write_pid_file(&self, proc: &Supervised) {
        let Some(pid) = proc.pid() else { return };
        let path = self.pid_file(&proc.spec.name);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, format!("{pid}\n")));
        if let Err(e) = written {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }

    /// Services whose process has exited since the last look, each reported once (its
    /// handle is dropped): which one, its name, how it ended, and its last lines.
    pub async fn reap_exited(&mut self) -> Vec<Exited> {
        let mut exited = Vec::new();
        let slots = self
            .dispatchers
            .iter_mut()
            .enumerate()
            .map(|(i, d)| (ServiceId::Dispatcher(i), &mut d.proc))
            .chain(
                self.agents
                    .iter_mut()
                    .enumerate()
                    .map(|(i, a)| (ServiceId::Agent(i), &mut a.proc)),
            )
            .chain(
                self.gateway
                    .iter_mut()
                    .map(|g| (ServiceId::Gateway, &mut g.proc)),
            );
        for (service, slot) in slots {
            let Some(status) = slot.as_mut().and_then(Supervised::exited) else {
                continue;
            };
            if let Some(mut proc) = slot.take() {
                exited.push(Exited {
                    service,
                    name: proc.spec.name.clone(),
                    status,
                    output: proc.final_output().await,
                });
            }
        }
        exited
    }

    /// (Re)starts one service the way the stack first started it.
    pub async fn restart(&mut self, service: ServiceId) -> anyhow::Result<()> {
        match service {
            ServiceId::Dispatcher(i) => self.start_dispatcher(i).await,
            ServiceId::Agent(i) => self.spawn_agent(i).await,
            ServiceId::Gateway => self.start_gateway().await,
        }
    }

    /// The name a service's logs and pid file go by.
    pub fn service_name(&self, service: ServiceId) -> String {
        match service {
            ServiceId::Dispatcher(i) => self.dispatchers[i].name.clone(),
            ServiceId::Agent(i) => self.agents[i].agent_id.clone(),
            ServiceId::Gateway => "api-gateway".into(),
        }
    }

    /// Stops everything in order: agents, gateway, dispatchers (SIGTERM, then SIGKILL),
    /// then every session process the agents left running.
    pub async fn stop(&mut self) {
        let grace = Duration::from_secs(5);
        for a in &mut self.agents {
            if let Some(mut p) = a.proc.take() {
                p.stop(grace).await;
            }
        }
        if let Some(g) = self.gateway.as_mut()
            && let Some(mut p) = g.proc.take()
        {
            p.stop(grace).await;
        }
        for d in &mut self.dispatchers {
            if let Some(mut p) = d.proc.take() {
                p.stop(grace).await;
            }
        }
        for a in &self.agents {
            kill_sessions(&a.state_dir);
        }
        self.pool.close().await;
    }
}

/// Registers `agent_id` (if new) and issues a fresh credential for it.
pub async fn register_agent(pool: &PgPool, agent_id: &str) -> anyhow::Result<String> {
    let new = NewAgent {
        agent_id: agent_id.into(),
        cluster: "local".into(),
        region: "local".into(),
        max_sessions: None,
    };
    match agents::agent_create(pool, &new).await {
        Ok(()) | Err(streamspace_core::Error::Conflict(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(agents::credential_issue(pool, agent_id)
        .await?
        .token
        .expose()
        .clone())
}

async fn wait_for_port(proc: &mut Supervised, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited with {status} during start-up:\n{}",
                proc.spec.name.clone(),
                proc.final_output().await
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on port {port} within {START_TIMEOUT:?}",
                proc.spec.name
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ends the session processes an agent recorded in its state directory (each runs in its
/// own process group, so it outlives the agent by design; the stack must not leave them).
pub fn kill_sessions(state_dir: &Path) {
    for pid in session_pids(state_dir) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Pids recorded in `state_dir/sessions/*.json`.
pub fn session_pids(state_dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("sessions")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .filter_map(|v| v.get("pid").and_then(serde_json::Value::as_i64))
        .filter_map(|p| i32::try_from(p).ok())
        .collect()
}
