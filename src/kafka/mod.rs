//! The Kafka-protocol listener: a second door into the same topics, so
//! Kafka clients (kcat, librdkafka, kafka-python, Java, franz-go) produce
//! and consume against bida unchanged. The bida protocol stays the native
//! one; this listener speaks Kafka's wire protocol through the
//! `kafka-protocol` crate (generated from Kafka's own schemas) and maps
//! every request onto the broker. docs/KAFKA.md maps the concepts and lists
//! what is not supported.
//!
//! ```text
//!  mod.rs        the listener: accept, connection cap, TLS, stop; the
//!                versions served (ApiVersions)
//!  conn.rs       one connection: size-prefixed frames, request headers,
//!                SASL/PLAIN, dispatch, responses in request order
//!  handlers.rs   one function per API: metadata, topics, produce, fetch,
//!                list offsets, producer ids
//!  producers.rs  idempotent producers: epoch and sequence per partition,
//!                rebuilt from the log
//!  groups.rs     the group coordinator: join, sync, heartbeat, leave;
//!                offsets committed into bida's groups
//!  records.rs    Kafka record batches to and from bida records
//! ```
//!
//! Off by default: `bida serve --kafka-listen 127.0.0.1:9092`.

mod conn;
pub use conn::{decode_request, Decoded};
mod groups;
mod handlers;
mod producers;
pub mod records;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::tls::TlsAcceptor;

/// Every API served, with the versions served: what ApiVersions answers.
/// Produce is announced from version 0, although only 3 and later are
/// served (older ones are answered UNSUPPORTED_VERSION per partition):
/// librdkafka before 2.11 turns compression off when the announced minimum
/// is above 0.
pub const VERSIONS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 0, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 9),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 5),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// The lowest version of `api` announced and decoded. Produce versions
/// below [`PRODUCE_MIN_SERVED`] are decoded only to be answered
/// UNSUPPORTED_VERSION.
pub fn announced_min(api: ApiKey) -> Option<i16> {
    VERSIONS
        .iter()
        .find(|(k, _, _)| *k == api)
        .map(|&(_, min, _)| min)
}

/// The lowest Produce version served: record batches v2 (message format
/// v0/v1 is not stored).
pub const PRODUCE_MIN_SERVED: i16 = 3;

/// The highest version of `api` served.
pub fn served_max(api: ApiKey) -> Option<i16> {
    VERSIONS
        .iter()
        .find(|(k, _, _)| *k == api)
        .map(|&(_, _, max)| max)
}

/// Why a connection was closed or a request refused.
#[derive(Debug, Error)]
pub enum KafkaError {
    #[error("a frame of {len} bytes: at most {max} are accepted")]
    FrameTooLarge { len: i64, max: usize },
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("{api:?} version {version} is not served (versions {min}..={max})")]
    UnsupportedVersion {
        api: ApiKey,
        version: i16,
        min: i16,
        max: i16,
    },
    #[error("malformed {api:?} v{version} request: {source}")]
    Malformed {
        api: ApiKey,
        version: i16,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("malformed request header: {0}")]
    Header(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{api:?} before SASL authentication")]
    Unauthenticated { api: ApiKey },
    #[error("SASL authentication failed")]
    AuthenticationFailed,
    #[error("a record batch announces {announced} records, at most {bound} fit in it")]
    RecordCount { announced: i32, bound: i32 },
    #[error("transactional record batches are not supported")]
    Transactional,
    #[error("a produce request without a record batch (magic 2)")]
    NoBatch,
    #[error("record batch: {0}")]
    Records(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("encoding the {api:?} response: {source}")]
    Encode {
        api: ApiKey,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl KafkaError {
    pub(crate) fn records(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        KafkaError::Records(e)
    }
}

/// What every connection of the listener shares.
pub(crate) struct Shared {
    pub broker: Arc<Broker>,
    /// The address clients are told to connect to (Metadata,
    /// FindCoordinator): the listener's own.
    pub host: String,
    pub port: i32,
    pub producers: producers::Producers,
    pub groups: groups::Coordinator,
}

/// Node id of this broker in Kafka's terms: it is the whole cluster.
pub const NODE_ID: i32 = 0;

/// Serves Kafka clients on `listener` until `shutdown` completes, then
/// closes every connection (waiting up to five seconds for them).
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let local: SocketAddr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "the Kafka listener has no address");
            return;
        }
    };
    let config = broker.config().clone();
    let (host, port) = config
        .kafka_advertise
        .clone()
        .unwrap_or_else(|| (local.ip().to_string(), local.port()));
    let shared = Arc::new(Shared {
        host,
        port: i32::from(port),
        producers: producers::Producers::new(),
        groups: groups::Coordinator::new(),
        broker,
    });
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let sweeper = tokio::spawn(groups::run_sweeper(Arc::clone(&shared), stop_rx.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    drop(stream); // at the connection cap: Kafka has no error to send first
                    continue;
                };
                let (shared, stop) = (Arc::clone(&shared), stop_rx.clone());
                match &tls {
                    None => {
                        let (rd, wr) = stream.into_split();
                        tasks.spawn(async move {
                            conn::connection(shared, rd, wr, peer, stop).await;
                            drop(permit);
                        });
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        let handshake = Duration::from_millis(config.frame_timeout_ms);
                        tasks.spawn(async move {
                            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let (rd, wr) = tokio::io::split(tls);
                                    conn::connection(shared, rd, wr, peer, stop).await;
                                }
                                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "Kafka listener: TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "Kafka listener: TLS handshake timed out"),
                            }
                            drop(permit);
                        });
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}
