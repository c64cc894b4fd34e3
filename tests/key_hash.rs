//! Which partition a key goes to: the broker (ANY_PARTITION) and the Rust
//! client agree, new topics use Kafka's murmur2, and a topic created before
//! murmur2 was the default keeps the hash its producers already use.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::time::Duration;

use bida::client::{Client, OutgoingMessage, Producer, ProducerOptions, TopicConfig};
use bida::protocol::body::{ProduceReply, ANY_PARTITION};
use bida::protocol::frame::Opcode;
use bida::protocol::{KeyHash, Put};

use support::broker::BrokerProcess;

const PARTITIONS: u32 = 12;

fn keys() -> Vec<String> {
    (0..64).map(|i| format!("order-{i}")).collect()
}

/// Sends one keyed message with partition ANY and returns where the broker
/// put it.
async fn broker_pick(client: &Client, topic: &str, key: &[u8]) -> u32 {
    let mut body = Vec::new();
    body.put_str(topic);
    body.put_u32(ANY_PARTITION);
    body.put_u32(1);
    bida::protocol::body::encode_produce_message(
        bida::log::record::InnerMsgId(0),
        Some(key),
        &[],
        b"x",
        &mut body,
    );
    let reply = client.request(Opcode::Produce, &body).await.unwrap();
    ProduceReply::decode(&reply).unwrap().partition
}

async fn check_routing(client: &std::sync::Arc<Client>, topic: &str, want: KeyHash) {
    let producer = Producer::new(client.clone(), topic, ProducerOptions::default())
        .await
        .unwrap();
    let mut used = std::collections::HashSet::new();
    for key in keys() {
        let expected = want.partition(key.as_bytes(), PARTITIONS);
        let r = producer
            .send(OutgoingMessage::new(&b"p"[..]).with_key(key.clone().into_bytes()))
            .await
            .unwrap();
        assert_eq!(r.partition, expected, "client, key {key}");
        assert_eq!(
            broker_pick(client, topic, key.as_bytes()).await,
            expected,
            "broker, key {key}"
        );
        used.insert(expected);
    }
    assert!(
        used.len() > PARTITIONS as usize / 2,
        "keys spread: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_topics_hash_keys_with_murmur2_and_old_ones_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    for topic in ["new", "old"] {
        let t = client
            .create_topic(topic, PARTITIONS, false, TopicConfig::default())
            .await
            .unwrap();
        assert_eq!(t.key_hash, KeyHash::Murmur2);
    }
    check_routing(&client, "new", KeyHash::Murmur2).await;
    // Kafka's own example: murmur2("foobar") = -790332482.
    assert_eq!(
        broker_pick(&client, "new", b"foobar").await,
        (-790_332_482i32 as u32 & 0x7fff_ffff) % PARTITIONS
    );
    drop(client);
    broker.terminate();

    // A topic.json as written before the hash was recorded.
    let meta_path = dir.path().join("topics/old/topic.json");
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    assert!(meta.contains("\"key_hash\": \"murmur2\""), "{meta}");
    let mut json: serde_json::Value = serde_json::from_str(&meta).unwrap();
    json.as_object_mut().unwrap().remove("key_hash");
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();

    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let topics = client.list_topics().await.unwrap();
    let hash_of = |name: &str| topics.iter().find(|t| t.topic == name).unwrap().key_hash;
    assert_eq!(hash_of("new"), KeyHash::Murmur2);
    assert_eq!(hash_of("old"), KeyHash::Legacy);
    check_routing(&client, "old", KeyHash::Legacy).await;
    check_routing(&client, "new", KeyHash::Murmur2).await;
    let d = tokio::time::timeout(Duration::from_secs(10), client.describe_topic("old"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.summary.key_hash, KeyHash::Legacy);
}
