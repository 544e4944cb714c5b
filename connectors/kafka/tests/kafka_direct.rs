//! Kafka direct mode against librdkafka's mock cluster, for what a real broker cannot show
//! cheaply: a read of a range the topic does not have, and configuration refusals. Batches
//! through the engine, a crash and retention run against the real broker
//! (`tests/real_kafka/direct.rs`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use weir::receiver::{DirectSource, OffsetRange};
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
