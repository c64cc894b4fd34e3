//! Read-only verification of a data directory, for `bida inspect`.
//!
//! Maps every segment read-only and verifies every record's checksum and
//! offset, the continuity between segments, and the checkpoint. It takes no
//! lock and writes nothing, so it can look at a directory a broker holds
//! (whose last record may then be mid-write). The tail of the last segment
//! is judged exactly as `Log::open` would under `TolerateTornTail`.

use std::fmt;
use std::path::{Path, PathBuf};

use super::disk::Disk;
use super::error::{Result, StorageError};
use super::mmap::SegmentMap;
use super::recovery::{classify_tail, scan_segment, Checkpoint, TailVerdict, CHECKPOINT_FILE};
use super::segment::{data_end, file_name, LOG_SUFFIX};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A torn tail that `open` truncates: not damage.
    TornTail {
        position: u64,
        bytes: u64,
        reason: String,
    },
    /// Damage `open` refuses (unless told to repair).
    Damaged { position: u64, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    pub path: PathBuf,
    pub base_offset: u64,
    pub records: u64,
    /// Offsets of the first and last valid records.
    pub offsets: Option<(u64, u64)>,
    pub bytes: u64,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectReport {
    pub dir: PathBuf,
    pub checkpoint: Option<Checkpoint>,
    pub segments: Vec<SegmentReport>,
    /// Problems that belong to no single segment.
    pub problems: Vec<String>,
}

impl InspectReport {
    pub fn is_damaged(&self) -> bool {
        !self.problems.is_empty()
            || self
                .segments
                .iter()
                .flat_map(|s| &s.findings)
                .any(|f| matches!(f, Finding::Damaged { .. }))
    }

    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }
}

/// Verifies the log in `dir` without changing anything.
pub fn inspect(dir: impl AsRef<Path>) -> Result<InspectReport> {
    inspect_on(&Disk::os(), dir.as_ref())
}

/// [`inspect`] on a given disk.
pub fn inspect_on(disk: &Disk, dir: &Path) -> Result<InspectReport> {
    let mut report = InspectReport {
        dir: dir.to_path_buf(),
        ..InspectReport::default()
    };
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    match disk.read(&checkpoint_path) {
        Ok(bytes) => match Checkpoint::decode(&bytes) {
            Ok(cp) => report.checkpoint = Some(cp),
            Err(reason) => report
                .problems
                .push(format!("{}: {reason}", checkpoint_path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io(checkpoint_path)(e)),
    }
    let bases = super::open::list_segments(disk, dir)?;
    let durable_bound = report.checkpoint.map_or(0, |c| c.durable_offset);
    let mut expected_base: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let path = dir.join(file_name(base, LOG_SUFFIX));
        let file = disk.open(&path, false).map_err(StorageError::io(&path))?;
        let len = file.size().map_err(StorageError::io(&path))? as usize;
        let map = SegmentMap::open_sealed(&*file, len).map_err(StorageError::io(&path))?;
        let bytes = map.bytes();
        let scan = scan_segment(bytes, base, u32::MAX, true);
        let mut findings = Vec::new();
        if let Some(expected) = expected_base {
            if expected != base {
                findings.push(Finding::Damaged {
                    position: 0,
                    reason: format!(
                        "segment starts at offset {base} but the previous one ends at {expected}"
                    ),
                });
            }
        }
        if last {
            let dirty_end = data_end(&*file, bytes, scan.valid_end);
            match classify_tail(bytes, &scan, dirty_end, durable_bound) {
                TailVerdict::Clean => {}
                TailVerdict::Torn { from, to, reason } => findings.push(Finding::TornTail {
                    position: from as u64,
                    bytes: (to - from) as u64,
                    reason,
                }),
                TailVerdict::Damaged { from, reason, .. } => findings.push(Finding::Damaged {
                    position: from as u64,
                    reason,
                }),
            }
            if scan.next_offset < durable_bound {
                report.problems.push(format!(
                    "the log ends at offset {} but the checkpoint records offsets below {durable_bound} as durable",
                    scan.next_offset
                ));
            }
        } else if scan.valid_end != len {
            let reason = scan.damage.as_ref().map_or_else(
                || "zero-filled space inside a sealed segment".to_string(),
                |d| d.reason.clone(),
            );
            findings.push(Finding::Damaged {
                position: scan.valid_end as u64,
                reason,
            });
        }
        expected_base = Some(scan.next_offset);
        report.segments.push(SegmentReport {
            path,
            base_offset: base,
            records: scan.records,
            offsets: (scan.records > 0).then(|| (base, scan.next_offset - 1)),
            bytes: scan.valid_end as u64,
            findings,
        });
    }
    Ok(report)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data directory {}", self.dir.display())?;
        match self.checkpoint {
            Some(cp) => writeln!(
                f,
                "checkpoint: offsets below {} durable, {}",
                cp.durable_offset,
                if cp.clean {
                    "clean shutdown"
                } else {
                    "not closed cleanly"
                }
            )?,
            None => writeln!(f, "checkpoint: none")?,
        }
        for s in &self.segments {
            let range = s.offsets.map_or_else(
                || "empty".to_string(),
                |(a, b)| format!("offsets {a}..={b}"),
            );
            writeln!(
                f,
                "{}  {} records  {range}  {} bytes",
                s.path.display(),
                s.records,
                s.bytes
            )?;
            for finding in &s.findings {
                match finding {
                    Finding::TornTail { position, bytes, reason } => writeln!(
                        f,
                        "  torn tail at byte {position}: {bytes} bytes that open will truncate ({reason})"
                    )?,
                    Finding::Damaged { position, reason } => writeln!(f, "  DAMAGED at byte {position}: {reason}")?,
                }
            }
        }
        for problem in &self.problems {
            writeln!(f, "DAMAGED: {problem}")?;
        }
        let verdict = if self.is_damaged() { "DAMAGED" } else { "ok" };
        write!(
            f,
            "{} segment(s), {} record(s): {verdict}",
            self.segments.len(),
            self.records()
        )
    }
}
