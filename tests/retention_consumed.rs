//! Retention once consumed, against a real broker process with small
//! segments and a fast retention check: nothing a group still needs is
//! deleted; a sealed segment goes once the last group has committed past
//! it; a group created later starts at the earliest offset still kept; a
//! topic nobody reads, and a topic without the policy, keep everything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, Producer, ProducerOptions};
use bida::protocol::body::TopicConfig;
use support::broker::BrokerProcess;

const MESSAGES: u64 = 3000;

fn consumer(client: &Arc<Client>, topic: &str, group: &str) -> Consumer {
    Consumer::new(
        Arc::clone(client),
        topic,
        group,
        ConsumerOptions {
            max_messages: 250,
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    )
}

/// Fetches and acks until the group has acked up to (not including)
/// `until`; returns the first offset it was given.
async fn consume_to(c: &Consumer, until: u64) -> u64 {
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "consuming to {until}");
        let batch = c.fetch().await.unwrap();
        let keep: Vec<_> = batch.iter().filter(|d| d.offset < until).collect();
        if let Some(d) = keep.first() {
            first.get_or_insert(d.offset);
        }
        c.ack(&keep).await.unwrap();
        // Deliveries at or past `until` go back at once, for the next call.
        let rest: Vec<_> = batch.iter().filter(|d| d.offset >= until).collect();
        if !rest.is_empty() {
            c.nack(&rest, Some(Duration::ZERO)).await.unwrap();
        }
        if batch.iter().any(|d| d.offset + 1 >= until) {
            return first.unwrap_or(until);
        }
    }
}

async fn start_offset(client: &Client, topic: &str) -> u64 {
    client.describe_topic(topic).await.unwrap().partitions[0].start
}

/// Waits until the topic's start offset passes `at_least` (the retention
/// check runs every 100 ms), and returns it.
async fn start_reaches(client: &Client, topic: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let start = start_offset(client, topic).await;
        if start >= at_least {
            return start;
        }
        assert!(
            Instant::now() < deadline,
            "start {start}, waiting for {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_go_once_every_group_has_consumed_them() {
    let data = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(
        data.path(),
        &[
            "--segment-bytes",
            "65536",
            "--record-bytes-max",
            "16384",
            "--retention-check-interval-ms",
            "100",
            "--ack-timeout-ms",
            "600000",
        ],
    );
    let client = Client::connect(broker.addr).await.unwrap();
    let consumed = TopicConfig {
        retention_consumed: true,
        ..TopicConfig::default()
    };
    for (topic, config) in [
        ("kept-till-read", consumed),
        ("nobody-reads", consumed),
        ("time-only", TopicConfig::default()),
    ] {
        let summary = client.create_topic(topic, 1, false, config).await.unwrap();
        assert_eq!(summary.config.retention_consumed, config.retention_consumed);
        let producer = Producer::new(client.clone(), topic, ProducerOptions::default())
            .await
            .unwrap();
        let payloads: Vec<Vec<u8>> = (0..MESSAGES).map(|i| vec![(i % 251) as u8; 200]).collect();
        for chunk in payloads.chunks(100) {
            let batch = producer.encode_payloads(Some(0), chunk.iter().map(|p| &p[..]));
            producer.send_encoded(batch).await.unwrap();
        }
    }
    let described = client.describe_topic("kept-till-read").await.unwrap();
    assert_eq!(described.partitions[0].end, MESSAGES);

    // Two groups: a fast one reads everything, a slow one half.
    let fast = consumer(&client, "kept-till-read", "fast");
    let slow = consumer(&client, "kept-till-read", "slow");
    assert_eq!(consume_to(&fast, MESSAGES).await, 0);
    assert_eq!(consume_to(&slow, MESSAGES / 2).await, 0);
    let time_only = consumer(&client, "time-only", "fast");
    consume_to(&time_only, MESSAGES).await;

    // Segments below the slow group's position go, none above it.
    let start = start_reaches(&client, "kept-till-read", 1).await;
    assert!(
        start <= MESSAGES / 2,
        "deleted {start} past the slow group's 1500"
    );
    // Give the check a few more turns: still nothing the slow group needs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = start_offset(&client, "kept-till-read").await;
    assert!(
        start <= MESSAGES / 2,
        "deleted {start} past the slow group's 1500"
    );
    assert!(
        start > MESSAGES / 4,
        "a segment the slow group passed is still kept at {start}"
    );

    // The slow group catches up: what both passed goes.
    consume_to(&slow, MESSAGES).await;
    let start = start_reaches(&client, "kept-till-read", MESSAGES / 2 + 1).await;
    assert!(start < MESSAGES, "the active segment stays");

    // A group created now starts at the earliest offset still kept.
    let late = consumer(&client, "kept-till-read", "late");
    let first = late.fetch().await.unwrap()[0].offset;
    assert_eq!(first, start_offset(&client, "kept-till-read").await);

    // Nobody reads one topic, the other keeps its time-based retention:
    // both keep everything.
    assert_eq!(start_offset(&client, "nobody-reads").await, 0);
    assert_eq!(start_offset(&client, "time-only").await, 0);
}
