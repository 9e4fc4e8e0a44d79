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
    /// Where the development cluster keeps its data between runs.
    #[arg(long, default_value = ".streamspace/pg")]
    pub data_dir: PathBuf,
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
