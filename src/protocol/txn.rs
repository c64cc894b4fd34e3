//! Bodies of transactional (half) messages and delayed delivery, opcodes
//! 0x40..=0x44. Pure codecs; docs/PROTOCOL.md draws each one.
//!
//! ```text
//! TXN_REGISTER  0x40  str producer_group                 -> (empty)
//! TXN_HALF      0x41  str producer_group | u128 txn_id | str topic |
//!                     u32 partition | messages (as PRODUCE)
//!                                                        -> PRODUCE reply
//! TXN_END       0x42  u128 txn_id | u8 decision          -> u8 state |
//!                     u32 count | count x (str topic | u32 partition |
//!                     u64 offset)
//! TXN_CHECK     0x43  (push) str producer_group | u128 txn_id |
//!                     u32 check | str topic | u32 messages | u8 flags |
//!                     u16 key_len | key | u32 headers_len | headers
//! PRODUCE_DELAYED 0x44 str topic | u32 partition | u64 delay_ms |
//!                     messages (as PRODUCE)              -> PRODUCE reply
//! ```

use super::body::{
    decode_key, decode_key_flags, decode_messages, ProduceRequest, GROUP_NAME_MAX, MESSAGE_HAS_KEY,
    TOPIC_NAME_MAX,
};
use super::{Problem, Put, Reader, WireError};
use crate::log::record::Message;

/// Longest delay PRODUCE_DELAYED accepts: 90 days.
pub const DELAY_MS_MAX: u64 = 90 * 24 * 3600 * 1000;
/// Most messages one transaction may hold.
pub const TXN_MESSAGES_MAX: usize = 10_000;

/// What a producer says of a transaction in TXN_END.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Only as the answer to a TXN_CHECK: "ask me again later".
    Unknown = 0,
    Commit = 1,
    Rollback = 2,
}

impl Decision {
    /// Reads the one-byte decision at the reader's position.
    pub fn decode(r: &mut Reader<'_>) -> Result<Decision, WireError> {
        let offset = r.position();
        match r.u8()? {
            0 => Ok(Decision::Unknown),
            1 => Ok(Decision::Commit),
            2 => Ok(Decision::Rollback),
            v => Err(WireError::Malformed {
                field: "decision",
                offset,
                problem: Problem::NotOneOf {
                    expected: &[0, 1, 2],
                    found: u64::from(v),
                },
            }),
        }
    }
}

/// Where a transaction stands, in the TXN_END reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnState {
    /// Still undecided (the reply to an Unknown).
    Open = 0,
    Committed = 1,
    RolledBack = 2,
}

impl TxnState {
    /// Reads the one-byte state at the reader's position.
    pub fn decode(r: &mut Reader<'_>) -> Result<TxnState, WireError> {
        let offset = r.position();
        match r.u8()? {
            0 => Ok(TxnState::Open),
            1 => Ok(TxnState::Committed),
            2 => Ok(TxnState::RolledBack),
            v => Err(WireError::Malformed {
                field: "state",
                offset,
                problem: Problem::NotOneOf {
                    expected: &[0, 1, 2],
                    found: u64::from(v),
                },
            }),
        }
    }
}

pub fn encode_register(group: &str, out: &mut Vec<u8>) {
    out.put_str(group);
}

pub fn decode_register(body: &[u8]) -> Result<&str, WireError> {
    let mut r = Reader::new(body);
    let group = r.str("producer group", GROUP_NAME_MAX)?;
    r.finish()?;
    Ok(group)
}

/// TXN_HALF: the messages of one transaction bound for one partition.
#[derive(Debug)]
pub struct HalfRequest<'a> {
    pub group: &'a str,
    pub txn_id: u128,
    pub produce: ProduceRequest<'a>,
}

/// Encodes the fields before the messages; the caller appends `u32 count`
/// and the messages as in PRODUCE (`body::encode_produce_message`).
pub fn encode_half_prefix(
    group: &str,
    txn_id: u128,
    topic: &str,
    partition: u32,
    out: &mut Vec<u8>,
) {
    out.put_str(group);
    out.put_u128(txn_id);
    out.put_str(topic);
    out.put_u32(partition);
}

pub fn decode_half(body: &[u8]) -> Result<HalfRequest<'_>, WireError> {
    let mut r = Reader::new(body);
    let group = r.str("producer group", GROUP_NAME_MAX)?;
    let txn_id_at = r.position();
    let txn_id = r.u128()?;
    if txn_id == 0 {
        return Err(WireError::Malformed {
            field: "txn_id",
            offset: txn_id_at,
            problem: Problem::BelowMin { min: 1, found: 0 },
        });
    }
    let topic = r.str("topic", TOPIC_NAME_MAX)?;
    let partition = r.u32()?;
    let messages = decode_messages(&mut r)?;
    r.finish()?;
    Ok(HalfRequest {
        group,
        txn_id,
        produce: ProduceRequest {
            topic,
            partition,
            messages,
        },
    })
}

pub fn encode_end(txn_id: u128, decision: Decision, out: &mut Vec<u8>) {
    out.put_u128(txn_id);
    out.put_u8(decision as u8);
}

pub fn decode_end(body: &[u8]) -> Result<(u128, Decision), WireError> {
    let mut r = Reader::new(body);
    let txn_id = r.u128()?;
    let decision = Decision::decode(&mut r)?;
    r.finish()?;
    Ok((txn_id, decision))
}

/// Where one committed message landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

/// The TXN_END reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndReply {
    pub state: TxnState,
    /// For a commit: each message's place in its topic, in the order the
    /// halves were stored. Empty otherwise.
    pub placed: Vec<Placed>,
}

impl EndReply {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.state as u8);
        out.put_u32(self.placed.len() as u32);
        for p in &self.placed {
            out.put_str(&p.topic);
            out.put_u32(p.partition);
            out.put_u64(p.offset);
        }
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let state = TxnState::decode(&mut r)?;
        let n = r.count("placed messages", TXN_MESSAGES_MAX, 2 + 4 + 8)?;
        let mut placed = Vec::with_capacity(n);
        for _ in 0..n {
            placed.push(Placed {
                topic: r.str("topic", TOPIC_NAME_MAX)?.to_owned(),
                partition: r.u32()?,
                offset: r.u64()?,
            });
        }
        r.finish()?;
        Ok(EndReply { state, placed })
    }
}

/// TXN_CHECK: the broker asks a producer of the group for a decision. The
/// first message's key and headers let the producer find its local
/// transaction (e.g. by order id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub group: String,
    pub txn_id: u128,
    /// 1 for the first check of this transaction.
    pub check: u32,
    pub topic: String,
    pub messages: u32,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<u8>,
}

impl Check {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.group);
        out.put_u128(self.txn_id);
        out.put_u32(self.check);
        out.put_str(&self.topic);
        out.put_u32(self.messages);
        out.put_u8(if self.key.is_some() {
            MESSAGE_HAS_KEY
        } else {
            0
        });
        let key = self.key.as_deref().unwrap_or(&[]);
        // Checked at TXN_HALF: a stored key is at most 65535 bytes.
        assert!(key.len() <= usize::from(u16::MAX), "key over 65535 bytes");
        out.put_u16(key.len() as u16);
        out.put_bytes(key);
        out.put_u32(self.headers.len() as u32);
        out.put_bytes(&self.headers);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let group = r.str("producer group", GROUP_NAME_MAX)?.to_owned();
        let txn_id = r.u128()?;
        let check = r.u32()?;
        let topic = r.str("topic", TOPIC_NAME_MAX)?.to_owned();
        let messages = r.u32()?;
        let flags = decode_key_flags(&mut r, "flags")?;
        let key = decode_key(&mut r, flags)?.map(<[u8]>::to_vec);
        let headers_len = r.u32()? as usize;
        let headers = r.bytes(headers_len)?.to_vec();
        r.finish()?;
        Ok(Check {
            group,
            txn_id,
            check,
            topic,
            messages,
            key,
            headers,
        })
    }
}

/// PRODUCE_DELAYED: like PRODUCE, visible `delay_ms` after the broker
/// stores it.
#[derive(Debug)]
pub struct DelayedRequest<'a> {
    pub delay_ms: u64,
    pub produce: ProduceRequest<'a>,
}

/// Encodes the fields before the messages; the caller appends `u32 count`
/// and the messages as in PRODUCE.
pub fn encode_delayed_prefix(topic: &str, partition: u32, delay_ms: u64, out: &mut Vec<u8>) {
    out.put_str(topic);
    out.put_u32(partition);
    out.put_u64(delay_ms);
}

pub fn decode_delayed(body: &[u8]) -> Result<DelayedRequest<'_>, WireError> {
    let mut r = Reader::new(body);
    let topic = r.str("topic", TOPIC_NAME_MAX)?;
    let partition = r.u32()?;
    let delay_at = r.position();
    let delay_ms = r.u64()?;
    if delay_ms > DELAY_MS_MAX {
        return Err(WireError::Malformed {
            field: "delay_ms",
            offset: delay_at,
            problem: Problem::AboveMax {
                max: DELAY_MS_MAX,
                found: delay_ms,
            },
        });
    }
    let messages: Vec<Message<'_>> = decode_messages(&mut r)?;
    r.finish()?;
    Ok(DelayedRequest {
        delay_ms,
        produce: ProduceRequest {
            topic,
            partition,
            messages,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::InnerMsgId;
    use crate::protocol::body::encode_produce_message;

    fn messages(out: &mut Vec<u8>) {
        out.put_u32(2);
        encode_produce_message(InnerMsgId(7), Some(b"order-1"), b"", b"hello", out);
        encode_produce_message(InnerMsgId(8), None, b"", b"", out);
    }

    #[test]
    fn half_round_trips_and_rejects_txn_zero() {
        let mut b = Vec::new();
        encode_half_prefix("orders", 42, "t", 3, &mut b);
        messages(&mut b);
        let h = decode_half(&b).unwrap();
        assert_eq!(
            (h.group, h.txn_id, h.produce.topic, h.produce.partition),
            ("orders", 42, "t", 3)
        );
        assert_eq!(h.produce.messages.len(), 2);
        assert_eq!(h.produce.messages[0].key, Some(&b"order-1"[..]));
        let mut z = Vec::new();
        encode_half_prefix("orders", 0, "t", 3, &mut z);
        messages(&mut z);
        assert!(matches!(decode_half(&z), Err(WireError::Malformed { .. })));
        // Every truncation is an error, never a panic.
        for cut in 0..b.len() {
            assert!(decode_half(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn end_and_reply_round_trip() {
        let mut b = Vec::new();
        encode_end(9, Decision::Rollback, &mut b);
        assert_eq!(decode_end(&b).unwrap(), (9, Decision::Rollback));
        b[16] = 3;
        assert!(decode_end(&b).is_err());
        let reply = EndReply {
            state: TxnState::Committed,
            placed: vec![Placed {
                topic: "t".into(),
                partition: 1,
                offset: 99,
            }],
        };
        let mut b = Vec::new();
        reply.encode(&mut b);
        assert_eq!(EndReply::decode(&b).unwrap(), reply);
        b.push(0);
        assert!(EndReply::decode(&b).is_err());
    }

    #[test]
    fn check_round_trips() {
        let c = Check {
            group: "g".into(),
            txn_id: 5,
            check: 2,
            topic: "orders".into(),
            messages: 10,
            key: Some(b"k".to_vec()),
            headers: vec![],
        };
        let mut b = Vec::new();
        c.encode(&mut b);
        assert_eq!(Check::decode(&b).unwrap(), c);
        for cut in 0..b.len() {
            assert!(Check::decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn delayed_round_trips_and_bounds_the_delay() {
        let mut b = Vec::new();
        encode_delayed_prefix("t", u32::MAX, 1500, &mut b);
        messages(&mut b);
        let d = decode_delayed(&b).unwrap();
        assert_eq!(d.delay_ms, 1500);
        assert_eq!(d.produce.messages.len(), 2);
        let mut b = Vec::new();
        encode_delayed_prefix("t", 0, DELAY_MS_MAX + 1, &mut b);
        messages(&mut b);
        assert!(decode_delayed(&b).is_err());
    }
}
