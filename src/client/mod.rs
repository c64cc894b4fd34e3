//! The Rust client (tokio).
//!
//! - [`Client`]: a reconnecting, pipelined connection plus the admin calls
//!   (create, list, describe topics; group positions).
//! - [`Producer`]: `send` returns a future (or takes a callback); messages
//!   are batched (linger, max batch) and pipelined; a batch that times out
//!   is resent with the *same* inner-msg-ids until the broker confirms it,
//!   up to `attempts` times, so a retried send is stored once.
//! - [`Consumer`]: pull (`fetch`) or push (`subscribe`, with credit), and
//!   explicit `ack` / `nack`.
//! - [`idempotent`]: skips messages whose business id was processed.
//! - [`txn`]: transactions (half messages with check-back) and delayed
//!   sends.

mod connection;
pub mod consumer;
pub mod idempotent;
pub mod producer;
pub mod txn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub use connection::Connection;
pub use consumer::{Consumer, ConsumerOptions, Subscription};
pub use producer::{
    EncodedBatch, OutgoingMessage, Producer, ProducerOptions, Receipt, RetryBackoff,
};

use crate::protocol::body::{self, CreateTopic};
pub use crate::protocol::body::{
    Delivery, GroupPartition, TopicConfig, TopicDescription, TopicSummary,
};
use crate::protocol::{ErrorCode, Opcode, WireError};

#[derive(Debug, Error, Clone)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("the connection closed")]
    Closed,
    #[error("broker error {code} ({}): {message}", code_name(*code))]
    Broker { code: u16, message: String },
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("failed after {attempts} attempts; last error: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<ClientError>,
    },
    #[error("invalid message: {0}")]
    Invalid(#[from] InvalidMessage),
    #[error("the broker answered {answered} outcomes for {sent} messages")]
    OutcomeCount { answered: usize, sent: usize },
    #[error("no randomness for a producer id: {0}")]
    NoRandomness(getrandom::Error),
    #[error("TLS: {0}")]
    Tls(Arc<crate::tls::TlsError>),
    #[error("the producer is closed")]
    ProducerClosed,
}

/// Why a message is refused before it is sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvalidMessage {
    #[error("headers: {0}")]
    Headers(#[from] crate::log::record::RecordError),
    #[error("key of {len} bytes; at most 65535")]
    KeyTooLong { len: usize },
    #[error("payload of {len} bytes; at most 4 GiB")]
    PayloadTooLarge { len: usize },
    #[error("{0}")]
    Name(#[from] crate::protocol::body::NameError),
}

impl From<std::io::Error> for ClientError {
    fn from(_: std::io::Error) -> Self {
        ClientError::Closed
    }
}

fn code_name(code: u16) -> String {
    ErrorCode::from_u16(code).map_or_else(|| "unknown".to_owned(), |c| format!("{c:?}"))
}

impl ClientError {
    /// Worth trying again with the same request.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Closed | ClientError::Timeout(_) => true,
            ClientError::Broker { code, .. } => {
                ErrorCode::from_u16(*code).is_some_and(|c| c.is_retriable())
            }
            _ => false,
        }
    }

    /// The broker's error code, if the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => ErrorCode::from_u16(*code),
            ClientError::Exhausted { last, .. } => last.code(),
            _ => None,
        }
    }
}

/// How to reach a broker beyond its address.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// For a broker started with `--auth-token`: sent in HELLO.
    pub token: Option<String>,
    /// For a broker started with `--tls-cert`: the CA to trust and the
    /// name to expect ([`crate::tls::ClientTls`]).
    pub tls: Option<crate::tls::ClientTls>,
}

/// A connection that is re-established on the next call after it breaks.
pub struct Client {
    addr: SocketAddr,
    options: ConnectOptions,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Client {
    /// Connects to a broker.
    pub async fn connect(addr: SocketAddr) -> Result<Arc<Client>, ClientError> {
        Client::connect_with_token(addr, None).await
    }

    /// Connects to a broker that requires a token (`bida serve
    /// --auth-token`); every reconnection presents it again.
    pub async fn connect_with_token(
        addr: SocketAddr,
        token: Option<&str>,
    ) -> Result<Arc<Client>, ClientError> {
        let options = ConnectOptions {
            token: token.map(str::to_owned),
            ..ConnectOptions::default()
        };
        Client::connect_with(addr, options).await
    }

    /// Connects with a token and/or TLS; every reconnection uses them
    /// again.
    pub async fn connect_with(
        addr: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Arc<Client>, ClientError> {
        let conn = Connection::connect_with(addr, &options).await?;
        Ok(Arc::new(Client {
            addr,
            options,
            current: tokio::sync::Mutex::new(Some(conn)),
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The live connection, reconnecting if the last one broke.
    pub async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Connection::connect_with(self.addr, &self.options).await?;
        *current = Some(c.clone());
        Ok(c)
    }

    /// One request on the current connection.
    pub async fn request(&self, opcode: Opcode, body: &[u8]) -> Result<bytes::Bytes, ClientError> {
        self.connection().await?.request(opcode, body).await
    }

    /// Creates a topic (`partitions` 0: the broker's default). With
    /// `if_not_exists`, an existing topic is returned as it is.
    pub async fn create_topic(
        &self,
        topic: &str,
        partitions: u32,
        if_not_exists: bool,
        config: TopicConfig,
    ) -> Result<TopicSummary, ClientError> {
        let mut b = Vec::new();
        CreateTopic {
            topic: topic.to_owned(),
            partitions,
            if_not_exists,
            config,
        }
        .encode(&mut b);
        Ok(TopicSummary::decode_one(
            &self.request(Opcode::CreateTopic, &b).await?,
        )?)
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>, ClientError> {
        Ok(TopicSummary::decode_list(
            &self.request(Opcode::ListTopics, &[]).await?,
        )?)
    }

    pub async fn describe_topic(&self, topic: &str) -> Result<TopicDescription, ClientError> {
        let mut b = Vec::new();
        body::encode_topic_name(topic, &mut b);
        Ok(TopicDescription::decode(
            &self.request(Opcode::DescribeTopic, &b).await?,
        )?)
    }

    pub async fn group_position(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Vec<GroupPartition>, ClientError> {
        let mut b = Vec::new();
        body::encode_group_position(topic, group, &mut b);
        Ok(GroupPartition::decode_list(
            &self.request(Opcode::GroupPosition, &b).await?,
        )?)
    }
}
