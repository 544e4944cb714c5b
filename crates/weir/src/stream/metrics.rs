//! The engine's metrics on `prometheus-client`: each declared once (name, kind, help, labels)
//! in the tables below, registered in one [`MetricsRegistry`] with the WAL's, the disk-space
//! places', and whatever connectors report through [`ConnectorStats`]
//! ([`StreamingContext::add_metrics`](crate::StreamingContext::add_metrics)). The registry
//! renders OpenMetrics text for the daemon's `/metrics`; tests and benchmarks read values
//! directly (`metrics.engine().batches_completed()`).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use weir_receiver::{lock, ConnectorStats, Stat, StatKind};

use crate::space::{Place, SpaceWaits};
use crate::wal::WalMetrics;

/// A gauge of non-negative integers.
pub type U64Gauge = Gauge<u64, AtomicU64>;

/// Buckets for latencies in seconds: 100 µs to about 52 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 20)
}

/// Declares a struct of metrics once: field, kind, Prometheus name (counters without their
/// `_total`, which the encoder adds) and help; generates the registration and a getter per
/// field documented with the help text.
macro_rules! metric_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $field:ident : $kind:ident = ($metric:literal, $help:literal), )*
            $( ; $( $(#[$xmeta:meta])* $xfield:ident : $xtype:ty, )* )?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $( pub(crate) $field: metric_set!(@type $kind), )*
            $( $( $(#[$xmeta])* pub(crate) $xfield: $xtype, )* )?
        }

        impl $name {
            $(
                #[doc = $help]
                pub fn $field(&self) -> u64 { self.$field.get() }
            )*

            /// The metrics as (Prometheus name, help, kind), in declaration order.
            pub const DECLARED: &'static [(&'static str, &'static str, StatKind)] = &[
                $( ($metric, $help, metric_set!(@kind $kind)), )*
            ];

            /// The fields, in [`Self::DECLARED`] order.
            fn encodable(&self) -> Vec<&dyn EncodeMetric> {
                vec![$( &self.$field, )*]
            }
        }
    };
    (@type counter) => { Counter };
    (@type gauge) => { U64Gauge };
    (@kind counter) => { StatKind::Counter };
    (@kind gauge) => { StatKind::Gauge };
}

metric_set! {
    /// Engine-wide counters and gauges. Cheap to update (relaxed atomics), read at any time.
    pub struct EngineMetrics {
        blocks_pending: gauge = ("weir_blocks_pending", "Blocks cut but not yet durable."),
        blocks_cached: gauge = ("weir_block_cache_blocks", "Blocks in the in-memory block cache."),
        cache_bytes: gauge = ("weir_block_cache_bytes", "Bytes in the in-memory block cache."),
        cache_misses: counter = ("weir_block_cache_misses", "Block reads served from the WAL."),
        batches_allocated: counter = ("weir_batches_allocated", "Batches allocated."),
        batches_completed: counter = ("weir_batches_completed", "Batches completed."),
        batches_rerun: counter = ("weir_batches_rerun", "Batches re-run after a restart."),
        batch_records: counter = ("weir_batch_records", "Records in completed batches."),
        job_failures: counter = ("weir_job_failures", "Failed job runs (the batch is retried)."),
        scheduling_delay_ms: gauge = ("weir_batch_scheduling_delay_ms", "Scheduling delay of the last batch, ms."),
        processing_delay_ms: gauge = ("weir_batch_processing_delay_ms", "Processing time of the last batch, ms."),
        total_delay_ms: gauge = ("weir_batch_total_delay_ms", "Scheduling plus processing delay of the last batch, ms."),
        tracker_commits: counter = ("weir_tracker_commits", "Tracker transactions committed."),
        records_lost_corruption: counter = ("weir_records_lost_corruption", "Records lost to corruption found by recovery."),
        blocks_lost_corruption: counter = ("weir_blocks_lost_corruption", "Allocated blocks dropped because their WAL record was corrupt."),
        unallocated_blocks: gauge = ("weir_unallocated_blocks", "Durable blocks waiting for the next batch."),
        last_allocated_batch_ms: gauge = ("weir_last_allocated_batch_ms", "Time of the last allocated batch, ms since the epoch."),
        last_completed_batch_ms: gauge = ("weir_last_completed_batch_ms", "Time of the last completed batch, ms since the epoch."),
        recovery_ms: gauge = ("weir_recovery_ms", "Duration of the last startup recovery, ms."),
        direct_records_read: counter = ("weir_direct_records_read", "Records read from direct sources' offset ranges (again on re-runs)."),
        direct_plan_failures: counter = ("weir_direct_plan_failures", "Direct-source range plans that failed or were refused."),
        direct_read_failures: counter = ("weir_direct_read_failures", "Failed reads of a batch's direct ranges (retried)."),
        replica_writes: counter = ("weir_replica_writes", "Entries appended to the replica (one per WAL group commit, allocation or completion)."),
        replica_bytes: counter = ("weir_replica_bytes", "Bytes appended to the replica."),
        replica_failures: counter = ("weir_replica_failures", "Failed replica writes (retried; nothing acknowledged meanwhile)."),
        replica_waiting: gauge = ("weir_replica_waiting", "1 while acknowledgements wait for the replica to accept a write."),
        replica_fenced: counter = ("weir_replica_fenced", "Writes refused because another process took the node_id over."),
        replica_trimmed: counter = ("weir_replica_entries_trimmed", "Replica entries deleted once no incomplete batch needed them."),
        replica_epoch: gauge = ("weir_replica_epoch", "The epoch this process owns in the replica."),
        adopted_blocks: counter = ("weir_adopted_blocks", "Blocks restored from the replica into an empty data directory."),
        adopted_batches: counter = ("weir_adopted_batches", "Incomplete batches restored from the replica (re-run)."),
        adoption_ms: gauge = ("weir_adoption_ms", "Duration of the last adoption from the replica, ms."),
    }
}

metric_set! {
    /// One receiver's counters and gauges (exported with the label `receiver`).
    pub struct ReceiverMetrics {
        records_received: counter = ("weir_receiver_records_received", "Records handed to store()."),
        bytes_received: counter = ("weir_receiver_bytes_received", "Payload bytes handed to store()."),
        records_stored: counter = ("weir_receiver_records_stored", "Records made durable."),
        bytes_stored: counter = ("weir_receiver_bytes_stored", "Payload bytes made durable."),
        blocks_stored: counter = ("weir_receiver_blocks_stored", "Blocks made durable."),
        store_failures: counter = ("weir_receiver_store_failures", "store() calls that failed."),
        restarts: counter = ("weir_receiver_restarts", "Restarts by the supervisor."),
        errors_reported: counter = ("weir_receiver_errors", "Errors the receiver reported with report_error."),
        pending_bytes: gauge = ("weir_receiver_pending_bytes", "Bytes accepted but not yet durable."),
        rate_limit: gauge = ("weir_receiver_rate_limit", "Current rate limit, records/s (0 = none)."),
        throttled_us: counter = ("weir_receiver_throttled_us", "Time store() calls waited for the rate limit, µs."),
        backpressure_waits: counter = ("weir_receiver_backpressure_waits", "store() calls that waited because max_pending_bytes was reached."),
        running: gauge = ("weir_receiver_running", "1 while the receiver runs."),
        ;
        /// The last error: a failed run (before its restart) or one reported with
        /// `report_error`.
        last_error: Mutex<Option<ReceiverIncident>>,
    }
}

/// A receiver's (or an output's) last error and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverIncident {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// What the receiver (or its supervisor) said.
    pub message: String,
}

impl ReceiverMetrics {
    /// Records `message` as the receiver's last error, now.
    pub(crate) fn note_error(&self, message: &str) {
        *lock(&self.last_error) = Some(ReceiverIncident {
            at_ms: now_ms(),
            message: message.to_string(),
        });
    }

    /// The receiver's last error, if it had one.
    pub fn last_error(&self) -> Option<ReceiverIncident> {
        lock(&self.last_error).clone()
    }
}

/// The system clock, ms since the epoch (0 before 1970).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many completed batches [`Metrics::recent_batches`] keeps.
pub const RECENT_BATCHES: usize = 300;

/// One completed batch, as the status page charts it (Spark's Streaming tab's four figures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    /// The batch time, ms since the epoch.
    pub time: u64,
    /// Records in the batch.
    pub records: u64,
    /// From the batch time to the start of its processing, ms.
    pub scheduling_ms: u64,
    /// Processing (every job), ms.
    pub processing_ms: u64,
}

/// Latency histograms (seconds).
#[derive(Debug)]
pub struct Latencies {
    /// From a `store()` call to its records being durable.
    pub(crate) store_to_durable: Histogram,
    /// Per batch: from its time to the start of its processing.
    pub(crate) batch_scheduling: Histogram,
    /// Per batch: processing (every job).
    pub(crate) batch_processing: Histogram,
    /// Per batch: scheduling plus processing.
    pub(crate) batch_total: Histogram,
    /// One replica write (an entry appended), successful attempts only.
    pub(crate) replica_write: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            store_to_durable: Histogram::new(latency_buckets()),
            batch_scheduling: Histogram::new(latency_buckets()),
            batch_processing: Histogram::new(latency_buckets()),
            batch_total: Histogram::new(latency_buckets()),
            replica_write: Histogram::new(latency_buckets()),
        }
    }
}

impl Latencies {
    const DECLARED: [(&'static str, &'static str); 5] = [
        (
            "weir_store_to_durable_seconds",
            "From a store() call to its records being durable (fsynced), seconds.",
        ),
        (
            "weir_batch_scheduling_delay_seconds",
            "From a batch's time to the start of its processing, seconds.",
        ),
        (
            "weir_batch_processing_seconds",
            "Processing of a batch (every job), seconds.",
        ),
        (
            "weir_batch_total_delay_seconds",
            "Scheduling delay plus processing of a batch, seconds.",
        ),
        (
            "weir_replica_write_seconds",
            "One successful replica write, seconds.",
        ),
    ];

    fn all(&self) -> [&Histogram; 5] {
        [
            &self.store_to_durable,
            &self.batch_scheduling,
            &self.batch_processing,
            &self.batch_total,
            &self.replica_write,
        ]
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReceiverLabel {
    receiver: String,
}

/// Every metric the engine keeps: its own, each receiver's, latency histograms, and where it
/// waits for disk space.
#[derive(Debug, Default)]
pub struct Metrics {
    engine: EngineMetrics,
    /// Latency histograms.
    pub(crate) latency: Latencies,
    /// Where the engine waits for disk space (tracker, outputs, recovery).
    pub(crate) space: SpaceWaits,
    receivers: Mutex<BTreeMap<String, Arc<ReceiverMetrics>>>,
    /// The last [`RECENT_BATCHES`] completed batches, oldest first.
    recent: Mutex<std::collections::VecDeque<BatchSummary>>,
    /// Sources of samples from outside the engine, with the label naming each.
    stats: Mutex<Vec<LabelledStats>>,
}

impl std::ops::Deref for Metrics {
    type Target = EngineMetrics;
    fn deref(&self) -> &EngineMetrics {
        &self.engine
    }
}

/// A connector's (or any component's) stats, with the label that names it (`receiver="x"`,
/// `output="1"`), or none.
#[derive(Clone)]
pub struct LabelledStats {
    /// The label naming the component, if any.
    pub label: Option<(&'static str, String)>,
    /// Its stats.
    pub stats: Arc<dyn ConnectorStats>,
    /// Its histograms (name, help, histogram), labelled like its stats.
    pub histograms: Vec<(&'static str, &'static str, Arc<Histogram>)>,
}

impl LabelledStats {
    /// `stats` labelled `key="value"`.
    pub fn new(
        key: &'static str,
        value: impl Into<String>,
        stats: Arc<dyn ConnectorStats>,
    ) -> Self {
        LabelledStats {
            label: Some((key, value.into())),
            stats,
            histograms: Vec::new(),
        }
    }

    /// `stats` without a label of its own.
    pub fn unlabelled(stats: Arc<dyn ConnectorStats>) -> Self {
        LabelledStats {
            label: None,
            stats,
            histograms: Vec::new(),
        }
    }

    /// Adds a histogram (`name` ends in `_seconds` for durations), labelled like the stats.
    /// Sources that add one name share its family.
    #[must_use]
    pub fn with_histogram(
        mut self,
        name: &'static str,
        help: &'static str,
        histogram: Arc<Histogram>,
    ) -> Self {
        self.histograms.push((name, help, histogram));
        self
    }
}

impl std::fmt::Debug for LabelledStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LabelledStats({:?})", self.label)
    }
}

impl Metrics {
    /// The latency histograms.
    pub fn latency(&self) -> &Latencies {
        &self.latency
    }

    /// 1 while writes at `place` wait for disk space (gauge).
    pub fn space_waiting(&self, place: Place) -> u64 {
        self.space.waiting(place)
    }

    /// Writes at `place` retried because the disk was full (counter).
    pub fn space_retries(&self, place: Place) -> u64 {
        self.space.retries(place)
    }

    /// Adds `stats` to every reading of the registry.
    pub fn add_stats(&self, stats: LabelledStats) {
        lock(&self.stats).push(stats);
    }

    /// The metrics of receiver `name` (created on first use).
    pub fn receiver(&self, name: &str) -> Arc<ReceiverMetrics> {
        lock(&self.receivers)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Remembers a completed batch (the oldest is forgotten beyond [`RECENT_BATCHES`]).
    pub(crate) fn batch_completed(&self, summary: BatchSummary) {
        let mut r = lock(&self.recent);
        if r.len() == RECENT_BATCHES {
            r.pop_front();
        }
        r.push_back(summary);
    }

    /// The last completed batches (at most [`RECENT_BATCHES`]), oldest first.
    pub fn recent_batches(&self) -> Vec<BatchSummary> {
        lock(&self.recent).iter().copied().collect()
    }

    /// Every source of samples added with [`add_stats`](Self::add_stats), in order.
    pub fn added_stats(&self) -> Vec<LabelledStats> {
        lock(&self.stats).clone()
    }

    /// Names of the receivers with metrics.
    pub fn receiver_names(&self) -> Vec<String> {
        lock(&self.receivers).keys().cloned().collect()
    }
}

/// Every metric of a running engine: its own, each receiver's, the WAL's, and what was added
/// with [`add_metrics`](crate::StreamingContext::add_metrics). Cheap to clone.
#[derive(Debug, Clone)]
pub struct MetricsRegistry {
    pub(crate) engine: Arc<Metrics>,
    pub(crate) wal: Arc<WalMetrics>,
    registry: Arc<Registry>,
}

impl MetricsRegistry {
    /// Registers `engine`'s and `wal`'s metrics.
    pub fn new(engine: Arc<Metrics>, wal: Arc<WalMetrics>) -> MetricsRegistry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(EngineCollector {
            engine: engine.clone(),
            wal: wal.clone(),
        }));
        MetricsRegistry {
            engine,
            wal,
            registry: Arc::new(registry),
        }
    }

    /// The engine's metrics.
    pub fn engine(&self) -> &Arc<Metrics> {
        &self.engine
    }

    /// The WAL's metrics.
    pub fn wal(&self) -> &Arc<WalMetrics> {
        &self.wal
    }

    /// Adds `stats` to every reading (a receiver's own counters, say).
    pub fn add_stats(&self, stats: LabelledStats) {
        self.engine.add_stats(stats);
    }

    /// Every place that can wait for disk space, with 1 while it does.
    pub fn waiting_places(&self) -> Vec<(&'static str, u64)> {
        let w = self.wal.snapshot();
        let mut v = vec![
            ("wal", w.waiting_for_space),
            ("free_space_floor", w.below_floor),
        ];
        v.extend(
            Place::ALL
                .iter()
                .map(|p| (p.label(), self.engine.space.waiting(*p))),
        );
        v
    }

    /// The places waiting for disk space now (empty when none).
    pub fn waiting_for_space(&self) -> Vec<&'static str> {
        self.waiting_places()
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(p, _)| p)
            .collect()
    }

    /// Renders every metric as OpenMetrics text (what `/metrics` serves).
    pub fn prometheus_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// The content type of [`MetricsRegistry::prometheus_text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes the engine's metrics at each scrape (the registry holds it).
#[derive(Debug)]
struct EngineCollector {
    engine: Arc<Metrics>,
    wal: Arc<WalMetrics>,
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &self.engine;
        encode_set(&mut encoder, EngineMetrics::DECLARED, &e.encodable())?;
        for ((name, help), h) in Latencies::DECLARED.iter().zip(e.latency.all()) {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            h.encode(m)?;
        }
        self.encode_receivers(&mut encoder)?;
        let space = SpaceStats {
            engine: e.clone(),
            wal: self.wal.clone(),
        };
        let mut sources = vec![
            LabelledStats::unlabelled(Arc::new(space)),
            LabelledStats::unlabelled(self.wal.clone()),
        ];
        sources.extend(lock(&e.stats).iter().cloned());
        encode_stats(&mut encoder, &sources)?;
        let m = encoder.encode_descriptor(
            "weir_wal_fsync_seconds",
            "Duration of the WAL's segment fdatasyncs, seconds.",
            None,
            MetricType::Histogram,
        )?;
        self.wal.fsync_seconds.encode(m)
    }
}

impl EngineCollector {
    /// One family per receiver metric, a sample per receiver.
    fn encode_receivers(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let receivers: Vec<(String, Arc<ReceiverMetrics>)> = lock(&self.engine.receivers)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let fields: Vec<(ReceiverLabel, Vec<&dyn EncodeMetric>)> = receivers
            .iter()
            .map(|(name, r)| {
                let label = ReceiverLabel {
                    receiver: name.clone(),
                };
                (label, r.encodable())
            })
            .collect();
        for (i, (name, help, kind)) in ReceiverMetrics::DECLARED.iter().enumerate() {
            let mut family = encoder.encode_descriptor(name, help, None, metric_type(*kind))?;
            for (label, f) in &fields {
                f[i].encode(family.encode_family(label)?)?;
            }
        }
        Ok(())
    }
}

fn metric_type(kind: StatKind) -> MetricType {
    match kind {
        StatKind::Counter => MetricType::Counter,
        StatKind::Gauge => MetricType::Gauge,
    }
}

fn encode_set(
    encoder: &mut DescriptorEncoder,
    declared: &[(&'static str, &'static str, StatKind)],
    fields: &[&dyn EncodeMetric],
) -> Result<(), std::fmt::Error> {
    debug_assert_eq!(declared.len(), fields.len());
    for ((name, help, kind), f) in declared.iter().zip(fields) {
        let m = encoder.encode_descriptor(name, help, None, metric_type(*kind))?;
        f.encode(m)?;
    }
    Ok(())
}

/// One reported sample, owned.
struct Owned {
    help: &'static str,
    kind: StatKind,
    labels: Vec<(String, String)>,
    value: u64,
}

/// Encodes the samples of every source, one family per name (sources that report the same
/// name, like two Kafka receivers, share it), in the order names first appear.
pub fn encode_stats(
    encoder: &mut DescriptorEncoder,
    sources: &[LabelledStats],
) -> Result<(), std::fmt::Error> {
    let mut order: Vec<&'static str> = Vec::new();
    let mut by_name: BTreeMap<&'static str, Vec<Owned>> = BTreeMap::new();
    for src in sources {
        src.stats.report(&mut |s: Stat<'_>| {
            let mut labels: Vec<(String, String)> = src
                .label
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect();
            labels.extend(
                s.labels
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
            );
            let entry = by_name.entry(s.name).or_insert_with(|| {
                order.push(s.name);
                Vec::new()
            });
            entry.push(Owned {
                help: s.help,
                kind: s.kind,
                labels,
                value: s.value,
            });
        });
    }
    for name in order {
        let samples = &by_name[name];
        let (help, kind) = (samples[0].help, samples[0].kind);
        // The encoder adds `_total` to counters.
        let base = match kind {
            StatKind::Counter => name.strip_suffix("_total").unwrap_or(name),
            StatKind::Gauge => name,
        };
        let mut family = encoder.encode_descriptor(base, help, None, metric_type(kind))?;
        for s in samples {
            let mut m = family.encode_family(&s.labels)?;
            match kind {
                StatKind::Counter => m.encode_counter::<NoLabelSet, _, u64>(&s.value, None)?,
                StatKind::Gauge => m.encode_gauge(&s.value)?,
            }
        }
    }
    let mut names: Vec<(&'static str, &'static str)> = Vec::new();
    for (name, help, _) in sources.iter().flat_map(|s| &s.histograms) {
        if !names.iter().any(|(n, _)| n == name) {
            names.push((name, help));
        }
    }
    for (name, help) in names {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for src in sources {
            for (_, _, h) in src.histograms.iter().filter(|(n, _, _)| *n == name) {
                let labels: Vec<(String, String)> = src
                    .label
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.clone()))
                    .collect();
                h.encode(family.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

/// The buckets of the engine's latency histograms (0.1 ms doubling to about 52 s), for
/// components adding histograms of their own with [`LabelledStats::with_histogram`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// Where the engine and its WAL wait for disk space, and the free-space figures.
struct SpaceStats {
    engine: Arc<Metrics>,
    wal: Arc<WalMetrics>,
}

impl ConnectorStats for SpaceStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        let w = self.wal.snapshot();
        let waiting = [
            ("wal", w.waiting_for_space),
            ("free_space_floor", w.below_floor),
        ]
        .into_iter()
        .chain(
            Place::ALL
                .iter()
                .map(|p| (p.label(), self.engine.space.waiting(*p))),
        );
        for (place, value) in waiting {
            out(Stat {
                name: "weir_waiting_for_space",
                help: "1 while writes at this place wait for disk space (wal, free_space_floor, tracker, output, recovery).",
                kind: StatKind::Gauge,
                labels: &[("place", place)],
                value,
            });
        }
        for place in Place::ALL {
            out(Stat {
                name: "weir_space_retries_total",
                help: "Writes retried because the disk was full (tracker, output, recovery; the WAL's are weir_wal_enospc_retries_total).",
                kind: StatKind::Counter,
                labels: &[("place", place.label())],
                value: self.engine.space.retries(place),
            });
        }
        out(Stat::gauge(
            "weir_free_space_floor_bytes",
            "The WAL's free-space floor on its file system (0: none or unknown).",
            w.floor_bytes,
        ));
        out(Stat::gauge(
            "weir_disk_available_bytes",
            "Free bytes on the WAL's file system at the last check (0: unknown).",
            w.available_bytes,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_batches_keep_the_newest_and_receivers_their_last_error() {
        let m = Metrics::default();
        for t in 0..(RECENT_BATCHES as u64 + 5) {
            m.batch_completed(BatchSummary {
                time: t,
                records: t,
                scheduling_ms: 1,
                processing_ms: 2,
            });
        }
        let recent = m.recent_batches();
        assert_eq!(recent.len(), RECENT_BATCHES);
        assert_eq!(recent[0].time, 5, "the oldest are forgotten");
        assert_eq!(recent.last().unwrap().time, RECENT_BATCHES as u64 + 4);
        let r = m.receiver("r");
        assert_eq!(r.last_error(), None);
        r.note_error("first");
        r.note_error("second");
        let e = r.last_error().unwrap();
        assert_eq!(e.message, "second");
        assert!(e.at_ms > 1_700_000_000_000, "{e:?}");
    }

    fn registry() -> MetricsRegistry {
        MetricsRegistry::new(
            Arc::new(Metrics::default()),
            Arc::new(WalMetrics::default()),
        )
    }

    /// Every counter and gauge the engine keeps is exported, and each once: the declared
    /// tables are what is encoded, so a field added to a table is exported and a field the
    /// tables lack does not compile into the encoder.
    #[test]
    fn every_metric_kept_is_exported_once() {
        let registry = registry();
        registry.engine.receiver("r");
        let text = registry.prometheus_text();
        for (name, _, kind) in ReceiverMetrics::DECLARED {
            let name = match kind {
                StatKind::Counter => format!("{name}_total"),
                StatKind::Gauge => name.to_string(),
            };
            let line = format!("\n{name}{{receiver=\"r\"}} 0\n");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        for (name, _, kind) in EngineMetrics::DECLARED {
            let (line, kind_name) = match kind {
                StatKind::Counter => (format!("\n{name}_total 0\n"), "counter"),
                StatKind::Gauge => (format!("\n{name} 0\n"), "gauge"),
            };
            assert!(text.contains(&line), "{line} missing");
            let ty = format!("# TYPE {name} {kind_name}\n");
            assert_eq!(text.matches(&ty).count(), 1, "{ty}");
        }
        for name in [
            "weir_free_space_floor_bytes",
            "weir_disk_available_bytes",
            "weir_wal_appends_total",
            "weir_wal_enospc_retries_total",
        ] {
            assert!(text.contains(&format!("\n{name} 0\n")), "{name} missing");
        }
        for place in ["wal", "free_space_floor", "tracker", "output", "recovery"] {
            let line = format!("weir_waiting_for_space{{place=\"{place}\"}} 0");
            assert!(text.contains(&line), "{line} missing");
        }
        for (name, _) in Latencies::DECLARED {
            assert!(text.contains(&format!("# TYPE {name} histogram")), "{name}");
            assert!(text.contains(&format!("\n{name}_count 0\n")), "{name}");
        }
        assert!(text.contains("# TYPE weir_wal_fsync_seconds histogram"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn sources_reporting_one_name_share_one_family() {
        struct Lag;
        impl ConnectorStats for Lag {
            fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
                for p in ["0", "1"] {
                    out(Stat {
                        name: "weir_test_lag",
                        help: "lag",
                        kind: StatKind::Gauge,
                        labels: &[("partition", p)],
                        value: 7,
                    });
                }
                out(Stat::counter("weir_test_records_total", "records", 3));
            }
        }
        let registry = registry();
        registry.add_stats(LabelledStats::new("receiver", "a", Arc::new(Lag)));
        registry.add_stats(LabelledStats::new("receiver", "b", Arc::new(Lag)));
        let text = registry.prometheus_text();
        assert_eq!(
            text.matches("# TYPE weir_test_lag gauge").count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches("# TYPE weir_test_records counter").count(), 1);
        assert!(
            text.contains("weir_test_lag{receiver=\"b\",partition=\"1\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("weir_test_records_total{receiver=\"a\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn histograms_count_observations() {
        let registry = registry();
        registry.engine.latency.store_to_durable.observe(0.002);
        registry.engine.latency.store_to_durable.observe(0.004);
        let text = registry.prometheus_text();
        assert!(
            text.contains("weir_store_to_durable_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("weir_store_to_durable_seconds_bucket{le=\"0.0032\"} 1"),
            "{text}"
        );
    }
}
