//! The engine's counters and gauges, and a registry that lists them all (for the daemon's
//! Prometheus endpoint, logs, tests and benchmarks).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::wal::WalMetrics;

/// Whether a value only grows (counter) or goes up and down (gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One reading of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Prometheus-style name (`weir_...`).
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// Label pairs, e.g. `("receiver", "orders")`.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// Extra samples from outside the engine (a receiver's own counters, say), taken at every read
/// of the registry.
pub type Collector = Arc<dyn Fn(&mut Vec<Sample>) + Send + Sync>;

#[derive(Default)]
struct Collectors(Mutex<Vec<Collector>>);

impl std::fmt::Debug for Collectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} collectors", self.0.lock().map_or(0, |c| c.len()))
    }
}

/// Per-receiver counters.
#[derive(Debug, Default)]
pub struct ReceiverMetrics {
    pub(crate) records_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) records_stored: AtomicU64,
    pub(crate) bytes_stored: AtomicU64,
    pub(crate) blocks_stored: AtomicU64,
    pub(crate) store_failures: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) errors_reported: AtomicU64,
    pub(crate) pending_bytes: AtomicU64,
    pub(crate) rate_limit: AtomicU64,
    pub(crate) throttled_us: AtomicU64,
    pub(crate) backpressure_waits: AtomicU64,
    pub(crate) running: AtomicU64,
}

/// Engine-wide counters and gauges. Cheap to update (relaxed atomics), read at any time.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) blocks_pending: AtomicU64,
    pub(crate) blocks_cached: AtomicU64,
    pub(crate) cache_bytes: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) batches_allocated: AtomicU64,
    pub(crate) batches_completed: AtomicU64,
    pub(crate) batches_rerun: AtomicU64,
    pub(crate) batch_records: AtomicU64,
    pub(crate) job_failures: AtomicU64,
    pub(crate) scheduling_delay_ms: AtomicU64,
    pub(crate) processing_delay_ms: AtomicU64,
    pub(crate) total_delay_ms: AtomicU64,
    pub(crate) tracker_commits: AtomicU64,
    pub(crate) records_lost_corruption: AtomicU64,
    pub(crate) blocks_lost_corruption: AtomicU64,
    pub(crate) unallocated_blocks: AtomicU64,
    pub(crate) last_completed_batch_ms: AtomicU64,
    pub(crate) recovery_ms: AtomicU64,
    pub(crate) direct_records_read: AtomicU64,
    pub(crate) direct_plan_failures: AtomicU64,
    pub(crate) direct_read_failures: AtomicU64,
    /// Where the engine waits for disk space (tracker, outputs, recovery).
    pub(crate) space: crate::space::SpaceWaits,
    receivers: Mutex<BTreeMap<String, Arc<ReceiverMetrics>>>,
    collectors: Collectors,
}

macro_rules! getters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        $( $(#[$m])* pub fn $name(&self) -> u64 { self.$name.load(Relaxed) } )*
    };
}

impl ReceiverMetrics {
    getters! {
        /// Records handed to `store()` (counter).
        records_received,
        /// Records whose `store()` resolved durable (counter).
        records_stored,
        /// Blocks made durable (counter).
        blocks_stored,
        /// Restarts by the supervisor (counter).
        restarts,
        /// Errors the receiver reported with `report_error` (counter).
        errors_reported,
        /// Bytes accepted but not yet durable (gauge).
        pending_bytes,
        /// `store()` calls that waited because `max_pending_bytes` was reached (counter).
        backpressure_waits,
        /// Time `store()` calls waited for the rate limit, µs (counter).
        throttled_us,
        /// Current rate limit in records/s, 0 = none (gauge).
        rate_limit,
    }
}

impl Metrics {
    /// 1 while writes at `place` wait for disk space (gauge).
    pub fn space_waiting(&self, place: crate::space::Place) -> u64 {
        self.space.waiting(place)
    }

    /// Writes at `place` retried because the disk was full (counter).
    pub fn space_retries(&self, place: crate::space::Place) -> u64 {
        self.space.retries(place)
    }

    getters! {
        /// Blocks cut but not yet durable (gauge).
        blocks_pending,
        /// Blocks in the in-memory cache (gauge).
        blocks_cached,
        /// Bytes in the in-memory cache (gauge).
        cache_bytes,
        /// Block reads that had to go to the WAL (counter).
        cache_misses,
        /// Batches allocated (counter).
        batches_allocated,
        /// Batches whose jobs all succeeded (counter).
        batches_completed,
        /// Batches re-run after a restart (counter).
        batches_rerun,
        /// Records in completed batches (counter).
        batch_records,
        /// Job runs that failed; the batch is retried (counter).
        job_failures,
        /// Scheduling delay of the last batch, ms (gauge).
        scheduling_delay_ms,
        /// Processing time of the last batch, ms (gauge).
        processing_delay_ms,
        /// Scheduling plus processing delay of the last batch, ms (gauge).
        total_delay_ms,
        /// Tracker transactions committed (counter).
        tracker_commits,
        /// Records lost to corruption found at recovery (counter).
        records_lost_corruption,
        /// Allocated blocks dropped because their WAL record was corrupt (counter).
        blocks_lost_corruption,
        /// Durable blocks waiting for the next batch (gauge).
        unallocated_blocks,
        /// Time of the last completed batch, ms since the epoch (gauge).
        last_completed_batch_ms,
        /// Duration of the last startup recovery, ms (gauge).
        recovery_ms,
        /// Records read from direct sources' ranges (counter; again on re-runs).
        direct_records_read,
        /// Direct-source plans that failed or were refused (counter).
        direct_plan_failures,
        /// Reads of a batch's direct ranges that failed; the read is retried (counter).
        direct_read_failures,
    }

    /// Adds samples from outside the engine to every reading of a [`MetricsRegistry`].
    pub fn add_collector(&self, collector: Collector) {
        self.collectors
            .0
            .lock()
            .expect("metrics lock")
            .push(collector);
    }

    /// The metrics of receiver `name` (created on first use).
    pub fn receiver(&self, name: &str) -> Arc<ReceiverMetrics> {
        self.receivers
            .lock()
            .expect("metrics lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Names of the receivers with metrics.
    pub fn receiver_names(&self) -> Vec<String> {
        self.receivers
            .lock()
            .expect("metrics lock")
            .keys()
            .cloned()
            .collect()
    }
}

/// Every metric of a running engine: its own, each receiver's and the WAL's.
#[derive(Debug, Clone)]
pub struct MetricsRegistry {
    pub(crate) engine: Arc<Metrics>,
    pub(crate) wal: Arc<WalMetrics>,
}

impl MetricsRegistry {
    /// The engine's metrics.
    pub fn engine(&self) -> &Arc<Metrics> {
        &self.engine
    }

    /// The WAL's metrics.
    pub fn wal(&self) -> &Arc<WalMetrics> {
        &self.wal
    }

    /// Adds samples from outside the engine to every reading (e.g. a Kafka receiver's lag).
    pub fn add_collector(&self, collector: Collector) {
        self.engine.add_collector(collector);
    }

    /// Every place that can wait for disk space, with 1 while it does.
    pub fn waiting_places(&self) -> Vec<(&'static str, u64)> {
        let w = self.wal.snapshot();
        let mut v = vec![
            ("wal", w.waiting_for_space),
            ("free_space_floor", w.below_floor),
        ];
        v.extend(
            crate::space::Place::ALL
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

    /// Reads everything.
    pub fn samples(&self) -> Vec<Sample> {
        use MetricKind::{Counter as C, Gauge as G};
        let mut out = Vec::new();
        let mut push = |name, help, kind, labels: Vec<(&'static str, String)>, value: u64| {
            out.push(Sample {
                name,
                help,
                kind,
                labels,
                value: value as f64,
            });
        };
        let e = &self.engine;
        for (name, help, kind, v) in [
            (
                "weir_blocks_pending",
                "Blocks cut but not yet durable.",
                G,
                e.blocks_pending(),
            ),
            (
                "weir_block_cache_blocks",
                "Blocks in the in-memory block cache.",
                G,
                e.blocks_cached(),
            ),
            (
                "weir_block_cache_bytes",
                "Bytes in the in-memory block cache.",
                G,
                e.cache_bytes(),
            ),
            (
                "weir_block_cache_misses_total",
                "Block reads served from the WAL.",
                C,
                e.cache_misses(),
            ),
            (
                "weir_batches_allocated_total",
                "Batches allocated.",
                C,
                e.batches_allocated(),
            ),
            (
                "weir_batches_completed_total",
                "Batches completed.",
                C,
                e.batches_completed(),
            ),
            (
                "weir_batches_rerun_total",
                "Batches re-run after a restart.",
                C,
                e.batches_rerun(),
            ),
            (
                "weir_batch_records_total",
                "Records in completed batches.",
                C,
                e.batch_records(),
            ),
            (
                "weir_job_failures_total",
                "Failed job runs (the batch is retried).",
                C,
                e.job_failures(),
            ),
            (
                "weir_batch_scheduling_delay_ms",
                "Scheduling delay of the last batch.",
                G,
                e.scheduling_delay_ms(),
            ),
            (
                "weir_batch_processing_delay_ms",
                "Processing time of the last batch.",
                G,
                e.processing_delay_ms(),
            ),
            (
                "weir_batch_total_delay_ms",
                "Scheduling plus processing delay of the last batch.",
                G,
                e.total_delay_ms(),
            ),
            (
                "weir_tracker_commits_total",
                "Tracker transactions committed.",
                C,
                e.tracker_commits(),
            ),
            (
                "weir_records_lost_corruption_total",
                "Records lost to corruption found by recovery.",
                C,
                e.records_lost_corruption(),
            ),
            (
                "weir_blocks_lost_corruption_total",
                "Blocks lost to corruption found by recovery.",
                C,
                e.blocks_lost_corruption(),
            ),
            (
                "weir_unallocated_blocks",
                "Durable blocks waiting for the next batch.",
                G,
                e.unallocated_blocks(),
            ),
            (
                "weir_last_completed_batch_ms",
                "Time of the last completed batch.",
                G,
                e.last_completed_batch_ms(),
            ),
            (
                "weir_recovery_ms",
                "Duration of the last startup recovery.",
                G,
                e.recovery_ms(),
            ),
            (
                "weir_direct_records_read_total",
                "Records read from direct sources' offset ranges.",
                C,
                e.direct_records_read(),
            ),
            (
                "weir_direct_plan_failures_total",
                "Direct-source range plans that failed or were refused.",
                C,
                e.direct_plan_failures(),
            ),
            (
                "weir_direct_read_failures_total",
                "Failed reads of a batch's direct ranges (retried).",
                C,
                e.direct_read_failures(),
            ),
        ] {
            push(name, help, kind, Vec::new(), v);
        }
        let receivers: Vec<(String, Arc<ReceiverMetrics>)> = e
            .receivers
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, r) in receivers {
            let l = || vec![("receiver", name.clone())];
            for (metric, help, kind, v) in [
                (
                    "weir_receiver_records_received_total",
                    "Records handed to store().",
                    C,
                    &r.records_received,
                ),
                (
                    "weir_receiver_bytes_received_total",
                    "Payload bytes handed to store().",
                    C,
                    &r.bytes_received,
                ),
                (
                    "weir_receiver_records_stored_total",
                    "Records made durable.",
                    C,
                    &r.records_stored,
                ),
                (
                    "weir_receiver_bytes_stored_total",
                    "Payload bytes made durable.",
                    C,
                    &r.bytes_stored,
                ),
                (
                    "weir_receiver_blocks_stored_total",
                    "Blocks made durable.",
                    C,
                    &r.blocks_stored,
                ),
                (
                    "weir_receiver_store_failures_total",
                    "store() calls that failed.",
                    C,
                    &r.store_failures,
                ),
                (
                    "weir_receiver_restarts_total",
                    "Restarts by the supervisor.",
                    C,
                    &r.restarts,
                ),
                (
                    "weir_receiver_errors_total",
                    "Errors reported by the receiver.",
                    C,
                    &r.errors_reported,
                ),
                (
                    "weir_receiver_pending_bytes",
                    "Bytes accepted but not yet durable.",
                    G,
                    &r.pending_bytes,
                ),
                (
                    "weir_receiver_rate_limit",
                    "Current rate limit, records/s (0 = none).",
                    G,
                    &r.rate_limit,
                ),
                (
                    "weir_receiver_throttled_us_total",
                    "Time store() waited for the rate limit, µs.",
                    C,
                    &r.throttled_us,
                ),
                (
                    "weir_receiver_backpressure_waits_total",
                    "store() calls that waited because max_pending_bytes was reached.",
                    C,
                    &r.backpressure_waits,
                ),
                (
                    "weir_receiver_running",
                    "1 while the receiver runs.",
                    G,
                    &r.running,
                ),
            ] {
                push(metric, help, kind, l(), v.load(Relaxed));
            }
        }
        let w = self.wal.snapshot();
        for (place, waiting) in self.waiting_places() {
            push(
                "weir_waiting_for_space",
                "1 while writes at this place wait for disk space (wal, free_space_floor, tracker, output, recovery).",
                G,
                vec![("place", place.to_string())],
                waiting,
            );
        }
        for place in crate::space::Place::ALL {
            push(
                "weir_space_retries_total",
                "Writes retried because the disk was full (tracker, output, recovery; the WAL's are weir_wal_enospc_retries_total).",
                C,
                vec![("place", place.label().to_string())],
                e.space.retries(place),
            );
        }
        for (name, help, v) in [
            (
                "weir_free_space_floor_bytes",
                "The WAL's free-space floor on its file system (0: none or unknown).",
                w.floor_bytes,
            ),
            (
                "weir_disk_available_bytes",
                "Free bytes on the WAL's file system at the last check (0: unknown).",
                w.available_bytes,
            ),
        ] {
            push(name, help, G, Vec::new(), v);
        }
        wal_samples(&w, &mut out);
        let collectors = self
            .engine
            .collectors
            .0
            .lock()
            .expect("metrics lock")
            .clone();
        for c in collectors {
            c(&mut out);
        }
        out
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn prometheus_text(&self) -> String {
        render_prometheus(self.samples())
    }
}

/// The WAL's samples (`weir_wal_*`), from a snapshot of its counters.
pub fn wal_samples(w: &crate::wal::WalMetricsSnapshot, out: &mut Vec<Sample>) {
    use MetricKind::{Counter as C, Gauge as G};
    for (name, help, kind, v) in [
        (
            "weir_wal_appends_total",
            "Records acknowledged by the WAL.",
            C,
            w.appends,
        ),
        (
            "weir_wal_append_bytes_total",
            "Payload bytes acknowledged by the WAL.",
            C,
            w.append_bytes,
        ),
        (
            "weir_wal_group_commits_total",
            "WAL group commits.",
            C,
            w.group_commits,
        ),
        (
            "weir_wal_fsyncs_total",
            "WAL segment fdatasyncs.",
            C,
            w.fsyncs,
        ),
        (
            "weir_wal_dir_fsyncs_total",
            "WAL directory fsyncs.",
            C,
            w.dir_fsyncs,
        ),
        (
            "weir_wal_enospc_retries_total",
            "Writes retried because the disk was full.",
            C,
            w.enospc_retries,
        ),
        (
            "weir_wal_waiting_for_space",
            "1 while the WAL waits for disk space.",
            G,
            w.waiting_for_space,
        ),
        ("weir_wal_segments", "WAL segments on disk.", G, w.segments),
        ("weir_wal_bytes", "Bytes in WAL segments.", G, w.wal_bytes),
        (
            "weir_wal_segments_deleted_total",
            "WAL segments deleted by cleanup.",
            C,
            w.segments_deleted,
        ),
        (
            "weir_wal_corrupt_records_total",
            "WAL records lost to corruption.",
            C,
            w.corrupt_records,
        ),
        (
            "weir_wal_corrupt_bytes_total",
            "WAL bytes lost to corruption.",
            C,
            w.corrupt_bytes,
        ),
        (
            "weir_wal_torn_bytes_truncated_total",
            "Torn-tail bytes truncated by recovery.",
            C,
            w.torn_bytes_truncated,
        ),
        (
            "weir_wal_fatal",
            "1 once the WAL stopped after a fatal error.",
            G,
            w.fatal,
        ),
    ] {
        out.push(Sample {
            name,
            help,
            kind,
            labels: Vec::new(),
            value: v as f64,
        });
    }
}

/// Renders samples in the Prometheus text exposition format (samples of one name together).
pub fn render_prometheus(mut samples: Vec<Sample>) -> String {
    let mut s = String::new();
    let mut last = "";
    // Samples of one name (one per receiver) must be adjacent; the sort is stable.
    samples.sort_by(|a, b| a.name.cmp(b.name));
    for m in samples {
        if m.name != last {
            let kind = match m.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
            };
            let _ = writeln!(s, "# HELP {} {}\n# TYPE {} {kind}", m.name, m.help, m.name);
            last = m.name;
        }
        s.push_str(m.name);
        if !m.labels.is_empty() {
            s.push('{');
            for (i, (k, v)) in m.labels.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(s, "{k}=\"{v}\"");
            }
            s.push('}');
        }
        let _ = writeln!(s, " {}", m.value);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every counter and gauge the engine keeps is exported (two once were counted but never
    /// shown): a sample per metric that the README lists.
    #[test]
    fn every_metric_kept_is_exported() {
        let registry = MetricsRegistry {
            engine: Arc::new(Metrics::default()),
            wal: Arc::new(WalMetrics::default()),
        };
        registry.engine.receiver("r");
        let text = registry.prometheus_text();
        let receiver = [
            "records_received_total",
            "bytes_received_total",
            "records_stored_total",
            "bytes_stored_total",
            "blocks_stored_total",
            "store_failures_total",
            "restarts_total",
            "errors_total",
            "pending_bytes",
            "rate_limit",
            "throttled_us_total",
            "backpressure_waits_total",
            "running",
        ];
        for name in receiver {
            let line = format!("weir_receiver_{name}{{receiver=\"r\"}} 0");
            assert!(text.contains(&line), "{line} missing");
        }
        for name in [
            "weir_blocks_pending",
            "weir_batches_allocated_total",
            "weir_batches_completed_total",
            "weir_batches_rerun_total",
            "weir_batch_records_total",
            "weir_job_failures_total",
            "weir_tracker_commits_total",
            "weir_records_lost_corruption_total",
            "weir_blocks_lost_corruption_total",
            "weir_unallocated_blocks",
            "weir_last_completed_batch_ms",
            "weir_recovery_ms",
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
    }
}
