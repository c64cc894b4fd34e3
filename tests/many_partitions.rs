//! Ten thousand partitions on one broker, on a 2 GiB tmpfs the test mounts:
//! a topic of 10,000 partitions is created, one message goes to each
//! partition and comes back to a consumer group, the broker is SIGKILLed
//! and restarted, and a new group reads all 10,000 again. Read from `/proc`
//! and `stat` along the way (never timed): the broker's threads stay within
//! 4 per core plus a constant, its descriptors within the file budget, its
//! memory within 32 KiB per partition, and each partition holds at most
//! 1 MiB of disk.
//!
//! Mounting needs root (CAP_SYS_ADMIN). Without it the test says so and
//! passes, unless `BIDA_REQUIRE_MOUNT=1` (set by CI when it runs as root),
//! where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, Producer, ProducerOptions};
use bida::protocol::body::TopicConfig;
use support::broker::{status_bytes, BrokerProcess};
use support::mount::mount_tmpfs;

const PARTITIONS: u32 = 10_000;
const OPEN_FILES_MAX: usize = 512;

fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The most disk any partition of `topic` holds (blocks allocated).
fn largest_partition_bytes(data: &Path, topic: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    (0..PARTITIONS)
        .map(|p| {
            std::fs::read_dir(data.join("topics").join(topic).join(p.to_string()))
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
                .sum::<u64>()
        })
        .max()
        .unwrap()
}

/// Reads until every partition delivered its one message (each once).
async fn read_every_partition(client: &Arc<Client>, group: &str) {
    let consumer = Consumer::new(
        Arc::clone(client),
        "many",
        group,
        ConsumerOptions {
            max_messages: 4096,
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    );
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < PARTITIONS as usize {
        assert!(Instant::now() < deadline, "{} partitions read", seen.len());
        let batch = consumer.fetch().await.unwrap();
        for d in &batch {
            assert_eq!(d.offset, 0);
            assert_eq!(
                &d.payload[..],
                format!("partition {}", d.partition).as_bytes()
            );
            assert!(seen.insert(d.partition), "partition {} twice", d.partition);
        }
        consumer
            .ack(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_partitions_on_one_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let Some(_mount) = mount_tmpfs(&mnt, "size=2g", "the 10,000-partition test") else {
        return;
    };
    let data = mnt.join("data");
    let open_files = OPEN_FILES_MAX.to_string();
    let args = ["--open-files-max", open_files.as_str()];
    let mut broker = BrokerProcess::start(&data, &args);
    let pid = broker.child.id();
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let rss_before = broker.rss_bytes();

    let client = Client::connect(broker.addr).await.unwrap();
    let summary = client
        .create_topic("many", PARTITIONS, false, TopicConfig::default())
        .await
        .unwrap();
    assert_eq!(summary.partitions, PARTITIONS);
    let producer = Arc::new(
        Producer::new(client.clone(), "many", ProducerOptions::default())
            .await
            .unwrap(),
    );
    for chunk in (0..PARTITIONS).collect::<Vec<_>>().chunks(500) {
        let sends: Vec<_> = chunk
            .iter()
            .map(|&p| {
                let payload = format!("partition {p}").into_bytes();
                let batch = producer.encode_payloads(Some(p), [&payload[..]].into_iter());
                producer.send_encoded(batch)
            })
            .collect();
        for (p, receipts) in chunk.iter().zip(futures_join(sends).await) {
            let receipts = receipts.unwrap();
            assert_eq!((receipts[0].partition, receipts[0].offset), (*p, 0));
        }
    }
    read_every_partition(&client, "first").await;

    let thread_count = threads(pid);
    assert!(
        thread_count <= 4 * cores + 16,
        "{thread_count} threads on {cores} cores"
    );
    let fds = open_descriptors(pid);
    assert!(fds <= OPEN_FILES_MAX + 200, "{fds} descriptors open");
    let rss_per_partition = broker.rss_bytes().saturating_sub(rss_before) / u64::from(PARTITIONS);
    assert!(
        rss_per_partition <= 32 << 10,
        "{rss_per_partition} bytes of RSS per partition (VmRSS {} before, {} after; RssAnon {})",
        rss_before,
        broker.rss_bytes(),
        status_bytes(pid, "RssAnon:")
    );
    let largest = largest_partition_bytes(&data, "many");
    assert!(
        largest <= 1 << 20,
        "a partition holds {largest} bytes of disk"
    );
    eprintln!(
        "10,000 partitions: {thread_count} threads, {fds} descriptors, {rss_per_partition} B of RSS and at most {largest} B of disk per partition"
    );

    drop(producer);
    drop(client);
    broker.kill();
    let broker = BrokerProcess::start(&data, &args);
    let client = Client::connect(broker.addr).await.unwrap();
    let described = client.describe_topic("many").await.unwrap();
    assert_eq!(described.partitions.len(), PARTITIONS as usize);
    assert!(described.partitions.iter().all(|p| p.end == 1));
    read_every_partition(&client, "after-the-kill").await;
    let thread_count = threads(broker.child.id());
    assert!(
        thread_count <= 4 * cores + 16,
        "{thread_count} threads after restart"
    );
    // Reopened partitions cost no more than fresh ones: each rebuilt its
    // dedup window of one id (a window's first ring chunk was once a full
    // 128 KiB, zeroed: 75 KB per partition after a restart).
    let rss_per_partition = broker.rss_bytes().saturating_sub(rss_before) / u64::from(PARTITIONS);
    assert!(
        rss_per_partition <= 32 << 10,
        "{rss_per_partition} bytes of RSS per partition after the restart (VmRSS {}; RssAnon {})",
        broker.rss_bytes(),
        status_bytes(broker.child.id(), "RssAnon:")
    );
    eprintln!("after the restart: {rss_per_partition} B of RSS per partition");
}

/// Awaits every future, in order (the sends are already pipelined).
async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        out.push(f.await);
    }
    out
}
