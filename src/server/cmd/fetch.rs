//! FETCH (a long poll), SUBSCRIBE, CREDIT and UNSUBSCRIBE, and the
//! DELIVER pushes of a subscription.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::broker_error;
use crate::broker::{now_ms, Broker, BrokerError, Invalid, Topic, DLQ_SUFFIX, EXPIRY_TICK_MS};
use crate::protocol::body::{self, Credit, Fetch, Subscribe, ANY_PARTITION};
use crate::protocol::frame::{self, FLAG_PUSH, FLAG_RESPONSE};
use crate::protocol::{FrameHeader, Opcode, FRAME_HEADER_LEN};
use crate::server::conn::{Conn, Fatal, Subscription};
use crate::server::error_frame;
use crate::sync::lock;

/// Bytes of deliveries in one FETCH reply or DELIVER push, at most.
pub const DELIVERY_BYTES_MAX: u32 = 8 << 20;
/// Deliveries in one DELIVER push, at most.
pub const PUSH_MESSAGES_MAX: u32 = 4096;
/// Subscriptions one connection may hold.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 256;
/// A long poll waits at most this long.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;

pub(in crate::server) async fn fetch(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let req = Fetch::decode(&body)?;
    let conn = conn.clone();
    tokio::spawn(async move {
        let Some(room) = conn.room(req.max_bytes.min(DELIVERY_BYTES_MAX)).await else {
            return;
        };
        let frame = long_poll(&conn.broker, &h, &req).await;
        conn.send_in(frame, Some(room)).await;
        drop(permit);
    });
    Ok(())
}

pub(in crate::server) async fn subscribe(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let broker = &conn.broker;
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
        let e = BrokerError::from(Invalid::TooManySubscriptions {
            max: SUBSCRIPTIONS_PER_CONNECTION_MAX,
        });
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
    Ok(())
}

pub(in crate::server) async fn credit(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
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
    Ok(())
}

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
    name.strip_suffix(DLQ_SUFFIX)
        .is_some_and(|base| broker.topic(base).is_ok())
}

async fn long_poll(broker: &Arc<Broker>, h: &FrameHeader, req: &Fetch) -> Bytes {
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
