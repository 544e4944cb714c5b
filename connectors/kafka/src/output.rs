//! A Kafka output: every record of a batch produced to one topic by an idempotent producer.
//!
//! [`KafkaOutput`] is built once (one producer for the life of the node, rebuilt only after
//! librdkafka reports a fatal error) and sends a batch with [`KafkaOutput::batch`]:
//! [`BatchDelivery::send`] each record (payload, key and headers kept), then
//! [`BatchDelivery::finish`], which waits for every delivery report. The batch succeeds only if
//! every record was acknowledged by the broker (`acks=all`); a failed or missing report (none
//! within `delivery_timeout_ms`) is an error, so the engine retries the whole batch.
//!
//! **Delivery semantics.** The producer is idempotent (`enable.idempotence=true`): the
//! broker drops the duplicates that librdkafka's own retries would create. A batch that is sent
//! again — after a failed attempt, or re-run after a crash before it was marked complete — is
//! produced again, so the output topic is at-least-once per batch. Consumers that need
//! exactly-once must deduplicate (for example on a source position carried in a header, or on
//! the key).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};
use weir_receiver::lock;
use weir_receiver::Record;

/// Configuration of a [`KafkaOutput`] (`[[output]] type = "kafka"` in `receiver-node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaOutputConfig {
    /// `bootstrap.servers`. Required.
    pub bootstrap_servers: String,
    /// The topic every record is produced to. Required.
    pub topic: String,
    /// How long a batch waits for the delivery reports of its records, ms; also librdkafka's
    /// `message.timeout.ms`. A record not acknowledged in time fails the batch (which is then
    /// retried). Default 30000.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Any librdkafka producer property (security, SASL, SSL, compression, linger, ...), passed
    /// through. The keys weir sets are refused here: see [`KafkaOutputConfig::validate`].
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Each batch in one Kafka transaction with a record of the batch in `batches_topic`, so
    /// that a re-run batch is not produced twice for `read_committed` consumers (see
    /// [`crate::exactly_once`]). Default false: at-least-once per batch.
    #[serde(default)]
    pub exactly_once: bool,
    /// With `exactly_once`: the compacted topic recording each node's last committed batch
    /// (created if missing). Default `<topic>.weir-batches`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches_topic: Option<String>,
    /// With `exactly_once`: the producer's `transaction.timeout.ms` (at least
    /// `delivery_timeout_ms`). A crashed node's open transaction holds `read_committed`
    /// consumers back for at most this long (or until the node restarts). Default 60000.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// Where records the topic cannot take go (too large), with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<weir_receiver::DeadLetterConfig>,
}

fn default_delivery_timeout_ms() -> u64 {
    30_000
}

fn default_transaction_timeout_ms() -> u64 {
    60_000
}

/// Producer properties weir sets and a configuration may not override.
const OUTPUT_RESERVED: [&str; 7] = [
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "transactional.id",
];

/// How long past `delivery_timeout_ms` a batch still waits for reports: librdkafka scans for
/// timed-out messages about once a second, so their failure reports come a little late.
const REPORT_GRACE: Duration = Duration::from_secs(3);

impl KafkaOutputConfig {
    /// A configuration with the required keys and defaults for the rest.
    pub fn new(bootstrap_servers: &str, topic: &str) -> Self {
        KafkaOutputConfig {
            bootstrap_servers: bootstrap_servers.into(),
            topic: topic.into(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            properties: BTreeMap::new(),
            exactly_once: false,
            batches_topic: None,
            transaction_timeout_ms: default_transaction_timeout_ms(),
            dead_letter: None,
        }
    }

    /// The batches topic of an `exactly_once` output.
    pub fn batches_topic(&self) -> String {
        self.batches_topic
            .clone()
            .unwrap_or_else(|| format!("{}.weir-batches", self.topic))
    }

    /// Checks the required keys, the limits and every passed-through property (with
    /// librdkafka's own checks, without connecting anywhere); the message names the key.
    ///
    /// # Errors
    /// A description of the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err("bootstrap_servers is required (host:port[,host:port...])".into());
        }
        if self.topic.is_empty() {
            return Err("topic is required".into());
        }
        if !valid_topic(&self.topic) {
            return Err(format!(
                "topic {:?} is not a valid Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)",
                self.topic
            ));
        }
        if self.delivery_timeout_ms == 0 || self.delivery_timeout_ms > i32::MAX as u64 {
            return Err(format!(
                "delivery_timeout_ms must be between 1 and {}",
                i32::MAX
            ));
        }
        if self.exactly_once {
            if self.transaction_timeout_ms < self.delivery_timeout_ms
                || self.transaction_timeout_ms > i32::MAX as u64
            {
                return Err(format!(
                    "transaction_timeout_ms ({}) must be at least delivery_timeout_ms ({})",
                    self.transaction_timeout_ms, self.delivery_timeout_ms
                ));
            }
            let b = self.batches_topic();
            if b == self.topic || !valid_topic(&b) {
                return Err(format!(
                    "batches_topic {b:?} must be a valid Kafka topic name other than `topic`"
                ));
            }
        }
        if let Some(d) = &self.dead_letter {
            d.validate()?;
        }
        for k in OUTPUT_RESERVED {
            if self.properties.contains_key(k) {
                return Err(format!(
                    "properties.\"{k}\" is set by weir and cannot be overridden"
                ));
            }
        }
        self.client_config()
            .create_native_config()
            .map_err(|e| format!("properties: {}", describe(&e)))?;
        Ok(())
    }

    /// The passed-through properties and the bootstrap servers (for admin and reader clients).
    pub(crate) fn plain_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.properties {
            // Producer-only properties would make librdkafka warn in other clients.
            if !matches!(
                k.as_str(),
                "compression.type" | "linger.ms" | "batch.size" | "message.max.bytes"
            ) {
                c.set(k, v);
            }
        }
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", self.delivery_timeout_ms.to_string());
        c
    }
}

/// 1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// librdkafka's configuration errors, worded for a configuration file.
fn describe(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            format!("{key:?} = {value:?}: {desc}")
        }
        other => other.to_string(),
    }
}

/// Why a batch was not delivered (the batch is then retried, never marked complete).
#[derive(Debug, thiserror::Error)]
pub enum KafkaOutputError {
    /// The producer could not be created (a property librdkafka refuses).
    #[error("creating the Kafka producer: {0}")]
    Create(String),
    /// A record could not be handed to the producer (too large, unknown topic, ...).
    #[error("producing to topic {topic:?}: {error}")]
    Produce {
        /// The output topic.
        topic: String,
        /// librdkafka's reason.
        error: KafkaError,
    },
    /// The broker refused some records, or librdkafka gave up on them.
    #[error("{failed} of {sent} records not delivered to topic {topic:?} (first error: {first})")]
    Delivery {
        /// The output topic.
        topic: String,
        /// Records with a failed delivery report so far.
        failed: u64,
        /// Records handed to the producer in this batch.
        sent: u64,
        /// The first failure's reason.
        first: String,
    },
    /// Some delivery reports did not come in time.
    #[error("{outstanding} of {sent} records to topic {topic:?} not acknowledged within {timeout_ms} ms")]
    Timeout {
        /// The output topic.
        topic: String,
        /// Records still without a report.
        outstanding: u64,
        /// Records handed to the producer in this batch.
        sent: u64,
        /// The configured `delivery_timeout_ms`.
        timeout_ms: u64,
    },
    /// librdkafka reported a fatal producer error; the producer is rebuilt for the next attempt.
    #[error("fatal Kafka producer error ({code:?}): {reason}; the producer is rebuilt for the next attempt")]
    Fatal {
        /// librdkafka's code.
        code: RDKafkaErrorCode,
        /// librdkafka's reason.
        reason: String,
    },
}

impl KafkaOutputError {
    /// True if the producer refused the record for its size (`message.max.bytes`): the record,
    /// not the destination, is the problem (a dead letter).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            KafkaOutputError::Produce {
                error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                ..
            }
        )
    }
}

/// Counters of a [`KafkaOutput`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KafkaOutputStats {
    /// Batches whose every record was acknowledged.
    pub batches_delivered: u64,
    /// Batch attempts that failed.
    pub batches_failed: u64,
    /// Records acknowledged by the broker.
    pub records_delivered: u64,
    /// Records with a failed delivery report.
    pub records_failed: u64,
    /// Producers created after a fatal error.
    pub producer_rebuilds: u64,
}

/// The delivery reports of one batch attempt. Every record of the attempt carries an `Arc` to
/// it, so a late report of an earlier, abandoned attempt never counts for a later one.
#[derive(Debug, Default)]
struct Attempt {
    state: Mutex<AttemptState>,
}

#[derive(Debug, Default)]
struct AttemptState {
    outstanding: u64,
    delivered: u64,
    failed: u64,
    first_error: Option<String>,
}

/// The producer's context: routes each delivery report to its batch attempt, and keeps the last
/// client-level error (which names the broker: "127.0.0.1:9092/bootstrap: Connect ... refused")
/// to explain a failed delivery.
#[derive(Default)]
struct OutputContext {
    last_error: Mutex<Option<String>>,
}

impl ClientContext for OutputContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "Kafka output producer");
        // "1/1 brokers are down" says less than the connection error before it.
        if !reason.ends_with("brokers are down") {
            *lock(&self.last_error) = Some(reason.to_string());
        }
    }
}

impl ProducerContext for OutputContext {
    type DeliveryOpaque = Arc<Attempt>;

    fn delivery(&self, result: &DeliveryResult<'_>, attempt: Arc<Attempt>) {
        let mut s = lock(&attempt.state);
        s.outstanding = s.outstanding.saturating_sub(1);
        match result {
            Ok(_) => s.delivered += 1,
            Err((e, _)) => {
                s.failed += 1;
                if s.first_error.is_none() {
                    s.first_error = Some(e.to_string());
                }
            }
        }
    }
}

type Inner = BaseProducer<OutputContext>;

/// Produces batches to a Kafka topic with an idempotent producer. See the module documentation.
pub struct KafkaOutput {
    config: KafkaOutputConfig,
    producer: Mutex<Arc<Inner>>,
    stats: Mutex<KafkaOutputStats>,
}

impl std::fmt::Debug for KafkaOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOutput")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaOutput {
    /// Validates `config` and creates the producer (it connects in the background; an
    /// unreachable broker shows as delivery timeouts, not here).
    ///
    /// # Errors
    /// [`KafkaOutputError::Create`] naming the key if the configuration is refused.
    pub fn new(config: KafkaOutputConfig) -> Result<Self, KafkaOutputError> {
        config.validate().map_err(KafkaOutputError::Create)?;
        let producer = create(&config)?;
        Ok(KafkaOutput {
            config,
            producer: Mutex::new(Arc::new(producer)),
            stats: Mutex::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaOutputConfig {
        &self.config
    }

    /// The counters so far.
    pub fn stats(&self) -> KafkaOutputStats {
        *lock(&self.stats)
    }

    /// Starts sending one batch: [`BatchDelivery::send`] every record, then
    /// [`BatchDelivery::finish`]. Blocking calls; use them from a blocking thread.
    ///
    /// # Errors
    /// [`KafkaOutputError::Create`] if the producer had failed fatally and cannot be rebuilt.
    pub fn batch(&self) -> Result<BatchDelivery<'_>, KafkaOutputError> {
        let producer = {
            let mut p = lock(&self.producer);
            if let Some((code, reason)) = p.client().fatal_error() {
                tracing::warn!(
                    ?code,
                    reason,
                    "rebuilding the Kafka output producer after a fatal error"
                );
                *p = Arc::new(create(&self.config)?);
                lock(&self.stats).producer_rebuilds += 1;
            }
            p.clone()
        };
        Ok(BatchDelivery {
            output: self,
            producer,
            attempt: Arc::default(),
            sent: 0,
            last_enqueued: Instant::now(),
            extra_headers: Vec::new(),
        })
    }

    /// Sends `records` as one batch and waits for every delivery report: [`Self::batch`],
    /// [`BatchDelivery::send`] for each, [`BatchDelivery::finish`]. Returns how many records
    /// were delivered.
    ///
    /// # Errors
    /// [`KafkaOutputError`]: the batch must be sent again.
    pub fn send_all<'r>(
        &self,
        records: impl IntoIterator<Item = &'r Record>,
    ) -> Result<u64, KafkaOutputError> {
        let mut b = self.batch()?;
        for r in records {
            b.send(r)?;
        }
        b.finish()
    }
}

fn create(config: &KafkaOutputConfig) -> Result<Inner, KafkaOutputError> {
    config
        .client_config()
        .create_with_context(OutputContext::default())
        .map_err(|e| KafkaOutputError::Create(describe(&e)))
}

/// One batch being sent: see [`KafkaOutput::batch`]. Dropping it without
/// [`finish`](Self::finish) abandons the attempt (records already handed over may still be
/// delivered; their reports are ignored).
pub struct BatchDelivery<'o> {
    output: &'o KafkaOutput,
    producer: Arc<Inner>,
    attempt: Arc<Attempt>,
    sent: u64,
    last_enqueued: Instant,
    /// Headers added to every record of the batch, after the record's own.
    extra_headers: Vec<(String, Vec<u8>)>,
}

impl BatchDelivery<'_> {
    /// Adds `headers` to every record this delivery sends, after the record's own (e.g. the
    /// node and batch time, so that consumers can tell where a record came from and
    /// deduplicate a re-run batch).
    #[must_use]
    pub fn with_headers(mut self, headers: &[(&str, &[u8])]) -> Self {
        self.extra_headers
            .extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())));
        self
    }

    /// Hands one record (payload, key, headers) to the producer. When librdkafka's local queue
    /// is full it serves delivery reports and tries again, for up to `delivery_timeout_ms`.
    ///
    /// # Errors
    /// [`KafkaOutputError::Produce`] if librdkafka refuses the record,
    /// [`KafkaOutputError::Delivery`] as soon as a record of this batch failed (there is no
    /// point sending the rest), [`KafkaOutputError::Timeout`] if the queue stays full.
    pub fn send(&mut self, r: &Record) -> Result<(), KafkaOutputError> {
        if self.sent % 1024 == 1023 {
            // Serve delivery reports as we go: notices failures early, frees the queue.
            self.producer.poll(Duration::ZERO);
        }
        self.check_failed()?;
        let topic = self.output.config.topic.as_str();
        let mut record: BaseRecord<'_, [u8], [u8], Arc<Attempt>> =
            BaseRecord::with_opaque_to(topic, self.attempt.clone()).payload(&r.payload[..]);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if !r.headers.is_empty() || !self.extra_headers.is_empty() {
            let mut h = OwnedHeaders::new_with_capacity(r.headers.len() + self.extra_headers.len());
            for header in &r.headers {
                h = h.insert(Header {
                    key: header.name.as_str(),
                    value: Some(&header.value[..]),
                });
            }
            for (key, value) in &self.extra_headers {
                h = h.insert(Header {
                    key,
                    value: Some(&value[..]),
                });
            }
            record = record.headers(h);
        }
        let started = Instant::now();
        let limit = Duration::from_millis(self.output.config.delivery_timeout_ms);
        lock(&self.attempt.state).outstanding += 1;
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    self.last_enqueued = Instant::now();
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if started.elapsed() > limit {
                        lock(&self.attempt.state).outstanding -= 1;
                        return Err(self.fail(self.timeout_error()));
                    }
                    self.producer.poll(Duration::from_millis(10));
                    if let Err(e) = self.check_failed() {
                        lock(&self.attempt.state).outstanding -= 1;
                        return Err(e);
                    }
                }
                Err((error, _)) => {
                    lock(&self.attempt.state).outstanding -= 1;
                    let e = self.fatal().unwrap_or(KafkaOutputError::Produce {
                        topic: topic.to_string(),
                        error,
                    });
                    return Err(self.fail(e));
                }
            }
        }
    }

    /// Waits until every record sent has a delivery report.
    ///
    /// # Errors
    /// [`KafkaOutputError::Delivery`] if any report failed, [`KafkaOutputError::Timeout`] if
    /// some did not come within `delivery_timeout_ms` (plus a short grace for librdkafka's own
    /// timeout scan), [`KafkaOutputError::Fatal`] after a fatal producer error.
    pub fn finish(self) -> Result<u64, KafkaOutputError> {
        let deadline = self.last_enqueued
            + Duration::from_millis(self.output.config.delivery_timeout_ms)
            + REPORT_GRACE;
        loop {
            self.check_failed()?;
            let (outstanding, delivered) = {
                let s = lock(&self.attempt.state);
                (s.outstanding, s.delivered)
            };
            if outstanding == 0 {
                let mut st = lock(&self.output.stats);
                st.batches_delivered += 1;
                st.records_delivered += delivered;
                return Ok(delivered);
            }
            if Instant::now() >= deadline {
                return Err(self.fail(self.timeout_error()));
            }
            self.producer.poll(Duration::from_millis(5));
        }
    }

    /// The first failure of this attempt, if any, as an error (counted once).
    fn check_failed(&self) -> Result<(), KafkaOutputError> {
        let (failed, first) = {
            let s = lock(&self.attempt.state);
            if s.failed == 0 {
                return Ok(());
            }
            (s.failed, s.first_error.clone().unwrap_or_default())
        };
        let first = match self.diagnosis() {
            Some(d) => format!("{first}; {d}"),
            None => first,
        };
        let e = self.fatal().unwrap_or(KafkaOutputError::Delivery {
            topic: self.output.config.topic.clone(),
            failed,
            sent: self.sent,
            first,
        });
        Err(self.fail(e))
    }

    /// Why deliveries may be failing, asked of the cluster: the topic's metadata error (it does
    /// not exist, no authorisation), or, when no broker answers, the last broker error.
    fn diagnosis(&self) -> Option<String> {
        let topic = &self.output.config.topic;
        let client = self.producer.client();
        match client.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(md) => md.topics().first().and_then(|t| t.error()).map(|e| {
                format!(
                    "the cluster says of topic {topic:?}: {}",
                    RDKafkaErrorCode::from(e)
                )
            }),
            Err(e) => Some(match lock(&client.context().last_error).clone() {
                Some(last) => format!(
                    "no broker of {} answered ({e}); last broker error: {last}",
                    self.output.config.bootstrap_servers
                ),
                None => format!(
                    "no broker of {} answered ({e})",
                    self.output.config.bootstrap_servers
                ),
            }),
        }
    }

    fn fatal(&self) -> Option<KafkaOutputError> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| KafkaOutputError::Fatal { code, reason })
    }

    fn timeout_error(&self) -> KafkaOutputError {
        self.fatal().unwrap_or(KafkaOutputError::Timeout {
            topic: self.output.config.topic.clone(),
            outstanding: lock(&self.attempt.state).outstanding,
            sent: self.sent,
            timeout_ms: self.output.config.delivery_timeout_ms,
        })
    }

    fn fail(&self, e: KafkaOutputError) -> KafkaOutputError {
        let failed = lock(&self.attempt.state).failed;
        let mut st = lock(&self.output.stats);
        st.batches_failed += 1;
        st.records_failed += failed;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        let ok = KafkaOutputConfig::new("127.0.0.1:9092", "out");
        ok.validate().unwrap();
        let mut c = ok.clone();
        c.topic = String::new();
        assert!(c.validate().unwrap_err().contains("topic is required"));
        c.topic = "a b".into();
        assert!(c
            .validate()
            .unwrap_err()
            .contains("not a valid Kafka topic"));
        let mut c = ok.clone();
        c.bootstrap_servers = " ".into();
        assert!(c.validate().unwrap_err().contains("bootstrap_servers"));
        let mut c = ok.clone();
        c.delivery_timeout_ms = 0;
        assert!(c.validate().unwrap_err().contains("delivery_timeout_ms"));
        for k in ["enable.idempotence", "acks", "message.timeout.ms"] {
            let mut c = ok.clone();
            c.properties.insert(k.into(), "1".into());
            let e = c.validate().unwrap_err();
            assert!(e.contains(k) && e.contains("set by weir"), "{e}");
        }
        let mut c = ok.clone();
        c.properties.insert("no.such.property".into(), "1".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("no.such.property"), "{e}");
        let mut c = ok.clone();
        c.properties.insert("compression.type".into(), "lz4".into());
        c.validate().unwrap();
        c.properties
            .insert("compression.type".into(), "rot13".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("compression.type") && e.contains("rot13"), "{e}");
    }
}
