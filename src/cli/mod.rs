//! Subcommands of the `bida` binary.

mod append;
mod attack;
mod bench;
mod consume;
mod inspect;
mod kafka_load;
mod produce;
mod read;
mod repair;
mod serve;
mod topics;
mod torture;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use bida::log::{FlushMode, Options, WritePath};

#[derive(Parser, Debug)]
#[command(
    name = "bida",
    version,
    about = "bida (必达): a message broker on its own commit log"
)]
pub struct Cli {
    /// Log lines on stderr: human-readable text, or one JSON object per
    /// line. The level comes from BIDA_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How a client subcommand reaches a broker: only the subcommands that
/// connect to one (produce, consume, topics, bench, attack) take these.
#[derive(clap::Args, Debug, Default)]
pub struct ClientArgs {
    /// Token for a broker started with --auth-token
    #[arg(long, global = true, env = "BIDA_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Speak TLS to the broker, trusting the CA certificate(s) in this PEM
    /// file
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the broker's certificate must carry
    /// [default: the broker's IP address]
    #[arg(long, global = true, requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker until SIGINT/SIGTERM.
    Serve(Box<serve::Args>),
    /// Send one message per stdin line.
    Produce(produce::Args),
    /// Print messages of a topic for a consumer group, acking each.
    Consume(consume::Args),
    /// List, create and describe topics.
    Topics(topics::Args),
    /// The load generator: produce and consume against a broker, report
    /// throughput and latency percentiles.
    Bench(bench::Args),
    /// Verify a broker's data directory (every log in it) or one log
    /// without changing anything; exits 1 if anything is damaged.
    Inspect(inspect::Args),
    /// Cut a damaged log at its first invalid record (the broker stopped):
    /// says what that drops and asks first, or --yes.
    Repair(repair::Args),
    /// Append messages to a log: one per stdin line, or generated.
    Append(append::Args),
    /// Print records of a log.
    Read(read::Args),
    /// SIGKILL a broker at random moments under load and check that no
    /// acked message is lost or stored twice.
    Torture(torture::Args),
    /// Behave like a hostile client (slowloris, idle, never-reading, huge
    /// frames, connection floods) against a broker, and report what it did.
    Attack(attack::Args),
}

/// How appends are acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlushArg {
    /// After the data is on disk (group commit).
    Sync,
    /// At once; a background thread flushes every 100 ms or 16 MiB.
    Async,
}

/// How the next segment file is prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PreallocateArg {
    /// Reserve the space with fallocate.
    Fallocate,
    /// Also write zeros over it in the background.
    Zeroes,
}

/// How appended bytes reach the segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WritePathArg {
    /// pwrite under sync flush, mmap under async: the faster for each.
    Auto,
    /// Staged, then one pwrite per append call.
    Pwrite,
    /// Copied into the shared memory map.
    Mmap,
}

/// Options shared by the subcommands that open a log.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// The data directory.
    #[arg(long, default_value = "./bida-data")]
    data: PathBuf,
    /// When an append counts as done.
    #[arg(long, value_enum, default_value_t = FlushArg::Sync)]
    flush: FlushArg,
    /// Size each segment file is preallocated to.
    #[arg(long, default_value_t = 1 << 30)]
    segment_bytes: u64,
    /// How appended bytes reach the segment file.
    #[arg(long, value_enum, default_value_t = WritePathArg::Auto)]
    write_path: WritePathArg,
    /// Keep flushed data in the page cache instead of dropping what lies
    /// more than 64 MiB behind the writer (for measuring the difference).
    #[arg(long)]
    keep_page_cache: bool,
}

/// Where the client subcommands find the broker by default.
pub const DEFAULT_BROKER: &str = "127.0.0.1:7878";

/// Async flush defaults of the CLI: the loss window on a crash.
pub const ASYNC_FLUSH_INTERVAL_MS: u64 = 100;
pub const ASYNC_FLUSH_BYTES: u64 = 16 << 20;

impl LogArgs {
    fn options(&self) -> Options {
        Options {
            flush: match self.flush {
                FlushArg::Sync => FlushMode::Sync,
                FlushArg::Async => FlushMode::Async {
                    interval_ms: ASYNC_FLUSH_INTERVAL_MS,
                    bytes: ASYNC_FLUSH_BYTES,
                },
            },
            write_path: match self.write_path {
                WritePathArg::Auto => WritePath::Auto,
                WritePathArg::Pwrite => WritePath::Pwrite,
                WritePathArg::Mmap => WritePath::Mmap,
            },
            segment_bytes: self.segment_bytes,
            page_cache_hot_bytes: if self.keep_page_cache {
                None
            } else {
                Options::default().page_cache_hot_bytes
            },
            // Small segments for experiments still take the largest record
            // that fits.
            record_bytes_max: Options::default()
                .record_bytes_max
                .min(u32::try_from(self.segment_bytes).unwrap_or(u32::MAX)),
            ..Options::default()
        }
    }
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BIDA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
}

/// The token of the client subcommands (`--token`).
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// `--token`, if given.
pub fn token() -> Option<&'static str> {
    TOKEN.get().and_then(|t| t.as_deref())
}

/// `--tls-ca` and `--tls-server-name`.
static TLS: std::sync::OnceLock<Option<(PathBuf, Option<String>)>> = std::sync::OnceLock::new();

/// How client subcommands connect to `addr`: `--token`, `--tls-ca`.
pub fn connect_options(
    addr: std::net::SocketAddr,
) -> Result<bida::client::ConnectOptions, bida::client::ClientError> {
    let tls = match TLS.get().and_then(|t| t.as_ref()) {
        None => None,
        Some((ca, name)) => {
            let name = name.clone().unwrap_or_else(|| addr.ip().to_string());
            Some(
                bida::tls::ClientTls::from_ca_file(ca, &name)
                    .map_err(|e| bida::client::ClientError::Tls(std::sync::Arc::new(e)))?,
            )
        }
    };
    Ok(bida::client::ConnectOptions {
        token: token().map(str::to_owned),
        tls,
    })
}

/// Connects a client subcommand to `addr`, with `--token` and `--tls-ca`
/// if given.
pub async fn connect(
    addr: std::net::SocketAddr,
) -> Result<std::sync::Arc<bida::client::Client>, bida::client::ClientError> {
    bida::client::Client::connect_with(addr, connect_options(addr)?).await
}

pub fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let client = match &cli.command {
        Command::Produce(a) => Some(&a.client),
        Command::Consume(a) => Some(&a.client),
        Command::Topics(a) => Some(&a.client),
        Command::Bench(a) => Some(&a.client),
        Command::Attack(a) => Some(&a.client),
        _ => None,
    };
    if let Some(c) = client {
        let _ = TOKEN.set(c.token.clone().filter(|t| !t.is_empty()));
        let _ = TLS.set(c.tls_ca.clone().map(|ca| (ca, c.tls_server_name.clone())));
    }
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Produce(args) => produce::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Topics(args) => topics::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Repair(args) => repair::run(args),
        Command::Append(args) => append::run(args),
        Command::Read(args) => read::run(args),
        Command::Torture(args) => torture::run(args),
        Command::Attack(args) => attack::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    fn long_flags(subcommand: &str) -> Vec<String> {
        let mut cli = Cli::command();
        cli.build();
        let sub = cli
            .find_subcommand(subcommand)
            .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
        sub.get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }

    #[test]
    fn every_config_file_key_has_a_serve_flag() {
        let flags = long_flags("serve");
        for key in bida::broker::config::FILE_KEYS {
            let flag = key.replace('_', "-");
            let flag = match flag.as_str() {
                "data-dir" => "data".to_string(),
                _ => flag,
            };
            assert!(
                flags.contains(&flag),
                "config key {key} has no `bida serve --{flag}`"
            );
        }
    }

    #[test]
    fn each_subcommand_shows_only_the_options_it_uses() {
        let client_only = ["token", "tls-ca", "tls-server-name"];
        for sub in ["serve", "inspect", "append", "read", "torture"] {
            let flags = long_flags(sub);
            for f in client_only {
                assert!(!flags.iter().any(|x| x == f), "bida {sub} lists --{f}");
            }
        }
        for sub in ["produce", "consume", "topics", "bench", "attack"] {
            let flags = long_flags(sub);
            for f in client_only {
                assert!(flags.iter().any(|x| x == f), "bida {sub} lacks --{f}");
            }
        }
    }
}
