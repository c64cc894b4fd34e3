//! Delayed messages and transactions (half messages): one internal log,
//! `DATA/_schedule/`, and the tables rebuilt from it on open.
//!
//! Every entry is one record of that log. An entry that carries a message
//! keeps the message's own inner-msg-id, key and headers, so a retried
//! PRODUCE_DELAYED or TXN_HALF is stored once (the log's dedup window), and
//! its payload is this prefix followed by the message's payload:
//!
//! ```text
//! DELAYED  u8 1 | u64 due_ms | u32 partition | u16 len | topic | payload..
//! HALF     u8 2 | u128 txn_id | u32 partition | u16 len | topic |
//!                 u16 len | producer group | payload..
//! ```
//!
//! Markers carry no message (id 0, no dedup, no key, no headers):
//!
//! ```text
//! FIRED    u8 3 | u32 count | count x u64 schedule offset   (delivered)
//! DECISION u8 4 | u128 txn_id | u8 state (1 committed, 2 rolled back) |
//!                 u8 by (0 producer, 1 check limit)
//! DONE     u8 5 | u128 txn_id           (commit applied / rollback done)
//! ```
//!
//! Firing a delayed message or applying a commit appends the stored
//! message to its topic **with its original inner-msg-id**, then writes the
//! marker. A crash between the two repeats the append on restart, and the
//! topic's dedup window stores it once.
//!
//! Memory: 16 bytes per pending delayed message (due time, schedule
//! offset) in a heap; the message itself stays on disk until it fires.
//! Segments of the schedule log wholly below the oldest entry still needed
//! are deleted.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::config::CrashPoint;
use super::durability::DurabilityWaiter;
use super::{Broker, BrokerError, BusyReason, Decided, Invalid};
use crate::log::record::{InnerMsgId, Message};
use crate::log::{Appended, Log, Options, Record};
use crate::protocol::body::ProduceRequest;
use crate::protocol::txn::{Check, Decision, EndReply, Placed, TxnState, TXN_MESSAGES_MAX};
use crate::sync::lock;

const KIND_DELAYED: u8 = 1;
const KIND_HALF: u8 = 2;
const KIND_FIRED: u8 = 3;
const KIND_DECISION: u8 = 4;
const KIND_DONE: u8 = 5;

const BY_PRODUCER: u8 = 0;
const BY_CHECK_LIMIT: u8 = 1;

/// Delayed messages fired per round of the scheduler thread.
const FIRE_BATCH: usize = 4096;
/// Longest wait between checks of a transaction.
const CHECK_INTERVAL_MAX_MS: u64 = 60_000;
/// Finished transactions remembered, so a retried TXN_END gets its answer.
const FINISHED_REMEMBERED: usize = 100_000;
/// How often the scheduler looks for schedule segments to delete.
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// A failed delivery is tried again after this long.
const RETRY_MS: u64 = 1000;

/// The limits the scheduler works to (from `BrokerConfig`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub check_after_ms: u64,
    pub check_interval_ms: u64,
    pub check_max: u32,
    pub txn_open_max: usize,
    pub delayed_max: usize,
    /// Fault injection for the crash tests (`BrokerConfig::faults`).
    pub crash_at: Option<CrashPoint>,
}

/// A decoded schedule entry (a view of one record).
#[derive(Debug, PartialEq, Eq)]
enum Entry<'a> {
    Delayed {
        due_ms: u64,
        partition: u32,
        topic: &'a str,
        payload: &'a [u8],
    },
    Half {
        txn_id: u128,
        partition: u32,
        topic: &'a str,
        group: &'a str,
        payload: &'a [u8],
    },
    Fired(Vec<u64>),
    Decision {
        txn_id: u128,
        state: TxnState,
        by: u8,
    },
    Done(u128),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_delayed(due_ms: u64, partition: u32, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 + 4 + 2 + topic.len() + payload.len());
    out.push(KIND_DELAYED);
    out.extend_from_slice(&due_ms.to_le_bytes());
    out.extend_from_slice(&partition.to_le_bytes());
    put_str(&mut out, topic);
    out.extend_from_slice(payload);
    out
}

fn encode_half(txn_id: u128, partition: u32, topic: &str, group: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 16 + 4 + 4 + topic.len() + group.len() + payload.len());
    out.push(KIND_HALF);
    out.extend_from_slice(&txn_id.to_le_bytes());
    out.extend_from_slice(&partition.to_le_bytes());
    put_str(&mut out, topic);
    put_str(&mut out, group);
    out.extend_from_slice(payload);
    out
}

fn encode_fired(offsets: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + offsets.len() * 8);
    out.push(KIND_FIRED);
    out.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
    for o in offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    out
}

fn encode_decision(txn_id: u128, state: TxnState, by: u8) -> Vec<u8> {
    let mut out = vec![KIND_DECISION];
    out.extend_from_slice(&txn_id.to_le_bytes());
    out.push(state as u8);
    out.push(by);
    out
}

fn encode_done(txn_id: u128) -> Vec<u8> {
    let mut out = vec![KIND_DONE];
    out.extend_from_slice(&txn_id.to_le_bytes());
    out
}

/// Decodes an entry's prefix. Hostile or damaged bytes give an error
/// naming what is wrong, never a panic.
fn decode(payload: &[u8]) -> Result<Entry<'_>, String> {
    let mut r = crate::protocol::Reader::new(payload);
    let e = |e: crate::protocol::WireError| e.to_string();
    let entry = match r.u8().map_err(e)? {
        KIND_DELAYED => {
            let due_ms = r.u64().map_err(e)?;
            let partition = r.u32().map_err(e)?;
            let topic = r.str("topic", u16::MAX as usize).map_err(e)?;
            let rest = r.remaining();
            Entry::Delayed {
                due_ms,
                partition,
                topic,
                payload: r.bytes(rest).map_err(e)?,
            }
        }
        KIND_HALF => {
            let txn_id = r.u128().map_err(e)?;
            let partition = r.u32().map_err(e)?;
            let topic = r.str("topic", u16::MAX as usize).map_err(e)?;
            let group = r.str("group", u16::MAX as usize).map_err(e)?;
            let rest = r.remaining();
            Entry::Half {
                txn_id,
                partition,
                topic,
                group,
                payload: r.bytes(rest).map_err(e)?,
            }
        }
        KIND_FIRED => {
            let n = r.count("offsets", usize::MAX, 8).map_err(e)?;
            let mut offsets = Vec::with_capacity(n);
            for _ in 0..n {
                offsets.push(r.u64().map_err(e)?);
            }
            r.finish().map_err(e)?;
            Entry::Fired(offsets)
        }
        KIND_DECISION => {
            let txn_id = r.u128().map_err(e)?;
            let state = TxnState::decode(&mut r).map_err(e)?;
            let by = r.u8().map_err(e)?;
            r.finish().map_err(e)?;
            Entry::Decision { txn_id, state, by }
        }
        KIND_DONE => {
            let txn_id = r.u128().map_err(e)?;
            r.finish().map_err(e)?;
            Entry::Done(txn_id)
        }
        k => return Err(format!("unknown schedule entry kind {k}")),
    };
    Ok(entry)
}

/// Where an open transaction stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Taking halves; undecided.
    Open,
    /// A thread is writing its decision or applying it.
    Deciding,
    /// The decision is durable, applying it failed; tried again.
    Decided(TxnState),
}

struct Txn {
    group: String,
    /// Schedule offsets of its halves, in the order stored.
    halves: Vec<u64>,
    phase: Phase,
    checks: u32,
    next_check_ms: u64,
}

#[derive(Default)]
struct State {
    /// Pending delayed messages: (due, schedule offset), soonest first.
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    txns: HashMap<u128, Txn>,
    finished: HashMap<u128, TxnState>,
    finished_order: VecDeque<u128>,
}

impl State {
    fn finish(&mut self, txn_id: u128, state: TxnState) {
        self.txns.remove(&txn_id);
        if self.finished.insert(txn_id, state).is_none() {
            self.finished_order.push_back(txn_id);
        }
        while self.finished_order.len() > FINISHED_REMEMBERED {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
    }
}

/// Where the schedule sends a producer group's check-backs: in the broker
/// a connection that registered with TXN_REGISTER. The schedule emits typed
/// [`Check`] events; the server encodes them (a TXN_CHECK push).
pub trait CheckSink: Send + Sync {
    /// The connection behind it is still open.
    fn is_open(&self) -> bool;
    /// Queues `check` without waiting: false if the connection has gone or
    /// its queue is full (the next check tries another producer).
    fn try_send(&self, check: &Check) -> bool;
}

/// Counters for operators.
#[derive(Default, Debug)]
pub struct ScheduleMetrics {
    /// Transactions rolled back because no producer answered in time.
    pub rolled_back_by_check_limit: AtomicU64,
    pub checks_sent: AtomicU64,
    pub delayed_fired: AtomicU64,
}

pub struct Schedule {
    log: Arc<Log>,
    /// Answers `durable` without blocking a tokio worker.
    waiter: DurabilityWaiter,
    limits: Limits,
    state: Mutex<State>,
    producers: Mutex<HashMap<String, Vec<Box<dyn CheckSink>>>>,
    wake: Sender<()>,
    wake_rx: Mutex<Option<Receiver<()>>>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub metrics: ScheduleMetrics,
}

impl Schedule {
    /// Opens (or creates) the schedule log under `dir` and rebuilds the
    /// timers and transactions from it. Decided transactions that were not
    /// finished are finished by [`Schedule::start`].
    pub fn open(dir: PathBuf, options: Options, limits: Limits) -> Result<Schedule, BrokerError> {
        let log = Arc::new(Log::open(&dir, options)?);
        let mut state = State::default();
        let mut delayed: HashMap<u64, u64> = HashMap::new();
        let mut fired: HashSet<u64> = HashSet::new();
        let now = log.options().clock.now_ms();
        let mut offset = log.start_offset();
        let end = log.next_offset();
        while offset < end {
            let batch = log.read(offset, 4096, 16 << 20)?;
            if batch.records == 0 {
                break;
            }
            for record in batch.iter() {
                let r = record?;
                offset = r.offset + 1;
                let entry = decode(&r.payload).map_err(|reason| {
                    BrokerError::Storage(crate::log::StorageError::Corrupt {
                        file: dir.clone(),
                        position: r.offset,
                        reason: format!("schedule entry at offset {}: {reason}", r.offset),
                    })
                })?;
                match entry {
                    Entry::Delayed { due_ms, .. } => {
                        delayed.insert(r.offset, due_ms);
                    }
                    Entry::Fired(offsets) => fired.extend(offsets),
                    Entry::Half { txn_id, group, .. } => {
                        let txn = state.txns.entry(txn_id).or_insert_with(|| Txn {
                            group: group.to_owned(),
                            halves: Vec::new(),
                            phase: Phase::Open,
                            checks: 0,
                            next_check_ms: r.timestamp_ms + limits.check_after_ms,
                        });
                        txn.halves.push(r.offset);
                    }
                    Entry::Decision {
                        txn_id, state: s, ..
                    } => {
                        if let Some(t) = state.txns.get_mut(&txn_id) {
                            t.phase = Phase::Decided(s);
                        }
                    }
                    Entry::Done(txn_id) => {
                        let s = match state.txns.get(&txn_id).map(|t| t.phase) {
                            Some(Phase::Decided(s)) => s,
                            _ => TxnState::RolledBack,
                        };
                        state.finish(txn_id, s);
                    }
                }
            }
        }
        let mut timers: Vec<Reverse<(u64, u64)>> = delayed
            .into_iter()
            .filter(|(offset, _)| !fired.contains(offset))
            .map(|(offset, due)| Reverse((due, offset)))
            .collect();
        timers.shrink_to_fit();
        state.timers = BinaryHeap::from(timers);
        drop(fired);
        // The scan touched every page; none is needed until it fires.
        log.release_durable_pages();
        // An undecided transaction found on open is asked about soon, not
        // at once: its producer may be reconnecting right now.
        // A decided one is finished at once.
        for t in state.txns.values_mut() {
            t.next_check_ms = match t.phase {
                Phase::Decided(_) => now,
                _ => t.next_check_ms.max(now + limits.check_after_ms.min(1000)),
            };
        }
        tracing::info!(
            dir = %dir.display(),
            delayed = state.timers.len(),
            transactions = state.txns.len(),
            "schedule open"
        );
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        let waiter = DurabilityWaiter::new();
        Ok(Schedule {
            log,
            waiter,
            limits,
            state: Mutex::new(state),
            producers: Mutex::new(HashMap::new()),
            wake,
            wake_rx: Mutex::new(Some(wake_rx)),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            metrics: ScheduleMetrics::default(),
        })
    }

    /// Starts the scheduler thread (delayed messages, check-backs,
    /// finishing decided transactions).
    pub fn start(self: &Arc<Self>, broker: Weak<Broker>) -> std::io::Result<()> {
        let Some(rx) = lock(&self.wake_rx).take() else {
            return Err(std::io::Error::other(
                "the scheduler thread is already started",
            ));
        };
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("bida-schedule".into())
            .spawn(move || me.run(broker, rx))?;
        *lock(&self.thread) = Some(handle);
        Ok(())
    }

    /// The broker's clock (a manual one in tests).
    fn now_ms(&self) -> u64 {
        self.log.options().clock.now_ms()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn poke(&self) {
        let _ = self.wake.try_send(());
    }

    /// Makes the scheduler look at its timers now rather than at its next
    /// tick (up to 500 ms away): for a clock that jumps (tests).
    pub fn wake(&self) {
        self.poke();
    }

    /// Delayed messages pending, and undecided transactions.
    pub fn pending(&self) -> (usize, usize) {
        let s = self.lock();
        (s.timers.len(), s.txns.len())
    }

    /// Completes once the schedule log is durable up to `target`.
    pub async fn durable(&self, target: u64) -> Result<(), BrokerError> {
        self.waiter.durable(&self.log, target).await
    }

    /// Stores delayed messages for `partition` of `topic`. A retried
    /// message (same inner-msg-id) keeps its first due time.
    pub fn delay(
        &self,
        topic: &str,
        partition: u32,
        delay_ms: u64,
        req: &ProduceRequest<'_>,
    ) -> Result<Appended, BrokerError> {
        if self.lock().timers.len() + req.messages.len() > self.limits.delayed_max {
            return Err(BrokerError::Busy(BusyReason::DelayedFull {
                max: self.limits.delayed_max,
            }));
        }
        let due_ms = self.now_ms() + delay_ms;
        let payloads: Vec<Vec<u8>> = req
            .messages
            .iter()
            .map(|m| encode_delayed(due_ms, partition, topic, m.payload))
            .collect();
        let records: Vec<Message<'_>> = req
            .messages
            .iter()
            .zip(&payloads)
            .map(|(m, p)| Message { payload: p, ..*m })
            .collect();
        let appended = self.append(&records)?;
        let mut s = self.lock();
        let soonest = s.timers.peek().map(|Reverse((d, _))| *d);
        for o in appended.outcomes.iter().filter(|o| !o.duplicate) {
            s.timers.push(Reverse((due_ms, o.offset)));
        }
        drop(s);
        if soonest.is_none_or(|d| due_ms < d) {
            self.poke();
        }
        Ok(appended)
    }

    fn append(&self, records: &[Message<'_>]) -> Result<Appended, BrokerError> {
        self.log.append(records).map_err(|e| match e {
            e @ crate::log::StorageError::InvalidMessage { .. } => BrokerError::InvalidMessage(e),
            e => BrokerError::Storage(e),
        })
    }

    /// Stores half messages of `txn_id`, invisible until it commits.
    pub fn half(
        &self,
        group: &str,
        txn_id: u128,
        topic: &str,
        partition: u32,
        req: &ProduceRequest<'_>,
    ) -> Result<Appended, BrokerError> {
        let mut s = self.lock();
        match s.txns.get(&txn_id) {
            Some(t) if t.phase != Phase::Open => {
                return Err(BrokerError::TransactionDecided(Decided::NoMoreHalves {
                    txn_id,
                }))
            }
            Some(t) if t.group != group => {
                return Err(Invalid::OtherGroup {
                    txn_id,
                    group: t.group.clone(),
                }
                .into())
            }
            Some(t) if t.halves.len() + req.messages.len() > TXN_MESSAGES_MAX => {
                return Err(Invalid::TxnTooLarge {
                    max: TXN_MESSAGES_MAX,
                }
                .into())
            }
            Some(_) => {}
            None if s.finished.contains_key(&txn_id) => {
                return Err(BrokerError::TransactionDecided(Decided::Already { txn_id }))
            }
            None if s.txns.len() >= self.limits.txn_open_max => {
                return Err(BrokerError::Busy(BusyReason::TransactionsFull {
                    max: self.limits.txn_open_max,
                }))
            }
            None if req.messages.len() > TXN_MESSAGES_MAX => {
                return Err(Invalid::TxnTooLarge {
                    max: TXN_MESSAGES_MAX,
                }
                .into())
            }
            None => {}
        }
        let payloads: Vec<Vec<u8>> = req
            .messages
            .iter()
            .map(|m| encode_half(txn_id, partition, topic, group, m.payload))
            .collect();
        let records: Vec<Message<'_>> = req
            .messages
            .iter()
            .zip(&payloads)
            .map(|(m, p)| Message { payload: p, ..*m })
            .collect();
        // Appended under the state lock: a decision cannot slip between
        // the append and the bookkeeping.
        let appended = self.append(&records)?;
        let now = self.now_ms();
        let check_after = self.limits.check_after_ms;
        let t = s.txns.entry(txn_id).or_insert_with(|| Txn {
            group: group.to_owned(),
            halves: Vec::new(),
            phase: Phase::Open,
            checks: 0,
            next_check_ms: now + check_after,
        });
        for o in appended.outcomes.iter().filter(|o| !o.duplicate) {
            t.halves.push(o.offset);
        }
        drop(s);
        self.poke();
        Ok(appended)
    }

    /// Commits, rolls back, or (Unknown, in answer to a check) defers
    /// `txn_id`. Blocks on the disk: run it off the async workers.
    pub fn end(
        &self,
        broker: &Broker,
        txn_id: u128,
        decision: Decision,
    ) -> Result<EndReply, BrokerError> {
        let target = match decision {
            Decision::Commit => TxnState::Committed,
            Decision::Rollback => TxnState::RolledBack,
            Decision::Unknown => TxnState::Open,
        };
        let halves = {
            let mut s = self.lock();
            let Some(t) = s.txns.get_mut(&txn_id) else {
                return match s.finished.get(&txn_id) {
                    Some(&done) if done == target || target == TxnState::Open => Ok(EndReply {
                        state: done,
                        placed: Vec::new(),
                    }),
                    Some(&done) => Err(BrokerError::TransactionDecided(Decided::Otherwise {
                        txn_id,
                        state: done,
                    })),
                    None => Err(BrokerError::UnknownTransaction(txn_id)),
                };
            };
            match (t.phase, target) {
                (Phase::Deciding, _) => {
                    return Err(BrokerError::Busy(BusyReason::Deciding { txn_id }))
                }
                (Phase::Decided(done), TxnState::Open) => {
                    return Ok(EndReply {
                        state: done,
                        placed: Vec::new(),
                    })
                }
                (Phase::Decided(done), _) if done != target => {
                    return Err(BrokerError::TransactionDecided(Decided::Otherwise {
                        txn_id,
                        state: done,
                    }))
                }
                (Phase::Open, TxnState::Open) => {
                    t.next_check_ms = self.now_ms() + self.check_delay(t.checks);
                    return Ok(EndReply {
                        state: TxnState::Open,
                        placed: Vec::new(),
                    });
                }
                _ => {}
            }
            let already_decided = matches!(t.phase, Phase::Decided(_));
            t.phase = Phase::Deciding;
            (t.halves.clone(), already_decided)
        };
        let (halves, already_decided) = halves;
        let result = self.decide(
            broker,
            txn_id,
            &halves,
            target,
            BY_PRODUCER,
            already_decided,
        );
        self.settle(txn_id, target, &result);
        result.map(|placed| EndReply {
            state: target,
            placed,
        })
    }

    /// Writes the decision (durably), applies it, writes DONE.
    fn decide(
        &self,
        broker: &Broker,
        txn_id: u128,
        halves: &[u64],
        state: TxnState,
        by: u8,
        already_decided: bool,
    ) -> Result<Vec<Placed>, BrokerError> {
        if !already_decided {
            let payload = encode_decision(txn_id, state, by);
            let appended = self.append(&[marker(&payload)])?;
            self.log.wait_durable(appended.durable_target())?;
            self.crash_point(CrashPoint::TxnDecided);
        }
        let placed = if state == TxnState::Committed {
            self.deliver(broker, halves)?
        } else {
            Vec::new()
        };
        self.crash_point(CrashPoint::TxnApplied);
        let payload = encode_done(txn_id);
        self.append(&[marker(&payload)])?;
        Ok(placed)
    }

    /// Records the outcome of `decide` in the table.
    fn settle<T>(&self, txn_id: u128, state: TxnState, result: &Result<T, BrokerError>) {
        let mut s = self.lock();
        match result {
            Ok(_) => s.finish(txn_id, state),
            Err(e) => {
                tracing::warn!(txn = format!("{txn_id:032x}"), error = %e, "deciding a transaction failed; retrying later");
                if let Some(t) = s.txns.get_mut(&txn_id) {
                    // Whether the decision reached the disk is unknown:
                    // Decided makes the retry write it again, harmlessly.
                    t.phase = Phase::Decided(state);
                    t.next_check_ms = self.now_ms() + RETRY_MS;
                }
            }
        }
    }

    fn crash_point(&self, at: CrashPoint) {
        if self.limits.crash_at == Some(at) {
            eprintln!("bida: --fault-crash-at {}: aborting", at.name());
            std::process::abort();
        }
    }

    fn check_delay(&self, checks: u32) -> u64 {
        let factor = 1u64 << checks.saturating_sub(1).min(16);
        self.limits
            .check_interval_ms
            .saturating_mul(factor)
            .min(CHECK_INTERVAL_MAX_MS.max(self.limits.check_interval_ms))
    }

    /// Appends the stored messages at `offsets` to their topics, in order,
    /// with their original ids; waits until they are durable under sync
    /// flush.
    fn deliver(&self, broker: &Broker, offsets: &[u64]) -> Result<Vec<Placed>, BrokerError> {
        let mut records: Vec<Record> = Vec::with_capacity(offsets.len());
        for &o in offsets {
            let batch = self.log.read(o, 1, 1)?;
            let Some(r) = batch.iter().next() else {
                return Err(BrokerError::ScheduleEntry {
                    offset: o,
                    problem: "missing",
                });
            };
            records.push(r?);
        }
        let mut placed = Vec::with_capacity(records.len());
        let mut run: Vec<Message<'_>> = Vec::new();
        let mut run_target: Option<(&str, u32)> = None;
        for r in &records {
            let (topic, partition, payload) = match decode(&r.payload) {
                Ok(Entry::Delayed {
                    topic,
                    partition,
                    payload,
                    ..
                })
                | Ok(Entry::Half {
                    topic,
                    partition,
                    payload,
                    ..
                }) => (topic, partition, payload),
                Ok(_) | Err(_) => {
                    return Err(BrokerError::ScheduleEntry {
                        offset: r.offset,
                        problem: "holds no message",
                    })
                }
            };
            if let Some((t, p)) = run_target.filter(|&t| t != (topic, partition)) {
                placed.extend(broker.append_stored(t, p, &run)?);
                run.clear();
            }
            run_target = Some((topic, partition));
            run.push(Message {
                id: r.id,
                key: r.key.as_deref(),
                headers: &r.headers,
                payload,
            });
        }
        if let Some((t, p)) = run_target {
            placed.extend(broker.append_stored(t, p, &run)?);
        }
        Ok(placed)
    }

    /// Registers a connection for the check-backs of `group`.
    pub fn register(&self, group: &str, sink: Box<dyn CheckSink>) {
        let mut p = lock(&self.producers);
        let list = p.entry(group.to_owned()).or_default();
        list.retain(|r| r.is_open());
        list.push(sink);
    }

    /// Sends a check to a live producer of the group: the `n`-th live one,
    /// so successive checks rotate over the group's producers.
    fn send_check(&self, check: &Check, n: u32) -> bool {
        let mut p = lock(&self.producers);
        let Some(list) = p.get_mut(&check.group) else {
            return false;
        };
        list.retain(|r| r.is_open());
        if list.is_empty() {
            return false;
        }
        let start = n as usize % list.len();
        (0..list.len()).any(|i| list[(start + i) % list.len()].try_send(check))
    }

    fn run(self: Arc<Self>, broker: Weak<Broker>, wake: Receiver<()>) {
        let mut last_compact = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let now = self.now_ms();
            let next = {
                let s = self.lock();
                let timer = s.timers.peek().map(|Reverse((d, _))| *d);
                let check = s
                    .txns
                    .values()
                    .filter(|t| t.phase != Phase::Deciding)
                    .map(|t| t.next_check_ms)
                    .min();
                timer.into_iter().chain(check).min()
            };
            let wait = next.map_or(Duration::from_millis(500), |d| {
                Duration::from_millis(d.saturating_sub(now).min(500))
            });
            if !wait.is_zero() {
                match wake.recv_timeout(wait) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            let Some(broker) = broker.upgrade() else {
                return;
            };
            self.fire_due(&broker);
            self.check_transactions(&broker);
            if last_compact.elapsed() >= COMPACT_EVERY {
                self.compact();
                last_compact = Instant::now();
            }
        }
    }

    fn fire_due(&self, broker: &Broker) {
        let now = self.now_ms();
        let due: Vec<u64> = {
            let mut s = self.lock();
            let mut due = Vec::new();
            while due.len() < FIRE_BATCH {
                match s.timers.peek_mut() {
                    Some(top) if top.0 .0 <= now => {
                        let Reverse((_, o)) = PeekMut::pop(top);
                        due.push(o);
                    }
                    _ => break,
                }
            }
            due
        };
        if due.is_empty() {
            return;
        }
        match self.deliver(broker, &due) {
            Ok(_) => {
                let payload = encode_fired(&due);
                if let Err(e) = self.append(&[marker(&payload)]) {
                    // Not fatal: on restart they fire again and the
                    // topics' dedup stores them once.
                    tracing::warn!(error = %e, "could not record fired delayed messages");
                }
                self.metrics
                    .delayed_fired
                    .fetch_add(due.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, count = due.len(), "delivering delayed messages failed; retrying");
                let mut s = self.lock();
                for o in due {
                    s.timers.push(Reverse((now + RETRY_MS, o)));
                }
            }
        }
    }

    fn check_transactions(&self, broker: &Broker) {
        enum Action {
            Check(u32),
            RollBackAtLimit,
            Apply(TxnState),
        }
        let now = self.now_ms();
        let work: Vec<(u128, Action, Vec<u64>, String)> = {
            let mut s = self.lock();
            let mut work = Vec::new();
            for (&id, t) in s.txns.iter_mut() {
                if t.phase == Phase::Deciding || t.next_check_ms > now {
                    continue;
                }
                let action = match t.phase {
                    Phase::Open if t.checks < self.limits.check_max => {
                        t.checks += 1;
                        t.next_check_ms = now + self.check_delay(t.checks);
                        Action::Check(t.checks)
                    }
                    Phase::Open => {
                        t.phase = Phase::Deciding;
                        Action::RollBackAtLimit
                    }
                    Phase::Decided(state) => {
                        t.phase = Phase::Deciding;
                        Action::Apply(state)
                    }
                    Phase::Deciding => continue,
                };
                work.push((id, action, t.halves.clone(), t.group.clone()));
            }
            work
        };
        for (txn_id, action, halves, group) in work {
            match action {
                Action::Check(n) => {
                    let sent = self
                        .check_for(txn_id, &group, n, &halves)
                        .is_some_and(|check| self.send_check(&check, n));
                    if sent {
                        self.metrics.checks_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Action::RollBackAtLimit => {
                    tracing::warn!(
                        txn = format!("{txn_id:032x}"),
                        group,
                        checks = self.limits.check_max,
                        messages = halves.len(),
                        "no decision after the maximum number of checks: rolling back"
                    );
                    let r = self.decide(
                        broker,
                        txn_id,
                        &halves,
                        TxnState::RolledBack,
                        BY_CHECK_LIMIT,
                        false,
                    );
                    if r.is_ok() {
                        self.metrics
                            .rolled_back_by_check_limit
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.settle(txn_id, TxnState::RolledBack, &r);
                }
                Action::Apply(state) => {
                    let r = self.decide(broker, txn_id, &halves, state, BY_PRODUCER, true);
                    self.settle(txn_id, state, &r);
                }
            }
        }
    }

    fn check_for(&self, txn_id: u128, group: &str, check: u32, halves: &[u64]) -> Option<Check> {
        let first = *halves.first()?;
        let batch = self.log.read(first, 1, 1).ok()?;
        let r = batch.iter().next()?.ok()?;
        let Ok(Entry::Half { topic, .. }) = decode(&r.payload) else {
            return None;
        };
        Some(Check {
            group: group.to_owned(),
            txn_id,
            check,
            topic: topic.to_owned(),
            messages: halves.len() as u32,
            key: r.key.as_ref().map(|k| k.to_vec()),
            headers: r.headers.to_vec(),
        })
    }

    /// Deletes schedule segments wholly below every entry still needed and
    /// below the dedup window: a segment whose ids are still in the window
    /// must outlive a restart, or the window rebuilt from the log would miss
    /// them and a retried PRODUCE_DELAYED or TXN_HALF be stored (and fire)
    /// again.
    pub fn compact(&self) {
        let low = {
            let s = self.lock();
            let timers = s.timers.iter().map(|Reverse((_, o))| *o).min();
            let txns = s
                .txns
                .values()
                .filter_map(|t| t.halves.first().copied())
                .min();
            timers
                .into_iter()
                .chain(txns)
                .min()
                .unwrap_or_else(|| self.log.next_offset())
                .min(self.log.dedup_window_start())
        };
        if let Err(e) = self.log.delete_before(low) {
            tracing::warn!(error = %e, "could not delete old schedule segments");
        }
    }

    /// Stops the thread and closes the log.
    pub fn close(&self) -> Result<(), BrokerError> {
        self.stop.store(true, Ordering::Release);
        self.poke();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.waiter.stop();
        // Flushes and records a clean shutdown (the log is shared).
        self.log.shutdown()?;
        Ok(())
    }

    /// The schedule log (for closing it cleanly).
    pub fn into_log(self) -> Arc<Log> {
        self.log
    }
}

fn marker(payload: &[u8]) -> Message<'_> {
    Message {
        id: InnerMsgId::NONE,
        key: None,
        headers: &[],
        payload,
    }
}

pub(super) fn state_name(s: TxnState) -> &'static str {
    match s {
        TxnState::Open => "open",
        TxnState::Committed => "committed",
        TxnState::RolledBack => "rolled back",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let d = encode_delayed(77, 3, "orders", b"payload");
        assert_eq!(
            decode(&d).unwrap(),
            Entry::Delayed {
                due_ms: 77,
                partition: 3,
                topic: "orders",
                payload: b"payload"
            }
        );
        let h = encode_half(9, 1, "t", "g", b"");
        assert_eq!(
            decode(&h).unwrap(),
            Entry::Half {
                txn_id: 9,
                partition: 1,
                topic: "t",
                group: "g",
                payload: b""
            }
        );
        assert_eq!(
            decode(&encode_fired(&[1, 5])).unwrap(),
            Entry::Fired(vec![1, 5])
        );
        assert_eq!(
            decode(&encode_decision(4, TxnState::Committed, BY_PRODUCER)).unwrap(),
            Entry::Decision {
                txn_id: 4,
                state: TxnState::Committed,
                by: BY_PRODUCER
            }
        );
        assert_eq!(decode(&encode_done(4)).unwrap(), Entry::Done(4));
    }

    #[test]
    fn damaged_entries_are_errors() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[9]).is_err());
        let f = encode_fired(&[1, 2, 3]);
        for cut in 1..f.len() {
            assert!(decode(&f[..cut]).is_err(), "cut at {cut}");
        }
        let mut f = encode_fired(&[1]);
        f[1] = 0xff; // count far beyond the bytes present
        assert!(decode(&f).is_err());
        let d = encode_decision(1, TxnState::Committed, 0);
        assert!(decode(&d[..d.len() - 1]).is_err());
    }
}
