//! The consumer: pull (`fetch`) or push (`subscribe`) within a group, and
//! explicit acks. Every delivery must be acked; one that is not is
//! redelivered after the topic's ack timeout, possibly to another consumer
//! of the group.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Client, ClientError, Connection};
use crate::protocol::body::{
    self, decode_deliveries, AckRequest, Credit, Delivery, Fetch, GroupPartition, Subscribe,
    ANY_PARTITION, NACK_DEFAULT_DELAY,
};
use crate::protocol::Opcode;

#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Deliveries per fetch, at most. Default: 1000.
    pub max_messages: u32,
    /// Bytes per fetch, at most. Default: 4 MiB.
    pub max_bytes: u32,
    /// How long a fetch waits for messages. Default: 500 ms.
    pub max_wait: Duration,
    /// Push window: deliveries the broker may send ahead of processing.
    /// Default: 1000.
    pub credit: u32,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            max_messages: 1000,
            max_bytes: 4 << 20,
            max_wait: Duration::from_millis(500),
            credit: 1000,
        }
    }
}

pub struct Consumer {
    client: Arc<Client>,
    topic: String,
    group: String,
    options: ConsumerOptions,
}

impl Consumer {
    pub fn new(
        client: Arc<Client>,
        topic: &str,
        group: &str,
        options: ConsumerOptions,
    ) -> Consumer {
        Consumer {
            client,
            topic: topic.to_owned(),
            group: group.to_owned(),
            options,
        }
    }

    /// One pull from any partition: waits up to `max_wait` for messages
    /// and returns what came (possibly nothing).
    pub async fn fetch(&self) -> Result<Vec<Delivery>, ClientError> {
        self.fetch_from(ANY_PARTITION).await
    }

    /// One pull from one partition.
    pub async fn fetch_from(&self, partition: u32) -> Result<Vec<Delivery>, ClientError> {
        let mut b = Vec::new();
        Fetch {
            topic: self.topic.clone(),
            partition,
            group: self.group.clone(),
            max_messages: self.options.max_messages,
            max_bytes: self.options.max_bytes,
            max_wait_ms: self.options.max_wait.as_millis().min(u32::MAX as u128) as u32,
        }
        .encode(&mut b);
        let reply = self.client.request(Opcode::Fetch, &b).await?;
        Ok(decode_deliveries(&reply)?)
    }

    async fn settle(
        &self,
        deliveries: &[&Delivery],
        opcode: Opcode,
        delay_ms: u32,
    ) -> Result<u32, ClientError> {
        let mut total = 0;
        for chunk in deliveries.chunks(body::ACK_ENTRIES_MAX) {
            let mut b = Vec::new();
            AckRequest {
                topic: self.topic.clone(),
                group: self.group.clone(),
                delay_ms,
                entries: chunk.iter().map(|d| (d.partition, d.offset)).collect(),
            }
            .encode(&mut b);
            total += body::decode_u32(&self.client.request(opcode, &b).await?)?;
        }
        Ok(total)
    }

    /// Acks deliveries: they will not be delivered to this group again.
    /// Returns how many were still in flight. Completes once the acks are
    /// stored as the broker's flush policy says.
    pub async fn ack(&self, deliveries: &[&Delivery]) -> Result<u32, ClientError> {
        self.settle(deliveries, Opcode::Ack, 0).await
    }

    /// Gives deliveries back for redelivery after `delay` (or the topic's
    /// backoff); a message out of deliveries goes to the dead-letter topic.
    pub async fn nack(
        &self,
        deliveries: &[&Delivery],
        delay: Option<Duration>,
    ) -> Result<u32, ClientError> {
        let delay_ms = delay.map_or(NACK_DEFAULT_DELAY, |d| {
            d.as_millis().min(u32::MAX as u128 - 1) as u32
        });
        self.settle(deliveries, Opcode::Nack, delay_ms).await
    }

    /// The group's position on every partition.
    pub async fn position(&self) -> Result<Vec<GroupPartition>, ClientError> {
        self.client.group_position(&self.topic, &self.group).await
    }

    /// Push mode: the broker sends deliveries while this subscription has
    /// credit; the subscription grants more as deliveries are taken.
    pub async fn subscribe(&self) -> Result<Subscription, ClientError> {
        let conn = self.client.connection().await?;
        let mut b = Vec::new();
        Subscribe {
            topic: self.topic.clone(),
            group: self.group.clone(),
            credit: self.options.credit,
        }
        .encode(&mut b);
        let (id, rx) = conn.subscribe(&b).await?;
        Ok(Subscription {
            conn,
            id,
            rx,
            buffered: std::collections::VecDeque::new(),
            taken_since_grant: 0,
            window: self.options.credit,
        })
    }
}

/// Deliveries pushed by the broker.
pub struct Subscription {
    conn: Arc<Connection>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Result<Vec<Delivery>, ClientError>>,
    buffered: std::collections::VecDeque<Delivery>,
    taken_since_grant: u32,
    window: u32,
}

impl Subscription {
    /// The next delivery; `None` once the connection is gone. Taking
    /// deliveries grants the broker more credit, half a window at a time.
    pub async fn next(&mut self) -> Option<Result<Delivery, ClientError>> {
        loop {
            if let Some(d) = self.buffered.pop_front() {
                self.taken_since_grant += 1;
                if self.taken_since_grant >= (self.window / 2).max(1) {
                    let grant = self.taken_since_grant;
                    self.taken_since_grant = 0;
                    let mut b = Vec::new();
                    Credit {
                        subscription: self.id,
                        credit: grant,
                    }
                    .encode(&mut b);
                    let conn = self.conn.clone();
                    tokio::spawn(async move {
                        let _ = conn.request(Opcode::Credit, &b).await;
                    });
                }
                return Some(Ok(d));
            }
            match self.rx.recv().await? {
                Ok(batch) => self.buffered.extend(batch),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Stops the pushes.
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        let mut b = Vec::new();
        Credit {
            subscription: self.id,
            credit: 0,
        }
        .encode(&mut b);
        self.conn.forget_subscription(self.id);
        self.conn.request(Opcode::Unsubscribe, &b).await.map(|_| ())
    }
}
