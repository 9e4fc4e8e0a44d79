//! `streamspace-api-gateway`: parse flags and configuration, start telemetry, build the
//! app, serve until SIGINT/SIGTERM. `mint-token` prints a development token instead.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamspace_api_gateway::{App, GatewayConfig};
use streamspace_core::db::SchemaPolicy;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "StreamSpace api-gateway: the public REST and gRPC API"
)]
struct Flags {
    /// TOML configuration file (settings may also come from STREAMSPACE_* variables).
    #[arg(long, env = "STREAMSPACE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Apply pending database migrations at start-up instead of refusing to start.
    #[arg(long)]
    migrate: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a development JWT for a user. Works only when auth.dev_tokens is set.
    MintToken {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Include the admin role.
        #[arg(long)]
        admin: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let config: GatewayConfig =
        streamspace_core::config::load(flags.config.as_deref()).context("loading configuration")?;
    if let Some(Command::MintToken { user, admin }) = flags.command {
        let token = streamspace_api_gateway::auth::mint_dev_token(&config.auth, &user, admin)
            .map_err(|e| anyhow::anyhow!(e))?;
        println!("{token}");
        return Ok(());
    }
    let _telemetry =
        streamspace_core::telemetry::init_tracing("api-gateway", "info", config.log_json);
    let policy = if flags.migrate {
        SchemaPolicy::Migrate
    } else {
        SchemaPolicy::Require
    };
    let app = App::build(config, policy).await?;
    tracing::info!(http = %app.http_addr(), grpc = %app.grpc_addr(), "api-gateway listening");
    app.run_until_stopped(streamspace_api_gateway::shutdown_signal())
        .await?;
    Ok(())
}
