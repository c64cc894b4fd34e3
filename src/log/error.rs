//! Errors of the storage engine. Each says what happened and where.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::record::RecordError;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "data directory is locked by another process: {path} is held (holder wrote: {holder})"
    )]
    Locked { path: PathBuf, holder: String },

    #[error("corrupt data in {file} at byte {position}: {reason}")]
    Corrupt {
        file: PathBuf,
        position: u64,
        reason: String,
    },

    #[error("invalid option {option}: expected {expected}, found {found}")]
    InvalidOptions {
        /// The field of [`Options`](super::Options), dotted for nested ones.
        option: &'static str,
        expected: Bound,
        found: u64,
    },

    #[error("message {index} of the batch is invalid: {reason}")]
    InvalidMessage { index: usize, reason: RecordError },

    #[error("offset {offset} is outside the log [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },

    /// The log refuses writes and acks since this failure (a write or a
    /// flush that failed: what was acked may not be on disk). Shared by
    /// every caller that meets it, so a full disk stays a full disk.
    #[error("the log refuses writes since a failure: {0}")]
    Failed(Arc<StorageError>),

    #[error("the log is closed")]
    Closed,

    /// Opened under `RecoveryMode::Quarantine`: reads serve what lies
    /// before the damage; appends are refused until it is repaired.
    #[error("the log in {dir} is damaged and refuses writes ({cause}); stop its owner and run `bida repair {dir}` to cut it at the damage")]
    Damaged {
        dir: PathBuf,
        cause: Arc<StorageError>,
    },
}

/// What an option must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Range {
        min: u64,
        max: u64,
    },
    AtMost(u64),
    /// At most `segment_bytes`, this many.
    FitsInSegment(u64),
    Positive,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Range { min, max } => write!(f, "{min}..={max}"),
            Bound::AtMost(max) => write!(f, "at most {max}"),
            Bound::FitsInSegment(max) => write!(
                f,
                "at most segment_bytes, {max} (a record that does not fit in a segment could never be stored)"
            ),
            Bound::Positive => f.write_str("a positive value"),
        }
    }
}

impl StorageError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StorageError {
        let path = path.into();
        move |source| StorageError::Io { path, source }
    }

    /// True for a write refused because the log is damaged
    /// ([`StorageError::Damaged`], or a failure it caused).
    pub fn is_damaged(&self) -> bool {
        match self {
            StorageError::Damaged { .. } => true,
            StorageError::Failed(cause) => cause.is_damaged(),
            _ => false,
        }
    }

    /// True when the error means "no space left on the device".
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error() == Some(28),
            StorageError::Failed(cause) => cause.is_disk_full(),
            _ => false,
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
