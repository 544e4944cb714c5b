//! `--source kafka`: librdkafka's mock cluster, started in this process, or the Kafka cluster at
//! `--bootstrap` (a real broker: a new topic and group named `crash-harness-<time>-<pid>` are
//! created there), with a topic of `--partitions` partitions; an idempotent producer sends records at `--rate` per second and
//! counts every record whose delivery report succeeded ("acknowledged" means delivered to
//! Kafka); the node consumes with the Kafka receiver (consumer-group mode).
//!
//! The producer pauses while the group's committed offsets trail what was delivered by more than
//! `--max-backlog` records on a partition, so the mock's retention (about 5 MiB or 100,000
//! records per partition) never drops a record the node has not stored. A node is killed only
//! once it consumes again (its group has committed something new since it started), and the
//! drain waits until the group has committed every delivered offset (the node commits only what
//! is durable in its WAL).

use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, DeliveryResult, Producer as _,
    ProducerContext,
};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use weir_receiver::lock;

use super::{Feed, Producer, Shared};
use crate::verify::{record, Ledger};
use crate::Commit;

/// The mock cluster's topic the harness produces to and the node consumes, and the node's group.
const MOCK_TOPIC: &str = "events";

/// Checks the producer's options: `--rate` and `--max-backlog` at least 1.
pub fn check_options(rate: u64, max_backlog: i64) -> Result<(), String> {
    if rate == 0 || max_backlog < 1 {
        return Err("--rate and --max-backlog must be at least 1".into());
    }
    Ok(())
}

/// A producer to a mock cluster, and the node's consumer group watched through its committed
/// offsets.
pub struct KafkaFeed {
    production: Production,
    /// The receiver's `commit` setting.
    commit: Commit,
    /// Reads the group's committed offsets.
    reader: BaseConsumer,
    /// Per (re)start: the time from the start to a new offset commit.
    resumes: Vec<Duration>,
    /// The group's committed offsets (summed) when the node was last killed.
    baseline: i64,
    /// When the node was last (re)started.
    started_at: Instant,
    /// The group's committed offsets (summed) after the drain.
    committed_total: Option<i64>,
    // Last: dropped after the clients of it. None with `--bootstrap`.
    _cluster: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl KafkaFeed {
    /// Starts the mock cluster with a topic of `partitions` partitions; the producer will send
    /// `rate` records a second, pausing while the group trails by more than `max_backlog`.
    /// With `bootstrap`, the cluster there is used instead: a new topic is created on it.
    pub fn new(
        partitions: i32,
        rate: u64,
        max_backlog: i64,
        bootstrap: Option<&str>,
        commit: Commit,
    ) -> Result<KafkaFeed, String> {
        let (cluster, bootstrap, topic) = match bootstrap {
            None => {
                let c = start_cluster(partitions)?;
                let bs = c.bootstrap_servers();
                (Some(c), bs, MOCK_TOPIC.to_string())
            }
            Some(bs) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let topic = format!("crash-harness-{secs}-{}", std::process::id());
                create_topic(bs, &topic, partitions)?;
                (None, bs.to_string(), topic)
            }
        };
        let production = Production {
            group: format!("{topic}-group"),
            topic,
            bootstrap,
            partitions,
            rate,
            max_backlog,
            ends: Arc::default(),
            failed: Arc::default(),
            paused_ms: Arc::default(),
        };
        Ok(KafkaFeed {
            commit,
            reader: group_reader(&production.bootstrap, &production.group)?,
            production,
            resumes: Vec::new(),
            baseline: 0,
            started_at: Instant::now(),
            committed_total: None,
            _cluster: cluster,
        })
    }
}

impl Feed for KafkaFeed {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn receiver(&self) -> String {
        // Short session timeouts: a killed node's membership ends soon, so its restart gets
        // the partitions back within seconds.
        let p = &self.production;
        let commit = match self.commit {
            Commit::Durable => "durable",
            Commit::AfterBatch => "after_batch",
        };
        format!(
            "[[receiver]]\nname = \"events\"\ntype = \"kafka\"\nbootstrap_servers = \"{}\"\ngroup_id = \"{}\"\n\
             topics = [\"{}\"]\ncommit_interval_ms = 100\ncommit = \"{commit}\"\n\
             [receiver.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"300\"\n",
            p.bootstrap, p.group, p.topic
        )
    }

    fn start(&mut self, shared: &Shared) -> Result<Vec<Producer>, String> {
        let (p, shared) = (self.production.clone(), shared.clone());
        let producer = std::thread::spawn(move || kafka_producer(p, &shared));
        self.started_at = Instant::now();
        Ok(vec![producer])
    }

    /// A node is killed only once it consumes again (its group has committed something new
    /// since it started), or most kills would land in the group's rebalance wait.
    fn wait_working(&mut self, node: &mut Child) -> Result<(), String> {
        let resumed = wait_consuming(
            &self.reader,
            &self.production.topic,
            self.production.partitions,
            self.baseline,
            self.started_at,
            node,
        )?;
        self.resumes.push(resumed);
        Ok(())
    }

    fn killed(&mut self) {
        self.baseline = committed_sum(
            &self.reader,
            &self.production.topic,
            self.production.partitions,
        );
        self.started_at = Instant::now();
    }

    /// Waits until the node's group has committed every delivered offset (the node commits only
    /// what is durable in its WAL), at most 90 s.
    fn drain(&mut self) -> Result<(), String> {
        let ends = lock(&self.production.ends).clone();
        let t0 = Instant::now();
        loop {
            let c = committed(
                &self.reader,
                &self.production.topic,
                self.production.partitions,
            )
            .unwrap_or_default();
            let caught_up = ends
                .iter()
                .all(|(p, end)| c.get(p).is_some_and(|o| o >= end));
            if caught_up || t0.elapsed() > Duration::from_secs(90) {
                self.committed_total = Some(c.values().sum::<i64>());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn counts(&self, sent: u64, acked: usize) -> Vec<String> {
        let p = &self.production;
        vec![
            format!(
                "records produced: {sent}, acknowledged (delivered to Kafka): {acked}, delivery failures: {}",
                p.failed.load(SeqCst)
            ),
            format!(
                "offsets committed by the node: {} of {} delivered ({} partitions); producer paused for backlog: {} ms",
                self.committed_total.unwrap_or(0),
                lock(&p.ends).values().sum::<i64>(),
                p.partitions,
                p.paused_ms.load(SeqCst)
            ),
        ]
    }

    fn duplicates(&self) -> &'static str {
        "stored twice"
    }

    fn timings(&self) -> Vec<String> {
        let mut r: Vec<u128> = self.resumes.iter().map(Duration::as_millis).collect();
        r.sort_unstable();
        match (r.first(), r.last()) {
            (Some(min), Some(max)) => vec![format!(
                "consuming again ms (start to a new offset commit, group rebalance included): min {min} / median {} / max {max}",
                r[r.len() / 2],
            )],
            _ => Vec::new(),
        }
    }
}

/// What the producer thread shares with the feed.
#[derive(Clone)]
struct Production {
    bootstrap: String,
    topic: String,
    group: String,
    partitions: i32,
    rate: u64,
    max_backlog: i64,
    /// Per partition: one past the highest delivered offset.
    ends: Arc<Mutex<HashMap<i32, i64>>>,
    /// Delivery reports that failed.
    failed: Arc<AtomicU64>,
    /// Time spent paused for the group's backlog.
    paused_ms: Arc<AtomicU64>,
}

/// Counts delivery reports: a record is acknowledged once Kafka has it.
struct Counting {
    ledger: Arc<Mutex<Ledger>>,
    /// Per partition: one past the highest delivered offset.
    ends: Arc<Mutex<HashMap<i32, i64>>>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, id: Box<u64>) {
        match result {
            Ok(m) => {
                lock(&self.ledger).ack(*id);
                let mut ends = lock(&self.ends);
                let e = ends.entry(m.partition()).or_insert(0);
                *e = (*e).max(m.offset() + 1);
            }
            Err(_) => {
                self.failed.fetch_add(1, SeqCst);
            }
        }
    }
}

/// The group's committed offset per partition (partitions without one are absent).
fn committed(c: &BaseConsumer, topic: &str, partitions: i32) -> Option<HashMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(2)).ok()?;
    Some(
        got.elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
    )
}

fn committed_sum(c: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    committed(c, topic, partitions).map_or(0, |c| c.values().sum())
}

/// Waits until the group's committed offsets pass `baseline`: the node started at `since`
/// has partitions and stores records again. Returns the time since `since`.
fn wait_consuming(
    reader: &BaseConsumer,
    topic: &str,
    partitions: i32,
    baseline: i64,
    since: Instant,
    child: &mut Child,
) -> Result<Duration, String> {
    loop {
        if committed_sum(reader, topic, partitions) > baseline {
            return Ok(since.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("receiver-node exited: {status} (see its log)"));
        }
        if since.elapsed() > Duration::from_secs(60) {
            return Err(
                "receiver-node did not consume (no new offset commit) within 60 s of its start; see its log".into(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn group_reader(bootstrap: &str, group: &str) -> Result<BaseConsumer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("creating the offset reader: {e}"))
}

/// Produces numbered records at `rate`/s until `done_sending`, pausing while the node's group
/// trails by more than `max_backlog` records on a partition; then waits for every report.
fn kafka_producer(feed: Production, shared: &Shared) -> Result<(), String> {
    let Shared {
        ledger,
        next_id,
        stop,
        done_sending,
    } = shared;
    let producer: BaseProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", &feed.bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(Counting {
            ledger: ledger.clone(),
            ends: feed.ends.clone(),
            failed: feed.failed.clone(),
        })
        .map_err(|e| format!("creating the producer: {e}"))?;
    let reader = group_reader(&feed.bootstrap, &feed.group)?;
    let started = Instant::now();
    let mut produced = 0u64;
    let mut paused = Duration::ZERO;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let mut behind = false;
    while !stop.load(SeqCst) && !done_sending.load(SeqCst) {
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            let ends = lock(&feed.ends).clone();
            behind = match committed(&reader, &feed.topic, feed.partitions) {
                Some(c) => ends
                    .iter()
                    .any(|(p, end)| end - c.get(p).copied().unwrap_or(0) > feed.max_backlog),
                None => behind,
            };
        }
        if behind {
            let t = Instant::now();
            producer.poll(Duration::from_millis(20));
            paused += t.elapsed();
            feed.paused_ms.store(paused.as_millis() as u64, SeqCst);
            continue;
        }
        // Paced: as many records as the rate allows by now (time spent paused not counted).
        let due = ((started.elapsed() - paused).as_secs_f64() * feed.rate as f64) as u64;
        while produced < due && !stop.load(SeqCst) {
            let id = next_id.fetch_add(1, SeqCst);
            lock(ledger).sent_below(id + 1);
            let payload = record(id);
            let mut r = BaseRecord::<(), str, Box<u64>>::with_opaque_to(&feed.topic, Box::new(id))
                .payload(payload.as_str());
            loop {
                match producer.send(r) {
                    Ok(()) => break,
                    Err((e, back)) => {
                        if !matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ) {
                            return Err(format!("producing record {id}: {e}"));
                        }
                        r = back;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            produced += 1;
        }
        producer.poll(Duration::from_millis(5));
    }
    // Every report, so that "acknowledged" is final.
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| format!("flushing the producer: {e}"))
}

/// The mock cluster: the harness's own, in this process (it needs librdkafka for the producer
/// anyway), so it lives exactly as long as the run.
fn start_cluster(partitions: i32) -> Result<MockCluster<'static, DefaultProducerContext>, String> {
    if partitions < 1 {
        return Err("--partitions must be at least 1".into());
    }
    let cluster =
        MockCluster::new(1).map_err(|e| format!("starting the Kafka mock cluster: {e}"))?;
    cluster
        .create_topic(MOCK_TOPIC, partitions, 1)
        .map_err(|e| format!("creating topic {MOCK_TOPIC}: {e}"))?;
    Ok(cluster)
}

/// Creates `topic` on the cluster at `bootstrap`, replicated to up to 3 brokers.
pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| format!("creating a Kafka admin client for {bootstrap}: {e}"))?;
    let brokers = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| format!("reaching the Kafka cluster at {bootstrap}: {e}"))?
        .brokers()
        .len() as i32;
    let rf = brokers.clamp(1, 3);
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(rf));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for the admin client: {e}"))?;
    let results = rt
        .block_on(admin.create_topics([&new], &opts))
        .map_err(|e| format!("creating topic {topic} on {bootstrap}: {e}"))?;
    for r in results {
        r.map_err(|(t, e)| format!("creating topic {t} on {bootstrap}: {e}"))?;
    }
    // The new topic's leaders take a moment to be known.
    let t0 = Instant::now();
    loop {
        let ready = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics().first().map(|t| {
                    t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            })
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "topic {topic} on {bootstrap} has no leaders after 60 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
