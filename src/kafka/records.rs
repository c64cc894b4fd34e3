//! Kafka record batches (v2, CRC32C, the crate's codec) to and from bida
//! records.
//!
//! ```text
//!  Kafka record                      bida record
//!  key (null or bytes)          <->  key (none or bytes)
//!  value (null or bytes)        <->  payload (null stored as empty)
//!  headers                      <->  headers (same names and values;
//!                                     a null value stored as empty)
//!  timestamp (CreateTime)        ->  header `kafka.timestamp` (decimal ms)
//!  timestamp in a fetch         <-   that header, or the record's own
//!                                     append time
//!  producer id, epoch, sequence  ->  the inner-msg-id (below)
//!  offset                       <->  offset
//! ```
//!
//! The inner-msg-id of a record from an idempotent producer is
//! `0x4B (K) << 120 | producer_id << 48 | epoch << 32 | sequence`: a retried
//! batch carries the same ids, so the partition's dedup window stores it
//! once and answers its original offsets. Records from other producers get
//! fresh random ids (or none), as a bida producer's do.
//!
//! Bytes from the network are hostile: a batch announcing more records than
//! its bytes can hold, or more than `RECORDS_PER_BATCH_MAX`, is refused
//! before anything is allocated for them, and compressed batches are
//! decompressed into at most `DECOMPRESSED_BYTES_MAX` bytes.

use std::io::Read;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};

use super::KafkaError;
use crate::log::record::{encode_headers_into, HeaderIter, InnerMsgId};
use crate::log::Record as StoredRecord;

/// The header a Kafka record's timestamp travels in.
pub const TIMESTAMP_HEADER: &str = "kafka.timestamp";
/// The most records one batch may announce.
pub const RECORDS_PER_BATCH_MAX: i32 = 200_000;
/// The most bytes one compressed batch may expand to.
pub const DECOMPRESSED_BYTES_MAX: usize = 64 << 20;
/// The fewest bytes a record takes in a batch (seven one-byte varints).
const RECORD_BYTES_MIN: i32 = 7;
/// Marks the inner-msg-id of a record from an idempotent Kafka producer.
const ID_MARK: u128 = 0x4B;

/// A batch decoded from a produce request.
#[derive(Debug)]
pub struct Batch {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records: Vec<Incoming>,
    /// Every record's header block, one after the other (one allocation
    /// for the batch, not one per record): see [`Batch::headers`].
    headers: Vec<u8>,
}

impl Batch {
    /// The header block of `record`, one of this batch's.
    pub fn headers(&self, record: &Incoming) -> &[u8] {
        self.headers.get(record.headers.clone()).unwrap_or_default()
    }
}

/// One Kafka record as bida stores it: the owned parts a `Message`
/// borrows.
#[derive(Debug)]
pub struct Incoming {
    pub id: InnerMsgId,
    pub key: Option<Bytes>,
    /// Where its header block is in its batch's.
    headers: std::ops::Range<usize>,
    pub payload: Bytes,
}

/// The inner-msg-id of record `sequence` of an idempotent producer.
pub fn idempotent_id(producer_id: i64, epoch: i16, sequence: i32) -> InnerMsgId {
    InnerMsgId(
        ID_MARK << 120
            | (u128::from(producer_id as u64) & ((1 << 63) - 1)) << 48
            | u128::from(epoch as u16) << 32
            | u128::from(sequence as u32),
    )
}

/// The producer id, epoch and sequence an inner-msg-id encodes, if it is
/// an idempotent Kafka producer's.
pub fn idempotent_parts(id: InnerMsgId) -> Option<(i64, i16, i32)> {
    if id.0 >> 120 != ID_MARK {
        return None;
    }
    let producer_id = ((id.0 >> 48) & ((1 << 63) - 1)) as i64;
    Some((producer_id, (id.0 >> 32) as u16 as i16, id.0 as u32 as i32))
}

/// Decodes every batch of a produce request's `records`.
pub fn decode_batches(mut bytes: Bytes) -> Result<Vec<Batch>, KafkaError> {
    // Headers first (CRC checked, nothing decompressed): counts are bounded
    // before the decoder reserves room for them.
    let infos = RecordBatchDecoder::decode_batch_info(&mut bytes.clone())
        .map_err(|e| KafkaError::records(e.into()))?;
    if infos.is_empty() {
        return Err(KafkaError::NoBatch);
    }
    let mut batches = Vec::with_capacity(infos.len());
    for info in &infos {
        let bound = if info.compression == Compression::None {
            (bytes.len() as i32 / RECORD_BYTES_MIN).min(RECORDS_PER_BATCH_MAX)
        } else {
            RECORDS_PER_BATCH_MAX
        };
        if info.record_count < 0 || info.record_count > bound {
            return Err(KafkaError::RecordCount {
                announced: info.record_count,
                bound,
            });
        }
        if info.transactional || info.control {
            return Err(KafkaError::Transactional);
        }
        let set = RecordBatchDecoder::decode_with_custom_compression(
            &mut bytes,
            Some(|data: &mut Bytes, c: Compression| decompress(data, c)),
        )
        .map_err(|e| KafkaError::records(e.into()))?;
        // The header blocks first (they borrow the records), then keys
        // and values moved out of the records, not cloned.
        let mut headers = Vec::with_capacity(set.records.len() * 32);
        let mut spans = Vec::with_capacity(set.records.len());
        for r in &set.records {
            let mut text = [0u8; 24];
            let timestamp = decimal(r.timestamp, &mut text);
            let start = headers.len();
            encode_headers_into(
                std::iter::once((TIMESTAMP_HEADER.as_bytes(), timestamp)).chain(
                    r.headers.iter().map(|(name, value)| {
                        (name.as_bytes(), value.as_deref().unwrap_or_default())
                    }),
                ),
                &mut headers,
            )
            .map_err(|e| KafkaError::records(e.into()))?;
            spans.push(start..headers.len());
        }
        let records = set
            .records
            .into_iter()
            .zip(spans)
            .map(|(r, headers)| Incoming {
                id: if info.producer_id >= 0 {
                    idempotent_id(info.producer_id, info.producer_epoch, r.sequence)
                } else {
                    InnerMsgId(0)
                },
                key: r.key,
                headers,
                payload: r.value.unwrap_or_default(),
            })
            .collect();
        batches.push(Batch {
            producer_id: info.producer_id,
            producer_epoch: info.producer_epoch,
            base_sequence: info.base_sequence,
            records,
            headers,
        });
    }
    Ok(batches)
}

/// `n` in decimal, written into `buf` without allocating.
fn decimal(n: i64, buf: &mut [u8; 24]) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 20 bytes hold every i64; the write cannot fail.
    let _ = write!(cursor, "{n}");
    let len = cursor.position() as usize;
    &buf[..len]
}

/// Decompresses a batch's records with the codecs the crate leaves to its
/// caller, bounded: a small batch cannot expand without limit.
fn decompress(data: &mut Bytes, compression: Compression) -> anyhow::Result<Bytes> {
    let input = data.copy_to_bytes(data.remaining());
    let limit = DECOMPRESSED_BYTES_MAX as u64;
    let mut out = Vec::new();
    let read = |reader: &mut dyn Read, out: &mut Vec<u8>| -> anyhow::Result<()> {
        reader.take(limit + 1).read_to_end(out)?;
        anyhow::ensure!(
            out.len() as u64 <= limit,
            "a compressed batch expands past {limit} bytes"
        );
        Ok(())
    };
    match compression {
        Compression::None => return Ok(input),
        Compression::Gzip => read(
            &mut flate2::read::MultiGzDecoder::new(input.reader()),
            &mut out,
        )?,
        Compression::Lz4 => read(&mut lz4::Decoder::new(input.reader())?, &mut out)?,
        Compression::Zstd => read(
            &mut zstd::stream::read::Decoder::new(input.reader())?,
            &mut out,
        )?,
        Compression::Snappy => out = snappy(&input, DECOMPRESSED_BYTES_MAX)?,
    }
    Ok(Bytes::from(out))
}

/// Kafka's snappy: the xerial framing (a 16-byte header, then blocks each
/// led by its big-endian length), or one raw snappy block; every block's
/// announced length checked against what is left of `limit` before it is
/// allocated.
fn snappy(input: &[u8], limit: usize) -> anyhow::Result<Vec<u8>> {
    const MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
    let block = |b: &[u8], out: &mut Vec<u8>| -> anyhow::Result<()> {
        let len = snap::raw::decompress_len(b)?;
        anyhow::ensure!(
            out.len() + len <= limit,
            "a compressed batch expands past {limit} bytes"
        );
        let at = out.len();
        out.resize(at + len, 0);
        snap::raw::Decoder::new().decompress(b, &mut out[at..])?;
        Ok(())
    };
    let mut out = Vec::new();
    if !input.starts_with(MAGIC) {
        block(input, &mut out)?;
        return Ok(out);
    }
    let mut rest = input
        .get(16..)
        .ok_or_else(|| anyhow::anyhow!("snappy header cut short"))?;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| anyhow::anyhow!("snappy block length cut short"))?;
        let len = u32::from_be_bytes(*len) as usize;
        let b = tail
            .get(..len)
            .ok_or_else(|| anyhow::anyhow!("snappy block cut short"))?;
        block(b, &mut out)?;
        rest = &tail[len..];
    }
    Ok(out)
}

/// Encodes stored records as one uncompressed v2 batch (for a fetch).
pub fn encode_batch(records: Vec<StoredRecord>, out: &mut BytesMut) -> Result<(), KafkaError> {
    let first = records.first().map_or(0, |r| r.offset as i64);
    let records: Vec<Record> = records.into_iter().map(|r| outgoing(r, first)).collect();
    RecordBatchEncoder::encode(
        out,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| KafkaError::records(e.into()))
}

/// A record without a producer (no id, epoch or sequence), at `offset` in
/// a batch whose first offset is `first`. The codec starts a new batch
/// wherever `offset - sequence` changes, so the sequence follows the offset
/// from the batch's base sequence of -1: the records share one batch (one
/// header, one CRC32C), not one batch each.
pub fn plain_record(
    offset: i64,
    first: i64,
    timestamp: i64,
    key: Option<Bytes>,
    value: Bytes,
    headers: indexmap::IndexMap<StrBytes, Option<Bytes>>,
) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        timestamp_type: TimestampType::Creation,
        offset,
        sequence: NO_SEQUENCE.wrapping_add(offset.wrapping_sub(first) as i32),
        timestamp,
        key,
        value: Some(value),
        headers,
    }
}

/// Keys and payloads are moved, not cloned: each clone of a mapped
/// record's bytes is an atomic count on the segment's map. A batch of
/// records from many producers names none of them.
fn outgoing(r: StoredRecord, first: i64) -> Record {
    let mut timestamp = r.timestamp_ms as i64;
    let mut headers = indexmap::IndexMap::new();
    for (name, value) in HeaderIter::new(&r.headers).flatten() {
        if name == TIMESTAMP_HEADER.as_bytes() {
            if let Some(t) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                timestamp = t;
            }
            continue;
        }
        let Ok(name) = StrBytes::from_utf8(Bytes::copy_from_slice(name)) else {
            continue; // Kafka header names are strings
        };
        headers.insert(name, Some(Bytes::copy_from_slice(value)));
    }
    plain_record(r.offset as i64, first, timestamp, r.key, r.payload, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_answers_one_batch_for_many_records_and_decodes_back() {
        let stored: Vec<StoredRecord> = (40..43u64)
            .map(|offset| StoredRecord {
                offset,
                timestamp_ms: 1_700_000_000_000 + offset,
                id: InnerMsgId(0),
                key: Some(Bytes::from(format!("k{offset}"))),
                headers: Bytes::new(),
                payload: Bytes::from(format!("v{offset}")),
            })
            .collect();
        let mut out = BytesMut::new();
        encode_batch(stored, &mut out).unwrap();
        let mut bytes = out.freeze();
        let infos = RecordBatchDecoder::decode_batch_info(&mut bytes.clone()).unwrap();
        assert_eq!(infos.len(), 1, "one batch, not one per record");
        assert_eq!(infos[0].record_count, 3);
        assert_eq!(infos[0].min_offset, 40);
        assert_eq!(infos[0].base_sequence, NO_SEQUENCE);
        let set = RecordBatchDecoder::decode(&mut bytes).unwrap();
        let got: Vec<(i64, Option<Bytes>, Option<Bytes>, i64)> = set
            .records
            .into_iter()
            .map(|r| (r.offset, r.key, r.value, r.timestamp))
            .collect();
        assert_eq!(
            got,
            (40..43i64)
                .map(|o| (
                    o,
                    Some(Bytes::from(format!("k{o}"))),
                    Some(Bytes::from(format!("v{o}"))),
                    1_700_000_000_000 + o
                ))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn idempotent_ids_round_trip_and_are_not_random_ids() {
        for (pid, epoch, seq) in [
            (0i64, 0i16, 0i32),
            (7, 3, 12345),
            (i64::MAX, i16::MAX, i32::MAX),
        ] {
            let id = idempotent_id(pid, epoch, seq);
            assert_eq!(idempotent_parts(id), Some((pid, epoch, seq)));
        }
        assert_eq!(idempotent_parts(InnerMsgId(12345)), None);
    }

    #[test]
    fn a_batch_announcing_more_records_than_it_holds_is_refused_before_allocating() {
        let record = Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: 0,
            sequence: -1,
            timestamp: 1,
            key: None,
            value: Some(Bytes::from_static(b"x")),
            headers: Default::default(),
        };
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            [&record],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        let good = buf.clone().freeze();
        let batches = decode_batches(good.clone()).unwrap();
        assert_eq!(batches[0].records.len(), 1);
        // Record count at byte 57 (after base offset 8, length 4, epoch 4,
        // magic 1, crc 4, attributes 2, last delta 4, two timestamps 16,
        // producer id 8, epoch 2, base sequence 4). The CRC covers it, so
        // recompute it as a hostile client would.
        let mut bad = good.to_vec();
        bad[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let crc = crc32c::crc32c(&bad[21..]);
        bad[17..21].copy_from_slice(&crc.to_be_bytes());
        let err = decode_batches(Bytes::from(bad)).unwrap_err();
        assert!(err.to_string().contains("announces"), "{err}");
    }

    #[test]
    fn a_snappy_block_announcing_more_than_the_limit_is_refused() {
        let big = vec![7u8; 100_000];
        let compressed = snap::raw::Encoder::new().compress_vec(&big).unwrap();
        assert_eq!(snappy(&compressed, 1 << 20).unwrap(), big);
        assert!(snappy(&compressed, 50_000).is_err());
    }
}
