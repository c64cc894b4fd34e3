//! `bida produce`: one message per stdin line.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bida::client::txn::{send_delayed, RetryOptions};
use bida::client::{OutgoingMessage, Producer, ProducerOptions};

use super::DEFAULT_BROKER;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker address.
    #[arg(long, default_value = DEFAULT_BROKER)]
    broker: SocketAddr,
    #[command(flatten)]
    pub client: super::ClientArgs,
    /// Topic (created if missing).
    #[arg(long)]
    topic: String,
    /// Split each line at the first TAB: the part before is the key (biz-id).
    #[arg(long)]
    key_tab: bool,
    /// Print `offset<TAB>inner-msg-id<TAB>duplicate` per acked message.
    #[arg(long)]
    verbose: bool,
    /// Attempts per batch before a send fails.
    #[arg(long, default_value_t = 10)]
    attempts: u32,
    /// Deliver each message this many milliseconds after the broker stores
    /// it (sent in batches of 1,000 lines).
    #[arg(long)]
    delay_ms: Option<u64>,
}

/// `--delay-ms`: batches of lines through PRODUCE_DELAYED.
async fn run_delayed(args: &Args, delay_ms: u64) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let client = super::connect(args.broker).await?;
    let retry = RetryOptions {
        attempts: args.attempts,
        ..RetryOptions::default()
    };
    let delay = std::time::Duration::from_millis(delay_ms);
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let (mut sent, mut duplicates) = (0u64, 0u64);
    let mut batch = Vec::with_capacity(1000);
    let mut lines = std::io::stdin().lock().lines();
    loop {
        let line = lines.next().transpose()?;
        if let Some(line) = line.as_ref() {
            batch.push(message_from(args.key_tab, line));
        }
        if batch.len() == 1000 || (line.is_none() && !batch.is_empty()) {
            let results = send_delayed(&client, &args.topic, delay, &batch, retry).await?;
            for (id, o) in &results {
                duplicates += o.duplicate as u64;
                if args.verbose {
                    let dup = if o.duplicate { "duplicate" } else { "new" };
                    writeln!(out, "{}\t{id}\t{dup}", o.offset)?;
                }
            }
            sent += results.len() as u64;
            batch.clear();
        }
        if line.is_none() {
            break;
        }
    }
    out.flush()?;
    eprintln!(
        "bida produce: {sent} sent, {sent} acked ({duplicates} duplicates), 0 failed, topic {}, delayed {delay_ms} ms (offsets are schedule positions)",
        args.topic
    );
    Ok(ExitCode::SUCCESS)
}

fn message_from(key_tab: bool, line: &str) -> OutgoingMessage {
    match (key_tab, line.split_once('\t')) {
        (true, Some((key, payload))) => {
            OutgoingMessage::new(payload.as_bytes().to_vec()).with_key(key.as_bytes().to_vec())
        }
        _ => OutgoingMessage::new(line.as_bytes().to_vec()),
    }
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if let Some(delay_ms) = args.delay_ms {
            return run_delayed(&args, delay_ms).await;
        }
        let client = super::connect(args.broker).await?;
        let options = ProducerOptions {
            attempts: args.attempts,
            ..ProducerOptions::default()
        };
        let producer = Producer::new(client, &args.topic, options).await?;
        let acked = Arc::new(AtomicU64::new(0));
        let duplicates = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let out = Arc::new(Mutex::new(std::io::BufWriter::new(std::io::stdout())));
        let mut sent = 0u64;
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let msg = message_from(args.key_tab, &line?);
            let (acked, duplicates, failed, out) = (
                acked.clone(),
                duplicates.clone(),
                failed.clone(),
                out.clone(),
            );
            let verbose = args.verbose;
            producer
                .send_with_callback(msg, move |r| match r {
                    Ok(r) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        if r.duplicate {
                            duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        if verbose {
                            let mut o = out.lock().expect("stdout");
                            let _ = writeln!(
                                o,
                                "{}\t{}\t{}",
                                r.offset,
                                r.id,
                                if r.duplicate { "duplicate" } else { "new" }
                            );
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("bida produce: send failed: {e}");
                    }
                })
                .await;
            sent += 1;
        }
        producer.flush().await;
        out.lock().expect("stdout").flush()?;
        let (a, d, f) = (
            acked.load(Ordering::Relaxed),
            duplicates.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        eprintln!(
            "bida produce: {sent} sent, {a} acked ({d} duplicates), {f} failed, topic {}",
            args.topic
        );
        Ok::<_, Box<dyn std::error::Error>>(if f > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}
