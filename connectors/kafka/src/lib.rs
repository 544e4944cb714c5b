//! Kafka receivers for weir.
//!
//! [`KafkaReceiver`] is a reliable high-level consumer: it joins a consumer group (`subscribe`,
//! cooperative-sticky assignment by default), stores what it polls, and commits an offset only
//! after the block holding that record is durable in the WAL — never before
//! (`enable.auto.commit=false`). On a revocation it stops taking records from the revoked
//! partitions, waits until what it took from them is durable, commits those offsets
//! synchronously, and only then lets them go. On (re)assignment it resumes each partition after
//! the highest offset already in the WAL when that is ahead of the group's committed offset, so a
//! crash between "durable" and "committed" stores nothing twice on this node.
//!
//! Delivery is at-least-once across nodes (a partition moved to another node after a crash
//! resumes from the committed offset); on one node it is exactly-once into the WAL.
//!
//! [`KafkaOutput`] (module [`output`]) is the other direction: it produces batches to a topic
//! with an idempotent producer and succeeds only when every record is acknowledged.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod direct;
pub mod exactly_once;
mod read;
pub mod replica;
mod stats;
pub use direct::{DirectStats, KafkaDirectSource};
pub use read::read_to_end;
pub use replica::KafkaReplica;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
pub(crate) use weir_receiver::lock;
use weir_receiver::{
    Checkpoint, Position, Receiver, ReceiverContext, ReceiverError, Record, StoreFuture,
};

/// Configuration of a [`KafkaReceiver`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`. Required.
    pub bootstrap_servers: String,
    /// `group.id`. Required.
    pub group_id: String,
    /// Topics to subscribe to. Required unless `topic_regex` is set.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regular expression of topics to subscribe to (librdkafka syntax, without the leading
    /// `^`, which is added).
    #[serde(default)]
    pub topic_regex: Option<String>,
    /// Any librdkafka consumer property (security, SASL, SSL, fetch sizes, ...), passed through.
    /// `enable.auto.commit`, `enable.auto.offset.store`, `group.id` and `bootstrap.servers` are
    /// set by weir and refused here. weir's own defaults, which these override:
    /// `fetch.queue.backoff.ms = 10` (librdkafka's 1000 ms stalls a consumer that fell behind;
    /// the README's Kafka benchmark says why), and in group mode
    /// `partition.assignment.strategy = cooperative-sticky`, `auto.offset.reset = earliest`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// At most this many records per `store()` call. Default 10000.
    #[serde(default = "default_max_poll_records")]
    pub max_poll_records: usize,
    /// `store()` calls that may be outstanding before polling waits. Default 64.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Durable offsets are committed (asynchronously) at most this often, ms. Default 1000.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How long a revocation waits for the revoked partitions' records to become durable, ms.
    /// Default 30000. If it passes, their offsets are not committed (they are redelivered).
    #[serde(default = "default_revoke_timeout_ms")]
    pub revoke_timeout_ms: u64,
    /// Group mode: when an offset is committed to the group. `durable` (default): once the
    /// records are durable in this node's WAL. `after_batch`: only once the batch holding them
    /// has completed every job and output, so that Kafka itself is the replica and the WAL only
    /// a cache: a node whose disk is lost loses nothing, and a node on a new machine (an empty
    /// data directory, the same `group_id`) reads again from Kafka everything that was not yet
    /// in a completed batch. The price is at-least-once across nodes: records durable on a
    /// node but not yet in a completed batch are read again by whoever consumes the partition
    /// next (after a revocation, a crash or a lost disk), so outputs may see them twice.
    #[serde(default)]
    pub commit: KafkaCommit,
    /// `group` (default): the reliable consumer-group member, records stored in the WAL.
    /// `direct`: Spark's direct approach (see [`KafkaDirectSource`]); nothing goes through the
    /// WAL, each batch records offset ranges and reads them from Kafka.
    #[serde(default)]
    pub mode: KafkaMode,
    /// Direct mode: at most this many offsets per partition in one batch. Default 100000.
    #[serde(default = "default_max_records_per_partition")]
    pub max_records_per_partition: u64,
    /// Direct mode: commit each completed batch's offsets back to `group_id` (for monitoring
    /// tools; weir itself resumes from its tracker). Default true.
    #[serde(default = "default_true")]
    pub commit_offsets: bool,
    /// Direct mode: reading a batch's ranges fails (and is retried) after this long without
    /// progress, ms. Default 30000.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
}

/// When a group-mode receiver commits offsets (see [`KafkaConfig::commit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaCommit {
    /// Once the records are durable in the WAL.
    #[default]
    Durable,
    /// Once the batch holding the records has completed every job and output.
    AfterBatch,
}

/// How a Kafka receiver consumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaMode {
    /// A consumer-group member whose records go through the WAL ([`KafkaReceiver`]).
    #[default]
    Group,
    /// Offset ranges per batch, read from Kafka itself ([`KafkaDirectSource`]).
    Direct,
}

fn default_max_records_per_partition() -> u64 {
    100_000
}
fn default_true() -> bool {
    true
}
fn default_read_timeout_ms() -> u64 {
    30_000
}

fn default_max_poll_records() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    64
}
fn default_commit_interval_ms() -> u64 {
    1000
}
fn default_revoke_timeout_ms() -> u64 {
    30_000
}

const RESERVED: [&str; 4] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

impl KafkaConfig {
    /// A configuration with the required keys and defaults for the rest.
    pub fn new(bootstrap_servers: &str, group_id: &str, topics: &[&str]) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            topics: topics.iter().map(|t| (*t).to_string()).collect(),
            topic_regex: None,
            properties: BTreeMap::new(),
            max_poll_records: default_max_poll_records(),
            max_in_flight: default_max_in_flight(),
            commit_interval_ms: default_commit_interval_ms(),
            revoke_timeout_ms: default_revoke_timeout_ms(),
            commit: KafkaCommit::Durable,
            mode: KafkaMode::Group,
            max_records_per_partition: default_max_records_per_partition(),
            commit_offsets: true,
            read_timeout_ms: default_read_timeout_ms(),
        }
    }

    /// Checks the required keys and limits; the message names the key.
    ///
    /// # Errors
    /// A description of the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err("bootstrap_servers is required (host:port[,host:port...])".into());
        }
        if self.group_id.trim().is_empty() {
            return Err("group_id is required".into());
        }
        match (&self.topics[..], &self.topic_regex) {
            ([], None) => return Err("topics (a list) or topic_regex is required".into()),
            ([_, ..], Some(_)) => return Err("set topics or topic_regex, not both".into()),
            _ => {}
        }
        if self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err("topics must not contain an empty name".into());
        }
        for k in RESERVED {
            if self.properties.contains_key(k) {
                return Err(format!(
                    "properties.\"{k}\" is set by weir and cannot be overridden"
                ));
            }
        }
        if self.max_poll_records == 0 {
            return Err("max_poll_records must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        if self.commit_interval_ms == 0 {
            return Err("commit_interval_ms must be at least 1".into());
        }
        if self.mode == KafkaMode::Direct {
            if self.commit != KafkaCommit::Durable {
                return Err(
                    "commit applies to group mode: direct mode commits each completed \
                            batch's ranges (commit_offsets) and resumes from its tracker"
                        .into(),
                );
            }
            if self.topic_regex.is_some() {
                return Err("topic_regex is not supported in direct mode: list the topics".into());
            }
            if self.max_records_per_partition == 0 {
                return Err("max_records_per_partition must be at least 1".into());
            }
            if self.read_timeout_ms == 0 {
                return Err("read_timeout_ms must be at least 1".into());
            }
        }
        Ok(())
    }
}

/// Counters of a [`KafkaReceiver`].
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// Records polled and handed to `store()`.
    pub records: AtomicU64,
    /// Payload bytes polled.
    pub bytes: AtomicU64,
    /// Commits sent (an asynchronous one is checked against the group afterwards).
    pub commits: AtomicU64,
    /// Failed commits: refused at once, or an asynchronous one the group does not show
    /// [`VERIFY_AFTER`] later. Their offsets are sent again with the next commit.
    pub commit_failures: AtomicU64,
    /// Rebalances (assignments and revocations) seen.
    pub rebalances: AtomicU64,
    /// Per (topic, partition): high watermark minus the next offset to consume, as last seen.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
}

/// Offsets per (topic, partition): what was taken (handed to `store()`) and what is durable.
#[derive(Debug, Default)]
struct Progress {
    taken: HashMap<(String, i32), i64>,
    durable: HashMap<(String, i32), i64>,
    /// `commit = "after_batch"`: the highest offset per partition in a completed batch.
    completed: HashMap<(String, i32), i64>,
    /// The last offset known committed per partition (ours, or the group's when the partition
    /// was assigned): commits only move forward from here.
    committed: HashMap<(String, i32), i64>,
    /// Asynchronous commits not yet seen in the group's committed offsets: the offset sent
    /// (durable, as in `committed`) and when.
    unverified: HashMap<(String, i32), (i64, Instant)>,
    failed: Option<String>,
}

#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    checkpoint: Mutex<Checkpoint>,
    stats: Arc<KafkaStats>,
    revoke_timeout: Duration,
    /// `commit = "after_batch"`: commit `Progress::completed`, not `Progress::durable`.
    after_batch: bool,
    /// librdkafka's client-level errors since the poll loop last reported them (at most
    /// [`MAX_CLIENT_ERRORS`]).
    client_errors: Mutex<Vec<String>>,
}

const MAX_CLIENT_ERRORS: usize = 64;
/// An asynchronous commit not visible in the group's offsets this long after it was sent is
/// taken as failed and sent again. librdkafka reports the outcome of an asynchronous commit only
/// to an offset-commit callback, which its event interface (the one rdkafka uses) never calls.
const VERIFY_AFTER: Duration = Duration::from_secs(2);
/// The same error is reported at most once per this interval (the client repeats it at every
/// reconnection attempt).
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Reports errors through the receiver context, each distinct one at most once per
/// [`REPORT_EVERY`].
#[derive(Default)]
struct Reporter {
    last: HashMap<String, Instant>,
}

impl Reporter {
    fn report(&mut self, ctx: &ReceiverContext, message: &str) {
        // "... (after 12ms in state CONNECT)" differs at every attempt: not part of the key.
        let key = message
            .split(" (after ")
            .next()
            .unwrap_or(message)
            .to_string();
        let now = Instant::now();
        if self.last.get(&key).is_some_and(|t| now - *t < REPORT_EVERY) {
            return;
        }
        if self.last.len() > 256 {
            self.last.retain(|_, t| now - *t < REPORT_EVERY);
        }
        self.last.insert(key, now);
        ctx.report_error(message);
    }
}

/// A poll error with what the user needs to act on it: the brokers or topics concerned.
fn describe_poll_error(e: &KafkaError, config: &KafkaConfig) -> String {
    let subscribed = match &config.topic_regex {
        Some(r) => format!("topic_regex {r:?}"),
        None => format!("topics {:?}", config.topics),
    };
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            format!(
                "a subscribed topic does not exist on {} ({subscribed}): {e}",
                config.bootstrap_servers
            )
        }
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            format!(
                "cannot reach the Kafka brokers {}: {e}",
                config.bootstrap_servers
            )
        }
        _ => format!("poll ({subscribed} on {}): {e}", config.bootstrap_servers),
    }
}

impl Shared {
    /// Commits `durable + 1` (with `commit = "after_batch"`: `completed + 1`) for the given
    /// partitions (all, if `None`) that are assigned and moved beyond the last known commit.
    fn commit(&self, c: &BaseConsumer<Ctx>, only: Option<&TopicPartitionList>, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        {
            // Periodic commits skip partitions revoked meanwhile (another member owns them
            // now). A revocation's or a stop's commit names the partitions it is for (or is
            // the last one), so it is not filtered: nothing may make it skip a partition.
            let assigned = if only.is_none() {
                c.assignment().ok()
            } else {
                None
            };
            let p = lock(&self.progress);
            let source = if self.after_batch {
                &p.completed
            } else {
                &p.durable
            };
            for ((t, part), off) in source {
                if let Some(only) = only {
                    if only.find_partition(t, *part).is_none() {
                        continue;
                    }
                }
                if assigned
                    .as_ref()
                    .is_some_and(|a| a.find_partition(t, *part).is_none())
                {
                    continue;
                }
                // A synchronous commit (revocation, stop) also re-sends an asynchronous one not
                // yet seen by the group: it may have failed (e.g. refused for a stale
                // generation during the rebalance that led to this revocation).
                let k = (t.clone(), *part);
                let unverified = matches!(mode, CommitMode::Sync) && p.unverified.contains_key(&k);
                if unverified || p.committed.get(&k).is_none_or(|c| off > c) {
                    let _ = tpl.add_partition_offset(t, *part, Offset::Offset(off + 1));
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match c.commit(&tpl, mode) {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Relaxed);
                let now = Instant::now();
                let mut p = lock(&self.progress);
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        let k = (e.topic().to_string(), e.partition());
                        p.committed.insert(k.clone(), o - 1);
                        match mode {
                            // Only queued: its outcome is checked later (see `verify_commits`).
                            CommitMode::Async => {
                                p.unverified.insert(k, (o - 1, now));
                            }
                            CommitMode::Sync => {
                                p.unverified.remove(&k);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                self.stats.commit_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "offset commit failed; retried with the next commit");
            }
        }
    }
}

impl Shared {
    /// `commit = "after_batch"`: the engine's completed checkpoint, as offsets to commit.
    fn batches_completed(&self, done: &Checkpoint) {
        let mut p = lock(&self.progress);
        for (t, part, o) in done.iter() {
            let o = i64::try_from(o).unwrap_or(i64::MAX);
            let e = p.completed.entry((t.to_string(), part)).or_insert(o);
            *e = (*e).max(o);
        }
    }

    /// Checks asynchronous commits sent at least [`VERIFY_AFTER`] ago against the group's
    /// committed offsets. One the group does not show (at that offset or beyond) is counted as
    /// failed and forgotten, so that the next commit sends it again; one for a partition no longer
    /// assigned is dropped (its revocation committed synchronously, or the group moved it on).
    fn verify_commits(&self, c: &BaseConsumer<Ctx>) {
        let due: Vec<((String, i32), i64)> = {
            let p = lock(&self.progress);
            p.unverified
                .iter()
                .filter(|(_, (_, at))| at.elapsed() >= VERIFY_AFTER)
                .map(|(k, (o, _))| (k.clone(), *o))
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let assigned = c.assignment().ok();
        let mut tpl = TopicPartitionList::new();
        for ((t, part), _) in &due {
            tpl.add_partition(t, *part);
        }
        // Unanswered (coordinator unreachable): try again at the next check.
        let Ok(group) = c.committed_offsets(tpl, Duration::from_secs(5)) else {
            return;
        };
        let mut failed = Vec::new();
        let mut p = lock(&self.progress);
        for (k, sent) in due {
            // A newer commit was queued meanwhile: it is the one to check.
            if p.unverified.get(&k).map(|(o, _)| *o) != Some(sent) {
                continue;
            }
            p.unverified.remove(&k);
            let still_ours = assigned
                .as_ref()
                .is_some_and(|a| a.find_partition(&k.0, k.1).is_some());
            let shown = group
                .find_partition(&k.0, k.1)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            if still_ours && shown.is_none_or(|g| g < sent + 1) {
                if p.committed.get(&k) == Some(&sent) {
                    p.committed.remove(&k);
                }
                failed.push((k, sent + 1, shown));
            }
        }
        drop(p);
        for ((t, part), offset, shown) in failed {
            self.stats.commit_failures.fetch_add(1, Relaxed);
            tracing::warn!(topic = %t, partition = part, offset, group_has = ?shown,
                "an asynchronous offset commit did not reach the group; sent again with the next commit");
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    /// librdkafka's client-level errors name the broker and the cause ("127.0.0.1:9092/bootstrap:
    /// Connect to ipv4#127.0.0.1:9092 failed: Connection refused", "SASL authentication error:
    /// ..."): kept for the poll loop to report (poll itself returns only a code).
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "Kafka consumer client error");
        let mut errors = lock(&self.shared.client_errors);
        if errors.len() < MAX_CLIENT_ERRORS {
            errors.push(format!("Kafka client error {error}: {reason}"));
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let s = &self.shared;
        s.stats.rebalances.fetch_add(1, Relaxed);
        let cooperative = matches!(c.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Resume after what is already in the WAL when that is ahead of the group.
                let committed = c
                    .committed_offsets(tpl.clone(), Duration::from_secs(10))
                    .ok();
                let cp = lock(&s.checkpoint).clone();
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for (t, p) in parts {
                    let group = committed
                        .as_ref()
                        .and_then(|c| c.find_partition(&t, p))
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        });
                    // What this node holds: the WAL checkpoint it started with, or what it made
                    // durable since (a partition revoked and assigned again within one run,
                    // whose revocation commit the group may have rejected).
                    let durable = lock(&s.progress).durable.get(&(t.clone(), p)).copied();
                    let wal = cp
                        .get(&t, p)
                        .map(|o| o as i64 + 1)
                        .max(durable.map(|d| d + 1));
                    let start = match (group, wal) {
                        (Some(g), Some(w)) => Some(g.max(w)),
                        (g, w) => g.or(w),
                    };
                    if let Some(g) = group {
                        // Never commit behind what the group already has.
                        let mut pr = lock(&s.progress);
                        let c = pr.committed.entry((t.clone(), p)).or_insert(g - 1);
                        *c = (*c).max(g - 1);
                    }
                    if let Some(start) = start {
                        let _ = tpl.set_partition_offset(&t, p, Offset::Offset(start));
                    }
                    tracing::info!(topic = %t, partition = p, ?group, ?wal, ?start, "partition assigned");
                }
                let r = if cooperative {
                    c.incremental_assign(tpl)
                } else {
                    c.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assigning partitions failed");
                    lock(&s.progress).failed = Some(format!("assign: {e}"));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                // Wait until everything taken from the revoked partitions is durable.
                let deadline = Instant::now() + s.revoke_timeout;
                let mut p = lock(&s.progress);
                let mut in_time = true;
                loop {
                    let pending = revoked.iter().any(|k| {
                        p.taken
                            .get(k)
                            .is_some_and(|t| p.durable.get(k).is_none_or(|d| d < t))
                    });
                    if !pending || p.failed.is_some() {
                        break;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::warn!(?revoked, "revoked partitions not durable in time: their offsets stay uncommitted (redelivered)");
                        in_time = false;
                        break;
                    }
                    p = s
                        .changed
                        .wait_timeout(p, left.min(Duration::from_millis(100)))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                let failed = p.failed.is_some();
                drop(p);
                let lost = c.assignment_lost();
                if !lost {
                    s.commit(c, Some(tpl), CommitMode::Sync);
                }
                {
                    let mut p = lock(&s.progress);
                    for k in &revoked {
                        p.taken.remove(k);
                    }
                }
                let r = if cooperative {
                    c.incremental_unassign(tpl)
                } else {
                    c.unassign()
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "unassigning partitions failed");
                }
                if lost {
                    tracing::warn!(
                        ?revoked,
                        "partitions lost (the group gave them to another member, e.g. after a \
                         session timeout): offsets not committed, so the new owner may receive \
                         again what this node already stored (at-least-once)"
                    );
                } else if in_time && !failed {
                    tracing::info!(
                        ?revoked,
                        "partitions revoked after their records were made durable"
                    );
                } else {
                    tracing::info!(
                        ?revoked,
                        "partitions revoked; only durable offsets committed"
                    );
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                if !cooperative {
                    let _ = c.unassign();
                }
            }
        }
    }
}

/// The reliable high-level consumer. See the crate documentation.
#[derive(Debug, Clone)]
pub struct KafkaReceiver {
    config: KafkaConfig,
    stats: Arc<KafkaStats>,
}

impl KafkaReceiver {
    /// A receiver for `config`.
    ///
    /// # Errors
    /// The validation message, naming the key.
    pub fn new(config: KafkaConfig) -> Result<Self, String> {
        config.validate()?;
        if config.mode == KafkaMode::Direct {
            return Err(
                "mode = \"direct\" is served by KafkaDirectSource, not KafkaReceiver".into(),
            );
        }
        Ok(KafkaReceiver {
            config,
            stats: Arc::default(),
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<KafkaStats> {
        self.stats.clone()
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = consumer_defaults();
        c.set("partition.assignment.strategy", "cooperative-sticky")
            .set("auto.offset.reset", "earliest");
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        c
    }
}

/// The consumer properties weir sets unless `properties` does (both modes).
///
/// `fetch.queue.backoff.ms` = 10 (librdkafka's default is 1000). librdkafka stops fetching a
/// partition for that long once the local queue holds `queued.min.messages` (100,000), and with
/// a consumer group it counts the whole consumer's queue, not the partition's. One fetch from a
/// consumer behind on 16 partitions brings about 16 × 1 MiB, over 100,000 small records, so every
/// partition then waits a full second after every fetch: a consumer that once fell behind stayed
/// at about 150,000 records/s however fast it could store them (more than half of the
/// benchmark rounds at 600,000 records/s on a real broker). The queue stays bounded by
/// `queued.max.messages.kbytes`; only the wait before looking again is shorter.
pub(crate) fn consumer_defaults() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("fetch.queue.backoff.ms", "10");
    c
}

/// What the poll thread hands the acknowledging task: a store and the offsets it covers.
struct InFlight {
    store: StoreFuture,
    offsets: Vec<((String, i32), i64)>,
}

impl Receiver for KafkaReceiver {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let shared = Arc::new(Shared {
            stats: self.stats.clone(),
            revoke_timeout: Duration::from_millis(self.config.revoke_timeout_ms),
            after_batch: self.config.commit == KafkaCommit::AfterBatch,
            ..Shared::default()
        });
        *lock(&shared.checkpoint) = ctx.checkpoint();
        let consumer: Arc<BaseConsumer<Ctx>> = Arc::new(
            self.client_config()
                .create_with_context(Ctx {
                    shared: shared.clone(),
                })
                .map_err(|e| ReceiverError::context("creating the Kafka consumer", e))?,
        );
        // Lag and the check of asynchronous commits need broker round trips: a thread of their
        // own, off the poll path.
        let lag_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lag_thread = {
            let (c, stats, stop) = (consumer.clone(), self.stats.clone(), lag_stop.clone());
            let shared = shared.clone();
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    for i in 0..50 {
                        if stop.load(Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        if i % 10 == 9 {
                            shared.verify_commits(&c);
                        }
                    }
                    update_lag(&c, &stats);
                }
            })
        };
        let subscribe: Vec<String> = match &self.config.topic_regex {
            Some(r) => vec![format!("^{r}")],
            None => self.config.topics.clone(),
        };
        let refs: Vec<&str> = subscribe.iter().map(String::as_str).collect();
        consumer
            .subscribe(&refs)
            .map_err(|e| ReceiverError::context("subscribing", e))?;

        let (tx, mut rx) = tokio::sync::mpsc::channel::<InFlight>(self.config.max_in_flight);
        // Await stores in order; record durable offsets; wake a waiting revocation.
        let acker_shared = shared.clone();
        let acker = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let r = f.store.await;
                let mut p = lock(&acker_shared.progress);
                match r {
                    Ok(_) => {
                        for (k, o) in f.offsets {
                            let d = p.durable.entry(k).or_insert(o);
                            *d = (*d).max(o);
                        }
                    }
                    Err(e) => {
                        p.failed = Some(e.to_string());
                    }
                }
                drop(p);
                acker_shared.changed.notify_all();
            }
        });

        let config = self.config.clone();
        let stats = self.stats.clone();
        let poll_shared = shared.clone();
        let ctx2 = ctx.clone();
        let poll = tokio::task::spawn_blocking(move || -> Result<(), ReceiverError> {
            let mut last_commit = Instant::now();
            let commit_every = Duration::from_millis(config.commit_interval_ms);
            let mut topics: Vec<Arc<str>> = Vec::new();
            let mut reporter = Reporter::default();
            while !ctx2.is_shutting_down() {
                for e in std::mem::take(&mut *lock(&poll_shared.client_errors)) {
                    reporter.report(&ctx2, &e);
                }
                if let Some(f) = lock(&poll_shared.progress).failed.clone() {
                    return Err(ReceiverError::msg(format!("storing failed: {f}")));
                }
                if poll_shared.after_batch {
                    poll_shared.batches_completed(&ctx2.completed());
                }
                let mut records = Vec::new();
                let mut offsets: HashMap<(Arc<str>, i32), i64> = HashMap::new();
                // Gather up to `max_poll_records` or 50 ms of records per `store()` call: each
                // call waits for its block, so small calls would cap the rate at
                // `max_in_flight` calls per block interval.
                let started = Instant::now();
                let window = Duration::from_millis(50);
                while records.len() < config.max_poll_records {
                    let wait = if records.is_empty() {
                        Duration::from_millis(100)
                    } else {
                        window.saturating_sub(started.elapsed())
                    };
                    match consumer.poll(wait) {
                        None => break,
                        Some(Err(KafkaError::PartitionEOF(_))) => continue,
                        Some(Err(e)) => {
                            reporter.report(&ctx2, &describe_poll_error(&e, &config));
                            break;
                        }
                        Some(Ok(m)) => {
                            // One shared name per topic, not an allocation per record.
                            let topic = match topics.iter().find(|t| &***t == m.topic()) {
                                Some(t) => t.clone(),
                                None => {
                                    let t: Arc<str> = Arc::from(m.topic());
                                    topics.push(t.clone());
                                    t
                                }
                            };
                            let r = to_record(&m, topic.clone());
                            stats.bytes.fetch_add(r.payload.len() as u64, Relaxed);
                            let e = offsets.entry((topic, m.partition())).or_insert(m.offset());
                            *e = (*e).max(m.offset());
                            records.push(r);
                        }
                    }
                    if started.elapsed() > window {
                        break;
                    }
                }
                if !records.is_empty() {
                    stats.records.fetch_add(records.len() as u64, Relaxed);
                    {
                        let mut p = lock(&poll_shared.progress);
                        for ((t, part), o) in &offsets {
                            let e = p.taken.entry((t.to_string(), *part)).or_insert(*o);
                            *e = (*e).max(*o);
                        }
                    }
                    let store = ctx2.store(records);
                    let f = InFlight {
                        store,
                        offsets: offsets
                            .into_iter()
                            .map(|((t, p), o)| ((t.to_string(), p), o))
                            .collect(),
                    };
                    if tx.blocking_send(f).is_err() {
                        break;
                    }
                }
                if last_commit.elapsed() >= commit_every {
                    poll_shared.commit(&consumer, None, CommitMode::Async);
                    last_commit = Instant::now();
                }
            }
            // Shutdown: wait for what is in flight, commit it, leave the group cleanly.
            drop(tx);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let done = {
                    let p = lock(&poll_shared.progress);
                    p.failed.is_some()
                        || p.taken
                            .iter()
                            .all(|(k, t)| p.durable.get(k).is_some_and(|d| d >= t))
                };
                if done || Instant::now() > deadline {
                    break;
                }
                let _ = consumer.poll(Duration::from_millis(20));
            }
            poll_shared.commit(&consumer, None, CommitMode::Sync);
            consumer.unsubscribe();
            // Serve the final revocation so the group sees us leave.
            let deadline = Instant::now() + Duration::from_secs(5);
            while consumer
                .assignment()
                .map(|a| a.count() > 0)
                .unwrap_or(false)
                && Instant::now() < deadline
            {
                let _ = consumer.poll(Duration::from_millis(20));
            }
            Ok(())
        });
        let r = poll
            .await
            .map_err(|e| ReceiverError::msg(format!("the Kafka poll thread failed: {e}")));
        lag_stop.store(true, Relaxed);
        let _ = tokio::task::spawn_blocking(move || lag_thread.join()).await;
        let _ = acker.await;
        r?
    }
}

/// A polled message as a record: payload, key, headers, and its topic/partition/offset.
pub(crate) fn to_record(m: &rdkafka::message::BorrowedMessage<'_>, topic: Arc<str>) -> Record {
    let mut r = Record::new(m.payload().map(<[u8]>::to_vec).unwrap_or_default());
    if let Some(k) = m.key() {
        r = r.with_key(k.to_vec());
    }
    if let Some(h) = m.headers() {
        for h in h.iter() {
            r = r.with_header(h.key, h.value.map(<[u8]>::to_vec).unwrap_or_default());
        }
    }
    r.position = Some(Position::offset(
        topic,
        m.partition(),
        m.offset().max(0) as u64,
    ));
    r
}

fn update_lag(c: &BaseConsumer<Ctx>, stats: &KafkaStats) {
    let Ok(assignment) = c.assignment() else {
        return;
    };
    let Ok(positions) = c.position() else { return };
    let mut lag = BTreeMap::new();
    for e in assignment.elements() {
        if let Ok((_, high)) =
            c.fetch_watermarks(e.topic(), e.partition(), Duration::from_millis(500))
        {
            let pos = positions
                .find_partition(e.topic(), e.partition())
                .and_then(|p| match p.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            lag.insert((e.topic().to_string(), e.partition()), (high - pos).max(0));
        }
    }
    *lock(&stats.lag) = lag;
}

// The output direction: batches produced to a topic (see the module).
pub mod output;
pub use exactly_once::{Sent, Transaction as KafkaTransaction, TransactionalOutput};
pub use output::{
    BatchDelivery, KafkaOutput, KafkaOutputConfig, KafkaOutputError, KafkaOutputStats,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fetch_queue_backoff_is_short_unless_the_user_sets_it() {
        let mut config = KafkaConfig::new("127.0.0.1:9", "g", &["t"]);
        let c = KafkaReceiver::new(config.clone()).unwrap().client_config();
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
        config
            .properties
            .insert("fetch.queue.backoff.ms".into(), "250".into());
        let c = KafkaReceiver::new(config).unwrap().client_config();
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("250"));
    }
}
