//! One connection: the read loop (frames in, each dispatched in order),
//! the writer task, the in-flight cap, and the large-frame admission that
//! decides how much the next read may take.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::admission::{
    next_connection_id, Reader, ReplyPermit, Rooms, LARGE_FRAME_BYTES, PROGRESS_BYTES,
    REPLY_ROOM_BYTES, ROOM_STEP,
};
use super::cmd::dispatch;
use super::{build, error_frame, SHUTDOWN_GRACE};
use crate::broker::Broker;
use crate::protocol::frame::{self, FLAG_RESPONSE};
use crate::protocol::{ErrorCode, FrameHeader, WireError, FRAME_HEADER_LEN};
use crate::sync::lock;

pub(super) struct Subscription {
    pub credit: AtomicU32,
    pub changed: Notify,
    pub cancelled: AtomicBool,
}

pub(super) struct Conn {
    pub broker: Arc<Broker>,
    /// The listener's memory budgets.
    rooms: Arc<Rooms>,
    pub tx: mpsc::Sender<Outgoing>,
    /// Room (KiB) for deliveries queued to the writer: a client that does
    /// not read holds at most `REPLY_ROOM_BYTES` of them.
    reply_room: Arc<Semaphore>,
    /// KiB of reply room this connection holds (in its writer's queue).
    reply_held: Arc<AtomicUsize>,
    /// This connection in the broker-wide reply room.
    id: u64,
    inflight: Arc<Semaphore>,
    pub inflight_max: u32,
    pub subs: Mutex<HashMap<u64, Arc<Subscription>>>,
    /// HELLO presented the broker's token (always true without one).
    pub authorized: AtomicBool,
}

/// A frame for the writer, with the reply room it holds until written.
pub type Outgoing = crate::net::Outgoing<ReplyPermit>;

impl Conn {
    pub async fn send(&self, frame: Bytes) {
        // Fails only once the writer is gone, i.e. the connection is dead.
        let _ = self.tx.send(frame.into()).await;
    }

    /// Sends a frame built in `room` (from [`Conn::room`]).
    pub async fn send_in(&self, frame: Bytes, mut room: Option<ReplyPermit>) {
        if let Some(r) = &mut room {
            r.shrink_to(frame.len());
        }
        let _ = self.tx.send(Outgoing { frame, room }).await;
    }

    /// Waits for room for a reply of up to `bytes`; `None` once the
    /// connection is closing.
    pub async fn room(&self, bytes: u32) -> Option<ReplyPermit> {
        let kib = bytes.div_ceil(1024).clamp(1, REPLY_ROOM_BYTES / 1024);
        let shared = &self.rooms.replies;
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

    pub fn reply(&self, h: &FrameHeader, body: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        build(h.opcode, FLAG_RESPONSE, h.correlation_id, body)
    }

    fn idle(&self) -> bool {
        self.inflight.available_permits() == self.inflight_max as usize
            && lock(&self.subs).is_empty()
    }
}

pub(super) async fn connection<R, W>(
    broker: Arc<Broker>,
    rooms: Arc<Rooms>,
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
    let id = next_connection_id();
    let reply_held: Arc<AtomicUsize> = Arc::default();
    rooms.replies.readers().insert(
        id,
        Reader {
            held_kib: reply_held.clone(),
            blocked_since_ms,
            writer: writer.abort_handle(),
        },
    );
    let conn = Arc::new(Conn {
        broker,
        rooms,
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
    let room = &conn.rooms.frames;
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
    conn.rooms.replies.readers().remove(&conn.id);
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
pub(super) struct Fatal(WireError);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Fatal {
    pub fn code(&self) -> ErrorCode {
        self.0.code()
    }
}

impl From<WireError> for Fatal {
    fn from(e: WireError) -> Self {
        Fatal(e)
    }
}
