//! `cargo xtask ci`: exactly what `.ci/run` runs.

use crate::flags::CiFlags;
use crate::util::{cargo, exec};

pub fn run(flags: CiFlags) -> anyhow::Result<()> {
    if !flags.tests_only {
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--check"]);
        exec(fmt)?;
        let mut clippy = cargo();
        clippy.args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        exec(clippy)?;
        // What `cargo xtask bench` builds: the agent without its Kubernetes runtime, the
        // stack without the e2e and chaos suites.
        let mut clippy = cargo();
        clippy.args([
            "clippy",
            "--package",
            "streamspace-agent",
            "--package",
            "streamspace-stack",
            "--no-default-features",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        exec(clippy)?;
        // The committed query data must match the migrations and the code.
        crate::sqlx_prepare::run(crate::flags::SqlxPrepareFlags { check: true })?;
    }
    let mut test = cargo();
    test.args(["test", "--workspace"]);
    exec(test)?;
    let mut test = cargo();
    test.args([
        "test",
        "--package",
        "streamspace-agent",
        "--no-default-features",
        "--lib",
    ]);
    exec(test)?;
    // The original test plan against real processes; the quick profile keeps CI short.
    crate::up::e2e(crate::flags::E2eFlags {
        scenario: None,
        profile: "quick".into(),
        verbose: false,
    })?;
    // Every fault scenario once, with a fresh seed each run (printed, for replay); the
    // accounting must come out clean.
    crate::up::chaos(crate::flags::ChaosFlags {
        scenario: None,
        seed: None,
        commands: None,
        profile: "quick".into(),
        verbose: false,
    })?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}
