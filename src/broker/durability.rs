//! Waiting for a log's durability from async code: a few threads per log
//! take every pending request, lead one group commit for the highest
//! target, and answer them all, so no tokio worker ever blocks on an
//! fdatasync.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::BrokerError;
use crate::log::{Log, StorageError};
use crate::sync::lock;

/// A request to the waiter: the target offset, and whom to tell.
type DurableRequest = (u64, oneshot::Sender<Result<(), Arc<StorageError>>>);

/// Waits for a log to be durable up to a target without blocking async
/// tasks: each of its threads takes every pending request, leads one group
/// commit for the highest target, and answers them all.
pub(super) struct DurabilityWaiter {
    /// Only the threads hold the log, so a stopped waiter holds none (the
    /// broker closes a log it alone holds).
    inner: Mutex<Threads>,
}

struct Threads {
    tx: Option<crossbeam_channel::Sender<DurableRequest>>,
    threads: Vec<JoinHandle<()>>,
}

impl DurabilityWaiter {
    /// One thread per flush the log may run at once: while one waits on a
    /// flush, the next requests go to another, which starts the next flush
    /// right away instead of after the first (see `log::FLUSHES_IN_FLIGHT`).
    pub fn start(log: Arc<Log>, name: String) -> std::io::Result<Self> {
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
            inner: Mutex::new(Threads {
                tx: Some(tx),
                threads,
            }),
        })
    }

    /// Completes once every offset below `target` of `log` (the one this
    /// waiter was started for) is durable; `Stopping` once it has stopped.
    pub async fn durable(&self, log: &Log, target: u64) -> Result<(), BrokerError> {
        if log.durable_offset() >= target {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        let sent = match &lock(&self.inner).tx {
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

    /// Ends the threads once they have answered what they hold.
    pub fn stop(&self) {
        let threads = {
            let mut inner = lock(&self.inner);
            inner.tx.take();
            std::mem::take(&mut inner.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }
}
