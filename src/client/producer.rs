//! The producer: batching, pipelining, and retries that resend the same
//! inner-msg-ids.
//!
//! `send` hands a message to a batcher task, which fills one batch per
//! partition until `batch_messages_max` / `batch_bytes_max` or `linger`,
//! then sends it as one PRODUCE. Up to `inflight_batches_max` batches are
//! unanswered at once. A batch is encoded once: every retry sends the very
//! same bytes to the very same partition, so the broker's dedup window
//! recognises whatever it already stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Client, ClientError, Connection, InvalidMessage};
use crate::log::record::{encode_headers, InnerMsgId};
use crate::protocol::body::{encode_produce_message, ProduceReply, TopicConfig};
use crate::protocol::{KeyHash, Opcode, Put};

/// Delay between attempts of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryBackoff {
    Fixed(Duration),
    /// `base * 2^(attempt-1)`, at most `max`.
    Exponential {
        base: Duration,
        max: Duration,
    },
}

impl RetryBackoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        match *self {
            RetryBackoff::Fixed(d) => d,
            RetryBackoff::Exponential { base, max } => base
                .saturating_mul(1 << attempt.saturating_sub(1).min(20))
                .min(max),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// How long a batch waits for more messages. Default: 1 ms.
    pub linger: Duration,
    /// Default: 1000.
    pub batch_messages_max: usize,
    /// Default: 1 MiB.
    pub batch_bytes_max: usize,
    /// Batches sent and not yet answered, at most. Default: 64.
    pub inflight_batches_max: usize,
    /// An attempt with no answer within this is retried. Default: 5 s.
    pub request_timeout: Duration,
    /// Attempts per batch before its sends fail. Default: 10.
    pub attempts: u32,
    /// Default: exponential from 50 ms, at most 2 s.
    pub backoff: RetryBackoff,
    /// Partitions of a topic the producer creates. Default: 0 (the
    /// broker's default).
    pub create_partitions: u32,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            linger: Duration::from_millis(1),
            batch_messages_max: 1000,
            batch_bytes_max: 1 << 20,
            inflight_batches_max: 64,
            request_timeout: Duration::from_secs(5),
            attempts: 10,
            backoff: RetryBackoff::Exponential {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
            },
            create_partitions: 0,
        }
    }
}

/// A message to send.
#[derive(Clone, Debug, Default)]
pub struct OutgoingMessage {
    /// The business id; also picks the partition (same key, same
    /// partition).
    pub key: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
    pub payload: Bytes,
}

impl OutgoingMessage {
    pub fn new(payload: impl Into<Bytes>) -> Self {
        OutgoingMessage {
            payload: payload.into(),
            ..Default::default()
        }
    }
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Appends `msg` with `id` as one message of a PRODUCE-shaped body,
/// checking the sizes the wire allows.
pub(crate) fn encode_message(
    id: InnerMsgId,
    msg: &OutgoingMessage,
    out: &mut Vec<u8>,
) -> Result<(), ClientError> {
    let pairs: Vec<(&[u8], &[u8])> = msg
        .headers
        .iter()
        .map(|(n, v)| (n.as_bytes(), &v[..]))
        .collect();
    let headers = encode_headers(&pairs).map_err(InvalidMessage::Headers)?;
    if let Some(len) = msg.key.as_ref().map(|k| k.len()) {
        if len > u16::MAX as usize {
            return Err(InvalidMessage::KeyTooLong { len }.into());
        }
    }
    if msg.payload.len() > u32::MAX as usize {
        return Err(InvalidMessage::PayloadTooLarge {
            len: msg.payload.len(),
        }
        .into());
    }
    encode_produce_message(id, msg.key.as_deref(), &headers, &msg.payload, out);
    Ok(())
}

/// A fresh random 64-bit producer id.
pub(crate) fn random_u64() -> Result<u64, ClientError> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(ClientError::NoRandomness)?;
    Ok(u64::from_le_bytes(id))
}

/// A PRODUCE body ready to send, and its messages' ids.
pub struct EncodedBatch {
    frame: Prebuilt,
    ids: Vec<InnerMsgId>,
}

impl EncodedBatch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Where a message was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub id: InnerMsgId,
    pub partition: u32,
    pub offset: u64,
    /// The broker had it already (an earlier attempt got through).
    pub duplicate: bool,
}

type Callback = Box<dyn FnOnce(Result<Receipt, ClientError>) + Send>;

enum Done {
    Future(oneshot::Sender<Result<Receipt, ClientError>>),
    Callback(Callback),
}

impl Done {
    fn complete(self, r: Result<Receipt, ClientError>) {
        match self {
            Done::Future(tx) => {
                let _ = tx.send(r);
            }
            Done::Callback(cb) => cb(r),
        }
    }
}

enum Command {
    Send {
        partition: u32,
        id: InnerMsgId,
        encoded: Vec<u8>,
        done: Done,
    },
    Flush(oneshot::Sender<()>),
}

/// Produces to one topic.
pub struct Producer {
    topic: String,
    partitions: u32,
    key_hash: KeyHash,
    producer_id: u64,
    sequence: AtomicU64,
    round_robin: AtomicU64,
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

struct Shared {
    client: Arc<Client>,
    topic: String,
    options: ProducerOptions,
    inflight: Arc<Semaphore>,
    /// Tickets handed out so far, and the first ticket not yet sent.
    tickets: AtomicU64,
    turns: tokio::sync::watch::Sender<u64>,
    /// Batches the batcher has handed to tasks and not seen answered.
    queued: Arc<Semaphore>,
}

impl Producer {
    /// A producer for `topic`, which is created if missing.
    pub async fn new(
        client: Arc<Client>,
        topic: &str,
        options: ProducerOptions,
    ) -> Result<Producer, ClientError> {
        let summary = client
            .create_topic(
                topic,
                options.create_partitions,
                true,
                TopicConfig::default(),
            )
            .await?;
        let producer_id = random_u64()?;
        let shared = Arc::new(Shared {
            client,
            topic: topic.to_owned(),
            inflight: Arc::new(Semaphore::new(options.inflight_batches_max)),
            tickets: AtomicU64::new(0),
            turns: tokio::sync::watch::Sender::new(0),
            queued: Arc::new(Semaphore::new(options.inflight_batches_max * 2)),
            options,
        });
        let (tx, rx) = mpsc::channel(shared.options.batch_messages_max.max(1) * 4);
        tokio::spawn(batcher(shared.clone(), rx));
        Ok(Producer {
            topic: topic.to_owned(),
            partitions: summary.partitions,
            key_hash: summary.key_hash,
            producer_id,
            sequence: AtomicU64::new(1),
            round_robin: AtomicU64::new(0),
            tx,
            shared,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// A fresh globally unique inner-msg-id: this producer's random 64-bit
    /// id, then a 64-bit sequence.
    pub fn next_id(&self) -> InnerMsgId {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        InnerMsgId(((self.producer_id as u128) << 64) | seq as u128)
    }

    fn partition_for(&self, key: Option<&[u8]>) -> u32 {
        match key {
            Some(k) => self.key_hash.partition(k, self.partitions),
            None => {
                (self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions as u64) as u32
            }
        }
    }

    fn encode(&self, msg: &OutgoingMessage) -> Result<(u32, InnerMsgId, Vec<u8>), ClientError> {
        let id = self.next_id();
        let mut encoded = Vec::with_capacity(27 + msg.payload.len());
        encode_message(id, msg, &mut encoded)?;
        Ok((self.partition_for(msg.key.as_deref()), id, encoded))
    }

    async fn enqueue(&self, msg: &OutgoingMessage, done: Done) {
        match self.encode(msg) {
            Err(e) => done.complete(Err(e)),
            Ok((partition, id, encoded)) => {
                let cmd = Command::Send {
                    partition,
                    id,
                    encoded,
                    done,
                };
                if let Err(mpsc::error::SendError(Command::Send { done, .. })) =
                    self.tx.send(cmd).await
                {
                    done.complete(Err(ClientError::ProducerClosed));
                }
            }
        }
    }

    /// Sends one message; completes once the broker stored it (under sync
    /// flush: durably), or with the last error after `attempts` tries.
    pub async fn send(&self, msg: OutgoingMessage) -> Result<Receipt, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(&msg, Done::Future(tx)).await;
        rx.await.unwrap_or(Err(ClientError::ProducerClosed))
    }

    /// Like `send`, but calls `callback` with the outcome instead. Waits
    /// only while the producer's queue is full.
    pub async fn send_with_callback(
        &self,
        msg: OutgoingMessage,
        callback: impl FnOnce(Result<Receipt, ClientError>) + Send + 'static,
    ) {
        self.enqueue(&msg, Done::Callback(Box::new(callback))).await;
    }

    /// Sends `msgs` as one PRODUCE to one partition (picked from the first
    /// message's key, or round robin), with the same retries; bypasses the
    /// batcher. For callers that batch already (the load generator).
    pub async fn send_batch(&self, msgs: &[OutgoingMessage]) -> Result<Vec<Receipt>, ClientError> {
        let Some(first) = msgs.first() else {
            return Ok(Vec::new());
        };
        let partition = self.partition_for(first.key.as_deref());
        let capacity = 256 + msgs.iter().map(|m| 27 + m.payload.len()).sum::<usize>();
        let (mut body, correlation_id) = start_frame(&self.topic, partition, capacity);
        let mut ids = Vec::with_capacity(msgs.len());
        for m in msgs {
            let (_, id, enc) = self.encode(m)?;
            ids.push(id);
            body.extend_from_slice(&enc);
        }
        let frame = finish_frame(body, &self.topic, msgs.len(), correlation_id);
        let ticket = self.shared.take_ticket();
        let reply = self
            .shared
            .send_with_retry(frame, msgs.len(), ticket)
            .await?;
        Ok(receipts(&ids, &reply))
    }

    /// Encodes payloads (no key, no headers) as one PRODUCE to `partition`
    /// (or round robin), giving each a fresh id. With [`Producer::send_encoded`]
    /// this is the load generator's path: it skips the per-message work of
    /// [`OutgoingMessage`] and copies each payload once.
    pub fn encode_payloads<'a>(
        &self,
        partition: Option<u32>,
        payloads: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    ) -> EncodedBatch {
        let partition = partition.unwrap_or_else(|| self.partition_for(None));
        let n = payloads.len();
        // Sized once: growing a megabyte frame by doubling copied it twice
        // over (28% of the load generator's time at 1 KiB).
        let capacity =
            64 + self.topic.len() + payloads.clone().map(|p| 27 + p.len()).sum::<usize>();
        let (mut body, correlation_id) = start_frame(&self.topic, partition, capacity);
        let mut ids = Vec::with_capacity(n);
        for p in payloads {
            let id = self.next_id();
            ids.push(id);
            encode_produce_message(id, None, &[], p, &mut body);
        }
        EncodedBatch {
            frame: finish_frame(body, &self.topic, n, correlation_id),
            ids,
        }
    }

    /// [`Producer::encode_payloads`] with every message keyed `key`: the
    /// batch goes to the partition the topic's key hash picks for it.
    pub fn encode_keyed_payloads<'a>(
        &self,
        key: &[u8],
        payloads: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    ) -> EncodedBatch {
        let partition = self.partition_for(Some(key));
        let n = payloads.len();
        let capacity = 64
            + self.topic.len()
            + payloads
                .clone()
                .map(|p| 27 + key.len() + p.len())
                .sum::<usize>();
        let (mut body, correlation_id) = start_frame(&self.topic, partition, capacity);
        let mut ids = Vec::with_capacity(n);
        for p in payloads {
            let id = self.next_id();
            ids.push(id);
            encode_produce_message(id, Some(key), &[], p, &mut body);
        }
        EncodedBatch {
            frame: finish_frame(body, &self.topic, n, correlation_id),
            ids,
        }
    }

    /// The partition the topic's key hash picks for `key`.
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        self.partition_for(Some(key))
    }

    /// Sends an encoded batch with the producer's retries; waits first
    /// while `inflight_batches_max` batches are unanswered.
    pub fn send_encoded(
        &self,
        batch: EncodedBatch,
    ) -> impl std::future::Future<Output = Result<Vec<Receipt>, ClientError>> + Send + 'static {
        let shared = self.shared.clone();
        let ticket = shared.take_ticket();
        async move {
            let reply = shared
                .send_with_retry(batch.frame, batch.ids.len(), ticket)
                .await?;
            Ok(receipts(&batch.ids, &reply))
        }
    }

    /// Sends what is batched now and waits until every send so far has
    /// completed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let all = self.shared.options.inflight_batches_max as u32;
        if let Ok(p) = self.shared.queued.acquire_many(all * 2).await {
            drop(p);
        }
        if let Ok(p) = self.shared.inflight.acquire_many(all).await {
            drop(p);
        }
    }
}

fn receipts(ids: &[InnerMsgId], reply: &ProduceReply) -> Vec<Receipt> {
    ids.iter()
        .zip(&reply.outcomes)
        .map(|(id, o)| Receipt {
            id: *id,
            partition: reply.partition,
            offset: o.offset,
            duplicate: o.duplicate,
        })
        .collect()
}

/// A whole PRODUCE frame, built once and sent as is on every attempt.
#[derive(Clone)]
struct Prebuilt {
    correlation_id: u64,
    frame: Bytes,
}

/// Starts a PRODUCE frame: header (length patched later), topic,
/// partition, a count patched later.
fn start_frame(topic: &str, partition: u32, capacity: usize) -> (Vec<u8>, u64) {
    let correlation_id = super::connection::next_correlation_id();
    let mut out = Vec::with_capacity(capacity);
    crate::protocol::frame::encode_header(&mut out, Opcode::Produce, 0, correlation_id, 0);
    out.put_str(topic);
    out.put_u32(partition);
    out.put_u32(0);
    (out, correlation_id)
}

fn finish_frame(mut out: Vec<u8>, topic: &str, count: usize, correlation_id: u64) -> Prebuilt {
    let at = crate::protocol::FRAME_HEADER_LEN + 2 + topic.len() + 4;
    out[at..at + 4].copy_from_slice(&(count as u32).to_le_bytes());
    crate::protocol::frame::patch_length(&mut out);
    Prebuilt {
        correlation_id,
        frame: Bytes::from(out),
    }
}

impl Shared {
    /// A place in the order in which batches are first sent.
    fn take_ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends the same PRODUCE body until it is answered, a non-retriable
    /// error comes back, or the attempts run out. First attempts go out in
    /// ticket order (so one producer's batches to a partition are stored
    /// in the order they were made), each once it holds one of the
    /// `inflight_batches_max` permits; retries go out when their turn
    /// comes.
    async fn send_with_retry(
        &self,
        frame: Prebuilt,
        count: usize,
        ticket: u64,
    ) -> Result<ProduceReply, ClientError> {
        let opts = &self.options;
        let mut turn = self.turns.subscribe();
        let _ = turn.wait_for(|t| *t >= ticket).await;
        let permit = self.inflight.clone().acquire_owned().await;
        let start =
            |conn: &Connection| conn.start_prebuilt(frame.correlation_id, frame.frame.clone());
        let first = match tokio::time::timeout(opts.request_timeout, self.client.connection()).await
        {
            Ok(Ok(conn)) => start(&conn),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout(opts.request_timeout)),
        };
        self.turns.send_modify(|t| *t = (*t).max(ticket + 1));
        let mut queued = Some(first);
        let mut last = ClientError::Closed;
        for attempt in 1..=opts.attempts.max(1) {
            let answer = match queued.take() {
                Some(a) => a,
                None => match tokio::time::timeout(opts.request_timeout, self.client.connection())
                    .await
                {
                    Ok(Ok(conn)) => start(&conn),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(ClientError::Timeout(opts.request_timeout)),
                },
            };
            let result = match answer {
                Err(e) => Err(e),
                Ok(a) => match tokio::time::timeout(opts.request_timeout, a.wait()).await {
                    Ok(r) => r,
                    Err(_) => Err(ClientError::Timeout(opts.request_timeout)),
                },
            };
            match result {
                Ok(reply) => {
                    drop(permit);
                    let reply = ProduceReply::decode(&reply)?;
                    if reply.outcomes.len() != count {
                        return Err(ClientError::OutcomeCount {
                            answered: reply.outcomes.len(),
                            sent: count,
                        });
                    }
                    return Ok(reply);
                }
                Err(e) if !e.is_retriable() => return Err(e),
                Err(e) => last = e,
            }
            if attempt < opts.attempts {
                tracing::debug!(attempt, error = %last, topic = %self.topic, "produce retry");
                tokio::time::sleep(opts.backoff.delay(attempt)).await;
            }
        }
        Err(ClientError::Exhausted {
            attempts: opts.attempts.max(1),
            last: Box::new(last),
        })
    }
}

struct Batch {
    started: tokio::time::Instant,
    correlation_id: u64,
    body: Vec<u8>,
    ids: Vec<InnerMsgId>,
    done: Vec<Done>,
}

impl Batch {
    fn new(topic: &str, partition: u32) -> Batch {
        let (body, correlation_id) = start_frame(topic, partition, 4096);
        Batch {
            started: tokio::time::Instant::now(),
            correlation_id,
            body,
            ids: Vec::new(),
            done: Vec::new(),
        }
    }
}

async fn batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Command>) {
    let mut batches: std::collections::HashMap<u32, Batch> = std::collections::HashMap::new();
    let linger = shared.options.linger;
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // With no batch open, wait for a command; else until the oldest
        // batch's linger ends.
        let cmd = match batches.values().map(|b| b.started).min() {
            None => match rx.recv().await {
                Some(c) => Some(c),
                None => break,
            },
            Some(oldest) => match tokio::time::timeout_at(oldest + linger, rx.recv()).await {
                Ok(Some(c)) => Some(c),
                Ok(None) => break,
                Err(_) => None,
            },
        };
        let mut ready: Vec<Batch> = Vec::new();
        match cmd {
            None => {
                let now = tokio::time::Instant::now();
                let due: Vec<u32> = batches
                    .iter()
                    .filter(|(_, b)| b.started + linger <= now)
                    .map(|(p, _)| *p)
                    .collect();
                ready.extend(due.into_iter().filter_map(|p| batches.remove(&p)));
            }
            Some(Command::Flush(tx)) => {
                ready.extend(batches.drain().map(|(_, b)| b));
                flushes.push(tx);
            }
            Some(Command::Send {
                partition,
                id,
                encoded,
                done,
            }) => {
                let b = batches
                    .entry(partition)
                    .or_insert_with(|| Batch::new(&shared.topic, partition));
                b.body.extend_from_slice(&encoded);
                b.ids.push(id);
                b.done.push(done);
                if b.ids.len() >= shared.options.batch_messages_max
                    || b.body.len() >= shared.options.batch_bytes_max
                {
                    ready.extend(batches.remove(&partition));
                }
            }
        }
        for mut b in ready {
            let frame = finish_frame(
                std::mem::take(&mut b.body),
                &shared.topic,
                b.ids.len(),
                b.correlation_id,
            );
            let Ok(permit) = shared.queued.clone().acquire_owned().await else {
                return;
            };
            let shared = shared.clone();
            let ticket = shared.take_ticket();
            tokio::spawn(async move {
                let result = shared.send_with_retry(frame, b.ids.len(), ticket).await;
                match result {
                    Ok(reply) => {
                        for (r, done) in receipts(&b.ids, &reply).into_iter().zip(b.done) {
                            done.complete(Ok(r));
                        }
                    }
                    Err(e) => {
                        for done in b.done {
                            done.complete(Err(e.clone()));
                        }
                    }
                }
                // Only now: `flush` waits for this permit, and promises that
                // every callback has run.
                drop(permit);
            });
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
    // The producer was dropped: send what is left.
    for (_, mut b) in batches.drain() {
        let frame = finish_frame(
            std::mem::take(&mut b.body),
            &shared.topic,
            b.ids.len(),
            b.correlation_id,
        );
        let result = shared
            .send_with_retry(frame, b.ids.len(), shared.take_ticket())
            .await;
        for (i, done) in b.done.into_iter().enumerate() {
            done.complete(match &result {
                Ok(reply) => Ok(receipts(&b.ids, reply)[i]),
                Err(e) => Err(e.clone()),
            });
        }
    }
}
