//! One partition: its log, the waits for its durability, and the delivery
//! state of every group reading it. Topics hold partitions;
//! replication will wrap exactly this unit.
//!
//! A poisoned lock is taken over (`crate::sync`): a panic while a group's
//! state was held must cost the request that met it, not every later FETCH
//! and ACK of the partition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::durability::DurabilityWaiter;
use super::group::GroupPartitionState;
use super::BrokerError;
use crate::log::Log;
use crate::sync::lock;

pub struct Partition {
    pub index: u32,
    pub log: Arc<Log>,
    waiter: DurabilityWaiter,
    groups: Mutex<HashMap<String, GroupPartitionState>>,
}

impl Partition {
    /// Partition `index` over `log`.
    pub(super) fn new(index: u32, log: Arc<Log>) -> Partition {
        Partition {
            index,
            log,
            waiter: DurabilityWaiter::new(),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Completes once every offset below `target` is durable.
    pub async fn durable(&self, target: u64) -> Result<(), BrokerError> {
        self.waiter.durable(&self.log, target).await
    }

    /// The delivery state of each group that reads this partition.
    pub fn groups(&self) -> MutexGuard<'_, HashMap<String, GroupPartitionState>> {
        lock(&self.groups)
    }

    /// Ends the durability waiters: later `durable` calls answer
    /// `Stopping`.
    pub(super) fn stop_waiting(&self) {
        self.waiter.stop();
    }
}
