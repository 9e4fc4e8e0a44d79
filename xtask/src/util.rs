//! Small helpers shared by tasks.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs `cmd` in the workspace root, echoing it; fails when it fails.
pub fn exec(mut cmd: Command) -> anyhow::Result<()> {
    cmd.current_dir(root());
    eprintln!("$ {}", describe(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(&cmd));
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Applies the migrations in `migrations/` (read at run time, so this works before the
/// crates holding compile-checked SQL have been built).
pub async fn apply_migrations(url: &str) -> anyhow::Result<()> {
    let migrator = sqlx::migrate::Migrator::new(root().join("migrations"))
        .await
        .context("reading migrations/")?;
    let pool = sqlx::PgPool::connect(url)
        .await
        .context("connecting to the database")?;
    migrator.run(&pool).await.context("applying migrations")?;
    pool.close().await;
    Ok(())
}
