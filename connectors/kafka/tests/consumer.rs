//! The reliable consumer's configuration checks (no broker needed). Its behaviour against a real
//! broker is in `tests/real_kafka/consumer.rs`.

use weir_kafka::{KafkaConfig, KafkaReceiver};

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
