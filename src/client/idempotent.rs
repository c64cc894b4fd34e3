//! Skipping messages whose business id (biz-id) was already processed.
//!
//! At-least-once delivery means a consumer may see a message again (a
//! redelivery after a lost ack, a producer's retry under another id). A
//! consumer that must not act twice records each biz-id once it has acted
//! on it, and skips a message whose biz-id is recorded.
//!
//! The record is a local log (the storage engine) whose inner-msg-id is a
//! 128-bit hash of the biz-id: its dedup window is the lookup, bounded by
//! `ids_max` and `age_max`, rebuilt from the log on open, and its segments
//! are retained only as far as the window reaches.

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::Duration;

use crate::log::record::{InnerMsgId, Message};
use crate::log::{FlushMode, Log, Options, StorageError};
use crate::protocol::body::Delivery;

/// A persistent, bounded set of processed biz-ids.
pub struct ProcessedIds {
    log: Log,
}

fn hash128(biz_id: &[u8]) -> InnerMsgId {
    let h = |seed: u64| {
        let mut h = foldhash::quality::FixedState::with_seed(seed).build_hasher();
        h.write(biz_id);
        h.finish()
    };
    let id = ((h(0x6269_642d_6964_0001) as u128) << 64) | h(0x6269_642d_6964_0002) as u128;
    InnerMsgId(id.max(1))
}

impl ProcessedIds {
    /// Opens (or creates) the store in `dir`, remembering the last
    /// `ids_max` biz-ids for at most `age_max`.
    pub fn open(
        dir: impl AsRef<Path>,
        ids_max: u64,
        age_max: Duration,
    ) -> Result<Self, StorageError> {
        let mut o = Options {
            flush: FlushMode::Sync,
            segment_bytes: 16 << 20,
            ..Options::default()
        };
        o.dedup.records_max = ids_max;
        o.dedup.age_ms_max = age_max.as_millis() as u64;
        // Each record is 52 bytes; keep a little more than the window.
        o.retention.bytes_max = Some((ids_max * 52).max(o.segment_bytes) * 2);
        o.retention.age_ms_max = Some(o.dedup.age_ms_max.saturating_mul(2));
        o.retention_check_interval_ms = 60_000;
        Ok(ProcessedIds {
            log: Log::open(dir, o)?,
        })
    }

    pub fn is_processed(&self, biz_id: &[u8]) -> bool {
        self.log.lookup_id(hash128(biz_id)).is_some()
    }

    /// Records `biz_id` as processed, durably. True if it was not recorded
    /// before.
    pub fn mark_processed(&self, biz_id: &[u8]) -> Result<bool, StorageError> {
        let appended = self.log.append_acked(&[Message {
            id: hash128(biz_id),
            key: None,
            headers: &[],
            payload: &[],
        }])?;
        Ok(!appended.outcomes[0].duplicate)
    }

    pub fn close(self) -> Result<(), StorageError> {
        self.log.close()
    }
}

/// What [`IdempotentConsumer::handle`] did with a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The handler ran and its biz-id is now recorded.
    Processed,
    /// Its biz-id was recorded already: the handler did not run.
    Skipped,
    /// The message has no biz-id: the handler ran, nothing was recorded.
    NoBizId,
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError<E> {
    #[error("handler failed: {0}")]
    Handler(E),
    #[error("recording the biz-id failed: {0}")]
    Store(StorageError),
}

/// Runs a handler at most once per biz-id.
pub struct IdempotentConsumer<F> {
    ids: ProcessedIds,
    biz_id: F,
}

impl<F> IdempotentConsumer<F>
where
    F: Fn(&Delivery) -> Option<Vec<u8>>,
{
    /// `biz_id` extracts the business id of a delivery (for example its
    /// key, or a field of its payload).
    pub fn new(ids: ProcessedIds, biz_id: F) -> Self {
        IdempotentConsumer { ids, biz_id }
    }

    /// Runs `handler` unless the delivery's biz-id was processed; records
    /// the biz-id after the handler succeeds. Ack the delivery after this
    /// returns `Ok`, whatever the variant.
    pub fn handle<E>(
        &self,
        delivery: &Delivery,
        handler: impl FnOnce(&Delivery) -> Result<(), E>,
    ) -> Result<Handled, HandleError<E>> {
        let Some(biz) = (self.biz_id)(delivery) else {
            handler(delivery).map_err(HandleError::Handler)?;
            return Ok(Handled::NoBizId);
        };
        if self.ids.is_processed(&biz) {
            return Ok(Handled::Skipped);
        }
        handler(delivery).map_err(HandleError::Handler)?;
        self.ids.mark_processed(&biz).map_err(HandleError::Store)?;
        Ok(Handled::Processed)
    }

    pub fn into_inner(self) -> ProcessedIds {
        self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(key: &'static [u8]) -> Delivery {
        Delivery {
            partition: 0,
            offset: 0,
            attempt: 1,
            timestamp_ms: 0,
            id: InnerMsgId(1),
            key: Some(Bytes::from_static(key)),
            headers: Bytes::new(),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn skips_processed_biz_ids_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let by_key = |d: &Delivery| d.key.as_ref().map(|k| k.to_vec());
        let c = IdempotentConsumer::new(
            ProcessedIds::open(dir.path(), 1000, Duration::from_secs(60)).unwrap(),
            by_key,
        );
        let mut runs = 0;
        let mut run = |_: &Delivery| -> Result<(), ()> {
            runs += 1;
            Ok(())
        };
        assert_eq!(
            c.handle(&delivery(b"order-1"), &mut run).unwrap(),
            Handled::Processed
        );
        assert_eq!(
            c.handle(&delivery(b"order-1"), &mut run).unwrap(),
            Handled::Skipped
        );
        assert_eq!(
            c.handle(&delivery(b"order-2"), &mut run).unwrap(),
            Handled::Processed
        );
        // A failing handler records nothing: the message is retried.
        assert!(c
            .handle(&delivery(b"order-3"), |_| Err::<(), _>("boom"))
            .is_err());
        c.into_inner().close().unwrap();
        let c = IdempotentConsumer::new(
            ProcessedIds::open(dir.path(), 1000, Duration::from_secs(60)).unwrap(),
            by_key,
        );
        assert_eq!(
            c.handle(&delivery(b"order-1"), &mut run).unwrap(),
            Handled::Skipped
        );
        assert_eq!(
            c.handle(&delivery(b"order-3"), &mut run).unwrap(),
            Handled::Processed
        );
        assert_eq!(runs, 3);
    }

    #[test]
    fn window_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProcessedIds::open(dir.path(), 100, Duration::from_secs(60)).unwrap();
        for i in 0..5000u32 {
            ids.mark_processed(&i.to_le_bytes()).unwrap();
        }
        assert!(ids.is_processed(&4999u32.to_le_bytes()));
        assert!(
            !ids.is_processed(&0u32.to_le_bytes()),
            "evicted beyond the window"
        );
        assert!(ids.log.dedup_memory().1 <= 100 + 1024);
    }
}
