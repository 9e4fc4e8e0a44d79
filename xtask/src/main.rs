//! `cargo xtask …`: the project's automation, one module per task. `cargo xtask ci` runs
//! exactly what `.ci/run` runs.
#![forbid(unsafe_code)]

mod ci;
mod flags;
mod migrate;
mod sqlx_prepare;
mod up;
mod util;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let flags = flags::Xtask::parse();
    match flags.task {
        flags::Task::Ci(f) => ci::run(f),
        flags::Task::Up(f) => up::run(f),
        flags::Task::E2e(f) => up::e2e(f),
        flags::Task::Chaos(f) => up::chaos(f),
        flags::Task::Bench(f) => up::bench(f),
        flags::Task::Migrate(f) => migrate::run(f),
        flags::Task::SqlxPrepare(f) => sqlx_prepare::run(f),
    }
}
