//! The Kafka output against librdkafka's mock cluster, for the faults it can inject on demand: a
//! failed delivery is an error; a retry after the fault clears succeeds. Delivery of keys and
//! headers runs against the real broker (`tests/real_kafka/output.rs`).

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use weir_kafka::{KafkaOutput, KafkaOutputConfig, KafkaOutputError};
use weir_receiver::Record;
use weir_testkit::peers::kafka::read_all;

/// Records with payloads `<prefix>0`, `<prefix>1`, ...
fn records(prefix: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::new(format!("{prefix}{i}")))
        .collect()
}

/// Whether `topic` holds every payload `<prefix>0..n`.
fn holds(bootstrap: &str, topic: &str, prefix: &str, n: usize) -> bool {
    let seen = read_all(bootstrap, topic, false);
    (0..n).all(|i| seen.contains_key(format!("{prefix}{i}").as_bytes()))
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
    assert!(holds(&bs, "out", "during-", 20));
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
    assert!(holds(&bs, "out", "refused-", 3));
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
