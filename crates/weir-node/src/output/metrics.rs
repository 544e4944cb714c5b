//! What every output counts (`weir_output_*`, labelled `output="<position>"`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use weir_receiver::{ConnectorStats, Stat, StatKind};

/// What one write of a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Records written to the destination.
    pub records: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Records sent to the dead-letter output instead.
    pub dead_letters: u64,
    /// True if the destination already held the batch (a re-run found it done).
    pub skipped: bool,
}

impl Written {
    /// `records` records of `bytes` payload bytes.
    pub fn records(records: u64, bytes: u64) -> Written {
        Written {
            records,
            bytes,
            ..Written::default()
        }
    }
}

/// One output's counters and write-latency histogram.
#[derive(Debug)]
pub struct OutputStats {
    /// `weir_output_records_total`.
    pub records: AtomicU64,
    /// `weir_output_bytes_total`.
    pub bytes: AtomicU64,
    /// `weir_output_batches_total`.
    pub batches: AtomicU64,
    /// `weir_output_batches_skipped_total`.
    pub batches_skipped: AtomicU64,
    /// `weir_output_failures_total`.
    pub failures: AtomicU64,
    /// `weir_output_dead_letters_total`.
    pub dead_letters: AtomicU64,
    /// `weir_output_failing`.
    pub failing: AtomicU64,
    /// `weir_output_last_write_ms`.
    pub last_write_ms: AtomicU64,
    /// `weir_output_write_seconds`: successful writes of non-empty batches.
    pub write_seconds: Arc<Histogram>,
    /// The last failed write's error and when (for the status page; not a metric).
    last_error: std::sync::Mutex<Option<weir::stream::ReceiverIncident>>,
}

impl Default for OutputStats {
    fn default() -> Self {
        OutputStats {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batches_skipped: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            failing: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
            write_seconds: Arc::new(weir::stream::metrics::latency_histogram()),
            last_error: std::sync::Mutex::default(),
        }
    }
}

impl OutputStats {
    /// Counts a successful write that took `took`.
    pub fn succeeded(&self, w: Written, took: Duration) {
        self.records.fetch_add(w.records, Relaxed);
        self.bytes.fetch_add(w.bytes, Relaxed);
        self.dead_letters.fetch_add(w.dead_letters, Relaxed);
        self.batches.fetch_add(1, Relaxed);
        if w.skipped {
            self.batches_skipped.fetch_add(1, Relaxed);
        }
        self.failing.store(0, Relaxed);
        if w.records + w.dead_letters > 0 {
            self.write_seconds.observe(took.as_secs_f64());
            self.last_write_ms
                .store(u64::try_from(took.as_millis()).unwrap_or(u64::MAX), Relaxed);
        }
    }

    /// Counts a failed write, and remembers why.
    pub fn failed(&self, error: &str) {
        self.failures.fetch_add(1, Relaxed);
        self.failing.store(1, Relaxed);
        *weir_receiver::lock(&self.last_error) = Some(weir::stream::ReceiverIncident {
            at_ms: crate::status::now_ms(),
            message: error.to_string(),
        });
    }

    /// The last failed write's error and when, if a write ever failed.
    pub fn last_error(&self) -> Option<weir::stream::ReceiverIncident> {
        weir_receiver::lock(&self.last_error).clone()
    }
}

impl ConnectorStats for OutputStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        let counters: [(&'static str, &'static str, &AtomicU64); 6] = [
            (
                "weir_output_records_total",
                "Records written to the destination.",
                &self.records,
            ),
            (
                "weir_output_bytes_total",
                "Payload bytes of the records written to the destination.",
                &self.bytes,
            ),
            (
                "weir_output_batches_total",
                "Batches written (including re-runs found already written).",
                &self.batches,
            ),
            (
                "weir_output_batches_skipped_total",
                "Re-run batches the destination already held (written again nowhere).",
                &self.batches_skipped,
            ),
            (
                "weir_output_failures_total",
                "Failed writes of a batch (each is retried).",
                &self.failures,
            ),
            (
                "weir_output_dead_letters_total",
                "Records the destination could not accept, written to the dead-letter output.",
                &self.dead_letters,
            ),
        ];
        for (name, help, v) in counters {
            out(Stat::counter(name, help, v.load(Relaxed)));
        }
        out(Stat {
            name: "weir_output_failing",
            help: "1 while the output's last write of a batch failed.",
            kind: StatKind::Gauge,
            labels: &[],
            value: self.failing.load(Relaxed),
        });
        out(Stat::gauge(
            "weir_output_last_write_ms",
            "Duration of the last successful write of a non-empty batch, ms.",
            self.last_write_ms.load(Relaxed),
        ));
    }
}
