//! The group-commit writer: one thread does every write and fsync of the log.
//!
//! Appenders push `(payload, reply)` onto a queue and wake the writer. The writer takes
//! everything queued, frames it, writes it with as few vectored writes as possible, runs one
//! `fdatasync` (policy `always`), and only then replies to every appender with its
//! [`RecordHandle`]. Under load a single fsync covers many appends; with one appender the
//! latency is one write plus one fsync.
//!
//! Failures:
//! - `ENOSPC` on a write is backpressure: the writer logs, counts (`enospc_retries`, gauge
//!   `waiting_for_space`), waits with backoff and retries the unwritten bytes; nothing is acked
//!   meanwhile and nothing is lost.
//! - Any other write error, or any fsync error, is fatal: after a failed fsync the kernel may
//!   have dropped the dirty pages, so retrying and acking would lie. Every pending and later
//!   append fails with [`WalError::Fatal`]; reopening the log runs recovery.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;
use weir_receiver::Backoff;

use super::codec::{
    encode_frame_header, encode_frame_header_with_payload_crc, encode_header, frame_size,
    next_segment_id, SEGMENT_HEADER_LEN,
};
use super::{segment_name, FsyncPolicy, RecordHandle, Result, SegmentInfo, Shared, WalError};

/// One queued append.
pub(crate) struct Pending {
    pub(crate) payload: Bytes,
    /// CRC-32 of the payload alone, computed by the appender for large payloads so that
    /// the writer thread only combines it with the segment id and length.
    pub(crate) payload_crc: Option<u32>,
    pub(crate) reply: oneshot::Sender<Result<RecordHandle>>,
}

/// Payloads at least this large have their CRC computed on the appender's thread.
pub(crate) const CALLER_CRC_MIN: usize = 4096;

/// Batches with more waiters than this are acknowledged by the completion thread, so that the
/// writer can start the next write and fsync meanwhile; smaller ones are acknowledged inline
/// (one thread hand-off less for a lone appender).
const INLINE_ACKS_MAX: usize = 8;

/// Acknowledgements handed to the completion thread.
pub(crate) type Acks = Vec<(oneshot::Sender<Result<RecordHandle>>, Result<RecordHandle>)>;

/// The completion thread's body: delivers acknowledgements until the writer goes away.
pub(crate) fn run_completer(rx: std::sync::mpsc::Receiver<Acks>) {
    for acks in rx {
        deliver(acks);
    }
}

fn deliver(acks: Acks) {
    for (reply, result) in acks {
        // A dropped receiver means the appender stopped waiting; the record is still in the
        // log and will be seen by scans.
        let _ = reply.send(result);
    }
}

/// Payloads at least this large are written from the caller's buffer; smaller ones are copied
/// next to their frame header so that a batch of small records is one contiguous write.
const DIRECT_WRITE_MIN: usize = 32 * 1024;

/// The segment being appended to.
pub(crate) struct ActiveSegment {
    pub(crate) id: u64,
    pub(crate) file: Arc<dyn super::StorageFile>,
    /// Bytes written (acknowledged or about to be).
    pub(crate) len: u64,
}

/// Bytes to write in one go: small frames copied into `staging`, large payloads by reference.
#[derive(Default)]
struct WritePlan {
    staging: Vec<u8>,
    parts: Vec<Part>,
    bytes: u64,
}

enum Part {
    Staged(usize, usize),
    Direct(Bytes),
}

impl WritePlan {
    fn stage(&mut self, bytes: &[u8]) {
        let start = self.staging.len();
        self.staging.extend_from_slice(bytes);
        match self.parts.last_mut() {
            Some(Part::Staged(_, end)) if *end == start => *end = self.staging.len(),
            _ => self.parts.push(Part::Staged(start, self.staging.len())),
        }
    }

    fn add(&mut self, header: &[u8], payload: &Bytes) {
        self.stage(header);
        if payload.len() >= DIRECT_WRITE_MIN {
            self.parts.push(Part::Direct(payload.clone()));
        } else {
            self.stage(payload);
        }
        self.bytes += (header.len() + payload.len()) as u64;
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn clear(&mut self) {
        self.staging.clear();
        self.parts.clear();
        self.bytes = 0;
    }
}

pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) active: ActiveSegment,
    completer: std::sync::mpsc::Sender<Acks>,
    plan: WritePlan,
    /// Bytes written since the last fsync of the active segment.
    unsynced: bool,
    last_sync: Instant,
    /// When free space was last found above the floor.
    floor_checked: Option<Instant>,
}

/// How long a free-space check above the floor stays valid.
const FLOOR_CHECK_EVERY: Duration = Duration::from_millis(10);

/// Why a write could not complete.
pub(crate) enum WriteFailure {
    /// The log must stop.
    Fatal(String),
    /// The log was closed while waiting for disk space.
    Closed,
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        active: ActiveSegment,
        completer: std::sync::mpsc::Sender<Acks>,
    ) -> Self {
        Self {
            shared,
            active,
            completer,
            plan: WritePlan::default(),
            unsynced: false,
            last_sync: Instant::now(),
            floor_checked: None,
        }
    }

    /// The writer thread's body. Returns when the log is closed and the queue is drained.
    pub(crate) fn run(mut self) {
        let interval = match self.shared.config.fsync {
            FsyncPolicy::Interval { ms } => Some(Duration::from_millis(ms)),
            _ => None,
        };
        loop {
            let batch = {
                let mut q = self.shared.lock_queue();
                loop {
                    if !q.items.is_empty() {
                        break std::mem::take(&mut q.items);
                    }
                    if q.closed || q.fatal.is_some() {
                        drop(q);
                        self.finish();
                        return;
                    }
                    q.writer_sleeping = true;
                    match interval {
                        Some(iv) if self.unsynced => {
                            let due = iv.saturating_sub(self.last_sync.elapsed());
                            if due.is_zero() {
                                q.writer_sleeping = false;
                                break Vec::new();
                            }
                            q = self.shared.wait_queue_timeout(q, due);
                        }
                        _ => q = self.shared.wait_queue(q),
                    }
                    q.writer_sleeping = false;
                }
            };
            if batch.is_empty() {
                // The fsync interval ran out while idle.
                if let Err(e) = self.sync_active() {
                    self.fail(e, Vec::new());
                }
                continue;
            }
            if let Err(f) = self.wait_for_floor() {
                self.fail_with(f, batch);
                continue;
            }
            self.commit(batch);
        }
    }

    /// Waits while free space on the log's file system is below the floor (see
    /// `WalConfig::min_free_bytes`): nothing is written, so nothing new is acknowledged, and
    /// `store()` waits behind it. Checked at most every [`FLOOR_CHECK_EVERY`] while above it.
    fn wait_for_floor(&mut self) -> Result<(), WriteFailure> {
        let min = self.shared.config.min_free_bytes;
        if min == 0
            || self
                .floor_checked
                .is_some_and(|t| t.elapsed() < FLOOR_CHECK_EVERY)
        {
            return Ok(());
        }
        let m = &self.shared.metrics;
        let mut backoff = Backoff::new(
            Duration::from_millis(5),
            self.shared.config.enospc_max_backoff,
        );
        let mut waiting_since: Option<Instant> = None;
        let mut last_warning = Instant::now();
        loop {
            let space = match self.shared.storage.space() {
                Ok(Some(s)) => s,
                // Unknown: no floor (the ENOSPC handling still applies).
                Ok(None) | Err(_) => return Ok(()),
            };
            let floor = crate::space::floor(min, space.total);
            m.floor_bytes.store(floor, Relaxed);
            m.available_bytes.store(space.available, Relaxed);
            if space.available >= floor {
                self.floor_checked = Some(Instant::now());
                if let Some(since) = waiting_since {
                    m.below_floor.store(0, Relaxed);
                    tracing::warn!(
                        available = space.available,
                        floor,
                        waited_ms = since.elapsed().as_millis() as u64,
                        "free space is above the floor again; WAL writes resumed"
                    );
                }
                return Ok(());
            }
            let since = *waiting_since.get_or_insert_with(|| {
                m.below_floor.store(1, Relaxed);
                tracing::error!(
                    available = space.available, floor, dir = %self.shared.storage.describe(),
                    "free disk space is below the floor (wal.min_free_bytes): the WAL waits and \
                     nothing new is acknowledged until space is freed"
                );
                Instant::now()
            });
            if self.shared.wait_for_close(backoff.next_delay()) {
                m.below_floor.store(0, Relaxed);
                return Err(WriteFailure::Closed);
            }
            if last_warning.elapsed() >= Duration::from_secs(10) {
                last_warning = Instant::now();
                tracing::warn!(
                    available = space.available,
                    floor,
                    waited_s = since.elapsed().as_secs(),
                    "still below the free-space floor"
                );
            }
        }
    }

    /// Final fsync on close (policies `interval` and `never` leave unsynced data behind).
    fn finish(&mut self) {
        if self.unsynced && self.shared.lock_queue().fatal.is_none() {
            if let Err(e) = self.sync_active() {
                self.fail(e, Vec::new());
            }
        }
    }

    /// Writes, syncs and acknowledges one batch.
    fn commit(&mut self, batch: Vec<Pending>) {
        let mut handles = Vec::with_capacity(batch.len());
        let seg_max = self.shared.config.segment_max_bytes;
        for p in &batch {
            let size = frame_size(p.payload.len());
            if self.active.len > SEGMENT_HEADER_LEN as u64 && self.active.len + size > seg_max {
                if let Err(f) = self.write_plan().and_then(|()| self.roll()) {
                    return self.fail_with(f, batch);
                }
            }
            let header = match p.payload_crc {
                Some(crc) => {
                    encode_frame_header_with_payload_crc(self.active.id, p.payload.len(), crc)
                }
                None => encode_frame_header(self.active.id, &p.payload),
            };
            self.plan.add(&header, &p.payload);
            handles.push(RecordHandle {
                segment: self.active.id,
                offset: self.active.len,
                len: p.payload.len() as u32,
            });
            self.active.len += size;
        }
        if let Err(f) = self.write_plan() {
            return self.fail_with(f, batch);
        }
        let sync_now = match self.shared.config.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval { ms } => self.last_sync.elapsed() >= Duration::from_millis(ms),
            FsyncPolicy::Never => false,
        };
        if sync_now {
            if let Err(e) = self.sync_active() {
                return self.fail(e, batch);
            }
        }
        self.publish_len();
        let m = &self.shared.metrics;
        m.group_commits.fetch_add(1, Relaxed);
        m.appends.fetch_add(batch.len() as u64, Relaxed);
        let bytes: u64 = batch.iter().map(|p| p.payload.len() as u64).sum();
        m.append_bytes.fetch_add(bytes, Relaxed);
        let acks: Acks = batch
            .into_iter()
            .zip(handles)
            .map(|(p, h)| (p.reply, Ok(h)))
            .collect();
        self.acknowledge(acks);
    }

    /// Delivers acknowledgements: inline for a few, through the completion thread for many.
    fn acknowledge(&self, acks: Acks) {
        let acks = if acks.len() > INLINE_ACKS_MAX {
            match self.completer.send(acks) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(acks)) => acks,
            }
        } else {
            acks
        };
        deliver(acks);
    }

    /// Makes the written length of the active segment visible to readers and scans.
    fn publish_len(&self) {
        let mut segs = self.shared.lock_segments();
        if let Some(info) = segs.map.get_mut(&self.active.id) {
            let grown = self.active.len.saturating_sub(info.len);
            info.len = self.active.len;
            self.shared.metrics.wal_bytes.fetch_add(grown, Relaxed);
        }
    }

    fn sync_active(&mut self) -> io::Result<()> {
        let t0 = Instant::now();
        self.active.file.sync_data().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("fdatasync of segment {}: {e}", segment_name(self.active.id)),
            )
        })?;
        self.shared.metrics.fsyncs.fetch_add(1, Relaxed);
        self.shared
            .metrics
            .fsync_seconds
            .observe(t0.elapsed().as_secs_f64());
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Writes the plan to the active segment, waiting out `ENOSPC`.
    fn write_plan(&mut self) -> Result<(), WriteFailure> {
        if self.plan.is_empty() {
            return Ok(());
        }
        let plan = std::mem::take(&mut self.plan);
        let mut slices: Vec<IoSlice<'_>> = plan
            .parts
            .iter()
            .map(|p| match p {
                Part::Staged(a, b) => IoSlice::new(&plan.staging[*a..*b]),
                Part::Direct(b) => IoSlice::new(b),
            })
            .collect();
        let file = Arc::clone(&self.active.file);
        let what = segment_name(self.active.id);
        let result = write_all(&self.shared, &*file, &mut slices, &what);
        drop(slices);
        self.plan = plan;
        self.plan.clear();
        if result.is_ok() {
            self.unsynced = true;
        }
        result
    }

    /// Seals the active segment (fsync whatever the policy) and starts the next one.
    fn roll(&mut self) -> Result<(), WriteFailure> {
        self.sync_active()
            .map_err(|e| WriteFailure::Fatal(e.to_string()))?;
        self.publish_len();
        let active = create_segment(&self.shared, next_segment_id(self.active.id))?;
        self.active = active;
        Ok(())
    }

    fn fail(&mut self, e: io::Error, batch: Vec<Pending>) {
        self.fail_with(WriteFailure::Fatal(e.to_string()), batch);
    }

    fn fail_with(&mut self, failure: WriteFailure, batch: Vec<Pending>) {
        let mut q = self.shared.lock_queue();
        // `None`: closed while waiting for disk space.
        let fatal = match failure {
            WriteFailure::Fatal(msg) => {
                tracing::error!(
                    error = %msg,
                    "WAL write or fsync failed: the log stops, pending and later appends fail; reopen to recover"
                );
                self.shared.metrics.fatal.store(1, Relaxed);
                Some(q.fatal.get_or_insert(msg).clone())
            }
            WriteFailure::Closed => None,
        };
        let rest = std::mem::take(&mut q.items);
        drop(q);
        let acks: Acks = batch
            .into_iter()
            .chain(rest)
            .map(|p| {
                let e = fatal.clone().map_or(WalError::Closed, WalError::Fatal);
                (p.reply, Err(e))
            })
            .collect();
        self.acknowledge(acks);
        // Drop what was planned: none of it is acknowledged.
        self.plan.clear();
    }
}

/// Writes all of `slices` at the end of `file`, waiting out `ENOSPC` (see the module docs).
fn write_all(
    shared: &Shared,
    file: &dyn super::StorageFile,
    mut slices: &mut [IoSlice<'_>],
    what: &str,
) -> Result<(), WriteFailure> {
    let mut backoff = Backoff::new(Duration::from_millis(5), shared.config.enospc_max_backoff);
    let mut waiting_since: Option<Instant> = None;
    let m = &shared.metrics;
    while !slices.is_empty() {
        match file.append(slices) {
            Ok(0) => {
                return Err(WriteFailure::Fatal(format!(
                    "write to segment {what} wrote nothing"
                )))
            }
            Ok(n) => {
                m.write_calls.fetch_add(1, Relaxed);
                IoSlice::advance_slices(&mut slices, n);
                if waiting_since.take().is_some() {
                    m.waiting_for_space.store(0, Relaxed);
                    tracing::warn!(
                        segment = what,
                        "disk space is available again; writes resumed"
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                m.enospc_retries.fetch_add(1, Relaxed);
                let since = *waiting_since.get_or_insert_with(|| {
                    m.waiting_for_space.store(1, Relaxed);
                    tracing::error!(
                        segment = what,
                        "disk full (ENOSPC) writing the WAL: appends wait, nothing is acknowledged until space is freed"
                    );
                    Instant::now()
                });
                let at_max = backoff.at_max();
                if shared.wait_for_close(backoff.next_delay()) {
                    m.waiting_for_space.store(0, Relaxed);
                    return Err(WriteFailure::Closed);
                }
                if at_max {
                    tracing::warn!(
                        segment = what,
                        waited_s = since.elapsed().as_secs(),
                        "still waiting for disk space"
                    );
                }
            }
            Err(e) => return Err(WriteFailure::Fatal(format!("write to segment {what}: {e}"))),
        }
    }
    Ok(())
}

/// Creates segment `id`: file, header, fsync of the file, fsync of the directory.
pub(crate) fn create_segment(
    shared: &Shared,
    id: u64,
) -> std::result::Result<ActiveSegment, WriteFailure> {
    let name = segment_name(id);
    let file = loop {
        match shared.storage.create(&name) {
            Ok(f) => break f,
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                shared.metrics.enospc_retries.fetch_add(1, Relaxed);
                tracing::error!(segment = %name, "disk full (ENOSPC) creating a WAL segment: waiting");
                if shared.wait_for_close(shared.config.enospc_max_backoff) {
                    return Err(WriteFailure::Closed);
                }
            }
            Err(e) => return Err(WriteFailure::Fatal(format!("create segment {name}: {e}"))),
        }
    };
    let header = encode_header(id);
    write_all(shared, &*file, &mut [IoSlice::new(&header)], &name)?;
    file.sync_data()
        .map_err(|e| WriteFailure::Fatal(format!("fdatasync of new segment {name}: {e}")))?;
    shared.storage.sync_dir().map_err(|e| {
        WriteFailure::Fatal(format!("fsync of WAL directory after creating {name}: {e}"))
    })?;
    let m = &shared.metrics;
    m.fsyncs.fetch_add(1, Relaxed);
    m.dir_fsyncs.fetch_add(1, Relaxed);
    m.segments_created.fetch_add(1, Relaxed);
    m.segments.fetch_add(1, Relaxed);
    m.wal_bytes.fetch_add(SEGMENT_HEADER_LEN as u64, Relaxed);
    shared.lock_segments().map.insert(
        id,
        SegmentInfo {
            file: Arc::clone(&file),
            len: SEGMENT_HEADER_LEN as u64,
        },
    );
    tracing::debug!(segment = %name, "created WAL segment");
    Ok(ActiveSegment {
        id,
        file,
        len: SEGMENT_HEADER_LEN as u64,
    })
}

impl From<WriteFailure> for WalError {
    fn from(f: WriteFailure) -> Self {
        match f {
            WriteFailure::Fatal(m) => WalError::Fatal(m),
            WriteFailure::Closed => WalError::Closed,
        }
    }
}
