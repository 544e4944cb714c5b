//! The Kafka connector against a real Apache Kafka 4 broker (KRaft), started once for this test
//! binary from the jars `interop/fetch` resolves (`weir_testkit::peers::kafka`). Every test here
//! is named `real_kafka::...`: `cargo test -- --skip real_` leaves them out.

mod real_kafka {
    mod consumer;
    mod direct;
    mod errors;
    mod output;

    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    use weir_kafka::KafkaConfig;
    use weir_testkit::peers::kafka::{self, KafkaCluster};
    use weir_testkit::peers::LogsOnFailure;

    /// The shared broker, its bootstrap address, and a guard that keeps its logs if the test
    /// fails.
    pub fn broker() -> (&'static KafkaCluster, String, LogsOnFailure) {
        let k = kafka::shared();
        (k, k.bootstrap(), k.logs_on_failure())
    }

    /// A reliable consumer of `topic` in `group` that commits every 100 ms and notices a lost
    /// member within 6 s.
    pub fn config(bootstrap: &str, group: &str, topic: &str) -> KafkaConfig {
        let mut c = KafkaConfig::new(bootstrap, group, &[topic]);
        c.commit_interval_ms = 100;
        c.properties
            .insert("session.timeout.ms".into(), "6000".into());
        c.properties
            .insert("heartbeat.interval.ms".into(), "300".into());
        c
    }

    /// A topic name no other test of this binary uses.
    pub fn unique(prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, SeqCst))
    }
}
