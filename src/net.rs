//! Socket I/O shared by the broker and the client: the writer task that
//! drains a connection's queue of frames, and the read buffer that grows
//! only while the peer keeps it full. (The wire format itself is in
//! `protocol`, which does no I/O.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// The writer's buffer; frames this large or larger skip it.
pub const WRITE_BUFFER_BYTES: usize = 32 << 10;
/// A connection's read buffer starts this small (an idle connection costs
/// little memory) ...
pub const READ_CHUNK_MIN: usize = 8 << 10;
/// ... and doubles up to this while reads fill what it asked for.
pub const READ_CHUNK_MAX: usize = 1 << 20;

/// A queue of whole frames to write.
pub trait FrameQueue: Send {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Bytes>> + Send;
    fn try_recv(&mut self) -> Option<Bytes>;
}

impl FrameQueue for mpsc::Receiver<Bytes> {
    async fn recv(&mut self) -> Option<Bytes> {
        mpsc::Receiver::recv(self).await
    }
    fn try_recv(&mut self) -> Option<Bytes> {
        mpsc::Receiver::try_recv(self).ok()
    }
}

/// A frame queued for the writer, holding memory room (a semaphore
/// permit, typically) until the writer takes it off the queue.
pub struct Outgoing<R: Send> {
    pub frame: Bytes,
    pub room: Option<R>,
}

impl<R: Send> From<Bytes> for Outgoing<R> {
    fn from(frame: Bytes) -> Self {
        Outgoing { frame, room: None }
    }
}

impl<R: Send> FrameQueue for mpsc::Receiver<Outgoing<R>> {
    async fn recv(&mut self) -> Option<Bytes> {
        mpsc::Receiver::recv(self).await.map(|o| o.frame)
    }
    fn try_recv(&mut self) -> Option<Bytes> {
        mpsc::Receiver::try_recv(self).ok().map(|o| o.frame)
    }
}

impl FrameQueue for mpsc::UnboundedReceiver<Bytes> {
    async fn recv(&mut self) -> Option<Bytes> {
        mpsc::UnboundedReceiver::recv(self).await
    }
    fn try_recv(&mut self) -> Option<Bytes> {
        mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// Writes frames from `queue` until it closes or the socket fails: every
/// frame queued meanwhile goes out with one flush, and a frame of
/// `WRITE_BUFFER_BYTES` or more is written straight to the socket instead of
/// being copied into the buffer. Shuts the write side down at the end.
///
/// With `watch`, a write that makes no progress for `watch.limit` (the
/// peer does not read) ends the writer as a socket error would, and
/// `watch.blocked_since_ms` says since when a write has been waiting
/// (0: none is).
pub async fn write_frames<W: AsyncWrite + Unpin>(
    socket: W,
    queue: impl FrameQueue,
    watch: Option<WriteWatch>,
) {
    match watch {
        None => write_all_frames(socket, queue).await,
        Some(watch) => {
            write_all_frames(
                Stalling {
                    inner: socket,
                    watch,
                    timer: None,
                },
                queue,
            )
            .await
        }
    }
}

/// How a writer is watched: its stall limit, and since when (ms on
/// [`clock_ms`]) its current write has been waiting for the peer.
#[derive(Clone, Debug)]
pub struct WriteWatch {
    pub limit: Duration,
    pub blocked_since_ms: Arc<AtomicU64>,
}

/// Milliseconds since the first call in this process, never 0.
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

async fn write_all_frames<W: AsyncWrite + Unpin>(socket: W, mut queue: impl FrameQueue) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, socket);
    async fn put<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, frame: &[u8]) -> std::io::Result<()> {
        if frame.len() >= WRITE_BUFFER_BYTES {
            w.flush().await?;
            w.get_mut().write_all(frame).await
        } else {
            w.write_all(frame).await
        }
    }
    while let Some(f) = queue.recv().await {
        if put(&mut w, &f).await.is_err() {
            return;
        }
        while let Some(f) = queue.try_recv() {
            if put(&mut w, &f).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// A writer whose writes fail with `TimedOut` after `limit` without
/// progress.
struct Stalling<W> {
    inner: W,
    watch: WriteWatch,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<W: AsyncWrite + Unpin> Stalling<W> {
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut W>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                if self.timer.take().is_some() {
                    self.watch.blocked_since_ms.store(0, Ordering::Release);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.watch.limit;
                let since = &self.watch.blocked_since_ms;
                let timer = self.timer.get_or_insert_with(|| {
                    since.store(clock_ms(), Ordering::Release);
                    Box::pin(tokio::time::sleep(limit))
                });
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer did not read for the stall limit",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Stalling<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().guard(cx, |w, cx| w.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().guard(cx, |w, cx| w.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().guard(cx, |w, cx| w.poll_shutdown(cx))
    }
}

/// A read buffer sized by how the peer uses it.
pub struct ReadBuffer {
    pub buf: BytesMut,
    chunk: usize,
    asked: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            buf: BytesMut::with_capacity(READ_CHUNK_MIN),
            chunk: READ_CHUNK_MIN,
            asked: 0,
        }
    }
}

impl ReadBuffer {
    /// Makes room for the next read; call before `read_buf(&mut self.buf)`.
    pub fn prepare(&mut self) {
        if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
            self.buf.reserve(self.chunk);
        }
        self.asked = self.buf.capacity() - self.buf.len();
    }

    /// Records that a read returned `n` bytes: a read that filled all the
    /// room doubles the next one.
    pub fn filled(&mut self, n: usize) {
        if n == self.asked {
            self.chunk = (self.chunk * 2).min(READ_CHUNK_MAX);
        }
    }
}
