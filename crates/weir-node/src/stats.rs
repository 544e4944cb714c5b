//! Receivers' own counters as metrics samples (`/metrics`), labelled by receiver name.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use weir::stream::metrics::{MetricKind, Sample};
use weir::stream::Collector;

fn sample(
    name: &'static str,
    help: &'static str,
    kind: MetricKind,
    labels: Vec<(&'static str, String)>,
    value: u64,
) -> Sample {
    Sample {
        name,
        help,
        kind,
        labels,
        value: value as f64,
    }
}

/// The counters of a socket receiver.
pub fn socket(receiver: &str, stats: Arc<weir_socket::SocketStats>) -> Collector {
    use MetricKind::{Counter as C, Gauge as G};
    let receiver = receiver.to_string();
    Arc::new(move |out: &mut Vec<Sample>| {
        let s = stats.snapshot();
        for (name, help, kind, v) in [
            (
                "weir_socket_connections_accepted_total",
                "Connections served (accepted, or established in connect mode).",
                C,
                s.connections_accepted,
            ),
            (
                "weir_socket_connections_active",
                "Connections open now.",
                G,
                s.connections_active,
            ),
            (
                "weir_socket_connections_rejected_total",
                "Connections closed at once because max_connections were open.",
                C,
                s.connections_rejected,
            ),
            (
                "weir_socket_connect_failures_total",
                "Failed connection attempts (connect mode).",
                C,
                s.connect_failures,
            ),
            (
                "weir_socket_records_durable_total",
                "Records whose store() resolved durable.",
                C,
                s.records_durable,
            ),
            (
                "weir_socket_oversize_errors_total",
                "Connections closed for a record larger than max_record_bytes.",
                C,
                s.oversize_errors,
            ),
            (
                "weir_socket_idle_closed_total",
                "Connections closed by idle_timeout_ms.",
                C,
                s.idle_closed,
            ),
            (
                "weir_socket_store_failures_total",
                "store() calls that failed (each closed its connection).",
                C,
                s.store_failures,
            ),
        ] {
            out.push(sample(
                name,
                help,
                kind,
                vec![("receiver", receiver.clone())],
                v,
            ));
        }
    })
}

fn lag_samples(
    out: &mut Vec<Sample>,
    receiver: &str,
    lag: &std::sync::Mutex<std::collections::BTreeMap<(String, i32), i64>>,
) {
    let lag = lag
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for ((topic, partition), l) in lag.iter() {
        out.push(sample(
            "weir_kafka_lag",
            "Per partition: high watermark minus the next offset to take, as last seen.",
            MetricKind::Gauge,
            vec![
                ("receiver", receiver.to_string()),
                ("topic", topic.clone()),
                ("partition", partition.to_string()),
            ],
            (*l).max(0) as u64,
        ));
    }
}

fn counters(
    out: &mut Vec<Sample>,
    receiver: &str,
    list: &[(&'static str, &'static str, &AtomicU64)],
) {
    for (name, help, v) in list {
        out.push(sample(
            name,
            help,
            MetricKind::Counter,
            vec![("receiver", receiver.to_string())],
            v.load(Relaxed),
        ));
    }
}

/// The counters both Kafka modes have, then `extra`, then the lag per partition.
#[allow(clippy::too_many_arguments)]
fn kafka_samples(
    out: &mut Vec<Sample>,
    receiver: &str,
    records: &AtomicU64,
    bytes: &AtomicU64,
    commits: &AtomicU64,
    commit_failures: &AtomicU64,
    extra: (&'static str, &'static str, &AtomicU64),
    lag: &std::sync::Mutex<std::collections::BTreeMap<(String, i32), i64>>,
) {
    counters(
        out,
        receiver,
        &[
            (
                "weir_kafka_records_total",
                "Records consumed from Kafka.",
                records,
            ),
            (
                "weir_kafka_bytes_total",
                "Payload bytes consumed from Kafka.",
                bytes,
            ),
            (
                "weir_kafka_commits_total",
                "Offset commits that succeeded.",
                commits,
            ),
            (
                "weir_kafka_commit_failures_total",
                "Offset commits that failed (retried with the next one).",
                commit_failures,
            ),
            extra,
        ],
    );
    lag_samples(out, receiver, lag);
}

/// The counters of a Kafka consumer-group receiver.
pub fn kafka(receiver: &str, stats: Arc<weir_kafka::KafkaStats>) -> Collector {
    let receiver = receiver.to_string();
    Arc::new(move |out: &mut Vec<Sample>| {
        let s = &stats;
        let rebalances = (
            "weir_kafka_rebalances_total",
            "Rebalances (assignments and revocations) seen.",
            &s.rebalances,
        );
        kafka_samples(
            out,
            &receiver,
            &s.records,
            &s.bytes,
            &s.commits,
            &s.commit_failures,
            rebalances,
            &s.lag,
        );
    })
}

/// The counters of a Kafka direct source.
pub fn kafka_direct(receiver: &str, stats: Arc<weir_kafka::DirectStats>) -> Collector {
    let receiver = receiver.to_string();
    Arc::new(move |out: &mut Vec<Sample>| {
        let s = &stats;
        let skipped = (
            "weir_kafka_offsets_skipped_total",
            "Direct mode: offsets Kafka deleted before a batch took them.",
            &s.offsets_skipped,
        );
        kafka_samples(
            out,
            &receiver,
            &s.records,
            &s.bytes,
            &s.commits,
            &s.commit_failures,
            skipped,
            &s.lag,
        );
    })
}

/// The counters of a `kafka` output, labelled by the output's position in the configuration.
pub fn kafka_output(output: &str, out: Arc<super::output::Output>) -> Collector {
    let output = output.to_string();
    Arc::new(move |samples: &mut Vec<Sample>| {
        let Some(k) = out.kafka() else { return };
        let s = k.stats();
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
            samples.push(sample(
                name,
                help,
                MetricKind::Counter,
                vec![("output", output.clone())],
                v,
            ));
        }
    })
}

/// The counters of a Flume Avro push source.
pub fn flume(receiver: &str, stats: Arc<weir_flume::FlumeSourceStats>) -> Collector {
    let receiver = receiver.to_string();
    Arc::new(move |out: &mut Vec<Sample>| {
        counters(
            out,
            &receiver,
            &[
                (
                    "weir_flume_connections_accepted_total",
                    "Connections served (accepted and not rejected).",
                    &stats.connections_accepted,
                ),
                (
                    "weir_flume_connections_rejected_total",
                    "Connections closed at once because max_connections were open.",
                    &stats.connections_rejected,
                ),
                (
                    "weir_flume_calls_total",
                    "append/appendBatch calls whose events were handed to store().",
                    &stats.calls,
                ),
                (
                    "weir_flume_events_total",
                    "Events handed to store().",
                    &stats.events,
                ),
                (
                    "weir_flume_bytes_total",
                    "Body bytes of those events.",
                    &stats.bytes,
                ),
                (
                    "weir_flume_events_durable_total",
                    "Events answered OK (durable).",
                    &stats.events_durable,
                ),
                (
                    "weir_flume_calls_failed_total",
                    "Calls answered FAILED (store failed or the node was stopping).",
                    &stats.calls_failed,
                ),
                (
                    "weir_flume_error_replies_total",
                    "Calls answered with an Avro error (unknown message, bad parameters, too many events).",
                    &stats.error_replies,
                ),
                (
                    "weir_flume_malformed_closed_total",
                    "Connections closed for a malformed frame, handshake or compressed stream.",
                    &stats.malformed_closed,
                ),
                (
                    "weir_flume_idle_closed_total",
                    "Connections closed by idle_timeout_ms.",
                    &stats.idle_closed,
                ),
            ],
        );
        out.push(sample(
            "weir_flume_connections_active",
            "Connections open now.",
            MetricKind::Gauge,
            vec![("receiver", receiver.clone())],
            stats.connections_active.load(Relaxed),
        ));
    })
}

/// The counters of a Flume pull receiver.
pub fn flume_pull(receiver: &str, stats: Arc<weir_flume::FlumePullStats>) -> Collector {
    let receiver = receiver.to_string();
    Arc::new(move |out: &mut Vec<Sample>| {
        counters(
            out,
            &receiver,
            &[
                (
                    "weir_flume_pull_connects_total",
                    "Connections made to pull sinks.",
                    &stats.connects,
                ),
                (
                    "weir_flume_pull_connection_failures_total",
                    "Connection attempts or connections that failed (each followed by a backoff).",
                    &stats.connection_failures,
                ),
                (
                    "weir_flume_pull_batches_total",
                    "Batches with events received.",
                    &stats.batches,
                ),
                (
                    "weir_flume_pull_events_total",
                    "Events received and handed to store().",
                    &stats.events,
                ),
                (
                    "weir_flume_pull_bytes_total",
                    "Body bytes of those events.",
                    &stats.bytes,
                ),
                (
                    "weir_flume_pull_acks_total",
                    "Batches acknowledged once durable.",
                    &stats.acks,
                ),
                (
                    "weir_flume_pull_events_acked_total",
                    "Events acknowledged once durable.",
                    &stats.events_acked,
                ),
                (
                    "weir_flume_pull_nacks_total",
                    "Batches nacked (storing failed or the node was stopping).",
                    &stats.nacks,
                ),
                (
                    "weir_flume_pull_error_batches_total",
                    "Error batches received (never acknowledged).",
                    &stats.error_batches,
                ),
                (
                    "weir_flume_pull_empty_batches_total",
                    "Empty batches received.",
                    &stats.empty_batches,
                ),
            ],
        );
        out.push(sample(
            "weir_flume_pull_workers_connected",
            "Workers connected to a pull sink now.",
            MetricKind::Gauge,
            vec![("receiver", receiver.clone())],
            stats.workers_connected.load(Relaxed),
        ));
    })
}

/// `/metrics` and `/health` of a pull sink (`receiver-node sink`): its push side (the Flume
/// source's `weir_flume_*`, labelled `receiver="push"`), its pull side
/// (`weir_sink_pull_*`), its queue (`weir_sink_*`) and the queue's log (`weir_wal_*`).
pub struct SinkStatus {
    push: Collector,
    pull: Arc<weir_flume::sink_server::PullServerStats>,
    queue: Arc<crate::sink::SinkQueue>,
}

impl SinkStatus {
    /// The status of `sink`.
    pub fn new(sink: &crate::sink::PullSink) -> SinkStatus {
        SinkStatus {
            push: flume("push", sink.push_stats().clone()),
            pull: sink.pull_stats().clone(),
            queue: sink.queue().clone(),
        }
    }

    /// Every sample.
    pub fn samples(&self) -> Vec<Sample> {
        use MetricKind::{Counter as C, Gauge as G};
        let mut out = Vec::new();
        (self.push)(&mut out);
        let p = &self.pull;
        let q = self.queue.stats();
        for (name, help, kind, v) in [
            (
                "weir_sink_pull_connections_accepted_total",
                "Pull connections served.",
                C,
                &p.connections_accepted,
            ),
            (
                "weir_sink_pull_connections_active",
                "Pull connections open now.",
                G,
                &p.connections_active,
            ),
            (
                "weir_sink_pull_connections_rejected_total",
                "Pull connections closed at once (max_connections).",
                C,
                &p.connections_rejected,
            ),
            (
                "weir_sink_pull_batches_served_total",
                "Batches handed out with events.",
                C,
                &p.batches_served,
            ),
            (
                "weir_sink_pull_events_served_total",
                "Events handed out (redeliveries included).",
                C,
                &p.events_served,
            ),
            (
                "weir_sink_pull_error_batches_total",
                "Error batches answered (nothing to serve).",
                C,
                &p.error_batches,
            ),
            ("weir_sink_pull_acks_total", "ack calls.", C, &p.acks),
            ("weir_sink_pull_nacks_total", "nack calls.", C, &p.nacks),
            (
                "weir_sink_pull_malformed_closed_total",
                "Pull connections closed for malformed input.",
                C,
                &p.malformed_closed,
            ),
            (
                "weir_sink_events_accepted_total",
                "Events made durable (pushes answered OK).",
                C,
                &q.events_accepted,
            ),
            (
                "weir_sink_events_acked_total",
                "Events whose transaction was committed.",
                C,
                &q.events_acked,
            ),
            (
                "weir_sink_events_queued",
                "Events held now (ready or handed out, not acked).",
                G,
                &q.events_queued,
            ),
            (
                "weir_sink_rollbacks_nack_total",
                "Transactions rolled back by nack.",
                C,
                &q.rollbacks_nack,
            ),
            (
                "weir_sink_rollbacks_timeout_total",
                "Transactions rolled back by tx_timeout_ms.",
                C,
                &q.rollbacks_timeout,
            ),
            (
                "weir_sink_ignored_total",
                "ack/nack of unknown or finished sequence numbers.",
                C,
                &q.ignored,
            ),
            (
                "weir_sink_events_recovered_total",
                "Events found again when the queue was opened.",
                C,
                &q.events_recovered,
            ),
            (
                "weir_sink_pushes_refused_floor_total",
                "Pushes refused because free space was below the floor.",
                C,
                &q.pushes_refused_floor,
            ),
        ] {
            out.push(sample(name, help, kind, Vec::new(), v.load(Relaxed)));
        }
        let w = self.queue.wal().metrics().snapshot();
        weir::stream::metrics::wal_samples(&w, &mut out);
        for (place, v) in [
            ("wal", w.waiting_for_space),
            ("free_space_floor", q.below_floor.load(Relaxed)),
        ] {
            out.push(sample(
                "weir_waiting_for_space",
                "1 while writes at this place wait for disk space (wal: the queue's log; free_space_floor: pushes refused).",
                G,
                vec![("place", place.to_string())],
                v,
            ));
        }
        out
    }
}

impl super::http::StatusSource for SinkStatus {
    fn prometheus_text(&self) -> String {
        weir::stream::metrics::render_prometheus(self.samples())
    }

    fn waiting_for_space(&self) -> Vec<&'static str> {
        let q = self.queue.stats();
        let mut v = Vec::new();
        if self.queue.wal().metrics().snapshot().waiting_for_space > 0 {
            v.push("wal");
        }
        if q.below_floor.load(Relaxed) > 0 {
            v.push("free_space_floor");
        }
        v
    }
}
