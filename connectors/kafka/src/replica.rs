//! The replica on a Kafka topic ([`KafkaReplica`], `[engine.replication] kind = "kafka"`; the
//! engine's side is `weir::replica`).
//!
//! - One topic per node, partition 0: records keyed by `node_id`, each with a header
//!   `weir-replica` saying what it is: `owner` (JSON: epoch and instance) or `entry i/n` (part i
//!   of an entry split into n records of at most 512 KiB, under the brokers' default
//!   `message.max.bytes`).
//! - The producer has `transactional.id = weir-replica-<node_id>`, `acks=all` and idempotence.
//!   An append is durable once its records are delivered (in the in-sync replicas); it does
//!   not wait for a commit. Appends go into a transaction that is committed in the background
//!   every [`COMMIT_EVERY`] (within `transaction.timeout.ms`), so a commit's round trips to the
//!   transaction coordinator are not on the acknowledgement path: one transaction per entry
//!   cost 60 ms per write on three brokers, against a few ms for the delivery.
//! - Taking over calls `init_transactions` with the same id, which fences the previous owner:
//!   the coordinator aborts its open transaction and its next write fails (`PRODUCER_FENCED`),
//!   so it acknowledges nothing more. The new owner reads the topic `read_uncommitted`: what
//!   the previous owner delivered is there whether its transaction was committed or aborted.
//!   An entry whose write failed half-way is skipped (it was never acknowledged); one written
//!   again after a failure is there twice, which rebuilding the state allows.
//! - The owner record is written at every take-over and again before a trim would delete the
//!   last one, so the topic always says who owns it.
//! - At start the topic is created if missing (`replication_factor` replicas,
//!   `min.insync.replicas = 2`, no retention by time or size) and checked: at least 2 replicas
//!   and `min.insync.replicas` ≥ 2 unless `allow_unreplicated`, and never compacted (every
//!   record has the same key: compaction would keep only the last).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use weir::replica::{KafkaReplicaConfig, Owner, Replica, ReplicaError, ReplicaFuture, TakenOver};

use crate::lock;

const HEADER: &str = "weir-replica";
const PART_MAX: usize = 512 << 10;
/// How long a transaction stays open before the background commit.
pub const COMMIT_EVERY: Duration = Duration::from_secs(30);
/// The producer's `transaction.timeout.ms` unless the properties set one.
const TRANSACTION_TIMEOUT_MS: u64 = 180_000;

/// The producer and its open transaction. One append (or commit) at a time.
struct Txn {
    producer: FutureProducer,
    /// When the open transaction began; `None` when none is open.
    open_since: tokio::sync::Mutex<Option<Instant>>,
}

/// A node's replica in a Kafka topic (see the module docs).
pub struct KafkaReplica {
    config: KafkaReplicaConfig,
    node_id: String,
    topic: String,
    txn: Mutex<Option<Arc<Txn>>>,
    epoch: AtomicU64,
    /// The offset of the last owner record written by this process.
    owner_at: AtomicU64,
}

impl std::fmt::Debug for KafkaReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn unavailable(what: &str) -> impl FnOnce(KafkaError) -> ReplicaError + '_ {
    move |e| ReplicaError::Unavailable(format!("{what}: {e}"))
}

fn join_error(e: tokio::task::JoinError) -> ReplicaError {
    ReplicaError::Unavailable(format!("a replica task failed: {e}"))
}

/// What a record of the topic is.
enum Kind {
    Owner,
    Part(u32, u32),
}

fn kind(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Kind> {
    let headers = m.headers()?;
    let h = headers.iter().find(|h| h.key == HEADER)?;
    let v = std::str::from_utf8(h.value?).ok()?;
    if v == "owner" {
        return Some(Kind::Owner);
    }
    let (i, n) = v.strip_prefix("entry ")?.split_once('/')?;
    Some(Kind::Part(i.parse().ok()?, n.parse().ok()?))
}

/// Joins an entry's parts (`entry i/n`) in offset order. A part out of turn means the entry
/// before it failed half-way (never acknowledged: it is dropped), or is the tail of such an
/// entry (skipped).
#[derive(Default)]
struct Assembler {
    parts: Vec<u8>,
    expect: u32,
    of: u32,
}

impl Assembler {
    /// Part `i` of `n`; the entry it completes, if any.
    fn push(&mut self, i: u32, n: u32, payload: &[u8]) -> Option<Bytes> {
        if i != self.expect || (i != 0 && n != self.of) {
            self.parts.clear();
            self.expect = 0;
        }
        if i != self.expect {
            return None;
        }
        self.parts.extend_from_slice(payload);
        self.expect += 1;
        self.of = n;
        if self.expect < n {
            return None;
        }
        self.expect = 0;
        Some(Bytes::from(std::mem::take(&mut self.parts)))
    }
}

/// Everything delivered to the topic for this node, in order.
struct Contents {
    owner: Option<Owner>,
    entries: Vec<Bytes>,
}

impl KafkaReplica {
    /// The replica `config` describes for `node_id`; connects nothing yet (the topic is checked
    /// when the node takes over).
    ///
    /// # Errors
    /// An invalid configuration.
    pub fn new(
        config: &KafkaReplicaConfig,
        node_id: &str,
    ) -> Result<Self, weir::receiver::ConfigError> {
        config.validate()?;
        Ok(KafkaReplica {
            topic: config.topic_for(node_id),
            config: config.clone(),
            node_id: node_id.to_string(),
            txn: Mutex::new(None),
            epoch: AtomicU64::new(0),
            owner_at: AtomicU64::new(0),
        })
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.config.bootstrap_servers);
        c
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// Creates the topic if missing, then checks it (see the module docs).
    async fn ensure_topic(&self) -> Result<(), ReplicaError> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(unavailable("creating an admin client"))?;
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout()));
        let probe: BaseConsumer = self
            .client_config()
            .create()
            .map_err(unavailable("creating a metadata client"))?;
        let (topic, timeout) = (self.topic.clone(), self.timeout());
        let (probe, meta) = tokio::task::spawn_blocking(move || {
            let m = probe.fetch_metadata(Some(&topic), timeout);
            (probe, m)
        })
        .await
        .map_err(join_error)?;
        let meta = meta.map_err(unavailable("reading the topic's metadata"))?;
        let exists = meta
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            let brokers = meta.brokers().len() as i32;
            let rf = self.config.replication_factor.min(brokers.max(1));
            let min_isr = if rf >= 2 { "2" } else { "1" };
            let t = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(rf))
                .set("min.insync.replicas", min_isr)
                .set("retention.ms", "-1")
                .set("retention.bytes", "-1")
                .set("cleanup.policy", "delete");
            let r = admin
                .create_topics([&t], &opts)
                .await
                .map_err(unavailable("creating the topic"))?;
            for r in r {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, e)) => {
                        return Err(ReplicaError::Unavailable(format!(
                            "creating topic {t}: {e}"
                        )))
                    }
                }
            }
            tracing::info!(topic = %self.topic, replication_factor = rf, "created the replica topic");
        }
        // Replicas per partition, from fresh metadata (a new topic's leader takes a moment).
        let topic = self.topic.clone();
        let replicas = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            loop {
                let m = probe
                    .fetch_metadata(Some(&topic), timeout)
                    .map_err(unavailable("reading the topic's metadata"))?;
                let p0 = m
                    .topics()
                    .first()
                    .and_then(|t| t.partitions().first())
                    .filter(|p| p.leader() >= 0)
                    .map(|p| p.replicas().len());
                match p0 {
                    Some(n) => return Ok(n),
                    None if t0.elapsed() < timeout => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    None => {
                        return Err(ReplicaError::Unavailable(format!(
                            "topic {topic} has no leader for partition 0 yet"
                        )))
                    }
                }
            }
        })
        .await
        .map_err(join_error)??;
        let configs = admin
            .describe_configs([&ResourceSpecifier::Topic(&self.topic)], &opts)
            .await
            .map_err(unavailable("reading the topic's configuration"))?;
        let mut min_isr = 1i64;
        let mut compacted = false;
        for c in configs.into_iter().flatten() {
            for e in &c.entries {
                match (e.name.as_str(), e.value.as_deref()) {
                    ("min.insync.replicas", Some(v)) => min_isr = v.parse().unwrap_or(1),
                    ("cleanup.policy", Some(v)) => compacted = v.contains("compact"),
                    _ => {}
                }
            }
        }
        if compacted {
            return Err(ReplicaError::Refused(format!(
                "the replica topic {} is compacted (cleanup.policy): every record has the key \
                 node_id, so compaction would keep only the last; use cleanup.policy=delete",
                self.topic
            )));
        }
        if (replicas < 2 || min_isr < 2) && !self.config.allow_unreplicated {
            return Err(ReplicaError::Refused(format!(
                "the replica topic {} has {replicas} replica(s) and min.insync.replicas = \
                 {min_isr}: an acknowledged record could be lost with one broker. Use a topic \
                 with at least 2 replicas and min.insync.replicas >= 2, or set \
                 allow_unreplicated = true",
                self.topic
            )));
        }
        Ok(())
    }

    /// Reads every committed record of partition 0 for this node.
    async fn read(&self) -> Result<Contents, ReplicaError> {
        let mut c = self.client_config();
        c.set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // The read ends at the end of the partition: an empty fetch should say so at once
            // rather than after the default 500 ms wait for more data.
            .set("fetch.wait.max.ms", "10")
            .set("group.id", format!("weir-replica-reader.{}", self.node_id));
        let consumer: BaseConsumer = c.create().map_err(unavailable("creating a reader"))?;
        let (topic, node_id, timeout) = (self.topic.clone(), self.node_id.clone(), self.timeout());
        tokio::task::spawn_blocking(move || -> Result<Contents, ReplicaError> {
            let (low, high) = consumer
                .fetch_watermarks(&topic, 0, timeout)
                .map_err(unavailable("reading the topic's offsets"))?;
            let mut out = Contents {
                owner: None,
                entries: Vec::new(),
            };
            if high <= low {
                return Ok(out);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(low))
                .map_err(unavailable("assigning the partition"))?;
            consumer
                .assign(&tpl)
                .map_err(unavailable("assigning the partition"))?;
            let mut parts = Assembler::default();
            let deadline = std::time::Instant::now() + timeout * 6;
            loop {
                if std::time::Instant::now() > deadline {
                    return Err(ReplicaError::Unavailable(
                        "reading the replica topic took too long".into(),
                    ));
                }
                let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let m = match m {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(_)) => break,
                    Err(e) => return Err(unavailable("reading the replica topic")(e)),
                };
                if m.key() != Some(node_id.as_bytes()) {
                    return Err(ReplicaError::Refused(format!(
                        "the replica topic {topic} holds records of another node (offset {}): \
                         each node needs a topic of its own",
                        m.offset()
                    )));
                }
                let payload = m.payload().unwrap_or_default();
                match kind(&m) {
                    Some(Kind::Owner) => {
                        out.owner = Some(serde_json::from_slice(payload).map_err(|e| {
                            ReplicaError::Damaged(format!("owner record at {}: {e}", m.offset()))
                        })?);
                    }
                    Some(Kind::Part(i, n)) if i < n => {
                        out.entries.extend(parts.push(i, n, payload));
                    }
                    _ => {
                        return Err(ReplicaError::Damaged(format!(
                            "unexpected record at offset {} of {topic}",
                            m.offset()
                        )))
                    }
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .map_err(join_error)?
    }

    fn txn(&self) -> Result<Arc<Txn>, ReplicaError> {
        lock(&self.txn)
            .clone()
            .ok_or_else(|| ReplicaError::Unavailable("the replica has not been taken over".into()))
    }

    /// Maps a producer error: fenced (or any other fatal producer error) ends this process's
    /// ownership; otherwise the open transaction is aborted (what it delivered stays readable)
    /// and the write is retried.
    async fn failed(&self, t: &Txn, open: &mut Option<Instant>, e: KafkaError) -> ReplicaError {
        *open = None;
        if is_fatal(&e) {
            let ours = self.epoch.load(Relaxed);
            let theirs = match self.read().await {
                Ok(c) => c.owner.map_or(ours + 1, |o| o.epoch),
                Err(_) => ours + 1,
            };
            return ReplicaError::Fenced {
                node_id: self.node_id.clone(),
                new_epoch: theirs,
                our_epoch: ours,
            };
        }
        let (p, timeout) = (t.producer.clone(), self.timeout());
        let _ = tokio::task::spawn_blocking(move || p.abort_transaction(timeout)).await;
        ReplicaError::Unavailable(format!("a replica write failed: {e}"))
    }

    /// Appends `records` (payload, header value) to the open transaction (beginning one if
    /// none is) and waits for their delivery; the first one's offset.
    async fn produce(&self, records: Vec<(Vec<u8>, String)>) -> Result<u64, ReplicaError> {
        let t = self.txn()?;
        let mut open = t.open_since.lock().await;
        if open.is_none() {
            // Local to the producer: the coordinator hears of it with the first record.
            if let Err(e) = t.producer.begin_transaction() {
                return Err(self.failed(&t, &mut open, e).await);
            }
            *open = Some(Instant::now());
        }
        let mut deliveries = Vec::with_capacity(records.len());
        for (payload, header) in &records {
            let r = FutureRecord::to(&self.topic)
                .partition(0)
                .key(self.node_id.as_bytes())
                .payload(payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: HEADER,
                    value: Some(header.as_str()),
                }));
            match t.producer.send_result(r) {
                Ok(d) => deliveries.push(d),
                Err((e, _)) => return Err(self.failed(&t, &mut open, e).await),
            }
        }
        let mut first = None;
        for d in deliveries {
            match d.await {
                Ok(Ok(delivery)) => {
                    first.get_or_insert(delivery.offset);
                }
                Ok(Err((e, _))) => return Err(self.failed(&t, &mut open, e).await),
                Err(_) => {
                    let e = KafkaError::Canceled;
                    return Err(self.failed(&t, &mut open, e).await);
                }
            }
        }
        Ok(first.unwrap_or_default() as u64)
    }

    async fn write_owner(&self, owner: &Owner) -> Result<(), ReplicaError> {
        let body = serde_json::to_vec(owner).expect("serialisable");
        let at = self.produce(vec![(body, "owner".into())]).await?;
        self.owner_at.store(at, Relaxed);
        Ok(())
    }
}

impl Replica for KafkaReplica {
    fn describe(&self) -> String {
        format!(
            "kafka {} topic {}",
            self.config.bootstrap_servers, self.topic
        )
    }

    fn owner(&self) -> ReplicaFuture<'_, Option<Owner>> {
        Box::pin(async move {
            self.ensure_topic().await?;
            Ok(self.read().await?.owner)
        })
    }

    fn take_over<'a>(
        &'a self,
        instance: &'a str,
        before: &'a (dyn Fn(u64) -> std::io::Result<()> + Send + Sync),
    ) -> ReplicaFuture<'a, TakenOver> {
        Box::pin(async move {
            let t0 = Instant::now();
            let mut c = self.client_config();
            c.set("transactional.id", format!("weir-replica-{}", self.node_id))
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set(
                    "message.timeout.ms",
                    self.config.request_timeout_ms.to_string(),
                );
            // Latency over batching: an append waits for its delivery, and appends are
            // already grouped per WAL commit.
            if !self.config.properties.contains_key("linger.ms") {
                c.set("linger.ms", "0");
            }
            let txn_timeout = match self.config.properties.get("transaction.timeout.ms") {
                Some(v) => v.parse().map_err(|_| {
                    ReplicaError::Refused(format!("transaction.timeout.ms = {v:?} is not a number"))
                })?,
                None => {
                    c.set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS.to_string());
                    TRANSACTION_TIMEOUT_MS
                }
            };
            // Created first: it connects to the brokers while the topic is checked.
            let p: FutureProducer = c.create().map_err(unavailable("creating the producer"))?;
            self.ensure_topic().await?;
            let checked = t0.elapsed();
            let (q, timeout) = (p.clone(), self.timeout());
            // Fences the previous owner: its open transaction is aborted, its next one fails.
            tokio::task::spawn_blocking(move || q.init_transactions(timeout))
                .await
                .map_err(join_error)?
                .map_err(unavailable("initialising transactions"))?;
            let t = Arc::new(Txn {
                producer: p,
                open_since: tokio::sync::Mutex::new(None),
            });
            let every = COMMIT_EVERY.min(Duration::from_millis(txn_timeout / 3));
            tokio::spawn(commit_loop(Arc::downgrade(&t), every, self.timeout()));
            *lock(&self.txn) = Some(t);
            let fenced = t0.elapsed();
            let contents = self.read().await?;
            let read = t0.elapsed();
            let epoch = contents.owner.as_ref().map_or(0, |o| o.epoch) + 1;
            before(epoch).map_err(|e| {
                ReplicaError::Unavailable(format!("recording epoch {epoch} locally: {e}"))
            })?;
            self.epoch.store(epoch, Relaxed);
            self.write_owner(&Owner {
                epoch,
                instance: instance.to_string(),
            })
            .await?;
            tracing::info!(
                topic = %self.topic,
                epoch,
                entries = contents.entries.len(),
                topic_checked_ms = checked.as_millis() as u64,
                fenced_ms = (fenced - checked).as_millis() as u64,
                read_ms = (read - fenced).as_millis() as u64,
                owner_written_ms = (t0.elapsed() - read).as_millis() as u64,
                "took the replica topic over"
            );
            Ok(TakenOver {
                epoch,
                entries: contents.entries,
            })
        })
    }

    fn append(&self, entry: Bytes) -> ReplicaFuture<'_, u64> {
        Box::pin(async move {
            let n = entry.len().div_ceil(PART_MAX).max(1);
            let records = (0..n)
                .map(|i| {
                    let part = entry[i * PART_MAX..((i + 1) * PART_MAX).min(entry.len())].to_vec();
                    (part, format!("entry {i}/{n}"))
                })
                .collect();
            self.produce(records).await
        })
    }

    fn trim(&self, before: u64) -> ReplicaFuture<'_, u64> {
        Box::pin(async move {
            // The owner record must survive: restate it past the trim point first.
            if self.owner_at.load(Relaxed) < before {
                let owner =
                    self.read().await?.owner.ok_or_else(|| {
                        ReplicaError::Damaged("the owner record is missing".into())
                    })?;
                self.write_owner(&owner).await?;
            }
            let admin: AdminClient<DefaultClientContext> = self
                .client_config()
                .create()
                .map_err(unavailable("creating an admin client"))?;
            let probe: BaseConsumer = self
                .client_config()
                .create()
                .map_err(unavailable("creating a metadata client"))?;
            let (topic, timeout) = (self.topic.clone(), self.timeout());
            let (low, _) =
                tokio::task::spawn_blocking(move || probe.fetch_watermarks(&topic, 0, timeout))
                    .await
                    .map_err(join_error)?
                    .map_err(unavailable("reading the topic's offsets"))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic, 0, Offset::Offset(before as i64))
                .map_err(unavailable("trimming"))?;
            let opts = AdminOptions::new().operation_timeout(Some(self.timeout()));
            admin
                .delete_records(&tpl, &opts)
                .await
                .map_err(unavailable("deleting records"))?;
            // Records, counting owner records and transaction markers.
            Ok((before as i64 - low).max(0) as u64)
        })
    }
}

fn is_fatal(e: &KafkaError) -> bool {
    (match e {
        KafkaError::Transaction(t) => t.is_fatal() || t.code() == RDKafkaErrorCode::ProducerFenced,
        _ => false,
    }) || e.rdkafka_error_code() == Some(RDKafkaErrorCode::ProducerFenced)
        || e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fenced)
}

/// Commits the open transaction once it is `every` old, so that it never reaches the
/// producer's `transaction.timeout.ms` (the coordinator would abort it and fence the producer).
/// What a transaction holds is durable before its commit; a failed commit is aborted, and the
/// next append begins a new transaction. Ends with the replica.
async fn commit_loop(t: std::sync::Weak<Txn>, every: Duration, timeout: Duration) {
    let tick = (every / 4).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let Some(t) = t.upgrade() else { return };
        let mut open = t.open_since.lock().await;
        if !open.is_some_and(|since| since.elapsed() >= every) {
            continue;
        }
        *open = None;
        let p = t.producer.clone();
        let r = tokio::task::spawn_blocking(move || {
            p.commit_transaction(timeout).or_else(|e| {
                if is_fatal(&e) {
                    return Err(e);
                }
                tracing::warn!(error = %e, "committing a replica transaction failed; aborting it (its records stay readable)");
                p.abort_transaction(timeout)
            })
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_fatal(&e) => {
                // Fenced: the next append fails and reports it.
                tracing::warn!(error = %e, "the replica producer was fenced");
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "aborting a replica transaction failed"),
            Err(e) => tracing::warn!(error = %e, "a replica commit task failed"),
        }
    }
}

/// A replica for `[engine.replication]` of kind `kafka`, as `receiver-node` builds it.
///
/// # Errors
/// An invalid configuration.
pub fn replica(
    config: &KafkaReplicaConfig,
    node_id: &str,
) -> Result<Arc<dyn Replica>, weir::receiver::ConfigError> {
    Ok(Arc::new(KafkaReplica::new(config, node_id)?))
}

#[cfg(test)]
mod tests {
    use super::Assembler;

    #[test]
    fn parts_join_in_order_and_a_half_written_entry_is_dropped() {
        let mut a = Assembler::default();
        assert_eq!(a.push(0, 1, b"one").as_deref(), Some(&b"one"[..]));
        // An entry of three whose write failed after two parts, written again whole.
        assert_eq!(a.push(0, 3, b"a"), None);
        assert_eq!(a.push(1, 3, b"b"), None);
        assert_eq!(a.push(0, 3, b"A"), None);
        assert_eq!(a.push(1, 3, b"B"), None);
        assert_eq!(a.push(2, 3, b"C").as_deref(), Some(&b"ABC"[..]));
        // A tail without its head is skipped; the next entry is whole.
        assert_eq!(a.push(1, 2, b"x"), None);
        assert_eq!(a.push(0, 2, b"p"), None);
        assert_eq!(a.push(1, 2, b"q").as_deref(), Some(&b"pq"[..]));
        // A part of another entry's size in the middle restarts nothing it cannot finish.
        assert_eq!(a.push(0, 2, b"m"), None);
        assert_eq!(a.push(1, 3, b"z"), None);
        assert_eq!(a.push(0, 1, b"last").as_deref(), Some(&b"last"[..]));
    }
}
