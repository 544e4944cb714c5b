//! Startup recovery: open the WAL (repairing torn tails), open the tracker, find the batches to
//! re-run and the durable blocks no batch has yet. Recovery writes nothing but the WAL's own
//! idempotent repairs, so a crash during recovery is just another crash.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use weir_receiver::Checkpoint;

use super::{EngineError, StorageChoice, StreamingConfig};
use crate::block::codec::DecodedBlock;
use crate::block::{BlockCache, Unallocated};
use crate::stream::metrics::Metrics;
use crate::tracker::{BlockRef, Tracker, TrackerState};
use crate::wal::{RecoveryMode, RecoveryReport, Wal};

pub(crate) struct Recovered {
    pub(crate) wal: Arc<Wal>,
    pub(crate) tracker: Tracker,
    pub(crate) state: TrackerState,
    pub(crate) batches: BTreeMap<u64, Arc<[BlockRef]>>,
    pub(crate) rerun: Vec<u64>,
    pub(crate) unallocated: Unallocated,
    pub(crate) checkpoints: BTreeMap<String, Checkpoint>,
    pub(crate) report: RecoveryReport,
    /// The effective `node_id`.
    pub(crate) node_id: Arc<str>,
    /// Opens the tracker again (after a commit failed for lack of space).
    pub(crate) reopen: super::TrackerOpener,
}

pub(crate) fn recover(
    config: &StreamingConfig,
    storage: StorageChoice,
    cache: &BlockCache,
    metrics: &Metrics,
) -> Result<Recovered, EngineError> {
    let t0 = Instant::now();
    let (wal, report, tracker, node_id, reopen) = match storage {
        StorageChoice::Dir(dir) => {
            let wal_dir = dir.join("wal");
            std::fs::create_dir_all(&wal_dir).map_err(|source| EngineError::Io {
                what: "creating the WAL directory",
                path: wal_dir.clone(),
                source,
            })?;
            let (wal, report) = Wal::open_dir(&wal_dir, config.wal.clone())?;
            // After the WAL's directory lock: one process at a time records the identity.
            let identity = wait_for_space(metrics, "recording the node identity", || {
                crate::identity::resolve(&dir, config.node_id.as_deref())
            })?;
            let path = dir.join("tracker.redb");
            let reopen: super::TrackerOpener = Arc::new(move |first| Tracker::open(&path, first));
            let first = report.records == 0;
            let tracker = wait_for_space(metrics, "opening the tracker", || reopen(first))?;
            (wal, report, tracker, identity.node_id, reopen)
        }
        StorageChoice::Custom { wal, tracker } => {
            let (wal, report) = Wal::open(wal, config.wal.clone())?;
            let first = report.records == 0;
            let reopen = tracker;
            let tracker = wait_for_space(metrics, "opening the tracker", || reopen(first))?;
            let node_id = config
                .node_id
                .clone()
                .unwrap_or_else(crate::identity::host_name);
            (wal, report, tracker, node_id, reopen)
        }
    };
    let wal = Arc::new(wal);
    let state = tracker.load()?;
    let mut allocated_end = state.allocated_end;
    if allocated_end > report.end {
        tracing::warn!(
            tracker = ?allocated_end, log_end = ?report.end, fsync = %config.wal.fsync,
            "the tracker has allocated blocks beyond the end of the log: blocks acknowledged \
             under a non-durable fsync policy were lost in the crash"
        );
        allocated_end = report.end;
    }

    let mut lost_blocks = report.records_lost();
    let mut lost_records = 0u64;
    let mut batches = BTreeMap::new();
    let mut rerun = Vec::new();
    for (&time, blocks) in &state.batches {
        let incomplete = state.completed_through.is_none_or(|c| time > c);
        if !incomplete {
            batches.insert(time, Arc::from(blocks.as_slice()));
            continue;
        }
        let mut kept = Vec::with_capacity(blocks.len());
        for b in blocks {
            // The tracker records only blocks in the WAL.
            let Some(handle) = b.location.wal() else {
                continue;
            };
            match wal.read(handle) {
                Ok(bytes) => {
                    cache.insert(handle, bytes);
                    kept.push(b.clone());
                }
                Err(e) if config.wal.recovery == RecoveryMode::SkipCorrupt => {
                    tracing::error!(
                        batch = time, segment = handle.segment, offset = handle.offset,
                        records = b.records, receiver = %b.receiver, error = %e,
                        "a block of an allocated batch is unreadable; its records are lost (skip_corrupt)"
                    );
                    lost_blocks += 1;
                    lost_records += u64::from(b.records);
                }
                Err(e) => {
                    return Err(EngineError::Corrupt {
                        segment: handle.segment,
                        offset: handle.offset,
                        reason: format!(
                            "batch {time} needs this block ({} records of receiver {}), which \
                             cannot be read: {e}; start with wal.recovery = \"skip_corrupt\" to \
                             drop it and go on",
                            b.records, b.receiver
                        ),
                    })
                }
            }
        }
        batches.insert(time, Arc::from(kept));
        rerun.push(time);
    }

    let mut unallocated = Unallocated::default();
    for rec in wal.scan(allocated_end) {
        let rec = rec?;
        let d = DecodedBlock::decode(rec.payload.clone()).map_err(|e| EngineError::Corrupt {
            segment: rec.handle.segment,
            offset: rec.handle.offset,
            reason: format!("the WAL record is not a block: {e}"),
        })?;
        unallocated.blocks.push(BlockRef::in_wal(
            rec.handle,
            d.record_count,
            d.receiver.clone(),
        ));
        unallocated.end = Some(rec.handle.next_position());
        unallocated
            .checkpoints
            .insert(d.receiver.clone(), d.checkpoint);
        cache.insert(rec.handle, rec.payload);
    }

    let mut checkpoints = state.checkpoints.clone();
    for (r, c) in &unallocated.checkpoints {
        checkpoints.entry(r.to_string()).or_default().merge(c);
    }

    metrics.blocks_lost_corruption.inc_by(lost_blocks);
    metrics.records_lost_corruption.inc_by(lost_records);
    metrics
        .unallocated_blocks
        .set(unallocated.blocks.len() as u64);
    metrics.recovery_ms.set(t0.elapsed().as_millis() as u64);
    tracing::info!(
        wal_records = report.records,
        torn_tails = report.torn_tails.len(),
        corrupt_regions = report.corrupt.len(),
        rerun = rerun.len(),
        unallocated_blocks = unallocated.blocks.len(),
        ms = t0.elapsed().as_millis() as u64,
        "recovery done"
    );
    let mut state = state;
    state.allocated_end = allocated_end;
    Ok(Recovered {
        wal,
        tracker,
        state,
        batches,
        rerun,
        unallocated,
        checkpoints,
        report,
        node_id: Arc::from(node_id),
        reopen,
    })
}

/// Something recovery can wait out: a full disk.
trait NoSpace {
    fn no_space(&self) -> bool;
}

impl NoSpace for crate::tracker::TrackerError {
    fn no_space(&self) -> bool {
        self.is_no_space()
    }
}

impl NoSpace for crate::identity::IdentityError {
    fn no_space(&self) -> bool {
        crate::space::is_no_space(self)
    }
}

/// Runs `step` until it succeeds or fails for a reason other than a full disk: startup on a full
/// disk waits for space (gauge `weir_waiting_for_space{place="recovery"}`) instead of exiting
/// and being restarted into the same full disk.
fn wait_for_space<T, E: NoSpace + std::fmt::Display>(
    metrics: &Metrics,
    what: &str,
    mut step: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut backoff = weir_receiver::Backoff::new(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(2),
    );
    loop {
        match step() {
            Err(e) if e.no_space() => {
                metrics
                    .space
                    .failed(crate::space::Place::Recovery, &format!("{what}: {e}"));
                std::thread::sleep(backoff.next_delay());
            }
            r => {
                metrics.space.succeeded(crate::space::Place::Recovery);
                return r;
            }
        }
    }
}
