//! One partition: its log, the threads that wait for its durability, and
//! the delivery state of every group reading it. Topics hold partitions;
//! replication will wrap exactly this unit.
//!
//! A poisoned lock is taken over (`crate::sync`): a panic while a group's
//! state was held must cost the request that met it, not every later FETCH
//! and ACK of the partition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::group::GroupPartitionState;
use super::BrokerError;
use crate::log::{Log, StorageError};
use crate::sync::lock;

/// A request to the waiter: the target offset, and whom to tell.
type DurableRequest = (u64, oneshot::Sender<Result<(), Arc<StorageError>>>);

/// Waits for a log to be durable up to a target without blocking async
/// tasks: each of its threads takes every pending request, leads one group
/// commit for the highest target, and answers them all.
struct DurabilityWaiter {
    tx: Option<crossbeam_channel::Sender<DurableRequest>>,
    threads: Vec<JoinHandle<()>>,
}

impl DurabilityWaiter {
    /// One thread per flush the log may run at once: while one waits on a
    /// flush, the next requests go to another, which starts the next flush
    /// right away instead of after the first (see `log::FLUSHES_IN_FLIGHT`).
    fn start(log: Arc<Log>, name: String) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<DurableRequest>();
        let mut threads = Vec::new();
        for i in 0..crate::log::FLUSHES_IN_FLIGHT {
            let (log, rx) = (Arc::clone(&log), rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        let mut batch = Vec::new();
                        while let Ok(first) = rx.recv() {
                            batch.push(first);
                            batch.extend(rx.try_iter());
                            let target = batch.iter().map(|(t, _)| *t).max().unwrap_or(0);
                            let result = log.wait_durable(target).map_err(Arc::new);
                            for (_, done) in batch.drain(..) {
                                let _ = done.send(result.clone());
                            }
                        }
                    })?,
            );
        }
        Ok(DurabilityWaiter {
            tx: Some(tx),
            threads,
        })
    }

    fn stop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct Partition {
    pub index: u32,
    pub log: Arc<Log>,
    waiter: Mutex<DurabilityWaiter>,
    groups: Mutex<HashMap<String, GroupPartitionState>>,
}

impl Partition {
    /// Partition `index` over `log`, with its durability waiters started.
    pub(super) fn new(index: u32, log: Arc<Log>) -> std::io::Result<Partition> {
        let waiter = DurabilityWaiter::start(Arc::clone(&log), format!("bida-sync-{index}"))?;
        Ok(Partition {
            index,
            log,
            waiter: Mutex::new(waiter),
            groups: Mutex::new(HashMap::new()),
        })
    }

    /// Completes once every offset below `target` is durable.
    pub async fn durable(&self, target: u64) -> Result<(), BrokerError> {
        if self.log.durable_offset() >= target {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        let sent = match &lock(&self.waiter).tx {
            Some(tx) => tx.send((target, done)).is_ok(),
            None => false,
        };
        if !sent {
            return Err(BrokerError::Stopping);
        }
        rx.await
            .map_err(|_| BrokerError::Stopping)?
            .map_err(BrokerError::Durability)
    }

    /// The delivery state of each group that reads this partition.
    pub fn groups(&self) -> MutexGuard<'_, HashMap<String, GroupPartitionState>> {
        lock(&self.groups)
    }

    /// Ends the durability waiters: later `durable` calls answer
    /// `Stopping`.
    pub(super) fn stop_waiting(&self) {
        lock(&self.waiter).stop();
    }
}
