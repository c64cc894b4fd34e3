//! Errors of the storage engine. Each says what happened and where.

use std::io;
use std::path::PathBuf;

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

    #[error("invalid options: {0}")]
    InvalidOptions(String),

    #[error("message {index} of the batch is invalid: {reason}")]
    InvalidMessage { index: usize, reason: RecordError },

    #[error("offset {offset} is outside the log [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },

    #[error("the log stopped accepting writes after an earlier failure: {0}")]
    Failed(String),
}

impl StorageError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StorageError {
        let path = path.into();
        move |source| StorageError::Io { path, source }
    }

    /// True when the error means "no space left on the device".
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
