//! The dedup window against a model, with an injected clock.
//!
//! Random sequences of appends (ids from a small pool, so retries are
//! common), clock advances of up to several windows, rolls (by size and by
//! age), clean restarts, crash restarts that drop what was not flushed, and
//! flushes. After every step the log is checked against a model of what it
//! stores:
//!
//! - an id whose stored copy is inside the window when it is sent again is
//!   never stored again (the answer is `duplicate` at that copy's offset);
//!   the window is the last `records_max` offsets *and* the last
//!   `age_ms_max` milliseconds (docs/FORMAT.md, `DedupWindow`);
//! - an id outside either bound may be stored again (nothing is asserted);
//! - a `duplicate` answer always points at a stored record with that id;
//! - offsets stay contiguous, and what reads back is what the model holds.
//!
//! A crash keeps exactly the durable records: the log is dropped without
//! closing, and every byte of the active segment from the first record at
//! or past the durable offset is zeroed, as a power cut leaves unflushed
//! pages of preallocated space.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::path::Path;

use bida::log::record::{self, InnerMsgId, Message};
use bida::log::{Clock, DedupWindow, FlushMode, Log, Options, Retention, WritePath};
use proptest::prelude::*;
use support::read_all;

const RECORDS_MAX: u64 = 48;
const AGE_MS_MAX: u64 = 10_000;
const SEGMENT_AGE_MS: u64 = 4_000;
const ID_POOL: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    /// A batch of ids (0 = no id: a record never deduplicated).
    Append(Vec<u64>),
    /// A record of most of a segment, so the next append rolls by size.
    Fill,
    Advance(u64),
    Flush,
    CleanRestart,
    CrashRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec(0..=ID_POOL, 1..8).prop_map(Op::Append),
        1 => Just(Op::Fill),
        3 => prop_oneof![0..500u64, 500..5_000u64, 5_000..25_000u64].prop_map(Op::Advance),
        2 => Just(Op::Flush),
        1 => Just(Op::CleanRestart),
        2 => Just(Op::CrashRestart),
    ]
}

fn options(clock: &Clock, write_path: WritePath) -> Options {
    Options {
        write_path,
        // Nothing is flushed behind the test's back: only rolls, `flush` and
        // a clean close make records durable.
        flush: FlushMode::Async {
            interval_ms: 3_600_000,
            bytes: u64::MAX,
        },
        segment_bytes: 64 << 10,
        record_bytes_max: 48 << 10,
        segment_age_ms: SEGMENT_AGE_MS,
        index_interval_bytes: 512,
        checkpoint_interval_ms: 0,
        retention: Retention {
            bytes_max: None,
            age_ms_max: None,
        },
        dedup: DedupWindow {
            records_max: RECORDS_MAX,
            age_ms_max: AGE_MS_MAX,
        },
        clock: clock.clone(),
        ..Options::default()
    }
}

fn inner_id(i: u64) -> InnerMsgId {
    if i == 0 {
        InnerMsgId(0)
    } else {
        InnerMsgId(0xD0D0_0000_0000_0000_0000_0000_0000_0000 | u128::from(i))
    }
}

/// One stored record as the model knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stored {
    id: u64,
    timestamp_ms: u64,
}

struct Model {
    records: Vec<Stored>,
}

impl Model {
    /// The offset of a stored copy of `id` that the window must still hold
    /// when a message is appended at `offset` at `now_ms`.
    fn must_remember(&self, id: u64, offset: u64, now_ms: u64) -> Option<u64> {
        if id == 0 {
            return None;
        }
        let lowest = offset.saturating_sub(RECORDS_MAX);
        (lowest..offset.min(self.records.len() as u64))
            .rev()
            .find(|&o| {
                let r = self.records[o as usize];
                r.id == id && now_ms.saturating_sub(r.timestamp_ms) < AGE_MS_MAX
            })
    }
}

/// Zeroes the active (last) segment from the first record at or past
/// `durable`: what a power cut leaves of pages that were never flushed.
fn drop_unflushed(dir: &Path, durable: u64) {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    let last = logs.last().expect("a segment");
    let mut bytes = std::fs::read(last).unwrap();
    let mut at = 0usize;
    while let Some(fields) = bytes.get(at..).and_then(record::peek_id) {
        if fields.offset >= durable {
            break;
        }
        at += fields.len;
    }
    if bytes[at..].iter().any(|&b| b != 0) {
        bytes[at..].fill(0);
        std::fs::write(last, &bytes).unwrap();
    }
}

fn check_reads(log: &Log, model: &Model) {
    let records = read_all(log);
    assert_eq!(records.len(), model.records.len(), "record count");
    for (expected_offset, (r, m)) in records.iter().zip(&model.records).enumerate() {
        assert_eq!(r.offset, expected_offset as u64, "offsets are contiguous");
        assert_eq!(r.id, inner_id(m.id), "id at offset {}", r.offset);
        assert_eq!(r.timestamp_ms, m.timestamp_ms, "timestamp at {}", r.offset);
    }
    assert_eq!(log.next_offset(), model.records.len() as u64);
}

/// Appends one batch and checks each answer against the model.
fn append(log: &Log, clock: &Clock, model: &mut Model, step: usize, ids: &[u64], payload: &[u8]) {
    let batch: Vec<Message<'_>> = ids
        .iter()
        .map(|&i| Message {
            id: inner_id(i),
            payload,
            ..Message::default()
        })
        .collect();
    let now = clock.now_ms();
    let appended = log.append(&batch).unwrap();
    assert_eq!(appended.outcomes.len(), ids.len());
    for (&i, outcome) in ids.iter().zip(&appended.outcomes) {
        let next = model.records.len() as u64;
        if let Some(kept) = model.must_remember(i, next, now) {
            assert!(
                outcome.duplicate,
                "step {step}: id {i} stored at {kept} is in the window but was stored again at {}",
                outcome.offset
            );
        }
        if outcome.duplicate {
            let stored = model.records.get(outcome.offset as usize);
            assert_eq!(
                stored.map(|s| s.id),
                Some(i),
                "step {step}: duplicate answer for id {i} points at offset {}",
                outcome.offset
            );
        } else {
            assert_eq!(outcome.offset, next, "step {step}: offsets contiguous");
            model.records.push(Stored {
                id: i,
                timestamp_ms: now,
            });
        }
    }
}

fn run(ops: &[Op], write_path: WritePath) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_700_000_000_000);
    let mut log = Some(Log::open(dir.path(), options(&clock, write_path)).unwrap());
    let mut model = Model {
        records: Vec::new(),
    };
    let filler = vec![0xF1u8; 40 << 10];
    let small = b"retry me".to_vec();
    for (step, op) in ops.iter().enumerate() {
        let l = log.as_ref().unwrap();
        match op {
            Op::Append(ids) => append(l, &clock, &mut model, step, ids, &small),
            Op::Fill => append(l, &clock, &mut model, step, &[0], &filler),
            Op::Advance(ms) => clock.advance(*ms),
            Op::Flush => l.flush().unwrap(),
            Op::CleanRestart => {
                log.take().unwrap().close().unwrap();
                log = Some(Log::open(dir.path(), options(&clock, write_path)).unwrap());
            }
            Op::CrashRestart => {
                let durable = l.durable_offset();
                drop(log.take());
                drop_unflushed(dir.path(), durable);
                model.records.truncate(durable as usize);
                log = Some(Log::open(dir.path(), options(&clock, write_path)).unwrap());
            }
        }
        check_reads(log.as_ref().unwrap(), &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_window_holds_across_time_rolls_and_restarts(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, WritePath::Pwrite);
    }

    #[test]
    fn the_window_holds_with_the_mapped_write_path(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, WritePath::Mmap);
    }
}

/// The sequence of issue 15 in miniature: a partition with a sealed segment
/// older than the window, then recent ids, then a restart. Before the fix
/// the rebuilt window was empty and every retry was stored again.
#[test]
fn an_old_sealed_segment_does_not_empty_the_window_at_restart() {
    let ops = [
        Op::Append(vec![1, 2, 3]),
        Op::Fill,
        Op::Append(vec![4]),
        Op::Fill,
        Op::Append(vec![5]),
        Op::Advance(AGE_MS_MAX + 5_000),
        Op::Append(vec![6, 7, 8]),
        Op::CleanRestart,
        Op::Append(vec![6, 7, 8]),
        Op::Flush,
        Op::CrashRestart,
        Op::Append(vec![6, 7, 8]),
    ];
    run(&ops, WritePath::Pwrite);
}
