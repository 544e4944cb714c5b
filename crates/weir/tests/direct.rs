//! Direct sources in the engine (Spark's "direct approach"): offset ranges planned per batch,
//! recorded in the tracker before processing, read from the source's own log, and read again —
//! the same ranges — when a batch is re-run after a crash. The source here is an in-memory log;
//! `tests/kafka_direct.rs` runs the same path against a Kafka protocol endpoint.

use weir_testkit::start;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir::receiver::lock;
use weir::receiver::{Checkpoint, DirectSource, OffsetRange, Position, ReceiverError, Record};
use weir::{ClockMode, StreamingConfig, StreamingContext};

/// A replayable log of two partitions; each plan takes at most `cap` offsets per partition.
#[derive(Clone, Default)]
struct MemLog {
    partitions: Arc<Mutex<[u64; 2]>>,
    cap: u64,
    fail_next_plan: Arc<AtomicBool>,
    reads: Arc<AtomicU32>,
}

impl MemLog {
    fn append(&self, n: u64) {
        for p in lock(&self.partitions).iter_mut() {
            *p += n;
        }
    }
}

impl DirectSource for MemLog {
    fn plan(&self, position: &Checkpoint) -> Result<Vec<OffsetRange>, ReceiverError> {
        if self.fail_next_plan.swap(false, SeqCst) {
            return Err(ReceiverError::msg("the log is unreachable"));
        }
        let ends = *lock(&self.partitions);
        Ok((0..2)
            .map(|p| {
                let from = position.get("log", p).map_or(0, |o| o + 1);
                OffsetRange {
                    stream: Arc::from("log"),
                    partition: p,
                    from,
                    until: ends[p as usize].min(from + self.cap),
                }
            })
            .collect())
    }

    fn read(&self, ranges: &[OffsetRange]) -> Result<Vec<Vec<Record>>, ReceiverError> {
        self.reads.fetch_add(1, SeqCst);
        Ok(ranges
            .iter()
            .map(|r| {
                (r.from..r.until)
                    .map(|o| {
                        Record::new(format!("{}/{o}", r.partition)).with_position(Position::offset(
                            r.stream.clone(),
                            r.partition,
                            o,
                        ))
                    })
                    .collect()
            })
            .collect())
    }
}

/// Every run of every batch: (time, records as "partition/offset"), in run order.
type Runs = Arc<Mutex<Vec<(u64, Vec<String>)>>>;

fn context(
    dir: &std::path::Path,
    log: &MemLog,
    runs: &Runs,
    fail: &Arc<AtomicBool>,
) -> StreamingContext {
    let config = StreamingConfig {
        clock: ClockMode::Manual,
        batch_interval_ms: 50,
        job_retry_initial_ms: 20,
        ..StreamingConfig::default()
    };
    let mut ctx = StreamingContext::new(config, dir);
    ctx.add_direct_source("log", log.clone());
    let (runs, fail) = (runs.clone(), fail.clone());
    ctx.foreach_batch("record", move |b| {
        let recs: Vec<String> = b
            .collect()?
            .iter()
            .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
            .collect();
        lock(&runs).push((b.time(), recs));
        if fail.load(SeqCst) {
            return Err("failing on purpose".into());
        }
        Ok(())
    });
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_ranges_give_each_offset_to_one_batch_and_a_crash_rereads_the_same_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let log = MemLog {
        cap: 7,
        ..MemLog::default()
    };
    let runs: Runs = Arc::default();
    let fail = Arc::new(AtomicBool::new(false));
    log.append(20);

    let running = start(|| context(dir.path(), &log, &runs, &fail)).await;
    // An unreachable log: the batch goes ahead without it, the next one plans from the same place.
    log.fail_next_plan.store(true, SeqCst);
    let t0 = running.run_batch().await.unwrap();
    let t1 = running.run_batch().await.unwrap();
    let t2 = running.run_batch().await.unwrap();
    assert!(t0 < t1 && t1 < t2);
    let metrics = running.metrics().engine().clone();
    assert_eq!(metrics.direct_plan_failures(), 1);
    // Batch 3 is allocated, then its job fails: it stays incomplete.
    fail.store(true, SeqCst);
    let t3 = tokio::time::timeout(Duration::from_millis(300), running.run_batch()).await;
    assert!(t3.is_err(), "the failing batch must not complete");
    // The log grows; a crash now must not change what the allocated batch holds.
    log.append(5);
    drop(running);

    fail.store(false, SeqCst);
    let running = start(|| context(dir.path(), &log, &runs, &fail)).await;
    // Drain the rest (each batch takes at most 7 per partition).
    for _ in 0..4 {
        running.run_batch().await.unwrap();
    }
    let report = running.stop().await.unwrap();
    assert!(report.completed_through.is_some());

    let runs = lock(&runs).clone();
    // The failed batch ran (and failed) before the crash; after the restart it ran once more,
    // first, with exactly the same records.
    let failed_time = runs
        .iter()
        .map(|(t, _)| *t)
        .find(|t| *t > t2)
        .expect("the failing batch ran");
    let attempts: Vec<&Vec<String>> = runs
        .iter()
        .filter(|(t, _)| *t == failed_time)
        .map(|(_, r)| r)
        .collect();
    assert!(attempts.len() >= 2, "the batch was re-run after the crash");
    assert!(
        attempts.windows(2).all(|w| w[0] == w[1]),
        "every run of a batch sees the same records"
    );
    assert_eq!(
        attempts[0].len(),
        12,
        "[14, 20) of each partition: the ranges planned before the crash"
    );

    // The last run of each batch time is the one that completed: each offset exactly once.
    let mut last: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (t, r) in runs {
        last.insert(t, r);
    }
    assert!(last[&t0].is_empty(), "the first plan failed");
    let mut all: Vec<String> = last.into_values().flatten().collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, all.len(), "no offset in two batches");
    let mut want: Vec<String> = (0..2)
        .flat_map(|p| (0..25).map(move |o| format!("{p}/{o}")))
        .collect();
    want.sort();
    assert_eq!(all, want, "every offset of the log in some batch");
    assert!(log.reads.load(SeqCst) >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_show_earlier_direct_batches_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = MemLog {
        cap: 3,
        ..MemLog::default()
    };
    log.append(30);
    let windows: Arc<Mutex<Vec<u64>>> = Arc::default();
    let ctx = || {
        let config = StreamingConfig {
            clock: ClockMode::Manual,
            batch_interval_ms: 50,
            ..StreamingConfig::default()
        };
        let mut ctx = StreamingContext::new(config, dir.path());
        ctx.add_direct_source("log", log.clone());
        let w = windows.clone();
        ctx.foreach_window("window", 2, move |b| {
            lock(&w).push(b.count());
            Ok(())
        });
        ctx
    };
    let running = start(ctx).await;
    running.run_batch().await.unwrap();
    running.run_batch().await.unwrap();
    running.stop().await.unwrap();
    let running = start(ctx).await;
    running.run_batch().await.unwrap();
    running.stop().await.unwrap();
    // 6 records per batch (3 per partition); a window of two shows 6, then 12 — and 12 again
    // after the restart, the earlier batch read back from the log.
    assert_eq!(*lock(&windows), vec![6, 12, 12]);
}
