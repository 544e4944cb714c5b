//! Counters and gauges of one WAL, readable at any time without locks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of a [`Wal`](super::Wal). Read them with [`WalMetrics::snapshot`].
#[derive(Debug, Default)]
pub struct WalMetrics {
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
