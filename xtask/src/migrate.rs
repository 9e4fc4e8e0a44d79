//! `cargo xtask migrate`: apply `migrations/` to a database.

use crate::flags::MigrateFlags;

pub fn run(flags: MigrateFlags) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(crate::util::apply_migrations(&flags.database_url))?;
    eprintln!("migrations applied");
    Ok(())
}
