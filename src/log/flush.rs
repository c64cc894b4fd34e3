//! Group commit: many waiters, few flushes, each flush covering everything
//! appended before it started.
//!
//! A caller that needs offsets below `target` durable either finds them
//! durable, waits for a flush in flight that covers them, or becomes a
//! leader: it runs a flush itself (no hand-off to another thread, which
//! costs ~20 µs here) and wakes everyone when it completes. Appends continue
//! during a flush and are picked up by the next one, so a slow disk batches
//! more per flush instead of queueing flushes.
//!
//! Up to [`FLUSHES_IN_FLIGHT`] flushes run at once. With one, an append
//! that just missed a flush waits for it to end and then for its own: up to
//! two flush times, and this VM's device flushes have a tail of several
//! milliseconds. A second flush may start while the first runs, so an
//! append waits about one. Out of order completion is fine: `fdatasync`
//! returns once everything written to the file before the call is durable,
//! so whichever flush ends makes its whole prefix durable.
//!
//! A failed flush poisons the log: after an fsync error the kernel may have
//! dropped the dirty pages, so retrying could report durability falsely.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::error::{Result, StorageError};
use crate::sync::lock;

/// Flushes of one log that may run at the same time.
pub const FLUSHES_IN_FLIGHT: usize = 2;

pub(crate) struct GroupCommit {
    state: Mutex<State>,
    flushed: Condvar,
    /// Mirror of `state.durable_offset` readable without the lock.
    durable: AtomicU64,
}

struct State {
    durable_offset: u64,
    /// Flushes running now.
    flushing: usize,
    /// The highest offset a running flush will make durable.
    covered: u64,
    failure: Option<Arc<StorageError>>,
}

impl GroupCommit {
    pub(crate) fn new(durable_offset: u64) -> Self {
        GroupCommit {
            state: Mutex::new(State {
                durable_offset,
                flushing: 0,
                covered: durable_offset,
                failure: None,
            }),
            flushed: Condvar::new(),
            durable: AtomicU64::new(durable_offset),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Every offset below this is durable.
    pub(crate) fn durable_offset(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    pub(crate) fn failure(&self) -> Option<Arc<StorageError>> {
        self.lock().failure.clone()
    }

    /// Returns once every offset below `target` is durable. A leader calls
    /// `prepare` (outside the lock: it may take the writer's lock), which
    /// returns the offset the flush will cover and what it needs, then
    /// `flush` with that.
    pub(crate) fn wait_for<P>(
        &self,
        target: u64,
        mut prepare: impl FnMut() -> (u64, P),
        mut flush: impl FnMut(P) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.lock();
        loop {
            if let Some(failure) = &state.failure {
                return Err(StorageError::Failed(failure.clone()));
            }
            if state.durable_offset >= target {
                return Ok(());
            }
            if state.covered >= target || state.flushing >= FLUSHES_IN_FLIGHT {
                state = self.flushed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.flushing += 1;
            drop(state);
            let (covers, parts) = prepare();
            {
                let mut state = self.lock();
                state.covered = state.covered.max(covers);
            }
            let outcome = flush(parts);
            state = self.lock();
            state.flushing -= 1;
            match outcome {
                Ok(()) => self.advance_locked(&mut state, covers),
                Err(e) => {
                    let cause = Arc::clone(state.failure.get_or_insert_with(|| Arc::new(e)));
                    self.flushed.notify_all();
                    return Err(StorageError::Failed(cause));
                }
            }
            self.flushed.notify_all();
        }
    }

    /// Records that offsets below `durable` are on disk (a sealed segment).
    pub(crate) fn advance(&self, durable: u64) {
        let mut state = self.lock();
        self.advance_locked(&mut state, durable);
        self.flushed.notify_all();
    }

    fn advance_locked(&self, state: &mut State, durable: u64) {
        if durable > state.durable_offset {
            state.durable_offset = durable;
            self.durable.store(durable, Ordering::Release);
        }
        state.covered = state.covered.max(durable);
    }

    /// Refuses all further waits: durability can no longer be promised.
    pub(crate) fn fail(&self, reason: Arc<StorageError>) {
        let mut state = self.lock();
        state.failure.get_or_insert(reason);
        self.flushed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn one_flush_serves_every_waiter_behind_it() {
        let group = Arc::new(GroupCommit::new(0));
        let flushes = Arc::new(AtomicUsize::new(0));
        let appended = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (group, flushes, appended) = (&group, &flushes, &appended);
                s.spawn(move || {
                    for i in 0..200u64 {
                        let target = appended.fetch_add(1, Ordering::SeqCst) + 1;
                        group
                            .wait_for(
                                target,
                                || (appended.load(Ordering::SeqCst), ()),
                                |()| {
                                    flushes.fetch_add(1, Ordering::SeqCst);
                                    std::thread::sleep(std::time::Duration::from_micros(
                                        50 + t + i % 3,
                                    ));
                                    Ok(())
                                },
                            )
                            .unwrap();
                        assert!(group.durable_offset() >= target);
                    }
                });
            }
        });
        assert_eq!(group.durable_offset(), 1600);
        let flushes = flushes.load(Ordering::SeqCst);
        assert!(
            flushes < 1600,
            "{flushes} flushes for 1600 waits: no grouping happened"
        );
    }

    #[test]
    fn a_second_flush_runs_while_a_slow_one_is_in_flight() {
        let group = GroupCommit::new(0);
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started, first_started) = std::sync::mpsc::channel::<()>();
        let flushes = AtomicUsize::new(0);
        std::thread::scope(|s| {
            // A slow flush covering offsets below 10.
            let (group, flushes) = (&group, &flushes);
            let slow = s.spawn(move || {
                group.wait_for(
                    10,
                    || (10, ()),
                    |()| {
                        flushes.fetch_add(1, Ordering::SeqCst);
                        started.send(()).unwrap();
                        blocked.recv().unwrap();
                        Ok(())
                    },
                )
            });
            first_started.recv().unwrap();
            // Covered by the flush in flight: waits for it, runs none.
            let covered = s.spawn(move || group.wait_for(5, || (10, ()), |()| unreachable!()));
            // Appended after it started: its own flush, done while the
            // first is still stuck.
            let (done, second_done) = std::sync::mpsc::channel();
            let second = s.spawn(move || {
                let r = group.wait_for(
                    20,
                    || (20, ()),
                    |()| {
                        flushes.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    },
                );
                done.send(()).unwrap();
                r
            });
            let overtook = second_done.recv_timeout(std::time::Duration::from_secs(10));
            release.send(()).unwrap();
            assert!(overtook.is_ok(), "the second flush waited for the first");
            second.join().unwrap().unwrap();
            assert!(group.durable_offset() >= 20);
            // Ending first, the second made everything below 20 durable.
            covered.join().unwrap().unwrap();
            slow.join().unwrap().unwrap();
        });
        assert_eq!(flushes.load(Ordering::SeqCst), 2);
        assert_eq!(group.durable_offset(), 20);
    }

    #[test]
    fn a_failed_flush_poisons_every_later_wait() {
        let group = GroupCommit::new(0);
        let err = group
            .wait_for(
                1,
                || (1, ()),
                |()| {
                    Err(StorageError::Io {
                        path: "00000000000000000000.log".into(),
                        source: std::io::Error::from_raw_os_error(28),
                    })
                },
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("00000000000000000000.log"),
            "{err}"
        );
        let again = group.wait_for(1, || (1, ()), |()| Ok(())).unwrap_err();
        assert!(matches!(again, StorageError::Failed(_)));
        // A full disk stays a full disk for every later caller.
        assert!(err.is_disk_full() && again.is_disk_full());
    }
}
