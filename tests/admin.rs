//! The admin listener of a real `bida serve`: a `/metrics` scrape parsed
//! and checked against what the test did.

mod support;

use std::time::Duration;

use bida::client::{Client, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions};
use bida::log::InnerMsgId;
use bida::protocol::body::{encode_produce, OutMessage};
use bida::protocol::Opcode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::broker::BrokerProcess;

async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bida\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

/// The value of the sample `name{labels}` (labels exactly as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let producer = Producer::new(client.clone(), "m", ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..50 {
        producer
            .send(OutgoingMessage::new(vec![b'x'; 10 + i % 2]))
            .await
            .unwrap();
    }
    // The same two ids twice: the second request stores nothing.
    let msgs: Vec<OutMessage> = (1..=2)
        .map(|i| OutMessage {
            id: InnerMsgId(0xfeed_0000 + i),
            payload: bytes::Bytes::from_static(b"dup"),
            ..OutMessage::default()
        })
        .collect();
    let mut body = Vec::new();
    encode_produce("m", 0, &msgs, &mut body);
    for _ in 0..2 {
        client.request(Opcode::Produce, &body).await.unwrap();
    }
    let consumer = Consumer::new(
        client.clone(),
        "m",
        "readers",
        ConsumerOptions {
            max_messages: 30,
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    );
    let got = consumer.fetch().await.unwrap();
    assert_eq!(got.len(), 30);
    let refs: Vec<_> = got.iter().take(20).collect();
    consumer.ack(&refs).await.unwrap();

    let (head, text) = get(broker.admin, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("openmetrics-text"),
        "{head}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "a complete exposition");
    let t = r#"{topic="m"}"#;
    assert_eq!(
        sample(&text, &format!("bida_produced_messages_total{t}")),
        Some(52.0)
    );
    assert_eq!(
        sample(&text, &format!("bida_produced_bytes_total{t}")),
        Some((25 * 10 + 25 * 11 + 2 * 3) as f64)
    );
    assert_eq!(
        sample(&text, &format!("bida_dedup_hits_total{t}")),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, &format!("bida_consumed_messages_total{t}")),
        Some(30.0)
    );
    let g = r#"{topic="m",partition="0",group="readers"}"#;
    assert_eq!(
        sample(&text, &format!("bida_group_lag_messages{g}")),
        Some(32.0)
    );
    assert_eq!(
        sample(&text, &format!("bida_group_in_flight_messages{g}")),
        Some(10.0)
    );
    assert_eq!(
        sample(&text, &format!("bida_group_committed_offset{g}")),
        Some(20.0)
    );
    let p = r#"{topic="m",partition="0"}"#;
    assert_eq!(
        sample(&text, &format!("bida_partition_end_offset{p}")),
        Some(52.0)
    );
    assert_eq!(
        sample(&text, &format!("bida_partition_segments{p}")),
        Some(1.0)
    );
    assert!(sample(&text, &format!("bida_partition_disk_bytes{p}")).unwrap() > 52.0 * 52.0);
    // 50 sends (batched by the producer into at least one request) and 2
    // raw requests, each answered once durable: at least 3 observations.
    let acks = sample(&text, "bida_produce_ack_latency_seconds_count").unwrap();
    assert!((3.0..=52.0).contains(&acks), "{acks}");
    assert!(sample(&text, "bida_fsync_latency_seconds_count").unwrap() >= 1.0);
    assert!(sample(&text, "bida_connections").unwrap() >= 1.0);
    assert_eq!(sample(&text, "bida_transactions_open"), Some(0.0));
    assert_eq!(sample(&text, "bida_delayed_pending_messages"), Some(0.0));

    let (head, _) = get(broker.admin, "/nothing-here").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
