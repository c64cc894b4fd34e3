//! The operating system's files: what a log uses outside tests.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Advice, DirLock, DiskFile, FileSystem, LockError, Mapping};

/// Tries of a directory lock, 10 ms apart, before it counts as held.
const LOCK_RETRIES: u32 = 50;
/// Zeros are written in writes of this size.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
const PAGE_BYTES: u64 = 4096;

/// The operating system's file system ([`Disk::os`](super::Disk::os)).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsDisk;

struct OsFile {
    file: File,
    path: PathBuf,
}

fn wrap(file: File, path: &Path) -> Arc<dyn DiskFile> {
    Arc::new(OsFile {
        file,
        path: path.to_path_buf(),
    })
}

impl FileSystem for OsDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Arc<dyn DiskFile>> {
        let file = File::options().read(true).write(write).open(path)?;
        Ok(wrap(file, path))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(wrap(file, path))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(wrap(file, path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn filesystem_id(&self, dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(dir).map_or(0, |m| m.dev())
    }

    /// `syncfs`: it reports a writeback error of any file of the file
    /// system since Linux 5.8 (before, none; kernels that old cannot run
    /// io_uring or `MADV_POPULATE_WRITE` either).
    fn sync_filesystem(&self, dir: &Path) -> io::Result<()> {
        rustix::fs::syncfs(File::open(dir)?).map_err(io::Error::from)
    }

    fn lock(&self, path: &Path, owner: &str) -> Result<DirLock, LockError> {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(LockError::Io)?;
        // A lock can be held for a moment by a process that is not its
        // owner: a child forked by any thread of this process shares the
        // descriptor until it execs (CLOEXEC), so a log closed and reopened
        // while another thread spawns a process can find its own old lock.
        // Retry briefly before calling the directory taken.
        let mut attempt = 0;
        let locked = loop {
            match file.try_lock() {
                Err(fs::TryLockError::WouldBlock) if attempt < LOCK_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other,
            }
        };
        match locked {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(LockError::Held {
                    holder: holder.trim().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(LockError::Io(e)),
        }
        file.set_len(0)
            .and_then(|()| file.write_all(owner.as_bytes()))
            .map_err(LockError::Io)?;
        Ok(DirLock::new(file))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
}

impl DiskFile for OsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        self.file.read_at(buf, at)
    }

    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        self.file.write_all_at(buf, at)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len)
            .map_err(io::Error::from)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn map(&self, len: usize, writable: bool) -> io::Result<Mapping> {
        Mapping::of_file(&self.file, len, writable)
    }

    fn next_data(&self, from: u64) -> io::Result<Option<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let start = match seek(&self.file, SeekFrom::Data(from)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let end = seek(&self.file, SeekFrom::Hole(start))?;
        Ok(Some((start, end)))
    }

    fn advise(&self, range: Range<u64>, advice: Advice) {
        let advice = match advice {
            Advice::WillNeed => rustix::fs::Advice::WillNeed,
            Advice::DontNeed => rustix::fs::Advice::DontNeed,
        };
        let _ = rustix::fs::fadvise(
            &self.file,
            range.start,
            std::num::NonZeroU64::new(range.end.saturating_sub(range.start)),
            advice,
        );
    }

    /// Through a second, `O_DIRECT` handle from one page-aligned buffer
    /// where the file system allows it (no page cache filled, almost no
    /// CPU), else through the page cache, whose pages are then let go.
    fn write_zeroes(&self, range: Range<u64>) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // An anonymous map is page-aligned and already zero.
        let zeros = memmap2::MmapMut::map_anon(ZERO_CHUNK_BYTES)?;
        let buffered = |from: u64, to: u64| -> io::Result<()> {
            let mut at = from;
            while at < to {
                let n = (to - at).min(ZERO_CHUNK_BYTES as u64) as usize;
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        };
        let first_page = range.start.div_ceil(PAGE_BYTES) * PAGE_BYTES;
        let last_page = range.end - range.end % PAGE_BYTES;
        let mut at = first_page.min(range.end);
        buffered(range.start, at)?;
        if first_page < last_page {
            let direct = File::options()
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&self.path);
            if let Ok(direct) = direct {
                while at < last_page {
                    let n = (last_page - at).min(ZERO_CHUNK_BYTES as u64) as usize;
                    if direct.write_all_at(&zeros[..n], at).is_err() {
                        break; // not supported after all: the page cache does the rest
                    }
                    at += n as u64;
                }
            }
        }
        buffered(at, range.end)?;
        self.file.sync_data()?;
        if at < range.end {
            self.advise(at..range.end, Advice::DontNeed);
        }
        Ok(())
    }
}
