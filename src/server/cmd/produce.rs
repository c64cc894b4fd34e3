//! PRODUCE: the broker appends in frame order and answers when its flush
//! policy is met; this file only decodes and encodes.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::{answer, broker_error};
use crate::broker::ProduceAck;
use crate::protocol::body::{self, ProduceOutcome, ProduceReply};
use crate::protocol::FrameHeader;
use crate::server::conn::{Conn, Fatal};

pub(super) async fn produce(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let req = body::decode_produce(&body)?;
    // Appended now, on the reader, so pipelined batches keep their order.
    let ack = conn.broker.produce(&req);
    answer(conn, h, permit, ack, |conn, h, result| match result {
        Ok(ack) => produce_reply(conn, h, &ack),
        Err(e) => broker_error(h, &e),
    })
    .await;
    Ok(())
}

/// The PRODUCE-shaped answer (also PRODUCE_DELAYED's and TXN_HALF's).
pub(super) fn produce_reply(conn: &Conn, h: &FrameHeader, ack: &ProduceAck) -> Bytes {
    conn.reply(h, |o| {
        ProduceReply::encode_from(
            ack.partition,
            ack.outcomes.iter().map(|a| ProduceOutcome {
                offset: a.offset,
                duplicate: a.duplicate,
            }),
            o,
        )
    })
}
