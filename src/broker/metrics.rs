//! What the broker counts, and the Prometheus text exposition of it
//! (`GET /metrics` on the admin listener, see `admin.rs`).
//!
//! Counters and histograms are updated on the request paths (atomics, no
//! locks). Gauges that describe state — group lag, in-flight deliveries,
//! DLQ depth, segments, disk bytes, the schedule — are read from the broker
//! when scraped. Every metric is listed in docs/ADMIN.md.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::{Broker, DLQ_SUFFIX};

type Labels = Vec<(String, String)>;

/// The broker's counters and latency histograms.
#[derive(Debug)]
pub struct BrokerMetrics {
    produced_messages: Family<Labels, Counter>,
    produced_bytes: Family<Labels, Counter>,
    duplicates: Family<Labels, Counter>,
    consumed_messages: Family<Labels, Counter>,
    consumed_bytes: Family<Labels, Counter>,
    redeliveries: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    /// Seconds from a PRODUCE's arrival to its answer.
    produce_ack_seconds: Histogram,
    /// Seconds per flush (fsync) of a partition's active segment.
    fsync_seconds: Histogram,
    connections: AtomicI64,
    connections_total: AtomicU64,
    started: std::time::Instant,
}

/// One topic's counters since the broker started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicCounts {
    pub produced_messages: u64,
    pub produced_bytes: u64,
    pub consumed_messages: u64,
    pub consumed_bytes: u64,
    pub dedup_hits: u64,
    pub redeliveries: u64,
    pub dead_lettered: u64,
}

fn latency_histogram() -> Histogram {
    // 20 µs .. ~10 s.
    Histogram::new(exponential_buckets(20e-6, 2.0, 20))
}

fn topic_label(topic: &str) -> Labels {
    vec![("topic".to_owned(), topic.to_owned())]
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics {
            produced_messages: Family::default(),
            produced_bytes: Family::default(),
            duplicates: Family::default(),
            consumed_messages: Family::default(),
            consumed_bytes: Family::default(),
            redeliveries: Family::default(),
            dead_lettered: Family::default(),
            produce_ack_seconds: latency_histogram(),
            fsync_seconds: latency_histogram(),
            connections: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

impl BrokerMetrics {
    /// Messages stored (not duplicates) and their payload bytes.
    pub fn produced(&self, topic: &str, messages: u64, bytes: u64, duplicates: u64) {
        let l = topic_label(topic);
        self.produced_messages.get_or_create(&l).inc_by(messages);
        self.produced_bytes.get_or_create(&l).inc_by(bytes);
        if duplicates > 0 {
            self.duplicates.get_or_create(&l).inc_by(duplicates);
        }
    }

    /// Deliveries handed to consumers (fetch or push), first or again.
    pub fn delivered(&self, topic: &str, messages: u64, bytes: u64, redeliveries: u64) {
        let l = topic_label(topic);
        self.consumed_messages.get_or_create(&l).inc_by(messages);
        self.consumed_bytes.get_or_create(&l).inc_by(bytes);
        if redeliveries > 0 {
            self.redeliveries.get_or_create(&l).inc_by(redeliveries);
        }
    }

    pub fn dead_lettered(&self, topic: &str, messages: u64) {
        self.dead_lettered
            .get_or_create(&topic_label(topic))
            .inc_by(messages);
    }

    pub fn produce_acked(&self, latency: Duration) {
        self.produce_ack_seconds.observe(latency.as_secs_f64());
    }

    pub fn flushed(&self, latency: Duration) {
        self.fsync_seconds.observe(latency.as_secs_f64());
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A topic's counters (zero for one never seen).
    pub fn topic_counts(&self, topic: &str) -> TopicCounts {
        let l = topic_label(topic);
        let get = |f: &Family<Labels, Counter>| f.get_or_create(&l).get();
        TopicCounts {
            produced_messages: get(&self.produced_messages),
            produced_bytes: get(&self.produced_bytes),
            consumed_messages: get(&self.consumed_messages),
            consumed_bytes: get(&self.consumed_bytes),
            dedup_hits: get(&self.duplicates),
            redeliveries: get(&self.redeliveries),
            dead_lettered: get(&self.dead_lettered),
        }
    }
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

fn set(f: &Family<Labels, Gauge>, labels: &[(&str, &str)], value: u64) {
    let l: Labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    f.get_or_create(&l).set(value.min(i64::MAX as u64) as i64);
}

/// The Prometheus text exposition of everything the broker knows now.
pub fn render(broker: &Broker) -> String {
    let m = broker.metrics();
    let mut r = <Registry>::with_prefix("bida");
    r.register(
        "produced_messages",
        "Messages stored by PRODUCE (duplicates excluded)",
        m.produced_messages.clone(),
    );
    r.register(
        "produced_bytes",
        "Payload bytes stored by PRODUCE",
        m.produced_bytes.clone(),
    );
    r.register(
        "dedup_hits",
        "Messages not stored again because their inner-msg-id was in the window",
        m.duplicates.clone(),
    );
    r.register(
        "consumed_messages",
        "Deliveries to consumers (fetch and push, redeliveries included)",
        m.consumed_messages.clone(),
    );
    r.register(
        "consumed_bytes",
        "Payload bytes delivered to consumers",
        m.consumed_bytes.clone(),
    );
    r.register(
        "redeliveries",
        "Deliveries after the first for the same message and group",
        m.redeliveries.clone(),
    );
    r.register(
        "dead_lettered_messages",
        "Messages moved to <topic>.dlq after their last allowed delivery",
        m.dead_lettered.clone(),
    );
    r.register(
        "produce_ack_latency_seconds",
        "From a PRODUCE's arrival to its answer (under sync flush: durable)",
        m.produce_ack_seconds.clone(),
    );
    r.register(
        "fsync_latency_seconds",
        "Duration of each flush of a partition's active segment",
        m.fsync_seconds.clone(),
    );
    let connections = Gauge::<i64, AtomicI64>::default();
    connections.set(m.connections());
    r.register("connections", "Open client connections", connections);
    let accepted = Counter::<u64, AtomicU64>::default();
    accepted.inc_by(m.connections_total.load(Ordering::Relaxed));
    r.register(
        "connections_accepted",
        "Client connections accepted",
        accepted,
    );

    let lag = gauge_family(
        &mut r,
        "group_lag_messages",
        "Partition end minus the group's committed offset",
    );
    let in_flight = gauge_family(
        &mut r,
        "group_in_flight_messages",
        "Deliveries awaiting an ack",
    );
    let committed = gauge_family(
        &mut r,
        "group_committed_offset",
        "Every offset below is acked by the group",
    );
    let group_redeliveries = Family::<Labels, Counter>::default();
    r.register(
        "group_redeliveries",
        "Redeliveries to the group since the broker started",
        group_redeliveries.clone(),
    );
    let end = gauge_family(
        &mut r,
        "partition_end_offset",
        "Next offset of the partition",
    );
    let durable = gauge_family(
        &mut r,
        "partition_durable_offset",
        "Every offset below is on disk",
    );
    let segments = gauge_family(
        &mut r,
        "partition_segments",
        "Segment files of the partition",
    );
    let disk = gauge_family(
        &mut r,
        "partition_disk_bytes",
        "Bytes of records in the partition's segments",
    );
    let dlq = gauge_family(
        &mut r,
        "dlq_depth_messages",
        "Messages in a dead-letter topic",
    );
    for summary in broker.list_topics() {
        let Ok(topic) = broker.topic(&summary.topic) else {
            continue;
        };
        let mut depth = 0u64;
        for p in &topic.partitions {
            let index = p.index.to_string();
            let pl = [
                ("topic", topic.name.as_str()),
                ("partition", index.as_str()),
            ];
            let next = p.log.next_offset();
            set(&end, &pl, next);
            set(&durable, &pl, p.log.durable_offset());
            let infos = p.log.segments();
            set(&segments, &pl, infos.len() as u64);
            set(&disk, &pl, infos.iter().map(|s| s.size_bytes).sum());
            depth += next - p.log.start_offset();
            for (group, state) in p.groups().iter() {
                let gl = [
                    ("topic", topic.name.as_str()),
                    ("partition", index.as_str()),
                    ("group", group.as_str()),
                ];
                set(&lag, &gl, next.saturating_sub(state.committed()));
                set(&in_flight, &gl, state.in_flight() as u64);
                set(&committed, &gl, state.committed());
                let gl: Labels = gl
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
                group_redeliveries
                    .get_or_create(&gl)
                    .inc_by(state.redelivered());
            }
        }
        if topic.name.ends_with(DLQ_SUFFIX) {
            set(&dlq, &[("topic", topic.name.as_str())], depth);
        }
    }

    let s = broker.schedule();
    let (delayed, open) = s.pending();
    let g = |v: u64| {
        let g = Gauge::<i64, AtomicI64>::default();
        g.set(v as i64);
        g
    };
    let c = |v: &AtomicU64| {
        let c = Counter::<u64, AtomicU64>::default();
        c.inc_by(v.load(Ordering::Relaxed));
        c
    };
    r.register(
        "delayed_pending_messages",
        "Delayed messages not yet due",
        g(delayed as u64),
    );
    r.register(
        "delayed_fired_messages",
        "Delayed messages moved to their topic",
        c(&s.metrics.delayed_fired),
    );
    r.register(
        "transactions_open",
        "Transactions without a decision",
        g(open as u64),
    );
    r.register(
        "transaction_checks_sent",
        "TXN_CHECK pushes sent to producers",
        c(&s.metrics.checks_sent),
    );
    r.register(
        "transactions_rolled_back_at_check_limit",
        "Transactions rolled back because no producer decided within the maximum number of checks",
        c(&s.metrics.rolled_back_by_check_limit),
    );
    let mut out = String::with_capacity(8192);
    encode(&mut out, &r).expect("writing to a String");
    out
}
