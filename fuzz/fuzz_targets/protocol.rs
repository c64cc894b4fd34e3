//! Arbitrary bytes as what a client sends: the frame decoder and every body
//! decoder must never panic, never allocate for a length they have not
//! seen, and whatever decodes must encode back to the same bytes.
#![no_main]

use bida::protocol::body::{self, AckRequest, ProduceReply, TopicDescription, TopicSummary};
use bida::protocol::{frame, txn};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A stream of frames, as the broker's reader cuts them.
    let mut rest = data;
    while let Ok(Some(h)) = frame::decode_header(rest) {
        let end = bida::protocol::FRAME_HEADER_LEN + h.body_len;
        let Some(body) = rest.get(bida::protocol::FRAME_HEADER_LEN..end) else {
            break;
        };
        let _ = decode_any(h.opcode, body);
        rest = &rest[end..];
    }
    // And the whole input as every body.
    for op in [
        frame::Opcode::Hello,
        frame::Opcode::CreateTopic,
        frame::Opcode::Produce,
        frame::Opcode::Fetch,
        frame::Opcode::Subscribe,
        frame::Opcode::Credit,
        frame::Opcode::Ack,
        frame::Opcode::DescribeTopic,
        frame::Opcode::Deliver,
        frame::Opcode::ListTopics,
        frame::Opcode::TxnRegister,
        frame::Opcode::TxnHalf,
        frame::Opcode::TxnEnd,
        frame::Opcode::TxnCheck,
        frame::Opcode::ProduceDelayed,
    ] {
        let _ = decode_any(op, data);
    }
});

fn encode_messages(messages: &[bida::log::Message<'_>], out: &mut Vec<u8>) {
    out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    for m in messages {
        body::encode_produce_message(m.id, m.key, m.headers, m.payload, out);
    }
}

/// Decodes `body` as `op`; what decodes must re-encode to the same bytes.
fn decode_any(op: frame::Opcode, body: &[u8]) -> Option<()> {
    use frame::Opcode::*;
    let mut out = Vec::new();
    match op {
        Hello => body::Hello::decode(body).ok()?.encode(&mut out),
        CreateTopic => body::CreateTopic::decode(body).ok()?.encode(&mut out),
        Produce => {
            let req = body::decode_produce(body).ok()?;
            let msgs: Vec<body::OutMessage> = req
                .messages
                .iter()
                .map(|m| body::OutMessage {
                    id: m.id,
                    key: m.key.map(|k| Bytes::copy_from_slice(k)),
                    headers: Bytes::copy_from_slice(m.headers),
                    payload: Bytes::copy_from_slice(m.payload),
                })
                .collect();
            body::encode_produce(req.topic, req.partition, &msgs, &mut out);
        }
        Fetch => body::Fetch::decode(body).ok()?.encode(&mut out),
        Subscribe => body::Subscribe::decode(body).ok()?.encode(&mut out),
        Credit => body::Credit::decode(body).ok()?.encode(&mut out),
        Ack => AckRequest::decode(body).ok()?.encode(&mut out),
        DescribeTopic => TopicDescription::decode(body).ok()?.encode(&mut out),
        ListTopics => TopicSummary::encode_list(&TopicSummary::decode_list(body).ok()?, &mut out),
        Deliver => {
            let _ = body::decode_deliveries(&Bytes::copy_from_slice(body));
            let _ = ProduceReply::decode(body);
            return Some(());
        }
        TxnRegister => txn::encode_register(txn::decode_register(body).ok()?, &mut out),
        TxnHalf => {
            let req = txn::decode_half(body).ok()?;
            txn::encode_half_prefix(
                req.group,
                req.txn_id,
                req.produce.topic,
                req.produce.partition,
                &mut out,
            );
            encode_messages(&req.produce.messages, &mut out);
        }
        ProduceDelayed => {
            let req = txn::decode_delayed(body).ok()?;
            txn::encode_delayed_prefix(
                req.produce.topic,
                req.produce.partition,
                req.delay_ms,
                &mut out,
            );
            encode_messages(&req.produce.messages, &mut out);
        }
        TxnEnd => {
            let (id, decision) = txn::decode_end(body).ok()?;
            txn::encode_end(id, decision, &mut out);
            let _ = txn::EndReply::decode(body);
        }
        TxnCheck => txn::Check::decode(body).ok()?.encode(&mut out),
        _ => return Some(()),
    }
    assert_eq!(out, body, "{op:?} did not round-trip");
    Some(())
}
