//! Direct mode: Spark's "direct approach" for Kafka.
//!
//! No consumer-group membership and no WAL: at every batch the engine asks
//! [`KafkaDirectSource::plan`] for offset ranges (from where the previous batch ended to the
//! partition's high watermark, at most `max_records_per_partition`), records them in its tracker
//! before processing, and reads exactly those ranges with [`KafkaDirectSource::read`] — again
//! after a crash, because Kafka itself is the log. Offsets of completed batches are committed
//! back to `group_id` for monitoring tools (`commit_offsets`), never read back except to choose
//! where a partition never seen before starts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use weir_receiver::{Checkpoint, DirectSource, OffsetRange, ReceiverError, Record};

use crate::{lock, to_record, KafkaConfig, KafkaMode};

/// How long one metadata, watermark or commit request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters of a [`KafkaDirectSource`].
#[derive(Debug, Default)]
pub struct DirectStats {
    /// Records read from ranges (again when a batch is re-run).
    pub records: AtomicU64,
    /// Payload bytes read.
    pub bytes: AtomicU64,
    /// Offset commits back to the group that succeeded.
    pub commits: AtomicU64,
    /// Offset commits back to the group that failed (the next batch commits again).
    pub commit_failures: AtomicU64,
    /// Offsets skipped because Kafka had deleted them (retention) before a batch took them.
    pub offsets_skipped: AtomicU64,
    /// Per (topic, partition): high watermark minus the end of the last planned range.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
}

/// The direct-mode Kafka source. See the [module documentation](self).
pub struct KafkaDirectSource {
    config: KafkaConfig,
    /// Metadata, watermarks, committed offsets and commits.
    admin: BaseConsumer,
    /// Reads ranges (assigned per read, never subscribed).
    reader: Mutex<BaseConsumer>,
    stats: Arc<DirectStats>,
    start_at_end: bool,
}

impl std::fmt::Debug for KafkaDirectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDirectSource")
            .field("topics", &self.config.topics)
            .field("group_id", &self.config.group_id)
            .finish_non_exhaustive()
    }
}

fn kafka_err(what: impl Into<String>) -> impl FnOnce(KafkaError) -> ReceiverError {
    let what = what.into();
    move |e| ReceiverError::context(what, e)
}

impl KafkaDirectSource {
    /// A direct source for `config` (its `mode` is taken to be `direct`).
    ///
    /// # Errors
    /// The validation message naming the key, or why a Kafka client could not be created.
    pub fn new(mut config: KafkaConfig) -> Result<Self, String> {
        config.mode = KafkaMode::Direct;
        config.validate()?;
        let reset = config
            .properties
            .get("auto.offset.reset")
            .map_or("earliest", String::as_str);
        let start_at_end = match reset {
            "earliest" | "smallest" | "beginning" => false,
            "latest" | "largest" | "end" => true,
            other => {
                return Err(format!(
                "properties.\"auto.offset.reset\" = {other:?}: direct mode takes earliest or latest"
            ))
            }
        };
        let base = || {
            let mut c = crate::consumer_defaults();
            for (k, v) in &config.properties {
                c.set(k, v);
            }
            c.set("bootstrap.servers", &config.bootstrap_servers)
                .set("group.id", &config.group_id)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false");
            c
        };
        let admin: BaseConsumer = base()
            .create()
            .map_err(|e| format!("creating the Kafka client: {e}"))?;
        // A range that is no longer in Kafka must fail the read, not silently jump elsewhere.
        let reader: BaseConsumer = base()
            .set("auto.offset.reset", "error")
            .create()
            .map_err(|e| format!("creating the Kafka client: {e}"))?;
        Ok(KafkaDirectSource {
            config,
            admin,
            reader: Mutex::new(reader),
            stats: Arc::default(),
            start_at_end,
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<DirectStats> {
        self.stats.clone()
    }

    fn partitions(&self, topic: &str) -> Result<Vec<i32>, ReceiverError> {
        let md = self
            .admin
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(kafka_err(format!("metadata of topic {topic:?}")))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| ReceiverError::msg(format!("topic {topic:?} is not in the metadata")))?;
        if let Some(e) = t.error() {
            return Err(ReceiverError::msg(format!("topic {topic:?}: {e:?}")));
        }
        let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ps.sort_unstable();
        Ok(ps)
    }

    /// The group's committed offset of each partition that has one.
    fn committed(&self, topic: &str, partitions: &[i32]) -> HashMap<i32, i64> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        match self.admin.committed_offsets(tpl, REQUEST_TIMEOUT) {
            Ok(c) => c
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some((e.partition(), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(topic, error = %e, "reading the group's committed offsets failed; new partitions start by auto.offset.reset");
                HashMap::new()
            }
        }
    }
}

impl DirectSource for KafkaDirectSource {
    fn plan(&self, position: &Checkpoint) -> Result<Vec<OffsetRange>, ReceiverError> {
        let mut out = Vec::new();
        let mut lag = BTreeMap::new();
        for topic in &self.config.topics {
            let partitions = self.partitions(topic)?;
            let new: Vec<i32> = partitions
                .iter()
                .copied()
                .filter(|p| position.get(topic, *p).is_none())
                .collect();
            let committed = if new.is_empty() {
                HashMap::new()
            } else {
                self.committed(topic, &new)
            };
            let stream: Arc<str> = Arc::from(topic.as_str());
            for p in partitions {
                let (low, high) = self
                    .admin
                    .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                    .map_err(kafka_err(format!("watermarks of {topic}[{p}]")))?;
                let (low, high) = (low.max(0) as u64, high.max(0) as u64);
                let mut from = match position.get(topic, p) {
                    Some(last) => last + 1,
                    None => match committed.get(&p) {
                        Some(c) => *c as u64,
                        None if self.start_at_end => high,
                        None => low,
                    },
                };
                if from < low {
                    self.stats.offsets_skipped.fetch_add(low - from, Relaxed);
                    tracing::error!(topic, partition = p, from, low, "offsets were deleted by Kafka's retention before any batch took them; skipping to the log start");
                    from = low;
                }
                let until = high.min(from.saturating_add(self.config.max_records_per_partition));
                lag.insert((topic.clone(), p), high as i64 - until.max(from) as i64);
                if until > from {
                    out.push(OffsetRange {
                        stream: stream.clone(),
                        partition: p,
                        from,
                        until,
                    });
                } else if from > high {
                    tracing::warn!(topic, partition = p, from, high, "the partition ends before the next offset to read (topic recreated or truncated?); waiting for it to catch up");
                }
            }
        }
        *lock(&self.stats.lag) = lag;
        Ok(out)
    }

    fn read(&self, ranges: &[OffsetRange]) -> Result<Vec<Vec<Record>>, ReceiverError> {
        let reader = lock(&self.reader);
        let mut out: Vec<Vec<Record>> = ranges
            .iter()
            .map(|r| Vec::with_capacity(r.len().min(1 << 20) as usize))
            .collect();
        let mut done: Vec<bool> = ranges.iter().map(OffsetRange::is_empty).collect();
        let mut index: HashMap<(&str, i32), usize> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for (i, r) in ranges.iter().enumerate() {
            if r.is_empty() {
                continue;
            }
            if index.insert((&*r.stream, r.partition), i).is_some() {
                return Err(ReceiverError::msg(format!(
                    "two ranges of {}[{}] in one read",
                    r.stream, r.partition
                )));
            }
            tpl.add_partition_offset(&r.stream, r.partition, Offset::Offset(r.from as i64))
                .map_err(kafka_err(format!("range {r}")))?;
        }
        if tpl.count() == 0 {
            return Ok(out);
        }
        reader
            .assign(&tpl)
            .map_err(kafka_err("assigning the ranges' partitions"))?;
        // Partitions paused when an earlier read finished them may keep that state.
        let _ = reader.resume(&tpl);
        let timeout = Duration::from_millis(self.config.read_timeout_ms);
        let mut progress = Instant::now();
        let mut checked = Instant::now();
        let result = loop {
            if done.iter().all(|d| *d) {
                break Ok(());
            }
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let Some(&i) = index.get(&(m.topic(), m.partition())) else {
                        continue;
                    };
                    let r = &ranges[i];
                    let off = m.offset().max(0) as u64;
                    if !done[i] && off >= r.from && off < r.until {
                        let rec = to_record(&m, r.stream.clone());
                        self.stats.records.fetch_add(1, Relaxed);
                        self.stats
                            .bytes
                            .fetch_add(rec.payload.len() as u64, Relaxed);
                        out[i].push(rec);
                        progress = Instant::now();
                    }
                    if off + 1 >= r.until && !done[i] {
                        done[i] = true;
                        let mut p = TopicPartitionList::new();
                        p.add_partition(&r.stream, r.partition);
                        let _ = reader.pause(&p);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(e)) => {
                    break Err(ReceiverError::msg(format!(
                        "reading {}: {e} (offsets no longer in Kafka cannot be re-read)",
                        ranges
                            .iter()
                            .filter(|r| !r.is_empty())
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
            // Offsets the log itself skips (compaction, transaction markers): the consumer's
            // position moves past the range's end without a record at `until - 1`.
            if checked.elapsed() > Duration::from_millis(200) {
                checked = Instant::now();
                if let Ok(pos) = reader.position() {
                    for (i, r) in ranges.iter().enumerate() {
                        if done[i] {
                            continue;
                        }
                        if let Some(Offset::Offset(o)) = pos
                            .find_partition(&r.stream, r.partition)
                            .map(|e| e.offset())
                        {
                            if o >= 0 && o as u64 >= r.until {
                                done[i] = true;
                                progress = Instant::now();
                            }
                        }
                    }
                }
            }
            if progress.elapsed() > timeout {
                let left: Vec<String> = ranges
                    .iter()
                    .zip(&done)
                    .filter(|(_, d)| !**d)
                    .map(|(r, _)| r.to_string())
                    .collect();
                break Err(ReceiverError::msg(format!(
                    "reading {}: no progress for {} ms",
                    left.join(", "),
                    timeout.as_millis()
                )));
            }
        };
        let _ = reader.unassign();
        result.map(|()| out)
    }

    fn completed(&self, ranges: &[OffsetRange]) {
        if !self.config.commit_offsets {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for r in ranges {
            let _ =
                tpl.add_partition_offset(&r.stream, r.partition, Offset::Offset(r.until as i64));
        }
        match self.admin.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Relaxed);
            }
            Err(e) => {
                self.stats.commit_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "committing a batch's offsets back to the group failed (monitoring only; the next batch commits again)");
            }
        }
    }
}
