//! The wire edge: everything that speaks to sockets, above the broker.
//! The broker below knows nothing of frames, connections or HTTP.
//!
//! ```text
//! listener.rs   accepts (accept pacing, the connection cap, TLS), stops
//! conn.rs       one connection: the read loop, the writer, in-flight cap
//! admission.rs  memory: room for large frames arriving, for replies queued
//! cmd/          one file per opcode family: decode, call the broker, encode
//!   meta.rs       HELLO, PING
//!   topics.rs     CREATE_TOPIC, LIST_TOPICS, DESCRIBE_TOPIC, GROUP_POSITION
//!   produce.rs    PRODUCE
//!   fetch.rs      FETCH, SUBSCRIBE, CREDIT, UNSUBSCRIBE (and the pushes)
//!   ack.rs        ACK, NACK
//!   txn.rs        TXN_REGISTER, TXN_HALF, PRODUCE_DELAYED, TXN_END, TXN_CHECK
//! admin.rs      the HTTP admin listener: console, /metrics, the admin API
//! scrape.rs     /metrics: the broker's counters and state as OpenMetrics
//! ```
//!
//! Per connection there is a reader (`conn::connection`), a writer task fed
//! by a bounded channel, and a task per waiting request (a produce waiting
//! for its ack, a long-polling fetch, an ack waiting for its record) or per
//! subscription. Appends start on the reader, in frame order, so a client's
//! pipelined batches to one partition are stored in the order sent. At most
//! `inflight_max` requests per connection are unanswered: beyond that the
//! reader stops reading and TCP pushes back.

pub mod admin;
mod admission;
mod cmd;
mod conn;
mod listener;
mod scrape;

use std::time::Duration;

use bytes::Bytes;

pub use admission::{LARGE_FRAME_BYTES, REPLY_ROOM_BYTES, RESERVE_FRAME_BYTES_MAX, STALL_EVICT};
pub use cmd::fetch::{
    DELIVERY_BYTES_MAX, FETCH_WAIT_MS_MAX, PUSH_MESSAGES_MAX, SUBSCRIPTIONS_PER_CONNECTION_MAX,
};
pub use listener::serve;

use crate::protocol::body::ErrorBody;
use crate::protocol::frame::{self, FLAG_RESPONSE};
use crate::protocol::{ErrorCode, Opcode};

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
