//! Every knob of the broker, with its default. A TOML file (`bida serve
//! --config FILE`) may set any of them by the same names; command-line flags
//! override the file.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::log::{Clock, FlushJournal, FlushMode, Preallocate, WritePath};
use crate::protocol::body::{Backoff, PARTITIONS_MAX};
use crate::protocol::FRAME_BYTES_MAX;

/// The port `bida serve` listens on by default.
pub const DEFAULT_PORT: u16 = 7878;
/// The admin HTTP listener's default port.
pub const DEFAULT_ADMIN_PORT: u16 = 7879;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Default: `./bida-data`.
    pub data_dir: PathBuf,
    /// Default: `127.0.0.1:7878`.
    pub listen: SocketAddr,
    /// The admin HTTP listener (`/metrics`); `None` turns it off.
    /// Default: `127.0.0.1:7879`.
    pub admin_listen: Option<SocketAddr>,
    /// The Kafka-protocol listener (docs/KAFKA.md); `None` turns it off.
    /// Default: off.
    pub kafka_listen: Option<SocketAddr>,
    /// The `host:port` Kafka clients are told to connect to (Metadata,
    /// FindCoordinator): set it when they reach the listener through a
    /// proxy, NAT or a container's port mapping. Default: the Kafka
    /// listener's own address.
    pub kafka_advertise: Option<(String, u16)>,
    /// When set, every client connection must present it in HELLO, and
    /// every admin request (console, JSON API, `/metrics`) as
    /// `Authorization: Bearer TOKEN`. Default: none (anyone who can reach
    /// the listeners may use them; both listen on 127.0.0.1 by default).
    pub auth_token: Option<String>,
    /// Default: `FlushMode::Sync` (a produce is acked once durable).
    pub flush: FlushMode,
    /// How partitions write (see `log::WritePath`). Default: `Pwrite`, in
    /// both flush modes: a broker shares the machine's cores with the network
    /// and its clients, and the mmap path's page zero-fill (on the prefault
    /// thread) costs more CPU than it saves the appender (docs/BENCHMARKS.md).
    pub write_path: WritePath,
    /// How each partition's next segment file is prepared (see
    /// `log::Preallocate`). Default: `Fallocate`.
    pub preallocate: Preallocate,
    /// Segment size of every partition. Default: 256 MiB.
    pub segment_bytes: u64,
    /// Largest record. Default: 1 MiB.
    pub record_bytes_max: u32,
    /// Inner-msg-ids remembered per partition for deduplication.
    /// Default: 2,000,000.
    pub dedup_window_ids: u64,
    /// Default: 600,000 (10 minutes).
    pub dedup_window_ms: u64,
    /// Sealed segments older than this are deleted. Default: 7 days.
    pub retention_ms: Option<u64>,
    /// A partition's oldest sealed segments are deleted beyond this size.
    /// Default: none.
    pub retention_bytes: Option<u64>,
    /// How often each partition applies retention. Default: 10,000 ms.
    pub retention_check_interval_ms: u64,
    /// Partitions of a topic created without a count. Default: 1.
    pub default_partitions: u32,
    /// The most partitions a topic may be created with. Default: 10,000
    /// (at most 100,000, what the wire carries).
    pub partitions_max: u32,
    /// Memory all partitions' dedup windows share, in bytes: each busy
    /// partition's window holds at most its share (this budget split
    /// evenly among the partitions holding any id, at least 1,024 ids, at
    /// most `dedup_window_ids`). Default: 512 MiB (about 15 M ids).
    pub dedup_memory_max: u64,
    /// The most segment files the broker keeps open at once; the least
    /// recently used ones whose writes are all synced are closed and opened
    /// again when next used. Default: 512, half the usual soft limit of
    /// 1,024 descriptors (`ulimit -n`), the rest left to connections.
    pub open_files_max: u32,
    /// Producing to an unknown topic creates it. Default: true.
    pub auto_create_topics: bool,
    /// A delivery not acked within this is redelivered. Default: 30,000 ms.
    pub ack_timeout_ms: u32,
    /// Deliveries before a message goes to `<topic>.dlq`. Default: 16.
    pub max_deliveries: u16,
    /// Delay before a redelivery. Default: exponential from 1 s, doubling,
    /// at most 60 s.
    pub backoff: Backoff,
    /// Messages delivered to a group and not yet acked, per partition;
    /// beyond it only redeliveries are sent. Default: 100,000.
    pub unacked_max: u64,
    /// Connections accepted at once; more are refused with an error frame.
    /// Default: 10,000.
    pub max_connections: usize,
    /// New connections accepted per second, in a burst of as many; more
    /// wait in the kernel's listen backlog (and past it retry their
    /// connect), so a connection flood costs the broker at most this many
    /// accepts a second and never slows established connections. 0: no
    /// limit. Default: 1,000.
    pub accept_rate_max: u32,
    /// Requests a connection may have in flight; the broker stops reading
    /// from it until one completes. Default: 1,024.
    pub inflight_max: u32,
    /// A connection with no request, no request in flight and no
    /// subscription for this long is closed. Default: 300,000 ms.
    pub idle_timeout_ms: u64,
    /// Longest frame a client may send (its `length` field); longer gets
    /// FRAME_TOO_LARGE and a close. HELLO tells the client. 64 KiB ..=
    /// 16 MiB (`FRAME_BYTES_MAX`). Default: 16 MiB.
    pub frame_bytes_max: u32,
    /// A frame must arrive whole within this long of its first byte (or of
    /// the previous frame, when frames arrive back to back), and a reply
    /// the client does not read for this long closes the connection:
    /// trickled bytes and unread replies cannot hold a connection's memory.
    /// Default: 30,000 ms.
    pub frame_timeout_ms: u64,
    /// Bytes all connections together may hold of large frames (over
    /// 64 KiB) still arriving, taken 1 MiB at a time as bytes arrive; a
    /// connection waits for room before reading more of one, evicting
    /// connections whose large frame has stalled for 250 ms. Bounds the memory
    /// of clients that announce huge frames and send them slowly or not at
    /// all. An eighth of it is reserved for frames of at most 1 MiB, so
    /// those need not wait for stalled huge ones to be evicted. At least
    /// `FRAME_BYTES_MAX` (16 MiB). Default: 256 MiB.
    pub frame_memory_max: u64,
    /// A PEM certificate chain and its PEM private key: with both, the
    /// client listener and the admin listener speak only TLS. Default:
    /// none (plain TCP).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The groups log is compacted past this size. Default: 64 MiB.
    pub groups_compact_bytes: u64,
    /// An undecided transaction is first asked back this long after its
    /// first half message was stored. Default: 6,000 ms.
    pub txn_check_after_ms: u64,
    /// Delay before asking again after an unanswered or "unknown" check;
    /// doubles with each check, at most 60 s. Default: 5,000 ms.
    pub txn_check_interval_ms: u64,
    /// Checks before an undecided transaction is rolled back. Default: 15.
    pub txn_check_max: u32,
    /// Undecided transactions held at once; more halves get BUSY.
    /// Default: 100,000.
    pub txn_open_max: usize,
    /// Delayed messages pending at once; more get BUSY. Default: 10,000,000
    /// (16 bytes of memory each).
    pub delayed_max: usize,
    /// The clock every log of the broker stamps and ages records by, and
    /// the schedule fires delayed messages and checks transactions by. Not a
    /// TOML key or flag: the system clock, or a manual one in tests.
    pub clock: Clock,
    /// Fault injection for the crash tests; none in production. Not a
    /// TOML key: hidden `bida serve` options that `bida torture` and the
    /// tests pass (docs/RELIABILITY.md).
    pub faults: Faults,
}

/// Faults the crash tests inject into a real broker process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Every completed flush of every log (topics, `_groups`,
    /// `_schedule`) is recorded here, for `bida torture --power-loss`.
    pub flush_journal: Option<FlushJournal>,
    /// The process aborts at this point of a transaction's decision.
    pub crash_at: Option<CrashPoint>,
}

/// Where a transactional decision can be cut short by an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after the decision is durable in the schedule log.
    TxnDecided,
    /// Right after a commit's messages reached their topics, before the
    /// schedule records that it is finished.
    TxnApplied,
}

impl CrashPoint {
    /// The name `--fault-crash-at` takes.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::TxnDecided => "txn-decided",
            CrashPoint::TxnApplied => "txn-applied",
        }
    }

    pub fn parse(s: &str) -> Result<CrashPoint, ConfigError> {
        match s {
            "txn-decided" => Ok(CrashPoint::TxnDecided),
            "txn-applied" => Ok(CrashPoint::TxnApplied),
            other => Err(ConfigError::UnknownChoice {
                key: "fault_crash_at",
                allowed: &["txn-decided", "txn-applied"],
                got: other.to_owned(),
            }),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("./bida-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT))),
            kafka_listen: None,
            kafka_advertise: None,
            auth_token: None,
            flush: FlushMode::Sync,
            write_path: WritePath::Pwrite,
            preallocate: Preallocate::Fallocate,
            segment_bytes: 256 << 20,
            record_bytes_max: 1 << 20,
            dedup_window_ids: 2_000_000,
            dedup_window_ms: 600_000,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            retention_check_interval_ms: 10_000,
            default_partitions: 1,
            partitions_max: 10_000,
            open_files_max: 512,
            dedup_memory_max: 512 << 20,
            auto_create_topics: true,
            ack_timeout_ms: 30_000,
            max_deliveries: 16,
            backoff: Backoff::Exponential {
                base_ms: 1000,
                max_ms: 60_000,
                factor_percent: 200,
            },
            unacked_max: 100_000,
            max_connections: 10_000,
            accept_rate_max: 1_000,
            inflight_max: 1024,
            idle_timeout_ms: 300_000,
            frame_bytes_max: FRAME_BYTES_MAX as u32,
            frame_timeout_ms: 30_000,
            frame_memory_max: 256 << 20,
            tls_cert: None,
            tls_key: None,
            groups_compact_bytes: 64 << 20,
            txn_check_after_ms: 6_000,
            txn_check_interval_ms: 5_000,
            txn_check_max: 15,
            txn_open_max: 100_000,
            delayed_max: 10_000_000,
            clock: Clock::system(),
            faults: Faults::default(),
        }
    }
}

/// Why a broker setting is refused. Each names the setting by its config
/// file key (the `bida serve` flag is the same in kebab case).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key} must be {min}..={max}, got {got}")]
    OutOfRange {
        key: &'static str,
        min: u64,
        max: u64,
        got: u64,
    },
    #[error("{key} must be one of {allowed:?}, got {got:?}")]
    UnknownChoice {
        key: &'static str,
        allowed: &'static [&'static str],
        got: String,
    },
    #[error("auth_token must be 1 to {TOKEN_BYTES_MAX} visible ASCII characters (no spaces), got {len} bytes")]
    BadToken { len: usize },
    #[error("{first} and {second} go together: give both or neither")]
    Together {
        first: &'static str,
        second: &'static str,
    },
    #[error("{key} must be an address or \"off\", got {got:?}: {source}")]
    BadAddress {
        key: &'static str,
        got: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("kafka_advertise must be HOST:PORT (a port 1..=65535) or empty, got {got:?}")]
    BadAdvertise { got: String },
    #[error("{0}")]
    File(#[from] toml::de::Error),
}

fn at_least(key: &'static str, min: u64, got: u64) -> Result<(), ConfigError> {
    in_range(key, min, u64::MAX, got)
}

fn in_range(key: &'static str, min: u64, max: u64, got: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&got) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange { key, min, max, got })
    }
}

impl BrokerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "partitions_max",
            1,
            u64::from(PARTITIONS_MAX),
            u64::from(self.partitions_max),
        )?;
        in_range(
            "default_partitions",
            1,
            u64::from(self.partitions_max),
            u64::from(self.default_partitions),
        )?;
        at_least("max_deliveries", 1, u64::from(self.max_deliveries))?;
        at_least("open_files_max", 16, u64::from(self.open_files_max))?;
        // A record must fit in a segment; said at start, not at the first
        // topic the broker creates.
        at_least(
            "segment_bytes",
            u64::from(self.record_bytes_max),
            self.segment_bytes,
        )?;
        at_least("dedup_memory_max", 1 << 20, self.dedup_memory_max)?;
        at_least(
            "retention_check_interval_ms",
            1,
            self.retention_check_interval_ms,
        )?;
        at_least("ack_timeout_ms", 1, u64::from(self.ack_timeout_ms))?;
        if let Some(t) = &self.auth_token {
            check_token(t)?;
        }
        in_range("unacked_max", 1, u64::from(u32::MAX), self.unacked_max)?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Together {
                first: "tls_cert",
                second: "tls_key",
            });
        }
        in_range(
            "frame_bytes_max",
            64 << 10,
            FRAME_BYTES_MAX as u64,
            u64::from(self.frame_bytes_max),
        )?;
        at_least("frame_timeout_ms", 1, self.frame_timeout_ms)?;
        at_least(
            "frame_memory_max",
            FRAME_BYTES_MAX as u64,
            self.frame_memory_max,
        )?;
        at_least("max_connections", 1, self.max_connections as u64)?;
        at_least("inflight_max", 1, self.inflight_max as u64)?;
        at_least("txn_check_interval_ms", 1, self.txn_check_interval_ms)?;
        at_least("txn_check_max", 1, u64::from(self.txn_check_max))?;
        at_least("txn_open_max", 1, self.txn_open_max as u64)?;
        if let Backoff::Exponential {
            base_ms,
            max_ms,
            factor_percent,
        } = self.backoff
        {
            at_least("backoff.factor_percent", 100, u64::from(factor_percent))?;
            // max_ms >= base_ms
            at_least("backoff.max_ms", u64::from(base_ms), u64::from(max_ms))?;
        }
        Ok(())
    }

    /// Applies the settings of a TOML config file.
    pub fn apply_file(&mut self, text: &str) -> Result<(), ConfigError> {
        let f: FileConfig = toml::from_str(text)?;
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = f.$field { self.$field = v; })* };
        }
        set!(
            data_dir,
            listen,
            segment_bytes,
            record_bytes_max,
            dedup_window_ids,
            dedup_window_ms,
            retention_check_interval_ms,
            default_partitions,
            partitions_max,
            open_files_max,
            dedup_memory_max,
            auto_create_topics,
            ack_timeout_ms,
            max_deliveries,
            unacked_max,
            max_connections,
            accept_rate_max,
            inflight_max,
            idle_timeout_ms,
            frame_bytes_max,
            frame_timeout_ms,
            frame_memory_max,
            groups_compact_bytes,
            txn_check_after_ms,
            txn_check_interval_ms,
            txn_check_max,
            txn_open_max,
            delayed_max
        );
        if let Some(v) = f.tls_cert {
            self.tls_cert = (!v.as_os_str().is_empty()).then_some(v);
        }
        if let Some(v) = f.tls_key {
            self.tls_key = (!v.as_os_str().is_empty()).then_some(v);
        }
        if let Some(v) = f.auth_token {
            self.auth_token = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = f.admin_listen {
            self.admin_listen = parse_admin_listen(&v)?;
        }
        if let Some(v) = f.kafka_listen {
            self.kafka_listen = parse_listen("kafka_listen", &v)?;
        }
        if let Some(v) = f.kafka_advertise {
            self.kafka_advertise = parse_advertise(&v)?;
        }
        if let Some(v) = f.retention_ms {
            self.retention_ms = (v > 0).then_some(v);
        }
        if let Some(v) = f.retention_bytes {
            self.retention_bytes = (v > 0).then_some(v);
        }
        if let Some(flush) = f.flush {
            self.flush = parse_flush(&flush, f.flush_interval_ms, f.flush_bytes)?;
        }
        if let Some(w) = f.write_path {
            self.write_path = parse_write_path(&w)?;
        }
        if let Some(p) = f.preallocate {
            self.preallocate = parse_preallocate(&p)?;
        }
        if let Some(b) = f.backoff {
            self.backoff = match b.kind.as_str() {
                "fixed" => Backoff::Fixed {
                    delay_ms: b.base_ms.unwrap_or(1000),
                },
                "exponential" => Backoff::Exponential {
                    base_ms: b.base_ms.unwrap_or(1000),
                    max_ms: b.max_ms.unwrap_or(60_000),
                    factor_percent: b.factor_percent.unwrap_or(200),
                },
                k => {
                    return Err(ConfigError::UnknownChoice {
                        key: "backoff.kind",
                        allowed: &["fixed", "exponential"],
                        got: k.to_owned(),
                    })
                }
            };
        }
        self.validate()
    }
}

/// `sync`, or `async` with its interval and byte threshold (defaults 100 ms
/// and 16 MiB).
pub fn parse_flush(
    mode: &str,
    interval_ms: Option<u64>,
    bytes: Option<u64>,
) -> Result<FlushMode, ConfigError> {
    match mode {
        "sync" => Ok(FlushMode::Sync),
        "async" => Ok(FlushMode::Async {
            interval_ms: interval_ms.unwrap_or(100),
            bytes: bytes.unwrap_or(16 << 20),
        }),
        other => Err(ConfigError::UnknownChoice {
            key: "flush",
            allowed: &["sync", "async"],
            got: other.to_owned(),
        }),
    }
}

/// Longest access token.
pub const TOKEN_BYTES_MAX: usize = 256;

/// A token is 1..=256 visible ASCII characters (it travels in an HTTP
/// header and in HELLO).
pub fn check_token(t: &str) -> Result<(), ConfigError> {
    if t.is_empty() || t.len() > TOKEN_BYTES_MAX || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::BadToken { len: t.len() });
    }
    Ok(())
}

/// Compares two secrets without stopping at the first difference.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An address, or `off`.
pub fn parse_admin_listen(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    parse_listen("admin_listen", s)
}

/// The address of listener `key`, or `off`.
pub fn parse_listen(key: &'static str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|source| ConfigError::BadAddress {
            key,
            got: s.to_owned(),
            source,
        })
}

/// `HOST:PORT` (a name, an IPv4 address, or `[IPv6]`), or empty for none.
pub fn parse_advertise(s: &str) -> Result<Option<(String, u16)>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || ConfigError::BadAdvertise { got: s.to_owned() };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let visible = |c: char| c.is_ascii_graphic() && !matches!(c, '[' | ']' | '/');
    if port == 0 || host.is_empty() || host.len() > 255 || !host.chars().all(visible) {
        return Err(bad());
    }
    Ok(Some((host.to_owned(), port)))
}

/// `fallocate` or `zeroes`.
pub fn parse_preallocate(s: &str) -> Result<Preallocate, ConfigError> {
    match s {
        "fallocate" => Ok(Preallocate::Fallocate),
        "zeroes" => Ok(Preallocate::Zeroes),
        other => Err(ConfigError::UnknownChoice {
            key: "preallocate",
            allowed: &["fallocate", "zeroes"],
            got: other.to_owned(),
        }),
    }
}

/// `auto`, `pwrite` or `mmap`.
pub fn parse_write_path(s: &str) -> Result<WritePath, ConfigError> {
    match s {
        "auto" => Ok(WritePath::Auto),
        "pwrite" => Ok(WritePath::Pwrite),
        "mmap" => Ok(WritePath::Mmap),
        other => Err(ConfigError::UnknownChoice {
            key: "write_path",
            allowed: &["auto", "pwrite", "mmap"],
            got: other.to_owned(),
        }),
    }
}

/// Every top-level key of the config file (docs/bida.example.toml shows
/// each with its default). Each has a `bida serve` flag of the same name
/// in kebab case; the `[backoff]` table is the only file-only setting.
pub const FILE_KEYS: &[&str] = &[
    "write_path",
    "preallocate",
    "data_dir",
    "listen",
    "admin_listen",
    "kafka_listen",
    "kafka_advertise",
    "auth_token",
    "flush",
    "flush_interval_ms",
    "flush_bytes",
    "segment_bytes",
    "record_bytes_max",
    "dedup_window_ids",
    "dedup_window_ms",
    "retention_ms",
    "retention_bytes",
    "retention_check_interval_ms",
    "default_partitions",
    "partitions_max",
    "open_files_max",
    "dedup_memory_max",
    "auto_create_topics",
    "ack_timeout_ms",
    "max_deliveries",
    "unacked_max",
    "max_connections",
    "accept_rate_max",
    "inflight_max",
    "idle_timeout_ms",
    "frame_bytes_max",
    "frame_timeout_ms",
    "frame_memory_max",
    "tls_cert",
    "tls_key",
    "groups_compact_bytes",
    "txn_check_after_ms",
    "txn_check_interval_ms",
    "txn_check_max",
    "txn_open_max",
    "delayed_max",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    write_path: Option<String>,
    preallocate: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    admin_listen: Option<String>,
    kafka_listen: Option<String>,
    kafka_advertise: Option<String>,
    auth_token: Option<String>,
    flush: Option<String>,
    flush_interval_ms: Option<u64>,
    flush_bytes: Option<u64>,
    segment_bytes: Option<u64>,
    record_bytes_max: Option<u32>,
    dedup_window_ids: Option<u64>,
    dedup_window_ms: Option<u64>,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    retention_check_interval_ms: Option<u64>,
    default_partitions: Option<u32>,
    partitions_max: Option<u32>,
    open_files_max: Option<u32>,
    dedup_memory_max: Option<u64>,
    auto_create_topics: Option<bool>,
    ack_timeout_ms: Option<u32>,
    max_deliveries: Option<u16>,
    backoff: Option<FileBackoff>,
    unacked_max: Option<u64>,
    max_connections: Option<usize>,
    accept_rate_max: Option<u32>,
    inflight_max: Option<u32>,
    idle_timeout_ms: Option<u64>,
    frame_bytes_max: Option<u32>,
    frame_timeout_ms: Option<u64>,
    frame_memory_max: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    groups_compact_bytes: Option<u64>,
    txn_check_after_ms: Option<u64>,
    txn_check_interval_ms: Option<u64>,
    txn_check_max: Option<u32>,
    txn_open_max: Option<usize>,
    delayed_max: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackoff {
    kind: String,
    base_ms: Option<u32>,
    max_ms: Option<u32>,
    factor_percent: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_states_every_default() {
        let mut c = BrokerConfig::default();
        c.apply_file(include_str!("../../docs/bida.example.toml"))
            .unwrap();
        assert_eq!(c, BrokerConfig::default());
        // And it names every key the file accepts.
        let example = include_str!("../../docs/bida.example.toml");
        for key in FILE_KEYS {
            assert!(
                example.lines().any(|l| l.starts_with(&format!("{key} ="))),
                "docs/bida.example.toml lacks {key}"
            );
        }
    }

    #[test]
    fn kafka_advertise_is_host_and_port() {
        assert_eq!(parse_advertise("").unwrap(), None);
        assert_eq!(
            parse_advertise("kafka.example:9092").unwrap(),
            Some(("kafka.example".to_owned(), 9092))
        );
        assert_eq!(
            parse_advertise("[::1]:19092").unwrap(),
            Some(("::1".to_owned(), 19092))
        );
        for bad in [
            "kafka.example",
            ":9092",
            "h:0",
            "h:70000",
            "h:x",
            "a b:1",
            "[]:1",
        ] {
            assert!(
                matches!(parse_advertise(bad), Err(ConfigError::BadAdvertise { .. })),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = BrokerConfig::default()
            .apply_file("max_deliveries = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_deliveries"), "{err}");
        let err = BrokerConfig::default()
            .apply_file("colour = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = BrokerConfig::default()
            .apply_file("admin_listen = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin_listen"), "{err}");
        let err = BrokerConfig::default()
            .apply_file("auth_token = \"two words\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth_token"), "{err}");
        let mut c = BrokerConfig::default();
        c.apply_file("auth_token = \"s3cret\"").unwrap();
        assert_eq!(c.auth_token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let mut c = BrokerConfig::default();
        c.apply_file(
            "listen = \"127.0.0.1:9000\"\nflush = \"async\"\nflush_interval_ms = 5\nmax_deliveries = 3\n[backoff]\nkind = \"fixed\"\nbase_ms = 10\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(
            c.flush,
            FlushMode::Async {
                interval_ms: 5,
                bytes: 16 << 20
            }
        );
        assert_eq!(c.max_deliveries, 3);
        assert_eq!(c.backoff, Backoff::Fixed { delay_ms: 10 });
        assert!(BrokerConfig::default().apply_file("colour = 1").is_err());
        assert!(BrokerConfig::default()
            .apply_file("max_deliveries = 0")
            .is_err());
    }
}
