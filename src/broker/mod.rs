//! The broker: topics of partitions (one [`Log`] each), consumer groups
//! with acks, redelivery and dead letters, delayed and half messages. It
//! knows nothing of sockets or frames: the server layer (`src/server/`)
//! speaks the wire and calls it.
//!
//! Data directory:
//!
//! ```text
//! DATA/
//!   topics/<topic>/topic.json      partitions and consumer settings
//!   topics/<topic>/<partition>/    one log (docs/FORMAT.md)
//!   _groups/                       acks of every group (group_store.rs)
//!   _schedule/                     delayed messages and transactions
//!                                  (schedule.rs)
//! ```

pub mod config;
pub mod dlq;
mod durability;
pub mod group;
pub mod group_store;
pub mod metrics;
pub mod partition;
pub mod schedule;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;

pub use config::{BrokerConfig, ConfigError};
use group::{DeadLetter, GroupPartitionState, Policy};
use group_store::{Collector, Entry, GroupKey, GroupStore, StoredGroup};
use metrics::BrokerMetrics;
pub use partition::Partition;
use schedule::Schedule;

use crate::log::record::{encode_headers, HeaderIter, InnerMsgId, Message};
use crate::log::{
    AppendOutcome, Appended, Background, DedupBudget, Disk, FileBudget, FlushMode, Log, Options,
    StorageError, Workers,
};
use crate::protocol::body::{
    self, check_name, encode_delivery, AckRequest, Backoff, GroupPartition, NameError,
    PartitionInfo, ProduceRequest, TopicConfig, TopicDescription, TopicSummary, ANY_PARTITION,
    NACK_DEFAULT_DELAY, PARTITIONS_MAX,
};
use crate::protocol::txn::{Decision, DelayedRequest, EndReply, HalfRequest, Placed};
use crate::protocol::{ErrorCode, KeyHash};
use crate::sync::{lock, read, write};

/// Header names on a dead-lettered message.
pub const DLQ_HEADER_TOPIC: &str = "bida-original-topic";
pub const DLQ_HEADER_PARTITION: &str = "bida-original-partition";
pub const DLQ_HEADER_OFFSET: &str = "bida-original-offset";
pub const DLQ_HEADER_ATTEMPTS: &str = "bida-attempts";
pub const DLQ_HEADER_GROUP: &str = "bida-group";
/// The dead-letter topic of `T` is `T` + this.
pub const DLQ_SUFFIX: &str = ".dlq";
/// How often the broker's timer looks for deliveries past their ack
/// deadline (so redelivery and the move to the DLQ are at most this late).
pub const EXPIRY_TICK_MS: u64 = 100;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {0:?} exists already")]
    TopicExists(String),
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    #[error("invalid broker config: {0}")]
    Config(#[from] ConfigError),
    #[error("topic {topic:?} has {partitions} partitions; there is no partition {partition}")]
    UnknownPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] Invalid),
    #[error("invalid message: {0}")]
    InvalidMessage(StorageError),
    #[error("unknown subscription {0}")]
    UnknownSubscription(u64),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A flush that was waited on failed (shared by every waiter).
    #[error("storage: {0}")]
    Durability(Arc<StorageError>),
    #[error("the broker is stopping")]
    Stopping,
    #[error("schedule entry {offset}: {problem}")]
    ScheduleEntry { offset: u64, problem: &'static str },
    #[error("a storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("unknown transaction {0:032x}")]
    UnknownTransaction(u128),
    #[error("{0}")]
    TransactionDecided(Decided),
    #[error("busy: {0}")]
    Busy(BusyReason),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("partition {partition} of topic {topic:?} is damaged and refuses writes ({cause}); stop the broker and run `bida repair {data_dir} --topic {topic} --partition {partition}`")]
    PartitionDamaged {
        topic: String,
        partition: u32,
        data_dir: PathBuf,
        cause: StorageError,
    },
}

/// Why a request that decodes is still refused (INVALID_REQUEST).
#[derive(Debug, Error)]
pub enum Invalid {
    #[error("a connection may hold at most {max} subscriptions")]
    TooManySubscriptions { max: usize },
    #[error("{name:?} is not a dead-letter topic (its name does not end in {DLQ_SUFFIX:?})")]
    NotDeadLetterTopic { name: String },
    #[error(
        "{topic} partition {partition} ends at offset {end}: no position past it, got {offset}"
    )]
    Offset {
        topic: String,
        partition: u32,
        offset: u64,
        end: u64,
    },
    #[error("{topic} partition {partition} has no message at offset {offset}")]
    NoMessageAt {
        topic: String,
        partition: u32,
        offset: u64,
    },
    #[error("the headers of the message to redrive: {0}")]
    Headers(#[source] crate::log::record::RecordError),
    #[error("{requested} partitions; at most {max}")]
    Partitions { requested: u32, max: u32 },
    #[error("transaction {txn_id:032x} belongs to producer group {group:?}")]
    OtherGroup { txn_id: u128, group: String },
    #[error("a transaction holds at most {max} messages")]
    TxnTooLarge { max: usize },
}

/// Why a transactional request comes too late (TRANSACTION_DECIDED).
#[derive(Debug, Error)]
pub enum Decided {
    #[error("transaction {txn_id:032x} is being decided; no more halves")]
    NoMoreHalves { txn_id: u128 },
    #[error("transaction {txn_id:032x} is already decided")]
    Already { txn_id: u128 },
    #[error("transaction {txn_id:032x} was already {}", schedule::state_name(*.state))]
    Otherwise {
        txn_id: u128,
        state: crate::protocol::txn::TxnState,
    },
}

/// Which bounded table is full, or what is in progress (BUSY, retriable).
#[derive(Debug, Error)]
pub enum BusyReason {
    #[error("{max} delayed messages are pending, the most the broker holds")]
    DelayedFull { max: usize },
    #[error("{max} transactions are open, the most the broker holds")]
    TransactionsFull { max: usize },
    #[error("transaction {txn_id:032x} is being decided")]
    Deciding { txn_id: u128 },
}

impl BrokerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::UnknownTopic(_) => ErrorCode::UnknownTopic,
            BrokerError::TopicExists(_) => ErrorCode::TopicExists,
            BrokerError::InvalidName(_) => ErrorCode::InvalidTopicName,
            BrokerError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
            BrokerError::InvalidRequest(_) | BrokerError::Config(_) => ErrorCode::InvalidRequest,
            BrokerError::InvalidMessage(_) => ErrorCode::InvalidMessage,
            BrokerError::UnknownSubscription(_) => ErrorCode::UnknownSubscription,
            BrokerError::UnknownTransaction(_) => ErrorCode::UnknownTransaction,
            BrokerError::TransactionDecided(_) => ErrorCode::TransactionDecided,
            BrokerError::Busy(_) => ErrorCode::Busy,
            BrokerError::PartitionDamaged { .. } => ErrorCode::PartitionDamaged,
            BrokerError::Storage(e) if e.is_disk_full() => ErrorCode::DiskFull,
            BrokerError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                ErrorCode::DiskFull
            }
            BrokerError::Durability(e) if e.is_disk_full() => ErrorCode::DiskFull,
            BrokerError::Storage(_)
            | BrokerError::Durability(_)
            | BrokerError::ScheduleEntry { .. }
            | BrokerError::Task(_)
            | BrokerError::Io { .. } => ErrorCode::Storage,
            BrokerError::Stopping => ErrorCode::ShuttingDown,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The settings stored in `topic.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct TopicMeta {
    partitions: u32,
    ack_timeout_ms: u32,
    max_deliveries: u16,
    backoff: BackoffMeta,
    /// Absent in the topic.json of topics created before murmur2 became
    /// the default: those keep the hash their producers already use.
    #[serde(default = "KeyHashMeta::legacy")]
    key_hash: KeyHashMeta,
    /// Delete sealed segments every group has committed past.
    #[serde(default)]
    retention_consumed: bool,
}

/// `key_hash` in topic.json.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum KeyHashMeta {
    Murmur2,
    LegacyFoldhash,
}

impl KeyHashMeta {
    fn legacy() -> Self {
        KeyHashMeta::LegacyFoldhash
    }
}

impl From<KeyHashMeta> for KeyHash {
    fn from(k: KeyHashMeta) -> Self {
        match k {
            KeyHashMeta::Murmur2 => KeyHash::Murmur2,
            KeyHashMeta::LegacyFoldhash => KeyHash::Legacy,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum BackoffMeta {
    Fixed {
        delay_ms: u32,
    },
    Exponential {
        base_ms: u32,
        max_ms: u32,
        factor_percent: u16,
    },
}

impl From<Backoff> for BackoffMeta {
    fn from(b: Backoff) -> Self {
        match b {
            Backoff::Fixed { delay_ms } => BackoffMeta::Fixed { delay_ms },
            Backoff::Exponential {
                base_ms,
                max_ms,
                factor_percent,
            } => BackoffMeta::Exponential {
                base_ms,
                max_ms,
                factor_percent,
            },
        }
    }
}

impl From<BackoffMeta> for Backoff {
    fn from(b: BackoffMeta) -> Self {
        match b {
            BackoffMeta::Fixed { delay_ms } => Backoff::Fixed { delay_ms },
            BackoffMeta::Exponential {
                base_ms,
                max_ms,
                factor_percent,
            } => Backoff::Exponential {
                base_ms,
                max_ms,
                factor_percent,
            },
        }
    }
}

pub struct Topic {
    pub name: String,
    meta: TopicMeta,
    pub partitions: Vec<Arc<Partition>>,
    /// Woken on every append, for long polls and subscriptions.
    pub appended: Notify,
    round_robin: AtomicU32,
}

impl Topic {
    pub fn policy(&self, unacked_max: u64) -> Policy {
        Policy {
            ack_timeout_ms: self.meta.ack_timeout_ms as u64,
            max_deliveries: self.meta.max_deliveries,
            backoff: self.meta.backoff.into(),
            unacked_max,
        }
    }

    pub fn summary(&self) -> TopicSummary {
        TopicSummary {
            topic: self.name.clone(),
            partitions: self.meta.partitions,
            config: TopicConfig {
                ack_timeout_ms: self.meta.ack_timeout_ms,
                max_deliveries: self.meta.max_deliveries,
                backoff: Some(self.meta.backoff.into()),
                retention_consumed: self.meta.retention_consumed,
            },
            key_hash: self.meta.key_hash.into(),
        }
    }

    /// The partition a key maps to in this topic.
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        KeyHash::from(self.meta.key_hash).partition(key, self.meta.partitions)
    }

    pub fn partition(&self, index: u32) -> Result<&Arc<Partition>, BrokerError> {
        self.partitions
            .get(index as usize)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: self.name.clone(),
                partition: index,
                partitions: self.meta.partitions,
            })
    }

    /// The next partition in round-robin order.
    pub fn next_round_robin(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % self.meta.partitions
    }
}

/// What the broker stored for one batch: the partition it went to, and
/// per message its offset and whether it was a duplicate (an inner-msg-id
/// stored before: the offset is the original's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceAck {
    pub partition: u32,
    pub outcomes: Vec<AppendOutcome>,
}

/// Runs a storage call that may block (fsyncs, creating files) from async
/// code: on tokio's multi-thread runtime with `block_in_place`, so the
/// worker's other tasks move to another thread meanwhile; anywhere else (no
/// runtime, a blocking thread, a current-thread runtime) as it is.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

type Topics = Arc<RwLock<HashMap<String, Arc<Topic>>>>;

pub struct Broker {
    config: BrokerConfig,
    /// Run every partition's background work and flushes: no partition
    /// has a thread of its own.
    workers: Arc<Workers>,
    /// Every partition's files, at most `open_files_max` open at once.
    files: FileBudget,
    /// The memory every partition's dedup window shares.
    dedup_budget: Arc<DedupBudget>,
    topics: Topics,
    groups: Mutex<Option<GroupStore>>,
    schedule: Arc<Schedule>,
    metrics: Arc<BrokerMetrics>,
    create_lock: Mutex<()>,
    stopping: std::sync::atomic::AtomicBool,
    /// Woken when the broker starts stopping.
    pub stop: Notify,
}

impl Broker {
    /// Opens every topic under `config.data_dir` (creating the directory),
    /// recovering each log, and restores every group's position.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>, BrokerError> {
        config.validate()?;
        let workers = Workers::start(Workers::default_threads(), "bida-io")
            .map_err(io_err(&config.data_dir))?;
        let files = FileBudget::new(Disk::os(), config.open_files_max as usize);
        let dedup_budget = Arc::new(DedupBudget::new(config.dedup_memory_max));
        let topics_dir = config.data_dir.join("topics");
        fs::create_dir_all(&topics_dir).map_err(io_err(&topics_dir))?;
        let topics: Topics = Arc::default();
        let collector_topics = topics.clone();
        let collector: Collector = Box::new(move || snapshot_groups(&collector_topics));
        let (store, stored) = GroupStore::open(
            config.data_dir.join("_groups"),
            group_store::StoreSetup {
                flush: config.flush,
                segment_bytes: config.segment_bytes.min(64 << 20),
                flush_journal: config.faults.flush_journal.clone(),
            },
            config.groups_compact_bytes,
            collector,
        )?;
        let mut schedule_options = log_options(&config, &workers, &files);
        schedule_options.dedup_budget = None;
        // A scheduled message is the user's record plus a small wrapper;
        // its segments are at most 64 MiB (a small disk holds them) and
        // always hold the largest one.
        schedule_options.record_bytes_max = config.record_bytes_max.saturating_add(1024);
        schedule_options.segment_bytes = config
            .segment_bytes
            .min(64 << 20)
            .max(schedule_options.record_bytes_max as u64);
        schedule_options.retention.age_ms_max = None;
        schedule_options.retention.bytes_max = None;
        let schedule = Arc::new(Schedule::open(
            config.data_dir.join("_schedule"),
            schedule_options,
            schedule::Limits {
                check_after_ms: config.txn_check_after_ms,
                check_interval_ms: config.txn_check_interval_ms,
                check_max: config.txn_check_max,
                txn_open_max: config.txn_open_max,
                delayed_max: config.delayed_max,
                crash_at: config.faults.crash_at,
            },
        )?);
        let broker = Arc::new(Broker {
            config,
            workers,
            files,
            dedup_budget,
            topics,
            groups: Mutex::new(Some(store)),
            schedule,
            metrics: Arc::default(),
            create_lock: Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            stop: Notify::new(),
        });
        // Deletions a crash interrupted: their directories were renamed
        // away before anything else went.
        for entry in fs::read_dir(&topics_dir)
            .map_err(io_err(&topics_dir))?
            .flatten()
        {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(".deleted-"))
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let mut names: Vec<String> = fs::read_dir(&topics_dir)
            .map_err(io_err(&topics_dir))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("topic.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let partitions: usize = names
            .iter()
            .map(|n| {
                fs::read_dir(topics_dir.join(n)).map_or(0, |entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .filter(|e| {
                            e.file_name()
                                .to_str()
                                .is_some_and(|s| s.parse::<u32>().is_ok())
                        })
                        .count()
                })
            })
            .sum();
        broker.dedup_budget.expect_windows(partitions as u64);
        for name in names {
            let topic = broker.open_topic(&name, None)?;
            broker.restore_groups(&topic, &stored);
            write(&broker.topics).insert(name, topic);
        }
        broker.dedup_budget.expect_windows(0);
        // After the topics: the scheduler delivers into them.
        broker
            .schedule
            .start(Arc::downgrade(&broker))
            .map_err(io_err(&broker.config.data_dir))?;
        Ok(broker)
    }

    /// The memory every partition's dedup window shares.
    pub fn dedup_budget(&self) -> &DedupBudget {
        &self.dedup_budget
    }

    /// Segment files open now, and the most kept open.
    pub fn open_files(&self) -> (usize, usize) {
        (self.files.open_files(), self.files.max())
    }

    /// Delayed messages and transactions.
    pub fn schedule(&self) -> &Arc<Schedule> {
        &self.schedule
    }

    /// Counters and latency histograms (see `metrics.rs`).
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Tells long polls and subscriptions to end.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
        for t in read(&self.topics).values() {
            t.appended.notify_waiters();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Options of a partition's log: on the broker's workers, and with no
    /// lock file of its own (the `_groups` log's lock keeps a second broker
    /// out of the data directory).
    fn log_options(&self) -> Options {
        Options {
            lock_dir: false,
            dedup_budget: Some(Arc::clone(&self.dedup_budget)),
            ..log_options(&self.config, &self.workers, &self.files)
        }
    }

    /// Opens a topic's partitions; with `create`, first writes its
    /// `topic.json`.
    fn open_topic(&self, name: &str, create: Option<TopicMeta>) -> Result<Arc<Topic>, BrokerError> {
        let dir = self.config.data_dir.join("topics").join(name);
        let meta_path = dir.join("topic.json");
        let creating = create.is_some();
        let meta = match create {
            Some(meta) => {
                // Every partition's directory, then topic.json, then one
                // directory sync for all of them: a topic exists (is opened
                // at start) only once its file does, and a failure before
                // leaves nothing behind.
                let made = (|| -> std::io::Result<()> {
                    fs::create_dir_all(&dir)?;
                    for index in 0..meta.partitions {
                        match fs::create_dir(dir.join(index.to_string())) {
                            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                                return Err(e)
                            }
                            _ => {}
                        }
                    }
                    let tmp = dir.join("topic.json.tmp");
                    fs::write(&tmp, serde_json::to_vec_pretty(&meta)?)?;
                    fs::File::open(&tmp)?.sync_all()?;
                    fs::rename(&tmp, &meta_path)?;
                    fs::File::open(&dir)?.sync_all()?;
                    match dir.parent() {
                        Some(topics) => fs::File::open(topics)?.sync_all(),
                        None => Ok(()),
                    }
                })();
                if let Err(e) = made {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(io_err(&dir)(e));
                }
                meta
            }
            None => {
                let bytes = fs::read(&meta_path).map_err(io_err(&meta_path))?;
                let meta: TopicMeta = serde_json::from_slice(&bytes).map_err(|e| {
                    BrokerError::Storage(StorageError::Corrupt {
                        file: meta_path.clone(),
                        position: 0,
                        reason: e.to_string(),
                    })
                })?;
                if meta.partitions == 0 || meta.partitions > PARTITIONS_MAX {
                    return Err(BrokerError::Storage(StorageError::Corrupt {
                        file: meta_path.clone(),
                        position: 0,
                        reason: format!(
                            "{} partitions, expected 1..={PARTITIONS_MAX}",
                            meta.partitions
                        ),
                    }));
                }
                meta
            }
        };
        let mut partitions = Vec::with_capacity(meta.partitions as usize);
        let (started, mut unclean, mut truncated) = (std::time::Instant::now(), 0u32, 0u64);
        for index in 0..meta.partitions {
            let log_dir = dir.join(index.to_string());
            let log = match Log::open(&log_dir, self.log_options()) {
                Ok(log) => Arc::new(log),
                Err(e) if creating => {
                    // A new topic the disk had no room for: taken back whole.
                    drop(partitions);
                    let _ = fs::remove_dir_all(&dir);
                    return Err(e.into());
                }
                Err(e @ StorageError::Corrupt { .. }) => {
                    // Damaged data stops only this partition: it serves
                    // what lies before the damage and refuses writes.
                    tracing::error!(
                        topic = name,
                        partition = index,
                        error = %e,
                        "partition damaged: serving reads up to the damage, refusing writes; stop the broker and run `bida repair {} --topic {name} --partition {index}`",
                        self.config.data_dir.display()
                    );
                    let quarantine = Options {
                        recovery: crate::log::RecoveryMode::Quarantine,
                        ..self.log_options()
                    };
                    Arc::new(Log::open(&log_dir, quarantine)?)
                }
                Err(e) => return Err(e.into()),
            };
            let metrics = Arc::clone(&self.metrics);
            log.observe_flushes(Arc::new(move |d| metrics.flushed(d)));
            let report = log.recovery_report();
            unclean += u32::from(!report.created && !report.clean_shutdown);
            truncated += report.bytes_truncated;
            tracing::debug!(topic = name, partition = index, ?report, "partition open");
            partitions.push(Arc::new(Partition::new(index, log)));
        }
        if !creating {
            tracing::info!(
                topic = name,
                partitions = meta.partitions,
                recovered_after_unclean_shutdown = unclean,
                bytes_truncated = truncated,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "topic opened"
            );
        }
        Ok(Arc::new(Topic {
            name: name.to_owned(),
            meta,
            partitions,
            appended: Notify::new(),
            round_robin: AtomicU32::new(0),
        }))
    }

    fn restore_groups(&self, topic: &Topic, stored: &HashMap<GroupKey, StoredGroup>) {
        for ((t, p, g), s) in stored {
            if t != &topic.name {
                continue;
            }
            let Some(partition) = topic.partitions.get(*p as usize) else {
                continue;
            };
            let start = partition.log.start_offset();
            let acked: Vec<u64> = s.acked_above.iter().copied().collect();
            let mut state = GroupPartitionState::restore(s.committed, &acked, &s.delayed);
            state.skip_to(start);
            partition.groups().insert(g.clone(), state);
        }
    }

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        read(&self.topics)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    /// The topic, created with the defaults if it does not exist and
    /// `auto_create_topics` is on.
    pub fn topic_or_create(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        match self.topic(name) {
            Err(BrokerError::UnknownTopic(_)) if self.config.auto_create_topics => self
                .create_topic(&body::CreateTopic {
                    topic: name.to_owned(),
                    partitions: 0,
                    if_not_exists: true,
                    config: TopicConfig::default(),
                }),
            other => other,
        }
    }

    /// Creates a topic (or answers the existing one with `if_not_exists`).
    /// It creates and syncs files: from async code it runs with
    /// `block_in_place`.
    pub fn create_topic(&self, req: &body::CreateTopic) -> Result<Arc<Topic>, BrokerError> {
        off_worker(|| self.create_topic_named(req, true))
    }

    fn create_topic_named(
        &self,
        req: &body::CreateTopic,
        check: bool,
    ) -> Result<Arc<Topic>, BrokerError> {
        if check {
            check_name("topic", &req.topic).map_err(BrokerError::InvalidName)?;
        }
        let partitions = if req.partitions == 0 {
            self.config.default_partitions
        } else {
            req.partitions
        };
        if partitions > self.config.partitions_max {
            return Err(Invalid::Partitions {
                requested: partitions,
                max: self.config.partitions_max,
            }
            .into());
        }
        let _guard = lock(&self.create_lock);
        if let Ok(existing) = self.topic(&req.topic) {
            return if req.if_not_exists {
                Ok(existing)
            } else {
                Err(BrokerError::TopicExists(req.topic.clone()))
            };
        }
        let c = &req.config;
        let meta = TopicMeta {
            partitions,
            ack_timeout_ms: if c.ack_timeout_ms == 0 {
                self.config.ack_timeout_ms
            } else {
                c.ack_timeout_ms
            },
            max_deliveries: if c.max_deliveries == 0 {
                self.config.max_deliveries
            } else {
                c.max_deliveries
            },
            backoff: c.backoff.unwrap_or(self.config.backoff).into(),
            key_hash: KeyHashMeta::Murmur2,
            retention_consumed: c.retention_consumed,
        };
        let topic = self.open_topic(&req.topic, Some(meta))?;
        tracing::info!(topic = %req.topic, partitions, "topic created");
        write(&self.topics).insert(req.topic.clone(), topic.clone());
        Ok(topic)
    }

    pub fn list_topics(&self) -> Vec<TopicSummary> {
        let mut list: Vec<TopicSummary> =
            read(&self.topics).values().map(|t| t.summary()).collect();
        list.sort_by(|a, b| a.topic.cmp(&b.topic));
        list
    }

    pub fn describe_topic(&self, name: &str) -> Result<TopicDescription, BrokerError> {
        let topic = self.topic(name)?;
        let partitions = topic
            .partitions
            .iter()
            .map(|p| PartitionInfo {
                start: p.log.start_offset(),
                end: p.log.next_offset(),
                durable: p.log.durable_offset(),
            })
            .collect();
        let mut names = BTreeSet::new();
        for p in &topic.partitions {
            names.extend(p.groups().keys().cloned());
        }
        let groups = names
            .into_iter()
            .map(|g| {
                let positions = self.positions(&topic, &g);
                (g, positions)
            })
            .collect();
        Ok(TopicDescription {
            summary: topic.summary(),
            partitions,
            groups,
        })
    }

    /// A group's position on every partition of a topic.
    pub fn positions(&self, topic: &Topic, group: &str) -> Vec<GroupPartition> {
        topic
            .partitions
            .iter()
            .map(|p| {
                let end = p.log.next_offset();
                let groups = p.groups();
                match groups.get(group) {
                    Some(s) => GroupPartition {
                        committed: s.committed(),
                        next: s.next(),
                        end,
                        in_flight: s.in_flight(),
                    },
                    None => {
                        let start = p.log.start_offset();
                        GroupPartition {
                            committed: start,
                            next: start,
                            end,
                            in_flight: 0,
                        }
                    }
                }
            })
            .collect()
    }

    /// Stores a batch and answers once the flush policy is met: durable
    /// under sync flush, appended under async. The broker alone decides
    /// when a produce is acknowledged.
    ///
    /// The append happens in this call, before the future is first polled:
    /// a caller that starts produces in order stores them in that order
    /// (a connection's pipelined batches), and may await or spawn the
    /// answers as it likes. An append that may roll its segment (a roll
    /// flushes the old one and may create a file) runs with
    /// `block_in_place`, so it does not hold up the worker's other tasks.
    pub fn produce(
        &self,
        req: &ProduceRequest<'_>,
    ) -> impl Future<Output = Result<ProduceAck, BrokerError>> + Send + 'static {
        let started = Instant::now();
        let placed = self.append_produce(req);
        let sync = self.config.flush == FlushMode::Sync;
        let metrics = Arc::clone(&self.metrics);
        async move {
            let (partition, appended) = placed?;
            if sync {
                partition.durable(appended.durable_target()).await?;
            }
            metrics.produce_acked(started.elapsed());
            Ok(ProduceAck {
                partition: partition.index,
                outcomes: appended.outcomes,
            })
        }
    }

    /// The append of [`Broker::produce`].
    fn append_produce(
        &self,
        req: &ProduceRequest<'_>,
    ) -> Result<(Arc<Partition>, Appended), BrokerError> {
        let (topic, index) = self.resolve(req)?;
        let partition = topic.partition(index)?.clone();
        let log = &partition.log;
        let appended = match log.append_unless_roll(&req.messages) {
            Ok(Some(appended)) => Ok(appended),
            Ok(None) => off_worker(|| log.append(&req.messages)),
            Err(e) => Err(e),
        }
        .map_err(|e| match e {
            e @ StorageError::InvalidMessage { .. } => BrokerError::InvalidMessage(e),
            e if e.is_damaged() => BrokerError::PartitionDamaged {
                topic: topic.name.clone(),
                partition: partition.index,
                data_dir: self.config.data_dir.clone(),
                cause: e,
            },
            e => BrokerError::Storage(e),
        })?;
        topic.appended.notify_waiters();
        let (mut stored, mut bytes) = (0u64, 0u64);
        for (m, o) in req.messages.iter().zip(&appended.outcomes) {
            if !o.duplicate {
                stored += 1;
                bytes += m.payload.len() as u64;
            }
        }
        let duplicates = req.messages.len() as u64 - stored;
        self.metrics
            .produced(&topic.name, stored, bytes, duplicates);
        Ok((partition, appended))
    }

    /// The topic (created if allowed) and partition a batch goes to:
    /// ANY_PARTITION picks by the first message's key, else round-robin.
    fn resolve(&self, req: &ProduceRequest<'_>) -> Result<(Arc<Topic>, u32), BrokerError> {
        let topic = self.topic_or_create(req.topic)?;
        let index = if req.partition == ANY_PARTITION {
            match req.messages.first().and_then(|m| m.key) {
                Some(key) => topic.partition_for_key(key),
                None => topic.next_round_robin(),
            }
        } else {
            topic.partition(req.partition)?;
            req.partition
        };
        Ok((topic, index))
    }

    /// Stores a batch that becomes visible in its topic after `delay_ms`,
    /// answering like [`Broker::produce`] once the schedule log holds it as
    /// the flush policy requires (the store happens in this call).
    pub fn produce_delayed(
        &self,
        req: &DelayedRequest<'_>,
    ) -> impl Future<Output = Result<ProduceAck, BrokerError>> + Send + 'static {
        let placed = self.resolve(&req.produce).and_then(|(topic, index)| {
            let appended = off_worker(|| {
                self.schedule
                    .delay(&topic.name, index, req.delay_ms, &req.produce)
            })?;
            Ok((index, appended))
        });
        self.scheduled_ack(placed)
    }

    /// Stores half messages of a transaction, answering like
    /// [`Broker::produce_delayed`].
    pub fn produce_half(
        &self,
        req: &HalfRequest<'_>,
    ) -> impl Future<Output = Result<ProduceAck, BrokerError>> + Send + 'static {
        let placed = check_name("group", req.group)
            .map_err(BrokerError::InvalidName)
            .and_then(|()| self.resolve(&req.produce))
            .and_then(|(topic, index)| {
                let appended = off_worker(|| {
                    self.schedule
                        .half(req.group, req.txn_id, &topic.name, index, &req.produce)
                })?;
                Ok((index, appended))
            });
        self.scheduled_ack(placed)
    }

    /// The answer to a batch stored in the schedule log.
    fn scheduled_ack(
        &self,
        placed: Result<(u32, Appended), BrokerError>,
    ) -> impl Future<Output = Result<ProduceAck, BrokerError>> + Send + 'static {
        let sync = self.config.flush == FlushMode::Sync;
        let schedule = Arc::clone(&self.schedule);
        async move {
            let (partition, appended) = placed?;
            if sync {
                schedule.durable(appended.durable_target()).await?;
            }
            Ok(ProduceAck {
                partition,
                outcomes: appended.outcomes,
            })
        }
    }

    /// Ends a transaction: commits, rolls back, or (`Unknown`) leaves it
    /// for the check-backs. A decision is durable and a commit applied
    /// before the answer. Runs on a blocking thread: it appends to the
    /// schedule and to topics and waits for their flushes.
    pub async fn end_txn(
        self: &Arc<Self>,
        txn_id: u128,
        decision: Decision,
    ) -> Result<EndReply, BrokerError> {
        let broker = Arc::clone(self);
        tokio::task::spawn_blocking(move || broker.schedule.end(&broker, txn_id, decision)).await?
    }

    /// Registers where the check-backs of producer group `group` go.
    pub fn register_checks(
        &self,
        group: &str,
        sink: Box<dyn schedule::CheckSink>,
    ) -> Result<(), BrokerError> {
        check_name("group", group).map_err(BrokerError::InvalidName)?;
        self.schedule.register(group, sink);
        Ok(())
    }

    /// Appends messages stored in the schedule (fired delayed messages, a
    /// committed transaction) to their partition with their original ids,
    /// and waits for durability under sync flush. Blocking.
    pub(crate) fn append_stored(
        &self,
        topic: &str,
        partition: u32,
        messages: &[Message<'_>],
    ) -> Result<Vec<Placed>, BrokerError> {
        let t = self.topic_or_create(topic)?;
        let p = t.partition(partition)?.clone();
        let appended = p.log.append(messages)?;
        if self.config.flush == FlushMode::Sync {
            p.log.wait_durable(appended.durable_target())?;
        }
        t.appended.notify_waiters();
        Ok(appended
            .outcomes
            .iter()
            .map(|o| Placed {
                topic: topic.to_owned(),
                partition,
                offset: o.offset,
            })
            .collect())
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, Option<GroupStore>> {
        lock(&self.groups)
    }

    /// Delivers up to `max_messages` / `max_bytes` of `topic` to `group`,
    /// appending deliveries to `out` (a deliveries body whose count the
    /// caller patches). Due redeliveries come first, then new messages.
    /// Messages out of deliveries go to the dead-letter topic on the way.
    pub async fn poll(
        &self,
        topic: &Arc<Topic>,
        partition: u32,
        group: &str,
        max_messages: u32,
        max_bytes: u32,
        out: &mut Vec<u8>,
    ) -> Result<u32, BrokerError> {
        let indexes: Vec<u32> = if partition == ANY_PARTITION {
            let n = topic.meta.partitions;
            let first = topic.next_round_robin();
            (0..n).map(|i| (first + i) % n).collect()
        } else {
            topic.partition(partition)?;
            vec![partition]
        };
        let policy = topic.policy(self.config.unacked_max);
        let start_len = out.len();
        let mut count = 0u32;
        let (mut redelivered, mut delivered_bytes) = (0u64, 0u64);
        for index in indexes {
            if count >= max_messages || out.len() - start_len >= max_bytes as usize {
                break;
            }
            let p = &topic.partitions[index as usize];
            let mut joined = None;
            let scheduled;
            let dead = {
                let now = now_ms();
                let mut groups = p.groups();
                let state = match groups.get_mut(group) {
                    Some(s) => s,
                    None => {
                        let start = p.log.start_offset();
                        joined = Some(start);
                        groups
                            .entry(group.to_owned())
                            .or_insert(GroupPartitionState::new(start))
                    }
                };
                state.skip_to(p.log.start_offset());
                let dead = state.expire(now, &policy);
                scheduled = state.take_scheduled();
                let budget = |count: u32, out: &Vec<u8>| {
                    (
                        (max_messages - count) as usize,
                        (max_bytes as usize).saturating_sub(out.len() - start_len),
                    )
                };
                let (n, _) = budget(count, out);
                for (offset, attempt) in state.take_redeliveries(now, n, &policy) {
                    let batch = p.log.read(offset, 1, 1)?;
                    let first = batch.iter().next();
                    if let Some(record) = first {
                        let r = record?;
                        redelivered += 1;
                        delivered_bytes += r.payload.len() as u64;
                        encode_delivery(
                            out,
                            index,
                            r.offset,
                            attempt,
                            r.timestamp_ms,
                            r.id,
                            r.key.as_deref(),
                            &r.headers,
                            &r.payload,
                        );
                        count += 1;
                    }
                }
                let end = p.log.next_offset();
                let (n, bytes) = budget(count, out);
                let allowance = state.new_allowance(end, &policy).min(n as u64);
                if allowance > 0 && bytes > 0 {
                    let batch = p.log.read(state.next(), allowance as usize, bytes)?;
                    let mut delivered = 0u64;
                    for record in batch.iter() {
                        let r = record?;
                        delivered_bytes += r.payload.len() as u64;
                        encode_delivery(
                            out,
                            index,
                            r.offset,
                            1,
                            r.timestamp_ms,
                            r.id,
                            r.key.as_deref(),
                            &r.headers,
                            &r.payload,
                        );
                        delivered += 1;
                    }
                    state.mark_delivered(delivered, now, &policy);
                    count += delivered as u32;
                }
                dead
            };
            // Written after the group lock is released: the store's thread
            // takes group locks when it compacts, and its queue may be full.
            if let (Some(start), Some(store)) = (joined, self.groups().as_ref()) {
                store.write_nowait((&topic.name, index, group), &Entry::Join { start });
            }
            // Backoffs after timeouts, kept across a restart.
            if let (false, Some(store)) = (scheduled.is_empty(), self.groups().as_ref()) {
                store.write_nowait(
                    (&topic.name, index, group),
                    &Entry::Delays { delays: scheduled },
                );
            }
            if !dead.is_empty() {
                self.dead_letter(topic, p, group, dead).await?;
            }
        }
        if count > 0 {
            self.metrics
                .delivered(&topic.name, count as u64, delivered_bytes, redelivered);
        }
        Ok(count)
    }

    /// The broker's own timer: runs [`Broker::expire_deliveries`] every
    /// [`EXPIRY_TICK_MS`] until `stop` turns true (the server runs it while
    /// it serves).
    pub async fn run_expiry_timer(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(EXPIRY_TICK_MS));
        let mut last_retention = Instant::now();
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.expire_deliveries().await {
                tracing::warn!(error = %e, "expiring deliveries failed; trying again next tick");
            }
            if last_retention.elapsed().as_millis()
                >= u128::from(self.config.retention_check_interval_ms)
            {
                last_retention = Instant::now();
                let broker = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || broker.apply_consumed_retention()).await {
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "retention once consumed failed; trying again later")
                    }
                    Err(e) => tracing::warn!(error = %e, "retention once consumed did not run"),
                    Ok(Ok(_)) => {}
                }
            }
        }
    }

    /// Sets `group`'s position in a partition to `offset` (a Kafka
    /// OffsetCommit): everything below counts as consumed, its deliveries
    /// in flight there are forgotten. Returns once the position is durable
    /// in the groups log.
    pub async fn commit_offset(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        offset: u64,
    ) -> Result<(), BrokerError> {
        check_name("group", group).map_err(BrokerError::InvalidName)?;
        let t = self.topic(topic)?;
        let p = t.partition(partition)?;
        let end = p.log.next_offset();
        if offset > end {
            return Err(Invalid::Offset {
                topic: topic.to_owned(),
                partition,
                offset,
                end,
            }
            .into());
        }
        p.groups()
            .insert(group.to_owned(), GroupPartitionState::new(offset));
        let written = self.groups().as_ref().map(|store| {
            store.write(
                (topic, partition, group),
                &Entry::Snapshot {
                    committed: offset,
                    acked_above: Vec::new(),
                },
            )
        });
        if let Some(written) = written {
            written
                .await
                .map_err(|_| BrokerError::Stopping)?
                .map_err(BrokerError::Durability)?;
        }
        Ok(())
    }

    /// `group`'s committed position in a partition, if it has one.
    pub fn committed_offset(&self, topic: &str, partition: u32, group: &str) -> Option<u64> {
        let t = self.topic(topic).ok()?;
        let p = t.partition(partition).ok()?;
        let groups = p.groups();
        groups.get(group).map(GroupPartitionState::committed)
    }

    /// Every (topic, partition, committed) where `group` has a position.
    pub fn group_offsets(&self, group: &str) -> Vec<(String, u32, u64)> {
        let topics: Vec<Arc<Topic>> = read(&self.topics).values().cloned().collect();
        let mut out = Vec::new();
        for t in topics {
            for p in &t.partitions {
                if let Some(s) = p.groups().get(group) {
                    out.push((t.name.clone(), p.index, s.committed()));
                }
            }
        }
        out
    }

    /// Deletes a topic: it leaves the broker at once, every group's
    /// position in it is forgotten (durably, so a topic created again
    /// under the name starts afresh), its logs are closed, and its
    /// directory is renamed away and removed. Creates and deletes files:
    /// run it off the async workers.
    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let _guard = lock(&self.create_lock);
        let topic = write(&self.topics)
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
        topic.appended.notify_waiters();
        let mut waits = Vec::new();
        if let Some(store) = self.groups().as_ref() {
            for p in &topic.partitions {
                for g in p.groups().keys() {
                    waits.push(store.write(
                        (name, p.index, g),
                        &Entry::Snapshot {
                            committed: 0,
                            acked_above: Vec::new(),
                        },
                    ));
                }
            }
        }
        for w in waits {
            w.blocking_recv()
                .map_err(|_| BrokerError::Stopping)?
                .map_err(BrokerError::Durability)?;
        }
        for p in &topic.partitions {
            p.stop_waiting();
            p.log.shutdown()?;
        }
        let topics_dir = self.config.data_dir.join("topics");
        let dir = topics_dir.join(name);
        let gone = topics_dir.join(format!(".deleted-{name}-{}", now_ms()));
        fs::rename(&dir, &gone).map_err(io_err(&dir))?;
        fs::File::open(&topics_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&topics_dir))?;
        fs::remove_dir_all(&gone).map_err(io_err(&gone))?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// Retention once consumed: in every topic created with it, deletes the
    /// sealed segments of each partition that every group reading the
    /// topic has committed past. A group that has not read a partition yet
    /// holds it whole; a topic no group reads keeps everything (the time
    /// and size limits still apply). Returns the segments deleted. The
    /// broker's timer runs it every `retention_check_interval_ms`.
    pub fn apply_consumed_retention(&self) -> Result<usize, BrokerError> {
        let topics: Vec<Arc<Topic>> = read(&self.topics)
            .values()
            .filter(|t| t.meta.retention_consumed)
            .cloned()
            .collect();
        let mut deleted = 0;
        for topic in topics {
            let groups: std::collections::BTreeSet<String> = topic
                .partitions
                .iter()
                .flat_map(|p| p.groups().keys().cloned().collect::<Vec<_>>())
                .collect();
            if groups.is_empty() {
                continue;
            }
            for p in &topic.partitions {
                let consumed = {
                    let states = p.groups();
                    groups
                        .iter()
                        .map(|g| states.get(g).map_or(0, |s| s.committed()))
                        .min()
                        .unwrap_or(0)
                };
                deleted += p.log.delete_before(consumed)?.segments_deleted;
            }
        }
        Ok(deleted)
    }

    /// One tick of the broker's own timer: every delivery whose ack deadline has passed becomes due for
    /// redelivery (after its backoff), and one on its last attempt moves to
    /// the dead-letter topic, whether or not anyone fetches. Without it a
    /// group nobody polls would hold its deliveries in flight forever.
    /// Returns how many deliveries expired.
    pub async fn expire_deliveries(&self) -> Result<usize, BrokerError> {
        let now = now_ms();
        let topics: Vec<Arc<Topic>> = read(&self.topics).values().cloned().collect();
        let mut expired = 0usize;
        for topic in topics {
            let policy = topic.policy(self.config.unacked_max);
            let mut touched = false;
            for p in &topic.partitions {
                let mut work = Vec::new();
                {
                    let mut groups = p.groups();
                    for (group, state) in groups.iter_mut() {
                        let in_flight = state.in_flight();
                        let dead = state.expire(now, &policy);
                        let scheduled = state.take_scheduled();
                        expired += (in_flight - state.in_flight()) as usize;
                        if !dead.is_empty() || !scheduled.is_empty() {
                            work.push((group.clone(), dead, scheduled));
                        }
                    }
                }
                // The store and the dead-letter topic are written with the
                // group lock released, as in `poll`.
                for (group, dead, scheduled) in work {
                    touched = true;
                    if let (false, Some(store)) = (scheduled.is_empty(), self.groups().as_ref()) {
                        store.write_nowait(
                            (&topic.name, p.index, &group),
                            &Entry::Delays { delays: scheduled },
                        );
                    }
                    if !dead.is_empty() {
                        self.dead_letter(&topic, p, &group, dead).await?;
                    }
                }
            }
            if touched {
                // Subscribers and long polls look again.
                topic.appended.notify_waiters();
            }
        }
        Ok(expired)
    }

    /// The soonest time a redelivery is due on any partition of `topic`
    /// for `group`.
    pub fn next_due_ms(&self, topic: &Topic, group: &str) -> Option<u64> {
        topic
            .partitions
            .iter()
            .filter_map(|p| {
                let groups = p.groups();
                let s = groups.get(group)?;
                let timeout = if s.in_flight() > 0 {
                    Some(now_ms() + 50)
                } else {
                    None
                };
                match (s.next_due_ms(), timeout) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Copies dead messages to `<topic>.dlq` with headers saying where they
    /// came from, then acks them for the group.
    async fn dead_letter(
        &self,
        topic: &Arc<Topic>,
        p: &Arc<Partition>,
        group: &str,
        dead: Vec<DeadLetter>,
    ) -> Result<(), BrokerError> {
        let dlq_name = format!("{}{DLQ_SUFFIX}", topic.name);
        // Created by the first dead letter; after that only looked up.
        let dlq = self.topic(&dlq_name).or_else(|_| {
            off_worker(|| {
                self.create_topic_named(
                    &body::CreateTopic {
                        topic: dlq_name.clone(),
                        partitions: 1,
                        if_not_exists: true,
                        config: TopicConfig::default(),
                    },
                    false,
                )
            })
        })?;
        let mut owned = Vec::with_capacity(dead.len());
        for d in &dead {
            let batch = p.log.read(d.offset, 1, 1)?;
            let first = batch.iter().next();
            let Some(record) = first else {
                continue;
            };
            let r = record?;
            let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = HeaderIter::new(&r.headers)
                .filter_map(|h| h.ok())
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            for (n, v) in [
                (DLQ_HEADER_TOPIC, topic.name.clone()),
                (DLQ_HEADER_PARTITION, p.index.to_string()),
                (DLQ_HEADER_OFFSET, r.offset.to_string()),
                (DLQ_HEADER_ATTEMPTS, d.attempts.to_string()),
                (DLQ_HEADER_GROUP, group.to_owned()),
            ] {
                pairs.push((n.as_bytes().to_vec(), v.into_bytes()));
            }
            let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (&n[..], &v[..])).collect();
            let headers = encode_headers(&refs).unwrap_or_default();
            // One copy per group: the id is the original's mixed with the
            // group, so the DLQ's dedup window absorbs a repeated move.
            let id = InnerMsgId(r.id.0 ^ (u128::from(foldhash_str(group)) << 64) ^ 0xd1);
            owned.push((id, r.key.clone(), headers, r.payload.clone(), r.offset));
        }
        let msgs: Vec<Message<'_>> = owned
            .iter()
            .map(|(id, key, headers, payload, _)| Message {
                id: *id,
                key: key.as_deref(),
                headers,
                payload,
            })
            .collect();
        let dp = dlq.partition(0)?.clone();
        let appended = dp.log.append(&msgs)?;
        dlq.appended.notify_waiters();
        if self.config.flush == FlushMode::Sync {
            dp.durable(appended.durable_target()).await?;
        }
        self.metrics.dead_lettered(&topic.name, owned.len() as u64);
        let offsets: Vec<u64> = owned.iter().map(|o| o.4).collect();
        {
            let mut groups = p.groups();
            if let Some(state) = groups.get_mut(group) {
                for &o in &offsets {
                    state.ack(o);
                }
            }
        }
        tracing::warn!(topic = %topic.name, partition = p.index, group, count = offsets.len(), "messages moved to {dlq_name}");
        let wait = self
            .groups()
            .as_ref()
            .map(|s| s.write((&topic.name, p.index, group), &Entry::Acks { offsets }));
        if let Some(w) = wait {
            w.await
                .map_err(|_| BrokerError::Stopping)?
                .map_err(BrokerError::Durability)?;
        }
        Ok(())
    }

    /// Acks (or with `nack`, gives up on) deliveries. Returns how many were
    /// in flight, and completes once the acks are durable under sync
    /// flush.
    pub async fn ack(&self, req: &AckRequest, nack: bool) -> Result<u32, BrokerError> {
        let topic = self.topic(&req.topic)?;
        let policy = topic.policy(self.config.unacked_max);
        let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
        for &(p, o) in &req.entries {
            topic.partition(p)?;
            by_partition.entry(p).or_default().push(o);
        }
        let mut effective = 0u32;
        let mut waits = Vec::new();
        for (index, offsets) in by_partition {
            let p = topic.partitions[index as usize].clone();
            let mut acked = Vec::new();
            let mut dead = Vec::new();
            let scheduled;
            {
                let mut groups = p.groups();
                let Some(state) = groups.get_mut(&req.group) else {
                    continue;
                };
                let now = now_ms();
                for o in offsets {
                    if nack {
                        let delay =
                            (req.delay_ms != NACK_DEFAULT_DELAY).then_some(req.delay_ms as u64);
                        if let Some(d) = state.nack(o, now, delay, &policy) {
                            effective += 1;
                            dead.extend(d);
                        }
                    } else if state.ack(o) {
                        effective += 1;
                        acked.push(o);
                    }
                }
                scheduled = state.take_scheduled();
            }
            // A nack's delay survives a restart: answered once durable,
            // like an ack.
            if !scheduled.is_empty() {
                if let Some(s) = self.groups().as_ref() {
                    waits.push(s.write(
                        (&topic.name, index, &req.group),
                        &Entry::Delays { delays: scheduled },
                    ));
                }
            }
            if !acked.is_empty() {
                if let Some(s) = self.groups().as_ref() {
                    waits.push(s.write(
                        (&topic.name, index, &req.group),
                        &Entry::Acks { offsets: acked },
                    ));
                }
            }
            if !dead.is_empty() {
                self.dead_letter(&topic, &p, &req.group, dead).await?;
            }
        }
        topic.appended.notify_waiters();
        for w in waits {
            w.await
                .map_err(|_| BrokerError::Stopping)?
                .map_err(BrokerError::Durability)?;
        }
        Ok(effective)
    }

    /// Flushes every log, writes every clean-shutdown marker and stops the
    /// helper threads. Call once no connection uses the broker any more.
    pub fn close(&self) -> Result<(), BrokerError> {
        // The scheduler first: it delivers into the topics.
        let schedule_result = self.schedule.close();
        // The groups store next: a compaction it runs while closing
        // snapshots the groups of the topics, which must still be there.
        if let Some(store) = self.groups().take() {
            store.close();
        }
        let topics: Vec<Arc<Topic>> = write(&self.topics).drain().map(|(_, t)| t).collect();
        let mut first_error = None;
        for topic in topics {
            // Tasks that were polling let go of the topic within a moment.
            for _ in 0..200 {
                if Arc::strong_count(&topic) == 1 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let topic = match Arc::try_unwrap(topic) {
                Ok(t) => t,
                Err(t) => {
                    for p in &t.partitions {
                        if let Err(e) = p.log.flush() {
                            first_error.get_or_insert(e);
                        }
                    }
                    tracing::warn!(topic = %t.name, "still in use at close: flushed, but without the clean marker");
                    continue;
                }
            };
            for p in topic.partitions {
                p.stop_waiting();
                let Ok(p) = Arc::try_unwrap(p) else { continue };
                let result = match Arc::try_unwrap(p.log) {
                    Ok(log) => log.close(),
                    Err(log) => log.flush(),
                };
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => schedule_result,
        }
    }
}

/// The options of every partition's log.
fn log_options(config: &BrokerConfig, workers: &Arc<Workers>, files: &FileBudget) -> Options {
    let mut o = Options {
        disk: Disk::new(files.clone()),
        background: Background::Pool(Arc::clone(workers)),
        flush: config.flush,
        write_path: config.write_path,
        preallocate: config.preallocate,
        segment_bytes: config.segment_bytes,
        record_bytes_max: config.record_bytes_max,
        clock: config.clock.clone(),
        flush_journal: config.faults.flush_journal.clone(),
        ..Options::default()
    };
    o.dedup.records_max = config.dedup_window_ids;
    o.dedup.age_ms_max = config.dedup_window_ms;
    o.retention.age_ms_max = config.retention_ms;
    o.retention.bytes_max = config.retention_bytes;
    o.retention_check_interval_ms = config.retention_check_interval_ms;
    o
}

fn snapshot_groups(topics: &Topics) -> Vec<(GroupKey, Entry)> {
    let topics: Vec<Arc<Topic>> = read(topics).values().cloned().collect();
    let mut out = Vec::new();
    for t in topics {
        for p in &t.partitions {
            for (g, s) in p.groups().iter() {
                let key = (t.name.clone(), p.index, g.clone());
                out.push((
                    key.clone(),
                    Entry::Snapshot {
                        committed: s.committed(),
                        acked_above: s.acked_above(),
                    },
                ));
                let delays = s.pending_redeliveries();
                if !delays.is_empty() {
                    out.push((key, Entry::Delays { delays }));
                }
            }
        }
    }
    out
}

fn foldhash_bytes(bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x0b1d_a5ee_d000_0001).build_hasher();
    h.write(bytes);
    h.finish()
}

fn foldhash_str(s: &str) -> u64 {
    foldhash_bytes(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk met by a flush someone waited on, by a later append of
    /// the failed log, or by the groups log, answers DISK_FULL, not
    /// STORAGE: the cause travels typed across every hop.
    #[test]
    fn a_full_disk_stays_disk_full_across_the_durability_hop() {
        let enospc = || StorageError::Io {
            path: "seg.log".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let shared = Arc::new(enospc());
        assert_eq!(
            BrokerError::Durability(Arc::clone(&shared)).code(),
            ErrorCode::DiskFull
        );
        assert_eq!(
            BrokerError::Storage(StorageError::Failed(Arc::clone(&shared))).code(),
            ErrorCode::DiskFull
        );
        assert_eq!(
            BrokerError::Durability(Arc::new(StorageError::Failed(shared))).code(),
            ErrorCode::DiskFull
        );
        let eio = StorageError::Io {
            path: "seg.log".into(),
            source: std::io::Error::from_raw_os_error(5),
        };
        assert_eq!(
            BrokerError::Durability(Arc::new(eio)).code(),
            ErrorCode::Storage
        );
        assert_eq!(BrokerError::Stopping.code(), ErrorCode::ShuttingDown);
    }
}
