//! The flush journal, for power-loss tests.
//!
//! A SIGKILL keeps the page cache; a power cut loses whatever was not
//! flushed. With a journal in [`Options::flush_journal`], every completed
//! flush of a segment appends one line to a file:
//!
//! ```text
//! <segment path> <durable byte position>\n
//! ```
//!
//! A harness that kills the process can then garble each segment past its
//! last durable position, as a power cut would (`bida torture
//! --power-loss`, docs/RELIABILITY.md). Without a journal (the default) a
//! flush costs one branch more.
//!
//! [`Options::flush_journal`]: super::Options::flush_journal

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// A handle on the journal file, shared by every log that writes to it
/// (lines are appended whole under one lock).
#[derive(Clone, Debug)]
pub struct FlushJournal(Arc<Mutex<File>>);

impl FlushJournal {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FlushJournal> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(FlushJournal(Arc::new(Mutex::new(file))))
    }

    /// Records that `segment` is durable up to byte `end`. A failed write
    /// is ignored: the journal serves a test harness, never the data.
    pub(crate) fn record(&self, segment: &Path, end: usize) {
        let line = format!("{} {end}\n", segment.display());
        let _ = lock(&self.0).write_all(line.as_bytes());
    }
}

/// Two handles are equal when they share the file.
impl PartialEq for FlushJournal {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for FlushJournal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_one_line_per_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let j = FlushJournal::open(&path).unwrap();
        j.record(Path::new("/d/0.log"), 4096);
        j.clone().record(Path::new("/d/0.log"), 8192);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "/d/0.log 4096\n/d/0.log 8192\n"
        );
        assert_eq!(j, j.clone());
        assert_ne!(j, FlushJournal::open(&path).unwrap());
    }
}
