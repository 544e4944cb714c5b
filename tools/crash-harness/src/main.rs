//! `crash-harness`: proves zero data loss by killing the real `receiver-node`.
//!
//! It writes a configuration of its own (fsync `always`, a `dir` output in `lines` format),
//! starts `receiver-node`, and feeds it numbered records from one of two sources:
//!
//! - `--source socket` (default): a socket receiver in `frames` mode on a free loopback port;
//!   producers send records and record every acknowledgement (the cumulative durable count the
//!   node writes back), reconnect after a kill and resend what was not acknowledged.
//! - `--source kafka`: librdkafka's mock cluster, started in this process, with a topic of
//!   `--partitions` partitions; an idempotent producer sends records at `--rate` per second and
//!   counts every record whose delivery report succeeded ("acknowledged" below means delivered
//!   to Kafka); the node consumes with the Kafka receiver (consumer-group mode). The producer
//!   pauses while the group's committed offsets trail what was delivered by more than
//!   `--max-backlog` records on a partition, so the mock's retention (about 5 MiB or 100,000
//!   records per partition) never drops a record the node has not stored.
//!
//! At random moments (seeded, reproducible) it SIGKILLs the node and starts it again, K times.
//! Then it lets the node drain (socket: every record sent is acknowledged; Kafka: the group has
//! committed every delivered offset), stops it with SIGTERM (which must exit 0), and reads every
//! batch file:
//!
//! - missing: acknowledged records absent from the output (must be 0),
//! - duplicates: records present more than once (socket: resent after a kill; Kafka: stored
//!   twice — 0 expected on one node, which resumes after the highest offset in its WAL),
//! - corrupt: output lines that are not records the producer sent,
//! - unacked but present: sent, never acknowledged (the node died first), yet stored,
//! - kills, and the recovery time of each restart (start to `/health` answering 200).
//!
//! `--source kafka` feeds a Kafka receiver from an in-process mock cluster; `--source flume`
//! pushes `appendBatch` calls to a Flume Avro source (acknowledged = answered `OK`); `--source
//! flume-pull` pushes to an in-process pull sink that the node's `flume_pull` receiver polls.
//!
//! Exit status: 0 if nothing acknowledged is missing and nothing is corrupt, 1 otherwise, 2 on
//! usage or setup errors.
//!
//! ```text
//! cargo build --release --bins
//! target/release/crash-harness --kills 300 --seed 7          # a long run
//! target/release/crash-harness --source kafka --kills 20     # the Kafka receiver
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, DeliveryResult, Producer, ProducerContext,
};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use weir_receiver::lock;

/// Where the records come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// Producers connected to a `frames` socket receiver, acknowledged by the node.
    Socket,
    /// A topic of an in-process Kafka mock cluster, consumed by the Kafka receiver.
    Kafka,
    /// Flume agents (`appendBatch` calls) pushing to the node's Flume Avro source; a call's
    /// events count as acknowledged when it is answered `OK`.
    Flume,
    /// Flume agents pushing to an in-process pull sink, which the node's `flume_pull` receiver
    /// polls; events count as acknowledged when the sink answered the push `OK` (the sink then
    /// holds them until the node acks them durable).
    FlumePull,
}

#[derive(Debug, Parser)]
#[command(
    name = "crash-harness",
    version,
    about = "Kill receiver-node at random moments and check that nothing acknowledged is lost"
)]
struct Opts {
    /// How many times to SIGKILL the node.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// Seed of the kill schedule and the record sizes (the same seed, the same schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shortest time between a (re)start being healthy and the next kill, ms.
    #[arg(long, default_value_t = 200)]
    min_ms: u64,
    /// Longest time between a (re)start being healthy and the next kill, ms.
    #[arg(long, default_value_t = 1500)]
    max_ms: u64,
    /// Working directory (data, output, logs); a fresh temporary one if not given.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The receiver-node binary; default: the one next to this binary.
    #[arg(long)]
    node: Option<PathBuf>,
    /// Producer connections sending at once (socket and Flume sources).
    #[arg(long, default_value_t = 2)]
    producers: u32,
    /// Where the records come from.
    #[arg(long, value_enum, default_value_t = Source::Socket)]
    source: Source,
    /// Partitions of the topic (Kafka source).
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Records produced per second (Kafka source).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Pause producing while the group's committed offset trails the delivered ones by more
    /// than this many records on some partition (Kafka source; keep it well under the mock
    /// cluster's retention of ~5 MiB or 100,000 records per partition).
    #[arg(long, default_value_t = 20_000)]
    max_backlog: i64,
}

/// splitmix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What the producers know.
#[derive(Default)]
struct Ledger {
    /// Every record id ever sent (first send).
    sent: u64,
    /// Ids acknowledged durable.
    acked: Vec<bool>,
}

fn record(id: u64) -> String {
    // Sizes vary with the id; the id leads so the verifier can parse any line.
    let pad = (id.wrapping_mul(2_654_435_761) % 120) as usize;
    format!("rec-{id:012}-{}", "x".repeat(pad))
}

fn parse_record(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("rec-")?;
    let (id, pad) = rest.split_at_checked(12)?;
    let id: u64 = id.parse().ok()?;
    let pad = pad.strip_prefix('-')?;
    (record(id) == format!("rec-{id:012}-{pad}")).then_some(id)
}

/// One producer: sends frames, reads cumulative acks, reconnects and resends the unacked.
fn producer(
    addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done_sending: Arc<AtomicBool>,
) {
    let mut unacked: Vec<u64> = Vec::new();
    while !stop.load(SeqCst) {
        let Ok(mut conn) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(Duration::from_millis(20)));
        // This connection's records, in send order: resends first.
        let mut on_conn: Vec<u64> = std::mem::take(&mut unacked);
        let mut acked_on_conn = 0usize;
        let mut written = 0usize;
        let mut ack_buf = [0u8; 8];
        let mut ack_fill = 0;
        let broken = loop {
            if stop.load(SeqCst) {
                break false;
            }
            // Keep up to 2,000 records in flight on this connection.
            if on_conn.len() - acked_on_conn < 2_000 && !done_sending.load(SeqCst) {
                for _ in 0..200 {
                    let id = next_id.fetch_add(1, SeqCst);
                    on_conn.push(id);
                    let mut l = lock(&ledger);
                    l.sent = l.sent.max(id + 1);
                }
            }
            let mut frame = Vec::new();
            for id in &on_conn[written..] {
                let p = record(*id);
                frame.extend_from_slice(&(p.len() as u32).to_be_bytes());
                frame.extend_from_slice(p.as_bytes());
            }
            if !frame.is_empty() {
                if conn.write_all(&frame).is_err() {
                    break true;
                }
                written = on_conn.len();
            }
            match conn.read(&mut ack_buf[ack_fill..]) {
                Ok(0) => break true,
                Ok(n) => {
                    ack_fill += n;
                    if ack_fill == 8 {
                        ack_fill = 0;
                        let count = u64::from_be_bytes(ack_buf) as usize;
                        if count > on_conn.len() {
                            eprintln!("crash-harness: PROTOCOL ERROR: ack {count} > {} records sent on this connection", on_conn.len());
                            std::process::exit(1);
                        }
                        let mut l = lock(&ledger);
                        for id in &on_conn[acked_on_conn.min(count)..count] {
                            let i = *id as usize;
                            if l.acked.len() <= i {
                                l.acked.resize(i + 1, false);
                            }
                            l.acked[i] = true;
                        }
                        acked_on_conn = acked_on_conn.max(count);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if done_sending.load(SeqCst) && acked_on_conn == on_conn.len() {
                        break false;
                    }
                }
                Err(_) => break true,
            }
        };
        unacked = on_conn[acked_on_conn..].to_vec();
        if !broken && unacked.is_empty() && done_sending.load(SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Events per `appendBatch` call of the Flume producers.
const FLUME_BATCH: u64 = 100;

/// One Flume agent: `appendBatch` calls of numbered events, one at a time; a call answered `OK`
/// acknowledges its events; after `FAILED`, an error or a broken connection the same events are
/// sent again (on a new connection).
fn flume_producer(
    addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done_sending: Arc<AtomicBool>,
) -> Result<(), String> {
    use weir_flume::flume::{self, Status, AVRO_SOURCE_LEGACY};
    use weir_flume::ipc::client::Client;
    use weir_flume::ipc::frame::FrameLimits;
    use weir_flume::ipc::protocol::Protocol;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let protocol = Protocol::parse(AVRO_SOURCE_LEGACY).map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut pending: Vec<u64> = Vec::new();
        while !stop.load(SeqCst) {
            let limits = FrameLimits {
                max_frame_bytes: 1 << 24,
                max_buffers: 1 << 12,
            };
            let timeout = Duration::from_secs(10);
            let address = addr.to_string();
            let Ok(mut conn) =
                Client::connect(&address, protocol.clone(), false, limits, timeout).await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            loop {
                if stop.load(SeqCst) {
                    return Ok(());
                }
                if pending.is_empty() {
                    if done_sending.load(SeqCst) {
                        return Ok(());
                    }
                    let first = next_id.fetch_add(FLUME_BATCH, SeqCst);
                    pending = (first..first + FLUME_BATCH).collect();
                    let mut l = lock(&ledger);
                    l.sent = l.sent.max(first + FLUME_BATCH);
                }
                let events: Vec<(Vec<(String, String)>, bytes::Bytes)> = pending
                    .iter()
                    .map(|id| (Vec::new(), bytes::Bytes::from(record(*id))))
                    .collect();
                let params = flume::encode_append_batch(&events);
                let status = match conn.call(flume::APPEND_BATCH, &params).await {
                    Ok(Ok(mut r)) => Status::decode(&mut r).ok(),
                    Ok(Err(_)) | Err(_) => None,
                };
                match status {
                    Some(Status::Ok) => {
                        let mut l = lock(&ledger);
                        for id in pending.drain(..) {
                            let i = id as usize;
                            if l.acked.len() <= i {
                                l.acked.resize(i + 1, false);
                            }
                            l.acked[i] = true;
                        }
                    }
                    // FAILED: the node could not make them durable; send them again.
                    Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    // No answer: the node died; reconnect and send them again.
                    None => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}

fn healthy(metrics: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&metrics, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 32];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

fn start_node(node: &Path, config: &Path, log: &Path) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(node)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
}

fn wait_healthy(child: &mut Child, metrics: SocketAddr) -> Result<Duration, String> {
    let t0 = Instant::now();
    while !healthy(metrics) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("receiver-node exited during recovery: {status}"));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("receiver-node not healthy after 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t0.elapsed())
}

fn main() -> ExitCode {
    let o = Opts::parse();
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("crash-harness: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The Kafka topic the harness produces to and the node consumes.
const TOPIC: &str = "events";
/// The node's consumer group.
const GROUP: &str = "crash-harness";

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
                {
                    let mut l = lock(&self.ledger);
                    let i = *id as usize;
                    if l.acked.len() <= i {
                        l.acked.resize(i + 1, false);
                    }
                    l.acked[i] = true;
                }
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
fn committed(c: &BaseConsumer, partitions: i32) -> Option<HashMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(TOPIC, p);
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

fn committed_sum(c: &BaseConsumer, partitions: i32) -> i64 {
    committed(c, partitions).map_or(0, |c| c.values().sum())
}

/// Waits until the group's committed offsets pass `baseline`: the node started at `since`
/// has partitions and stores records again. Returns the time since `since`.
fn wait_consuming(
    reader: &BaseConsumer,
    partitions: i32,
    baseline: i64,
    since: Instant,
    child: &mut Child,
) -> Result<Duration, String> {
    loop {
        if committed_sum(reader, partitions) > baseline {
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

fn group_reader(bootstrap: &str) -> Result<BaseConsumer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("creating the offset reader: {e}"))
}

/// What the Kafka producer shares with the main thread.
#[derive(Clone)]
struct KafkaFeed {
    bootstrap: String,
    partitions: i32,
    rate: u64,
    max_backlog: i64,
    ends: Arc<Mutex<HashMap<i32, i64>>>,
    failed: Arc<AtomicU64>,
    paused_ms: Arc<AtomicU64>,
}

/// Produces numbered records at `rate`/s until `done_sending`, pausing while the node's group
/// trails by more than `max_backlog` records on a partition; then waits for every report.
fn kafka_producer(
    feed: KafkaFeed,
    ledger: Arc<Mutex<Ledger>>,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done_sending: Arc<AtomicBool>,
) -> Result<(), String> {
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
    let reader = group_reader(&feed.bootstrap)?;
    let started = Instant::now();
    let mut produced = 0u64;
    let mut paused = Duration::ZERO;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let mut behind = false;
    while !stop.load(SeqCst) && !done_sending.load(SeqCst) {
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            let ends = lock(&feed.ends).clone();
            behind = match committed(&reader, feed.partitions) {
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
            lock(&ledger).sent = id + 1;
            let payload = record(id);
            let mut r = BaseRecord::<(), str, Box<u64>>::with_opaque_to(TOPIC, Box::new(id))
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
        .create_topic(TOPIC, partitions, 1)
        .map_err(|e| format!("creating topic {TOPIC}: {e}"))?;
    Ok(cluster)
}

fn run(o: &Opts) -> Result<bool, String> {
    if o.min_ms > o.max_ms {
        return Err("--min-ms must not exceed --max-ms".into());
    }
    if o.source == Source::Kafka && (o.rate == 0 || o.max_backlog < 1) {
        return Err("--rate and --max-backlog must be at least 1".into());
    }
    let node = match &o.node {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("receiver-node"),
    };
    if !node.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --bins) or pass --node",
            node.display()
        ));
    }
    let tmp;
    let dir = match &o.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port().map_err(|e| e.to_string())?;
    let mport = free_port().map_err(|e| e.to_string())?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let maddr: SocketAddr = ([127, 0, 0, 1], mport).into();
    let out_dir = dir.join("out");
    let config = dir.join("node.toml");
    let log = dir.join("node.log");
    let cluster = match o.source {
        Source::Kafka => Some(start_cluster(o.partitions)?),
        _ => None,
    };
    // Flume pull: the sink runs in this process (it is not what is being killed) on a runtime
    // of its own; its transactions time out after 3 s, so a batch a killed node held comes back
    // soon.
    let sink_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let sink = if o.source == Source::FlumePull {
        let mut c = weir_node::sink::PullSinkConfig {
            data_dir: dir.join("sink"),
            ..weir_node::sink::PullSinkConfig::default()
        };
        c.push.address = "127.0.0.1:0".into();
        c.pull.address = "127.0.0.1:0".into();
        c.queue.tx_timeout_ms = 3000;
        c.queue.empty_wait_ms = 200;
        Some(
            sink_rt
                .block_on(weir_node::sink::PullSink::start(c))
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let receiver = match &cluster {
        None if o.source == Source::Flume => format!(
            "[[receiver]]\nname = \"flume\"\ntype = \"flume\"\naddress = \"{addr}\"\n"
        ),
        None if o.source == Source::FlumePull => format!(
            "[[receiver]]\nname = \"pulled\"\ntype = \"flume_pull\"\naddresses = [\"{}\"]\nworkers = 2\n\
             max_batch = 500\npoll_interval_ms = 50\nreconnect_backoff_max_ms = 500\n",
            sink.as_ref().map(|s| s.pull_addr).unwrap_or(addr)
        ),
        None => format!(
            "[[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"{addr}\"\nprotocol = \"frames\"\n"
        ),
        // Short session timeouts: a killed node's membership ends soon, so its restart gets
        // the partitions back within seconds.
        Some(c) => format!(
            "[[receiver]]\nname = \"events\"\ntype = \"kafka\"\nbootstrap_servers = \"{}\"\ngroup_id = \"{GROUP}\"\n\
             topics = [\"{TOPIC}\"]\ncommit_interval_ms = 100\n\
             [receiver.properties]\n\"session.timeout.ms\" = \"4000\"\n\"heartbeat.interval.ms\" = \"300\"\n",
            c.bootstrap_servers()
        ),
    };
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\n\
             {receiver}\n\
             [[output]]\ntype = \"dir\"\npath = {out:?}\nformat = \"lines\"\n\n[metrics]\naddress = \"{maddr}\"\n",
            data = dir.join("data").display().to_string(),
            out = out_dir.display().to_string(),
        ),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "crash-harness: source {}, seed {}, {} kills, work dir {}, node log {}",
        match o.source {
            Source::Socket => "socket",
            Source::Kafka => "kafka",
            Source::Flume => "flume",
            Source::FlumePull => "flume-pull",
        },
        o.seed,
        o.kills,
        dir.display(),
        log.display()
    );

    let mut rng = Rng(o.seed);
    let mut child = start_node(&node, &config, &log)
        .map_err(|e| format!("starting {}: {e}", node.display()))?;
    let mut recoveries = vec![wait_healthy(&mut child, maddr)?];

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next_id = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done_sending = Arc::new(AtomicBool::new(false));
    let feed = cluster.as_ref().map(|c| KafkaFeed {
        bootstrap: c.bootstrap_servers(),
        partitions: o.partitions,
        rate: o.rate,
        max_backlog: o.max_backlog,
        ends: Arc::default(),
        failed: Arc::default(),
        paused_ms: Arc::default(),
    });
    let push_to = match &sink {
        Some(s) => s.push_addr,
        None => addr,
    };
    let producers: Vec<std::thread::JoinHandle<Result<(), String>>> = match &feed {
        None if matches!(o.source, Source::Flume | Source::FlumePull) => (0..o.producers)
            .map(|_| {
                let (l, n, s, d) = (
                    ledger.clone(),
                    next_id.clone(),
                    stop.clone(),
                    done_sending.clone(),
                );
                std::thread::spawn(move || flume_producer(push_to, l, n, s, d))
            })
            .collect(),
        None => (0..o.producers)
            .map(|_| {
                let (l, n, s, d) = (
                    ledger.clone(),
                    next_id.clone(),
                    stop.clone(),
                    done_sending.clone(),
                );
                std::thread::spawn(move || {
                    producer(addr, l, n, s, d);
                    Ok(())
                })
            })
            .collect(),
        Some(feed) => {
            let (f, l, n, s, d) = (
                feed.clone(),
                ledger.clone(),
                next_id.clone(),
                stop.clone(),
                done_sending.clone(),
            );
            vec![std::thread::spawn(move || kafka_producer(f, l, n, s, d))]
        }
    };

    // Kafka: a node is killed only once it consumes again (its group has committed something
    // new since it started), or most kills would land in the group's rebalance wait.
    let reader = match &feed {
        Some(f) => Some(group_reader(&f.bootstrap)?),
        None => None,
    };
    let mut resumes = Vec::new();
    let mut baseline = 0;
    let mut started_at = Instant::now();
    for k in 0..o.kills {
        if let (Some(reader), Some(feed)) = (&reader, &feed) {
            resumes.push(wait_consuming(
                reader,
                feed.partitions,
                baseline,
                started_at,
                &mut child,
            )?);
        }
        std::thread::sleep(Duration::from_millis(rng.range(o.min_ms, o.max_ms)));
        child.kill().map_err(|e| format!("SIGKILL: {e}"))?;
        let _ = child.wait();
        let acked = lock(&ledger).acked.iter().filter(|a| **a).count();
        if let (Some(reader), Some(feed)) = (&reader, &feed) {
            baseline = committed_sum(reader, feed.partitions);
        }
        started_at = Instant::now();
        child = start_node(&node, &config, &log).map_err(|e| e.to_string())?;
        let r = wait_healthy(&mut child, maddr)?;
        println!(
            "  kill {}: {acked} records acknowledged so far; recovered in {} ms",
            k + 1,
            r.as_millis()
        );
        recoveries.push(r);
    }
    if let (Some(reader), Some(feed)) = (&reader, &feed) {
        resumes.push(wait_consuming(
            reader,
            feed.partitions,
            baseline,
            started_at,
            &mut child,
        )?);
    }
    // Drain: stop sending new records, wait for every sent record to be acknowledged.
    done_sending.store(true, SeqCst);
    let t0 = Instant::now();
    let mut producer_error = None;
    for p in producers {
        let left = Duration::from_secs(90).saturating_sub(t0.elapsed());
        let deadline = Instant::now() + left;
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !p.is_finished() {
            stop.store(true, SeqCst);
        }
        if let Ok(Err(e)) = p.join() {
            producer_error.get_or_insert(e);
        }
    }
    stop.store(true, SeqCst);
    if let Some(e) = producer_error {
        let _ = child.kill();
        return Err(e);
    }
    // Kafka: wait until the node's group has committed every delivered offset (the node
    // commits only what is durable in its WAL).
    let mut committed_total = None;
    if let Some(feed) = &feed {
        let reader = group_reader(&feed.bootstrap)?;
        let ends = lock(&feed.ends).clone();
        let t0 = Instant::now();
        loop {
            let c = committed(&reader, feed.partitions).unwrap_or_default();
            let caught_up = ends
                .iter()
                .all(|(p, end)| c.get(p).is_some_and(|o| o >= end));
            if caught_up || t0.elapsed() > Duration::from_secs(90) {
                committed_total = Some(c.values().sum::<i64>());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Flume pull: wait until the node has acked everything the sink holds (it acks only what
    // is durable in its WAL; batches a killed node held come back after the sink's timeout).
    if let Some(sink) = &sink {
        let t0 = Instant::now();
        while sink.queue().stats().events_queued.load(SeqCst) > 0 {
            if t0.elapsed() > Duration::from_secs(90) {
                println!(
                    "  the sink still holds {} unacked events after 90 s",
                    sink.queue().stats().events_queued.load(SeqCst)
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Graceful stop: SIGTERM, exit 0 within the drain time.
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };

    // Verify the output.
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut corrupt = 0u64;
    let mut files = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&out_dir)
        .map_err(|e| format!("{}: {e}", out_dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("batch-"))
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        files += 1;
        let text =
            std::fs::read(e.path()).map_err(|err| format!("{}: {err}", e.path().display()))?;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match std::str::from_utf8(line).ok().and_then(parse_record) {
                Some(id) => *seen.entry(id).or_default() += 1,
                None => corrupt += 1,
            }
        }
    }
    let l = lock(&ledger);
    let acked: Vec<u64> = l
        .acked
        .iter()
        .enumerate()
        .filter(|(_, a)| **a)
        .map(|(i, _)| i as u64)
        .collect();
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|id| !seen.contains_key(id))
        .collect();
    let duplicates: u64 = seen.values().map(|c| u64::from(c.saturating_sub(1))).sum();
    let never_sent = seen.keys().filter(|id| **id >= l.sent).count();
    let unacked_present = seen
        .keys()
        .filter(|id| !l.acked.get(**id as usize).copied().unwrap_or(false))
        .count();
    let mut rec: Vec<u128> = recoveries.iter().map(Duration::as_millis).collect();
    rec.sort_unstable();
    println!("crash-harness report (seed {}):", o.seed);
    println!("  kills: {}", o.kills);
    match &feed {
        None => println!("  records sent: {}, acknowledged: {}", l.sent, acked.len()),
        Some(feed) => {
            println!(
                "  records produced: {}, acknowledged (delivered to Kafka): {}, delivery failures: {}",
                l.sent,
                acked.len(),
                feed.failed.load(SeqCst)
            );
            println!(
                "  offsets committed by the node: {} of {} delivered ({} partitions); producer paused for backlog: {} ms",
                committed_total.unwrap_or(0),
                lock(&feed.ends).values().sum::<i64>(),
                feed.partitions,
                feed.paused_ms.load(SeqCst)
            );
        }
    }
    println!(
        "  batch files: {files}, distinct records in output: {}",
        seen.len()
    );
    println!("  MISSING (acknowledged, not in output): {}", missing.len());
    match o.source {
        Source::Socket | Source::Flume => {
            println!("  duplicates (resent after a kill): {duplicates}")
        }
        Source::FlumePull => {
            println!("  duplicates (served again after a kill, at-least-once): {duplicates}")
        }
        Source::Kafka => println!("  duplicates (stored twice): {duplicates}"),
    }
    println!("  corrupt lines: {}", corrupt + never_sent as u64);
    println!("  unacknowledged but present: {unacked_present}");
    println!(
        "  recovery ms (start to healthy): min {} / median {} / max {}",
        rec.first().copied().unwrap_or(0),
        rec.get(rec.len() / 2).copied().unwrap_or(0),
        rec.last().copied().unwrap_or(0)
    );
    if !resumes.is_empty() {
        let mut r: Vec<u128> = resumes.iter().map(Duration::as_millis).collect();
        r.sort_unstable();
        println!(
            "  consuming again ms (start to a new offset commit, group rebalance included): min {} / median {} / max {}",
            r[0],
            r[r.len() / 2],
            r[r.len() - 1]
        );
    }
    let graceful = matches!(status, Some(s) if s.success());
    println!(
        "  graceful stop: {}",
        match status {
            Some(s) => s.to_string(),
            None => "did not exit within 60 s (killed)".into(),
        }
    );
    if !missing.is_empty() {
        println!(
            "  first missing ids: {:?}",
            &missing[..missing.len().min(10)]
        );
    }
    let ok = missing.is_empty() && corrupt == 0 && never_sent == 0 && graceful && !acked.is_empty();
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_rejected() {
        for id in [0, 1, 77, 123_456_789] {
            assert_eq!(parse_record(&record(id)), Some(id));
        }
        assert_eq!(parse_record("rec-000000000001-xxxxxxxxxxxx"), None);
        assert_eq!(parse_record("hello"), None);
        assert_eq!(parse_record(&record(5)[..10]), None);
    }
}
