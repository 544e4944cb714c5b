//! Allocation and commits: each batch interval, every durable, unallocated block (and the
//! direct sources' planned ranges) becomes the batch at time T in one tracker commit, together
//! with the completions since the last one; then the batches that window retention no longer
//! needs are forgotten and the WAL segments no remembered batch needs are deleted. A commit that
//! fails for lack of space is kept as it is and tried again after the tracker is reopened.

use super::*;
use crate::replica::stage::AllocRequest;

impl Engine {
    /// Allocates every durable, unallocated block to a new batch, commits, cleans up, and queues
    /// the batch. Blocking (tracker fsync): call from a blocking thread.
    ///
    /// A commit that fails for lack of disk space is not fatal: the allocation is kept as it is
    /// (same time, same blocks) and tried again at the next call, after the tracker is reopened
    /// (redb refuses every operation after an I/O error). Returns `Ok(None)` while waiting.
    pub(super) fn allocate(&self) -> Result<Option<u64>, EngineError> {
        if let Some(f) = self.failed() {
            return Err(EngineError::Failed(f));
        }
        let _commit = lock(&self.commit_lock);
        if self.tracker_broken.load(Relaxed) && !self.reopen_tracker()? {
            return Ok(None);
        }
        let mut p = match lock(&self.pending_alloc).take() {
            Some(p) => p,
            None => self.next_allocation(),
        };
        let completed = *self.completed.borrow();
        {
            let s = lock(&self.schedule);
            p.completed_through = completed.filter(|c| Some(*c) > s.persisted_completed);
            p.forget_before = s.forget_before(completed, self.retention);
        }
        let cps: Vec<(&str, &weir_receiver::Checkpoint)> = p
            .checkpoints
            .iter()
            .map(|(k, v)| (&**k, v))
            .chain(p.positions.iter().map(|(k, v)| (&**k, v)))
            .collect();
        let commit = Commit {
            allocate: Some((p.time, &p.blocks, p.end)),
            direct: &p.ranges,
            completed_through: p.completed_through,
            checkpoints: cps,
            forget_before: p.forget_before,
        };
        let committed = match &*lock(&self.tracker) {
            Some(t) => t.commit(&commit),
            None => {
                let msg = format!("allocating batch {}: the engine has stopped", p.time);
                self.fail(msg.clone());
                return Err(EngineError::Failed(msg));
            }
        };
        match committed {
            Ok(()) => {
                self.metrics.space.succeeded(Place::Tracker);
                let time = p.time;
                self.allocated(p);
                Ok(Some(time))
            }
            Err(e) if e.is_no_space() => {
                self.metrics
                    .space
                    .failed(Place::Tracker, &format!("allocating batch {}: {e}", p.time));
                self.tracker_broken.store(true, Relaxed);
                *lock(&self.pending_alloc) = Some(p);
                Ok(None)
            }
            Err(e) => {
                let msg = format!("allocating batch {}: {e}", p.time);
                self.fail(msg.clone());
                Err(EngineError::Failed(msg))
            }
        }
    }

    /// Takes every durable, unallocated block (and the direct sources' next ranges) into a new
    /// allocation; not recorded anywhere until committed.
    pub(super) fn next_allocation(&self) -> PendingAlloc {
        let (ranges, positions) = self.plan_direct();
        let s = lock(&self.schedule);
        let time = self.next_time(s.last_time);
        let u = self.writer.take_unallocated();
        let blocks: Arc<[BlockRef]> = Arc::from(u.blocks);
        let end = u.end.unwrap_or(s.allocated_end).max(s.allocated_end);
        let checkpoints = u.checkpoints;
        PendingAlloc {
            time,
            blocks,
            end,
            checkpoints,
            ranges,
            positions,
            replica_end: u.replica_end,
            completed_through: None,
            forget_before: None,
        }
    }

    /// Applies a committed allocation: remembers the batch, cleans up, queues it.
    pub(super) fn allocated(&self, mut p: PendingAlloc) {
        self.metrics.tracker_commits.inc();
        if !p.checkpoints.is_empty() {
            lock(&self.batch_checkpoints).insert(p.time, std::mem::take(&mut p.checkpoints));
        }
        self.metrics.batches_allocated.inc();
        self.metrics.last_allocated_batch_ms.set(p.time);
        if !p.positions.is_empty() {
            lock(&self.direct_positions).extend(p.positions);
        }
        if self.writer.replicating() {
            let written = self.writer.replicate_allocation(AllocRequest {
                time: p.time,
                end: p.replica_end,
                direct: crate::replica::Allocation::encode_direct(&p.ranges),
            });
            lock(&self.replicated).insert(p.time, written);
        }
        {
            let mut s = lock(&self.schedule);
            s.allocated(p.time, p.blocks, p.ranges, p.end, p.completed_through);
            self.forget_and_clean(&mut s, p.forget_before);
        }
        self.enqueue(p.time);
    }

    /// Closes and reopens the tracker after a commit failed for lack of space. True once it is
    /// open again; false while there is still no space (redb's recovery of a database whose
    /// last commit failed may need to write). A pending allocation that the failed commit did
    /// make durable after all (it failed after redb switched to it) is applied as committed.
    pub(super) fn reopen_tracker(&self) -> Result<bool, EngineError> {
        // redb holds the file until the database is dropped: close it first.
        lock(&self.tracker).take();
        let reopened = (self.reopen)(false).and_then(|t| t.load().map(|state| (t, state)));
        let (tracker, state) = match reopened {
            Ok(x) => x,
            Err(e) if e.is_no_space() => {
                self.metrics
                    .space
                    .failed(Place::Tracker, &format!("reopening the tracker: {e}"));
                return Ok(false);
            }
            Err(e) => {
                let msg = format!("reopening the tracker after a full disk: {e}");
                self.fail(msg.clone());
                return Err(EngineError::Failed(msg));
            }
        };
        tracing::debug!("tracker reopened after a full disk");
        *lock(&self.tracker) = Some(tracker);
        self.tracker_broken.store(false, Relaxed);
        let landed = lock(&self.pending_alloc).take_if(|p| state.batches.contains_key(&p.time));
        if let Some(mut p) = landed {
            tracing::info!(
                batch = p.time,
                "the allocation whose commit failed was durable after all"
            );
            p.completed_through = state.completed_through;
            self.allocated(p);
        }
        {
            lock(&self.schedule).persisted(state.completed_through);
        }
        Ok(true)
    }

    /// Persists completions without allocating (graceful stop).
    pub(super) fn commit_completions(&self) -> Result<(), EngineError> {
        let _commit = lock(&self.commit_lock);
        let completed = *self.completed.borrow();
        let (persisted, forget_before) = {
            let s = lock(&self.schedule);
            (
                s.persisted_completed,
                s.forget_before(completed, self.retention),
            )
        };
        if completed <= persisted {
            return Ok(());
        }
        let no_space = |e: &dyn std::fmt::Display| {
            tracing::warn!(
                error = %e,
                "the final tracker commit waits for disk space: not waiting during a stop; the \
                 batches completed since the last commit run again at the next start"
            );
        };
        if self.tracker_broken.load(Relaxed) && !self.reopen_tracker()? {
            no_space(&"the tracker could not be reopened");
            return Ok(());
        }
        if let Some(t) = &*lock(&self.tracker) {
            match t.commit(&Commit {
                completed_through: completed,
                forget_before,
                ..Commit::default()
            }) {
                Ok(()) => {}
                Err(e) if e.is_no_space() => {
                    self.tracker_broken.store(true, Relaxed);
                    no_space(&e);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.metrics.tracker_commits.inc();
        let mut s = lock(&self.schedule);
        s.persisted(completed);
        self.forget_and_clean(&mut s, forget_before);
        Ok(())
    }

    /// Forgets the batches before `forget_before` (releasing their blocks) and deletes the
    /// WAL segments no remembered batch needs.
    pub(super) fn forget_and_clean(&self, s: &mut Schedule, forget_before: Option<u64>) {
        if let Some(before) = forget_before {
            for b in s.forget(before) {
                self.source.release(&b.location);
            }
        }
        let watermark = s.watermark();
        match self.wal.cleanup(CleanupThreshold {
            before: Some(watermark),
            older_than: None,
        }) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "WAL cleanup failed; retrying after the next batch")
            }
        }
    }
}
