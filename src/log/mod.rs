//! The storage engine: a segmented, memory-mapped commit log.
//!
//! It knows nothing of networks, topics or consumers. A [`Log`] is one
//! directory of segments (`segment.rs`) holding records (`record.rs`), with a
//! sparse offset and time index per segment (`index.rs`), a window of recent
//! inner-msg-ids (`dedup.rs`), group commit (`flush.rs`) and recovery
//! (`recovery.rs`). All `unsafe` lives in `mmap.rs`.
//!
//! Threads: appends run on the caller's thread under one writer lock; a
//! durable wait runs the flush on the caller's thread too (group commit
//! leader); one background thread per log flushes in `Async` mode, writes the
//! checkpoint and applies retention. Reads take no lock beyond a brief read
//! lock on the segment list, and return zero-copy views of the maps.

pub mod clock;
pub mod dedup;
pub mod error;
mod flush;
pub mod index;
pub mod inspect;
pub mod journal;
mod mmap;
pub mod options;
pub mod record;
pub mod recovery;
mod segment;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

pub use clock::Clock;
pub use dedup::DedupIndex;
pub use error::{Result, StorageError};
pub use journal::FlushJournal;
pub use options::{
    DedupWindow, FlushMode, Options, Preallocate, RecoveryMode, Retention, WritePath,
};
pub use record::{InnerMsgId, Message};
pub use recovery::RecoveryReport;

use crate::sync::{lock, read, write};
use flush::GroupCommit;
pub use flush::FLUSHES_IN_FLIGHT;
use mmap::{MapWriter, SegmentMap};
use record::{Decoded, RECORD_HEADER_LEN};
use recovery::{classify_tail, scan_segment, Checkpoint, Scan, TailVerdict, CHECKPOINT_FILE};
use segment::{Segment, Spare, LOG_SUFFIX};

/// The file whose exclusive lock marks a directory as in use.
pub const LOCK_FILE: &str = "LOCK";
/// After failing to prepare the next segment's file, wait this long.
const SPARE_RETRY: Duration = Duration::from_secs(1);

/// Dropped pages are released in steps of at least this many bytes.
const RELEASE_STEP_BYTES: usize = 8 << 20;
/// How many messages ahead of the one being appended the dedup window's
/// cache lines are prefetched.
const DEDUP_PREFETCH_AHEAD: usize = 8;
/// Longest the background thread sleeps between checks.
const BACKGROUND_TICK_MS: u64 = 50;

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
    pub capacity_bytes: u64,
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
    /// The background and prefault threads.
    background: Mutex<Vec<JoinHandle<()>>>,
}

struct Inner {
    dir: PathBuf,
    options: Options,
    /// Held for the life of the log: the exclusive directory lock.
    _lock: File,
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
    /// The next segment's file, prepared by the background thread.
    spare: Mutex<Option<Spare>>,
    /// Spares prepared so far (names them), and when preparing one last
    /// failed (a full disk: try again later, not on every tick).
    spares_prepared: AtomicU64,
    spare_failed_at: Mutex<Option<Instant>>,
    /// The segment a roll left behind: flushed, its seal (index files,
    /// truncation) left to the background thread. One at a time.
    unsealed: Mutex<Option<(Arc<Segment>, MapWriter)>>,
    signal: Sender<Signal>,
    /// Wakes the prefault thread (`Signal::Flush` means "look again").
    prefault_signal: Sender<Signal>,
    report: RecoveryReport,
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

enum Signal {
    Flush,
    /// Background work other than flushing (dedup tables).
    Work,
    Stop,
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering it if the previous
    /// process did not close it. See [`RecoveryMode`] for what happens to
    /// damaged bytes; [`Log::recovery_report`] says what was done.
    pub fn open(dir: impl AsRef<Path>, mut options: Options) -> Result<Log> {
        options.validate()?;
        options.write_path = options.write_path.resolve(options.flush);
        let started = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(StorageError::io(&dir))?;
        let lock = lock_dir(&dir)?;
        remove_temporary_files(&dir)?;
        let checkpoint = read_checkpoint(&dir);
        let mut report = RecoveryReport {
            clean_shutdown: checkpoint.is_some_and(|c| c.clean),
            ..RecoveryReport::default()
        };
        let (segments, writer_parts) = open_segments(&dir, &options, checkpoint, &mut report)?;
        let (active, map) = writer_parts;
        let next_offset = active.next_offset();
        let last_timestamp_ms = segments
            .iter()
            .rev()
            .find_map(|s| s.last_timestamp_ms())
            .unwrap_or(0);
        let dedup = rebuild_dedup(&segments, &options, next_offset);
        // Everything now on disk is durable; a crash from here on is not a
        // clean shutdown.
        write_checkpoint(
            &dir,
            Checkpoint {
                durable_offset: next_offset,
                clean: false,
            },
        )?;
        report.segments = segments.len();
        report.next_offset = next_offset;
        report.duration = started.elapsed();
        log_report(&dir, &report);

        let (signal, receiver) = crossbeam_channel::bounded(1);
        let (prefault_signal, prefault_receiver) = crossbeam_channel::bounded(1);
        let prefaults = options.write_path == WritePath::Mmap && options.prefault_bytes > 0;
        let prefault_enabled = AtomicBool::new(prefaults);
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
                broken: None,
            }),
            segments: RwLock::new(segments),
            group: GroupCommit::new(next_offset),
            appended_bytes: AtomicU64::new(0),
            flushed_bytes: AtomicU64::new(0),
            flush_requested: AtomicBool::new(false),
            prefault_requested: AtomicBool::new(false),
            dedup_work_requested: AtomicBool::new(false),
            prefault_enabled,
            spare: Mutex::new(None),
            spares_prepared: AtomicU64::new(0),
            spare_failed_at: Mutex::new(None),
            unsealed: Mutex::new(None),
            signal,
            prefault_signal,
            report,
        });
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(body)
                .map_err(StorageError::io("<thread spawn>"))
        };
        let background = {
            let inner = Arc::clone(&inner);
            spawn("bida-log-bg", Box::new(move || background(inner, receiver)))?
        };
        let mut threads = vec![background];
        if prefaults {
            let inner = Arc::clone(&inner);
            threads.push(spawn(
                "bida-log-prefault",
                Box::new(move || prefaulter(inner, prefault_receiver)),
            )?);
        }
        Ok(Log {
            inner,
            background: Mutex::new(threads),
        })
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

    /// Whether appending `batch` now may roll the active segment: it is
    /// too full for the batch, or too old. A roll flushes the old segment
    /// and may create a file, so a caller on an async worker runs such an
    /// append where it may block. A racing append can roll first: this
    /// chooses where to run an append, it promises nothing.
    pub fn append_may_roll(&self, batch: &[Message<'_>]) -> bool {
        let bytes: usize = batch
            .iter()
            .map(|m| {
                RECORD_HEADER_LEN + m.key.map_or(0, <[u8]>::len) + m.headers.len() + m.payload.len()
            })
            .sum();
        let inner = &self.inner;
        let now = inner.options.clock.now_ms();
        let w = inner.lock_writer();
        w.map.remaining() < bytes
            || w.active
                .first_timestamp_ms()
                .is_some_and(|first| now.saturating_sub(first) >= inner.options.segment_age_ms)
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

    /// Makes everything appended so far durable.
    pub fn flush(&self) -> Result<()> {
        let target = self.inner.lock_writer().next_offset;
        self.inner.wait_durable(target)
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
        {
            let mut w = self.inner.lock_writer();
            w.broken
                .get_or_insert_with(|| Arc::new(StorageError::Closed));
        }
        self.inner.finish_seal();
        if let Some(spare) = lock(&self.inner.spare).take() {
            spare.discard();
        }
        self.flush()?;
        let durable_offset = self.inner.group.durable_offset();
        write_checkpoint(
            &self.inner.dir,
            Checkpoint {
                durable_offset,
                clean: true,
            },
        )
    }

    fn stop_background(&self) {
        let handles: Vec<JoinHandle<()>> = lock(&self.background).drain(..).collect();
        if handles.is_empty() {
            return;
        }
        let _ = self.inner.signal.send(Signal::Stop);
        let _ = self.inner.prefault_signal.send(Signal::Stop);
        for handle in handles {
            let _ = handle.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.stop_background();
    }
}

impl Inner {
    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        lock(&self.writer)
    }

    fn segments(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        read(&self.segments)
    }

    fn append(&self, batch: &[Message<'_>]) -> Result<Appended> {
        let record_max = self.options.record_bytes_max as usize;
        let mut lens = Vec::with_capacity(batch.len());
        for (index, msg) in batch.iter().enumerate() {
            let len = record::check_message(msg, record_max)
                .map_err(|reason| StorageError::InvalidMessage { index, reason })?;
            lens.push(len);
        }
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        if let Some(reason) = w.broken.clone().or_else(|| self.group.failure()) {
            return Err(StorageError::Failed(reason));
        }
        let now = self.options.clock.now_ms().max(w.last_timestamp_ms);
        w.dedup.expire(now);
        let durable = self.group.durable_offset();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut appended_bytes = 0u64;
        let mut first_ts = None;
        let interval = self.options.index_interval_bytes;
        // The index is locked once per batch (and again after a roll), not
        // once per record.
        let mut active = Arc::clone(&w.active);
        let mut index = active.index();
        // Hash every id first and prefetch a few messages ahead: the window
        // is far larger than the cache, and overlapping its misses is most
        // of the cost of deduplication.
        let hashes: Vec<u64> = if w.dedup.enabled() {
            batch.iter().map(|m| w.dedup.hash(m.id)).collect()
        } else {
            Vec::new()
        };
        for &hash in hashes.iter().take(DEDUP_PREFETCH_AHEAD) {
            w.dedup.prefetch(hash);
        }
        for (i, (msg, &len)) in batch.iter().zip(&lens).enumerate() {
            if let Some(&ahead) = hashes.get(i + DEDUP_PREFETCH_AHEAD) {
                w.dedup.prefetch(ahead);
            }
            let hash = hashes.get(i).copied().unwrap_or(0);
            if let Some(offset) = w.dedup.lookup_hashed(msg.id, hash) {
                outcomes.push(AppendOutcome {
                    offset,
                    duplicate: true,
                });
                continue;
            }
            let too_old = w
                .active
                .first_timestamp_ms()
                .is_some_and(|first| now.saturating_sub(first) >= self.options.segment_age_ms);
            if w.map.remaining() < len || too_old {
                // Publish what this batch wrote so far before sealing.
                drop(index);
                self.publish(w)?;
                w.active
                    .note_appended(w.next_offset, first_ts.unwrap_or(now), now);
                first_ts = None;
                self.roll(w)?;
                active = Arc::clone(&w.active);
                index = active.index();
            }
            let offset = w.next_offset;
            let position = w.map.cursor();
            let lag = u32::try_from(offset - durable.min(offset)).unwrap_or(u32::MAX);
            let mut header = [0u8; RECORD_HEADER_LEN];
            record::encode_header(&mut header, len, offset, now, lag, msg);
            let crc = record::record_crc(&header, msg);
            record::put_u32(&mut header, record::CRC_OFFSET, crc);
            w.map.write(&header);
            if let Some(key) = msg.key {
                w.map.write(key);
            }
            w.map.write(msg.headers);
            w.map.write(msg.payload);
            index.observe(
                (offset - active.base_offset) as u32,
                position as u32,
                now,
                interval,
            );
            w.dedup.insert_hashed(msg.id, hash, offset, now);
            w.next_offset += 1;
            appended_bytes += len as u64;
            first_ts.get_or_insert(now);
            outcomes.push(AppendOutcome {
                offset,
                duplicate: false,
            });
        }
        drop(index);
        self.publish(w)?;
        w.last_timestamp_ms = now;
        if let Some(first) = first_ts {
            w.active.note_appended(w.next_offset, first, now);
        }
        let durable_target = w.next_offset;
        let prefault = self.prefault_enabled.load(Ordering::Relaxed)
            && w.active
                .wants_prefault(w.map.cursor(), self.options.prefault_bytes as usize);
        let dedup_work = w.dedup.has_spare_work();
        drop(guard);
        if prefault && !self.prefault_requested.swap(true, Ordering::AcqRel) {
            let _ = self.prefault_signal.try_send(Signal::Flush);
        }
        if dedup_work && !self.dedup_work_requested.swap(true, Ordering::AcqRel) {
            let _ = self.signal.try_send(Signal::Work);
        }
        if appended_bytes > 0 {
            self.note_appended_bytes(appended_bytes);
        }
        Ok(Appended {
            outcomes,
            durable_target,
        })
    }

    /// Makes the writer's bytes readable. A failure here (an I/O error
    /// writing into preallocated space) leaves records counted but not
    /// stored, so the writer refuses everything after it.
    fn publish(&self, w: &mut Writer) -> Result<()> {
        if let Err(e) = w.map.publish() {
            let cause = Arc::new(StorageError::io(&w.active.path)(e));
            w.broken = Some(Arc::clone(&cause));
            self.group.fail(Arc::clone(&cause));
            return Err(StorageError::Failed(cause));
        }
        Ok(())
    }

    fn note_appended_bytes(&self, bytes: u64) {
        let total = self.appended_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if let FlushMode::Async {
            bytes: threshold, ..
        } = self.options.flush
        {
            let unflushed = total - self.flushed_bytes.load(Ordering::Acquire).min(total);
            if unflushed >= threshold && !self.flush_requested.swap(true, Ordering::AcqRel) {
                let _ = self.signal.try_send(Signal::Flush);
            }
        }
    }

    /// Starts a new segment at the next offset: the prepared spare renamed
    /// into place (or a file created now if none is ready), the old segment
    /// flushed, so nothing is ever durable in the new segment while the end
    /// of the old one is not. The old segment's seal (index files,
    /// truncation: three more fsyncs) is left to the background thread;
    /// a crash before it is done leaves a segment that open seals.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        // One seal pending at a time.
        self.finish_seal();
        let base = w.next_offset;
        let (capacity, write_path) = (self.options.segment_bytes, self.options.write_path);
        let spare = lock(&self.spare).take();
        let created = match spare {
            Some(spare) => Segment::from_spare(&self.dir, spare, base, capacity, write_path)
                .or_else(|e| {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "could not use the prepared segment file; creating one");
                    Segment::create(&self.dir, base, capacity, write_path)
                }),
            None => Segment::create(&self.dir, base, capacity, write_path),
        };
        let (segment, map) = created?;
        let old_map = std::mem::replace(&mut w.map, map);
        let old = std::mem::replace(&mut w.active, Arc::clone(&segment));
        if let Err(e) = old.flush_to(old_map.cursor(), self.options.flush_journal.as_ref()) {
            // The old segment may not be durable; nothing more may be acked.
            let cause = Arc::new(e);
            w.broken = Some(Arc::clone(&cause));
            self.group.fail(Arc::clone(&cause));
            return Err(StorageError::Failed(cause));
        }
        self.group.advance(base);
        write(&self.segments).push(segment);
        *lock(&self.unsealed) = Some((old, old_map));
        if !self.dedup_work_requested.swap(true, Ordering::AcqRel) {
            let _ = self.signal.try_send(Signal::Work);
        }
        tracing::debug!(dir = %self.dir.display(), base_offset = base, "rolled to a new segment");
        Ok(())
    }

    /// Seals the segment the last roll left behind, if any. A failure costs
    /// nothing but time: its records are durable, and open finishes a seal.
    fn finish_seal(&self) {
        let mut unsealed = lock(&self.unsealed);
        if let Some((segment, writer)) = unsealed.take() {
            if let Err(e) = segment.seal(&self.dir, writer, self.options.flush_journal.as_ref()) {
                tracing::warn!(segment = %segment.path.display(), error = %e, "could not seal the segment; the next open will");
            }
        }
    }

    /// Prepares the next segment's file once the active one is a quarter
    /// full (so idle logs do not hold a second preallocated file).
    fn prepare_spare_if_due(&self) {
        if lock(&self.spare).is_some() {
            return;
        }
        if lock(&self.spare_failed_at).is_some_and(|t| t.elapsed() < SPARE_RETRY) {
            return;
        }
        let (cursor, capacity) = {
            let w = self.lock_writer();
            if w.broken.is_some() {
                return;
            }
            (w.map.cursor() as u64, w.active.capacity_bytes())
        };
        if cursor < capacity / 4 {
            return;
        }
        let n = self.spares_prepared.fetch_add(1, Ordering::Relaxed);
        let zeroes = self.options.preallocate == Preallocate::Zeroes;
        match segment::prepare_spare(&self.dir, n, self.options.segment_bytes, zeroes) {
            Ok(spare) => {
                *lock(&self.spare_failed_at) = None;
                *lock(&self.spare) = Some(spare);
            }
            Err(e) => {
                // Said once per run of failures (a full disk may last).
                if lock(&self.spare_failed_at)
                    .replace(Instant::now())
                    .is_none()
                {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "could not prepare the next segment file; trying again every second");
                } else {
                    tracing::debug!(dir = %self.dir.display(), error = %e, "could not prepare the next segment file");
                }
            }
        }
    }

    fn wait_durable(&self, target: u64) -> Result<()> {
        self.group.wait_for(
            target,
            || self.flush_target(),
            |(segment, end, appended)| self.flush_active(segment, end, appended),
        )
    }

    /// What a flush started now covers: the active segment up to what is
    /// published, the offset after it, and the bytes appended so far.
    fn flush_target(&self) -> (u64, (Arc<Segment>, usize, u64)) {
        let w = self.lock_writer();
        let appended = self.appended_bytes.load(Ordering::Acquire);
        (
            w.next_offset,
            (Arc::clone(&w.active), w.map.cursor(), appended),
        )
    }

    /// Flushes `segment` up to `end` (from [`Inner::flush_target`]).
    fn flush_active(&self, segment: Arc<Segment>, end: usize, appended: u64) -> Result<()> {
        let started = std::time::Instant::now();
        segment.flush_to(end, self.options.flush_journal.as_ref())?;
        if let Some(observe) = self.flush_observer.get() {
            observe(started.elapsed());
        }
        self.flushed_bytes.fetch_max(appended, Ordering::AcqRel);
        if let Some(hot) = self.options.page_cache_hot_bytes {
            segment.release_cold_pages(hot, RELEASE_STEP_BYTES);
        }
        Ok(())
    }

    /// Keeps `prefault_bytes` ahead of the writer faulted in. Runs on the
    /// background thread, so the zero-fill of fresh pages is paid on the
    /// other core instead of in the append path.
    fn prefault_ahead(&self) {
        self.prefault_requested.store(false, Ordering::Release);
        if !self.prefault_enabled.load(Ordering::Relaxed) {
            return;
        }
        let window = self.options.prefault_bytes as usize;
        let (segment, cursor) = {
            let w = self.lock_writer();
            (Arc::clone(&w.active), w.map.cursor())
        };
        if !segment.wants_prefault(cursor, window) {
            return;
        }
        if let Err(e) = segment.prefault(cursor, window) {
            tracing::info!(error = %e, "prefaulting is not available; appends fault pages in themselves");
            self.prefault_enabled.store(false, Ordering::Relaxed);
        }
    }

    fn apply_retention(&self, now_ms: u64) -> Result<RetentionReport> {
        let retention = self.options.retention;
        let doomed: Vec<Arc<Segment>> = {
            let segments = self.segments();
            let sealed = &segments[..segments.len().saturating_sub(1)];
            let mut total: u64 = segments.iter().map(|s| s.size_bytes()).sum();
            let mut doomed = Vec::new();
            for segment in sealed {
                let over_size = retention.bytes_max.is_some_and(|max| total > max);
                let over_age = retention.age_ms_max.is_some_and(|max| {
                    segment
                        .last_timestamp_ms()
                        .is_some_and(|ts| now_ms.saturating_sub(ts) > max)
                });
                if !(over_size || over_age) {
                    break;
                }
                total -= segment.size_bytes();
                doomed.push(Arc::clone(segment));
            }
            doomed
        };
        self.delete_segments(doomed)
    }

    /// Removes `doomed` (a prefix of the sealed segments) from the log and
    /// deletes their files.
    fn delete_segments(&self, doomed: Vec<Arc<Segment>>) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        if !doomed.is_empty() {
            // Not while its seal may still be writing index files.
            self.finish_seal();
            let mut segments = write(&self.segments);
            segments.retain(|s| !doomed.iter().any(|d| Arc::ptr_eq(s, d)));
        }
        for segment in &doomed {
            segment.delete_files(&self.dir)?;
            report.segments_deleted += 1;
            report.bytes_deleted += segment.size_bytes();
            tracing::info!(segment = %segment.path.display(), bytes = segment.size_bytes(), "deleted a segment");
        }
        if !doomed.is_empty() {
            segment::sync_dir(&self.dir)?;
        }
        report.start_offset = self.segments().first().map_or(0, |s| s.base_offset);
        Ok(report)
    }
}

/// The background thread: async flushes, checkpoints, retention.
fn background(inner: Arc<Inner>, signals: Receiver<Signal>) {
    let options = &inner.options;
    let flush_interval = match options.flush {
        FlushMode::Async { interval_ms, .. } => Some(Duration::from_millis(interval_ms)),
        FlushMode::Sync => None,
    };
    let checkpoint_interval = (options.checkpoint_interval_ms > 0)
        .then(|| Duration::from_millis(options.checkpoint_interval_ms));
    let retention_interval = Duration::from_millis(options.retention_check_interval_ms);
    let tick = [
        flush_interval,
        checkpoint_interval,
        Some(Duration::from_millis(BACKGROUND_TICK_MS)),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(Duration::from_millis(BACKGROUND_TICK_MS));
    let mut last_flush = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut last_retention = Instant::now();
    let mut checkpointed = inner.group.durable_offset();
    loop {
        let requested = match signals.recv_timeout(tick) {
            Ok(Signal::Flush) => true,
            Ok(Signal::Work) => false,
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => false,
        };
        if let Some(interval) = flush_interval {
            if requested || last_flush.elapsed() >= interval {
                inner.flush_requested.store(false, Ordering::Release);
                let target = inner.lock_writer().next_offset;
                if let Err(e) = inner.wait_durable(target) {
                    tracing::error!(dir = %inner.dir.display(), error = %e, "background flush failed; the log refuses writes");
                }
                last_flush = Instant::now();
            }
        }
        // Full-size dedup tables are prepared (and old ones dropped) here,
        // not on the append path.
        inner.dedup_work_requested.store(false, Ordering::Release);
        let work = inner.lock_writer().dedup.take_spare_work();
        if let Some(tables) = work.and_then(|w| w.run()) {
            inner.lock_writer().dedup.put_spare(tables);
        }
        // A roll's seal, and the next segment's file, off the append path.
        inner.finish_seal();
        inner.prepare_spare_if_due();
        if let Some(interval) = checkpoint_interval {
            let durable = inner.group.durable_offset();
            if durable > checkpointed && last_checkpoint.elapsed() >= interval {
                let checkpoint = Checkpoint {
                    durable_offset: durable,
                    clean: false,
                };
                match write_checkpoint(&inner.dir, checkpoint) {
                    Ok(()) => checkpointed = durable,
                    Err(e) => tracing::warn!(error = %e, "could not write the checkpoint"),
                }
                last_checkpoint = Instant::now();
            }
        }
        if last_retention.elapsed() >= retention_interval {
            if let Err(e) = inner.apply_retention(inner.options.clock.now_ms()) {
                tracing::warn!(error = %e, "retention failed");
            }
            last_retention = Instant::now();
        }
    }
}

/// The prefault thread: keeps pages ahead of the writer faulted in, so the
/// zero-fill of fresh file pages runs on the other core. Apart from the
/// background thread because an async flush can block that one for tens of
/// milliseconds, long enough for the writer to run out of faulted pages.
fn prefaulter(inner: Arc<Inner>, signals: Receiver<Signal>) {
    loop {
        match signals.recv_timeout(Duration::from_millis(BACKGROUND_TICK_MS)) {
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Signal::Flush | Signal::Work) | Err(RecvTimeoutError::Timeout) => {
                inner.prefault_ahead()
            }
        }
    }
}

type ActiveParts = (Arc<Segment>, MapWriter);

/// Opens every segment: sealed ones from their indexes, the last one by a
/// verifying scan with torn-tail handling.
fn open_segments(
    dir: &Path,
    options: &Options,
    checkpoint: Option<Checkpoint>,
    report: &mut RecoveryReport,
) -> Result<(Vec<Arc<Segment>>, ActiveParts)> {
    let mut bases = list_segments(dir)?;
    if bases.is_empty() {
        report.created = true;
        if checkpoint.is_some_and(|c| c.durable_offset > 0) {
            return Err(StorageError::Corrupt {
                file: dir.join(CHECKPOINT_FILE),
                position: 0,
                reason: "the checkpoint records durable data but no segment file exists".into(),
            });
        }
        let (segment, map) = Segment::create(dir, 0, options.segment_bytes, options.write_path)?;
        return Ok((vec![Arc::clone(&segment)], (segment, map)));
    }
    let mut segments: Vec<Arc<Segment>> = Vec::new();
    let mut active_base = *bases.last().unwrap_or(&0);
    for (i, &base) in bases.iter().enumerate().take(bases.len() - 1) {
        let opened = Segment::open_sealed(
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
            Err(e @ StorageError::Corrupt { .. }) if options.recovery == RecoveryMode::Repair => {
                // Drop every later segment; this one becomes the active one
                // and is cut at its first invalid record below.
                let dropped: Vec<u64> = bases.drain(i + 1..).collect();
                for &later in &dropped {
                    remove_segment_files(dir, later)?;
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
    let (active, map) = open_active(dir, active_base, options, bound, report)?;
    check_continuity(segments.last(), active_base, &active.path)?;
    let next = active.next_offset();
    if let Some(cp) = checkpoint {
        if cp.durable_offset > next && options.recovery != RecoveryMode::Repair {
            return Err(StorageError::Corrupt {
                file: active.path.clone(),
                position: active.size_bytes(),
                reason: format!(
                    "the log ends at offset {next} but offsets below {} were recorded durable",
                    cp.durable_offset
                ),
            });
        }
    }
    segments.push(Arc::clone(&active));
    Ok((segments, (active, map)))
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
) -> Result<ActiveParts> {
    let path = dir.join(segment::file_name(base, LOG_SUFFIX));
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(StorageError::io(&path))?;
    let len = file.metadata().map_err(StorageError::io(&path))?.len();
    if len < options.segment_bytes {
        rustix::fs::fallocate(
            &file,
            rustix::fs::FallocateFlags::empty(),
            0,
            options.segment_bytes,
        )
        .map_err(|e| StorageError::io(&path)(e.into()))?;
    }
    let capacity = len.max(options.segment_bytes) as usize;
    let (scan, cut) = {
        let view = SegmentMap::open_sealed(&file, capacity).map_err(StorageError::io(&path))?;
        let bytes = view.bytes();
        let scan = scan_segment(bytes, base, options.index_interval_bytes, true);
        let cut = judge_tail(
            &path,
            &file,
            bytes,
            &scan,
            options.recovery,
            checkpoint_bound,
            report,
        )?;
        (scan, cut)
    };
    report.records_verified += scan.records;
    report.bytes_verified += scan.valid_end as u64;
    let valid_end = scan.valid_end;
    let (segment, mut map) =
        Segment::active_from_scan(path, file, base, capacity, scan, options.write_path)?;
    if let Some(dirty_end) = cut {
        map.zero_to(dirty_end)
            .map_err(StorageError::io(&segment.path))?;
        segment::Segment::flush_to(&segment, dirty_end, options.flush_journal.as_ref())?;
        report.bytes_truncated += (dirty_end - valid_end) as u64;
    }
    Ok((segment, map))
}

/// Decides the fate of bytes past the valid run of the active segment:
/// `Ok(None)` nothing to do, `Ok(Some(end))` clear `[valid_end, end)`, or an
/// error naming the damage.
fn judge_tail(
    path: &Path,
    file: &File,
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
        (TailVerdict::Damaged { from, reason, .. }, RecoveryMode::TolerateTornTail) => Err(corrupt(
            from,
            format!("{reason}; not a torn tail (open with RecoveryMode::Repair to cut the log here)"),
        )),
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
        | (TailVerdict::Damaged { from, to, reason, .. }, RecoveryMode::Repair) => {
            let note = format!("cut {} bytes at byte {from} of {}: {reason}", to - from, path.display());
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
    let mut dedup = DedupIndex::new(options.dedup);
    if !dedup.enabled() {
        return dedup;
    }
    let start_offset = segments.first().map_or(0, |s| s.base_offset);
    let mut offset = next_offset
        .saturating_sub(options.dedup.records_max)
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
    dedup
}

/// Tries of the directory lock, 10 ms apart, before `Locked`.
const LOCK_RETRIES: u32 = 50;

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(StorageError::io(&path))?;
    // A lock can be held for a moment by a process that is not its owner:
    // a child forked by any thread of this process shares the descriptor
    // until it execs (CLOEXEC), so a log closed and reopened while another
    // thread spawns a process can find its own old lock. Retry briefly
    // before calling the directory taken.
    let mut attempt = 0;
    let locked = loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if attempt < LOCK_RETRIES => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other,
        }
    };
    match locked {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(StorageError::Locked {
                path,
                holder: holder.trim().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(StorageError::io(path)(e)),
    }
    let me = format!("pid {}", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all(me.as_bytes()))
        .map_err(StorageError::io(&path))?;
    Ok(file)
}

fn remove_temporary_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let path = entry.map_err(StorageError::io(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            fs::remove_file(&path).map_err(StorageError::io(&path))?;
        }
    }
    Ok(())
}

/// Base offsets of the segment files in `dir`, in order.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let entry = entry.map_err(StorageError::io(dir))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_log_file_name)
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn remove_segment_files(dir: &Path, base: u64) -> Result<()> {
    for suffix in [
        segment::LOG_SUFFIX,
        segment::INDEX_SUFFIX,
        segment::TIME_INDEX_SUFFIX,
    ] {
        let path = dir.join(segment::file_name(base, suffix));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(path)(e)),
        }
    }
    Ok(())
}

fn read_checkpoint(dir: &Path) -> Option<Checkpoint> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = fs::read(&path).ok()?;
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

fn write_checkpoint(dir: &Path, checkpoint: Checkpoint) -> Result<()> {
    segment::write_file_synced(&dir.join(CHECKPOINT_FILE), &checkpoint.encode())
}

fn log_report(dir: &Path, report: &RecoveryReport) {
    if report.created {
        tracing::info!(dir = %dir.display(), "created a new log");
    } else if report.bytes_truncated > 0 || report.repaired.is_some() || !report.clean_shutdown {
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
            "recovered log"
        );
    } else {
        tracing::info!(
            dir = %dir.display(),
            segments = report.segments,
            next_offset = report.next_offset,
            duration_ms = report.duration.as_secs_f64() * 1000.0,
            "opened log"
        );
    }
}
