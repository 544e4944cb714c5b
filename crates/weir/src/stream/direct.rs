//! Direct sources (logs that can replay a range, like Kafka): planning each batch's ranges at
//! allocation, reading them into pinned in-memory blocks when the batch is processed, and
//! telling the source when they are done.

use super::*;

impl Engine {
    /// Asks every direct source for the next batch's ranges. A source that cannot plan (its
    /// log unreachable) contributes nothing to this batch and plans from the same position at
    /// the next one. Returns the ranges and each source's new position.
    pub(super) fn plan_direct(&self) -> (Vec<DirectRange>, Vec<(Arc<str>, Checkpoint)>) {
        let mut ranges = Vec::new();
        let mut positions = Vec::new();
        for (name, src) in &self.direct {
            let position = lock(&self.direct_positions)
                .get(name)
                .cloned()
                .unwrap_or_default();
            let planned = match src.plan(&position) {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.direct_plan_failures.inc();
                    tracing::warn!(source = %name, error = %e, "planning the direct source's ranges failed; this batch goes ahead without it");
                    continue;
                }
            };
            let mut next = position.clone();
            for r in planned.into_iter().filter(|r| !r.is_empty()) {
                // A range must start after what earlier batches took: an overlap would give
                // records to two batches.
                if let Some(last) = position.get(&r.stream, r.partition) {
                    if r.from <= last {
                        self.metrics.direct_plan_failures.inc();
                        tracing::error!(source = %name, range = %r, last_planned = last, "a planned range overlaps earlier batches; left out");
                        continue;
                    }
                }
                next.raise(r.stream.clone(), r.partition, r.until - 1);
                ranges.push(DirectRange {
                    source: name.clone(),
                    range: r,
                });
            }
            if next != position {
                positions.push((name.clone(), next));
            }
        }
        (ranges, positions)
    }

    /// Reads the direct ranges of batch `t`, and of the batches before it that a window shows,
    /// into in-memory blocks appended to those batches. Blocking (reads the sources).
    pub(super) fn fetch_direct(&self, t: u64) -> Result<(), String> {
        let todo = lock(&self.schedule).unfetched(t, self.retention + 1);
        for (bt, ranges) in todo {
            let mut refs = Vec::new();
            let pinned = |refs: &[BlockRef]| {
                for r in refs {
                    self.source.release(&r.location);
                }
            };
            for (name, src) in &self.direct {
                let mine: Vec<OffsetRange> = ranges
                    .iter()
                    .filter(|d| d.source == *name)
                    .map(|d| d.range.clone())
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let parts = match src.read(&mine) {
                    Ok(p) if p.len() == mine.len() => p,
                    Ok(p) => {
                        pinned(&refs);
                        return Err(format!(
                            "direct source {name} returned {} parts for {} ranges",
                            p.len(),
                            mine.len()
                        ));
                    }
                    Err(e) => {
                        pinned(&refs);
                        return Err(format!("batch {bt}, direct source {name}: {e}"));
                    }
                };
                for (range, records) in mine.iter().zip(parts) {
                    if records.is_empty() {
                        continue;
                    }
                    let size: usize = records.iter().map(|r| r.size_hint()).sum();
                    let mut b = BlockBuilder::with_capacity(size + 64);
                    for r in &records {
                        b.push(r);
                    }
                    let mut cp = Checkpoint::new();
                    cp.raise(range.stream.clone(), range.partition, range.until - 1);
                    let block = b.finish(name, &cp, now_ms());
                    self.metrics
                        .direct_records_read
                        .inc_by(records.len() as u64);
                    refs.push(BlockRef {
                        location: self.source.pin(block),
                        records: records.len() as u32,
                        receiver: name.clone(),
                    });
                }
            }
            let unwanted = lock(&self.schedule).fetched(bt, refs);
            if let Some(refs) = unwanted {
                pinned(refs.as_slice());
            }
        }
        Ok(())
    }

    /// Tells each direct source that batch `t`'s ranges are done (it may commit them back).
    pub(super) async fn direct_completed(self: &Arc<Self>, t: u64) {
        let Some(ranges) = lock(&self.schedule).ranges.get(&t).cloned() else {
            return;
        };
        let e = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (name, src) in &e.direct {
                let mine: Vec<OffsetRange> = ranges
                    .iter()
                    .filter(|d| d.source == *name)
                    .map(|d| d.range.clone())
                    .collect();
                if !mine.is_empty() {
                    src.completed(&mine);
                }
            }
        })
        .await;
    }
}
