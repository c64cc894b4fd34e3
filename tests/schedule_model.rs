//! The broker-level dedup of `_schedule` (delayed messages) against a
//! model, with an injected clock: an in-process `Broker` whose logs and
//! scheduler all read one manual clock.
//!
//! Random sequences of delayed sends (ids from a small pool, so retries are
//! common), clock advances (which make delayed messages fire into their
//! topic), large sends that roll the schedule log, compactions of the
//! schedule log, and clean restarts. Checked after every step:
//!
//! - a send whose first copy is still inside the schedule's dedup window
//!   (`dedup_window_ms`) is answered duplicate, across restarts and
//!   compactions too;
//! - the topic never holds an id more often than the broker accepted it as
//!   new: a retried delayed message fires once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::broker::{Broker, BrokerConfig};
use bida::log::record::{InnerMsgId, Message};
use bida::log::{Clock, FlushMode};
use bida::protocol::body::ProduceRequest;
use bida::protocol::txn::DelayedRequest;
use proptest::prelude::*;

const WINDOW_MS: u64 = 10_000;
const ID_POOL: u64 = 12;
const TOPIC: &str = "t";

#[derive(Clone, Debug)]
enum Op {
    Delay {
        id: u64,
        delay_ms: u64,
    },
    /// A large delayed message with a fresh id: rolls the schedule log.
    Fill,
    Advance(u64),
    Compact,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..=ID_POOL, prop_oneof![Just(0u64), 1..3_000u64, 20_000..40_000u64])
            .prop_map(|(id, delay_ms)| Op::Delay { id, delay_ms }),
        2 => Just(Op::Fill),
        3 => prop_oneof![0..2_000u64, 2_000..15_000u64].prop_map(Op::Advance),
        2 => Just(Op::Compact),
        1 => Just(Op::Restart),
    ]
}

fn config(dir: &std::path::Path, clock: &Clock) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        admin_listen: None,
        flush: FlushMode::Async {
            interval_ms: 1000,
            bytes: 1 << 30,
        },
        segment_bytes: 64 << 10,
        record_bytes_max: 40 << 10,
        dedup_window_ids: 100_000,
        dedup_window_ms: WINDOW_MS,
        clock: clock.clone(),
        ..BrokerConfig::default()
    }
}

/// Waits for a broker answer from this synchronous test.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn inner_id(i: u64) -> InnerMsgId {
    InnerMsgId(0x5C4E_0000_0000_0000_0000_0000_0000_0000 | u128::from(i))
}

struct Sent {
    id: u64,
    at_ms: u64,
    due_ms: u64,
}

/// Ids in the topic, in offset order.
fn topic_ids(broker: &Broker) -> Vec<u128> {
    let Ok(topic) = broker.topic(TOPIC) else {
        return Vec::new();
    };
    let log = &topic.partition(0).unwrap().log;
    let mut ids = Vec::new();
    let mut offset = log.start_offset();
    loop {
        let batch = log.read(offset, 1000, 4 << 20).unwrap();
        if batch.records == 0 {
            return ids;
        }
        ids.extend(batch.iter().map(|r| r.unwrap().id.0));
        offset = batch.next_offset;
    }
}

fn run(ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_700_000_000_000);
    let mut broker: Arc<Broker> = Broker::open(config(dir.path(), &clock)).unwrap();
    // Every send the broker accepted as new.
    let mut accepted: Vec<Sent> = Vec::new();
    let mut fill_id = 1_000u64;
    let filler = vec![0xAB; 30 << 10];
    let small = b"later".to_vec();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Delay { .. } | Op::Fill => {
                let (id, delay_ms, payload) = match *op {
                    Op::Delay { id, delay_ms } => (id, delay_ms, &small),
                    _ => {
                        fill_id += 1;
                        (fill_id, 0, &filler)
                    }
                };
                let now = clock.now_ms();
                let req = DelayedRequest {
                    delay_ms,
                    produce: ProduceRequest {
                        topic: TOPIC,
                        partition: 0,
                        messages: vec![Message {
                            id: inner_id(id),
                            payload,
                            ..Message::default()
                        }],
                    },
                };
                let ack = block_on(broker.produce_delayed(&req)).unwrap();
                let duplicate = ack.outcomes[0].duplicate;
                let in_window = accepted
                    .iter()
                    .rev()
                    .find(|s| s.id == id)
                    .filter(|s| now - s.at_ms < WINDOW_MS);
                if let Some(first) = in_window {
                    assert!(
                        duplicate,
                        "step {step}: id {id}, first sent {} ms ago, was stored again",
                        now - first.at_ms
                    );
                }
                if !duplicate {
                    accepted.push(Sent {
                        id,
                        at_ms: now,
                        due_ms: now + delay_ms,
                    });
                }
            }
            Op::Advance(ms) => clock.advance(*ms),
            Op::Compact => broker.schedule().compact(),
            Op::Restart => {
                broker.close().unwrap();
                drop(broker);
                broker = Broker::open(config(dir.path(), &clock)).unwrap();
            }
        }
        // Wait (bounded) until everything due has fired: the timers left
        // are exactly the accepted sends not yet due. (The topic may hold
        // fewer: its own window absorbs a second copy fired soon after.)
        broker.schedule().wake();
        let now = clock.now_ms();
        let not_due = accepted.iter().filter(|s| s.due_ms > now).count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while broker.schedule().pending().0 != not_due && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            broker.schedule().pending().0,
            not_due,
            "step {step}: delayed messages pending"
        );
        let ids = topic_ids(&broker);
        for i in 1..=ID_POOL {
            let stored = ids.iter().filter(|&&x| x == inner_id(i).0).count();
            let sends = accepted.iter().filter(|s| s.id == i).count();
            assert!(
                stored <= sends,
                "step {step}: id {i} is in the topic {stored} times, accepted {sends} times"
            );
        }
    }
    broker.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_retried_delayed_message_is_stored_and_fired_once(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops);
    }
}

/// A delayed message fires, the schedule segment that held it rolls and
/// is compacted, the broker restarts, and the producer retries inside the
/// window: before the fix the compaction had deleted the only copy the
/// rebuilt window could learn the id from, and the retry was stored and
/// fired again.
#[test]
fn compaction_keeps_the_ids_of_the_window_across_a_restart() {
    run(&[
        Op::Delay { id: 1, delay_ms: 0 },
        Op::Advance(100),
        Op::Fill,
        Op::Fill,
        Op::Fill,
        Op::Compact,
        Op::Restart,
        Op::Delay { id: 1, delay_ms: 0 },
    ]);
}
