//! Builds a valid log (three segments: two sealed, one active), applies
//! fuzzer-chosen truncations, bit flips and garbage to its files, then opens
//! it. It must never panic; whatever it returns must be the records that
//! were written, at their offsets, contiguous (or a clear error); and
//! appending must work afterwards.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bida::log::record::{InnerMsgId, Message};
use bida::log::{Log, Options, StorageError};
use libfuzzer_sys::fuzz_target;

const RECORDS: u64 = 600;

fn options() -> Options {
    Options {
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        index_interval_bytes: 1024,
        checkpoint_interval_ms: 0,
        ..Options::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    let len = 100 + (i * 37 % 400) as usize;
    let mut p = format!("record-{i}:").into_bytes();
    p.resize(len, (i % 251) as u8);
    p
}

/// The template log, built once per process: (crashed, closed) variants.
fn templates() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static TEMPLATES: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let crashed = root.path().join("crashed");
        let closed = root.path().join("closed");
        for (dir, close) in [(&crashed, false), (&closed, true)] {
            let log = Log::open(dir, options()).unwrap();
            for i in 0..RECORDS {
                let p = payload(i);
                let msg = Message {
                    id: InnerMsgId(u128::from(i) + 1),
                    payload: &p,
                    ..Message::default()
                };
                // One record per durable append, as a producer in sync mode.
                log.append_acked(&[msg]).unwrap();
            }
            assert!(log.segments().len() >= 3);
            if close {
                log.close().unwrap();
            }
        }
        (root, crashed, closed)
    })
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != "LOCK"))
        .collect();
    files.sort();
    files
}

fuzz_target!(|data: &[u8]| {
    let Some((&variant, mut ops)) = data.split_first() else {
        return;
    };
    let (_, crashed, closed) = templates();
    let source = if variant & 1 == 0 { crashed } else { closed };
    let work = tempfile::tempdir().unwrap();
    for f in files(source) {
        std::fs::copy(&f, work.path().join(f.file_name().unwrap())).unwrap();
    }
    let targets = files(work.path());
    // Each op: [file, kind, pos u32 LE, arg]
    while ops.len() >= 7 {
        let (op, rest) = ops.split_at(7);
        ops = rest;
        let file = &targets[op[0] as usize % targets.len()];
        let mut bytes = std::fs::read(file).unwrap();
        if bytes.is_empty() {
            continue;
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
        std::fs::write(file, bytes).unwrap();
    }
    let log = match Log::open(work.path(), options()) {
        Ok(log) => log,
        Err(StorageError::Corrupt { .. } | StorageError::Io { .. }) => return,
        Err(e) => panic!("unexpected error kind: {e}"),
    };
    assert!(
        log.next_offset() <= RECORDS,
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
