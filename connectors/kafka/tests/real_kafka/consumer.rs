//! The reliable consumer against the real broker, with `weir_testkit::RecordingHost` standing in
//! for the engine (its checkpoint is raised by the positions of the records it made durable, as
//! the engine's is).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use weir_kafka::KafkaReceiver;
use weir_receiver::{shutdown_channel, Receiver, ReceiverContext};
use weir_testkit::peers::kafka::{committed_offsets, create_topic};
use weir_testkit::peers::LogsOnFailure;
use weir_testkit::{wait_until_async, RecordingHost};

use super::config;

/// A new topic of `partitions` partitions on the shared broker; its name and the bootstrap.
fn topic(prefix: &str, partitions: i32) -> (String, String, LogsOnFailure) {
    let (_, bs, logs) = super::broker();
    let t = super::unique(prefix);
    create_topic(&bs, &t, partitions, 1, &[]);
    (bs, t, logs)
}

fn produce(bootstrap: &str, topic: &str, from: u32, to: u32) {
    weir_testkit::peers::kafka::produce(bootstrap, topic, from.into(), to.into());
}

/// The group's committed offsets for `topic` partitions 0..n (None = nothing committed).
fn committed(bootstrap: &str, group: &str, topic: &str, n: i32) -> Vec<Option<i64>> {
    committed_offsets(bootstrap, group, topic, n).expect("the group coordinator answers")
}

struct Running {
    trigger: weir_receiver::ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), weir_receiver::ReceiverError>>,
}

fn start(r: KafkaReceiver, host: &Arc<RecordingHost>, name: &str) -> Running {
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new(name, host.clone(), shutdown, 0);
    let task = tokio::spawn(async move { r.run(ctx).await });
    Running { trigger, task }
}

impl Running {
    async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("receiver stops")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_only_after_the_records_are_durable() {
    let (bs, t1, _logs) = topic("t1", 1);
    produce(&bs, &t1, 0, 100);
    let host = RecordingHost::holding();
    let r = KafkaReceiver::new(config(&bs, &format!("{t1}-g1"), &t1)).unwrap();
    let stats = r.stats();
    let running = start(r, &host, "kafka");
    // Wait until the receiver has taken the records (their stores are held, not durable), and
    // give it several commit intervals.
    wait_until_async("the poll", Duration::from_secs(30), || {
        stats.records.load(SeqCst) == 100
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(host.durable_count(), 0);
    assert_eq!(
        committed(&bs, &format!("{t1}-g1"), &t1, 1),
        vec![None],
        "committed before durable"
    );
    host.release_all();
    wait_until_async("100 durable", Duration::from_secs(30), || {
        host.durable_count() == 100
    })
    .await;
    wait_until_async("the commit", Duration::from_secs(30), || {
        committed(&bs, &format!("{t1}-g1"), &t1, 1) == vec![Some(100)]
    })
    .await;
    running.stop().await;
    let p = host.durable();
    assert_eq!(p, (0..100).map(|i| format!("m{i}")).collect::<Vec<_>>());
    let r0 = &host.durable_records()[0];
    assert_eq!(r0.key.as_deref(), Some(&b"k0"[..]));
    assert_eq!(r0.position.as_ref().unwrap().offset, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_after_the_wal_not_the_committed_offset() {
    let (bs, t2, _logs) = topic("t2", 2);
    produce(&bs, &t2, 0, 60);
    let host = RecordingHost::new();
    let running = start(
        KafkaReceiver::new(config(&bs, &format!("{t2}-g2"), &t2)).unwrap(),
        &host,
        "kafka",
    );
    wait_until_async("60 stored", Duration::from_secs(30), || {
        host.durable_count() == 60
    })
    .await;
    running.stop().await;
    // A new group has no committed offsets (as after a crash between durable and commit): the
    // receiver must resume after what the host (the WAL) already has.
    produce(&bs, &t2, 60, 100);
    let running = start(
        KafkaReceiver::new(config(&bs, &format!("{t2}-g2-new"), &t2)).unwrap(),
        &host,
        "kafka",
    );
    wait_until_async("100 stored", Duration::from_secs(30), || {
        host.durable_count() >= 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;
    let mut p = host.durable();
    p.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
    assert_eq!(
        p,
        (0..100).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "a record stored twice or lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_in_one_group_split_partitions_without_losing_records() {
    let (bs, t3, _logs) = topic("t3", 4);
    produce(&bs, &t3, 0, 400);
    let (a, b) = (RecordingHost::new(), RecordingHost::new());
    let ra = start(
        KafkaReceiver::new(config(&bs, &format!("{t3}-g3"), &t3)).unwrap(),
        &a,
        "a",
    );
    wait_until_async("a's first records", Duration::from_secs(30), || {
        a.durable_count() >= 400
    })
    .await;
    let rb = start(
        KafkaReceiver::new(config(&bs, &format!("{t3}-g3"), &t3)).unwrap(),
        &b,
        "b",
    );
    // Wait until b owns some partitions, then produce more.
    tokio::time::sleep(Duration::from_secs(6)).await;
    produce(&bs, &t3, 400, 800);
    let all = || {
        let mut m: BTreeMap<String, u32> = BTreeMap::new();
        for p in a.durable().into_iter().chain(b.durable()) {
            *m.entry(p).or_default() += 1;
        }
        m
    };
    wait_until_async("800 distinct records", Duration::from_secs(60), || {
        all().len() == 800
    })
    .await;
    assert!(
        b.durable_count() > 0,
        "the second consumer got no partition"
    );
    let partitions_of = |h: &RecordingHost| {
        let mut s = std::collections::BTreeSet::new();
        for r in h.durable_records().iter().skip(400) {
            s.insert(r.position.as_ref().unwrap().partition);
        }
        s
    };
    let (pa, pb) = (partitions_of(&a), partitions_of(&b));
    assert!(
        pa.is_disjoint(&pb),
        "after the rebalance both stored from {:?}",
        pa.intersection(&pb).collect::<Vec<_>>()
    );
    ra.stop().await;
    rb.stop().await;
}
