//! Crashes at every step, checked against a model of what was acknowledged.
//!
//! The log runs on a `MemoryDisk`, which keeps the bytes and names *written*
//! apart from those made *durable* by a sync (see `src/log/disk/memory.rs`),
//! with no background thread (`Background::Manual`) and a manual clock, so
//! every run is deterministic and replays from its seed. Random sequences
//! of:
//!
//! - acknowledged appends (`append_acked`: durable before they return, as a
//!   sync broker acks) with ids from a small pool, so retries are common;
//! - appends left unacknowledged (written, not waited for: in flight when a
//!   crash comes);
//! - large records, so segments roll and the roll's seal is pending;
//! - background passes (seals, spare files, checkpoints), clock advances;
//! - clean closes, and crashes of three kinds: a killed process (the page
//!   cache survives), a power cut (only synced bytes and names survive), and
//!   a torn power cut (synced bytes, plus any part of the rest, torn at any
//!   byte of a sector, with a prefix of the pending renames and creations);
//!
//! and after each crash the log is reopened and checked:
//!
//! - open succeeds: no crash may leave a log that refuses to start;
//! - every acknowledged record is there, at its offset, byte for byte;
//! - the log holds a prefix of what was appended (offsets contiguous,
//!   nothing invented, nothing reordered);
//! - an acknowledged id retried inside the dedup window is not stored again
//!   (the answer is `duplicate`, pointing at the stored copy);
//! - appends work afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::path::{Path, PathBuf};

use bida::log::record::{InnerMsgId, Message};
use bida::log::{
    Background, Clock, Crash, DedupWindow, Disk, FlushMode, Log, MemoryDisk, Options, Retention,
};
use proptest::prelude::*;

const ID_POOL: u64 = 40;
const DEDUP_RECORDS_MAX: u64 = 1_000;
const DEDUP_AGE_MS: u64 = 60_000;

#[derive(Clone, Debug)]
enum Op {
    /// Acknowledged appends of these ids (0: no id), one batch.
    Acked(Vec<u64>),
    /// An append nobody waits for.
    Unacked(Vec<u64>),
    /// A record of a few KiB, so the segment fills and rolls.
    Large,
    Background,
    Advance(u64),
    Close,
    Crash(CrashKind),
}

#[derive(Clone, Copy, Debug)]
enum CrashKind {
    Process,
    PowerCut,
    Torn(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(0..=ID_POOL, 1..6).prop_map(Op::Acked),
        3 => prop::collection::vec(0..=ID_POOL, 1..6).prop_map(Op::Unacked),
        3 => Just(Op::Large),
        2 => Just(Op::Background),
        1 => (0..20_000u64).prop_map(Op::Advance),
        1 => Just(Op::Close),
        1 => Just(Op::Crash(CrashKind::Process)),
        2 => Just(Op::Crash(CrashKind::PowerCut)),
        3 => any::<u64>().prop_map(|s| Op::Crash(CrashKind::Torn(s))),
    ]
}

fn options(disk: &MemoryDisk, clock: &Clock) -> Options {
    Options {
        flush: FlushMode::Sync,
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        index_interval_bytes: 512,
        checkpoint_interval_ms: 1,
        retention: Retention {
            bytes_max: None,
            age_ms_max: None,
        },
        dedup: DedupWindow {
            records_max: DEDUP_RECORDS_MAX,
            age_ms_max: DEDUP_AGE_MS,
        },
        clock: clock.clone(),
        disk: Disk::new(disk.clone()),
        background: Background::Manual,
        ..Options::default()
    }
}

fn inner_id(i: u64) -> InnerMsgId {
    if i == 0 {
        InnerMsgId(0)
    } else {
        InnerMsgId(0xC4A5_0000_0000_0000_0000_0000_0000_0000 | u128::from(i))
    }
}

/// A payload that says which append made it, so a record found at the
/// wrong place or invented is caught.
fn payload(serial: u64, large: bool) -> Vec<u8> {
    let len = if large {
        6_000 + (serial * 977 % 6_000) as usize
    } else {
        20 + (serial * 31 % 200) as usize
    };
    let mut p = format!("append-{serial}:").into_bytes();
    p.resize(len, (serial % 251) as u8);
    p
}

#[derive(Clone, Debug)]
struct Stored {
    id: u64,
    payload: Vec<u8>,
    timestamp_ms: u64,
}

struct Model {
    /// Every record the log may hold, in offset order.
    records: Vec<Stored>,
    /// Offsets below this were acknowledged: they must survive any crash.
    acked: u64,
    serial: u64,
}

impl Model {
    /// The offset of a stored copy of `id` that the window must still hold
    /// if `id` is sent now (a duplicate answer may name any stored copy).
    fn must_remember(&self, id: u64, now_ms: u64) -> Option<u64> {
        if id == 0 {
            return None;
        }
        let next = self.records.len() as u64;
        let lowest = next.saturating_sub(DEDUP_RECORDS_MAX);
        (lowest..next).rev().find(|&o| {
            let r = &self.records[o as usize];
            r.id == id && now_ms.saturating_sub(r.timestamp_ms) < DEDUP_AGE_MS
        })
    }
}

fn append(log: &Log, clock: &Clock, model: &mut Model, ids: &[u64], large: bool, acked: bool) {
    let payloads: Vec<Vec<u8>> = ids
        .iter()
        .map(|_| {
            model.serial += 1;
            payload(model.serial, large)
        })
        .collect();
    let batch: Vec<Message<'_>> = ids
        .iter()
        .zip(&payloads)
        .map(|(&i, p)| Message {
            id: inner_id(i),
            payload: p,
            ..Message::default()
        })
        .collect();
    let now = clock.now_ms();
    let appended = if acked {
        log.append_acked(&batch).unwrap()
    } else {
        log.append(&batch).unwrap()
    };
    for ((&i, outcome), p) in ids.iter().zip(&appended.outcomes).zip(payloads) {
        let next = model.records.len() as u64;
        if let Some(kept) = model.must_remember(i, now) {
            assert!(
                outcome.duplicate,
                "id {i} stored at {kept} is in the window; the log answered {outcome:?}"
            );
        }
        if outcome.duplicate {
            let stored = model.records.get(outcome.offset as usize).map(|s| s.id);
            assert_eq!(stored, Some(i), "a duplicate answer points at another id");
        } else {
            assert_eq!(outcome.offset, next, "offsets are contiguous");
            model.records.push(Stored {
                id: i,
                payload: p,
                timestamp_ms: now,
            });
        }
    }
    if acked {
        model.acked = model.records.len() as u64;
    }
}

/// Reads the whole log and checks it against the model: a prefix of what
/// was appended, holding at least every acknowledged record. The model
/// keeps what survived.
fn check(log: &Log, model: &mut Model, what: &str) {
    let mut offset = log.start_offset();
    assert_eq!(offset, 0, "{what}: nothing was deleted");
    loop {
        let batch = log.read(offset, 256, 1 << 20).unwrap();
        if batch.records == 0 {
            break;
        }
        for record in batch.iter() {
            let record = record.unwrap_or_else(|e| panic!("{what}: reading {offset}: {e}"));
            assert_eq!(record.offset, offset, "{what}: offsets contiguous");
            let expected = model
                .records
                .get(offset as usize)
                .unwrap_or_else(|| panic!("{what}: offset {offset} was never appended"));
            assert_eq!(record.id, inner_id(expected.id), "{what}: id at {offset}");
            assert!(
                record.payload == expected.payload,
                "{what}: payload at {offset} differs from what was appended"
            );
            offset += 1;
        }
    }
    assert_eq!(log.next_offset(), offset, "{what}: next offset");
    assert!(
        offset >= model.acked,
        "{what}: acknowledged offsets below {} but the log ends at {offset}",
        model.acked
    );
    // What survived and was not acknowledged may sit only in the page
    // cache (after a killed process): it is not durable until a flush.
    model.records.truncate(offset as usize);
}

fn run(ops: &[Op]) {
    let disk = MemoryDisk::new();
    let clock = Clock::manual(1_700_000_000_000);
    let dir = PathBuf::from("/data/topic/0");
    let open = |what: &str| {
        Log::open(&dir, options(&disk, &clock))
            .unwrap_or_else(|e| panic!("{what}: open refused the crashed log: {e}"))
    };
    let mut log = Some(open("first open"));
    let mut model = Model {
        records: Vec::new(),
        acked: 0,
        serial: 0,
    };
    for (step, op) in ops.iter().enumerate() {
        let l = log.as_ref().unwrap();
        match op {
            Op::Acked(ids) => append(l, &clock, &mut model, ids, false, true),
            Op::Unacked(ids) => append(l, &clock, &mut model, ids, false, false),
            Op::Large => append(l, &clock, &mut model, &[0], true, false),
            Op::Background => l.background_pass(),
            Op::Advance(ms) => clock.advance(*ms),
            Op::Close => {
                log.take().unwrap().close().unwrap();
                log = Some(open(&format!("step {step}: reopen after close")));
                let reopened = log.as_ref().unwrap();
                assert_eq!(
                    reopened.next_offset(),
                    model.records.len() as u64,
                    "a clean close keeps everything"
                );
            }
            Op::Crash(kind) => {
                let crash = match kind {
                    CrashKind::Process => Crash::Process,
                    CrashKind::PowerCut => Crash::PowerCut,
                    CrashKind::Torn(seed) => Crash::TornPowerCut { seed: *seed },
                };
                disk.crash(crash);
                // The dead process's log can no longer touch the disk.
                drop(log.take());
                let what = format!("step {step}: after {crash:?}");
                log = Some(open(&what));
                check(log.as_ref().unwrap(), &mut model, &what);
                if matches!(kind, CrashKind::Process) {
                    assert_eq!(
                        log.as_ref().unwrap().next_offset(),
                        model.records.len() as u64
                    );
                }
            }
        }
    }
    let l = log.as_ref().unwrap();
    check(l, &mut model, "the end");
    // Appends work after everything, and acked ids are still recognised.
    let retry: Vec<u64> = model.records.iter().rev().take(3).map(|s| s.id).collect();
    append(l, &clock, &mut model, &retry, false, true);
}

proptest! {
    // PROPTEST_CASES=20000 for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn acknowledged_records_survive_every_crash(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}

/// The state the roll fix of 1e12055 prevents: a crash between the roll's
/// rename of the next segment into place and the end of the old segment's
/// flush. Rolls flush first now; every kind of crash right after a roll
/// must reopen.
#[test]
fn crashes_right_after_rolls_reopen() {
    for seed in 0..64 {
        let mut ops = vec![Op::Acked(vec![1, 2])];
        for _ in 0..14 {
            ops.push(Op::Large);
        }
        ops.push(Op::Unacked(vec![3]));
        ops.push(Op::Crash(CrashKind::Torn(seed)));
        ops.push(Op::Acked(vec![1, 2, 4]));
        run(&ops);
    }
}

/// The memory disk must not make this test vacuous: a log whose acked
/// data is damaged on the "device" after a crash fails the check.
#[test]
#[should_panic(expected = "acknowledged offsets below")]
fn the_checker_catches_lost_acknowledged_records() {
    let disk = MemoryDisk::new();
    let clock = Clock::manual(1_700_000_000_000);
    let dir = Path::new("/data/t/0");
    let log = Log::open(dir, options(&disk, &clock)).unwrap();
    let mut model = Model {
        records: Vec::new(),
        acked: 0,
        serial: 0,
    };
    append(&log, &clock, &mut model, &[1, 2, 3], false, true);
    disk.crash(Crash::PowerCut);
    drop(log);
    // Zero the acked records, as a device that lied about its flush would.
    let segment = disk
        .file_names()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    disk.damage(&segment, |bytes| bytes.fill(0)).unwrap();
    let log = Log::open(dir, options(&disk, &clock)).unwrap();
    check(&log, &mut model, "after damage");
}

/// Found by the model: a segment filled to within three bytes of its end
/// (too few for a length field), rolled, and not yet sealed when the
/// process died. Open took the three zero bytes for a damaged header and
/// refused the log.
#[test]
fn a_segment_filled_to_a_few_bytes_of_its_end_reopens_after_a_crash() {
    let disk = MemoryDisk::new();
    let clock = Clock::manual(1_700_000_000_000);
    let dir = Path::new("/data/t/0");
    let segment_bytes = options(&disk, &clock).segment_bytes as usize;
    let log = Log::open(dir, options(&disk, &clock)).unwrap();
    let header = bida::log::record::RECORD_HEADER_LEN;
    let mut left = segment_bytes - 3;
    while left > 0 {
        let len = left.min(12_000).max(header + 1);
        let len = if left - len < header + 1 && left != len {
            left - header - 1
        } else {
            len
        };
        let payload = vec![7u8; len - header];
        log.append_acked(&[Message {
            payload: &payload,
            ..Message::default()
        }])
        .unwrap();
        left -= len;
    }
    assert_eq!(log.segments()[0].size_bytes as usize, segment_bytes - 3);
    let more = vec![8u8; 100];
    log.append_acked(&[Message {
        payload: &more,
        ..Message::default()
    }])
    .unwrap();
    assert_eq!(log.segments().len(), 2, "the last append rolled");
    let next = log.next_offset();
    disk.crash(Crash::Process);
    drop(log);
    let log = Log::open(dir, options(&disk, &clock)).unwrap();
    assert_eq!(log.next_offset(), next);
}

fn open_log(disk: &MemoryDisk, clock: &Clock) -> Log {
    Log::open(Path::new("/data/t/0"), options(disk, clock)).unwrap()
}

fn first_segment(disk: &MemoryDisk) -> PathBuf {
    disk.file_names()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap()
}

/// Found by the model: after a killed process, open read records that were
/// only in the page cache and recorded them as durable in the checkpoint
/// without syncing them; a power cut then lost them, and the next open
/// refused the log ("offsets below 1 were recorded durable"). Open now
/// claims nothing it has not synced: such a record may still go in a power
/// cut (it was never acknowledged), the log opens, and once a retry of it
/// is answered (a duplicate, acknowledged), it survives.
#[test]
fn records_recovered_after_a_killed_process_are_durable_only_once_flushed() {
    let disk = MemoryDisk::new();
    let clock = Clock::manual(1_700_000_000_000);
    let log = open_log(&disk, &clock);
    let p = b"in the page cache only".to_vec();
    let msg = Message {
        id: inner_id(7),
        payload: &p,
        ..Message::default()
    };
    let _ = log.append(&[msg]).unwrap();
    disk.crash(Crash::Process);
    drop(log);
    let log = open_log(&disk, &clock);
    assert_eq!(log.next_offset(), 1);
    assert_eq!(log.durable_offset(), 0, "nothing synced yet");
    disk.crash(Crash::PowerCut);
    drop(log);
    let log = open_log(&disk, &clock);
    assert_eq!(
        log.next_offset(),
        0,
        "never synced, never acknowledged: gone"
    );

    let _ = log.append(&[msg]).unwrap();
    disk.crash(Crash::Process);
    drop(log);
    let log = open_log(&disk, &clock);
    let retry = log.append_acked(&[msg]).unwrap();
    assert!(
        retry.outcomes[0].duplicate,
        "the retry finds the first copy"
    );
    disk.crash(Crash::PowerCut);
    drop(log);
    let log = open_log(&disk, &clock);
    assert_eq!(log.next_offset(), 1, "an acknowledged duplicate survives");
}

/// Found by the model: open cleared a torn tail and marked the segment
/// flushed up to the end of the cleared bytes; the appends that followed
/// lay below that mark, so their flushes did nothing, and a power cut lost
/// records acknowledged as durable.
#[test]
fn appends_after_a_cleared_torn_tail_are_really_flushed() {
    let disk = MemoryDisk::new();
    let clock = Clock::manual(1_700_000_000_000);
    let log = open_log(&disk, &clock);
    let p = b"acked".to_vec();
    log.append_acked(&[Message {
        payload: &p,
        ..Message::default()
    }])
    .unwrap();
    disk.crash(Crash::PowerCut);
    drop(log);
    // A torn write past the record: garbage over the next 4 KiB.
    let segment = first_segment(&disk);
    disk.damage(&segment, |bytes| {
        let end = bida::log::record::RECORD_HEADER_LEN + p.len();
        for (i, b) in bytes[end..end + 4096].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) | 1;
        }
    })
    .unwrap();
    let log = open_log(&disk, &clock);
    assert_eq!(log.next_offset(), 1);
    assert!(log.recovery_report().bytes_truncated > 0);
    let q = b"acked after the cut".to_vec();
    log.append_acked(&[Message {
        payload: &q,
        ..Message::default()
    }])
    .unwrap();
    disk.crash(Crash::PowerCut);
    drop(log);
    let log = open_log(&disk, &clock);
    assert_eq!(log.next_offset(), 2, "an acknowledged record was lost");
}

/// A power cut can leave a record torn with later ones intact (writeback
/// and the device keep no order). None of them was acknowledged, so open
/// cuts there instead of refusing the log.
#[test]
fn a_torn_record_with_intact_unacked_records_after_it_is_cut() {
    let disk = MemoryDisk::new();
    let clock = Clock::manual(1_700_000_000_000);
    let log = open_log(&disk, &clock);
    let acked = b"acked".to_vec();
    log.append_acked(&[Message {
        payload: &acked,
        ..Message::default()
    }])
    .unwrap();
    let big = vec![5u8; 3000];
    let _ = log
        .append(&[
            Message {
                payload: &big,
                ..Message::default()
            },
            Message {
                payload: &big,
                ..Message::default()
            },
        ])
        .unwrap();
    disk.crash(Crash::Process);
    drop(log);
    let segment = first_segment(&disk);
    let second = bida::log::record::RECORD_HEADER_LEN + acked.len();
    disk.damage(&segment, |bytes| {
        bytes[second + 1024..second + 1536].fill(0)
    })
    .unwrap();
    let log = open_log(&disk, &clock);
    assert_eq!(log.next_offset(), 1, "cut at the torn record");
    assert!(log.recovery_report().bytes_truncated > 0);
}
