//! `streamspace`: the command-line client of the StreamSpace API.
#![forbid(unsafe_code)]

fn main() {}
