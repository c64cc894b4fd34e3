//! Requests, one file per opcode family. Each handler decodes its body,
//! calls the broker and encodes the answer; none decides a policy of its
//! own (when a produce is acknowledged is the broker's call).
//!
//! A handler owns the request's in-flight permit: it drops it once the
//! answer is queued, so a request that waits (a long poll, an ack) holds
//! its place in `inflight_max` until then.

mod ack;
pub(super) mod fetch;
mod meta;
mod produce;
mod topics;
mod txn;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::conn::{Conn, Fatal};
use super::error_frame;
use crate::broker::BrokerError;
use crate::protocol::{frame, FrameHeader, Opcode, Problem, WireError};

/// The ERROR frame for a request the broker refused.
fn broker_error(h: &FrameHeader, e: &BrokerError) -> Bytes {
    error_frame(h.correlation_id, e.code(), e.to_string())
}

/// Sends the answer `pending` resolves to, encoded by `encode`: at once if
/// it is ready without waiting (an async-flush produce: no task), else from
/// a task of its own that holds the request's in-flight permit until then.
async fn answer<T, F>(
    conn: &Arc<Conn>,
    h: FrameHeader,
    permit: OwnedSemaphorePermit,
    pending: impl Future<Output = T> + Send + 'static,
    encode: F,
) where
    T: Send + 'static,
    F: FnOnce(&Conn, &FrameHeader, T) -> Bytes + Send + 'static,
{
    let mut pending = Box::pin(pending);
    let ready = pending
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
    if let Poll::Ready(result) = ready {
        conn.send(encode(conn, &h, result)).await;
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        let result = pending.await;
        conn.send(encode(&conn, &h, result)).await;
        drop(permit);
    });
}

/// Runs one request. `Err` answers it with ERROR; the connection closes
/// when the code is below 100 (docs/PROTOCOL.md, "Errors").
pub(super) async fn dispatch(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    if h.flags != 0 {
        // A request carries neither the RESPONSE nor the PUSH flag.
        return Err(WireError::Malformed {
            field: "flags",
            offset: frame::FLAGS_OFFSET,
            problem: Problem::NotEqual {
                expected: 0,
                found: u64::from(h.flags),
            },
        }
        .into());
    }
    if h.opcode != Opcode::Hello && !conn.authorized.load(Ordering::Acquire) {
        return Err(
            WireError::Unauthorized("this broker requires HELLO with a token first").into(),
        );
    }
    match h.opcode {
        Opcode::Hello => meta::hello(conn, h, body, permit).await,
        Opcode::Ping => meta::ping(conn, h, body, permit).await,
        Opcode::CreateTopic
        | Opcode::ListTopics
        | Opcode::DescribeTopic
        | Opcode::GroupPosition => topics::handle(conn, h, body, permit).await,
        Opcode::Produce => produce::produce(conn, h, body, permit).await,
        Opcode::Fetch => fetch::fetch(conn, h, body, permit).await,
        Opcode::Subscribe => fetch::subscribe(conn, h, body, permit).await,
        Opcode::Credit | Opcode::Unsubscribe => fetch::credit(conn, h, body, permit).await,
        Opcode::Ack | Opcode::Nack => ack::ack(conn, h, body, permit).await,
        Opcode::TxnRegister => txn::register(conn, h, body, permit).await,
        Opcode::TxnHalf | Opcode::ProduceDelayed => txn::store(conn, h, body, permit).await,
        Opcode::TxnEnd => txn::end(conn, h, body, permit).await,
        Opcode::Deliver | Opcode::Error | Opcode::TxnCheck => Err(WireError::Malformed {
            field: "opcode",
            offset: frame::OPCODE_OFFSET,
            problem: Problem::NotARequest {
                found: h.opcode as u8,
            },
        }
        .into()),
    }
}
