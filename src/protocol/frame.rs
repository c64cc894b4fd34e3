//! The frame: the unit of everything on the wire. Pure codec, no I/O.
//!
//! ```text
//!  0        4        6    7    8        10       12                20
//!  +--------+--------+----+----+--------+--------+-----------------+---------
//!  | length | magic  |ver | op | flags  | zero   | correlation id  | body ...
//!  |  u32   | u16    | u8 | u8 |  u16   |  u16   |      u64        |
//!  +--------+--------+----+----+--------+--------+-----------------+---------
//! ```
//!
//! - `length`: bytes after the length field (16 + body length), at most
//!   [`FRAME_BYTES_MAX`]. A larger value is a protocol violation: the
//!   receiver answers with an error frame and closes the connection.
//! - `magic`: [`MAGIC`] (`0xB1DA`, bytes `DA B1`). `ver`: [`VERSION`].
//! - `op`: an [`Opcode`]. `flags`: [`FLAG_RESPONSE`] on responses,
//!   [`FLAG_PUSH`] on unsolicited deliveries; other bits are zero.
//! - `zero`: reserved, must be zero.
//! - `correlation id`: chosen by the client per request, echoed by the
//!   response; a push carries the id of the SUBSCRIBE that asked for it.
//!
//! All integers are little-endian.

use super::{Problem, WireError};

/// Bytes before the body, length field included.
pub const FRAME_HEADER_LEN: usize = 20;
/// Bytes of the length field.
pub const LENGTH_LEN: usize = 4;
pub const MAGIC: u16 = 0xB1DA;
pub const VERSION: u8 = 1;
/// The largest `length` accepted: 16 MiB.
pub const FRAME_BYTES_MAX: usize = 16 << 20;

pub const MAGIC_OFFSET: usize = LENGTH_LEN;
pub const VERSION_OFFSET: usize = MAGIC_OFFSET + 2;
pub const OPCODE_OFFSET: usize = VERSION_OFFSET + 1;
pub const FLAGS_OFFSET: usize = OPCODE_OFFSET + 1;
pub const RESERVED_OFFSET: usize = FLAGS_OFFSET + 2;
pub const CORRELATION_OFFSET: usize = RESERVED_OFFSET + 2;
const _: () = assert!(CORRELATION_OFFSET + 8 == FRAME_HEADER_LEN);

/// The frame answers a request (same opcode, same correlation id).
pub const FLAG_RESPONSE: u16 = 0b01;
/// The frame is a delivery pushed to a subscription.
pub const FLAG_PUSH: u16 = 0b10;
const FLAGS_KNOWN: u16 = FLAG_RESPONSE | FLAG_PUSH;

macro_rules! opcodes {
    ($($(#[$doc:meta])* $name:ident = $value:expr,)*) => {
        /// What a frame asks or answers. See docs/PROTOCOL.md for each body.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Opcode { $($(#[$doc])* $name = $value,)* }

        impl Opcode {
            pub fn from_u8(v: u8) -> Option<Opcode> {
                match v { $($value => Some(Opcode::$name),)* _ => None }
            }
        }
    };
}

opcodes! {
    /// Version negotiation; the first request on a connection.
    Hello = 0x01,
    /// Keeps an otherwise idle connection open.
    Ping = 0x02,
    CreateTopic = 0x10,
    ListTopics = 0x11,
    DescribeTopic = 0x12,
    Produce = 0x20,
    Fetch = 0x30,
    Subscribe = 0x31,
    Credit = 0x32,
    Unsubscribe = 0x33,
    Ack = 0x34,
    Nack = 0x35,
    GroupPosition = 0x36,
    /// Pushed to a subscription (flag PUSH).
    Deliver = 0x38,
    /// Joins the connection to a producer group (it may be asked back).
    TxnRegister = 0x40,
    /// Stores messages of a transaction, invisible until it commits.
    TxnHalf = 0x41,
    /// Commits or rolls back a transaction (or answers a check: unknown).
    TxnEnd = 0x42,
    /// Pushed to a registered producer (flag PUSH): "did this commit?".
    TxnCheck = 0x43,
    /// Stores messages that become visible after a delay.
    ProduceDelayed = 0x44,
    /// The answer to a request that failed (flag RESPONSE).
    Error = 0x7F,
}

/// Opcodes 0x40..=0x4F belong to transactions and delayed delivery
/// (0x45..=0x4F are still free).
pub const RESERVED_TRANSACTION_OPCODES: std::ops::RangeInclusive<u8> = 0x40..=0x4F;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub opcode: Opcode,
    pub flags: u16,
    pub correlation_id: u64,
    /// Bytes of body following the header.
    pub body_len: usize,
}

impl FrameHeader {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }
    pub fn is_push(&self) -> bool {
        self.flags & FLAG_PUSH != 0
    }
}

/// Decodes the header of the frame at the start of `buf`. `Ok(None)`: more
/// bytes are needed for the header; the caller then needs `body_len` more.
/// Checks the length before anything else, so a hostile length never causes
/// an allocation.
pub fn decode_header(buf: &[u8]) -> Result<Option<FrameHeader>, WireError> {
    decode_header_within(buf, FRAME_BYTES_MAX)
}

/// As [`decode_header`], with a lower frame limit `max` (a broker's
/// `frame_bytes_max`; at most `FRAME_BYTES_MAX`).
pub fn decode_header_within(buf: &[u8], max: usize) -> Result<Option<FrameHeader>, WireError> {
    let Some(&[l0, l1, l2, l3]) = buf.get(..LENGTH_LEN) else {
        return Ok(None);
    };
    let length = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let max = max.min(FRAME_BYTES_MAX);
    if length > max {
        return Err(WireError::FrameTooLarge { length, max });
    }
    if length < FRAME_HEADER_LEN - LENGTH_LEN {
        return Err(WireError::Malformed {
            field: "length",
            offset: 0,
            problem: Problem::BelowMin {
                min: (FRAME_HEADER_LEN - LENGTH_LEN) as u64,
                found: length as u64,
            },
        });
    }
    let Some(h) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let magic = u16_at(MAGIC_OFFSET);
    if magic != MAGIC {
        return Err(WireError::Malformed {
            field: "magic",
            offset: MAGIC_OFFSET,
            problem: Problem::NotMagic {
                expected: u64::from(MAGIC),
                found: u64::from(magic),
            },
        });
    }
    let version = h[VERSION_OFFSET];
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let op = h[OPCODE_OFFSET];
    let opcode = Opcode::from_u8(op).ok_or(WireError::UnknownOpcode(op))?;
    let flags = u16_at(FLAGS_OFFSET);
    if flags & !FLAGS_KNOWN != 0 {
        return Err(WireError::Malformed {
            field: "flags",
            offset: FLAGS_OFFSET,
            problem: Problem::UnknownBits {
                known: u64::from(FLAGS_KNOWN),
                found: u64::from(flags),
            },
        });
    }
    let reserved = u16_at(RESERVED_OFFSET);
    if reserved != 0 {
        return Err(WireError::Malformed {
            field: "reserved",
            offset: RESERVED_OFFSET,
            problem: Problem::NotEqual {
                expected: 0,
                found: u64::from(reserved),
            },
        });
    }
    let mut correlation = [0u8; 8];
    correlation.copy_from_slice(&h[CORRELATION_OFFSET..FRAME_HEADER_LEN]);
    let correlation_id = u64::from_le_bytes(correlation);
    Ok(Some(FrameHeader {
        opcode,
        flags,
        correlation_id,
        body_len: length - (FRAME_HEADER_LEN - LENGTH_LEN),
    }))
}

/// Writes a frame header for a body of `body_len` bytes (the caller appends
/// the body). Panics if the frame would exceed [`FRAME_BYTES_MAX`]: callers
/// bound what they encode.
pub fn encode_header(
    out: &mut Vec<u8>,
    opcode: Opcode,
    flags: u16,
    correlation_id: u64,
    body_len: usize,
) {
    let length = FRAME_HEADER_LEN - LENGTH_LEN + body_len;
    assert!(length <= FRAME_BYTES_MAX, "frame of {length} bytes");
    out.extend_from_slice(&(length as u32).to_le_bytes());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(opcode as u8);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&correlation_id.to_le_bytes());
}

/// Rewrites the length field of a frame built in place (header first, body
/// appended after), once the body's size is known.
pub fn patch_length(frame: &mut [u8]) {
    let length = frame.len() - LENGTH_LEN;
    assert!(length <= FRAME_BYTES_MAX, "frame of {length} bytes");
    frame[..LENGTH_LEN].copy_from_slice(&(length as u32).to_le_bytes());
}

/// A whole frame: header plus body.
pub fn encode(opcode: Opcode, flags: u16, correlation_id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    encode_header(&mut out, opcode, flags, correlation_id, body.len());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = encode(Opcode::Produce, FLAG_RESPONSE, 0xDEAD_BEEF_0102, b"body");
        let h = decode_header(&f).unwrap().unwrap();
        assert_eq!(h.opcode, Opcode::Produce);
        assert!(h.is_response());
        assert_eq!(h.correlation_id, 0xDEAD_BEEF_0102);
        assert_eq!(h.body_len, 4);
        assert_eq!(&f[FRAME_HEADER_LEN..], b"body");
    }

    #[test]
    fn short_input_needs_more() {
        let f = encode(Opcode::Ping, 0, 1, b"");
        for cut in 0..FRAME_HEADER_LEN {
            assert_eq!(decode_header(&f[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let good = encode(Opcode::Ping, 0, 1, b"");
        let mut f = good.clone();
        f[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_header(&f),
            Err(WireError::FrameTooLarge { .. })
        ));
        let mut f = good.clone();
        f[..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            decode_header(&f),
            Err(WireError::Malformed { .. })
        ));
        let mut f = good.clone();
        f[MAGIC_OFFSET] ^= 1;
        let e = decode_header(&f).unwrap_err();
        assert_eq!(
            e,
            WireError::Malformed {
                field: "magic",
                offset: MAGIC_OFFSET,
                problem: Problem::NotMagic {
                    expected: u64::from(MAGIC),
                    found: u64::from(MAGIC ^ 1),
                },
            }
        );
        assert_eq!(
            e.to_string(),
            "malformed magic at byte 4: expected 0xb1da, found 0xb1db"
        );
        let mut f = good.clone();
        f[VERSION_OFFSET] = 9;
        assert_eq!(decode_header(&f), Err(WireError::UnsupportedVersion(9)));
        let mut f = good.clone();
        f[OPCODE_OFFSET] = 0x4E;
        assert_eq!(decode_header(&f), Err(WireError::UnknownOpcode(0x4E)));
        let mut f = good;
        f[FLAGS_OFFSET] = 0x80;
        assert!(matches!(
            decode_header(&f),
            Err(WireError::Malformed { .. })
        ));
    }
}
