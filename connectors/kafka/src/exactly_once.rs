//! The Kafka output with `exactly_once = true`: each batch in one Kafka transaction, together
//! with a record of the batch in a *batches topic*, so that a batch re-run after a crash is not
//! produced twice for `read_committed` consumers.
//!
//! - **One producer per node and output topic**, `transactional.id = weir-out.<node_id>.<topic>`.
//!   Its `init_transactions` (at the first batch, and again after any failure whose outcome is
//!   unknown) fences every earlier producer with that id — a previous run of this node, or a
//!   node that another machine has since taken over — and resolves that producer's open
//!   transaction (committed if its commit had begun, else aborted).
//! - **Then it reads the batches topic** (`read_committed`, compacted, key
//!   `<topic>/<node_id>`) for the last batch time committed by this node. The engine runs a
//!   node's batches one at a time in increasing time order (batch times never go back within a
//!   data directory and its replica), so every batch up to that time is in the topic: a batch at
//!   or before it is skipped.
//! - **Each batch**: `begin_transaction`, every record (payload, key, headers, plus `weir.node`
//!   and `weir.batch_time`), the batch record, `commit_transaction`. A commit that fails with an
//!   error requiring abort is aborted (nothing of the batch becomes visible) and the batch is
//!   retried; any other failure drops the producer, and the next attempt starts with
//!   `init_transactions` and the read above, which tells whether the commit happened.
//! - **Consumers must read with `isolation.level = read_committed`**: with `read_uncommitted`
//!   they also see the records of aborted attempts.
//! - A record larger than the producer's `message.max.bytes` is refused by librdkafka before
//!   it is sent: it is a *rejected* record (dead letter), and the rest of the batch goes on. A
//!   record the broker refuses (a topic's smaller `max.message.bytes`) fails the whole
//!   transaction, which is aborted and retried.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::{Deserialize, Serialize};
use weir_receiver::{lock, Record};

use crate::output::{KafkaOutputConfig, KafkaOutputError};

/// What the batches topic holds for each batch committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// The output topic.
    pub topic: String,
    /// The node that ran the batch.
    pub node: String,
    /// The batch time, ms since the epoch.
    pub batch_time: u64,
    /// Records produced to the topic.
    pub records: u64,
    /// Records sent to the dead-letter output instead.
    pub dead_letters: u64,
}

/// How one record fared when handed to the producer.
pub enum Sent {
    /// Handed over (its delivery is checked by the commit).
    Sent,
    /// Refused by the producer itself (too large): the reason; the batch goes on without it.
    Rejected(String),
}

struct Session {
    producer: BaseProducer,
    node_id: String,
    /// The last batch time this node committed to the topic, if any.
    committed: Option<u64>,
}

/// A transactional Kafka output (see the module documentation).
pub struct TransactionalOutput {
    config: KafkaOutputConfig,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for TransactionalOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalOutput")
            .field("topic", &self.config.topic)
            .finish_non_exhaustive()
    }
}

fn kafka_err(what: &str, e: &KafkaError) -> KafkaOutputError {
    KafkaOutputError::Create(format!("{what}: {e}"))
}

/// One batch's transaction, begun: [`send`](Self::send) each record, then
/// [`commit`](Self::commit). Dropping it aborts.
pub struct Transaction<'o> {
    output: &'o TransactionalOutput,
    guard: std::sync::MutexGuard<'o, Option<Session>>,
    batch_time: u64,
    headers: Vec<(&'static str, Vec<u8>)>,
    sent: u64,
    done: bool,
}

impl TransactionalOutput {
    /// Builds it; nothing connects until the first batch.
    ///
    /// # Errors
    /// A configuration the producer refuses.
    pub fn new(config: KafkaOutputConfig) -> Result<Self, KafkaOutputError> {
        config.validate().map_err(KafkaOutputError::Create)?;
        Ok(TransactionalOutput {
            config,
            session: Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaOutputConfig {
        &self.config
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.delivery_timeout_ms)
    }

    /// The key of this node's batch records.
    fn key(&self, node_id: &str) -> String {
        format!("{}/{node_id}", self.config.topic)
    }

    /// Begins batch `batch_time` of node `node_id`; `None` if the batches topic shows it
    /// committed already (a re-run).
    ///
    /// # Errors
    /// [`KafkaOutputError`]: the batch is retried.
    pub fn begin(
        &self,
        node_id: &str,
        batch_time: u64,
    ) -> Result<Option<Transaction<'_>>, KafkaOutputError> {
        let mut guard = lock(&self.session);
        if guard.as_ref().is_some_and(|s| s.node_id != node_id) {
            *guard = None;
        }
        if guard.is_none() {
            *guard = Some(self.start(node_id)?);
        }
        let s = guard.as_mut().expect("started above");
        if s.committed.is_some_and(|c| c >= batch_time) {
            return Ok(None);
        }
        if let Err(e) = s.producer.begin_transaction() {
            *guard = None;
            return Err(kafka_err("beginning a transaction", &e));
        }
        let time = batch_time.to_string();
        Ok(Some(Transaction {
            output: self,
            guard,
            batch_time,
            headers: vec![
                ("weir.node", node_id.as_bytes().to_vec()),
                ("weir.batch_time", time.into_bytes()),
            ],
            sent: 0,
            done: false,
        }))
    }

    /// A new producer: fences earlier ones with the id, then reads what was committed.
    fn start(&self, node_id: &str) -> Result<Session, KafkaOutputError> {
        let t0 = Instant::now();
        self.ensure_batches_topic()?;
        let mut c = self.config.client_config();
        c.set(
            "transactional.id",
            format!("weir-out.{node_id}.{}", self.config.topic),
        )
        .set(
            "transaction.timeout.ms",
            self.config.transaction_timeout_ms.to_string(),
        );
        let producer: BaseProducer = c
            .create()
            .map_err(|e| kafka_err("creating the transactional producer", &e))?;
        producer
            .init_transactions(self.timeout())
            .map_err(|e| kafka_err("initialising transactions (init_transactions)", &e))?;
        let committed = self.read_committed(node_id)?;
        tracing::info!(
            topic = %self.config.topic, batches_topic = %self.config.batches_topic(), node_id,
            last_committed = ?committed, took_ms = t0.elapsed().as_millis() as u64,
            "transactional Kafka output ready"
        );
        Ok(Session {
            producer,
            node_id: node_id.to_string(),
            committed,
        })
    }

    /// Creates the batches topic if missing (compacted, one partition).
    fn ensure_batches_topic(&self) -> Result<(), KafkaOutputError> {
        let topic = self.config.batches_topic();
        let probe: BaseConsumer = self
            .config
            .plain_client_config()
            .create()
            .map_err(|e| kafka_err("creating a metadata client", &e))?;
        let meta = probe
            .fetch_metadata(Some(&topic), self.timeout())
            .map_err(|e| kafka_err("reading the batches topic's metadata", &e))?;
        let exists = meta
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if exists {
            return Ok(());
        }
        let rf = (meta.brokers().len() as i32).clamp(1, 3);
        let admin: AdminClient<DefaultClientContext> =
            self.config
                .plain_client_config()
                .create()
                .map_err(|e| kafka_err("creating an admin client", &e))?;
        let t = NewTopic::new(&topic, 1, TopicReplication::Fixed(rf))
            .set("cleanup.policy", "compact")
            .set("min.insync.replicas", if rf >= 2 { "2" } else { "1" });
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                KafkaOutputError::Create(format!("a runtime for the admin client: {e}"))
            })?;
        let created = rt
            .block_on(admin.create_topics([&t], &opts))
            .map_err(|e| kafka_err("creating the batches topic", &e))?;
        for r in created {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => {
                    return Err(KafkaOutputError::Create(format!(
                        "creating the batches topic {t}: {e}"
                    )))
                }
            }
        }
        tracing::info!(topic, replication_factor = rf, "created the batches topic");
        Ok(())
    }

    /// The last batch time committed by `node_id`, from the batches topic (`read_committed`).
    fn read_committed(&self, node_id: &str) -> Result<Option<u64>, KafkaOutputError> {
        let topic = self.config.batches_topic();
        let key = self.key(node_id);
        let mut c = self.config.plain_client_config();
        c.set("isolation.level", "read_committed")
            .set("group.id", format!("weir-out-reader.{node_id}"));
        let mut last: Option<u64> = None;
        crate::read::read_to_end(&c, &topic, self.timeout(), self.timeout() * 2, &mut |m| {
            if m.key() != Some(key.as_bytes()) {
                return Ok(());
            }
            let Some(payload) = m.payload() else {
                return Ok(());
            };
            let b: BatchRecord = serde_json::from_slice(payload).map_err(|e| {
                format!(
                    "the batches topic {topic} holds a record at offset {} that is not a \
                         batch record: {e}",
                    m.offset()
                )
            })?;
            last = last.max(Some(b.batch_time));
            Ok(())
        })
        .map_err(KafkaOutputError::Create)?;
        Ok(last)
    }
}

impl Transaction<'_> {
    fn session(&self) -> &Session {
        self.guard.as_ref().expect("a transaction has a session")
    }

    /// Hands `r` to the producer within the transaction.
    ///
    /// # Errors
    /// [`KafkaOutputError`] other than a too-large record (the transaction is then aborted).
    pub fn send(&mut self, r: &Record) -> Result<Sent, KafkaOutputError> {
        let topic = self.output.config.topic.as_str();
        let mut h = OwnedHeaders::new_with_capacity(r.headers.len() + self.headers.len());
        for header in &r.headers {
            h = h.insert(Header {
                key: header.name.as_str(),
                value: Some(&header.value[..]),
            });
        }
        for (key, value) in &self.headers {
            h = h.insert(Header {
                key,
                value: Some(&value[..]),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).payload(&r.payload[..]).headers(h);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        let started = Instant::now();
        let producer = &self
            .guard
            .as_ref()
            .expect("a transaction has a session")
            .producer;
        loop {
            match producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    if self.sent.is_multiple_of(1024) {
                        producer.poll(Duration::ZERO);
                    }
                    return Ok(Sent::Sent);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if started.elapsed() > self.output.timeout() {
                        return Err(KafkaOutputError::Timeout {
                            topic: topic.to_string(),
                            outstanding: producer.in_flight_count().max(0) as u64,
                            sent: self.sent,
                            timeout_ms: self.output.config.delivery_timeout_ms,
                        });
                    }
                    producer.poll(Duration::from_millis(10));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Ok(Sent::Rejected(format!(
                        "Kafka: the record ({} bytes of payload) is larger than the producer's \
                         message.max.bytes",
                        r.payload.len()
                    )));
                }
                Err((error, _)) => {
                    return Err(KafkaOutputError::Produce {
                        topic: topic.to_string(),
                        error,
                    })
                }
            }
        }
    }

    /// Adds the batch record and commits the transaction.
    ///
    /// # Errors
    /// [`KafkaOutputError`]: nothing of the batch is visible to `read_committed` consumers
    /// unless the next attempt finds it committed.
    pub fn commit(mut self, records: u64, dead_letters: u64) -> Result<(), KafkaOutputError> {
        let s = self.session();
        let b = BatchRecord {
            topic: self.output.config.topic.clone(),
            node: s.node_id.clone(),
            batch_time: self.batch_time,
            records,
            dead_letters,
        };
        let payload = serde_json::to_vec(&b).expect("a batch record serialises");
        let key = self.output.key(&s.node_id);
        let batches_topic = self.output.config.batches_topic();
        if let Err((e, _)) = s.producer.send(
            BaseRecord::<'_, [u8], [u8]>::to(&batches_topic)
                .key(key.as_bytes())
                .payload(&payload),
        ) {
            return Err(self.abort(kafka_err("producing the batch record", &e)));
        }
        let timeout = self.output.timeout();
        let t0 = Instant::now();
        loop {
            match self.session().producer.commit_transaction(timeout) {
                Ok(()) => {
                    self.done = true;
                    let s = self.guard.as_mut().expect("a session");
                    s.committed = Some(self.batch_time);
                    return Ok(());
                }
                Err(KafkaError::Transaction(t)) if t.is_retriable() && t0.elapsed() < timeout => {
                    continue;
                }
                Err(KafkaError::Transaction(t)) if t.txn_requires_abort() => {
                    let e = KafkaOutputError::Delivery {
                        topic: self.output.config.topic.clone(),
                        failed: 0,
                        sent: self.sent,
                        first: format!("committing the transaction: {t}; aborted"),
                    };
                    return Err(self.abort(e));
                }
                Err(e) => {
                    // Unknown outcome: the next attempt's init_transactions and read tell.
                    self.done = true;
                    *self.guard = None;
                    return Err(kafka_err(
                        "committing the transaction (outcome unknown: the next attempt reads it back)",
                        &e,
                    ));
                }
            }
        }
    }

    /// Aborts the transaction (dropping the producer if that fails) and returns `e`.
    pub fn abort(&mut self, e: KafkaOutputError) -> KafkaOutputError {
        self.done = true;
        if let Some(s) = self.guard.as_ref() {
            if let Err(a) = s.producer.abort_transaction(self.output.timeout()) {
                tracing::warn!(error = %a, "aborting the transaction failed: the producer is made again");
                *self.guard = None;
            }
        }
        e
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.abort(KafkaOutputError::Create("abandoned".into()));
        }
    }
}
