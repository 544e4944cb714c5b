//! Property-based crash test of the whole engine on the simulated disk (WAL and tracker both on
//! one `SimStorage`).
//!
//! Random sequences of stores, batches, failing jobs, graceful restarts and crashes — crashes
//! land at random moments of ingest (blocks in flight), allocation (tracker commit), processing
//! (jobs running), cleanup (segment deletion) and recovery itself, with torn last writes. After a
//! final drain the promise of DESIGN.md is checked:
//! - every record whose `store()` resolved `Ok` appears in exactly one completed batch across all
//!   runs (no loss, no record in two batches);
//! - every run of a batch (first run, job retries, re-runs after crashes) saw exactly the same
//!   records;
//! - nothing appears that was never stored;
//! - a direct source (an in-memory log standing in for Kafka, which outlives every crash; each
//!   `Store` also appends to it) has every offset in exactly one completed batch.
//!
//! Default run: 100 cases (about 7 s in debug). `PROPTEST_CASES=2000 cargo test --release --test
//! engine_crash` runs a long soak. Failing cases are saved in `engine_crash.proptest-regressions`
//! and replayed first; commit them. (The engine is concurrent, so a saved case replays the same
//! operations, not necessarily the same interleaving.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tokio::sync::mpsc;
use weir::receiver::{
    Checkpoint, DirectSource, OffsetRange, Receiver, ReceiverContext, ReceiverError, Record,
};
use weir::wal::sim::{SimStorage, Tear};
use weir::wal::{LockGuard, Storage, StorageFile, WalConfig};
use weir::{ClockMode, RunningContext, StreamingConfig, StreamingContext};

#[derive(Debug, Clone)]
enum Op {
    /// Store this many new records in one call (not waiting for it).
    Store(u16),
    /// Run a batch and wait for it.
    Batch,
    /// Make the next job run fail once (it is retried on the same batch).
    FailNextJob,
    /// Start a batch and crash `delay_us` later (allocation, commit, cleanup, processing).
    BatchThenCrash(u16, TearKind),
    /// Store and crash `delay_us` later (ingest: blocks in flight).
    StoreThenCrash(u16, u16, TearKind),
    /// Stop gracefully and start again.
    Restart,
    /// Crash now.
    Crash(TearKind),
    /// Crash `delay_us` into the next start (recovery).
    CrashDuringRecovery(u16, TearKind),
}

#[derive(Debug, Clone, Copy)]
enum TearKind {
    None,
    Prefix(u16),
    Zeros(u16, u16),
}

impl TearKind {
    fn tear(self) -> Tear {
        match self {
            TearKind::None => Tear::None,
            TearKind::Prefix(k) => Tear::Prefix { keep: k as usize },
            TearKind::Zeros(k, z) => Tear::PrefixThenZeros {
                keep: k as usize,
                zeros_from: (z as usize).min(k as usize),
            },
        }
    }
}

fn tear() -> impl Strategy<Value = TearKind> {
    prop_oneof![
        2 => Just(TearKind::None),
        1 => (0..3000u16).prop_map(TearKind::Prefix),
        1 => (0..3000u16, 0..3000u16).prop_map(|(k, z)| TearKind::Zeros(k, z)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..60u16).prop_map(Op::Store),
        4 => Just(Op::Batch),
        1 => Just(Op::FailNextJob),
        2 => (0..3000u16, tear()).prop_map(|(d, t)| Op::BatchThenCrash(d, t)),
        2 => (1..60u16, 0..3000u16, tear()).prop_map(|(n, d, t)| Op::StoreThenCrash(n, d, t)),
        1 => Just(Op::Restart),
        1 => tear().prop_map(Op::Crash),
        1 => (0..3000u16, tear()).prop_map(|(d, t)| Op::CrashDuringRecovery(d, t)),
    ]
}

/// The storage as one process sees it: once the process "dies" (the fence is set), every
/// directory operation fails, so a dead engine's leftover threads cannot touch the disk the next
/// process uses. (File handles die with the crash on their own.)
#[derive(Debug)]
struct Fenced {
    sim: SimStorage,
    dead: Arc<AtomicBool>,
}

impl Fenced {
    fn check(&self) -> std::io::Result<()> {
        if self.dead.load(SeqCst) {
            return Err(std::io::Error::other("this process is dead"));
        }
        Ok(())
    }
}

impl Storage for Fenced {
    fn describe(&self) -> String {
        self.sim.describe()
    }
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.check()?;
        self.sim.list()
    }
    fn create(&self, name: &str) -> std::io::Result<Arc<dyn StorageFile>> {
        self.check()?;
        self.sim.create(name)
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn StorageFile>> {
        self.check()?;
        self.sim.open(name)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.check()?;
        self.sim.remove(name)
    }
    fn sync_dir(&self) -> std::io::Result<()> {
        self.check()?;
        self.sim.sync_dir()
    }
    fn modified(&self, name: &str) -> std::io::Result<SystemTime> {
        self.check()?;
        self.sim.modified(name)
    }
    fn lock(&self) -> std::io::Result<Box<dyn LockGuard>> {
        self.check()?;
        self.sim.lock()
    }
}

/// Stores what the test sends it; records every acknowledged id.
struct Commanded {
    commands: Mutex<Option<mpsc::UnboundedReceiver<Vec<u64>>>>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
}

impl Receiver for Commanded {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let Some(mut rx) = self.commands.lock().unwrap().take() else {
            return Ok(());
        };
        loop {
            let ids = tokio::select! {
                ids = rx.recv() => match ids { Some(ids) => ids, None => return Ok(()) },
                () = ctx.shutdown().requested() => return Ok(()),
            };
            let records = ids.iter().map(|i| Record::new(i.to_string())).collect();
            let fut = ctx.store(records);
            let acked = self.acked.clone();
            tokio::spawn(async move {
                if fut.await.is_ok() {
                    acked.lock().unwrap().extend(ids);
                }
            });
        }
    }
}

/// Ids of records read from the direct log: offset + this (apart from the receiver's ids).
const DIRECT_ID: u64 = 1 << 40;

/// A replayable log of one partition whose length the test grows.
struct DirectLog(Arc<Mutex<u64>>);

impl DirectSource for DirectLog {
    fn plan(&self, position: &Checkpoint) -> Result<Vec<OffsetRange>, ReceiverError> {
        let from = position.get("log", 0).map_or(0, |o| o + 1);
        Ok(vec![OffsetRange {
            stream: Arc::from("log"),
            partition: 0,
            from,
            until: *self.0.lock().unwrap(),
        }])
    }

    fn read(&self, ranges: &[OffsetRange]) -> Result<Vec<Vec<Record>>, ReceiverError> {
        Ok(ranges
            .iter()
            .map(|r| {
                (r.from..r.until)
                    .map(|o| Record::new((DIRECT_ID + o).to_string()))
                    .collect()
            })
            .collect())
    }
}

/// Every job run that succeeded, and every attempt's contents, per batch time.
#[derive(Default)]
struct Log {
    completed: BTreeMap<u64, Vec<u64>>,
    attempts: BTreeMap<u64, Vec<Vec<u64>>>,
}

struct World {
    sim: SimStorage,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stored: BTreeSet<u64>,
    log: Arc<Mutex<Log>>,
    /// The direct log's length.
    direct: Arc<Mutex<u64>>,
    fail_next: Arc<AtomicBool>,
    next_id: u64,
    tx: Option<mpsc::UnboundedSender<Vec<u64>>>,
    /// The fence of the current process.
    fence: Arc<AtomicBool>,
}

fn config() -> StreamingConfig {
    StreamingConfig {
        batch_interval_ms: 10,
        block_interval_ms: 2,
        block_max_bytes: 700,
        max_pending_bytes: 64 << 10,
        block_cache_bytes: 4 << 10,
        clock: ClockMode::Manual,
        job_retry_initial_ms: 1,
        receiver_restart_initial_ms: 1,
        wal: WalConfig {
            segment_max_bytes: 4096,
            ..WalConfig::default()
        },
        ..StreamingConfig::default()
    }
}

impl World {
    fn context(&mut self) -> StreamingContext {
        let sim = self.sim.clone();
        let tracker = move || sim.redb_backend("tracker.redb");
        self.fence = Arc::new(AtomicBool::new(false));
        let storage = Fenced {
            sim: self.sim.clone(),
            dead: self.fence.clone(),
        };
        let mut ctx = StreamingContext::with_storage(config(), Arc::new(storage), tracker);
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx = Some(tx);
        ctx.add_receiver(
            "cmd",
            Commanded {
                commands: Mutex::new(Some(rx)),
                acked: self.acked.clone(),
            },
        );
        ctx.add_direct_source("direct", DirectLog(self.direct.clone()));
        let (log, fail) = (self.log.clone(), self.fail_next.clone());
        ctx.foreach_batch("log", move |b| {
            let mut ids: Vec<u64> = b
                .map(|r| std::str::from_utf8(&r.payload).unwrap().parse().unwrap())?
                .collect();
            ids.sort_unstable();
            let mut l = log.lock().unwrap();
            l.attempts.entry(b.time()).or_default().push(ids.clone());
            if fail.swap(false, SeqCst) {
                return Err("injected job failure".into());
            }
            l.completed.insert(b.time(), ids);
            Ok(())
        });
        ctx
    }

    async fn start(&mut self) -> RunningContext {
        self.context()
            .start()
            .await
            .expect("recovery succeeds after any crash")
    }

    fn store(&mut self, n: u16) {
        let ids: Vec<u64> = (self.next_id..self.next_id + u64::from(n)).collect();
        self.next_id += u64::from(n);
        self.stored.extend(ids.iter().copied());
        let mut direct = self.direct.lock().unwrap();
        self.stored
            .extend((*direct..*direct + u64::from(n)).map(|o| DIRECT_ID + o));
        *direct += u64::from(n);
        drop(direct);
        if let Some(tx) = &self.tx {
            let _ = tx.send(ids);
        }
    }

    /// The process dies: its storage is fenced, then the disk loses what was not synced.
    fn power_cut(&self, tear: TearKind) {
        self.fence.store(true, SeqCst);
        self.sim.crash(tear.tear());
    }

    async fn crash(&mut self, running: RunningContext, tear: TearKind) -> RunningContext {
        self.power_cut(tear);
        drop(running);
        // Let aborted tasks and in-flight acks settle; acks of the dead engine must either be
        // for data synced before the crash or fail.
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.start().await
    }
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut w = World {
        sim: SimStorage::new(),
        acked: Arc::default(),
        stored: BTreeSet::new(),
        log: Arc::default(),
        direct: Arc::default(),
        fail_next: Arc::default(),
        next_id: 0,
        tx: None,
        fence: Arc::default(),
    };
    let mut running = w.start().await;
    for op in ops {
        running = match op {
            Op::Store(n) => {
                w.store(n);
                running
            }
            Op::Batch => {
                running.run_batch().await.expect("batch");
                running
            }
            Op::FailNextJob => {
                w.fail_next.store(true, SeqCst);
                running
            }
            Op::BatchThenCrash(d, t) => {
                let r = Arc::new(running);
                let r2 = r.clone();
                let h = tokio::spawn(async move {
                    let _ = r2.run_batch().await;
                });
                tokio::time::sleep(Duration::from_micros(u64::from(d))).await;
                w.power_cut(t);
                h.abort();
                let _ = h.await;
                drop(Arc::into_inner(r));
                tokio::time::sleep(Duration::from_millis(2)).await;
                w.start().await
            }
            Op::StoreThenCrash(n, d, t) => {
                w.store(n);
                tokio::time::sleep(Duration::from_micros(u64::from(d))).await;
                w.crash(running, t).await
            }
            Op::Restart => {
                running.stop().await.expect("graceful stop");
                w.start().await
            }
            Op::Crash(t) => w.crash(running, t).await,
            Op::CrashDuringRecovery(d, t) => {
                w.power_cut(TearKind::None);
                drop(running);
                let ctx = w.context();
                let h = tokio::spawn(ctx.start());
                tokio::time::sleep(Duration::from_micros(u64::from(d))).await;
                w.power_cut(t);
                if let Ok(Ok(r)) = h.await {
                    drop(r);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                w.start().await
            }
        };
    }
    // Drain: a graceful stop makes every accepted record durable and processes it.
    running.stop().await.expect("final graceful stop");
    let running = w.start().await;
    running.run_batch().await.expect("final batch");
    running.stop().await.expect("stop");

    let acked = w.acked.lock().unwrap().clone();
    let log = w.log.lock().unwrap();
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for (time, ids) in &log.completed {
        for id in ids {
            if let Some(other) = seen.insert(*id, *time) {
                return Err(TestCaseError::fail(format!(
                    "record {id} is in batches {other} and {time}"
                )));
            }
        }
    }
    for id in &acked {
        prop_assert!(
            seen.contains_key(id),
            "acknowledged record {id} is in no completed batch"
        );
    }
    for id in seen.keys() {
        prop_assert!(w.stored.contains(id), "record {id} was never stored");
    }
    for o in 0..*w.direct.lock().unwrap() {
        prop_assert!(
            seen.contains_key(&(DIRECT_ID + o)),
            "direct log offset {o} is in no completed batch"
        );
    }
    for (time, attempts) in &log.attempts {
        for a in attempts {
            prop_assert_eq!(
                a,
                &attempts[0],
                "batch {} ran with different contents",
                time
            );
        }
        prop_assert!(
            log.completed.contains_key(time),
            "batch {} never completed",
            time
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(100),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_acknowledged_record_reaches_exactly_one_completed_batch(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(ops))?;
    }
}
