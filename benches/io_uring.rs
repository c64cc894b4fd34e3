//! io_uring against the write path the log uses (buffered `pwrite` +
//! `fdatasync`), on the same bytes, to decide whether io_uring earns a place
//! in the engine. `cargo bench --bench io_uring`; set BIDA_BENCH_DIR to
//! measure another file system. Where the kernel refuses io_uring
//! (`io_uring_disabled`, seccomp, old kernel) the io_uring cases are skipped
//! with a message, and the fallback is measured alone.
//!
//! Two patterns, 128 MiB each into a preallocated file:
//! - sync: 256 KiB written then made durable before the next (one group
//!   commit of ~1,700 records of 100 B): `pwrite`+`fdatasync` against an
//!   io_uring write linked to an `fsync(DATASYNC)`, one submission each.
//! - stream: 1 MiB writes, durable at the end: `pwrite` against io_uring at
//!   queue depth 32, buffered and `O_DIRECT`.

// Submitting to an io_uring ring is `unsafe` (the buffers must outlive
// the operation); each block says why it holds.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use io_uring::{opcode, squeue, types, IoUring};

const TOTAL: usize = 128 << 20;

fn prealloc(path: &std::path::Path, direct: bool) -> File {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(true);
    if direct {
        o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    }
    let f = o.open(path).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, TOTAL as u64).unwrap();
    f.sync_all().unwrap();
    f
}

/// A page-aligned buffer (O_DIRECT needs alignment), from an anonymous map.
fn aligned(len: usize) -> memmap2::MmapMut {
    let mut m = memmap2::MmapMut::map_anon(len).unwrap();
    m.fill(0x5a);
    m
}

fn ring_write_sync(ring: &mut IoUring, f: &File, buf: &[u8]) {
    let fd = types::Fd(f.as_raw_fd());
    for i in 0..TOTAL / buf.len() {
        let write = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
            .offset((i * buf.len()) as u64)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(1);
        let sync = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(2);
        // SAFETY: `buf` outlives both operations: we wait for their two
        // completions before the next iteration or return.
        unsafe {
            ring.submission().push(&write).unwrap();
            ring.submission().push(&sync).unwrap();
        }
        ring.submit_and_wait(2).unwrap();
        for cqe in ring.completion() {
            assert!(cqe.result() >= 0, "io_uring op failed: {}", cqe.result());
        }
    }
}

fn ring_write_stream(ring: &mut IoUring, f: &File, buf: &[u8], depth: usize) {
    let fd = types::Fd(f.as_raw_fd());
    let count = TOTAL / buf.len();
    let (mut next, mut done, mut inflight) = (0, 0, 0);
    while done < count {
        while inflight < depth && next < count {
            let write = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                .offset((next * buf.len()) as u64)
                .build()
                .user_data(next as u64);
            // SAFETY: `buf` outlives every operation: this function returns
            // only after all `count` completions arrived.
            unsafe { ring.submission().push(&write).unwrap() };
            next += 1;
            inflight += 1;
        }
        ring.submit_and_wait(1).unwrap();
        for cqe in ring.completion() {
            assert_eq!(cqe.result(), buf.len() as i32, "short or failed write");
            done += 1;
            inflight -= 1;
        }
    }
    f.sync_data().unwrap();
}

fn io_uring_vs_pwrite(c: &mut Criterion) {
    let dir = match std::env::var_os("BIDA_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let path = dir.path().join("target");
    let mut ring = match IoUring::new(64) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("io_uring refused by the kernel ({e}); measuring the pwrite fallback only");
            None
        }
    };
    let mut group = c.benchmark_group("io_uring");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Bytes(TOTAL as u64));

    let small = aligned(256 << 10);
    group.bench_function("sync-256KiB/pwrite+fdatasync", |b| {
        let f = prealloc(&path, false);
        b.iter(|| {
            for i in 0..TOTAL / small.len() {
                f.write_all_at(&small, (i * small.len()) as u64).unwrap();
                f.sync_data().unwrap();
            }
        })
    });
    if let Some(ring) = ring.as_mut() {
        group.bench_function("sync-256KiB/io_uring-write-linked-fdatasync", |b| {
            let f = prealloc(&path, false);
            b.iter(|| ring_write_sync(ring, &f, &small))
        });
    }

    let big = aligned(1 << 20);
    group.bench_function("stream-1MiB/pwrite", |b| {
        let f = prealloc(&path, false);
        b.iter(|| {
            for i in 0..TOTAL / big.len() {
                f.write_all_at(&big, (i * big.len()) as u64).unwrap();
            }
            f.sync_data().unwrap();
        })
    });
    if let Some(ring) = ring.as_mut() {
        group.bench_function("stream-1MiB/io_uring-depth32", |b| {
            let f = prealloc(&path, false);
            b.iter(|| ring_write_stream(ring, &f, &big, 32))
        });
        group.bench_function("stream-1MiB/io_uring-depth32-O_DIRECT", |b| {
            let f = prealloc(&path, true);
            b.iter(|| ring_write_stream(ring, &f, &big, 32))
        });
    }
    group.finish();
}

criterion_group!(benches, io_uring_vs_pwrite);
criterion_main!(benches);
