//! Apache Kafka 4 in KRaft mode (`interop/kafka.xml`): one broker, or a cluster whose every node
//! is both broker and controller. With three or more brokers, topics default to replication factor
//! 3 and `min.insync.replicas = 2`; brokers can be killed and restarted on their own data.
//!
//! Every broker also has a `SASL_PLAINTEXT` listener (mechanism PLAIN, user `weir`, password
//! `weir-secret`), so that a test can show what a client without credentials is told.
//!
//! With the `kafka` feature: topic creation, a producer of numbered records and a reader of a
//! whole topic, written once for the tests.

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::{classpath, log_lines, peer_dir, LogsOnFailure, PeerProcess};
use crate::{free_port, workspace_root};

/// The heap of one broker: enough for the tests' topics, small enough for three on 2 cores.
const HEAP_MB: u32 = 384;
const STARTED: &str = "Kafka Server started";

struct Broker {
    id: i32,
    port: u16,
    sasl_port: u16,
    config: PathBuf,
    log: PathBuf,
    process: Option<PeerProcess>,
}

/// A running Kafka cluster of one or more brokers; dropping it kills them.
pub struct KafkaCluster {
    dir: PathBuf,
    brokers: Vec<Broker>,
}

impl KafkaCluster {
    /// Formats and starts `n` brokers and waits until every one has started.
    pub fn start(n: usize) -> KafkaCluster {
        assert!(n >= 1);
        let cp = classpath("kafka");
        let dir = peer_dir(&format!("kafka{n}"));
        let (rf, min_isr) = if n >= 3 { (3, 2) } else { (n, 1) };
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{}", i + 1, p.1))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = cluster_id();
        let log4j = format!(
            "-Dlog4j2.configurationFile={}",
            workspace_root().join("interop/log4j2.properties").display()
        );
        let mut brokers = Vec::new();
        let mut formats = Vec::new();
        for (i, &(port, controller, sasl_port)) in ports.iter().enumerate() {
            let id = i as i32 + 1;
            let bdir = dir.join(format!("broker{id}"));
            fs::create_dir_all(&bdir).unwrap();
            let mut c = String::new();
            writeln!(
                c,
                "process.roles=broker,controller\nnode.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller},SASL_PLAINTEXT://127.0.0.1:{sasl_port}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port}\n\
                 controller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 sasl.enabled.mechanisms=PLAIN\n\
                 listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_weir=\"weir-secret\";\n\
                 log.dirs={}\n\
                 num.partitions=1\n\
                 auto.create.topics.enable=false\n\
                 default.replication.factor={rf}\nmin.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={rf}\noffsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor={rf}\ntransaction.state.log.min.isr={min_isr}\n\
                 transaction.state.log.num.partitions=4\n\
                 group.initial.rebalance.delay.ms=0\n\
                 log.retention.check.interval.ms=1000\n\
                 broker.heartbeat.interval.ms=500\nbroker.session.timeout.ms=4000\n\
                 replica.lag.time.max.ms=5000\n\
                 num.network.threads=2\nnum.io.threads=2\nbackground.threads=2",
                bdir.join("data").display()
            )
            .unwrap();
            let config = bdir.join("server.properties");
            fs::write(&config, c).unwrap();
            let log = bdir.join("log");
            formats.push(PeerProcess::start(
                &format!("kafka storage format {id}"),
                &cp,
                256,
                std::slice::from_ref(&log4j),
                "kafka.tools.StorageTool",
                &[
                    "format".into(),
                    "-t".into(),
                    cluster_id.clone(),
                    "-c".into(),
                    config.display().to_string(),
                ],
                &bdir.join("format.log"),
            ));
            brokers.push(Broker {
                id,
                port,
                sasl_port,
                config,
                log,
                process: None,
            });
        }
        for (f, b) in formats.iter_mut().zip(&brokers) {
            f.wait_for_log("Formatting", 0, Duration::from_secs(60));
            wait_exited(f, b.id);
        }
        let mut cluster = KafkaCluster { dir, brokers };
        for i in 0..n {
            cluster.launch(i);
        }
        for i in 0..n {
            cluster.wait_started(i, 0);
        }
        cluster
    }

    fn launch(&mut self, i: usize) {
        let cp = classpath("kafka");
        let b = &mut self.brokers[i];
        let log4j = format!(
            "-Dlog4j2.configurationFile={}",
            workspace_root().join("interop/log4j2.properties").display()
        );
        b.process = Some(PeerProcess::start(
            &format!("kafka broker {}", b.id),
            &cp,
            HEAP_MB,
            &[log4j, "-XX:TieredStopAtLevel=1".into()],
            "kafka.Kafka",
            &[b.config.display().to_string()],
            &b.log,
        ));
    }

    fn wait_started(&mut self, i: usize, from_line: usize) {
        let b = &mut self.brokers[i];
        b.process
            .as_mut()
            .unwrap()
            .wait_for_log(STARTED, from_line, Duration::from_secs(90));
    }

    /// Every broker's client address, comma-separated (what `bootstrap.servers` takes).
    pub fn bootstrap(&self) -> String {
        self.brokers
            .iter()
            .map(|b| format!("127.0.0.1:{}", b.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The brokers' `SASL_PLAINTEXT` listeners (PLAIN; user `weir`, password `weir-secret`).
    pub fn sasl_bootstrap(&self) -> String {
        self.brokers
            .iter()
            .map(|b| format!("127.0.0.1:{}", b.sasl_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The broker ids (1..=n).
    pub fn broker_ids(&self) -> Vec<i32> {
        self.brokers.iter().map(|b| b.id).collect()
    }

    /// Kills broker `id` at once (SIGKILL).
    pub fn kill(&mut self, id: i32) {
        let b = self.broker(id);
        if let Some(mut p) = b.process.take() {
            p.kill();
        }
    }

    /// Stops every broker where it is (SIGSTOP): requests hang, as in a partition, until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        for b in &self.brokers {
            if let Some(p) = &b.process {
                p.pause();
            }
        }
    }

    /// Lets [`pause`](Self::pause)d brokers go on (SIGCONT).
    pub fn resume(&self) {
        for b in &self.brokers {
            if let Some(p) = &b.process {
                p.resume();
            }
        }
    }

    /// Starts broker `id` again on its data and waits until it has started.
    pub fn restart(&mut self, id: i32) {
        let i = self.index(id);
        let from = log_lines(&self.brokers[i].log).len();
        self.launch(i);
        self.wait_started(i, from);
    }

    /// A guard that keeps this cluster's logs if the test panics.
    pub fn logs_on_failure(&self) -> LogsOnFailure {
        LogsOnFailure {
            what: "the Kafka cluster".into(),
            dir: self.dir.clone(),
        }
    }

    fn index(&self, id: i32) -> usize {
        self.brokers
            .iter()
            .position(|b| b.id == id)
            .unwrap_or_else(|| panic!("no broker {id}"))
    }

    fn broker(&mut self, id: i32) -> &mut Broker {
        let i = self.index(id);
        &mut self.brokers[i]
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for b in &mut self.brokers {
            b.process.take();
        }
        if std::thread::panicking() {
            eprintln!(
                "the Kafka cluster's logs are kept in {}",
                self.dir.display()
            );
            let _ = fs::write(self.dir.join("keep"), b"");
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn wait_exited(p: &mut PeerProcess, id: i32) {
    for _ in 0..600 {
        if !p.running() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("formatting the storage of broker {id} did not end");
}

/// A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.
fn cluster_id() -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32);
    let mut x = seed | 1;
    let mut bits = Vec::new();
    for _ in 0..22 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bits.push(B64[(x % 64) as usize]);
    }
    // Not a leading '-': kafka-storage's argument parser would take the id for an option
    // ("argument --cluster-id/-t: expected one argument"; one start in 64 failed so).
    bits[0] = B64[(seed % 52) as usize];
    // 22 characters carry 132 bits; the last must leave the 4 padding bits zero.
    let last = bits.len() - 1;
    bits[last] = B64[(x % 4 * 16) as usize];
    String::from_utf8(bits).unwrap()
}

/// One single-broker cluster for the whole test binary, started on first use.
pub fn shared() -> &'static KafkaCluster {
    static SHARED: OnceLock<KafkaCluster> = OnceLock::new();
    SHARED.get_or_init(|| KafkaCluster::start(1))
}

#[cfg(feature = "kafka")]
pub use client::*;

#[cfg(feature = "kafka")]
mod client {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Mutex;
    use std::time::Duration;

    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::RDKafkaErrorCode;
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
    use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

    /// Creates `topic` with `partitions` partitions, replication factor `rf` and topic `configs`;
    /// waits until every partition has a leader.
    pub fn create_topic(
        bootstrap: &str,
        topic: &str,
        partitions: i32,
        rf: i32,
        configs: &[(&str, &str)],
    ) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .expect("an admin client");
        let mut t = NewTopic::new(topic, partitions, TopicReplication::Fixed(rf));
        for (k, v) in configs {
            t = t.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        // On a thread of its own, so that async tests can call this too.
        let res = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(admin.create_topics([&t], &opts))
            })
            .join()
            .unwrap()
        })
        .expect("create_topics");
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .unwrap();
        crate::wait_until(
            &format!("leaders for {topic}"),
            Duration::from_secs(60),
            || {
                probe
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics().first().map(|t| {
                            t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                    })
                    .unwrap_or(false)
            },
        );
    }

    /// Counts failed deliveries.
    #[derive(Default)]
    struct Deliveries {
        failed: AtomicU64,
        last_error: Mutex<Option<String>>,
    }

    impl ClientContext for Deliveries {}

    impl ProducerContext for Deliveries {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if let Err((e, _)) = result {
                self.failed.fetch_add(1, SeqCst);
                *self.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }

    /// Produces records `m<i>` with keys `k<i>` for `i` in `from..to` (spread over the
    /// partitions by key), with `acks=all` and idempotence, and waits until every one is
    /// delivered; panics on a failed delivery. Callable from async tests (it does not block on a
    /// runtime).
    pub fn produce(bootstrap: &str, topic: &str, from: u64, to: u64) {
        TestProducer::new(bootstrap).produce(topic, from, to);
    }

    /// One producer (`acks=all`, idempotent, librdkafka's default retries) for several
    /// [`TestProducer::produce`] calls.
    pub struct TestProducer(BaseProducer<Deliveries>);

    impl TestProducer {
        pub fn new(bootstrap: &str) -> TestProducer {
            TestProducer(
                ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .set("acks", "all")
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "5")
                    .create_with_context(Deliveries::default())
                    .expect("a producer"),
            )
        }

        /// Sends `m<i>` (key `k<i>`) for `i` in `from..to` and waits until every one is
        /// acknowledged; panics on a failed delivery.
        pub fn produce(&self, topic: &str, from: u64, to: u64) {
            let p = &self.0;
            for i in from..to {
                let payload = format!("m{i}");
                let key = format!("k{i}");
                let mut record = BaseRecord::to(topic).payload(&payload).key(&key);
                while let Err((e, r)) = p.send(record) {
                    assert_eq!(
                        e.rdkafka_error_code(),
                        Some(RDKafkaErrorCode::QueueFull),
                        "producing to {topic}: {e}"
                    );
                    p.poll(Duration::from_millis(10));
                    record = r;
                }
            }
            p.flush(Duration::from_secs(120))
                .expect("flushing the producer");
            let ctx = p.context();
            assert_eq!(
                ctx.failed.load(SeqCst),
                0,
                "deliveries to {topic} failed: {:?}",
                ctx.last_error.lock().unwrap()
            );
        }
    }

    /// `group`'s committed offset of each of `topic`'s partitions `0..n` (`None` where nothing is
    /// committed), or `None` when the coordinator did not answer within 10 s.
    pub fn committed_offsets(
        bootstrap: &str,
        group: &str,
        topic: &str,
        n: i32,
    ) -> Option<Vec<Option<i64>>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .create()
            .expect("a consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition(topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
        Some(
            (0..n)
                .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                })
                .collect(),
        )
    }

    /// Every record of `topic` (`read_committed` when `committed_only`), as payload -> count.
    pub fn read_all(bootstrap: &str, topic: &str, committed_only: bool) -> BTreeMap<Vec<u8>, u32> {
        let mut out = BTreeMap::new();
        read_each(bootstrap, topic, committed_only, |m| {
            *out.entry(m.payload().unwrap_or_default().to_vec())
                .or_insert(0) += 1;
        });
        out
    }

    /// Calls `f` with every record of `topic` from the beginning of each partition to its high
    /// watermark as it was when the call began (`read_committed` when `committed_only`).
    pub fn read_each(
        bootstrap: &str,
        topic: &str,
        committed_only: bool,
        mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
    ) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "weir-testkit-reader")
            .set("enable.auto.commit", "false")
            .set(
                "isolation.level",
                if committed_only {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create()
            .expect("a consumer");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let parts = md.topics()[0].partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..parts {
            let (_, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            ends.insert(p, hi);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut pos: BTreeMap<i32, i64> = BTreeMap::new();
        let t0 = std::time::Instant::now();
        let done = |pos: &BTreeMap<i32, i64>, c: &BaseConsumer| {
            ends.iter().all(|(p, hi)| {
                pos.get(p).is_some_and(|o| o + 1 >= *hi)
                    || *hi == 0
                    || c.position()
                        .ok()
                        .and_then(|tpl| {
                            tpl.find_partition(topic, *p).map(|e| match e.offset() {
                                Offset::Offset(o) => o >= *hi,
                                _ => false,
                            })
                        })
                        .unwrap_or(false)
            })
        };
        while !done(&pos, &c) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "reading {topic} did not reach its end"
            );
            if let Some(m) = c.poll(Duration::from_millis(200)) {
                let m = m.expect("a record");
                pos.insert(m.partition(), m.offset());
                f(&m);
            }
        }
    }
}
