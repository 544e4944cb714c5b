//! Kafka direct mode through the engine, against librdkafka's mock cluster (a real Kafka
//! protocol endpoint on loopback): ranges per batch, a crash re-reads exactly the same ranges,
//! each offset in one completed batch, offsets committed back to the group.

use weir_testkit::start;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir::receiver::{DirectSource, OffsetRange};
use weir::{ClockMode, StreamingConfig, StreamingContext};
use weir_kafka::{KafkaConfig, KafkaDirectSource};

const PARTITIONS: i32 = 3;

fn produce(bootstrap: &str, from: u32, to: u32) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for i in from..to {
        let payload = format!("m{i}");
        let key = format!("k{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "n",
            value: Some(&payload),
        });
        loop {
            let r = BaseRecord::to("events")
                .payload(&payload)
                .key(&key)
                .headers(headers.clone())
                .partition(i as i32 % PARTITIONS);
            match p.send(r) {
                Ok(()) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

fn source_config(bootstrap: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(bootstrap, "direct-group", &["events"]);
    c.max_records_per_partition = 40;
    c.read_timeout_ms = 5000;
    c
}

/// A record as (partition, offset, payload, key, first header's value).
type Rec = (i32, u64, String, String, String);
/// One run of one batch: its time and its records.
type Run = (u64, Vec<Rec>);

fn context(
    dir: &std::path::Path,
    bootstrap: &str,
    runs: &Arc<Mutex<Vec<Run>>>,
    fail: &Arc<AtomicBool>,
) -> StreamingContext {
    let config = StreamingConfig {
        clock: ClockMode::Manual,
        batch_interval_ms: 50,
        job_retry_initial_ms: 20,
        ..StreamingConfig::default()
    };
    let mut ctx = StreamingContext::new(config, dir);
    ctx.add_direct_source(
        "events",
        KafkaDirectSource::new(source_config(bootstrap)).unwrap(),
    );
    let (runs, fail) = (runs.clone(), fail.clone());
    ctx.foreach_batch("record", move |b| {
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        let recs = b
            .collect()?
            .iter()
            .map(|r| {
                let p = r.position.as_ref().unwrap();
                assert_eq!(&*p.stream, "events");
                (
                    p.partition,
                    p.offset,
                    text(&r.payload),
                    text(r.key.as_deref().unwrap_or_default()),
                    r.headers.first().map_or(String::new(), |h| text(&h.value)),
                )
            })
            .collect();
        runs.lock().unwrap().push((b.time(), recs));
        if fail.load(SeqCst) {
            return Err("failing on purpose".into());
        }
        Ok(())
    });
    ctx
}

fn committed(bootstrap: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "direct-group")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition("events", p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..PARTITIONS)
        .map(
            |p| match got.find_partition("events", p).unwrap().offset() {
                Offset::Offset(o) => o,
                _ => -1,
            },
        )
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_batches_reread_the_same_kafka_ranges_after_a_crash_and_commit_back() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", PARTITIONS, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    produce(&bs, 0, 300);
    let dir = tempfile::tempdir().unwrap();
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let fail = Arc::new(AtomicBool::new(false));

    let running = start(|| context(dir.path(), &bs, &runs, &fail)).await;
    let t1 = running.run_batch().await.unwrap();
    running.run_batch().await.unwrap();
    // 40 per partition per batch: the first two batches hold 240 records.
    let first_two: usize = runs.lock().unwrap().iter().map(|(_, r)| r.len()).sum();
    assert_eq!(first_two, 240);
    // Offsets of completed batches are committed back to the group (for monitoring).
    assert_eq!(committed(&bs), vec![80; PARTITIONS as usize]);
    // The third batch is allocated, its job fails; more records arrive; the node crashes.
    fail.store(true, SeqCst);
    let r = tokio::time::timeout(Duration::from_millis(500), running.run_batch()).await;
    assert!(r.is_err(), "the failing batch must not complete");
    produce(&bs, 300, 390);
    drop(running);

    fail.store(false, SeqCst);
    let running = start(|| context(dir.path(), &bs, &runs, &fail)).await;
    for _ in 0..3 {
        running.run_batch().await.unwrap();
    }
    running.stop().await.unwrap();

    let runs = runs.lock().unwrap().clone();
    // The third batch time (after t1 and the second) is the one that failed.
    let mut times: Vec<u64> = runs.iter().map(|(t, _)| *t).collect();
    times.dedup();
    assert_eq!(times[0], t1);
    let failed = times[2];
    let attempts: Vec<&Vec<_>> = runs
        .iter()
        .filter(|(t, _)| *t == failed)
        .map(|(_, r)| r)
        .collect();
    assert!(attempts.len() >= 2, "the batch re-ran after the crash");
    assert!(attempts.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        attempts[0].len(),
        60,
        "offsets [80, 100) of each partition, as planned before the crash"
    );

    let mut last: BTreeMap<u64, Vec<Rec>> = BTreeMap::new();
    for (t, r) in runs {
        last.insert(t, r);
    }
    let mut all: Vec<_> = last.into_values().flatten().collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, all.len(), "no record in two completed batches");
    assert_eq!(n, 390, "every record produced is in a completed batch");
    for (p, off, payload, key, header) in &all {
        let i: u32 = payload[1..].parse().unwrap();
        assert_eq!(i as i32 % PARTITIONS, *p);
        assert_eq!(u64::from(i) / PARTITIONS as u64, *off);
        assert_eq!(key, &format!("k{i}"));
        assert_eq!(header, payload);
    }
    assert_eq!(committed(&bs), vec![130; PARTITIONS as usize]);
}

#[test]
fn reading_a_range_the_topic_does_not_have_fails_after_the_timeout() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", PARTITIONS, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    produce(&bs, 0, 30);
    let mut c = source_config(&bs);
    c.read_timeout_ms = 500;
    let s = KafkaDirectSource::new(c).unwrap();
    let plan = s.plan(&weir::Checkpoint::new()).unwrap();
    assert_eq!(plan.len(), 3);
    assert!(
        plan.iter().all(|r| r.from == 0 && r.until == 10),
        "{plan:?}"
    );
    // The timeout also covers connecting: on a loaded machine the first read may need a retry,
    // as the engine would retry it.
    let read_with_retries = |ranges: &[OffsetRange]| {
        let mut last = None;
        for _ in 0..20 {
            match s.read(ranges) {
                Ok(r) => return r,
                Err(e) => last = Some(e),
            }
        }
        panic!("never read {ranges:?}: {last:?}");
    };
    let read = read_with_retries(&plan);
    assert!(read.iter().all(|r| r.len() == 10));
    let beyond = OffsetRange {
        stream: Arc::from("events"),
        partition: 0,
        from: 5,
        until: 50,
    };
    let e = s.read(&[beyond]).unwrap_err().to_string();
    assert!(e.contains("events[0] 5..50: no progress for 500 ms"), "{e}");
    // The source still reads after a failed read.
    assert_eq!(read_with_retries(&plan[1..2])[0].len(), 10);
}

#[test]
fn direct_mode_refuses_a_topic_regex_and_an_unknown_reset_policy() {
    let mut c = KafkaConfig::new("127.0.0.1:1", "g", &[]);
    c.topic_regex = Some("ev.*".into());
    let e = KafkaDirectSource::new(c).unwrap_err();
    assert!(
        e.contains("topic_regex is not supported in direct mode"),
        "{e}"
    );
    let mut c = KafkaConfig::new("127.0.0.1:1", "g", &["events"]);
    c.properties
        .insert("auto.offset.reset".into(), "sideways".into());
    let e = KafkaDirectSource::new(c).unwrap_err();
    assert!(e.contains("auto.offset.reset"), "{e}");
}
