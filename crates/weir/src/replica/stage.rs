//! The replica stage: what the block writer does between a WAL group commit and resolving its
//! waiters. It numbers blocks, appends one entry per group (retrying for as long as the replica
//! is unreachable: the waiters wait, and `store()` backs up through `max_pending_bytes`), records
//! allocations, and trims what no incomplete batch needs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::{Allocation, Entry, EntryMeta, Replica, ReplicaError, StoredRange};
use crate::stream::metrics::Metrics;

/// A batch allocation to record: the batch takes blocks up to (not including) number `end`.
#[derive(Debug, Clone)]
pub(crate) struct AllocRequest {
    pub(crate) time: u64,
    pub(crate) end: u64,
    pub(crate) direct: Vec<StoredRange>,
}

/// An entry appended, as trimming needs it.
#[derive(Debug, Clone, Copy)]
struct Written {
    pos: u64,
    /// Number after its last block (the next block's number when it was written).
    block_end: u64,
    /// Its latest allocation's time.
    last_time: Option<u64>,
}

pub(crate) struct Stage {
    replica: Arc<dyn Replica>,
    epoch: u64,
    next_block: u64,
    alloc_end: u64,
    written_completed: Option<u64>,
    entries: VecDeque<Written>,
    /// Allocated, not complete: time → first block.
    incomplete: BTreeMap<u64, u64>,
    trim: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// The state a snapshot restates (see the module docs of [`super`]).
pub(crate) struct Snapshot {
    /// Incomplete batches in time order: blocks and direct ranges.
    pub(crate) batches: Vec<(u64, Vec<Bytes>, Vec<StoredRange>)>,
    pub(crate) unallocated: Vec<Bytes>,
    pub(crate) completed_through: Option<u64>,
}

impl Stage {
    /// Writes the snapshot that starts this process's ownership (retrying while the replica is
    /// unreachable) and trims everything before it. The returned stage numbers the next block
    /// after the snapshot's.
    pub(crate) async fn start(
        replica: Arc<dyn Replica>,
        epoch: u64,
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
    ) -> Result<Stage, ReplicaError> {
        let (trim, trim_rx) = watch::channel(0);
        tokio::spawn(trim_loop(replica.clone(), trim_rx, metrics.clone()));
        let mut stage = Stage {
            replica,
            epoch,
            next_block: 0,
            alloc_end: 0,
            written_completed: snapshot.completed_through,
            entries: VecDeque::new(),
            incomplete: BTreeMap::new(),
            trim,
            metrics,
        };
        let mut blocks = Vec::new();
        let mut allocs = Vec::new();
        for (time, bs, direct) in snapshot.batches {
            let start = blocks.len() as u64;
            blocks.extend(bs);
            allocs.push(Allocation {
                time,
                start,
                end: blocks.len() as u64,
                direct,
            });
        }
        stage.alloc_end = blocks.len() as u64;
        blocks.extend(snapshot.unallocated);
        stage
            .append(blocks, allocs, snapshot.completed_through, true)
            .await?;
        Ok(stage)
    }

    /// The number the next block gets.
    pub(crate) fn next_block(&self) -> u64 {
        self.next_block
    }

    /// Appends one entry: `blocks` (numbered from [`next_block`](Self::next_block)), the
    /// allocations, and the completed time. Retries while the replica is unreachable; fails
    /// only when this process was fenced or the replica refuses the entry as damaged.
    pub(crate) async fn write(
        &mut self,
        blocks: Vec<Bytes>,
        requests: Vec<AllocRequest>,
        completed: Option<u64>,
    ) -> Result<(), ReplicaError> {
        let mut allocs = Vec::new();
        let mut end = self.alloc_end;
        for r in requests {
            if r.end == end && r.direct.is_empty() {
                continue; // an empty batch: nothing to re-run
            }
            allocs.push(Allocation {
                time: r.time,
                start: end,
                end: r.end,
                direct: r.direct,
            });
            end = r.end;
        }
        let completed = completed.max(self.written_completed);
        if blocks.is_empty() && allocs.is_empty() && completed == self.written_completed {
            return Ok(());
        }
        self.append(blocks, allocs, completed, false).await
    }

    /// True if `completed` is news to the replica.
    pub(crate) fn completion_is_new(&self, completed: Option<u64>) -> bool {
        completed > self.written_completed
    }

    async fn append(
        &mut self,
        blocks: Vec<Bytes>,
        allocs: Vec<Allocation>,
        completed: Option<u64>,
        snapshot: bool,
    ) -> Result<(), ReplicaError> {
        let entry = Entry {
            meta: EntryMeta {
                epoch: self.epoch,
                snapshot,
                first_block: self.next_block,
                block_lens: blocks.iter().map(|b| b.len() as u32).collect(),
                allocations: allocs.clone(),
                completed_through: completed,
            },
            blocks,
        };
        let bytes = entry.encode();
        let m = &self.metrics;
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u32;
        let pos = loop {
            let t0 = Instant::now();
            match self.replica.append(bytes.clone()).await {
                Ok(pos) => {
                    m.latency.replica_write.observe(t0.elapsed().as_secs_f64());
                    break pos;
                }
                Err(
                    e @ (ReplicaError::Fenced { .. }
                    | ReplicaError::Damaged(_)
                    | ReplicaError::Refused(_)),
                ) => {
                    if matches!(e, ReplicaError::Fenced { .. }) {
                        m.replica_fenced.inc();
                    }
                    m.replica_failures.inc();
                    return Err(e);
                }
                Err(e) => {
                    m.replica_failures.inc();
                    m.replica_waiting.set(1);
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::error!(
                            replica = %self.replica.describe(), error = %e, attempts = failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "replica write failed: nothing more is acknowledged until it succeeds"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        if failures > 0 {
            tracing::info!(replica = %self.replica.describe(), attempts = failures + 1, "replica write succeeded again");
        }
        m.replica_waiting.set(0);
        m.replica_writes.inc();
        m.replica_bytes.inc_by(bytes.len() as u64);
        let n = entry.meta.block_lens.len() as u64;
        self.next_block += n;
        for a in &allocs {
            self.incomplete.insert(a.time, a.start);
            self.alloc_end = a.end;
        }
        self.written_completed = completed;
        if snapshot {
            self.entries.clear();
        }
        self.entries.push_back(Written {
            pos,
            block_end: self.next_block,
            last_time: allocs.last().map(|a| a.time),
        });
        self.trim_before(pos, snapshot);
        Ok(())
    }

    /// Drops what completed batches no longer need, and asks the trim task to delete entries
    /// before the first one still needed.
    fn trim_before(&mut self, last: u64, snapshot: bool) {
        if let Some(c) = self.written_completed {
            self.incomplete.retain(|t, _| *t > c);
        }
        let needed = self
            .incomplete
            .values()
            .next()
            .copied()
            .unwrap_or(self.alloc_end);
        let done = |w: &Written| {
            w.block_end <= needed
                && w.last_time
                    .is_none_or(|t| self.written_completed.is_some_and(|c| t <= c))
        };
        while self.entries.len() > 1 && self.entries.front().is_some_and(done) {
            self.entries.pop_front();
        }
        let before = if snapshot {
            last
        } else {
            self.entries.front().map_or(last, |w| w.pos)
        };
        self.trim.send_if_modified(|b| {
            if before > *b {
                *b = before;
                true
            } else {
                false
            }
        });
    }
}

/// Deletes entries in the background, one request at a time, never blocking acknowledgements.
async fn trim_loop(replica: Arc<dyn Replica>, mut rx: watch::Receiver<u64>, metrics: Arc<Metrics>) {
    while rx.changed().await.is_ok() {
        let before = *rx.borrow_and_update();
        match replica.trim(before).await {
            Ok(n) => {
                metrics.replica_trimmed.inc_by(n);
            }
            Err(e) => {
                tracing::warn!(replica = %replica.describe(), error = %e, "trimming the replica failed; trying again after the next write");
            }
        }
    }
}
