//! `streamspace-command-dispatcher`: parse flags and configuration, start telemetry, build
//! the app, run until SIGINT/SIGTERM.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use streamspace_command_dispatcher::{App, DispatcherConfig};
use streamspace_core::db::SchemaPolicy;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "StreamSpace command-dispatcher: delivers queued commands to agents"
)]
struct Flags {
    /// TOML configuration file (settings may also come from STREAMSPACE_* variables).
    #[arg(long, env = "STREAMSPACE_CONFIG")]
    config: Option<PathBuf>,
    /// Apply pending database migrations at start-up instead of refusing to start.
    #[arg(long)]
    migrate: bool,
    /// With --migrate: exit once the schema is current (for a migration Job).
    #[arg(long, requires = "migrate")]
    exit_after_migrate: bool,
    /// With --migrate: grant the named roles (GATEWAY,DISPATCHER; they must exist) exactly
    /// what each service uses, once the schema is current. Run it as the schema's owner.
    #[arg(long, requires = "migrate", value_name = "GATEWAY,DISPATCHER")]
    grant_roles: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let config: DispatcherConfig =
        streamspace_core::config::load(flags.config.as_deref()).context("loading configuration")?;
    let _telemetry =
        streamspace_core::telemetry::init_tracing("command-dispatcher", "info", config.log_json);
    let roles = match &flags.grant_roles {
        Some(list) => match list.split_once(',') {
            Some((gateway, dispatcher)) if !gateway.is_empty() && !dispatcher.is_empty() => {
                Some((gateway.trim().to_owned(), dispatcher.trim().to_owned()))
            }
            _ => anyhow::bail!("--grant-roles takes GATEWAY_ROLE,DISPATCHER_ROLE, got {list:?}"),
        },
        None => None,
    };
    if flags.exit_after_migrate || roles.is_some() {
        let pool = streamspace_core::db::connect(&config.database).await?;
        streamspace_core::db::ensure_schema(&pool, SchemaPolicy::Migrate).await?;
        tracing::info!("schema is current");
        if let Some((gateway, dispatcher)) = &roles {
            streamspace_core::db::grant_service_roles(&pool, gateway, dispatcher)
                .await
                .with_context(|| format!("granting roles {gateway} and {dispatcher}"))?;
            tracing::info!(gateway, dispatcher, "service roles granted");
        }
        if flags.exit_after_migrate {
            return Ok(());
        }
    }
    let policy = if flags.migrate {
        SchemaPolicy::Migrate
    } else {
        SchemaPolicy::Require
    };
    let app = App::build(config, policy).await?;
    tracing::info!(grpc = %app.grpc_addr(), "command-dispatcher listening");
    app.run_until_stopped(streamspace_command_dispatcher::shutdown_signal())
        .await?;
    Ok(())
}
