//! Making many partitions' writes durable at once: the question behind
//! a broker of thousands of partitions under sync flush, where every
//! produce batch lands in a different file and needs its own flush.
//! `cargo bench --bench flush_many`; BIDA_BENCH_DIR measures another file
//! system. Each iteration writes one batch (100 KiB: a thousand 100 B
//! records) into each of N files, then makes all of them durable by:
//!
//! - `fdatasync` of each file from a pool of T threads (what a pool of
//!   workers does, each flush on its own);
//! - one io_uring submission of N `fsync(DATASYNC)` operations, waiting for
//!   all completions (skipped, with a message, where the kernel refuses
//!   io_uring);
//! - one `syncfs` of the file system: every dirty file and the journal in
//!   one call.

#![allow(unsafe_code)] // io_uring submissions; each block says why it holds
#![allow(clippy::unwrap_used, clippy::expect_used)] // benches fail loudly

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use io_uring::{opcode, types, IoUring};

const BATCH: usize = 100 << 10;
const FILE_BYTES: u64 = 64 << 20;

struct Files {
    _dir: tempfile::TempDir,
    files: Vec<File>,
    /// Where the next batch goes in each file (wraps around).
    at: u64,
}

impl Files {
    fn new(n: usize) -> Files {
        let dir = match std::env::var_os("BIDA_BENCH_DIR") {
            Some(d) => tempfile::tempdir_in(d).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let files = (0..n)
            .map(|i| {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(dir.path().join(format!("{i}.log")))
                    .unwrap();
                rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, FILE_BYTES)
                    .unwrap();
                f
            })
            .collect();
        File::open(dir.path()).unwrap().sync_all().unwrap();
        Files {
            _dir: dir,
            files,
            at: 0,
        }
    }

    fn write_batches(&mut self, batch: &[u8]) {
        for f in &self.files {
            f.write_all_at(batch, self.at).unwrap();
        }
        self.at = (self.at + BATCH as u64) % FILE_BYTES;
    }
}

fn sync_each(files: &[File], threads: usize) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(f) = files.get(i) else { return };
                f.sync_data().unwrap();
            });
        }
    });
}

fn sync_ring(ring: &mut IoUring, files: &[File]) {
    for chunk in files.chunks(ring.params().sq_entries() as usize) {
        for (i, f) in chunk.iter().enumerate() {
            let op = opcode::Fsync::new(types::Fd(f.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(i as u64);
            // SAFETY: an fsync has no buffer; the descriptor outlives the
            // operation (we wait for every completion below).
            unsafe { ring.submission().push(&op).unwrap() };
        }
        ring.submit_and_wait(chunk.len()).unwrap();
        let mut done = 0;
        while done < chunk.len() {
            for cqe in ring.completion() {
                assert!(cqe.result() >= 0, "fsync failed: {}", cqe.result());
                done += 1;
            }
            if done < chunk.len() {
                ring.submit_and_wait(1).unwrap();
            }
        }
    }
}

fn flush_many(c: &mut Criterion) {
    let batch = vec![0x5au8; BATCH];
    let mut ring = match IoUring::new(1024) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("io_uring refused by the kernel ({e}); measuring the others only");
            None
        }
    };
    let mut group = c.benchmark_group("flush_many");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for n in [10usize, 100, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        let mut files = Files::new(n);
        for threads in [4usize, 16] {
            group.bench_with_input(
                BenchmarkId::new(format!("fdatasync-each-{threads}-threads"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        files.write_batches(&batch);
                        sync_each(&files.files, threads);
                    })
                },
            );
        }
        if let Some(ring) = ring.as_mut() {
            group.bench_with_input(
                BenchmarkId::new("io_uring-one-submission", n),
                &n,
                |b, _| {
                    b.iter(|| {
                        files.write_batches(&batch);
                        sync_ring(ring, &files.files);
                    })
                },
            );
        }
        group.bench_with_input(BenchmarkId::new("syncfs", n), &n, |b, _| {
            b.iter(|| {
                files.write_batches(&batch);
                rustix::fs::syncfs(&files.files[0]).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, flush_many);
criterion_main!(benches);
