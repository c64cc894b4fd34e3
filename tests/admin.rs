//! The admin listener of a real `bida serve`: a `/metrics` scrape parsed
//! and checked against what the test did.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_shows_redrives_and_purges_dead_letters() {
    use support::admin::{json, poison};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    poison(&client, "orders", b"order 42: bad").await;

    let (status, o) = json(broker.admin, "GET", "/api/overview", None).await;
    assert_eq!(status, 200, "{o}");
    let topics = o["topics"].as_array().unwrap();
    let orders = topics
        .iter()
        .find(|t| t["name"] == "orders")
        .expect("orders");
    assert_eq!(orders["messages"], 1);
    assert_eq!(orders["produced_messages"], 1);
    assert_eq!(orders["dead_lettered"], 1);
    let dlq = topics
        .iter()
        .find(|t| t["name"] == "orders.dlq")
        .expect("the DLQ");
    assert_eq!(dlq["dead_letter"], true);
    assert_eq!(dlq["messages"], 1);
    let g = o["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["topic"] == "orders" && g["group"] == "workers")
        .expect("the group");
    assert_eq!(
        (g["lag"].as_u64(), g["in_flight"].as_u64()),
        (Some(0), Some(0))
    );

    // The dead letter, with its headers.
    let (status, b) = json(
        broker.admin,
        "GET",
        "/api/topics/orders.dlq/messages?partition=0&from=0",
        None,
    )
    .await;
    assert_eq!(status, 200, "{b}");
    let m = &b["messages"][0];
    assert_eq!(m["payload"], "order 42: bad");
    let header = |name: &str| {
        m["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .map(|h| h["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(header("bida-original-topic").as_deref(), Some("orders"));
    assert_eq!(header("bida-attempts").as_deref(), Some("1"));
    assert_eq!(header("kind").as_deref(), Some("order"));

    // Re-drive: back in orders at the next offset; a second click stores nothing.
    let path = "/api/topics/orders.dlq/messages/0/0/redrive";
    let (status, r) = json(broker.admin, "POST", path, None).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (
            r["topic"].as_str(),
            r["offset"].as_u64(),
            r["duplicate"].as_bool()
        ),
        (Some("orders"), Some(1), Some(false))
    );
    let (_, r) = json(broker.admin, "POST", path, None).await;
    assert_eq!(
        (r["offset"].as_u64(), r["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
    let workers = Consumer::new(
        client.clone(),
        "orders",
        "workers",
        ConsumerOptions {
            max_wait: Duration::from_millis(200),
            ..ConsumerOptions::default()
        },
    );
    let got = workers.fetch().await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"order 42: bad");
    let names: Vec<Vec<u8>> = bida::log::record::HeaderIter::new(&got[0].headers)
        .map(|h| h.unwrap().0.to_vec())
        .collect();
    assert_eq!(
        names,
        vec![b"kind".to_vec()],
        "dead-letter headers are dropped"
    );
    workers.ack(&got.iter().collect::<Vec<_>>()).await.unwrap();

    // Only dead-letter topics can be re-driven from or purged.
    let (status, e) = json(broker.admin, "POST", "/api/topics/orders/purge", None).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]
        .as_str()
        .unwrap()
        .contains("not a dead-letter topic"));
    let (status, _) = json(broker.admin, "POST", "/api/topics/nope.dlq/purge", None).await;
    assert_eq!(status, 404);
    let (status, _) = json(
        broker.admin,
        "POST",
        "/api/topics/orders.dlq/messages/0/9/redrive",
        None,
    )
    .await;
    assert!(status == 400 || status == 500, "{status}");

    let (status, p) = json(broker.admin, "POST", "/api/topics/orders.dlq/purge", None).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["messages"], 1);
    let (_, b) = json(broker.admin, "GET", "/api/topics/orders.dlq/messages", None).await;
    assert_eq!(b["messages"].as_array().unwrap().len(), 0);
    assert_eq!((b["start"].as_u64(), b["end"].as_u64()), (Some(1), Some(1)));
    // The purge holds across a restart.
    drop(broker);
    let broker = BrokerProcess::start(dir.path(), &[]);
    let (_, b) = json(broker.admin, "GET", "/api/topics/orders.dlq/messages", None).await;
    assert_eq!(
        (b["start"].as_u64(), b["messages"].as_array().map(Vec::len)),
        (Some(1), Some(0))
    );
    // The page itself is served, with no external resources.
    let (status, page) = support::admin::http(broker.admin, "GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>bida console</title>"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_protocol_and_the_admin_listener() {
    use bida::client::Connection;
    use bida::protocol::ErrorCode;
    use support::admin::http;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--auth-token", "s3cret"]);

    // No token, a wrong one: an error, and the connection is closed.
    for token in [None, Some("guess")] {
        let e = Client::connect_with_token(broker.addr, token)
            .await
            .err()
            .expect("refused");
        assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");
    }
    // A request before HELLO is refused too.
    let mut s = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let frame = bida::protocol::frame::encode(Opcode::ListTopics, 0, 7, &[]);
    s.write_all(&frame).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the broker closes the connection")
        .unwrap();
    assert!(answer.len() > 22, "an error frame");
    assert_eq!(
        u16::from_le_bytes([answer[20], answer[21]]),
        ErrorCode::Unauthorized as u16
    );
    // The right token works, and reconnections present it again.
    let c = Client::connect_with_token(broker.addr, Some("s3cret"))
        .await
        .unwrap();
    c.create_topic("t", 1, false, Default::default())
        .await
        .unwrap();
    let conn = Connection::connect_with_token(broker.addr, Some("s3cret"))
        .await
        .unwrap();
    assert!(conn.server.starts_with("bida"));

    // The admin listener: the page is public, everything else needs the token.
    assert_eq!(http(broker.admin, "GET", "/", None).await.0, 200);
    for path in ["/api/overview", "/metrics", "/api/topics/t/messages"] {
        assert_eq!(http(broker.admin, "GET", path, None).await.0, 401, "{path}");
        assert_eq!(
            http(broker.admin, "GET", path, Some("guess")).await.0,
            401,
            "{path}"
        );
        assert_eq!(
            http(broker.admin, "GET", path, Some("s3cret")).await.0,
            200,
            "{path}"
        );
    }
    assert_eq!(
        http(broker.admin, "POST", "/api/topics/t.dlq/purge", None)
            .await
            .0,
        401
    );
}
