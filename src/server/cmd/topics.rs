//! CREATE_TOPIC, LIST_TOPICS, DESCRIBE_TOPIC, GROUP_POSITION.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::broker_error;
use crate::protocol::body::{self, GroupPartition, TopicSummary};
use crate::protocol::{FrameHeader, Opcode, Reader};
use crate::server::conn::{Conn, Fatal};

pub(super) async fn handle(
    conn: &Arc<Conn>,
    h: FrameHeader,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) -> Result<(), Fatal> {
    let broker = &conn.broker;
    let frame = match h.opcode {
        Opcode::CreateTopic => {
            let req = body::CreateTopic::decode(&body)?;
            // Creating a topic creates and syncs files: off the async
            // workers' hot path (see docs/ARCHITECTURE.md, "Threads").
            match tokio::task::block_in_place(|| broker.create_topic(&req)) {
                Ok(t) => conn.reply(&h, |o| t.summary().encode_one(o)),
                Err(e) => broker_error(&h, &e),
            }
        }
        Opcode::ListTopics => {
            // LIST_TOPICS has an empty body.
            Reader::new(&body).finish()?;
            let list = broker.list_topics();
            conn.reply(&h, |o| TopicSummary::encode_list(&list, o))
        }
        Opcode::DescribeTopic => {
            let name = body::decode_topic_name(&body)?;
            match broker.describe_topic(name) {
                Ok(d) => conn.reply(&h, |o| d.encode(o)),
                Err(e) => broker_error(&h, &e),
            }
        }
        Opcode::GroupPosition => {
            let (topic, group) = body::decode_group_position(&body)?;
            match broker.topic(topic) {
                Ok(t) => {
                    let positions = broker.positions(&t, group);
                    conn.reply(&h, |o| GroupPartition::encode_list(&positions, o))
                }
                Err(e) => broker_error(&h, &e),
            }
        }
        other => unreachable!("dispatch sends only topic requests here, not {other:?}"),
    };
    conn.send(frame).await;
    Ok(())
}
