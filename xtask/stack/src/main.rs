//! `streamspace-stack up | bench | e2e | chaos`: started by `cargo xtask up`, `bench`, `e2e`
//! and `chaos` after they build the service binaries this runs (`e2e` and `chaos` only
//! with the default `suites` feature).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
#[cfg(feature = "suites")]
use streamspace_stack::e2e::Profile;

#[derive(Debug, Parser)]
#[command(name = "streamspace-stack")]
enum Flags {
    /// Run the system: private PostgreSQL, dispatchers, agents, api-gateway.
    Up {
        /// Start from an empty database.
        #[arg(long)]
        fresh: bool,
        /// Where PostgreSQL and the agents keep their data between runs.
        #[arg(long, default_value = ".streamspace")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        agents: usize,
        #[arg(long, default_value_t = 1)]
        dispatchers: usize,
        /// First restart delay of a service that exited (doubles per restart).
        #[arg(long, default_value_t = 1_000)]
        restart_backoff_ms: u64,
        /// Restarts within `--crash-loop-window-s` after which `up` gives up.
        #[arg(long, default_value_t = 5)]
        crash_loop_restarts: usize,
        #[arg(long, default_value_t = 60)]
        crash_loop_window_s: u64,
    },
    /// The performance figures (fsync on): every benchmark, or `--only` some.
    Bench {
        #[arg(long, value_enum, default_value = "quick")]
        profile: streamspace_stack::bench::Profile,
        /// Run only these (repeat or comma-separate), e.g. `--only queue-fifo-deep`.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Runs per benchmark (default: 1 quick, 3 full).
        #[arg(long)]
        runs: Option<usize>,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Load pg_stat_statements and print the top statements of each measured window
        /// (queue and pipeline drains, gateway-create, latency-200, idle, streams' registering
        /// and connecting; diagnostics).
        #[arg(long)]
        pgss: bool,
        /// Also run graphile-worker and PgQueuer (`../shared/bench/peers`) in the same
        /// session and write our figures in their schema: `<out>/peers/summary.md`.
        #[arg(long)]
        peers: bool,
        /// Where the peers' harness lives.
        #[arg(long, requires = "peers")]
        peers_dir: Option<PathBuf>,
    },
    /// Faults under a steady workload, every operation accounted for.
    #[cfg(feature = "suites")]
    Chaos {
        #[arg(long)]
        scenario: Option<String>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        commands: Option<usize>,
        #[arg(long, value_enum, default_value = "full")]
        profile: Profile,
        #[arg(long)]
        verbose: bool,
        #[arg(long, default_value = "target/chaos/report.json")]
        report: PathBuf,
    },
    /// Run the end-to-end scenarios.
    #[cfg(feature = "suites")]
    E2e {
        /// Run only this scenario (e.g. 3.2-command-retry).
        #[arg(long)]
        scenario: Option<String>,
        #[arg(long, value_enum, default_value = "full")]
        profile: Profile,
        /// Show the services' logs.
        #[arg(long)]
        verbose: bool,
        #[arg(long, default_value = "target/e2e/report.json")]
        report: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Flags::parse() {
        Flags::Up {
            fresh,
            dir,
            agents,
            dispatchers,
            restart_backoff_ms,
            crash_loop_restarts,
            crash_loop_window_s,
        } => {
            let restart = streamspace_stack::supervisor::RestartPolicy {
                backoff: Duration::from_millis(restart_backoff_ms),
                limit: crash_loop_restarts,
                window: Duration::from_secs(crash_loop_window_s),
                ..Default::default()
            };
            streamspace_stack::up::run(streamspace_stack::up::UpOptions {
                fresh,
                dir,
                agents,
                dispatchers,
                restart,
            })
            .await
        }
        Flags::Bench {
            profile,
            only,
            runs,
            out,
            peers,
            peers_dir,
            pgss,
        } => {
            streamspace_stack::bench::run(streamspace_stack::bench::BenchOptions {
                profile,
                only,
                runs,
                out_dir: out,
                pgss,
                peers: peers.then(|| {
                    peers_dir.unwrap_or_else(streamspace_stack::bench::peers::default_dir)
                }),
            })
            .await
        }
        #[cfg(feature = "suites")]
        Flags::Chaos {
            scenario,
            seed,
            commands,
            profile,
            verbose,
            report,
        } => {
            let opts = streamspace_stack::chaos::ChaosOptions {
                scenario,
                seed,
                commands,
                profile,
                report,
                echo: verbose,
            };
            if streamspace_stack::chaos::run(opts).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        #[cfg(feature = "suites")]
        Flags::E2e {
            scenario,
            profile,
            verbose,
            report,
        } => {
            if streamspace_stack::e2e::run(profile, scenario, verbose, report).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}
