//! The disk under the log: every byte the engine reads or writes, and every
//! name it creates, renames or removes, goes through [`FileSystem`] and
//! [`DiskFile`]. Two implementations:
//!
//! - [`OsDisk`] (`os.rs`), the default: the operating system's files,
//!   `fdatasync`, `fallocate`, shared memory maps.
//! - [`MemoryDisk`] (`memory.rs`), for tests: files in memory that keep the
//!   bytes *written* apart from the bytes *durable* (synced), and names
//!   created or renamed apart from names made durable by a directory sync.
//!   [`MemoryDisk::crash`] then does what a SIGKILL or a power cut would:
//!   keeps everything, or drops or tears whatever was not synced. Recovery
//!   is checked against a model of what was acknowledged, deterministically
//!   and with no real file, in `cargo test` and in the `recover` fuzz
//!   target.
//!
//! The log holds a [`Disk`] (in [`Options::disk`](super::Options::disk)).
//! Calls through it are dynamic, but none is per record: the append path
//! writes into a map or stages bytes for one `write_all_at` per publish,
//! next to which a virtual call costs nothing measurable.
//!
//! Maps: [`DiskFile::map`] returns a [`Mapping`] (the `unsafe` stays in
//! `mmap.rs`). An OS file's mapping shares the page cache with the file, so
//! a write through either is seen by the other (`coherent`). A memory file
//! is mapped as an anonymous copy: the log then writes every byte through
//! the file and mirrors it into the copy (see `mmap.rs`), and never drops
//! the copy's pages.

mod budget;
mod memory;
mod os;

use std::any::Any;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

pub use budget::FileBudget;
pub use memory::{Crash, MemoryDisk};
pub use os::OsDisk;

pub use super::mmap::Mapping;

/// Directory-level operations: names, and opening files.
pub trait FileSystem: Send + Sync + 'static {
    /// Creates `dir` and its parents where missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Opens an existing file, for reading, and for writing if `write`.
    fn open(&self, path: &Path, write: bool) -> io::Result<Arc<dyn DiskFile>>;
    /// Creates a new, empty file for reading and writing; fails with
    /// `AlreadyExists` if `path` exists.
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Creates `path` empty, or truncates it if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Renames `from` to `to`, replacing `to` (atomically, as POSIX
    /// `rename`). The new name is durable after [`FileSystem::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file name; `NotFound` if there is none.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// The names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    /// Makes the names in `dir` durable (creations, renames, removals).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock marking `path`'s directory as in use,
    /// creating `path` if missing and writing `owner` into it. The lock is
    /// held while the returned value lives.
    fn lock(&self, path: &Path, owner: &str) -> Result<DirLock, LockError>;
    /// Makes every file and name of the file system holding `dir` durable
    /// (`syncfs`): one call for the writes of many files. An error means
    /// nothing is known durable; `Unsupported` that the caller must sync
    /// each file itself.
    fn sync_filesystem(&self, dir: &Path) -> io::Result<()> {
        let _ = dir;
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Which file system holds `dir` (the device number): logs whose
    /// files share one are made durable by one `sync_filesystem`.
    /// Default: 0 (one file system).
    fn filesystem_id(&self, dir: &Path) -> u64 {
        let _ = dir;
        0
    }
    /// A whole small file (indexes, the checkpoint).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path, false)?;
        let len = usize::try_from(file.size()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to read"))?;
        let mut bytes = vec![0u8; len];
        let mut at = 0;
        while at < len {
            match file.read_at(&mut bytes[at..], at as u64)? {
                0 => break,
                n => at += n,
            }
        }
        bytes.truncate(at);
        Ok(bytes)
    }
}

/// One open file.
pub trait DiskFile: Send + Sync + 'static {
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves `[0, len)` (`fallocate` mode 0): extends the file with
    /// zeros to at least `len` bytes, failing with "no space" if the disk
    /// cannot hold them. Never shrinks.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes the file's bytes durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's bytes and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// Maps `[0, len)`; `len` may pass the end of the file (the map is only
    /// read below what was written). Read-only unless `writable`.
    fn map(&self, len: usize, writable: bool) -> io::Result<Mapping>;
    /// Where data lies at or after `from`: `Some((start, end))` of the next
    /// region that may hold data, `None` when only holes follow. An error
    /// means the file system cannot tell: the caller scans instead.
    fn next_data(&self, from: u64) -> io::Result<Option<(u64, u64)>> {
        let _ = from;
        Err(io::ErrorKind::Unsupported.into())
    }
    /// A hint about `range`; failure costs speed or memory, never data.
    fn advise(&self, range: Range<u64>, advice: Advice) {
        let _ = (range, advice);
    }
    /// A count of the writes begun on this file so far, for
    /// [`DiskFile::covered_by_sync`]. Default: 0 (a file that does not
    /// track them).
    fn writes_begun(&self) -> u64 {
        0
    }
    /// Told that a file-system sync ([`FileSystem::sync_filesystem`]) made
    /// the first `writes` writes (a [`DiskFile::writes_begun`] taken
    /// before it started) durable. Default: nothing to note.
    fn covered_by_sync(&self, writes: u64) {
        let _ = writes;
    }
    /// Writes zeros over `range` and syncs them (`Preallocate::Zeroes`).
    fn write_zeroes(&self, range: Range<u64>) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(CHUNK as u64) as usize;
            self.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.sync_data()
    }
}

/// Hints for [`DiskFile::advise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// The range will be read soon: start reading it.
    WillNeed,
    /// The range will not be read soon: its cached pages may go.
    DontNeed,
}

/// A held directory lock (released when dropped).
pub struct DirLock(#[allow(dead_code)] Box<dyn Any + Send + Sync>);

impl DirLock {
    pub fn new(held: impl Any + Send + Sync) -> Self {
        DirLock(Box::new(held))
    }
}

/// Why [`FileSystem::lock`] did not take the lock.
#[derive(Debug)]
pub enum LockError {
    /// Another owner holds it; `holder` is what it wrote into the file.
    Held {
        holder: String,
    },
    Io(io::Error),
}

/// The disk a log lives on: the OS's by default ([`Disk::os`]), or a
/// [`MemoryDisk`] in tests. Cheap to clone; two are equal when they are
/// the same disk.
#[derive(Clone)]
pub struct Disk(Arc<dyn FileSystem>);

impl Disk {
    /// The operating system's file system (the default). Every call
    /// returns the same disk.
    pub fn os() -> Self {
        static OS: std::sync::LazyLock<Disk> = std::sync::LazyLock::new(|| Disk(Arc::new(OsDisk)));
        OS.clone()
    }

    pub fn new(fs: impl FileSystem) -> Self {
        Disk(Arc::new(fs))
    }
}

impl Default for Disk {
    fn default() -> Self {
        Disk::os()
    }
}

impl std::ops::Deref for Disk {
    type Target = dyn FileSystem;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Disk")
    }
}

impl PartialEq for Disk {
    fn eq(&self, other: &Self) -> bool {
        // The data pointers: the same file system, whatever the vtable.
        std::ptr::eq(
            Arc::as_ptr(&self.0).cast::<u8>(),
            Arc::as_ptr(&other.0).cast::<u8>(),
        )
    }
}

impl Eq for Disk {}
