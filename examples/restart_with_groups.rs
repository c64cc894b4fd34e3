//! How long a broker takes to open with much group state: a topic of two
//! partitions holding `MESSAGES` messages of 100 B, and `GROUPS` consumer
//! groups that have acked all of it in small ranges, some out of order
//! (every fifth range after the one that follows it), as many consumers
//! acking concurrently do.
//!
//! ```sh
//! cargo run --release --example restart_with_groups -- ./restart-data 10000000 100
//! ```
//!
//! The first run builds the data directory (kept for later runs); every run
//! then times `Broker::open` three times each way, after a clean stop and
//! after a crash (a child process opens the broker and aborts, so every
//! log's tail is verified at the next open), and checks that the groups'
//! positions survived.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::path::PathBuf;
use std::time::Instant;

use bida::broker::group_store::{Entry, GroupStore, StoreSetup};
use bida::broker::{Broker, BrokerConfig};
use bida::log::record::{InnerMsgId, Message};
use bida::log::FlushMode;
use bida::protocol::body::{CreateTopic, ProduceRequest, TopicConfig};

const TOPIC: &str = "restart";
const PARTITIONS: u32 = 2;
/// Offsets per acked range.
const RANGE: u64 = 250;
/// Ranges per groups-log entry (one ack batch).
const RANGES_PER_ENTRY: u64 = 40;

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        admin_listen: None,
        flush: FlushMode::Async {
            interval_ms: 100,
            bytes: 16 << 20,
        },
        ..BrokerConfig::default()
    }
}

fn build(dir: &std::path::Path, messages: u64, groups: u32) {
    let broker = Broker::open(config(dir)).expect("open");
    broker
        .create_topic(&CreateTopic {
            topic: TOPIC.into(),
            partitions: PARTITIONS,
            if_not_exists: true,
            config: TopicConfig::default(),
        })
        .expect("create");
    let payload = [0x42u8; 100];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let per_partition = messages / PARTITIONS as u64;
    for p in 0..PARTITIONS {
        let mut sent = 0u64;
        while sent < per_partition {
            let n = (per_partition - sent).min(10_000);
            let msgs: Vec<Message<'_>> = (0..n)
                .map(|i| Message {
                    id: InnerMsgId(((p as u128) << 64) | u128::from(sent + i + 1)),
                    payload: &payload,
                    ..Message::default()
                })
                .collect();
            let ack = broker.produce(&ProduceRequest {
                topic: TOPIC,
                partition: p,
                messages: msgs,
            });
            runtime.block_on(ack).expect("produce");
            sent += n;
        }
    }
    broker.close().expect("close");
    // The groups log as acks would have left it.
    let (store, _) = GroupStore::open(
        dir.join("_groups"),
        StoreSetup {
            flush: FlushMode::Async {
                interval_ms: 100,
                bytes: 16 << 20,
            },
            segment_bytes: 64 << 20,
            flush_journal: None,
        },
        u64::MAX,
        Box::new(Vec::new),
    )
    .expect("groups");
    for g in 0..groups {
        let group = format!("g{g}");
        for p in 0..PARTITIONS {
            store.write_nowait((TOPIC, p, &group), &Entry::Join { start: 0 });
            let ranges = per_partition.div_ceil(RANGE);
            let order: Vec<u64> = (0..ranges)
                .map(|r| match r % 5 {
                    // Every fifth range is acked after the next one.
                    0 if r + 1 < ranges => r + 1,
                    1 if r >= 1 && (r - 1) % 5 == 0 => r - 1,
                    _ => r,
                })
                .collect();
            for chunk in order.chunks(RANGES_PER_ENTRY as usize) {
                let mut offsets = Vec::with_capacity(chunk.len() * RANGE as usize);
                for &r in chunk {
                    offsets.extend(r * RANGE..((r + 1) * RANGE).min(per_partition));
                }
                offsets.sort_unstable();
                store.write_nowait((TOPIC, p, &group), &Entry::Acks { offsets });
            }
        }
    }
    store.close();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("./restart-data", String::as_str));
    let messages: u64 = args
        .get(2)
        .map_or(10_000_000, |s| s.parse().expect("messages"));
    let groups: u32 = args.get(3).map_or(100, |s| s.parse().expect("groups"));
    if args.get(4).map(String::as_str) == Some("abort") {
        // The crash: open, then die without closing anything.
        let _broker = Broker::open(config(&dir)).expect("open");
        std::process::abort();
    }
    if !dir.exists() {
        let t = Instant::now();
        build(&dir, messages, groups);
        println!(
            "built {} ({messages} messages, {groups} groups) in {:.1} s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let groups_bytes: u64 = std::fs::read_dir(dir.join("_groups"))
        .expect("groups dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("_groups: {:.1} MB on disk", groups_bytes as f64 / 1e6);
    for crash in [false, true, false, true, false, true] {
        if crash {
            let status = std::process::Command::new(&args[0])
                .args([&args[1], &args[2], &args[3], "abort"])
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run the crashing child");
            assert!(!status.success(), "the child aborts");
        }
        let t = Instant::now();
        let broker = Broker::open(config(&dir)).expect("open");
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let topic = broker.topic(TOPIC).expect("topic");
        for g in [0, groups - 1] {
            let positions = broker.positions(&topic, &format!("g{g}"));
            for p in &positions {
                assert_eq!(p.committed, p.end, "group g{g} kept its position");
            }
        }
        println!(
            "open after a {}: {open_ms:.0} ms",
            if crash {
                "crash (SIGABRT)"
            } else {
                "clean stop"
            }
        );
        drop(topic);
        broker.close().expect("close");
    }
}
