//! `bida bench --kafka ADDR`: the bench's producers speaking Kafka instead
//! of bida's protocol, so the two doors of one broker are compared with
//! the same client: the same batches (`--batch` records per request, one
//! record batch v2, uncompressed), the same window (`--inflight` requests
//! pipelined on one connection), the same payloads. Produce v9, `acks=-1`
//! (answered once the broker's flush policy holds), not idempotent (as
//! kcat's default). Built with the same codec the listener uses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bida::kafka::records as kafka_records;
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// The Produce version sent.
const VERSION: i16 = 9;

/// Why a Kafka load could not run.
#[derive(Debug, thiserror::Error)]
pub enum KafkaLoadError {
    #[error("connecting to the Kafka listener at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the Kafka connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding a produce request: {0}")]
    Encode(#[source] anyhow::Error),
    #[error("decoding a produce response: {0}")]
    Decode(#[source] anyhow::Error),
    #[error("a response frame of {0} bytes")]
    Frame(i32),
}

/// Where one producer reports.
pub struct Report {
    pub produced: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub ack_hist: Arc<Mutex<Histogram<u64>>>,
    pub progress: indicatif::ProgressBar,
}

/// What one producer sends.
pub struct Load {
    pub addr: SocketAddr,
    pub topic: String,
    pub partitions: u32,
    /// This producer's number: its first batch goes to this partition, the
    /// next ones to the following partitions in turn (as the native
    /// producers do).
    pub index: u32,
    pub count: u64,
    pub size: usize,
    pub batch: usize,
    pub inflight: usize,
    pub deadline: Instant,
}

/// Sends `load.count` messages, answers read in order on the same
/// connection by a second task.
pub async fn produce(load: Load, report: Report) -> Result<(), KafkaLoadError> {
    let stream = TcpStream::connect(load.addr)
        .await
        .map_err(|source| KafkaLoadError::Connect {
            addr: load.addr,
            source,
        })?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let window = Arc::new(Semaphore::new(load.inflight.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, u64)>();
    let answers = {
        let window = Arc::clone(&window);
        let Report {
            produced,
            failed,
            ack_hist,
            progress,
        } = report;
        tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            // A failed read ends the load: the window closes, so the
            // sender stops instead of waiting for answers that will not
            // come.
            let closing = CloseOnDrop(Arc::clone(&window));
            while let Some((started, n)) = rx.recv().await {
                let frame = read_frame(&mut rd).await?;
                window.add_permits(1);
                let mut buf = frame;
                ResponseHeader::decode(&mut buf, ApiKey::Produce.response_header_version(VERSION))
                    .map_err(KafkaLoadError::Decode)?;
                let response =
                    ProduceResponse::decode(&mut buf, VERSION).map_err(KafkaLoadError::Decode)?;
                let errors: Vec<i16> = response
                    .responses
                    .iter()
                    .flat_map(|t| &t.partition_responses)
                    .map(|p| p.error_code)
                    .filter(|&code| code != 0)
                    .collect();
                if errors.is_empty() {
                    let us = started.elapsed().as_micros() as u64 + 1;
                    let _ = local.record_n(us, n);
                    produced.fetch_add(n, Ordering::Relaxed);
                    progress.inc(n);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("bida bench: a Kafka produce failed: error codes {errors:?}");
                }
            }
            drop(closing);
            ack_hist
                .lock()
                .expect("hist")
                .add(&local)
                .expect("same bounds");
            Ok::<(), KafkaLoadError>(())
        })
    };
    let topic = TopicName(StrBytes::from_string(load.topic.clone()));
    let mut payload = vec![0u8; load.size];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let (mut sent, mut n_batch, mut correlation) = (0u64, 0u64, 0i32);
    while sent < load.count && Instant::now() < load.deadline {
        let Ok(permit) = Arc::clone(&window).acquire_owned().await else {
            break; // the answers ended early: their error is returned below
        };
        permit.forget(); // given back when the answer is read
        let n = (load.count - sent).min(load.batch as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        payload[..8.min(load.size)]
            .copy_from_slice(&(now.as_nanos() as u64).to_le_bytes()[..8.min(load.size)]);
        let value = Bytes::copy_from_slice(&payload);
        let records: Vec<Record> = (0..n)
            .map(|i| {
                kafka_records::plain_record(
                    i as i64,
                    0,
                    now.as_millis() as i64,
                    None,
                    value.clone(),
                    Default::default(),
                )
            })
            .collect();
        let mut batch = BytesMut::with_capacity(n as usize * (load.size + 16) + 64);
        RecordBatchEncoder::encode(
            &mut batch,
            records.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .map_err(KafkaLoadError::Encode)?;
        let partition = ((u64::from(load.index) + n_batch) % u64::from(load.partitions)) as i32;
        n_batch += 1;
        let request = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic.clone())
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch.freeze()))])]);
        let header = RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(VERSION)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_static_str("bida-bench")));
        correlation = correlation.wrapping_add(1);
        let mut frame = BytesMut::with_capacity(request.compute_size(VERSION).unwrap_or(0) + 64);
        frame.put_i32(0);
        header
            .encode(&mut frame, ApiKey::Produce.request_header_version(VERSION))
            .map_err(KafkaLoadError::Encode)?;
        request
            .encode(&mut frame, VERSION)
            .map_err(KafkaLoadError::Encode)?;
        let len = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        // Queued before it is written, so its answer finds it there.
        let _ = tx.send((Instant::now(), n));
        wr.write_all(&frame).await?;
        sent += n;
    }
    drop(tx);
    answers.await.map_err(std::io::Error::other)??;
    Ok(())
}

/// Closes the window when the answers' task ends, however it ends.
struct CloseOnDrop(Arc<Semaphore>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

async fn read_frame(rd: &mut tokio::net::tcp::OwnedReadHalf) -> Result<Bytes, KafkaLoadError> {
    let len = rd.read_i32().await?;
    if !(4..=64 << 20).contains(&len) {
        return Err(KafkaLoadError::Frame(len));
    }
    let mut frame = vec![0u8; len as usize];
    rd.read_exact(&mut frame).await?;
    Ok(Bytes::from(frame))
}
