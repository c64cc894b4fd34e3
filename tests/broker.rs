//! Whole-system tests: real `bida serve` processes on 127.0.0.1, ports they
//! pick, the Rust client and raw sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::broker::{
    DLQ_HEADER_ATTEMPTS, DLQ_HEADER_OFFSET, DLQ_HEADER_PARTITION, DLQ_HEADER_TOPIC,
};
use bida::client::{
    Client, ClientError, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions,
    RetryBackoff, TopicConfig,
};
use bida::log::record::HeaderIter;
use bida::protocol::body::{Backoff, Delivery, ErrorBody};
use bida::protocol::frame::{self, Opcode};
use bida::protocol::{ErrorCode, FRAME_HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::broker::BrokerProcess;

fn consumer(client: &Arc<Client>, topic: &str, group: &str, wait_ms: u64) -> Consumer {
    Consumer::new(
        client.clone(),
        topic,
        group,
        ConsumerOptions {
            max_wait: Duration::from_millis(wait_ms),
            ..ConsumerOptions::default()
        },
    )
}

fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a [u8]> {
    HeaderIter::new(&d.headers)
        .filter_map(|h| h.ok())
        .find(|(n, _)| *n == name.as_bytes())
        .map(|(_, v)| v)
}

/// Fetches until `n` deliveries arrived or `within` passed.
async fn fetch_n(c: &Consumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        out.extend(c.fetch().await.expect("fetch"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let producer = Producer::new(client.clone(), "orders", ProducerOptions::default())
        .await
        .unwrap();
    let r = producer
        .send(
            OutgoingMessage::new(&b"first"[..])
                .with_key(&b"order-1"[..])
                .with_header("trace", &b"abc"[..]),
        )
        .await
        .unwrap();
    assert_eq!((r.partition, r.offset, r.duplicate), (0, 0, false));
    let r2 = producer
        .send(OutgoingMessage::new(&b"second"[..]))
        .await
        .unwrap();
    assert_eq!(r2.offset, 1);
    assert_ne!(r.id, r2.id);

    let c = consumer(&client, "orders", "billing", 200);
    let got = fetch_n(&c, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0].payload[..], b"first");
    assert_eq!(got[0].key.as_deref(), Some(&b"order-1"[..]));
    assert_eq!(header(&got[0], "trace"), Some(&b"abc"[..]));
    assert_eq!((got[0].attempt, got[0].id), (1, r.id));
    assert_eq!(&got[1].payload[..], b"second");
    let refs: Vec<_> = got.iter().collect();
    assert_eq!(c.ack(&refs).await.unwrap(), 2);
    assert_eq!(
        c.ack(&refs).await.unwrap(),
        0,
        "acking twice changes nothing"
    );
    let pos = c.position().await.unwrap();
    assert_eq!((pos[0].committed, pos[0].end, pos[0].lag()), (2, 2, 0));
    assert!(
        c.fetch().await.unwrap().is_empty(),
        "acked messages are not delivered again"
    );

    let topics = client.list_topics().await.unwrap();
    assert_eq!(
        topics.iter().map(|t| t.topic.as_str()).collect::<Vec<_>>(),
        vec!["orders"]
    );
    let d = client.describe_topic("orders").await.unwrap();
    assert_eq!(d.groups.len(), 1);
    let err = client.describe_topic("missing").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownTopic));
    let err = client
        .create_topic("bad/name", 1, false, TopicConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidTopicName));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_pipelined_messages_are_acked_and_consumed_in_order() {
    const TOTAL: u64 = 1_000_000;
    const BATCH: usize = 1000;
    const PARTITIONS: u32 = 2;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    client
        .create_topic("big", PARTITIONS, false, TopicConfig::default())
        .await
        .unwrap();
    let producer = Arc::new(
        Producer::new(
            client.clone(),
            "big",
            ProducerOptions {
                inflight_batches_max: 16,
                ..ProducerOptions::default()
            },
        )
        .await
        .unwrap(),
    );
    // Payload: the global sequence number, so order can be checked.
    let window = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    let mut seq = 0u64;
    let started = Instant::now();
    while seq < TOTAL {
        let partition = ((seq / BATCH as u64) % PARTITIONS as u64) as u32;
        let payloads: Vec<[u8; 8]> = (seq..seq + BATCH as u64).map(|s| s.to_le_bytes()).collect();
        let batch = producer.encode_payloads(Some(partition), payloads.iter().map(|p| &p[..]));
        let permit = window.clone().acquire_owned().await.unwrap();
        let fut = producer.send_encoded(batch);
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
        seq += BATCH as u64;
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "producing took too long"
        );
    }
    let mut acked = 0;
    for t in tasks {
        let receipts = t.await.unwrap().expect("every batch is acked");
        assert!(receipts.iter().all(|r| !r.duplicate));
        acked += receipts.len() as u64;
    }
    assert_eq!(acked, TOTAL);

    let c = Consumer::new(
        client.clone(),
        "big",
        "readers",
        ConsumerOptions {
            max_messages: 10_000,
            max_wait: Duration::from_millis(200),
            ..ConsumerOptions::default()
        },
    );
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let mut next_offset: HashMap<u32, u64> = HashMap::new();
    let mut consumed = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while consumed < TOTAL {
        assert!(Instant::now() < deadline, "consumed only {consumed}");
        let batch = c.fetch().await.unwrap();
        for d in &batch {
            let s = u64::from_le_bytes(d.payload[..8].try_into().unwrap());
            let expected_offset = next_offset.entry(d.partition).or_insert(0);
            assert_eq!(
                d.offset, *expected_offset,
                "offsets contiguous per partition"
            );
            *expected_offset += 1;
            if let Some(prev) = last_seq.insert(d.partition, s) {
                assert!(
                    s > prev,
                    "partition {} out of order: {s} after {prev}",
                    d.partition
                );
            }
        }
        consumed += batch.len() as u64;
        let refs: Vec<_> = batch.iter().collect();
        if !refs.is_empty() {
            c.ack(&refs).await.unwrap();
        }
    }
    assert_eq!(consumed, TOTAL);
    let pos = c.position().await.unwrap();
    assert_eq!(pos.iter().map(|p| p.committed).sum::<u64>(), TOTAL);
}

/// Forwards bytes client→broker untouched; parses broker→client frames and
/// drops some responses whole and delays the others.
async fn lossy_proxy(broker: SocketAddr, drop_every: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut conn_no = 0u64;
        while let Ok((client, _)) = listener.accept().await {
            conn_no += 1;
            let upstream = TcpStream::connect(broker).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut uw).await;
            });
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 << 10];
                let mut n_frame = conn_no * 7;
                loop {
                    let n = match ur.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Ok(Some(h)) = frame::decode_header(&buf) {
                        let len = FRAME_HEADER_LEN + h.body_len;
                        if buf.len() < len {
                            break;
                        }
                        let f: Vec<u8> = buf.drain(..len).collect();
                        n_frame += 1;
                        // Never drop HELLO answers, so connections come up.
                        if h.opcode == Opcode::Produce && n_frame.is_multiple_of(drop_every) {
                            continue;
                        }
                        tokio::time::sleep(Duration::from_millis(n_frame % 5)).await;
                        if cw.write_all(&f).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_delayed_acks_store_every_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let proxy = lossy_proxy(broker.addr, 3).await;
    let client = Client::connect(proxy).await.unwrap();
    let producer = Arc::new(
        Producer::new(
            client,
            "payments",
            ProducerOptions {
                batch_messages_max: 50,
                request_timeout: Duration::from_millis(300),
                attempts: 60,
                backoff: RetryBackoff::Fixed(Duration::from_millis(20)),
                ..ProducerOptions::default()
            },
        )
        .await
        .unwrap(),
    );
    const N: u64 = 3000;
    let mut sends = Vec::new();
    for i in 0..N {
        let p = producer.clone();
        sends.push(tokio::spawn(async move {
            p.send(OutgoingMessage::new(format!("payment-{i}").into_bytes()))
                .await
        }));
    }
    let mut duplicates = 0;
    let mut ids = HashSet::new();
    for s in sends {
        let r = s.await.unwrap().expect("every send completes");
        duplicates += r.duplicate as u64;
        ids.insert(r.id);
    }
    assert_eq!(ids.len() as u64, N);
    assert!(
        duplicates > 0,
        "some acks were dropped, so some retries found their message stored"
    );

    // Read everything back directly: each id once, each payload once.
    let direct = Client::connect(broker.addr).await.unwrap();
    let d = direct.describe_topic("payments").await.unwrap();
    assert_eq!(d.partitions[0].end, N, "exactly one record per message");
    let c = consumer(&direct, "payments", "audit", 200);
    let got = fetch_n(&c, N as usize, Duration::from_secs(60)).await;
    let stored_ids: HashSet<_> = got.iter().map(|d| d.id).collect();
    let payloads: HashSet<_> = got.iter().map(|d| d.payload.clone()).collect();
    assert_eq!(
        (
            got.len() as u64,
            stored_ids.len() as u64,
            payloads.len() as u64
        ),
        (N, N, N)
    );
    assert_eq!(stored_ids, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_delivery_goes_to_another_consumer_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let admin = Client::connect(broker.addr).await.unwrap();
    let config = TopicConfig {
        retention_consumed: false,
        ack_timeout_ms: 300,
        max_deliveries: 10,
        backoff: Some(Backoff::Exponential {
            base_ms: 200,
            max_ms: 10_000,
            factor_percent: 200,
        }),
    };
    admin.create_topic("jobs", 1, false, config).await.unwrap();
    let producer = Producer::new(admin.clone(), "jobs", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(OutgoingMessage::new(&b"job-1"[..]))
        .await
        .unwrap();

    let a = consumer(
        &Client::connect(broker.addr).await.unwrap(),
        "jobs",
        "workers",
        100,
    );
    let b = consumer(
        &Client::connect(broker.addr).await.unwrap(),
        "jobs",
        "workers",
        100,
    );
    let got = fetch_n(&a, 1, Duration::from_secs(10)).await;
    let t1 = Instant::now();
    assert_eq!((got.len(), got[0].attempt), (1, 1));
    // A never acks. B gets it after the ack timeout plus the first backoff.
    let got = fetch_n(&b, 1, Duration::from_secs(10)).await;
    let t2 = Instant::now();
    assert_eq!(
        (got.len(), got[0].attempt, &got[0].payload[..]),
        (1, 2, &b"job-1"[..])
    );
    let gap1 = t2 - t1;
    assert!(
        gap1 >= Duration::from_millis(300 + 200 - 20),
        "first redelivery after {gap1:?}"
    );
    // B does not ack either: the next delay doubles.
    let got = fetch_n(&b, 1, Duration::from_secs(10)).await;
    let t3 = Instant::now();
    assert_eq!(got[0].attempt, 3);
    let gap2 = t3 - t2;
    // At least timeout + 2 x base: a fixed backoff would come back after
    // ~500-560 ms, so this bound shows the doubling. The 20 ms of slack is
    // for the delivery's trip to the client, which t1 and t2 include;
    // scheduling delays only ever lengthen a gap.
    assert!(
        gap2 >= Duration::from_millis(300 + 400 - 20),
        "second redelivery after {gap2:?}"
    );
    b.ack(&[&got[0]]).await.unwrap();
    assert!(fetch_n(&a, 1, Duration::from_millis(1500)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_lands_in_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let config = TopicConfig {
        retention_consumed: false,
        ack_timeout_ms: 5_000,
        max_deliveries: 3,
        backoff: Some(Backoff::Fixed { delay_ms: 20 }),
    };
    client.create_topic("mail", 1, false, config).await.unwrap();
    let producer = Producer::new(client.clone(), "mail", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(OutgoingMessage::new(&b"poison"[..]).with_header("kind", &b"bad"[..]))
        .await
        .unwrap();
    producer
        .send(OutgoingMessage::new(&b"fine"[..]))
        .await
        .unwrap();
    let c = consumer(&client, "mail", "senders", 100);
    let mut attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while attempts.len() < 3 && Instant::now() < deadline {
        for d in c.fetch().await.unwrap() {
            if &d.payload[..] == b"poison" {
                attempts.push(d.attempt);
                c.nack(&[&d], None).await.unwrap();
            } else {
                c.ack(&[&d]).await.unwrap();
            }
        }
    }
    assert_eq!(attempts, vec![1, 2, 3]);
    let dlq = consumer(&client, "mail.dlq", "ops", 200);
    let got = fetch_n(&dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(&d.payload[..], b"poison");
    assert_eq!(
        header(d, "kind"),
        Some(&b"bad"[..]),
        "original headers kept"
    );
    assert_eq!(header(d, DLQ_HEADER_TOPIC), Some(&b"mail"[..]));
    assert_eq!(header(d, DLQ_HEADER_PARTITION), Some(&b"0"[..]));
    assert_eq!(header(d, DLQ_HEADER_OFFSET), Some(&b"0"[..]));
    assert_eq!(header(d, DLQ_HEADER_ATTEMPTS), Some(&b"3"[..]));
    // The poison message is settled for the group; nothing is redelivered.
    assert!(fetch_n(&c, 1, Duration::from_millis(500)).await.is_empty());
    assert_eq!(c.position().await.unwrap()[0].committed, 2);
}

/// The broker's own timer: a delivery nobody acks, in a group nobody
/// fetches for again, still expires at its deadline and moves to the DLQ
/// at its last one. Before the timer, expiry ran only inside a fetch: the
/// group kept `in_flight = 1` forever and `<topic>.dlq` never appeared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpolled_group_still_expires_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let config = TopicConfig {
        retention_consumed: false,
        ack_timeout_ms: 300,
        max_deliveries: 2,
        backoff: Some(Backoff::Fixed { delay_ms: 50 }),
    };
    client
        .create_topic("quiet", 1, false, config)
        .await
        .unwrap();
    // The DLQ does not exist yet: fetching it is an empty answer.
    let ops = consumer(&client, "quiet.dlq", "ops", 100);
    assert!(ops.fetch().await.expect("an empty answer").is_empty());
    let producer = Producer::new(client.clone(), "quiet", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(OutgoingMessage::new(&b"forgotten"[..]))
        .await
        .unwrap();
    let c = consumer(&client, "quiet", "idle", 100);
    let got = fetch_n(&c, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(c.position().await.unwrap()[0].in_flight, 1);
    // First deadline: no longer in flight, though nobody fetched.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.position().await.unwrap()[0].in_flight != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.position().await.unwrap()[0].in_flight,
        0,
        "the ack deadline passed: the delivery is due again, not in flight"
    );
    // One fetch takes the redelivery (attempt 2, the last); then nobody
    // fetches again, and its deadline moves it to the DLQ.
    let again = fetch_n(&c, 1, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    let dead = fetch_n(&ops, 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "moved to quiet.dlq at the last deadline");
    assert_eq!(&dead[0].payload[..], b"forgotten");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.position().await.unwrap()[0].committed != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = &c.position().await.unwrap()[0];
    assert_eq!((p.committed, p.in_flight), (1, 0), "settled for the group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acked_message_and_keeps_group_positions() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    client
        .create_topic("ledger", 2, false, TopicConfig::default())
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), "ledger", ProducerOptions::default())
        .await
        .unwrap();
    let mut acked = HashSet::new();
    for round in 0..20u64 {
        let payloads: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("entry-{round}-{i}").into_bytes())
            .collect();
        let batch = producer.encode_payloads(None, payloads.iter().map(|p| &p[..]));
        for r in producer.send_encoded(batch).await.unwrap() {
            acked.insert(r.id);
        }
    }
    let c = consumer(&client, "ledger", "g", 200);
    let mut processed = HashSet::new();
    while processed.len() < 4000 {
        let got = c.fetch().await.unwrap();
        let refs: Vec<_> = got.iter().collect();
        c.ack(&refs).await.unwrap();
        processed.extend(got.iter().map(|d| d.id));
    }
    let before = c.position().await.unwrap();
    // More produce in flight while the broker dies: only acked ones count.
    let p2 = Arc::new(producer);
    let inflight = {
        let p2 = p2.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            for round in 0..50u64 {
                let payloads: Vec<Vec<u8>> = (0..200)
                    .map(|i| format!("late-{round}-{i}").into_bytes())
                    .collect();
                let batch = p2.encode_payloads(None, payloads.iter().map(|p| &p[..]));
                match tokio::time::timeout(Duration::from_secs(2), p2.send_encoded(batch)).await {
                    Ok(Ok(r)) => got.extend(r.into_iter().map(|r| r.id)),
                    _ => break,
                }
            }
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    broker.kill();
    acked.extend(inflight.await.unwrap());

    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let after = client.group_position("ledger", "g").await.unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a.committed >= b.committed,
            "group position kept: {before:?} -> {after:?}"
        );
    }
    // Everything acked is there (a fresh group reads it all).
    let audit = consumer(&client, "ledger", "audit", 300);
    let mut stored = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = audit.fetch().await.unwrap();
        if got.is_empty() && (stored.len() >= acked.len() || Instant::now() > deadline) {
            break;
        }
        let refs: Vec<_> = got.iter().collect();
        audit.ack(&refs).await.unwrap();
        stored.extend(got.iter().map(|d| d.id));
    }
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    // The group resumes after what it acked: nothing acked comes back.
    let c = consumer(&client, "ledger", "g", 300);
    let again = fetch_n(&c, 1, Duration::from_secs(2)).await;
    for d in &again {
        assert!(
            !processed.contains(&d.id),
            "acked message {} delivered again",
            d.offset
        );
    }
}

async fn read_frame(s: &mut TcpStream) -> Option<(frame::FrameHeader, Vec<u8>)> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    s.read_exact(&mut head).await.ok()?;
    let h = frame::decode_header(&head).unwrap().unwrap();
    let mut body = vec![0u8; h.body_len];
    s.read_exact(&mut body).await.ok()?;
    Some((h, body))
}

/// Sends `bytes` on a new connection and expects one ERROR frame with
/// `code` and `correlation_id`, then the close.
async fn expect_error_then_close(
    bytes: &[u8],
    broker: SocketAddr,
    code: ErrorCode,
    correlation_id: u64,
) {
    let mut s = TcpStream::connect(broker).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let (h, body) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
        .await
        .unwrap()
        .expect("an error frame");
    assert_eq!(h.opcode, Opcode::Error);
    let e = ErrorBody::decode(&body).unwrap();
    assert_eq!(e.code, code as u16, "{}", e.message);
    assert_eq!(
        h.correlation_id, correlation_id,
        "the ERROR's correlation id ({})",
        e.message
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the broker closes the connection after the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_an_error_and_a_close_and_hurt_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let bystander = Client::connect(broker.addr).await.unwrap();
    let producer = Producer::new(bystander.clone(), "t", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(OutgoingMessage::new(&b"before"[..]))
        .await
        .unwrap();

    let mut bad_magic = frame::encode(Opcode::Ping, 0, 1, b"");
    bad_magic[4] ^= 0xFF;
    // A header that does not decode: correlation id 0.
    expect_error_then_close(&bad_magic, broker.addr, ErrorCode::MalformedFrame, 0).await;
    let mut huge = frame::encode(Opcode::Ping, 0, 1, b"");
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_error_then_close(&huge, broker.addr, ErrorCode::FrameTooLarge, 0).await;
    let mut unknown = frame::encode(Opcode::Ping, 0, 1, b"");
    unknown[7] = 0x4E;
    expect_error_then_close(&unknown, broker.addr, ErrorCode::UnknownOpcode, 0).await;
    let mut bad_ver = frame::encode(Opcode::Ping, 0, 1, b"");
    bad_ver[6] = 2;
    expect_error_then_close(&bad_ver, broker.addr, ErrorCode::UnsupportedVersion, 0).await;
    // A header that decodes, a body that does not: the request's id.
    expect_error_then_close(
        &frame::encode(Opcode::Ping, 0, 5, b"trailing"),
        broker.addr,
        ErrorCode::MalformedFrame,
        5,
    )
    .await;
    // A well-framed PRODUCE whose body lies about its counts.
    let mut body = Vec::new();
    bida::protocol::Put::put_str(&mut body, "t");
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&50_000u32.to_le_bytes());
    expect_error_then_close(
        &frame::encode(Opcode::Produce, 0, 9, &body),
        broker.addr,
        ErrorCode::MalformedFrame,
        9,
    )
    .await;

    // The bystander's connection still works.
    let r = producer
        .send(OutgoingMessage::new(&b"after"[..]))
        .await
        .unwrap();
    assert_eq!(r.offset, 1);
}

/// Values out of range in a body that decodes (a bad TopicConfig, a name
/// over 200 bytes, ACK with a delay) cost only their request: INVALID_REQUEST
/// with its id, and the requests pipelined behind it are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_in_a_request_cost_only_that_request() {
    use bida::protocol::body::{AckRequest, CreateTopic, TopicConfig as WireConfig};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let create = |topic: &str, config: WireConfig| {
        let mut body = Vec::new();
        CreateTopic {
            topic: topic.into(),
            partitions: 1,
            if_not_exists: false,
            config,
        }
        .encode(&mut body);
        body
    };
    let mut bad_backoff = create("a", WireConfig::default());
    // backoff_kind 9 (byte 2 + 1 + 4 + 1 + 4 + 2 = after name, partitions,
    // if_not_exists, ack_timeout_ms, max_deliveries).
    let kind_at = 2 + 1 + 4 + 1 + 4 + 2;
    bad_backoff[kind_at] = 9;
    let long_name = create(&"n".repeat(201), WireConfig::default());
    let mut ack = Vec::new();
    AckRequest {
        topic: "a".into(),
        group: "g".into(),
        delay_ms: 5,
        entries: vec![(0, 0)],
    }
    .encode(&mut ack);
    let mut pipeline = Vec::new();
    pipeline.extend(frame::encode(Opcode::CreateTopic, 0, 11, &bad_backoff));
    pipeline.extend(frame::encode(Opcode::CreateTopic, 0, 12, &long_name));
    pipeline.extend(frame::encode(Opcode::Ack, 0, 13, &ack));
    pipeline.extend(frame::encode(Opcode::Ping, 0, 14, b""));
    let mut s = TcpStream::connect(broker.addr).await.unwrap();
    s.write_all(&pipeline).await.unwrap();
    let mut answers = HashMap::new();
    for _ in 0..4 {
        let (h, body) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
            .await
            .unwrap()
            .expect("an answer to every pipelined request");
        answers.insert(h.correlation_id, (h.opcode, body));
    }
    for id in [11, 12, 13] {
        let (op, body) = &answers[&id];
        assert_eq!(*op, Opcode::Error, "request {id}");
        let e = ErrorBody::decode(body).unwrap();
        assert_eq!(e.code, ErrorCode::InvalidRequest as u16, "{}", e.message);
    }
    assert_eq!(answers[&14].0, Opcode::Ping, "the connection is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_at_once() {
    // This process holds the client ends: lift its soft descriptor limit
    // (often 1024) to the hard one, as `bida serve` does for itself.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(Client::connect(broker.addr).await.expect("connect"));
    }
    // Every one of them is served, all at once.
    let mut pings = Vec::new();
    for c in &clients {
        let c = c.clone();
        pings.push(tokio::spawn(
            async move { c.request(Opcode::Ping, &[]).await },
        ));
    }
    for p in pings {
        p.await.unwrap().expect("ping");
    }
    let producer = Producer::new(clients[999].clone(), "busy", ProducerOptions::default())
        .await
        .unwrap();
    assert_eq!(
        producer
            .send(OutgoingMessage::new(&b"x"[..]))
            .await
            .unwrap()
            .offset,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_a_failed_send_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let producer = Producer::new(
        client,
        "t",
        ProducerOptions {
            attempts: 3,
            request_timeout: Duration::from_millis(200),
            backoff: RetryBackoff::Fixed(Duration::from_millis(10)),
            ..ProducerOptions::default()
        },
    )
    .await
    .unwrap();
    producer
        .send(OutgoingMessage::new(&b"kept"[..]))
        .await
        .unwrap();
    let status = broker.terminate();
    assert!(status.success(), "clean exit: {status:?}");
    // Clean shutdown: inspect finds every log intact and marked clean,
    // the broker's own logs too.
    for log in ["topics/t/0", "_groups", "_schedule"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bida"))
            .arg("inspect")
            .arg(dir.path().join(log))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{log}: {text}");
        assert!(text.contains("clean shutdown"), "{log}: {text}");
    }
    // With the broker gone, a send fails after its attempts with the last error.
    let err = producer
        .send(OutgoingMessage::new(&b"lost"[..]))
        .await
        .unwrap_err();
    match err {
        ClientError::Exhausted { attempts, .. } => assert_eq!(attempts, 3),
        other => panic!("expected Exhausted, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_push_within_their_credit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    client
        .create_topic("feed", 2, false, TopicConfig::default())
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), "feed", ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..100u32 {
        producer
            .send(OutgoingMessage::new(i.to_le_bytes().to_vec()))
            .await
            .unwrap();
    }
    let c = Consumer::new(
        Client::connect(broker.addr).await.unwrap(),
        "feed",
        "push",
        ConsumerOptions {
            credit: 10,
            ..ConsumerOptions::default()
        },
    );
    let mut sub = c.subscribe().await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < 100 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a push within 10 s")
            .unwrap()
            .unwrap();
        c.ack(&[&d]).await.unwrap();
        // No more than the window is ever outstanding.
        let pos = c.position().await.unwrap();
        let in_flight: u32 = pos.iter().map(|p| p.in_flight).sum();
        assert!(
            in_flight <= 10,
            "{in_flight} deliveries in flight with a credit of 10"
        );
        assert!(seen.insert(u32::from_le_bytes(d.payload[..4].try_into().unwrap())));
    }
    // New messages keep arriving on the same subscription.
    producer
        .send(OutgoingMessage::new(&b"late"[..]))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&d.payload[..], b"late");
    sub.unsubscribe().await.unwrap();
}

#[test]
fn the_cli_produces_and_consumes_lines() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let bin = env!("CARGO_BIN_EXE_bida");
    let mut produce = Command::new(bin)
        .args([
            "produce",
            "--broker",
            &addr,
            "--topic",
            "lines",
            "--verbose",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    produce
        .stdin
        .take()
        .unwrap()
        .write_all(b"alpha\nbeta\ngamma\n")
        .unwrap();
    let out = produce.wait_with_output().unwrap();
    assert!(out.status.success());
    let acked = String::from_utf8(out.stdout).unwrap();
    let mut offsets: Vec<u64> = acked
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert_eq!(cols.len(), 3, "offset, inner-msg-id, duplicate? in {l:?}");
            assert_eq!(cols[1].len(), 32, "a 128-bit id in hex");
            assert_eq!(cols[2], "new");
            cols[0].parse().unwrap()
        })
        .collect();
    offsets.sort();
    assert_eq!(offsets, vec![0, 1, 2]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 sent, 3 acked"));

    let out = Command::new(bin)
        .args([
            "consume", "--broker", &addr, "--topic", "lines", "--group", "g", "--count", "3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "alpha\nbeta\ngamma\n"
    );
    let out = Command::new(bin)
        .args(["topics", "--broker", &addr, "describe", "lines"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("g ") && l.trim_end().ends_with(" 0")),
        "group g with lag 0:\n{text}"
    );
}
