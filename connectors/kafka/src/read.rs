//! Reading a whole topic: every partition from its beginning until the consumer reports its
//! end. The exactly-once output reads its batches topic this way; the crash harness reads a
//! destination topic with it.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};

/// Calls `f` with every record of `topic`, partition by partition in offset order, from the
/// beginning to the end each partition had when it was reached (a consumer's end-of-partition
/// event). `client` holds the connection settings, `group.id` (no offsets are committed) and
/// `isolation.level`; metadata and offset requests wait at most `request_timeout` each, and
/// the whole read at most `deadline`. A topic without records (or without partitions) calls
/// `f` never.
///
/// # Errors
/// A message naming the step and the topic: the consumer could not be created, metadata or
/// offsets could not be read, a fetch failed, the deadline passed, or `f` refused a record.
pub fn read_to_end(
    client: &ClientConfig,
    topic: &str,
    request_timeout: Duration,
    deadline: Duration,
    f: &mut dyn FnMut(&BorrowedMessage<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let t0 = Instant::now();
    let mut config = client.clone();
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| format!("creating a reader of {topic}: {e}"))?;
    let meta = consumer
        .fetch_metadata(Some(topic), request_timeout)
        .map_err(|e| format!("reading the metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = meta
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut assignment = TopicPartitionList::new();
    let mut open = 0;
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, request_timeout)
            .map_err(|e| format!("reading the offsets of {topic} partition {p}: {e}"))?;
        if high > low {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| format!("assigning {topic}: {e}"))?;
            open += 1;
        }
    }
    if open == 0 {
        return Ok(());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning {topic}: {e}"))?;
    while open > 0 {
        if t0.elapsed() > deadline {
            return Err(format!(
                "reading {topic} did not reach its end within {} ms",
                deadline.as_millis()
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
            Some(Ok(m)) => f(&m)?,
        }
    }
    Ok(())
}
