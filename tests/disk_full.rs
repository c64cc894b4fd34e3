//! A broker on a 64 MiB tmpfs that the test mounts: producers fill it and
//! get a clear DISK_FULL error; reads keep working and every acked message
//! reads back intact; the broker does not crash; writes resume once
//! retention frees space; `bida inspect` finds nothing damaged.
//!
//! Mounting needs root (CAP_SYS_ADMIN). Without it the test says so and
//! passes, unless `BIDA_REQUIRE_MOUNT=1` (set by CI), where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions};
use bida::protocol::ErrorCode;

use support::broker::BrokerProcess;
use support::mount::mount_tmpfs;

/// Message `i`: its number, then filler derived from it.
fn message(i: u64) -> Vec<u8> {
    let mut m = i.to_le_bytes().to_vec();
    m.extend((0..(64 << 10) - 8).map(|k| (i as usize + k) as u8));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_keeps_reads_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let Some(mount) = mount_tmpfs(&mnt, "size=64m", "the disk-full test") else {
        return;
    };
    let data = mnt.join("data");
    let config = dir.path().join("bida.toml");
    std::fs::write(
        &config,
        "segment_bytes = 4194304\nretention_ms = 8000\nretention_check_interval_ms = 200\n",
    )
    .unwrap();
    let mut broker = BrokerProcess::start(&data, &["--config", config.to_str().unwrap()]);
    let client = Client::connect(broker.addr).await.unwrap();
    let options = ProducerOptions {
        attempts: 1,
        request_timeout: Duration::from_secs(10),
        ..ProducerOptions::default()
    };
    let producer = Producer::new(client.clone(), "fill", options.clone())
        .await
        .unwrap();

    // Fill the disk, one message at a time, until the broker refuses.
    let mut acked = 0u64;
    let full = loop {
        assert!(acked < 2000, "64 MiB never filled");
        match producer.send(OutgoingMessage::new(message(acked))).await {
            Ok(r) => {
                assert_eq!(r.offset, acked);
                acked += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(full.code(), Some(ErrorCode::DiskFull), "{full}");
    assert!(
        full.to_string().to_lowercase().contains("space"),
        "the error says why: {full}"
    );
    assert!(acked > 500, "most of the 64 MiB was used: {acked}");
    // Still refused, still alive.
    let again = producer.send(OutgoingMessage::new(message(acked))).await;
    let again = again.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::DiskFull), "{again}");
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the broker crashed"
    );

    // Reads keep working, and every acked message is intact.
    let reader = Consumer::new(
        client.clone(),
        "fill",
        "check",
        ConsumerOptions {
            max_messages: 64,
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    );
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < acked {
        assert!(Instant::now() < deadline, "read {next} of {acked}");
        for d in reader.fetch().await.unwrap() {
            assert_eq!(d.offset, next);
            assert!(d.payload[..] == message(next)[..], "message {next} damaged");
            next += 1;
        }
    }

    // Retention deletes the old segments; writes resume.
    let deadline = Instant::now() + Duration::from_secs(40);
    let resumed = loop {
        assert!(Instant::now() < deadline, "writes never resumed");
        match producer.send(OutgoingMessage::new(message(acked))).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::DiskFull), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(resumed.offset, acked, "offsets go on where they stopped");
    for i in acked + 1..acked + 20 {
        producer
            .send(OutgoingMessage::new(message(i)))
            .await
            .unwrap();
    }

    // A clean stop, then an offline check of every log.
    drop(producer);
    drop(reader);
    drop(client);
    broker.terminate();
    let out = Command::new(env!("CARGO_BIN_EXE_bida"))
        .arg("inspect")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspect found damage:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(mount);
}

/// A topic the disk has no room for (here: no inodes left for its
/// partitions' directories) is refused with DISK_FULL, and nothing of it is
/// left behind: not listed, no directory, and a smaller topic can still be
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_disk_has_no_room_for_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let Some(_mount) = mount_tmpfs(
        &mnt,
        "size=64m,nr_inodes=2000",
        "the topic-creation disk-full test",
    ) else {
        return;
    };
    let data = mnt.join("data");
    let broker = BrokerProcess::start(&data, &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let err = client
        .create_topic("huge", 5000, false, Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::DiskFull), "{err}");
    assert!(
        !data.join("topics/huge").exists(),
        "the half-made topic was removed"
    );
    assert!(client.list_topics().await.unwrap().is_empty());
    let small = client
        .create_topic("small", 4, false, Default::default())
        .await
        .unwrap();
    assert_eq!(small.partitions, 4);
}
