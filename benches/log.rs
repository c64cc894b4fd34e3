//! Criterion benchmarks of the storage engine, in process, no network.
//!
//! `cargo bench --bench log` runs all; filter with e.g.
//! `cargo bench --bench log -- append/async`. Data goes to a temporary
//! directory under $BIDA_BENCH_DIR (default: the system temp dir).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bida::log::{FlushMode, InnerMsgId, Log, Message, Options, Retention, WritePath};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("BIDA_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn options(flush: FlushMode) -> Options {
    options_with(flush, WritePath::Auto)
}

const WRITE_PATHS: [(&str, WritePath); 2] =
    [("pwrite", WritePath::Pwrite), ("mmap", WritePath::Mmap)];

fn options_with(flush: FlushMode, write_path: WritePath) -> Options {
    Options {
        flush,
        write_path,
        segment_bytes: 1 << 30,
        // Keep the disk from filling during long runs.
        retention: Retention {
            bytes_max: Some(4 << 30),
            age_ms_max: None,
        },
        retention_check_interval_ms: 500,
        ..Options::default()
    }
}

const ASYNC: FlushMode = FlushMode::Async {
    interval_ms: 100,
    bytes: 16 << 20,
};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Appends `batch` messages of `payload`, each with a fresh inner-msg-id.
fn append_batch(log: &Log, payload: &[u8], batch: usize) {
    let first = NEXT_ID.fetch_add(batch as u64, Ordering::Relaxed);
    let msgs: Vec<Message<'_>> = (0..batch as u64)
        .map(|i| Message {
            id: InnerMsgId(u128::from(first + i) | 1 << 100),
            payload,
            ..Message::default()
        })
        .collect();
    log.append_acked(&msgs).unwrap();
}

fn append(c: &mut Criterion) {
    let modes = [("async", ASYNC), ("sync", FlushMode::Sync)];
    for ((mode_name, mode), (path_name, path)) in
        modes.into_iter().flat_map(|m| WRITE_PATHS.map(|p| (m, p)))
    {
        let mut group = c.benchmark_group(format!("append/{mode_name}/{path_name}"));
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        group.sample_size(10);
        for size in [100usize, 1024, 16 << 10] {
            for batch in [1usize, 64, 1024] {
                let dir = bench_dir();
                let log = Log::open(dir.path(), options_with(mode, path)).unwrap();
                let payload = vec![0x5a; size];
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{size}B"), batch),
                    &batch,
                    |b, &batch| b.iter(|| append_batch(&log, &payload, batch)),
                );
                drop(log);
            }
        }
        group.finish();
    }
}

/// Eight threads, each appending batches of 1024 and waiting for its own
/// durability: group commit against the same load in async mode.
fn concurrent(c: &mut Criterion) {
    let mut group = c.benchmark_group("append/8-appenders");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group.sample_size(10);
    const THREADS: usize = 8;
    const BATCH: usize = 1024;
    for size in [100usize, 1024] {
        for (mode_name, mode) in [("async", ASYNC), ("sync", FlushMode::Sync)] {
            let dir = bench_dir();
            let log = Log::open(dir.path(), options(mode)).unwrap();
            let payload = vec![0x5a; size];
            group.throughput(Throughput::Elements((THREADS * BATCH) as u64));
            group.bench_function(
                BenchmarkId::new(mode_name, format!("{size}B-batch{BATCH}")),
                |b| {
                    b.iter_custom(|iters| {
                        let started = Instant::now();
                        std::thread::scope(|s| {
                            for _ in 0..THREADS {
                                s.spawn(|| {
                                    for _ in 0..iters {
                                        append_batch(&log, &payload, BATCH);
                                    }
                                });
                            }
                        });
                        started.elapsed()
                    })
                },
            );
            drop(log);
        }
    }
    group.finish();
}

/// Sequential reads of 1 KiB records in 1 MiB batches, each record decoded
/// and its checksum verified.
fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    group.sample_size(10);
    let dir = bench_dir();
    let log = Log::open(dir.path(), options(ASYNC)).unwrap();
    let payload = vec![0x5a; 1024];
    let total: u64 = 256 * 1024;
    for _ in 0..total / 1024 {
        append_batch(&log, &payload, 1024);
    }
    log.flush().unwrap();
    let bytes = log.segments().iter().map(|s| s.size_bytes).sum::<u64>();
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("1KiB-records-verified", |b| {
        b.iter(|| {
            let mut offset = 0;
            let mut seen = 0u64;
            while offset < total {
                let batch = log.read(offset, usize::MAX, 1 << 20).unwrap();
                for r in batch.iter() {
                    seen += r.unwrap().payload.len() as u64;
                }
                offset = batch.next_offset;
            }
            assert_eq!(seen, total * 1024);
        })
    });
    group.finish();
}

/// Opening after a crash: verify every record of a 1 GiB active segment and
/// rebuild its indexes and the dedup window.
fn recovery(c: &mut Criterion) {
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let dir = bench_dir();
    let opts = Options {
        segment_bytes: (1 << 30) + (1 << 20),
        ..options(ASYNC)
    };
    {
        let log = Log::open(dir.path(), opts.clone()).unwrap();
        let payload = vec![0x5a; 1024 - bida::log::record::RECORD_HEADER_LEN];
        for _ in 0..1024 {
            append_batch(&log, &payload, 1024);
        }
        log.flush().unwrap();
        assert_eq!(log.segments().len(), 1);
        // Dropped without close: every open below is an unclean one.
    }
    group.throughput(Throughput::Bytes(1 << 30));
    group.bench_function("1GiB-segment-unclean-open", |b| {
        b.iter(|| {
            let log = Log::open(dir.path(), opts.clone()).unwrap();
            assert_eq!(log.recovery_report().records_verified, 1 << 20);
            drop(log);
        })
    });
    group.finish();
}

criterion_group!(benches, append, concurrent, read, recovery);
criterion_main!(benches);
