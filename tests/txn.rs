//! Transactions (half messages, check-back) and delayed delivery, against
//! real `bida serve` processes killed with SIGKILL (or aborting at a crash
//! point) and restarted on the same address.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::client::txn::{send_delayed, Decision, RetryOptions, TransactionalProducer, TxnState};
use bida::client::{Client, Consumer, ConsumerOptions, Delivery, OutgoingMessage};
use bida::protocol::ErrorCode;

use support::broker::BrokerProcess;

/// Check-backs come quickly in these tests.
const FAST_CHECKS: &[&str] = &[
    "--txn-check-after-ms",
    "300",
    "--txn-check-interval-ms",
    "200",
];

fn consumer(client: &Arc<Client>, topic: &str, group: &str) -> Consumer {
    Consumer::new(
        client.clone(),
        topic,
        group,
        ConsumerOptions {
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    )
}

/// Everything delivered to a fresh group within `within` (acked).
async fn drain(addr: std::net::SocketAddr, topic: &str, within: Duration) -> Vec<Delivery> {
    let client = Client::connect(addr).await.unwrap();
    let group = format!("g{}", rand_suffix());
    let c = consumer(&client, topic, &group);
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match c.fetch().await {
            Ok(batch) => {
                let refs: Vec<_> = batch.iter().collect();
                if !refs.is_empty() {
                    c.ack(&refs).await.unwrap();
                }
                out.extend(batch);
            }
            Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("fetch: {e}"),
        }
    }
    out
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

fn payloads(d: &[Delivery]) -> Vec<String> {
    d.iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

fn never_asked(_: &bida::client::txn::Check) -> Decision {
    panic!("no check expected in this test")
}

fn restart(dir: &Path, addr: std::net::SocketAddr, extra: &[&str]) -> BrokerProcess {
    BrokerProcess::start_with(dir, &addr.to_string(), extra, &[])
}

fn order(n: usize) -> Vec<OutgoingMessage> {
    (0..n)
        .map(|i| OutgoingMessage::new(format!("order-{i}")).with_key(format!("k{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_makes_halves_visible_and_rollback_discards_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let producer = TransactionalProducer::connect(broker.addr, "shop", never_asked)
        .await
        .unwrap();
    let mut t = producer.begin();
    t.send_halves("orders", &order(3)).await.unwrap();
    assert!(
        drain(broker.addr, "orders", Duration::from_millis(400))
            .await
            .is_empty(),
        "halves are invisible before the commit"
    );
    let reply = t.commit().await.unwrap();
    assert_eq!(reply.state, TxnState::Committed);
    assert_eq!(reply.placed.len(), 3);
    let mut r = producer.begin();
    r.send_half("orders", OutgoingMessage::new("discarded"))
        .await
        .unwrap();
    let rid = r.id();
    assert_eq!(r.rollback().await.unwrap().state, TxnState::RolledBack);
    let got = drain(broker.addr, "orders", Duration::from_millis(800)).await;
    assert_eq!(payloads(&got), vec!["order-0", "order-1", "order-2"]);
    // A commit after the rollback is refused, a repeated rollback answered.
    let err = producer.end(rid, Decision::Commit).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TransactionDecided));
    assert_eq!(
        producer.end(rid, Decision::Rollback).await.unwrap().state,
        TxnState::RolledBack
    );
    let err = producer.end(12345, Decision::Commit).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownTransaction));
}

/// Crash points 1 and 3: the broker is dead when the half (then the
/// decision) is sent; the client's retries reach the restarted broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_dead_before_half_and_before_decision_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr;
    let producer = Arc::new(
        TransactionalProducer::connect(addr, "shop", never_asked)
            .await
            .unwrap(),
    );
    broker.kill();
    // Crash point 1: the half is sent while the broker is down.
    let p = producer.clone();
    let half = tokio::spawn(async move {
        let mut t = p.begin();
        t.send_half("orders", OutgoingMessage::new("one")).await?;
        Ok::<_, bida::client::ClientError>(t.id())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut broker = restart(dir.path(), addr, &[]);
    let txn = half
        .await
        .unwrap()
        .expect("the half reached the restarted broker");
    // Crash point 3: the decision is sent while the broker is down.
    broker.kill();
    let p = producer.clone();
    let commit = tokio::spawn(async move { p.end(txn, Decision::Commit).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let broker = restart(dir.path(), addr, &[]);
    assert_eq!(commit.await.unwrap().unwrap().state, TxnState::Committed);
    let got = drain(broker.addr, "orders", Duration::from_millis(800)).await;
    assert_eq!(payloads(&got), vec!["one"], "stored once, visible once");
}

/// Crash point 2: after the halves are stored, before any decision. After
/// the restart they are still invisible, and the commit still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_survive_a_crash_and_stay_invisible_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr;
    let producer = TransactionalProducer::connect(addr, "shop", never_asked)
        .await
        .unwrap();
    let mut t = producer.begin();
    t.send_halves("orders", &order(5)).await.unwrap();
    let mut r = producer.begin();
    r.send_halves("orders", &order(2)).await.unwrap();
    broker.kill();
    let broker = restart(dir.path(), addr, &[]);
    assert!(drain(addr, "orders", Duration::from_millis(400))
        .await
        .is_empty());
    assert_eq!(t.commit().await.unwrap().placed.len(), 5);
    r.rollback().await.unwrap();
    let got = drain(broker.addr, "orders", Duration::from_millis(800)).await;
    assert_eq!(got.len(), 5);
}

/// Crash point 4: the decision is durable, then the broker dies (before
/// the messages reach the topic, and once after they do but before the
/// transaction is marked done). The restart finishes the commit: each
/// message visible exactly once. A durable rollback stays rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_decision_is_carried_out_after_a_crash() {
    for crash_at in ["txn-decided", "txn-applied"] {
        let dir = tempfile::tempdir().unwrap();
        let first = BrokerProcess::start(dir.path(), &[]);
        let addr = first.addr;
        drop(first);
        let mut broker = BrokerProcess::start_with(
            dir.path(),
            &addr.to_string(),
            &["--fault-crash-at", crash_at],
            &[],
        );
        let producer = TransactionalProducer::connect(addr, "shop", never_asked)
            .await
            .unwrap()
            .with_retry(RetryOptions {
                attempts: 1,
                ..RetryOptions::default()
            });
        let mut t = producer.begin();
        t.send_halves("orders", &order(4)).await.unwrap();
        let txn = t.id();
        let err = t.commit().await.unwrap_err();
        assert!(err.is_retriable() || matches!(err, bida::client::ClientError::Exhausted { .. }));
        assert!(
            broker.wait_exit(Duration::from_secs(10)),
            "{crash_at}: the broker aborted"
        );
        let broker = restart(dir.path(), addr, &[]);
        let got = drain(broker.addr, "orders", Duration::from_secs(1)).await;
        assert_eq!(
            payloads(&got),
            vec!["order-0", "order-1", "order-2", "order-3"],
            "{crash_at}: all of the transaction, once"
        );
        let again = producer.end(txn, Decision::Commit).await.unwrap();
        assert_eq!(again.state, TxnState::Committed, "{crash_at}");
    }
    // And a rollback made durable before a SIGKILL.
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr;
    let producer = TransactionalProducer::connect(addr, "shop", never_asked)
        .await
        .unwrap();
    let mut r = producer.begin();
    r.send_halves("orders", &order(2)).await.unwrap();
    let rid = r.id();
    r.rollback().await.unwrap();
    broker.kill();
    let broker = restart(dir.path(), addr, FAST_CHECKS);
    assert!(drain(broker.addr, "orders", Duration::from_secs(1))
        .await
        .is_empty());
    let err = producer.end(rid, Decision::Commit).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TransactionDecided));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_producer_of_the_group_answers_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), FAST_CHECKS);
    let dead = TransactionalProducer::connect(broker.addr, "shop", never_asked)
        .await
        .unwrap();
    let mut t = dead.begin();
    t.send_half("orders", OutgoingMessage::new("paid").with_key("order-77"))
        .await
        .unwrap();
    let txn = t.id();
    drop(dead); // the producer dies before deciding
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let _other = TransactionalProducer::connect(broker.addr, "shop", move |check| {
        seen.lock().unwrap().push((check.txn_id, check.key.clone()));
        // The local store says order-77 was written: committed.
        Decision::Commit
    })
    .await
    .unwrap();
    let got = drain(broker.addr, "orders", Duration::from_secs(3)).await;
    assert_eq!(payloads(&got), vec!["paid"]);
    let asked = asked.lock().unwrap().clone();
    assert!(!asked.is_empty(), "the live producer was asked");
    assert_eq!(asked[0], (txn, Some(b"order-77".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_rolls_back_after_the_maximum_number_of_checks() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(
        dir.path(),
        &[
            "--txn-check-after-ms",
            "300",
            "--txn-check-interval-ms",
            "100",
            "--txn-check-max",
            "3",
        ],
    );
    let checks = Arc::new(AtomicU32::new(0));
    let counted = checks.clone();
    let producer = TransactionalProducer::connect(broker.addr, "shop", move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        Decision::Unknown
    })
    .await
    .unwrap();
    let mut t = producer.begin();
    t.send_half("orders", OutgoingMessage::new("never"))
        .await
        .unwrap();
    let txn = t.id();
    // Checks at 300 ms, then 100 and 200 ms apart; the rollback comes 400
    // ms after the third. (Polling with TXN_END would postpone the checks.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while checks.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "not asked 3 times in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(checks.load(Ordering::SeqCst), 3, "asked exactly 3 times");
    let err = producer.end(txn, Decision::Commit).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TransactionDecided));
    assert!(drain(broker.addr, "orders", Duration::from_millis(500))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_arrive_no_earlier_than_due_in_due_order_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr;
    let client = Client::connect(addr).await.unwrap();
    let start = Instant::now();
    let mut expected = Vec::new();
    for (name, delay_ms) in [("d1500", 1500u64), ("d300", 300), ("d900", 900), ("d0", 0)] {
        send_delayed(
            &client,
            "later",
            Duration::from_millis(delay_ms),
            &[OutgoingMessage::new(name)],
            RetryOptions::default(),
        )
        .await
        .unwrap();
        expected.push((delay_ms, name));
    }
    // One that must survive a SIGKILL while pending.
    send_delayed(
        &client,
        "later",
        Duration::from_millis(2500),
        &[OutgoingMessage::new("d2500")],
        RetryOptions::default(),
    )
    .await
    .unwrap();
    expected.push((2500, "d2500"));
    expected.sort();

    let c = consumer(&client, "later", "g");
    let mut arrived: Vec<(String, Duration)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrived.len() < 4 && Instant::now() < deadline {
        if let Ok(batch) = c.fetch().await {
            let refs: Vec<_> = batch.iter().collect();
            if !refs.is_empty() {
                c.ack(&refs).await.unwrap();
            }
            for d in &batch {
                arrived.push((String::from_utf8_lossy(&d.payload).into(), start.elapsed()));
            }
        }
    }
    broker.kill();
    let broker = restart(dir.path(), addr, &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let c = consumer(&client, "later", "g");
    while arrived.len() < 5 && Instant::now() < deadline {
        if let Ok(batch) = c.fetch().await {
            let refs: Vec<_> = batch.iter().collect();
            if !refs.is_empty() {
                c.ack(&refs).await.unwrap();
            }
            for d in &batch {
                arrived.push((String::from_utf8_lossy(&d.payload).into(), start.elapsed()));
            }
        }
    }
    let names: Vec<&str> = arrived.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(|(_, n)| *n).collect();
    assert_eq!(names, want, "in due order, each once");
    for ((name, at), (delay, _)) in arrived.iter().zip(&expected) {
        assert!(
            *at >= Duration::from_millis(*delay),
            "{name} arrived after {at:?}, before its delay of {delay} ms"
        );
    }
}

/// A million pending delayed messages cost bounded memory: 16 bytes each
/// in the timer heap, the messages themselves stay on disk. Prints the
/// broker's RSS (docs/BENCHMARKS.md quotes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_delayed_messages_keep_the_broker_small() {
    const TOTAL: usize = 1_000_000;
    const BATCH: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &["--flush", "async"]);
    let addr = broker.addr;
    let client = Client::connect(addr).await.unwrap();
    let idle = broker.rss_bytes();
    let batch: Vec<OutgoingMessage> = (0..BATCH)
        .map(|i| OutgoingMessage::new(vec![b'x'; 100]).with_header("n", i.to_string()))
        .collect();
    for _ in 0..TOTAL / BATCH {
        let r = send_delayed(
            &client,
            "much-later",
            Duration::from_secs(3600),
            &batch,
            RetryOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(r.len(), BATCH);
    }
    let loaded = broker.rss_bytes();
    println!(
        "after storing: RssAnon {} MiB, RssFile {} MiB",
        broker.status_bytes("RssAnon:") >> 20,
        broker.status_bytes("RssFile:") >> 20
    );
    broker.kill();
    let broker = restart(dir.path(), addr, &["--flush", "async"]);
    // The restarted broker rebuilt its timers from the schedule log.
    let reopened = broker.rss_bytes();
    println!(
        "after the restart: RssAnon {} MiB, RssFile {} MiB",
        broker.status_bytes("RssAnon:") >> 20,
        broker.status_bytes("RssFile:") >> 20
    );
    println!(
        "RSS with {TOTAL} delayed messages pending: idle {} MiB, after storing {} MiB, after a restart {} MiB",
        idle >> 20,
        loaded >> 20,
        reopened >> 20
    );
    for rss in [loaded, reopened] {
        assert!(
            rss < 256 << 20,
            "RSS {} MiB for {TOTAL} pending delayed messages",
            rss >> 20
        );
    }
    assert!(drain(addr, "much-later", Duration::from_millis(300))
        .await
        .is_empty());
}

/// A nack with a delay is durable: after a SIGKILL the message is still
/// not redelivered before its time (and the other messages are unaffected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_delay_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &[]);
    let addr = broker.addr;
    let client = Client::connect(addr).await.unwrap();
    let producer = bida::client::Producer::new(
        client.clone(),
        "work",
        bida::client::ProducerOptions::default(),
    )
    .await
    .unwrap();
    for p in ["later", "now"] {
        producer.send(OutgoingMessage::new(p)).await.unwrap();
    }
    let c = consumer(&client, "work", "g");
    let got = c.fetch().await.unwrap();
    assert_eq!(payloads(&got), vec!["later", "now"]);
    let nacked_at = Instant::now();
    assert_eq!(
        c.nack(&[&got[0]], Some(Duration::from_millis(2500)))
            .await
            .unwrap(),
        1
    );
    c.ack(&[&got[1]]).await.unwrap();
    broker.kill();
    let broker = restart(dir.path(), addr, &[]);
    let client = Client::connect(broker.addr).await.unwrap();
    let c = consumer(&client, "work", "g");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    while again.is_empty() && Instant::now() < deadline {
        again = c.fetch().await.unwrap();
        if !again.is_empty() {
            assert!(
                nacked_at.elapsed() >= Duration::from_millis(2500),
                "redelivered {:?} after the nack, before its 2.5 s delay",
                nacked_at.elapsed()
            );
        }
    }
    assert_eq!(
        payloads(&again),
        vec!["later"],
        "only the nacked one, once due"
    );
}
