//! One function per Kafka API (the group APIs are in `groups.rs`): each
//! decodes nothing (the crate did), calls the broker, and builds the
//! response; the connection encodes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiVersionsResponse, BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, FetchRequest, FetchResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
    ProducerId, ResponseKind, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::records::{decode_batches, encode_batch};
use super::{KafkaError, Shared, NODE_ID, VERSIONS};
use crate::broker::{BrokerError, Topic};
use crate::log::record::Message;
use crate::log::StorageError;
use crate::protocol::body::{self, TopicConfig};
use crate::protocol::ErrorCode;

/// A response still being worked on (waiting for a flush, a long poll).
pub(super) type Work = Pin<Box<dyn Future<Output = Result<ResponseKind, KafkaError>> + Send>>;

/// The most records one fetch reads from one partition at a time.
const FETCH_RECORDS_MAX: usize = 100_000;

pub(super) fn api_versions() -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.api_keys = VERSIONS
        .iter()
        .map(|&(key, min, max)| {
            let mut v = ApiVersion::default();
            v.api_key = key as i16;
            v.min_version = min;
            v.max_version = max;
            v
        })
        .collect();
    response
}

fn text(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// The Kafka error for a broker error.
pub(super) fn kafka_code(e: &BrokerError) -> ResponseError {
    match e.code() {
        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => {
            ResponseError::UnknownTopicOrPartition
        }
        ErrorCode::InvalidTopicName => ResponseError::InvalidTopicException,
        ErrorCode::TopicExists => ResponseError::TopicAlreadyExists,
        ErrorCode::InvalidMessage => ResponseError::InvalidRecord,
        ErrorCode::InvalidRequest => ResponseError::InvalidRequest,
        ErrorCode::Storage | ErrorCode::DiskFull | ErrorCode::PartitionDamaged => {
            ResponseError::KafkaStorageError
        }
        ErrorCode::ShuttingDown => ResponseError::NotLeaderOrFollower,
        _ => ResponseError::UnknownServerError,
    }
}

/// Runs a call that creates or deletes files off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f).await?
}

fn broker_node(shared: &Shared) -> MetadataResponseBroker {
    let mut b = MetadataResponseBroker::default();
    b.node_id = BrokerId(NODE_ID);
    b.host = text(shared.host.clone());
    b.port = shared.port;
    b
}

fn topic_metadata(topic: &Topic) -> MetadataResponseTopic {
    let mut t = MetadataResponseTopic::default();
    t.name = Some(TopicName(text(topic.name.clone())));
    t.partitions = topic
        .partitions
        .iter()
        .map(|p| {
            let mut m = MetadataResponsePartition::default();
            m.partition_index = p.index as i32;
            m.leader_id = BrokerId(NODE_ID);
            m.replica_nodes = vec![BrokerId(NODE_ID)];
            m.isr_nodes = vec![BrokerId(NODE_ID)];
            m
        })
        .collect();
    t
}

pub(super) async fn metadata(
    shared: Arc<Shared>,
    req: MetadataRequest,
    version: i16,
) -> Result<ResponseKind, KafkaError> {
    let broker = Arc::clone(&shared.broker);
    let names: Option<Vec<String>> = match req.topics {
        // Version 0: an empty list means every topic.
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(
            t.into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        ),
        None => None,
    };
    let create =
        (version < 4 || req.allow_auto_topic_creation) && broker.config().auto_create_topics;
    let topics = blocking(move || {
        let mut out = Vec::new();
        match names {
            None => {
                for summary in broker.list_topics() {
                    if let Ok(t) = broker.topic(&summary.topic) {
                        out.push(topic_metadata(&t));
                    }
                }
            }
            Some(names) => {
                for name in names {
                    let found = if create {
                        broker.topic_or_create(&name)
                    } else {
                        broker.topic(&name)
                    };
                    out.push(match found {
                        Ok(t) => topic_metadata(&t),
                        Err(e) => {
                            let mut t = MetadataResponseTopic::default();
                            t.name = Some(TopicName(text(name)));
                            t.error_code = kafka_code(&e).code();
                            t
                        }
                    });
                }
            }
        }
        Ok(out)
    })
    .await;
    let mut response = MetadataResponse::default();
    response.brokers = vec![broker_node(&shared)];
    response.cluster_id = Some(StrBytes::from_static_str("bida"));
    response.controller_id = BrokerId(NODE_ID);
    response.topics = topics.unwrap_or_default();
    Ok(ResponseKind::Metadata(response))
}

pub(super) async fn create_topics(
    shared: Arc<Shared>,
    req: CreateTopicsRequest,
) -> Result<ResponseKind, KafkaError> {
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut result = CreatableTopicResult::default();
        result.name = t.name.clone();
        let partitions = match u32::try_from(t.num_partitions) {
            Ok(n) => n,
            Err(_) if t.num_partitions == -1 => 0, // the broker's default
            Err(_) => {
                result.error_code = ResponseError::InvalidPartitions.code();
                results.push(result);
                continue;
            }
        };
        let request = body::CreateTopic {
            topic: name,
            partitions,
            if_not_exists: false,
            config: TopicConfig::default(),
        };
        let outcome = if req.validate_only {
            body::check_name("topic", &request.topic)
                .map_err(BrokerError::InvalidName)
                .map(|()| None)
        } else {
            let broker = Arc::clone(&shared.broker);
            blocking(move || broker.create_topic(&request).map(Some)).await
        };
        match outcome {
            Ok(topic) => {
                result.num_partitions =
                    topic.map_or(t.num_partitions, |t| t.partitions.len() as i32);
                result.replication_factor = 1;
            }
            Err(e) => {
                result.error_code = match &e {
                    BrokerError::InvalidRequest(_) => ResponseError::InvalidPartitions.code(),
                    e => kafka_code(e).code(),
                };
                result.error_message = Some(text(e.to_string()));
            }
        }
        results.push(result);
    }
    let mut response = CreateTopicsResponse::default();
    response.topics = results;
    Ok(ResponseKind::CreateTopics(response))
}

pub(super) async fn delete_topics(
    shared: Arc<Shared>,
    req: DeleteTopicsRequest,
) -> Result<ResponseKind, KafkaError> {
    let names: Vec<TopicName> = req
        .topic_names
        .into_iter()
        .chain(req.topics.into_iter().filter_map(|t| t.name))
        .collect();
    let mut responses = Vec::with_capacity(names.len());
    for name in names {
        let broker = Arc::clone(&shared.broker);
        let topic = name.0.to_string();
        let outcome = blocking(move || broker.delete_topic(&topic)).await;
        let mut r = DeletableTopicResult::default();
        r.name = Some(name);
        if let Err(e) = outcome {
            r.error_code = kafka_code(&e).code();
            r.error_message = Some(text(e.to_string()));
        }
        responses.push(r);
    }
    let mut response = DeleteTopicsResponse::default();
    response.responses = responses;
    Ok(ResponseKind::DeleteTopics(response))
}

/// One partition's answer to a produce, once known.
type PartitionAck = Pin<Box<dyn Future<Output = PartitionProduceResponse> + Send>>;

fn partition_error(index: i32, error: ResponseError, message: Option<String>) -> PartitionAck {
    let mut r = PartitionProduceResponse::default();
    r.index = index;
    r.error_code = error.code();
    r.base_offset = -1;
    r.error_message = message.map(text);
    Box::pin(async move { r })
}

/// Appends every partition's batches now (in the order the request
/// arrived, as the connection reads them), and answers once the flush
/// policy holds; `None` for `acks=0`, which Kafka clients expect no answer
/// to.
pub(super) fn produce(shared: &Arc<Shared>, req: ProduceRequest) -> Option<Work> {
    let broker = &shared.broker;
    let mut topics: Vec<(TopicName, Vec<PartitionAck>)> = Vec::new();
    for topic_data in req.topic_data {
        let name = topic_data.name.0.to_string();
        let topic = broker.topic_or_create(&name);
        let mut acks = Vec::with_capacity(topic_data.partition_data.len());
        for p in topic_data.partition_data {
            acks.push(match &topic {
                Err(e) => partition_error(p.index, kafka_code(e), Some(e.to_string())),
                Ok(topic) => produce_partition(shared, topic, p.index, p.records),
            });
        }
        topics.push((topic_data.name, acks));
    }
    let work = async move {
        let mut response = ProduceResponse::default();
        for (name, acks) in topics {
            let mut t = TopicProduceResponse::default();
            t.name = name;
            for ack in acks {
                t.partition_responses.push(ack.await);
            }
            response.responses.push(t);
        }
        Ok(ResponseKind::Produce(response))
    };
    if req.acks == 0 {
        // Still waited for, so a failed flush is logged.
        tokio::spawn(async move {
            if let Err(e) = work.await {
                tracing::warn!(error = %e, "Kafka produce with acks=0 failed");
            }
        });
        return None;
    }
    Some(Box::pin(work))
}

fn produce_partition(
    shared: &Arc<Shared>,
    topic: &Arc<Topic>,
    index: i32,
    records: Option<Bytes>,
) -> PartitionAck {
    let Some(partition) = u32::try_from(index)
        .ok()
        .and_then(|i| topic.partitions.get(i as usize))
    else {
        return partition_error(index, ResponseError::UnknownTopicOrPartition, None);
    };
    let batches = match records.map(decode_batches) {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            return partition_error(index, ResponseError::InvalidRecord, Some(e.to_string()))
        }
        None => {
            return partition_error(
                index,
                ResponseError::InvalidRecord,
                Some("no records".into()),
            )
        }
    };
    // Idempotent producers: the sequence checked and the batch appended
    // under the partition's producer lock, so two batches of one producer
    // cannot pass each other between the check and the append.
    let producers = shared.producers.partition(&topic.name, partition.index);
    let mut state = crate::sync::lock(&producers);
    state.load(&partition.log);
    for b in &batches {
        if b.producer_id >= 0 {
            if let Err(e) = state.check(b.producer_id, b.producer_epoch, b.base_sequence) {
                return partition_error(index, e, None);
            }
        }
    }
    let mut messages: Vec<Message<'_>> =
        Vec::with_capacity(batches.iter().map(|b| b.records.len()).sum());
    messages.extend(
        batches
            .iter()
            .flat_map(|b| b.records.iter().map(move |r| (b, r)))
            .map(|(b, r)| Message {
                id: r.id,
                key: r.key.as_deref(),
                headers: b.headers(r),
                payload: &r.payload,
            }),
    );
    let ack = shared.broker.produce(&body::ProduceRequest {
        topic: &topic.name,
        partition: partition.index,
        messages,
    });
    let options = partition.log.options();
    let now_ms = options.clock.now_ms();
    for b in &batches {
        if b.producer_id >= 0 && !b.records.is_empty() {
            let last = b.base_sequence.wrapping_add(b.records.len() as i32 - 1);
            state.record(
                b.producer_id,
                b.producer_epoch,
                last,
                now_ms,
                options.dedup.age_ms_max,
            );
        }
    }
    drop(state);
    let log = Arc::clone(&partition.log);
    Box::pin(async move {
        let mut r = PartitionProduceResponse::default();
        r.index = index;
        r.log_append_time_ms = -1;
        match ack.await {
            Ok(ack) => {
                r.base_offset = ack.outcomes.first().map_or(-1, |o| o.offset as i64);
                r.log_start_offset = log.start_offset() as i64;
            }
            Err(e) => {
                r.error_code = kafka_code(&e).code();
                r.error_message = Some(text(e.to_string()));
                r.base_offset = -1;
            }
        }
        r
    })
}

fn fetch_partition(
    topic: &Topic,
    index: i32,
    offset: i64,
    max_bytes: usize,
) -> (PartitionData, usize) {
    let mut data = PartitionData::default();
    data.partition_index = index;
    data.preferred_read_replica = BrokerId(-1);
    data.aborted_transactions = Some(Vec::new());
    let Some(p) = u32::try_from(index)
        .ok()
        .and_then(|i| topic.partitions.get(i as usize))
    else {
        data.error_code = ResponseError::UnknownTopicOrPartition.code();
        return (data, 0);
    };
    let (start, end) = (p.log.start_offset(), p.log.next_offset());
    data.high_watermark = end as i64;
    data.last_stable_offset = end as i64;
    data.log_start_offset = start as i64;
    let Some(offset) = u64::try_from(offset)
        .ok()
        .filter(|o| (start..=end).contains(o))
    else {
        data.error_code = ResponseError::OffsetOutOfRange.code();
        return (data, 0);
    };
    let mut records = Vec::new();
    let (mut at, mut bytes) = (offset, 0usize);
    while at < end && bytes < max_bytes {
        let batch = match p.log.read(at, FETCH_RECORDS_MAX, max_bytes - bytes) {
            Ok(b) if b.records > 0 => b,
            Ok(_) => break,
            Err(StorageError::OffsetOutOfRange { .. }) => break,
            Err(e) => {
                tracing::warn!(topic = %topic.name, partition = index, error = %e, "Kafka fetch: read failed");
                data.error_code = ResponseError::KafkaStorageError.code();
                break;
            }
        };
        bytes += batch.bytes.len();
        for record in batch.iter() {
            match record {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(topic = %topic.name, partition = index, error = %e, "Kafka fetch: a damaged record");
                    data.error_code = ResponseError::KafkaStorageError.code();
                    break;
                }
            }
        }
        at = batch.next_offset;
        if data.error_code != 0 {
            break;
        }
    }
    if !records.is_empty() {
        let mut out = BytesMut::with_capacity(bytes + 64 + 16 * records.len());
        match encode_batch(records, &mut out) {
            Ok(()) => data.records = Some(out.freeze()),
            Err(e) => {
                tracing::warn!(error = %e, "Kafka fetch: encoding a batch failed");
                data.error_code = ResponseError::UnknownServerError.code();
            }
        }
    }
    let sent = data.records.as_ref().map_or(0, Bytes::len);
    (data, sent)
}

/// The most record bytes one fetch answers, whatever it asks for (Kafka's
/// broker setting `fetch.max.bytes` is 55 MiB): with at most 64 requests in
/// flight per connection, a connection holds at most 512 MiB of answers.
/// Past the first batch (always sent, as Kafka does) an answer stops at
/// this bound and the client fetches again.
pub const FETCH_RESPONSE_BYTES_MAX: usize = 8 << 20;

/// A fetch's topic: its name, the topic if it exists, and per partition
/// (index, fetch offset, max bytes).
type FetchTopic = (TopicName, Option<Arc<Topic>>, Vec<(i32, i64, i32)>);

/// Reads what the fetch asks for; waits (up to `max_wait_ms`) for
/// `min_bytes` to arrive.
pub(super) async fn fetch(
    shared: Arc<Shared>,
    req: FetchRequest,
) -> Result<ResponseKind, KafkaError> {
    let deadline = Instant::now() + Duration::from_millis(req.max_wait_ms.max(0) as u64);
    let budget = usize::try_from(req.max_bytes)
        .unwrap_or(0)
        .clamp(1, FETCH_RESPONSE_BYTES_MAX);
    loop {
        let topics: Vec<FetchTopic> = req
            .topics
            .iter()
            .map(|t| {
                (
                    t.topic.clone(),
                    shared.broker.topic(t.topic.0.as_str()).ok(),
                    t.partitions
                        .iter()
                        .map(|p| (p.partition, p.fetch_offset, p.partition_max_bytes))
                        .collect(),
                )
            })
            .collect();
        // Registered before reading, so an append between the read and the
        // wait is not missed: one wake-up per topic asked for.
        let mut known: Vec<Arc<Topic>> = topics.iter().filter_map(|(_, t, _)| t.clone()).collect();
        known.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut notified: Vec<_> = known
            .iter()
            .map(|t| Box::pin(t.appended.notified()))
            .collect();
        for n in &mut notified {
            n.as_mut().enable();
        }
        let mut response = FetchResponse::default();
        let (mut total, mut errors) = (0usize, false);
        for (name, topic, partitions) in topics {
            let mut t = FetchableTopicResponse::default();
            t.topic = name;
            for (index, offset, max) in partitions {
                let max = usize::try_from(max)
                    .unwrap_or(0)
                    .min(budget.saturating_sub(total));
                let (data, sent) = match &topic {
                    Some(topic) => fetch_partition(topic, index, offset, max.max(1)),
                    None => {
                        let mut d = PartitionData::default();
                        d.partition_index = index;
                        d.error_code = ResponseError::UnknownTopicOrPartition.code();
                        (d, 0)
                    }
                };
                errors |= data.error_code != 0;
                total += sent;
                t.partitions.push(data);
            }
            response.responses.push(t);
        }
        let now = Instant::now();
        if errors
            || total >= usize::try_from(req.min_bytes).unwrap_or(0).max(1)
            || now >= deadline
            || shared.broker.is_stopping()
        {
            return Ok(ResponseKind::Fetch(response));
        }
        let wait = deadline - now;
        if notified.is_empty() {
            tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
        } else {
            let any = std::future::poll_fn(|cx| {
                for n in &mut notified {
                    if n.as_mut().poll(cx).is_ready() {
                        return std::task::Poll::Ready(());
                    }
                }
                std::task::Poll::Pending
            });
            let _ = tokio::time::timeout(wait, any).await;
        }
    }
}

pub(super) fn list_offsets(shared: &Shared, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut response = ListOffsetsResponse::default();
    for t in req.topics {
        let topic = shared.broker.topic(t.name.0.as_str()).ok();
        let mut out = ListOffsetsTopicResponse::default();
        out.name = t.name;
        for p in t.partitions {
            let mut r = ListOffsetsPartitionResponse::default();
            r.partition_index = p.partition_index;
            r.timestamp = -1;
            let log = topic.as_ref().and_then(|t| {
                u32::try_from(p.partition_index)
                    .ok()
                    .and_then(|i| t.partitions.get(i as usize))
            });
            match log {
                None => r.error_code = ResponseError::UnknownTopicOrPartition.code(),
                Some(part) => {
                    let log = &part.log;
                    r.offset = match p.timestamp {
                        -1 => log.next_offset() as i64,
                        -2 => log.start_offset() as i64,
                        ts if ts >= 0 => {
                            log.offset_for_timestamp(ts as u64).map_or(-1, |o| o as i64)
                        }
                        // -3 (max timestamp) and others: the end.
                        _ => log.next_offset() as i64,
                    };
                }
            }
            out.partitions.push(r);
        }
        response.topics.push(out);
    }
    response
}

pub(super) fn init_producer_id(
    shared: &Shared,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let mut response = InitProducerIdResponse::default();
    if req.transactional_id.is_some() {
        // Kafka transactions are not supported (docs/KAFKA.md).
        response.error_code = ResponseError::UnsupportedVersion.code();
        response.producer_id = ProducerId(-1);
        response.producer_epoch = -1;
        return response;
    }
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 {
        // A producer bumping its own epoch keeps its id.
        response.producer_id = req.producer_id;
        response.producer_epoch = req.producer_epoch.saturating_add(1);
        return response;
    }
    response.producer_id = ProducerId(shared.producers.new_producer_id());
    response.producer_epoch = 0;
    response
}

pub(super) fn find_coordinator(
    shared: &Shared,
    req: FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    let mut response = FindCoordinatorResponse::default();
    if req.key_type != 0 {
        // Transaction coordinators: no transactions.
        response.error_code = ResponseError::CoordinatorNotAvailable.code();
        response.node_id = BrokerId(-1);
        response.port = -1;
        return response;
    }
    // Versions 0 to 3 (those served) answer in the top-level fields;
    // `coordinators` exists only from version 4, and the codec refuses to
    // encode a field its version lacks.
    response.node_id = BrokerId(NODE_ID);
    response.host = text(shared.host.clone());
    response.port = shared.port;
    response
}
