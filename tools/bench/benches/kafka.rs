//! The reliable Kafka receiver beside a plain rdkafka consumer loop, in one run.
//!
//! ```text
//! cargo bench --bench kafka                 # 10 s measured after a 5 s warm-up
//! cargo bench --bench kafka -- --secs 20
//! ```
//!
//! One librdkafka mock cluster, one topic of 16 partitions, one producer thread producing
//! 100-byte records at `--rate` records/s (default 150,000) in batches of up to 100 ms. Two
//! consumers read the topic concurrently, each in its own group: a plain `BaseConsumer` loop
//! that only counts (no storing), and weir's engine with the Kafka receiver (fsync `always`,
//! default block and batch intervals, a job reading every record of every batch back, offsets
//! committed once durable). The producer starts once both have their partitions. Printed per
//! round (each on a fresh cluster): records/s produced, consumed by the plain loop, and into
//! completed weir batches (counted over whole batches), weir/plain, and how far each consumer
//! is behind the producer at the end; then the median ratio. Also per round: each second of the
//! measured window, how far each consumer is behind, weir's bytes waiting to be durable and its
//! `store()` calls that waited for `max_pending_bytes`; weir's lag per partition; and this
//! process's CPU (producer, consumers and weir; the broker is another process).
//! `--only plain|weir` runs one consumer alone; `--property K=V` (repeatable) passes a
//! librdkafka property to weir's consumer; `--max-pending-mib M` sets `max_pending_bytes`.
//!
//! `--real` runs the same rounds against a real Apache Kafka 4.1 broker (KRaft, started from
//! `interop/` by `weir_testkit::peers::kafka`, heap 384 MiB; needs Java 17 and Maven), each round
//! on a new 16-partition topic; `--bootstrap HOST:PORT` against a cluster of your own.
//!
//! The mock broker is single-threaded, keeps at most 5 MiB or 100,000 records per partition,
//! and answers each fetch with one produced batch per partition: above roughly 200,000
//! records/s on two cores it, not the consumers, sets the pace, and a consumer that falls behind
//! catches up slowly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use weir::{StreamingConfig, StreamingContext};
use weir_kafka::{KafkaConfig, KafkaReceiver};

mod common;

/// Partitions of the topic. The mock broker keeps at most 5 MiB or 100,000 records per
/// partition and answers each fetch with one produced batch per partition, so more partitions
/// (and larger producer batches) give both consumers room to catch up.
const PARTITIONS: i32 = 16;

fn main() {
    let mut secs = 10.0f64;
    let mut warmup = 5.0f64;
    let mut rate = 150_000.0f64;
    let mut rounds = 3usize;
    let mut only: Option<String> = None;
    let mut real = false;
    let mut bootstrap: Option<String> = None;
    let mut tuning = Tuning::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).expect("--secs S"),
            "--warmup" => {
                warmup = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--warmup S")
            }
            "--rate" => {
                rate = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--rate RECORDS_PER_S")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--rounds N")
            }
            "--only" => only = args.next(),
            "--real" => real = true,
            "--bootstrap" => bootstrap = args.next(),
            "--max-pending-mib" => {
                tuning.pending_mib = Some(
                    args.next()
                        .and_then(|s| s.parse().ok())
                        .expect("--max-pending-mib MIB"),
                )
            }
            "--property" => {
                let kv = args.next().unwrap_or_default();
                let (k, v) = kv.split_once('=').expect("--property KEY=VALUE");
                tuning.properties.push((k.to_string(), v.to_string()));
            }
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}; usage: kafka [--secs S] [--warmup S] [--rate R] [--rounds N] [--only plain|weir] [--max-pending-mib M] [--property K=V].. [--real | --bootstrap HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    let broker =
        (real && bootstrap.is_none()).then(|| weir_testkit::peers::kafka::KafkaCluster::start(1));
    if let Some(b) = &broker {
        bootstrap = Some(b.bootstrap());
    }
    println!(
        "broker: {}",
        match (&bootstrap, &broker) {
            (Some(_), Some(_)) => "Apache Kafka 4.1, one broker (KRaft) on loopback",
            (Some(_), None) => "the cluster at --bootstrap",
            _ => "librdkafka's mock cluster",
        }
    );
    let mut rows = Vec::new();
    for r in 0..rounds {
        let (p, c, w, f) = round(
            rate,
            secs,
            warmup,
            only.as_deref(),
            bootstrap.as_deref(),
            &tuning,
            r,
        );
        println!(
            "round {}: produced {p:.0}/s, plain consumer {c:.0}/s, weir into durable batches {w:.0}/s ({f:.0} fsyncs/s), weir/plain {:.2}",
            r + 1,
            w / c.max(1.0)
        );
        rows.push(w / c.max(1.0));
    }
    rows.sort_by(f64::total_cmp);
    println!(
        "weir / plain, median of {rounds} rounds: {:.2}",
        rows[rows.len() / 2]
    );
}

/// What `--max-pending-mib` and `--property` change in weir.
#[derive(Default)]
struct Tuning {
    pending_mib: Option<u64>,
    properties: Vec<(String, String)>,
}

/// One round: a fresh mock cluster (or a new topic on a real one), producer, plain consumer and
/// weir engine.
fn round(
    rate: f64,
    secs: f64,
    warmup: f64,
    only: Option<&str>,
    real: Option<&str>,
    tuning: &Tuning,
    n: usize,
) -> (f64, f64, f64, f64) {
    let mut _cluster = None;
    let (bs, topic) = match real {
        Some(bs) => {
            let topic = format!("bench-{}-{n}", std::process::id());
            weir_testkit::peers::kafka::create_topic(bs, &topic, PARTITIONS, 1, &[]);
            (bs.to_string(), topic)
        }
        None => {
            let cluster = MockCluster::new(1).expect("mock cluster");
            cluster.create_topic("bench", PARTITIONS, 1).expect("topic");
            let bs = cluster.bootstrap_servers();
            _cluster = Some(cluster);
            (bs, "bench".to_string())
        }
    };
    let stop = Arc::new(AtomicBool::new(false));

    let produced = Arc::new(AtomicU64::new(0));
    // The producer starts once both consumers have their partitions (the mock delays a group's
    // first assignment by 3 s), so that neither starts behind: the mock answers a fetch with one
    // produced batch per partition, so a consumer that starts behind may never catch up.
    let (skip_plain, skip_weir) = (only == Some("weir"), only == Some("plain"));
    let plain_ready = Arc::new(AtomicBool::new(skip_plain));
    let weir_ready = Arc::new(AtomicBool::new(skip_weir));
    let producer = {
        let (bs, stop, produced) = (bs.clone(), stop.clone(), produced.clone());
        let topic = topic.clone();
        let ready = (plain_ready.clone(), weir_ready.clone());
        std::thread::spawn(move || {
            let p: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &bs)
                .set("linger.ms", "100")
                .set("batch.num.messages", "10000")
                .set("queue.buffering.max.messages", "200000")
                .create()
                .expect("producer");
            let payload = [b'x'; 100];
            let mut i = 0u64;
            let both_ready = || ready.0.load(Relaxed) && ready.1.load(Relaxed);
            while !both_ready() && !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let t0 = Instant::now();
            while !stop.load(Relaxed) {
                // Pace: the mock broker keeps ~5 MiB per partition and is single-threaded.
                let due = (t0.elapsed().as_secs_f64() * rate) as u64;
                if i >= due {
                    // Sleep: the producer's own poll with a timeout spins on the clock and
                    // would take a core from the consumers being measured.
                    p.poll(Duration::ZERO);
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                match p.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(&payload[..])) {
                    Ok(()) => {
                        i += 1;
                        if i.is_multiple_of(1000) {
                            produced.store(i, Relaxed);
                            p.poll(Duration::ZERO);
                        }
                    }
                    Err(_) => {
                        p.poll(Duration::ZERO);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            let _ = p.flush(Duration::from_secs(5));
        })
    };

    let plain = Arc::new(AtomicU64::new(0));
    let plain_thread = {
        let (bs, stop, plain) = (bs.clone(), stop.clone(), plain.clone());
        let topic = topic.clone();
        let ready = plain_ready.clone();
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bs)
                .set("group.id", "plain")
                .set("auto.offset.reset", "earliest")
                .create()
                .expect("consumer");
            if skip_plain {
                return;
            }
            c.subscribe(&[topic.as_str()]).expect("subscribe");
            while !stop.load(Relaxed) {
                if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
                    plain.fetch_add(1, Relaxed);
                } else if !ready.load(Relaxed) && c.assignment().is_ok_and(|a| a.count() > 0) {
                    ready.store(true, Relaxed);
                }
            }
            c.unsubscribe();
        })
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let read_back = Arc::new(AtomicU64::new(0));
    let (produced_rate, plain_rate, weir_rate, fsyncs) = rt.block_on(async {
        let mut config = StreamingConfig::default();
        if let Some(m) = tuning.pending_mib {
            config.max_pending_bytes = m << 20;
        }
        let mut ctx = StreamingContext::new(config, dir.path());
        let mut kc = KafkaConfig::new(&bs, &format!("{topic}-weir"), &[topic.as_str()]);
        kc.properties
            .insert("auto.offset.reset".into(), "earliest".into());
        for (k, v) in &tuning.properties {
            kc.properties.insert(k.clone(), v.clone());
        }
        let receiver = KafkaReceiver::new(kc).expect("config");
        let kstats = receiver.stats();
        if !skip_weir {
            ctx.add_receiver("kafka", receiver);
        }
        let rb = read_back.clone();
        ctx.foreach_batch("count", move |b| {
            let n: usize = b.map_partitions(|it| it.count())?.into_iter().sum();
            rb.fetch_add(n as u64, Relaxed);
            Ok(())
        });
        let running = ctx.start().await.expect("start");
        while kstats.rebalances.load(Relaxed) == 0 && !skip_weir {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        weir_ready.store(true, Relaxed);
        while !plain_ready.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let m = running.metrics();
        // Batches complete once a second: weir's window runs from just after one completed
        // batch to just after another, so it counts whole batches.
        let after_batch = || async {
            let n = m.engine().batches_completed();
            while m.engine().batches_completed() == n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (m.engine().batch_records(), Instant::now())
        };
        let (p0, c0, f0) = (
            produced.load(Relaxed),
            plain.load(Relaxed),
            m.wal().snapshot().fsyncs,
        );
        let ticks = common::clock_ticks();
        let cpu0 = common::process_cpu_secs(ticks);
        let t0 = Instant::now();
        let (w0, tw0) = after_batch().await;
        // Once a second: how far each consumer is behind, and whether weir's store() waited.
        let rm = m.engine().receiver("kafka");
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let mut trace = Vec::new();
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1).min(until - Instant::now())).await;
            let p = produced.load(Relaxed) as i64;
            trace.push(format!(
                "{}k/{}k/{}MiB/{}",
                (p - plain.load(Relaxed) as i64) / 1000,
                (p - kstats.records.load(Relaxed) as i64) / 1000,
                rm.pending_bytes() >> 20,
                rm.backpressure_waits()
            ));
        }
        eprintln!(
            "  each second, behind (plain/weir), weir pending, weir store() waits: {}",
            trace.join(" ")
        );
        let (w1, tw1) = after_batch().await;
        let ws = (tw1 - tw0).as_secs_f64();
        eprintln!(
            "  weir receiver polled {} records in total, {} commits, {} rebalances; records durable {}",
            kstats.records.load(Relaxed),
            kstats.commits.load(Relaxed),
            kstats.rebalances.load(Relaxed),
            m.engine().receiver("kafka").records_stored()
        );
        let (p1, c1, f1) = (
            produced.load(Relaxed),
            plain.load(Relaxed),
            m.wal().snapshot().fsyncs,
        );
        let s = t0.elapsed().as_secs_f64();
        let cpu = common::process_cpu_secs(ticks) - cpu0;
        let consumed = (c1 - c0) + (w1 - w0);
        eprintln!(
            "  this process (producer, consumers, weir): {:.2} cores, {:.2} µs CPU per record produced or consumed",
            cpu / s,
            cpu * 1e6 / ((p1 - p0) + consumed).max(1) as f64
        );
        let lag: Vec<String> = kstats
            .lag
            .lock()
            .unwrap()
            .iter()
            .map(|((_, p), l)| format!("{p}:{}k", l / 1000))
            .collect();
        eprintln!(
            "  weir lag per assigned partition ({}): {}",
            lag.len(),
            lag.join(" ")
        );
        eprintln!(
            "  behind the producer at the end: plain {} records, weir {} records",
            p1 as i64 - plain.load(Relaxed) as i64,
            p1 as i64 - kstats.records.load(Relaxed) as i64
        );
        stop.store(true, Relaxed);
        running.stop().await.expect("stop");
        (
            (p1 - p0) as f64 / s,
            (c1 - c0) as f64 / s,
            (w1 - w0) as f64 / ws,
            (f1 - f0) as f64 / s,
        )
    });
    let _ = producer.join();
    let _ = plain_thread.join();
    (produced_rate, plain_rate, weir_rate, fsyncs)
}
