//! Replicated acknowledgements, in process, on `object_store`'s in-memory store (the same client
//! code as S3; the S3 server itself is exercised by the node's `real_s3_*` tests): a node whose
//! data directory is lost is adopted by a fresh one with every acknowledged record; a node taken
//! over acknowledges nothing more; an unreachable replica holds acknowledgements and is
//! recovered from by itself; a stale directory is refused; the replica is trimmed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use weir::receiver::{Position, Receiver, ReceiverContext, ReceiverError, Record};
use weir::replica::{ObjectStoreReplica, Owner, Replica, ReplicaError, ReplicaFuture, TakenOver};
use weir::{StreamingConfig, StreamingContext};

/// Stores the numbers `0..to` (resuming after its checkpoint), 50 per call, each call awaited
/// before the next: `acked` is then exactly the count of a prefix of the numbers.
struct Numbers {
    to: u64,
    acked: Arc<AtomicU64>,
    pace: Duration,
}

impl Receiver for Numbers {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let mut next = ctx.checkpoint().get("numbers", 0).map_or(0, |o| o + 1);
        while next < self.to && !ctx.is_shutting_down() {
            let end = (next + 50).min(self.to);
            let batch: Vec<Record> = (next..end)
                .map(|n| Record::new(n.to_string()).with_position(Position::sequence("numbers", n)))
                .collect();
            ctx.store(batch).await?;
            self.acked.store(end, SeqCst);
            next = end;
            tokio::time::sleep(self.pace).await;
        }
        ctx.shutdown().requested().await;
        Ok(())
    }
}

type Seen = Arc<Mutex<BTreeMap<u64, u32>>>;

fn config() -> StreamingConfig {
    StreamingConfig {
        node_id: Some("n1".into()),
        batch_interval_ms: 100,
        block_interval_ms: 10,
        ..StreamingConfig::default()
    }
}

/// A node on `dir` replicating to `replica`, storing `0..to`; its job records what it saw in
/// `seen` while `fail` is false, and fails while it is true (batches then never complete).
fn node(
    dir: &std::path::Path,
    replica: Arc<dyn Replica>,
    to: u64,
    acked: &Arc<AtomicU64>,
    seen: &Seen,
    fail: &Arc<AtomicBool>,
) -> StreamingContext {
    let mut ctx = StreamingContext::new(config(), dir);
    ctx.with_replica(replica);
    ctx.add_receiver(
        "numbers",
        Numbers {
            to,
            acked: acked.clone(),
            pace: Duration::from_millis(2),
        },
    );
    let (seen, fail) = (seen.clone(), fail.clone());
    ctx.foreach_batch("collect", move |batch| {
        if fail.load(SeqCst) {
            return Err("the output is down".into());
        }
        let mut s = seen.lock().unwrap();
        for r in batch.map(|r| r.payload.clone()).unwrap().collect() {
            let n: u64 = std::str::from_utf8(&r).unwrap().parse().unwrap();
            *s.entry(n).or_default() += 1;
        }
        Ok(())
    });
    ctx
}

fn replica(store: &Arc<InMemory>) -> Arc<dyn Replica> {
    Arc::new(ObjectStoreReplica::new(store.clone(), "weir", "n1"))
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn missing(seen: &Seen, acked: u64) -> Vec<u64> {
    let s = seen.lock().unwrap();
    (0..acked).filter(|n| !s.contains_key(n)).collect()
}

async fn log_objects(store: &InMemory) -> usize {
    use futures_util::TryStreamExt;
    let v: Vec<_> = store
        .list(Some(&Path::from("weir/n1/log")))
        .try_collect()
        .await
        .unwrap();
    v.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_with_the_same_node_id_adopts_every_acknowledged_record_of_a_lost_one() {
    let store = Arc::new(InMemory::new());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (acked, seen_a, fail) = (
        Arc::default(),
        Seen::default(),
        Arc::new(AtomicBool::new(false)),
    );
    let a = node(
        dir_a.path(),
        replica(&store),
        1_000_000,
        &acked,
        &seen_a,
        &fail,
    )
    .start()
    .await
    .unwrap();
    // Some batches complete, then the output goes down: later records are acknowledged but in
    // no completed batch, some in allocated batches, some in none.
    wait_for("some completed batches", Duration::from_secs(20), || {
        a.metrics().engine().batches_completed() >= 3 && acked.load(SeqCst) > 2_000
    })
    .await;
    fail.store(true, SeqCst);
    let stuck = acked.load(SeqCst);
    wait_for("more acknowledgements", Duration::from_secs(20), || {
        acked.load(SeqCst) > stuck + 3_000
    })
    .await;
    // The machine is lost: the process dies (dropped without a stop), the disk goes with it.
    drop(a);
    let acked_a = acked.load(SeqCst);
    drop(dir_a);

    let (acked_b, seen_b) = (Arc::default(), Seen::default());
    let ok = Arc::new(AtomicBool::new(false));
    let b = node(dir_b.path(), replica(&store), 0, &acked_b, &seen_b, &ok)
        .start()
        .await
        .unwrap();
    let m = b.metrics();
    assert!(m.engine().adopted_blocks() > 0, "nothing adopted");
    wait_for("every acknowledged record", Duration::from_secs(20), || {
        (0..acked_a).all(|n| {
            seen_a.lock().unwrap().contains_key(&n) || seen_b.lock().unwrap().contains_key(&n)
        })
    })
    .await;
    // Nothing in a batch completed on the lost node is re-run unless its completion had not
    // reached the replica; nothing is output twice by the adopter itself.
    assert!(seen_b.lock().unwrap().values().all(|c| *c == 1));
    let dup = seen_b
        .lock()
        .unwrap()
        .keys()
        .filter(|n| seen_a.lock().unwrap().contains_key(n))
        .count();
    eprintln!(
        "acknowledged {acked_a}; output by the lost node {}, by the adopter {}, both {dup}",
        seen_a.lock().unwrap().len(),
        seen_b.lock().unwrap().len()
    );
    assert!(
        m.engine().adopted_batches() >= 1,
        "allocated batches re-run"
    );
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taken_over_acknowledges_nothing_more_and_fails_naming_the_new_epoch() {
    let store = Arc::new(InMemory::new());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (acked, seen_a, no) = (
        Arc::default(),
        Seen::default(),
        Arc::new(AtomicBool::new(false)),
    );
    let a = node(
        dir_a.path(),
        replica(&store),
        1_000_000,
        &acked,
        &seen_a,
        &no,
    )
    .start()
    .await
    .unwrap();
    wait_for("acknowledgements", Duration::from_secs(20), || {
        acked.load(SeqCst) > 2_000
    })
    .await;
    // A new owner while the old one still runs (a node that only looked dead).
    let (acked_b, seen_b) = (Arc::default(), Seen::default());
    let b = node(dir_b.path(), replica(&store), 0, &acked_b, &seen_b, &no)
        .start()
        .await
        .unwrap();
    wait_for("the old owner to fail", Duration::from_secs(20), || {
        a.failure().is_some()
    })
    .await;
    let failure = a.failure().unwrap();
    assert!(
        failure.contains("fenced") && failure.contains("epoch 2"),
        "{failure}"
    );
    assert!(a.metrics().engine().replica_fenced() >= 1);
    let acked_a = acked.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        acked.load(SeqCst),
        acked_a,
        "acknowledged after the take-over"
    );
    // Everything the old owner acknowledged is output by one of the two.
    wait_for("every acknowledged record", Duration::from_secs(20), || {
        (0..acked_a).all(|n| {
            seen_a.lock().unwrap().contains_key(&n) || seen_b.lock().unwrap().contains_key(&n)
        })
    })
    .await;
    b.stop().await.unwrap();
    drop(a);
}

/// A replica that can be made unreachable.
#[derive(Debug)]
struct Flaky {
    inner: ObjectStoreReplica,
    down: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), ReplicaError> {
        if self.down.load(SeqCst) {
            Err(ReplicaError::Unavailable(
                "connection refused (injected)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Replica for Flaky {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn owner(&self) -> ReplicaFuture<'_, Option<Owner>> {
        Box::pin(async move {
            self.check()?;
            self.inner.owner().await
        })
    }
    fn take_over<'a>(
        &'a self,
        instance: &'a str,
        before: &'a (dyn Fn(u64) -> std::io::Result<()> + Send + Sync),
    ) -> ReplicaFuture<'a, TakenOver> {
        Box::pin(async move {
            self.check()?;
            self.inner.take_over(instance, before).await
        })
    }
    fn append(&self, entry: Bytes) -> ReplicaFuture<'_, u64> {
        Box::pin(async move {
            self.check()?;
            self.inner.append(entry).await
        })
    }
    fn trim(&self, before: u64) -> ReplicaFuture<'_, u64> {
        Box::pin(async move {
            self.check()?;
            self.inner.trim(before).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_replica_is_down_nothing_is_acknowledged_and_ingest_resumes_by_itself() {
    let store = Arc::new(InMemory::new());
    let flaky = Arc::new(Flaky {
        inner: ObjectStoreReplica::new(store.clone(), "weir", "n1"),
        down: AtomicBool::new(false),
    });
    let dir = tempfile::tempdir().unwrap();
    let (acked, seen, no) = (
        Arc::default(),
        Seen::default(),
        Arc::new(AtomicBool::new(false)),
    );
    let running = node(dir.path(), flaky.clone(), 20_000, &acked, &seen, &no)
        .start()
        .await
        .unwrap();
    wait_for("acknowledgements", Duration::from_secs(20), || {
        acked.load(SeqCst) > 1_000
    })
    .await;
    flaky.down.store(true, SeqCst);
    // What was in flight when it went down may still complete; after that, nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = acked.load(SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acked.load(SeqCst),
        before,
        "acknowledged while the replica was down"
    );
    let m = running.metrics();
    assert!(m.engine().replica_failures() > 0);
    assert_eq!(m.engine().replica_waiting(), 1);
    assert!(running.failure().is_none(), "{:?}", running.failure());
    flaky.down.store(false, SeqCst);
    wait_for("every record", Duration::from_secs(30), || {
        missing(&seen, 20_000).is_empty()
    })
    .await;
    assert_eq!(acked.load(SeqCst), 20_000);
    assert_eq!(m.engine().replica_waiting(), 0);
    // Completed batches' entries are trimmed: a handful remain, not one per write.
    let writes = m.engine().replica_writes();
    wait_for("trimming", Duration::from_secs(10), || {
        m.engine().replica_trimmed() + 10 >= writes
    })
    .await;
    let left = log_objects(&store).await;
    assert!(left <= 10, "{left} of {writes} entries left in the replica");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_whose_node_id_was_adopted_elsewhere_is_refused_as_stale() {
    let store = Arc::new(InMemory::new());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (acked, seen, no) = (
        Arc::default(),
        Seen::default(),
        Arc::new(AtomicBool::new(false)),
    );
    let a = node(dir_a.path(), replica(&store), 500, &acked, &seen, &no)
        .start()
        .await
        .unwrap();
    wait_for("the records", Duration::from_secs(20), || {
        acked.load(SeqCst) == 500
    })
    .await;
    a.stop().await.unwrap();
    let b = node(dir_b.path(), replica(&store), 0, &acked, &seen, &no)
        .start()
        .await
        .unwrap();
    b.stop().await.unwrap();
    // The first directory is older than the replica now: it must not be trusted.
    let err = node(dir_a.path(), replica(&store), 0, &acked, &seen, &no)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("stale") && err.contains("epoch 2") && err.contains("Move the directory away"),
        "{err}"
    );
    // The adopter itself restarts on its own directory as the owner.
    let b = node(dir_b.path(), replica(&store), 0, &acked, &seen, &no)
        .start()
        .await
        .unwrap();
    b.stop().await.unwrap();
    assert!(missing(&seen, 500).is_empty());
}

/// The replica on a real S3-compatible server (moto's, started once for this test binary),
/// configured as a node configures it: take-over, appends, the fence, trimming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_s3_the_replica_takes_over_appends_fences_and_trims_on_an_s3_server() {
    use weir::replica::ObjectStoreConfig;
    use weir_testkit::peers::s3::{self, ACCESS_KEY, SECRET_KEY};
    let server = s3::shared();
    let _logs = server.logs_on_failure();
    server.create_bucket("replica");
    let config = ObjectStoreConfig {
        bucket: "replica".into(),
        endpoint: Some(server.endpoint()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..ObjectStoreConfig::default()
    };
    let first = ObjectStoreReplica::from_config(&config, "n1").unwrap();
    let none = |_| Ok(());
    let t = first.take_over("a", &none).await.unwrap();
    assert_eq!((t.epoch, t.entries.len()), (1, 0));
    let p1 = first
        .append(Bytes::from_static(b"entry one, long enough"))
        .await
        .unwrap();
    let second = ObjectStoreReplica::from_config(&config, "n1").unwrap();
    let t = second.take_over("b", &none).await.unwrap();
    assert_eq!(t.epoch, 2);
    // The log holds the first owner's fence, then its entry.
    assert_eq!(t.entries.len(), 2);
    assert!(t.entries[0].starts_with(b"WEIRFENCE"));
    assert_eq!(t.entries[1], Bytes::from_static(b"entry one, long enough"));
    let owner = second.owner().await.unwrap().unwrap();
    assert_eq!((owner.epoch, owner.instance.as_str()), (2, "b"));
    // The first owner's next append collides with the fence.
    match first
        .append(Bytes::from_static(b"entry two, by a zombie"))
        .await
    {
        Err(ReplicaError::Fenced {
            new_epoch: 2,
            our_epoch: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let p2 = second
        .append(Bytes::from_static(b"entry two, by the owner"))
        .await
        .unwrap();
    assert!(p2 > p1 + 1, "the fence sits between them");
    // Trimming deletes entries, never the fence.
    assert_eq!(second.trim(p2).await.unwrap(), 1);
    match first
        .append(Bytes::from_static(b"entry two, by a zombie"))
        .await
    {
        Err(ReplicaError::Fenced { .. }) => {}
        other => panic!("{other:?}"),
    }
}
