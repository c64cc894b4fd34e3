//! A damaged partition stops only itself, end to end against a real broker
//! process: the broker starts, the other partitions are served as usual,
//! the damaged one serves its records up to the damage and refuses writes
//! with PARTITION_DAMAGED naming the repair command, `/metrics` and the
//! console's API show it, `bida inspect` of the data directory names it,
//! and `bida repair` (refused while the broker runs, asking first, then
//! `--yes`) cuts it so it takes writes again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, Producer, ProducerOptions};
use bida::protocol::body::TopicConfig;
use bida::protocol::ErrorCode;
use support::admin::http;
use support::broker::BrokerProcess;

const PER_PARTITION: u64 = 20;
const PAYLOAD: usize = 200;
/// The record of partition 1 whose bytes the test damages.
const DAMAGED_AT: u64 = 10;

async fn send(
    producer: &Producer,
    partition: u32,
    i: u64,
) -> Result<u64, bida::client::ClientError> {
    let payload = [(i % 251) as u8; PAYLOAD];
    let batch = producer.encode_payloads(Some(partition), [&payload[..]].into_iter());
    let receipts = producer.send_encoded(batch).await?;
    Ok(receipts[0].offset)
}

fn bida(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bida"))
        .args(args)
        .env("BIDA_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_partition_stops_only_itself_until_repaired() {
    let data = tempfile::tempdir().unwrap();
    let data_arg = data.path().to_str().unwrap().to_owned();
    let mut broker = BrokerProcess::start(data.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    client
        .create_topic("t", 3, false, TopicConfig::default())
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), "t", ProducerOptions::default())
        .await
        .unwrap();
    // One at a time, each acked: later records say the earlier ones were
    // durable, so a flipped bit among them is damage, not a torn tail.
    for p in 0..3 {
        for i in 0..PER_PARTITION {
            assert_eq!(send(&producer, p, i).await.unwrap(), i);
        }
    }
    drop(producer);
    drop(client);
    assert!(broker.terminate().success());

    let segment = data.path().join("topics/t/1/00000000000000000000.log");
    let record = bida::log::record::encoded_len(0, 0, PAYLOAD) as u64;
    support::flip_bit(&segment, DAMAGED_AT * record + 100, 2);

    let mut broker = BrokerProcess::start(data.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let producer = Producer::new(client.clone(), "t", ProducerOptions::default())
        .await
        .unwrap();
    assert_eq!(send(&producer, 0, 99).await.unwrap(), PER_PARTITION);
    assert_eq!(send(&producer, 2, 99).await.unwrap(), PER_PARTITION);
    let refused = send(&producer, 1, 99).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(ErrorCode::PartitionDamaged),
        "{refused}"
    );
    let text = refused.to_string();
    assert!(
        text.contains(&format!("bida repair {data_arg} --topic t --partition 1")),
        "{text}"
    );

    // Reads: partition 1 up to the damage, the others whole.
    let consumer = Consumer::new(
        Arc::clone(&client),
        "t",
        "readers",
        ConsumerOptions {
            max_wait: Duration::from_millis(200),
            ..ConsumerOptions::default()
        },
    );
    let mut per_partition: HashMap<u32, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while per_partition.values().sum::<u64>() < 2 * (PER_PARTITION + 1) + DAMAGED_AT {
        assert!(Instant::now() < deadline, "read so far: {per_partition:?}");
        let batch = consumer.fetch().await.unwrap();
        for d in &batch {
            *per_partition.entry(d.partition).or_default() += 1;
        }
        consumer
            .ack(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
    assert_eq!(
        per_partition.get(&1),
        Some(&DAMAGED_AT),
        "{per_partition:?}"
    );

    let (status, metrics) = http(broker.admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"bida_partition_damaged{topic="t",partition="1"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"bida_partition_damaged{topic="t",partition="0"} 0"#));
    let (_, overview) = http(broker.admin, "GET", "/api/overview", None).await;
    let overview: serde_json::Value = serde_json::from_str(&overview).unwrap();
    let partitions = overview["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "t")
        .unwrap()["partitions"]
        .as_array()
        .unwrap()
        .clone();
    assert!(partitions[1]["damaged"]
        .as_str()
        .unwrap()
        .contains("bida repair"));
    assert!(partitions[0].get("damaged").is_none());

    let (code, out, _) = bida(&["inspect", &data_arg], "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("t/1: DAMAGED"), "{out}");
    assert!(
        out.contains("t/0: ok") && out.contains("_groups: ok"),
        "{out}"
    );
    assert!(out.contains("bida repair"), "{out}");

    // Not while the broker runs.
    let (code, _, err) = bida(
        &[
            "repair",
            &data_arg,
            "--topic",
            "t",
            "--partition",
            "1",
            "--yes",
        ],
        "",
    );
    assert_ne!(code, 0);
    assert!(err.contains("stop the broker"), "{err}");
    drop(consumer);
    drop(producer);
    drop(client);
    assert!(broker.terminate().success());

    // It says what it cuts and asks; "n" changes nothing.
    let args = ["repair", &data_arg, "--topic", "t", "--partition", "1"];
    let (code, out, _) = bida(&args, "n\n");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("cuts everything from offset {DAMAGED_AT} on")),
        "{out}"
    );
    assert!(out.contains("nothing changed"), "{out}");
    let (code, _, _) = bida(&["inspect", &data_arg], "");
    assert_eq!(code, 1, "still damaged");
    let (code, out, err) = bida(&[&args[..], &["--yes"]].concat(), "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("repaired") && out.contains(&format!("ends at offset {DAMAGED_AT}")),
        "{out}"
    );
    let (code, out, _) = bida(&["inspect", &data_arg], "");
    assert_eq!(code, 0, "{out}");

    let broker = BrokerProcess::start(data.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let producer = Producer::new(client, "t", ProducerOptions::default())
        .await
        .unwrap();
    assert_eq!(send(&producer, 1, 99).await.unwrap(), DAMAGED_AT);
}
