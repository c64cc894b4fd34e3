//! ACK and NACK: answered once the group store holds them (the broker
//! waits for that).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::{answer, broker_error};
use crate::protocol::body::{self, AckRequest};
use crate::protocol::{FrameHeader, Opcode, Problem, WireError};
use crate::server::conn::{Conn, Fatal};

pub(super) async fn ack(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let req = AckRequest::decode(&body)?;
    let nack = h.opcode == Opcode::Nack;
    if !nack && req.delay_ms != 0 {
        return Err(WireError::InvalidValue {
            field: "delay_ms",
            // delay_ms is NACK's: an ACK carries 0.
            problem: Problem::NotEqual {
                expected: 0,
                found: u64::from(req.delay_ms),
            },
        }
        .into());
    }
    let broker = conn.broker.clone();
    let pending = async move { broker.ack(&req, nack).await };
    answer(conn, h, permit, pending, |conn, h, result| match result {
        Ok(n) => conn.reply(h, |o| body::encode_u32(n, o)),
        Err(e) => broker_error(h, &e),
    })
    .await;
    Ok(())
}
