//! End-to-end tests of the engine, in process: receivers → blocks → WAL → batches → jobs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir::receiver::{Position, Receiver, ReceiverContext, ReceiverError, Record};
use weir::wal::sim::SimStorage;
use weir::{ClockMode, StreamingConfig, StreamingContext};

/// Stores the numbers `from..to` (resuming after its checkpoint), `per_call` per `store()` call,
/// with up to `in_flight` calls outstanding; counts the records whose store resolved.
struct Numbers {
    to: u64,
    per_call: u64,
    in_flight: usize,
    acked: Arc<AtomicU64>,
    /// Pause after each call (a source with a steady rate), if any.
    pace: Option<Duration>,
}

impl Receiver for Numbers {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let mut next = ctx.checkpoint().get("numbers", 0).map_or(0, |o| o + 1);
        let mut pending = std::collections::VecDeque::new();
        while next < self.to && !ctx.is_shutting_down() {
            let end = (next + self.per_call).min(self.to);
            let batch: Vec<Record> = (next..end)
                .map(|n| Record::new(n.to_string()).with_position(Position::sequence("numbers", n)))
                .collect();
            next = end;
            pending.push_back((batch.len() as u64, ctx.store(batch)));
            if let Some(p) = self.pace {
                tokio::time::sleep(p).await;
            }
            if pending.len() >= self.in_flight {
                let (n, f) = pending.pop_front().unwrap();
                f.await?;
                self.acked.fetch_add(n, SeqCst);
            }
        }
        for (n, f) in pending {
            f.await?;
            self.acked.fetch_add(n, SeqCst);
        }
        Ok(())
    }
}

type Seen = Arc<Mutex<Vec<(u64, Vec<u64>)>>>;

fn numbers_in(batch: &weir::Batch) -> Vec<u64> {
    batch
        .map(|r| {
            std::str::from_utf8(&r.payload)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .unwrap()
        .collect()
}

fn fast_config() -> StreamingConfig {
    StreamingConfig {
        batch_interval_ms: 100,
        block_interval_ms: 10,
        ..StreamingConfig::default()
    }
}

fn context(
    dir: &std::path::Path,
    to: u64,
    acked: &Arc<AtomicU64>,
    seen: &Seen,
) -> StreamingContext {
    let mut ctx = StreamingContext::new(fast_config(), dir);
    ctx.add_receiver(
        "numbers",
        Numbers {
            to,
            per_call: 100,
            in_flight: 16,
            acked: acked.clone(),
            pace: None,
        },
    );
    let seen = seen.clone();
    ctx.foreach_batch("collect", move |batch| {
        seen.lock().unwrap().push((batch.time(), numbers_in(batch)));
        Ok(())
    });
    ctx
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn check_exactly_once(seen: &Seen, n: u64) {
    let seen = seen.lock().unwrap();
    let mut count = BTreeMap::new();
    for (_, nums) in seen.iter() {
        for x in nums {
            *count.entry(*x).or_insert(0) += 1;
        }
    }
    assert_eq!(count.len() as u64, n, "distinct records in batches");
    assert!(count.values().all(|c| *c == 1), "a record appeared twice");
    assert_eq!(count.keys().next_back().copied(), n.checked_sub(1));
    let times: Vec<u64> = seen.iter().map(|(t, _)| *t).collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "batches out of order: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_record_reaches_exactly_one_batch_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let seen: Seen = Arc::default();
    let n = 50_000;
    let running = context(dir.path(), n, &acked, &seen).start().await.unwrap();
    wait_for("all acks", Duration::from_secs(60), || {
        acked.load(SeqCst) == n
    })
    .await;
    let m = running.metrics();
    let report = running.stop().await.unwrap();
    check_exactly_once(&seen, n);
    let batches = seen.lock().unwrap().len();
    assert!(batches >= 2, "expected several batches, got {batches}");
    assert_eq!(
        report.completed_through,
        seen.lock().unwrap().last().map(|(t, _)| *t)
    );
    let e = m.engine();
    assert_eq!(e.batch_records(), n);
    let r = e.receiver("numbers");
    assert_eq!(r.records_stored(), n);
    assert_eq!(r.records_received(), n);
    assert_eq!(r.pending_bytes(), 0);
    assert_eq!(e.blocks_pending(), 0);
    let text = m.prometheus_text();
    assert!(
        text.contains(&format!(
            "weir_receiver_records_stored_total{{receiver=\"numbers\"}} {n}"
        )),
        "{text}"
    );
    assert!(text.contains("# TYPE weir_wal_fsyncs counter"), "{text}");
    assert!(text.contains("\nweir_wal_fsyncs_total "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_checkpoint_and_reruns_nothing_completed() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let seen: Seen = Arc::default();
    let running = context(dir.path(), 3_000, &acked, &seen)
        .start()
        .await
        .unwrap();
    wait_for("first acks", Duration::from_secs(30), || {
        acked.load(SeqCst) == 3_000
    })
    .await;
    running.stop().await.unwrap();
    let first_run = seen.lock().unwrap().len();
    // Second run: the receiver would store 0..8000, but resumes after its checkpoint (2999).
    let running = context(dir.path(), 8_000, &acked, &seen)
        .start()
        .await
        .unwrap();
    wait_for("second acks", Duration::from_secs(30), || {
        acked.load(SeqCst) == 8_000
    })
    .await;
    let m = running.metrics();
    running.stop().await.unwrap();
    assert_eq!(m.engine().batches_rerun(), 0);
    assert_eq!(m.engine().receiver("numbers").records_stored(), 5_000);
    assert!(seen.lock().unwrap().len() > first_run);
    check_exactly_once(&seen, 8_000);
}

/// Fails its first two runs (one by error, one by panic), then stores.
struct Flaky {
    runs: Arc<AtomicUsize>,
}

impl Receiver for Flaky {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let run = self.runs.fetch_add(1, SeqCst);
        assert_eq!(ctx.attempt() as usize, run);
        match run {
            0 => Err(ReceiverError::msg("source unreachable")),
            1 => panic!("receiver bug"),
            _ => {
                ctx.store(vec![Record::new("ok")]).await?;
                Ok(())
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_restarted_with_backoff_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut config = fast_config();
    config.receiver_restart_initial_ms = 50;
    config.clock = ClockMode::Manual;
    let mut ctx = StreamingContext::new(config, dir.path());
    ctx.add_receiver("flaky", Flaky { runs: runs.clone() });
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    ctx.foreach_batch("count", move |b| {
        c.fetch_add(b.count(), SeqCst);
        Ok(())
    });
    let t0 = Instant::now();
    let running = ctx.start().await.unwrap();
    wait_for("third run", Duration::from_secs(10), || {
        runs.load(SeqCst) == 3
    })
    .await;
    // Backoff: 50 ms, then 100 ms.
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
    wait_for("the record", Duration::from_secs(10), || {
        running
            .metrics()
            .engine()
            .receiver("flaky")
            .records_stored()
            == 1
    })
    .await;
    running.run_batch().await.unwrap();
    assert_eq!(count.load(SeqCst), 1);
    assert_eq!(running.metrics().engine().receiver("flaky").restarts(), 2);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_retries_the_same_batch_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.clock = ClockMode::Manual;
    config.job_retry_initial_ms = 10;
    let mut ctx = StreamingContext::new(config, dir.path());
    let acked = Arc::new(AtomicU64::new(0));
    ctx.add_receiver(
        "numbers",
        Numbers {
            to: 500,
            per_call: 50,
            in_flight: 4,
            acked: acked.clone(),
            pace: None,
        },
    );
    let attempts: Seen = Arc::default();
    let a = attempts.clone();
    ctx.foreach_batch("flaky-output", move |b| {
        let mut a = a.lock().unwrap();
        a.push((b.time(), numbers_in(b)));
        if a.len() < 3 {
            return Err("output unavailable".into());
        }
        Ok(())
    });
    let running = ctx.start().await.unwrap();
    wait_for("acks", Duration::from_secs(10), || {
        acked.load(SeqCst) == 500
    })
    .await;
    let t = running.run_batch().await.unwrap();
    let a = attempts.lock().unwrap().clone();
    assert_eq!(a.len(), 3);
    assert!(
        a.iter().all(|x| *x == a[0]),
        "a retry saw different contents"
    );
    assert_eq!(a[0].0, t);
    assert_eq!(a[0].1.len(), 500);
    assert_eq!(running.metrics().engine().job_failures(), 2);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_operations_and_windows() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.clock = ClockMode::Manual;
    let mut ctx = StreamingContext::new(config, dir.path());
    struct Words;
    impl Receiver for Words {
        async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
            let line = |s: &str| {
                Record::new(s.to_string())
                    .with_key("k")
                    .with_header("h", "v")
            };
            ctx.store(vec![line("a b a"), line("c a")]).await?;
            Ok(())
        }
    }
    ctx.add_receiver("words", Words);
    let out: Arc<Mutex<Vec<String>>> = Arc::default();
    let o = out.clone();
    ctx.foreach_batch("ops", move |b| {
        let words = b.flat_map(|r| {
            String::from_utf8(r.payload.to_vec())
                .unwrap()
                .split(' ')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })?;
        let counts = words.map(|w| (w, 1u64)).reduce_by_key(|a, b| a + b);
        let direct = b.reduce_by_key(|r| (r.payload.len(), 1u32), |a, b| a + b)?;
        let long = b.filter(|r| r.payload.len() > 3)?.count();
        let all = b.collect()?;
        assert!(all
            .iter()
            .all(|r| r.key.as_deref() == Some(&b"k"[..]) && r.headers.len() == 1));
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort();
        o.lock().unwrap().push(format!(
            "{} records, {long} long, sizes {}, words {v:?}",
            b.count(),
            direct.len()
        ));
        Ok(())
    });
    let w = out.clone();
    ctx.foreach_window("window", 2, move |b| {
        w.lock().unwrap().push(format!(
            "window of {} batches: {} records",
            b.times().len(),
            b.count()
        ));
        Ok(())
    });
    let running = ctx.start().await.unwrap();
    wait_for("store", Duration::from_secs(10), || {
        running
            .metrics()
            .engine()
            .receiver("words")
            .records_stored()
            == 2
    })
    .await;
    running.run_batch().await.unwrap();
    running.run_batch().await.unwrap();
    running.run_batch().await.unwrap();
    running.stop().await.unwrap();
    let out = out.lock().unwrap().clone();
    assert_eq!(
        out,
        vec![
            "2 records, 1 long, sizes 2, words [(\"a\", 3), (\"b\", 1), (\"c\", 1)]",
            "window of 1 batches: 2 records",
            "0 records, 0 long, sizes 0, words []",
            "window of 2 batches: 2 records",
            "0 records, 0 long, sizes 0, words []",
            "window of 2 batches: 0 records",
        ]
    );
}

/// Samples a gauge while a test runs; returns the maximum seen.
fn sample_max(
    f: impl Fn() -> u64 + Send + 'static,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut max = 0;
        while !s.load(SeqCst) {
            max = max.max(f());
            std::thread::sleep(Duration::from_micros(200));
        }
        max
    });
    (stop, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_makes_store_wait_with_bounded_memory_and_no_loss() {
    let sim = SimStorage::new();
    sim.set_sync_delay(Duration::from_millis(20));
    let tracker = {
        let sim = sim.clone();
        move || sim.redb_backend("tracker.redb")
    };
    let config = StreamingConfig {
        block_max_bytes: 16 << 10,
        max_pending_bytes: 64 << 10,
        ..fast_config()
    };
    let mut ctx = StreamingContext::with_storage(config, Arc::new(sim.clone()), tracker);
    let acked = Arc::new(AtomicU64::new(0));
    let n = 20_000;
    ctx.add_receiver(
        "numbers",
        Numbers {
            to: n,
            per_call: 100,
            // Far more in flight than the budget allows: store() has to wait.
            in_flight: 1_000,
            acked: acked.clone(),
            pace: None,
        },
    );
    let seen: Seen = Arc::default();
    let s = seen.clone();
    ctx.foreach_batch("collect", move |b| {
        s.lock().unwrap().push((b.time(), numbers_in(b)));
        Ok(())
    });
    let running = ctx.start().await.unwrap();
    let r = running.metrics().engine().receiver("numbers");
    let (stop, sampler) = sample_max(move || r.pending_bytes());
    wait_for("all acks", Duration::from_secs(60), || {
        acked.load(SeqCst) == n
    })
    .await;
    stop.store(true, SeqCst);
    let max_pending = sampler.join().unwrap();
    let waits = running
        .metrics()
        .engine()
        .receiver("numbers")
        .backpressure_waits();
    running.stop().await.unwrap();
    assert!(
        waits > 0,
        "store() never waited for the pending-bytes budget"
    );
    assert!(max_pending > 0, "the sampler saw nothing pending");
    assert!(
        max_pending <= 64 << 10,
        "pending bytes {max_pending} exceeded the 64 KiB bound"
    );
    // 20,000 records of ~10 bytes are ~400 KiB of budget at most 64 KiB at a time, each wave
    // waiting for a 20 ms fsync: store() must have waited many times over.
    assert!(sim.stats().syncs >= 6, "{:?}", sim.stats());
    check_exactly_once(&seen, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_job_lowers_the_rate_so_store_waits_with_bounded_memory_and_no_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.rate.backpressure = true;
    config.rate.min_rate = 1_000;
    config.block_cache_bytes = 256 << 10;
    let mut ctx = StreamingContext::new(config, dir.path());
    let acked = Arc::new(AtomicU64::new(0));
    let n = 400_000;
    ctx.add_receiver(
        "numbers",
        Numbers {
            to: n,
            per_call: 100,
            in_flight: 64,
            acked: acked.clone(),
            // About 100,000 records/s.
            pace: Some(Duration::from_millis(1)),
        },
    );
    let seen: Seen = Arc::default();
    let s = seen.clone();
    // Until the test sees store() throttled, the job manages about 20,000 records/s; the
    // receiver could store far faster.
    let slow = Arc::new(AtomicBool::new(true));
    let sl = slow.clone();
    ctx.foreach_batch("slow", move |b| {
        if sl.load(SeqCst) {
            std::thread::sleep(Duration::from_micros(50 * b.count()));
        }
        s.lock().unwrap().push((b.time(), numbers_in(b)));
        Ok(())
    });
    let running = ctx.start().await.unwrap();
    let m = running.metrics();
    let e = m.engine().clone();
    let (stop, sampler) = sample_max(move || e.cache_bytes());
    let r = m.engine().receiver("numbers");
    wait_for("store() throttled", Duration::from_secs(30), || {
        r.throttled_us() > 0
    })
    .await;
    assert!(r.rate_limit() > 0, "backpressure set no rate limit");
    assert!(
        r.records_stored() < n,
        "ingest finished before backpressure kicked in"
    );
    slow.store(false, SeqCst);
    wait_for("all acks", Duration::from_secs(120), || {
        acked.load(SeqCst) == n
    })
    .await;
    stop.store(true, SeqCst);
    let max_cache = sampler.join().unwrap();
    running.stop().await.unwrap();
    assert!(max_cache <= 256 << 10, "cache grew to {max_cache}");
    check_exactly_once(&seen, n);
}

/// Stores one record and hands the outcome of its `store()` to the test.
struct OneShot {
    result: Mutex<Option<tokio::sync::oneshot::Sender<Result<(), String>>>>,
}

impl Receiver for OneShot {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        // The future is awaited by a task of its own, which the engine does not own or abort.
        let fut = ctx.store_one(Record::new("never cut"));
        let tx = self.result.lock().unwrap().take();
        tokio::spawn(async move {
            let r = fut.await;
            if let Some(tx) = tx {
                let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
            }
        });
        ctx.shutdown().requested().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_context_fails_pending_stores_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let config = StreamingConfig {
        clock: ClockMode::Manual,
        block_interval_ms: 60_000,
        ..StreamingConfig::default()
    };
    let mut ctx = StreamingContext::new(config, dir.path());
    let (tx, rx) = tokio::sync::oneshot::channel();
    ctx.add_receiver(
        "one",
        OneShot {
            result: Mutex::new(Some(tx)),
        },
    );
    let running = ctx.start().await.unwrap();
    let r = running.metrics().engine().receiver("one");
    wait_for("the store call", Duration::from_secs(10), || {
        r.records_received() == 1
    })
    .await;
    drop(running);
    let outcome = tokio::time::timeout(Duration::from_secs(5), rx).await;
    match outcome {
        Ok(Ok(Err(e))) => assert!(e.contains("shutting down"), "{e}"),
        Ok(Err(_closed)) => panic!("the waiting task vanished"),
        Ok(Ok(Ok(()))) => panic!("a record in a block never written was acknowledged"),
        Err(_) => panic!("store() hung after the context was dropped"),
    }
}

// ---- A full disk is backpressure, never a crash (deterministic, on the simulated disk) ----

/// A context whose WAL is on `wal_disk` and tracker on `tracker_disk`, fed `n` numbered records
/// at a steady pace; the batch job calls `job_fails` first and fails with ENOSPC while it says
/// so (as a `dir` output does on a full disk).
fn disk_full_context(
    config: StreamingConfig,
    wal_disk: &SimStorage,
    tracker_disk: &SimStorage,
    n: u64,
    acked: &Arc<AtomicU64>,
    seen: &Seen,
    job_full: &Arc<AtomicBool>,
) -> StreamingContext {
    let td = tracker_disk.clone();
    let mut ctx = StreamingContext::with_storage(config, Arc::new(wal_disk.clone()), move || {
        td.redb_backend("tracker.redb")
    });
    ctx.add_receiver(
        "numbers",
        Numbers {
            to: n,
            per_call: 100,
            in_flight: 8,
            acked: acked.clone(),
            pace: Some(Duration::from_millis(3)),
        },
    );
    let (seen, full) = (seen.clone(), job_full.clone());
    ctx.foreach_batch("collect", move |b| {
        if full.load(SeqCst) {
            let e = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device");
            return Err(Box::new(e));
        }
        seen.lock().unwrap().push((b.time(), numbers_in(b)));
        Ok(())
    });
    ctx
}

/// Counters when the disk became full.
struct Before {
    acked: u64,
    allocated: u64,
    completed: u64,
}

/// Runs `fill` a quarter into the stream, checks that `place` waits for space (and the engine
/// does not fail), runs `free`, and checks that every acknowledged record reaches exactly one
/// completed batch and that `stalled` held meanwhile.
async fn survives_a_full_disk(
    config: StreamingConfig,
    wal_disk: SimStorage,
    tracker_disk: SimStorage,
    place: &str,
    fill: impl FnOnce(&Arc<AtomicBool>),
    free: impl FnOnce(&Arc<AtomicBool>),
    stalled: impl Fn(&weir::RunningContext, &Before, u64) -> Result<(), String>,
) -> weir::RunningContext {
    let n = 40_000;
    let (acked, seen, job_full): (Arc<AtomicU64>, Seen, Arc<AtomicBool>) =
        (Arc::default(), Arc::default(), Arc::default());
    let ctx = disk_full_context(
        config,
        &wal_disk,
        &tracker_disk,
        n,
        &acked,
        &seen,
        &job_full,
    );
    let running = ctx.start().await.unwrap();
    wait_for("a quarter acknowledged", Duration::from_secs(30), || {
        acked.load(SeqCst) >= n / 4
    })
    .await;
    fill(&job_full);
    wait_for(
        &format!("{place} waiting for space"),
        Duration::from_secs(10),
        || running.metrics().waiting_for_space().contains(&place),
    )
    .await;
    // While full: the engine does not fail, and the place's own effect shows (after the
    // acknowledgements of what was durable before it settle).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = running.metrics().engine().clone();
    let before = Before {
        acked: acked.load(SeqCst),
        allocated: e.batches_allocated(),
        completed: e.batches_completed(),
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(running.failure(), None);
    assert!(
        running.metrics().waiting_for_space().contains(&place),
        "{:?}",
        running.metrics().waiting_for_space()
    );
    if let Err(e) = stalled(&running, &before, acked.load(SeqCst)) {
        panic!("while {place} was full: {e}");
    }
    let text = running.metrics().prometheus_text();
    assert!(
        text.contains(&format!("weir_waiting_for_space{{place=\"{place}\"}} 1")),
        "{text}"
    );
    free(&job_full);
    wait_for("every record acknowledged", Duration::from_secs(60), || {
        acked.load(SeqCst) == n
    })
    .await;
    wait_for("the space episode to end", Duration::from_secs(10), || {
        running.metrics().waiting_for_space().is_empty()
    })
    .await;
    let last = running.run_batch().await.unwrap();
    assert!(running.completed_through() >= Some(last));
    assert_eq!(running.failure(), None);
    check_exactly_once(&seen, n);
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_at_a_tracker_commit_waits_reopens_the_tracker_and_loses_nothing() {
    let (wal_disk, tracker_disk) = (SimStorage::new(), SimStorage::new());
    let td = tracker_disk.clone();
    let running = survives_a_full_disk(
        fast_config(),
        wal_disk,
        tracker_disk,
        "tracker",
        // Every write to the tracker's file fails with ENOSPC (commits, and the repair a
        // reopen needs) until freed.
        {
            let td = td.clone();
            move |_| td.fail_writes(weir::wal::sim::Fault::Enospc, 1_000_000)
        },
        move |_| td.clear_faults(),
        |running, before, acked| {
            // Receivers go on (the WAL has room); no batch is allocated.
            let e = running.metrics().engine().clone();
            if acked <= before.acked {
                return Err(format!("stores stopped ({} → {acked})", before.acked));
            }
            if e.batches_allocated() != before.allocated {
                return Err("a batch was allocated without a tracker commit".into());
            }
            Ok(())
        },
    )
    .await;
    let e = running.metrics().engine().clone();
    assert!(e.space_retries(weir::space::Place::Tracker) > 0);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_in_the_wal_makes_store_wait_and_loses_nothing() {
    let (wal_disk, tracker_disk) = (SimStorage::new(), SimStorage::new());
    let wd = wal_disk.clone();
    let running = survives_a_full_disk(
        fast_config(),
        wal_disk,
        tracker_disk,
        "wal",
        {
            let wd = wd.clone();
            move |_| wd.set_capacity(Some(wd.used_bytes() + 2_000))
        },
        move |_| wd.set_capacity(None),
        |_, before, acked| {
            // Nothing new is acknowledged while the WAL cannot write.
            if acked != before.acked {
                return Err(format!(
                    "acknowledged {} → {acked} on a full disk",
                    before.acked
                ));
            }
            Ok(())
        },
    )
    .await;
    assert!(running.metrics().wal().snapshot().enospc_retries > 0);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_at_the_output_retries_the_batch_and_loses_nothing() {
    let running = survives_a_full_disk(
        fast_config(),
        SimStorage::new(),
        SimStorage::new(),
        "output",
        |full| full.store(true, SeqCst),
        |full| full.store(false, SeqCst),
        |running, before, _| {
            // The batch is retried, not failed; none completes.
            let e = running.metrics().engine().clone();
            if e.job_failures() == 0 {
                return Err("no failed job run counted".into());
            }
            if e.batches_completed() != before.completed {
                return Err("a batch completed while its output was full".into());
            }
            Ok(())
        },
    )
    .await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_floor_store_waits_before_enospc_while_the_tracker_goes_on() {
    let (wal_disk, tracker_disk) = (SimStorage::new(), SimStorage::new());
    wal_disk.report_space(true);
    let mut config = fast_config();
    config.wal.min_free_bytes = 64 << 10;
    // A 4 MiB disk: the floor is the smaller of 64 KiB and 5 % (about 200 KiB).
    wal_disk.set_capacity(Some(4 << 20));
    let wd = wal_disk.clone();
    let running = survives_a_full_disk(
        config,
        wal_disk,
        tracker_disk,
        "free_space_floor",
        // Leave 32 KiB: below the floor, well before ENOSPC.
        {
            let wd = wd.clone();
            move |_| wd.set_capacity(Some(wd.used_bytes() + (32 << 10)))
        },
        move |_| wd.set_capacity(Some(64 << 20)),
        |running, before, acked| {
            if acked != before.acked {
                return Err(format!(
                    "acknowledged {} → {acked} below the floor",
                    before.acked
                ));
            }
            // The tracker still has room: (empty) batches are allocated and complete.
            if running.metrics().engine().batches_allocated() <= before.allocated {
                return Err("no batch allocated below the floor".into());
            }
            Ok(())
        },
    )
    .await;
    let w = running.metrics().wal().snapshot();
    assert_eq!(w.enospc_retries, 0, "the WAL hit ENOSPC despite the floor");
    assert_eq!((w.below_floor, w.floor_bytes), (0, 64 << 10));
    running.stop().await.unwrap();
}

/// Frees a simulated disk when dropped, also when a test fails while it is full (a recovery
/// waiting for space would otherwise keep the runtime from shutting down).
struct FreeOnDrop(SimStorage);

impl Drop for FreeOnDrop {
    fn drop(&mut self) {
        self.0.clear_faults();
        self.0.set_capacity(None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_on_a_full_disk_writes_only_what_it_must_and_waits_for_the_rest() {
    let (wal_disk, tracker_disk) = (SimStorage::new(), SimStorage::new());
    let _free = FreeOnDrop(tracker_disk.clone());
    let n = 2_000;
    let (acked, seen, full): (Arc<AtomicU64>, Seen, Arc<AtomicBool>) =
        (Arc::default(), Arc::default(), Arc::default());
    let make = |n| {
        disk_full_context(
            fast_config(),
            &wal_disk,
            &tracker_disk,
            n,
            &acked,
            &seen,
            &full,
        )
    };
    // A first start on a full disk must create the tracker: it waits instead of failing.
    tracker_disk.fail_writes(weir::wal::sim::Fault::Enospc, 1_000_000);
    let starting = tokio::spawn(make(n).start());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gave_up = starting.is_finished();
    tracker_disk.clear_faults();
    assert!(!gave_up, "startup gave up on a full disk");
    let running = tokio::time::timeout(Duration::from_secs(10), starting)
        .await
        .expect("startup after space came back")
        .unwrap()
        .unwrap();
    wait_for("every record", Duration::from_secs(30), || {
        acked.load(SeqCst) == n
    })
    .await;
    running.run_batch().await.unwrap();
    running.stop().await.unwrap();
    check_exactly_once(&seen, n);

    // A restart with the disk full (no file may grow): recovery writes nothing that needs
    // space, so the node comes up at once and receives; its commits wait while they need room.
    tracker_disk.set_capacity(Some(tracker_disk.used_bytes()));
    let running = tokio::time::timeout(Duration::from_secs(10), make(2 * n).start())
        .await
        .expect("recovery waited on a full disk although it had nothing to write")
        .unwrap();
    wait_for("more records", Duration::from_secs(30), || {
        acked.load(SeqCst) > n + n / 2
    })
    .await;
    assert_eq!(running.failure(), None);
    tracker_disk.set_capacity(None);
    wait_for("every record", Duration::from_secs(30), || {
        acked.load(SeqCst) == 2 * n
    })
    .await;
    running.run_batch().await.unwrap();
    running.stop().await.unwrap();
    check_exactly_once(&seen, 2 * n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_on_a_data_directory_in_use_gets_a_locked_error() {
    let dir = tempfile::tempdir().unwrap();
    let (acked, seen) = (Arc::new(AtomicU64::new(0)), Seen::default());
    let first = context(dir.path(), 10, &acked, &seen)
        .start()
        .await
        .unwrap();
    let second = context(dir.path(), 10, &acked, &seen).start().await;
    let Err(e) = second else {
        panic!("the directory is in use")
    };
    assert!(e.is_locked(), "{e:?}");
    assert!(
        matches!(e, weir::EngineError::Wal(weir::WalError::Locked { .. })),
        "{e:?}"
    );
    first.stop().await.unwrap();
    // Released by the stop: a new engine starts (retrying while the last tasks end).
    let again = weir_testkit::start(|| context(dir.path(), 10, &acked, &seen)).await;
    again.stop().await.unwrap();
}

/// Stores `numbers` 0..100 per call when asked (`go`), and hands the test its context.
struct Stepper {
    go: Arc<tokio::sync::Notify>,
    ctx: Arc<Mutex<Option<ReceiverContext>>>,
    stored: Arc<AtomicU64>,
}

impl Receiver for Stepper {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        *self.ctx.lock().unwrap() = Some(ctx.clone());
        let mut next = ctx.checkpoint().get("numbers", 0).map_or(0, |o| o + 1);
        loop {
            tokio::select! {
                _ = self.go.notified() => {}
                _ = ctx.shutdown().requested() => return Ok(()),
            }
            let batch: Vec<Record> = (next..next + 100)
                .map(|n| Record::new(n.to_string()).with_position(Position::sequence("numbers", n)))
                .collect();
            next += 100;
            ctx.store(batch).await?;
            self.stored.store(next, SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_sees_its_records_completed_only_once_their_batch_completed_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let start = |allow: Arc<AtomicBool>| {
        let mut config = fast_config();
        config.clock = ClockMode::Manual;
        config.job_retry_initial_ms = 10;
        config.job_retry_max_ms = 20;
        let mut ctx = StreamingContext::new(config, dir.path());
        let (go, rctx, stored) = (Arc::default(), Arc::default(), Arc::default());
        ctx.add_receiver(
            "numbers",
            Stepper {
                go: Arc::clone(&go),
                ctx: Arc::clone(&rctx),
                stored: Arc::clone(&stored),
            },
        );
        ctx.foreach_batch("gated-output", move |_| {
            if allow.load(SeqCst) {
                Ok(())
            } else {
                Err("output unavailable".into())
            }
        });
        (ctx, go, rctx, stored)
    };
    let completed = |rctx: &Arc<Mutex<Option<ReceiverContext>>>| {
        rctx.lock()
            .unwrap()
            .as_ref()
            .and_then(|c| c.completed().get("numbers", 0))
    };
    let allow = Arc::new(AtomicBool::new(false));
    let (ctx, go, rctx, stored) = start(allow.clone());
    let running = Arc::new(ctx.start().await.unwrap());
    wait_for("the receiver", Duration::from_secs(10), || {
        rctx.lock().unwrap().is_some()
    })
    .await;
    go.notify_one();
    wait_for("0..100 durable", Duration::from_secs(10), || {
        stored.load(SeqCst) == 100
    })
    .await;
    // Durable, but in no completed batch: nothing completed.
    assert_eq!(completed(&rctx), None);
    let r = running.clone();
    let batch = tokio::spawn(async move { r.run_batch().await });
    wait_for("a failed attempt", Duration::from_secs(10), || {
        running.metrics().engine().job_failures() >= 2
    })
    .await;
    // The batch is allocated and its output keeps failing: still nothing completed.
    assert_eq!(completed(&rctx), None);
    allow.store(true, SeqCst);
    batch.await.unwrap().unwrap();
    assert_eq!(completed(&rctx), Some(99));
    go.notify_one();
    wait_for("100..200 durable", Duration::from_secs(10), || {
        stored.load(SeqCst) == 200
    })
    .await;
    assert_eq!(completed(&rctx), Some(99));
    running.run_batch().await.unwrap();
    assert_eq!(completed(&rctx), Some(199));
    Arc::into_inner(running).unwrap().stop().await.unwrap();

    // A new run starts with nothing completed; its first batch covers everything before it.
    let (ctx, go, rctx, stored) = start(allow);
    let running = ctx.start().await.unwrap();
    wait_for("the receiver", Duration::from_secs(10), || {
        rctx.lock().unwrap().is_some()
    })
    .await;
    assert_eq!(completed(&rctx), None);
    go.notify_one();
    wait_for("200..300 durable", Duration::from_secs(10), || {
        stored.load(SeqCst) == 300
    })
    .await;
    running.run_batch().await.unwrap();
    assert_eq!(completed(&rctx), Some(299));
    running.stop().await.unwrap();
}
