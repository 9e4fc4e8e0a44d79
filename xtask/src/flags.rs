//! Every task's flags, in one place.

use std::path::PathBuf;

#[derive(Debug, clap::Parser)]
#[command(name = "cargo xtask", about = "StreamSpace project automation")]
pub struct Xtask {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Debug, clap::Subcommand)]
pub enum Task {
    /// What CI runs: format check, clippy -D warnings, .sqlx freshness, all tests.
    Ci(CiFlags),
    /// Run the system locally: private PostgreSQL, migrations, services.
    Up(UpFlags),
    /// The original integration test plan against real processes.
    E2e(E2eFlags),
    /// Faults injected under a steady workload; every operation accounted for.
    Chaos(ChaosFlags),
    /// Queue throughput on a private PostgreSQL with fsync on (release build).
    Bench(BenchFlags),
    /// Apply migrations to DATABASE_URL (or the local development database).
    Migrate(MigrateFlags),
    /// Regenerate `.sqlx/` (the compile-time query data) against the migrations.
    SqlxPrepare(SqlxPrepareFlags),
}

#[derive(Debug, clap::Args)]
pub struct CiFlags {
    /// Skip fmt and clippy (tests only).
    #[arg(long)]
    pub tests_only: bool,
}

#[derive(Debug, clap::Args)]
pub struct UpFlags {
    /// Start from an empty database.
    #[arg(long)]
    pub fresh: bool,
    /// Where PostgreSQL and the agents keep their data between runs.
    #[arg(long, default_value = ".streamspace")]
    pub dir: PathBuf,
    /// How many agents (process runtime) to start.
    #[arg(long, default_value_t = 1)]
    pub agents: usize,
    /// How many command-dispatcher replicas to start.
    #[arg(long, default_value_t = 1)]
    pub dispatchers: usize,
}

#[derive(Debug, clap::Args)]
pub struct E2eFlags {
    /// Run one scenario, e.g. `3.2-command-retry`.
    #[arg(long)]
    pub scenario: Option<String>,
    /// `quick` (CI) or `full`.
    #[arg(long, default_value = "full")]
    pub profile: String,
    /// Show the services' logs.
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct ChaosFlags {
    /// Run one scenario (agent-kill, dispatcher-kill, gateway-kill, postgres-restart,
    /// db-network, agent-pause, partition, runtime-faults, reconnect-storm, mixed).
    #[arg(long)]
    pub scenario: Option<String>,
    /// Replays the fault schedule of an earlier run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Accepted commands to aim for per scenario (default: 240 quick, 10000 full).
    #[arg(long)]
    pub commands: Option<usize>,
    /// `quick` (CI) or `full`.
    #[arg(long, default_value = "full")]
    pub profile: String,
    /// Show the services' logs.
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct MigrateFlags {
    /// Database to migrate; defaults to DATABASE_URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

#[derive(Debug, clap::Args)]
pub struct SqlxPrepareFlags {
    /// Fail if `.sqlx/` is out of date instead of rewriting it.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchFlags {
    /// Passed to `streamspace-stack bench`: `--profile quick|full`, `--only NAME[,NAME]`,
    /// `--runs N`, `--out DIR`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}
