//! `bida-peers`: the same workload against bida, NATS JetStream and Redis
//! Streams, each through its ordinary Rust client, and the charts of the
//! results. `scripts/bench-peers.sh` starts the servers and drives it.
//!
//! - `run`: one workload against one running server; prints one JSON line.
//!   Produce: `--count` messages of `--size` bytes in batches of `--batch`,
//!   `--inflight` batches outstanding; a message's ack latency is the time
//!   from sending its batch to its ack. Consume: the same messages are
//!   first produced (not timed), then read in batches of `--batch` and
//!   acked, timed until the last is acked.
//! - `chart`: draws the throughput bars and latency curves (PNG) from the
//!   medians file the script writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

mod chart;

#[derive(Parser)]
#[command(about = "bida against NATS JetStream and Redis Streams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One workload against one server.
    Run(RunArgs),
    /// Charts from a medians file.
    Chart {
        /// JSON written by scripts/bench-peers.sh.
        #[arg(long)]
        medians: std::path::PathBuf,
        /// Directory for the PNG files.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Target {
    Bida,
    Nats,
    Redis,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Workload {
    Produce,
    Consume,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    target: Target,
    /// The server's address (host:port).
    #[arg(long)]
    addr: String,
    #[arg(long, value_enum, default_value_t = Workload::Produce)]
    workload: Workload,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Messages per batch (bida: one PRODUCE; NATS: publishes before
    /// awaiting their acks; Redis: one pipeline of XADDs).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batches in flight.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Topic / stream / key name (fresh per run by default).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Outcome {
    target: Target,
    workload: Workload,
    size: usize,
    count: u64,
    seconds: f64,
    msgs_per_s: f64,
    mb_per_s: f64,
    /// Ack latency percentiles in µs (produce only): p50, p90, p99, p99.9,
    /// max.
    latency_us: Option<[u64; 5]>,
}

type Hist = Arc<Mutex<Histogram<u64>>>;

fn histogram() -> Hist {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds"),
    ))
}

fn percentiles(h: &Histogram<u64>) -> [u64; 5] {
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    match Cli::parse().command {
        Command::Run(args) => {
            let outcome = run(&args).await?;
            println!("{}", serde_json::to_string(&outcome)?);
        }
        Command::Chart { medians, out } => chart::draw(&medians, &out)?,
    }
    Ok(())
}

async fn run(args: &RunArgs) -> Result<Outcome, Error> {
    let name = args.name.clone().unwrap_or_else(|| {
        format!(
            "bench{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        )
    });
    let payload = Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let hist = histogram();
    let produce = |timed: bool| {
        let hist = timed.then(|| hist.clone());
        let payload = payload.clone();
        let name = name.clone();
        async move {
            match args.target {
                Target::Bida => produce_bida(args, &name, payload, hist).await,
                Target::Nats => produce_nats(args, &name, payload, hist).await,
                Target::Redis => produce_redis(args, &name, payload, hist).await,
            }
        }
    };
    let (seconds, latency_us) = match args.workload {
        Workload::Produce => {
            let start = Instant::now();
            produce(true).await?;
            let s = start.elapsed().as_secs_f64();
            (s, Some(percentiles(&hist.lock().expect("hist"))))
        }
        Workload::Consume => {
            produce(false).await?;
            let start = Instant::now();
            match args.target {
                Target::Bida => consume_bida(args, &name).await?,
                Target::Nats => consume_nats(args, &name).await?,
                Target::Redis => consume_redis(args, &name).await?,
            }
            (start.elapsed().as_secs_f64(), None)
        }
    };
    Ok(Outcome {
        target: args.target,
        workload: args.workload,
        size: args.size,
        count: args.count,
        seconds,
        msgs_per_s: args.count as f64 / seconds,
        mb_per_s: args.count as f64 * args.size as f64 / seconds / 1e6,
        latency_us,
    })
}

/// Sends `count` messages in batches, `inflight` batches outstanding:
/// `send` starts a batch of `n` and returns the future of its acks.
async fn batches<F, Fut>(args: &RunArgs, hist: Option<Hist>, mut send: F) -> Result<(), Error>
where
    F: FnMut(usize) -> Result<Fut, Error>,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let window = Arc::new(Semaphore::new(args.inflight));
    let failed = Arc::new(AtomicU64::new(0));
    let mut sent = 0u64;
    while sent < args.count {
        let permit = window.clone().acquire_owned().await?;
        let n = (args.count - sent).min(args.batch as u64) as usize;
        let started = Instant::now();
        let acks = send(n)?;
        let (hist, failed) = (hist.clone(), failed.clone());
        tokio::spawn(async move {
            match acks.await {
                Ok(()) => {
                    if let Some(h) = hist {
                        let us = started.elapsed().as_micros() as u64 + 1;
                        let _ = h.lock().expect("hist").record_n(us, n as u64);
                    }
                }
                Err(e) => {
                    eprintln!("batch failed: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        sent += n as u64;
    }
    let _ = window.acquire_many(args.inflight as u32).await?;
    match failed.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(format!("{n} batches failed").into()),
    }
}

// ------------------------------------------------------------------ bida

async fn produce_bida(
    args: &RunArgs,
    topic: &str,
    payload: Bytes,
    hist: Option<Hist>,
) -> Result<(), Error> {
    use bida::client::{Client, Producer, ProducerOptions};
    let client = Client::connect(
        tokio::net::lookup_host(&args.addr)
            .await?
            .next()
            .ok_or("no address")?,
    )
    .await?;
    let options = ProducerOptions {
        inflight_batches_max: args.inflight,
        ..ProducerOptions::default()
    };
    let producer = Producer::new(client, topic, options).await?;
    batches(args, hist, |n| {
        let encoded = producer.encode_payloads(Some(0), std::iter::repeat_n(&payload[..], n));
        let fut = producer.send_encoded(encoded);
        Ok(async move { fut.await.map(|_| ()).map_err(Error::from) })
    })
    .await
}

async fn consume_bida(args: &RunArgs, topic: &str) -> Result<(), Error> {
    use bida::client::{Client, Consumer, ConsumerOptions};
    let client = Client::connect(
        tokio::net::lookup_host(&args.addr)
            .await?
            .next()
            .ok_or("no address")?,
    )
    .await?;
    let options = ConsumerOptions {
        max_messages: args.batch as u32,
        max_bytes: 8 << 20,
        max_wait: Duration::from_millis(100),
        credit: 0,
    };
    let consumer = Consumer::new(client, topic, "bench", options);
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < args.count && Instant::now() < deadline {
        let batch = consumer.fetch().await?;
        let refs: Vec<_> = batch.iter().collect();
        if !refs.is_empty() {
            consumer.ack(&refs).await?;
        }
        got += batch.len() as u64;
    }
    check_all(got, args.count)
}

fn check_all(got: u64, want: u64) -> Result<(), Error> {
    if got < want {
        return Err(format!("consumed {got} of {want} messages").into());
    }
    Ok(())
}

// ------------------------------------------------------------------ NATS

async fn nats_stream(
    args: &RunArgs,
    name: &str,
) -> Result<
    (
        async_nats::jetstream::Context,
        async_nats::jetstream::stream::Stream,
    ),
    Error,
> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let client = async_nats::connect(&args.addr).await?;
    let mut js = async_nats::jetstream::new(client);
    // With an fsync per message, thousands of acks in flight take seconds.
    js.set_timeout(Duration::from_secs(120));
    let stream = js
        .get_or_create_stream(Config {
            name: name.to_owned(),
            subjects: vec![format!("{name}.m")],
            storage: StorageType::File,
            ..Default::default()
        })
        .await?;
    Ok((js, stream))
}

async fn produce_nats(
    args: &RunArgs,
    name: &str,
    payload: Bytes,
    hist: Option<Hist>,
) -> Result<(), Error> {
    use async_nats::jetstream::context::Publish;
    let (js, _) = nats_stream(args, name).await?;
    let subject = format!("{name}.m");
    let prefix = format!("{:016x}", std::process::id() as u64 ^ 0x5eed);
    let mut seq = 0u64;
    // Publishing is async here: the batch's publishes are sent first, then
    // its acks awaited in a task (the same shape as a bida batch).
    let window = Arc::new(Semaphore::new(args.inflight));
    let failed = Arc::new(AtomicU64::new(0));
    let mut sent = 0u64;
    while sent < args.count {
        let permit = window.clone().acquire_owned().await?;
        let n = (args.count - sent).min(args.batch as u64) as usize;
        let started = Instant::now();
        let mut acks = Vec::with_capacity(n);
        for _ in 0..n {
            seq += 1;
            // Nats-Msg-Id: JetStream's dedup, like bida's inner-msg-id.
            let publish = Publish::build()
                .payload(payload.clone())
                .message_id(format!("{prefix}-{seq}"));
            acks.push(js.send_publish(subject.clone(), publish).await?);
        }
        let (hist, failed) = (hist.clone(), failed.clone());
        tokio::spawn(async move {
            let results = futures::future::join_all(
                acks.into_iter().map(std::future::IntoFuture::into_future),
            )
            .await;
            let us = started.elapsed().as_micros() as u64 + 1;
            let ok = results.iter().filter(|r| r.is_ok()).count();
            if ok < n {
                failed.fetch_add(1, Ordering::Relaxed);
                if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                    eprintln!("nats publish failed: {e}");
                }
            }
            if let Some(h) = hist {
                let _ = h.lock().expect("hist").record_n(us, ok as u64);
            }
            drop(permit);
        });
        sent += n as u64;
    }
    let _ = window.acquire_many(args.inflight as u32).await?;
    match failed.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(format!("{n} NATS batches failed").into()),
    }
}

async fn consume_nats(args: &RunArgs, name: &str) -> Result<(), Error> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    use futures::StreamExt;
    let (_, stream) = nats_stream(args, name).await?;
    let consumer = stream
        .get_or_create_consumer(
            "bench",
            pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: -1,
                ..Default::default()
            },
        )
        .await?;
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < args.count && Instant::now() < deadline {
        let mut messages = consumer
            .fetch()
            .max_messages(args.batch)
            .expires(Duration::from_millis(100))
            .messages()
            .await?;
        while let Some(m) = messages.next().await {
            let m = m?;
            m.ack().await?;
            got += 1;
        }
    }
    check_all(got, args.count)
}

// ------------------------------------------------------------------ Redis

async fn redis_conn(args: &RunArgs) -> Result<redis::aio::MultiplexedConnection, Error> {
    let client = redis::Client::open(format!("redis://{}/", args.addr))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

async fn produce_redis(
    args: &RunArgs,
    key: &str,
    payload: Bytes,
    hist: Option<Hist>,
) -> Result<(), Error> {
    let conn = redis_conn(args).await?;
    batches(args, hist, |n| {
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("d")
                .arg(&payload[..])
                .ignore();
        }
        let mut conn = conn.clone();
        Ok(async move { pipe.query_async::<()>(&mut conn).await.map_err(Error::from) })
    })
    .await
}

async fn consume_redis(args: &RunArgs, key: &str) -> Result<(), Error> {
    use redis::streams::{StreamReadOptions, StreamReadReply};
    use redis::AsyncCommands;
    let mut conn = redis_conn(args).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg("bench")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await?;
    let options = StreamReadOptions::default()
        .group("bench", "c1")
        .count(args.batch)
        .block(100);
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < args.count && Instant::now() < deadline {
        let reply: StreamReadReply = conn.xread_options(&[key], &[">"], &options).await?;
        for k in reply.keys {
            let ids: Vec<String> = k.ids.into_iter().map(|i| i.id).collect();
            if ids.is_empty() {
                continue;
            }
            got += ids.len() as u64;
            let _: u64 = conn.xack(key, "bench", &ids).await?;
        }
    }
    check_all(got, args.count)
}
