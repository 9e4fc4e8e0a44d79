//! The command queue against a real PostgreSQL: one fresh database per test.

mod concurrency;
mod fencing;
mod helpers;
mod lifecycle;
mod schema;
mod seed_regression;
