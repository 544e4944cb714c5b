//! The Kafka connectors' metrics ([`ConnectorStats`]), declared once here: both receiver modes
//! share the consumer counters and the per-partition lag; the output has its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use weir_receiver::{lock, ConnectorStats, Stat, StatKind};

use crate::direct::DirectStats;
use crate::output::KafkaOutput;
use crate::KafkaStats;

/// The counters both modes share (records, bytes, commits, commit failures).
struct Shared<'a>([&'a AtomicU64; 4]);

/// The shared counters, the mode's `extra` one, then the lag per partition.
fn consumer(
    out: &mut dyn FnMut(Stat<'_>),
    shared: Shared<'_>,
    extra: (&'static str, &'static str, &AtomicU64),
    lag: &Mutex<BTreeMap<(String, i32), i64>>,
) {
    let names = [
        ("weir_kafka_records_total", "Records consumed from Kafka."),
        (
            "weir_kafka_bytes_total",
            "Payload bytes consumed from Kafka.",
        ),
        (
            "weir_kafka_commits_total",
            "Offset commits sent (an asynchronous one is checked against the group's offsets afterwards).",
        ),
        (
            "weir_kafka_commit_failures_total",
            "Offset commits that failed: refused, or an asynchronous one the group did not show 2 s later (sent again with the next commit).",
        ),
    ];
    for ((name, help), v) in names.into_iter().zip(shared.0) {
        out(Stat::counter(name, help, v.load(Relaxed)));
    }
    out(Stat::counter(extra.0, extra.1, extra.2.load(Relaxed)));
    for ((topic, partition), l) in lock(lag).iter() {
        let partition = partition.to_string();
        out(Stat {
            name: "weir_kafka_lag",
            help: "Per partition: high watermark minus the next offset to take, as last seen.",
            kind: StatKind::Gauge,
            labels: &[("topic", topic), ("partition", &partition)],
            value: (*l).max(0) as u64,
        });
    }
}

impl ConnectorStats for KafkaStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        let shared = Shared([
            &self.records,
            &self.bytes,
            &self.commits,
            &self.commit_failures,
        ]);
        let extra = (
            "weir_kafka_rebalances_total",
            "Rebalances (assignments and revocations) seen.",
            &self.rebalances,
        );
        consumer(out, shared, extra, &self.lag);
    }
}

impl ConnectorStats for DirectStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        let shared = Shared([
            &self.records,
            &self.bytes,
            &self.commits,
            &self.commit_failures,
        ]);
        let extra = (
            "weir_kafka_offsets_skipped_total",
            "Direct mode: offsets Kafka deleted before a batch took them.",
            &self.offsets_skipped,
        );
        consumer(out, shared, extra, &self.lag);
    }
}

impl ConnectorStats for KafkaOutput {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        let s = self.stats();
        for (name, help, v) in [
            (
                "weir_kafka_output_batches_delivered_total",
                "Batches whose every record the broker acknowledged.",
                s.batches_delivered,
            ),
            (
                "weir_kafka_output_batches_failed_total",
                "Batch attempts that failed (the batch is retried).",
                s.batches_failed,
            ),
            (
                "weir_kafka_output_records_delivered_total",
                "Records acknowledged by the broker.",
                s.records_delivered,
            ),
            (
                "weir_kafka_output_records_failed_total",
                "Records with a failed delivery report.",
                s.records_failed,
            ),
            (
                "weir_kafka_output_producer_rebuilds_total",
                "Producers created again after a fatal error.",
                s.producer_rebuilds,
            ),
        ] {
            out(Stat::counter(name, help, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_receiver::unreported_fields;

    #[test]
    fn every_counter_is_exported_with_the_lag_per_partition() {
        let s = KafkaStats::default();
        lock(&s.lag).insert(("t".into(), 3), 42);
        assert_eq!(
            unreported_fields(&format!("{s:?}"), &s),
            Vec::<String>::new()
        );
        let mut lag = Vec::new();
        s.report(&mut |st| {
            if st.name == "weir_kafka_lag" {
                lag.push((st.labels.to_vec().len(), st.value));
            }
        });
        assert_eq!(lag, [(2, 42)]);
        let d = DirectStats::default();
        // The lag is reported per partition seen; with one, every field is exported.
        lock(&d.lag).insert(("t".into(), 0), 0);
        assert_eq!(
            unreported_fields(&format!("{d:?}"), &d),
            Vec::<String>::new()
        );
        let names = weir_receiver::stat_names(&d);
        assert!(
            names.contains(&"weir_kafka_offsets_skipped_total"),
            "{names:?}"
        );
    }
}
