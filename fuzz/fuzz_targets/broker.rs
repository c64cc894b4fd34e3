//! Stateful: a sequence of requests against an in-process broker (a real
//! `Broker` on a temporary directory), checked against a model after every
//! step. It must never panic, and never break an invariant:
//!
//! - a produced id is stored once: a new id lands at the next offset, a
//!   repeated one (also within one batch) is answered as a duplicate with
//!   the first copy's offset;
//! - every delivery is the record the model holds at its offset;
//! - a group's committed offset never passes the end and never goes back,
//!   not across a restart either;
//! - a message whose deliveries all failed is in `<topic>.dlq`, once;
//!   re-driving a dead letter twice stores it once; a purge empties the
//!   dead-letter topic;
//! - after a clean restart every stored record is there with its id.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use bida::broker::{Broker, BrokerConfig};
use bida::log::record::{InnerMsgId, Message};
use bida::log::FlushMode;
use bida::protocol::body::{
    decode_deliveries, AckRequest, Backoff, CreateTopic, ProduceRequest, TopicConfig,
};
use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 2] = ["t0", "t1"];
const GROUPS: [&str; 2] = ["g0", "g1"];

#[derive(Arbitrary, Debug)]
enum Op {
    /// Ids from a pool of 16, so repeats (retries) are common.
    Produce {
        topic: u8,
        ids: Vec<u8>,
        len: u8,
    },
    Poll {
        topic: u8,
        group: u8,
        max: u8,
    },
    Ack {
        topic: u8,
        group: u8,
        pick: u8,
    },
    /// Fails a delivery; it comes back at once (delay 0) until its last.
    Nack {
        topic: u8,
        group: u8,
        pick: u8,
    },
    Redrive {
        topic: u8,
        offset: u8,
    },
    Purge {
        topic: u8,
    },
    Restart,
}

#[derive(Default)]
struct TopicModel {
    /// The id stored at each offset.
    ids: Vec<u128>,
    /// Per group: committed offset seen last, deliveries not yet settled.
    groups: HashMap<&'static str, GroupModel>,
}

#[derive(Default)]
struct GroupModel {
    committed: u64,
    outstanding: Vec<u64>,
}

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_path_buf(),
        admin_listen: None,
        flush: FlushMode::Async {
            interval_ms: 1000,
            bytes: 1 << 30,
        },
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        dedup_window_ids: 4096,
        ..BrokerConfig::default()
    }
}

fn open(dir: &std::path::Path) -> Arc<Broker> {
    let broker = Broker::open(config(dir)).expect("open the broker");
    for t in TOPICS {
        broker
            .create_topic(&CreateTopic {
                topic: t.to_owned(),
                partitions: 1,
                if_not_exists: true,
                config: TopicConfig {
                    retention_consumed: false,
                    ack_timeout_ms: 600_000,
                    max_deliveries: 2,
                    backoff: Some(Backoff::Fixed { delay_ms: 0 }),
                },
            })
            .expect("create");
    }
    broker
}

fn id_of(pool: u8) -> u128 {
    // Never 0 (no id: not deduplicated).
    0xB1DA_0000_0000_0000_0000_0000_0000_0000 | u128::from(pool % 16 + 1)
}

fn committed(broker: &Broker, topic: &str, group: &str) -> u64 {
    let t = broker.topic(topic).expect("topic");
    broker.positions(&t, group)[0].committed
}

fuzz_target!(|ops: Vec<Op>| {
    // On tmpfs where there is one: fsyncs cost nothing there, and this
    // target is about logic, not devices.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut broker = open(dir.path());
    let mut model: HashMap<&'static str, TopicModel> = HashMap::new();
    let mut redriven: HashMap<(&'static str, u64), u64> = HashMap::new();
    for op in ops.into_iter().take(64) {
        match op {
            Op::Produce { topic, ids, len } => {
                let t = TOPICS[usize::from(topic) % 2];
                let ids: Vec<u128> = ids.iter().take(32).map(|&i| id_of(i)).collect();
                if ids.is_empty() {
                    continue;
                }
                let payloads: Vec<Vec<u8>> = ids
                    .iter()
                    .map(|id| vec![*id as u8; usize::from(len)])
                    .collect();
                let messages = ids
                    .iter()
                    .zip(&payloads)
                    .map(|(id, p)| Message {
                        id: InnerMsgId(*id),
                        key: None,
                        headers: &[],
                        payload: p,
                    })
                    .collect();
                let appended = rt
                    .block_on(broker.produce(&ProduceRequest {
                        topic: t,
                        partition: 0,
                        messages,
                    }))
                    .expect("produce");
                let m = model.entry(t).or_default();
                for (id, o) in ids.iter().zip(&appended.outcomes) {
                    match m.ids.iter().position(|x| x == id) {
                        Some(first) => {
                            assert!(o.duplicate, "{id:x} stored twice");
                            assert_eq!(o.offset, first as u64, "a duplicate names the first copy");
                        }
                        None => {
                            assert!(!o.duplicate, "a new id was called a duplicate");
                            assert_eq!(o.offset, m.ids.len() as u64, "offsets are contiguous");
                            m.ids.push(*id);
                        }
                    }
                }
            }
            Op::Poll { topic, group, max } => {
                let t = TOPICS[usize::from(topic) % 2];
                let g = GROUPS[usize::from(group) % 2];
                let topic = broker.topic(t).expect("topic");
                let mut out = vec![0u8; 4];
                let n = rt
                    .block_on(broker.poll(&topic, 0, g, u32::from(max % 8) + 1, 1 << 20, &mut out))
                    .expect("poll");
                out[..4].copy_from_slice(&n.to_le_bytes());
                let deliveries = decode_deliveries(&Bytes::from(out)).expect("decodes");
                assert_eq!(deliveries.len(), n as usize);
                let m = model.entry(t).or_default();
                for d in &deliveries {
                    let Some(id) = m.ids.get(d.offset as usize) else {
                        panic!("delivered offset {} past the end {}", d.offset, m.ids.len());
                    };
                    assert_eq!(
                        d.id.0, *id,
                        "delivery {} is not the stored record",
                        d.offset
                    );
                    m.groups.entry(g).or_default().outstanding.push(d.offset);
                }
            }
            Op::Ack { topic, group, pick } => {
                settle(&rt, &broker, &mut model, topic, group, pick, false)
            }
            Op::Nack { topic, group, pick } => {
                settle(&rt, &broker, &mut model, topic, group, pick, true)
            }
            Op::Redrive { topic, offset } => {
                let t = TOPICS[usize::from(topic) % 2];
                let dlq = format!("{t}.dlq");
                let Ok(d) = broker.topic(&dlq) else {
                    continue;
                };
                let start = d.partitions[0].log.start_offset();
                let end = d.partitions[0].log.next_offset();
                let offset = u64::from(offset);
                match rt.block_on(broker.redrive(&dlq, 0, offset)) {
                    Ok(r) => {
                        assert!(
                            (start..end).contains(&offset),
                            "re-drove a missing dead letter"
                        );
                        let m = model.entry(t).or_default();
                        match redriven.get(&(t, offset)) {
                            Some(&first) => {
                                assert!(r.duplicate, "a second re-drive stored again");
                                assert_eq!(r.offset, first);
                            }
                            None if !r.duplicate => {
                                assert_eq!(r.offset, m.ids.len() as u64);
                                let rec = broker.browse(t, 0, r.offset, 1).expect("browse");
                                m.ids.push(rec[0].id.0);
                                redriven.insert((t, offset), r.offset);
                            }
                            // Re-driven before a restart forgot our note
                            // of it, never the broker's.
                            None => {}
                        }
                    }
                    Err(_) => assert!(
                        !(start..end).contains(&offset),
                        "re-driving a stored dead letter failed"
                    ),
                }
            }
            Op::Purge { topic } => {
                let t = TOPICS[usize::from(topic) % 2];
                let dlq = format!("{t}.dlq");
                if broker.topic(&dlq).is_ok() {
                    broker.purge(&dlq).expect("purge");
                    let d = broker.topic(&dlq).expect("dlq");
                    let p = &d.partitions[0].log;
                    assert_eq!(p.start_offset(), p.next_offset(), "a purge leaves nothing");
                }
                assert!(
                    broker.purge(t).is_err(),
                    "only dead-letter topics are purged"
                );
            }
            Op::Restart => {
                broker.close().expect("close");
                drop(broker);
                broker = open(dir.path());
                for (t, m) in &mut model {
                    let stored = broker.browse(t, 0, 0, m.ids.len() + 1).expect("browse");
                    let ids: Vec<u128> = stored.iter().map(|r| r.id.0).collect();
                    assert_eq!(ids, m.ids, "{t} changed across a clean restart");
                    // Deliveries in flight are forgotten by the client.
                    for gm in m.groups.values_mut() {
                        gm.outstanding.clear();
                    }
                }
            }
        }
        check_dead_letters(&broker, &model);
        // Group positions: within the log, never going back.
        for t in TOPICS {
            let m = model.entry(t).or_default();
            for g in GROUPS {
                let c = committed(&broker, t, g);
                assert!(
                    c <= m.ids.len() as u64,
                    "{t}/{g} committed {c} past the end"
                );
                let gm = m.groups.entry(g).or_default();
                assert!(
                    c >= gm.committed,
                    "{t}/{g} committed went back from {} to {c}",
                    gm.committed
                );
                gm.committed = c;
            }
        }
    }
    broker.close().expect("close");
});

/// Acks (or nacks) one outstanding delivery of the group, if it has any.
fn settle(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    model: &mut HashMap<&'static str, TopicModel>,
    topic: u8,
    group: u8,
    pick: u8,
    nack: bool,
) {
    let t = TOPICS[usize::from(topic) % 2];
    let g = GROUPS[usize::from(group) % 2];
    let gm = model.entry(t).or_default().groups.entry(g).or_default();
    if gm.outstanding.is_empty() {
        return;
    }
    let offset = gm
        .outstanding
        .swap_remove(usize::from(pick) % gm.outstanding.len());
    let req = AckRequest {
        topic: t.to_owned(),
        group: g.to_owned(),
        delay_ms: 0,
        entries: vec![(0, offset)],
    };
    let settled = rt.block_on(broker.ack(&req, nack)).expect("ack");
    assert!(settled <= 1);
}

/// Every dead letter names a stored message of its topic, carries its
/// payload, and no (offset, group) is dead-lettered twice.
fn check_dead_letters(broker: &Broker, model: &HashMap<&'static str, TopicModel>) {
    for t in TOPICS {
        let Ok(records) = broker.browse(&format!("{t}.dlq"), 0, 0, 1000) else {
            continue;
        };
        let ids = model.get(t).map_or(&[][..], |m| &m.ids[..]);
        let mut seen = std::collections::HashSet::new();
        for r in &records {
            let header = |name: &str| {
                bida::log::record::HeaderIter::new(&r.headers)
                    .filter_map(|h| h.ok())
                    .find(|(n, _)| *n == name.as_bytes())
                    .map(|(_, v)| String::from_utf8(v.to_vec()).expect("utf-8"))
                    .unwrap_or_else(|| panic!("dead letter without {name}"))
            };
            assert_eq!(header("bida-original-topic"), t);
            let offset: usize = header("bida-original-offset").parse().expect("a number");
            let group = header("bida-group");
            let Some(id) = ids.get(offset) else {
                panic!("a dead letter names offset {offset} past the end of {t}");
            };
            assert!(r.payload.iter().all(|b| *b == *id as u8), "wrong payload");
            assert!(
                seen.insert((offset, group.clone())),
                "{t}#{offset} dead-lettered twice for {group}"
            );
        }
    }
}
