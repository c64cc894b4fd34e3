//! Recovery: scanning a segment's bytes, the checkpoint file, and the report.
//!
//! The scan functions are pure (bytes in, findings out); the log decides what
//! to do with damage according to its `RecoveryMode`.
//!
//! `CHECKPOINT` (replaced atomically: write a temporary file, fsync, rename,
//! fsync the directory):
//! ```text
//!  0            8                  16                 24          28        32
//!  +------------+------------------+------------------+-----------+---------+
//!  | "BIDACKP1" | durable_offset   | flags u64        | crc32 of  | zero    |
//!  |            | u64              | bit 0: clean     | [0, 24)   | u32     |
//!  +------------+------------------+------------------+-----------+---------+
//! ```
//! `durable_offset`: every record below it was on disk when the file was
//! written. `clean`: written by `close` after everything was flushed, so the
//! log ends exactly at `durable_offset`. Open rewrites it with `clean` unset.

use std::time::Duration;

use super::index::SegmentIndex;
use super::record::{self, Decoded, RECORD_BYTES_MAX, RECORD_HEADER_LEN};

pub const CHECKPOINT_FILE: &str = "CHECKPOINT";
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"BIDACKP1";
pub const CHECKPOINT_LEN: usize = 32;
const CHECKPOINT_DURABLE_OFFSET: usize = 8;
const CHECKPOINT_FLAGS: usize = 16;
const CHECKPOINT_CRC: usize = 24;
const _: () = assert!(CHECKPOINT_CRC + 8 == CHECKPOINT_LEN);
const FLAG_CLEAN: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub durable_offset: u64,
    pub clean: bool,
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; CHECKPOINT_LEN] {
        let mut out = [0u8; CHECKPOINT_LEN];
        out[..8].copy_from_slice(CHECKPOINT_MAGIC);
        out[CHECKPOINT_DURABLE_OFFSET..CHECKPOINT_DURABLE_OFFSET + 8]
            .copy_from_slice(&self.durable_offset.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        out[CHECKPOINT_FLAGS..CHECKPOINT_FLAGS + 8].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32fast::hash(&out[..CHECKPOINT_CRC]);
        out[CHECKPOINT_CRC..CHECKPOINT_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if bytes.len() != CHECKPOINT_LEN {
            return Err(CheckpointError::Length { len: bytes.len() });
        }
        if &bytes[..8] != CHECKPOINT_MAGIC {
            return Err(CheckpointError::WrongMagic);
        }
        let crc = u32::from_le_bytes([
            bytes[CHECKPOINT_CRC],
            bytes[CHECKPOINT_CRC + 1],
            bytes[CHECKPOINT_CRC + 2],
            bytes[CHECKPOINT_CRC + 3],
        ]);
        if crc != crc32fast::hash(&bytes[..CHECKPOINT_CRC]) {
            return Err(CheckpointError::Checksum);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let flags = u64_at(CHECKPOINT_FLAGS);
        if flags & !FLAG_CLEAN != 0 {
            return Err(CheckpointError::UnknownFlags { flags });
        }
        Ok(Checkpoint {
            durable_offset: u64_at(CHECKPOINT_DURABLE_OFFSET),
            clean: flags & FLAG_CLEAN != 0,
        })
    }
}

/// Why a checkpoint file is not used (recovery then scans every record).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint is {len} bytes, expected {CHECKPOINT_LEN}")]
    Length { len: usize },
    #[error("checkpoint has the wrong magic")]
    WrongMagic,
    #[error("checkpoint checksum mismatch")]
    Checksum,
    #[error("checkpoint has unknown flags {flags:#x}")]
    UnknownFlags { flags: u64 },
}

/// What a scan of one segment found.
#[derive(Debug, Default)]
pub struct Scan {
    /// End of the last valid record of the unbroken run from position 0.
    pub valid_end: usize,
    /// The offset after the last valid record.
    pub next_offset: u64,
    pub records: u64,
    pub first_timestamp_ms: Option<u64>,
    pub last_timestamp_ms: Option<u64>,
    /// The highest `durable_watermark` among the valid records.
    pub durable_watermark: u64,
    pub index: SegmentIndex,
    /// Where and why the run stopped, if not at zero-filled space or the end.
    pub damage: Option<Damage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub position: usize,
    /// The offset the record at `position` should have had.
    pub expected_offset: u64,
    pub reason: String,
}

/// Walks the records of a segment from position 0.
///
/// `verify` checks every checksum (the active segment, or a sealed one the
/// operator wants verified); without it the scan reads headers only, for
/// segments verified when they were sealed. The run stops at the end of the
/// bytes, at zero-filled space, or at the first record that is invalid or
/// does not carry the next offset.
pub fn scan_segment(bytes: &[u8], base_offset: u64, index_interval: u32, verify: bool) -> Scan {
    let mut scan = Scan {
        next_offset: base_offset,
        ..Scan::default()
    };
    let mut position = 0usize;
    while position < bytes.len() {
        let rest = &bytes[position..];
        let expected = scan.next_offset;
        if rest.len() < record::LEN_FIELD_BYTES && rest.iter().all(|&b| b == 0) {
            // Zeros too few to hold even a length field: a segment filled
            // to within a few bytes of its end, then rolled.
            break;
        }
        let found = if verify {
            match record::decode(rest) {
                Ok(Decoded::Record(r)) => {
                    Ok(Some((r.len, r.offset, r.timestamp_ms, r.durable_watermark)))
                }
                Ok(Decoded::Unwritten) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        } else {
            match record::peek_len(rest) {
                Some(0) => Ok(None),
                _ => record::peek_header(rest)
                    .map(|(len, offset, ts)| Some((len, offset, ts, 0)))
                    .ok_or_else(|| "record header is not readable".to_string()),
            }
        };
        let (len, offset, timestamp_ms, watermark) = match found {
            Ok(Some(fields)) => fields,
            Ok(None) => break,
            Err(reason) => {
                scan.damage = Some(Damage {
                    position,
                    expected_offset: expected,
                    reason,
                });
                break;
            }
        };
        if offset != expected {
            scan.damage = Some(Damage {
                position,
                expected_offset: expected,
                reason: format!("record carries offset {offset} where {expected} was expected"),
            });
            break;
        }
        let rel = (offset - base_offset) as u32;
        scan.index
            .observe(rel, position as u32, timestamp_ms, index_interval);
        scan.first_timestamp_ms.get_or_insert(timestamp_ms);
        scan.last_timestamp_ms = Some(timestamp_ms);
        scan.durable_watermark = scan.durable_watermark.max(watermark);
        scan.records += 1;
        scan.next_offset = offset + 1;
        position += len;
        scan.valid_end = position;
    }
    scan
}

/// One past the last non-zero byte of `bytes[from..]`, or `from` if all are
/// zero. Reads eight bytes at a time.
pub fn nonzero_end(bytes: &[u8], from: usize) -> usize {
    let tail = bytes.get(from..).unwrap_or(&[]);
    let (chunks, rest) = tail.split_at(tail.len() - tail.len() % 8);
    if let Some(i) = rest.iter().rposition(|&b| b != 0) {
        return from + chunks.len() + i + 1;
    }
    match chunks
        .chunks_exact(8)
        .rposition(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) != 0)
    {
        None => from,
        Some(c) => {
            let chunk = &chunks[c * 8..c * 8 + 8];
            let i = chunk.iter().rposition(|&b| b != 0).unwrap_or(0);
            from + c * 8 + i + 1
        }
    }
}

/// Valid records found past a damaged position.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AfterDamage {
    pub records: u64,
    /// Position of the first one.
    pub first_position: Option<usize>,
    /// The highest durable watermark among them.
    pub durable_watermark: u64,
}

/// Looks for valid records in `bytes[from..to)` whose offsets could follow
/// `expected_offset`, trying every byte position (a damaged length field
/// hides where the next record starts). Cheap per position: a record must
/// have a plausible length and offset before its checksum is computed.
pub fn valid_records_after(
    bytes: &[u8],
    from: usize,
    to: usize,
    expected_offset: u64,
) -> AfterDamage {
    let to = to.min(bytes.len());
    let mut found = AfterDamage::default();
    let mut position = from;
    while position + RECORD_HEADER_LEN <= to {
        let rest = &bytes[position..to];
        let plausible = record::peek_header(rest).is_some_and(|(len, offset, _)| {
            // At most one record per RECORD_HEADER_LEN bytes can lie between.
            let span = ((position - from) / RECORD_HEADER_LEN) as u64 + 1;
            len <= RECORD_BYTES_MAX && offset >= expected_offset && offset <= expected_offset + span
        });
        if plausible {
            if let Ok(Decoded::Record(r)) = record::decode(rest) {
                found.records += 1;
                found.first_position.get_or_insert(position);
                found.durable_watermark = found.durable_watermark.max(r.durable_watermark);
                position += r.len;
                continue;
            }
        }
        position += 1;
    }
    found
}

/// What the bytes past the valid run of the last segment are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailVerdict {
    /// Nothing but zeros follows the last valid record.
    Clean,
    /// A write torn by a crash: every byte from `from` to `to` lies past any
    /// offset known durable (from the checkpoint and from the watermarks of
    /// every valid record before and after it); safe to clear, together
    /// with any valid records after it (written out of order by the crash,
    /// never acknowledged as durable).
    Torn {
        from: usize,
        to: usize,
        reason: String,
    },
    /// Damage a crash cannot explain: data that had been durable.
    Damaged {
        from: usize,
        to: usize,
        reason: String,
        valid_after: u64,
    },
}

/// Classifies what lies in `bytes[scan.valid_end..dirty_end)`, given the
/// highest offset known durable from outside the segment (the checkpoint).
pub fn classify_tail(
    bytes: &[u8],
    scan: &Scan,
    dirty_end: usize,
    durable_bound: u64,
) -> TailVerdict {
    let from = scan.valid_end;
    if dirty_end <= from {
        return TailVerdict::Clean;
    }
    let expected = scan.next_offset;
    let what = scan.damage.as_ref().map_or_else(
        || "zero length followed by non-zero bytes".to_string(),
        |d| d.reason.clone(),
    );
    let after = valid_records_after(bytes, from + 1, dirty_end, expected);
    let bound = durable_bound
        .max(scan.durable_watermark)
        .max(after.durable_watermark);
    if expected < bound {
        return TailVerdict::Damaged {
            from,
            to: dirty_end,
            reason: format!("record {expected} is damaged ({what}) but offsets below {bound} had been made durable"),
            valid_after: after.records,
        };
    }
    // Valid records after the damage, none of them saying that anything
    // from the damaged one on was durable: a crash before a flush, whose
    // pages reached the disk out of order (writeback and the device's
    // cache keep no order). None was acknowledged as durable; they go with
    // the tail, as in every log that recovers to a point in time.
    let reason = if after.records > 0 {
        format!(
            "record {expected}: {what}; {} valid record(s) after it, none known durable, go with it",
            after.records
        )
    } else {
        format!("record {expected}: {what}")
    };
    TailVerdict::Torn {
        from,
        to: dirty_end,
        reason,
    }
}

/// What `open` did, logged and kept for callers and `bida inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The directory held no log: one was created.
    pub created: bool,
    /// The previous process closed the log cleanly.
    pub clean_shutdown: bool,
    pub segments: usize,
    /// Records scanned with checksums verified.
    pub records_verified: u64,
    pub bytes_verified: u64,
    /// Bytes cut from the end of the log (torn tail, or repair).
    pub bytes_truncated: u64,
    /// Records dropped by a repair, if any.
    pub repaired: Option<String>,
    /// Segments whose index files were rebuilt from the log.
    pub indexes_rebuilt: usize,
    /// A roll cut short by a crash was undone: the empty last segment was
    /// removed and the one before it reopened as the active one.
    pub roll_resumed: bool,
    pub next_offset: u64,
    pub duration: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::{encode_to_vec, InnerMsgId, Message};

    fn log_bytes(count: u64, base: u64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for i in 0..count {
            starts.push(bytes.len());
            let payload = vec![i as u8; 30 + i as usize];
            let msg = Message {
                id: InnerMsgId(u128::from(i) + 1),
                payload: &payload,
                ..Message::default()
            };
            bytes.extend(encode_to_vec(base + i, 1000 + i, 0, &msg));
        }
        (bytes, starts)
    }

    #[test]
    fn checkpoint_round_trip_and_damage() {
        let cp = Checkpoint {
            durable_offset: 12345,
            clean: true,
        };
        let bytes = cp.encode();
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), cp);
        for i in 0..CHECKPOINT_CRC + 4 {
            let mut bad = bytes;
            bad[i] ^= 4;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(Checkpoint::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn scan_walks_to_zero_fill() {
        let (mut bytes, _) = log_bytes(20, 100);
        let end = bytes.len();
        bytes.resize(end + 4096, 0);
        let scan = scan_segment(&bytes, 100, 64, true);
        assert_eq!(scan.records, 20);
        assert_eq!(scan.valid_end, end);
        assert_eq!(scan.next_offset, 120);
        assert_eq!(scan.damage, None);
        assert_eq!(scan.first_timestamp_ms, Some(1000));
        assert_eq!(scan.last_timestamp_ms, Some(1019));
        let headers_only = scan_segment(&bytes, 100, 64, false);
        assert_eq!(headers_only.index, scan.index);
        assert_eq!(headers_only.valid_end, end);
    }

    #[test]
    fn scan_stops_at_a_flipped_bit_and_finds_what_follows() {
        let (mut bytes, starts) = log_bytes(10, 0);
        bytes[starts[4] + 60] ^= 1;
        let scan = scan_segment(&bytes, 0, 64, true);
        assert_eq!(scan.records, 4);
        let damage = scan.damage.unwrap();
        assert_eq!(damage.position, starts[4]);
        assert_eq!(damage.expected_offset, 4);
        let after = valid_records_after(&bytes, damage.position + 1, bytes.len(), 4);
        assert_eq!(after.records, 5);
        assert_eq!(after.first_position, Some(starts[5]));
    }

    #[test]
    fn a_damaged_length_still_lets_later_records_be_found() {
        let (mut bytes, starts) = log_bytes(10, 0);
        bytes[starts[3]] ^= 0x40;
        let scan = scan_segment(&bytes, 0, 64, true);
        assert_eq!(scan.damage.as_ref().unwrap().position, starts[3]);
        let after = valid_records_after(&bytes, starts[3] + 1, bytes.len(), 3);
        assert_eq!(after.first_position, Some(starts[4]));
        assert_eq!(after.records, 6);
    }

    #[test]
    fn garbage_after_the_log_is_not_a_record() {
        let (mut bytes, _) = log_bytes(5, 0);
        let end = bytes.len();
        let mut x = 0x1234_5678u32;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bytes.push(x as u8);
        }
        let scan = scan_segment(&bytes, 0, 64, true);
        assert_eq!(scan.valid_end, end);
        assert!(scan.damage.is_some());
        assert_eq!(
            valid_records_after(&bytes, end + 1, bytes.len(), 5).records,
            0
        );
    }

    #[test]
    fn nonzero_end_finds_the_last_byte() {
        let mut bytes = vec![0u8; 100];
        assert_eq!(nonzero_end(&bytes, 10), 10);
        bytes[57] = 1;
        assert_eq!(nonzero_end(&bytes, 10), 58);
        bytes[99] = 1;
        assert_eq!(nonzero_end(&bytes, 10), 100);
        assert_eq!(nonzero_end(&bytes, 200), 200);
        bytes[3] = 1;
        assert_eq!(nonzero_end(&bytes[..5], 0), 4);
    }
}
