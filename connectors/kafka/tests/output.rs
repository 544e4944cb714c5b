//! The Kafka output against librdkafka's mock cluster, for the faults it can inject on demand: a
//! failed delivery is an error; a retry after the fault clears succeeds. Delivery of keys and
//! headers runs against the real broker (`tests/real_kafka/output.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir_kafka::{KafkaOutput, KafkaOutputConfig, KafkaOutputError};
use weir_receiver::Record;

/// What a consumer read back: payload -> (key, headers).
type Seen = BTreeMap<String, (Option<String>, Vec<(String, String)>)>;

/// Reads `topic` (partitions 0..n) from the beginning until `want` records or 20 s.
fn consume(bootstrap: &str, topic: &str, partitions: i32, want: usize) -> (Seen, usize) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut seen = Seen::new();
    let mut total = 0;
    let t0 = Instant::now();
    while total < want && t0.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            total += 1;
            let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), text(h.value).unwrap()))
                        .collect()
                })
                .unwrap_or_default();
            seen.insert(text(m.payload()).unwrap(), (text(m.key()), headers));
        }
    }
    (seen, total)
}

fn records(prefix: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let r = Record::new(format!("{prefix}{i}"));
            // Every third record has no key; every record has headers, some two.
            let r = if i % 3 == 0 {
                r
            } else {
                r.with_key(format!("k{i}"))
            };
            let r = r.with_header("n", i.to_string());
            if i % 2 == 0 {
                r.with_header("even", "yes")
            } else {
                r
            }
        })
        .collect()
}

#[test]
fn a_broker_that_is_down_fails_the_batch_within_the_timeout_and_a_retry_succeeds() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("out", 2, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    let mut config = KafkaOutputConfig::new(&bs, "out");
    config.delivery_timeout_ms = 1000;
    // Reconnect quickly once the broker is back (librdkafka backs off up to 10 s by default).
    config
        .properties
        .insert("reconnect.backoff.max.ms".into(), "200".into());
    let output = KafkaOutput::new(config).unwrap();
    // The producer works (and knows the topic) before the fault. The 1 s delivery timeout also
    // covers connecting and the idempotent producer's id: on a loaded machine the first attempt
    // may time out, as it would in the engine, which retries the batch.
    let t0 = Instant::now();
    loop {
        match output.send_all(&records("before-", 10)) {
            Ok(n) => {
                assert_eq!(n, 10);
                break;
            }
            Err(e) => assert!(
                t0.elapsed() < Duration::from_secs(20),
                "never delivered: {e}"
            ),
        }
    }
    let failed_before = output.stats().batches_failed;

    cluster.broker_down(1).unwrap();
    let batch = records("during-", 20);
    let t0 = Instant::now();
    let e = output.send_all(&batch).unwrap_err();
    let took = t0.elapsed();
    eprintln!("broker down: {e} (after {took:?})");
    assert!(
        matches!(
            e,
            KafkaOutputError::Delivery { .. } | KafkaOutputError::Timeout { .. }
        ),
        "{e}"
    );
    assert!(took < Duration::from_secs(6), "failed only after {took:?}");
    assert_eq!(output.stats().batches_failed, failed_before + 1);

    cluster.broker_up(1).unwrap();
    // The engine retries the batch until it succeeds; so do we.
    let t0 = Instant::now();
    let delivered = loop {
        match output.send_all(&batch) {
            Ok(n) => break n,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(20), "no recovery: {e}");
            }
        }
    };
    assert_eq!(delivered, 20);
    let (seen, _) = consume(&bs, "out", 2, 30);
    for i in 0..20 {
        assert!(seen.contains_key(&format!("during-{i}")), "during-{i}");
    }
}

#[test]
fn a_produce_error_from_the_broker_fails_the_batch_and_a_retry_succeeds() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("out", 1, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    let mut config = KafkaOutputConfig::new(&bs, "out");
    config.delivery_timeout_ms = 2000;
    let output = KafkaOutput::new(config).unwrap();
    assert_eq!(output.send_all(&records("before-", 5)).unwrap(), 5);

    // The broker refuses the next produce requests with a permanent error.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 5],
    );
    let batch = records("refused-", 3);
    let e = output.send_all(&batch).unwrap_err();
    eprintln!("refused: {e}");
    assert!(
        matches!(
            e,
            KafkaOutputError::Delivery { .. } | KafkaOutputError::Fatal { .. }
        ),
        "{e}"
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);

    let t0 = Instant::now();
    loop {
        match output.send_all(&batch) {
            Ok(n) => {
                assert_eq!(n, 3);
                break;
            }
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(20), "no recovery: {e}"),
        }
    }
    let (seen, _) = consume(&bs, "out", 1, 8);
    assert!((0..3).all(|i| seen.contains_key(&format!("refused-{i}"))));
}

#[test]
fn a_bad_property_is_refused_when_the_output_is_built() {
    let mut config = KafkaOutputConfig::new("127.0.0.1:1", "out");
    config
        .properties
        .insert("linger.ms".into(), "not a number".into());
    let e = KafkaOutput::new(config).unwrap_err().to_string();
    assert!(e.contains("linger.ms"), "{e}");
    let mut config = KafkaOutputConfig::new("127.0.0.1:1", "out");
    config
        .properties
        .insert("enable.idempotence".into(), "false".into());
    let e = KafkaOutput::new(config).unwrap_err().to_string();
    assert!(e.contains("enable.idempotence"), "{e}");
}
