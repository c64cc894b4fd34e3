//! A log's work off the append path, run by workers (`workers.rs`): the
//! background pass (async flushes, checkpoints, sealing, space reserved
//! ahead of the writer, dedup tables, retention), prefaulting pages ahead of
//! the writer, and answering durable waits.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::StorageError;
use super::open::write_checkpoint;
use super::options::FlushMode;
use super::recovery::Checkpoint;
use super::segment::Segment;
use super::workers::{Job, Task};
use super::{DurableCallback, Inner};
use crate::sync::lock;

impl Inner {
    /// Keeps `prefault_bytes` ahead of the writer faulted in. Runs on a
    /// worker, so the zero-fill of fresh pages is paid on another core
    /// instead of in the append path.
    pub(super) fn prefault_ahead(&self) {
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
}

/// When the background work last ran each of its periodic jobs.
pub(super) struct BackgroundState {
    last_flush: Instant,
    last_checkpoint: Instant,
    last_retention: Instant,
    /// The durable offset the last checkpoint recorded.
    checkpointed: u64,
}

impl BackgroundState {
    pub(super) fn new(durable_offset: u64) -> Self {
        let now = Instant::now();
        BackgroundState {
            last_flush: now,
            last_checkpoint: now,
            last_retention: now,
            checkpointed: durable_offset,
        }
    }
}

impl Inner {
    fn flush_interval(&self) -> Option<Duration> {
        match self.options.flush {
            FlushMode::Async { interval_ms, .. } => Some(Duration::from_millis(interval_ms)),
            FlushMode::Sync => None,
        }
    }

    /// Asks the workers for `job` (nothing under `Background::Manual`:
    /// the owner runs passes itself).
    pub(super) fn wake(&self, job: Job) {
        if let Some((workers, id)) = self.workers.get() {
            workers.wake(*id, job);
        }
    }

    /// One pass of background work: an async flush if one is due (or
    /// `flush_now`), dedup tables, the seal a roll left, space reserved
    /// ahead of the writer, the checkpoint and retention when due. Answers
    /// when the next pass is due.
    pub(super) fn background_pass(&self, flush_now: bool) -> Instant {
        if self.is_damaged() {
            // A quarantined log changes nothing on disk.
            return Instant::now() + Duration::from_secs(3600);
        }
        let mut state = lock(&self.background_state);
        let options = &self.options;
        let flush_interval = self.flush_interval();
        if let Some(interval) = flush_interval {
            if flush_now
                || self.flush_requested.load(Ordering::Acquire)
                || state.last_flush.elapsed() >= interval
            {
                self.flush_requested.store(false, Ordering::Release);
                let target = self.lock_writer().next_offset;
                if let Err(e) = self.wait_durable(target) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "background flush failed; the log refuses writes");
                }
                state.last_flush = Instant::now();
            }
        }
        // An idle window forgets by age here (an append would do it): its
        // tables go once it is empty.
        {
            let mut w = self.lock_writer();
            let now = options.clock.now_ms().max(w.last_timestamp_ms);
            w.dedup.expire(now);
            w.dedup.report();
        }
        // Full-size dedup tables are prepared (and old ones dropped) here,
        // not on the append path.
        self.dedup_work_requested.store(false, Ordering::Release);
        let work = self.lock_writer().dedup.take_spare_work();
        if let Some(tables) = work.and_then(|w| w.run()) {
            self.lock_writer().dedup.put_spare(tables);
        }
        // A roll's seal, and the file's next step of space, off the append
        // path.
        self.finish_seal();
        self.reserve_ahead();
        let checkpoint_interval = Duration::from_millis(options.checkpoint_interval_ms);
        if options.checkpoint_interval_ms > 0 {
            let durable = self.group.durable_offset();
            if durable > state.checkpointed
                && state.last_checkpoint.elapsed() >= checkpoint_interval
            {
                let checkpoint = Checkpoint {
                    durable_offset: durable,
                    clean: false,
                };
                match write_checkpoint(&options.disk, &self.dir, checkpoint) {
                    Ok(()) => state.checkpointed = durable,
                    Err(e) => tracing::warn!(error = %e, "could not write the checkpoint"),
                }
                state.last_checkpoint = Instant::now();
            }
        }
        let retention_interval = Duration::from_millis(options.retention_check_interval_ms);
        if state.last_retention.elapsed() >= retention_interval {
            if let Err(e) = self.apply_retention(options.clock.now_ms()) {
                tracing::warn!(error = %e, "retention failed");
            }
            state.last_retention = Instant::now();
        }
        // Pages read since the last pass: sealed segments' let go, the
        // active one's beyond the hot bytes behind its end.
        {
            let segments = self.segments();
            let sealed = segments.len().saturating_sub(1);
            for segment in &segments[..sealed] {
                segment.release_read_pages();
            }
            if let (Some(active), Some(hot)) = (segments.last(), options.page_cache_hot_bytes) {
                active.release_cold_pages(hot, super::writer::RELEASE_STEP_BYTES);
            }
        }
        // Next: retention's check, and sooner an async flush or a
        // checkpoint if there is something for them to do. An idle log is
        // run once per retention interval.
        let mut next = state.last_retention + retention_interval;
        if let Some(interval) = flush_interval {
            let unflushed = self.appended_bytes.load(Ordering::Acquire)
                > self.flushed_bytes.load(Ordering::Acquire);
            if unflushed {
                next = next.min(state.last_flush + interval);
            }
        }
        if options.checkpoint_interval_ms > 0 && self.group.durable_offset() > state.checkpointed {
            next = next.min(state.last_checkpoint + checkpoint_interval);
        }
        next
    }

    /// Answers the pending durable waits: one group commit for the
    /// highest target, then each wait with the outcome (close runs this).
    pub(super) fn answer_waiters(&self) {
        let pending = std::mem::take(&mut *lock(&self.waiters));
        let Some(target) = pending.iter().map(|(t, _)| *t).max() else {
            return;
        };
        let outcome = self.wait_durable(target).map_err(Arc::new);
        for (_, done) in pending {
            done(outcome.clone());
        }
    }
}

/// The workers run a log through this.
impl Task for Inner {
    fn run(self: Arc<Self>, job: Job, round: &Mutex<FlushRound>) -> Option<Instant> {
        match job {
            Job::Background => return Some(self.background_pass(false)),
            Job::Prefault => self.prefault_ahead(),
            Job::Flush => {
                if let Some(ticket) = self.take_ticket() {
                    flush_round(round, ticket);
                }
            }
        }
        None
    }
}

/// The pending durable waits of one log, with what a flush started now
/// covers: joined into a round with other logs' (see [`flush_round`]).
pub(crate) struct FlushTicket {
    log: Arc<Inner>,
    segment: Arc<Segment>,
    /// The segment's published end, the offset after it, the bytes
    /// appended, and the file's writes begun, when the ticket was taken.
    end: usize,
    covers: u64,
    appended: u64,
    writes: u64,
    waiters: Vec<(u64, DurableCallback)>,
}

/// Flush tickets waiting for a round, and whether one is running.
#[derive(Default)]
pub(crate) struct FlushRound {
    pending: Vec<FlushTicket>,
    running: bool,
}

impl Inner {
    /// The pending durable waits as a ticket; `None` when there are none,
    /// or all are answered already (durable, or the log failed).
    fn take_ticket(self: &Arc<Self>) -> Option<FlushTicket> {
        let waiters = std::mem::take(&mut *lock(&self.waiters));
        if waiters.is_empty() {
            return None;
        }
        if let Some(failure) = self.group.failure() {
            for (_, done) in waiters {
                done(Err(Arc::clone(&failure)));
            }
            return None;
        }
        let durable = self.group.durable_offset();
        if waiters.iter().all(|(t, _)| *t <= durable) {
            for (_, done) in waiters {
                done(Ok(()));
            }
            return None;
        }
        let (covers, (segment, end, appended)) = self.flush_target();
        let writes = segment.file_writes_begun();
        Some(FlushTicket {
            log: Arc::clone(self),
            segment,
            end,
            covers,
            appended,
            writes,
            waiters,
        })
    }
}

impl FlushTicket {
    /// Flushes this ticket's file alone (`fdatasync`, and the directory if
    /// the segment is new).
    fn flush_own_file(&self) -> Result<(), Arc<StorageError>> {
        self.segment
            .flush_to(self.end, self.log.options.flush_journal.as_ref())
            .map_err(Arc::new)
    }

    /// Answers the waits: after a file-system sync (`synced`) or this
    /// file's own flush, the offsets below `covers` are durable.
    fn complete(self, outcome: Result<(), Arc<StorageError>>, synced: bool, took: Duration) {
        let log = &self.log;
        if let Err(e) = outcome {
            log.group.fail(Arc::clone(&e));
            let failure = log.group.failure().unwrap_or(e);
            for (_, done) in self.waiters {
                done(Err(Arc::clone(&failure)));
            }
            return;
        }
        if synced {
            self.segment
                .note_synced(self.end, self.writes, log.options.flush_journal.as_ref());
        }
        if let Some(observe) = log.flush_observer.get() {
            observe(took);
        }
        log.flushed_bytes.fetch_max(self.appended, Ordering::AcqRel);
        log.group.advance(self.covers);
        if let Some(hot) = log.options.page_cache_hot_bytes {
            self.segment
                .release_cold_pages(hot, super::writer::RELEASE_STEP_BYTES);
        }
        let mut later = Vec::new();
        for (target, done) in self.waiters {
            if target <= self.covers {
                done(Ok(()));
            } else {
                later.push((target, done));
            }
        }
        if !later.is_empty() {
            lock(&log.waiters).extend(later);
            log.wake(Job::Flush);
        }
    }
}

/// Joins `ticket` to the pool's round of flushes. The first worker to find
/// no round running leads: it takes every ticket waiting and makes them
/// durable together, one `syncfs` per file system when they come from
/// several logs (one call where each would have been an `fdatasync`: a
/// broker of a thousand partitions flushes them all at the cost of one),
/// or the log's own `fdatasync` when they come from one (a sync of the file
/// system would also wait for other programs' writes); then it answers
/// them and leads again while tickets arrived meanwhile. Every other worker
/// leaves its ticket and goes back to work at once.
fn flush_round(round: &Mutex<FlushRound>, ticket: FlushTicket) {
    {
        let mut r = lock(round);
        r.pending.push(ticket);
        if r.running {
            return;
        }
        r.running = true;
    }
    loop {
        let batch = {
            let mut r = lock(round);
            if r.pending.is_empty() {
                r.running = false;
                return;
            }
            std::mem::take(&mut r.pending)
        };
        let started = Instant::now();
        let one_log = batch.iter().all(|t| Arc::ptr_eq(&t.log, &batch[0].log));
        if one_log {
            // Its latest ticket covers the others.
            let outcome = batch
                .iter()
                .max_by_key(|t| t.covers)
                .map_or(Ok(()), FlushTicket::flush_own_file);
            for t in batch {
                t.complete(outcome.clone(), false, started.elapsed());
            }
            continue;
        }
        // One sync per file system.
        let mut groups: Vec<Vec<FlushTicket>> = Vec::new();
        for t in batch {
            let fs = t.log.filesystem;
            match groups
                .iter_mut()
                .find(|g| g[0].log.options.disk == t.log.options.disk && g[0].log.filesystem == fs)
            {
                Some(g) => g.push(t),
                None => groups.push(vec![t]),
            }
        }
        for group in groups {
            let log = Arc::clone(&group[0].log);
            match log.options.disk.sync_filesystem(&log.dir) {
                Ok(()) => {
                    for t in group {
                        t.complete(Ok(()), true, started.elapsed());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    for t in group {
                        let outcome = t.flush_own_file();
                        t.complete(outcome, false, started.elapsed());
                    }
                }
                Err(e) => {
                    let failure = Arc::new(StorageError::io(&log.dir)(e));
                    for t in group {
                        t.complete(Err(Arc::clone(&failure)), true, started.elapsed());
                    }
                }
            }
        }
    }
}
