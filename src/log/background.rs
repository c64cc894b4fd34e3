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

/// The background thread: async flushes, checkpoints, retention.
pub(super) fn background(inner: Arc<Inner>, signals: Receiver<Signal>) {
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
