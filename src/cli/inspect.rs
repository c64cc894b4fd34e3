//! `bida inspect DIR`: verify a log, or every log of a broker's data
//! directory (`topics/*/*`, `_groups`, `_schedule`), without changing
//! anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bida::log::inspect::{inspect, InspectReport};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A broker's data directory, or one log's directory.
    dir: PathBuf,
}

/// The logs of a broker's data directory, with a name for each
/// (`topic/partition`, `_groups`, `_schedule`); `None` for a directory that
/// is not one (a log's own directory).
pub fn broker_logs(dir: &Path) -> Option<Vec<(String, PathBuf)>> {
    let topics = dir.join("topics");
    let is_broker = topics.is_dir() || dir.join("_groups").is_dir();
    if !is_broker {
        return None;
    }
    let mut logs = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&topics)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("topic.json").exists())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        let mut partitions: Vec<u32> = std::fs::read_dir(topics.join(&name))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        partitions.sort_unstable();
        for p in partitions {
            logs.push((
                format!("{name}/{p}"),
                topics.join(&name).join(p.to_string()),
            ));
        }
    }
    for special in ["_groups", "_schedule"] {
        if dir.join(special).is_dir() {
            logs.push((special.to_owned(), dir.join(special)));
        }
    }
    Some(logs)
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !args.dir.is_dir() {
        return Err(format!("{} is not a directory", args.dir.display()).into());
    }
    let Some(logs) = broker_logs(&args.dir) else {
        let report = inspect(&args.dir)?;
        println!("{report}");
        return Ok(verdict(report.is_damaged()));
    };
    let (mut damaged, mut records, mut segments) = (0usize, 0u64, 0usize);
    for (name, dir) in &logs {
        let report: InspectReport = inspect(dir)?;
        records += report.records();
        segments += report.segments.len();
        if report.is_damaged() {
            damaged += 1;
            println!("{name}: DAMAGED\n{report}");
            if let Some((topic, partition)) = name.split_once('/') {
                println!(
                    "  to cut it at the damage (broker stopped): bida repair {} --topic {topic} --partition {partition}",
                    args.dir.display()
                );
            }
        } else {
            println!(
                "{name}: ok, {} segment(s), {} record(s)",
                report.segments.len(),
                report.records()
            );
        }
    }
    println!(
        "data directory {}: {} log(s), {segments} segment(s), {records} record(s): {}",
        args.dir.display(),
        logs.len(),
        if damaged == 0 {
            "ok".to_owned()
        } else {
            format!("{damaged} DAMAGED")
        }
    );
    Ok(verdict(damaged > 0))
}

fn verdict(damaged: bool) -> ExitCode {
    if damaged {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
