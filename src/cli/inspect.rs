//! `bida inspect DIR`: verify a data directory without changing it.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The data directory to verify.
    dir: PathBuf,
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !args.dir.is_dir() {
        return Err(format!("{} is not a directory", args.dir.display()).into());
    }
    let report = bida::log::inspect::inspect(&args.dir)?;
    println!("{report}");
    Ok(if report.is_damaged() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
