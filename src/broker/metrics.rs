//! What the broker counts: counters and latency histograms, registered
//! for the admin listener's `GET /metrics` (`src/server/scrape.rs`, which
//! adds the gauges it reads from the broker's state).
//!
//! Counters and histograms are updated on the request paths (atomics, no
//! locks). Gauges that describe state — group lag, in-flight deliveries,
//! DLQ depth, segments, disk bytes, the schedule — are read from the broker
//! when scraped. Every metric is listed in docs/ADMIN.md.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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

impl BrokerMetrics {
    /// Registers the counters and histograms (and the connection gauges)
    /// in `r`, for the admin listener's `/metrics`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "produced_messages",
            "Messages stored by PRODUCE (duplicates excluded)",
            self.produced_messages.clone(),
        );
        r.register(
            "produced_bytes",
            "Payload bytes stored by PRODUCE",
            self.produced_bytes.clone(),
        );
        r.register(
            "dedup_hits",
            "Messages not stored again because their inner-msg-id was in the window",
            self.duplicates.clone(),
        );
        r.register(
            "consumed_messages",
            "Deliveries to consumers (fetch and push, redeliveries included)",
            self.consumed_messages.clone(),
        );
        r.register(
            "consumed_bytes",
            "Payload bytes delivered to consumers",
            self.consumed_bytes.clone(),
        );
        r.register(
            "redeliveries",
            "Deliveries after the first for the same message and group",
            self.redeliveries.clone(),
        );
        r.register(
            "dead_lettered_messages",
            "Messages moved to <topic>.dlq after their last allowed delivery",
            self.dead_lettered.clone(),
        );
        r.register(
            "produce_ack_latency_seconds",
            "From a PRODUCE's arrival to its answer (under sync flush: durable)",
            self.produce_ack_seconds.clone(),
        );
        r.register(
            "fsync_latency_seconds",
            "Duration of each flush of a partition's active segment",
            self.fsync_seconds.clone(),
        );
        let connections = Gauge::<i64, AtomicI64>::default();
        connections.set(self.connections());
        r.register("connections", "Open client connections", connections);
        let accepted = Counter::<u64, AtomicU64>::default();
        accepted.inc_by(self.connections_total.load(Ordering::Relaxed));
        r.register(
            "connections_accepted",
            "Client connections accepted",
            accepted,
        );
    }
}
