//! The admin listener from a test: plain HTTP/1.1 requests, and a poisoned
//! message to put something in a dead-letter topic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions};
use bida::protocol::body::{Backoff, TopicConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request; returns the status code and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: bida\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

pub async fn json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, method, path, token).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, v)
}

/// Creates `topic` (one delivery allowed), sends `payload` to it, and
/// fails its one delivery to group `workers`, so that it moves to
/// `<topic>.dlq`. Returns once it is there.
pub async fn poison(client: &Arc<Client>, topic: &str, payload: &[u8]) {
    let config = TopicConfig {
        retention_consumed: false,
        ack_timeout_ms: 60_000,
        max_deliveries: 1,
        backoff: Some(Backoff::Fixed { delay_ms: 10 }),
    };
    client.create_topic(topic, 1, true, config).await.unwrap();
    let producer = Producer::new(client.clone(), topic, ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(OutgoingMessage::new(payload.to_vec()).with_header("kind", &b"order"[..]))
        .await
        .unwrap();
    let c = Consumer::new(
        client.clone(),
        topic,
        "workers",
        ConsumerOptions {
            max_messages: 10,
            max_wait: Duration::from_millis(50),
            ..ConsumerOptions::default()
        },
    );
    let dlq = format!("{topic}.dlq");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "the message never reached {dlq}");
        for d in c.fetch().await.unwrap() {
            c.nack(&[&d], None).await.unwrap();
        }
        if let Ok(d) = client.describe_topic(&dlq).await {
            if d.partitions[0].end > 0 {
                return;
            }
        }
    }
}
