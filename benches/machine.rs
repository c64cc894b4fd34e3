//! The machine's own limits, to state every figure as a fraction of them:
//! memcpy bandwidth and sequential write + fdatasync bandwidth.
//! `cargo bench --bench machine` (also run by scripts/machine-limits.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::io::Write;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("machine");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let len = 64 << 20;
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    group.throughput(Throughput::Bytes(len as u64));
    group.bench_function("memcpy-64MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
        })
    });
    let dir = match std::env::var_os("BIDA_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let chunk = vec![0x5au8; 1 << 20];
    let total = 256usize << 20;
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("write-256MiB-1MiB-chunks-fdatasync", |b| {
        b.iter(|| {
            let path = dir.path().join("seq");
            let mut f = std::fs::File::create(&path).unwrap();
            for _ in 0..total / chunk.len() {
                f.write_all(&chunk).unwrap();
            }
            f.sync_data().unwrap();
            drop(f);
            std::fs::remove_file(&path).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, machine);
criterion_main!(benches);
