//! The command queue against a real PostgreSQL: one fresh database per test.

mod concurrency;
mod fencing;
mod heads;
mod helpers;
mod lifecycle;
mod pipeline;
mod registry;
mod schema;
mod seed_regression;
mod sessions;
