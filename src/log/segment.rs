//! One segment: `<20-digit base offset>.log`, its map and its indexes.
//!
//! The active segment is mapped for up to `segment_bytes` and its file grows
//! on demand: space is reserved (`fallocate`) in steps ahead of the writer,
//! from 64 KiB, doubling while the partition keeps writing (to 64 MiB) and
//! halving after a quiet spell, so an idle partition holds almost no disk.
//! Records are packed back to back from position 0 and the reserved rest of
//! the file stays zero. Sealing flushes it, writes `.index` and `.timeindex`
//! (see `index.rs`), truncates the file to the records and fsyncs; sealed
//! segments are mapped read-only. Byte layout of a record: `record.rs`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::disk::{Advice, Disk, DiskFile};
use super::error::{Result, StorageError};
use super::index::{IndexError, IndexFile, OffsetEntry, SegmentIndex};
use super::journal::FlushJournal;
use super::mmap::{prefetch, MapWriter, SegmentMap};
use super::options::WritePath;
use super::record;
use super::recovery::{nonzero_end, scan_segment, Scan};
use crate::sync::lock;

pub const LOG_SUFFIX: &str = "log";
pub const INDEX_SUFFIX: &str = "index";
pub const TIME_INDEX_SUFFIX: &str = "timeindex";
/// Digits of the base offset in file names, enough for any `u64`.
pub const BASE_OFFSET_DIGITS: usize = 20;
const PAGE_BYTES: usize = 4096;
/// The first step of space reserved for an active segment's file.
pub const GROW_STEP_MIN_BYTES: usize = 64 << 10;
/// The largest step.
pub const GROW_STEP_MAX_BYTES: usize = 64 << 20;
/// A step doubles when the writer needs the next one within this time of
/// the last, and halves when it needs it later.
const GROW_FAST: Duration = Duration::from_secs(1);
/// How far past its end a read asks the kernel to read the file ahead.
const READ_AHEAD_BYTES: usize = 8 << 20;
/// How far ahead of the record header being read a read prefetches.
const READ_PREFETCH_BYTES: usize = 2048;
const NO_TIMESTAMP: u64 = u64::MAX;

pub fn file_name(base_offset: u64, suffix: &str) -> String {
    format!("{base_offset:0width$}.{suffix}", width = BASE_OFFSET_DIGITS)
}

/// The base offset of a `.log` file name, if it is one.
pub fn parse_log_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != BASE_OFFSET_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub(crate) struct Segment {
    pub base_offset: u64,
    pub path: PathBuf,
    disk: Disk,
    file: Arc<dyn DiskFile>,
    /// Appends go through `pwrite` (flush with fdatasync) rather than the map.
    writes_through_file: bool,
    map: Arc<SegmentMap>,
    /// The offset after the last published record.
    next_offset: AtomicU64,
    index: Mutex<SegmentIndex>,
    /// Bytes known durable.
    flushed: AtomicUsize,
    /// Bytes below which this process's page mappings were dropped.
    released: AtomicUsize,
    /// Bytes faulted in ahead of the writer.
    populated: AtomicUsize,
    /// Bytes of the file (space reserved for records): the writer never
    /// writes at or past it, readers never read past it.
    allocated: AtomicUsize,
    /// How the next reservation is sized; held while the file grows.
    grow: Mutex<Grow>,
    first_timestamp_ms: AtomicU64,
    last_timestamp_ms: AtomicU64,
    sealed: AtomicBool,
    /// The file was created and its directory not yet synced: the first
    /// flush syncs it, so no record of this segment is durable before its
    /// name is.
    dir_unsynced: AtomicBool,
    /// Held while the directory is synced, so a concurrent flush cannot
    /// report durability before the name is.
    dir_sync: Mutex<()>,
    /// The kernel was last asked to read ahead up to here.
    read_ahead_to: AtomicUsize,
    /// Read through the map since its pages were last let go.
    read_since_release: AtomicBool,
}

/// The size of the next step of space reserved, and when the last was.
struct Grow {
    step: usize,
    last: Option<Instant>,
}

/// A record batch read from one segment: whole records, zero-copy.
pub(crate) struct SegmentRead {
    pub bytes: Bytes,
    pub records: usize,
    pub next_offset: u64,
    pub position: usize,
}

impl Segment {
    /// Creates a new, empty active segment: an empty file (space is
    /// reserved as records arrive) whose directory entry the first flush
    /// makes durable. No fsync here: creating a segment, or a partition,
    /// costs a file creation.
    pub(crate) fn create(
        disk: &Disk,
        dir: &Path,
        base_offset: u64,
        capacity: u64,
        write_path: WritePath,
    ) -> Result<(Arc<Segment>, MapWriter)> {
        let path = dir.join(file_name(base_offset, LOG_SUFFIX));
        let file = disk.create_new(&path).map_err(StorageError::io(&path))?;
        let scan = Scan {
            next_offset: base_offset,
            ..Scan::default()
        };
        let parts = Self::active_from_scan(
            disk,
            path,
            file,
            base_offset,
            capacity as usize,
            0,
            scan,
            write_path,
        )?;
        parts.0.dir_unsynced.store(true, Ordering::Release);
        Ok(parts)
    }

    /// Maps an existing active segment for appending after `scan.valid_end`.
    /// The caller has already cleared anything past it.
    /// `allocated` is the file's length now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn active_from_scan(
        disk: &Disk,
        path: PathBuf,
        file: Arc<dyn DiskFile>,
        base_offset: u64,
        capacity: usize,
        allocated: usize,
        scan: Scan,
        write_path: WritePath,
    ) -> Result<(Arc<Segment>, MapWriter)> {
        debug_assert_ne!(write_path, WritePath::Auto, "resolved by Log::open");
        let (map, writer) = SegmentMap::open_append(
            &file,
            capacity,
            scan.valid_end,
            write_path == WritePath::Pwrite,
        )
        .map_err(StorageError::io(&path))?;
        // A map that is a copy (a memory disk) is written through the file.
        let writes_through_file = write_path == WritePath::Pwrite || !map.is_coherent();
        let segment = Arc::new(Segment {
            base_offset,
            path,
            disk: disk.clone(),
            file,
            writes_through_file,
            map,
            next_offset: AtomicU64::new(scan.next_offset),
            index: Mutex::new(scan.index),
            flushed: AtomicUsize::new(scan.valid_end),
            released: AtomicUsize::new(0),
            populated: AtomicUsize::new(0),
            allocated: AtomicUsize::new(allocated),
            grow: Mutex::new(Grow {
                step: GROW_STEP_MIN_BYTES,
                last: None,
            }),
            first_timestamp_ms: AtomicU64::new(scan.first_timestamp_ms.unwrap_or(NO_TIMESTAMP)),
            last_timestamp_ms: AtomicU64::new(scan.last_timestamp_ms.unwrap_or(NO_TIMESTAMP)),
            sealed: AtomicBool::new(false),
            dir_unsynced: AtomicBool::new(false),
            dir_sync: Mutex::new(()),
            read_ahead_to: AtomicUsize::new(0),
            read_since_release: AtomicBool::new(false),
        });
        Ok((segment, writer))
    }

    /// Opens a sealed segment with the index it was sealed with, or one
    /// rebuilt from its records (verifying checksums if `verify`). Returns
    /// whether the index was rebuilt and the scan, if one ran.
    pub(crate) fn open_sealed(
        disk: &Disk,
        dir: &Path,
        base_offset: u64,
        index_interval: u32,
        verify: bool,
    ) -> Result<(Arc<Segment>, Option<Scan>)> {
        let path = dir.join(file_name(base_offset, LOG_SUFFIX));
        let file = disk.open(&path, false).map_err(StorageError::io(&path))?;
        let len = file.size().map_err(StorageError::io(&path))?;
        let map = SegmentMap::open_sealed(&*file, len as usize).map_err(StorageError::io(&path))?;
        let bytes = map.bytes();
        let loaded = if verify {
            None
        } else {
            load_index(disk, dir, base_offset, len).ok()
        };
        let (index, tail_from, scan) = match loaded {
            Some(index) => {
                let from = index.last().unwrap_or(OffsetEntry {
                    rel_offset: 0,
                    position: 0,
                });
                (index, from, None)
            }
            None => {
                let scan = scan_segment(bytes, base_offset, index_interval, verify);
                (
                    scan.index.clone(),
                    OffsetEntry {
                        rel_offset: 0,
                        position: 0,
                    },
                    Some(scan),
                )
            }
        };
        // Walk from the last index entry to the end: the segment must end
        // exactly at its last record.
        let tail = scan_tail(bytes, base_offset, tail_from)?;
        let damaged = scan.as_ref().is_some_and(|s| s.damage.is_some());
        if tail.end < bytes.len() && !damaged && data_end(&*file, bytes, tail.end) == tail.end {
            // Records, then only zeros: a roll flushed this segment and the
            // process stopped before its seal (which the background thread
            // runs). Finish the seal and open the result. The index comes
            // from the records: index files found here may be from an
            // earlier seal of a shorter segment (one that became the active
            // segment again when the next one was lost).
            let index = match scan {
                Some(scan) => scan.index,
                None => scan_segment(bytes, base_offset, index_interval, verify).index,
            };
            let end = tail.end;
            drop(map);
            let file = disk.open(&path, true).map_err(StorageError::io(&path))?;
            write_seal(disk, dir, base_offset, &index, &*file, &path, end)?;
            tracing::warn!(segment = %path.display(), bytes = end, "finished the seal of a segment left unsealed by a roll");
            return Self::open_sealed(disk, dir, base_offset, index_interval, verify);
        }
        if tail.end != bytes.len() || damaged {
            let (position, reason) = match scan.as_ref().and_then(|s| s.damage.clone()) {
                Some(d) => (d.position, d.reason),
                None => (
                    tail.end,
                    "sealed segment does not end at a record boundary".to_string(),
                ),
            };
            return Err(StorageError::Corrupt {
                file: path,
                position: position as u64,
                reason,
            });
        }
        let first_ts = if bytes.is_empty() {
            NO_TIMESTAMP
        } else {
            record::peek_header(bytes).map_or(NO_TIMESTAMP, |(_, _, ts)| ts)
        };
        let segment = Arc::new(Segment {
            base_offset,
            path,
            disk: disk.clone(),
            file,
            writes_through_file: false,
            map,
            next_offset: AtomicU64::new(tail.next_offset),
            index: Mutex::new(index),
            flushed: AtomicUsize::new(len as usize),
            released: AtomicUsize::new(0),
            populated: AtomicUsize::new(len as usize),
            allocated: AtomicUsize::new(len as usize),
            grow: Mutex::new(Grow {
                step: GROW_STEP_MIN_BYTES,
                last: None,
            }),
            first_timestamp_ms: AtomicU64::new(first_ts),
            last_timestamp_ms: AtomicU64::new(tail.last_timestamp_ms.unwrap_or(NO_TIMESTAMP)),
            sealed: AtomicBool::new(true),
            dir_unsynced: AtomicBool::new(false),
            dir_sync: Mutex::new(()),
            read_ahead_to: AtomicUsize::new(0),
            read_since_release: AtomicBool::new(false),
        });
        Ok((segment, scan))
    }

    pub(crate) fn index(&self) -> MutexGuard<'_, SegmentIndex> {
        lock(&self.index)
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Called by the writer after publishing records.
    pub(crate) fn note_appended(&self, next_offset: u64, first_ts: u64, last_ts: u64) {
        self.next_offset.store(next_offset, Ordering::Release);
        let _ = self.first_timestamp_ms.compare_exchange(
            NO_TIMESTAMP,
            first_ts,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.last_timestamp_ms.store(last_ts, Ordering::Release);
    }

    pub(crate) fn first_timestamp_ms(&self) -> Option<u64> {
        Some(self.first_timestamp_ms.load(Ordering::Acquire)).filter(|&t| t != NO_TIMESTAMP)
    }

    pub(crate) fn last_timestamp_ms(&self) -> Option<u64> {
        Some(self.last_timestamp_ms.load(Ordering::Acquire)).filter(|&t| t != NO_TIMESTAMP)
    }

    /// Bytes of records in the segment.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.map.published() as u64
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.map.capacity() as u64
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Position of the record with `offset`, found from the sparse index and
    /// a walk of at most one interval.
    fn position_of(&self, offset: u64) -> Result<Option<usize>> {
        let bytes = self.map.bytes();
        if offset < self.base_offset || offset >= self.next_offset() {
            return Ok(None);
        }
        let rel = (offset - self.base_offset) as u32;
        let start = self.index().floor(rel);
        let mut position = start.position as usize;
        loop {
            let Some((len, at, _)) = bytes.get(position..).and_then(record::peek_header) else {
                return Err(self.corrupt(position, "record header unreadable while seeking"));
            };
            if at == offset {
                return Ok(Some(position));
            }
            if at > offset {
                return Err(self.corrupt(position, "offset sequence broken while seeking"));
            }
            position += len;
        }
    }

    /// Whole records from `offset`: at least one if any exists, then as many
    /// as fit in `max_records` and `max_bytes`.
    pub(crate) fn read(
        self: &Arc<Self>,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Option<SegmentRead>> {
        let Some(start) = self.position_of(offset)? else {
            return Ok(None);
        };
        let bytes = self.map.bytes();
        let mut end = start;
        let mut records = 0usize;
        while records < max_records.max(1) {
            // Each header says where the next one is: a chain of dependent
            // loads over memory that is rarely in cache. Ask for the lines
            // ahead so their misses overlap.
            for ahead in [end + READ_PREFETCH_BYTES, end + READ_PREFETCH_BYTES + 64] {
                if let Some(b) = bytes.get(ahead) {
                    prefetch(b);
                }
            }
            let Some((len, at, _)) = bytes.get(end..).and_then(record::peek_header) else {
                break;
            };
            if at != offset + records as u64 {
                // A broken sequence: stop here; the caller's checksum
                // verification of the next read reports the damage.
                if records == 0 {
                    return Err(self.corrupt(
                        end,
                        format!("record carries offset {at} where {offset} was expected"),
                    ));
                }
                break;
            }
            if records > 0 && end + len - start > max_bytes {
                break;
            }
            end += len;
            records += 1;
        }
        let view = self
            .map
            .view(start..end)
            .ok_or_else(|| self.corrupt(start, "read range outside the published bytes"))?;
        self.read_ahead(end);
        self.read_since_release.store(true, Ordering::Relaxed);
        Ok(Some(SegmentRead {
            bytes: view,
            records,
            next_offset: offset + records as u64,
            position: start,
        }))
    }

    /// Asks the kernel to start reading `[end, end + READ_AHEAD_BYTES)` into
    /// the page cache, unless it was asked for about that range already. A
    /// consumer of a backlog reads pages that left the page cache (the
    /// writer lets go of them past `page_cache_hot_bytes`); a page fault
    /// reads only a little ahead, so without this the reader waits on the
    /// disk for each few pages.
    fn read_ahead(&self, end: usize) {
        let published = self.map.published();
        let ahead = self.read_ahead_to.load(Ordering::Relaxed);
        let near = ahead >= end + READ_AHEAD_BYTES / 2 && ahead <= end + 2 * READ_AHEAD_BYTES;
        let to = (end + READ_AHEAD_BYTES).min(published);
        if near || to <= end {
            return;
        }
        let from = if ahead > end && ahead < to {
            ahead
        } else {
            end
        };
        self.read_ahead_to.store(to, Ordering::Relaxed);
        self.file.advise(from as u64..to as u64, Advice::WillNeed);
    }

    /// The first record at or after `timestamp_ms`, if this segment has one.
    pub(crate) fn offset_for_timestamp(&self, timestamp_ms: u64) -> Option<u64> {
        if self.last_timestamp_ms()? < timestamp_ms {
            return None;
        }
        let bytes = self.map.bytes();
        let mut position = self.index().time_floor(timestamp_ms).position as usize;
        while let Some((len, offset, ts)) = bytes.get(position..).and_then(record::peek_header) {
            if ts >= timestamp_ms {
                return Some(offset);
            }
            position += len;
        }
        None
    }

    /// The file's count of writes begun (see `DiskFile::writes_begun`).
    pub(crate) fn file_writes_begun(&self) -> u64 {
        self.file.writes_begun()
    }

    /// Records that a sync of the whole file system, started after the
    /// first `writes` writes of the file and `end` bytes were written, has
    /// made them durable, and the segment's name with them.
    pub(crate) fn note_synced(&self, end: usize, writes: u64, journal: Option<&FlushJournal>) {
        self.file.covered_by_sync(writes);
        self.dir_unsynced.store(false, Ordering::Release);
        self.flushed.fetch_max(end, Ordering::AcqRel);
        if let Some(journal) = journal {
            journal.record(&self.path, end);
        }
    }

    /// Makes the records in `[flushed, end)` durable, then records it in
    /// `journal` if there is one.
    pub(crate) fn flush_to(&self, end: usize, journal: Option<&FlushJournal>) -> Result<()> {
        let from = self.flushed.load(Ordering::Acquire);
        if end <= from {
            return Ok(());
        }
        if self.writes_through_file {
            self.file
                .sync_data()
                .map_err(StorageError::io(&self.path))?;
        } else {
            let page_start = from - from % PAGE_BYTES;
            self.map
                .flush_range(page_start..end)
                .map_err(StorageError::io(&self.path))?;
        }
        if self.dir_unsynced.load(Ordering::Acquire) {
            let _syncing = lock(&self.dir_sync);
            if self.dir_unsynced.load(Ordering::Acquire) {
                if let Some(dir) = self.path.parent() {
                    sync_dir(&self.disk, dir)?;
                }
                self.dir_unsynced.store(false, Ordering::Release);
            }
        }
        self.flushed.fetch_max(end, Ordering::AcqRel);
        if let Some(journal) = journal {
            journal.record(&self.path, end);
        }
        Ok(())
    }

    /// Bytes of the file: space reserved for records.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Acquire) as u64
    }

    /// Makes sure the file holds at least `end` bytes, reserving the next
    /// step if it does not (with zeros written and synced if `zeroes`). The
    /// writer calls it before writing past the reserved end (through the
    /// map, a page past the file's end is a SIGBUS), so a full disk fails
    /// an append before any of its bytes is written. `end` is at most the
    /// map's capacity.
    pub(crate) fn reserve(&self, end: usize, zeroes: bool) -> Result<()> {
        if end <= self.allocated.load(Ordering::Acquire) {
            return Ok(());
        }
        self.grow_to(end, zeroes)
    }

    /// Reserves the next step ahead of the writer once it is within half a
    /// step of the reserved end (the background work calls this, so the
    /// append path seldom waits on `fallocate`).
    pub(crate) fn reserve_ahead(&self, cursor: usize, zeroes: bool) -> Result<()> {
        let allocated = self.allocated.load(Ordering::Acquire);
        let half_step = lock(&self.grow).step / 2;
        // Nothing for a segment never written to: an idle partition holds
        // no space.
        if cursor == 0 || allocated >= self.map.capacity() || cursor + half_step < allocated {
            return Ok(());
        }
        self.grow_to(allocated + 1, zeroes)
    }

    fn grow_to(&self, end: usize, zeroes: bool) -> Result<()> {
        let mut grow = lock(&self.grow);
        let from = self.allocated.load(Ordering::Acquire);
        if end <= from {
            return Ok(());
        }
        let now = Instant::now();
        grow.step = match grow.last {
            None => GROW_STEP_MIN_BYTES,
            Some(last) if now.duration_since(last) < GROW_FAST => {
                (grow.step * 2).min(GROW_STEP_MAX_BYTES)
            }
            Some(_) => (grow.step / 2).max(GROW_STEP_MIN_BYTES),
        };
        grow.last = Some(now);
        let wanted = end.max(from + grow.step).div_ceil(PAGE_BYTES) * PAGE_BYTES;
        let to = wanted.min(self.map.capacity()).max(end);
        self.file
            .allocate(to as u64)
            .map_err(StorageError::io(&self.path))?;
        if zeroes {
            self.file
                .write_zeroes(from as u64..to as u64)
                .map_err(StorageError::io(&self.path))?;
        }
        self.allocated.store(to, Ordering::Release);
        Ok(())
    }

    /// Forgets that anything of the segment is durable, so the next flush
    /// syncs the file whatever it holds, and its directory entry (open,
    /// after a crash: records read back, and the file's very name, may be
    /// only in the page cache of a killed process).
    pub(crate) fn forget_durable(&self) {
        self.flushed.store(0, Ordering::Release);
        self.dir_unsynced.store(true, Ordering::Release);
    }

    /// Makes everything in the file durable, whatever the flushed mark
    /// says: open calls it after a crash, when the records it found may
    /// only be in the page cache.
    pub(crate) fn sync_recovered(&self) -> Result<()> {
        self.file.sync_data().map_err(StorageError::io(&self.path))
    }

    /// True when the writer at `cursor` is within half of `window` of the end
    /// of the prefaulted range (only the map write path faults pages in).
    pub(crate) fn wants_prefault(&self, cursor: usize, window: usize) -> bool {
        if self.writes_through_file {
            return false;
        }
        let populated = self.populated.load(Ordering::Acquire);
        populated < self.allocated.load(Ordering::Acquire) && cursor + window / 2 >= populated
    }

    /// Faults in `[cursor, cursor + window)` (the part not yet faulted in).
    pub(crate) fn prefault(&self, cursor: usize, window: usize) -> std::io::Result<()> {
        let from = self
            .populated
            .load(Ordering::Acquire)
            .max(cursor - cursor % PAGE_BYTES);
        // Never past the file's end: a page there is not backed (SIGBUS).
        let to = (cursor + window).min(self.allocated.load(Ordering::Acquire));
        if from >= to {
            return Ok(());
        }
        self.map.populate_for_write(from..to)?;
        self.populated.fetch_max(to, Ordering::AcqRel);
        Ok(())
    }

    /// Lets the kernel drop durable pages more than `hot_bytes` behind the
    /// flushed end, in steps of at least `step` bytes.
    pub(crate) fn release_cold_pages(&self, hot_bytes: u64, step: usize) {
        let flushed = self.flushed.load(Ordering::Acquire);
        let target = flushed.saturating_sub(hot_bytes as usize);
        let target = target - target % PAGE_BYTES;
        let from = self.released.load(Ordering::Acquire);
        if target < from + step {
            return;
        }
        self.release_range(from..target);
        self.released.fetch_max(target, Ordering::AcqRel);
    }

    /// Lets this process's mappings of a sealed segment's pages go if it
    /// was read since the last call (the page cache keeps them; a read
    /// faults them back): consumers reading a backlog would otherwise keep
    /// every page they touched mapped, and the broker's resident memory
    /// would grow with the data read.
    pub(crate) fn release_read_pages(&self) {
        if self.read_since_release.swap(false, Ordering::Relaxed) {
            let _ = self.map.release_pages(0..self.map.published());
        }
    }

    /// Drops every durable page of the segment from this process and the
    /// page cache (after a full scan, e.g. on open); reads fault them back.
    pub(crate) fn release_durable_pages(&self) {
        let flushed = self.flushed.load(Ordering::Acquire);
        let end = flushed - flushed % PAGE_BYTES;
        if end > 0 {
            self.release_range(0..end);
        }
    }

    fn release_range(&self, range: Range<usize>) {
        // Both calls are advice: failure costs memory, never data.
        let _ = self.map.release_pages(range.clone());
        self.file
            .advise(range.start as u64..range.end as u64, Advice::DontNeed);
    }

    /// Seals the active segment: everything flushed, index files written,
    /// the file cut to its records. The writer is consumed: no more appends.
    pub(crate) fn seal(
        &self,
        dir: &Path,
        writer: MapWriter,
        journal: Option<&FlushJournal>,
    ) -> Result<()> {
        let end = writer.cursor();
        debug_assert_eq!(end, self.map.published(), "sealing with unpublished bytes");
        self.flush_to(end, journal)?;
        drop(writer);
        let index = self.index().clone();
        // SAFETY of the truncation for readers is argued in mmap.rs: nothing
        // reads or writes past `published` == `end`.
        write_seal(
            &self.disk,
            dir,
            self.base_offset,
            &index,
            &*self.file,
            &self.path,
            end,
        )?;
        self.sealed.store(true, Ordering::Release);
        Ok(())
    }

    /// Deletes the segment's files (retention or repair). Readers holding
    /// views keep the mapping alive until they drop them.
    pub(crate) fn delete_files(&self, dir: &Path) -> Result<()> {
        remove_segment_files(&self.disk, dir, self.base_offset)
    }

    pub(crate) fn corrupt(&self, position: usize, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            file: self.path.clone(),
            position: position as u64,
            reason: reason.into(),
        }
    }
}

/// One past the last non-zero byte at or after `from`, asking the file
/// system where data lies so that a mostly empty preallocated segment is not
/// read end to end.
pub(crate) fn data_end(file: &dyn DiskFile, bytes: &[u8], from: usize) -> usize {
    let len = bytes.len() as u64;
    let mut end = from;
    let mut pos = from as u64;
    while pos < len {
        let (data, hole) = match file.next_data(pos) {
            Ok(Some(region)) => region,
            Ok(None) => break,
            Err(_) => return nonzero_end(bytes, from),
        };
        if data >= len {
            break;
        }
        let hole = hole.clamp(data, len);
        let region_end = nonzero_end(&bytes[..hole as usize], data as usize);
        if region_end > data as usize {
            end = end.max(region_end);
        }
        pos = hole;
    }
    end
}

struct Tail {
    end: usize,
    next_offset: u64,
    last_timestamp_ms: Option<u64>,
}

/// Walks record headers from an index entry to the last record.
fn scan_tail(bytes: &[u8], base_offset: u64, from: OffsetEntry) -> Result<Tail, StorageError> {
    let mut position = from.position as usize;
    let mut next_offset = base_offset + u64::from(from.rel_offset);
    let mut last_timestamp_ms = None;
    while let Some((len, offset, ts)) = bytes.get(position..).and_then(record::peek_header) {
        if offset != next_offset {
            break;
        }
        position += len;
        next_offset += 1;
        last_timestamp_ms = Some(ts);
    }
    Ok(Tail {
        end: position,
        next_offset,
        last_timestamp_ms,
    })
}

fn load_index(
    disk: &Disk,
    dir: &Path,
    base_offset: u64,
    segment_len: u64,
) -> std::result::Result<SegmentIndex, IndexError> {
    let read = |file, suffix| {
        disk.read(&dir.join(file_name(base_offset, suffix)))
            .map_err(|source| IndexError::Read { file, source })
    };
    SegmentIndex::decode(
        &read(IndexFile::Offsets, INDEX_SUFFIX)?,
        &read(IndexFile::Times, TIME_INDEX_SUFFIX)?,
        segment_len,
    )
}

/// The seal's writes: both index files, then the segment cut to `end`
/// bytes and synced.
fn write_seal(
    disk: &Disk,
    dir: &Path,
    base_offset: u64,
    index: &SegmentIndex,
    file: &dyn DiskFile,
    path: &Path,
    end: usize,
) -> Result<()> {
    write_file_synced(
        disk,
        &dir.join(file_name(base_offset, INDEX_SUFFIX)),
        &index.encode_offsets(),
    )?;
    write_file_synced(
        disk,
        &dir.join(file_name(base_offset, TIME_INDEX_SUFFIX)),
        &index.encode_times(),
    )?;
    file.set_len(end as u64).map_err(StorageError::io(path))?;
    file.sync_all().map_err(StorageError::io(path))
}

/// Writes a whole file durably: temporary name, fsync, rename, fsync dir.
pub(crate) fn write_file_synced(disk: &Disk, path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let file = disk.create(&tmp).map_err(StorageError::io(&tmp))?;
    file.write_all_at(contents, 0)
        .map_err(StorageError::io(&tmp))?;
    file.sync_all().map_err(StorageError::io(&tmp))?;
    disk.rename(&tmp, path).map_err(StorageError::io(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(disk, dir)?;
    }
    Ok(())
}

pub(crate) fn sync_dir(disk: &Disk, dir: &Path) -> Result<()> {
    disk.sync_dir(dir).map_err(StorageError::io(dir))
}

/// Removes a segment's files (`.log` and both indexes), those that exist.
pub(crate) fn remove_segment_files(disk: &Disk, dir: &Path, base: u64) -> Result<()> {
    for suffix in [LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX] {
        let path = dir.join(file_name(base, suffix));
        match disk.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(path)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(file_name(42, LOG_SUFFIX), "00000000000000000042.log");
        assert_eq!(parse_log_file_name("00000000000000000042.log"), Some(42));
        assert_eq!(
            parse_log_file_name(&file_name(u64::MAX, LOG_SUFFIX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_log_file_name("42.log"), None);
        assert_eq!(parse_log_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_log_file_name("00000000000000000042.index"), None);
    }
}
