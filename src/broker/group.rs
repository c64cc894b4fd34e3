//! Delivery state of one consumer group on one partition. Pure: time is
//! passed in, nothing here does I/O; the broker persists acks separately.
//!
//! ```text
//!   committed                       next                     end of log
//!   |<---- slots: one per offset ---->|<--- never delivered --->|
//!   [Acked][InFlight][Waiting][Acked]..
//! ```
//!
//! Every offset below `committed` is acked. Each offset in
//! `[committed, next)` has a slot: in flight (delivered, deadline pending),
//! waiting (its delivery failed; due for redelivery at a time in `ready`),
//! dead (handed to the dead-letter topic, its ack pending) or acked.
//! `next - committed` is bounded by `unacked_max`, so a stalled consumer
//! stops new deliveries instead of growing memory.
//!
//! Timeouts are a FIFO: every deadline is "now + ack_timeout" with one
//! timeout per group, so deadlines are pushed in increasing order; stale
//! entries (acked or redelivered since) are skipped when popped. One entry
//! covers a run of offsets delivered together (a fetch), and entries
//! wholly below `committed` are dropped as it advances: the FIFO holds
//! about one entry per delivery batch within the ack timeout, not one per
//! message (at 2 M msgs/s and a 30 s timeout that was 60 M entries, 1.4 GB,
//! kept by every group).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use crate::protocol::body::Backoff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Delivered `attempt` times, the last one pending until `deadline_ms`.
    InFlight {
        attempt: u16,
        deadline_ms: u64,
    },
    /// Delivered `attempt` times without an ack; redelivery is scheduled.
    Waiting {
        attempt: u16,
    },
    /// Given up on after `attempt` deliveries; being moved to the DLQ.
    Dead,
    Acked,
}

/// Delivery policy of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub ack_timeout_ms: u64,
    pub max_deliveries: u16,
    pub backoff: Backoff,
    /// Most offsets delivered but not acked, per partition.
    pub unacked_max: u64,
}

/// A message whose last allowed delivery failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub offset: u64,
    pub attempts: u16,
}

/// Offsets `[offset, offset + count)`, delivered for the `attempt`th
/// time, time out at `deadline_ms`.
#[derive(Clone, Copy, Debug)]
struct Timeout {
    deadline_ms: u64,
    offset: u64,
    count: u32,
    attempt: u16,
}

#[derive(Debug)]
pub struct GroupPartitionState {
    committed: u64,
    next: u64,
    slots: VecDeque<Slot>,
    timeouts: VecDeque<Timeout>,
    ready: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: u32,
    /// Redeliveries scheduled since the last `take_scheduled`: `(offset,
    /// due_ms)`, for the broker to persist.
    scheduled: Vec<(u64, u64)>,
    /// Redeliveries handed out since the broker started.
    redelivered: u64,
}

impl GroupPartitionState {
    /// A group that has acked everything below `committed`.
    pub fn new(committed: u64) -> Self {
        GroupPartitionState {
            committed,
            next: committed,
            slots: VecDeque::new(),
            timeouts: VecDeque::new(),
            ready: BinaryHeap::new(),
            in_flight: 0,
            scheduled: Vec::new(),
            redelivered: 0,
        }
    }

    /// A group restored after a restart: everything below `committed` plus
    /// the offsets in `acked_above` (sorted, all `>= committed`) are acked;
    /// an offset in `delayed` (not acked) is due for redelivery at its time;
    /// every other offset below the highest of those was delivered before
    /// the restart and is due for redelivery at once.
    pub fn restore(committed: u64, acked_above: &[u64], delayed: &BTreeMap<u64, u64>) -> Self {
        let mut s = Self::new(committed);
        let last_acked = acked_above.last().copied();
        let last_delayed = delayed.range(committed..).next_back().map(|(o, _)| *o);
        if let Some(last) = last_acked.into_iter().chain(last_delayed).max() {
            s.next = last + 1;
            let mut acked = acked_above.iter().peekable();
            for offset in committed..=last {
                if acked.peek() == Some(&&offset) {
                    acked.next();
                    s.slots.push_back(Slot::Acked);
                } else {
                    let due = delayed.get(&offset).copied().unwrap_or(0);
                    s.slots.push_back(Slot::Waiting { attempt: 0 });
                    s.ready.push(Reverse((due, offset)));
                }
            }
            s.advance();
        }
        s
    }

    /// Redeliveries scheduled (by a nack or a timeout) since the last call:
    /// `(offset, due_ms)`.
    pub fn take_scheduled(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.scheduled)
    }

    /// Every redelivery still waiting for its time: `(offset, due_ms)`
    /// (for snapshots).
    pub fn pending_redeliveries(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .ready
            .iter()
            .filter(|Reverse((_, o))| {
                *o >= self.committed
                    && matches!(
                        self.slots.get((*o - self.committed) as usize),
                        Some(Slot::Waiting { .. })
                    )
            })
            .map(|Reverse((due, o))| (*o, *due))
            .collect();
        out.sort_unstable();
        out.dedup_by_key(|(o, _)| *o);
        out
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }
    pub fn next(&self) -> u64 {
        self.next
    }
    /// Redeliveries handed out since the broker started (not kept across
    /// a restart).
    pub fn redelivered(&self) -> u64 {
        self.redelivered
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    fn slot(&mut self, offset: u64) -> Option<&mut Slot> {
        if offset < self.committed || offset >= self.next {
            return None;
        }
        self.slots.get_mut((offset - self.committed) as usize)
    }

    /// Pops acked slots off the front.
    fn advance(&mut self) {
        while self.slots.front() == Some(&Slot::Acked) {
            self.slots.pop_front();
            self.committed += 1;
        }
        while self
            .timeouts
            .front()
            .is_some_and(|t| t.offset + t.count as u64 <= self.committed)
        {
            self.timeouts.pop_front();
        }
        if self.slots.is_empty() {
            debug_assert_eq!(self.committed, self.next);
        }
    }

    /// Deliveries whose deadline passed: each is scheduled for redelivery
    /// after the backoff, or returned as dead once it has had
    /// `max_deliveries`.
    pub fn expire(&mut self, now_ms: u64, policy: &Policy) -> Vec<DeadLetter> {
        let mut dead = Vec::new();
        while let Some(&t) = self.timeouts.front() {
            if t.deadline_ms > now_ms {
                break;
            }
            self.timeouts.pop_front();
            let expired = Slot::InFlight {
                attempt: t.attempt,
                deadline_ms: t.deadline_ms,
            };
            for offset in t.offset.max(self.committed)..t.offset + t.count as u64 {
                if self.slot(offset).copied() == Some(expired) {
                    self.in_flight -= 1;
                    if let Some(d) = self.fail(offset, t.attempt, now_ms, None, policy) {
                        dead.push(d);
                    }
                }
            }
        }
        dead
    }

    fn fail(
        &mut self,
        offset: u64,
        attempt: u16,
        now_ms: u64,
        delay_ms: Option<u64>,
        policy: &Policy,
    ) -> Option<DeadLetter> {
        let Some(slot) = self.slot(offset) else {
            // Only a delivered offset fails, and a delivered offset has a
            // slot until it is acked: nothing to record.
            tracing::warn!(offset, "a failed delivery of an offset with no slot");
            return None;
        };
        if attempt >= policy.max_deliveries {
            *slot = Slot::Dead;
            return Some(DeadLetter {
                offset,
                attempts: attempt,
            });
        }
        *slot = Slot::Waiting { attempt };
        let delay = delay_ms.unwrap_or_else(|| policy.backoff.delay_ms(attempt as u32));
        self.ready.push(Reverse((now_ms + delay, offset)));
        self.scheduled.push((offset, now_ms + delay));
        None
    }

    /// Up to `max` redeliveries that are due, marked in flight: `(offset,
    /// attempt)` with the new attempt number.
    pub fn take_redeliveries(
        &mut self,
        now_ms: u64,
        max: usize,
        policy: &Policy,
    ) -> Vec<(u64, u16)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&Reverse((due_ms, offset))) = self.ready.peek() else {
                break;
            };
            if due_ms > now_ms {
                break;
            }
            self.ready.pop();
            let deadline_ms = now_ms + policy.ack_timeout_ms;
            if let Some(slot) = self.slot(offset) {
                if let Slot::Waiting { attempt } = *slot {
                    let attempt = attempt.saturating_add(1);
                    *slot = Slot::InFlight {
                        attempt,
                        deadline_ms,
                    };
                    self.timeouts.push_back(Timeout {
                        deadline_ms,
                        offset,
                        count: 1,
                        attempt,
                    });
                    self.in_flight += 1;
                    self.redelivered += 1;
                    out.push((offset, attempt));
                }
            }
        }
        out
    }

    /// When the next redelivery is due, if any is scheduled.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.ready.peek().map(|Reverse((due, _))| *due)
    }

    /// How many never-delivered offsets may be delivered now, given the
    /// log ends at `end`.
    pub fn new_allowance(&self, end: u64, policy: &Policy) -> u64 {
        let window_left = policy
            .unacked_max
            .saturating_sub(self.next - self.committed);
        end.saturating_sub(self.next).min(window_left)
    }

    /// Records that offsets `[next, next + count)` were delivered for the
    /// first time.
    pub fn mark_delivered(&mut self, count: u64, now_ms: u64, policy: &Policy) {
        if count == 0 {
            return;
        }
        let deadline_ms = now_ms + policy.ack_timeout_ms;
        let slot = Slot::InFlight {
            attempt: 1,
            deadline_ms,
        };
        self.slots.extend(std::iter::repeat_n(slot, count as usize));
        self.timeouts.push_back(Timeout {
            deadline_ms,
            offset: self.next,
            count: count as u32,
            attempt: 1,
        });
        self.next += count;
        self.in_flight += count as u32;
    }

    /// Acks `offset`. True if it was delivered and not acked before (a
    /// late ack of a delivery that timed out still counts: the consumer did
    /// process it).
    pub fn ack(&mut self, offset: u64) -> bool {
        let Some(slot) = self.slot(offset) else {
            return false;
        };
        let was = *slot;
        if was == Slot::Acked {
            return false;
        }
        *slot = Slot::Acked;
        if matches!(was, Slot::InFlight { .. }) {
            self.in_flight -= 1;
        }
        self.advance();
        true
    }

    /// Gives up on an in-flight delivery now: redelivery after `delay_ms`
    /// (or the backoff), or dead if it had its last attempt. `None`: the
    /// offset was not in flight.
    pub fn nack(
        &mut self,
        offset: u64,
        now_ms: u64,
        delay_ms: Option<u64>,
        policy: &Policy,
    ) -> Option<Option<DeadLetter>> {
        match self.slot(offset).copied() {
            Some(Slot::InFlight { attempt, .. }) => {
                self.in_flight -= 1;
                Some(self.fail(offset, attempt, now_ms, delay_ms, policy))
            }
            _ => None,
        }
    }

    /// Offsets acked above `committed` (for snapshots).
    pub fn acked_above(&self) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == Slot::Acked)
            .map(|(i, _)| self.committed + i as u64)
            .collect()
    }

    /// The log's start moved past `start` (retention): offsets below it can
    /// no longer be delivered and count as gone.
    pub fn skip_to(&mut self, start: u64) {
        while self.committed < start {
            match self.slots.pop_front() {
                Some(Slot::InFlight { .. }) => self.in_flight -= 1,
                Some(_) => {}
                None => {
                    self.next = start;
                    self.committed = start;
                    break;
                }
            }
            self.committed += 1;
        }
        self.next = self.next.max(self.committed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            ack_timeout_ms: 100,
            max_deliveries: 3,
            backoff: Backoff::Exponential {
                base_ms: 10,
                max_ms: 1000,
                factor_percent: 200,
            },
            unacked_max: 5,
        }
    }

    #[test]
    fn acks_advance_committed_in_order() {
        let p = policy();
        let mut g = GroupPartitionState::new(10);
        assert_eq!(g.new_allowance(100, &p), 5, "bounded by unacked_max");
        g.mark_delivered(3, 0, &p);
        assert_eq!((g.next(), g.in_flight()), (13, 3));
        assert!(g.ack(11));
        assert_eq!(g.committed(), 10);
        assert!(g.ack(10));
        assert_eq!(g.committed(), 12);
        assert!(!g.ack(10), "acked twice");
        assert!(!g.ack(13), "never delivered");
        assert_eq!(g.acked_above(), Vec::<u64>::new());
        assert_eq!(g.in_flight(), 1);
    }

    #[test]
    fn timeouts_back_off_then_die() {
        let p = policy();
        let mut g = GroupPartitionState::new(0);
        g.mark_delivered(1, 0, &p);
        assert!(g.expire(99, &p).is_empty());
        assert!(g.take_redeliveries(99, 10, &p).is_empty());
        // Timeout at 100; first redelivery after base 10 ms.
        assert!(g.expire(100, &p).is_empty());
        assert_eq!(g.next_due_ms(), Some(110));
        assert!(g.take_redeliveries(109, 10, &p).is_empty());
        assert_eq!(g.take_redeliveries(110, 10, &p), vec![(0, 2)]);
        // Second failure: backoff doubles to 20 ms.
        assert!(g.expire(210, &p).is_empty());
        assert_eq!(g.next_due_ms(), Some(230));
        assert_eq!(g.take_redeliveries(230, 10, &p), vec![(0, 3)]);
        // Third delivery was the last allowed.
        assert_eq!(
            g.expire(330, &p),
            vec![DeadLetter {
                offset: 0,
                attempts: 3
            }]
        );
        assert!(g.take_redeliveries(10_000, 10, &p).is_empty());
        assert_eq!(g.committed(), 0, "dead until its DLQ copy is acked");
        assert!(g.ack(0));
        assert_eq!(g.committed(), 1);
    }

    #[test]
    fn timeouts_take_one_entry_per_delivery_and_go_once_acked() {
        let p = Policy {
            unacked_max: 1 << 20,
            ..policy()
        };
        let mut g = GroupPartitionState::new(0);
        for batch in 0..1_000u64 {
            g.mark_delivered(1_000, batch, &p);
            for offset in batch * 1_000..(batch + 1) * 1_000 {
                assert!(g.ack(offset));
            }
        }
        assert_eq!(g.committed(), 1_000_000);
        assert!(g.timeouts.is_empty(), "{} left", g.timeouts.len());
        // Unacked: one entry per delivery, and only the unacked in it expire.
        g.mark_delivered(3, 0, &p);
        g.mark_delivered(2, 50, &p);
        assert_eq!(g.timeouts.len(), 2);
        assert!(g.ack(1_000_001));
        assert!(g.ack(1_000_003));
        assert!(g.expire(100, &p).is_empty());
        assert_eq!(
            g.take_redeliveries(110, 10, &p),
            vec![(1_000_000, 2), (1_000_002, 2)]
        );
        assert!(g.expire(150, &p).is_empty());
        assert_eq!(g.take_redeliveries(160, 10, &p), vec![(1_000_004, 2)]);
    }

    #[test]
    fn late_ack_cancels_redelivery() {
        let p = policy();
        let mut g = GroupPartitionState::new(0);
        g.mark_delivered(2, 0, &p);
        g.expire(100, &p);
        assert!(g.ack(0), "late ack of a timed-out delivery");
        assert_eq!(g.take_redeliveries(1_000, 10, &p), vec![(1, 2)]);
        assert_eq!(g.committed(), 1);
        assert_eq!(g.redelivered(), 1, "only offset 1 went out again");
    }

    #[test]
    fn nack_with_delay() {
        let p = policy();
        let mut g = GroupPartitionState::new(0);
        g.mark_delivered(1, 0, &p);
        assert_eq!(g.nack(0, 5, Some(50), &p), Some(None));
        assert_eq!(g.nack(0, 5, Some(50), &p), None, "not in flight");
        assert!(g.take_redeliveries(54, 10, &p).is_empty());
        assert_eq!(g.take_redeliveries(55, 10, &p), vec![(0, 2)]);
        // The stale timeout of attempt 1 does nothing.
        assert!(g.expire(100, &p).is_empty());
        assert_eq!(g.in_flight(), 1);
    }

    #[test]
    fn restore_redelivers_unacked() {
        let p = policy();
        let mut g = GroupPartitionState::restore(5, &[6, 8], &BTreeMap::new());
        assert_eq!((g.committed(), g.next()), (5, 9));
        assert_eq!(g.take_redeliveries(0, 10, &p), vec![(5, 1), (7, 1)]);
        assert!(g.ack(5));
        assert_eq!(g.committed(), 7);
        assert_eq!(g.acked_above(), vec![8]);
    }

    #[test]
    fn skip_to_after_retention() {
        let p = policy();
        let mut g = GroupPartitionState::new(0);
        g.mark_delivered(3, 0, &p);
        g.skip_to(2);
        assert_eq!((g.committed(), g.next(), g.in_flight()), (2, 3, 1));
        g.skip_to(10);
        assert_eq!((g.committed(), g.next(), g.in_flight()), (10, 10, 0));
    }

    #[test]
    fn scheduled_redeliveries_are_reported_and_restored_at_their_time() {
        let p = policy();
        let mut g = GroupPartitionState::new(0);
        g.mark_delivered(3, 0, &p);
        assert_eq!(g.nack(1, 100, Some(5_000), &p), Some(None));
        assert_eq!(g.take_scheduled(), vec![(1, 5_100)]);
        assert!(g.take_scheduled().is_empty(), "drained");
        assert_eq!(g.pending_redeliveries(), vec![(1, 5_100)]);
        assert!(g.ack(0));
        // After a restart: 0 acked, 1 due at 5,100, 2 (delivered, no record
        // of it) due at once.
        let delayed = BTreeMap::from([(1, 5_100)]);
        let mut r = GroupPartitionState::restore(1, &[], &delayed);
        assert_eq!(r.next(), 2, "the delayed offset is covered");
        assert!(r.take_redeliveries(5_000, 10, &p).is_empty());
        assert_eq!(r.take_redeliveries(5_100, 10, &p), vec![(1, 1)]);
        let mut r = GroupPartitionState::restore(1, &[3], &delayed);
        assert_eq!(r.take_redeliveries(0, 10, &p), vec![(2, 1)]);
        assert_eq!(r.pending_redeliveries(), vec![(1, 5_100)]);
    }
}
