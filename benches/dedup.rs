//! The dedup window alone: ns per lookup (hit and miss) and per insert, at
//! windows of 1 M and 10 M ids. `cargo bench --bench dedup`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::time::Duration;

use bida::log::{DedupIndex, DedupWindow, InnerMsgId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn id(i: u64) -> InnerMsgId {
    // Producer id in the high half, sequence in the low half, as clients make them.
    InnerMsgId(0x5EED_0000_0000_0001u128 << 64 | u128::from(i))
}

fn dedup(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for window in [1_000_000u64, 10_000_000] {
        let mut index = DedupIndex::new(DedupWindow {
            records_max: window,
            age_ms_max: u64::MAX / 2,
        });
        for i in 0..window {
            index.insert(id(i), i, 1);
        }
        let per_id = index.bytes_used() as f64 / index.ids_in_window() as f64;
        eprintln!("dedup window {window}: {per_id:.1} bytes per id");
        group.throughput(Throughput::Elements(1));
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        group.bench_function(BenchmarkId::new("lookup-hit", window), |b| {
            b.iter(|| index.lookup(id(next() % window)))
        });
        group.bench_function(BenchmarkId::new("lookup-miss", window), |b| {
            b.iter(|| index.lookup(id(window + next() % (window * 100))))
        });
        let mut offset = window;
        group.bench_function(BenchmarkId::new("insert", window), |b| {
            b.iter(|| {
                index.insert(id(offset), offset, 1);
                offset += 1;
            })
        });
    }
    group.finish();
}

criterion_group!(benches, dedup);
criterion_main!(benches);
