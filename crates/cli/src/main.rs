//! `streamspace`: the command-line client of the StreamSpace API (gRPC). Parses flags,
//! runs one command, prints its result as a table or JSON, and exits non-zero with the
//! server's message when the call fails.
#![forbid(unsafe_code)]

mod flags;
mod output;
mod run;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let flags = flags::Flags::parse();
    match run::run(flags).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
