//! `bida serve`: run the broker until SIGINT or SIGTERM, then flush every
//! log and write the clean-shutdown markers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bida::broker::config::parse_flush;
use bida::broker::{Broker, BrokerConfig};
use bida::server::{self, admin};

use super::FlushArg;

/// Flags override the config file, which overrides the defaults.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Data directory [default: ./bida-data]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port, printed at start
    /// [default: 127.0.0.1:7878]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listener (`/metrics`), or `off`; port 0 picks a free
    /// port, printed at start [default: 127.0.0.1:7879]
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// The Kafka-protocol listener (docs/KAFKA.md), e.g. 127.0.0.1:9092;
    /// port 0 picks a free port, printed at start [default: off]
    #[arg(long)]
    pub kafka_listen: Option<String>,
    /// HOST:PORT Kafka clients are told to connect to, when they reach the
    /// listener through a proxy or NAT [default: the listener's address]
    #[arg(long)]
    pub kafka_advertise: Option<String>,
    /// Require this token: in HELLO from clients, as `Authorization:
    /// Bearer TOKEN` on the admin listener [default: none]
    #[arg(long, env = "BIDA_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// PEM certificate chain: with --tls-key, the client and admin
    /// listeners speak only TLS [default: none]
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [default: none]
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// When a produce is acked: sync = once durable, async = at once,
    /// flushed in the background [default: sync]
    #[arg(long, value_enum)]
    pub flush: Option<FlushArg>,
    /// Async flush: flush at least this often [default: 100]
    #[arg(long)]
    pub flush_interval_ms: Option<u64>,
    /// Async flush: flush after this many bytes [default: 16777216]
    #[arg(long)]
    pub flush_bytes: Option<u64>,
    /// How partitions write: pwrite (staged, one pwrite per batch) or mmap
    /// (copied into the shared map); auto = pwrite under sync, mmap under
    /// async [default: pwrite]
    #[arg(long, value_enum)]
    pub write_path: Option<super::WritePathArg>,
    /// How the next segment file is prepared: fallocate, or zeroes (also
    /// written with zeros, so each fsync writes only data; doubles the disk
    /// writes) [default: fallocate]
    #[arg(long, value_enum)]
    pub preallocate: Option<super::PreallocateArg>,
    /// A TOML file setting any broker option by its name in
    /// src/broker/config.rs (e.g. `flush = "async"`, `max_deliveries = 5`)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Segment size of each partition [default: 268435456]
    #[arg(long)]
    pub segment_bytes: Option<u64>,
    /// Partitions of topics created without a count [default: 1]
    #[arg(long)]
    pub default_partitions: Option<u32>,
    /// The most partitions a topic may be created with [default: 10000]
    #[arg(long)]
    pub partitions_max: Option<u32>,
    /// The most segment files kept open at once [default: 512]
    #[arg(long)]
    pub open_files_max: Option<u32>,
    /// Memory all partitions' dedup windows share, bytes [default: 536870912]
    #[arg(long)]
    pub dedup_memory_max: Option<u64>,
    /// Unacked deliveries are redelivered after this [default: 30000]
    #[arg(long)]
    pub ack_timeout_ms: Option<u32>,
    /// Deliveries before a message goes to <topic>.dlq [default: 16]
    #[arg(long)]
    pub max_deliveries: Option<u16>,
    /// Most simultaneous connections [default: 10000]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// New connections accepted per second (a burst of as many); more wait
    /// in the kernel's backlog. 0: no limit [default: 1000]
    #[arg(long)]
    pub accept_rate_max: Option<u32>,
    /// Unanswered requests per connection before the broker stops reading
    /// it [default: 1024]
    #[arg(long)]
    pub inflight_max: Option<u32>,
    /// Close connections idle (nothing in flight, no subscription) this
    /// long [default: 300000]
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Longest frame a client may send, 65536..=16777216 [default:
    /// 16777216]
    #[arg(long)]
    pub frame_bytes_max: Option<u32>,
    /// A frame must arrive whole, and a reply be read by the client,
    /// within this many ms [default: 30000]
    #[arg(long)]
    pub frame_timeout_ms: Option<u64>,
    /// Bytes all connections may hold of large frames still arriving
    /// [default: 268435456]
    #[arg(long)]
    pub frame_memory_max: Option<u64>,
    /// Inner-msg-ids remembered per partition for dedup [default: 2000000]
    #[arg(long)]
    pub dedup_window_ids: Option<u64>,
    /// First check-back of an undecided transaction after this many ms
    /// [default: 6000]
    #[arg(long)]
    pub txn_check_after_ms: Option<u64>,
    /// Delay between check-backs, doubling up to 60 s [default: 5000]
    #[arg(long)]
    pub txn_check_interval_ms: Option<u64>,
    /// Check-backs before an undecided transaction is rolled back
    /// [default: 15]
    #[arg(long)]
    pub txn_check_max: Option<u32>,
    /// Largest record accepted, header included [default: 1048576]
    #[arg(long)]
    pub record_bytes_max: Option<u32>,
    /// Age in ms past which an inner-msg-id leaves the dedup window
    /// [default: 600000]
    #[arg(long)]
    pub dedup_window_ms: Option<u64>,
    /// Delete sealed segments older than this many ms; 0: no age limit
    /// [default: 604800000]
    #[arg(long)]
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while a partition is larger than
    /// this; 0: no size limit [default: 0]
    #[arg(long)]
    pub retention_bytes: Option<u64>,
    /// How often retention is applied, in ms [default: 10000]
    #[arg(long)]
    pub retention_check_interval_ms: Option<u64>,
    /// Create a topic on its first produce or fetch [default: true]
    #[arg(long, value_name = "BOOL")]
    pub auto_create_topics: Option<bool>,
    /// Unacked deliveries a group may hold per partition [default: 100000]
    #[arg(long)]
    pub unacked_max: Option<u64>,
    /// Rewrite the groups log once it holds this many bytes
    /// [default: 67108864]
    #[arg(long)]
    pub groups_compact_bytes: Option<u64>,
    /// Undecided transactions held at once [default: 100000]
    #[arg(long)]
    pub txn_open_max: Option<usize>,
    /// Delayed messages pending at once [default: 10000000]
    #[arg(long)]
    pub delayed_max: Option<usize>,
    /// Crash tests only: append `<segment> <durable bytes>` to FILE after
    /// every completed flush (`bida torture --power-loss`;
    /// docs/RELIABILITY.md).
    #[arg(long, hide = true, value_name = "FILE")]
    pub fault_flush_journal: Option<PathBuf>,
    /// Crash tests only: abort at `txn-decided` or `txn-applied`
    /// (docs/RELIABILITY.md).
    #[arg(long, hide = true, value_name = "POINT")]
    pub fault_crash_at: Option<String>,
}

impl Args {
    pub fn config(&self) -> Result<BrokerConfig, String> {
        let mut c = BrokerConfig::default();
        if let Some(path) = &self.config {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            c.apply_file(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if let Some(v) = &self.data {
            c.data_dir = v.clone();
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.kafka_listen {
            c.kafka_listen =
                bida::broker::config::parse_listen("kafka_listen", v).map_err(|e| e.to_string())?;
        }
        if let Some(v) = &self.kafka_advertise {
            c.kafka_advertise =
                bida::broker::config::parse_advertise(v).map_err(|e| e.to_string())?;
        }
        if let Some(v) = &self.admin_listen {
            c.admin_listen =
                bida::broker::config::parse_admin_listen(v).map_err(|e| e.to_string())?;
        }
        if let Some(v) = &self.auth_token {
            c.auth_token = (!v.is_empty()).then(|| v.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.tls_cert = Some(cert.clone());
            c.tls_key = Some(key.clone());
        }
        if let Some(f) = self.flush {
            let mode = match f {
                FlushArg::Sync => "sync",
                FlushArg::Async => "async",
            };
            c.flush = parse_flush(mode, self.flush_interval_ms, self.flush_bytes)
                .map_err(|e| e.to_string())?;
        }
        if let Some(p) = self.preallocate {
            c.preallocate = match p {
                super::PreallocateArg::Fallocate => bida::log::Preallocate::Fallocate,
                super::PreallocateArg::Zeroes => bida::log::Preallocate::Zeroes,
            };
        }
        if let Some(w) = self.write_path {
            c.write_path = match w {
                super::WritePathArg::Auto => bida::log::WritePath::Auto,
                super::WritePathArg::Pwrite => bida::log::WritePath::Pwrite,
                super::WritePathArg::Mmap => bida::log::WritePath::Mmap,
            };
        }
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field = v; })* };
        }
        set!(
            segment_bytes,
            default_partitions,
            partitions_max,
            open_files_max,
            dedup_memory_max,
            ack_timeout_ms,
            max_deliveries,
            max_connections,
            accept_rate_max,
            inflight_max,
            idle_timeout_ms,
            frame_bytes_max,
            frame_timeout_ms,
            frame_memory_max,
            dedup_window_ids,
            record_bytes_max,
            dedup_window_ms,
            retention_check_interval_ms,
            auto_create_topics,
            unacked_max,
            groups_compact_bytes,
            txn_open_max,
            delayed_max,
            txn_check_after_ms,
            txn_check_interval_ms,
            txn_check_max
        );
        if let Some(v) = self.retention_ms {
            c.retention_ms = (v > 0).then_some(v);
        }
        if let Some(v) = self.retention_bytes {
            c.retention_bytes = (v > 0).then_some(v);
        }
        if let Some(path) = &self.fault_flush_journal {
            c.faults.flush_journal = Some(
                bida::log::FlushJournal::open(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            );
        }
        if let Some(at) = &self.fault_crash_at {
            c.faults.crash_at =
                Some(bida::broker::config::CrashPoint::parse(at).map_err(|e| e.to_string())?);
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// Lets the broker hold as many sockets as the hard limit allows.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = args.config()?;
    // A bad certificate or key stops the start, before any data is opened.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(bida::tls::acceptor(cert, key)?),
        _ => None,
    };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bida-net")
        .build()?;
    runtime.block_on(async move {
        let started = std::time::Instant::now();
        let broker = tokio::task::block_in_place(|| Broker::open(config.clone()))?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(
            %addr,
            data = %config.data_dir.display(),
            flush = ?config.flush,
            topics = broker.list_topics().len(),
            open_ms = started.elapsed().as_millis() as u64,
            "bida is serving"
        );
        // Tests and scripts read this line to learn the port.
        println!("bida: listening on {addr}");
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = match config.admin_listen {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("admin listener on {a}: {e}"))?;
                let stopped = async {
                    let _ = admin_stopped.await;
                };
                Some(match &tls {
                    None => {
                        println!("bida: admin on http://{}", l.local_addr()?);
                        tokio::spawn(admin::serve(broker.clone(), l, stopped))
                    }
                    Some(acceptor) => {
                        println!("bida: admin on https://{}", l.local_addr()?);
                        let handshake = std::time::Duration::from_millis(config.frame_timeout_ms);
                        let l = bida::tls::TlsListener::new(l, acceptor.clone(), handshake)?;
                        tokio::spawn(admin::serve(broker.clone(), l, stopped))
                    }
                })
            }
            None => None,
        };
        let (kafka_stop, kafka_stopped) = tokio::sync::oneshot::channel::<()>();
        let kafka = match config.kafka_listen {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("Kafka listener on {a}: {e}"))?;
                println!("bida: kafka on {}", l.local_addr()?);
                let stopped = async {
                    let _ = kafka_stopped.await;
                };
                Some(tokio::spawn(bida::kafka::serve(
                    broker.clone(),
                    l,
                    tls.clone(),
                    stopped,
                )))
            }
            None => None,
        };
        use std::io::Write;
        std::io::stdout().flush()?;
        server::serve(broker.clone(), listener, tls, shutdown_signal()).await;
        let _ = admin_stop.send(());
        let _ = kafka_stop.send(());
        if let Some(a) = admin {
            let _ = a.await;
        }
        if let Some(k) = kafka {
            let _ = k.await;
        }
        tracing::info!("stopping: flushing every log");
        let broker = Arc::clone(&broker);
        tokio::task::block_in_place(|| broker.close())?;
        tracing::info!("stopped cleanly");
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = term.recv() => tracing::info!("SIGTERM"),
    }
}
