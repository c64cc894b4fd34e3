//! The writer: append (dedup, framing, index), publish, roll to a new
//! segment and seal the old one, group-commit flushes of the active
//! segment. Every append runs under `Inner::writer`, one lock per log.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::error::{Result, StorageError};
use super::options::{FlushMode, Preallocate};
use super::record::{self, Message};
use super::segment::Segment;
use super::workers::Job;
use super::{AppendOutcome, Appended, Inner, Writer};
use crate::sync::{lock, read, write};

/// Whether an append may roll the active segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Roll {
    Allow,
    /// Append nothing if the batch may roll (see `Log::append_unless_roll`).
    Refuse,
}

/// Dropped pages are released in steps of at least this many bytes.
pub(super) const RELEASE_STEP_BYTES: usize = 8 << 20;

/// How many messages ahead of the one being appended the dedup window's
/// cache lines are prefetched.
pub(super) const DEDUP_PREFETCH_AHEAD: usize = 8;

impl Inner {
    pub(super) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        lock(&self.writer)
    }

    /// Opened under `RecoveryMode::Quarantine` with damage found.
    pub(super) fn is_damaged(&self) -> bool {
        matches!(
            self.lock_writer().broken.as_deref(),
            Some(StorageError::Damaged { .. })
        )
    }

    pub(super) fn segments(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        read(&self.segments)
    }

    pub(super) fn append(&self, batch: &[Message<'_>]) -> Result<Appended> {
        match self.append_with(batch, Roll::Allow)? {
            Some(appended) => Ok(appended),
            None => unreachable!("an append that may roll never refuses to"),
        }
    }

    /// Appends `batch`; under `Roll::Refuse`, appends nothing and answers
    /// `None` if the batch may roll the active segment.
    pub(super) fn append_with(
        &self,
        batch: &[Message<'_>],
        roll: Roll,
    ) -> Result<Option<Appended>> {
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
        if roll == Roll::Refuse {
            let bytes: usize = lens.iter().sum();
            let too_old = w
                .active
                .first_timestamp_ms()
                .is_some_and(|first| now.saturating_sub(first) >= self.options.segment_age_ms);
            if w.map.remaining() < bytes || too_old {
                return Ok(None);
            }
        }
        w.dedup.expire(now);
        let durable = self.group.durable_offset();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut appended_bytes = 0u64;
        let mut first_ts = None;
        let interval = self.options.index_interval_bytes;
        let zeroes = self.zeroes();
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
            if let Err(e) = active.reserve(w.map.cursor() + len, zeroes) {
                // No space for this record: what the batch wrote so far
                // stays (published, as a roll would), nothing after it.
                drop(index);
                self.publish(w)?;
                if let Some(first) = first_ts {
                    w.active.note_appended(w.next_offset, first, now);
                }
                w.last_timestamp_ms = now;
                return Err(e);
            }
            let offset = w.next_offset;
            let position = w.map.cursor();
            let lag = u32::try_from(offset - durable.min(offset)).unwrap_or(u32::MAX);
            record::encode(&mut w.map, len, offset, now, lag, msg);
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
        w.dedup.report();
        let dedup_work = w.dedup.has_spare_work();
        drop(guard);
        if prefault && !self.prefault_requested.swap(true, Ordering::AcqRel) {
            self.wake(Job::Prefault);
        }
        if dedup_work && !self.dedup_work_requested.swap(true, Ordering::AcqRel) {
            self.wake(Job::Background);
        }
        if appended_bytes > 0 {
            self.note_appended_bytes(appended_bytes);
        }
        Ok(Some(Appended {
            outcomes,
            durable_target,
        }))
    }

    /// Makes the writer's bytes readable. A failure here (an I/O error
    /// writing into preallocated space) leaves records counted but not
    /// stored, so the writer refuses everything after it.
    pub(super) fn publish(&self, w: &mut Writer) -> Result<()> {
        if let Err(e) = w.map.publish() {
            let cause = Arc::new(StorageError::io(&w.active.path)(e));
            w.broken = Some(Arc::clone(&cause));
            self.group.fail(Arc::clone(&cause));
            return Err(StorageError::Failed(cause));
        }
        Ok(())
    }

    pub(super) fn note_appended_bytes(&self, bytes: u64) {
        let total = self.appended_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if let FlushMode::Async {
            bytes: threshold, ..
        } = self.options.flush
        {
            let unflushed = total - self.flushed_bytes.load(Ordering::Acquire).min(total);
            if unflushed >= threshold && !self.flush_requested.swap(true, Ordering::AcqRel) {
                self.wake(Job::Background);
            }
        }
    }

    /// Starts a new segment at the next offset: the old segment flushed
    /// first, then the new segment's (empty) file created. So a segment
    /// file exists after the old one only once every byte of the old one is
    /// durable: a crash at any point leaves either the old segment last, its
    /// tail judged as any active tail, or a whole old segment before an
    /// empty new one. The old segment's seal (index files, truncation:
    /// three more fsyncs) is left to the background work; a crash before it
    /// is done leaves a segment that open seals.
    pub(super) fn roll(&self, w: &mut Writer) -> Result<()> {
        // One seal pending at a time.
        self.finish_seal();
        if let Err(e) = w
            .active
            .flush_to(w.map.cursor(), self.options.flush_journal.as_ref())
        {
            // The old segment may not be durable; nothing more may be acked.
            let cause = Arc::new(e);
            w.broken = Some(Arc::clone(&cause));
            self.group.fail(Arc::clone(&cause));
            return Err(StorageError::Failed(cause));
        }
        let base = w.next_offset;
        self.group.advance(base);
        let (segment, map) = Segment::create(
            &self.options.disk,
            &self.dir,
            base,
            self.options.segment_bytes,
            self.options.write_path,
        )?;
        let old_map = std::mem::replace(&mut w.map, map);
        let old = std::mem::replace(&mut w.active, Arc::clone(&segment));
        write(&self.segments).push(segment);
        *lock(&self.unsealed) = Some((old, old_map));
        // The seal, and the new segment's space, off the append path.
        self.wake(Job::Background);
        tracing::debug!(dir = %self.dir.display(), base_offset = base, "rolled to a new segment");
        Ok(())
    }

    /// Seals the segment the last roll left behind, if any. A failure costs
    /// nothing but time: its records are durable, and open finishes a seal.
    pub(super) fn finish_seal(&self) {
        let mut unsealed = lock(&self.unsealed);
        if let Some((segment, writer)) = unsealed.take() {
            if let Err(e) = segment.seal(&self.dir, writer, self.options.flush_journal.as_ref()) {
                tracing::warn!(segment = %segment.path.display(), error = %e, "could not seal the segment; the next open will");
            }
        }
    }

    /// Reserves the next step of the active segment's file ahead of the
    /// writer when it nears the reserved end (see `Segment::reserve_ahead`).
    pub(super) fn reserve_ahead(&self) {
        let (segment, cursor) = {
            let w = self.lock_writer();
            if w.broken.is_some() {
                return;
            }
            (Arc::clone(&w.active), w.map.cursor())
        };
        if let Err(e) = segment.reserve_ahead(cursor, self.zeroes()) {
            // The append that needs the space will fail with this error.
            tracing::debug!(dir = %self.dir.display(), error = %e, "could not reserve space ahead of the writer");
        }
    }

    pub(super) fn zeroes(&self) -> bool {
        self.options.preallocate == Preallocate::Zeroes
    }

    pub(super) fn wait_durable(&self, target: u64) -> Result<()> {
        self.group.wait_for(
            target,
            || self.flush_target(),
            |(segment, end, appended)| self.flush_active(segment, end, appended),
        )
    }

    /// What a flush started now covers: the active segment up to what is
    /// published, the offset after it, and the bytes appended so far.
    pub(super) fn flush_target(&self) -> (u64, (Arc<Segment>, usize, u64)) {
        let w = self.lock_writer();
        let appended = self.appended_bytes.load(Ordering::Acquire);
        (
            w.next_offset,
            (Arc::clone(&w.active), w.map.cursor(), appended),
        )
    }

    /// Flushes `segment` up to `end` (from [`Inner::flush_target`]).
    pub(super) fn flush_active(
        &self,
        segment: Arc<Segment>,
        end: usize,
        appended: u64,
    ) -> Result<()> {
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
}
