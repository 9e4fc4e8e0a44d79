//! `cargo xtask up`: start everything, print how to use it, and keep it running like a
//! cluster would: a service that exits is restarted with backoff while the others keep
//! serving; a crash loop, or Ctrl-C, stops everything.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use streamspace_devpg::{ClusterOptions, Durability, PgCluster};
use tokio::time::Instant;

use crate::stack::{ServiceId, Stack, StackOptions};
use crate::supervisor::{Restart, RestartHistory, RestartPolicy, describe_exit};

/// How often `up` looks for services that exited.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

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
    pub restart: RestartPolicy,
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
        "PostgreSQL ready: {} (password in {}; data in {})",
        cluster.display_url("postgres"),
        cluster.password_file().display(),
        cluster.data_dir().display()
    );

    let mut stack = Stack::start(StackOptions {
        echo: true,
        default_ports: true,
        signing_secret: crate::stack::signing_secret_in(&dir.join("signing-secret"))?,
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
    print_banner(&stack, &user, &admin, &opts.restart);

    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        crash_loop = supervise(&mut stack, &opts.restart) => Err(anyhow::anyhow!(crash_loop)),
    };
    say!("\nstopping …");
    stack.stop().await;
    drop(cluster);
    say!("stopped; nothing left running");
    outcome
}

/// Restarts services that exit, each after its backoff, until one crash-loops; returns
/// why then. A restart that fails (the service exits again during start-up) counts as
/// another exit.
async fn supervise(stack: &mut Stack, policy: &RestartPolicy) -> String {
    let mut histories: HashMap<ServiceId, RestartHistory> = HashMap::new();
    let mut due: Vec<(Instant, ServiceId)> = Vec::new();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        for exited in stack.reap_exited().await {
            let how = describe_exit(exited.status);
            let history = histories.entry(exited.service).or_default();
            match history.on_exit(std::time::Instant::now(), policy) {
                Restart::After { delay, number } => {
                    say!(
                        "{:>14} | exited ({how}); restart {number} in {}",
                        exited.name,
                        seconds(delay)
                    );
                    due.push((Instant::now() + delay, exited.service));
                }
                Restart::GiveUp(why) => {
                    let mut report =
                        format!("{} is crash-looping: {why} (last exit: {how})", exited.name);
                    if !exited.output.trim().is_empty() {
                        report.push_str("; its last lines:\n");
                        report.push_str(&exited.output);
                    }
                    return report;
                }
            }
        }
        let now = Instant::now();
        let (ready, later): (Vec<_>, Vec<_>) = due.into_iter().partition(|(at, _)| *at <= now);
        due = later;
        for (_, service) in ready {
            let name = stack.service_name(service);
            match stack.restart(service).await {
                Ok(()) => say!("{name:>14} | restarted"),
                Err(e) => {
                    let history = histories.entry(service).or_default();
                    match history.on_exit(std::time::Instant::now(), policy) {
                        Restart::After { delay, number } => {
                            say!(
                                "{name:>14} | failed to start ({e:#}); restart {number} in {}",
                                seconds(delay)
                            );
                            due.push((Instant::now() + delay, service));
                        }
                        Restart::GiveUp(why) => {
                            return format!(
                                "{name} is crash-looping: {why}; the last start failed: {e:#}"
                            );
                        }
                    }
                }
            }
        }
    }
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

fn print_banner(stack: &Stack, user: &str, admin: &str, restart: &RestartPolicy) {
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
    match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {
            say!("traces        every service exports to {endpoint} (OTLP/gRPC)");
        }
        _ => say!(
            "traces        off; to send them to a local collector (Jaeger, Tempo, otelcol):\n              OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 cargo xtask up"
        ),
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
    if let Some(agent) = stack.agents.first() {
        let pid_file = stack.pid_file(&agent.agent_id);
        let auth = "-H \"Authorization: Bearer $STREAMSPACE_TOKEN\"";
        say!("\n4. reproduce the seed report: the agent dies, a stop is accepted while it is");
        say!("   down, and it completes once the agent is back (SESSION_ID from step 1):");
        say!(
            "  kill -9 $(cat {}); curl -s -X DELETE {rest}/api/v1/sessions/$SESSION_ID {auth}",
            pid_file.display()
        );
        say!("  curl -s {rest}/api/v1/sessions/$SESSION_ID/commands {auth}");
        say!(
            "  (the stop is pending while {} is down, completed after it restarts)",
            agent.agent_id
        );
    }
    say!(
        "\nA service that exits is restarted (backoff {}, doubling); {} restarts within {} end",
        seconds(restart.backoff),
        restart.limit,
        seconds(restart.window)
    );
    say!(
        "the run. Pids are in {}.",
        stack
            .pid_file("x")
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    say!("Ctrl-C stops everything.");
    say!("========================================================\n");
}
