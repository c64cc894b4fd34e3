//! `GET /metrics`: the broker's counters (`broker::metrics`) and the gauges
//! that describe its state now (group lag, in-flight deliveries, DLQ
//! depth, segments, disk bytes, the schedule), as OpenMetrics text. Every
//! metric is listed in docs/ADMIN.md.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::broker::{Broker, DLQ_SUFFIX};

type Labels = Vec<(String, String)>;

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
    let mut r = <Registry>::with_prefix("bida");
    broker.metrics().register(&mut r);
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
    let damaged = gauge_family(
        &mut r,
        "partition_damaged",
        "1 for a partition whose data is damaged: it serves reads up to the damage and refuses writes until `bida repair`",
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
            set(&damaged, &pl, u64::from(p.log.damage().is_some()));
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

    let budget = broker.dedup_budget();
    let (files_open, files_max) = broker.open_files();
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
    r.register(
        "dedup_memory_bytes",
        "Bytes every partition's dedup window holds together",
        g(budget.bytes_used()),
    );
    r.register(
        "dedup_memory_max_bytes",
        "The budget the dedup windows share (dedup_memory_max)",
        g(budget.bytes_max()),
    );
    r.register(
        "dedup_busy_windows",
        "Partitions whose dedup window holds any id",
        g(budget.busy_windows()),
    );
    r.register(
        "dedup_window_share_ids",
        "The most ids one partition's window may hold now (its share of the budget)",
        g(budget.share_ids()),
    );
    r.register(
        "open_segment_files",
        "Segment files open now",
        g(files_open as u64),
    );
    r.register(
        "open_segment_files_max",
        "The most segment files kept open (open_files_max)",
        g(files_max as u64),
    );
    let mut out = String::with_capacity(8192);
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
