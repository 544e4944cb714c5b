//! What replicated acknowledgements cost: ingest at a fixed rate with replication off, to an
//! object store (moto's S3 server), and to a Kafka topic on three brokers, in one sitting.
//!
//! ```text
//! cargo bench --bench replica                                  # 100,000 records/s, 100 B, 10 s each
//! cargo bench --bench replica -- --rate 50000 --secs 20 --replicas off,kafka,off,kafka
//! ```
//!
//! The peers are started here (moto from the repository's `.venv`, three Kafka brokers from
//! `interop/lib`), once. Each scenario runs in a child process: one receiver calls `store()` with
//! `--per-call` records at the paced `--rate` (fsync `always`, block interval 20 ms), and the
//! bench prints acknowledged records/s, the ack latency (from each `store()` call to its
//! acknowledgement) p50 / p99 / p99.9, replica writes/s, and replica bytes per acknowledged
//! payload byte. The anchor is `off` in the same sitting (the median p99 of its runs): the
//! target is at most 10 ms more at p99 for Kafka at 100,000 records/s. Measure for longer than
//! the Kafka replica's background commit interval (30 s) to see its commits.
//!
//! On one machine the brokers' writes (three copies of every byte) share the disk with the
//! node's WAL fsyncs, which a real deployment does not: `WEIR_PEER_DIR=/dev/shm/weir-peers`
//! puts the peers' data on tmpfs. The bench prints where they are.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::receiver::{Receiver, ReceiverContext, ReceiverError, Record};
use weir::replica::{KafkaReplicaConfig, ObjectStoreConfig, ReplicationConfig};
use weir::{StreamingConfig, StreamingContext};

mod common;
use common::*;

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

#[derive(Debug, Clone)]
struct Opts {
    rate: u64,
    secs: f64,
    warmup: f64,
    record_bytes: usize,
    per_call: usize,
    replicas: Vec<String>,
    /// In a child: the scenario and the peer's address.
    child: Option<(String, String)>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        rate: 100_000,
        secs: 10.0,
        warmup: 3.0,
        record_bytes: 100,
        per_call: 100,
        replicas: vec!["off".into(), "s3".into(), "kafka".into()],
        child: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--rate" => o.rate = val("--rate").parse().expect("--rate: records/s"),
            "--secs" => o.secs = val("--secs").parse().expect("--secs: seconds"),
            "--warmup" => o.warmup = val("--warmup").parse().expect("--warmup: seconds"),
            "--record-bytes" => o.record_bytes = val("--record-bytes").parse().expect("bytes"),
            "--per-call" => o.per_call = val("--per-call").parse().expect("records"),
            "--replicas" => {
                o.replicas = val("--replicas").split(',').map(str::to_string).collect();
            }
            "--child" => {
                let peer = o.child.take().map(|c| c.1).unwrap_or_default();
                o.child = Some((val("--child"), peer));
            }
            "--peer" => {
                let scenario = o.child.take().map(|c| c.0).unwrap_or_default();
                o.child = Some((scenario, val("--peer")));
            }
            "--bench" => {}
            other => {
                eprintln!(
                    "unknown argument {other}\nusage: replica [--rate N] [--secs S] [--warmup S] \
                     [--record-bytes N] [--per-call N] [--replicas off,s3,kafka]"
                );
                std::process::exit(2);
            }
        }
    }
    o
}

/// Calls `store()` with `per_call` records every `per_call / rate` seconds; records each
/// call's latency to its acknowledgement while measuring.
struct Paced {
    payload: Bytes,
    record_bytes: usize,
    per_call: usize,
    rate: u64,
    phase: Arc<AtomicU8>,
    lat_us: Arc<Mutex<Vec<u64>>>,
}

impl Receiver for Paced {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let period = Duration::from_secs_f64(self.per_call as f64 / self.rate as f64);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut pending: VecDeque<(Instant, weir::receiver::StoreFuture)> = VecDeque::new();
        let mut lats = Vec::new();
        let slots = self.payload.len() / self.record_bytes;
        let mut slot = 0;
        while self.phase.load(Relaxed) != STOP && !ctx.is_shutting_down() {
            tokio::select! {
                _ = tick.tick() => {
                    let records = (0..self.per_call)
                        .map(|_| {
                            let at = slot * self.record_bytes;
                            slot = (slot + 1) % slots;
                            Record::new(self.payload.slice(at..at + self.record_bytes))
                        })
                        .collect();
                    pending.push_back((Instant::now(), ctx.store(records)));
                }
                r = async { (&mut pending.front_mut().expect("checked").1).await }, if !pending.is_empty() => {
                    r?;
                    let (t, _) = pending.pop_front().expect("non-empty");
                    if self.phase.load(Relaxed) == MEASURE {
                        lats.push(t.elapsed().as_micros() as u64);
                    }
                }
            }
        }
        for (_, f) in pending {
            let _ = f.await;
        }
        self.lat_us.lock().expect("lock").extend(lats);
        Ok(())
    }
}

fn child(o: &Opts, scenario: &str, peer: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
    let node_id = format!("bench-{scenario}-{}", std::process::id());
    let replication = match scenario {
        "off" => None,
        "s3" => Some(ReplicationConfig::ObjectStore(ObjectStoreConfig {
            bucket: "bench".into(),
            endpoint: Some(peer.into()),
            access_key_id: Some(weir_testkit::peers::s3::ACCESS_KEY.into()),
            secret_access_key: Some(weir_testkit::peers::s3::SECRET_KEY.into()),
            ..ObjectStoreConfig::default()
        })),
        "kafka" => Some(ReplicationConfig::Kafka(KafkaReplicaConfig {
            bootstrap_servers: peer.into(),
            ..KafkaReplicaConfig::default()
        })),
        other => panic!("unknown scenario {other}: off, s3 or kafka"),
    };
    let config = StreamingConfig {
        node_id: Some(node_id.clone()),
        block_interval_ms: 20,
        replication: replication.clone(),
        ..StreamingConfig::default()
    };
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let lat_us = Arc::new(Mutex::new(Vec::new()));
    let mut ctx = StreamingContext::new(config, dir.path());
    if let Some(ReplicationConfig::Kafka(k)) = &replication {
        ctx.with_replica(weir_kafka::replica::replica(k, &node_id).expect("a Kafka replica"));
    }
    let payload: Vec<u8> = (0..(1 << 20)).map(|j| b'a' + (j % 26) as u8).collect();
    ctx.add_receiver(
        "paced",
        Paced {
            payload: Bytes::from(payload),
            record_bytes: o.record_bytes,
            per_call: o.per_call,
            rate: o.rate,
            phase: phase.clone(),
            lat_us: lat_us.clone(),
        },
    );
    ctx.foreach_batch("count", |b| {
        b.map_partitions(|it| it.count())?;
        Ok(())
    });
    let out = rt.block_on(async {
        let started = Instant::now();
        let running = ctx.start().await.expect("start");
        let start_ms = started.elapsed().as_secs_f64() * 1e3;
        let m = running.metrics();
        tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
        let e = m.engine().clone();
        let r = e.receiver("paced");
        let (s0, b0, w0, rb0) = (
            r.records_stored(),
            r.bytes_stored(),
            e.replica_writes(),
            e.replica_bytes(),
        );
        let t0 = Instant::now();
        phase.store(MEASURE, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
        let (s1, b1, w1, rb1) = (
            r.records_stored(),
            r.bytes_stored(),
            e.replica_writes(),
            e.replica_bytes(),
        );
        let secs = t0.elapsed().as_secs_f64();
        phase.store(STOP, Relaxed);
        running.stop().await.expect("graceful stop");
        let mut lats = lat_us.lock().expect("lock").clone();
        lats.sort_unstable();
        serde_json::json!({
            "scenario": scenario,
            "acked_per_s": (s1 - s0) as f64 / secs,
            "lat_p50_us": percentile(&lats, 50.0),
            "lat_p99_us": percentile(&lats, 99.0),
            "lat_p999_us": percentile(&lats, 99.9),
            "replica_writes_per_s": (w1 - w0) as f64 / secs,
            "start_ms": start_ms,
            "replica_bytes_per_acked_byte": (rb1 - rb0) as f64 / ((b1 - b0) as f64).max(1.0),
        })
    });
    println!("{out}");
}

fn main() {
    let o = parse_args();
    if let Some((scenario, peer)) = &o.child {
        child(&o, scenario, peer);
        return;
    }
    let s3 = o.replicas.iter().any(|r| r == "s3").then(|| {
        let s = weir_testkit::peers::s3::S3Server::start();
        s.create_bucket("bench");
        s
    });
    let kafka = o
        .replicas
        .iter()
        .any(|r| r == "kafka")
        .then(|| weir_testkit::peers::kafka::KafkaCluster::start(3));
    eprintln!(
        "replica: {} records/s of {} B, {} per store() call, fsync always, {} s measured after {} s warm-up; peers' data in {}; load {}",
        o.rate,
        o.record_bytes,
        o.per_call,
        o.secs,
        o.warmup,
        std::env::var("WEIR_PEER_DIR").unwrap_or_else(|_| "the temporary directory (same disk as the node)".into()),
        loadavg()
    );
    let mut rows = Vec::new();
    for scenario in &o.replicas {
        let peer = match scenario.as_str() {
            "s3" => s3.as_ref().expect("started").endpoint(),
            "kafka" => kafka.as_ref().expect("started").bootstrap(),
            _ => "-".into(),
        };
        let v = run_scenario(
            &["--child".into(), scenario.clone(), "--peer".into(), peer],
            scenario,
        );
        eprintln!("  {v}");
        rows.push(v);
        settle();
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    // The anchor: the median p99 of the `off` runs of this sitting.
    let offs: Vec<f64> = rows
        .iter()
        .filter(|v| v["scenario"] == "off")
        .map(|v| f(v, "lat_p99_us"))
        .collect();
    let anchor = (!offs.is_empty()).then(|| median(&offs));
    println!();
    println!("| replica | acked records/s | ack p50 / p99 / p99.9 | p99 minus off (median of {}) | replica writes/s | replica bytes per acked byte | start (take-over) |", offs.len());
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for v in &rows {
        let extra = anchor.map_or("-".into(), |a| {
            let d = (f(v, "lat_p99_us") - a) * 1e3;
            format!("{}{}", if d < 0.0 { "-" } else { "" }, fmt_ns(d.abs()))
        });
        println!(
            "| {} | {} | {} / {} / {} | {} | {:.0} | {:.2} | {:.0} ms |",
            v["scenario"].as_str().unwrap_or_default(),
            fmt_count(f(v, "acked_per_s")),
            fmt_ns(f(v, "lat_p50_us") * 1e3),
            fmt_ns(f(v, "lat_p99_us") * 1e3),
            fmt_ns(f(v, "lat_p999_us") * 1e3),
            extra,
            f(v, "replica_writes_per_s"),
            f(v, "replica_bytes_per_acked_byte"),
            f(v, "start_ms"),
        );
    }
}
