//! What a user is told when Kafka is not where the configuration says, a topic does not exist, or
//! the broker requires authentication: the receiver reports a clear error (and keeps trying, as
//! the broker may come back), the output fails the batch with the reason.

use std::time::Duration;

use weir_kafka::{KafkaConfig, KafkaOutput, KafkaOutputConfig, KafkaReceiver};
use weir_receiver::{shutdown_channel, Receiver, ReceiverContext};
use weir_testkit::peers::kafka::{create_topic, produce};
use weir_testkit::{free_port, wait_until_async, RecordingHost};

/// Runs a receiver until it has reported an error that satisfies `want`, then stops it; returns
/// the errors reported.
async fn first_errors(config: KafkaConfig, want: impl Fn(&str) -> bool) -> Vec<String> {
    let host = RecordingHost::new();
    let r = KafkaReceiver::new(config).unwrap();
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("kafka", host.clone(), shutdown, 0);
    let task = tokio::spawn(async move { r.run(ctx).await });
    let h = host.clone();
    wait_until_async("the error", Duration::from_secs(60), move || {
        h.errors().iter().any(|e| want(e))
    })
    .await;
    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the receiver stops");
    assert_eq!(host.durable_count(), 0);
    host.errors()
}

fn config(bootstrap: &str, topic: &str) -> KafkaConfig {
    super::config(bootstrap, &format!("{topic}-g"), topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bootstrap_is_reported_with_its_address() {
    let addr = format!("127.0.0.1:{}", free_port());
    let errors = first_errors(config(&addr, "t"), |e| {
        e.contains(&addr) && e.contains("Connection refused")
    })
    .await;
    eprintln!("reported: {errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("cannot reach the Kafka brokers")),
        "{errors:?}"
    );
    assert!(
        errors.len() < 10,
        "the same error reported again and again: {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_is_reported_by_name() {
    let (_, bs, _logs) = super::broker();
    let topic = super::unique("missing");
    let errors = first_errors(config(&bs, &topic), |e| e.contains(&topic)).await;
    eprintln!("reported: {errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("does not exist") && e.contains("Unknown topic")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_authentication_is_reported_and_credentials_work() {
    let (k, bs, _logs) = super::broker();
    let sasl = k.sasl_bootstrap();
    let topic = super::unique("sasl");
    create_topic(&bs, &topic, 1, 1, &[]);
    produce(&bs, &topic, 0, 10);

    // No credentials at all: the broker closes the connection.
    let errors = first_errors(config(&sasl, &topic), |e| e.contains(&sasl)).await;
    eprintln!("without credentials: {errors:?}");

    // A wrong password: the broker's answer is passed on.
    let mut c = config(&sasl, &topic);
    for (k, v) in [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanisms", "PLAIN"),
        ("sasl.username", "weir"),
        ("sasl.password", "wrong"),
    ] {
        c.properties.insert(k.into(), v.into());
    }
    let errors = first_errors(c.clone(), |e| e.contains("Authentication failed")).await;
    eprintln!("wrong password: {errors:?}");

    // The right one: the records arrive.
    c.properties
        .insert("sasl.password".into(), "weir-secret".into());
    let host = RecordingHost::new();
    let r = KafkaReceiver::new(c).unwrap();
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("kafka", host.clone(), shutdown, 0);
    let task = tokio::spawn(async move { r.run(ctx).await });
    let h = host.clone();
    wait_until_async("10 records over SASL", Duration::from_secs(60), move || {
        h.durable_count() == 10
    })
    .await;
    trigger.trigger();
    task.await.unwrap().unwrap();
}

#[test]
fn the_output_fails_a_batch_for_an_unknown_topic_or_an_unreachable_broker_with_the_reason() {
    let (_, bs, _logs) = super::broker();
    let topic = super::unique("no-such-output");
    let mut c = KafkaOutputConfig::new(&bs, &topic);
    c.delivery_timeout_ms = 5000;
    let out = KafkaOutput::new(c).unwrap();
    let e = out
        .send_all(&[weir_receiver::Record::new("x")])
        .unwrap_err()
        .to_string();
    eprintln!("unknown topic: {e}");
    assert!(e.contains(&topic) && e.contains("Unknown topic"), "{e}");

    let addr = format!("127.0.0.1:{}", free_port());
    let mut c = KafkaOutputConfig::new(&addr, "t");
    c.delivery_timeout_ms = 3000;
    let out = KafkaOutput::new(c).unwrap();
    let e = out
        .send_all(&[weir_receiver::Record::new("x")])
        .unwrap_err()
        .to_string();
    eprintln!("unreachable: {e}");
    assert!(e.contains(&addr) && e.contains("refused"), "{e}");
}
