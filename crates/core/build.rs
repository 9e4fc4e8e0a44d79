//! `sqlx::migrate!` embeds `migrations/` at compile time, but on stable Rust the macro
//! cannot tell Cargo which files it read: without this, a migration added to an existing
//! checkout is missing from the next build (the services would start on the old schema).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
