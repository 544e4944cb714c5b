//! Counters and gauges of one WAL, readable at any time without locks, and exported through
//! [`ConnectorStats`] (every field of the snapshot, declared once in [`WalMetrics::report`]),
//! plus the fsync latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use weir_receiver::{ConnectorStats, Stat, StatKind};

/// Live counters of a [`Wal`](super::Wal). Read them with [`WalMetrics::snapshot`].
#[derive(Debug)]
pub struct WalMetrics {
    /// Duration of segment `fdatasync`s, seconds (100 µs to about 52 s buckets).
    pub fsync_seconds: Histogram,
    pub(crate) appends: AtomicU64,
    pub(crate) append_bytes: AtomicU64,
    pub(crate) group_commits: AtomicU64,
    pub(crate) write_calls: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) dir_fsyncs: AtomicU64,
    pub(crate) enospc_retries: AtomicU64,
    pub(crate) waiting_for_space: AtomicU64,
    pub(crate) below_floor: AtomicU64,
    pub(crate) floor_bytes: AtomicU64,
    pub(crate) available_bytes: AtomicU64,
    pub(crate) segments_created: AtomicU64,
    pub(crate) segments_deleted: AtomicU64,
    pub(crate) segments: AtomicU64,
    pub(crate) wal_bytes: AtomicU64,
    pub(crate) corrupt_records: AtomicU64,
    pub(crate) corrupt_bytes: AtomicU64,
    pub(crate) torn_bytes_truncated: AtomicU64,
    pub(crate) fatal: AtomicU64,
}

/// A point-in-time copy of [`WalMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalMetricsSnapshot {
    /// Records acknowledged by `append` (counter).
    pub appends: u64,
    /// Payload bytes acknowledged (counter).
    pub append_bytes: u64,
    /// Group commits: batches written together (counter).
    pub group_commits: u64,
    /// Write system calls (counter).
    pub write_calls: u64,
    /// Segment `fdatasync`s (counter).
    pub fsyncs: u64,
    /// Directory fsyncs (counter).
    pub dir_fsyncs: u64,
    /// Writes retried because the disk was full (counter).
    pub enospc_retries: u64,
    /// 1 while the writer is waiting for disk space, else 0 (gauge).
    pub waiting_for_space: u64,
    /// 1 while appends wait because free space is below the floor (gauge).
    pub below_floor: u64,
    /// The free-space floor in bytes, as of the last check (gauge; 0 = none or unknown).
    pub floor_bytes: u64,
    /// Free bytes on the log's file system, as of the last check (gauge; 0 = unknown).
    pub available_bytes: u64,
    /// Segments created (counter).
    pub segments_created: u64,
    /// Segments deleted by cleanup (counter).
    pub segments_deleted: u64,
    /// Segments on disk (gauge).
    pub segments: u64,
    /// Bytes in all segments (gauge).
    pub wal_bytes: u64,
    /// Records lost to corruption, found by recovery (counter; a region whose record count is
    /// unknowable counts as one).
    pub corrupt_records: u64,
    /// Bytes lost to corruption, found by recovery (counter).
    pub corrupt_bytes: u64,
    /// Bytes of torn tails truncated by recovery (counter).
    pub torn_bytes_truncated: u64,
    /// 1 once the log has stopped after a fatal error (gauge).
    pub fatal: u64,
}

impl Default for WalMetrics {
    fn default() -> Self {
        WalMetrics {
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            appends: AtomicU64::default(),
            append_bytes: AtomicU64::default(),
            group_commits: AtomicU64::default(),
            write_calls: AtomicU64::default(),
            fsyncs: AtomicU64::default(),
            dir_fsyncs: AtomicU64::default(),
            enospc_retries: AtomicU64::default(),
            waiting_for_space: AtomicU64::default(),
            below_floor: AtomicU64::default(),
            floor_bytes: AtomicU64::default(),
            available_bytes: AtomicU64::default(),
            segments_created: AtomicU64::default(),
            segments_deleted: AtomicU64::default(),
            segments: AtomicU64::default(),
            wal_bytes: AtomicU64::default(),
            corrupt_records: AtomicU64::default(),
            corrupt_bytes: AtomicU64::default(),
            torn_bytes_truncated: AtomicU64::default(),
            fatal: AtomicU64::default(),
        }
    }
}

impl ConnectorStats for WalMetrics {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        use StatKind::{Counter as C, Gauge as G};
        let w = self.snapshot();
        for (name, help, kind, value) in [
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
                "weir_wal_write_calls_total",
                "Write system calls of the WAL.",
                C,
                w.write_calls,
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
            (
                "weir_wal_below_floor",
                "1 while appends wait because free space is below the floor.",
                G,
                w.below_floor,
            ),
            (
                "weir_wal_segments_created_total",
                "WAL segments created.",
                C,
                w.segments_created,
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
            out(Stat {
                name,
                help,
                kind,
                labels: &[],
                value,
            });
        }
        // floor_bytes and available_bytes are exported by the host as weir_free_space_floor_bytes
        // and weir_disk_available_bytes (the disk's figures, not the log's).
    }
}

impl WalMetrics {
    /// Reads every counter.
    #[must_use]
    pub fn snapshot(&self) -> WalMetricsSnapshot {
        WalMetricsSnapshot {
            appends: self.appends.load(Relaxed),
            append_bytes: self.append_bytes.load(Relaxed),
            group_commits: self.group_commits.load(Relaxed),
            write_calls: self.write_calls.load(Relaxed),
            fsyncs: self.fsyncs.load(Relaxed),
            dir_fsyncs: self.dir_fsyncs.load(Relaxed),
            enospc_retries: self.enospc_retries.load(Relaxed),
            waiting_for_space: self.waiting_for_space.load(Relaxed),
            below_floor: self.below_floor.load(Relaxed),
            floor_bytes: self.floor_bytes.load(Relaxed),
            available_bytes: self.available_bytes.load(Relaxed),
            segments_created: self.segments_created.load(Relaxed),
            segments_deleted: self.segments_deleted.load(Relaxed),
            segments: self.segments.load(Relaxed),
            wal_bytes: self.wal_bytes.load(Relaxed),
            corrupt_records: self.corrupt_records.load(Relaxed),
            corrupt_bytes: self.corrupt_bytes.load(Relaxed),
            torn_bytes_truncated: self.torn_bytes_truncated.load(Relaxed),
            fatal: self.fatal.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of the snapshot is exported (the two free-space figures under the host's
    /// names): a field added to the metrics and not to `report` fails here.
    #[test]
    fn every_counter_is_reported() {
        let names = weir_receiver::stat_names(&WalMetrics::default());
        let snapshot = format!("{:?}", WalMetrics::default().snapshot());
        let fields: Vec<&str> = snapshot
            .trim_start_matches("WalMetricsSnapshot {")
            .trim_end_matches('}')
            .split(',')
            .filter_map(|f| f.split(':').next())
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        assert!(fields.len() >= 19, "{fields:?}");
        for f in fields {
            let exported = names
                .iter()
                .any(|n| n.contains(f) || (f == "wal_bytes" && *n == "weir_wal_bytes"))
                || ["floor_bytes", "available_bytes"].contains(&f);
            assert!(exported, "{f} is counted but not exported: {names:?}");
        }
    }
}
