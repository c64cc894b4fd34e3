//! Transactions and delayed messages: TXN_REGISTER, TXN_HALF,
//! PRODUCE_DELAYED, TXN_END, and the TXN_CHECK pushes the schedule's check
//! events become.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::produce::produce_reply;
use super::{answer, broker_error};
use crate::broker::schedule::CheckSink;
use crate::protocol::frame::{self, FLAG_PUSH};
use crate::protocol::txn::{self, Check};
use crate::protocol::{FrameHeader, Opcode};
use crate::server::conn::{Conn, Fatal, Outgoing};

/// A connection that registered for a producer group's check-backs: each
/// check becomes a TXN_CHECK push with the TXN_REGISTER's correlation id.
struct Registered {
    tx: mpsc::WeakSender<Outgoing>,
    correlation_id: u64,
}

impl CheckSink for Registered {
    fn is_open(&self) -> bool {
        self.tx.strong_count() > 0
    }

    fn try_send(&self, check: &Check) -> bool {
        let Some(tx) = self.tx.upgrade() else {
            return false;
        };
        let mut out = Vec::with_capacity(64);
        frame::encode_header(
            &mut out,
            Opcode::TxnCheck,
            FLAG_PUSH,
            self.correlation_id,
            0,
        );
        check.encode(&mut out);
        frame::patch_length(&mut out);
        tx.try_send(Bytes::from(out).into()).is_ok()
    }
}

pub(super) async fn register(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let group = txn::decode_register(&body)?;
    let sink = Box::new(Registered {
        tx: conn.tx.downgrade(),
        correlation_id: h.correlation_id,
    });
    conn.send(match conn.broker.register_checks(group, sink) {
        Ok(()) => conn.reply(&h, |_| {}),
        Err(e) => broker_error(&h, &e),
    })
    .await;
    Ok(())
}

/// TXN_HALF and PRODUCE_DELAYED: stored in the schedule log now (in frame
/// order), answered PRODUCE-shaped when the flush policy is met.
pub(super) async fn store(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let encode = |conn: &Conn, h: &FrameHeader, result| match result {
        Ok(ack) => produce_reply(conn, h, &ack),
        Err(e) => broker_error(h, &e),
    };
    if h.opcode == Opcode::TxnHalf {
        let req = txn::decode_half(&body)?;
        answer(conn, h, permit, conn.broker.produce_half(&req), encode).await;
    } else {
        let req = txn::decode_delayed(&body)?;
        answer(conn, h, permit, conn.broker.produce_delayed(&req), encode).await;
    }
    Ok(())
}

pub(super) async fn end(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let (txn_id, decision) = txn::decode_end(&body)?;
    let broker = conn.broker.clone();
    let pending = async move { broker.end_txn(txn_id, decision).await };
    answer(conn, h, permit, pending, |conn, h, result| match result {
        Ok(reply) => conn.reply(h, |o| reply.encode(o)),
        Err(e) => broker_error(h, &e),
    })
    .await;
    Ok(())
}
