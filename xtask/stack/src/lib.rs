//! The whole StreamSpace system on one machine, for `cargo xtask up` (run it) and
//! `cargo xtask e2e` (the original test plan, automated against real processes) and
//! `cargo xtask chaos` (faults under a steady workload, every operation accounted for).
#![forbid(unsafe_code)]

#[cfg(feature = "suites")]
pub mod api;
pub mod bench;
#[cfg(feature = "suites")]
pub mod chaos;
#[cfg(feature = "suites")]
pub mod e2e;
#[cfg(feature = "suites")]
pub mod otlp;
pub mod proxy;
#[cfg(feature = "suites")]
pub mod report;
#[cfg(feature = "suites")]
pub mod resources;
pub mod stack;
pub mod supervisor;
pub mod up;
