//! The TCP edge (tokio): accepts connections, decodes frames, runs each
//! request against the [`Broker`], writes responses and pushes.
//!
//! Per connection there is a reader (this file's `connection`), a writer
//! task fed by a bounded channel, and a task per waiting request (a sync
//! produce waiting for durability, a long-polling fetch, an ack waiting for
//! its record) or per subscription. Appends run on the reader, in frame
//! order, so a client's pipelined batches to one partition are stored in
//! the order sent. At most `inflight_max` requests per connection are
//! unanswered: beyond that the reader stops reading and TCP pushes back.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::{now_ms, Broker, BrokerError, Topic};
use crate::log::FlushMode;
use crate::protocol::body::{
    self, AckRequest, Credit, ErrorBody, Fetch, GroupPartition, Hello, HelloReply, ProduceReply,
    Subscribe, TopicSummary, ANY_PARTITION,
};
use crate::protocol::frame::{self, FLAG_PUSH, FLAG_RESPONSE};
use crate::protocol::txn;
use crate::protocol::{ErrorCode, FrameHeader, Opcode, WireError, FRAME_HEADER_LEN};
use crate::sync::lock;
use crate::tls::TlsAcceptor;

/// Bytes of deliveries in one FETCH reply or DELIVER push, at most.
pub const DELIVERY_BYTES_MAX: u32 = 8 << 20;
/// Deliveries in one DELIVER push, at most.
pub const PUSH_MESSAGES_MAX: u32 = 4096;
/// Bytes of deliveries (FETCH replies, DELIVER pushes) one connection may
/// have queued for its writer; more wait until the client reads.
pub const REPLY_ROOM_BYTES: u32 = 2 * DELIVERY_BYTES_MAX;
/// Subscriptions one connection may hold.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 256;
/// A long poll waits at most this long.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;
/// Frames larger than this need room in the broker-wide
/// `frame_memory_max` budget before the broker reads them in.
pub const LARGE_FRAME_BYTES: usize = 64 << 10;
/// A large frame whose connection has not delivered `PROGRESS_BYTES` more
/// of it for this long may be evicted (its connection closed with
/// FRAME_TIMEOUT) when another connection needs the room it holds.
pub const STALL_EVICT: Duration = Duration::from_millis(250);
/// Bytes of a large frame that count as progress.
const PROGRESS_BYTES: usize = 64 << 10;
/// A large frame takes room in steps of this as its bytes arrive, so it
/// holds about what it has sent, not what it announced.
const ROOM_STEP: usize = 1 << 20;
/// Large frames of at most this size (a produce batch of ~1,000 small
/// messages is ~120 KiB) may take room from a reserve that larger frames
/// cannot touch, so clients that announce huge frames and stall delay them
/// not even until the stalled are evicted.
pub const RESERVE_FRAME_BYTES_MAX: usize = 1 << 20;

/// The broker-wide budget for large frames still arriving
/// (`frame_memory_max`, in KiB), and who holds it: when the budget is
/// spent, a connection that needs room evicts the holder that has stalled
/// longest (no `PROGRESS_BYTES` for `STALL_EVICT`). Clients that announce
/// big frames and stall, or trickle them, cannot keep the room from
/// clients that send.
///
/// An eighth of the budget (less if that would leave the rest smaller than
/// one frame of `frame_bytes_max`) is a reserve only frames of at most
/// `RESERVE_FRAME_BYTES_MAX` may take, tried before the rest.
pub struct FrameRoom {
    kib: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    holders: Mutex<HashMap<u64, Holder>>,
}

/// Names each connection in the frame and reply rooms.
static NEXT_CONNECTION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

struct Holder {
    progress_at: Instant,
    /// Waiting for more room: its client is not the one stalling it.
    waiting: bool,
    evict: Arc<Notify>,
}

impl FrameRoom {
    pub fn new(bytes: u64, frame_bytes_max: u32) -> FrameRoom {
        let kib = (bytes / 1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        let reserve = (kib / 8).min(kib.saturating_sub(frame_bytes_max.div_ceil(1024) as usize));
        FrameRoom {
            kib: Arc::new(Semaphore::new(kib - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
            holders: Mutex::new(HashMap::new()),
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Holder>> {
        lock(&self.holders)
    }

    /// Waits for `kib` of room until `deadline`, evicting stalled holders
    /// meanwhile. `None` at the deadline. A frame of at most
    /// `RESERVE_FRAME_BYTES_MAX` (`whole_frame`) tries the reserve first.
    async fn acquire(
        &self,
        id: u64,
        kib: u32,
        whole_frame: Option<usize>,
        evict: &Arc<Notify>,
        deadline: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let reserved = whole_frame
            .filter(|&n| n <= RESERVE_FRAME_BYTES_MAX)
            .and_then(|_| self.reserve.clone().try_acquire_many_owned(kib).ok());
        if let Some(p) = reserved {
            self.hold(id, evict);
            return Some(p);
        }
        if let Some(h) = self.holders().get_mut(&id) {
            h.waiting = true;
        }
        loop {
            let wait = (Instant::now() + Duration::from_millis(50)).min(deadline);
            let acquired = tokio::select! {
                // Evicted while waiting for more: this connection is done.
                _ = evict.notified() => return None,
                a = tokio::time::timeout_at(wait.into(), self.kib.clone().acquire_many_owned(kib)) => a,
            };
            match acquired {
                Ok(Ok(p)) => {
                    self.hold(id, evict);
                    return Some(p);
                }
                Ok(Err(_)) => return None,
                Err(_) if Instant::now() >= deadline => return None,
                Err(_) => self.evict_stalled(id),
            }
        }
    }

    /// Records that `id` holds room and has just made progress.
    fn hold(&self, id: u64, evict: &Arc<Notify>) {
        self.holders().insert(
            id,
            Holder {
                progress_at: Instant::now(),
                waiting: false,
                evict: evict.clone(),
            },
        );
    }

    /// Evicts every holder (other than `id`) whose client has stalled for
    /// `STALL_EVICT`. Holders waiting for more room are not stalled by
    /// their clients and are spared, unless every holder is waiting (each
    /// for room another holds): then the one waiting longest goes, once it
    /// has waited `STALL_EVICT`.
    fn evict_stalled(&self, id: u64) {
        let now = Instant::now();
        let stalled = |v: &Holder| now.duration_since(v.progress_at) >= STALL_EVICT;
        let mut holders = self.holders();
        let before = holders.len();
        holders.retain(|h, v| {
            let evict = *h != id && !v.waiting && stalled(v);
            if evict {
                v.evict.notify_one();
            }
            !evict
        });
        if holders.len() < before || holders.values().any(|v| !v.waiting) {
            return;
        }
        let longest = holders
            .iter()
            .filter(|(h, v)| **h != id && stalled(v))
            .min_by_key(|(_, v)| v.progress_at)
            .map(|(h, _)| *h);
        if let Some(h) = longest.and_then(|h| holders.remove(&h)) {
            h.evict.notify_one();
        }
    }

    fn progress(&self, id: u64) {
        if let Some(h) = self.holders().get_mut(&id) {
            h.progress_at = Instant::now();
        }
    }

    fn release(&self, id: u64) {
        self.holders().remove(&id);
    }
}

/// The broker-wide budget for deliveries built and queued to clients
/// (as large as `frame_memory_max`), on top of each connection's
/// `REPLY_ROOM_BYTES`. When it is spent, a connection that needs room ends
/// every connection whose writer has waited `STALL_EVICT` for its client
/// to read while holding room: clients that do not read cannot keep it
/// from clients that do.
pub struct ReplyRoom {
    kib: Arc<Semaphore>,
    readers: Mutex<HashMap<u64, Reader>>,
}

struct Reader {
    held_kib: Arc<AtomicUsize>,
    blocked_since_ms: Arc<std::sync::atomic::AtomicU64>,
    writer: tokio::task::AbortHandle,
}

/// Room for one queued delivery, given back when the writer takes it.
pub struct ReplyPermit {
    own: OwnedSemaphorePermit,
    shared: OwnedSemaphorePermit,
    held_kib: Arc<AtomicUsize>,
    kib: usize,
}

impl ReplyPermit {
    /// Gives back what a built frame of `bytes` does not use: room is taken
    /// for the largest reply a request may get, and most are smaller.
    fn shrink_to(&mut self, bytes: usize) {
        let kib = bytes.div_ceil(1024).max(1);
        if kib < self.kib {
            let spare = self.kib - kib;
            drop(self.own.split(spare));
            drop(self.shared.split(spare));
            self.held_kib.fetch_sub(spare, Ordering::AcqRel);
            self.kib = kib;
        }
    }
}

impl Drop for ReplyPermit {
    fn drop(&mut self) {
        self.held_kib.fetch_sub(self.kib, Ordering::AcqRel);
    }
}

impl ReplyRoom {
    pub fn new(bytes: u64) -> ReplyRoom {
        let kib = (bytes / 1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        ReplyRoom {
            kib: Arc::new(Semaphore::new(kib)),
            readers: Mutex::new(HashMap::new()),
        }
    }

    fn readers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reader>> {
        lock(&self.readers)
    }

    /// Waits for `kib` of shared room, ending stalled readers meanwhile.
    async fn acquire(&self, id: u64, kib: u32) -> Option<OwnedSemaphorePermit> {
        loop {
            let wait = tokio::time::Instant::now() + Duration::from_millis(50);
            match tokio::time::timeout_at(wait, self.kib.clone().acquire_many_owned(kib)).await {
                Ok(p) => return p.ok(),
                Err(_) => self.evict_stalled(id),
            }
        }
    }

    fn evict_stalled(&self, id: u64) {
        let now = crate::net::clock_ms();
        let stall = STALL_EVICT.as_millis() as u64;
        self.readers().retain(|r, v| {
            let since = v.blocked_since_ms.load(Ordering::Acquire);
            let stalled = *r != id
                && since != 0
                && now.saturating_sub(since) >= stall
                && v.held_kib.load(Ordering::Acquire) > 0;
            if stalled {
                tracing::debug!("ending a connection that does not read its deliveries while others wait for room");
                v.writer.abort();
            }
            !stalled
        });
    }
}

/// How long a stopping broker waits for connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Builds a frame in place: header, then the body written by `body`.
fn build(
    opcode: Opcode,
    flags: u16,
    correlation_id: u64,
    body: impl FnOnce(&mut Vec<u8>),
) -> Bytes {
    let mut out = Vec::with_capacity(64);
    frame::encode_header(&mut out, opcode, flags, correlation_id, 0);
    body(&mut out);
    frame::patch_length(&mut out);
    Bytes::from(out)
}

fn error_frame(correlation_id: u64, code: ErrorCode, message: impl Into<String>) -> Bytes {
    build(Opcode::Error, FLAG_RESPONSE, correlation_id, |o| {
        ErrorBody::new(code, message).encode(o)
    })
}

/// Accepts connections until `shutdown` completes, then stops every
/// connection (each is told with a SHUTTING_DOWN error) and waits up to
/// five seconds for them. The caller closes the broker afterwards.
///
/// With `tls`, every connection runs its handshake first (bounded by the
/// frame timeout) and the frames travel inside TLS.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let config = broker.config().clone();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut pace = AcceptPace::new(config.accept_rate_max, Instant::now());
    let timer = tokio::spawn(expiry_timer(broker.clone(), stop_rx.clone()));
    tokio::pin!(shutdown);
    loop {
        let pause = pace
            .as_mut()
            .map_or(Duration::ZERO, |p| p.wait(Instant::now()));
        tokio::select! {
            _ = &mut shutdown => break,
            // Over the accept rate: connections wait in the kernel's
            // backlog meanwhile.
            _ = tokio::time::sleep(pause), if !pause.is_zero() => continue,
            accepted = listener.accept(), if pause.is_zero() => {
                if let Some(p) = &mut pace {
                    p.take();
                }
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let peer = stream.peer_addr().ok();
                match (limit.clone().try_acquire_owned(), &tls) {
                    (Ok(permit), None) => {
                        let (rd, wr) = stream.into_split();
                        tasks.spawn(connection(broker.clone(), rd, wr, peer, permit, stop_rx.clone()));
                    }
                    (Ok(permit), Some(acceptor)) => {
                        let (acceptor, broker, stop) = (acceptor.clone(), broker.clone(), stop_rx.clone());
                        let handshake = Duration::from_millis(config.frame_timeout_ms);
                        tasks.spawn(async move {
                            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let (rd, wr) = tokio::io::split(tls);
                                    connection(broker, rd, wr, peer, permit, stop).await;
                                }
                                Ok(Err(e)) => tracing::debug!(?peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                            }
                        });
                    }
                    // Over TLS an error frame could not be read before a
                    // handshake: refuse by closing.
                    (Err(_), Some(_)) => drop(stream),
                    (Err(_), None) => {
                        tasks.spawn(refuse(stream, config.max_connections));
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    broker.begin_stop();
    let _ = stop_tx.send(true);
    let _ = timer.await;
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "connections still open after the grace period; aborting them"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// How often the broker's timer looks for deliveries past their ack
/// deadline (so redelivery and the move to the DLQ are at most this late).
const EXPIRY_TICK_MS: u64 = 100;

/// The broker's own timer: expires deliveries whether or not anyone
/// fetches (`Broker::expire_deliveries`), until the server stops.
async fn expiry_timer(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(EXPIRY_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = broker.expire_deliveries().await {
            tracing::warn!(error = %e, "expiring deliveries failed; trying again next tick");
        }
    }
}

/// `accept_rate_max` as a token bucket: that many accepts a second, in a
/// burst of as many.
struct AcceptPace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl AcceptPace {
    /// `None` for no limit (0).
    fn new(rate: u32, now: Instant) -> Option<AcceptPace> {
        (rate > 0).then_some(AcceptPace {
            rate: rate as f64,
            tokens: rate as f64,
            at: now,
        })
    }

    /// How long until the next accept is allowed; zero: now.
    fn wait(&mut self, now: Instant) -> Duration {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

async fn refuse(mut stream: TcpStream, max: usize) {
    let f = error_frame(
        0,
        ErrorCode::TooManyConnections,
        format!("the broker holds its maximum of {max} connections"),
    );
    let _ = stream.write_all(&f).await;
    let _ = stream.shutdown().await;
}

struct Subscription {
    credit: AtomicU32,
    changed: Notify,
    cancelled: AtomicBool,
}

struct Conn {
    broker: Arc<Broker>,
    tx: mpsc::Sender<Outgoing>,
    /// Room (KiB) for deliveries queued to the writer: a client that does
    /// not read holds at most `REPLY_ROOM_BYTES` of them.
    reply_room: Arc<Semaphore>,
    /// KiB of reply room this connection holds (in its writer's queue).
    reply_held: Arc<AtomicUsize>,
    /// This connection in the broker-wide reply room.
    id: u64,
    inflight: Arc<Semaphore>,
    inflight_max: u32,
    subs: Mutex<HashMap<u64, Arc<Subscription>>>,
    /// HELLO presented the broker's token (always true without one).
    authorized: AtomicBool,
}

/// A frame for the writer, with the reply room it holds until written.
pub type Outgoing = crate::net::Outgoing<ReplyPermit>;

impl Conn {
    async fn send(&self, frame: Bytes) {
        // Fails only once the writer is gone, i.e. the connection is dead.
        let _ = self.tx.send(frame.into()).await;
    }

    /// Sends a frame built in `room` (from [`Conn::room`]).
    async fn send_in(&self, frame: Bytes, mut room: Option<ReplyPermit>) {
        if let Some(r) = &mut room {
            r.shrink_to(frame.len());
        }
        let _ = self.tx.send(Outgoing { frame, room }).await;
    }

    /// Waits for room for a reply of up to `bytes`; `None` once the
    /// connection is closing.
    async fn room(&self, bytes: u32) -> Option<ReplyPermit> {
        let kib = bytes.div_ceil(1024).clamp(1, REPLY_ROOM_BYTES / 1024);
        let shared = self.broker.reply_room();
        // Biased to the close: when an evicted connection's queue is
        // dropped, its own room comes back at the moment it closes, and a
        // waiting delivery must not take that for a go-ahead and be built
        // for no one.
        tokio::select! {
            biased;
            _ = self.tx.closed() => None,
            p = async {
                let own = self.reply_room.clone().acquire_many_owned(kib).await.ok()?;
                let shared = shared.acquire(self.id, kib).await?;
                self.reply_held.fetch_add(kib as usize, Ordering::AcqRel);
                Some(ReplyPermit {
                    own,
                    shared,
                    held_kib: self.reply_held.clone(),
                    kib: kib as usize,
                })
            } => p,
        }
    }

    fn reply(&self, h: &FrameHeader, body: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        build(h.opcode, FLAG_RESPONSE, h.correlation_id, body)
    }

    fn idle(&self) -> bool {
        self.inflight.available_permits() == self.inflight_max as usize
            && lock(&self.subs).is_empty()
    }
}

async fn connection<R, W>(
    broker: Arc<Broker>,
    mut rd: R,
    wr: W,
    peer: Option<std::net::SocketAddr>,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let config = broker.config().clone();
    broker.metrics().connection_opened();
    let metrics_broker = broker.clone();
    let (tx, rx) = mpsc::channel::<Outgoing>(config.inflight_max as usize + 16);
    let watch = crate::net::WriteWatch {
        limit: Duration::from_millis(config.frame_timeout_ms),
        blocked_since_ms: Arc::default(),
    };
    let blocked_since_ms = watch.blocked_since_ms.clone();
    let writer = tokio::spawn(crate::net::write_frames(wr, rx, Some(watch)));
    let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
    let reply_held: Arc<AtomicUsize> = Arc::default();
    broker.reply_room().readers().insert(
        id,
        Reader {
            held_kib: reply_held.clone(),
            blocked_since_ms,
            writer: writer.abort_handle(),
        },
    );
    let conn = Arc::new(Conn {
        broker,
        tx,
        reply_room: Arc::new(Semaphore::new(REPLY_ROOM_BYTES as usize / 1024)),
        reply_held,
        id,
        inflight: Arc::new(Semaphore::new(config.inflight_max as usize)),
        inflight_max: config.inflight_max,
        subs: Mutex::new(HashMap::new()),
        authorized: AtomicBool::new(config.auth_token.is_none()),
    });
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let frame_timeout = Duration::from_millis(config.frame_timeout_ms);
    let mut reader = crate::net::ReadBuffer::default();
    // Since when the buffer has held an incomplete frame without a frame
    // completing: a slowloris client that trickles bytes is closed when
    // this passes `frame_timeout`, however steadily it trickles.
    let mut partial_since: Option<Instant> = None;
    // Room in the broker-wide budget for the large frame now arriving,
    // and what tells this connection it was evicted from it.
    let room = conn.broker.frame_room().clone();
    let room_id = conn.id;
    let evicted = Arc::new(Notify::new());
    let mut frame_room: Option<OwnedSemaphorePermit> = None;
    let mut unreported = 0usize;
    // How much more the next read may take (a large frame: up to the room
    // it holds).
    let mut read_limit: Option<usize> = None;
    'connection: loop {
        let mut completed = false;
        loop {
            match frame::decode_header_within(&reader.buf, config.frame_bytes_max as usize) {
                Ok(Some(h)) if reader.buf.len() >= FRAME_HEADER_LEN + h.body_len => {
                    completed = true;
                    let whole = reader.buf.split_to(FRAME_HEADER_LEN + h.body_len).freeze();
                    if frame_room.take().is_some() {
                        room.release(room_id);
                    }
                    let body = whole.slice(FRAME_HEADER_LEN..);
                    let permit = match conn.inflight.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break 'connection,
                    };
                    if let Err(e) = dispatch(&conn, h, body, permit).await {
                        conn.send(error_frame(h.correlation_id, e.code(), e.to_string()))
                            .await;
                        // A value out of range (a code of 100 or more) costs
                        // only its request: the stream is still in step.
                        if (e.code() as u16) < 100 {
                            tracing::debug!(?peer, error = %e, "closing connection after a protocol error");
                            break 'connection;
                        }
                    }
                }
                Ok(Some(h)) => {
                    let total = FRAME_HEADER_LEN + h.body_len;
                    if total <= LARGE_FRAME_BYTES {
                        reader.buf.reserve(total - reader.buf.len());
                        break;
                    }
                    // A large frame holds room for what has arrived plus
                    // the next step, waiting for it no longer than the
                    // frame may take (evicting stalled holders meanwhile).
                    let need = total.min(reader.buf.len() + ROOM_STEP);
                    let need_kib = need.div_ceil(1024);
                    let held_kib = frame_room.as_ref().map_or(0, |p| p.num_permits());
                    if held_kib < need_kib {
                        let since = *partial_since.get_or_insert_with(Instant::now);
                        let more = (need_kib - held_kib) as u32;
                        // A frame that takes its room in one step (held
                        // is 0) may take it from the reserve: permits
                        // from two semaphores cannot be merged.
                        let whole = (held_kib == 0 && need == total).then_some(total);
                        match room
                            .acquire(room_id, more, whole, &evicted, since + frame_timeout)
                            .await
                        {
                            Some(p) => {
                                match &mut frame_room {
                                    Some(r) => r.merge(p),
                                    None => frame_room = Some(p),
                                }
                                unreported = 0;
                            }
                            None => {
                                tracing::debug!(
                                    ?peer,
                                    "closing connection: no memory for its large frame in time"
                                );
                                conn.send(error_frame(
                                    h.correlation_id,
                                    ErrorCode::FrameTimeout,
                                    "the broker had no room for this large frame in time",
                                ))
                                .await;
                                break 'connection;
                            }
                        }
                    }
                    reader.buf.reserve(need - reader.buf.len());
                    read_limit = Some(need - reader.buf.len());
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(?peer, error = %e, "closing connection after a bad frame");
                    conn.send(error_frame(0, e.code(), e.to_string())).await;
                    break 'connection;
                }
            }
        }
        partial_since = match partial_since {
            _ if reader.buf.is_empty() => None,
            Some(_) if completed => Some(Instant::now()),
            None => Some(Instant::now()),
            since => since,
        };
        let deadline = match partial_since {
            Some(since) => since + frame_timeout,
            None => Instant::now() + idle,
        };
        // Read as much as the socket has, not one frame at a time: every
        // extra wake-up costs more than the copy.
        reader.prepare();
        let limit = read_limit.take();
        tokio::select! {
            read = read_some(&mut rd, &mut reader.buf, limit) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    reader.filled(n);
                    if frame_room.is_some() {
                        unreported += n;
                        if unreported >= PROGRESS_BYTES {
                            room.progress(room_id);
                            unreported = 0;
                        }
                    }
                }
            },
            _ = evicted.notified(), if frame_room.is_some() => {
                tracing::debug!(?peer, "closing connection: its large frame stalled while others needed the memory");
                conn.send(error_frame(
                    0,
                    ErrorCode::FrameTimeout,
                    "a large frame stalled while other clients needed its memory",
                ))
                .await;
                break;
            }
            _ = stop.changed() => {
                conn.send(error_frame(0, ErrorCode::ShuttingDown, "the broker is stopping")).await;
                break;
            }
            // The writer stopped: the client did not read its replies
            // within `frame_timeout`, or the socket failed.
            _ = conn.tx.closed() => {
                tracing::debug!(?peer, "closing connection: its replies are not being read");
                break;
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if partial_since.is_some() {
                    tracing::debug!(?peer, "closing connection: a frame did not arrive whole in time");
                    conn.send(error_frame(
                        0,
                        ErrorCode::FrameTimeout,
                        format!("a frame did not arrive whole within {} ms", config.frame_timeout_ms),
                    ))
                    .await;
                    break;
                }
                if conn.idle() {
                    tracing::debug!(?peer, "closing idle connection");
                    break;
                }
            }
        }
    }
    room.release(room_id);
    drop(frame_room);
    conn.broker.reply_room().readers().remove(&conn.id);
    for sub in lock(&conn.subs).drain() {
        sub.1.cancelled.store(true, Ordering::Release);
        sub.1.changed.notify_one();
    }
    // Let requests in flight finish and their replies be written, then the
    // writer ends when the last sender is dropped.
    let _ = tokio::time::timeout(
        SHUTDOWN_GRACE,
        conn.inflight.acquire_many(conn.inflight_max),
    )
    .await;
    drop(conn);
    let _ = writer.await;
    metrics_broker.metrics().connection_closed();
}

/// Reads what the socket has into `buf`, at most `limit` bytes.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut bytes::BytesMut,
    limit: Option<usize>,
) -> std::io::Result<usize> {
    match limit {
        None => rd.read_buf(buf).await,
        Some(n) => (&mut *rd).take(n as u64).read_buf(buf).await,
    }
}

/// An error that closes the connection.
#[derive(Debug)]
struct Fatal(WireError);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Fatal {
    fn code(&self) -> ErrorCode {
        self.0.code()
    }
}

impl From<WireError> for Fatal {
    fn from(e: WireError) -> Self {
        Fatal(e)
    }
}

fn broker_error(h: &FrameHeader, e: &BrokerError) -> Bytes {
    error_frame(h.correlation_id, e.code(), e.to_string())
}

async fn dispatch(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    if h.flags != 0 {
        return Err(WireError::Malformed(
            "a request may not carry the RESPONSE or PUSH flag".into(),
        )
        .into());
    }
    let broker = &conn.broker;
    if h.opcode != Opcode::Hello && !conn.authorized.load(Ordering::Acquire) {
        return Err(
            WireError::Unauthorized("this broker requires HELLO with a token first").into(),
        );
    }
    match h.opcode {
        Opcode::Hello => {
            let hello = Hello::decode(&body)?;
            if !(hello.version_min..=hello.version_max).contains(&frame::VERSION) {
                return Err(WireError::UnsupportedVersion(hello.version_max).into());
            }
            if let Some(expected) = &broker.config().auth_token {
                let given = hello.token.as_deref().unwrap_or("");
                if !super::config::same_secret(given.as_bytes(), expected.as_bytes()) {
                    tracing::warn!(client = %hello.client, "refused a connection: missing or wrong token");
                    return Err(WireError::Unauthorized(if hello.token.is_none() {
                        "this broker requires a token in HELLO"
                    } else {
                        "wrong token"
                    })
                    .into());
                }
                conn.authorized.store(true, Ordering::Release);
            }
            let reply = HelloReply {
                version: frame::VERSION,
                frame_bytes_max: broker.config().frame_bytes_max,
                inflight_max: conn.inflight_max,
                server: format!("bida {}", env!("CARGO_PKG_VERSION")),
            };
            conn.send(conn.reply(&h, |o| reply.encode(o))).await;
        }
        Opcode::Ping => {
            if !body.is_empty() {
                return Err(WireError::Malformed(format!(
                    "PING has an empty body, got {} bytes",
                    body.len()
                ))
                .into());
            }
            conn.send(conn.reply(&h, |_| {})).await
        }
        Opcode::CreateTopic => {
            let req = body::CreateTopic::decode(&body)?;
            let result = tokio::task::block_in_place(|| broker.create_topic(&req));
            conn.send(match result {
                Ok(t) => conn.reply(&h, |o| t.summary().encode_one(o)),
                Err(e) => broker_error(&h, &e),
            })
            .await;
        }
        Opcode::ListTopics => {
            if !body.is_empty() {
                return Err(WireError::Malformed("LIST_TOPICS has an empty body".into()).into());
            }
            let list = broker.list_topics();
            conn.send(conn.reply(&h, |o| TopicSummary::encode_list(&list, o)))
                .await;
        }
        Opcode::DescribeTopic => {
            let name = body::decode_topic_name(&body)?;
            conn.send(match broker.describe_topic(name) {
                Ok(d) => conn.reply(&h, |o| d.encode(o)),
                Err(e) => broker_error(&h, &e),
            })
            .await;
        }
        Opcode::GroupPosition => {
            let (topic, group) = body::decode_group_position(&body)?;
            conn.send(match broker.topic(topic) {
                Ok(t) => {
                    let positions = broker.positions(&t, group);
                    conn.reply(&h, |o| GroupPartition::encode_list(&positions, o))
                }
                Err(e) => broker_error(&h, &e),
            })
            .await;
        }
        Opcode::Produce => {
            let arrived = std::time::Instant::now();
            let req = body::decode_produce(&body)?;
            match broker.produce(&req) {
                Err(e) => conn.send(broker_error(&h, &e)).await,
                Ok((partition, appended)) => {
                    let index = partition.index;
                    let reply = move |appended: &crate::log::Appended| {
                        build(Opcode::Produce, FLAG_RESPONSE, h.correlation_id, |o| {
                            ProduceReply::encode_from(
                                index,
                                appended.outcomes.iter().map(|a| body::ProduceOutcome {
                                    offset: a.offset,
                                    duplicate: a.duplicate,
                                }),
                                o,
                            )
                        })
                    };
                    if broker.config().flush == FlushMode::Sync {
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let frame = match partition.durable(appended.durable_target()).await {
                                Ok(()) => reply(&appended),
                                Err(e) => broker_error(&h, &e),
                            };
                            conn.broker.metrics().produce_acked(arrived.elapsed());
                            conn.send(frame).await;
                            drop(permit);
                        });
                        return Ok(());
                    }
                    broker.metrics().produce_acked(arrived.elapsed());
                    conn.send(reply(&appended)).await;
                }
            }
        }
        Opcode::Fetch => {
            let req = Fetch::decode(&body)?;
            let conn = conn.clone();
            tokio::spawn(async move {
                let Some(room) = conn.room(req.max_bytes.min(DELIVERY_BYTES_MAX)).await else {
                    return;
                };
                let frame = fetch(&conn.broker, &h, &req).await;
                conn.send_in(frame, Some(room)).await;
                drop(permit);
            });
            return Ok(());
        }
        Opcode::Subscribe => {
            let req = Subscribe::decode(&body)?;
            let topic = match broker.topic(&req.topic) {
                Ok(t) => t,
                Err(e) => {
                    conn.send(broker_error(&h, &e)).await;
                    return Ok(());
                }
            };
            if let Err(reason) = body::check_name("group", &req.group) {
                conn.send(broker_error(&h, &BrokerError::InvalidName(reason)))
                    .await;
                return Ok(());
            }
            if lock(&conn.subs).len() >= SUBSCRIPTIONS_PER_CONNECTION_MAX {
                let e = BrokerError::InvalidRequest(format!(
                    "a connection may hold at most {SUBSCRIPTIONS_PER_CONNECTION_MAX} subscriptions"
                ));
                conn.send(broker_error(&h, &e)).await;
                return Ok(());
            }
            let sub = Arc::new(Subscription {
                credit: AtomicU32::new(req.credit),
                changed: Notify::new(),
                cancelled: AtomicBool::new(false),
            });
            lock(&conn.subs).insert(h.correlation_id, sub.clone());
            conn.send(conn.reply(&h, |_| {})).await;
            tokio::spawn(push_loop(
                conn.clone(),
                sub,
                topic,
                req.group,
                h.correlation_id,
            ));
        }
        Opcode::Credit | Opcode::Unsubscribe => {
            let req = Credit::decode(&body)?;
            let sub = lock(&conn.subs).get(&req.subscription).cloned();
            let frame = match sub {
                None => broker_error(&h, &BrokerError::UnknownSubscription(req.subscription)),
                Some(sub) => {
                    if h.opcode == Opcode::Unsubscribe {
                        lock(&conn.subs).remove(&req.subscription);
                        sub.cancelled.store(true, Ordering::Release);
                    } else {
                        let _ = sub
                            .credit
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                                Some(c.saturating_add(req.credit))
                            });
                    }
                    sub.changed.notify_one();
                    conn.reply(&h, |_| {})
                }
            };
            conn.send(frame).await;
        }
        Opcode::Ack | Opcode::Nack => {
            let req = AckRequest::decode(&body)?;
            if h.opcode == Opcode::Ack && req.delay_ms != 0 {
                return Err(WireError::InvalidValue {
                    field: "delay_ms",
                    reason: format!("ACK takes delay_ms 0 (it is NACK's), got {}", req.delay_ms),
                }
                .into());
            }
            let conn = conn.clone();
            tokio::spawn(async move {
                let frame = match conn.broker.ack(&req, h.opcode == Opcode::Nack).await {
                    Ok(n) => build(h.opcode, FLAG_RESPONSE, h.correlation_id, |o| {
                        body::encode_u32(n, o)
                    }),
                    Err(e) => broker_error(&h, &e),
                };
                conn.send(frame).await;
                drop(permit);
            });
            return Ok(());
        }
        Opcode::TxnRegister => {
            let group = txn::decode_register(&body)?;
            conn.send(match body::check_name("group", group) {
                Err(reason) => broker_error(&h, &BrokerError::InvalidName(reason)),
                Ok(()) => {
                    broker
                        .schedule()
                        .register(group, conn.tx.downgrade(), h.correlation_id);
                    conn.reply(&h, |_| {})
                }
            })
            .await;
        }
        Opcode::TxnHalf => {
            let req = txn::decode_half(&body)?;
            let result = broker.produce_half(&req);
            return stored_reply(conn, h, result, permit).await;
        }
        Opcode::ProduceDelayed => {
            let req = txn::decode_delayed(&body)?;
            let result = broker.produce_delayed(&req);
            return stored_reply(conn, h, result, permit).await;
        }
        Opcode::TxnEnd => {
            let (txn_id, decision) = txn::decode_end(&body)?;
            let conn = conn.clone();
            tokio::spawn(async move {
                let b = conn.broker.clone();
                let result =
                    tokio::task::spawn_blocking(move || b.schedule().end(&b, txn_id, decision))
                        .await;
                let frame = match result {
                    Ok(Ok(reply)) => conn.reply(&h, |o| reply.encode(o)),
                    Ok(Err(e)) => broker_error(&h, &e),
                    Err(e) => broker_error(&h, &BrokerError::Task(e)),
                };
                conn.send(frame).await;
                drop(permit);
            });
            return Ok(());
        }
        Opcode::Deliver | Opcode::Error | Opcode::TxnCheck => {
            return Err(WireError::Malformed(format!("{:?} is not a request", h.opcode)).into());
        }
    }
    drop(permit);
    Ok(())
}

/// Answers a PRODUCE_DELAYED or TXN_HALF with a PRODUCE-shaped reply once
/// the schedule log holds the batch as the flush policy requires.
async fn stored_reply(
    conn: &Arc<Conn>,
    h: FrameHeader,
    result: Result<(u32, crate::log::Appended), BrokerError>,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let (index, appended) = match result {
        Ok(r) => r,
        Err(e) => {
            conn.send(broker_error(&h, &e)).await;
            return Ok(());
        }
    };
    let reply = move |appended: &crate::log::Appended| {
        build(h.opcode, FLAG_RESPONSE, h.correlation_id, |o| {
            ProduceReply::encode_from(
                index,
                appended.outcomes.iter().map(|a| body::ProduceOutcome {
                    offset: a.offset,
                    duplicate: a.duplicate,
                }),
                o,
            )
        })
    };
    if conn.broker.config().flush == FlushMode::Sync {
        let conn = conn.clone();
        tokio::spawn(async move {
            let b = conn.broker.clone();
            let target = appended.durable_target();
            let durable =
                tokio::task::spawn_blocking(move || b.schedule().wait_durable(target)).await;
            let frame = match durable {
                Ok(Ok(())) => reply(&appended),
                Ok(Err(e)) => broker_error(&h, &e),
                Err(e) => broker_error(&h, &BrokerError::Task(e)),
            };
            conn.send(frame).await;
            drop(permit);
        });
        return Ok(());
    }
    conn.send(reply(&appended)).await;
    drop(permit);
    Ok(())
}

/// Starts a deliveries body in a frame: header, then a `u32` count to patch.
fn deliveries_frame(opcode: Opcode, flags: u16, correlation_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 << 10);
    frame::encode_header(&mut out, opcode, flags, correlation_id, 0);
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

fn finish_deliveries(mut out: Vec<u8>, count: u32) -> Bytes {
    out[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&count.to_le_bytes());
    frame::patch_length(&mut out);
    // The buffer grew by doubling: give back what it over-reserved, so a
    // queued reply holds no more memory than its bytes (the reply room
    // counts bytes).
    if out.capacity() - out.len() > out.len() / 4 {
        out.shrink_to_fit();
    }
    Bytes::from(out)
}

/// How long to sleep before looking again: until the next redelivery is
/// due or `deadline_ms`, whichever is first.
fn wait_ms(broker: &Broker, topic: &Topic, group: &str, deadline_ms: u64) -> u64 {
    let now = now_ms();
    let until = broker
        .next_due_ms(topic, group)
        .map_or(deadline_ms, |d| d.min(deadline_ms));
    until.saturating_sub(now).max(1)
}

/// `name` is `<topic>.dlq` of a topic that exists.
fn dlq_of_existing(broker: &Broker, name: &str) -> bool {
    name.strip_suffix(crate::broker::DLQ_SUFFIX)
        .is_some_and(|base| broker.topic(base).is_ok())
}

async fn fetch(broker: &Arc<Broker>, h: &FrameHeader, req: &Fetch) -> Bytes {
    if let Err(reason) = body::check_name("group", &req.group) {
        return broker_error(h, &BrokerError::InvalidName(reason));
    }
    let deadline_ms = now_ms() + req.max_wait_ms.min(FETCH_WAIT_MS_MAX) as u64;
    let topic = loop {
        match broker.topic(&req.topic) {
            Ok(t) => break t,
            // The dead-letter topic of an existing topic is created by its
            // first dead letter: until then it is empty, not unknown.
            Err(BrokerError::UnknownTopic(_)) if dlq_of_existing(broker, &req.topic) => {
                if now_ms() >= deadline_ms || broker.is_stopping() {
                    return finish_deliveries(
                        deliveries_frame(Opcode::Fetch, FLAG_RESPONSE, h.correlation_id),
                        0,
                    );
                }
                tokio::time::sleep(Duration::from_millis(EXPIRY_TICK_MS)).await;
            }
            Err(e) => return broker_error(h, &e),
        }
    };
    let max_messages = req.max_messages.clamp(1, body::PRODUCE_MESSAGES_MAX as u32);
    let max_bytes = req.max_bytes.clamp(1, DELIVERY_BYTES_MAX);
    loop {
        let notified = topic.appended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut out = deliveries_frame(Opcode::Fetch, FLAG_RESPONSE, h.correlation_id);
        match broker
            .poll(
                &topic,
                req.partition,
                &req.group,
                max_messages,
                max_bytes,
                &mut out,
            )
            .await
        {
            Err(e) => return broker_error(h, &e),
            Ok(n) if n > 0 || now_ms() >= deadline_ms || broker.is_stopping() => {
                return finish_deliveries(out, n)
            }
            Ok(_) => {
                let wait = wait_ms(broker, &topic, &req.group, deadline_ms);
                let _ = tokio::time::timeout(Duration::from_millis(wait), notified).await;
            }
        }
    }
}

async fn push_loop(
    conn: Arc<Conn>,
    sub: Arc<Subscription>,
    topic: Arc<Topic>,
    group: String,
    correlation_id: u64,
) {
    loop {
        if sub.cancelled.load(Ordering::Acquire) || conn.broker.is_stopping() {
            return;
        }
        let changed = sub.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let credit = sub.credit.load(Ordering::Acquire);
        if credit == 0 {
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
            continue;
        }
        let appended = topic.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let Some(room) = conn.room(DELIVERY_BYTES_MAX).await else {
            return;
        };
        let mut out = deliveries_frame(Opcode::Deliver, FLAG_PUSH, correlation_id);
        let max = credit.min(PUSH_MESSAGES_MAX);
        match conn
            .broker
            .poll(
                &topic,
                ANY_PARTITION,
                &group,
                max,
                DELIVERY_BYTES_MAX,
                &mut out,
            )
            .await
        {
            Err(e) => {
                tracing::warn!(topic = %topic.name, group, error = %e, "subscription poll failed");
                let f = error_frame(correlation_id, e.code(), e.to_string());
                conn.send(f).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(0) => {
                let wait = wait_ms(&conn.broker, &topic, &group, now_ms() + 1000);
                tokio::select! {
                    _ = appended => {}
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                }
            }
            Ok(n) => {
                sub.credit.fetch_sub(n, Ordering::AcqRel);
                conn.send_in(finish_deliveries(out, n), Some(room)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_spares_holders_waiting_for_room_unless_all_are() {
        let room = FrameRoom::new(64 << 20, 16 << 20);
        let now = Instant::now();
        let put = |id: u64, ago_ms: u64, waiting: bool| {
            room.holders().insert(
                id,
                Holder {
                    progress_at: now - Duration::from_millis(ago_ms),
                    waiting,
                    evict: Arc::new(Notify::new()),
                },
            );
        };
        let ids = || {
            let mut v: Vec<u64> = room.holders().keys().copied().collect();
            v.sort();
            v
        };
        put(1, 1_000, false); // its client stalled: evicted
        put(2, 1_000, true); // waits for room: spared
        put(3, 10, false); // progressing
        room.evict_stalled(99);
        assert_eq!(ids(), vec![2, 3]);
        // All waiting, each for room another holds: the longest waiter goes.
        room.release(3);
        put(4, 600, true);
        put(5, 10, true);
        room.evict_stalled(5);
        assert_eq!(ids(), vec![4, 5]);
        room.evict_stalled(5);
        assert_eq!(ids(), vec![5]);
        // Not before it has waited STALL_EVICT, and never the caller.
        put(6, 100, true);
        room.evict_stalled(5);
        room.evict_stalled(6);
        assert_eq!(ids(), vec![5, 6]);
    }

    #[test]
    fn accepts_are_paced_to_the_rate_after_a_burst() {
        assert!(AcceptPace::new(0, Instant::now()).is_none(), "0: no limit");
        let t0 = Instant::now();
        let mut pace = AcceptPace::new(100, t0).unwrap();
        for _ in 0..100 {
            assert_eq!(pace.wait(t0), Duration::ZERO, "the burst");
            pace.take();
        }
        let wait = pace.wait(t0);
        assert!(
            wait > Duration::from_millis(9) && wait <= Duration::from_millis(10),
            "{wait:?}"
        );
        // One a second per rate, and idle time refills no more than a burst.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(pace.wait(t1), Duration::ZERO);
        pace.take();
        assert!(pace.wait(t1) > Duration::ZERO);
        let later = t1 + Duration::from_secs(60);
        let mut allowed = 0;
        while pace.wait(later).is_zero() {
            pace.take();
            allowed += 1;
        }
        assert_eq!(allowed, 100);
    }

    #[test]
    fn a_built_reply_gives_back_the_room_it_does_not_use() {
        let own = Arc::new(Semaphore::new(16 * 1024));
        let shared = ReplyRoom::new(64 << 20);
        let held = Arc::new(AtomicUsize::new(8 * 1024));
        let mut permit = ReplyPermit {
            own: own.clone().try_acquire_many_owned(8 * 1024).unwrap(),
            shared: shared.kib.clone().try_acquire_many_owned(8 * 1024).unwrap(),
            held_kib: held.clone(),
            kib: 8 * 1024,
        };
        permit.shrink_to(3000);
        assert_eq!(own.available_permits(), 16 * 1024 - 3);
        assert_eq!(shared.kib.available_permits(), 64 * 1024 - 3);
        assert_eq!(held.load(Ordering::Acquire), 3);
        // Never below one KiB, and never grows.
        permit.shrink_to(0);
        assert_eq!(permit.kib, 1);
        permit.shrink_to(1 << 20);
        assert_eq!(permit.kib, 1);
        drop(permit);
        assert_eq!(own.available_permits(), 16 * 1024);
        assert_eq!(shared.kib.available_permits(), 64 * 1024);
        assert_eq!(held.load(Ordering::Acquire), 0);
    }
}
