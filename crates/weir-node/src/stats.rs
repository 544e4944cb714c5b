//! What the node adds to the engine's metrics: each connector's own [`ConnectorStats`],
//! labelled by the receiver's name (or the output's position), and the pull sink's status page.
//! The metrics themselves are declared where they are counted, in the connector crates.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use weir::stream::metrics::encode_stats;
use weir::stream::LabelledStats;
use weir_receiver::ConnectorStats;

/// `stats` of the receiver `name`.
pub fn receiver(name: &str, stats: Arc<dyn ConnectorStats>) -> LabelledStats {
    LabelledStats::new("receiver", name, stats)
}

/// The metrics of the output at `position` (1-based) in the configuration: its counters (and
/// a Kafka output's), and its write-latency histogram.
pub fn output(position: usize, output: Arc<crate::output::Output>) -> LabelledStats {
    let histogram = output.stats().write_seconds.clone();
    LabelledStats::new("output", position.to_string(), output).with_histogram(
        "weir_output_write_seconds",
        "One successful write of a non-empty batch to the destination, seconds.",
        histogram,
    )
}

/// `/metrics` and `/health` of a pull sink (`receiver-node sink`): its push side (the Flume
/// source's `weir_flume_*`, labelled `receiver="push"`), its pull side (`weir_sink_pull_*`), its
/// queue (`weir_sink_*`) and the queue's log (`weir_wal_*`, `weir_wal_fsync_seconds`).
pub struct SinkStatus {
    queue: Arc<crate::sink::SinkQueue>,
    registry: Registry,
    rates: crate::status::RateWindow,
    push: String,
    pull: String,
}

#[derive(Debug)]
struct SinkCollector {
    sources: Vec<LabelledStats>,
    wal: Arc<weir::wal::WalMetrics>,
}

impl Collector for SinkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_stats(&mut encoder, &self.sources)?;
        let m = encoder.encode_descriptor(
            "weir_wal_fsync_seconds",
            "Duration of the WAL's segment fdatasyncs, seconds.",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        prometheus_client::encoding::EncodeMetric::encode(&self.wal.fsync_seconds, m)
    }
}

/// The queue's log waiting for space, as the place `wal`.
struct LogSpace(Arc<weir::wal::WalMetrics>);

impl ConnectorStats for LogSpace {
    fn report(&self, out: &mut dyn FnMut(weir_receiver::Stat<'_>)) {
        out(weir_receiver::Stat {
            name: "weir_waiting_for_space",
            help: "1 while writes at this place wait for disk space (wal: the queue's log; free_space_floor: pushes refused).",
            kind: weir_receiver::StatKind::Gauge,
            labels: &[("place", "wal")],
            value: self.0.snapshot().waiting_for_space,
        });
    }
}

/// The queue's counters (held by the queue, which outlives the status).
struct QueueCounters(Arc<crate::sink::SinkQueue>);

impl ConnectorStats for QueueCounters {
    fn report(&self, out: &mut dyn FnMut(weir_receiver::Stat<'_>)) {
        self.0.stats().report(out);
        self.0.occupancy().report(out);
    }
}

impl SinkStatus {
    /// The status of `sink`.
    pub fn new(sink: &crate::sink::PullSink) -> SinkStatus {
        let queue = sink.queue().clone();
        let wal = queue.wal().metrics().clone();
        let sources = vec![
            receiver("push", sink.push_stats().clone()),
            LabelledStats::unlabelled(sink.pull_stats().clone()),
            LabelledStats::unlabelled(Arc::new(QueueCounters(queue.clone()))),
            LabelledStats::unlabelled(Arc::new(LogSpace(wal.clone()))),
            LabelledStats::unlabelled(wal.clone()),
        ];
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SinkCollector { sources, wal }));
        SinkStatus {
            queue,
            registry,
            rates: crate::status::RateWindow::default(),
            push: sink.push_addr.to_string(),
            pull: sink.pull_addr.to_string(),
        }
    }
}

impl super::http::StatusSource for SinkStatus {
    fn prometheus_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    fn waiting_for_space(&self) -> Vec<&'static str> {
        let q = self.queue.stats();
        let mut v = Vec::new();
        if self.queue.wal().metrics().snapshot().waiting_for_space > 0 {
            v.push("wal");
        }
        if q.below_floor.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            v.push("free_space_floor");
        }
        v
    }

    fn status(&self) -> serde_json::Value {
        let samples = crate::status::Samples::parse(&self.prometheus_text());
        crate::status::sink_document(&samples, &self.rates, &self.push, &self.pull)
    }

    fn tick(&self) {
        self.rates
            .record(&crate::status::Samples::parse(&self.prometheus_text()));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use weir_receiver::{lock, stat_names};

    /// Every name a node can export: the engine's registry (one receiver, so that per-receiver
    /// families have a sample) and every connector's stats.
    fn exported() -> BTreeSet<String> {
        let metrics = Arc::new(weir::stream::Metrics::default());
        metrics.receiver("r");
        let registry =
            weir::stream::MetricsRegistry::new(metrics, Arc::new(weir::wal::WalMetrics::default()));
        let discard = crate::output::Output::new(&crate::output::OutputConfig::Discard, 1)
            .expect("a discard output");
        registry.add_stats(output(1, Arc::new(discard)));
        let text = registry.prometheus_text();
        let mut names = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                names.insert(rest.split(' ').next().unwrap_or("").to_string());
            } else if !line.starts_with('#') {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                names.insert(line[..end].to_string());
            }
        }
        let kafka = weir_kafka::KafkaStats::default();
        lock(&kafka.lag).insert(("t".into(), 0), 0);
        let output = weir_kafka::KafkaOutput::new(weir_kafka::KafkaOutputConfig {
            delivery_timeout_ms: 1000,
            ..weir_kafka::KafkaOutputConfig::new("127.0.0.1:1", "t")
        })
        .expect("a producer is created without a broker");
        let sources: Vec<Box<dyn ConnectorStats>> = vec![
            Box::new(weir_socket::SocketStats::default()),
            Box::new(kafka),
            Box::new(weir_kafka::DirectStats::default()),
            Box::new(output),
            Box::new(crate::output::OutputStats::default()),
            Box::new(weir_flume::FlumeSourceStats::default()),
            Box::new(weir_flume::FlumePullStats::default()),
            Box::new(weir_flume::sink_server::PullServerStats::default()),
            Box::new(weir_flume::sink_queue::QueueStats::default()),
            Box::new(weir_flume::sink_queue::Occupancy::default()),
        ];
        for s in &sources {
            names.extend(stat_names(s.as_ref()).into_iter().map(str::to_string));
        }
        names
    }

    /// The metric names the README mentions (in backquotes), with `a_{b,c}_d` expanded, label
    /// sets (`name{label}`, `name{label="v"}`) dropped and `prefix_*` kept as a prefix.
    fn readme_names() -> Vec<String> {
        let readme = include_str!("../../../README.md");
        let mut out = Vec::new();
        for span in readme.split('`').skip(1).step_by(2) {
            if !span.starts_with("weir_") || span.contains(' ') || span.contains("::") {
                continue;
            }
            // Labels: a brace group right after a letter or digit, to the end.
            let mut name = span.to_string();
            if let Some(i) = name.find('{') {
                let before = name[..i].chars().last();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '*') {
                    name.truncate(i);
                }
            }
            let mut names = vec![name];
            while let Some(n) = names.iter().position(|n| n.contains('{')) {
                let n = names.remove(n);
                let (a, rest) = n.split_once('{').expect("has a brace");
                let (alts, b) = rest.split_once('}').expect("a closed brace");
                names.extend(alts.split(',').map(|alt| format!("{a}{alt}{b}")));
            }
            out.extend(names);
        }
        out
    }

    #[test]
    fn every_metric_the_readme_lists_is_exported() {
        let exported = exported();
        let listed = readme_names();
        assert!(listed.len() > 50, "{listed:?}");
        let missing: Vec<&String> = listed
            .iter()
            .filter(|n| match n.strip_suffix('*') {
                Some(prefix) => !exported.iter().any(|e| e.starts_with(prefix)),
                None => !exported.contains(*n),
            })
            .collect();
        assert!(
            missing.is_empty(),
            "listed in the README, not exported: {missing:?}"
        );
    }
}
