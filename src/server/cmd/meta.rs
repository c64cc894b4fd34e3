//! HELLO (version and token) and PING.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::broker::config::same_secret;
use crate::protocol::body::{Hello, HelloReply};
use crate::protocol::{frame, FrameHeader, Reader, WireError};
use crate::server::conn::{Conn, Fatal};

pub(super) async fn hello(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let broker = &conn.broker;
    let hello = Hello::decode(&body)?;
    if !(hello.version_min..=hello.version_max).contains(&frame::VERSION) {
        return Err(WireError::UnsupportedVersion(hello.version_max).into());
    }
    if let Some(expected) = &broker.config().auth_token {
        let given = hello.token.as_deref().unwrap_or("");
        if !same_secret(given.as_bytes(), expected.as_bytes()) {
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
    Ok(())
}

pub(super) async fn ping(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    // PING has an empty body.
    Reader::new(&body).finish()?;
    conn.send(conn.reply(&h, |_| {})).await;
    Ok(())
}
