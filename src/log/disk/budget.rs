//! A budget of open files over another disk: a broker with ten thousand
//! partitions keeps at most `open_files_max` descriptors for them.
//!
//! Every file opened through a [`FileBudget`] is a handle that may be
//! closed behind its owner's back and opened again, by its path, at its
//! next use. When more than the budget are open, the least recently used
//! handle is closed, but only one whose writes are all synced: Linux
//! reports a failed writeback to the descriptors open when it happened, so
//! closing a file with unsynced bytes and syncing a new descriptor later
//! could miss the error and call lost data durable. Dirty files are synced
//! soon (each flush), so the budget is only ever passed for a moment, by
//! files in use or not yet synced. Maps outlive their descriptor: an idle
//! segment keeps its map and costs no descriptor.

use std::ffi::OsString;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{Advice, DirLock, Disk, DiskFile, FileSystem, LockError, Mapping};
use crate::sync::lock;

/// A [`FileSystem`] that keeps at most a budget of files open (see the
/// module docs). Clones share the budget.
#[derive(Clone)]
pub struct FileBudget {
    inner: Disk,
    shared: Arc<Shared>,
}

struct Shared {
    max: usize,
    /// Handles whose file is open now, in no order (and handles dropped
    /// since, forgotten at the next look).
    open: Mutex<Vec<Weak<Handle>>>,
    clock: AtomicU64,
}

/// One file: open now or not.
struct Handle {
    me: Weak<Handle>,
    inner: Disk,
    path: PathBuf,
    writable: bool,
    shared: Arc<Shared>,
    file: Mutex<Option<Arc<dyn DiskFile>>>,
    /// Writes begun, and of them the ones a sync covered: a file written
    /// since its last sync (`writes > synced`) is never closed.
    writes: AtomicU64,
    synced: AtomicU64,
    last_used: AtomicU64,
}

impl FileBudget {
    /// Files of `inner`, at most `max` open at once (at least one).
    pub fn new(inner: Disk, max: usize) -> Self {
        FileBudget {
            inner,
            shared: Arc::new(Shared {
                max: max.max(1),
                open: Mutex::new(Vec::new()),
                clock: AtomicU64::new(0),
            }),
        }
    }

    /// Files open now through the budget.
    pub fn open_files(&self) -> usize {
        let mut open = lock(&self.shared.open);
        open.retain(|w| w.strong_count() > 0);
        open.len()
    }

    /// The most files the budget keeps open.
    pub fn max(&self) -> usize {
        self.shared.max
    }

    fn wrap(&self, path: &Path, writable: bool, file: Arc<dyn DiskFile>) -> Arc<dyn DiskFile> {
        let handle = Arc::new_cyclic(|me| Handle {
            me: me.clone(),
            inner: self.inner.clone(),
            path: path.to_path_buf(),
            writable,
            shared: Arc::clone(&self.shared),
            file: Mutex::new(Some(file)),
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            last_used: AtomicU64::new(self.shared.tick()),
        });
        self.shared.opened(&handle.me);
        handle
    }
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Records `handle` as open and closes the least recently used clean
    /// files while more than the budget are open.
    fn opened(&self, handle: &Weak<Handle>) {
        let mut open = lock(&self.open);
        open.push(handle.clone());
        if open.len() <= self.max {
            return;
        }
        open.retain(|w| w.strong_count() > 0);
        // Down to seven eighths of the budget, so the scan below runs once
        // per eighth of it opened, not at every open past it.
        let mut excess = open.len().saturating_sub(self.max - self.max / 8);
        if open.len() <= self.max || excess == 0 {
            return;
        }
        let mut by_age: Vec<(u64, Arc<Handle>)> = open
            .iter()
            .filter(|w| !w.ptr_eq(handle))
            .filter_map(Weak::upgrade)
            .map(|h| (h.last_used.load(Ordering::Relaxed), h))
            .collect();
        by_age.sort_unstable_by_key(|(age, _)| *age);
        let mut closed = Vec::new();
        for (_, victim) in by_age {
            if excess == 0 {
                break;
            }
            if victim.try_close() {
                closed.push(Arc::downgrade(&victim));
                excess -= 1;
            }
        }
        open.retain(|w| !closed.iter().any(|c| c.ptr_eq(w)));
    }
}

impl Handle {
    /// The open file, opened again (by its path) if the budget closed it.
    fn file(&self) -> io::Result<Arc<dyn DiskFile>> {
        self.last_used.store(self.shared.tick(), Ordering::Relaxed);
        let mut slot = lock(&self.file);
        if let Some(file) = &*slot {
            return Ok(Arc::clone(file));
        }
        let file = self.inner.open(&self.path, self.writable)?;
        *slot = Some(Arc::clone(&file));
        drop(slot);
        self.shared.opened(&self.me);
        Ok(file)
    }

    /// Closes the file if it is clean and no other thread is looking it
    /// up this moment. A user holding the file keeps it open until done.
    fn try_close(&self) -> bool {
        if self.dirty() {
            return false;
        }
        let Ok(mut slot) = self.file.try_lock() else {
            return false;
        };
        if self.dirty() {
            return false;
        }
        slot.take().is_some()
    }

    fn dirty(&self) -> bool {
        self.writes.load(Ordering::Acquire) > self.synced.load(Ordering::Acquire)
    }

    /// Runs `op` on the open file.
    fn with<T>(&self, op: impl FnOnce(&dyn DiskFile) -> io::Result<T>) -> io::Result<T> {
        let file = self.file()?;
        op(&*file)
    }

    /// Runs a write: the file is dirty from before it starts.
    fn write<T>(&self, op: impl FnOnce(&dyn DiskFile) -> io::Result<T>) -> io::Result<T> {
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.with(op)
    }

    /// Runs a sync: the writes begun before it are covered once it
    /// succeeds (one racing with it stays uncovered).
    fn sync(&self, op: impl FnOnce(&dyn DiskFile) -> io::Result<()>) -> io::Result<()> {
        let covered = self.writes.load(Ordering::Acquire);
        self.with(op)?;
        self.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }
}

impl FileSystem for FileBudget {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Arc<dyn DiskFile>> {
        let file = self.inner.open(path, write)?;
        Ok(self.wrap(path, write, file))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = self.inner.create_new(path)?;
        Ok(self.wrap(path, true, file))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = self.inner.create(path)?;
        Ok(self.wrap(path, true, file))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        self.inner.list(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }

    fn lock(&self, path: &Path, owner: &str) -> Result<DirLock, LockError> {
        self.inner.lock(path, owner)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }

    /// Files it closed were clean, so the inner file system's sync covers
    /// every dirty one. The caller tells each file what the sync covered
    /// (`DiskFile::covered_by_sync`).
    fn sync_filesystem(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_filesystem(dir)
    }

    fn filesystem_id(&self, dir: &Path) -> u64 {
        self.inner.filesystem_id(dir)
    }
}

impl DiskFile for Handle {
    fn size(&self) -> io::Result<u64> {
        self.with(|f| f.size())
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        self.with(|f| f.read_at(buf, at))
    }

    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        self.write(|f| f.write_all_at(buf, at))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.write(|f| f.set_len(len))
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.write(|f| f.allocate(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync(|f| f.sync_data())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync(|f| f.sync_all())
    }

    fn map(&self, len: usize, writable: bool) -> io::Result<Mapping> {
        self.with(|f| f.map(len, writable))
    }

    fn next_data(&self, from: u64) -> io::Result<Option<(u64, u64)>> {
        self.with(|f| f.next_data(from))
    }

    fn advise(&self, range: Range<u64>, advice: Advice) {
        let _ = self.with(|f| {
            f.advise(range, advice);
            Ok(())
        });
    }

    fn write_zeroes(&self, range: Range<u64>) -> io::Result<()> {
        // Writes and syncs what it wrote.
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.sync(|f| f.write_zeroes(range))
    }

    fn writes_begun(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    fn covered_by_sync(&self, writes: u64) {
        self.synced.fetch_max(writes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::disk::MemoryDisk;

    #[test]
    fn only_clean_files_are_closed_and_closed_ones_reopen_on_use() {
        let memory = MemoryDisk::new();
        let dir = PathBuf::from("/d");
        memory.create_dir_all(&dir).unwrap();
        let budget = FileBudget::new(Disk::new(memory.clone()), 2);
        let files: Vec<Arc<dyn DiskFile>> = (0..4)
            .map(|i| budget.create_new(&dir.join(format!("f{i}"))).unwrap())
            .collect();
        // Nothing written yet: the budget closed the two oldest.
        assert_eq!(budget.open_files(), 2);
        for (i, f) in files.iter().enumerate() {
            f.write_all_at(format!("file {i}").as_bytes(), 0).unwrap();
        }
        // Dirty files are never closed: the budget is passed for now.
        assert_eq!(budget.open_files(), 4);
        for f in &files {
            f.sync_data().unwrap();
        }
        let fifth = budget.create_new(&dir.join("f4")).unwrap();
        assert!(budget.open_files() <= 2, "clean files were closed");
        for (i, f) in files.iter().enumerate() {
            let mut back = vec![0u8; 6];
            f.read_at(&mut back, 0).unwrap();
            assert_eq!(back, format!("file {i}").as_bytes(), "reopened by path");
        }
        drop(fifth);
        assert!(budget.open_files() <= 3);
    }
}
