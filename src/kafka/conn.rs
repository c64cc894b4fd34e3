//! One Kafka connection: `i32` size-prefixed frames, each a request header
//! and a request; responses leave in the order requests arrived (Kafka's
//! rule), while later requests are already being read and handled (a
//! produce is appended when it is read, so its order is kept; its answer
//! waits for the flush policy in a task of its own).
//!
//! A frame larger than the broker's `frame_bytes_max`, an unknown API key, a
//! version not served, or a request that does not decode closes the
//! connection (what a Kafka broker does), except ApiVersions at a version
//! above those served, which is answered at version 0 with
//! UNSUPPORTED_VERSION and the versions served (KIP-511). With
//! `--auth-token`, every request but ApiVersions and the SASL pair waits
//! for SASL/PLAIN to present the token as its password.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    ApiKey, ProduceRequest, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
    SaslAuthenticateResponse, SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::handlers;
use super::{announced_min, served_max, KafkaError, Shared, PRODUCE_MIN_SERVED};

/// Requests handled and not yet answered, per connection: past it the
/// connection stops reading until the oldest is answered.
const IN_FLIGHT_MAX: usize = 64;

type Pending = JoinHandle<Result<Bytes, KafkaError>>;

pub(super) async fn connection<R, W>(
    shared: Arc<Shared>,
    mut rd: R,
    wr: W,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Pending>(IN_FLIGHT_MAX);
    let writer = tokio::spawn(write_responses(wr, rx));
    let max = shared.broker.config().frame_bytes_max;
    let mut auth = Auth {
        authenticated: shared.broker.config().auth_token.is_none(),
        raw_token_next: false,
    };
    loop {
        // After a SaslHandshake v0, the next frame is the bare SASL/PLAIN
        // token, no request header (Kafka's pre-KIP-152 flow).
        let min = if auth.raw_token_next { 0 } else { 4 };
        let frame = tokio::select! {
            f = read_frame(&mut rd, min, max as usize) => f,
            _ = stop.changed() => break,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "Kafka connection: closing");
                break;
            }
        };
        if std::mem::take(&mut auth.raw_token_next) {
            let token = shared.broker.config().auth_token.as_deref();
            if !token.is_some_and(|token| plain_password_is(&frame, token)) {
                // The v0 flow has no error answer: the connection closes.
                tracing::debug!(%peer, "Kafka connection: SASL/PLAIN (v0) failed; closing");
                break;
            }
            auth.authenticated = true;
            // Success is an empty, size-prefixed answer.
            let answer = tokio::spawn(async { Ok(Bytes::from_static(&[0, 0, 0, 0])) });
            if tx.send(answer).await.is_err() {
                break;
            }
            continue;
        }
        match request(&shared, &mut auth, frame) {
            Ok(Step::Answer(pending)) => {
                if tx.send(pending).await.is_err() {
                    break;
                }
            }
            Ok(Step::AnswerAndClose(pending)) => {
                let _ = tx.send(pending).await;
                break;
            }
            Ok(Step::Silent) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "Kafka connection: closing");
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Where a connection is in SASL authentication.
struct Auth {
    authenticated: bool,
    /// A SaslHandshake v0 chose PLAIN: the next frame is the bare token.
    raw_token_next: bool,
}

/// What a request asks of the connection.
enum Step {
    Answer(Pending),
    /// Answer, then close (a failed authentication).
    AnswerAndClose(Pending),
    /// No answer (a produce with `acks=0`).
    Silent,
}

/// Reads one frame; `None` at a clean end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    min: usize,
    max: usize,
) -> Result<Option<Bytes>, KafkaError> {
    let mut size = [0u8; 4];
    match rd.read_exact(&mut size).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(size);
    if len < min as i32 || len as usize > max {
        return Err(KafkaError::FrameTooLarge {
            len: i64::from(len),
            max,
        });
    }
    // Read into spare capacity (no zeroing of up to a frame's bytes), and
    // no further than this frame.
    let len = len as usize;
    let mut frame = BytesMut::with_capacity(len);
    let mut body = AsyncReadExt::take(&mut *rd, len as u64);
    while frame.len() < len {
        if body.read_buf(&mut frame).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(Some(frame.freeze()))
}

async fn write_responses<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Pending>) {
    while let Some(pending) = rx.recv().await {
        let frame = match pending.await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Kafka connection: a request failed; closing");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kafka connection: a request task failed; closing");
                break;
            }
        };
        if wr.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// A request as decoded from its frame.
pub struct Decoded {
    pub api: ApiKey,
    pub version: i16,
    pub correlation: i32,
    /// `None` for ApiVersions at a version above those served, which is
    /// answered at version 0 (KIP-511).
    pub request: Option<RequestKind>,
}

/// Decodes one request frame (the bytes after the size): its header, then
/// its body with the crate's codec at the version the header names. Pure:
/// the fuzz target calls it on arbitrary bytes.
pub fn decode_request(frame: Bytes) -> Result<Decoded, KafkaError> {
    let (Some(key), Some(version)) = (frame.get(0..2), frame.get(2..4)) else {
        return Err(KafkaError::Header(
            "a frame shorter than its API key and version".into(),
        ));
    };
    let key = i16::from_be_bytes([key[0], key[1]]);
    let version = i16::from_be_bytes([version[0], version[1]]);
    let api = ApiKey::try_from(key).map_err(|_| KafkaError::UnknownApiKey(key))?;
    let (Some(min), Some(max)) = (announced_min(api), served_max(api)) else {
        return Err(KafkaError::UnknownApiKey(key));
    };
    if api == ApiKey::ApiVersions && version > max {
        // A version from the future: its header may have fields not known
        // here, but every header version starts key, version, correlation
        // id, and the answer is version 0 (KIP-511).
        let Some(correlation) = frame.get(4..8) else {
            return Err(KafkaError::Header(
                "a frame shorter than its correlation id".into(),
            ));
        };
        return Ok(Decoded {
            api,
            version: 0,
            correlation: i32::from_be_bytes([
                correlation[0],
                correlation[1],
                correlation[2],
                correlation[3],
            ]),
            request: None,
        });
    }
    let mut buf = frame;
    let header = RequestHeader::decode(&mut buf, api.request_header_version(version))
        .map_err(|e| KafkaError::Header(e.into()))?;
    let correlation = header.correlation_id;
    if !(min..=max).contains(&version) {
        return Err(KafkaError::UnsupportedVersion {
            api,
            version,
            min,
            max,
        });
    }
    let request = if api == ApiKey::Produce && version < PRODUCE_MIN_SERVED {
        // Produce v0-2 is v3 without its leading transactional id; the
        // codec (generated from Kafka 4's schemas) decodes from v3 on.
        let mut v3 = BytesMut::with_capacity(buf.len() + 2);
        v3.put_i16(-1);
        v3.extend_from_slice(&buf);
        RequestKind::decode(api, &mut v3.freeze(), PRODUCE_MIN_SERVED)
    } else {
        RequestKind::decode(api, &mut buf, version)
    }
    .map_err(|e| KafkaError::Malformed {
        api,
        version,
        source: e.into(),
    })?;
    Ok(Decoded {
        api,
        version,
        correlation,
        request: Some(request),
    })
}

/// Decodes one request and starts handling it.
fn request(shared: &Arc<Shared>, auth: &mut Auth, frame: Bytes) -> Result<Step, KafkaError> {
    let Decoded {
        api,
        version,
        correlation,
        request,
    } = decode_request(frame)?;
    let Some(request) = request else {
        // KIP-511: answered at version 0, so the client learns the range.
        let mut response = handlers::api_versions();
        response.error_code = ResponseError::UnsupportedVersion.code();
        let frame = encode(api, 0, correlation, ResponseKind::ApiVersions(response))?;
        return Ok(Step::Answer(tokio::spawn(async move { Ok(frame) })));
    };
    let sasl = matches!(
        api,
        ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
    );
    if !auth.authenticated && !sasl {
        return Err(KafkaError::Unauthenticated { api });
    }
    let ready = |response: ResponseKind| -> Result<Step, KafkaError> {
        let frame = encode(api, version, correlation, response)?;
        Ok(Step::Answer(tokio::spawn(async move { Ok(frame) })))
    };
    let later = |work: handlers::Work| -> Step {
        Step::Answer(tokio::spawn(async move {
            let response = work.await?;
            encode(api, version, correlation, response)
        }))
    };
    let s = Arc::clone(shared);
    match request {
        RequestKind::ApiVersions(_) => ready(ResponseKind::ApiVersions(handlers::api_versions())),
        RequestKind::SaslHandshake(req) => {
            let offered = s.broker.config().auth_token.is_some();
            let plain = req.mechanism.as_str() == "PLAIN";
            let mut response = SaslHandshakeResponse::default();
            if offered {
                response.mechanisms = vec![StrBytes::from_static_str("PLAIN")];
            }
            if !(offered && plain) {
                response.error_code = ResponseError::UnsupportedSaslMechanism.code();
            } else if version == 0 {
                auth.raw_token_next = true;
            }
            ready(ResponseKind::SaslHandshake(response))
        }
        RequestKind::SaslAuthenticate(req) => {
            let ok = s
                .broker
                .config()
                .auth_token
                .as_deref()
                .is_some_and(|token| plain_password_is(&req.auth_bytes, token));
            let mut response = SaslAuthenticateResponse::default();
            if ok {
                auth.authenticated = true;
                return ready(ResponseKind::SaslAuthenticate(response));
            }
            response.error_code = ResponseError::SaslAuthenticationFailed.code();
            response.error_message = Some(StrBytes::from_static_str(
                "SASL/PLAIN: the password must be the broker's auth token",
            ));
            let frame = encode(
                api,
                version,
                correlation,
                ResponseKind::SaslAuthenticate(response),
            )?;
            Ok(Step::AnswerAndClose(tokio::spawn(async move { Ok(frame) })))
        }
        RequestKind::Metadata(req) => Ok(later(Box::pin(handlers::metadata(s, req, version)))),
        RequestKind::CreateTopics(req) => Ok(later(Box::pin(handlers::create_topics(s, req)))),
        RequestKind::DeleteTopics(req) => Ok(later(Box::pin(handlers::delete_topics(s, req)))),
        RequestKind::Produce(req) if version < PRODUCE_MIN_SERVED => {
            if req.acks == 0 {
                // No answer is expected, so none can say why.
                return Err(KafkaError::UnsupportedVersion {
                    api,
                    version,
                    min: PRODUCE_MIN_SERVED,
                    max: super::served_max(api).unwrap_or(PRODUCE_MIN_SERVED),
                });
            }
            let frame = old_produce_refused(correlation, version, &req);
            Ok(Step::Answer(tokio::spawn(async move { Ok(frame) })))
        }
        RequestKind::Produce(req) => match handlers::produce(&s, req) {
            Some(work) => Ok(later(work)),
            None => Ok(Step::Silent),
        },
        RequestKind::Fetch(req) => Ok(later(Box::pin(handlers::fetch(s, req)))),
        RequestKind::ListOffsets(req) => {
            ready(ResponseKind::ListOffsets(handlers::list_offsets(&s, req)))
        }
        RequestKind::InitProducerId(req) => ready(ResponseKind::InitProducerId(
            handlers::init_producer_id(&s, req),
        )),
        RequestKind::FindCoordinator(req) => ready(ResponseKind::FindCoordinator(
            handlers::find_coordinator(&s, req),
        )),
        RequestKind::JoinGroup(req) => Ok(later(Box::pin(super::groups::join(s, req)))),
        RequestKind::SyncGroup(req) => Ok(later(Box::pin(super::groups::sync(s, req)))),
        RequestKind::Heartbeat(req) => {
            ready(ResponseKind::Heartbeat(super::groups::heartbeat(&s, req)))
        }
        RequestKind::LeaveGroup(req) => {
            ready(ResponseKind::LeaveGroup(super::groups::leave(&s, req)))
        }
        RequestKind::OffsetCommit(req) => Ok(later(Box::pin(super::groups::commit(s, req)))),
        RequestKind::OffsetFetch(req) => ready(ResponseKind::OffsetFetch(
            super::groups::fetch_offsets(&s, req),
        )),
        _ => Err(KafkaError::UnknownApiKey(api as i16)),
    }
}

/// SASL/PLAIN's `authzid NUL authcid NUL passwd`: is the password `token`?
/// (Compared without an early exit, so its time says nothing.)
fn plain_password_is(auth: &[u8], token: &str) -> bool {
    let mut parts = auth.split(|&b| b == 0);
    let (Some(_authzid), Some(_user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    password.len() == token.len()
        && password
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The answer to a Produce v0-2 (message format v0/v1, not stored): every
/// partition UNSUPPORTED_VERSION, offset -1. Written here because the codec
/// has no Produce response below v3; the layout is Kafka's
/// ProduceResponse v0-2:
///
/// ```text
///  size i32 | correlation i32 | topics i32 { name i16+bytes | partitions i32
///    { index i32 | error i16 | base_offset i64 | [v2: log_append_time i64] } }
///  | [v1+: throttle_time_ms i32]
/// ```
fn old_produce_refused(correlation: i32, version: i16, req: &ProduceRequest) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    buf.put_i32(correlation);
    buf.put_i32(req.topic_data.len() as i32);
    for topic in &req.topic_data {
        let name = topic.name.0.as_bytes();
        buf.put_i16(name.len() as i16);
        buf.put_slice(name);
        buf.put_i32(topic.partition_data.len() as i32);
        for p in &topic.partition_data {
            buf.put_i32(p.index);
            buf.put_i16(ResponseError::UnsupportedVersion.code());
            buf.put_i64(-1);
            if version >= 2 {
                buf.put_i64(-1);
            }
        }
    }
    if version >= 1 {
        buf.put_i32(0);
    }
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// A response frame: size, header, body.
fn encode(
    api: ApiKey,
    version: i16,
    correlation: i32,
    response: ResponseKind,
) -> Result<Bytes, KafkaError> {
    let fail = |e: anyhow::Error| KafkaError::Encode {
        api,
        source: e.into(),
    };
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation;
    header
        .encode(&mut buf, api.response_header_version(version))
        .map_err(fail)?;
    response.encode(&mut buf, version).map_err(fail)?;
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8 bytes of upstream's report (kafka-protocol-rs #152): a
    /// Metadata v0 whose topic count is 54 M. Unpatched, the decoder asked
    /// for 3.6 GiB before reading a topic and the allocation failure
    /// aborted the process; now it is a malformed request.
    #[test]
    fn an_impossible_array_count_is_an_error_not_an_allocation() {
        let frame = Bytes::from_static(&[
            0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff, 0x03, 0x3c, 0x0c, 0x00,
            0xb6,
        ]);
        let err = decode_request(frame).err().expect("refused");
        assert!(matches!(err, KafkaError::Malformed { .. }), "{err}");
        let mut max = vec![0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff];
        max.extend(i32::MAX.to_be_bytes());
        assert!(decode_request(Bytes::from(max)).is_err());
    }

    #[test]
    fn plain_checks_only_the_password_and_the_shape() {
        assert!(plain_password_is(b"\0user\0s3cret", "s3cret"));
        assert!(plain_password_is(b"admin\0user\0s3cret", "s3cret"));
        assert!(!plain_password_is(b"\0user\0s3cre", "s3cret"));
        assert!(!plain_password_is(b"\0user\0s3cret\0", "s3cret"));
        assert!(!plain_password_is(b"s3cret", "s3cret"));
    }
}
