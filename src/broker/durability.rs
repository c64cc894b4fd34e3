//! Waiting for a log's durability from async code: the wait is handed to
//! the log (`Log::when_durable`), whose workers (shared by every log of the
//! broker) lead one group commit for all the waits pending, so no tokio
//! worker ever blocks on an fdatasync and no partition has a thread.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use super::BrokerError;
use crate::log::Log;

/// Durable waits of one log, until it is stopped.
pub(super) struct DurabilityWaiter {
    stopped: AtomicBool,
}

impl DurabilityWaiter {
    pub fn new() -> Self {
        DurabilityWaiter {
            stopped: AtomicBool::new(false),
        }
    }

    /// Completes once every offset below `target` of `log` is durable;
    /// `Stopping` once the waiter has stopped, or if the log goes first.
    pub async fn durable(&self, log: &Log, target: u64) -> Result<(), BrokerError> {
        if log.durable_offset() >= target {
            return Ok(());
        }
        if self.stopped.load(Ordering::Acquire) {
            return Err(BrokerError::Stopping);
        }
        let (done, rx) = oneshot::channel();
        log.when_durable(
            target,
            Box::new(move |outcome| {
                let _ = done.send(outcome);
            }),
        );
        rx.await
            .map_err(|_| BrokerError::Stopping)?
            .map_err(BrokerError::Durability)
    }

    /// Later waits answer `Stopping`; those already handed to the log are
    /// answered when it flushes or closes.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }
}
