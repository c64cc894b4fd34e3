//! Idempotent Kafka producers: per partition, the epoch and the last
//! sequence number of every producer id.
//!
//! Durable without a file of its own: every record of an idempotent
//! producer carries its producer id, epoch and sequence in its inner-msg-id
//! (`records.rs`), so the state of a partition is rebuilt from the records
//! in its dedup window the first time a producer writes to it after a
//! start. The checks are Kafka's:
//!
//! - an epoch below the producer's current one is fenced
//!   (INVALID_PRODUCER_EPOCH);
//! - a new epoch starts at sequence 0 (else OUT_OF_ORDER_SEQUENCE_NUMBER);
//! - within an epoch, a batch starting past the next sequence is a gap
//!   (OUT_OF_ORDER_SEQUENCE_NUMBER); one starting at or before the last is
//!   a retry, which the dedup window answers with its original offsets.
//!
//! A producer id the partition does not know (new, or whose records left
//! the window) may start at any sequence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use kafka_protocol::error::ResponseError;

use super::records::idempotent_parts;
use crate::log::Log;
use crate::sync::lock;

/// One partition's producer state, shared by the requests producing to it.
type Shared = Arc<Mutex<PartitionProducers>>;

/// Every partition's producer state.
pub(crate) struct Producers {
    partitions: Mutex<HashMap<(String, u32), Shared>>,
    next_id: AtomicI64,
}

/// One partition's producers: id -> (epoch, last sequence, when it last
/// appended in ms). A producer silent for longer than the dedup window is
/// forgotten (Kafka's `producer.id.expiration.ms`): its retries could no
/// longer be recognised anyway.
#[derive(Default)]
pub(crate) struct PartitionProducers {
    loaded: bool,
    by_id: HashMap<i64, (i16, i32, u64)>,
}

/// Above this many producers on one partition, an append forgets the
/// expired ones.
const PRUNE_ABOVE: usize = 1024;

impl Producers {
    pub(crate) fn new() -> Self {
        // Ids must not repeat across restarts (a new producer taken for an
        // old one would have its first batch answered as a duplicate): a
        // random start in 2^62, then counting.
        let mut seed = [0u8; 8];
        let random = getrandom::fill(&mut seed).is_ok();
        let start = if random {
            (u64::from_le_bytes(seed) >> 2) as i64
        } else {
            (crate::log::clock::system_now_ms() as i64) << 20
        };
        Producers {
            partitions: Mutex::new(HashMap::new()),
            next_id: AtomicI64::new(start),
        }
    }

    pub(crate) fn new_producer_id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) & i64::MAX
    }

    /// The producers of one partition (locked by the caller around its
    /// check and append).
    pub(crate) fn partition(&self, topic: &str, partition: u32) -> Arc<Mutex<PartitionProducers>> {
        Arc::clone(
            lock(&self.partitions)
                .entry((topic.to_owned(), partition))
                .or_default(),
        )
    }
}

impl PartitionProducers {
    /// Rebuilds the state from the partition's records in its dedup
    /// window, once.
    pub(crate) fn load(&mut self, log: &Log) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        let mut at = log.dedup_window_start();
        let end = log.next_offset();
        while at < end {
            let Ok(batch) = log.read(at, 4096, 4 << 20) else {
                break;
            };
            if batch.records == 0 {
                break;
            }
            for record in batch.iter().flatten() {
                if let Some((id, epoch, sequence)) = idempotent_parts(record.id) {
                    self.record(id, epoch, sequence, record.timestamp_ms, u64::MAX);
                }
            }
            at = batch.next_offset;
        }
    }

    /// Whether a batch of `producer_id` at `epoch` starting at
    /// `base_sequence` may be appended.
    pub(crate) fn check(
        &self,
        producer_id: i64,
        epoch: i16,
        base_sequence: i32,
    ) -> Result<(), ResponseError> {
        match self.by_id.get(&producer_id) {
            None => Ok(()),
            Some(&(current, _, _)) if epoch < current => Err(ResponseError::InvalidProducerEpoch),
            Some(&(current, _, _)) if epoch > current => {
                if base_sequence == 0 {
                    Ok(())
                } else {
                    Err(ResponseError::OutOfOrderSequenceNumber)
                }
            }
            Some(&(_, last, _)) => {
                if base_sequence <= last || base_sequence == last.wrapping_add(1) {
                    Ok(())
                } else {
                    Err(ResponseError::OutOfOrderSequenceNumber)
                }
            }
        }
    }

    /// Records that `producer_id` at `epoch` has appended up to sequence
    /// `last` at `now_ms`; forgets producers silent for `expire_ms` when
    /// the partition has many.
    pub(crate) fn record(
        &mut self,
        producer_id: i64,
        epoch: i16,
        last: i32,
        now_ms: u64,
        expire_ms: u64,
    ) {
        let entry = self
            .by_id
            .entry(producer_id)
            .or_insert((epoch, last, now_ms));
        if epoch > entry.0 {
            *entry = (epoch, last, now_ms);
        } else if epoch == entry.0 {
            entry.1 = entry.1.max(last);
            entry.2 = entry.2.max(now_ms);
        }
        if self.by_id.len() > PRUNE_ABOVE {
            self.by_id
                .retain(|_, &mut (_, _, at)| now_ms.saturating_sub(at) <= expire_ms);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_and_epochs_are_checked_as_kafka_does() {
        let mut p = PartitionProducers::default();
        assert_eq!(
            p.check(1, 0, 5),
            Ok(()),
            "an unknown producer starts anywhere"
        );
        p.record(1, 0, 9, 0, u64::MAX);
        assert_eq!(p.check(1, 0, 10), Ok(()), "the next sequence");
        assert_eq!(
            p.check(1, 0, 3),
            Ok(()),
            "a retry: the dedup window answers it"
        );
        assert_eq!(
            p.check(1, 0, 12),
            Err(ResponseError::OutOfOrderSequenceNumber)
        );
        assert_eq!(p.check(1, 1, 0), Ok(()), "a new epoch starts at 0");
        assert_eq!(
            p.check(1, 1, 4),
            Err(ResponseError::OutOfOrderSequenceNumber)
        );
        p.record(1, 1, 0, 0, u64::MAX);
        assert_eq!(
            p.check(1, 0, 10),
            Err(ResponseError::InvalidProducerEpoch),
            "fenced"
        );
    }

    #[test]
    fn silent_producers_expire_once_a_partition_has_many() {
        let mut p = PartitionProducers::default();
        for id in 0..PRUNE_ABOVE as i64 {
            p.record(id, 0, 0, 1_000, 60_000);
        }
        assert_eq!(p.len(), PRUNE_ABOVE, "few producers: none forgotten");
        p.record(-5, 0, 0, 30_000, 60_000);
        assert_eq!(p.len(), PRUNE_ABOVE + 1, "none silent for the window yet");
        p.record(-6, 0, 0, 61_001, 60_000);
        assert_eq!(p.len(), 2, "the silent ones forgotten, the recent kept");
        assert_eq!(
            p.check(-5, 0, 7),
            Err(ResponseError::OutOfOrderSequenceNumber)
        );
    }
}
