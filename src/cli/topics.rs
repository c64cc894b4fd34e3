//! `bida topics`: list, create and describe topics, with each group's lag.

use std::net::SocketAddr;
use std::process::ExitCode;

use bida::client::TopicConfig;
use bida::protocol::body::Backoff;

use super::DEFAULT_BROKER;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker address.
    #[arg(long, default_value = DEFAULT_BROKER, global = true)]
    broker: SocketAddr,
    #[command(flatten)]
    pub client: super::ClientArgs,
    #[command(subcommand)]
    command: Option<TopicsCommand>,
}

/// What deletes a topic's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RetentionArg {
    /// The broker's time and size limits.
    Time,
    /// Also: once every consumer group has committed past them.
    Consumed,
}

#[derive(clap::Subcommand, Debug)]
enum TopicsCommand {
    /// List topics (the default).
    List,
    /// Create a topic.
    Create {
        name: String,
        /// Partitions (0: the broker's default).
        #[arg(long, default_value_t = 0)]
        partitions: u32,
        /// Redeliver unacked deliveries after this (0: broker default).
        #[arg(long, default_value_t = 0)]
        ack_timeout_ms: u32,
        /// Deliveries before the dead-letter topic (0: broker default).
        #[arg(long, default_value_t = 0)]
        max_deliveries: u16,
        /// Fixed redelivery delay in ms, instead of the broker's backoff.
        #[arg(long, conflicts_with = "backoff_base_ms")]
        backoff_fixed_ms: Option<u32>,
        /// Exponential backoff: first delay in ms (doubling up to --backoff-max-ms).
        #[arg(long)]
        backoff_base_ms: Option<u32>,
        #[arg(long, default_value_t = 60_000)]
        backoff_max_ms: u32,
        /// Succeed if it exists already.
        #[arg(long)]
        if_not_exists: bool,
        /// `consumed`: also delete a sealed segment once every consumer
        /// group reading the topic has committed past it. `time` (the
        /// default): only the broker's time and size limits.
        #[arg(long, value_enum, default_value_t = RetentionArg::Time)]
        retention: RetentionArg,
    },
    /// Partitions, offsets, settings and every group's position and lag.
    Describe { name: String },
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = super::connect(args.broker).await?;
        match args.command.unwrap_or(TopicsCommand::List) {
            TopicsCommand::List => {
                println!("{:<40} {:>10}", "TOPIC", "PARTITIONS");
                for t in client.list_topics().await? {
                    println!("{:<40} {:>10}", t.topic, t.partitions);
                }
            }
            TopicsCommand::Create {
                name,
                partitions,
                ack_timeout_ms,
                max_deliveries,
                backoff_fixed_ms,
                backoff_base_ms,
                backoff_max_ms,
                if_not_exists,
                retention,
            } => {
                let backoff = match (backoff_fixed_ms, backoff_base_ms) {
                    (Some(d), _) => Some(Backoff::Fixed { delay_ms: d }),
                    (None, Some(base_ms)) => Some(Backoff::Exponential {
                        base_ms,
                        max_ms: backoff_max_ms.max(base_ms),
                        factor_percent: 200,
                    }),
                    (None, None) => None,
                };
                let config = TopicConfig {
                    ack_timeout_ms,
                    max_deliveries,
                    backoff,
                    retention_consumed: retention == RetentionArg::Consumed,
                };
                let t = client
                    .create_topic(&name, partitions, if_not_exists, config)
                    .await?;
                println!(
                    "created {} with {} partitions: {:?}",
                    t.topic, t.partitions, t.config
                );
            }
            TopicsCommand::Describe { name } => {
                let d = client.describe_topic(&name).await?;
                println!(
                    "topic {}  partitions {}  key hash {:?}  {:?}",
                    d.summary.topic, d.summary.partitions, d.summary.key_hash, d.summary.config
                );
                println!(
                    "{:>9} {:>14} {:>14} {:>14}",
                    "PARTITION", "START", "END", "DURABLE"
                );
                for (i, p) in d.partitions.iter().enumerate() {
                    println!("{i:>9} {:>14} {:>14} {:>14}", p.start, p.end, p.durable);
                }
                if !d.groups.is_empty() {
                    println!(
                        "{:<24} {:>9} {:>14} {:>14} {:>10} {:>12}",
                        "GROUP", "PARTITION", "COMMITTED", "NEXT", "IN-FLIGHT", "LAG"
                    );
                }
                for (g, parts) in &d.groups {
                    for (i, p) in parts.iter().enumerate() {
                        println!(
                            "{g:<24} {i:>9} {:>14} {:>14} {:>10} {:>12}",
                            p.committed,
                            p.next,
                            p.in_flight,
                            p.lag()
                        );
                    }
                }
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(ExitCode::SUCCESS)
    })
}
