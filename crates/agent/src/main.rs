//! `streamspace-agent`: parse flags and configuration, install logging, run the agent
//! until SIGINT/SIGTERM. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamspace_agent::{Agent, AgentConfig};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The StreamSpace agent: dials the command-dispatcher and runs sessions"
)]
struct Cli {
    /// TOML configuration file (settings: defaults, then this file, then STREAMSPACE_* env).
    #[arg(long, env = "STREAMSPACE_CONFIG")]
    config: Option<PathBuf>,
    /// Allow a plaintext http:// dispatcher_url to a host other than this machine (the
    /// credential and commands then cross the network in clear).
    #[arg(long)]
    insecure: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Liveness probe: exits 0 while the agent with this configuration's state_dir keeps
    /// its liveness file fresh, 1 otherwise.
    Alive {
        /// Older than this, the agent counts as wedged.
        #[arg(long, default_value_t = streamspace_agent::liveness::DEFAULT_MAX_AGE.as_secs())]
        max_age_secs: u64,
    },
    /// The tiny HTTP server the default session templates run.
    #[command(hide = true)]
    ServeSession {
        #[arg(long)]
        session: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::ServeSession {
            session,
            port,
            host,
        }) => {
            // A session process: one thread is plenty.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(streamspace_agent::serve_session::run(&session, host, port))
                .with_context(|| format!("serving session {session} on {host}:{port}"))
        }
        Some(Command::Alive { max_age_secs }) => {
            // Only state_dir matters here; the probe need not see the credential.
            let config: AgentConfig = streamspace_core::config::load(cli.config.as_deref())
                .context("loading configuration")?;
            let max_age = std::time::Duration::from_secs(max_age_secs);
            match streamspace_agent::liveness::check(&config.state_dir, max_age) {
                Ok(age) => {
                    println!("alive: liveness file written {}s ago", age.as_secs());
                    Ok(())
                }
                Err(why) => anyhow::bail!("not alive: {why}"),
            }
        }
        None => run_agent(cli.config, cli.insecure),
    }
}

fn run_agent(config_file: Option<PathBuf>, insecure: bool) -> anyhow::Result<()> {
    let mut config: AgentConfig =
        streamspace_core::config::load(config_file.as_deref()).context("loading configuration")?;
    config.insecure |= insecure;
    config.validate().context("invalid configuration")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The trace exporter's channel lives on the runtime.
    let _telemetry = {
        let _in_runtime = rt.enter();
        streamspace_core::telemetry::init_tracing("streamspace-agent", "info", config.log_json)
    };
    rt.block_on(async {
        let agent = Agent::build(config).await.context("starting the agent")?;
        let (stop, stop_rx) = watch::channel(false);
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
                _ = sigterm.recv() => tracing::info!("SIGTERM received; shutting down"),
            }
            let _ = stop.send(true);
            // Keep the sender alive: a dropped sender also means "stop", and says nothing new.
            std::future::pending::<()>().await;
        });
        agent.run(stop_rx).await.context("running the agent")
    })
}
