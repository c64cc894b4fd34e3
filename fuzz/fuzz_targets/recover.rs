//! Recovery of a crashed and damaged log, in memory.
//!
//! Two template logs are built once per process on a `MemoryDisk` (8 KiB
//! segments, at least three, the last one active): one closed cleanly, one still open with records
//! appended and not yet acknowledged (in flight). Each input picks a
//! template, forks its disk, crashes it (a killed process, a power cut, or a
//! torn power cut with a seed from the input), applies fuzzer-chosen
//! truncations, bit flips and garbage to its files, and opens the log with
//! no background thread. It must never panic; whatever it returns must be
//! the records that were written, at their offsets, contiguous (or a clear
//! error); with no damage applied, every acknowledged record must be there;
//! and appending must work afterwards.
//!
//! No real file and no thread: thousands of executions a second
//! (docs/RELIABILITY.md has the rate).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bida::log::record::{InnerMsgId, Message};
use bida::log::{Background, Crash, DedupWindow, Disk, Log, MemoryDisk, Options, StorageError};
use libfuzzer_sys::fuzz_target;

/// Records acknowledged (durable) in each template.
const ACKED: u64 = 90;
/// Records appended after them and never waited for (the open template).
const IN_FLIGHT: u64 = 12;
const DIR: &str = "/log";

fn options(disk: &MemoryDisk) -> Options {
    Options {
        segment_bytes: 8 << 10,
        record_bytes_max: 4 << 10,
        index_interval_bytes: 512,
        checkpoint_interval_ms: 0,
        dedup: DedupWindow {
            records_max: 256,
            age_ms_max: 600_000,
        },
        disk: Disk::new(disk.clone()),
        background: Background::Manual,
        ..Options::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    let len = 60 + (i * 37 % 300) as usize;
    let mut p = format!("record-{i}:").into_bytes();
    p.resize(len, (i % 251) as u8);
    p
}

fn message(i: u64, p: &[u8]) -> Message<'_> {
    Message {
        id: InnerMsgId(u128::from(i) + 1),
        payload: p,
        ..Message::default()
    }
}

struct Template {
    disk: MemoryDisk,
    /// The open template's log stays open (its process "runs" until the
    /// fork is crashed).
    _log: Option<Log>,
}

/// The two templates: (closed, open with records in flight).
fn templates() -> &'static (Template, Template) {
    static TEMPLATES: OnceLock<(Template, Template)> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let build = |close: bool| {
            let disk = MemoryDisk::new();
            let log = Log::open(DIR, options(&disk)).unwrap();
            for i in 0..ACKED {
                let p = payload(i);
                // One record per durable append, as a producer in sync mode.
                log.append_acked(&[message(i, &p)]).unwrap();
            }
            assert!(log.segments().len() >= 3);
            if close {
                log.close().unwrap();
                return Template { disk, _log: None };
            }
            for i in ACKED..ACKED + IN_FLIGHT {
                let p = payload(i);
                let _ = log.append(&[message(i, &p)]).unwrap();
            }
            Template {
                disk,
                _log: Some(log),
            }
        };
        (build(true), build(false))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&variant, rest)) = data.split_first() else {
        return;
    };
    let Some((seed, mut ops)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let (closed, open) = templates();
    let template = if variant & 1 == 0 { closed } else { open };
    let disk = template.disk.fork();
    disk.crash(match (variant >> 1) % 3 {
        0 => Crash::Process,
        1 => Crash::PowerCut,
        _ => Crash::TornPowerCut {
            seed: u64::from_le_bytes(*seed),
        },
    });
    let targets: Vec<PathBuf> = disk
        .file_names()
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "LOCK"))
        .collect();
    let damaged = ops.len() >= 7;
    // Each op: [file, kind, pos u32 LE, arg]
    while ops.len() >= 7 {
        let (op, rest) = ops.split_at(7);
        ops = rest;
        let file = &targets[op[0] as usize % targets.len()];
        disk.damage(file, |bytes| {
            if bytes.is_empty() {
                return;
            }
            let pos = u32::from_le_bytes([op[2], op[3], op[4], op[5]]) as usize % bytes.len();
            match op[1] % 4 {
                0 => bytes.truncate(pos),
                1 => bytes[pos] ^= 1 << (op[6] % 8),
                2 => {
                    let end = (pos + op[6] as usize + 1).min(bytes.len());
                    for (k, b) in bytes[pos..end].iter_mut().enumerate() {
                        *b = op[6].wrapping_mul(31).wrapping_add(k as u8);
                    }
                }
                _ => {
                    let end = (pos + op[6] as usize * 16 + 1).min(bytes.len());
                    bytes[pos..end].fill(0);
                }
            }
        })
        .unwrap();
    }
    let log = match Log::open(Path::new(DIR), options(&disk)) {
        Ok(log) => log,
        Err(e @ (StorageError::Corrupt { .. } | StorageError::Io { .. })) => {
            assert!(damaged, "a crash alone made the log refuse to open: {e}");
            return;
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    };
    assert!(
        log.next_offset() <= ACKED + IN_FLIGHT,
        "the log grew records nobody wrote"
    );
    let mut offset = log.start_offset();
    'read: loop {
        let batch = match log.read(offset, 64, 1 << 20) {
            Ok(b) => b,
            Err(StorageError::Corrupt { .. }) => break,
            Err(e) => panic!("unexpected read error: {e}"),
        };
        if batch.records == 0 {
            break;
        }
        for record in batch.iter() {
            let Ok(record) = record else { break 'read };
            assert_eq!(record.offset, offset, "offsets must be contiguous");
            assert_eq!(
                record.payload,
                payload(offset),
                "record {offset} differs from what was written"
            );
            assert_eq!(record.id, InnerMsgId(u128::from(offset) + 1));
            offset += 1;
        }
    }
    if !damaged {
        assert_eq!(log.start_offset(), 0);
        assert!(
            offset >= ACKED,
            "a crash lost acknowledged records: the log reads to {offset}, {ACKED} were acked"
        );
    }
    let next = log.next_offset();
    let p = b"after recovery".to_vec();
    let appended = log
        .append_acked(&[Message {
            payload: &p,
            ..Message::default()
        }])
        .expect("appending after recovery");
    assert_eq!(appended.outcomes[0].offset, next);
    let back = log.read(next, 1, 1 << 20).unwrap();
    let record = back.iter().next().unwrap().unwrap();
    assert_eq!(&record.payload[..], &p[..]);
});
