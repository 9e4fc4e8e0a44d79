//! `streamspace-agent`: parse flags and configuration, install logging, run the agent
//! until SIGINT/SIGTERM. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamspace_agent::AgentConfig;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The StreamSpace agent: dials the command-dispatcher and runs sessions"
)]
struct Cli {
    /// TOML configuration file (settings: defaults, then this file, then STREAMSPACE_* env).
    #[arg(long, env = "STREAMSPACE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        None => run_agent(cli.config),
    }
}

fn run_agent(config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let _config = AgentConfig::load(config_file.as_deref()).context("loading configuration")?;
    anyhow::bail!("the connection loop is not implemented yet")
}
