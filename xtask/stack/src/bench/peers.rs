//! `cargo xtask bench --peers`: graphile-worker and PgQueuer measured by
//! `../shared/bench/peers/run-all.sh` in the same session as our benchmarks, and our
//! queue's figures written in the peers' result schema next to theirs, so
//! `summarize.py` puts all of them in one table.
//!
//! What maps onto what (the peers' README defines their side):
//! - **drain**: `queue-independent` (50k no-session commands bulk-enqueued, then claimed
//!   and completed by 4 claimers, batches of 256: the queue calls the dispatcher makes)
//!   as variant `queue`; `e2e-throughput` (the whole pipeline, gRPC and the agent's
//!   `record` runtime) as variant `pipeline`.
//! - **latency**: `latency-200` — REST `POST /sessions` at 200/s open loop — with
//!   `enqueue_to_start` = scheduled send → the dispatcher pushed the command (`sent_at`)
//!   and `enqueue_to_complete` = scheduled send → `completed_at`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::Run;

/// The peers' harness next to this repository: `<repo>/../shared/bench/peers`.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/peers")
}

/// Runs the peers' `run-all.sh` into `out` (their own files), then writes ours beside
/// them and summarises. `ours` holds every run of each of our benchmarks by name.
pub fn run(
    peers_dir: &Path,
    out: &Path,
    ours: &[(&str, Vec<Run>)],
    postgres: &Value,
) -> anyhow::Result<()> {
    let script = peers_dir.join("run-all.sh");
    if !script.is_file() {
        bail!(
            "no peers harness at {} (expected run-all.sh there); pass --peers-dir",
            peers_dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    println!(
        "peers: running {} (installs graphile-worker and PgQueuer from npm/pip; ~6 min)",
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .arg(out)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        // Failed runs are listed in their summary; ours are still written.
        eprintln!(
            "peers: run-all.sh exited with {status}; see {}/summary.md",
            out.display()
        );
    }
    let dir = out.join("streamspace");
    std::fs::create_dir_all(&dir)?;
    let mut written = 0;
    for (name, runs) in ours {
        for (rep, r) in runs.iter().enumerate() {
            let Some((variant, mode, doc)) = as_peer_result(name, r, postgres) else {
                continue;
            };
            let path = dir.join(format!("streamspace-{variant}-{mode}-{}.json", rep + 1));
            std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
            written += 1;
        }
    }
    if written == 0 {
        bail!("none of queue-independent, e2e-throughput, latency-200 ran: nothing to compare");
    }
    let status = Command::new("python3")
        .arg(peers_dir.join("summarize.py"))
        .arg(out)
        .status()
        .context("running summarize.py")?;
    if !status.success() {
        bail!("summarize.py exited with {status}");
    }
    println!(
        "peers: side by side in {}",
        out.join("summary.md").display()
    );
    Ok(())
}

/// One of our runs in the peers' schema: `(variant, mode, document)`.
fn as_peer_result(
    name: &str,
    r: &Run,
    postgres: &Value,
) -> Option<(&'static str, &'static str, Value)> {
    let d = &r.details;
    let common = |variant: &str, mode: &str, brief: String, settings: Value| {
        let mut settings = settings;
        settings["brief"] = json!(brief);
        json!({
            "peer": "streamspace",
            "peer_version": env!("CARGO_PKG_VERSION"),
            "variant": variant,
            "mode": mode,
            "ok": true,
            "settings": settings,
            "postgres": postgres,
        })
    };
    match name {
        "queue-independent" => {
            let jobs = d["commands"].as_u64()?;
            let mut doc = common(
                "queue",
                "drain",
                format!(
                    "{} claimers x batch {}, queue calls only",
                    d["claimers"], d["batch"]
                ),
                json!({ "jobs": jobs }),
            );
            doc["insert"] = json!({ "jobs_per_s": d["enqueue_per_s"] });
            doc["drain"] = json!({ "jobs": jobs, "completed": jobs,
                                   "seconds": jobs as f64 / r.value, "jobs_per_s": r.value });
            Some(("queue", "drain", doc))
        }
        "e2e-throughput" => {
            let jobs = d["commands"].as_u64()?;
            let mut doc = common(
                "pipeline",
                "drain",
                "dispatcher + agent over gRPC, record runtime".into(),
                json!({ "jobs": jobs }),
            );
            doc["drain"] = json!({ "jobs": jobs, "completed": jobs,
                                   "seconds": jobs as f64 / r.value, "jobs_per_s": r.value });
            Some(("pipeline", "drain", doc))
        }
        "latency-200" => {
            let mut doc = common(
                "pipeline",
                "latency",
                "REST POST /sessions open loop -> dispatcher -> agent (record runtime)".into(),
                json!({ "rate": d["rate_per_s"], "seconds": d["window_s"] }),
            );
            doc["latency_ms"] = json!({
                "enqueue_to_start": d["start_ms"],
                "enqueue_to_complete": d["complete_ms"],
            });
            doc["producer"] = json!({
                "achieved_issue_rate": d["requests"].as_f64()? / d["window_s"].as_f64()?,
                "enqueue_call_ms": { "p50": d["accept_p50_ms"], "p99": d["accept_p99_ms"] },
            });
            Some(("pipeline", "latency", doc))
        }
        _ => None,
    }
}
