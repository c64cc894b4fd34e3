//! A segment file mapped into memory: the one module with `unsafe`.
//!
//! ```text
//!  0                      published               cursor            capacity
//!  +----------------------+-----------------------+-----------------+
//!  | immutable, readable  | being written by the  | unwritten       |
//!  | by any thread        | one MapWriter         | (zeros)         |
//!  +----------------------+-----------------------+-----------------+
//! ```
//!
//! The invariant every `unsafe` block below leans on: **bytes below
//! `published` are never written again, and the mapping is never unmapped,
//! remapped or shrunk below `published` while a reader can reach it.**
//! - Only a [`MapWriter`] writes, there is at most one per map (it is created
//!   with the map and is not `Clone`), and it only writes at or beyond
//!   `published`, which it alone advances.
//! - Readers get slices of `[0, published)` borrowed from an `Arc` of the map,
//!   or `Bytes` that own such an `Arc`, so the mapping outlives them.
//! - Sealing truncates the file to exactly `published` bytes; nothing reads or
//!   writes beyond that afterwards, so no access can touch a page past EOF.
//! - Another bida process cannot open the directory (the log holds an
//!   exclusive lock on it). Other programs writing the files under a live log
//!   are outside what any mmap-based store can defend against.
//!
//! It also holds [`prefetch`], the one other memory hint the engine uses.

// The one module allowed `unsafe`: mapping a file and reading and writing
// through the mapping cannot be expressed in safe Rust. Every block says
// why it is sound (`// SAFETY:`).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw, UncheckedAdvice};

use super::disk::DiskFile;

/// Asks the CPU to start loading the cache line holding `value`. A hint
/// only: it cannot fault or change memory, so it is safe for any reference.
/// The dedup window uses it to overlap the cache misses of a batch.
#[inline]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has; a
    // prefetch of any address never faults and has no visible effect.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const T).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// A mapping of a file, as [`DiskFile::map`](super::disk::DiskFile::map)
/// makes it: of the file itself (`coherent`: writes through the map reach
/// the file and writes to the file show in the map), or an anonymous copy
/// of its bytes (a file in memory, tests only), which the writer must keep
/// in step with the file itself.
pub struct Mapping {
    /// `None` for a zero-length map, which cannot be made.
    raw: Option<MmapRaw>,
    len: usize,
    coherent: bool,
}

impl Mapping {
    /// Maps `[0, len)` of `file`, read-write if `writable`.
    pub fn of_file(file: &File, len: usize, writable: bool) -> io::Result<Mapping> {
        let raw = match (len, writable) {
            (0, _) => None,
            (_, false) => Some(MmapOptions::new().len(len).map_raw_read_only(file)?),
            (_, true) => Some(MmapOptions::new().len(len).map_raw(file)?),
        };
        Ok(Mapping {
            raw,
            len,
            coherent: true,
        })
    }

    /// An anonymous map of `len` bytes starting with a copy of `bytes`
    /// (the rest zeros).
    pub fn copy_of(bytes: &[u8], len: usize) -> io::Result<Mapping> {
        assert!(bytes.len() <= len, "copy larger than the map");
        let raw = if len == 0 {
            None
        } else {
            let mut map = memmap2::MmapMut::map_anon(len)?;
            map[..bytes.len()].copy_from_slice(bytes);
            Some(MmapRaw::from(map))
        };
        Ok(Mapping {
            raw,
            len,
            coherent: false,
        })
    }
}

/// A mapped segment file.
pub(crate) struct SegmentMap {
    /// `None` for a zero-length file, which cannot be mapped.
    raw: Option<MmapRaw>,
    capacity: usize,
    /// False for an anonymous copy of the file (see [`Mapping`]): its
    /// pages are never dropped (that would zero them), and the writer
    /// writes through the file and mirrors into it.
    coherent: bool,
    /// End of the immutable, readable prefix. Advanced with `Release` by the
    /// writer after the bytes are in place; read with `Acquire`.
    published: AtomicUsize,
}

/// The single writer of a [`SegmentMap`].
pub(crate) struct MapWriter {
    map: Arc<SegmentMap>,
    cursor: usize,
    sink: Sink,
}

/// How appended bytes reach the file.
enum Sink {
    /// Copied into the shared mapping.
    Map,
    /// Staged in memory and written with one `write_all_at` per publish;
    /// the mapping (coherent with the page cache) is only read. With
    /// `mirror` the mapping is a copy, and published bytes are copied into
    /// it too.
    File {
        file: Arc<dyn DiskFile>,
        staged: Vec<u8>,
        mirror: bool,
    },
}

impl SegmentMap {
    /// Maps `file` for appending; `published` bytes are already valid, and
    /// the returned writer continues after them. With `write_file`, or when
    /// the file's map is a copy, the writer writes through the file and the
    /// map is only read; otherwise it copies into a read-write map.
    pub(crate) fn open_append(
        file: &Arc<dyn DiskFile>,
        capacity: usize,
        published: usize,
        write_file: bool,
    ) -> io::Result<(Arc<SegmentMap>, MapWriter)> {
        assert!(published <= capacity, "published beyond capacity");
        let mapping = file.map(capacity, !write_file)?;
        debug_assert_eq!(mapping.len, capacity);
        let sink = if write_file || !mapping.coherent {
            Sink::File {
                file: Arc::clone(file),
                staged: Vec::new(),
                mirror: !mapping.coherent,
            }
        } else {
            Sink::Map
        };
        let map = Arc::new(SegmentMap {
            raw: mapping.raw,
            capacity,
            coherent: mapping.coherent,
            published: AtomicUsize::new(published),
        });
        let writer = MapWriter {
            map: Arc::clone(&map),
            cursor: published,
            sink,
        };
        Ok((map, writer))
    }

    /// Maps a sealed segment read-only; all `len` bytes are published.
    pub(crate) fn open_sealed(file: &dyn DiskFile, len: usize) -> io::Result<Arc<SegmentMap>> {
        let mapping = file.map(len, false)?;
        Ok(Arc::new(SegmentMap {
            raw: mapping.raw,
            capacity: len,
            coherent: mapping.coherent,
            published: AtomicUsize::new(len),
        }))
    }

    /// False for an anonymous copy (see [`Mapping`]).
    pub(crate) fn is_coherent(&self) -> bool {
        self.coherent
    }

    pub(crate) fn published(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The immutable prefix `[0, published)`.
    pub(crate) fn bytes(&self) -> &[u8] {
        let len = self.published();
        match &self.raw {
            None => &[],
            // SAFETY: `[0, len)` lies inside the mapping (`published <=
            // capacity`), is never written again once published (the module
            // invariant), and the mapping lives as long as `&self`.
            Some(raw) => unsafe { std::slice::from_raw_parts(raw.as_ptr(), len) },
        }
    }

    /// A zero-copy view of `range` of the immutable prefix, keeping the map
    /// alive for as long as the view lives.
    pub(crate) fn view(self: &Arc<Self>, range: Range<usize>) -> Option<Bytes> {
        if range.start > range.end || range.end > self.published() {
            return None;
        }
        Some(Bytes::from_owner(MapView {
            map: Arc::clone(self),
            range,
        }))
    }

    /// Makes `range` durable (msync with `MS_SYNC`).
    pub(crate) fn flush_range(&self, range: Range<usize>) -> io::Result<()> {
        match &self.raw {
            Some(raw) if self.coherent && range.start < range.end => {
                raw.flush_range(range.start, range.end - range.start)
            }
            _ => Ok(()),
        }
    }

    /// Faults `range` in writable ahead of the writer, so appends do not
    /// take a page fault (and a zero-fill) per page. Contents are unchanged.
    /// Fails with `EINVAL` on kernels older than 5.14.
    pub(crate) fn populate_for_write(&self, range: Range<usize>) -> io::Result<()> {
        match &self.raw {
            Some(raw) if self.coherent && range.start < range.end && range.end <= self.capacity => {
                raw.advise_range(
                    memmap2::Advice::PopulateWrite,
                    range.start,
                    range.end - range.start,
                )
            }
            _ => Ok(()),
        }
    }

    /// Drops this process's page mappings for `range`, so the kernel can
    /// reclaim the (already durable) pages; the file keeps the bytes and a
    /// later read faults them back in.
    pub(crate) fn release_pages(&self, range: Range<usize>) -> io::Result<()> {
        let Some(raw) = &self.raw else { return Ok(()) };
        if !self.coherent || range.start >= range.end || range.end > self.published() {
            return Ok(());
        }
        // SAFETY: MADV_DONTNEED on a shared file mapping only drops page
        // table entries; the contents stay in the page cache or the file, so
        // every live slice keeps reading the same bytes. The range is inside
        // the published, already flushed prefix.
        unsafe {
            raw.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                range.start,
                range.end - range.start,
            )
        }
    }
}

/// The owner behind a `Bytes` view of a map.
struct MapView {
    map: Arc<SegmentMap>,
    range: Range<usize>,
}

impl AsRef<[u8]> for MapView {
    fn as_ref(&self) -> &[u8] {
        // `view` checked the range against `published`, which only grows.
        &self.map.bytes()[self.range.clone()]
    }
}

impl MapWriter {
    /// Where the next byte goes.
    pub(crate) fn cursor(&self) -> usize {
        self.cursor
    }

    pub(crate) fn remaining(&self) -> usize {
        self.map.capacity - self.cursor
    }

    /// Appends `src` at the cursor and advances it (readable after
    /// `publish`). The caller checks room first; running past the end is a
    /// bug, so it panics.
    pub(crate) fn write(&mut self, src: &[u8]) {
        let at = self.cursor;
        assert!(
            at + src.len() <= self.map.capacity,
            "write past the end of the segment"
        );
        match &mut self.sink {
            Sink::Map => self.write_at(at, src),
            Sink::File { staged, .. } => staged.extend_from_slice(src),
        }
        self.cursor += src.len();
    }

    /// Writes zeros over `[cursor, end)` without moving the cursor: recovery
    /// clears a torn tail so later scans stop where appends resume.
    pub(crate) fn zero_to(&mut self, end: usize) -> io::Result<()> {
        let end = end.min(self.map.capacity);
        let mut at = self.cursor;
        const ZEROS: [u8; 4096] = [0; 4096];
        while at < end {
            let n = (end - at).min(ZEROS.len());
            match &self.sink {
                Sink::Map => self.write_at(at, &ZEROS[..n]),
                Sink::File { file, mirror, .. } => {
                    file.write_all_at(&ZEROS[..n], at as u64)?;
                    if *mirror {
                        self.write_at(at, &ZEROS[..n]);
                    }
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Makes everything written so far readable. Under the file sink this is
    /// where the staged bytes are written; if that fails they are dropped
    /// and the cursor goes back to the published end.
    pub(crate) fn publish(&mut self) -> io::Result<()> {
        let published = self.map.published.load(Ordering::Relaxed);
        if let Sink::File {
            file,
            staged,
            mirror,
        } = &mut self.sink
        {
            if !staged.is_empty() {
                let written = file.write_all_at(staged, published as u64);
                if let Err(e) = written {
                    staged.clear();
                    self.cursor = published;
                    return Err(e);
                }
                if *mirror {
                    let staged = std::mem::take(staged);
                    self.write_at(published, &staged);
                    if let Sink::File { staged: room, .. } = &mut self.sink {
                        *room = staged;
                        room.clear();
                    }
                } else {
                    staged.clear();
                }
            }
        }
        self.map.published.store(self.cursor, Ordering::Release);
        Ok(())
    }

    fn write_at(&mut self, at: usize, src: &[u8]) {
        let published = self.map.published.load(Ordering::Relaxed);
        assert!(at >= published, "write below the published prefix");
        assert!(
            at + src.len() <= self.map.capacity,
            "write past the end of the segment"
        );
        let Some(raw) = &self.map.raw else {
            assert!(src.is_empty(), "write into an empty map");
            return;
        };
        // SAFETY: `[at, at + len)` is inside the mapping (checked above) and
        // at or beyond `published`, so no reader holds a slice of it; this
        // writer is the only one (`&mut self`, one writer per map), so no
        // other write races with this copy. `src` cannot overlap the target:
        // callers never hand out slices of the unpublished region.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), raw.as_mut_ptr().add(at), src.len());
        }
    }
}

/// The log encodes records straight into the writer
/// (`record::encode`).
impl super::record::RecordSink for MapWriter {
    fn put(&mut self, bytes: &[u8]) {
        self.write(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::disk::{FileSystem, MemoryDisk, OsDisk};

    /// A 4 KiB file on the OS disk and on a memory disk.
    fn files(dir: &tempfile::TempDir) -> Vec<Arc<dyn DiskFile>> {
        let memory = MemoryDisk::new();
        memory.create_dir_all(dir.path()).unwrap();
        [&OsDisk as &dyn FileSystem, &memory]
            .into_iter()
            .map(|disk| {
                let file = disk.create(&dir.path().join("m")).unwrap();
                file.set_len(4096).unwrap();
                file
            })
            .collect()
    }

    #[test]
    fn readers_see_only_published_bytes() {
        for write_file in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            for file in files(&dir) {
                let (map, mut writer) =
                    SegmentMap::open_append(&file, 4096, 0, write_file).unwrap();
                writer.write(b"hello");
                assert_eq!(map.bytes(), b"");
                assert!(map.view(0..5).is_none());
                writer.publish().unwrap();
                assert_eq!(map.bytes(), b"hello", "write_file {write_file}");
                writer.write(b" world");
                writer.publish().unwrap();
                assert_eq!(map.bytes(), b"hello world", "write_file {write_file}");
                let mut back = [0u8; 11];
                assert_eq!(file.read_at(&mut back, 0).unwrap(), 11);
                assert_eq!(&back, b"hello world", "the file has what the map shows");
                let view = map.view(1..4).unwrap();
                drop(writer);
                drop(map);
                assert_eq!(&view[..], b"ell", "a view keeps the mapping alive");
            }
        }
    }

    #[test]
    #[should_panic(expected = "past the end of the segment")]
    fn writes_cannot_run_past_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let file = files(&dir).remove(0);
        let (_map, mut writer) = SegmentMap::open_append(&file, 4096, 4090, true).unwrap();
        writer.write(b"0123456789");
    }
}
