//! The write-ahead log: durable, checksummed, group-committed, recoverable.
//!
//! (Over 700 lines: the `Wal` handle, its shared state and cleanup are one unit whose
//! invariants — the segment list, the append queue, pins — are locked and documented together;
//! the writer, reader, recovery and format live in their own files.)
//!
//! # What it promises
//! - With [`FsyncPolicy::Always`] (the default), an append's future resolves with a
//!   [`RecordHandle`] only after the record, and the directory entry of any segment it lives in,
//!   has been `fdatasync`ed. After a crash, [`Wal::open`] gives back every such record intact,
//!   in append order.
//! - Every record is checksummed (CRC-32 over segment id, length and payload). Reads by handle
//!   and scans verify it; recovery classifies every byte as record, torn tail or damage, and
//!   never returns damage as data (see [`recovery`]).
//! - A failed fsync (or a failed write other than `ENOSPC`) stops the log: no false
//!   acknowledgement. `ENOSPC` makes appends wait (see [`writer`](self#failures)).
//!
//! # Layout
//! A directory holds `LOCK` and segment files `NNNNNNNNNNNNNNNNNNNN.wal` (20-digit zero-padded
//! ids, increasing). Format: see [`codec`]. A segment is rolled when the next record would take
//! it past [`WalConfig::segment_max_bytes`]; the full segment is fsynced before the next one is
//! created, so only the newest segment can end in a torn write.
//!
//! # Failures
//! | event | what happens |
//! | --- | --- |
//! | fsync fails | fatal: pending and later appends fail with [`WalError::Fatal`]; reopen to recover |
//! | write fails (not `ENOSPC`) | fatal, as above |
//! | `ENOSPC` on write or segment creation | appends wait and retry with backoff (log line, `enospc_retries` counter, `waiting_for_space` gauge); nothing acked meanwhile |
//! | crash | [`Wal::open`] truncates the torn tail of the newest segment, removes a half-created segment |
//! | damage elsewhere | [`RecoveryMode::Strict`]: open fails naming segment and offset; [`RecoveryMode::SkipCorrupt`]: skipped, counted, logged, reported |
//!
//! # Module map
//! [`codec`] (format), [`storage`] (the `Storage` trait and real files), [`sim`] (simulated
//! disk), [`recovery`] (scan and classify), `writer` (group commit), `reader` (read and scan),
//! `cleanup`, [`metrics`], [`config`], [`space`] (full disks and the free-space floor),
//! [`inspect`] (read-only analysis behind `receiver-node wal`).
//!
//! ```
//! use weir_wal::{Wal, WalConfig, WalPosition};
//!
//! let dir = tempfile::tempdir()?;
//! let (wal, _recovery) = Wal::open_dir(dir.path(), WalConfig::default())?;
//! let handle = wal.append(b"hello".to_vec()).wait()?; // returns once fdatasync'ed
//! assert_eq!(&wal.read(handle)?[..], b"hello");
//! assert_eq!(wal.scan(WalPosition::START).count(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod config;
mod crc_range;
mod error;
pub mod inspect;
pub mod metrics;
mod reader;
pub mod recovery;
#[cfg(feature = "sim")]
pub mod sim;
pub mod space;
pub mod storage;
mod writer;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::oneshot;

pub use config::{FsyncPolicy, RecoveryMode, WalConfig};
pub use error::{Result, WalError};
pub use metrics::{WalMetrics, WalMetricsSnapshot};
pub use reader::{WalRecord, WalScan};
pub use recovery::CorruptRegion;
pub use storage::{FileStorage, LockGuard, Storage, StorageFile};

use codec::SEGMENT_HEADER_LEN;
use writer::{Pending, Writer};

/// Where a record lives: returned by a durable append, accepted by [`Wal::read`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RecordHandle {
    /// Segment id.
    pub segment: u64,
    /// Offset of the record's frame within the segment file.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

impl RecordHandle {
    /// The position of this record.
    #[must_use]
    pub fn position(&self) -> WalPosition {
        WalPosition {
            segment: self.segment,
            offset: self.offset,
        }
    }

    /// The position just after this record.
    #[must_use]
    pub fn next_position(&self) -> WalPosition {
        WalPosition {
            segment: self.segment,
            offset: self.offset + codec::frame_size(self.len as usize),
        }
    }
}

/// A position in the log: a segment and a byte offset in it. Offsets below the segment header
/// mean "the first record of the segment". Positions order like the log.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct WalPosition {
    /// Segment id.
    pub segment: u64,
    /// Byte offset.
    pub offset: u64,
}

impl WalPosition {
    /// The beginning of the log (before every segment).
    pub const START: WalPosition = WalPosition {
        segment: 0,
        offset: 0,
    };
}

/// The file name of segment `id`.
#[must_use]
pub fn segment_name(id: u64) -> String {
    format!("{id:020}.wal")
}

/// The segment id named by a file name, if it is a segment file.
#[must_use]
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What [`Wal::open`] found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segments scanned.
    pub segments: usize,
    /// Intact records found.
    pub records: u64,
    /// Payload bytes of intact records.
    pub record_bytes: u64,
    /// Torn tails truncated: `(segment, offset, bytes)`.
    pub torn_tails: Vec<(u64, u64, u64)>,
    /// Half-created segments removed (they held no records).
    pub removed_segments: Vec<u64>,
    /// Damaged regions skipped (only with [`RecoveryMode::SkipCorrupt`]).
    pub corrupt: Vec<CorruptRegion>,
    /// The position the next append goes to.
    pub end: WalPosition,
    /// How long recovery took.
    pub duration: Duration,
    /// Bytes read while scanning.
    pub bytes_scanned: u64,
}

impl RecoveryReport {
    /// Records lost to damage (a region whose count is unknowable counts as one).
    #[must_use]
    pub fn records_lost(&self) -> u64 {
        self.corrupt
            .iter()
            .map(CorruptRegion::records_at_least)
            .sum()
    }

    /// True if every damaged region's record count is known (see [`CorruptRegion::records`]:
    /// exact when the damage is confined to one record).
    #[must_use]
    pub fn records_lost_exact(&self) -> bool {
        self.corrupt.iter().all(|c| c.records.is_some())
    }

    /// Bytes lost to damage.
    #[must_use]
    pub fn bytes_lost(&self) -> u64 {
        self.corrupt.iter().map(|c| c.bytes).sum()
    }
}

pub(crate) struct SegmentInfo {
    pub(crate) file: Arc<dyn StorageFile>,
    /// Bytes readers may see (acknowledged data).
    pub(crate) len: u64,
}

#[derive(Default)]
pub(crate) struct Segments {
    pub(crate) map: BTreeMap<u64, SegmentInfo>,
    /// Pin counts: segments a caller still needs (never deleted by cleanup).
    pins: BTreeMap<u64, usize>,
}

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) items: Vec<Pending>,
    pub(crate) closed: bool,
    pub(crate) fatal: Option<String>,
    /// The writer is waiting for work: appenders wake it (otherwise they need not: it looks
    /// at the queue again after every commit, and a wake-up is a system call).
    pub(crate) writer_sleeping: bool,
}

pub(crate) struct Shared {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) config: WalConfig,
    pub(crate) metrics: Arc<WalMetrics>,
    segments: Mutex<Segments>,
    queue: Mutex<Queue>,
    queue_cond: Condvar,
    /// Damage skipped at open; reads and scans step over it.
    pub(crate) skipped: Vec<CorruptRegion>,
}

pub(crate) use weir_receiver::lock;

impl Shared {
    pub(crate) fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    pub(crate) fn lock_segments(&self) -> MutexGuard<'_, Segments> {
        lock(&self.segments)
    }

    pub(crate) fn wait_queue<'a>(&self, g: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        self.queue_cond
            .wait(g)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn wait_queue_timeout<'a>(
        &self,
        g: MutexGuard<'a, Queue>,
        d: Duration,
    ) -> MutexGuard<'a, Queue> {
        self.queue_cond
            .wait_timeout(g, d)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Sleeps up to `d`, waking early on close. Returns true if the log is closing.
    pub(crate) fn wait_for_close(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut q = self.lock_queue();
        while !q.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self.wait_queue_timeout(q, left);
        }
        true
    }
}

/// A pinned segment: cleanup will not delete it while this guard lives.
#[derive(Debug)]
pub struct SegmentPin {
    shared: Arc<SharedRef>,
    segment: u64,
}

/// Keeps `Shared` alive for pins without exposing it.
struct SharedRef(Arc<Shared>);

impl std::fmt::Debug for SharedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wal")
    }
}

impl SegmentPin {
    /// The pinned segment.
    #[must_use]
    pub fn segment(&self) -> u64 {
        self.segment
    }
}

impl Drop for SegmentPin {
    fn drop(&mut self) {
        let mut segs = self.shared.0.lock_segments();
        if let Some(n) = segs.pins.get_mut(&self.segment) {
            *n -= 1;
            if *n == 0 {
                segs.pins.remove(&self.segment);
            }
        }
    }
}

/// What [`Wal::cleanup`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Segments deleted.
    pub deleted: Vec<u64>,
    /// Segments below the threshold kept because a caller pinned them.
    pub kept_pinned: Vec<u64>,
    /// Bytes freed.
    pub bytes_freed: u64,
}

/// Which segments [`Wal::cleanup`] may delete. A segment is deleted if it matches every given
/// bound (and is neither active nor pinned).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupThreshold {
    /// Delete segments that lie wholly before this position (id < `before.segment`).
    pub before: Option<WalPosition>,
    /// Delete segments last modified before this time.
    pub older_than: Option<SystemTime>,
}

/// The future of an append: resolves with the record's handle once it is durable (policy
/// `always`) or written (other policies). Dropping it does not cancel the append.
#[derive(Debug)]
pub struct AppendFuture {
    state: AppendState,
}

#[derive(Debug)]
enum AppendState {
    Ready(Option<Result<RecordHandle>>),
    Waiting(oneshot::Receiver<Result<RecordHandle>>),
}

impl AppendFuture {
    fn ready(r: Result<RecordHandle>) -> Self {
        Self {
            state: AppendState::Ready(Some(r)),
        }
    }

    /// A future already resolved with `result` (for a caller that polled an append to
    /// completion and hands the outcome on in the same shape).
    pub fn from_result(result: Result<RecordHandle>) -> Self {
        Self::ready(result)
    }

    /// Blocks the current thread until the append completes. For threads outside an async
    /// runtime.
    ///
    /// # Errors
    /// As the future.
    ///
    /// # Panics
    /// If called from within an asynchronous execution context (await the future instead).
    pub fn wait(self) -> Result<RecordHandle> {
        match self.state {
            AppendState::Ready(r) => r.unwrap_or(Err(WalError::Closed)),
            AppendState::Waiting(rx) => rx.blocking_recv().unwrap_or(Err(WalError::Closed)),
        }
    }
}

impl Future for AppendFuture {
    type Output = Result<RecordHandle>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            AppendState::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(WalError::Closed))),
            AppendState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(WalError::Closed))),
        }
    }
}

/// The write-ahead log. Share it with `Arc<Wal>`; every method takes `&self`.
pub struct Wal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The directory lock; released by [`Wal::close`] (or on drop).
    dir_lock: Mutex<Option<Box<dyn LockGuard>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("storage", &self.shared.storage.describe())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (creating if needed) the WAL in directory `dir`.
    ///
    /// # Errors
    /// See [`Wal::open`].
    pub fn open_dir(dir: impl AsRef<Path>, config: WalConfig) -> Result<(Wal, RecoveryReport)> {
        let dir = dir.as_ref();
        let storage = FileStorage::new(dir)
            .map_err(|e| WalError::io("create directory", dir.display().to_string(), e))?;
        Self::open(Arc::new(storage), config)
    }

    /// Opens the WAL on `storage`, running recovery: takes the lock, scans and verifies every
    /// segment, truncates a torn tail of the newest segment, removes a half-created newest
    /// segment, and handles damage according to `config.recovery`. Recovery only truncates and
    /// removes, each followed by an fsync, so it is idempotent.
    ///
    /// # Errors
    /// [`WalError::Locked`] if another opener holds the directory; [`WalError::Corruption`]
    /// (strict mode) naming the first damaged segment and offset; [`WalError::Io`];
    /// [`WalError::Config`].
    pub fn open(storage: Arc<dyn Storage>, config: WalConfig) -> Result<(Wal, RecoveryReport)> {
        config.validate().map_err(WalError::Config)?;
        let started = Instant::now();
        let where_ = storage.describe();
        let lock_guard = storage.lock().map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                WalError::Locked {
                    dir: where_.clone(),
                    detail: e.to_string(),
                }
            } else {
                WalError::io("lock", format!("{where_}/{}", storage::LOCK_FILE), e)
            }
        })?;
        let mut ids: Vec<u64> = storage
            .list()
            .map_err(|e| WalError::io("list", where_.clone(), e))?
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .collect();
        ids.sort_unstable();

        // Pass 1: scan everything, change nothing.
        let mut report = RecoveryReport {
            segments: ids.len(),
            ..RecoveryReport::default()
        };
        let mut scans = Vec::with_capacity(ids.len());
        for_each_segment(&*storage, &ids, |i, file, data| {
            report.bytes_scanned += data.len() as u64;
            let mut scan = recovery::scan_segment(ids[i], data, i + 1 == ids.len());
            report.records += scan.records.len() as u64;
            report.record_bytes += scan.record_bytes();
            scan.records = Vec::new();
            scans.push((scan, file));
        })?;
        let corrupt: Vec<CorruptRegion> = scans
            .iter()
            .flat_map(|(s, _)| s.corrupt.iter().cloned())
            .collect();
        if let Some(first) = corrupt.first() {
            if config.recovery == RecoveryMode::Strict {
                let lost_records: u64 = corrupt.iter().map(CorruptRegion::records_at_least).sum();
                let lost_bytes: u64 = corrupt.iter().map(|c| c.bytes).sum();
                return Err(WalError::Corruption {
                    segment: first.segment,
                    offset: first.offset,
                    reason: format!(
                        "{} in {} ({} damaged region(s), {} bytes, at least {} record(s); \
                         refusing to open in strict recovery mode: inspect with `wal verify`, \
                         or open with recovery mode skip_corrupt to skip the damage)",
                        first.reason,
                        segment_name(first.segment),
                        corrupt.len(),
                        lost_bytes,
                        lost_records
                    ),
                });
            }
            for c in &corrupt {
                tracing::error!(
                    segment = c.segment,
                    offset = c.offset,
                    bytes = c.bytes,
                    records = c.records.map_or_else(|| "unknown (at least 1)".to_owned(), |n| n.to_string()),
                    reason = %c.reason,
                    "WAL corruption skipped (recovery mode skip_corrupt): these records are lost"
                );
            }
        }

        // Pass 2: repair (idempotent: truncate + fsync, remove + fsync dir).
        let metrics = Arc::new(WalMetrics::default());
        let mut map = BTreeMap::new();
        let mut active: Option<(u64, Arc<dyn StorageFile>, u64)> = None;
        let mut reuse_newest = false;
        let last = scans.len().saturating_sub(1);
        for (i, (scan, file)) in scans.into_iter().enumerate() {
            let name = segment_name(scan.segment);
            if scan.header == recovery::HeaderState::TornCreation {
                storage
                    .remove(&name)
                    .map_err(|e| WalError::io("remove", format!("{where_}/{name}"), e))?;
                storage
                    .sync_dir()
                    .map_err(|e| WalError::io("fsync directory", where_.clone(), e))?;
                tracing::warn!(segment = %name, bytes = scan.file_len, "removed a half-created WAL segment (crash during creation; it held no records)");
                report.removed_segments.push(scan.segment);
                continue;
            }
            let mut len = scan.file_len;
            if let Some((off, bytes)) = scan.torn_tail {
                file.truncate(off)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| {
                        WalError::io("truncate torn tail of", format!("{where_}/{name}"), e)
                    })?;
                tracing::warn!(
                    segment = %name,
                    offset = off,
                    bytes,
                    "truncated a torn write at the end of the newest WAL segment (a crash artefact: these bytes were never acknowledged as durable)"
                );
                metrics.torn_bytes_truncated.fetch_add(bytes, Relaxed);
                report.torn_tails.push((scan.segment, off, bytes));
                len = off;
            }
            if i == last {
                // A previous run may have written to the newest segment without a successful
                // fsync (policy never/interval, or a failed commit before a reopen): make what
                // recovery accepts durable before anything builds on it.
                file.sync_data()
                    .map_err(|e| WalError::io("fdatasync", format!("{where_}/{name}"), e))?;
                reuse_newest = scan.corrupt.is_empty() && scan.header == recovery::HeaderState::Ok;
            }
            metrics.segments.fetch_add(1, Relaxed);
            metrics.wal_bytes.fetch_add(len, Relaxed);
            active = Some((scan.segment, Arc::clone(&file), len));
            map.insert(scan.segment, SegmentInfo { file, len });
        }
        metrics.corrupt_records.fetch_add(
            corrupt.iter().map(CorruptRegion::records_at_least).sum(),
            Relaxed,
        );
        metrics
            .corrupt_bytes
            .fetch_add(corrupt.iter().map(|c| c.bytes).sum(), Relaxed);
        report.corrupt = corrupt.clone();
        // A previous run may have created a segment and died (or failed) before fsyncing the
        // directory: make every segment name recovery accepts durable, or a crash could make
        // records acknowledged from now on vanish with the name.
        storage
            .sync_dir()
            .map_err(|e| WalError::io("fsync directory", where_.clone(), e))?;
        metrics.dir_fsyncs.fetch_add(1, Relaxed);

        let shared = Arc::new(Shared {
            storage,
            config,
            metrics,
            segments: Mutex::new(Segments {
                map,
                pins: BTreeMap::new(),
            }),
            queue: Mutex::new(Queue::default()),
            queue_cond: Condvar::new(),
            skipped: corrupt,
        });
        let active = match active {
            Some((id, file, len)) if reuse_newest => writer::ActiveSegment { id, file, len },
            other => {
                let next = codec::next_segment_id(other.map_or(0, |(id, _, _)| id));
                writer::create_segment(&shared, next).map_err(WalError::from)?
            }
        };
        report.end = WalPosition {
            segment: active.id,
            offset: active.len,
        };
        report.duration = started.elapsed();
        let fsync = shared.config.fsync;
        if !fsync.acks_are_durable() {
            tracing::warn!(
                policy = %fsync,
                "WAL fsync policy is not `always`: an acknowledgement means written, not durable; a power loss can lose acknowledged records"
            );
        }
        tracing::info!(
            dir = %shared.storage.describe(),
            segments = report.segments,
            records = report.records,
            bytes_scanned = report.bytes_scanned,
            torn_tails = report.torn_tails.len(),
            corrupt_regions = report.corrupt.len(),
            millis = report.duration.as_millis() as u64,
            "WAL recovered"
        );
        let (acks_tx, acks_rx) = std::sync::mpsc::channel();
        let completer = std::thread::Builder::new()
            .name("weir-wal-acks".to_owned())
            .spawn(move || writer::run_completer(acks_rx))
            .map_err(|e| WalError::io("spawn completion thread for", where_.clone(), e))?;
        let w = Writer::new(Arc::clone(&shared), active, acks_tx);
        let handle = std::thread::Builder::new()
            .name("weir-wal-writer".to_owned())
            .spawn(move || {
                w.run();
                // The writer is gone (and with it the sender): the completer drains and ends.
                let _ = completer.join();
            })
            .map_err(|e| WalError::io("spawn writer thread for", where_, e))?;
        Ok((
            Wal {
                shared,
                writer: Mutex::new(Some(handle)),
                dir_lock: Mutex::new(Some(lock_guard)),
            },
            report,
        ))
    }

    /// Appends a record. The future resolves with its handle once it is durable (policy
    /// `always`; see [`FsyncPolicy`] for the others). Appends from many threads or tasks are
    /// committed together; their order in the log is the order in which they were queued.
    ///
    /// The append is queued when this returns, whether or not the future is polled.
    ///
    /// # Errors (through the future)
    /// [`WalError::RecordTooLarge`]; [`WalError::Fatal`] after a failed fsync or write;
    /// [`WalError::Closed`].
    pub fn append(&self, payload: impl Into<Bytes>) -> AppendFuture {
        let payload = payload.into();
        let max = self.shared.config.max_record_bytes;
        if payload.len() > max as usize {
            return AppendFuture::ready(Err(WalError::RecordTooLarge {
                len: payload.len(),
                max,
            }));
        }
        let payload_crc =
            (payload.len() >= writer::CALLER_CRC_MIN).then(|| crc32fast::hash(&payload));
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut q = self.shared.lock_queue();
            if let Some(msg) = &q.fatal {
                return AppendFuture::ready(Err(WalError::Fatal(msg.clone())));
            }
            if q.closed {
                return AppendFuture::ready(Err(WalError::Closed));
            }
            q.items.push(Pending {
                payload,
                payload_crc,
                reply: tx,
            });
            std::mem::take(&mut q.writer_sleeping)
        };
        if wake {
            self.shared.queue_cond.notify_all();
        }
        AppendFuture {
            state: AppendState::Waiting(rx),
        }
    }

    /// Reads the record at `handle`, verifying its checksum.
    ///
    /// # Errors
    /// [`WalError::NotFound`] if the segment was deleted or the handle points past the data;
    /// [`WalError::Corruption`] if the bytes do not verify; [`WalError::Io`].
    pub fn read(&self, handle: RecordHandle) -> Result<Bytes> {
        reader::read(&self.shared, handle)
    }

    /// Scans records in log order from `from` (inclusive) up to the end of what is
    /// acknowledged now, verifying every checksum and stepping over damage that recovery
    /// skipped. The segment being read is pinned against cleanup.
    #[must_use]
    pub fn scan(&self, from: WalPosition) -> WalScan {
        WalScan::new(Arc::clone(&self.shared), from)
    }

    /// Pins `segment` so that [`Wal::cleanup`] will not delete it while the guard lives.
    #[must_use]
    pub fn pin(&self, segment: u64) -> SegmentPin {
        *self.shared.lock_segments().pins.entry(segment).or_insert(0) += 1;
        SegmentPin {
            shared: Arc::new(SharedRef(Arc::clone(&self.shared))),
            segment,
        }
    }

    /// Deletes whole segments that match `threshold`, never the active (newest) segment and
    /// never a pinned one; then fsyncs the directory once.
    ///
    /// # Errors
    /// [`WalError::Io`] if a removal or the directory fsync fails (segments removed before the
    /// failure are reported gone; the others stay).
    pub fn cleanup(&self, threshold: CleanupThreshold) -> Result<CleanupReport> {
        let s = &self.shared;
        let mut report = CleanupReport::default();
        let mut segs = s.lock_segments();
        let Some(&active) = segs.map.keys().next_back() else {
            return Ok(report);
        };
        let candidates: Vec<u64> = segs.map.keys().copied().filter(|&id| id < active).collect();
        for id in candidates {
            let name = segment_name(id);
            if let Some(pos) = threshold.before {
                if id >= pos.segment {
                    continue;
                }
            }
            if let Some(t) = threshold.older_than {
                let modified = s
                    .storage
                    .modified(&name)
                    .map_err(|e| WalError::io("stat", name.clone(), e))?;
                if modified >= t {
                    continue;
                }
            }
            if threshold.before.is_none() && threshold.older_than.is_none() {
                continue;
            }
            if segs.pins.contains_key(&id) {
                report.kept_pinned.push(id);
                continue;
            }
            s.storage
                .remove(&name)
                .map_err(|e| WalError::io("remove", name.clone(), e))?;
            if let Some(info) = segs.map.remove(&id) {
                report.bytes_freed += info.len;
            }
            report.deleted.push(id);
        }
        drop(segs);
        if !report.deleted.is_empty() {
            s.storage
                .sync_dir()
                .map_err(|e| WalError::io("fsync directory", s.storage.describe(), e))?;
            let m = &s.metrics;
            m.dir_fsyncs.fetch_add(1, Relaxed);
            m.segments_deleted
                .fetch_add(report.deleted.len() as u64, Relaxed);
            m.segments.fetch_sub(report.deleted.len() as u64, Relaxed);
            m.wal_bytes.fetch_sub(report.bytes_freed, Relaxed);
            tracing::info!(deleted = ?report.deleted, bytes = report.bytes_freed, "WAL cleanup");
        }
        Ok(report)
    }

    /// Ids of the segments on disk, oldest first (the last one is active).
    #[must_use]
    pub fn segments(&self) -> Vec<u64> {
        self.shared.lock_segments().map.keys().copied().collect()
    }

    /// The position the next append will get (approximately, under concurrent appends).
    #[must_use]
    pub fn end_position(&self) -> WalPosition {
        let segs = self.shared.lock_segments();
        segs.map
            .iter()
            .next_back()
            .map_or(WalPosition::START, |(&segment, info)| WalPosition {
                segment,
                offset: info.len,
            })
    }

    /// Free and total space of the file system holding the log (`None` where the storage
    /// cannot tell).
    ///
    /// # Errors
    /// I/O errors.
    pub fn space(&self) -> std::io::Result<Option<crate::space::DiskSpace>> {
        self.shared.storage.space()
    }

    /// The live counters.
    #[must_use]
    pub fn metrics(&self) -> &Arc<WalMetrics> {
        &self.shared.metrics
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &WalConfig {
        &self.shared.config
    }

    /// The error that stopped the log, if one did.
    #[must_use]
    pub fn fatal_error(&self) -> Option<String> {
        self.shared.lock_queue().fatal.clone()
    }

    /// Stops accepting appends, writes and (whatever the policy) fsyncs everything queued,
    /// stops the writer thread and releases the directory lock, so another `Wal` may open the
    /// directory at once (reads through this one should stop then). Dropping the `Wal` does the
    /// same.
    ///
    /// # Errors
    /// [`WalError::Fatal`] if the log had stopped, or the final writes failed.
    pub fn close(&self) -> Result<()> {
        self.shared.lock_queue().closed = true;
        self.shared.queue_cond.notify_all();
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                lock(&self.dir_lock).take();
                return Err(WalError::Fatal("the WAL writer thread panicked".to_owned()));
            }
        }
        // Nothing more is written: another opener may take the directory now.
        lock(&self.dir_lock).take();
        match self.fatal_error() {
            Some(msg) => Err(WalError::Fatal(msg)),
            None => Ok(()),
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "WAL closed with an error");
        }
    }
}

/// Bytes read per request when recovery reads a segment.
const READ_CHUNK: usize = 1 << 20;

/// Reads the segments `ids` whole, in order, and hands each to `visit(index, file, bytes)`.
/// A helper thread reads one segment ahead, so that reading the next segment overlaps
/// verifying this one; two buffers are recycled (never re-zeroed), so memory stays at two
/// segments.
fn for_each_segment(
    storage: &dyn Storage,
    ids: &[u64],
    mut visit: impl FnMut(usize, Arc<dyn StorageFile>, &[u8]),
) -> Result<()> {
    type Read = (usize, Arc<dyn StorageFile>, Vec<u8>, usize);
    let where_ = storage.describe();
    let read_one = |i: usize, mut buf: Vec<u8>| -> Result<Read> {
        let name = segment_name(ids[i]);
        let path = || format!("{where_}/{name}");
        let file = storage
            .open(&name)
            .map_err(|e| WalError::io("open", path(), e))?;
        let len = file.len().map_err(|e| WalError::io("stat", path(), e))?;
        let len = usize::try_from(len).map_err(|_| {
            WalError::io(
                "read",
                path(),
                std::io::Error::other("segment larger than memory"),
            )
        })?;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        // In chunks: the kernel's sequential readahead keeps up with moderate requests better
        // than with one request for the whole segment.
        for (k, chunk) in buf[..len].chunks_mut(READ_CHUNK).enumerate() {
            file.read_exact_at(chunk, (k * READ_CHUNK) as u64)
                .map_err(|e| WalError::io("read", path(), e))?;
        }
        Ok((i, file, buf, len))
    };
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Read>>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        s.spawn(move || {
            for i in 0..ids.len() {
                let buf = empty_rx.recv().unwrap_or_default();
                let read = read_one(i, buf);
                let failed = read.is_err();
                if full_tx.send(read).is_err() || failed {
                    return;
                }
            }
        });
        let _ = empty_tx.send(Vec::new());
        let _ = empty_tx.send(Vec::new());
        for read in full_rx {
            let (i, file, buf, len) = read?;
            visit(i, file, &buf[..len]);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}

/// The position of the first byte of records in a segment.
pub(crate) fn first_record_offset() -> u64 {
    SEGMENT_HEADER_LEN as u64
}
