//! One pipelined connection: any number of requests in flight, answers
//! matched by correlation id, pushes routed to their subscription.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{ClientError, ConnectOptions};
use crate::protocol::body::{decode_deliveries, Delivery, ErrorBody, Hello, HelloReply};
use crate::protocol::frame::{self, VERSION};
use crate::protocol::txn::Check;
use crate::protocol::{Opcode, FRAME_HEADER_LEN};
use crate::sync::lock;

/// Correlation ids are unique in the process, so a frame built ahead (a
/// producer's batch) keeps its id across attempts and connections.
static NEXT_CORRELATION_ID: AtomicU64 = AtomicU64::new(1);

pub fn next_correlation_id() -> u64 {
    NEXT_CORRELATION_ID.fetch_add(1, Ordering::Relaxed)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, ClientError>>>>>;
type Pushes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Result<Vec<Delivery>, ClientError>>>>>;
/// TXN_CHECK pushes, by the TXN_REGISTER's correlation id.
type Checks = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Check>>>>;

/// The answer to a queued request.
pub struct Answer {
    rx: oneshot::Receiver<Result<Bytes, ClientError>>,
    id: u64,
    pending: Pending,
}

impl Answer {
    pub async fn wait(mut self) -> Result<Bytes, ClientError> {
        // Dropped without an answer: the connection died.
        (&mut self.rx).await.unwrap_or(Err(ClientError::Closed))
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // Abandoned (timed out): forget it, so a late answer is discarded.
        lock(&self.pending).remove(&self.id);
    }
}

pub struct Connection {
    tx: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    pushes: Pushes,
    checks: Checks,
    closed: Arc<AtomicBool>,
    pub server: String,
}

impl Connection {
    /// Connects and says HELLO.
    pub async fn connect(addr: SocketAddr) -> Result<Arc<Connection>, ClientError> {
        Connection::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects and says HELLO with `token`, for a broker started with
    /// `--auth-token`.
    pub async fn connect_with_token(
        addr: SocketAddr,
        token: Option<&str>,
    ) -> Result<Arc<Connection>, ClientError> {
        let options = ConnectOptions {
            token: token.map(str::to_owned),
            ..ConnectOptions::default()
        };
        Connection::connect_with(addr, &options).await
    }

    /// Connects (over TLS when `options.tls` is set) and says HELLO with
    /// `options.token`.
    pub async fn connect_with(
        addr: SocketAddr,
        options: &ConnectOptions,
    ) -> Result<Arc<Connection>, ClientError> {
        let connect_error = |source: std::io::Error| ClientError::Connect {
            addr,
            source: Arc::new(source),
        };
        let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
        let _ = stream.set_nodelay(true);
        match &options.tls {
            None => {
                let (rd, wr) = stream.into_split();
                Connection::start(rd, wr, options.token.as_deref()).await
            }
            Some(tls) => {
                let stream = tls.connect(stream).await.map_err(connect_error)?;
                let (rd, wr) = tokio::io::split(stream);
                Connection::start(rd, wr, options.token.as_deref()).await
            }
        }
    }

    async fn start<R, W>(
        mut rd: R,
        wr: W,
        token: Option<&str>,
    ) -> Result<Arc<Connection>, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let pending: Pending = Arc::default();
        let pushes: Pushes = Arc::default();
        let checks: Checks = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(crate::net::write_frames(wr, rx, None));
        {
            let pending = pending.clone();
            let pushes = pushes.clone();
            let checks = checks.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                let error = read_loop(&mut rd, &pending, &pushes, &checks).await;
                closed.store(true, Ordering::Release);
                // Dropping the senders ends each check listener's stream.
                lock(&checks).clear();
                for (_, p) in lock(&pending).drain() {
                    let _ = p.send(Err(error.clone()));
                }
                for (_, p) in lock(&pushes).drain() {
                    let _ = p.send(Err(error.clone()));
                }
            });
        }
        let mut conn = Connection {
            tx,
            pending,
            pushes,
            checks,
            closed,
            server: String::new(),
        };
        let mut body = Vec::new();
        Hello {
            version_min: VERSION,
            version_max: VERSION,
            client: format!("bida-rust {}", env!("CARGO_PKG_VERSION")),
            token: token.map(str::to_owned),
        }
        .encode(&mut body);
        let reply = HelloReply::decode(&conn.request(Opcode::Hello, &body).await?)?;
        conn.server = reply.server;
        Ok(Arc::new(conn))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn next_correlation(&self) -> u64 {
        next_correlation_id()
    }

    /// Queues a request on the connection now (so requests go out in the
    /// order of these calls) and returns where its answer will arrive.
    pub fn start_request(&self, opcode: Opcode, body: &[u8]) -> Result<Answer, ClientError> {
        let id = self.next_correlation();
        let (done, rx) = oneshot::channel();
        lock(&self.pending).insert(id, done);
        if self.is_closed()
            || self
                .tx
                .send(Bytes::from(frame::encode(opcode, 0, id, body)))
                .is_err()
        {
            lock(&self.pending).remove(&id);
            return Err(ClientError::Closed);
        }
        Ok(Answer {
            rx,
            id,
            pending: self.pending.clone(),
        })
    }

    /// Queues a whole frame built by the caller with `correlation_id` in
    /// its header. Sending the same frame again (a retry) reuses the id: an
    /// answer to either attempt answers both.
    pub fn start_prebuilt(&self, correlation_id: u64, frame: Bytes) -> Result<Answer, ClientError> {
        let (done, rx) = oneshot::channel();
        lock(&self.pending).insert(correlation_id, done);
        if self.is_closed() || self.tx.send(frame).is_err() {
            lock(&self.pending).remove(&correlation_id);
            return Err(ClientError::Closed);
        }
        Ok(Answer {
            rx,
            id: correlation_id,
            pending: self.pending.clone(),
        })
    }

    /// Sends a request and returns the body of its answer (an ERROR answer
    /// becomes `ClientError::Broker`).
    pub async fn request(&self, opcode: Opcode, body: &[u8]) -> Result<Bytes, ClientError> {
        self.start_request(opcode, body)?.wait().await
    }

    /// Registers a subscription's push channel under the SUBSCRIBE's
    /// correlation id, then sends it.
    pub async fn subscribe(
        &self,
        body: &[u8],
    ) -> Result<
        (
            u64,
            mpsc::UnboundedReceiver<Result<Vec<Delivery>, ClientError>>,
        ),
        ClientError,
    > {
        let id = self.next_correlation();
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        lock(&self.pushes).insert(id, push_tx);
        let (done, rx) = oneshot::channel();
        lock(&self.pending).insert(id, done);
        if self
            .tx
            .send(Bytes::from(frame::encode(Opcode::Subscribe, 0, id, body)))
            .is_err()
        {
            return Err(ClientError::Closed);
        }
        match rx.await.unwrap_or(Err(ClientError::Closed)) {
            Ok(_) => Ok((id, push_rx)),
            Err(e) => {
                lock(&self.pushes).remove(&id);
                Err(e)
            }
        }
    }

    /// Joins a producer group: the broker may send this connection
    /// TXN_CHECK pushes, which arrive on the returned stream (it ends when
    /// the connection does).
    pub async fn register_producer_group(
        &self,
        group: &str,
    ) -> Result<mpsc::UnboundedReceiver<Check>, ClientError> {
        let id = self.next_correlation();
        let (check_tx, check_rx) = mpsc::unbounded_channel();
        lock(&self.checks).insert(id, check_tx);
        let mut body = Vec::new();
        crate::protocol::txn::encode_register(group, &mut body);
        let (done, rx) = oneshot::channel();
        lock(&self.pending).insert(id, done);
        if self.is_closed()
            || self
                .tx
                .send(Bytes::from(frame::encode(
                    Opcode::TxnRegister,
                    0,
                    id,
                    &body,
                )))
                .is_err()
        {
            lock(&self.pending).remove(&id);
            lock(&self.checks).remove(&id);
            return Err(ClientError::Closed);
        }
        match rx.await.unwrap_or(Err(ClientError::Closed)) {
            Ok(_) => Ok(check_rx),
            Err(e) => {
                lock(&self.checks).remove(&id);
                Err(e)
            }
        }
    }

    pub fn forget_subscription(&self, id: u64) {
        lock(&self.pushes).remove(&id);
    }
}

async fn read_loop(
    rd: &mut (impl AsyncRead + Unpin),
    pending: &Pending,
    pushes: &Pushes,
    checks: &Checks,
) -> ClientError {
    let mut reader = crate::net::ReadBuffer::default();
    loop {
        loop {
            let h = match frame::decode_header(&reader.buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return ClientError::Protocol(e),
            };
            if reader.buf.len() < FRAME_HEADER_LEN + h.body_len {
                reader
                    .buf
                    .reserve(FRAME_HEADER_LEN + h.body_len - reader.buf.len());
                break;
            }
            let whole = reader.buf.split_to(FRAME_HEADER_LEN + h.body_len).freeze();
            let body = whole.slice(FRAME_HEADER_LEN..);
            if h.is_push() && h.opcode == Opcode::TxnCheck {
                let check = match Check::decode(&body) {
                    Ok(c) => c,
                    Err(e) => return ClientError::Protocol(e),
                };
                if let Some(c) = lock(checks).get(&h.correlation_id) {
                    let _ = c.send(check);
                }
                continue;
            }
            if h.is_push() {
                let deliveries = decode_deliveries(&body).map_err(ClientError::Protocol);
                if let Some(p) = lock(pushes).get(&h.correlation_id) {
                    let _ = p.send(deliveries);
                }
                continue;
            }
            let result = if h.opcode == Opcode::Error {
                Err(match ErrorBody::decode(&body) {
                    Ok(e) => ClientError::Broker {
                        code: e.code,
                        message: e.message,
                    },
                    Err(e) => ClientError::Protocol(e),
                })
            } else {
                Ok(body)
            };
            if h.opcode == Opcode::Error && h.correlation_id == 0 {
                // A connection-level error: the broker closes after it.
                if let Err(e) = result {
                    return e;
                }
                continue;
            }
            let waiter = lock(pending).remove(&h.correlation_id);
            match waiter {
                Some(w) => {
                    let _ = w.send(result);
                }
                None => {
                    // An error for a subscription's pushes.
                    if let Err(e) = result {
                        if let Some(p) = lock(pushes).get(&h.correlation_id) {
                            let _ = p.send(Err(e));
                        }
                    }
                }
            }
        }
        reader.prepare();
        match rd.read_buf(&mut reader.buf).await {
            Ok(0) => return ClientError::Closed,
            Ok(n) => reader.filled(n),
            Err(_) => return ClientError::Closed,
        }
    }
}
