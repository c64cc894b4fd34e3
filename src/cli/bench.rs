//! `bida bench`: the load generator. Producers send batches with a window
//! of batches in flight; consumers pull and ack. Reports msgs/s, MB/s, and
//! ack and end-to-end latency percentiles from HDR histograms.
//!
//! Without `--broker` it starts a broker in this process on a fresh data
//! directory (`--data`, removed afterwards unless `--keep-data`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

use bida::broker::{Broker, BrokerConfig};
use bida::client::txn::{Decision, TransactionalProducer};
use bida::client::{Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions};
use bida::server;

use super::{kafka_load, FlushArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker to load; without it, a broker is started in this process.
    #[arg(long)]
    broker: Option<SocketAddr>,
    #[command(flatten)]
    pub client: super::ClientArgs,
    /// Embedded broker: data directory (created; removed afterwards).
    #[arg(long, default_value = "./bida-bench-data")]
    data: PathBuf,
    /// Embedded broker: keep the data directory afterwards.
    #[arg(long)]
    keep_data: bool,
    /// Embedded broker: flush mode.
    #[arg(long, value_enum, default_value_t = FlushArg::Sync)]
    flush: FlushArg,
    /// Topic; default: a fresh `bench-<time>`.
    #[arg(long)]
    topic: Option<String>,
    /// Consumer group; default: a fresh `bench-<time>`, which reads the
    /// topic from its start.
    #[arg(long)]
    group: Option<String>,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Key every message: each batch carries one key and goes to the
    /// partition the topic's key hash picks for it, the keys spreading the
    /// batches over every partition in turn. Without it each batch just
    /// names its partition in turn.
    #[arg(long)]
    keys: bool,
    /// Producers; 0 consumes --count messages already in --topic (a
    /// backlog), to measure consumption alone.
    #[arg(long, default_value_t = 1)]
    producers: u32,
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    /// Payload bytes per message (at least 8: the send time).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per produce batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batches in flight per producer.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Deliveries per consumer fetch, at most.
    #[arg(long, default_value_t = 4096)]
    fetch_messages: u32,
    /// Fetches in flight per consumer: while one answer crosses the network
    /// and is handled, the broker reads the next (each fetch gets different
    /// messages of the group).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    fetch_inflight: u32,
    /// Messages per producer.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Stop producing after this many seconds even if --count is not reached.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Messages per second per producer (default: as fast as it goes).
    #[arg(long)]
    rate: Option<u64>,
    /// Send transactions of this many messages instead of plain batches:
    /// each is begun, its messages stored as halves in one request, and
    /// committed; --inflight transactions at a time per producer.
    #[arg(long)]
    txn: Option<usize>,
    /// Produce through the broker's Kafka listener at this address instead
    /// of bida's protocol: the same batches, window and payloads (one
    /// record batch of --batch records per Produce request, --inflight
    /// requests pipelined per producer), to compare the two doors of one
    /// broker. The topic is still created over --broker.
    #[arg(long, requires = "broker", conflicts_with_all = ["keys", "txn", "rate"])]
    kafka: Option<SocketAddr>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Percentiles {
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Percentiles {
    fn print(&self, label: &str) {
        println!(
            "  {label:<13} p50 {} us  p99 {} us  p999 {} us  max {} us",
            self.p50_us, self.p99_us, self.p999_us, self.max_us
        );
    }

    fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Serialize)]
struct Report {
    broker: String,
    flush: String,
    size: usize,
    batch: usize,
    inflight: usize,
    /// Messages per transaction (`--txn`), if transactions were sent.
    txn: Option<usize>,
    producers: u32,
    consumers: u32,
    partitions: u32,
    produced: u64,
    produce_seconds: f64,
    produce_msgs_per_s: f64,
    produce_mb_per_s: f64,
    consumed: u64,
    consume_seconds: f64,
    consume_msgs_per_s: f64,
    consume_mb_per_s: f64,
    ack_latency: Option<Percentiles>,
    end_to_end_latency: Option<Percentiles>,
    failed_batches: u64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.size < 8 {
        return Err("--size must be at least 8 (the payload carries its send time)".into());
    }
    if args.batch == 0 || args.inflight == 0 || args.txn == Some(0) {
        return Err("--batch, --inflight and --txn must be at least 1".into());
    }
    if args.producers == 0 && (args.topic.is_none() || args.consumers == 0) {
        return Err("--producers 0 consumes a backlog: it needs --topic and --consumers".into());
    }
    if args.kafka.is_some() && args.consumers > 0 {
        return Err("--kafka produces only: add --consumers 0".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let embedded_dir = args.broker.is_none().then(|| args.data.clone());
    if let Some(dir) = &embedded_dir {
        if dir.exists() {
            return Err(
                format!("{} exists; remove it or pass another --data", dir.display()).into(),
            );
        }
    }
    let result = runtime.block_on(bench(&args));
    if let Some(dir) = embedded_dir {
        if !args.keep_data {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.failed_batches > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_report(r: &Report) {
    println!(
        "bida bench: {} producers, {} consumers, {} partitions, {} B messages, {}, {} in flight, flush {}",
        r.producers,
        r.consumers,
        r.partitions,
        r.size,
        match r.txn {
            Some(n) => format!("transactions of {n}"),
            None => format!("batch {}", r.batch),
        },
        r.inflight,
        r.flush
    );
    if r.producers > 0 {
        println!(
            "produce: {} msgs in {:.2} s = {:.0} msgs/s, {:.1} MB/s",
            r.produced, r.produce_seconds, r.produce_msgs_per_s, r.produce_mb_per_s
        );
    }
    if let Some(a) = &r.ack_latency {
        a.print("ack latency");
    }
    if r.consumers > 0 {
        println!(
            "consume: {} msgs in {:.2} s = {:.0} msgs/s, {:.1} MB/s",
            r.consumed, r.consume_seconds, r.consume_msgs_per_s, r.consume_mb_per_s
        );
        if let Some(e) = &r.end_to_end_latency {
            e.print("end-to-end");
        }
    }
    if r.failed_batches > 0 {
        println!("FAILED batches: {}", r.failed_batches);
    }
}

async fn bench(args: &Args) -> Result<Report, Box<dyn std::error::Error>> {
    let flush_name;
    let (addr, embedded) = match args.broker {
        Some(a) => {
            flush_name = "broker's".to_owned();
            (a, None)
        }
        None => {
            let config = BrokerConfig {
                data_dir: args.data.clone(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                flush: bida::broker::config::parse_flush(
                    match args.flush {
                        FlushArg::Sync => "sync",
                        FlushArg::Async => "async",
                    },
                    None,
                    None,
                )?,
                ..BrokerConfig::default()
            };
            flush_name = format!("{:?}", args.flush).to_lowercase();
            let broker = tokio::task::block_in_place(|| Broker::open(config))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let b = broker.clone();
            let task = tokio::spawn(async move {
                server::serve(b, listener, None, async {
                    let _ = stop_rx.await;
                })
                .await;
            });
            (addr, Some((broker, stop_tx, task)))
        }
    };
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench-{}", now_ns() / 1_000_000));
    let admin = super::connect(addr).await?;
    admin
        .create_topic(&topic, args.partitions, true, Default::default())
        .await?;
    let total = args.count * args.producers.max(1) as u64;
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("bench-{}", now_ns() / 1_000_000));
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} acked  {per_sec}  {elapsed}")
            .expect("template"),
    );
    let produced = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let ack_hist = Arc::new(Mutex::new(histogram()));
    let e2e_hist = Arc::new(Mutex::new(histogram()));
    let producing_done = Arc::new(AtomicBool::new(false));

    // Consumers first, so they are waiting when messages arrive.
    let consume_start = Instant::now();
    let last_consumed = Arc::new(Mutex::new(Instant::now()));
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let client = super::connect(addr).await?;
        let options = ConsumerOptions {
            max_messages: args.fetch_messages,
            max_bytes: 8 << 20,
            max_wait: Duration::from_millis(100),
            credit: 0,
        };
        let consumer = Arc::new(Consumer::new(client, &topic, &group, options));
        for _ in 0..args.fetch_inflight {
            let consumer = consumer.clone();
            let (consumed, e2e, done, last, produced) = (
                consumed.clone(),
                e2e_hist.clone(),
                producing_done.clone(),
                last_consumed.clone(),
                produced.clone(),
            );
            let producers = args.producers;
            consumers.push(tokio::spawn(async move {
                let acks = Arc::new(Semaphore::new(8));
                let mut local = histogram();
                let mut idle_since: Option<Instant> = None;
                loop {
                    let n = consumed.load(Ordering::Relaxed);
                    // Everything there is: --count, or, once producers stopped
                    // early (--duration-s), all they had acked.
                    if n >= total
                        || (producers > 0
                            && done.load(Ordering::Acquire)
                            && n >= produced.load(Ordering::Acquire))
                    {
                        break;
                    }
                    let batch = match consumer.fetch().await {
                        Ok(b) => b,
                        Err(e) => {
                            eprintln!("bida bench: fetch failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if batch.is_empty() {
                        // Give up once producing ended and nothing came for 5 s.
                        if done.load(Ordering::Relaxed) {
                            let since = *idle_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(5) {
                                break;
                            }
                        }
                        continue;
                    }
                    idle_since = None;
                    let now = now_ns();
                    for d in &batch {
                        if let Some(ts) = d.payload.get(..8) {
                            let sent = u64::from_le_bytes(ts.try_into().expect("8 bytes"));
                            let _ = local.record(now.saturating_sub(sent) / 1000 + 1);
                        }
                    }
                    consumed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    *last.lock().expect("last") = Instant::now();
                    let permit = acks.clone().acquire_owned().await.expect("semaphore");
                    let c = consumer.clone();
                    tokio::spawn(async move {
                        let refs: Vec<_> = batch.iter().collect();
                        if let Err(e) = c.ack(&refs).await {
                            eprintln!("bida bench: ack failed: {e}");
                        }
                        drop(permit);
                    });
                }
                let _ = acks.acquire_many(8).await;
                e2e.lock().expect("hist").add(&local).expect("same bounds");
            }));
        }
    }

    let produce_start = Instant::now();
    let deadline = produce_start + Duration::from_secs(args.duration_s);
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        let Some(txn) = args.txn else { break };
        let producer = Arc::new(
            TransactionalProducer::with_client(super::connect(addr).await?, "bida-bench", |_| {
                Decision::Unknown
            })
            .await?,
        );
        let ctx = TxnRun {
            produced: produced.clone(),
            failed: failed.clone(),
            ack_hist: ack_hist.clone(),
            progress: progress.clone(),
        };
        let (topic, count, size, inflight) = (topic.clone(), args.count, args.size, args.inflight);
        producers.push(tokio::spawn(run_transactions(
            producer, ctx, topic, count, txn, size, inflight, deadline,
        )));
    }
    for p in 0..args.producers {
        let Some(kafka) = args.kafka else { break };
        let load = kafka_load::Load {
            addr: kafka,
            topic: topic.clone(),
            partitions: args.partitions,
            index: p,
            count: args.count,
            size: args.size,
            batch: args.batch,
            inflight: args.inflight,
            deadline,
        };
        let report = kafka_load::Report {
            produced: produced.clone(),
            failed: failed.clone(),
            ack_hist: ack_hist.clone(),
            progress: progress.clone(),
        };
        let failed = failed.clone();
        producers.push(tokio::spawn(async move {
            if let Err(e) = kafka_load::produce(load, report).await {
                failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("bida bench: Kafka producer failed: {e}");
            }
        }));
    }
    for p in 0..args.producers {
        if args.txn.is_some() || args.kafka.is_some() {
            break;
        }
        let client = super::connect(addr).await?;
        let options = ProducerOptions {
            inflight_batches_max: args.inflight,
            ..ProducerOptions::default()
        };
        let producer = Arc::new(Producer::new(client, &topic, options).await?);
        let (produced, failed, ack_hist, progress) = (
            produced.clone(),
            failed.clone(),
            ack_hist.clone(),
            progress.clone(),
        );
        let (count, batch, size, inflight, rate, partitions) = (
            args.count,
            args.batch,
            args.size,
            args.inflight,
            args.rate,
            args.partitions,
        );
        // A key for every partition: the first of `key-0`, `key-1`, ...
        // the topic's hash puts there.
        let keys: Option<Vec<Vec<u8>>> = args.keys.then(|| {
            let mut keys: Vec<Option<Vec<u8>>> = vec![None; partitions as usize];
            let (mut found, mut i) = (0, 0u64);
            while found < keys.len() {
                let key = format!("key-{i}").into_bytes();
                let slot = &mut keys[producer.partition_for_key(&key) as usize];
                if slot.is_none() {
                    *slot = Some(key);
                    found += 1;
                }
                i += 1;
            }
            keys.into_iter().flatten().collect()
        });
        producers.push(tokio::spawn(async move {
            let window = Arc::new(Semaphore::new(inflight));
            let local = Arc::new(Mutex::new(histogram()));
            let mut buf = vec![0u8; size * batch];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let mut sent = 0u64;
            let mut n_batch = 0u64;
            while sent < count && Instant::now() < deadline {
                if let Some(rate) = rate {
                    let due = produce_start + Duration::from_secs_f64(sent as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let permit = window.clone().acquire_owned().await.expect("semaphore");
                let n = (count - sent).min(batch as u64) as usize;
                let ts = now_ns().to_le_bytes();
                for m in 0..n {
                    buf[m * size..m * size + 8].copy_from_slice(&ts);
                }
                let partition = ((p as u64 + n_batch) % partitions as u64) as u32;
                n_batch += 1;
                let started = Instant::now();
                let payloads = buf[..n * size].chunks(size);
                let encoded = match &keys {
                    Some(keys) => {
                        producer.encode_keyed_payloads(&keys[partition as usize], payloads)
                    }
                    None => producer.encode_payloads(Some(partition), payloads),
                };
                let fut = producer.send_encoded(encoded);
                let (produced, failed, local, progress) = (
                    produced.clone(),
                    failed.clone(),
                    local.clone(),
                    progress.clone(),
                );
                let handle = tokio::spawn(async move {
                    let r = fut.await;
                    drop(permit);
                    match r {
                        Ok(_) => {
                            let us = started.elapsed().as_micros() as u64 + 1;
                            let _ = local.lock().expect("hist").record_n(us, n as u64);
                            produced.fetch_add(n as u64, Ordering::Relaxed);
                            progress.inc(n as u64);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("bida bench: batch failed: {e}");
                        }
                    }
                });
                drop(handle);
                sent += n as u64;
            }
            let _ = window.acquire_many(inflight as u32).await;
            ack_hist
                .lock()
                .expect("hist")
                .add(&*local.lock().expect("hist"))
                .expect("same bounds");
        }));
    }
    for p in producers {
        p.await?;
    }
    let produce_seconds = produce_start.elapsed().as_secs_f64();
    producing_done.store(true, Ordering::Release);
    for c in consumers {
        c.await?;
    }
    progress.finish_and_clear();
    let consume_seconds = last_consumed
        .lock()
        .expect("last")
        .duration_since(consume_start)
        .as_secs_f64();
    if let Some((broker, stop, task)) = embedded {
        let _ = stop.send(());
        let _ = task.await;
        tokio::task::block_in_place(|| broker.close())?;
    }
    let produced = produced.load(Ordering::Relaxed);
    let consumed = consumed.load(Ordering::Relaxed);
    let mb = |n: u64, s: f64| n as f64 * args.size as f64 / s / 1e6;
    let e2e = e2e_hist.lock().expect("hist").clone();
    let ack = ack_hist.lock().expect("hist").clone();
    Ok(Report {
        broker: addr.to_string(),
        flush: flush_name,
        size: args.size,
        batch: args.batch,
        inflight: args.inflight,
        txn: args.txn,
        producers: args.producers,
        consumers: args.consumers,
        partitions: args.partitions,
        produced,
        produce_seconds,
        produce_msgs_per_s: produced as f64 / produce_seconds.max(1e-9),
        produce_mb_per_s: mb(produced, produce_seconds.max(1e-9)),
        consumed,
        consume_seconds,
        consume_msgs_per_s: consumed as f64 / consume_seconds.max(1e-9),
        consume_mb_per_s: mb(consumed, consume_seconds.max(1e-9)),
        ack_latency: (!ack.is_empty()).then(|| Percentiles::of(&ack)),
        end_to_end_latency: (!e2e.is_empty() && args.producers > 0).then(|| Percentiles::of(&e2e)),
        failed_batches: failed.load(Ordering::Relaxed),
    })
}

/// What a transaction-sending producer reports into.
struct TxnRun {
    produced: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    ack_hist: Arc<Mutex<Histogram<u64>>>,
    progress: indicatif::ProgressBar,
}

/// `--txn N`: transactions of `txn` messages, `inflight` at a time; the
/// ack latency is from begin to the commit's answer.
#[allow(clippy::too_many_arguments)]
async fn run_transactions(
    producer: Arc<TransactionalProducer>,
    ctx: TxnRun,
    topic: String,
    count: u64,
    txn: usize,
    size: usize,
    inflight: usize,
    deadline: Instant,
) {
    let ctx = Arc::new(ctx);
    let window = Arc::new(Semaphore::new(inflight));
    let local = Arc::new(Mutex::new(histogram()));
    let mut sent = 0u64;
    while sent < count && Instant::now() < deadline {
        let permit = window.clone().acquire_owned().await.expect("semaphore");
        let n = (count - sent).min(txn as u64) as usize;
        let ts = now_ns().to_le_bytes();
        let messages: Vec<OutgoingMessage> = (0..n)
            .map(|_| {
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&ts);
                OutgoingMessage::new(payload)
            })
            .collect();
        let (producer, ctx, local, topic) =
            (producer.clone(), ctx.clone(), local.clone(), topic.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut t = producer.begin();
            let r = match t.send_halves(&topic, &messages).await {
                Ok(()) => t.commit().await.map(|_| ()),
                Err(e) => Err(e),
            };
            drop(permit);
            match r {
                Ok(()) => {
                    let us = started.elapsed().as_micros() as u64 + 1;
                    let _ = local.lock().expect("hist").record_n(us, n as u64);
                    ctx.produced.fetch_add(n as u64, Ordering::Relaxed);
                    ctx.progress.inc(n as u64);
                }
                Err(e) => {
                    ctx.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("bida bench: transaction failed: {e}");
                }
            }
        });
        sent += n as u64;
    }
    let _ = window.acquire_many(inflight as u32).await;
    ctx.ack_hist
        .lock()
        .expect("hist")
        .add(&*local.lock().expect("hist"))
        .expect("same bounds");
}
