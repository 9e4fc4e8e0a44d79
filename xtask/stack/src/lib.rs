//! The whole StreamSpace system on one machine, for `cargo xtask up` (run it) and
//! `cargo xtask e2e` (the original test plan, automated against real processes) and
//! `cargo xtask chaos` (faults under a steady workload, every operation accounted for).
#![forbid(unsafe_code)]

pub mod api;
pub mod bench;
pub mod chaos;
pub mod e2e;
pub mod otlp;
pub mod proxy;
pub mod report;
pub mod resources;
pub mod stack;
pub mod supervisor;
pub mod up;
