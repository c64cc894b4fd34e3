//! Operator actions on stored messages, for the admin console and its JSON
//! API (`admin.rs`): browse a partition, re-drive a dead letter to the
//! topic it came from, purge a dead-letter topic.
//!
//! Re-driving appends a copy: the dead-letter topic is a log and keeps the
//! original. The copy's inner-msg-id is derived from the dead letter's own
//! (topic, partition, offset), so re-driving the same dead letter twice — a
//! double click, a retried HTTP request — stores it once.

use std::sync::Arc;

use super::{
    foldhash_bytes, Broker, BrokerError, Invalid, Topic, DLQ_HEADER_ATTEMPTS, DLQ_HEADER_GROUP,
    DLQ_HEADER_OFFSET, DLQ_HEADER_PARTITION, DLQ_HEADER_TOPIC, DLQ_SUFFIX,
};
use crate::log::record::{encode_headers, HeaderIter, InnerMsgId, Message};
use crate::log::{FlushMode, Record};

/// Most messages one browse returns.
pub const BROWSE_MAX: usize = 1000;
/// Most payload bytes one browse returns in all.
const BROWSE_BYTES_MAX: usize = 4 << 20;

/// Where a re-driven message was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redriven {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// It had been re-driven before: nothing new was stored.
    pub duplicate: bool,
}

/// What a purge deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub messages: u64,
    pub bytes: u64,
}

fn original(headers: &[u8], name: &str) -> Option<String> {
    HeaderIter::new(headers)
        .filter_map(|h| h.ok())
        .find(|(n, _)| *n == name.as_bytes())
        .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok())
}

fn dead_letter_topic(broker: &Broker, name: &str) -> Result<Arc<Topic>, BrokerError> {
    if !name.ends_with(DLQ_SUFFIX) {
        return Err(Invalid::NotDeadLetterTopic {
            name: name.to_owned(),
        }
        .into());
    }
    broker.topic(name)
}

impl Broker {
    /// Up to `limit` (at most [`BROWSE_MAX`]) messages of one partition
    /// from `from` on (clamped to the partition's start).
    pub fn browse(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, BrokerError> {
        let topic = self.topic(topic)?;
        let p = topic.partition(partition)?;
        let mut offset = from.max(p.log.start_offset());
        let limit = limit.min(BROWSE_MAX);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < limit && bytes < BROWSE_BYTES_MAX {
            let batch = p
                .log
                .read(offset, limit - out.len(), BROWSE_BYTES_MAX - bytes)?;
            if batch.records == 0 {
                break;
            }
            for r in batch.iter() {
                let r = r?;
                bytes += r.payload.len();
                out.push(r);
            }
            offset = batch.next_offset;
        }
        Ok(out)
    }

    /// Appends the dead letter at `offset` of `dlq` back to the topic and
    /// partition its headers name, without the dead-letter headers.
    /// Completes once stored under the broker's flush policy.
    pub async fn redrive(
        &self,
        dlq: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Redriven, BrokerError> {
        let dlq_topic = dead_letter_topic(self, dlq)?;
        let p = dlq_topic.partition(partition)?;
        let batch = p.log.read(offset, 1, 1)?;
        let record = match batch.iter().next() {
            Some(r) => r?,
            None => {
                return Err(Invalid::NoMessageAt {
                    topic: dlq.to_owned(),
                    partition,
                    offset,
                }
                .into())
            }
        };
        let target_name = original(&record.headers, DLQ_HEADER_TOPIC)
            .unwrap_or_else(|| dlq.trim_end_matches(DLQ_SUFFIX).to_owned());
        let target = self.topic(&target_name)?;
        let target_partition = original(&record.headers, DLQ_HEADER_PARTITION)
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|i| target.partition(*i).is_ok())
            .unwrap_or_else(|| target.next_round_robin());
        let kept: Vec<(Vec<u8>, Vec<u8>)> = HeaderIter::new(&record.headers)
            .filter_map(|h| h.ok())
            .filter(|(n, _)| {
                ![
                    DLQ_HEADER_TOPIC,
                    DLQ_HEADER_PARTITION,
                    DLQ_HEADER_OFFSET,
                    DLQ_HEADER_ATTEMPTS,
                    DLQ_HEADER_GROUP,
                ]
                .iter()
                .any(|d| d.as_bytes() == *n)
            })
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        let refs: Vec<(&[u8], &[u8])> = kept.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let headers = encode_headers(&refs).map_err(|e| BrokerError::from(Invalid::Headers(e)))?;
        let mut seed = Vec::with_capacity(dlq.len() + 12);
        seed.extend_from_slice(dlq.as_bytes());
        seed.extend_from_slice(&partition.to_le_bytes());
        seed.extend_from_slice(&offset.to_le_bytes());
        let id = InnerMsgId(
            (u128::from(foldhash_bytes(&seed)) << 64)
                | u128::from(foldhash_bytes(&[&seed[..], b"redrive"].concat()))
                | 1,
        );
        let tp = target.partition(target_partition)?.clone();
        let appended = tp.log.append(&[Message {
            id,
            key: record.key.as_deref(),
            headers: &headers,
            payload: &record.payload,
        }])?;
        target.appended.notify_waiters();
        let outcome = appended.outcomes[0];
        if !outcome.duplicate {
            self.metrics
                .produced(&target.name, 1, record.payload.len() as u64, 0);
        }
        if self.config.flush == FlushMode::Sync {
            tp.durable(appended.durable_target()).await?;
        }
        tracing::info!(dlq, partition, offset, topic = %target.name, to_partition = target_partition, to_offset = outcome.offset, duplicate = outcome.duplicate, "re-drove a dead letter");
        Ok(Redriven {
            topic: target.name.clone(),
            partition: target_partition,
            offset: outcome.offset,
            duplicate: outcome.duplicate,
        })
    }

    /// Deletes every message of a dead-letter topic. Groups reading it skip
    /// to its new start.
    pub fn purge(&self, dlq: &str) -> Result<Purged, BrokerError> {
        let topic = dead_letter_topic(self, dlq)?;
        let mut purged = Purged::default();
        for p in &topic.partitions {
            let before = p.log.start_offset();
            let report = p.log.purge()?;
            purged.messages += report.start_offset.saturating_sub(before);
            purged.bytes += report.bytes_deleted;
        }
        tracing::warn!(
            topic = dlq,
            messages = purged.messages,
            bytes = purged.bytes,
            "purged a dead-letter topic"
        );
        Ok(purged)
    }
}
