//! The wire protocol: frames ([`frame`]) and the bodies of each operation
//! ([`body`]). Pure codecs: no I/O, no async. The whole protocol is
//! specified in docs/PROTOCOL.md; this module is its reference
//! implementation.

pub mod body;
pub mod frame;
pub mod key_hash;
pub mod txn;

use thiserror::Error;

pub use frame::{FrameHeader, Opcode, FRAME_BYTES_MAX, FRAME_HEADER_LEN};
pub use key_hash::KeyHash;

/// Why bytes are not a valid frame or body.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("frame length {length} exceeds the maximum of {max} bytes")]
    FrameTooLarge { length: usize, max: usize },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("body ends at byte {offset}: {need} more bytes needed, {have} left")]
    UnexpectedEof {
        offset: usize,
        need: usize,
        have: usize,
    },
    /// The stream is out of step: a field holds bytes no encoder writes.
    #[error("malformed {field} at byte {offset}: {problem}")]
    Malformed {
        /// The field, as PROTOCOL.md names it.
        field: &'static str,
        /// Where the field starts, from the start of the frame for header
        /// fields and from the start of the body for body fields.
        offset: usize,
        problem: Problem,
    },
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    /// The frame and body decode, but a field holds a value out of its
    /// range: the request is refused (INVALID_REQUEST) and the connection
    /// kept, since the stream is still in step.
    #[error("invalid {field}: {problem}")]
    InvalidValue {
        field: &'static str,
        problem: Problem,
    },
}

/// What a field held against what was expected of it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Problem {
    #[error("expected {expected}, found {found}")]
    NotEqual { expected: u64, found: u64 },
    #[error("expected {expected:#x}, found {found:#x}")]
    NotMagic { expected: u64, found: u64 },
    #[error("expected at most {max}, found {found}")]
    AboveMax { max: u64, found: u64 },
    #[error("expected at least {min}, found {found}")]
    BelowMin { min: u64, found: u64 },
    #[error("expected no bits outside {known:#x}, found {found:#x}")]
    UnknownBits { known: u64, found: u64 },
    #[error("expected one of {expected:?}, found {found}")]
    NotOneOf {
        expected: &'static [u64],
        found: u64,
    },
    #[error("expected UTF-8, found an invalid sequence at byte {valid_up_to} of the string")]
    NotUtf8 { valid_up_to: usize },
    #[error("expected a request opcode, found {found:#04x}")]
    NotARequest { found: u8 },
}
impl WireError {
    /// The error code sent back for this violation.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            WireError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            WireError::UnexpectedEof { .. } | WireError::Malformed { .. } => {
                ErrorCode::MalformedFrame
            }
            WireError::Unauthorized(_) => ErrorCode::Unauthorized,
            WireError::InvalidValue { .. } => ErrorCode::InvalidRequest,
        }
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:expr,)*) => {
        /// The numeric code of an ERROR frame. Codes below 100 close the
        /// connection after the error frame is sent.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode { $($(#[$doc])* $name = $value,)* }

        impl ErrorCode {
            pub fn from_u16(v: u16) -> Option<ErrorCode> {
                match v { $($value => Some(ErrorCode::$name),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// The frame or its body could not be decoded. Closes the connection.
    MalformedFrame = 1,
    /// The frame's length exceeds FRAME_BYTES_MAX. Closes the connection.
    FrameTooLarge = 2,
    /// Closes the connection.
    UnsupportedVersion = 3,
    /// Closes the connection.
    UnknownOpcode = 4,
    /// The broker is at its connection limit. Closes the connection.
    TooManyConnections = 5,
    /// The broker is stopping. Closes the connection.
    ShuttingDown = 6,
    /// The broker requires a token: HELLO had none or a wrong one, or a
    /// request came before HELLO. Closes the connection.
    Unauthorized = 7,
    /// A frame did not arrive whole within the broker's frame timeout, or
    /// the broker had no memory for a large frame within it. Closes the
    /// connection.
    FrameTimeout = 8,
    UnknownTopic = 100,
    TopicExists = 101,
    InvalidTopicName = 102,
    UnknownPartition = 103,
    /// A message of the batch is invalid (sizes, header block); nothing of
    /// the batch was stored.
    InvalidMessage = 104,
    /// A request field is out of range (e.g. zero partitions).
    InvalidRequest = 105,
    UnknownSubscription = 106,
    /// TXN_END or TXN_HALF names a transaction the broker does not hold
    /// (never begun, or finished so long ago it is forgotten).
    UnknownTransaction = 107,
    /// The transaction was already decided the other way (a commit after a
    /// rollback, or the reverse), or a half arrived after the decision.
    TransactionDecided = 108,
    /// The storage failed (I/O error). Retriable on another attempt.
    Storage = 200,
    /// No space left on the device. Retriable once space is freed.
    DiskFull = 201,
    /// A bounded table is full (open transactions, pending delayed
    /// messages) or the transaction is being decided right now. Retriable.
    Busy = 202,
    /// The partition's stored data is damaged: it serves reads up to the
    /// damage and refuses writes until an operator repairs it (`bida
    /// repair`, named in the message). Not retriable.
    PartitionDamaged = 203,
}

impl ErrorCode {
    /// Errors after which the sender closes the connection.
    pub fn closes_connection(self) -> bool {
        (self as u16) < 100
    }

    /// Errors worth retrying with the same request.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::Storage | ErrorCode::DiskFull | ErrorCode::ShuttingDown | ErrorCode::Busy
        )
    }
}

/// Reads fields off a body, checking every length against what is left
/// and against the field's named maximum.
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    pub fn position(&self) -> usize {
        self.at
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let have = self.remaining();
        if n > have {
            return Err(WireError::UnexpectedEof {
                offset: self.at,
                need: n,
                have,
            });
        }
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn u128(&mut self) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    /// A `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, WireError> {
        let len = self.u16()? as usize;
        if len > max {
            // The bytes are there (else the body is cut short): a value
            // too long, not a broken stream.
            self.bytes(len)?;
            return Err(WireError::InvalidValue {
                field: what,
                problem: Problem::AboveMax {
                    max: max as u64,
                    found: len as u64,
                },
            });
        }
        let offset = self.at;
        std::str::from_utf8(self.bytes(len)?).map_err(|e| WireError::Malformed {
            field: what,
            offset,
            problem: Problem::NotUtf8 {
                valid_up_to: e.valid_up_to(),
            },
        })
    }

    /// A count of items that take at least `min_item_bytes` each, checked
    /// against `max` and against the bytes left, so a hostile count cannot
    /// make the caller reserve memory for items that are not there.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_item_bytes: usize,
    ) -> Result<usize, WireError> {
        let offset = self.at;
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::Malformed {
                field: what,
                offset,
                problem: Problem::AboveMax {
                    max: max as u64,
                    found: n as u64,
                },
            });
        }
        if n.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(WireError::UnexpectedEof {
                offset: self.at,
                need: n.saturating_mul(min_item_bytes),
                have: self.remaining(),
            });
        }
        Ok(n)
    }

    /// Fails unless the whole body was consumed.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(WireError::Malformed {
                field: "end of body",
                offset: self.at,
                problem: Problem::NotEqual {
                    expected: self.at as u64,
                    found: self.buf.len() as u64,
                },
            });
        }
        Ok(())
    }
}

/// Writes fields of a body.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_u128(&mut self, v: u128);
    fn put_bytes(&mut self, v: &[u8]);
    /// A `u16`-length-prefixed string.
    ///
    /// # Panics
    /// Past 65535 bytes: callers validate names first.
    fn put_str(&mut self, v: &str);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v)
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_u128(&mut self, v: u128) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_bytes(&mut self, v: &[u8]) {
        self.extend_from_slice(v)
    }
    fn put_str(&mut self, v: &str) {
        assert!(
            v.len() <= usize::from(u16::MAX),
            "string longer than 65535 bytes"
        );
        self.put_u16(v.len() as u16);
        self.extend_from_slice(v.as_bytes());
    }
}
