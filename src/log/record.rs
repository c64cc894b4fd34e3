//! One record: the unit the log stores, encoded and decoded without I/O.
//!
//! ```text
//!  byte 0         4         8     9     10          12              16
//!  +--------------+---------+-----+-----+-----------+---------------+
//!  | record_len   | crc32   | ver | flg | key_len   | headers_len   |
//!  | u32          | u32     | u8  | u8  | u16       | u32           |
//!  +--------------+---------+-----+-----+-----------+---------------+
//!  16                        24                        32
//!  +-------------------------+-------------------------+
//!  | offset u64              | timestamp_ms u64        |
//!  +-------------------------+-------------------------+
//!  32                                                  48              52
//!  +---------------------------------------------------+---------------+
//!  | inner_msg_id u128 (0 = none: not deduplicated)    | durable_lag   |
//!  |                                                   | u32           |
//!  +---------------------------------------------------+---------------+
//!  52
//!  +-----------+-------------------+----------------------------------+
//!  | key       | headers           | payload                          |
//!  | key_len   | headers_len       | record_len - 52 - key - headers  |
//!  +-----------+-------------------+----------------------------------+
//! ```
//!
//! All integers are little-endian. `record_len` counts the whole record,
//! itself included. `crc32` (IEEE, as computed by `crc32fast`) covers bytes
//! `[8, record_len)`: everything after the checksum, so one flipped bit
//! invalidates exactly this record. A `record_len` of zero marks unwritten
//! (preallocated, zero-filled) space.
//!
//! `durable_lag` is how many offsets this record was ahead of the log's
//! durable offset when it was written (saturating at `u32::MAX`): every
//! record below `offset - durable_lag` was already on disk. Recovery uses it
//! to tell a write torn by a crash (past every such watermark) from damage to
//! data that had been durable (below one), without a separate fsync.
//!
//! Headers are `u16 count` followed by `count` times
//! `{ u16 name_len, name, u32 value_len, value }`; an empty header block has
//! `headers_len == 0`.

use thiserror::Error;

/// Bytes in the fixed part of a record.
pub const RECORD_HEADER_LEN: usize = 52;
/// Position of each field in the fixed part.
pub const LEN_OFFSET: usize = 0;
/// Bytes of the `record_len` field.
pub const LEN_FIELD_BYTES: usize = 4;
pub const CRC_OFFSET: usize = LEN_OFFSET + LEN_FIELD_BYTES;
pub const VERSION_OFFSET: usize = CRC_OFFSET + 4;
pub const FLAGS_OFFSET: usize = VERSION_OFFSET + 1;
pub const KEY_LEN_OFFSET: usize = FLAGS_OFFSET + 1;
pub const HEADERS_LEN_OFFSET: usize = KEY_LEN_OFFSET + 2;
pub const LOG_OFFSET_OFFSET: usize = HEADERS_LEN_OFFSET + 4;
pub const TIMESTAMP_OFFSET: usize = LOG_OFFSET_OFFSET + 8;
pub const ID_OFFSET: usize = TIMESTAMP_OFFSET + 8;
pub const DURABLE_LAG_OFFSET: usize = ID_OFFSET + 16;
/// The checksum covers everything from here to the end of the record.
pub const CRC_START: usize = VERSION_OFFSET;
const _: () = assert!(DURABLE_LAG_OFFSET + 4 == RECORD_HEADER_LEN);
const _: () = assert!(CRC_START == 8);

/// The only record format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Flag bit: the record has a key (a key may be empty but present).
pub const FLAG_HAS_KEY: u8 = 0b0000_0001;
const FLAGS_KNOWN: u8 = FLAG_HAS_KEY;

/// Hard ceiling on one record, whatever `Options::record_bytes_max` says.
pub const RECORD_BYTES_MAX: usize = 64 << 20;
/// Ceiling on the header block of one record.
pub const HEADERS_BYTES_MAX: usize = 64 << 10;
/// Ceiling on the number of headers of one record.
pub const HEADER_COUNT_MAX: usize = 1024;
/// Ceiling on a key (fits the `u16` length field).
pub const KEY_BYTES_MAX: usize = u16::MAX as usize;

/// A client-generated id that makes a retried send recognisable. Zero means
/// "no id": such a record is never deduplicated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InnerMsgId(pub u128);

impl InnerMsgId {
    pub const NONE: InnerMsgId = InnerMsgId(0);

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl std::fmt::Display for InnerMsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What a caller hands the log to append. `headers` is an encoded header
/// block (see [`encode_headers`]); the log checks it before storing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Message<'a> {
    pub id: InnerMsgId,
    pub key: Option<&'a [u8]>,
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

/// A decoded record, borrowing its variable parts from the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub id: InnerMsgId,
    /// Every offset below this was durable when the record was written.
    pub durable_watermark: u64,
    pub key: Option<&'a [u8]>,
    pub headers: &'a [u8],
    pub payload: &'a [u8],
    /// Bytes the whole record takes, header included.
    pub len: usize,
    /// Byte ranges of the variable parts inside the decoded buffer, so a
    /// caller holding the buffer as `bytes::Bytes` can slice without copying.
    pub key_range: std::ops::Range<usize>,
    pub headers_range: std::ops::Range<usize>,
    pub payload_range: std::ops::Range<usize>,
}

/// Why bytes are not a valid record. Pure: the caller adds where they came from.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("record length {len} is shorter than the {RECORD_HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("record length {len} exceeds the maximum of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("record claims {need} bytes but only {have} remain")]
    Truncated { need: usize, have: usize },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown format version {version}")]
    Version { version: u8 },
    #[error("unknown flag bits {flags:#04x}")]
    Flags { flags: u8 },
    #[error("key ({key_len} B) and headers ({headers_len} B) do not fit a {len}-byte record")]
    Layout {
        len: usize,
        key_len: usize,
        headers_len: usize,
    },
    #[error("bad header block: {reason}")]
    Headers { reason: &'static str },
    #[error("key of {len} bytes exceeds the maximum of {KEY_BYTES_MAX}")]
    KeyTooLong { len: usize },
}

/// The fate of the bytes at a position in a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record.
    Record(RecordRef<'a>),
    /// Zero-filled space: nothing was written here.
    Unwritten,
}

/// Bytes a record with these parts occupies.
pub fn encoded_len(key_len: usize, headers_len: usize, payload_len: usize) -> usize {
    RECORD_HEADER_LEN + key_len + headers_len + payload_len
}

/// Checks a message a caller wants stored and returns its encoded length.
pub fn check_message(msg: &Message<'_>, record_bytes_max: usize) -> Result<usize, RecordError> {
    let key_len = msg.key.map_or(0, <[u8]>::len);
    if key_len > KEY_BYTES_MAX {
        return Err(RecordError::KeyTooLong { len: key_len });
    }
    check_headers(msg.headers)?;
    let len = encoded_len(key_len, msg.headers.len(), msg.payload.len());
    let max = record_bytes_max.min(RECORD_BYTES_MAX);
    if len > max {
        return Err(RecordError::TooLong { len, max });
    }
    Ok(len)
}

/// Where an encoded record goes, part by part: a `Vec`, or the log's
/// mapped segment writer (so body parts are copied once, straight into
/// the map).
pub trait RecordSink {
    fn put(&mut self, bytes: &[u8]);
}

impl RecordSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes one record of `len` bytes (from [`check_message`]) to `out`:
/// the header with its checksum, then key, headers and payload. The one
/// encoder of the record layout; the log and every tool use it.
pub fn encode(
    out: &mut impl RecordSink,
    len: usize,
    offset: u64,
    timestamp_ms: u64,
    durable_lag: u32,
    msg: &Message<'_>,
) {
    let mut header = [0u8; RECORD_HEADER_LEN];
    encode_header(&mut header, len, offset, timestamp_ms, durable_lag, msg);
    let crc = record_crc(&header, msg);
    put_u32(&mut header, CRC_OFFSET, crc);
    out.put(&header);
    if let Some(key) = msg.key {
        out.put(key);
    }
    out.put(msg.headers);
    out.put(msg.payload);
}

/// Writes the fixed header of a record into `dst[..RECORD_HEADER_LEN]`,
/// with the checksum still zero ([`encode`] fills it in).
fn encode_header(
    dst: &mut [u8; RECORD_HEADER_LEN],
    len: usize,
    offset: u64,
    timestamp_ms: u64,
    durable_lag: u32,
    msg: &Message<'_>,
) {
    debug_assert!(len <= RECORD_BYTES_MAX);
    let key_len = msg.key.map_or(0, <[u8]>::len);
    let flags = if msg.key.is_some() { FLAG_HAS_KEY } else { 0 };
    put_u32(dst, LEN_OFFSET, len as u32);
    put_u32(dst, CRC_OFFSET, 0);
    dst[VERSION_OFFSET] = FORMAT_VERSION;
    dst[FLAGS_OFFSET] = flags;
    dst[KEY_LEN_OFFSET..KEY_LEN_OFFSET + 2].copy_from_slice(&(key_len as u16).to_le_bytes());
    put_u32(dst, HEADERS_LEN_OFFSET, msg.headers.len() as u32);
    dst[LOG_OFFSET_OFFSET..LOG_OFFSET_OFFSET + 8].copy_from_slice(&offset.to_le_bytes());
    dst[TIMESTAMP_OFFSET..TIMESTAMP_OFFSET + 8].copy_from_slice(&timestamp_ms.to_le_bytes());
    dst[ID_OFFSET..ID_OFFSET + 16].copy_from_slice(&msg.id.0.to_le_bytes());
    put_u32(dst, DURABLE_LAG_OFFSET, durable_lag);
}

/// The checksum of a record whose header was written by [`encode_header`],
/// computed over the header tail and the body parts without joining them.
fn record_crc(header: &[u8; RECORD_HEADER_LEN], msg: &Message<'_>) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[CRC_START..]);
    if let Some(key) = msg.key {
        hasher.update(key);
    }
    hasher.update(msg.headers);
    hasher.update(msg.payload);
    hasher.finalize()
}

/// Encodes a whole record into a fresh buffer (tests, tools), through
/// [`encode`].
pub fn encode_to_vec(
    offset: u64,
    timestamp_ms: u64,
    durable_lag: u32,
    msg: &Message<'_>,
) -> Vec<u8> {
    let key_len = msg.key.map_or(0, <[u8]>::len);
    let len = encoded_len(key_len, msg.headers.len(), msg.payload.len());
    let mut out = Vec::with_capacity(len);
    encode(&mut out, len, offset, timestamp_ms, durable_lag, msg);
    out
}

/// Reads the length field at the start of `buf`, if four bytes are there.
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    buf.get(..LEN_FIELD_BYTES)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Decodes and verifies the record at the start of `buf`.
///
/// Every length is checked against `buf` and the named maxima before use, so
/// hostile bytes yield an error, never a panic.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, RecordError> {
    let Some(len) = peek_len(buf) else {
        return Err(RecordError::Truncated {
            need: 4,
            have: buf.len(),
        });
    };
    if len == 0 {
        return Ok(Decoded::Unwritten);
    }
    if len < RECORD_HEADER_LEN {
        return Err(RecordError::TooShort { len });
    }
    if len > RECORD_BYTES_MAX {
        return Err(RecordError::TooLong {
            len,
            max: RECORD_BYTES_MAX,
        });
    }
    let Some(rec) = buf.get(..len) else {
        return Err(RecordError::Truncated {
            need: len,
            have: buf.len(),
        });
    };
    let stored = get_u32(rec, CRC_OFFSET);
    let computed = crc32fast::hash(&rec[CRC_START..]);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    let version = rec[VERSION_OFFSET];
    if version != FORMAT_VERSION {
        return Err(RecordError::Version { version });
    }
    let flags = rec[FLAGS_OFFSET];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(RecordError::Flags { flags });
    }
    let key_len = u16::from_le_bytes([rec[KEY_LEN_OFFSET], rec[KEY_LEN_OFFSET + 1]]) as usize;
    let headers_len = get_u32(rec, HEADERS_LEN_OFFSET) as usize;
    let body = len - RECORD_HEADER_LEN;
    if key_len + headers_len > body {
        return Err(RecordError::Layout {
            len,
            key_len,
            headers_len,
        });
    }
    let key_range = RECORD_HEADER_LEN..RECORD_HEADER_LEN + key_len;
    let headers_range = key_range.end..key_range.end + headers_len;
    let payload_range = headers_range.end..len;
    let has_key = flags & FLAG_HAS_KEY != 0;
    if !has_key && key_len != 0 {
        return Err(RecordError::Layout {
            len,
            key_len,
            headers_len,
        });
    }
    let offset = get_u64(rec, LOG_OFFSET_OFFSET);
    Ok(Decoded::Record(RecordRef {
        offset,
        durable_watermark: offset.saturating_sub(u64::from(get_u32(rec, DURABLE_LAG_OFFSET))),
        timestamp_ms: get_u64(rec, TIMESTAMP_OFFSET),
        id: InnerMsgId(get_u128(rec, ID_OFFSET)),
        key: has_key.then(|| &rec[key_range.clone()]),
        headers: &rec[headers_range.clone()],
        payload: &rec[payload_range.clone()],
        len,
        key_range,
        headers_range,
        payload_range,
    }))
}

/// The fields a scan needs to walk a segment without verifying checksums:
/// `(record_len, offset, timestamp_ms)`, or `None` where the bytes cannot be
/// a record header. Used to rebuild indexes of segments already verified.
pub fn peek_header(buf: &[u8]) -> Option<(usize, u64, u64)> {
    let len = peek_len(buf)?;
    if !(RECORD_HEADER_LEN..=RECORD_BYTES_MAX).contains(&len) || buf.len() < len {
        return None;
    }
    Some((
        len,
        get_u64(buf, LOG_OFFSET_OFFSET),
        get_u64(buf, TIMESTAMP_OFFSET),
    ))
}

/// Header fields read without verifying the checksum, for walking records
/// already verified (rebuilding the dedup window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeekedId {
    pub len: usize,
    pub offset: u64,
    pub timestamp_ms: u64,
    pub id: InnerMsgId,
}

pub fn peek_id(buf: &[u8]) -> Option<PeekedId> {
    let (len, offset, timestamp_ms) = peek_header(buf)?;
    let id = u128::from_le_bytes(buf.get(ID_OFFSET..ID_OFFSET + 16)?.try_into().ok()?);
    Some(PeekedId {
        len,
        offset,
        timestamp_ms,
        id: InnerMsgId(id),
    })
}

/// Encodes `(name, value)` pairs as a header block.
pub fn encode_headers(pairs: &[(&[u8], &[u8])]) -> Result<Vec<u8>, RecordError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let size: usize = pairs.iter().map(|(n, v)| 6 + n.len() + v.len()).sum();
    let mut out = Vec::with_capacity(2 + size);
    encode_headers_into(pairs.iter().copied(), &mut out)?;
    Ok(out)
}

/// Appends the header block of `pairs` to `out` (nothing for no pairs):
/// the same bytes as [`encode_headers`], for callers that keep the blocks
/// of many records in one buffer. On an error `out` is left as it was.
pub fn encode_headers_into<'a>(
    pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let start = out.len();
    let fail = |out: &mut Vec<u8>, reason| {
        out.truncate(start);
        Err(RecordError::Headers { reason })
    };
    out.extend_from_slice(&[0, 0]); // the count, written at the end
    let mut count = 0usize;
    for (name, value) in pairs {
        let Ok(name_len) = u16::try_from(name.len()) else {
            return fail(out, "header name longer than 65535 bytes");
        };
        let Ok(value_len) = u32::try_from(value.len()) else {
            return fail(out, "header value too long");
        };
        count += 1;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(value);
    }
    if count == 0 {
        out.truncate(start);
        return Ok(());
    }
    if count > HEADER_COUNT_MAX {
        return fail(out, "more than HEADER_COUNT_MAX headers");
    }
    if out.len() - start > HEADERS_BYTES_MAX {
        return fail(out, "header block larger than HEADERS_BYTES_MAX");
    }
    out[start..start + 2].copy_from_slice(&(count as u16).to_le_bytes());
    Ok(())
}

/// Checks that `block` is a well-formed header block.
pub fn check_headers(block: &[u8]) -> Result<(), RecordError> {
    if block.len() > HEADERS_BYTES_MAX {
        return Err(RecordError::Headers {
            reason: "header block larger than HEADERS_BYTES_MAX",
        });
    }
    for header in HeaderIter::new(block) {
        header?;
    }
    Ok(())
}

/// One header: `(name, value)`.
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// Iterates over the `(name, value)` pairs of a header block. Malformed
/// bytes yield one error, after which the iterator ends.
pub struct HeaderIter<'a> {
    rest: &'a [u8],
    remaining: usize,
    done: bool,
}

impl<'a> HeaderIter<'a> {
    pub fn new(block: &'a [u8]) -> Self {
        // An empty block has no count; otherwise a `u16` count leads. A block
        // of one byte is caught by `next`, as a count cut short.
        let (remaining, rest) = match block {
            [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
            _ => (0, block),
        };
        HeaderIter {
            rest,
            remaining,
            done: false,
        }
    }

    fn fail(&mut self, reason: &'static str) -> Option<Result<Header<'a>, RecordError>> {
        self.done = true;
        Some(Err(RecordError::Headers { reason }))
    }
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = Result<Header<'a>, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.remaining == 0 {
            self.done = true;
            return match self.rest.len() {
                0 => None,
                1 => self.fail("header count cut short"),
                _ => self.fail("bytes after the last header"),
            };
        }
        if self.remaining > HEADER_COUNT_MAX {
            return self.fail("more than HEADER_COUNT_MAX headers");
        }
        let Some((name_len, rest)) = split_u16(self.rest) else {
            return self.fail("header name length cut short");
        };
        let Some((name, rest)) = split_at_checked(rest, name_len as usize) else {
            return self.fail("header name cut short");
        };
        let Some((value_len, rest)) = split_u32(rest) else {
            return self.fail("header value length cut short");
        };
        let Some((value, rest)) = split_at_checked(rest, value_len as usize) else {
            return self.fail("header value cut short");
        };
        self.rest = rest;
        self.remaining -= 1;
        Some(Ok((name, value)))
    }
}

fn split_at_checked(buf: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (at <= buf.len()).then(|| buf.split_at(at))
}

fn split_u16(buf: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = split_at_checked(buf, 2)?;
    Some((u16::from_le_bytes([head[0], head[1]]), rest))
}

fn split_u32(buf: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = split_at_checked(buf, 4)?;
    Some((
        u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
        rest,
    ))
}

pub(crate) fn put_u32(dst: &mut [u8], at: usize, v: u32) {
    dst[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

fn get_u128(buf: &[u8], at: usize) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&buf[at..at + 16]);
    u128::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_blocks_appended_to_a_buffer_are_the_blocks_encoded_alone() {
        let pairs: [(&[u8], &[u8]); 2] = [(b"a", b"1"), (b"name", b"")];
        let mut out = b"before".to_vec();
        encode_headers_into(pairs.iter().copied(), &mut out).unwrap();
        assert_eq!(&out[..6], b"before");
        assert_eq!(out[6..], encode_headers(&pairs).unwrap()[..]);
        check_headers(&out[6..]).unwrap();
        // No pairs: no block at all.
        encode_headers_into(std::iter::empty(), &mut out).unwrap();
        assert_eq!(out.len(), 6 + encode_headers(&pairs).unwrap().len());
        // Too many: an error, and the buffer as it was.
        let len = out.len();
        let many = vec![(&b"k"[..], &b""[..]); HEADER_COUNT_MAX + 1];
        assert!(matches!(
            encode_headers_into(many.into_iter(), &mut out),
            Err(RecordError::Headers { .. })
        ));
        assert_eq!(out.len(), len);
    }

    fn sample<'a>(key: Option<&'a [u8]>, headers: &'a [u8], payload: &'a [u8]) -> Message<'a> {
        Message {
            id: InnerMsgId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            key,
            headers,
            payload,
        }
    }

    #[test]
    fn round_trip_with_all_parts() {
        let headers = encode_headers(&[(b"origin", b"test"), (b"n", b"1")]).unwrap();
        let msg = sample(Some(b"order-7"), &headers, b"hello");
        let bytes = encode_to_vec(42, 1_700_000_000_000, 2, &msg);
        assert_eq!(bytes.len(), RECORD_HEADER_LEN + 7 + headers.len() + 5);
        let Decoded::Record(rec) = decode(&bytes).unwrap() else {
            panic!("expected a record")
        };
        assert_eq!(rec.offset, 42);
        assert_eq!(rec.durable_watermark, 40);
        assert_eq!(rec.timestamp_ms, 1_700_000_000_000);
        assert_eq!(rec.id, msg.id);
        assert_eq!(rec.key, Some(&b"order-7"[..]));
        assert_eq!(rec.payload, b"hello");
        let pairs: Vec<_> = HeaderIter::new(rec.headers).map(Result::unwrap).collect();
        assert_eq!(
            pairs,
            vec![(&b"origin"[..], &b"test"[..]), (&b"n"[..], &b"1"[..])]
        );
    }

    #[test]
    fn empty_key_differs_from_no_key() {
        let with_empty = encode_to_vec(0, 0, 0, &sample(Some(b""), b"", b"x"));
        let without = encode_to_vec(0, 0, 0, &sample(None, b"", b"x"));
        let Decoded::Record(a) = decode(&with_empty).unwrap() else {
            panic!()
        };
        let Decoded::Record(b) = decode(&without).unwrap() else {
            panic!()
        };
        assert_eq!(a.key, Some(&b""[..]));
        assert_eq!(b.key, None);
    }

    #[test]
    fn zero_length_is_unwritten_space() {
        assert_eq!(decode(&[0u8; 64]).unwrap(), Decoded::Unwritten);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = encode_to_vec(9, 5, 1, &sample(Some(b"k"), b"", b"payload bytes"));
        for bit in 0..bytes.len() * 8 {
            let mut copy = bytes.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            match decode(&copy) {
                Err(_) => {}
                Ok(Decoded::Record(r)) => panic!("flip of bit {bit} accepted: {r:?}"),
                // Only a flip that zeroes the length field could read as unwritten,
                // and no single flip of a non-zero length can produce zero here.
                Ok(Decoded::Unwritten) => panic!("flip of bit {bit} read as unwritten"),
            }
        }
    }

    #[test]
    fn lengths_are_checked_before_use() {
        let mut bytes = encode_to_vec(0, 0, 0, &sample(None, b"", b"abc"));
        put_u32(&mut bytes, LEN_OFFSET, u32::MAX);
        assert!(matches!(decode(&bytes), Err(RecordError::TooLong { .. })));
        put_u32(&mut bytes, LEN_OFFSET, 10);
        assert!(matches!(
            decode(&bytes),
            Err(RecordError::TooShort { len: 10 })
        ));
        put_u32(&mut bytes, LEN_OFFSET, 1000);
        assert!(matches!(
            decode(&bytes),
            Err(RecordError::Truncated { need: 1000, .. })
        ));
        assert!(matches!(
            decode(&[1, 2]),
            Err(RecordError::Truncated { need: 4, have: 2 })
        ));
    }

    #[test]
    fn malformed_header_blocks_are_rejected() {
        assert!(check_headers(&[]).is_ok());
        assert!(check_headers(&[1]).is_err());
        assert!(check_headers(&[1, 0]).is_err());
        assert!(check_headers(&[1, 0, 1, 0, b'a', 0, 0, 0, 0]).is_ok());
        assert!(check_headers(&[1, 0, 1, 0, b'a', 0, 0, 0, 0, 9]).is_err());
        assert!(check_headers(&[1, 0, 1, 0, b'a', 5, 0, 0, 0, 1]).is_err());
        assert!(check_headers(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn oversized_messages_are_refused() {
        let payload = vec![0u8; 1000];
        let msg = sample(None, b"", &payload);
        assert!(check_message(&msg, 2000).is_ok());
        assert_eq!(
            check_message(&msg, 500),
            Err(RecordError::TooLong {
                len: 1052,
                max: 500
            })
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let _ = peek_header(&bytes);
            for h in HeaderIter::new(&bytes) { let _ = h; }
        }

        #[test]
        fn encode_decode_round_trip(
            offset in any::<u64>(), ts in any::<u64>(), id in any::<u128>(),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            names in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let pairs: Vec<(&[u8], &[u8])> = names.iter().map(|n| (n.as_slice(), n.as_slice())).collect();
            let headers = encode_headers(&pairs).unwrap();
            let msg = Message { id: InnerMsgId(id), key: key.as_deref(), headers: &headers, payload: &payload };
            let bytes = encode_to_vec(offset, ts, 0, &msg);
            let Decoded::Record(rec) = decode(&bytes).unwrap() else { panic!() };
            prop_assert_eq!(rec.offset, offset);
            prop_assert_eq!(rec.timestamp_ms, ts);
            prop_assert_eq!(rec.id.0, id);
            prop_assert_eq!(rec.key, key.as_deref());
            prop_assert_eq!(rec.headers, &headers[..]);
            prop_assert_eq!(rec.payload, &payload[..]);
            prop_assert_eq!(peek_header(&bytes), Some((bytes.len(), offset, ts)));
        }
    }
}
