//! `cargo xtask chaos`: prove the promise under faults, Jepsen-style. Per scenario: a
//! fresh system (private PostgreSQL with fsync on, a fault proxy in front of it, two
//! dispatchers, three agents each behind a loopback proxy, the gateway), a steady workload
//! through the gateway from many users (REST and gRPC), faults injected at random moments
//! from a seeded schedule, then heal, settle, and account for every operation
//! ([`checker`]). See `docs/reliability.md`.

mod checker;
mod faults;
pub(crate) mod history;
pub(crate) mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use streamspace_devpg::{ClusterOptions, Durability, PgCluster};
use streamspace_faultnet::FaultProxy;
use tokio::sync::watch;

use crate::e2e::Profile;
use crate::stack::{Stack, StackOptions};
use checker::Counters;
use faults::{Env, Fault, FaultEvent};
use history::History;
use workload::{Client, Shape};

/// Every scenario: its name and the faults it draws from.
pub const SCENARIOS: &[(&str, &[Fault])] = &[
    ("agent-kill", &[Fault::AgentKill]),
    ("dispatcher-kill", &[Fault::DispatcherKill]),
    ("gateway-kill", &[Fault::GatewayKill]),
    ("postgres-restart", &[Fault::PostgresRestart]),
    ("db-network", &[Fault::DbNetwork]),
    ("agent-pause", &[Fault::AgentPause]),
    ("partition", &[Fault::Partition]),
    ("runtime-faults", &[Fault::RuntimeFaults]),
    ("reconnect-storm", &[Fault::ReconnectStorm]),
    ("mixed", &Fault::ALL),
];

/// Users of the workload; even ones speak REST, odd ones gRPC.
const USERS: usize = 6;
/// The dispatchers' lease in chaos runs (short, so rescues happen within a run).
const LEASE: Duration = Duration::from_millis(2_000);

#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub scenario: Option<String>,
    pub seed: Option<u64>,
    /// Accepted-command target per scenario (default: 240 quick, 10,000 full).
    pub commands: Option<usize>,
    pub profile: Profile,
    pub report: PathBuf,
    pub echo: bool,
}

/// One scenario's result, as written to the report.
#[derive(Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub seed: u64,
    pub pass: bool,
    pub duration_s: f64,
    pub workload_s: f64,
    pub settle_s: f64,
    pub sessions: usize,
    #[serde(flatten)]
    pub counters: Counters,
    pub faults: Vec<FaultEvent>,
    /// For a failing run: the affected sessions' histories (shortest first).
    pub histories: Vec<SessionHistory>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SessionHistory {
    pub session: String,
    pub why: Vec<String>,
    pub events: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    seed: u64,
    profile: String,
    scenarios: HashMap<&'a str, &'a ScenarioResult>,
}

/// Runs the selected scenarios; returns whether all were clean.
pub async fn run(opts: ChaosOptions) -> anyhow::Result<bool> {
    let seed = opts.seed.unwrap_or_else(rand::random);
    let selected: Vec<_> = SCENARIOS
        .iter()
        .filter(|(n, _)| opts.scenario.as_deref().is_none_or(|s| s == *n))
        .collect();
    if selected.is_empty() {
        let names: Vec<_> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        anyhow::bail!(
            "no scenario named {:?}; known: {}",
            opts.scenario.unwrap_or_default(),
            names.join(", ")
        );
    }
    let commands = opts.commands.unwrap_or(match opts.profile {
        Profile::Quick => 240,
        Profile::Full => 10_000,
    });
    eprintln!("chaos: seed {seed}, {commands} commands per scenario (replay with --seed {seed})");
    let mut results = Vec::new();
    for (i, (name, faults)) in selected.iter().enumerate() {
        eprintln!("[{}/{}] {name} …", i + 1, selected.len());
        let started = Instant::now();
        let result = match run_one(name, faults, seed, commands, opts.profile, opts.echo).await {
            Ok(r) => r,
            Err(e) => ScenarioResult {
                name: (*name).to_owned(),
                seed,
                pass: false,
                duration_s: started.elapsed().as_secs_f64(),
                workload_s: 0.0,
                settle_s: 0.0,
                sessions: 0,
                counters: Counters::default(),
                faults: vec![],
                histories: vec![],
                error: Some(format!("{e:#}")),
            },
        };
        eprintln!("{}", line(&result));
        if !result.pass {
            if let Some(e) = &result.error {
                eprintln!("  aborted: {e}");
            }
            for h in result.histories.iter().take(3) {
                eprintln!("  session {} ({}):", h.session, h.why.join("; "));
                for ev in &h.events {
                    eprintln!("    {ev}");
                }
            }
        }
        results.push(result);
    }
    println!("chaos: seed {seed}");
    for r in &results {
        println!("{}", line(r));
    }
    let report = Report {
        seed,
        profile: format!("{:?}", opts.profile).to_lowercase(),
        scenarios: results.iter().map(|r| (r.name.as_str(), r)).collect(),
    };
    if let Some(dir) = opts.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", opts.report.display()))?;
    eprintln!("report: {}", opts.report.display());
    Ok(results.iter().all(|r| r.pass))
}

/// The one-line summary of a scenario.
fn line(r: &ScenarioResult) -> String {
    let c = &r.counters;
    format!(
        "{:<17} {} ok={} info={} fail={} lost={} recovered={} unexpected={} duplicate_deliveries={} duplicate_effects={} order_violations={} stuck={} state_mismatches={} faults={} ({:.0}s)",
        r.name,
        if r.pass { "PASS" } else { "FAIL" },
        c.ok,
        c.info,
        c.fail,
        c.lost,
        c.recovered,
        c.unexpected,
        c.duplicate_deliveries,
        c.duplicate_effects,
        c.order_violations,
        c.stuck,
        c.state_mismatches,
        r.faults.len(),
        r.duration_s,
    )
}

async fn run_one(
    name: &str,
    faults: &[Fault],
    seed: u64,
    commands: usize,
    profile: Profile,
    echo: bool,
) -> anyhow::Result<ScenarioResult> {
    let started = Instant::now();
    let run_dir =
        std::env::temp_dir().join(format!("streamspace-chaos-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    // Durable: a PostgreSQL crash must not lose a commit the gateway already answered.
    let cluster = tokio::task::block_in_place(|| {
        PgCluster::start(ClusterOptions {
            durability: Durability::Durable,
            ..ClusterOptions::default()
        })
    })?;
    let url = cluster.url("postgres");
    let target = format!("127.0.0.1:{}", cluster.port()).parse()?;
    let db_proxy = FaultProxy::start(target).await?;
    let service_url = db_proxy.rewrite_url(&url);

    let runtime_failure_rate = match name {
        "runtime-faults" => "0.2",
        "mixed" => "0.05",
        _ => "0",
    };
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let lease_ms = LEASE.as_millis().to_string();
    let options = StackOptions {
        echo,
        service_database_url: Some(service_url),
        agent_proxies: true,
        dispatcher_env: env(&[
            ("STREAMSPACE_HEARTBEAT_INTERVAL_MS", "300"),
            ("STREAMSPACE_OFFLINE_AFTER_MS", "1000"),
            ("STREAMSPACE_POLL_INTERVAL_MS", "200"),
            ("STREAMSPACE_QUEUE__LEASE", &lease_ms),
            ("STREAMSPACE_QUEUE__RETRY_BASE", "100"),
            ("STREAMSPACE_QUEUE__RETRY_CAP", "1000"),
            ("STREAMSPACE_MAINTENANCE__RESCUE_INTERVAL_MS", "200"),
            ("STREAMSPACE_DATABASE__ACQUIRE_TIMEOUT_SECS", "2"),
        ]),
        agent_env: env(&[
            ("STREAMSPACE_RECONNECT_BASE_MS", "50"),
            ("STREAMSPACE_RECONNECT_CAP_MS", "1000"),
            ("STREAMSPACE_KEEPALIVE_INTERVAL_MS", "500"),
            ("STREAMSPACE_KEEPALIVE_TIMEOUT_MS", "1000"),
            ("STREAMSPACE_CONNECT_TIMEOUT_MS", "2000"),
            (
                "STREAMSPACE_FAULT_INJECTION__RUNTIME_FAILURE_RATE",
                runtime_failure_rate,
            ),
        ]),
        gateway_env: env(&[
            ("STREAMSPACE_RATE_LIMIT__ENABLED", "false"),
            ("STREAMSPACE_DATABASE__ACQUIRE_TIMEOUT_SECS", "2"),
        ]),
        ..StackOptions::new(url.clone(), run_dir.clone(), 2, 3)
    };
    let stack = Stack::start(options).await?;
    let mut clients = Vec::new();
    for u in 0..USERS {
        let user = format!("chaos-user-{u}");
        let token = stack.mint_token(&user, false).await?;
        let client = if u % 2 == 0 {
            Client::rest(stack.gateway_url(), token)
        } else {
            Client::grpc(&stack.gateway_grpc_url(), token)?
        };
        clients.push((user, client));
    }
    let state_dirs: HashMap<String, PathBuf> = stack
        .agents
        .iter()
        .map(|a| (a.agent_id.clone(), a.state_dir.clone()))
        .collect();
    let mut env = Env {
        stack,
        db_proxy,
        cluster,
        lease: LEASE,
    };

    // Per session: create, toggles, and (unless it is one of the sessions kept running)
    // delete. The full profile gives each session a longer life and keeps fewer alive at
    // the end: live sessions are processes on this machine, and hundreds of them slow
    // every agent down without testing anything new.
    let (toggles, keep_every, parallel) = match profile {
        Profile::Quick => (4, 4, 12),
        Profile::Full => (8, 10, 32),
    };
    let shape = Shape {
        sessions: workload::sessions_for(commands, toggles, keep_every),
        toggles,
        keep_every,
        parallel,
    };
    let history = Arc::new(History::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let workload = tokio::spawn(workload::run(clients, shape, seed, history.clone()));
    let mut rng = StdRng::seed_from_u64(seed ^ fxhash(name));
    let workload_started = Instant::now();
    let waiter = async {
        let r = workload.await;
        let _ = stop_tx.send(true);
        r
    };
    let (injected, finished) = tokio::join!(
        faults::inject(&mut env, faults, &mut rng, stop_rx, workload_started),
        waiter
    );
    finished.context("the workload panicked")?;
    let workload_s = workload_started.elapsed().as_secs_f64();
    let fault_log = injected?;

    // Settle: every command terminal, or the deadline.
    let settle_started = Instant::now();
    let settle_for = Duration::from_secs(match profile {
        Profile::Quick => 60,
        Profile::Full => 180,
    });
    while settle_started.elapsed() < settle_for {
        let (open,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM agent_commands WHERE status IN ('pending', 'sent', 'ack')",
        )
        .fetch_one(&env.stack.pool)
        .await?;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settle_s = settle_started.elapsed().as_secs_f64();

    let records = history.records();
    let (counters, evidence) = checker::check(&env.stack.pool, &records, &state_dirs).await?;
    let pass = counters.clean();
    let mut histories: Vec<SessionHistory> = evidence
        .suspects
        .iter()
        .map(|(session, why)| SessionHistory {
            session: session.clone(),
            why: why.clone(),
            events: evidence.history_of(session, &records),
        })
        .collect();
    histories.sort_by_key(|h| h.events.len());
    histories.truncate(10);

    env.stack.stop().await;
    drop(env);
    if std::env::var_os("CHAOS_KEEP_RUN_DIR").is_none() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(ScenarioResult {
        name: name.to_owned(),
        seed,
        pass,
        duration_s: started.elapsed().as_secs_f64(),
        workload_s,
        settle_s,
        sessions: shape.sessions,
        counters,
        faults: fault_log,
        histories,
        error: None,
    })
}

/// A stable hash of a scenario name, so each scenario gets its own fault schedule from
/// one seed.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
