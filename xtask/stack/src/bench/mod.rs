//! `cargo xtask bench`: the figures the performance issue asks for, measured on a private
//! PostgreSQL with `fsync` and `synchronous_commit` on, through the real services.
//!
//! Each benchmark runs `runs` times (1 in the quick profile, 3 in the full one) and writes
//! `target/bench/<name>.json` (every run, min / median / max, its target, the machine);
//! the whole run writes `target/bench/summary.json`, one object keyed by benchmark name,
//! and prints a table. Compare ratios between runs, not single times: the machine is
//! shared and noisy. Figures that involve an agent use its `record` runtime (nothing is
//! spawned), so they measure the pipeline, not `fork`; each file says which runtime.

mod gateway;
pub mod peers;
mod pipeline;
mod queue;
mod streams;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use serde_json::{Value, json};
use streamspace_devpg::{ClusterOptions, Durability, PgCluster};

/// How long and how often.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// One run of each, shorter windows: minutes on a clean clone.
    Quick,
    /// Three runs of each (median and range), longer windows, the depth series.
    Full,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub profile: Profile,
    /// Only these benchmarks (empty: all).
    pub only: Vec<String>,
    /// Runs per benchmark; by default 1 (quick) or 3 (full).
    pub runs: Option<usize>,
    /// Where the JSON files go.
    pub out_dir: PathBuf,
    /// Preload `pg_stat_statements` and keep each queue drain's top statements in its
    /// details (diagnostics: it costs a little, leave it off for reported figures).
    pub pgss: bool,
    /// Also run the peers' harness from this directory (`../shared/bench/peers`) in the
    /// same session and write our figures in their schema (`<out_dir>/peers`).
    pub peers: Option<PathBuf>,
}

/// What a figure must reach.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// At least `ratio` times another benchmark's median of the same run.
    RatioOf(&'static str, f64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::AtLeast(v) => format!(">= {v}"),
            Target::AtMost(v) => format!("<= {v}"),
            Target::RatioOf(other, r) => format!(">= {r} x {other}"),
        }
    }

    fn met(self, value: f64, medians: &BTreeMap<&str, f64>) -> Option<bool> {
        match self {
            Target::AtLeast(t) => Some(value >= t),
            Target::AtMost(t) => Some(value <= t),
            Target::RatioOf(other, r) => medians.get(other).map(|o| value >= r * o),
        }
    }

    fn json(self, unit: &str) -> Value {
        match self {
            Target::AtLeast(v) => json!({ "op": ">=", "value": v, "unit": unit }),
            Target::AtMost(v) => json!({ "op": "<=", "value": v, "unit": unit }),
            Target::RatioOf(other, r) => json!({ "op": ">=", "ratio": r, "of": other }),
        }
    }
}

/// One benchmark's definition.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    pub what: &'static str,
    pub unit: &'static str,
    pub target: Target,
    /// A second figure with its own target (a p99 beside a p50, latency beside rate).
    pub secondary: Option<(&'static str, &'static str, Target)>,
    /// What executed the commands.
    pub runtime: &'static str,
    run: Option<BenchFn>,
    /// Why there is no figure yet (when `run` is `None`).
    pub missing: &'static str,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Run {
    pub value: f64,
    pub secondary: Option<f64>,
    /// Anything else worth keeping (rates of sub-steps, series, settings).
    pub details: Value,
}

type BenchFn = for<'a> fn(&'a Env) -> Pin<Box<dyn Future<Output = anyhow::Result<Run>> + 'a>>;

/// What every benchmark gets: one PostgreSQL cluster (a fresh database per run), the
/// profile, and a scratch directory.
#[derive(Debug)]
pub struct Env {
    cluster: PgCluster,
    pub profile: Profile,
    pub run_dir: PathBuf,
    next: AtomicUsize,
    /// `pg_stat_statements` is loaded: benchmarks may report their top statements.
    pub pgss: bool,
}

impl Env {
    /// A new, empty database in the benchmark cluster; its URL.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        let name = format!("bench_{}", self.next.fetch_add(1, Ordering::Relaxed));
        let admin = sqlx::PgPool::connect(&self.cluster.url("postgres")).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(self.cluster.url(&name))
    }

    /// A scratch directory for one stack.
    pub fn scratch(&self, what: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.run_dir.join(format!("{what}-{n}"))
    }

    pub fn full(&self) -> bool {
        self.profile == Profile::Full
    }
}

macro_rules! bench_fn {
    ($f:path) => {
        Some(|env| Box::pin($f(env)))
    };
}

/// Every benchmark, in run order (the table of the performance issue).
pub fn specs() -> Vec<Spec> {
    vec![
        Spec {
            name: "queue-independent",
            what: "enqueue -> claim -> complete, 50k commands, no session (drain rate)",
            unit: "commands/s",
            target: Target::AtLeast(22_000.0),
            secondary: None,
            runtime: "none (queue calls only)",
            run: bench_fn!(queue::independent),
            missing: "",
        },
        Spec {
            name: "queue-fifo-deep",
            what: "same, 500 sessions x 100 commands (per-session FIFO)",
            unit: "commands/s",
            target: Target::RatioOf("queue-independent", 0.8),
            secondary: None,
            runtime: "none (queue calls only)",
            run: bench_fn!(queue::fifo_deep),
            missing: "",
        },
        Spec {
            name: "e2e-throughput",
            what: "bulk accepted -> delivered over gRPC -> executed -> completed, sustained",
            unit: "commands/s",
            target: Target::AtLeast(10_000.0),
            secondary: None,
            runtime: "record",
            run: bench_fn!(pipeline::e2e_throughput),
            missing: "",
        },
        Spec {
            name: "drain-wide",
            what: "10,000 commands for 10,000 sessions queued while the agent is down; connect -> last completion",
            unit: "s",
            target: Target::AtMost(1.0),
            secondary: None,
            runtime: "record",
            run: bench_fn!(pipeline::drain_wide),
            missing: "",
        },
        Spec {
            name: "drain-deep",
            what: "10,000 commands over 20 sessions, same",
            unit: "s",
            target: Target::AtMost(2.0),
            secondary: None,
            runtime: "record",
            run: bench_fn!(pipeline::drain_deep),
            missing: "",
        },
        Spec {
            name: "latency-200",
            what: "accept (REST POST /sessions) -> completed at 200/s offered, open loop; p50 (p99 second)",
            unit: "ms",
            target: Target::AtMost(3.0),
            secondary: Some(("p99", "ms", Target::AtMost(10.0))),
            runtime: "record",
            run: bench_fn!(gateway::latency_200),
            missing: "",
        },
        Spec {
            name: "gateway-create",
            what: "POST /api/v1/sessions to an offline agent, 32 users, saturation (p99 at 1,000/s second)",
            unit: "requests/s",
            target: Target::AtLeast(3_000.0),
            secondary: Some(("p99 at 1,000/s", "ms", Target::AtMost(20.0))),
            runtime: "none (agent offline)",
            run: bench_fn!(gateway::create),
            missing: "",
        },
        Spec {
            name: "gateway-get",
            what: "GET /api/v1/sessions/{id}, 32 users, saturation",
            unit: "requests/s",
            target: Target::AtLeast(20_000.0),
            secondary: None,
            runtime: "none (agent offline)",
            run: bench_fn!(gateway::get),
            missing: "",
        },
        Spec {
            name: "streams",
            what: "one dispatcher holding N simulated agent streams with heartbeats on time",
            unit: "streams",
            target: Target::AtLeast(10_000.0),
            secondary: Some(("RSS per stream", "KB", Target::AtMost(50.0))),
            runtime: "none (simulated agents: credential, own connection, Hello, heartbeats)",
            run: bench_fn!(streams::streams),
            missing: "",
        },
        Spec {
            name: "reconnect",
            what: "agent process start -> online (start -> first backlog command acknowledged second)",
            unit: "ms",
            target: Target::AtMost(100.0),
            secondary: Some(("first command acknowledged", "ms", Target::AtMost(50.0))),
            runtime: "record",
            run: bench_fn!(pipeline::reconnect),
            missing: "",
        },
        Spec {
            name: "idle",
            what: "database transactions/s of gateway + dispatcher + agent together with nothing to do",
            unit: "transactions/s",
            target: Target::AtMost(2.0),
            secondary: None,
            runtime: "record",
            run: bench_fn!(pipeline::idle),
            missing: "",
        },
    ]
}

/// Runs the selected benchmarks and writes their files; an error in one benchmark is
/// recorded in its entry and the others still run.
pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let all = specs();
    let known: Vec<&str> = all.iter().map(|s| s.name).collect();
    for name in &opts.only {
        if !known.contains(&name.as_str()) {
            anyhow::bail!("unknown benchmark {name:?}; known: {}", known.join(", "));
        }
    }
    let mut selected: Vec<&Spec> = all
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.iter().any(|o| o == s.name))
        .collect();
    // A ratio target needs its reference in the same run.
    for spec in selected.clone() {
        if let Target::RatioOf(other, _) = spec.target
            && !selected.iter().any(|s| s.name == other)
            && let Some(o) = all.iter().find(|s| s.name == other)
        {
            selected.insert(0, o);
        }
    }
    let runs = opts.runs.unwrap_or(match opts.profile {
        Profile::Quick => 1,
        Profile::Full => 3,
    });
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let run_dir = opts.out_dir.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let pgss = opts.pgss;
    let cluster = tokio::task::spawn_blocking(move || {
        PgCluster::start(ClusterOptions {
            durability: Durability::Durable,
            settings: {
                let mut s: Vec<(String, String)> = Vec::new();
                if pgss {
                    s.push((
                        "shared_preload_libraries".into(),
                        "pg_stat_statements".into(),
                    ));
                }
                if std::env::var_os("STREAMSPACE_BENCH_NO_AUTOVACUUM").is_some() {
                    s.push(("autovacuum".into(), "off".into()));
                }
                // Any other server setting, for investigations: `name=value,name=value`.
                if let Ok(extra) = std::env::var("STREAMSPACE_BENCH_PG_SETTINGS") {
                    for kv in extra.split(',').filter(|kv| !kv.is_empty()) {
                        if let Some((k, v)) = kv.split_once('=') {
                            s.push((k.trim().into(), v.trim().into()));
                        }
                    }
                }
                s
            },
            ..Default::default()
        })
    })
    .await??;
    let env = Env {
        cluster,
        profile: opts.profile,
        run_dir,
        next: AtomicUsize::new(0),
        pgss,
    };
    let machine = machine(&env).await;

    let mut results: Vec<(&Spec, Result<Vec<Run>, String>)> = Vec::new();
    for spec in &selected {
        let Some(f) = spec.run else {
            println!("{:<18} {}", spec.name, spec.missing);
            results.push((spec, Err(spec.missing.to_owned())));
            continue;
        };
        let mut done = Vec::new();
        let mut failure = None;
        for n in 0..runs {
            // The run's wall time, set-up included: what it adds to `cargo xtask bench`.
            let started = std::time::Instant::now();
            match f(&env).await {
                Ok(r) => {
                    println!(
                        "{:<18} run {}/{runs}: {:.2} {}{} ({:.1} s)",
                        spec.name,
                        n + 1,
                        r.value,
                        spec.unit,
                        match (r.secondary, spec.secondary) {
                            (Some(v), Some((label, unit, _))) => format!(", {label} {v:.2} {unit}"),
                            _ => String::new(),
                        },
                        started.elapsed().as_secs_f64()
                    );
                    done.push(r);
                }
                Err(e) => {
                    println!("{:<18} run {}/{runs} FAILED: {e:#}", spec.name, n + 1);
                    failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        results.push((
            spec,
            match failure {
                Some(e) => Err(e),
                None => Ok(done),
            },
        ));
    }

    let medians: BTreeMap<&str, f64> = results
        .iter()
        .filter_map(|(s, r)| Some((s.name, stats(r.as_ref().ok()?, |r| Some(r.value))?.1)))
        .collect();
    let mut summary = serde_json::Map::new();
    let mut table = vec![format!(
        "| name | value (median) | range | target | met | runtime |\n|---|---|---|---|---|---|"
    )];
    for (spec, result) in &results {
        let entry = entry(spec, result, &medians, &machine, opts.profile);
        std::fs::write(
            opts.out_dir.join(format!("{}.json", spec.name)),
            serde_json::to_string_pretty(&entry)?,
        )?;
        table.push(table_row(spec, &entry));
        summary.insert(spec.name.to_owned(), entry);
    }
    if let Some(peers_dir) = &opts.peers {
        let ours: Vec<(&str, Vec<Run>)> = results
            .iter()
            .filter_map(|(s, r)| Some((s.name, r.as_ref().ok()?.clone())))
            .collect();
        let postgres = json!({
            "server_version": machine["postgres"],
            "fsync": "on",
            "synchronous_commit": "on",
        });
        peers::run(peers_dir, &opts.out_dir.join("peers"), &ours, &postgres)?;
    }
    let summary_path = opts.out_dir.join("summary.json");
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&Value::Object(summary))?,
    )?;
    println!("\n{}\n", table.join("\n"));
    println!("written to {}", summary_path.display());
    if std::env::var_os("STREAMSPACE_BENCH_PG_SETTINGS").is_some() {
        // The cluster's directory goes with it; keep its log for the investigation.
        let kept = opts.out_dir.join("postgres.log");
        std::fs::copy(env.cluster.log_path(), &kept)?;
        println!("postgres log kept in {}", kept.display());
    }
    Ok(())
}

/// `(min, median, max)` of one figure over the runs.
fn stats(runs: &[Run], pick: impl Fn(&Run) -> Option<f64>) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = runs.iter().filter_map(pick).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Some((v[0], median, v[v.len() - 1]))
}

fn entry(
    spec: &Spec,
    result: &Result<Vec<Run>, String>,
    medians: &BTreeMap<&str, f64>,
    machine: &Value,
    profile: Profile,
) -> Value {
    let mut e = json!({
        "name": spec.name,
        "what": spec.what,
        "unit": spec.unit,
        "target": spec.target.json(spec.unit),
        "runtime": spec.runtime,
        "profile": profile,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "postgres": "private cluster, fsync=on, synchronous_commit=on",
        "machine": machine,
    });
    match result {
        Err(why) => {
            e["value"] = Value::Null;
            e["met"] = Value::Bool(false);
            e["error"] = Value::String(why.clone());
        }
        Ok(runs) => {
            let (min, median, max) = stats(runs, |r| Some(r.value)).unwrap_or_default();
            let mut met = spec.target.met(median, medians);
            e["value"] = json!(median);
            e["runs"] = json!(runs.iter().map(|r| r.value).collect::<Vec<_>>());
            e["min"] = json!(min);
            e["median"] = json!(median);
            e["max"] = json!(max);
            if let Target::RatioOf(other, _) = spec.target
                && let Some(o) = medians.get(other)
            {
                e["ratio"] = json!(median / o);
            }
            if let Some((label, unit, target)) = spec.secondary
                && let Some((min2, median2, max2)) = stats(runs, |r| r.secondary)
            {
                let met2 = target.met(median2, medians);
                e["secondary"] = json!({
                    "label": label, "unit": unit, "target": target.json(unit),
                    "value": median2, "min": min2, "median": median2, "max": max2,
                    "runs": runs.iter().map(|r| r.secondary).collect::<Vec<_>>(),
                    "met": met2,
                });
                met = match (met, met2) {
                    (Some(a), Some(b)) => Some(a && b),
                    _ => None,
                };
            }
            e["met"] = json!(met.unwrap_or(false));
            e["details"] = json!(runs.iter().map(|r| r.details.clone()).collect::<Vec<_>>());
        }
    }
    e
}

fn table_row(spec: &Spec, e: &Value) -> String {
    let fmt = |v: &Value| v.as_f64().map_or("-".to_owned(), |v| format!("{v:.2}"));
    let mut value = format!("{} {}", fmt(&e["value"]), spec.unit);
    let mut range = format!("{} – {}", fmt(&e["min"]), fmt(&e["max"]));
    let mut target = spec.target.describe();
    if let Some(r) = e["ratio"].as_f64() {
        value.push_str(&format!(" (ratio {r:.2})"));
    }
    if let Some((label, unit, t)) = spec.secondary
        && e["secondary"].is_object()
    {
        let s = &e["secondary"];
        value.push_str(&format!("; {label} {} {unit}", fmt(&s["value"])));
        range.push_str(&format!("; {} – {}", fmt(&s["min"]), fmt(&s["max"])));
        target.push_str(&format!("; {label} {}", t.describe()));
    }
    if e["value"].is_null() {
        value = e["error"].as_str().unwrap_or("no figure").to_owned();
        range = "-".into();
    }
    format!(
        "| {} | {value} | {range} | {target} | {} | {} |",
        spec.name,
        if e["met"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        },
        spec.runtime
    )
}

/// The machine the figures come from.
async fn machine(env: &Env) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let meminfo = read("/proc/meminfo");
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    let postgres = match sqlx::PgPool::connect(&env.cluster.url("postgres")).await {
        Ok(pool) => {
            let v: Option<String> = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await
                .ok();
            pool.close().await;
            v
        }
        Err(_) => None,
    };
    json!({
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_gib": mem_kib.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "postgres": postgres,
    })
}
