//! `cargo xtask sqlx-prepare`: regenerate `.sqlx/`, the query data that lets `query!`
//! macros check SQL at compile time without a database.
//!
//! It starts a private cluster, applies `migrations/`, and rebuilds the crates holding
//! SQL with `DATABASE_URL` set and `SQLX_OFFLINE_DIR` pointing at a fresh directory, which
//! makes the macros write one file per query there. `--check` compares that directory with
//! the committed one instead of replacing it.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, bail};
use streamspace_devpg::{ClusterOptions, PgCluster};

use crate::flags::SqlxPrepareFlags;
use crate::util::{apply_migrations, cargo, exec, root};

/// Crates whose sources hold `query!` macros (SQL lives only in core).
const SQL_CRATES: &[&str] = &["streamspace-core"];

pub fn run(flags: SqlxPrepareFlags) -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let url = cluster.url("postgres");
    tokio::runtime::Runtime::new()?.block_on(apply_migrations(&url))?;

    let out = root().join("target/sqlx-prepare");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    for krate in SQL_CRATES {
        // Force the macros to re-expand: touch nothing, just clean this one package.
        let mut clean = cargo();
        clean.args(["clean", "--package", krate]);
        exec(clean)?;
        let mut check = cargo();
        check
            .args(["check", "--package", krate, "--all-targets"])
            .env("DATABASE_URL", &url)
            .env("SQLX_OFFLINE", "false")
            .env("SQLX_OFFLINE_DIR", &out);
        exec(check)?;
    }
    let fresh = read_dir(&out)?;
    if fresh.is_empty() {
        bail!(
            "no query data was written to {}; is SQLX_OFFLINE_DIR honoured?",
            out.display()
        );
    }
    let committed_dir = root().join(".sqlx");
    if flags.check {
        let committed = read_dir(&committed_dir).unwrap_or_default();
        if committed != fresh {
            let stale: Vec<_> = committed
                .keys()
                .filter(|k| !fresh.contains_key(*k))
                .collect();
            let new: Vec<_> = fresh
                .keys()
                .filter(|k| committed.get(*k) != fresh.get(*k))
                .collect();
            bail!(
                ".sqlx/ is out of date (new or changed: {new:?}; stale: {stale:?}); run `cargo xtask sqlx-prepare` and commit the result"
            );
        }
        eprintln!(".sqlx/ is up to date ({} queries)", fresh.len());
    } else {
        let _ = fs::remove_dir_all(&committed_dir);
        fs::create_dir_all(&committed_dir)?;
        for (name, body) in &fresh {
            fs::write(committed_dir.join(name), body)?;
        }
        eprintln!("wrote {} queries to .sqlx/", fresh.len());
    }
    Ok(())
}

fn read_dir(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("query-") && name.ends_with(".json") {
            out.insert(name, fs::read_to_string(entry.path())?);
        }
    }
    Ok(out)
}
