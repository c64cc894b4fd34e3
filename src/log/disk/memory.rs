//! A disk in memory that can crash: the test backend of the log.
//!
//! Each file keeps two versions of its bytes:
//!
//! ```text
//!  written  what a reader sees now (the page cache): every write, set_len
//!           and allocate lands here
//!  durable  what a power cut leaves (the device): sync_data / sync_all
//!           copy written over it
//! ```
//!
//! and the directory tree keeps two versions of its names: the names as
//! they are now, and the names as a power cut leaves them. Creations,
//! renames and removals are queued in order; [`FileSystem::sync_dir`] of a
//! directory makes every queued change up to the last one in that
//! directory durable (an ordered metadata journal, as ext4 and XFS keep:
//! a later change never survives without the earlier ones). A rename is one
//! change, so a crash sees the old name or the new one, never neither.
//!
//! [`MemoryDisk::crash`] ends the "process" that used the disk: every file
//! handle and lock taken before it fails from then on, so the old log can
//! do no more harm, and a new one opens what the crash left:
//!
//! - [`Crash::Process`] (SIGKILL): the page cache survives; all written
//!   bytes and all names stay.
//! - [`Crash::PowerCut`]: only durable bytes and durable names stay.
//! - [`Crash::TornPowerCut`]: durable bytes and names, plus an arbitrary
//!   part of what was not synced: each 512-byte sector written since the
//!   last sync keeps its old bytes, its new bytes, or new bytes up to a
//!   random point and old ones after it (a torn write); a file's length is
//!   its old or its new one; a prefix of the queued name changes survives.
//!   Chosen by a seed, so a failure replays exactly.
//!
//! Space can be limited ([`MemoryDisk::set_space_bytes`]): a write or an
//! allocation that would pass it fails with "no space left on device", as
//! a full disk does. Maps are anonymous copies (see `disk/mod.rs`).
//! Segments in tests should be small: a file is a plain `Vec<u8>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DirLock, DiskFile, FileSystem, LockError, Mapping};
use crate::sync::lock;

const SECTOR_BYTES: usize = 512;
/// `ENOSPC`: what a full disk answers.
const NO_SPACE: i32 = 28;

/// What a crash leaves (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// The process is killed; the kernel's page cache survives.
    Process,
    /// The power is cut: only what was synced survives.
    PowerCut,
    /// The power is cut mid-write: what was synced, and an arbitrary
    /// (seeded) part of what was not, torn at any byte of a sector.
    TornPowerCut { seed: u64 },
}

/// A file system in memory that can crash. Clones share the disk.
#[derive(Clone, Default)]
pub struct MemoryDisk {
    state: Arc<Mutex<State>>,
}

#[derive(Clone, Default)]
struct State {
    /// Bumped by every crash: handles of an older generation are dead.
    generation: u64,
    next_inode: u64,
    inodes: HashMap<u64, Inode>,
    /// Keys are paths' bytes: compared as bytes, not component by component.
    names: BTreeMap<Key, u64>,
    durable_names: BTreeMap<Key, u64>,
    /// Name changes not yet durable, oldest first.
    pending: Vec<NameChange>,
    dirs: BTreeSet<Key>,
    /// Held locks, with the generation that took them.
    locks: HashMap<Key, u64>,
    space_bytes: Option<u64>,
}

#[derive(Clone, Default)]
struct Inode {
    written: Vec<u8>,
    durable: Vec<u8>,
    /// `[dirty.0, dirty.1)` holds every byte written since the last sync.
    dirty: Option<(usize, usize)>,
}

/// A path's bytes.
type Key = Vec<u8>;

fn key(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

fn path_of(key: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(key))
}

#[derive(Clone, Debug)]
enum NameChange {
    Set { path: Key, inode: u64 },
    Remove { path: Key },
    Rename { from: Key, to: Key, inode: u64 },
}

impl NameChange {
    fn touches(&self, dir: &Path) -> bool {
        let in_dir = |p: &Key| path_of(p).parent() == Some(dir);
        match self {
            NameChange::Set { path, .. } | NameChange::Remove { path } => in_dir(path),
            NameChange::Rename { from, to, .. } => in_dir(from) || in_dir(to),
        }
    }

    fn apply(&self, names: &mut BTreeMap<Key, u64>) {
        match self {
            NameChange::Set { path, inode } => {
                names.insert(path.clone(), *inode);
            }
            NameChange::Remove { path } => {
                names.remove(path);
            }
            NameChange::Rename { from, to, inode } => {
                names.remove(from);
                names.insert(to.clone(), *inode);
            }
        }
    }
}

impl Inode {
    fn touch(&mut self, from: usize, to: usize) {
        self.dirty = Some(match self.dirty {
            None => (from, to),
            Some((a, b)) => (a.min(from), b.max(to)),
        });
    }

    fn sync(&mut self) {
        if let Some((from, to)) = self.dirty.take() {
            self.durable.resize(self.written.len(), 0);
            let to = to.min(self.written.len());
            if from < to {
                self.durable[from..to].copy_from_slice(&self.written[from..to]);
            }
        }
        self.durable.truncate(self.written.len());
    }

    /// What a torn power cut leaves of this file.
    fn torn(&self, rng: &mut SplitMix) -> Vec<u8> {
        let mut out = self.durable.clone();
        let new_len = if rng.below(2) == 0 {
            self.durable.len()
        } else {
            self.written.len()
        };
        out.resize(new_len, 0);
        let Some((from, to)) = self.dirty else {
            return out;
        };
        let to = to.min(new_len);
        // The new bytes of `[a, b)`: what was written, zeros past its end.
        let take_new = |out: &mut Vec<u8>, a: usize, b: usize| {
            let written_end = b.min(self.written.len()).max(a);
            out[a..written_end].copy_from_slice(&self.written[a..written_end]);
            out[written_end..b].fill(0);
        };
        let mut sector = from - from % SECTOR_BYTES;
        while sector < to {
            let end = (sector + SECTOR_BYTES).min(to);
            match rng.below(3) {
                0 => {}
                1 => take_new(&mut out, sector, end),
                _ => {
                    let cut = sector + rng.below((end - sector) as u64 + 1) as usize;
                    take_new(&mut out, sector, cut);
                }
            }
            sector = end;
        }
        out
    }
}

/// A small deterministic generator for crash choices.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn crashed() -> io::Error {
    io::Error::other("the process that opened this file has crashed (MemoryDisk::crash)")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file in the memory disk", path.display()),
    )
}

impl State {
    fn used_bytes(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| i.written.len().max(i.durable.len()) as u64)
            .sum()
    }

    /// Fails with "no space" if growing a file by `grow` bytes passes the
    /// space limit.
    fn reserve(&self, grow: u64) -> io::Result<()> {
        match self.space_bytes {
            Some(space) if grow > 0 && self.used_bytes() + grow > space => {
                Err(io::Error::from_raw_os_error(NO_SPACE))
            }
            _ => Ok(()),
        }
    }

    fn check_parent(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !self.dirs.contains(key(dir)) => {
                Err(not_found(dir))
            }
            _ => Ok(()),
        }
    }

    fn new_file(&mut self, path: &Path) -> u64 {
        let inode = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(inode, Inode::default());
        self.names.insert(key(path).to_vec(), inode);
        self.pending.push(NameChange::Set {
            path: key(path).to_vec(),
            inode,
        });
        inode
    }

    /// Drops files no name reaches, now or after a power cut (at a crash:
    /// until then a removed file costs only memory).
    fn collect(&mut self) {
        let mut live: BTreeSet<u64> = self.names.values().copied().collect();
        live.extend(self.durable_names.values().copied());
        for change in &self.pending {
            if let NameChange::Set { inode, .. } | NameChange::Rename { inode, .. } = change {
                live.insert(*inode);
            }
        }
        self.inodes.retain(|inode, _| live.contains(inode));
    }
}

impl MemoryDisk {
    pub fn new() -> Self {
        MemoryDisk::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Ends the process that used the disk (see [`Crash`]): its handles and
    /// locks are dead from now on, and the disk holds what such a crash
    /// leaves.
    pub fn crash(&self, how: Crash) {
        let mut state = self.state();
        state.generation += 1;
        state.locks.clear();
        match how {
            Crash::Process => {}
            Crash::PowerCut => {
                state.pending.clear();
                state.names = state.durable_names.clone();
                for inode in state.inodes.values_mut() {
                    inode.written = inode.durable.clone();
                    inode.dirty = None;
                }
            }
            Crash::TornPowerCut { seed } => {
                let mut rng = SplitMix(seed);
                let kept = rng.below(state.pending.len() as u64 + 1) as usize;
                let mut names = state.durable_names.clone();
                for change in &state.pending[..kept] {
                    change.apply(&mut names);
                }
                state.pending.clear();
                state.names = names.clone();
                state.durable_names = names;
                let mut inodes: Vec<u64> = state.inodes.keys().copied().collect();
                inodes.sort_unstable();
                for id in inodes {
                    if let Some(inode) = state.inodes.get_mut(&id) {
                        let bytes = inode.torn(&mut rng);
                        inode.written = bytes.clone();
                        inode.durable = bytes;
                        inode.dirty = None;
                    }
                }
            }
        }
        state.collect();
    }

    /// An independent copy of the disk as it is now (for a test that
    /// starts many runs from one prepared state).
    pub fn fork(&self) -> MemoryDisk {
        let copy = self.state().clone();
        MemoryDisk {
            state: Arc::new(Mutex::new(copy)),
        }
    }

    /// Limits the bytes all files together may hold (`None`: no limit).
    pub fn set_space_bytes(&self, space: Option<u64>) {
        self.state().space_bytes = space;
    }

    /// Every file name, in order.
    pub fn file_names(&self) -> Vec<PathBuf> {
        self.state()
            .names
            .keys()
            .map(|k| path_of(k).to_path_buf())
            .collect()
    }

    /// A file's bytes as a reader sees them now.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state();
        let inode = state.names.get(key(path))?;
        state.inodes.get(inode).map(|i| i.written.clone())
    }

    /// Changes a file's bytes as damage on the device would: the change is
    /// both what is read now and what survives a crash.
    pub fn damage(&self, path: &Path, change: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let mut state = self.state();
        let inode = *state.names.get(key(path)).ok_or_else(|| not_found(path))?;
        let file = state
            .inodes
            .get_mut(&inode)
            .ok_or_else(|| not_found(path))?;
        file.sync();
        change(&mut file.written);
        file.durable = file.written.clone();
        Ok(())
    }
}

impl FileSystem for MemoryDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        for ancestor in dir.ancestors() {
            if !ancestor.as_os_str().is_empty() {
                state.dirs.insert(key(ancestor).to_vec());
            }
        }
        Ok(())
    }

    fn open(&self, path: &Path, write: bool) -> io::Result<Arc<dyn DiskFile>> {
        let state = self.state();
        let inode = *state.names.get(key(path)).ok_or_else(|| not_found(path))?;
        Ok(Arc::new(MemoryFile {
            state: Arc::clone(&self.state),
            inode,
            generation: state.generation,
            writable: write,
        }))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let mut state = self.state();
        state.check_parent(path)?;
        if state.names.contains_key(key(path)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let inode = state.new_file(path);
        Ok(Arc::new(MemoryFile {
            state: Arc::clone(&self.state),
            inode,
            generation: state.generation,
            writable: true,
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let mut state = self.state();
        state.check_parent(path)?;
        let inode = match state.names.get(key(path)).copied() {
            Some(inode) => {
                if let Some(file) = state.inodes.get_mut(&inode) {
                    let len = file.written.len();
                    file.touch(0, len);
                    file.written.clear();
                }
                inode
            }
            None => state.new_file(path),
        };
        Ok(Arc::new(MemoryFile {
            state: Arc::clone(&self.state),
            inode,
            generation: state.generation,
            writable: true,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.check_parent(to)?;
        let inode = state
            .names
            .remove(key(from))
            .ok_or_else(|| not_found(from))?;
        state.names.insert(key(to).to_vec(), inode);
        state.pending.push(NameChange::Rename {
            from: key(from).to_vec(),
            to: key(to).to_vec(),
            inode,
        });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state
            .names
            .remove(key(path))
            .ok_or_else(|| not_found(path))?;
        state.pending.push(NameChange::Remove {
            path: key(path).to_vec(),
        });
        state.collect();
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.state();
        state.names.contains_key(key(path)) || state.dirs.contains(key(path))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let state = self.state();
        if !state.dirs.contains(key(dir)) {
            return Err(not_found(dir));
        }
        let files = state.names.keys().map(|k| path_of(k));
        let dirs = state.dirs.iter().map(|k| path_of(k));
        Ok(files
            .chain(dirs)
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(OsString::from))
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        if !state.dirs.contains(key(dir)) {
            return Err(not_found(dir));
        }
        if let Some(last) = state.pending.iter().rposition(|c| c.touches(dir)) {
            let done: Vec<NameChange> = state.pending.drain(..=last).collect();
            for change in &done {
                change.apply(&mut state.durable_names);
            }
        }
        Ok(())
    }

    fn sync_filesystem(&self, _dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        let pending = std::mem::take(&mut state.pending);
        for change in &pending {
            change.apply(&mut state.durable_names);
        }
        for inode in state.inodes.values_mut() {
            inode.sync();
        }
        Ok(())
    }

    fn lock(&self, path: &Path, owner: &str) -> Result<DirLock, LockError> {
        let mut state = self.state();
        let generation = state.generation;
        if state.locks.get(key(path)) == Some(&generation) {
            let holder = state
                .names
                .get(key(path))
                .and_then(|i| state.inodes.get(i))
                .map(|i| String::from_utf8_lossy(&i.written).into_owned())
                .unwrap_or_default();
            return Err(LockError::Held { holder });
        }
        state.check_parent(path).map_err(LockError::Io)?;
        let inode = match state.names.get(key(path)).copied() {
            Some(inode) => inode,
            None => state.new_file(path),
        };
        if let Some(file) = state.inodes.get_mut(&inode) {
            file.written = owner.as_bytes().to_vec();
            let len = file.written.len();
            file.touch(0, len);
        }
        state.locks.insert(key(path).to_vec(), generation);
        Ok(DirLock::new(MemoryLock {
            state: Arc::clone(&self.state),
            path: key(path).to_vec(),
            generation,
        }))
    }
}

struct MemoryLock {
    state: Arc<Mutex<State>>,
    path: Key,
    generation: u64,
}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if state.locks.get(&self.path) == Some(&self.generation) {
            state.locks.remove(&self.path);
        }
    }
}

struct MemoryFile {
    state: Arc<Mutex<State>>,
    inode: u64,
    generation: u64,
    writable: bool,
}

impl MemoryFile {
    /// Runs `f` on the file, if its process has not crashed and the file
    /// still exists.
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut state = lock(&self.state);
        if state.generation != self.generation {
            return Err(crashed());
        }
        if !state.inodes.contains_key(&self.inode) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the file was removed",
            ));
        }
        f(&mut state, self.inode)
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file opened read-only",
            ))
        }
    }

    /// Grows the file to `len` with zeros, within the space limit.
    fn grow(state: &mut State, inode: u64, len: usize) -> io::Result<()> {
        let current = state.inodes.get(&inode).map_or(0, |i| i.written.len());
        if len > current {
            state.reserve((len - current) as u64)?;
            if let Some(file) = state.inodes.get_mut(&inode) {
                file.written.resize(len, 0);
                file.touch(current, len);
            }
        }
        Ok(())
    }
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too large"))
}

impl DiskFile for MemoryFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|state, inode| Ok(state.inodes.get(&inode).map_or(0, |i| i.written.len()) as u64))
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        self.with(|state, inode| {
            let Some(file) = state.inodes.get(&inode) else {
                return Ok(0);
            };
            let at = to_usize(at)?;
            let Some(src) = file.written.get(at..) else {
                return Ok(0);
            };
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|state, inode| {
            let at = to_usize(at)?;
            let end = at + buf.len();
            Self::grow(state, inode, end)?;
            if let Some(file) = state.inodes.get_mut(&inode) {
                file.written[at..end].copy_from_slice(buf);
                file.touch(at, end);
            }
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|state, inode| {
            let len = to_usize(len)?;
            Self::grow(state, inode, len)?;
            if let Some(file) = state.inodes.get_mut(&inode) {
                let old = file.written.len();
                file.written.truncate(len);
                file.touch(len.min(old), old.max(len));
            }
            Ok(())
        })
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|state, inode| Self::grow(state, inode, to_usize(len)?))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|state, inode| {
            if let Some(file) = state.inodes.get_mut(&inode) {
                file.sync();
            }
            Ok(())
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn map(&self, len: usize, writable: bool) -> io::Result<Mapping> {
        let _ = writable; // a copy is always writable; the log mirrors into it
        self.with(|state, inode| {
            let bytes = state.inodes.get(&inode).map_or(&[][..], |i| &i.written[..]);
            Mapping::copy_of(&bytes[..bytes.len().min(len)], len)
        })
    }

    fn next_data(&self, from: u64) -> io::Result<Option<(u64, u64)>> {
        // No holes: all of the file may hold data.
        let len = self.size()?;
        Ok((from < len).then_some((from, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (MemoryDisk, PathBuf) {
        let disk = MemoryDisk::new();
        let dir = PathBuf::from("/d");
        disk.create_dir_all(&dir).unwrap();
        (disk, dir)
    }

    #[test]
    fn a_power_cut_keeps_only_synced_bytes_and_names() {
        let (disk, dir) = setup();
        let a = dir.join("a");
        let f = disk.create_new(&a).unwrap();
        f.write_all_at(b"durable", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b" and not", 7).unwrap();
        disk.create_new(&dir.join("b")).unwrap();
        // `a`'s name is not durable yet: a cut loses the whole file.
        disk.crash(Crash::PowerCut);
        assert!(disk.file_names().is_empty());
        assert!(f.size().is_err(), "a handle from before the crash is dead");

        let f = disk.create_new(&a).unwrap();
        f.write_all_at(b"durable", 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(&dir).unwrap();
        f.write_all_at(b" and not", 7).unwrap();
        assert_eq!(disk.contents(&a).unwrap(), b"durable and not");
        disk.crash(Crash::PowerCut);
        assert_eq!(disk.contents(&a).unwrap(), b"durable");
    }

    #[test]
    fn a_process_crash_keeps_everything_written() {
        let (disk, dir) = setup();
        let f = disk.create_new(&dir.join("a")).unwrap();
        f.write_all_at(b"page cache", 0).unwrap();
        let held = disk.lock(&dir.join("LOCK"), "me").unwrap();
        disk.crash(Crash::Process);
        assert_eq!(disk.contents(&dir.join("a")).unwrap(), b"page cache");
        // The dead process's lock is gone; dropping its guard late changes
        // nothing for the new holder.
        let _new = disk.lock(&dir.join("LOCK"), "you").unwrap();
        drop(held);
        assert!(matches!(
            disk.lock(&dir.join("LOCK"), "third"),
            Err(LockError::Held { .. })
        ));
    }

    #[test]
    fn a_rename_survives_whole_or_not_at_all_and_in_order() {
        for seed in 0..64 {
            let (disk, dir) = setup();
            let tmp = dir.join("x.tmp");
            let f = disk.create_new(&tmp).unwrap();
            f.write_all_at(b"x", 0).unwrap();
            f.sync_all().unwrap();
            disk.sync_dir(&dir).unwrap();
            disk.rename(&tmp, &dir.join("x")).unwrap();
            disk.create_new(&dir.join("later")).unwrap();
            disk.crash(Crash::TornPowerCut { seed });
            let names = disk.file_names();
            assert_eq!(
                names.len(),
                1 + usize::from(names.contains(&dir.join("later")))
            );
            if names.contains(&dir.join("later")) {
                assert!(
                    names.contains(&dir.join("x")),
                    "a later change kept without an earlier one"
                );
            }
        }
    }

    #[test]
    fn a_torn_cut_keeps_synced_bytes_and_mixes_only_unsynced_sectors() {
        let mut saw = BTreeSet::new();
        for seed in 0..64 {
            let (disk, dir) = setup();
            let path = dir.join("f");
            let f = disk.create_new(&path).unwrap();
            disk.sync_dir(&dir).unwrap();
            f.write_all_at(&[1u8; 2048], 0).unwrap();
            f.sync_data().unwrap();
            f.write_all_at(&[2u8; 2048], 1024).unwrap();
            disk.crash(Crash::TornPowerCut { seed });
            let bytes = disk.contents(&path).unwrap();
            assert!(bytes.len() == 2048 || bytes.len() == 3072);
            assert!(
                bytes[..1024].iter().all(|&b| b == 1),
                "synced bytes changed"
            );
            assert!(bytes[1024..].iter().all(|&b| b == 1 || b == 2 || b == 0));
            saw.insert(bytes);
        }
        assert!(saw.len() > 8, "the seeds should give many different tears");
    }

    #[test]
    fn space_runs_out_like_a_full_disk() {
        let (disk, dir) = setup();
        disk.set_space_bytes(Some(100));
        let f = disk.create_new(&dir.join("f")).unwrap();
        f.write_all_at(&[0u8; 60], 0).unwrap();
        let err = f.allocate(200).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(NO_SPACE));
        f.write_all_at(&[0u8; 40], 60).unwrap();
        assert_eq!(
            f.write_all_at(&[0u8; 1], 100).unwrap_err().raw_os_error(),
            Some(NO_SPACE)
        );
    }
}
