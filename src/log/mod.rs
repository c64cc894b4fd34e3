//! The storage engine: a segmented, memory-mapped commit log.
//!
//! It knows nothing of networks, topics or consumers. A [`Log`] is one
//! directory of segments (`segment.rs`) holding records (`record.rs`, the
//! one encoder of the record layout), with a sparse offset and time index
//! per segment (`index.rs`), a window of recent inner-msg-ids (`dedup.rs`),
//! group commit (`flush.rs`) and recovery (`recovery.rs`). All `unsafe`
//! lives in `mmap.rs`.
//!
//! This file holds the public API ([`Log`]) and the state its parts share
//! (`Inner`, `Writer`). The parts, in the order data flows through them:
//! - `open.rs`: the directory lock, the checkpoint, every segment opened
//!   and the tail recovered, the dedup window rebuilt;
//! - `writer.rs`: append, publish, roll and seal, flushes of the active
//!   segment;
//! - `background.rs`: the background and prefault threads;
//! - `retention.rs`: which sealed segments go, and deleting them.
//!
//! Threads: appends run on the caller's thread under one writer lock; a
//! durable wait runs the flush on the caller's thread too (group commit
//! leader); one background thread per log flushes in `Async` mode, writes the
//! checkpoint and applies retention. Reads take no lock beyond a brief read
//! lock on the segment list, and return zero-copy views of the maps.

mod background;
pub mod clock;
pub mod dedup;
pub mod disk;
pub mod error;
mod flush;
pub mod index;
pub mod inspect;
pub mod journal;
mod mmap;
mod open;
pub mod options;
pub mod record;
pub mod recovery;
mod retention;
mod segment;
pub mod workers;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

pub use clock::Clock;
pub use dedup::{DedupBudget, DedupIndex};
pub use disk::{Crash, Disk, FileBudget, MemoryDisk};
pub use error::{Bound, Result, StorageError};
pub use journal::FlushJournal;
pub use options::{
    Background, DedupWindow, FlushMode, Options, Preallocate, RecoveryMode, Retention, WritePath,
};
pub use record::{InnerMsgId, Message};
pub use recovery::RecoveryReport;
pub use workers::Workers;
use workers::{Job, TaskId};

use crate::sync::lock;
use flush::GroupCommit;
pub use flush::FLUSHES_IN_FLIGHT;
use mmap::MapWriter;
pub use open::LOCK_FILE;
use record::Decoded;
use recovery::Checkpoint;
use segment::Segment;
use writer::Roll;

/// The fate of one message of an appended batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub offset: u64,
    /// The id was already in the dedup window: nothing was stored and
    /// `offset` is where the first copy is.
    pub duplicate: bool,
}

/// The result of an append: an outcome per message, and the offset that must
/// be durable before the batch may be acknowledged under `FlushMode::Sync`.
#[derive(Debug)]
pub struct Appended {
    pub outcomes: Vec<AppendOutcome>,
    durable_target: u64,
}

impl Appended {
    /// Every offset below this must be durable for the batch to be.
    pub fn durable_target(&self) -> u64 {
        self.durable_target
    }
}

/// Receives the duration of each flush (see [`Log::observe_flushes`]).
pub type FlushObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// A decoded record whose parts are zero-copy views of the segment map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub id: InnerMsgId,
    pub key: Option<Bytes>,
    pub headers: Bytes,
    pub payload: Bytes,
}

/// Whole records read from one segment.
#[derive(Clone, Debug)]
pub struct ReadBatch {
    /// The records' bytes exactly as stored (see `record.rs`).
    pub bytes: Bytes,
    pub records: usize,
    pub first_offset: u64,
    pub next_offset: u64,
    segment: PathBuf,
    position: usize,
}

impl ReadBatch {
    fn empty(offset: u64) -> Self {
        ReadBatch {
            bytes: Bytes::new(),
            records: 0,
            first_offset: offset,
            next_offset: offset,
            segment: PathBuf::new(),
            position: 0,
        }
    }

    /// Decodes the records, verifying each checksum: bytes read back from
    /// disk are not trusted either.
    pub fn iter(&self) -> impl Iterator<Item = Result<Record>> + '_ {
        let mut at = 0usize;
        let mut expected = self.first_offset;
        std::iter::from_fn(move || {
            if at >= self.bytes.len() {
                return None;
            }
            let corrupt = |reason: String| StorageError::Corrupt {
                file: self.segment.clone(),
                position: (self.position + at) as u64,
                reason,
            };
            let item = match record::decode(&self.bytes[at..]) {
                Ok(Decoded::Record(r)) if r.offset == expected => {
                    let slice = |range: std::ops::Range<usize>| {
                        self.bytes.slice(at + range.start..at + range.end)
                    };
                    let rec = Record {
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        id: r.id,
                        key: r.key.map(|_| slice(r.key_range.clone())),
                        headers: slice(r.headers_range.clone()),
                        payload: slice(r.payload_range.clone()),
                    };
                    at += r.len;
                    expected += 1;
                    Ok(rec)
                }
                Ok(Decoded::Record(r)) => Err(corrupt(format!(
                    "offset {} where {expected} was expected",
                    r.offset
                ))),
                Ok(Decoded::Unwritten) => Err(corrupt("zero length inside a read batch".into())),
                Err(e) => Err(corrupt(e.to_string())),
            };
            if item.is_err() {
                at = self.bytes.len();
            }
            Some(item)
        })
    }
}

/// A summary of one segment, for tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub base_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    /// The most the segment may hold (`segment_bytes` for an active one).
    pub capacity_bytes: u64,
    /// Bytes of its file: space reserved for records.
    pub allocated_bytes: u64,
    pub sealed: bool,
}

/// What one pass of retention deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    /// The first offset still in the log.
    pub start_offset: u64,
}

/// A commit log in one directory. Share it between threads by reference or
/// `Arc`; call [`Log::close`] to shut down cleanly. Dropping it without
/// closing is treated like a crash by the next open (the tail is verified).
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    options: Options,
    /// Held for the life of the log: the exclusive directory lock (none
    /// when the owner holds one over it, `Options::lock_dir`).
    _lock: Option<disk::DirLock>,
    /// Told how long each flush of the active segment took (metrics).
    flush_observer: std::sync::OnceLock<FlushObserver>,
    writer: Mutex<Writer>,
    /// Sealed segments in offset order, then the active one.
    segments: RwLock<Vec<Arc<Segment>>>,
    group: GroupCommit,
    /// Bytes appended and bytes flushed, for the async byte threshold.
    appended_bytes: AtomicU64,
    flushed_bytes: AtomicU64,
    flush_requested: AtomicBool,
    prefault_requested: AtomicBool,
    /// The background thread was asked to prepare dedup tables.
    dedup_work_requested: AtomicBool,
    /// Cleared when the kernel refuses to prefault.
    prefault_enabled: AtomicBool,
    /// The segment a roll left behind: flushed, its seal (index files,
    /// truncation) left to the background thread. One at a time.
    unsealed: Mutex<Option<(Arc<Segment>, MapWriter)>>,
    /// The workers that run this log's background work and flushes, and
    /// its ticket with them (none under `Background::Manual`).
    workers: std::sync::OnceLock<(Arc<Workers>, TaskId)>,
    /// Durable waits not answered yet (`Log::when_durable`).
    waiters: Mutex<Vec<(u64, DurableCallback)>>,
    /// The file system holding the log (`FileSystem::filesystem_id`):
    /// logs on one are made durable together by a flush round.
    filesystem: u64,
    report: RecoveryReport,
    /// When the periodic background jobs last ran; held by a pass.
    background_state: Mutex<background::BackgroundState>,
}

struct Writer {
    active: Arc<Segment>,
    map: MapWriter,
    next_offset: u64,
    last_timestamp_ms: u64,
    dedup: DedupIndex,
    /// Set when a roll failed half-way: no further appends.
    broken: Option<Arc<StorageError>>,
}

/// Told whether the offsets a [`Log::when_durable`] asked for are durable.
pub type DurableCallback = Box<dyn FnOnce(std::result::Result<(), Arc<StorageError>>) + Send>;

impl Log {
    /// Opens (or creates) the log in `dir`, recovering it if the previous
    /// process did not close it. See [`RecoveryMode`] for what happens to
    /// damaged bytes; [`Log::recovery_report`] says what was done.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Log> {
        open::open(dir.as_ref(), options)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// Appends a batch: every message is checked first, so a bad one rejects
    /// the whole batch with its index. Messages whose inner-msg-id is in the
    /// dedup window store nothing and report the original offset.
    ///
    /// Under `FlushMode::Sync` the batch is not durable yet: acknowledge it
    /// only after [`Log::wait_durable`] returns (or use [`Log::append_acked`]).
    #[must_use = "under FlushMode::Sync an append is not durable until wait_durable returns"]
    pub fn append(&self, batch: &[Message<'_>]) -> Result<Appended> {
        self.inner.append(batch)
    }

    /// [`Log::append`], unless the batch may roll the active segment (it
    /// does not fit in what is left of it, or the segment is too old): then
    /// nothing is appended and the answer is `None`. A roll flushes the old
    /// segment and may create a file, so a caller on an async worker
    /// appends this way first, and only a batch that may roll goes where
    /// it may block. One lock either way: the check and the append are one
    /// step, so no racing append can roll in between.
    #[must_use = "under FlushMode::Sync an append is not durable until wait_durable returns"]
    pub fn append_unless_roll(&self, batch: &[Message<'_>]) -> Result<Option<Appended>> {
        self.inner.append_with(batch, Roll::Refuse)
    }

    /// Appends and returns once the flush policy allows acknowledging:
    /// durable under `Sync`, at once under `Async`.
    pub fn append_acked(&self, batch: &[Message<'_>]) -> Result<Appended> {
        let appended = self.inner.append(batch)?;
        if self.inner.options.flush == FlushMode::Sync {
            self.wait_durable(appended.durable_target)?;
        }
        Ok(appended)
    }

    /// Returns once every offset below `target` is durable, joining (or
    /// leading) a group commit.
    pub fn wait_durable(&self, target: u64) -> Result<()> {
        self.inner.wait_durable(target)
    }

    /// Calls `done` once every offset below `target` is durable (or the
    /// log failed), without blocking the caller: a worker leads one group
    /// commit for all the waits pending, so waiting costs no thread of the
    /// caller's (an async task awaits a channel `done` completes). At once,
    /// on this thread, if the offsets are durable already; on this thread
    /// too, blocking, under `Background::Manual`. `done` is dropped
    /// uncalled if the log is dropped first.
    pub fn when_durable(&self, target: u64, done: DurableCallback) {
        if self.inner.group.durable_offset() >= target {
            return done(Ok(()));
        }
        match self.inner.workers.get() {
            Some((workers, id)) => {
                lock(&self.inner.waiters).push((target, done));
                workers.wake(*id, Job::Flush);
            }
            None => done(self.inner.wait_durable(target).map_err(Arc::new)),
        }
    }

    /// Makes everything appended so far durable.
    pub fn flush(&self) -> Result<()> {
        let target = self.inner.lock_writer().next_offset;
        self.inner.wait_durable(target)
    }

    /// Why the log refuses writes, if it was opened damaged
    /// (`RecoveryMode::Quarantine`): a [`StorageError::Damaged`].
    pub fn damage(&self) -> Option<Arc<StorageError>> {
        self.inner
            .lock_writer()
            .broken
            .clone()
            .filter(|e| matches!(**e, StorageError::Damaged { .. }))
    }

    /// Every offset below this is durable.
    pub fn durable_offset(&self) -> u64 {
        self.inner.group.durable_offset()
    }

    /// The offset the next appended record will get.
    pub fn next_offset(&self) -> u64 {
        self.inner.segments().last().map_or(0, |s| s.next_offset())
    }

    /// The first offset still in the log.
    pub fn start_offset(&self) -> u64 {
        self.inner.segments().first().map_or(0, |s| s.base_offset)
    }

    /// Whole records from `offset` on, from one segment: at least one if
    /// `offset` exists, then up to `max_records` and `max_bytes`. Reading at
    /// the end returns an empty batch; before the start, an error.
    pub fn read(&self, offset: u64, max_records: usize, max_bytes: usize) -> Result<ReadBatch> {
        let segments = self.inner.segments();
        let start = segments.first().map_or(0, |s| s.base_offset);
        let end = segments.last().map_or(0, |s| s.next_offset());
        if offset < start || offset > end {
            return Err(StorageError::OffsetOutOfRange { offset, start, end });
        }
        let i = segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        for segment in segments.iter().skip(i) {
            if let Some(read) = segment.read(offset, max_records, max_bytes)? {
                return Ok(ReadBatch {
                    bytes: read.bytes,
                    records: read.records,
                    first_offset: offset,
                    next_offset: read.next_offset,
                    segment: segment.path.clone(),
                    position: read.position,
                });
            }
        }
        Ok(ReadBatch::empty(offset))
    }

    /// The first offset whose timestamp is at or after `timestamp_ms`.
    pub fn offset_for_timestamp(&self, timestamp_ms: u64) -> Option<u64> {
        self.inner
            .segments()
            .iter()
            .find_map(|s| s.offset_for_timestamp(timestamp_ms))
    }

    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.inner
            .segments()
            .iter()
            .map(|s| SegmentInfo {
                path: s.path.clone(),
                base_offset: s.base_offset,
                next_offset: s.next_offset(),
                size_bytes: s.size_bytes(),
                capacity_bytes: s.capacity_bytes(),
                allocated_bytes: s.allocated_bytes(),
                sealed: s.is_sealed(),
            })
            .collect()
    }

    /// Deletes whole sealed segments beyond the retention limits now (the
    /// background thread also does this periodically).
    pub fn apply_retention(&self) -> Result<RetentionReport> {
        self.inner
            .apply_retention(self.inner.options.clock.now_ms())
    }

    /// Runs one pass of background work now (see [`Background`]): an async
    /// flush if due, the seal a roll left, space reserved ahead of the
    /// writer, dedup tables, and the checkpoint and retention if due. Under
    /// `Background::Manual` this is the only way that work runs.
    pub fn background_pass(&self) {
        let _next_due = self.inner.background_pass(false);
    }

    /// Calls `observe` with the duration of every flush (fsync) of the
    /// active segment from now on. Only the first observer set is kept.
    pub fn observe_flushes(&self, observe: FlushObserver) {
        let _ = self.inner.flush_observer.set(observe);
    }

    /// Deletes every sealed segment whose records all lie below `offset`
    /// (the owner no longer needs them). The active segment always stays.
    pub fn delete_before(&self, offset: u64) -> Result<RetentionReport> {
        let doomed: Vec<Arc<Segment>> = {
            let segments = self.inner.segments();
            let sealed = &segments[..segments.len().saturating_sub(1)];
            sealed
                .iter()
                .take_while(|s| s.next_offset() <= offset)
                .cloned()
                .collect()
        };
        self.inner.delete_segments(doomed)
    }

    /// Deletes every record now in the log (a purge): the active segment
    /// is sealed if it holds any, then every sealed segment is deleted.
    /// Offsets go on from where they were; the log's start becomes its end.
    /// Space comes back at once, which also makes this the way out of a
    /// full disk for data nobody needs.
    pub fn purge(&self) -> Result<RetentionReport> {
        let end = {
            let mut w = self.inner.lock_writer();
            if let Some(reason) = &w.broken {
                return Err(StorageError::Failed(Arc::clone(reason)));
            }
            if w.next_offset > w.active.base_offset {
                self.inner.roll(&mut w)?;
            }
            w.next_offset
        };
        self.inner.finish_seal();
        self.delete_before(end)
    }

    /// Lets go of the pages of every durable record: this process's
    /// mappings and the page cache. For an owner that has just read the
    /// whole log once (a rebuild on open) and will not read it again soon.
    pub fn release_durable_pages(&self) {
        for segment in self.inner.segments().iter() {
            segment.release_durable_pages();
        }
    }

    /// The offset of the record stored with `id`, if `id` is still in the
    /// dedup window.
    pub fn lookup_id(&self, id: InnerMsgId) -> Option<u64> {
        if id.is_none() {
            return None;
        }
        self.inner.lock_writer().dedup.lookup(id)
    }

    /// The first offset whose id the dedup window must still remember (the
    /// log's end when it remembers none): records from here on must not be
    /// deleted if the window is to survive a restart.
    pub fn dedup_window_start(&self) -> u64 {
        let mut w = self.inner.lock_writer();
        if !w.dedup.enabled() {
            return w.next_offset;
        }
        let now = self.inner.options.clock.now_ms().max(w.last_timestamp_ms);
        w.dedup.expire(now);
        if w.dedup.ids_in_window() == 0 {
            w.next_offset
        } else {
            w.dedup.window_start()
        }
    }

    /// Heap bytes of the dedup window, and the ids it holds.
    pub fn dedup_memory(&self) -> (usize, u64) {
        let w = self.inner.lock_writer();
        (w.dedup.bytes_used(), w.dedup.ids_in_window())
    }

    /// Flushes everything, records a clean shutdown and releases the
    /// directory.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// [`Log::close`] for a log shared behind an `Arc`: stops the
    /// background threads, seals what a roll left, flushes and records a
    /// clean shutdown. Appends fail afterwards; the directory is released
    /// when the last reference goes.
    pub fn shutdown(&self) -> Result<()> {
        self.stop_background();
        if self.inner.is_damaged() {
            // Quarantined: nothing to flush, nothing on disk to change.
            return Ok(());
        }
        self.inner.answer_waiters();
        {
            let mut w = self.inner.lock_writer();
            w.broken
                .get_or_insert_with(|| Arc::new(StorageError::Closed));
        }
        self.inner.finish_seal();
        self.flush()?;
        let durable_offset = self.inner.group.durable_offset();
        open::write_checkpoint(
            &self.inner.options.disk,
            &self.inner.dir,
            Checkpoint {
                durable_offset,
                clean: true,
            },
        )
    }

    /// Leaves the workers: none of their jobs for this log runs after a
    /// running one ends (a log's private workers are stopped with it).
    fn stop_background(&self) {
        if let Some((workers, id)) = self.inner.workers.get() {
            workers.deregister(*id);
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.stop_background();
    }
}
