//! `bida repair DATA_DIR --topic T --partition P` (or `bida repair LOG_DIR`):
//! cut a damaged log at its first invalid record, after saying what that
//! drops and asking (or `--yes`). The broker must be stopped: the command
//! takes the data directory's lock.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bida::log::disk::{FileSystem, LockError, OsDisk};
use bida::log::inspect::{inspect, Finding};
use bida::log::{Log, Options, RecoveryMode, LOCK_FILE};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A broker's data directory (with --topic and --partition), or one
    /// log's directory.
    dir: PathBuf,
    #[arg(long, requires = "partition")]
    topic: Option<String>,
    #[arg(long, requires = "topic")]
    partition: Option<u32>,
    /// Cut without asking.
    #[arg(long)]
    yes: bool,
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (log_dir, lock_path, is_partition) = match (&args.topic, args.partition) {
        (Some(topic), Some(partition)) => (
            args.dir
                .join("topics")
                .join(topic)
                .join(partition.to_string()),
            // A broker holds its `_groups` log's lock while it runs.
            args.dir.join("_groups").join(LOCK_FILE),
            true,
        ),
        _ => (args.dir.clone(), args.dir.join(LOCK_FILE), false),
    };
    if !log_dir.is_dir() {
        return Err(format!("{} is not a log directory", log_dir.display()).into());
    }
    if let Some(parent) = lock_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _lock = match OsDisk.lock(&lock_path, "bida repair") {
        Ok(lock) => lock,
        Err(LockError::Held { holder }) => {
            return Err(format!(
                "{} is in use ({holder}): stop the broker first, then run this again",
                args.dir.display()
            )
            .into())
        }
        Err(LockError::Io(e)) => return Err(format!("{}: {e}", lock_path.display()).into()),
    };
    let report = inspect(&log_dir)?;
    if !report.is_damaged() {
        println!("{}: not damaged, nothing to repair", log_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    // What the cut drops: the damaged segment from the damage on, and
    // every segment after it.
    let Some((at, segment, position, reason)) =
        report.segments.iter().enumerate().find_map(|(i, s)| {
            s.findings.iter().find_map(|f| match f {
                Finding::Damaged { position, reason } => Some((i, s, *position, reason.clone())),
                Finding::TornTail { .. } => None,
            })
        })
    else {
        println!("{report}");
        return Err("the damage belongs to no segment (a checkpoint that does not match the records); open the log with RecoveryMode::Repair from code to cut it".into());
    };
    let cut_from = segment.base_offset + segment.records;
    let later = &report.segments[at + 1..];
    let later_records: u64 = later.iter().map(|s| s.records).sum();
    let later_bytes: u64 = later.iter().map(|s| s.bytes).sum();
    let file_len = std::fs::metadata(&segment.path).map_or(0, |m| m.len());
    println!(
        "{}: damaged at byte {position} of {}: {reason}",
        log_dir.display(),
        segment.path.display()
    );
    println!(
        "the repair keeps offsets {}..{cut_from} and cuts everything from offset {cut_from} on:",
        report.segments.first().map_or(0, |s| s.base_offset)
    );
    println!(
        "  {} byte(s) of {} from byte {position}",
        file_len.saturating_sub(position),
        segment.path.display()
    );
    println!(
        "  {} later segment(s): {later_records} record(s) that read as valid, {later_bytes} byte(s)",
        later.len()
    );
    if !args.yes {
        print!("Cut the log there? This cannot be undone. [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing changed");
            return Ok(ExitCode::FAILURE);
        }
    }
    let options = Options {
        recovery: RecoveryMode::Repair,
        lock_dir: !is_partition,
        ..Options::default()
    };
    let log = Log::open(&log_dir, options)?;
    let repaired = log.recovery_report().repaired.clone();
    let next = log.next_offset();
    log.close()?;
    println!(
        "repaired: {}; the log now ends at offset {next}",
        repaired.unwrap_or_else(|| "nothing to cut".into())
    );
    Ok(ExitCode::SUCCESS)
}
