//! Kafka direct mode through the engine against the real broker: ranges per batch, a crash
//! re-reads exactly the same ranges, each offset in one completed batch, offsets committed back to
//! the group; offsets deleted (as retention deletes them) before a batch took them are skipped
//! and counted.

use weir_testkit::peers::kafka::create_topic;
use weir_testkit::start;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir::receiver::DirectSource;
use weir::{ClockMode, StreamingConfig, StreamingContext};
use weir_kafka::{KafkaConfig, KafkaDirectSource};

const PARTITIONS: i32 = 3;

fn produce(bootstrap: &str, topic: &str, from: u32, to: u32) {
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
            let r = BaseRecord::to(topic)
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

fn source_config(bootstrap: &str, topic: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(bootstrap, &format!("{topic}-group"), &[topic]);
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
    topic: &str,
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
        KafkaDirectSource::new(source_config(bootstrap, topic)).unwrap(),
    );
    let topic: Arc<str> = Arc::from(topic);
    let (runs, fail) = (runs.clone(), fail.clone());
    ctx.foreach_batch("record", move |b| {
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        let recs = b
            .collect()?
            .iter()
            .map(|r| {
                let p = r.position.as_ref().unwrap();
                assert_eq!(p.stream, topic);
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

fn committed(bootstrap: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-group"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..PARTITIONS)
        .map(|p| match got.find_partition(topic, p).unwrap().offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_batches_reread_the_same_kafka_ranges_after_a_crash_and_commit_back() {
    let (_, bs, _logs) = super::broker();
    let topic = super::unique("direct");
    create_topic(&bs, &topic, PARTITIONS, 1, &[]);
    produce(&bs, &topic, 0, 300);
    let dir = tempfile::tempdir().unwrap();
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let fail = Arc::new(AtomicBool::new(false));

    let running = start(|| context(dir.path(), &bs, &topic, &runs, &fail)).await;
    let t1 = running.run_batch().await.unwrap();
    running.run_batch().await.unwrap();
    // 40 per partition per batch: the first two batches hold 240 records.
    let first_two: usize = runs.lock().unwrap().iter().map(|(_, r)| r.len()).sum();
    assert_eq!(first_two, 240);
    // Offsets of completed batches are committed back to the group (for monitoring).
    assert_eq!(committed(&bs, &topic), vec![80; PARTITIONS as usize]);
    // The third batch is allocated, its job fails; more records arrive; the node crashes.
    fail.store(true, SeqCst);
    let r = tokio::time::timeout(Duration::from_millis(500), running.run_batch()).await;
    assert!(r.is_err(), "the failing batch must not complete");
    produce(&bs, &topic, 300, 390);
    drop(running);

    fail.store(false, SeqCst);
    let running = start(|| context(dir.path(), &bs, &topic, &runs, &fail)).await;
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
    assert_eq!(committed(&bs, &topic), vec![130; PARTITIONS as usize]);
}

#[test]
fn offsets_deleted_before_a_batch_took_them_are_skipped_and_counted() {
    let (_, bs, _logs) = super::broker();
    let topic = super::unique("retention");
    create_topic(&bs, &topic, 1, 1, &[]);
    produce_one_partition(&bs, &topic, 0, 100);
    let mut c = source_config(&bs, &topic);
    c.max_records_per_partition = 40;
    let s = KafkaDirectSource::new(c).unwrap();
    let mut checkpoint = weir::Checkpoint::new();
    let plan = s.plan(&checkpoint).unwrap();
    assert_eq!((plan[0].from, plan[0].until), (0, 40), "{plan:?}");
    let first = s.read(&plan).unwrap();
    assert_eq!(first[0].len(), 40);
    checkpoint.raise(Arc::from(topic.as_str()), 0, 39);

    // Offsets 0..100 go, as retention removes them: the log start moves to 100 (DeleteRecords
    // moves it at once, where time-based retention would take seconds and roll segments).
    produce_one_partition(&bs, &topic, 100, 110);
    delete_records_below(&bs, &topic, 100);
    let watermarks = || {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bs)
            .create()
            .unwrap();
        probe
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .unwrap()
    };
    let low = || watermarks().0;
    weir_testkit::wait_until("the log start to move", Duration::from_secs(60), || {
        low() >= 100
    });
    let plan = s.plan(&checkpoint).unwrap();
    assert_eq!(
        plan.iter().map(|r| (r.from, r.until)).collect::<Vec<_>>(),
        vec![(100, 110)],
        "watermarks {:?}; the plan skips to the log start: {plan:?}",
        watermarks(),
    );
    assert_eq!(s.stats().offsets_skipped.load(SeqCst), 60);
    let second = s.read(&plan).unwrap();
    let payloads: Vec<String> = second[0]
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        (100..110).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

fn delete_records_below(bootstrap: &str, topic: &str, offset: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = rt
        .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
        .expect("delete_records");
    for e in done.elements() {
        assert!(e.error().is_ok(), "{e:?}");
    }
}

fn produce_one_partition(bootstrap: &str, topic: &str, from: u32, to: u32) {
    weir_testkit::peers::kafka::produce(bootstrap, topic, from.into(), to.into());
}
