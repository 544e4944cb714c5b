//! The Kafka output against the real broker: every record of a batch arrives once, with its key
//! and headers, in a topic of several partitions. (The mock cluster's tests in `tests/output.rs`
//! inject the faults a real broker cannot show on demand.)

use std::collections::BTreeMap;

use rdkafka::message::{Headers, Message};
use weir_kafka::{KafkaOutput, KafkaOutputConfig};
use weir_receiver::Record;
use weir_testkit::peers::kafka::{create_topic, read_each};

/// What a consumer read back: payload -> (key, headers).
type Seen = BTreeMap<String, (Option<String>, Vec<(String, String)>)>;

/// Every record of `topic` up to its end, and how many there were (more than the map holds if
/// a payload came twice).
fn consume(bootstrap: &str, topic: &str) -> (Seen, usize) {
    let mut seen = Seen::new();
    let mut total = 0;
    read_each(bootstrap, topic, false, |m| {
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
    });
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
fn every_record_of_a_batch_arrives_once_with_its_key_and_headers() {
    let (_, bs, _logs) = super::broker();
    let topic = super::unique("out");
    create_topic(&bs, &topic, 3, 1, &[]);
    let output = KafkaOutput::new(KafkaOutputConfig::new(&bs, &topic)).unwrap();
    let batch = records("m", 5000);
    assert_eq!(output.send_all(&batch).unwrap(), 5000);
    let second = records("second-", 50);
    assert_eq!(output.send_all(&second).unwrap(), 50);
    let stats = output.stats();
    assert_eq!(
        (stats.batches_delivered, stats.records_delivered),
        (2, 5050)
    );
    assert_eq!(stats.batches_failed, 0);

    let (seen, total) = consume(&bs, &topic);
    assert_eq!(total, 5050, "every record exactly once");
    assert_eq!(seen.len(), 5050);
    for (i, r) in batch.iter().enumerate() {
        let payload = String::from_utf8(r.payload.to_vec()).unwrap();
        let (key, headers) = &seen[&payload];
        let want_key = (i % 3 != 0).then(|| format!("k{i}"));
        assert_eq!(key, &want_key, "{payload}");
        let mut want = vec![("n".to_string(), i.to_string())];
        if i % 2 == 0 {
            want.push(("even".into(), "yes".into()));
        }
        assert_eq!(headers, &want, "{payload}");
    }
}
