//! Bodies of every operation. Pure codecs over [`Reader`] and [`Put`];
//! docs/PROTOCOL.md draws each one. Strings are `u16` length + UTF-8,
//! counts are `u32`, ids are 16 bytes little-endian.

use bytes::Bytes;

use super::{ErrorCode, KeyHash, Problem, Put, Reader, WireError};
use crate::log::record::{InnerMsgId, Message};

/// Longest topic name, in bytes.
pub const TOPIC_NAME_MAX: usize = 200;
/// Longest group name, in bytes.
pub const GROUP_NAME_MAX: usize = 200;
/// Longest client or server name in HELLO, and error message.
pub const TEXT_MAX: usize = 4096;
/// Most messages in one PRODUCE.
pub const PRODUCE_MESSAGES_MAX: usize = 100_000;
/// Most entries in one ACK or NACK.
pub const ACK_ENTRIES_MAX: usize = 100_000;
/// Most partitions a topic may have on the wire (a broker creates at most
/// its `partitions_max`, 10,000 by default).
pub const PARTITIONS_MAX: u32 = 100_000;
/// Most topics or groups listed in one reply.
pub const LIST_MAX: usize = 100_000;
/// `partition` value meaning "any partition".
pub const ANY_PARTITION: u32 = u32::MAX;
/// `delay_ms` value in NACK meaning "use the group's backoff".
pub const NACK_DEFAULT_DELAY: u32 = u32::MAX;

/// Message flag: a key (biz-id) follows.
pub const MESSAGE_HAS_KEY: u8 = 0b1;

// ---------------------------------------------------------------- HELLO

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u8,
    pub version_max: u8,
    pub client: String,
    /// The access token, for a broker that requires one. Sent as a
    /// trailing `str`; absent when the body ends after `client`.
    pub token: Option<String>,
}

/// Longest token in HELLO.
pub const TOKEN_MAX: usize = 256;

impl Hello {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.version_min);
        out.put_u8(self.version_max);
        out.put_str(&self.client);
        if let Some(t) = &self.token {
            out.put_str(t);
        }
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let mut h = Hello {
            version_min: r.u8()?,
            version_max: r.u8()?,
            client: r.str("client name", TEXT_MAX)?.to_owned(),
            token: None,
        };
        if r.remaining() > 0 {
            h.token = Some(r.str("token", TOKEN_MAX)?.to_owned());
        }
        r.finish()?;
        Ok(h)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u8,
    pub frame_bytes_max: u32,
    /// Requests a connection may have in flight before the broker stops
    /// reading from it.
    pub inflight_max: u32,
    pub server: String,
}

impl HelloReply {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.version);
        out.put_u32(self.frame_bytes_max);
        out.put_u32(self.inflight_max);
        out.put_str(&self.server);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let h = HelloReply {
            version: r.u8()?,
            frame_bytes_max: r.u32()?,
            inflight_max: r.u32()?,
            server: r.str("server name", TEXT_MAX)?.to_owned(),
        };
        r.finish()?;
        Ok(h)
    }
}

// ---------------------------------------------------------------- ERROR

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    /// The raw code; unknown codes are kept so newer brokers stay readable.
    pub code: u16,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > TEXT_MAX {
            let mut cut = TEXT_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        ErrorBody {
            code: code as u16,
            message,
        }
    }
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u16(self.code);
        out.put_str(&self.message);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let e = ErrorBody {
            code: r.u16()?,
            message: r.str("error message", TEXT_MAX)?.to_owned(),
        };
        r.finish()?;
        Ok(e)
    }
}

// ---------------------------------------------------------------- topics

/// Redelivery delays. On the wire: `u8 kind` (0 = broker default, 1 =
/// fixed, 2 = exponential), `u32 base_ms`, `u32 max_ms`, `u16
/// factor_percent` (200 = doubling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// Every redelivery waits `delay_ms`.
    Fixed { delay_ms: u32 },
    /// Redelivery `n` (1-based) waits `min(max_ms, base_ms * (factor_percent/100)^(n-1))`.
    Exponential {
        base_ms: u32,
        max_ms: u32,
        factor_percent: u16,
    },
}

impl Backoff {
    /// The delay before redelivery number `n` (1 = the first redelivery).
    pub fn delay_ms(&self, n: u32) -> u64 {
        match *self {
            Backoff::Fixed { delay_ms } => delay_ms as u64,
            Backoff::Exponential {
                base_ms,
                max_ms,
                factor_percent,
            } => {
                let mut d = base_ms as f64;
                let f = factor_percent as f64 / 100.0;
                for _ in 1..n.min(64) {
                    d *= f;
                    if d >= max_ms as f64 {
                        break;
                    }
                }
                (d.min(max_ms as f64)) as u64
            }
        }
    }
}

/// Per-topic consumer settings. Zero fields (and `backoff: None`) mean "the
/// broker's default" on the wire; replies carry resolved values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TopicConfig {
    pub ack_timeout_ms: u32,
    pub max_deliveries: u16,
    pub backoff: Option<Backoff>,
    /// Also delete a sealed segment once every group reading the topic has
    /// committed past it ("retention once consumed"), beside the broker's
    /// time and size limits. Wire: `u8` 0 or 1.
    pub retention_consumed: bool,
}

impl TopicConfig {
    pub const WIRE_LEN: usize = 4 + 2 + 1 + 4 + 4 + 2 + 1;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.ack_timeout_ms);
        out.put_u16(self.max_deliveries);
        match self.backoff {
            None => {
                out.put_u8(0);
                out.put_u32(0);
                out.put_u32(0);
                out.put_u16(0);
            }
            Some(Backoff::Fixed { delay_ms }) => {
                out.put_u8(1);
                out.put_u32(delay_ms);
                out.put_u32(delay_ms);
                out.put_u16(100);
            }
            Some(Backoff::Exponential {
                base_ms,
                max_ms,
                factor_percent,
            }) => {
                out.put_u8(2);
                out.put_u32(base_ms);
                out.put_u32(max_ms);
                out.put_u16(factor_percent);
            }
        }
        out.put_u8(u8::from(self.retention_consumed));
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let ack_timeout_ms = r.u32()?;
        let max_deliveries = r.u16()?;
        let kind = r.u8()?;
        let base_ms = r.u32()?;
        let max_ms = r.u32()?;
        let factor_percent = r.u16()?;
        // Fields a kind does not use must hold what `encode` writes, so a
        // config has exactly one encoding.
        let backoff = match kind {
            0 if (base_ms, max_ms, factor_percent) == (0, 0, 0) => None,
            1 if max_ms == base_ms && factor_percent == 100 => {
                Some(Backoff::Fixed { delay_ms: base_ms })
            }
            0 => {
                // No backoff: every parameter is 0.
                let (field, found) = if base_ms != 0 {
                    ("backoff base_ms", u64::from(base_ms))
                } else if max_ms != 0 {
                    ("backoff max_ms", u64::from(max_ms))
                } else {
                    ("backoff factor_percent", u64::from(factor_percent))
                };
                return Err(WireError::InvalidValue {
                    field,
                    problem: Problem::NotEqual { expected: 0, found },
                });
            }
            1 => {
                // Fixed: max_ms = base_ms and factor_percent = 100.
                let (field, expected, found) = if max_ms != base_ms {
                    ("backoff max_ms", u64::from(base_ms), u64::from(max_ms))
                } else {
                    ("backoff factor_percent", 100, u64::from(factor_percent))
                };
                return Err(WireError::InvalidValue {
                    field,
                    problem: Problem::NotEqual { expected, found },
                });
            }
            2 => {
                if factor_percent < 100 {
                    return Err(WireError::InvalidValue {
                        field: "backoff factor_percent",
                        problem: Problem::BelowMin {
                            min: 100,
                            found: u64::from(factor_percent),
                        },
                    });
                }
                if max_ms < base_ms {
                    return Err(WireError::InvalidValue {
                        field: "backoff max_ms",
                        problem: Problem::BelowMin {
                            min: u64::from(base_ms),
                            found: u64::from(max_ms),
                        },
                    });
                }
                Some(Backoff::Exponential {
                    base_ms,
                    max_ms,
                    factor_percent,
                })
            }
            k => {
                return Err(WireError::InvalidValue {
                    field: "backoff kind",
                    problem: Problem::NotOneOf {
                        expected: &[0, 1, 2],
                        found: u64::from(k),
                    },
                })
            }
        };
        let retention = r.u8()?;
        if retention > 1 {
            return Err(WireError::InvalidValue {
                field: "retention_consumed",
                problem: Problem::NotOneOf {
                    expected: &[0, 1],
                    found: u64::from(retention),
                },
            });
        }
        Ok(TopicConfig {
            ack_timeout_ms,
            max_deliveries,
            backoff,
            retention_consumed: retention == 1,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateTopic {
    pub topic: String,
    pub partitions: u32,
    /// Succeed (with the existing topic) if it exists already.
    pub if_not_exists: bool,
    pub config: TopicConfig,
}

impl CreateTopic {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.topic);
        out.put_u32(self.partitions);
        out.put_u8(self.if_not_exists as u8);
        self.config.encode(out);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let c = CreateTopic {
            topic: r.str("topic", TOPIC_NAME_MAX)?.to_owned(),
            partitions: r.u32()?,
            if_not_exists: match r.u8()? {
                0 => false,
                1 => true,
                v => {
                    return Err(WireError::InvalidValue {
                        field: "if_not_exists",
                        problem: Problem::NotOneOf {
                            expected: &[0, 1],
                            found: u64::from(v),
                        },
                    })
                }
            },
            config: TopicConfig::decode(&mut r)?,
        };
        r.finish()?;
        Ok(c)
    }
}

/// A topic as listed: name, partitions, resolved config, and the hash
/// that maps its keys to partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSummary {
    pub topic: String,
    pub partitions: u32,
    pub config: TopicConfig,
    pub key_hash: KeyHash,
}

impl TopicSummary {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.topic);
        out.put_u32(self.partitions);
        self.config.encode(out);
        out.put_u8(self.key_hash.wire());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let topic = r.str("topic", TOPIC_NAME_MAX)?.to_owned();
        let partitions = r.u32()?;
        let config = TopicConfig::decode(r)?;
        let byte = r.u8()?;
        let key_hash = KeyHash::from_wire(byte).ok_or(WireError::InvalidValue {
            field: "key_hash",
            problem: Problem::NotOneOf {
                expected: &[0, 1],
                found: u64::from(byte),
            },
        })?;
        Ok(TopicSummary {
            topic,
            partitions,
            config,
            key_hash,
        })
    }

    /// The reply to CREATE_TOPIC.
    pub fn encode_one(&self, out: &mut Vec<u8>) {
        self.encode(out)
    }
    pub fn decode_one(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let t = Self::decode(&mut r)?;
        r.finish()?;
        Ok(t)
    }

    /// The reply to LIST_TOPICS: `u32 count` then each topic.
    pub fn encode_list(list: &[TopicSummary], out: &mut Vec<u8>) {
        out.put_u32(list.len() as u32);
        for t in list {
            t.encode(out);
        }
    }
    pub fn decode_list(body: &[u8]) -> Result<Vec<Self>, WireError> {
        let mut r = Reader::new(body);
        let n = r.count("topics", LIST_MAX, 2 + 4 + TopicConfig::WIRE_LEN + 1)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(Self::decode(&mut r)?);
        }
        r.finish()?;
        Ok(out)
    }
}

/// A body that is only a topic name (DESCRIBE_TOPIC).
pub fn encode_topic_name(topic: &str, out: &mut Vec<u8>) {
    out.put_str(topic);
}
pub fn decode_topic_name(body: &[u8]) -> Result<&str, WireError> {
    let mut r = Reader::new(body);
    let t = r.str("topic", TOPIC_NAME_MAX)?;
    r.finish()?;
    Ok(t)
}

/// One partition of a group: `u64 committed` (every offset below is
/// acked), `u64 next` (next never-delivered offset), `u64 end` (the
/// partition's next offset), `u32 in_flight` (delivered, not yet acked).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GroupPartition {
    pub committed: u64,
    pub next: u64,
    pub end: u64,
    pub in_flight: u32,
}

impl GroupPartition {
    pub const WIRE_LEN: usize = 8 + 8 + 8 + 4;
    /// Messages the group has yet to ack.
    pub fn lag(&self) -> u64 {
        self.end.saturating_sub(self.committed)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.committed);
        out.put_u64(self.next);
        out.put_u64(self.end);
        out.put_u32(self.in_flight);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(GroupPartition {
            committed: r.u64()?,
            next: r.u64()?,
            end: r.u64()?,
            in_flight: r.u32()?,
        })
    }
    /// The reply to GROUP_POSITION: `u32 count` then each partition.
    pub fn encode_list(list: &[GroupPartition], out: &mut Vec<u8>) {
        out.put_u32(list.len() as u32);
        for p in list {
            p.encode(out);
        }
    }
    pub fn decode_list(body: &[u8]) -> Result<Vec<Self>, WireError> {
        let mut r = Reader::new(body);
        let list = Self::decode_list_from(&mut r)?;
        r.finish()?;
        Ok(list)
    }
    fn decode_list_from(r: &mut Reader<'_>) -> Result<Vec<Self>, WireError> {
        let n = r.count("partitions", PARTITIONS_MAX as usize, Self::WIRE_LEN)?;
        (0..n).map(|_| Self::decode(r)).collect()
    }
}

/// A partition's log: `u64 start`, `u64 end`, `u64 durable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PartitionInfo {
    pub start: u64,
    pub end: u64,
    pub durable: u64,
}

/// The reply to DESCRIBE_TOPIC: the summary, `u32 count` partitions, then
/// `u32 count` groups, each `str name` + a GROUP_POSITION list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    pub summary: TopicSummary,
    pub partitions: Vec<PartitionInfo>,
    pub groups: Vec<(String, Vec<GroupPartition>)>,
}

impl TopicDescription {
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.summary.encode(out);
        out.put_u32(self.partitions.len() as u32);
        for p in &self.partitions {
            out.put_u64(p.start);
            out.put_u64(p.end);
            out.put_u64(p.durable);
        }
        out.put_u32(self.groups.len() as u32);
        for (name, parts) in &self.groups {
            out.put_str(name);
            GroupPartition::encode_list(parts, out);
        }
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let summary = TopicSummary::decode(&mut r)?;
        let n = r.count("partitions", PARTITIONS_MAX as usize, 24)?;
        let mut partitions = Vec::with_capacity(n);
        for _ in 0..n {
            partitions.push(PartitionInfo {
                start: r.u64()?,
                end: r.u64()?,
                durable: r.u64()?,
            });
        }
        let n = r.count("groups", LIST_MAX, 2 + 4)?;
        let mut groups = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.str("group", GROUP_NAME_MAX)?.to_owned();
            groups.push((name, GroupPartition::decode_list_from(&mut r)?));
        }
        r.finish()?;
        Ok(TopicDescription {
            summary,
            partitions,
            groups,
        })
    }
}

// ---------------------------------------------------------------- PRODUCE

/// A message as a client sends it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutMessage {
    pub id: InnerMsgId,
    pub key: Option<Bytes>,
    /// An encoded header block (docs/FORMAT.md), possibly empty.
    pub headers: Bytes,
    pub payload: Bytes,
}

impl OutMessage {
    /// Bytes this message takes in a PRODUCE body.
    pub fn wire_len(&self) -> usize {
        1 + 16
            + 2
            + self.key.as_ref().map_or(0, |k| k.len())
            + 4
            + self.headers.len()
            + 4
            + self.payload.len()
    }
}

/// Encodes a PRODUCE body: `str topic`, `u32 partition` (ANY_PARTITION:
/// the broker picks), `u32 count`, then per message `u8 flags`, `u128 id`,
/// `u16 key_len`, key, `u32 headers_len`, headers, `u32 payload_len`,
/// payload.
pub fn encode_produce(topic: &str, partition: u32, messages: &[OutMessage], out: &mut Vec<u8>) {
    out.put_str(topic);
    out.put_u32(partition);
    out.put_u32(messages.len() as u32);
    for m in messages {
        encode_produce_message(m.id, m.key.as_deref(), &m.headers, &m.payload, out);
    }
}

/// One message of a PRODUCE body.
///
/// # Panics
/// On a key over 65535 bytes or headers/payload over 4 GiB: the client
/// checks sizes first.
pub fn encode_produce_message(
    id: InnerMsgId,
    key: Option<&[u8]>,
    headers: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    out.put_u8(if key.is_some() { MESSAGE_HAS_KEY } else { 0 });
    out.put_u128(id.0);
    let key = key.unwrap_or(&[]);
    assert!(key.len() <= usize::from(u16::MAX), "key over 65535 bytes");
    assert!(u32::try_from(headers.len()).is_ok(), "headers over 4 GiB");
    assert!(u32::try_from(payload.len()).is_ok(), "payload over 4 GiB");
    out.put_u16(key.len() as u16);
    out.put_bytes(key);
    out.put_u32(headers.len() as u32);
    out.put_bytes(headers);
    out.put_u32(payload.len() as u32);
    out.put_bytes(payload);
}

/// A decoded PRODUCE whose messages borrow from the frame.
#[derive(Debug)]
pub struct ProduceRequest<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub messages: Vec<Message<'a>>,
}

const PRODUCE_MESSAGE_MIN: usize = 1 + 16 + 2 + 4 + 4;

pub fn decode_produce(body: &[u8]) -> Result<ProduceRequest<'_>, WireError> {
    let mut r = Reader::new(body);
    let topic = r.str("topic", TOPIC_NAME_MAX)?;
    let partition = r.u32()?;
    let messages = decode_messages(&mut r)?;
    r.finish()?;
    Ok(ProduceRequest {
        topic,
        partition,
        messages,
    })
}

/// `u32 count`, then the messages of a PRODUCE body; shared by every
/// request that carries messages (PRODUCE, PRODUCE_DELAYED, TXN_HALF).
pub fn decode_messages<'a>(r: &mut Reader<'a>) -> Result<Vec<Message<'a>>, WireError> {
    let n = r.count("messages", PRODUCE_MESSAGES_MAX, PRODUCE_MESSAGE_MIN)?;
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        let flags = decode_key_flags(r, "message flags")?;
        let id = InnerMsgId(r.u128()?);
        let key = decode_key(r, flags)?;
        let headers_len = r.u32()? as usize;
        let headers = r.bytes(headers_len)?;
        let payload_len = r.u32()? as usize;
        let payload = r.bytes(payload_len)?;
        messages.push(Message {
            id,
            key,
            headers,
            payload,
        });
    }
    Ok(messages)
}

/// A flags byte whose only defined bit is [`MESSAGE_HAS_KEY`] (a message
/// of PRODUCE, a TXN_CHECK); `field` names it in the error.
pub(super) fn decode_key_flags(r: &mut Reader<'_>, field: &'static str) -> Result<u8, WireError> {
    let offset = r.position();
    let flags = r.u8()?;
    if flags & !MESSAGE_HAS_KEY != 0 {
        return Err(WireError::Malformed {
            field,
            offset,
            problem: Problem::UnknownBits {
                known: u64::from(MESSAGE_HAS_KEY),
                found: u64::from(flags),
            },
        });
    }
    Ok(flags)
}

/// `u16 key_len` and the key bytes, the key only if `flags` has
/// [`MESSAGE_HAS_KEY`]; key bytes without the flag are malformed.
pub(super) fn decode_key<'a>(r: &mut Reader<'a>, flags: u8) -> Result<Option<&'a [u8]>, WireError> {
    let offset = r.position();
    let key_len = r.u16()? as usize;
    let key = r.bytes(key_len)?;
    if flags & MESSAGE_HAS_KEY == 0 && key_len != 0 {
        return Err(WireError::Malformed {
            field: "key_len",
            offset,
            problem: Problem::NotEqual {
                expected: 0,
                found: key_len as u64,
            },
        });
    }
    Ok((flags & MESSAGE_HAS_KEY != 0).then_some(key))
}

/// The fate of one produced message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProduceOutcome {
    pub offset: u64,
    /// The inner-msg-id was already stored; `offset` is the first copy's.
    pub duplicate: bool,
}

/// The reply to PRODUCE: `u32 partition`, `u32 count`, then per message
/// `u64 offset`, `u8 duplicate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceReply {
    pub partition: u32,
    pub outcomes: Vec<ProduceOutcome>,
}

impl ProduceReply {
    pub fn encode_from(
        partition: u32,
        outcomes: impl ExactSizeIterator<Item = ProduceOutcome>,
        out: &mut Vec<u8>,
    ) {
        out.put_u32(partition);
        out.put_u32(outcomes.len() as u32);
        for o in outcomes {
            out.put_u64(o.offset);
            out.put_u8(o.duplicate as u8);
        }
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let partition = r.u32()?;
        let n = r.count("outcomes", PRODUCE_MESSAGES_MAX, 9)?;
        let mut outcomes = Vec::with_capacity(n);
        for _ in 0..n {
            outcomes.push(ProduceOutcome {
                offset: r.u64()?,
                duplicate: r.u8()? != 0,
            });
        }
        r.finish()?;
        Ok(ProduceReply {
            partition,
            outcomes,
        })
    }
}

// ---------------------------------------------------------------- FETCH, deliveries

/// FETCH: `str topic`, `u32 partition` (ANY_PARTITION: any), `str group`,
/// `u32 max_messages`, `u32 max_bytes`, `u32 max_wait_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub topic: String,
    pub partition: u32,
    pub group: String,
    pub max_messages: u32,
    pub max_bytes: u32,
    pub max_wait_ms: u32,
}

impl Fetch {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.topic);
        out.put_u32(self.partition);
        out.put_str(&self.group);
        out.put_u32(self.max_messages);
        out.put_u32(self.max_bytes);
        out.put_u32(self.max_wait_ms);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let f = Fetch {
            topic: r.str("topic", TOPIC_NAME_MAX)?.to_owned(),
            partition: r.u32()?,
            group: r.str("group", GROUP_NAME_MAX)?.to_owned(),
            max_messages: r.u32()?,
            max_bytes: r.u32()?,
            max_wait_ms: r.u32()?,
        };
        r.finish()?;
        Ok(f)
    }
}

/// A message delivered to a consumer. Its parts are zero-copy slices of the
/// frame it arrived in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub partition: u32,
    pub offset: u64,
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub attempt: u16,
    pub timestamp_ms: u64,
    pub id: InnerMsgId,
    pub key: Option<Bytes>,
    pub headers: Bytes,
    pub payload: Bytes,
}

/// Bytes of a delivery before its key, headers and payload.
pub const DELIVERY_FIXED_LEN: usize = 4 + 8 + 2 + 8 + 16 + 1 + 2 + 4 + 4;

/// Appends one delivery to a deliveries body under construction (the
/// caller writes the `u32 count` first and patches it).
#[allow(clippy::too_many_arguments)]
pub fn encode_delivery(
    out: &mut Vec<u8>,
    partition: u32,
    offset: u64,
    attempt: u16,
    timestamp_ms: u64,
    id: InnerMsgId,
    key: Option<&[u8]>,
    headers: &[u8],
    payload: &[u8],
) {
    out.put_u32(partition);
    out.put_u64(offset);
    out.put_u16(attempt);
    out.put_u64(timestamp_ms);
    out.put_u128(id.0);
    out.put_u8(if key.is_some() { MESSAGE_HAS_KEY } else { 0 });
    let key = key.unwrap_or(&[]);
    out.put_u16(key.len() as u16);
    out.put_bytes(key);
    out.put_u32(headers.len() as u32);
    out.put_bytes(headers);
    out.put_u32(payload.len() as u32);
    out.put_bytes(payload);
}

/// Decodes a deliveries body (the reply to FETCH, and DELIVER pushes):
/// `u32 count`, then per delivery `u32 partition`, `u64 offset`, `u16
/// attempt`, `u64 timestamp_ms`, `u128 id`, `u8 flags`, `u16 key_len`, key,
/// `u32 headers_len`, headers, `u32 payload_len`, payload.
pub fn decode_deliveries(body: &Bytes) -> Result<Vec<Delivery>, WireError> {
    let mut r = Reader::new(body);
    let n = r.count("deliveries", usize::MAX, DELIVERY_FIXED_LEN)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let partition = r.u32()?;
        let offset = r.u64()?;
        let attempt = r.u16()?;
        let timestamp_ms = r.u64()?;
        let id = InnerMsgId(r.u128()?);
        let flags = r.u8()?;
        let key_len = r.u16()? as usize;
        let at = r.position();
        r.bytes(key_len)?;
        let key = (flags & MESSAGE_HAS_KEY != 0).then(|| body.slice(at..at + key_len));
        let headers_len = r.u32()? as usize;
        let at = r.position();
        r.bytes(headers_len)?;
        let headers = body.slice(at..at + headers_len);
        let payload_len = r.u32()? as usize;
        let at = r.position();
        r.bytes(payload_len)?;
        let payload = body.slice(at..at + payload_len);
        out.push(Delivery {
            partition,
            offset,
            attempt,
            timestamp_ms,
            id,
            key,
            headers,
            payload,
        });
    }
    r.finish()?;
    Ok(out)
}

// ---------------------------------------------------------------- SUBSCRIBE, CREDIT

/// SUBSCRIBE: `str topic`, `str group`, `u32 credit`. The reply is empty;
/// deliveries then arrive as DELIVER pushes carrying this request's
/// correlation id, which also names the subscription in CREDIT and
/// UNSUBSCRIBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub topic: String,
    pub group: String,
    pub credit: u32,
}

impl Subscribe {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.topic);
        out.put_str(&self.group);
        out.put_u32(self.credit);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let s = Subscribe {
            topic: r.str("topic", TOPIC_NAME_MAX)?.to_owned(),
            group: r.str("group", GROUP_NAME_MAX)?.to_owned(),
            credit: r.u32()?,
        };
        r.finish()?;
        Ok(s)
    }
}

/// CREDIT: `u64 subscription`, `u32 credit` (added to what is left).
/// UNSUBSCRIBE: `u64 subscription`, `u32 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    pub subscription: u64,
    pub credit: u32,
}

impl Credit {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.subscription);
        out.put_u32(self.credit);
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let c = Credit {
            subscription: r.u64()?,
            credit: r.u32()?,
        };
        r.finish()?;
        Ok(c)
    }
}

// ---------------------------------------------------------------- ACK, NACK

/// ACK and NACK: `str topic`, `str group`, `u32 delay_ms` (NACK only
/// honours it; NACK_DEFAULT_DELAY = the group's backoff; ACK sends 0), `u32
/// count`, then per entry `u32 partition`, `u64 offset`. The reply is `u32`:
/// how many entries were in flight (the others were acked already or never
/// delivered, and are ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckRequest {
    pub topic: String,
    pub group: String,
    pub delay_ms: u32,
    pub entries: Vec<(u32, u64)>,
}

impl AckRequest {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.topic);
        out.put_str(&self.group);
        out.put_u32(self.delay_ms);
        out.put_u32(self.entries.len() as u32);
        for &(p, o) in &self.entries {
            out.put_u32(p);
            out.put_u64(o);
        }
    }
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let topic = r.str("topic", TOPIC_NAME_MAX)?.to_owned();
        let group = r.str("group", GROUP_NAME_MAX)?.to_owned();
        let delay_ms = r.u32()?;
        let n = r.count("entries", ACK_ENTRIES_MAX, 12)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push((r.u32()?, r.u64()?));
        }
        r.finish()?;
        Ok(AckRequest {
            topic,
            group,
            delay_ms,
            entries,
        })
    }
}

/// GROUP_POSITION: `str topic`, `str group`.
pub fn encode_group_position(topic: &str, group: &str, out: &mut Vec<u8>) {
    out.put_str(topic);
    out.put_str(group);
}
pub fn decode_group_position(body: &[u8]) -> Result<(&str, &str), WireError> {
    let mut r = Reader::new(body);
    let t = r.str("topic", TOPIC_NAME_MAX)?;
    let g = r.str("group", GROUP_NAME_MAX)?;
    r.finish()?;
    Ok((t, g))
}

/// A `u32` body (replies to ACK and NACK).
pub fn encode_u32(v: u32, out: &mut Vec<u8>) {
    out.put_u32(v);
}
pub fn decode_u32(body: &[u8]) -> Result<u32, WireError> {
    let mut r = Reader::new(body);
    let v = r.u32()?;
    r.finish()?;
    Ok(v)
}

/// Why a topic or group name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} name must be 1..={max} bytes, got {len}")]
    Length {
        what: &'static str,
        max: usize,
        len: usize,
    },
    #[error("{what} name {name:?} may not start with '_' or '.'")]
    Reserved { what: &'static str, name: String },
    #[error("{what} name {name:?} contains {found:?}; allowed: A-Z a-z 0-9 . _ -")]
    Character {
        what: &'static str,
        name: String,
        found: char,
    },
}

/// Topic and group names: 1..=200 bytes of `[A-Za-z0-9._-]`, not starting
/// with `_` or `.` (reserved for the broker). `what` is `"topic"` or
/// `"group"`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let max = if what == "group" {
        GROUP_NAME_MAX
    } else {
        TOPIC_NAME_MAX
    };
    if name.is_empty() || name.len() > max {
        return Err(NameError::Length {
            what,
            max,
            len: name.len(),
        });
    }
    if name.starts_with(['_', '.']) {
        return Err(NameError::Reserved {
            what,
            name: name.to_owned(),
        });
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::Character {
            what,
            name: name.to_owned(),
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn produce_round_trip() {
        let msgs = vec![
            OutMessage {
                id: InnerMsgId(7),
                key: Some(Bytes::from_static(b"order-1")),
                headers: Bytes::from(crate::log::record::encode_headers(&[(b"a", b"b")]).unwrap()),
                payload: Bytes::from_static(b"hello"),
            },
            OutMessage {
                id: InnerMsgId(u128::MAX),
                key: None,
                headers: Bytes::new(),
                payload: Bytes::new(),
            },
        ];
        let mut body = Vec::new();
        encode_produce("orders", 3, &msgs, &mut body);
        assert_eq!(
            body.len(),
            2 + 6 + 4 + 4 + msgs.iter().map(|m| m.wire_len()).sum::<usize>()
        );
        let req = decode_produce(&body).unwrap();
        assert_eq!(
            (req.topic, req.partition, req.messages.len()),
            ("orders", 3, 2)
        );
        assert_eq!(req.messages[0].key, Some(&b"order-1"[..]));
        assert_eq!(req.messages[0].payload, b"hello");
        assert_eq!(req.messages[1].key, None);
        assert_eq!(req.messages[1].id, InnerMsgId(u128::MAX));
    }

    #[test]
    fn deliveries_round_trip() {
        let mut body = vec![0; 4];
        encode_delivery(
            &mut body,
            2,
            99,
            3,
            1234,
            InnerMsgId(5),
            Some(b"k"),
            b"",
            b"payload",
        );
        encode_delivery(&mut body, 0, 100, 1, 1235, InnerMsgId(6), None, b"", b"");
        body[..4].copy_from_slice(&2u32.to_le_bytes());
        let d = decode_deliveries(&Bytes::from(body)).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].partition, d[0].offset, d[0].attempt), (2, 99, 3));
        assert_eq!(d[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(&d[0].payload[..], b"payload");
        assert_eq!(d[1].key, None);
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut body = Vec::new();
        body.put_str("t");
        body.put_u32(0);
        body.put_u32(PRODUCE_MESSAGES_MAX as u32);
        assert!(matches!(
            decode_produce(&body),
            Err(WireError::UnexpectedEof { .. })
        ));
        let mut body = Vec::new();
        body.put_u32(u32::MAX);
        assert!(decode_deliveries(&Bytes::from(body)).is_err());
    }

    /// Found by the protocol fuzzer: every field has exactly one encoding,
    /// so what decodes re-encodes to the same bytes.
    #[test]
    fn flags_and_unused_fields_must_be_canonical() {
        let mut b = Vec::new();
        CreateTopic {
            topic: "t".into(),
            partitions: 1,
            if_not_exists: true,
            config: TopicConfig::default(),
        }
        .encode(&mut b);
        assert!(CreateTopic::decode(&b).is_ok());
        let flag_at = 2 + 1 + 4;
        b[flag_at] = 92;
        assert!(CreateTopic::decode(&b).is_err());
        b[flag_at] = 1;
        let base_ms_at = flag_at + 1 + 4 + 2 + 1;
        b[base_ms_at] = 5; // kind 0 (default) with a non-zero base_ms
        assert!(CreateTopic::decode(&b).is_err());
    }

    #[test]
    fn backoff_delays() {
        let e = Backoff::Exponential {
            base_ms: 100,
            max_ms: 1000,
            factor_percent: 200,
        };
        assert_eq!(
            (e.delay_ms(1), e.delay_ms(2), e.delay_ms(3), e.delay_ms(5)),
            (100, 200, 400, 1000)
        );
        assert_eq!(e.delay_ms(1000), 1000);
        assert_eq!(Backoff::Fixed { delay_ms: 50 }.delay_ms(9), 50);
    }

    #[test]
    fn names() {
        assert!(check_name("topic", "orders.eu-1_x").is_ok());
        assert!(check_name("topic", "").is_err());
        assert!(check_name("topic", "_groups").is_err());
        assert!(check_name("topic", "a/b").is_err());
        assert!(check_name("topic", &"x".repeat(201)).is_err());
    }

    proptest! {
        /// No body decoder panics on arbitrary bytes.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_produce(&bytes);
            let _ = decode_deliveries(&Bytes::from(bytes.clone()));
            let _ = Fetch::decode(&bytes);
            let _ = AckRequest::decode(&bytes);
            let _ = CreateTopic::decode(&bytes);
            let _ = TopicDescription::decode(&bytes);
            let _ = TopicSummary::decode_list(&bytes);
            let _ = ProduceReply::decode(&bytes);
            let _ = Hello::decode(&bytes);
            let _ = super::super::frame::decode_header(&bytes);
            let _ = super::super::txn::decode_half(&bytes);
            let _ = super::super::txn::decode_delayed(&bytes);
            let _ = super::super::txn::decode_end(&bytes);
            let _ = super::super::txn::EndReply::decode(&bytes);
            let _ = super::super::txn::Check::decode(&bytes);
        }
    }

    #[test]
    fn malformed_message_names_field_and_offset() {
        let mut body = Vec::new();
        body.put_str("t");
        body.put_u32(0);
        body.put_u32(1);
        let flags_at = body.len();
        encode_produce_message(InnerMsgId(7), None, b"", b"x", &mut body);
        body[flags_at] = 0x03;
        let e = decode_produce(&body).unwrap_err();
        assert_eq!(
            e,
            WireError::Malformed {
                field: "message flags",
                offset: flags_at,
                problem: Problem::UnknownBits {
                    known: u64::from(MESSAGE_HAS_KEY),
                    found: 3,
                },
            }
        );
        assert_eq!(e.code(), ErrorCode::MalformedFrame);
        // Trailing bytes name where the body should have ended.
        let mut long = body.clone();
        long[flags_at] = 0;
        long.push(0);
        assert_eq!(
            decode_produce(&long).unwrap_err(),
            WireError::Malformed {
                field: "end of body",
                offset: long.len() - 1,
                problem: Problem::NotEqual {
                    expected: (long.len() - 1) as u64,
                    found: long.len() as u64,
                },
            }
        );
    }
}

#[cfg(test)]
mod hello_token {
    use super::*;

    #[test]
    fn the_token_is_an_optional_trailing_string() {
        for token in [None, Some("s3cret".to_owned())] {
            let h = Hello {
                version_min: 1,
                version_max: 1,
                client: "c".into(),
                token,
            };
            let mut body = Vec::new();
            h.encode(&mut body);
            assert_eq!(Hello::decode(&body).unwrap(), h);
        }
        // A token longer than TOKEN_MAX is refused, not allocated.
        let mut body = vec![1, 1, 1, 0, b'c'];
        body.put_str(&"t".repeat(TOKEN_MAX + 1));
        assert!(Hello::decode(&body).is_err());
        // Bytes after the token are not ignored.
        let mut body = vec![1, 1, 1, 0, b'c', 1, 0, b't', 9];
        assert!(Hello::decode(&body).is_err());
        body.pop();
        assert_eq!(Hello::decode(&body).unwrap().token.as_deref(), Some("t"));
    }
}

#[cfg(test)]
mod doc_example {
    /// The HELLO example in docs/PROTOCOL.md, byte for byte.
    #[test]
    fn hello_bytes_match_the_protocol_doc() {
        let mut body = Vec::new();
        super::Hello {
            version_min: 1,
            version_max: 1,
            client: "x".into(),
            token: None,
        }
        .encode(&mut body);
        let f = crate::protocol::frame::encode(crate::protocol::Opcode::Hello, 0, 1, &body);
        let hex: Vec<String> = f.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(
            hex.join(" "),
            "15 00 00 00 DA B1 01 01 00 00 00 00 01 00 00 00 00 00 00 00 01 01 01 00 78"
        );
    }
}
