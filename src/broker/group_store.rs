//! Durable consumer-group state: an internal log (`DATA/_groups`, the
//! storage engine with deduplication off) of what groups joined and acked,
//! compacted by snapshots.
//!
//! Each record's payload is one entry:
//!
//! ```text
//!  +------+-----------+--------------+-----------+---------------------
//!  | kind | topic str | partition u32| group str | kind-specific ...
//!  |  u8  | u16 + utf8|              | u16 + utf8|
//!  +------+-----------+--------------+-----------+---------------------
//!  kind 1 JOIN:     u64 start            (the group starts at this offset)
//!  kind 2 ACKS:     u32 n, n x (u64 first, u32 count)   (acked ranges)
//!  kind 3 SNAPSHOT: u64 committed, u32 n, n x (u64 first, u32 count)
//!  kind 4 DELAYS:   u32 n, n x (u64 offset, u64 due_ms)   redeliveries waiting
//!                  for their time (a nack delay or the backoff after a timeout)
//! ```
//!
//! Replaying the log in order rebuilds every group's `committed` offset and
//! the offsets acked above it. One thread owns the log: requests from all
//! connections are appended as one batch and (under sync flush) made
//! durable with one flush before any of them is answered. When the log
//! passes `compact_bytes`, the thread writes a snapshot of every group into
//! a fresh log and swaps it in (`_groups.tmp` → `_groups`); a crash at any
//! point of the swap leaves one complete log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::log::record::{InnerMsgId, Message};
use crate::log::{FlushJournal, FlushMode, Log, Options, StorageError};
use crate::protocol::body::{GROUP_NAME_MAX, TOPIC_NAME_MAX};
use crate::protocol::{Problem, Put, Reader, WireError};

const KIND_JOIN: u8 = 1;
const KIND_ACKS: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_DELAYS: u8 = 4;
/// Most ranges in one entry read back (entries written before records
/// were split could hold this many).
const RANGES_MAX: usize = 1 << 20;
/// Most ranges or delays written in one record: an entry with more is
/// split (a snapshot continues as ACKS entries), so every record stays
/// under `RECORD_BYTES` whatever a group's state.
const ENTRY_ITEMS_MAX: usize = 2048;
/// The groups log's largest record: a key of two names plus
/// `ENTRY_ITEMS_MAX` delays (16 bytes each). It fits the smallest segment.
const RECORD_BYTES: u32 = 64 << 10;
/// Most entries appended in one batch.
const BATCH_MAX: usize = 4096;

/// A group's place in a partition: `(topic, partition, group)`.
pub type GroupKey = (String, u32, String);

/// What replay rebuilt for one group on one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredGroup {
    pub committed: u64,
    pub acked_above: BTreeSet<u64>,
    /// Redeliveries waiting for their time: offset -> due (ms since the
    /// epoch). Acked offsets leave it.
    pub delayed: BTreeMap<u64, u64>,
}

impl StoredGroup {
    /// Applies one acked range. A range that reaches `committed` (the
    /// common case: a consumer acks roughly in order) moves `committed`
    /// in one step; only a range ahead of it is remembered offset by
    /// offset. Replay at open did per-offset set inserts and pops for every
    /// acked message: 5 s for 45 groups over 3 M messages.
    fn ack_range(&mut self, first: u64, count: u32) {
        let end = first.saturating_add(count as u64);
        if end <= self.committed {
            return;
        }
        if first <= self.committed {
            // Everything below `end` is now settled.
            self.acked_above = self.acked_above.split_off(&end);
            self.committed = end;
        } else {
            self.acked_above.extend(first..end);
        }
        while self.acked_above.first() == Some(&self.committed) {
            self.acked_above.pop_first();
            self.committed += 1;
        }
        let low = first.max(self.committed);
        if !self.delayed.is_empty() && low < end {
            let acked: Vec<u64> = self.delayed.range(low..end).map(|(o, _)| *o).collect();
            for o in acked {
                self.delayed.remove(&o);
            }
        }
        if self
            .delayed
            .first_key_value()
            .is_some_and(|(o, _)| *o < self.committed)
        {
            self.delayed = self.delayed.split_off(&self.committed);
        }
    }
}

/// One entry to persist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Join {
        start: u64,
    },
    Acks {
        offsets: Vec<u64>,
    },
    Snapshot {
        committed: u64,
        acked_above: Vec<u64>,
    },
    /// Redeliveries scheduled by a nack or a timeout: `(offset, due_ms)`.
    Delays {
        delays: Vec<(u64, u64)>,
    },
}

/// Collapses sorted offsets into `(first, count)` runs.
fn ranges(sorted: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &o in sorted {
        match out.last_mut() {
            Some((first, count)) if *first + *count as u64 == o && *count < u32::MAX => *count += 1,
            _ => out.push((o, 1)),
        }
    }
    out
}

pub fn encode_entry(key: (&str, u32, &str), entry: &Entry) -> Vec<Vec<u8>> {
    let (topic, partition, group) = key;
    let head = |kind: u8| {
        let mut out = Vec::with_capacity(64);
        out.put_u8(kind);
        out.put_str(topic);
        out.put_u32(partition);
        out.put_str(group);
        out
    };
    let put_ranges = |out: &mut Vec<u8>, r: &[(u64, u32)]| {
        out.put_u32(r.len() as u32);
        for &(first, count) in r {
            out.put_u64(first);
            out.put_u32(count);
        }
    };
    let sorted_ranges = |offsets: &[u64]| {
        let mut sorted = offsets.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        ranges(&sorted)
    };
    // `chunks` of an empty slice yields nothing; every entry writes at
    // least one record.
    let chunks = |n: usize| n.div_ceil(ENTRY_ITEMS_MAX).max(1);
    match entry {
        Entry::Join { start } => {
            let mut out = head(KIND_JOIN);
            out.put_u64(*start);
            vec![out]
        }
        Entry::Acks { offsets } => {
            let r = sorted_ranges(offsets);
            (0..chunks(r.len()))
                .map(|i| {
                    let mut out = head(KIND_ACKS);
                    put_ranges(&mut out, piece(&r, i));
                    out
                })
                .collect()
        }
        Entry::Snapshot {
            committed,
            acked_above,
        } => {
            // The first record replaces the group's state; the rest add
            // acks to it, as ACKS entries do.
            let r = sorted_ranges(acked_above);
            (0..chunks(r.len()))
                .map(|i| {
                    let mut out = if i == 0 {
                        let mut out = head(KIND_SNAPSHOT);
                        out.put_u64(*committed);
                        out
                    } else {
                        head(KIND_ACKS)
                    };
                    put_ranges(&mut out, piece(&r, i));
                    out
                })
                .collect()
        }
        Entry::Delays { delays } => (0..chunks(delays.len()))
            .map(|i| {
                let part = piece(delays, i);
                let mut out = head(KIND_DELAYS);
                out.put_u32(part.len() as u32);
                for (offset, due) in part {
                    out.put_u64(*offset);
                    out.put_u64(*due);
                }
                out
            })
            .collect(),
    }
}

/// The `i`-th piece of at most `ENTRY_ITEMS_MAX` items.
fn piece<T>(items: &[T], i: usize) -> &[T] {
    let from = (i * ENTRY_ITEMS_MAX).min(items.len());
    &items[from..(from + ENTRY_ITEMS_MAX).min(items.len())]
}

/// Applies one entry to the replayed state.
fn apply(state: &mut HashMap<GroupKey, StoredGroup>, payload: &[u8]) -> Result<(), WireError> {
    let mut r = Reader::new(payload);
    let kind = r.u8()?;
    let key = (
        r.str("topic", TOPIC_NAME_MAX)?.to_owned(),
        r.u32()?,
        r.str("group", GROUP_NAME_MAX)?.to_owned(),
    );
    let read_ranges = |r: &mut Reader<'_>| -> Result<Vec<(u64, u32)>, WireError> {
        let n = r.count("ranges", RANGES_MAX, 12)?;
        (0..n).map(|_| Ok((r.u64()?, r.u32()?))).collect()
    };
    match kind {
        KIND_JOIN => {
            let start = r.u64()?;
            state.entry(key).or_insert_with(|| StoredGroup {
                committed: start,
                ..Default::default()
            });
        }
        KIND_ACKS => {
            let g = state.entry(key).or_default();
            for (first, count) in read_ranges(&mut r)? {
                g.ack_range(first, count);
            }
        }
        KIND_SNAPSHOT => {
            let committed = r.u64()?;
            let mut g = StoredGroup {
                committed,
                ..Default::default()
            };
            for (first, count) in read_ranges(&mut r)? {
                g.ack_range(first, count);
            }
            state.insert(key, g);
        }
        KIND_DELAYS => {
            let g = state.entry(key).or_default();
            let n = r.count("delays", RANGES_MAX, 16)?;
            for _ in 0..n {
                let (offset, due) = (r.u64()?, r.u64()?);
                if offset >= g.committed && !g.acked_above.contains(&offset) {
                    g.delayed.insert(offset, due);
                }
            }
        }
        k => {
            return Err(WireError::Malformed {
                field: "group entry kind",
                offset: 0,
                problem: Problem::NotOneOf {
                    expected: &[
                        KIND_JOIN as u64,
                        KIND_ACKS as u64,
                        KIND_SNAPSHOT as u64,
                        KIND_DELAYS as u64,
                    ],
                    found: u64::from(k),
                },
            })
        }
    }
    r.finish()
}

/// Produces a snapshot of every group, for compaction.
pub type Collector = Box<dyn Fn() -> Vec<(GroupKey, Entry)> + Send>;

enum Request {
    /// One entry's records (several when it was split), all appended in
    /// one batch.
    Write(Vec<Vec<u8>>, Option<oneshot::Sender<WriteResult>>),
}

/// How a write to the groups log ended, shared by everyone waiting on it.
pub type WriteResult = Result<(), Arc<StorageError>>;

/// The handle to the thread that owns the groups log.
pub struct GroupStore {
    tx: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

/// How the groups log is written: the broker's flush mode, and its segment
/// size (the broker's, at most 64 MiB, so a small disk holds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSetup {
    pub flush: FlushMode,
    pub segment_bytes: u64,
    /// For power-loss tests (`BrokerConfig::faults`).
    pub flush_journal: Option<FlushJournal>,
}

impl From<FlushMode> for StoreSetup {
    fn from(flush: FlushMode) -> Self {
        StoreSetup {
            flush,
            segment_bytes: 64 << 20,
            flush_journal: None,
        }
    }
}

fn log_options(setup: &StoreSetup) -> Options {
    let mut o = Options {
        flush: setup.flush,
        segment_bytes: setup.segment_bytes,
        flush_journal: setup.flush_journal.clone(),
        record_bytes_max: RECORD_BYTES,
        checkpoint_interval_ms: 1000,
        ..Options::default()
    };
    o.dedup.records_max = 0;
    o.retention.age_ms_max = None;
    o
}

/// Finishes or undoes a swap that a crash interrupted.
fn settle_swap(dir: &Path) -> std::io::Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    if dir.exists() {
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
    } else if tmp.exists() {
        fs::rename(&tmp, dir)?;
    }
    if old.exists() && dir.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Reads every entry of the groups log.
fn replay(log: &Log) -> Result<HashMap<GroupKey, StoredGroup>, StorageError> {
    let mut state = HashMap::new();
    let mut offset = log.start_offset();
    let end = log.next_offset();
    while offset < end {
        let batch = log.read(offset, 4096, 4 << 20)?;
        if batch.records == 0 {
            break;
        }
        for record in batch.iter() {
            let record = record?;
            apply(&mut state, &record.payload).map_err(|e| StorageError::Corrupt {
                file: log.dir().to_path_buf(),
                position: record.offset,
                reason: format!("group entry at offset {}: {e}", record.offset),
            })?;
        }
        offset = batch.next_offset;
    }
    Ok(state)
}

fn write_snapshot(
    dir: &Path,
    setup: StoreSetup,
    entries: &[(GroupKey, Entry)],
) -> Result<(), StorageError> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(StorageError::io(&tmp))?;
    }
    let log = Log::open(&tmp, log_options(&setup))?;
    for chunk in entries.chunks(BATCH_MAX) {
        let payloads: Vec<Vec<u8>> = chunk
            .iter()
            .flat_map(|((t, p, g), e)| encode_entry((t, *p, g), e))
            .collect();
        let msgs: Vec<Message<'_>> = payloads.iter().map(|p| message(p)).collect();
        let _ = log.append(&msgs)?;
    }
    log.close()
}

fn message(payload: &[u8]) -> Message<'_> {
    Message {
        id: InnerMsgId::NONE,
        key: None,
        headers: &[],
        payload,
    }
}

impl GroupStore {
    /// Opens (or creates) the groups log under `dir`, replays it, compacts
    /// it if it is larger than `compact_bytes`, and starts the owning
    /// thread. Returns the replayed state.
    pub fn open(
        dir: PathBuf,
        setup: impl Into<StoreSetup>,
        compact_bytes: u64,
        collector: Collector,
    ) -> Result<(GroupStore, HashMap<GroupKey, StoredGroup>), StorageError> {
        let setup = setup.into();
        settle_swap(&dir).map_err(StorageError::io(&dir))?;
        let mut log = Log::open(&dir, log_options(&setup))?;
        let state = replay(&log)?;
        if log_bytes(&log) > compact_bytes {
            // The replayed state is the snapshot: nothing else knows the
            // groups yet.
            let entries: Vec<(GroupKey, Entry)> = state
                .iter()
                .flat_map(|(k, g)| {
                    let snapshot = Entry::Snapshot {
                        committed: g.committed,
                        acked_above: g.acked_above.iter().copied().collect(),
                    };
                    let delays = Entry::Delays {
                        delays: g.delayed.iter().map(|(o, d)| (*o, *d)).collect(),
                    };
                    [(k.clone(), snapshot), (k.clone(), delays)]
                })
                .collect();
            log = compact(
                log,
                &dir,
                setup.clone(),
                &(Box::new(move || entries.clone()) as Collector),
            )?;
        }
        let (tx, rx) = crossbeam_channel::bounded(BATCH_MAX * 4);
        let thread = std::thread::Builder::new()
            .name("bida-groups".into())
            .spawn(move || run(log, dir, setup, compact_bytes, collector, rx))
            .map_err(StorageError::io("spawn bida-groups"))?;
        Ok((
            GroupStore {
                tx: Some(tx),
                thread: Some(thread),
            },
            state,
        ))
    }

    /// Persists `entry`; the returned receiver completes once the flush
    /// policy allows acknowledging it.
    pub fn write(&self, key: (&str, u32, &str), entry: &Entry) -> oneshot::Receiver<WriteResult> {
        let (done, rx) = oneshot::channel();
        let payload = encode_entry(key, entry);
        if let Some(tx) = &self.tx {
            // The thread only stops when the store is dropped.
            let _ = tx.send(Request::Write(payload, Some(done)));
        }
        rx
    }

    /// Persists `entry` without waiting.
    pub fn write_nowait(&self, key: (&str, u32, &str), entry: &Entry) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Request::Write(encode_entry(key, entry), None));
        }
    }

    /// Stops the thread after it has written everything queued, and closes
    /// the log cleanly.
    pub fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GroupStore {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn log_bytes(log: &Log) -> u64 {
    log.segments().iter().map(|s| s.size_bytes).sum()
}

fn run(
    mut log: Log,
    dir: PathBuf,
    setup: StoreSetup,
    compact_bytes: u64,
    collector: Collector,
    rx: Receiver<Request>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    // Compact when the log outgrows both the threshold and twice what the
    // last snapshot took, so a large snapshot does not trigger itself.
    let mut threshold = compact_bytes.max(2 * log_bytes(&log));
    let mut compact_due = false;
    loop {
        if compact_due {
            log = match compact(log, &dir, setup.clone(), &collector) {
                Ok(l) => {
                    threshold = compact_bytes.max(2 * log_bytes(&l));
                    l
                }
                Err(e) => match reopen_after_failed_compaction(&dir, &setup) {
                    Ok(l) => {
                        // The log as it was (or the finished snapshot):
                        // acks go on being stored; compaction is tried
                        // again at twice the size.
                        tracing::warn!(error = %e, "compacting the groups log failed; kept the log and go on");
                        threshold = threshold.saturating_mul(2);
                        l
                    }
                    Err(reopen) => {
                        tracing::error!(error = %e, reopen = %reopen, "compacting the groups log failed and it cannot be reopened; acks can no longer be stored");
                        let cause = Arc::new(e);
                        for Request::Write(_, done) in rx.iter() {
                            if let Some(d) = done {
                                let _ = d.send(Err(Arc::clone(&cause)));
                            }
                        }
                        return;
                    }
                },
            };
        }
        let Ok(first) = rx.recv() else { break };
        batch.clear();
        batch.push(first);
        batch.extend(rx.try_iter().take(BATCH_MAX - 1));
        let msgs: Vec<Message<'_>> = batch
            .iter()
            .flat_map(|Request::Write(records, _)| records.iter().map(|p| message(p)))
            .collect();
        let result = log
            .append(&msgs)
            .and_then(|a| match setup.flush {
                FlushMode::Sync => log.wait_durable(a.durable_target()),
                FlushMode::Async { .. } => Ok(()),
            })
            .map_err(Arc::new);
        drop(msgs);
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing to the groups log failed");
        }
        for Request::Write(_, done) in batch.drain(..) {
            if let Some(d) = done {
                let _ = d.send(result.clone());
            }
        }
        compact_due = log_bytes(&log) > threshold;
    }
    if let Err(e) = log.close() {
        tracing::error!(error = %e, "closing the groups log failed");
    }
}

/// After a compaction failed part way: the swap settled (undone, or
/// finished if the snapshot was complete), the log opened again.
fn reopen_after_failed_compaction(dir: &Path, setup: &StoreSetup) -> Result<Log, StorageError> {
    settle_swap(dir).map_err(StorageError::io(dir))?;
    if !dir.exists() {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        return Err(StorageError::io(dir)(missing));
    }
    Log::open(dir, log_options(setup))
}

/// Snapshot into `_groups.tmp`, then swap it in.
fn compact(
    log: Log,
    dir: &Path,
    setup: StoreSetup,
    collector: &Collector,
) -> Result<Log, StorageError> {
    let before = log_bytes(&log);
    let entries = collector();
    write_snapshot(dir, setup.clone(), &entries)?;
    log.close()?;
    let old = dir.with_extension("old");
    fs::rename(dir, &old).map_err(StorageError::io(dir))?;
    fs::rename(dir.with_extension("tmp"), dir).map_err(StorageError::io(dir))?;
    if let Some(parent) = dir.parent() {
        fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(StorageError::io(parent))?;
    }
    fs::remove_dir_all(&old).map_err(StorageError::io(&old))?;
    let log = Log::open(dir, log_options(&setup))?;
    tracing::info!(
        groups = entries.len(),
        bytes_before = before,
        bytes_after = log_bytes(&log),
        "compacted the groups log"
    );
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::RECORD_HEADER_LEN;

    fn apply_all(state: &mut HashMap<GroupKey, StoredGroup>, k: (&str, u32, &str), e: &Entry) {
        for record in encode_entry(k, e) {
            apply(state, &record).unwrap();
        }
    }

    proptest::proptest! {
        /// `ack_range`'s fast path against the plain per-offset rule: every
        /// offset acked is settled, `committed` is the first one that is not.
        #[test]
        fn ack_ranges_match_a_per_offset_model(
            start in 0u64..50,
            ranges in proptest::collection::vec((0u64..400, 1u32..40), 1..60),
            delays in proptest::collection::vec((0u64..400, 0u64..1000), 0..20),
        ) {
            let mut g = StoredGroup { committed: start, ..Default::default() };
            for &(o, due) in &delays {
                if o >= start {
                    g.delayed.insert(o, due);
                }
            }
            let mut acked = BTreeSet::new();
            for &(first, count) in &ranges {
                g.ack_range(first, count);
                acked.extend(first..first + count as u64);
                let mut committed = start;
                while acked.contains(&committed) {
                    committed += 1;
                }
                proptest::prop_assert_eq!(g.committed, committed);
                let above: BTreeSet<u64> = acked.range(committed..).copied().collect();
                proptest::prop_assert_eq!(&g.acked_above, &above);
                for o in g.delayed.keys() {
                    proptest::prop_assert!(*o >= committed && !acked.contains(o));
                }
            }
        }
    }

    #[test]
    fn large_entries_split_into_bounded_records_that_replay_whole() {
        let long = "x".repeat(TOPIC_NAME_MAX);
        let k = (long.as_str(), 3, long.as_str());
        let key = (long.clone(), 3, long.clone());
        // 10,000 disjoint ranges above committed, 5,000 delays.
        let acked_above: Vec<u64> = (0..10_000).map(|i| 101 + 2 * i).collect();
        let delays: Vec<(u64, u64)> = (0..5_000).map(|i| (100 + 2 * i, 7 + i)).collect();
        let mut state = HashMap::new();
        // Stale state the snapshot must replace.
        apply_all(
            &mut state,
            k,
            &Entry::Acks {
                offsets: vec![1, 2, 3],
            },
        );
        let snapshot = Entry::Snapshot {
            committed: 100,
            acked_above: acked_above.clone(),
        };
        let delays_entry = Entry::Delays {
            delays: delays.clone(),
        };
        for e in [&snapshot, &delays_entry] {
            let records = encode_entry(k, e);
            assert!(records.len() > 1, "split into several records");
            for r in &records {
                assert!(r.len() + RECORD_HEADER_LEN <= RECORD_BYTES as usize);
            }
            apply_all(&mut state, k, e);
        }
        let g = &state[&key];
        assert_eq!(g.committed, 100);
        assert_eq!(
            g.acked_above.iter().copied().collect::<Vec<_>>(),
            acked_above
        );
        assert_eq!(g.delayed, delays.into_iter().collect::<BTreeMap<_, _>>());
        // An empty snapshot still writes (and replaces with) one record.
        let empty = Entry::Snapshot {
            committed: 5,
            acked_above: vec![],
        };
        assert_eq!(encode_entry(k, &empty).len(), 1);
        apply_all(&mut state, k, &empty);
        assert_eq!(
            (state[&key].committed, state[&key].acked_above.len()),
            (5, 0)
        );
    }

    #[test]
    fn delays_replay_until_acked_or_snapshotted() {
        let mut state = HashMap::new();
        let k = ("t", 0, "g");
        let key = ("t".to_string(), 0, "g".to_string());
        for e in [
            Entry::Join { start: 0 },
            Entry::Delays {
                delays: vec![(2, 900), (4, 1200)],
            },
            Entry::Acks { offsets: vec![2] },
        ] {
            apply_all(&mut state, k, &e);
        }
        assert_eq!(state[&key].delayed, BTreeMap::from([(4, 1200)]));
        apply_all(
            &mut state,
            k,
            &Entry::Snapshot {
                committed: 3,
                acked_above: vec![],
            },
        );
        assert!(state[&key].delayed.is_empty(), "a snapshot replaces all");
        // Truncated: an error, never a panic.
        let bytes = encode_entry(
            k,
            &Entry::Delays {
                delays: vec![(1, 2)],
            },
        )
        .remove(0);
        for cut in 1..bytes.len() {
            assert!(apply(&mut HashMap::new(), &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn replay_rebuilds_positions() {
        let mut state = HashMap::new();
        let k = ("t", 0, "g");
        for e in [
            Entry::Join { start: 5 },
            Entry::Acks {
                offsets: vec![7, 6, 9],
            },
            Entry::Acks { offsets: vec![5] },
        ] {
            apply_all(&mut state, k, &e);
        }
        let g = &state[&("t".to_string(), 0, "g".to_string())];
        assert_eq!(g.committed, 8);
        assert_eq!(g.acked_above.iter().copied().collect::<Vec<_>>(), vec![9]);
        apply_all(
            &mut state,
            k,
            &Entry::Snapshot {
                committed: 100,
                acked_above: vec![102],
            },
        );
        let g = &state[&("t".to_string(), 0, "g".to_string())];
        assert_eq!((g.committed, g.acked_above.len()), (100, 1));
        assert!(apply(&mut state, &[9, 0]).is_err());
    }

    fn key() -> GroupKey {
        ("t".to_string(), 1, "g".to_string())
    }

    fn snapshot_of(committed: u64, above: u64) -> Collector {
        Box::new(move || {
            vec![(
                key(),
                Entry::Snapshot {
                    committed,
                    acked_above: vec![above],
                },
            )]
        })
    }

    #[test]
    fn a_failed_compaction_leaves_a_log_to_go_on_with() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("_groups");
        let setup = StoreSetup::from(FlushMode::Sync);
        let entries = |committed| {
            vec![(
                key(),
                Entry::Snapshot {
                    committed,
                    acked_above: vec![],
                },
            )]
        };
        let log = Log::open(&dir, log_options(&setup)).unwrap();
        let payloads = encode_entry(("t", 1, "g"), &entries(5)[0].1);
        let msgs: Vec<Message<'_>> = payloads.iter().map(|p| message(p)).collect();
        log.append(&msgs).unwrap();
        log.close().unwrap();
        // Failed after the snapshot was written, before the swap: the
        // log as it was, the snapshot dropped.
        write_snapshot(&dir, setup.clone(), &entries(9)).unwrap();
        let log = reopen_after_failed_compaction(&dir, &setup).unwrap();
        assert_eq!(replay(&log).unwrap()[&key()].committed, 5);
        assert!(!dir.with_extension("tmp").exists());
        log.close().unwrap();
        // Failed between the two renames: the finished snapshot swapped in.
        write_snapshot(&dir, setup.clone(), &entries(9)).unwrap();
        fs::rename(&dir, dir.with_extension("old")).unwrap();
        let log = reopen_after_failed_compaction(&dir, &setup).unwrap();
        assert_eq!(replay(&log).unwrap()[&key()].committed, 9);
        assert!(!dir.with_extension("old").exists());
        log.close().unwrap();
    }

    #[test]
    fn store_survives_reopen_and_compaction() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("_groups");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let big = 1 << 30;
        let (store, state) =
            GroupStore::open(dir.clone(), FlushMode::Sync, big, snapshot_of(0, 0)).unwrap();
        assert!(state.is_empty());
        for i in 0..1000u64 {
            let rx = store.write(("t", 1, "g"), &Entry::Acks { offsets: vec![i] });
            if i % 100 == 99 {
                rt.block_on(rx).unwrap().unwrap();
            }
        }
        store.close();

        // Compaction at open snapshots the replayed state, not the collector.
        let (store, state) =
            GroupStore::open(dir.clone(), FlushMode::Sync, 1, snapshot_of(7, 9)).unwrap();
        assert_eq!(state[&key()].committed, 1000);
        store.close();
        let (store, state) =
            GroupStore::open(dir.clone(), FlushMode::Sync, big, snapshot_of(7, 9)).unwrap();
        assert_eq!(
            state[&key()].committed,
            1000,
            "the snapshot kept the position"
        );
        assert!(!dir.with_extension("old").exists() && !dir.with_extension("tmp").exists());
        rt.block_on(store.write(
            ("t", 1, "g"),
            &Entry::Acks {
                offsets: vec![1000],
            },
        ))
        .unwrap()
        .unwrap();
        store.close();

        // At run time the collector (the broker's live state) is the
        // snapshot: a write that more than doubles the log triggers it.
        let (store, state) =
            GroupStore::open(dir.clone(), FlushMode::Sync, 1, snapshot_of(2000, 2002)).unwrap();
        assert_eq!(state[&key()].committed, 1001);
        let spread: Vec<u64> = (0..200).map(|i| 3000 + 2 * i).collect();
        rt.block_on(store.write(("t", 1, "g"), &Entry::Acks { offsets: spread }))
            .unwrap()
            .unwrap();
        store.close();
        let (_store, state) =
            GroupStore::open(dir.clone(), FlushMode::Sync, big, snapshot_of(0, 0)).unwrap();
        let g = &state[&key()];
        assert_eq!(
            g.committed, 2000,
            "the collector's snapshot replaced the log"
        );
        assert_eq!(
            g.acked_above.iter().copied().collect::<Vec<_>>(),
            vec![2002]
        );
    }
}
