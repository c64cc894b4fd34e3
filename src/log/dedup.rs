//! The window of recently appended inner-msg-ids, so a retried send stores
//! nothing new.
//!
//! ```text
//!  ring (by offset, 16 B per record, in chunks of up to 128 KiB, each grown as it fills)
//!   start                                                      end
//!   | id | id | 0 | id | ... ........................ | id | id |
//!
//!  generation "current"  { blocked bloom | table of u32 slots }  <- inserts
//!  generation "previous" { blocked bloom | table of u32 slots }  (read only)
//! ```
//!
//! - The ring holds the id of every record in the window `[start, end)`; a
//!   record without an id holds 0. The offset is the position in the ring,
//!   so it costs nothing to store.
//! - A table slot holds the low 31 bits of an offset, plus one (0 = empty);
//!   the full offset is recovered from the ring's end, since the window spans
//!   fewer than 2^31 offsets. A candidate counts only if the ring still holds
//!   that offset and the same id there, so stale slots are harmless and
//!   nothing is ever deleted from a table.
//! - Inserts go to the current generation. When it holds `records_max` ids it
//!   becomes the previous one and the old previous is dropped: together they
//!   always cover every id in the ring.
//! - The bloom filter (one 64-byte block per id, 8 bits per table slot) sits
//!   in front of each table, so a miss, the common case, is usually decided
//!   by two cache lines without probing.
//! - Tables double as they fill up to 16 Ki slots, then jump to their final
//!   size of exactly `records_max / 0.75` slots (positions come from a
//!   multiply-shift, not a mask, so any size works): a full generation sits
//!   at load 0.75. A quiet log keeps small tables; a busy one pays one
//!   rebuild of at most ~12 K ids into tables prepared in advance (below)
//!   instead of doubling rebuilds of up to half the window, which stalled
//!   appends for tens of milliseconds (sync p99 ack latency 25-42 ms at
//!   half load).
//!
//! - A busy log keeps one more set of full-size tables as a spare, prepared
//!   by the log's background thread (`take_spare_work`), so the jump to full
//!   size and the drop of an old generation (megabytes to fault in or unmap)
//!   never happen on the append path. Only the first jump of a log's life,
//!   before any spare exists, pays it (~6 ms on the development VM).
//!
//! Memory per id at a full window, measured by `bytes_used` in the tests and
//! the dedup bench: 16 (ring) + 2 generations x (4 + 1) / 0.75 = 29.3 bytes
//! at most (both generations full); 22-23 bytes with the current generation
//! half full; plus one spare set of tables (6.7 bytes per id of the window)
//! on a busy log.
//!
//! **Many windows, one budget.** The windows of a broker's partitions can
//! share a [`DedupBudget`]: each holds at most its fair share of the
//! budget's ids (`bytes_max / BYTES_PER_ID`, split evenly among the windows
//! that hold any id, never less than `SHARE_IDS_MIN`), so a broker's dedup
//! memory is bounded whatever its number of busy partitions, and one busy
//! partition among idle ones gets its whole configured window. A window
//! that empties (every id older than its age) lets its tables go and
//! stops counting.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use super::mmap::prefetch;
use super::options::DedupWindow;
use super::record::InnerMsgId;

/// Ids per ring chunk (128 KiB of ids), for windows at least this large.
const CHUNK: u64 = 1 << 13;
/// Ids per ring chunk of the smallest windows.
const CHUNK_MIN: u64 = 1 << 8;
/// Ring chunks kept for reuse after they leave the window.
const FREE_CHUNKS_MAX: usize = 2;
/// Offsets per age block: the granularity of expiry by age.
pub const AGE_BLOCK: u64 = 1024;
/// Offsets are kept in 31 bits in a table slot.
const OFFSET_MASK: u64 = (1 << 31) - 1;
const TABLE_SLOTS_MIN: usize = 256;
/// A table this large grows straight to its final size.
const GROW_TO_FULL_SLOTS: usize = 1 << 14;
/// Bloom bits per table slot, and bits set per id.
const BLOOM_BITS_PER_SLOT: usize = 8;
const BLOOM_HASHES: u32 = 4;
const BLOOM_BLOCK_WORDS: usize = 8;

/// Bytes a window holds per id at most, for the budget: a full ring slot,
/// both generations at load 0.75 and a spare set of tables.
pub const BYTES_PER_ID: u64 = 36;
/// The fewest ids a window sharing a budget may hold: past that many busy
/// windows, the budget is exceeded rather than the windows made useless.
pub const SHARE_IDS_MIN: u64 = 1024;

/// Memory shared by the dedup windows of many logs (see the module docs).
#[derive(Debug)]
pub struct DedupBudget {
    bytes_max: u64,
    /// Bytes the windows hold now, as each last reported.
    bytes_used: std::sync::atomic::AtomicU64,
    /// Windows holding at least one id.
    busy: std::sync::atomic::AtomicU64,
    /// Shares are split among at least this many windows (see
    /// [`DedupBudget::expect_windows`]).
    expected: std::sync::atomic::AtomicU64,
}

/// Two are equal when they are the same budget.
impl PartialEq for DedupBudget {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for DedupBudget {}

impl DedupBudget {
    pub fn new(bytes_max: u64) -> Self {
        DedupBudget {
            bytes_max,
            bytes_used: std::sync::atomic::AtomicU64::new(0),
            busy: std::sync::atomic::AtomicU64::new(0),
            expected: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Splits shares among at least `windows` windows until told otherwise
    /// (0): a broker opening its partitions one by one would otherwise let
    /// the first ones rebuild whole windows that the later ones' shares
    /// then forbid.
    pub fn expect_windows(&self, windows: u64) {
        self.expected
            .store(windows, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Bytes the windows sharing the budget hold now.
    pub fn bytes_used(&self) -> u64 {
        self.bytes_used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Windows holding at least one id now.
    pub fn busy_windows(&self) -> u64 {
        self.busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most ids one window may hold now.
    pub fn share_ids(&self) -> u64 {
        let windows = self
            .busy_windows()
            .max(self.expected.load(std::sync::atomic::Ordering::Relaxed))
            .max(1);
        (self.bytes_max / BYTES_PER_ID / windows).max(SHARE_IDS_MIN)
    }
}

/// The dedup window of one log.
pub struct DedupIndex {
    window: DedupWindow,
    /// Shared with other windows, if any; with what this window last
    /// reported to it.
    budget: Option<std::sync::Arc<DedupBudget>>,
    reported_bytes: u64,
    counted_busy: bool,
    hasher: foldhash::fast::RandomState,
    ring: Ring,
    current: Generation,
    previous: Option<Generation>,
    /// Full-size tables prepared off the append path (`prepare_spare`),
    /// taken when a generation jumps to its final size.
    spare: Option<Tables>,
    /// A dropped generation's tables, to be cleared and reused as the
    /// spare off the append path rather than unmapped on it.
    retired: Option<Tables>,
}

/// A generation's table and bloom filter.
pub struct Tables {
    slots: Zeroed<u32>,
    bloom: Zeroed<u64>,
}

fn bloom_words_for(slot_count: usize) -> usize {
    let bloom_blocks = (slot_count * BLOOM_BITS_PER_SLOT).div_ceil(64 * BLOOM_BLOCK_WORDS);
    bloom_blocks.max(1) * BLOOM_BLOCK_WORDS
}

impl Tables {
    fn new(slot_count: usize) -> Self {
        Tables {
            slots: Zeroed::new(slot_count),
            bloom: Zeroed::new(bloom_words_for(slot_count)),
        }
    }

    fn clear(&mut self) {
        self.slots.fill(0);
        self.bloom.fill(0);
    }
}

/// Ids a generation must hold before a spare is prepared for it: quiet logs
/// do not get full-size tables.
const SPARE_AFTER_IDS: usize = 1024;

impl DedupIndex {
    pub fn new(window: DedupWindow) -> Self {
        DedupIndex {
            window,
            hasher: foldhash::fast::RandomState::default(),
            ring: Ring::new(window.records_max),
            budget: None,
            reported_bytes: 0,
            counted_busy: false,
            current: Generation::new(TABLE_SLOTS_MIN, 0),
            previous: None,
            spare: None,
            retired: None,
        }
    }

    /// A window sharing `budget` with others.
    pub fn with_budget(window: DedupWindow, budget: std::sync::Arc<DedupBudget>) -> Self {
        let mut index = DedupIndex::new(window);
        index.budget = Some(budget);
        index
    }

    /// The most ids the window holds now: its configured size, or less
    /// under a shared budget.
    pub fn records_cap(&self) -> u64 {
        match &self.budget {
            Some(budget) => self.window.records_max.min(budget.share_ids()),
            None => self.window.records_max,
        }
    }

    fn full_slots(&self) -> usize {
        (self.records_cap() as usize * 4).div_ceil(3) + 1
    }

    /// Tells the budget (if any) what the window holds now. The log calls
    /// it after each batch of inserts and after expiring.
    pub fn report(&mut self) {
        use std::sync::atomic::Ordering;
        let Some(budget) = &self.budget else { return };
        let bytes = self.bytes_used() as u64;
        if bytes != self.reported_bytes {
            if bytes > self.reported_bytes {
                budget
                    .bytes_used
                    .fetch_add(bytes - self.reported_bytes, Ordering::Relaxed);
            } else {
                budget
                    .bytes_used
                    .fetch_sub(self.reported_bytes - bytes, Ordering::Relaxed);
            }
            self.reported_bytes = bytes;
        }
        let busy = self.ring.end > self.ring.start;
        if busy != self.counted_busy {
            if busy {
                budget.busy.fetch_add(1, Ordering::Relaxed);
            } else {
                budget.busy.fetch_sub(1, Ordering::Relaxed);
            }
            self.counted_busy = busy;
        }
    }

    /// Work for a background thread, done without the writer's lock:
    /// `take_spare_work` hands out what to prepare, `put_spare` takes it
    /// back. Full-size tables (megabytes) are then never allocated, faulted
    /// in or unmapped on the append path.
    pub fn take_spare_work(&mut self) -> Option<SpareWork> {
        let wanted = self.spare_wanted();
        let retired = self.retired.take();
        if !wanted {
            return retired.map(SpareWork::Drop);
        }
        Some(SpareWork::Prepare {
            slots: self.full_slots(),
            reuse: retired,
        })
    }

    fn spare_wanted(&self) -> bool {
        self.enabled()
            && self.spare.is_none()
            && self.full_slots() * 4 >= MAP_BYTES_MIN
            && (self.current.count >= SPARE_AFTER_IDS || self.previous.is_some())
    }

    /// Whether `take_spare_work` has something to do (cheap; for the append
    /// path to wake the background thread).
    pub fn has_spare_work(&self) -> bool {
        self.retired.is_some() || self.spare_wanted()
    }

    pub fn put_spare(&mut self, tables: Tables) {
        if self.spare.is_none() && tables.slots.len() == self.full_slots() {
            self.spare = Some(tables);
        }
    }

    pub fn enabled(&self) -> bool {
        self.window.records_max > 0
    }

    /// The hash the window files `id` under; compute a batch's hashes first
    /// and [`DedupIndex::prefetch`] a few ahead to overlap cache misses.
    pub fn hash(&self, id: InnerMsgId) -> u64 {
        self.hasher.hash_one(id.0)
    }

    /// Starts loading the cache lines a lookup and insert of `hash` touch.
    pub fn prefetch(&self, hash: u64) {
        if !self.enabled() {
            return;
        }
        self.current.prefetch(hash);
        if let Some(previous) = &self.previous {
            previous.prefetch_bloom(hash);
        }
    }

    /// The offset the id was stored at, if it is in the window.
    pub fn lookup(&self, id: InnerMsgId) -> Option<u64> {
        self.lookup_hashed(id, self.hash(id))
    }

    /// [`DedupIndex::lookup`] with the hash already computed.
    pub fn lookup_hashed(&self, id: InnerMsgId, hash: u64) -> Option<u64> {
        if id.is_none() || !self.enabled() {
            return None;
        }
        self.current
            .find(hash, id.0, &self.ring)
            .or_else(|| self.previous.as_ref()?.find(hash, id.0, &self.ring))
    }

    /// Records that `offset` was appended with `id` (0: none) at
    /// `timestamp_ms`. Offsets must arrive in increasing order; a gap (only
    /// at the first insert after a rebuild) restarts the window.
    pub fn insert(&mut self, id: InnerMsgId, offset: u64, timestamp_ms: u64) {
        let hash = self.hash(id);
        self.insert_hashed(id, hash, offset, timestamp_ms);
    }

    /// [`DedupIndex::insert`] with the hash already computed.
    pub fn insert_hashed(&mut self, id: InnerMsgId, hash: u64, offset: u64, timestamp_ms: u64) {
        if !self.enabled() {
            return;
        }
        self.ring.push(offset, id.0, timestamp_ms);
        if id.is_none() {
            return;
        }
        let cap = self.records_cap();
        if self.current.count as u64 >= cap {
            let full =
                std::mem::replace(&mut self.current, Generation::new(TABLE_SLOTS_MIN, offset));
            if let Some(old) = self.previous.replace(full) {
                self.retired = Some(old.tables);
            }
        }
        if (self.current.count + 1) * 4 > self.current.tables.slots.len() * 3 {
            let slots_max = (cap as usize * 4).div_ceil(3) + 1;
            // Past GROW_TO_FULL_SLOTS the next step is the final size: a
            // rebuild moves every id of the generation while the writer
            // waits, so the largest rebuild must stay small (~12 K ids into
            // a prepared spare, ~1 ms), not half the window (~1 M ids, tens
            // of ms of stalled appends). Later, the spare would not be ready
            // in time: it is asked for at SPARE_AFTER_IDS.
            let slots = if self.current.tables.slots.len() >= GROW_TO_FULL_SLOTS {
                slots_max
            } else {
                (self.current.tables.slots.len() * 2).min(slots_max)
            };
            let tables = match self.spare.take() {
                Some(t) if t.slots.len() == slots => t,
                other => {
                    self.spare = other;
                    Tables::new(slots)
                }
            };
            self.current = self.current.grown(tables, offset, &self.ring, &self.hasher);
        }
        self.current.put(hash, offset);
    }

    /// Forgets ids beyond the window by count and by age, given the time now.
    pub fn expire(&mut self, now_ms: u64) {
        if !self.enabled() {
            return;
        }
        let cutoff = now_ms.saturating_sub(self.window.age_ms_max);
        self.ring.expire(self.records_cap(), cutoff);
        if self.ring.start == self.ring.end {
            // Nothing left to remember: let the tables go (a window that
            // was busy once must not hold megabytes while idle).
            if self.current.count > 0 || self.previous.is_some() || self.spare.is_some() {
                self.current = Generation::new(TABLE_SLOTS_MIN, self.ring.end);
                self.previous = None;
                self.spare = None;
                self.retired = None;
                self.ring.chunks.clear();
                self.ring.free.clear();
            }
        } else if self.previous.is_some() && self.current.first_offset <= self.ring.start {
            // The current generation holds every id still in the window.
            self.retired = self.previous.take().map(|g| g.tables);
        }
    }

    /// The first offset the window remembers.
    pub fn window_start(&self) -> u64 {
        self.ring.start
    }

    /// Heap bytes held, for the memory-per-id figure.
    pub fn bytes_used(&self) -> usize {
        let tables = |t: &Tables| t.slots.len() * 4 + t.bloom.len() * 8;
        self.ring.bytes_used()
            + self.current.bytes_used()
            + self.previous.as_ref().map_or(0, Generation::bytes_used)
            + self.spare.as_ref().map_or(0, tables)
            + self.retired.as_ref().map_or(0, tables)
    }

    /// Ids currently in the window.
    pub fn ids_in_window(&self) -> u64 {
        self.ring.end - self.ring.start
    }
}

impl Drop for DedupIndex {
    /// Everything it held goes back to the budget.
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if let Some(budget) = &self.budget {
            budget
                .bytes_used
                .fetch_sub(self.reported_bytes, Ordering::Relaxed);
            if self.counted_busy {
                budget.busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Default)]
struct Ring {
    /// Ids per chunk: a power of two, at most `CHUNK`, no larger than the
    /// window needs (a small window does not zero a megabyte).
    chunk_len: u64,
    start: u64,
    end: u64,
    /// Chunk number (offset / chunk_len) of `chunks[0]`.
    first_chunk: u64,
    /// Each chunk grows as its slots are written (to at most `chunk_len`):
    /// a window holding one id holds a few bytes, not a chunk's 128 KiB
    /// (which, on a restart of 10,000 partitions, was 1.3 GB zeroed).
    chunks: VecDeque<Vec<u128>>,
    /// Block number (offset / AGE_BLOCK) of `block_ts[0]`.
    first_block: u64,
    /// The newest timestamp in each block.
    block_ts: VecDeque<u64>,
    /// Chunks that left the window, reused rather than freed: a fresh
    /// chunk is 256 page faults, ~5 ms on the development VM, and a busy
    /// log needs one every 65,536 records. Slots are written before they
    /// are read (only `[start, end)` is read), so reuse needs no zeroing.
    free: Vec<Vec<u128>>,
}

impl Ring {
    fn new(records_max: u64) -> Ring {
        Ring {
            chunk_len: records_max.next_power_of_two().clamp(CHUNK_MIN, CHUNK),
            ..Ring::default()
        }
    }

    fn get(&self, offset: u64) -> Option<u128> {
        if offset < self.start || offset >= self.end {
            return None;
        }
        let chunk = self
            .chunks
            .get((offset / self.chunk_len - self.first_chunk) as usize)?;
        chunk.get((offset % self.chunk_len) as usize).copied()
    }

    /// The full offset whose low 31 bits are `low`, if still in the window.
    fn resolve(&self, low: u64) -> Option<u64> {
        let top = self.end.checked_sub(1)?;
        let offset = top.checked_sub(top.wrapping_sub(low) & OFFSET_MASK)?;
        (offset >= self.start).then_some(offset)
    }

    fn push(&mut self, offset: u64, id: u128, timestamp_ms: u64) {
        if offset != self.end || self.start == self.end {
            debug_assert!(offset >= self.end, "dedup offsets must increase");
            // A fresh window (first insert, or a gap): start over here.
            let mut free = std::mem::take(&mut self.free);
            free.extend(self.chunks.drain(..));
            free.truncate(FREE_CHUNKS_MAX);
            *self = Ring {
                start: offset,
                end: offset,
                first_chunk: offset / self.chunk_len,
                chunk_len: self.chunk_len,
                first_block: offset / AGE_BLOCK,
                free,
                ..Ring::default()
            };
        }
        let chunk_index = (offset / self.chunk_len - self.first_chunk) as usize;
        while self.chunks.len() <= chunk_index {
            let chunk = match self.free.pop() {
                Some(mut reused) => {
                    reused.clear(); // keeps its memory
                    reused
                }
                None => Vec::new(),
            };
            self.chunks.push_back(chunk);
        }
        let chunk = &mut self.chunks[chunk_index];
        let slot = (offset % self.chunk_len) as usize;
        if slot < chunk.len() {
            chunk[slot] = id;
        } else {
            if chunk.capacity() <= slot {
                // Doubling, but never past a chunk.
                let want = (slot + 1).next_power_of_two().min(self.chunk_len as usize);
                chunk.reserve_exact(want - chunk.len());
            }
            chunk.resize(slot, 0); // a window that starts inside the chunk
            chunk.push(id);
        }
        let block_index = (offset / AGE_BLOCK - self.first_block) as usize;
        while self.block_ts.len() <= block_index {
            self.block_ts.push_back(0);
        }
        let ts = &mut self.block_ts[block_index];
        *ts = (*ts).max(timestamp_ms);
        self.end = offset + 1;
    }

    fn expire(&mut self, records_max: u64, cutoff_ms: u64) {
        if self.end - self.start > records_max {
            self.start = self.end - records_max;
        }
        while let Some(&newest) = self.block_ts.front() {
            let block_end = (self.first_block + 1) * AGE_BLOCK;
            if block_end <= self.start {
                self.block_ts.pop_front();
                self.first_block += 1;
            } else if newest < cutoff_ms {
                if block_end > self.end {
                    // The block still fills; its records so far are all old.
                    self.start = self.end;
                    break;
                }
                self.start = block_end;
            } else {
                break;
            }
        }
        while (self.first_chunk + 1) * self.chunk_len <= self.start && !self.chunks.is_empty() {
            if let Some(chunk) = self.chunks.pop_front() {
                if self.free.len() < FREE_CHUNKS_MAX {
                    self.free.push(chunk);
                }
            }
            self.first_chunk += 1;
        }
    }

    fn bytes_used(&self) -> usize {
        self.chunks
            .iter()
            .chain(&self.free)
            .map(|c| c.capacity() * 16)
            .sum::<usize>()
            + self.block_ts.capacity() * 8
    }
}

/// Zeroed memory for a table or a bloom filter. Large ones come straight
/// from the kernel as fresh zero pages (an anonymous map): the allocator
/// would otherwise hand back reused heap memory and memset it on the append
/// path (milliseconds for a full-size table), and the pages go back to the
/// kernel on drop.
enum Zeroed<T> {
    Heap(Vec<T>),
    Map(memmap2::MmapMut, std::marker::PhantomData<T>),
}

/// Tables at least this large are mapped.
const MAP_BYTES_MIN: usize = 1 << 20;
/// Bytes faulted in per call when a mapped table is prepared (one huge page).
const POPULATE_STEP_BYTES: usize = 2 << 20;

impl<T: bytemuck::Pod> Zeroed<T> {
    fn new(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        if bytes >= MAP_BYTES_MIN {
            if let Ok(map) = memmap2::MmapMut::map_anon(bytes) {
                // Fault every page in with one call: the kernel zeroes them
                // in bulk, where filling a fresh table by random inserts
                // would take one page fault per insert (12 ms for the first
                // few thousand ids of a 2 M window). Kernels before 5.14
                // refuse, and the pages fault in one by one instead.
                // Huge pages where the kernel allows: lookups land at random
                // in megabytes of table, and 4 KiB pages make each a TLB miss.
                // In steps of POPULATE_STEP_BYTES: populating holds the
                // process's memory-map lock, and a thread that needs it for
                // writing (the allocator growing a heap, in the appending
                // thread) waited behind one call over a whole table for up
                // to 10 ms.
                let _ = map.advise(memmap2::Advice::HugePage);
                let mut at = 0;
                while at < bytes {
                    let step = POPULATE_STEP_BYTES.min(bytes - at);
                    if map
                        .advise_range(memmap2::Advice::PopulateWrite, at, step)
                        .is_err()
                    {
                        break;
                    }
                    at += step;
                }
                return Zeroed::Map(map, std::marker::PhantomData);
            }
        }
        Zeroed::Heap(vec![T::zeroed(); len])
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Zeroed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Zeroed::Heap(v) => v,
            // A page-aligned map whose length is a multiple of size_of::<T>().
            Zeroed::Map(m, _) => bytemuck::cast_slice(&m[..]),
        }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Zeroed<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Zeroed::Heap(v) => v,
            Zeroed::Map(m, _) => bytemuck::cast_slice_mut(&mut m[..]),
        }
    }
}

/// What a background thread is asked to do for the dedup window.
pub enum SpareWork {
    /// Build full-size tables of `slots` slots (clearing `reuse` if it has
    /// that size) and hand them back with `put_spare`.
    Prepare { slots: usize, reuse: Option<Tables> },
    /// Drop these tables.
    Drop(Tables),
}

impl SpareWork {
    /// Does the work: returns tables for `put_spare`, if any.
    pub fn run(self) -> Option<Tables> {
        match self {
            SpareWork::Drop(t) => {
                drop(t);
                None
            }
            SpareWork::Prepare { slots, reuse } => Some(match reuse {
                Some(mut t) if t.slots.len() == slots => {
                    t.clear();
                    t
                }
                _ => Tables::new(slots),
            }),
        }
    }
}

struct Generation {
    tables: Tables,
    count: usize,
    /// The first offset inserted into this generation: its ids are the
    /// non-zero ones in the ring from here on.
    first_offset: u64,
}

impl Generation {
    fn new(slot_count: usize, first_offset: u64) -> Self {
        Self::with_tables(Tables::new(slot_count), first_offset)
    }

    fn with_tables(tables: Tables, first_offset: u64) -> Self {
        Generation {
            tables,
            count: 0,
            first_offset,
        }
    }

    fn prefetch(&self, hash: u64) {
        self.prefetch_bloom(hash);
        if let Some(slot) = self
            .tables
            .slots
            .get(fast_range(hash, self.tables.slots.len()))
        {
            prefetch(slot);
        }
    }

    fn prefetch_bloom(&self, hash: u64) {
        let (base, _) = self.bloom_bits(hash);
        if let Some(word) = self.tables.bloom.get(base) {
            prefetch(word);
        }
    }

    fn bloom_bits(&self, hash: u64) -> (usize, [u32; BLOOM_HASHES as usize]) {
        // The table uses the low bits of `hash`; the bloom mixes it again so
        // its block and bits are independent of the table position.
        let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        let blocks = self.tables.bloom.len() / BLOOM_BLOCK_WORDS;
        let block = fast_range(mixed, blocks);
        let mut bits = [0u32; BLOOM_HASHES as usize];
        for (i, bit) in bits.iter_mut().enumerate() {
            *bit = ((mixed >> (i * 9)) & 511) as u32;
        }
        (block * BLOOM_BLOCK_WORDS, bits)
    }

    fn bloom_may_contain(&self, hash: u64) -> bool {
        let (base, bits) = self.bloom_bits(hash);
        bits.iter().all(|&b| {
            self.tables
                .bloom
                .get(base + (b / 64) as usize)
                .is_some_and(|w| w & (1 << (b % 64)) != 0)
        })
    }

    fn find(&self, hash: u64, id: u128, ring: &Ring) -> Option<u64> {
        if self.count == 0 || !self.bloom_may_contain(hash) {
            return None;
        }
        let mut i = fast_range(hash, self.tables.slots.len());
        // Load stays at or below 3/4, so an empty slot ends every probe.
        loop {
            let slot = self.tables.slots[i];
            if slot == 0 {
                return None;
            }
            if let Some(offset) = ring.resolve(u64::from(slot - 1)) {
                if ring.get(offset) == Some(id) {
                    return Some(offset);
                }
            }
            i = next_slot(i, self.tables.slots.len());
        }
    }

    fn put(&mut self, hash: u64, offset: u64) {
        let (base, bits) = self.bloom_bits(hash);
        for b in bits {
            self.tables.bloom[base + (b / 64) as usize] |= 1 << (b % 64);
        }
        let mut i = fast_range(hash, self.tables.slots.len());
        while self.tables.slots[i] != 0 {
            i = next_slot(i, self.tables.slots.len());
        }
        self.tables.slots[i] = (offset & OFFSET_MASK) as u32 + 1;
        self.count += 1;
    }

    /// A larger table holding this generation's ids still in the ring,
    /// rebuilt by walking the ring in order (sequential reads) and
    /// prefetching each new slot a few ids ahead, rather than rehashing the
    /// old table's slots in random order. `end` is the offset being inserted.
    fn grown(
        &self,
        tables: Tables,
        end: u64,
        ring: &Ring,
        hasher: &foldhash::fast::RandomState,
    ) -> Generation {
        const AHEAD: usize = 16;
        let mut next = Generation::with_tables(tables, self.first_offset);
        let mut pending: std::collections::VecDeque<(u64, u64)> =
            std::collections::VecDeque::with_capacity(AHEAD);
        for offset in self.first_offset.max(ring.start)..end.min(ring.end) {
            let Some(id) = ring.get(offset).filter(|&id| id != 0) else {
                continue;
            };
            let hash = hasher.hash_one(id);
            next.prefetch(hash);
            pending.push_back((hash, offset));
            if pending.len() == AHEAD {
                if let Some((h, o)) = pending.pop_front() {
                    next.put(h, o);
                }
            }
        }
        for (h, o) in pending {
            next.put(h, o);
        }
        next
    }

    fn bytes_used(&self) -> usize {
        self.tables.slots.len() * 4 + self.tables.bloom.len() * 8
    }
}

/// Maps a hash onto `0..n` without a division (Lemire's multiply-shift).
fn fast_range(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

fn next_slot(i: usize, n: usize) -> usize {
    if i + 1 == n {
        0
    } else {
        i + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn window(records_max: u64) -> DedupWindow {
        DedupWindow {
            records_max,
            age_ms_max: 60_000,
        }
    }

    fn fill(d: &mut DedupIndex, from: u64, count: u64, now_ms: u64) {
        for o in from..from + count {
            d.insert(InnerMsgId(u128::from(o) * 0x9E37_79B9 + 7), o, now_ms);
            if o % 512 == 0 {
                d.expire(now_ms);
                d.report();
            }
        }
        d.expire(now_ms);
        d.report();
    }

    /// Windows sharing a budget hold at most their share each: one busy
    /// window alone may take the whole budget, two split it, and the
    /// memory reported stays within the budget (plus what a window holds
    /// before its next expiry trims it).
    #[test]
    fn windows_share_a_budget() {
        let budget = std::sync::Arc::new(DedupBudget::new(8 << 20));
        let all_ids = (8 << 20) / BYTES_PER_ID;
        let mut a = DedupIndex::with_budget(window(1_000_000), budget.clone());
        fill(&mut a, 0, 400_000, 1000);
        assert_eq!(budget.busy_windows(), 1);
        assert_eq!(a.records_cap(), all_ids, "alone, the whole budget");
        assert!(a.ids_in_window() <= all_ids);
        let mut b = DedupIndex::with_budget(window(1_000_000), budget.clone());
        fill(&mut b, 0, 400_000, 1000);
        fill(&mut a, 400_000, 200_000, 1000);
        assert_eq!(budget.busy_windows(), 2);
        assert_eq!(a.records_cap(), all_ids / 2);
        assert!(a.ids_in_window() <= all_ids / 2 && b.ids_in_window() <= all_ids / 2);
        assert!(
            budget.bytes_used() <= budget.bytes_max() * 3 / 2,
            "{} bytes used of {}",
            budget.bytes_used(),
            budget.bytes_max()
        );
        // The newest ids are still found, the oldest forgotten.
        assert_eq!(
            a.lookup(InnerMsgId(599_999u128 * 0x9E37_79B9 + 7)),
            Some(599_999)
        );
        assert_eq!(a.lookup(InnerMsgId(7)), None);
        drop(a);
        drop(b);
        assert_eq!(
            budget.bytes_used(),
            0,
            "dropped windows give everything back"
        );
        assert_eq!(budget.busy_windows(), 0);
    }

    /// A window whose ids all aged out lets its tables go and stops
    /// counting as busy.
    #[test]
    fn an_emptied_window_lets_its_tables_go() {
        let budget = std::sync::Arc::new(DedupBudget::new(64 << 20));
        let mut d = DedupIndex::with_budget(window(1_000_000), budget.clone());
        fill(&mut d, 0, 100_000, 1000);
        let busy_bytes = budget.bytes_used();
        assert!(busy_bytes > 1 << 20, "{busy_bytes}");
        d.expire(1000 + 60_000 + 1);
        d.report();
        assert_eq!(d.ids_in_window(), 0);
        assert_eq!(budget.busy_windows(), 0);
        assert!(
            budget.bytes_used() < 16 << 10,
            "an empty window holds {} bytes",
            budget.bytes_used()
        );
        // And it works again afterwards.
        fill(&mut d, 100_000, 10, 70_000);
        assert_eq!(
            d.lookup(InnerMsgId(100_005u128 * 0x9E37_79B9 + 7)),
            Some(100_005)
        );
    }

    /// Spare tables (prepared off the append path) are used by the jump to
    /// full size and across generation changes, and lookups stay exact.
    #[test]
    fn spare_tables_are_used_and_lookups_stay_exact() {
        let records_max = 300_000u64;
        let mut d = DedupIndex::new(window(records_max));
        let id = |o: u64| InnerMsgId(u128::from(o) * 0x9E37_79B9 + 5);
        assert!(d.take_spare_work().is_none(), "a quiet log gets no spare");
        let mut spares_used = 0;
        for o in 0..(records_max * 3) {
            let had_spare = d.spare.is_some();
            d.insert(id(o), o, 1000);
            spares_used += usize::from(had_spare && d.spare.is_none());
            if o % 5_000 == 0 {
                if let Some(t) = d.take_spare_work().and_then(SpareWork::run) {
                    d.put_spare(t);
                }
            }
            if o % 50_000 == 49_999 {
                d.expire(1000);
            }
        }
        let start = d.window_start();
        assert!(start >= records_max, "the window moved on");
        for o in (start..records_max * 3).step_by(97) {
            assert_eq!(d.lookup(id(o)), Some(o));
        }
        for o in (0..start).step_by(97) {
            assert_eq!(d.lookup(id(o)), None);
        }
        // Three generations; the spare is ready (work ran at 5,000 ids)
        // before even the first one jumps at ~12,300 ids.
        assert_eq!(spares_used, 3, "every jump to full size took a spare");
        assert!(d.current.tables.slots.len() == d.full_slots());
    }

    #[test]
    fn a_window_holding_a_few_ids_holds_a_few_bytes_of_ring() {
        // A chunk is 8,192 ids (128 KiB); two ids take two slots.
        let mut d = DedupIndex::new(window(10_000_000));
        d.insert(InnerMsgId(7), 0, 1000);
        d.insert(InnerMsgId(8), 1, 1000);
        assert!(d.ring.bytes_used() <= 64, "{}", d.ring.bytes_used());
        assert_eq!(d.lookup(InnerMsgId(7)), Some(0));
        assert_eq!(d.lookup(InnerMsgId(8)), Some(1));
    }

    #[test]
    fn ring_chunks_are_reused_once_they_leave_the_window() {
        let records_max = CHUNK * 2;
        let mut d = DedupIndex::new(window(records_max));
        let id = |o: u64| InnerMsgId(u128::from(o) * 0x9E37_79B9 + 11);
        let mut allocated = Vec::new();
        for o in 0..CHUNK * 8 {
            d.insert(id(o), o, 1000);
            d.expire(1000);
            if o % CHUNK == CHUNK - 1 {
                allocated.push(d.ring.chunks.len() + d.ring.free.len());
            }
        }
        // The window spans at most three chunks; with two kept free, five
        // chunks serve any number of records.
        assert!(allocated.iter().all(|&n| n <= 5), "{allocated:?}");
        let reused: std::collections::HashSet<*const u128> =
            d.ring.chunks.iter().map(|c| c.as_ptr()).collect();
        assert_eq!(reused.len(), d.ring.chunks.len());
        // Slots a reused chunk held before are not taken for current ids.
        let end = CHUNK * 8;
        for o in (0..end - records_max).step_by(97) {
            assert_eq!(d.lookup(id(o)), None, "offset {o} left the window");
        }
        for o in (end - records_max..end).step_by(97) {
            assert_eq!(d.lookup(id(o)), Some(o));
        }
    }

    #[test]
    fn finds_what_was_inserted_and_nothing_else() {
        let mut d = DedupIndex::new(window(100_000));
        for o in 0..50_000u64 {
            d.insert(InnerMsgId(u128::from(o) * 7 + 1), o, 1000);
        }
        for o in 0..50_000u64 {
            assert_eq!(d.lookup(InnerMsgId(u128::from(o) * 7 + 1)), Some(o));
            assert_eq!(d.lookup(InnerMsgId(u128::from(o) * 7 + 3)), None);
        }
        assert_eq!(d.lookup(InnerMsgId::NONE), None);
    }

    #[test]
    fn window_by_count_forgets_the_oldest() {
        let mut d = DedupIndex::new(window(1000));
        for o in 0..5000u64 {
            d.insert(InnerMsgId(u128::from(o) + 1), o, 1);
            d.expire(1);
        }
        assert_eq!(
            d.lookup(InnerMsgId(4000)),
            None,
            "offset 3999 is outside the last 1000"
        );
        assert_eq!(d.lookup(InnerMsgId(4001)), Some(4000));
        assert_eq!(d.lookup(InnerMsgId(5000)), Some(4999));
        assert_eq!(d.ids_in_window(), 1000);
    }

    #[test]
    fn window_by_age_forgets_whole_blocks() {
        let mut d = DedupIndex::new(DedupWindow {
            records_max: 1 << 20,
            age_ms_max: 1000,
        });
        for o in 0..AGE_BLOCK * 3 {
            d.insert(InnerMsgId(u128::from(o) + 1), o, o / AGE_BLOCK * 10_000);
        }
        d.expire(20_500);
        assert_eq!(d.lookup(InnerMsgId(1)), None, "block 0 is 20 s old");
        assert_eq!(
            d.lookup(InnerMsgId(u128::from(AGE_BLOCK) + 1)),
            None,
            "block 1 is 10 s old"
        );
        assert_eq!(
            d.lookup(InnerMsgId(u128::from(AGE_BLOCK * 2) + 1)),
            Some(AGE_BLOCK * 2)
        );
        d.expire(40_000);
        assert_eq!(
            d.lookup(InnerMsgId(u128::from(AGE_BLOCK * 3))),
            None,
            "all old now"
        );
        d.insert(InnerMsgId(99_999), AGE_BLOCK * 3, 40_000);
        assert_eq!(d.lookup(InnerMsgId(99_999)), Some(AGE_BLOCK * 3));
    }

    #[test]
    fn memory_per_id_is_under_32_bytes_at_a_full_window() {
        let records = 1u64 << 20;
        let mut d = DedupIndex::new(window(records));
        // Fill two windows so a full previous generation is held as well.
        for o in 0..records * 2 {
            d.insert(InnerMsgId(u128::from(o) + 1), o, 1);
            if o % 4096 == 0 {
                d.expire(1);
            }
        }
        d.expire(1);
        let per_id = d.bytes_used() as f64 / d.ids_in_window() as f64;
        assert!(per_id <= 32.0, "{per_id:.1} bytes per id");
    }

    proptest! {
        /// Against a model: a map from id to offset, restricted to the last
        /// `records_max` offsets.
        #[test]
        fn agrees_with_a_model(ops in proptest::collection::vec((0u8..40, any::<bool>()), 1..3000), records_max in 1u64..300) {
            let mut d = DedupIndex::new(window(records_max));
            let mut model: HashMap<u128, u64> = HashMap::new();
            let mut next = 0u64;
            for (raw_id, with_id) in ops {
                let id = if with_id { InnerMsgId(u128::from(raw_id) + 1) } else { InnerMsgId::NONE };
                d.expire(0);
                let start = next.saturating_sub(records_max);
                let expected = model.get(&id.0).copied().filter(|&o| o >= start && !id.is_none());
                prop_assert_eq!(d.lookup(id), expected);
                if expected.is_none() {
                    d.insert(id, next, 0);
                    if !id.is_none() { model.insert(id.0, next); }
                    next += 1;
                }
            }
        }
    }
}
