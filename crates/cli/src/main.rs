//! `streamspace`: the command-line client of the StreamSpace API (gRPC). Parses flags,
//! runs one command, prints its result as a table or JSON, and on failure exits with a
//! code per kind of failure (`error::Kind`) and the server's message.
#![forbid(unsafe_code)]

mod error;
mod flags;
mod output;
mod run;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let flags = flags::Flags::parse();
    let format = flags.output;
    match run::run(flags).await {
        Ok(code) => code,
        Err(e) => e.report(format),
    }
}
