//! The reliable consumer's configuration checks (no broker needed), and a fault a real broker
//! cannot be made to show on demand (a refused offset commit, from librdkafka's mock cluster).
//! Its behaviour against a real broker is in `tests/real_kafka/consumer.rs`.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use weir_kafka::{KafkaConfig, KafkaReceiver};
use weir_receiver::{shutdown_channel, Receiver, ReceiverContext};
use weir_testkit::peers::kafka::committed_offsets;
use weir_testkit::{wait_until_async, RecordingHost};

#[test]
fn bad_configurations_name_the_key() {
    let mut c = KafkaConfig::new("", "g", &["t"]);
    assert!(KafkaReceiver::new(c.clone())
        .unwrap_err()
        .contains("bootstrap_servers"));
    c.bootstrap_servers = "127.0.0.1:1".into();
    c.group_id = " ".into();
    assert!(KafkaReceiver::new(c.clone())
        .unwrap_err()
        .contains("group_id"));
    c.group_id = "g".into();
    c.topics.clear();
    assert!(KafkaReceiver::new(c.clone())
        .unwrap_err()
        .contains("topics"));
    c.topics = vec!["t".into()];
    c.properties
        .insert("enable.auto.commit".into(), "true".into());
    assert!(KafkaReceiver::new(c)
        .unwrap_err()
        .contains("enable.auto.commit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_commit_the_group_refuses_is_counted_and_sent_again() {
    // Never dropped: should the test fail, the receiver still stopping must find its broker.
    let cluster: &'static MockCluster<_> = Box::leak(Box::new(MockCluster::new(1).unwrap()));
    cluster.create_topic("events", 1, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    weir_testkit::peers::kafka::produce(&bs, "events", 0, 10);
    // The group refuses the next two offset commits (an error librdkafka does not retry).
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 2],
    );
    let mut c = KafkaConfig::new(&bs, "g", &["events"]);
    c.commit_interval_ms = 100;
    let r = KafkaReceiver::new(c).unwrap();
    let stats = r.stats();
    let host = RecordingHost::new();
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("kafka", host.clone(), shutdown, 0);
    let task = tokio::spawn(async move { r.run(ctx).await });
    // Should an assertion fail, the receiver is asked to stop (its poll thread would otherwise
    // keep the test's runtime from shutting down).
    struct StopOnDrop(weir_receiver::ShutdownTrigger);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.trigger();
        }
    }
    let stop = StopOnDrop(trigger);
    wait_until_async("10 durable", Duration::from_secs(30), || {
        host.durable_count() == 10
    })
    .await;
    // No new records arrive: only a re-sent commit can bring the group to offset 10.
    wait_until_async("the group's offset at 10", Duration::from_secs(30), || {
        committed_offsets(&bs, "g", "events", 1) == Some(vec![Some(10)])
    })
    .await;
    assert!(
        stats.commit_failures.load(SeqCst) >= 1,
        "the refused commits were not counted"
    );
    drop(stop);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("receiver stops")
        .unwrap()
        .unwrap();
}
