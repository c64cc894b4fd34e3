//! Shared harness for the whole-system tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bida::log::record::{self, InnerMsgId, Message};
use bida::log::{Log, Options, Record, WritePath};

/// Small segments so tests roll often; no periodic checkpoint, so what a test
/// crashes is judged only by what the records themselves say.
pub fn options() -> Options {
    options_for(WritePath::Pwrite)
}

/// Both ways of writing, for the tests that must hold for each.
pub const WRITE_PATHS: [WritePath; 2] = [WritePath::Pwrite, WritePath::Mmap];

pub fn options_for(write_path: WritePath) -> Options {
    Options {
        write_path,
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        index_interval_bytes: 512,
        checkpoint_interval_ms: 0,
        ..Options::default()
    }
}

pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut p = format!("payload-{i}-").into_bytes();
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while p.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(x as u8);
    }
    p.truncate(len.max(8));
    p
}

pub fn id(i: u64) -> InnerMsgId {
    InnerMsgId(0xB1DA_0000_0000_0000_0000_0000_0000_0000 | u128::from(i + 1))
}

/// Appends one message per call, each durable before the next (sync mode).
pub fn append_one_by_one(log: &Log, count: u64, len: usize) -> Vec<Vec<u8>> {
    let mut written = Vec::new();
    for i in 0..count {
        let p = payload(i, len);
        let msg = Message {
            id: id(i),
            payload: &p,
            ..Message::default()
        };
        let appended = log.append_acked(&[msg]).expect("append");
        assert_eq!(appended.outcomes[0].offset, i);
        written.push(p);
    }
    written
}

pub fn read_all(log: &Log) -> Vec<Record> {
    let mut out = Vec::new();
    let mut offset = log.start_offset();
    loop {
        let batch = log.read(offset, 1000, 1 << 20).expect("read");
        if batch.records == 0 {
            return out;
        }
        for r in batch.iter() {
            out.push(r.expect("record"));
        }
        offset = batch.next_offset;
    }
}

/// Bytes a record with this payload takes (no key, no headers).
pub fn record_len(payload_len: usize) -> usize {
    record::encoded_len(0, 0, payload_len)
}

pub fn log_file(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Cuts or extends (with zeros) the file at `path` to `len` bytes.
pub fn set_file_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

pub fn patch_file(path: &Path, at: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

pub fn flip_bit(path: &Path, at: u64, bit: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 1 << bit;
    std::fs::write(path, bytes).unwrap();
}

pub mod admin;
pub mod broker;
pub mod certs;
pub mod mount;
