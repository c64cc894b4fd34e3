//! Every knob of the storage engine, in one place, with its default.

use super::clock::Clock;
use super::dedup::DedupBudget;
use super::disk::Disk;
use super::error::{Bound, Result, StorageError};
use super::journal::FlushJournal;
use super::record::{RECORD_BYTES_MAX, RECORD_HEADER_LEN};
use super::workers::Workers;
use std::sync::Arc;

/// When an append counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// An append is acknowledged only once its bytes are on disk. Concurrent
    /// appenders share flushes (group commit): while one flush is in flight,
    /// the next group keeps filling and is flushed by the next one.
    Sync,
    /// An append is acknowledged at once; a background thread makes data
    /// durable at least every `interval_ms` or every `bytes` appended bytes,
    /// whichever comes first. A crash loses at most that window.
    Async { interval_ms: u64, bytes: u64 },
}

/// How appended bytes reach the active segment file. Reads always go
/// through the shared map, which is coherent with the page cache either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePath {
    /// `Pwrite` under `FlushMode::Sync`, `Mmap` under `FlushMode::Async`:
    /// the faster of the two for each mode in docs/BENCHMARKS.md.
    Auto,
    /// Records are staged in memory and written with one `pwrite` per append
    /// call; flushes are `fdatasync`. Much faster when flushes are frequent
    /// (sync mode): writeback does not have to write-protect mapped pages
    /// again (TLB shootdowns), and a full-page write needs no zero-fill.
    Pwrite,
    /// Records are copied into the shared map; flushes are `msync`. Cheapest
    /// per call (no syscall) and faster when flushes are rare (async mode);
    /// each fresh page faults and is zero-filled, which a prefault thread
    /// moves off the append path.
    Mmap,
}

impl WritePath {
    /// The concrete path for a flush mode.
    pub fn resolve(self, flush: FlushMode) -> WritePath {
        match (self, flush) {
            (WritePath::Auto, FlushMode::Sync) => WritePath::Pwrite,
            (WritePath::Auto, FlushMode::Async { .. }) => WritePath::Mmap,
            (concrete, _) => concrete,
        }
    }
}

/// How the file of the next segment is made ready. Either way it is
/// prepared by the background thread once the active segment is a quarter
/// full, so a roll only renames it into place; a roll that finds nothing
/// prepared creates the file itself with `fallocate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preallocate {
    /// Reserve the space with `fallocate`. On ext4 and XFS the space is
    /// "unwritten": the first flush of each newly written block also
    /// converts it (a journal commit per `fdatasync`).
    Fallocate,
    /// Also write zeros over the whole file (with `O_DIRECT` where the file
    /// system allows it, so the page cache is not filled) and fsync them.
    /// Each `fdatasync` then writes only data (half the latency of one into
    /// `Fallocate` space, alone on the development VM), but the zeros double
    /// the disk writes: with a sync broker at full speed, 2.8 M against
    /// 4.2 M msgs/s (docs/BENCHMARKS.md). Not the default for that reason.
    Zeroes,
}

/// Where a log's background work runs: async flushes, seals left by rolls,
/// space reserved ahead of the writer, dedup tables, checkpoints,
/// retention, prefaulting ahead of the writer, and the flushes of
/// [`Log::when_durable`](super::Log::when_durable).
#[derive(Clone, Debug)]
pub enum Background {
    /// The log starts two workers of its own, stopped with it.
    Threads,
    /// Workers shared with other logs (a broker's partitions): the log costs
    /// no thread of its own.
    Pool(Arc<Workers>),
    /// No thread: the work runs only when the owner calls
    /// [`Log::background_pass`](super::Log::background_pass) (and a roll,
    /// a flush or a close does what they need themselves); durable waits
    /// block the caller. For deterministic tests and fuzzing; no
    /// prefaulting.
    Manual,
}

/// Two settings are equal when they name the same workers.
impl PartialEq for Background {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Background::Threads, Background::Threads)
            | (Background::Manual, Background::Manual) => true,
            (Background::Pool(a), Background::Pool(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Background {}

/// What `open` does when the bytes on disk are not all valid records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Truncate an invalid tail of the last segment that no valid record
    /// follows and that lies past the durable checkpoint (a write torn by a
    /// crash), logging how many bytes went. Anything else invalid fails open
    /// with the file and byte position.
    TolerateTornTail,
    /// Fail open on any invalid byte, a torn tail included.
    AbsoluteConsistency,
    /// Cut the log at the first invalid record, wherever it is, dropping
    /// everything after it (later segments too), and log exactly what was
    /// dropped. For an operator who has decided the rest is lost
    /// (`bida repair`).
    Repair,
    /// Open what is valid up to the first damage and change nothing on
    /// disk: the log serves reads up to there and refuses appends
    /// ([`StorageError::Damaged`](super::StorageError::Damaged)) until it is
    /// repaired. A broker opens a partition this way when it does not open
    /// under `TolerateTornTail`, so one damaged partition stops only itself.
    Quarantine,
}

/// Deletion of whole sealed segments; the active segment is never deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Delete the oldest sealed segments while the log is larger than this.
    /// Default: `None` (no size limit).
    pub bytes_max: Option<u64>,
    /// Delete sealed segments whose newest record is older than this.
    /// Default: 7 days.
    pub age_ms_max: Option<u64>,
}

/// The window of inner-msg-ids remembered for deduplication. An id is
/// recognised while its record is among the last `records_max` offsets and
/// was appended less than `age_ms_max` ago (age is tracked per block of
/// 1024 offsets, so an id may be remembered up to one block longer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupWindow {
    /// Default: 10,000,000 records. Zero turns deduplication off.
    pub records_max: u64,
    /// Default: 10 minutes.
    pub age_ms_max: u64,
}

/// Options of one log. Construct with `Options::default()` and change fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Default: `FlushMode::Sync`.
    pub flush: FlushMode,
    /// Default: `WritePath::Auto`.
    pub write_path: WritePath,
    /// Default: `Preallocate::Fallocate`.
    pub preallocate: Preallocate,
    /// Size each segment file is preallocated to; a segment rolls when the
    /// next record does not fit. Default: 1 GiB. Range: 4 KiB ..= 4 GiB - 1.
    pub segment_bytes: u64,
    /// A segment also rolls once its first record is this old (checked on
    /// append). Default: 7 days.
    pub segment_age_ms: u64,
    /// Largest record accepted, header included. Default: 1 MiB.
    pub record_bytes_max: u32,
    /// Bytes between two entries of the sparse offset and time indexes.
    /// Default: 4 KiB.
    pub index_interval_bytes: u32,
    /// Default: no size limit, 7 days of age.
    pub retention: Retention,
    /// Default: 10 M records or 10 minutes.
    pub dedup: DedupWindow,
    /// Memory the dedup windows of many logs share (a broker's
    /// partitions); each window then holds at most its share (see
    /// `dedup.rs`). Default: none, the window alone decides.
    pub dedup_budget: Option<Arc<DedupBudget>>,
    /// Default: `RecoveryMode::TolerateTornTail`.
    pub recovery: RecoveryMode,
    /// How often the background thread records the durable position in the
    /// checkpoint file. Damage before the checkpoint is never taken for a torn
    /// tail. Zero: only at close. Default: 1000 ms.
    pub checkpoint_interval_ms: u64,
    /// Flushed data further than this behind the end of the active segment
    /// is dropped from this process's mappings so the page cache cannot grow
    /// without bound (it slows writes badly on some machines). `None` keeps
    /// everything mapped. Default: 64 MiB.
    pub page_cache_hot_bytes: Option<u64>,
    /// Under `WritePath::Mmap`, a thread keeps this many bytes ahead of the writer
    /// faulted in (`MADV_POPULATE_WRITE`), so appends do not stop on a page
    /// fault and a zero-fill per page. Zero turns it off; kernels before 5.14
    /// turn it off by themselves. Default: 32 MiB.
    pub prefault_bytes: u64,
    /// Verify every record checksum of sealed segments at open (slow for
    /// large logs; reads verify checksums anyway). Default: false.
    pub verify_sealed_on_open: bool,
    /// How often the background thread applies retention. Default: 10 s.
    pub retention_check_interval_ms: u64,
    /// The clock records are stamped with and every age (dedup window,
    /// segment age, retention) is judged by. Default: the system clock;
    /// tests inject a manual one.
    pub clock: Clock,
    /// Power-loss tests only: where every completed flush is recorded
    /// (`log/journal.rs`). Default: none.
    pub flush_journal: Option<FlushJournal>,
    /// The file system the log's files live on. Default: the operating
    /// system's ([`Disk::os`]); crash tests use a
    /// [`MemoryDisk`](super::disk::MemoryDisk).
    pub disk: Disk,
    /// Default: `Background::Threads`.
    pub background: Background,
    /// Take the exclusive lock of the log's directory (a `LOCK` file held
    /// open while the log is). An owner of many logs that holds one lock
    /// over all of them (the broker: its `_groups` log) turns it off, so
    /// each log costs no file descriptor for it. Default: true.
    pub lock_dir: bool,
}

/// The smallest segment accepted.
pub const SEGMENT_BYTES_MIN: u64 = 4 << 10;
/// Segment positions are stored as `u32`.
pub const SEGMENT_BYTES_MAX: u64 = u32::MAX as u64;
/// Offsets in the dedup table are stored in 31 bits.
pub const DEDUP_RECORDS_MAX: u64 = (1 << 31) - 1;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for Options {
    fn default() -> Self {
        Options {
            flush: FlushMode::Sync,
            write_path: WritePath::Auto,
            preallocate: Preallocate::Fallocate,
            segment_bytes: 1 << 30,
            segment_age_ms: 7 * DAY_MS,
            record_bytes_max: 1 << 20,
            index_interval_bytes: 4096,
            retention: Retention {
                bytes_max: None,
                age_ms_max: Some(7 * DAY_MS),
            },
            dedup: DedupWindow {
                records_max: 10_000_000,
                age_ms_max: 10 * 60 * 1000,
            },
            recovery: RecoveryMode::TolerateTornTail,
            checkpoint_interval_ms: 1000,
            page_cache_hot_bytes: Some(64 << 20),
            prefault_bytes: 32 << 20,
            verify_sealed_on_open: false,
            retention_check_interval_ms: 10_000,
            dedup_budget: None,
            clock: Clock::system(),
            flush_journal: None,
            disk: Disk::os(),
            background: Background::Threads,
            lock_dir: true,
        }
    }
}

impl Options {
    /// Rejects values that cannot work together, saying which and why.
    pub fn validate(&self) -> Result<()> {
        let bad = |option, expected, found| {
            Err(StorageError::InvalidOptions {
                option,
                expected,
                found,
            })
        };
        let positive = |option, found: u64| {
            if found == 0 {
                bad(option, Bound::Positive, 0)
            } else {
                Ok(())
            }
        };
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return bad(
                "segment_bytes",
                Bound::Range {
                    min: SEGMENT_BYTES_MIN,
                    max: SEGMENT_BYTES_MAX,
                },
                self.segment_bytes,
            );
        }
        let record_max = u64::from(self.record_bytes_max);
        if record_max < RECORD_HEADER_LEN as u64 || record_max > RECORD_BYTES_MAX as u64 {
            return bad(
                "record_bytes_max",
                Bound::Range {
                    min: RECORD_HEADER_LEN as u64,
                    max: RECORD_BYTES_MAX as u64,
                },
                record_max,
            );
        }
        if record_max > self.segment_bytes {
            return bad(
                "record_bytes_max",
                Bound::FitsInSegment(self.segment_bytes),
                record_max,
            );
        }
        positive("index_interval_bytes", u64::from(self.index_interval_bytes))?;
        positive("segment_age_ms", self.segment_age_ms)?;
        if let FlushMode::Async { interval_ms, bytes } = self.flush {
            positive("flush (async) interval_ms", interval_ms)?;
            positive("flush (async) bytes", bytes)?;
        }
        if self.dedup.records_max > DEDUP_RECORDS_MAX {
            return bad(
                "dedup.records_max",
                Bound::AtMost(DEDUP_RECORDS_MAX),
                self.dedup.records_max,
            );
        }
        if self.dedup.records_max > 0 {
            positive("dedup.age_ms_max", self.dedup.age_ms_max)?;
        }
        positive(
            "retention_check_interval_ms",
            self.retention_check_interval_ms,
        )?;
        // A limit of zero would delete every sealed segment at once; no
        // limit is None.
        if let Some(max) = self.retention.bytes_max {
            positive("retention.bytes_max", max)?;
        }
        if let Some(max) = self.retention.age_ms_max {
            positive("retention.age_ms_max", max)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Options::default().validate().unwrap();
    }

    #[test]
    fn contradictions_are_rejected() {
        type Change = fn(&mut Options);
        let cases: Vec<(Change, &str)> = vec![
            (|o| o.segment_bytes = 1000, "segment_bytes"),
            (|o| o.segment_bytes = 1 << 40, "segment_bytes"),
            (
                |o| {
                    o.segment_bytes = 1 << 16;
                    o.record_bytes_max = 1 << 20
                },
                "does not fit",
            ),
            (|o| o.record_bytes_max = 10, "record_bytes_max"),
            (
                |o| {
                    o.flush = FlushMode::Async {
                        interval_ms: 0,
                        bytes: 1,
                    }
                },
                "async",
            ),
            (|o| o.dedup.records_max = 1 << 40, "dedup.records_max"),
            (|o| o.index_interval_bytes = 0, "index_interval_bytes"),
            (|o| o.retention.bytes_max = Some(0), "retention"),
        ];
        for (change, needle) in cases {
            let mut options = Options::default();
            change(&mut options);
            let err = options.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }
}
