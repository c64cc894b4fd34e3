//! `bida read`: print records of a log (opens it, so not while a broker runs).

use std::io::Write;
use std::process::ExitCode;

use bida::log::Log;

use super::LogArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    log: LogArgs,
    /// First offset to print (default: the start of the log).
    #[arg(long)]
    from: Option<u64>,
    /// Most records to print.
    #[arg(long, default_value_t = u64::MAX)]
    count: u64,
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let log = Log::open(&args.log.data, args.log.options())?;
    let mut offset = args.from.unwrap_or_else(|| log.start_offset());
    let mut left = args.count;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    while left > 0 {
        let batch = log.read(offset, left.min(4096) as usize, 4 << 20)?;
        if batch.records == 0 {
            break;
        }
        for record in batch.iter() {
            let record = record?;
            out.write_all(format!("{}\t", record.offset).as_bytes())?;
            out.write_all(&record.payload)?;
            out.write_all(b"\n")?;
        }
        left -= batch.records as u64;
        offset = batch.next_offset;
    }
    out.flush()?;
    log.close()?;
    Ok(ExitCode::SUCCESS)
}
