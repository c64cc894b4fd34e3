//! The admin HTTP listener (axum), on its own address (default
//! 127.0.0.1:7879), apart from the client protocol:
//!
//! ```text
//! GET  /                                             the web console (one page, no CDN)
//! GET  /metrics                                      Prometheus / OpenMetrics text
//! GET  /api/overview                                 topics, partitions, groups, counters
//! GET  /api/topics/{topic}/messages?partition&from&limit
//! POST /api/topics/{topic}/messages/{partition}/{offset}/redrive   (dead-letter topics)
//! POST /api/topics/{topic}/purge                     (dead-letter topics)
//! ```
//!
//! With `auth_token` set, everything but the page itself needs
//! `Authorization: Bearer TOKEN` (the page asks for the token and sends it).
//! docs/ADMIN.md documents every route and field.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::scrape;
use crate::broker::{Broker, BrokerError, DLQ_SUFFIX};
use crate::log::record::HeaderIter;
use crate::log::FlushMode;
use crate::protocol::ErrorCode;

/// The OpenMetrics text content type that `prometheus-client` writes.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The console: one self-contained page (no external scripts or styles).
const CONSOLE_HTML: &str = include_str!("console.html");

/// Payload bytes shown per message when browsing; the rest is cut.
const PAYLOAD_SHOWN_MAX: usize = 4096;

pub fn router(broker: Arc<Broker>) -> Router {
    let api = Router::new()
        .route("/metrics", get(scrape))
        .route("/api/overview", get(overview))
        .route("/api/topics/{topic}/messages", get(messages))
        .route(
            "/api/topics/{topic}/messages/{partition}/{offset}/redrive",
            post(redrive),
        )
        .route("/api/topics/{topic}/purge", post(purge))
        .route_layer(middleware::from_fn_with_state(
            broker.clone(),
            require_token,
        ));
    Router::new()
        .route("/", get(console))
        .merge(api)
        .with_state(broker)
}

async fn require_token(
    State(broker): State<Arc<Broker>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &broker.config().auth_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::broker::config::same_secret(given.as_bytes(), token.as_bytes()) {
            let mut r = ApiError {
                status: StatusCode::UNAUTHORIZED,
                code: ErrorCode::Unauthorized as u16,
                error: "this broker requires a token: send Authorization: Bearer TOKEN".into(),
            }
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(request).await
}

async fn console() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(CONSOLE_HTML))
}

async fn scrape(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    // Reading every partition's state takes locks briefly: off the workers.
    let text = tokio::task::spawn_blocking(move || scrape::render(&broker))
        .await
        .unwrap_or_else(|e| format!("# the scrape failed: {e}\n"));
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text)
}

/// An error answer: `{"error": "...", "code": N}` (the protocol's error
/// codes, docs/PROTOCOL.md).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: u16,
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
            code: u16,
        }
        (
            self.status,
            Json(Body {
                error: self.error,
                code: self.code,
            }),
        )
            .into_response()
    }
}

/// Runs `f` (which takes partition locks or reads segments) on the
/// blocking pool, not on the async workers.
async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: ErrorCode::Storage as u16,
        error: e.to_string(),
    })
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let code = e.code();
        let status = match code {
            ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => StatusCode::NOT_FOUND,
            ErrorCode::InvalidRequest | ErrorCode::InvalidTopicName | ErrorCode::InvalidMessage => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            code: code as u16,
            error: e.to_string(),
        }
    }
}

#[derive(Serialize)]
struct Overview {
    server: String,
    flush: &'static str,
    uptime_ms: u64,
    connections: i64,
    data_dir: String,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    delayed_pending: usize,
    transactions_open: usize,
    topics: Vec<TopicView>,
    groups: Vec<GroupView>,
}

#[derive(Serialize)]
struct TopicView {
    name: String,
    dead_letter: bool,
    ack_timeout_ms: u32,
    max_deliveries: u16,
    /// Messages stored now (end minus start, over partitions).
    messages: u64,
    disk_bytes: u64,
    segments: usize,
    partitions: Vec<PartitionView>,
    produced_messages: u64,
    produced_bytes: u64,
    consumed_messages: u64,
    consumed_bytes: u64,
    dedup_hits: u64,
    redeliveries: u64,
    dead_lettered: u64,
}

#[derive(Serialize)]
struct PartitionView {
    partition: u32,
    start: u64,
    end: u64,
    durable: u64,
    segments: usize,
    disk_bytes: u64,
    /// Why the partition refuses writes, if its data is damaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    damaged: Option<String>,
}

#[derive(Serialize)]
struct GroupView {
    topic: String,
    group: String,
    lag: u64,
    in_flight: u64,
    redeliveries: u64,
    partitions: Vec<GroupPartitionView>,
}

#[derive(Serialize)]
struct GroupPartitionView {
    partition: u32,
    committed: u64,
    next: u64,
    end: u64,
    lag: u64,
    in_flight: u32,
    redeliveries: u64,
}

fn build_overview(broker: &Broker) -> Overview {
    let config = broker.config();
    let mut topics = Vec::new();
    let mut groups: std::collections::BTreeMap<(String, String), GroupView> = Default::default();
    for summary in broker.list_topics() {
        let Ok(topic) = broker.topic(&summary.topic) else {
            continue;
        };
        let mut partitions = Vec::new();
        for p in &topic.partitions {
            let infos = p.log.segments();
            let end = p.log.next_offset();
            partitions.push(PartitionView {
                partition: p.index,
                start: p.log.start_offset(),
                end,
                durable: p.log.durable_offset(),
                segments: infos.len(),
                disk_bytes: infos.iter().map(|s| s.size_bytes).sum(),
                damaged: p.log.damage().map(|e| e.to_string()),
            });
            for (name, state) in p.groups().iter() {
                let g = groups
                    .entry((topic.name.clone(), name.clone()))
                    .or_insert_with(|| GroupView {
                        topic: topic.name.clone(),
                        group: name.clone(),
                        lag: 0,
                        in_flight: 0,
                        redeliveries: 0,
                        partitions: Vec::new(),
                    });
                let lag = end.saturating_sub(state.committed());
                g.lag += lag;
                g.in_flight += u64::from(state.in_flight());
                g.redeliveries += state.redelivered();
                g.partitions.push(GroupPartitionView {
                    partition: p.index,
                    committed: state.committed(),
                    next: state.next(),
                    end,
                    lag,
                    in_flight: state.in_flight(),
                    redeliveries: state.redelivered(),
                });
            }
        }
        let c = broker.metrics().topic_counts(&topic.name);
        topics.push(TopicView {
            name: topic.name.clone(),
            dead_letter: topic.name.ends_with(DLQ_SUFFIX),
            ack_timeout_ms: summary.config.ack_timeout_ms,
            max_deliveries: summary.config.max_deliveries,
            messages: partitions.iter().map(|p| p.end - p.start).sum(),
            disk_bytes: partitions.iter().map(|p| p.disk_bytes).sum(),
            segments: partitions.iter().map(|p| p.segments).sum(),
            partitions,
            produced_messages: c.produced_messages,
            produced_bytes: c.produced_bytes,
            consumed_messages: c.consumed_messages,
            consumed_bytes: c.consumed_bytes,
            dedup_hits: c.dedup_hits,
            redeliveries: c.redeliveries,
            dead_lettered: c.dead_lettered,
        });
    }
    let (delayed_pending, transactions_open) = broker.schedule().pending();
    Overview {
        server: format!("bida {}", env!("CARGO_PKG_VERSION")),
        flush: match config.flush {
            FlushMode::Sync => "sync",
            FlushMode::Async { .. } => "async",
        },
        uptime_ms: broker.metrics().uptime().as_millis() as u64,
        connections: broker.metrics().connections(),
        data_dir: config.data_dir.display().to_string(),
        retention_ms: config.retention_ms,
        retention_bytes: config.retention_bytes,
        delayed_pending,
        transactions_open,
        topics,
        groups: groups.into_values().collect(),
    }
}

async fn overview(State(broker): State<Arc<Broker>>) -> Result<Json<Overview>, ApiError> {
    off_workers(move || Json(build_overview(&broker))).await
}

#[derive(Deserialize)]
struct BrowseQuery {
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

#[derive(Serialize)]
struct Browse {
    topic: String,
    partition: u32,
    start: u64,
    end: u64,
    messages: Vec<MessageView>,
}

#[derive(Serialize)]
struct MessageView {
    offset: u64,
    timestamp_ms: u64,
    /// The inner-msg-id, 32 hex digits.
    id: String,
    /// The key (biz-id), lossily as UTF-8.
    key: Option<String>,
    headers: Vec<HeaderView>,
    /// The payload lossily as UTF-8, cut at 4,096 bytes.
    payload: String,
    payload_bytes: usize,
    payload_truncated: bool,
}

#[derive(Serialize)]
struct HeaderView {
    name: String,
    value: String,
}

async fn messages(
    State(broker): State<Arc<Broker>>,
    Path(topic): Path<String>,
    Query(q): Query<BrowseQuery>,
) -> Result<Json<Browse>, ApiError> {
    let b = broker.clone();
    let t = topic.clone();
    let records = off_workers(move || b.browse(&t, q.partition, q.from, q.limit)).await??;
    let p = broker.topic(&topic)?.partition(q.partition)?.clone();
    let messages = records
        .iter()
        .map(|r| {
            let shown = &r.payload[..r.payload.len().min(PAYLOAD_SHOWN_MAX)];
            MessageView {
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                id: format!("{:032x}", r.id.0),
                key: r
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                headers: HeaderIter::new(&r.headers)
                    .filter_map(|h| h.ok())
                    .map(|(n, v)| HeaderView {
                        name: String::from_utf8_lossy(n).into_owned(),
                        value: String::from_utf8_lossy(v).into_owned(),
                    })
                    .collect(),
                payload: String::from_utf8_lossy(shown).into_owned(),
                payload_bytes: r.payload.len(),
                payload_truncated: shown.len() < r.payload.len(),
            }
        })
        .collect();
    Ok(Json(Browse {
        topic,
        partition: q.partition,
        start: p.log.start_offset(),
        end: p.log.next_offset(),
        messages,
    }))
}

#[derive(Serialize)]
struct RedriveView {
    topic: String,
    partition: u32,
    offset: u64,
    duplicate: bool,
}

async fn redrive(
    State(broker): State<Arc<Broker>>,
    Path((topic, partition, offset)): Path<(String, u32, u64)>,
) -> Result<Json<RedriveView>, ApiError> {
    let r = broker.redrive(&topic, partition, offset).await?;
    Ok(Json(RedriveView {
        topic: r.topic,
        partition: r.partition,
        offset: r.offset,
        duplicate: r.duplicate,
    }))
}

#[derive(Serialize)]
struct PurgeView {
    messages: u64,
    bytes: u64,
}

async fn purge(
    State(broker): State<Arc<Broker>>,
    Path(topic): Path<String>,
) -> Result<Json<PurgeView>, ApiError> {
    let p = off_workers(move || broker.purge(&topic)).await??;
    Ok(Json(PurgeView {
        messages: p.messages,
        bytes: p.bytes,
    }))
}

/// Serves the admin routes on `listener` (plain TCP, or
/// [`crate::tls::TlsListener`]) until `shutdown` completes.
pub async fn serve<L>(
    broker: Arc<Broker>,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(broker))
        .with_graceful_shutdown(shutdown)
        .await
}
