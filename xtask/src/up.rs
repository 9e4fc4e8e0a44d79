//! `cargo xtask up`: the whole system on one machine.
//!
//! Today it starts the private PostgreSQL (data kept in `.streamspace/pg`) and applies the
//! migrations; the services join as their issues land.

use anyhow::Context;
use streamspace_devpg::{ClusterOptions, Durability, PgCluster};

use crate::flags::UpFlags;
use crate::util::{apply_migrations, root};

pub fn run(flags: UpFlags) -> anyhow::Result<()> {
    let data_dir = root().join(&flags.data_dir);
    if flags.fresh && data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("removing {}", data_dir.display()))?;
    }
    let cluster = PgCluster::start(ClusterOptions {
        data_dir: Some(data_dir),
        durability: Durability::Durable,
        ..Default::default()
    })?;
    let url = cluster.url("postgres");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(apply_migrations(&url))?;
    println!("PostgreSQL ready: {url}");
    println!("migrations applied; the services are not wired into `up` yet. Ctrl-C stops.");
    rt.block_on(tokio::signal::ctrl_c())?;
    drop(cluster);
    Ok(())
}
