//! Group commit: many waiters, one flush at a time, each flush covering
//! everything appended before it started.
//!
//! A caller that needs offsets below `target` durable either finds them
//! durable, waits for the flush in flight, or becomes the leader: it runs the
//! flush itself (no hand-off to another thread, which costs ~20 µs here) and
//! wakes everyone when it completes. Appends continue during a flush and are
//! picked up by the next one, so a slow disk batches more per flush instead
//! of queueing flushes.
//!
//! A failed flush poisons the log: after an fsync error the kernel may have
//! dropped the dirty pages, so retrying could report durability falsely.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::error::{Result, StorageError};

pub(crate) struct GroupCommit {
    state: Mutex<State>,
    flushed: Condvar,
    /// Mirror of `state.durable_offset` readable without the lock.
    durable: AtomicU64,
}

struct State {
    durable_offset: u64,
    flushing: bool,
    failure: Option<String>,
}

impl GroupCommit {
    pub(crate) fn new(durable_offset: u64) -> Self {
        GroupCommit {
            state: Mutex::new(State {
                durable_offset,
                flushing: false,
                failure: None,
            }),
            flushed: Condvar::new(),
            durable: AtomicU64::new(durable_offset),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every offset below this is durable.
    pub(crate) fn durable_offset(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Returns once every offset below `target` is durable, running `flush`
    /// (which returns the offset it made durable up to) when no flush is in
    /// flight.
    pub(crate) fn wait_for(
        &self,
        target: u64,
        mut flush: impl FnMut() -> Result<u64>,
    ) -> Result<()> {
        let mut state = self.lock();
        loop {
            if let Some(failure) = &state.failure {
                return Err(StorageError::Failed(failure.clone()));
            }
            if state.durable_offset >= target {
                return Ok(());
            }
            if state.flushing {
                state = self.flushed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.flushing = true;
            drop(state);
            let outcome = flush();
            state = self.lock();
            state.flushing = false;
            match outcome {
                Ok(durable) => self.advance_locked(&mut state, durable),
                Err(e) => {
                    state.failure = Some(e.to_string());
                    self.flushed.notify_all();
                    return Err(e);
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
    }

    /// Refuses all further waits: durability can no longer be promised.
    pub(crate) fn fail(&self, reason: String) {
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
                            .wait_for(target, || {
                                flushes.fetch_add(1, Ordering::SeqCst);
                                let upto = appended.load(Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(
                                    50 + t + i % 3,
                                ));
                                Ok(upto)
                            })
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
    fn a_failed_flush_poisons_every_later_wait() {
        let group = GroupCommit::new(0);
        let err = group
            .wait_for(1, || Err(StorageError::Failed("disk on fire".into())))
            .unwrap_err();
        assert!(err.to_string().contains("disk on fire"));
        let again = group.wait_for(1, || Ok(1)).unwrap_err();
        assert!(matches!(again, StorageError::Failed(_)));
    }
}
