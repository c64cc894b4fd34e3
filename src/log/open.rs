//! Opening a log: the directory lock, the checkpoint, every segment
//! opened (sealed ones from their indexes, the last by a verifying scan
//! with torn-tail handling, `recovery.rs`), and the dedup window rebuilt
//! from the records.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use super::background::BackgroundState;
use super::dedup::DedupIndex;
use super::disk::{Disk, DiskFile, LockError};
use super::error::{Result, StorageError};
use super::flush::GroupCommit;
use super::mmap::{MapWriter, SegmentMap};
use super::options::{Background, Options, RecoveryMode, WritePath};
use super::record::{self, InnerMsgId};
use super::recovery::{
    classify_tail, scan_segment, Checkpoint, RecoveryReport, Scan, TailVerdict, CHECKPOINT_FILE,
};
use super::segment::{self, remove_segment_files, Segment, LOG_SUFFIX};
use super::workers::{Task, Workers};
use super::writer::DEDUP_PREFETCH_AHEAD;
use super::{Inner, Log, Writer};

/// The file whose exclusive lock marks a directory as in use.
pub const LOCK_FILE: &str = "LOCK";

/// Opens (or creates) the log in `dir` ([`Log::open`]).
pub(super) fn open(dir: &Path, mut options: Options) -> Result<Log> {
    options.validate()?;
    options.write_path = options.write_path.resolve(options.flush);
    let started = Instant::now();
    let dir = dir.to_path_buf();
    let disk = options.disk.clone();
    if !disk.exists(&dir) {
        disk.create_dir_all(&dir).map_err(StorageError::io(&dir))?;
        // The new directory's name, durable before any record in it is.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            segment::sync_dir(&disk, parent)?;
        }
    }
    let lock = if options.lock_dir {
        Some(lock_dir(&disk, &dir)?)
    } else {
        None
    };
    let quarantine = options.recovery == RecoveryMode::Quarantine;
    if !quarantine {
        remove_temporary_files(&disk, &dir)?;
    }
    let checkpoint = read_checkpoint(&disk, &dir);
    let mut report = RecoveryReport::default();
    let mut damage = None;
    let (segments, writer_parts) =
        open_segments(&dir, &options, checkpoint, &mut report, &mut damage)?;
    let (active, map) = writer_parts;
    let next_offset = active.next_offset();
    let last_timestamp_ms = segments
        .iter()
        .rev()
        .find_map(|s| s.last_timestamp_ms())
        .unwrap_or(0);
    let broken = damage.map(|cause| {
        tracing::error!(dir = %dir.display(), error = %cause, "the log is damaged: it serves reads up to the damage and refuses writes until `bida repair` cuts it there");
        Arc::new(StorageError::Damaged {
            dir: dir.clone(),
            cause: Arc::new(cause),
        })
    });
    let dedup = if broken.is_some() {
        // No append will ask it.
        DedupIndex::new(super::options::DedupWindow {
            records_max: 0,
            ..options.dedup
        })
    } else {
        rebuild_dedup(&segments, &options, next_offset)
    };
    // Clean: closed with everything flushed, and nothing appended since (a
    // later open writes no checkpoint; the records say if one was needed).
    report.clean_shutdown = checkpoint.is_some_and(|c| c.clean && c.durable_offset == next_offset);
    // What is known durable. After a crash, records read back may sit only
    // in the page cache (a killed process): they count as durable only once
    // a flush has synced the active segment and its name, and the segment
    // forgets what it knew so the first flush does. Sealed segments were
    // synced when they were sealed.
    let durable_offset = if report.clean_shutdown || broken.is_some() {
        next_offset
    } else {
        active.forget_durable();
        checkpoint
            .map_or(0, |c| c.durable_offset)
            .max(active.base_offset)
            .min(next_offset)
    };
    report.segments = segments.len();
    report.next_offset = next_offset;
    report.duration = started.elapsed();
    log_report(&dir, &report);

    // A log of its own gets two workers: one can prefault or flush while
    // the other runs a background pass.
    let workers = match &options.background {
        Background::Threads => {
            Some(Workers::start(PRIVATE_WORKERS, "bida-log-bg").map_err(StorageError::io(&dir))?)
        }
        Background::Pool(workers) => Some(Arc::clone(workers)),
        Background::Manual => None,
    };
    let prefaults =
        workers.is_some() && options.write_path == WritePath::Mmap && options.prefault_bytes > 0;
    let prefault_enabled = AtomicBool::new(prefaults);
    let checkpointed = checkpoint.map_or(0, |c| c.durable_offset);
    let filesystem = disk.filesystem_id(&dir);
    let inner = Arc::new(Inner {
        dir,
        options,
        _lock: lock,
        flush_observer: std::sync::OnceLock::new(),
        writer: Mutex::new(Writer {
            active,
            map,
            next_offset,
            last_timestamp_ms,
            dedup,
            broken,
        }),
        segments: RwLock::new(segments),
        group: GroupCommit::new(durable_offset),
        appended_bytes: AtomicU64::new(0),
        flushed_bytes: AtomicU64::new(0),
        flush_requested: AtomicBool::new(false),
        prefault_requested: AtomicBool::new(false),
        dedup_work_requested: AtomicBool::new(false),
        prefault_enabled,
        unsealed: Mutex::new(None),
        workers: std::sync::OnceLock::new(),
        waiters: Mutex::new(Vec::new()),
        filesystem,
        report,
        background_state: Mutex::new(BackgroundState::new(checkpointed)),
    });
    if let Some(workers) = workers {
        let task: Weak<dyn Task> = Arc::downgrade(&(Arc::clone(&inner) as Arc<dyn Task>));
        let id = workers.register(task);
        let _ = inner.workers.set((workers, id));
    }
    Ok(Log { inner })
}

/// Workers of a log opened with `Background::Threads`.
const PRIVATE_WORKERS: usize = 2;

type ActiveParts = (Arc<Segment>, MapWriter);

/// Opens every segment: sealed ones from their indexes, the last one by a
/// verifying scan with torn-tail handling.
/// Under `RecoveryMode::Quarantine`, the first damage found goes into
/// `damage` instead of failing the open, and nothing on disk is changed.
fn open_segments(
    dir: &Path,
    options: &Options,
    checkpoint: Option<Checkpoint>,
    report: &mut RecoveryReport,
    damage: &mut Option<StorageError>,
) -> Result<(Vec<Arc<Segment>>, ActiveParts)> {
    let disk = &options.disk;
    let quarantine = options.recovery == RecoveryMode::Quarantine;
    let mut bases = list_segments(disk, dir)?;
    if bases.is_empty() {
        report.created = true;
        if checkpoint.is_some_and(|c| c.durable_offset > 0) {
            return Err(StorageError::Corrupt {
                file: dir.join(CHECKPOINT_FILE),
                position: 0,
                reason: "the checkpoint records durable data but no segment file exists".into(),
            });
        }
        let (segment, map) =
            Segment::create(disk, dir, 0, options.segment_bytes, options.write_path)?;
        return Ok((vec![Arc::clone(&segment)], (segment, map)));
    }
    let mut segments: Vec<Arc<Segment>> = Vec::new();
    let mut active_base = *bases.last().unwrap_or(&0);
    for (i, &base) in bases.iter().enumerate().take(bases.len() - 1) {
        let opened = Segment::open_sealed(
            disk,
            dir,
            base,
            options.index_interval_bytes,
            options.verify_sealed_on_open,
        )
        .and_then(|(segment, scan)| {
            check_continuity(segments.last(), base, &segment.path)?;
            Ok((segment, scan))
        });
        match opened {
            Ok((segment, scan)) => {
                if let Some(scan) = scan {
                    report.indexes_rebuilt += 1;
                    if options.verify_sealed_on_open {
                        report.records_verified += scan.records;
                        report.bytes_verified += scan.valid_end as u64;
                    }
                }
                segments.push(segment);
            }
            Err(e @ StorageError::Corrupt { .. }) if quarantine => {
                // Serve what lies before the damage; later segments stay on
                // disk, unread, for the repair to judge.
                *damage = Some(e);
                active_base = base;
                break;
            }
            Err(StorageError::Corrupt { .. })
                if i + 2 == bases.len() && roll_cut_short(disk, dir, base, bases[i + 1])? =>
            {
                // A crash in a roll of a log written before rolls flushed
                // the old segment first: the next segment's file was
                // renamed into place before this one's flush ended, so
                // this segment's tail was never durable (never acked) and
                // the next one holds nothing. Drop the empty one; this one
                // is the active segment again, its tail judged below like
                // any torn tail. Rolls now flush first and never leave it.
                remove_segment_files(disk, dir, bases[i + 1])?;
                tracing::warn!(
                    dir = %dir.display(),
                    base_offset = base,
                    "a roll was cut short: reopening the segment before the empty last one as the active one"
                );
                report.roll_resumed = true;
                active_base = base;
                break;
            }
            Err(e @ StorageError::Corrupt { .. }) if options.recovery == RecoveryMode::Repair => {
                // Drop every later segment; this one becomes the active one
                // and is cut at its first invalid record below.
                let dropped: Vec<u64> = bases.drain(i + 1..).collect();
                for &later in &dropped {
                    remove_segment_files(disk, dir, later)?;
                }
                let note = format!("{e}; removed {} later segment(s)", dropped.len());
                tracing::error!(dir = %dir.display(), "repair: {note}");
                report.repaired = Some(note);
                active_base = base;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let bound = checkpoint.map_or(0, |c| c.durable_offset);
    let (active, map) = open_active(dir, active_base, options, bound, report, damage)?;
    check_continuity(segments.last(), active_base, &active.path)?;
    let next = active.next_offset();
    if let Some(cp) = checkpoint {
        if cp.durable_offset > next && options.recovery != RecoveryMode::Repair {
            let e = StorageError::Corrupt {
                file: active.path.clone(),
                position: active.size_bytes(),
                reason: format!(
                    "the log ends at offset {next} but offsets below {} were recorded durable",
                    cp.durable_offset
                ),
            };
            if !quarantine {
                return Err(e);
            }
            damage.get_or_insert(e);
        }
    }
    segments.push(Arc::clone(&active));
    Ok((segments, (active, map)))
}

/// True when the segment at `base` is the one a roll left unflushed: it
/// was never sealed (no index file) and the segment after it, the last,
/// holds no record (its first length field is zero, as a fresh file is).
/// Records go into a new segment only once the roll's flush of the old one
/// has ended, so a record there would mean the old one is whole.
fn roll_cut_short(disk: &Disk, dir: &Path, base: u64, last_base: u64) -> Result<bool> {
    if disk.exists(&dir.join(segment::file_name(base, segment::INDEX_SUFFIX))) {
        return Ok(false);
    }
    let path = dir.join(segment::file_name(last_base, LOG_SUFFIX));
    let mut head = [0u8; 4];
    let file = disk.open(&path, false).map_err(StorageError::io(&path))?;
    let read = file
        .read_at(&mut head, 0)
        .map_err(StorageError::io(&path))?;
    Ok(read < head.len() || head == [0; 4])
}

fn check_continuity(previous: Option<&Arc<Segment>>, base: u64, path: &Path) -> Result<()> {
    match previous {
        Some(prev) if prev.next_offset() != base => Err(StorageError::Corrupt {
            file: path.to_path_buf(),
            position: 0,
            reason: format!(
                "segment starts at offset {base} but the previous one ends at {}",
                prev.next_offset()
            ),
        }),
        _ => Ok(()),
    }
}

/// Opens the last segment for appending: verifies every record, and decides
/// what to do with any bytes past the last valid one.
fn open_active(
    dir: &Path,
    base: u64,
    options: &Options,
    checkpoint_bound: u64,
    report: &mut RecoveryReport,
    damage: &mut Option<StorageError>,
) -> Result<ActiveParts> {
    let disk = &options.disk;
    let quarantine = options.recovery == RecoveryMode::Quarantine;
    let path = dir.join(segment::file_name(base, LOG_SUFFIX));
    let file = disk
        .open(&path, !quarantine)
        .map_err(StorageError::io(&path))?;
    let len = file.size().map_err(StorageError::io(&path))? as usize;
    // Mapped for up to a whole segment; only the file's `len` bytes exist.
    let capacity = len.max(options.segment_bytes as usize);
    let (scan, cut) = {
        let view = SegmentMap::open_sealed(&*file, len).map_err(StorageError::io(&path))?;
        let bytes = view.bytes();
        let scan = scan_segment(bytes, base, options.index_interval_bytes, true);
        let cut = judge_tail(
            &path,
            &*file,
            bytes,
            &scan,
            options.recovery,
            checkpoint_bound,
            report,
        );
        let cut = match cut {
            Err(e @ StorageError::Corrupt { .. }) if quarantine => {
                damage.get_or_insert(e);
                None
            }
            // Nothing is cut in quarantine, not even a torn tail.
            Ok(Some(_)) if quarantine => None,
            other => other?,
        };
        (scan, cut)
    };
    report.records_verified += scan.records;
    report.bytes_verified += scan.valid_end as u64;
    let valid_end = scan.valid_end;
    let (segment, mut map) = Segment::active_from_scan(
        disk,
        path,
        file,
        base,
        capacity,
        len,
        scan,
        // Read-only in quarantine: the map too.
        if quarantine {
            WritePath::Pwrite
        } else {
            options.write_path
        },
    )?;
    if let Some(dirty_end) = cut {
        map.zero_to(dirty_end)
            .map_err(StorageError::io(&segment.path))?;
        // The zeros made durable, without moving the segment's flushed mark
        // past the records: appends resume at `valid_end`, below
        // `dirty_end`, and each of their flushes must still reach the disk.
        segment.sync_recovered()?;
        report.bytes_truncated += (dirty_end - valid_end) as u64;
    }
    Ok((segment, map))
}

/// Decides the fate of bytes past the valid run of the active segment:
/// `Ok(None)` nothing to do, `Ok(Some(end))` clear `[valid_end, end)`, or an
/// error naming the damage.
fn judge_tail(
    path: &Path,
    file: &dyn DiskFile,
    bytes: &[u8],
    scan: &Scan,
    mode: RecoveryMode,
    checkpoint_bound: u64,
    report: &mut RecoveryReport,
) -> Result<Option<usize>> {
    let dirty_end = segment::data_end(file, bytes, scan.valid_end);
    let verdict = classify_tail(bytes, scan, dirty_end, checkpoint_bound);
    let corrupt = |from: usize, why: String| StorageError::Corrupt {
        file: path.to_path_buf(),
        position: from as u64,
        reason: why,
    };
    match (verdict, mode) {
        (TailVerdict::Clean, _) => Ok(None),
        (TailVerdict::Torn { from, reason, .. }, RecoveryMode::AbsoluteConsistency)
        | (TailVerdict::Damaged { from, reason, .. }, RecoveryMode::AbsoluteConsistency) => {
            Err(corrupt(from, reason))
        }
        (TailVerdict::Damaged { from, reason, .. }, RecoveryMode::TolerateTornTail)
        | (TailVerdict::Damaged { from, reason, .. }, RecoveryMode::Quarantine) => Err(corrupt(
            from,
            format!(
                "{reason}; not a torn tail (`bida repair {}` cuts the log here)",
                path.parent().unwrap_or(path).display()
            ),
        )),
        (TailVerdict::Torn { from, reason, .. }, RecoveryMode::Quarantine) => {
            Err(corrupt(from, reason))
        }
        (TailVerdict::Torn { from, to, reason }, RecoveryMode::TolerateTornTail) => {
            tracing::warn!(
                segment = %path.display(),
                position = from,
                bytes = to - from,
                %reason,
                "truncated a torn tail"
            );
            Ok(Some(to))
        }
        (TailVerdict::Torn { from, to, reason }, RecoveryMode::Repair)
        | (
            TailVerdict::Damaged {
                from, to, reason, ..
            },
            RecoveryMode::Repair,
        ) => {
            let note = format!(
                "cut {} bytes at byte {from} of {}: {reason}",
                to - from,
                path.display()
            );
            tracing::error!("repair: {note}");
            report.repaired = Some(note);
            Ok(Some(to))
        }
    }
}

/// Loads the ids of the last `records_max` records into a fresh window.
/// Refills the dedup window from the records still inside it: the last
/// `records_max` offsets, less those older than `age_ms_max`. A sealed
/// segment whose newest record is already too old is passed over whole, and
/// the walk moves past its end, so the next segment is read from its own
/// first offset (reading on from below a segment's base would find nothing
/// and end the rebuild, leaving the window empty).
fn rebuild_dedup(segments: &[Arc<Segment>], options: &Options, next_offset: u64) -> DedupIndex {
    let mut dedup = match &options.dedup_budget {
        Some(budget) => DedupIndex::with_budget(options.dedup, Arc::clone(budget)),
        None => DedupIndex::new(options.dedup),
    };
    if !dedup.enabled() {
        return dedup;
    }
    let start_offset = segments.first().map_or(0, |s| s.base_offset);
    let mut offset = next_offset
        .saturating_sub(dedup.records_cap())
        .max(start_offset);
    let now = options.clock.now_ms();
    let oldest_ms = now.saturating_sub(options.dedup.age_ms_max);
    let mut batch: Vec<(u64, record::PeekedId)> = Vec::with_capacity(4096);
    for segment in segments {
        if segment.next_offset() <= offset {
            continue;
        }
        if segment.last_timestamp_ms().is_some_and(|ts| ts < oldest_ms) {
            offset = segment.next_offset();
            continue;
        }
        offset = offset.max(segment.base_offset);
        while offset < segment.next_offset() {
            let Ok(Some(read)) = segment.read(offset, 4096, 4 << 20) else {
                break;
            };
            let mut at = 0usize;
            batch.clear();
            while let Some(fields) = read.bytes.get(at..).and_then(record::peek_id) {
                if fields.offset != offset {
                    // Damage in a sealed segment (not re-verified at open):
                    // reads of it will fail; the window just stops here.
                    tracing::warn!(segment = %segment.path.display(), offset, "dedup rebuild stopped at a damaged record");
                    break;
                }
                // A record older than the window is kept out of it, as the
                // live window had already forgotten it: only its offset
                // goes into the ring.
                let fields = if fields.timestamp_ms < oldest_ms {
                    record::PeekedId {
                        id: InnerMsgId(0),
                        ..fields
                    }
                } else {
                    fields
                };
                batch.push((dedup.hash(fields.id), fields));
                at += fields.len;
                offset += 1;
            }
            // As on the append path: prefetch a few ids ahead, so the
            // table's cache misses overlap (a rebuild of 2 M ids was most
            // of a restart's time without it).
            for (hash, _) in batch.iter().take(DEDUP_PREFETCH_AHEAD) {
                dedup.prefetch(*hash);
            }
            for (i, (hash, fields)) in batch.iter().enumerate() {
                if let Some((ahead, _)) = batch.get(i + DEDUP_PREFETCH_AHEAD) {
                    dedup.prefetch(*ahead);
                }
                dedup.insert_hashed(fields.id, *hash, fields.offset, fields.timestamp_ms);
            }
            if offset != read.next_offset {
                break;
            }
        }
        // Whatever stopped the walk inside this segment, the next one is
        // read from its own base.
        offset = offset.max(segment.next_offset());
    }
    dedup.expire(now);
    dedup.report();
    dedup
}

fn lock_dir(disk: &Disk, dir: &Path) -> Result<super::disk::DirLock> {
    let path = dir.join(LOCK_FILE);
    let me = format!("pid {}", std::process::id());
    disk.lock(&path, &me).map_err(|e| match e {
        LockError::Held { holder } => StorageError::Locked { path, holder },
        LockError::Io(e) => StorageError::io(path)(e),
    })
}

fn remove_temporary_files(disk: &Disk, dir: &Path) -> Result<()> {
    for name in disk.list(dir).map_err(StorageError::io(dir))? {
        let path = dir.join(name);
        if path.extension().is_some_and(|e| e == "tmp") {
            disk.remove_file(&path).map_err(StorageError::io(&path))?;
        }
    }
    Ok(())
}

/// Base offsets of the segment files in `dir`, in order.
pub(crate) fn list_segments(disk: &Disk, dir: &Path) -> Result<Vec<u64>> {
    let mut bases: Vec<u64> = disk
        .list(dir)
        .map_err(StorageError::io(dir))?
        .iter()
        .filter_map(|name| name.to_str().and_then(segment::parse_log_file_name))
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

fn read_checkpoint(disk: &Disk, dir: &Path) -> Option<Checkpoint> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = disk.read(&path).ok()?;
    match Checkpoint::decode(&bytes) {
        Ok(cp) => Some(cp),
        Err(reason) => {
            // Only a bound for recovery: without it, the durable watermarks
            // in the records still guard acknowledged data.
            tracing::warn!(path = %path.display(), %reason, "ignoring an unreadable checkpoint");
            None
        }
    }
}

pub(super) fn write_checkpoint(disk: &Disk, dir: &Path, checkpoint: Checkpoint) -> Result<()> {
    segment::write_file_synced(disk, &dir.join(CHECKPOINT_FILE), &checkpoint.encode())
}

/// What opening found, per log: a cut or a repair is a warning; anything
/// else is debug detail (a broker opening 10,000 partitions after a crash
/// logs one line per topic, `Broker::open_topic`, not one per partition).
fn log_report(dir: &Path, report: &RecoveryReport) {
    if report.created {
        tracing::debug!(dir = %dir.display(), "created a new log");
    } else if report.bytes_truncated > 0 || report.repaired.is_some() {
        tracing::warn!(
            dir = %dir.display(),
            clean_shutdown = report.clean_shutdown,
            segments = report.segments,
            records_verified = report.records_verified,
            bytes_verified = report.bytes_verified,
            bytes_truncated = report.bytes_truncated,
            indexes_rebuilt = report.indexes_rebuilt,
            next_offset = report.next_offset,
            duration_ms = report.duration.as_secs_f64() * 1000.0,
            "recovered log: bytes cut from its tail"
        );
    } else {
        tracing::debug!(
            dir = %dir.display(),
            clean_shutdown = report.clean_shutdown,
            segments = report.segments,
            records_verified = report.records_verified,
            indexes_rebuilt = report.indexes_rebuilt,
            next_offset = report.next_offset,
            duration_ms = report.duration.as_secs_f64() * 1000.0,
            "opened log"
        );
    }
}
