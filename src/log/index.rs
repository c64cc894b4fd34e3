//! Sparse offset and time indexes of one segment, in memory and on disk.
//!
//! An entry is added for the first record of a segment and then for the
//! first record at least `index_interval_bytes` past the previous entry, so
//! a lookup lands at most one interval before the record sought.
//!
//! `<base>.index` (written when a segment is sealed):
//! ```text
//!  0                8           12          16
//!  +----------------+-----------+-----------+------------------------------+
//!  | "BIDAIDX1"     | count u32 | crc32 u32 | count x { rel_offset u32,    |
//!  |                |           |           |           position u32 }     |
//!  +----------------+-----------+-----------+------------------------------+
//! ```
//! `<base>.timeindex`:
//! ```text
//!  +----------------+-----------+-----------+------------------------------+
//!  | "BIDATIX1"     | count u32 | crc32 u32 | count x { timestamp_ms u64,  |
//!  |                |           |           |   rel_offset u32, pos u32 }  |
//!  +----------------+-----------+-----------+------------------------------+
//! ```
//! `rel_offset` is the record offset minus the segment's base offset;
//! `position` its byte position in the `.log` file; the crc covers the
//! entries. Both files are derived data: if one is missing or fails its
//! checks, open rebuilds it from the log.

pub const OFFSET_INDEX_MAGIC: &[u8; 8] = b"BIDAIDX1";
pub const TIME_INDEX_MAGIC: &[u8; 8] = b"BIDATIX1";
pub const INDEX_HEADER_LEN: usize = 16;
pub const OFFSET_ENTRY_LEN: usize = 8;
pub const TIME_ENTRY_LEN: usize = 16;
const _: () = assert!(INDEX_HEADER_LEN == 8 + 4 + 4);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetEntry {
    pub rel_offset: u32,
    pub position: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    pub timestamp_ms: u64,
    pub rel_offset: u32,
    pub position: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    offsets: Vec<OffsetEntry>,
    times: Vec<TimeEntry>,
}

impl SegmentIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers a record to the index; called for every record in order.
    pub fn observe(
        &mut self,
        rel_offset: u32,
        position: u32,
        timestamp_ms: u64,
        interval_bytes: u32,
    ) {
        let due = |last: Option<u32>| last.is_none_or(|p| position - p >= interval_bytes);
        if due(self.offsets.last().map(|e| e.position)) {
            self.offsets.push(OffsetEntry {
                rel_offset,
                position,
            });
        }
        let newer = self
            .times
            .last()
            .is_none_or(|e| timestamp_ms > e.timestamp_ms);
        if newer && due(self.times.last().map(|e| e.position)) {
            self.times.push(TimeEntry {
                timestamp_ms,
                rel_offset,
                position,
            });
        }
    }

    /// The entry to start scanning from for `rel_offset`: the last entry at
    /// or before it (position 0 when the index is empty).
    pub fn floor(&self, rel_offset: u32) -> OffsetEntry {
        let i = self.offsets.partition_point(|e| e.rel_offset <= rel_offset);
        i.checked_sub(1)
            .and_then(|i| self.offsets.get(i).copied())
            .unwrap_or(OffsetEntry {
                rel_offset: 0,
                position: 0,
            })
    }

    /// The entry to start scanning from for the first record with a
    /// timestamp at or after `timestamp_ms`: the last entry older than it.
    pub fn time_floor(&self, timestamp_ms: u64) -> OffsetEntry {
        let i = self
            .times
            .partition_point(|e| e.timestamp_ms < timestamp_ms);
        i.checked_sub(1).and_then(|i| self.times.get(i)).map_or(
            OffsetEntry {
                rel_offset: 0,
                position: 0,
            },
            |e| OffsetEntry {
                rel_offset: e.rel_offset,
                position: e.position,
            },
        )
    }

    pub fn last(&self) -> Option<OffsetEntry> {
        self.offsets.last().copied()
    }

    pub fn entries(&self) -> usize {
        self.offsets.len() + self.times.len()
    }

    pub fn encode_offsets(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.offsets.len() * OFFSET_ENTRY_LEN);
        for e in &self.offsets {
            body.extend_from_slice(&e.rel_offset.to_le_bytes());
            body.extend_from_slice(&e.position.to_le_bytes());
        }
        frame(OFFSET_INDEX_MAGIC, self.offsets.len(), body)
    }

    pub fn encode_times(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.times.len() * TIME_ENTRY_LEN);
        for e in &self.times {
            body.extend_from_slice(&e.timestamp_ms.to_le_bytes());
            body.extend_from_slice(&e.rel_offset.to_le_bytes());
            body.extend_from_slice(&e.position.to_le_bytes());
        }
        frame(TIME_INDEX_MAGIC, self.times.len(), body)
    }

    /// Decodes both files, checking every entry against the segment length
    /// and ordering. Errors say what is wrong; the caller rebuilds.
    pub fn decode(
        offset_file: &[u8],
        time_file: &[u8],
        segment_len: u64,
    ) -> Result<Self, IndexError> {
        let offset_body = unframe(
            IndexFile::Offsets,
            OFFSET_INDEX_MAGIC,
            offset_file,
            OFFSET_ENTRY_LEN,
        )?;
        let time_body = unframe(
            IndexFile::Times,
            TIME_INDEX_MAGIC,
            time_file,
            TIME_ENTRY_LEN,
        )?;
        let mut index = SegmentIndex::new();
        for chunk in offset_body.chunks_exact(OFFSET_ENTRY_LEN) {
            let e = OffsetEntry {
                rel_offset: le_u32(&chunk[0..4]),
                position: le_u32(&chunk[4..8]),
            };
            if let Some(prev) = index.offsets.last() {
                if e.rel_offset <= prev.rel_offset || e.position <= prev.position {
                    return Err(IndexError::OutOfOrder {
                        file: IndexFile::Offsets,
                        entry: index.offsets.len(),
                    });
                }
            }
            if e.position as u64 >= segment_len {
                return Err(IndexError::PastSegmentEnd {
                    file: IndexFile::Offsets,
                    entry: index.offsets.len(),
                    position: e.position,
                    segment_len,
                });
            }
            index.offsets.push(e);
        }
        for chunk in time_body.chunks_exact(TIME_ENTRY_LEN) {
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&chunk[0..8]);
            let e = TimeEntry {
                timestamp_ms: u64::from_le_bytes(ts),
                rel_offset: le_u32(&chunk[8..12]),
                position: le_u32(&chunk[12..16]),
            };
            if let Some(prev) = index.times.last() {
                if e.timestamp_ms <= prev.timestamp_ms || e.position <= prev.position {
                    return Err(IndexError::OutOfOrder {
                        file: IndexFile::Times,
                        entry: index.times.len(),
                    });
                }
            }
            if e.position as u64 >= segment_len {
                return Err(IndexError::PastSegmentEnd {
                    file: IndexFile::Times,
                    entry: index.times.len(),
                    position: e.position,
                    segment_len,
                });
            }
            index.times.push(e);
        }
        if segment_len > 0 && index.offsets.first().is_none_or(|e| e.position != 0) {
            return Err(IndexError::MissesFirstRecord);
        }
        Ok(index)
    }
}

fn frame(magic: &[u8; 8], count: usize, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn unframe<'a>(
    which: IndexFile,
    magic: &[u8; 8],
    file: &'a [u8],
    entry_len: usize,
) -> Result<&'a [u8], IndexError> {
    let (Some(head), Some(body)) = (file.get(..INDEX_HEADER_LEN), file.get(INDEX_HEADER_LEN..))
    else {
        return Err(IndexError::Short {
            file: which,
            len: file.len(),
        });
    };
    if &head[0..8] != magic {
        return Err(IndexError::WrongMagic { file: which });
    }
    let count = le_u32(&head[8..12]) as usize;
    if body.len() != count.saturating_mul(entry_len) {
        return Err(IndexError::WrongCount {
            file: which,
            count,
            body_len: body.len(),
        });
    }
    let stored = le_u32(&head[12..16]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(IndexError::Checksum {
            file: which,
            stored,
            computed,
        });
    }
    Ok(body)
}

/// Which of a segment's two index files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexFile {
    Offsets,
    Times,
}

impl std::fmt::Display for IndexFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IndexFile::Offsets => "offset index",
            IndexFile::Times => "time index",
        })
    }
}

/// Why a segment's index files are not used (the caller rebuilds them
/// from the records).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read the {file}: {source}")]
    Read {
        file: IndexFile,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} of {len} bytes is shorter than its header")]
    Short { file: IndexFile, len: usize },
    #[error("{file} has the wrong magic")]
    WrongMagic { file: IndexFile },
    #[error("{file} claims {count} entries but holds {body_len} bytes")]
    WrongCount {
        file: IndexFile,
        count: usize,
        body_len: usize,
    },
    #[error("{file} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        file: IndexFile,
        stored: u32,
        computed: u32,
    },
    #[error("{file} entry {entry} is not after the one before it")]
    OutOfOrder { file: IndexFile, entry: usize },
    #[error("{file} entry {entry} points at byte {position}, past the segment end {segment_len}")]
    PastSegmentEnd {
        file: IndexFile,
        entry: usize,
        position: u32,
        segment_len: u64,
    },
    #[error("offset index does not start at the first record")]
    MissesFirstRecord,
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentIndex {
        let mut index = SegmentIndex::new();
        // 100 records of 1000 bytes, timestamps rising every 10 records.
        for i in 0..100u32 {
            index.observe(i, i * 1000, 1000 + u64::from(i / 10), 4096);
        }
        index
    }

    #[test]
    fn entries_are_sparse_and_floor_finds_the_nearest() {
        let index = sample();
        assert_eq!(
            index.offsets.len(),
            20,
            "one entry per 5 records of 1000 B at 4096 B intervals"
        );
        assert_eq!(
            index.floor(0),
            OffsetEntry {
                rel_offset: 0,
                position: 0
            }
        );
        assert_eq!(
            index.floor(7),
            OffsetEntry {
                rel_offset: 5,
                position: 5000
            }
        );
        assert_eq!(
            index.floor(99),
            OffsetEntry {
                rel_offset: 95,
                position: 95_000
            }
        );
    }

    #[test]
    fn time_floor_starts_before_the_first_match() {
        let index = sample();
        // Records 30..40 have timestamp 1003; the scan must start at or before 30.
        let e = index.time_floor(1003);
        assert!(e.rel_offset <= 30, "{e:?}");
        assert_eq!(
            index.time_floor(0),
            OffsetEntry {
                rel_offset: 0,
                position: 0
            }
        );
    }

    #[test]
    fn files_round_trip_and_damage_is_detected() {
        let index = sample();
        let offsets = index.encode_offsets();
        let times = index.encode_times();
        assert_eq!(
            SegmentIndex::decode(&offsets, &times, 100_000).unwrap(),
            index
        );
        assert!(
            SegmentIndex::decode(&offsets, &times, 50_000).is_err(),
            "entries past the end"
        );
        for i in 0..offsets.len() {
            let mut bad = offsets.clone();
            bad[i] ^= 0x10;
            assert!(
                SegmentIndex::decode(&bad, &times, 100_000).is_err(),
                "flip at {i}"
            );
        }
        assert!(SegmentIndex::decode(&offsets[..offsets.len() - 1], &times, 100_000).is_err());
        assert!(SegmentIndex::decode(&[], &times, 100_000).is_err());
    }
}
