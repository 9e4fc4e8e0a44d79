//! `cargo xtask up`: start everything, print how to use it, stop everything on Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use streamspace_devpg::{ClusterOptions, Durability, PgCluster};

use crate::stack::{Stack, StackOptions};

/// `println!` that ignores a closed stdout: shutting down cleanly matters more than the
/// banner reaching a terminal that is already gone.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Debug)]
pub struct UpOptions {
    pub fresh: bool,
    pub dir: PathBuf,
    pub agents: usize,
    pub dispatchers: usize,
}

pub async fn run(opts: UpOptions) -> anyhow::Result<()> {
    let dir = std::path::absolute(&opts.dir)?;
    if opts.fresh && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let pg_dir = dir.join("pg");
    let cluster = tokio::task::spawn_blocking(move || {
        PgCluster::start(ClusterOptions {
            data_dir: Some(pg_dir),
            durability: Durability::Durable,
            ..Default::default()
        })
    })
    .await??;
    say!(
        "PostgreSQL ready: {} (data in {})",
        cluster.url("postgres"),
        cluster.data_dir().display()
    );

    let mut stack = Stack::start(StackOptions {
        echo: true,
        default_ports: true,
        ..StackOptions::new(
            cluster.url("postgres"),
            dir.join("run"),
            opts.dispatchers.max(1),
            opts.agents,
        )
    })
    .await?;
    let user = stack.mint_token("dev", false).await?;
    let admin = stack.mint_token("ops", true).await?;
    print_banner(&stack, &user, &admin);

    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        crash = watch_for_crash(&mut stack) => Err(anyhow::anyhow!(crash)),
    };
    say!("\nstopping …");
    stack.stop().await;
    drop(cluster);
    say!("stopped; nothing left running");
    outcome
}

async fn watch_for_crash(stack: &mut Stack) -> String {
    loop {
        if let Some(report) = stack.crashed() {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_banner(stack: &Stack, user: &str, admin: &str) {
    let rest = stack.gateway_url();
    let grpc = stack.gateway_grpc_url();
    say!("\n================ StreamSpace is running ================");
    say!("REST API      {rest}/api/v1   (OpenAPI: {rest}/api/v1/openapi.json)");
    say!("gRPC API      {grpc}");
    for i in 0..stack.dispatchers.len() {
        say!("dispatcher    {}", stack.dispatcher_url(i));
    }
    for a in &stack.agents {
        say!(
            "agent         {} (process runtime, state in {})",
            a.agent_id,
            a.state_dir.display()
        );
    }
    say!("\nuser token (user \"dev\"):\n  export STREAMSPACE_TOKEN={user}");
    say!("admin token (user \"ops\"):\n  export STREAMSPACE_ADMIN_TOKEN={admin}");
    say!("\n1. curl — create a session and watch it start:");
    say!(
        "  curl -s -X POST {rest}/api/v1/sessions -H \"Authorization: Bearer $STREAMSPACE_TOKEN\" \\"
    );
    say!("       -H 'Content-Type: application/json' -d '{{\"template\":\"firefox-browser\"}}'");
    say!("  curl -s {rest}/api/v1/sessions -H \"Authorization: Bearer $STREAMSPACE_TOKEN\"");
    say!("\n2. the CLI (gRPC):");
    say!(
        "  STREAMSPACE_API_URL={grpc} cargo run -q -p streamspace-cli -- sessions create firefox-browser --wait"
    );
    say!("\n3. any gRPC client (reflection is on), e.g. grpcurl:");
    say!(
        "  grpcurl -plaintext -H \"authorization: Bearer $STREAMSPACE_TOKEN\" {} streamspace.api.v1.SessionService/ListSessions",
        grpc.trim_start_matches("http://")
    );
    say!("\nCtrl-C stops everything.");
    say!("========================================================\n");
}
