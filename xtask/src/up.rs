//! `cargo xtask up` and `cargo xtask e2e`: build the service binaries, then hand over to
//! `streamspace-stack`, which supervises them. (The stack is its own crate because it links
//! `streamspace-core`, whose compile-checked SQL must not stand between `xtask` and
//! `cargo xtask sqlx-prepare`.)

use std::process::Command;

use anyhow::Context;

use crate::flags::{BenchFlags, ChaosFlags, E2eFlags, UpFlags};
use crate::util::{cargo, exec, root};

/// Builds every binary of the workspace (debug), the ones the stack starts.
fn build_bins() -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    exec(build)
}

fn stack() -> Command {
    let mut cmd = Command::new(root().join("target/debug/streamspace-stack"));
    cmd.current_dir(root());
    cmd
}

pub fn run(flags: UpFlags) -> anyhow::Result<()> {
    build_bins()?;
    let mut cmd = stack();
    cmd.arg("up")
        .arg("--dir")
        .arg(&flags.dir)
        .arg("--agents")
        .arg(flags.agents.to_string())
        .arg("--dispatchers")
        .arg(flags.dispatchers.to_string());
    if flags.fresh {
        cmd.arg("--fresh");
    }
    // Become the stack (no xtask process in between), so Ctrl-C reaches a process that
    // stops everything in order instead of one that dies and orphans it.
    use std::os::unix::process::CommandExt as _;
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context("starting streamspace-stack"))
}

pub fn e2e(flags: E2eFlags) -> anyhow::Result<()> {
    build_bins()?;
    let mut cmd = stack();
    cmd.arg("e2e").arg("--profile").arg(&flags.profile);
    if let Some(s) = &flags.scenario {
        cmd.arg("--scenario").arg(s);
    }
    if flags.verbose {
        cmd.arg("--verbose");
    }
    exec(cmd).context("end-to-end scenarios failed")
}

pub fn chaos(flags: ChaosFlags) -> anyhow::Result<()> {
    build_bins()?;
    let mut cmd = stack();
    cmd.arg("chaos").arg("--profile").arg(&flags.profile);
    if let Some(s) = &flags.scenario {
        cmd.arg("--scenario").arg(s);
    }
    if let Some(seed) = flags.seed {
        cmd.arg("--seed").arg(seed.to_string());
    }
    if let Some(n) = flags.commands {
        cmd.arg("--commands").arg(n.to_string());
    }
    if flags.verbose {
        cmd.arg("--verbose");
    }
    exec(cmd).context("chaos scenarios failed")
}

/// Benchmarks are measured on an optimised build; the figures go to `target/bench/`.
pub fn bench(flags: BenchFlags) -> anyhow::Result<()> {
    let mut build = cargo();
    // The services too: the benchmarks start them from next to the stack binary. Only
    // what they start (the CLI and the Kubernetes stand-in would add half a minute to a
    // clean build).
    // Without default features: the agents here run the record runtime, so the agent is
    // built without its Kubernetes runtime (no Kubernetes client), and the stack without
    // the e2e and chaos suites. A clean build compiles about a sixth less.
    build.args(["build", "--release", "--bins", "--no-default-features"]);
    for package in [
        "streamspace-stack",
        "streamspace-api-gateway",
        "streamspace-command-dispatcher",
        "streamspace-agent",
    ] {
        build.args(["--package", package]);
    }
    exec(build)?;
    let mut cmd = Command::new(root().join("target/release/streamspace-stack"));
    cmd.current_dir(root()).arg("bench").args(&flags.args);
    exec(cmd)
}
