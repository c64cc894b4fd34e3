//! A log's work off the append path, run by workers (`workers.rs`): the
//! background pass (async flushes, checkpoints, sealing, space reserved
//! ahead of the writer, dedup tables, retention), prefaulting pages ahead of
//! the writer, and answering durable waits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::open::write_checkpoint;
use super::options::FlushMode;
use super::recovery::Checkpoint;
use super::workers::{Job, Task};
use super::Inner;
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
    /// highest target, then each wait with the outcome. A worker runs this.
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
    fn run(&self, job: Job) -> Option<Instant> {
        match job {
            Job::Background => return Some(self.background_pass(false)),
            Job::Prefault => self.prefault_ahead(),
            Job::Flush => self.answer_waiters(),
        }
        None
    }
}
