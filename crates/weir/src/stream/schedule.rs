//! What the engine remembers about allocated batches, as a plain state machine: no locks, no
//! tasks, no storage. The engine holds it under `Engine::schedule` and turns its answers into
//! tracker commits, cache evictions and WAL cleanup.
//!
//! - [`allocated`](Schedule::allocated) records a committed batch (its blocks, its direct
//!   ranges, where the WAL's allocated part now ends);
//! - [`forget_before`](Schedule::forget_before) says which complete batches the window retention
//!   no longer needs once a completion is persisted, and [`forget`](Schedule::forget) drops them,
//!   returning their blocks for the caller to release;
//! - [`watermark`](Schedule::watermark) is the WAL position before which no remembered batch and
//!   no unallocated block lives: segments wholly before it may be deleted;
//! - direct ranges are read when a batch is processed ([`unfetched`](Schedule::unfetched)) and
//!   their in-memory blocks added to the batch ([`fetched`](Schedule::fetched)).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::tracker::{BlockRef, DirectRange};
use crate::wal::WalPosition;

#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// Allocated batches still remembered: incomplete ones and the complete ones windows need.
    /// Once a batch's direct ranges are read, their in-memory blocks are appended here.
    pub(super) batches: BTreeMap<u64, Arc<[BlockRef]>>,
    /// Direct ranges of remembered batches.
    pub(super) ranges: BTreeMap<u64, Arc<[DirectRange]>>,
    /// Direct ranges not read yet.
    unfetched: BTreeMap<u64, Arc<[DirectRange]>>,
    /// Completions the tracker has persisted.
    pub(super) persisted_completed: Option<u64>,
    /// The newest allocated batch.
    pub(super) last_time: Option<u64>,
    /// Every WAL record before this position is in an allocated batch.
    pub(super) allocated_end: WalPosition,
}

impl Schedule {
    /// The state recovery found: remembered batches (none of their direct ranges read yet).
    pub(super) fn recovered(
        batches: BTreeMap<u64, Arc<[BlockRef]>>,
        ranges: BTreeMap<u64, Arc<[DirectRange]>>,
        persisted_completed: Option<u64>,
        last_time: Option<u64>,
        allocated_end: WalPosition,
    ) -> Schedule {
        Schedule {
            batches,
            unfetched: ranges.clone(),
            ranges,
            persisted_completed,
            last_time,
            allocated_end,
        }
    }

    /// Records a committed allocation: batch `time` with `blocks` and direct `ranges`; the
    /// allocated part of the WAL now ends at `end`; the same commit persisted completions
    /// through `completed_through`.
    pub(super) fn allocated(
        &mut self,
        time: u64,
        blocks: Arc<[BlockRef]>,
        ranges: Vec<DirectRange>,
        end: WalPosition,
        completed_through: Option<u64>,
    ) {
        self.batches.insert(time, blocks);
        if !ranges.is_empty() {
            let ranges: Arc<[DirectRange]> = Arc::from(ranges);
            self.ranges.insert(time, ranges.clone());
            self.unfetched.insert(time, ranges);
        }
        self.last_time = Some(time);
        self.allocated_end = end;
        self.persisted(completed_through);
    }

    /// Completions through `completed` are persisted.
    pub(super) fn persisted(&mut self, completed: Option<u64>) {
        self.persisted_completed = completed.max(self.persisted_completed);
    }

    /// The oldest batch time to keep once completions through `completed` are persisted: the
    /// `retention` most recent complete batches stay (windows read them), older complete ones
    /// go. `None`: nothing to forget.
    pub(super) fn forget_before(&self, completed: Option<u64>, retention: usize) -> Option<u64> {
        let c = completed?;
        let done: Vec<u64> = self.batches.range(..=c).map(|(t, _)| *t).collect();
        if done.len() <= retention {
            return None;
        }
        Some(if retention == 0 {
            c + 1
        } else {
            done[done.len() - retention]
        })
    }

    /// Forgets every batch before `before` (and its ranges); returns their blocks, which the
    /// caller releases (cache entries, pinned direct blocks).
    pub(super) fn forget(&mut self, before: u64) -> Vec<BlockRef> {
        let keep = self.batches.split_off(&before);
        let gone = std::mem::replace(&mut self.batches, keep);
        self.ranges = self.ranges.split_off(&before);
        self.unfetched = self.unfetched.split_off(&before);
        gone.values().flat_map(|b| b.iter().cloned()).collect()
    }

    /// The WAL position before which nothing is needed: every block at or after
    /// `allocated_end` is unallocated (or not yet durable), and every remembered batch's WAL
    /// blocks must stay. Segments wholly before it can be deleted.
    pub(super) fn watermark(&self) -> WalPosition {
        self.batches
            .values()
            .flat_map(|b| b.iter().filter_map(|b| b.location.wal()))
            .map(|h| h.position())
            .min()
            .unwrap_or(self.allocated_end)
            .min(self.allocated_end)
    }

    /// The direct ranges not read yet of the `n` most recent batches through `t` (the batch
    /// and the earlier ones its windows read).
    pub(super) fn unfetched(&self, t: u64, n: usize) -> Vec<(u64, Arc<[DirectRange]>)> {
        self.batches
            .range(..=t)
            .rev()
            .take(n)
            .filter_map(|(bt, _)| self.unfetched.get(bt).map(|r| (*bt, r.clone())))
            .collect()
    }

    /// Adds the in-memory blocks read for batch `t`'s ranges to it. If the batch no longer
    /// wants them (forgotten, or read meanwhile), they are handed back for the caller to release.
    pub(super) fn fetched(&mut self, t: u64, refs: Vec<BlockRef>) -> Option<Vec<BlockRef>> {
        let still_wanted = self.unfetched.remove(&t).is_some();
        match self.batches.get_mut(&t) {
            Some(blocks) if still_wanted => {
                let mut all = blocks.to_vec();
                all.extend(refs);
                *blocks = Arc::from(all);
                None
            }
            _ => Some(refs),
        }
    }

    /// The `n` most recent batches through `time`, oldest first: their times and blocks.
    pub(super) fn window(&self, time: u64, n: usize) -> (Vec<u64>, Vec<BlockRef>) {
        let picked: Vec<(&u64, &Arc<[BlockRef]>)> =
            self.batches.range(..=time).rev().take(n).collect();
        let times = picked.iter().rev().map(|(t, _)| **t).collect();
        let blocks = picked
            .iter()
            .rev()
            .flat_map(|(_, b)| b.iter().cloned())
            .collect();
        (times, blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::BlockLocation;
    use crate::wal::RecordHandle;
    use weir_receiver::OffsetRange;

    fn wal_block(segment: u64, offset: u64) -> BlockRef {
        let h = RecordHandle {
            segment,
            offset,
            len: 10,
        };
        BlockRef::in_wal(h, 1, Arc::from("r"))
    }

    fn memory_block(id: u64) -> BlockRef {
        BlockRef {
            location: BlockLocation::Memory { id },
            records: 1,
            receiver: Arc::from("d"),
        }
    }

    fn end(segment: u64, offset: u64) -> WalPosition {
        WalPosition { segment, offset }
    }

    fn range(from: u64, until: u64) -> DirectRange {
        DirectRange {
            source: Arc::from("d"),
            range: OffsetRange {
                stream: Arc::from("t"),
                partition: 0,
                from,
                until,
            },
        }
    }

    #[test]
    fn the_watermark_is_the_oldest_remembered_block_or_the_allocated_end() {
        let mut s = Schedule::default();
        assert_eq!(s.watermark(), WalPosition::START);
        s.allocated(
            100,
            Arc::from(vec![wal_block(1, 8), wal_block(2, 8)]),
            vec![],
            end(2, 18),
            None,
        );
        s.allocated(
            200,
            Arc::from(vec![wal_block(3, 8)]),
            vec![],
            end(3, 18),
            None,
        );
        assert_eq!(s.watermark(), end(1, 8));
        // Batch 100 forgotten: its segments may go.
        let gone = s.forget(150);
        assert_eq!(gone, vec![wal_block(1, 8), wal_block(2, 8)]);
        assert_eq!(s.watermark(), end(3, 8));
        // No remembered block: everything before the allocated end.
        s.forget(300);
        assert_eq!(s.watermark(), end(3, 18));
        // In-memory blocks never hold the WAL back.
        s.allocated(
            400,
            Arc::from(vec![memory_block(0)]),
            vec![],
            end(4, 8),
            None,
        );
        assert_eq!(s.watermark(), end(4, 8));
    }

    #[test]
    fn retention_keeps_the_most_recent_complete_batches() {
        let mut s = Schedule::default();
        for t in [100, 200, 300, 400] {
            s.allocated(
                t,
                Arc::from(vec![wal_block(t, 8)]),
                vec![],
                end(t, 18),
                None,
            );
        }
        assert_eq!(s.forget_before(None, 0), None);
        // Nothing retained: everything through the completion goes.
        assert_eq!(s.forget_before(Some(300), 0), Some(301));
        // Two retained for windows: 200 and 300 stay.
        assert_eq!(s.forget_before(Some(300), 2), Some(200));
        // Not more complete batches than retained: nothing goes.
        assert_eq!(s.forget_before(Some(200), 2), None);
        let gone = s.forget(200);
        assert_eq!(gone, vec![wal_block(100, 8)]);
        assert_eq!(
            s.batches.keys().copied().collect::<Vec<_>>(),
            vec![200, 300, 400]
        );
        s.persisted(Some(300));
        s.persisted(Some(200));
        assert_eq!(
            s.persisted_completed,
            Some(300),
            "completions never go back"
        );
    }

    #[test]
    fn direct_ranges_are_read_once_and_blocks_of_a_forgotten_batch_are_handed_back() {
        let mut s = Schedule::default();
        s.allocated(100, Arc::from(vec![]), vec![range(0, 10)], end(0, 0), None);
        s.allocated(200, Arc::from(vec![]), vec![range(10, 20)], end(0, 0), None);
        // Batch 200 and one earlier batch (its window) are to be read.
        let todo = s.unfetched(200, 2);
        assert_eq!(
            todo.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![200, 100]
        );
        assert_eq!(s.fetched(200, vec![memory_block(1)]), None);
        assert_eq!(&*s.batches[&200], &[memory_block(1)]);
        assert_eq!(s.unfetched(200, 2).len(), 1, "200 is read, 100 is not");
        // Read a second time (a concurrent read): handed back, the batch is unchanged.
        assert_eq!(
            s.fetched(200, vec![memory_block(2)]),
            Some(vec![memory_block(2)])
        );
        // Batch 100 forgotten before its read lands: handed back for release.
        s.forget(150);
        assert_eq!(
            s.fetched(100, vec![memory_block(3)]),
            Some(vec![memory_block(3)])
        );
        assert!(s.ranges.contains_key(&200) && !s.ranges.contains_key(&100));
    }

    #[test]
    fn a_window_is_the_most_recent_batches_oldest_first() {
        let mut s = Schedule::default();
        for t in [100, 200, 300] {
            s.allocated(
                t,
                Arc::from(vec![wal_block(t, 8)]),
                vec![],
                end(t, 18),
                None,
            );
        }
        let (times, blocks) = s.window(250, 5);
        assert_eq!(times, vec![100, 200]);
        assert_eq!(blocks, vec![wal_block(100, 8), wal_block(200, 8)]);
        let (times, _) = s.window(300, 2);
        assert_eq!(times, vec![200, 300]);
    }
}
