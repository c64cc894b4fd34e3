//! `bida consume`: print payloads one per line, acking each after it is
//! written out.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bida::client::{Consumer, ConsumerOptions};

use super::DEFAULT_BROKER;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker address.
    #[arg(long, default_value = DEFAULT_BROKER)]
    broker: SocketAddr,
    #[command(flatten)]
    pub client: super::ClientArgs,
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop once nothing has arrived for this long (default: never).
    #[arg(long)]
    idle_exit_ms: Option<u64>,
    /// Print `partition<TAB>offset<TAB>attempt<TAB>` before each payload.
    #[arg(long)]
    verbose: bool,
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = super::connect(args.broker).await?;
        let mut options = ConsumerOptions::default();
        if let Some(n) = args.count {
            options.max_messages = n.clamp(1, 1000) as u32;
        }
        let consumer = Consumer::new(client, &args.topic, &args.group, options);
        let mut out = std::io::BufWriter::new(std::io::stdout());
        let mut got = 0u64;
        let mut last = Instant::now();
        while args.count.is_none_or(|c| got < c) {
            if args
                .idle_exit_ms
                .is_some_and(|ms| last.elapsed() >= Duration::from_millis(ms))
            {
                break;
            }
            let mut batch = consumer.fetch().await?;
            if batch.is_empty() {
                continue;
            }
            last = Instant::now();
            if let Some(c) = args.count {
                // Deliveries past the count are not acked: they will be
                // redelivered to the group after the ack timeout.
                batch.truncate((c - got) as usize);
            }
            for d in &batch {
                if args.verbose {
                    write!(out, "{}\t{}\t{}\t", d.partition, d.offset, d.attempt)?;
                }
                out.write_all(&d.payload)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            let refs: Vec<_> = batch.iter().collect();
            consumer.ack(&refs).await?;
            got += batch.len() as u64;
        }
        eprintln!(
            "bida consume: {got} messages from {} for group {}",
            args.topic, args.group
        );
        Ok::<_, Box<dyn std::error::Error>>(ExitCode::SUCCESS)
    })
}
