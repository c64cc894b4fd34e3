//! The `bida` command line: one subcommand module each under `cli/`.

// The command line is not library code: its `expect`s are on setup a
// command cannot go on without (a runtime, a bench's own broker), where a
// panic with the message is the report. The library denies them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.log_format);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bida: {e}");
            ExitCode::FAILURE
        }
    }
}
