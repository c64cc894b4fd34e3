//! The log's own threads: the background thread (async flushes,
//! checkpoints, sealing, spare segments, dedup tables, retention) and the
//! prefault thread (pages faulted in ahead of the writer).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::open::write_checkpoint;
use super::options::FlushMode;
use super::recovery::Checkpoint;
use super::{Inner, Signal};
use crate::sync::lock;

/// Longest the background thread sleeps between checks.
const BACKGROUND_TICK_MS: u64 = 50;

impl Inner {
    /// Keeps `prefault_bytes` ahead of the writer faulted in. Runs on the
    /// background thread, so the zero-fill of fresh pages is paid on the
    /// other core instead of in the append path.
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
    /// How long the background thread may sleep between passes.
    fn background_tick(&self) -> Duration {
        let options = &self.options;
        [
            self.flush_interval(),
            (options.checkpoint_interval_ms > 0)
                .then(|| Duration::from_millis(options.checkpoint_interval_ms)),
            Some(Duration::from_millis(BACKGROUND_TICK_MS)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_millis(BACKGROUND_TICK_MS))
    }

    fn flush_interval(&self) -> Option<Duration> {
        match self.options.flush {
            FlushMode::Async { interval_ms, .. } => Some(Duration::from_millis(interval_ms)),
            FlushMode::Sync => None,
        }
    }

    /// One pass of background work: an async flush if one is due (or
    /// `flush_now`), dedup tables, the seal a roll left, the next segment's
    /// file, the checkpoint and retention when due, and prefaulting.
    pub(super) fn background_pass(&self, flush_now: bool) {
        let mut state = lock(&self.background_state);
        let options = &self.options;
        if let Some(interval) = self.flush_interval() {
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
        // A roll's seal, and the next segment's file, off the append path.
        self.finish_seal();
        self.prepare_spare_if_due();
        if options.checkpoint_interval_ms > 0 {
            let interval = Duration::from_millis(options.checkpoint_interval_ms);
            let durable = self.group.durable_offset();
            if durable > state.checkpointed && state.last_checkpoint.elapsed() >= interval {
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
        if state.last_retention.elapsed()
            >= Duration::from_millis(options.retention_check_interval_ms)
        {
            if let Err(e) = self.apply_retention(options.clock.now_ms()) {
                tracing::warn!(error = %e, "retention failed");
            }
            state.last_retention = Instant::now();
        }
    }
}

/// The background thread: a pass of background work at every signal, and
/// at least every tick.
pub(super) fn background(inner: Arc<Inner>, signals: Receiver<Signal>) {
    let tick = inner.background_tick();
    loop {
        let requested = match signals.recv_timeout(tick) {
            Ok(Signal::Flush) => true,
            Ok(Signal::Work) => false,
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => false,
        };
        inner.background_pass(requested);
    }
}

/// The prefault thread: keeps pages ahead of the writer faulted in, so the
/// zero-fill of fresh file pages runs on the other core. Apart from the
/// background thread because an async flush can block that one for tens of
/// milliseconds, long enough for the writer to run out of faulted pages.
pub(super) fn prefaulter(inner: Arc<Inner>, signals: Receiver<Signal>) {
    loop {
        match signals.recv_timeout(Duration::from_millis(BACKGROUND_TICK_MS)) {
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Signal::Flush | Signal::Work) | Err(RecvTimeoutError::Timeout) => {
                inner.prefault_ahead()
            }
        }
    }
}
