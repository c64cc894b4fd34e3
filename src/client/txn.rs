//! Transactional (half) messages and delayed sends.
//!
//! ```no_run
//! # async fn demo(addr: std::net::SocketAddr) -> Result<(), bida::client::ClientError> {
//! use bida::client::{txn::{Decision, TransactionalProducer}, OutgoingMessage};
//! // The check callback answers the broker's "did it commit?" from the
//! // producer's own store, for any producer instance of the group.
//! let producer = TransactionalProducer::connect(addr, "order-service", |check| {
//!     let _order = check.key.as_deref(); // look the order up locally
//!     Decision::Unknown
//! })
//! .await?;
//! let mut txn = producer.begin();
//! txn.send_half("orders", OutgoingMessage::new("created").with_key("order-1")).await?;
//! // ... write the order row in the local transaction, then:
//! txn.commit().await?;
//! # Ok(()) }
//! ```
//!
//! Every request keeps its inner-msg-ids (and the transaction id) across
//! retries, so a resent half is stored once and a resent commit is
//! answered with the first one's outcome.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::producer::{encode_message, random_u64};
use super::{Client, ClientError, InvalidMessage, OutgoingMessage, RetryBackoff};
use crate::log::record::InnerMsgId;
use crate::protocol::body::{ProduceOutcome, ProduceReply, TopicConfig, ANY_PARTITION};
use crate::protocol::txn::{encode_delayed_prefix, encode_end, encode_half_prefix};
pub use crate::protocol::txn::{Check, Decision, EndReply, Placed, TxnState};
use crate::protocol::{ErrorCode, Opcode, Put};

/// Retries of every transactional request.
#[derive(Clone, Copy, Debug)]
pub struct RetryOptions {
    /// Default: 8.
    pub attempts: u32,
    /// Per attempt. Default: 10 s.
    pub timeout: Duration,
    /// Default: exponential from 50 ms, at most 2 s.
    pub backoff: RetryBackoff,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            attempts: 8,
            timeout: Duration::from_secs(10),
            backoff: RetryBackoff::Exponential {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
            },
        }
    }
}

/// Sends `body` until the broker answers it (a retriable error, a timeout
/// or a broken connection is tried again, the same bytes each time).
async fn request_with_retry(
    client: &Client,
    opcode: Opcode,
    body: &[u8],
    retry: RetryOptions,
) -> Result<Bytes, ClientError> {
    let mut last = ClientError::Closed;
    for attempt in 1..=retry.attempts.max(1) {
        let result = match tokio::time::timeout(retry.timeout, client.request(opcode, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(retry.timeout)),
        };
        match result {
            Ok(b) => return Ok(b),
            Err(e) if e.is_retriable() => last = e,
            Err(e) => return Err(e),
        }
        if attempt < retry.attempts {
            tokio::time::sleep(retry.backoff.delay(attempt)).await;
        }
    }
    Err(ClientError::Exhausted {
        attempts: retry.attempts,
        last: Box::new(last),
    })
}

/// Ids for messages: a random 64-bit producer id, then a sequence.
struct IdSource {
    producer: u64,
    sequence: AtomicU64,
}

impl IdSource {
    fn new() -> Result<Self, ClientError> {
        Ok(IdSource {
            producer: random_u64()?,
            sequence: AtomicU64::new(1),
        })
    }
    fn next(&self) -> u128 {
        ((self.producer as u128) << 64) | self.sequence.fetch_add(1, Ordering::Relaxed) as u128
    }
}

/// Sends messages that become visible `delay` after the broker stores
/// them. Messages with a key go to the key's partition (as with
/// `Producer`), the others to one the broker picks. Returns each message's
/// id and outcome, in order (offsets are positions in the broker's
/// schedule, not in the topic). Retried with the same ids.
pub async fn send_delayed(
    client: &Client,
    topic: &str,
    delay: Duration,
    messages: &[OutgoingMessage],
    retry: RetryOptions,
) -> Result<Vec<(InnerMsgId, ProduceOutcome)>, ClientError> {
    let ids = IdSource::new()?;
    let summary = client
        .create_topic(topic, 0, true, TopicConfig::default())
        .await?;
    // One request per partition, keeping the order within each.
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let p = m.key.as_deref().map_or(ANY_PARTITION, |k| {
            summary.key_hash.partition(k, summary.partitions)
        });
        match groups.iter_mut().find(|(gp, _)| *gp == p) {
            Some((_, v)) => v.push(i),
            None => groups.push((p, vec![i])),
        }
    }
    let mut out = vec![None; messages.len()];
    for (partition, indexes) in groups {
        let mut body = Vec::with_capacity(
            64 + indexes
                .iter()
                .map(|&i| messages[i].payload.len() + 32)
                .sum::<usize>(),
        );
        encode_delayed_prefix(topic, partition, delay.as_millis() as u64, &mut body);
        body.put_u32(indexes.len() as u32);
        let mut sent_ids = Vec::with_capacity(indexes.len());
        for &i in &indexes {
            let id = InnerMsgId(ids.next());
            encode_message(id, &messages[i], &mut body)?;
            sent_ids.push(id);
        }
        let reply = request_with_retry(client, Opcode::ProduceDelayed, &body, retry).await?;
        let reply = ProduceReply::decode(&reply)?;
        if reply.outcomes.len() != indexes.len() {
            return Err(ClientError::OutcomeCount {
                answered: reply.outcomes.len(),
                sent: indexes.len(),
            });
        }
        for ((i, id), o) in indexes.into_iter().zip(sent_ids).zip(reply.outcomes) {
            out[i] = Some((id, o));
        }
    }
    Ok(out.into_iter().flatten().collect())
}

type Checker = Arc<dyn Fn(&Check) -> Decision + Send + Sync>;

/// A producer of transactions in a producer group. Its connection is
/// registered for check-backs: when the broker asks about an undecided
/// transaction (of this instance or of a dead one of the same group) the
/// checker's answer is sent back.
pub struct TransactionalProducer {
    client: Arc<Client>,
    group: String,
    ids: IdSource,
    retry: RetryOptions,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for TransactionalProducer {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl TransactionalProducer {
    /// Connects, joins `group` and starts answering check-backs with
    /// `checker` (run on a blocking thread: it may query a database).
    pub async fn connect(
        addr: SocketAddr,
        group: &str,
        checker: impl Fn(&Check) -> Decision + Send + Sync + 'static,
    ) -> Result<TransactionalProducer, ClientError> {
        TransactionalProducer::connect_with_token(addr, None, group, checker).await
    }

    /// As [`TransactionalProducer::connect`], for a broker that requires a
    /// token.
    pub async fn connect_with_token(
        addr: SocketAddr,
        token: Option<&str>,
        group: &str,
        checker: impl Fn(&Check) -> Decision + Send + Sync + 'static,
    ) -> Result<TransactionalProducer, ClientError> {
        let client = Client::connect_with_token(addr, token).await?;
        TransactionalProducer::with_client(client, group, checker).await
    }

    /// As [`TransactionalProducer::connect`], on a client already connected
    /// (with whatever token or TLS it uses).
    pub async fn with_client(
        client: Arc<Client>,
        group: &str,
        checker: impl Fn(&Check) -> Decision + Send + Sync + 'static,
    ) -> Result<TransactionalProducer, ClientError> {
        crate::protocol::body::check_name("group", group).map_err(InvalidMessage::Name)?;
        let checker: Checker = Arc::new(checker);
        // Registered before returning, so a check can reach us at once.
        let first = client
            .connection()
            .await?
            .register_producer_group(group)
            .await?;
        let listener = tokio::spawn(listen(client.clone(), group.to_owned(), checker, first));
        Ok(TransactionalProducer {
            client,
            group: group.to_owned(),
            ids: IdSource::new()?,
            retry: RetryOptions::default(),
            listener,
        })
    }

    pub fn with_retry(mut self, retry: RetryOptions) -> Self {
        self.retry = retry;
        self
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Starts a transaction with a fresh random id.
    pub fn begin(&self) -> Transaction<'_> {
        let id = self.ids.next();
        Transaction {
            producer: self,
            id,
            halves: 0,
        }
    }

    /// Decides a transaction by id (e.g. one begun before a restart).
    pub async fn end(&self, txn_id: u128, decision: Decision) -> Result<EndReply, ClientError> {
        let mut body = Vec::with_capacity(17);
        encode_end(txn_id, decision, &mut body);
        let reply = request_with_retry(&self.client, Opcode::TxnEnd, &body, self.retry).await?;
        Ok(EndReply::decode(&reply)?)
    }
}

/// Keeps the group registered across reconnects and answers checks.
async fn listen(
    client: Arc<Client>,
    group: String,
    checker: Checker,
    first: tokio::sync::mpsc::UnboundedReceiver<Check>,
) {
    let mut checks = Some(first);
    loop {
        let mut rx = match checks.take() {
            Some(rx) => rx,
            None => {
                let registered = async {
                    client
                        .connection()
                        .await?
                        .register_producer_group(&group)
                        .await
                };
                match registered.await {
                    Ok(rx) => rx,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        while let Some(check) = rx.recv().await {
            let checker = checker.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let txn_id = check.txn_id;
                let decision = tokio::task::spawn_blocking(move || checker(&check))
                    .await
                    .unwrap_or(Decision::Unknown);
                let mut body = Vec::with_capacity(17);
                encode_end(txn_id, decision, &mut body);
                // One attempt: an unanswered check is asked again.
                if let Err(e) = client.request(Opcode::TxnEnd, &body).await {
                    tracing::debug!(txn = format!("{txn_id:032x}"), error = %e, "answering a check failed");
                }
            });
        }
        // The connection ended: register again on the next one.
    }
}

/// An open transaction: halves stored, not yet visible.
pub struct Transaction<'a> {
    producer: &'a TransactionalProducer,
    id: u128,
    halves: usize,
}

impl Transaction<'_> {
    pub fn id(&self) -> u128 {
        self.id
    }

    /// Messages stored so far.
    pub fn len(&self) -> usize {
        self.halves
    }

    pub fn is_empty(&self) -> bool {
        self.halves == 0
    }

    /// Stores one half message (durably, under sync flush).
    pub async fn send_half(
        &mut self,
        topic: &str,
        message: OutgoingMessage,
    ) -> Result<(), ClientError> {
        self.send_halves(topic, std::slice::from_ref(&message))
            .await
    }

    /// Stores several half messages in one request.
    pub async fn send_halves(
        &mut self,
        topic: &str,
        messages: &[OutgoingMessage],
    ) -> Result<(), ClientError> {
        let p = self.producer;
        let mut body =
            Vec::with_capacity(64 + messages.iter().map(|m| m.payload.len() + 32).sum::<usize>());
        encode_half_prefix(&p.group, self.id, topic, ANY_PARTITION, &mut body);
        body.put_u32(messages.len() as u32);
        for m in messages {
            encode_message(InnerMsgId(p.ids.next()), m, &mut body)?;
        }
        let reply = request_with_retry(&p.client, Opcode::TxnHalf, &body, p.retry).await?;
        let reply = ProduceReply::decode(&reply)?;
        self.halves += reply.outcomes.len();
        Ok(())
    }

    /// Makes every half visible. Once this returns, all of them are in
    /// their topics; if the broker crashes on the way, it finishes the
    /// commit when it restarts (never half of it). Returns where each
    /// landed.
    pub async fn commit(self) -> Result<EndReply, ClientError> {
        if self.halves == 0 {
            // Nothing stored, nothing to make visible.
            return Ok(EndReply {
                state: TxnState::Committed,
                placed: Vec::new(),
            });
        }
        self.producer.end(self.id, Decision::Commit).await
    }

    /// Discards every half.
    pub async fn rollback(self) -> Result<EndReply, ClientError> {
        match self.producer.end(self.id, Decision::Rollback).await {
            // Nothing was stored: nothing to roll back.
            Err(e) if self.halves == 0 && e.code() == Some(ErrorCode::UnknownTransaction) => {
                Ok(EndReply {
                    state: TxnState::RolledBack,
                    placed: Vec::new(),
                })
            }
            r => r,
        }
    }
}
