//! The Flume Avro push source into durable batches, beside the same engine fed directly by
//! `store()` with the same calls, in one run.
//!
//! ```text
//! cargo bench --bench flume                          # 8 connections, 10 s per scenario
//! cargo bench --bench flume -- --connections 64 --block-ms 20 --secs 20 --events 100 --body 100
//! ```
//!
//! With one call in flight per connection, a call waits for its block to be cut and fsynced, so
//! a connection makes about one call per block interval: throughput grows with connections and
//! shorter blocks (`--block-ms`, the engine's `block_interval_ms`, default 200 ms as in Spark).
//!
//! Flume: weir's engine (default configuration: fsync `always`, 200 ms blocks, 1 s batches, a
//! job reading every record of every batch back) with the Flume push source on loopback, and a
//! Rust load generator of `--connections` connections, each sending `appendBatch` calls of
//! `--events` events of `--body` bytes (one header each) one after another, as a Flume agent's
//! Avro sink does: the next call only after the `OK`. Anchor: the same engine with a receiver
//! that calls `store()` with the same batches from the same number of tasks, each waiting for
//! its store to be durable before the next — the protocol's cost is the difference. Scenarios
//! alternate (Flume, store, store, Flume) on fresh data directories; printed per scenario:
//! events/s and MB/s of bodies answered `OK` (durable), events/s into completed batches, call
//! latency p50/p99; then the medians and Flume/store.
//!
//! ```text
//! cargo bench --bench flume -- --real                # a real Flume 1.11 agent (interop/)
//! cargo bench --bench flume -- --real --sinks 4 --block-ms 50
//! ```
//!
//! `--real`: a real Apache Flume agent (an endless `seq` source, a memory channel, `--sinks`
//! Avro sinks, each its own connection) pushing into weir's Flume source in the engine above,
//! for `batch-size` 100 and 1000. Anchor: the same agent with Flume's null sink, which shows
//! what the agent delivers when delivery costs nothing. Scenarios alternate (null, weir, weir,
//! null), each with a fresh agent; printed: events/s the agent's sinks delivered (its channel's
//! `EventTakeSuccessCount`), events/s weir answered `OK`, events/s into completed batches, and
//! the `appendBatch` latency the agent saw (timed by a loopback relay between the agent and weir:
//! from a call's first byte to its answer's). The seq source's bodies are decimal numbers (about
//! 7 bytes), not `--body`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::receiver::{Receiver, ReceiverContext, ReceiverError, Record};
use weir::{StreamingConfig, StreamingContext};
use weir_flume::flume::{self, Status, AVRO_SOURCE_LEGACY};
use weir_flume::ipc::client::Client;
use weir_flume::ipc::frame::FrameLimits;
use weir_flume::ipc::protocol::Protocol;
use weir_flume::{FlumeSourceConfig, FlumeSourceReceiver};

mod common;
use common::*;
use weir_receiver::lock;

#[derive(Debug, Clone, Copy)]
struct Opts {
    connections: usize,
    events: usize,
    body: usize,
    secs: f64,
    warmup: f64,
    block_ms: u64,
    /// `--real`: a real Flume agent (see the module).
    real: bool,
    /// `--real`: Avro sinks in the agent.
    sinks: u32,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        connections: 8,
        events: 100,
        body: 100,
        secs: 10.0,
        warmup: 2.0,
        block_ms: 200,
        real: false,
        sinks: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> f64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match a.as_str() {
            "--connections" => o.connections = num("--connections") as usize,
            "--events" => o.events = num("--events") as usize,
            "--body" => o.body = num("--body") as usize,
            "--secs" => o.secs = num("--secs"),
            "--warmup" => o.warmup = num("--warmup"),
            "--block-ms" => o.block_ms = num("--block-ms") as u64,
            "--real" => o.real = true,
            "--sinks" => o.sinks = num("--sinks") as u32,
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}; usage: flume [--connections N] [--events N] [--body BYTES] [--secs S] [--warmup S] [--block-ms MS] [--real [--sinks N]]");
                std::process::exit(2);
            }
        }
    }
    o
}

/// What one scenario measured.
struct Figures {
    acked_events_per_s: f64,
    body_mb_per_s: f64,
    batch_events_per_s: f64,
    p50_ns: f64,
    p99_ns: f64,
}

/// Counts of the load generators: events acknowledged, and call latencies while measuring.
#[derive(Default)]
struct Load {
    measuring: AtomicBool,
    stop: AtomicBool,
    acked: AtomicU64,
    latencies: Mutex<Vec<u64>>,
}

impl Load {
    fn done(&self, events: usize, started: Instant) {
        if self.measuring.load(Relaxed) {
            self.acked.fetch_add(events as u64, Relaxed);
            lock(&self.latencies).push(started.elapsed().as_nanos() as u64);
        }
    }
}

/// The anchor: tasks that each store one batch and wait for it to be durable, in a loop.
struct Direct {
    o: Opts,
    load: Arc<Load>,
}

impl Receiver for Direct {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let body = Bytes::from(vec![b'x'; self.o.body]);
        let mut tasks = Vec::new();
        for _ in 0..self.o.connections {
            let (ctx, load, body, n) =
                (ctx.clone(), self.load.clone(), body.clone(), self.o.events);
            tasks.push(tokio::spawn(async move {
                while !load.stop.load(Relaxed) && !ctx.is_shutting_down() {
                    let records: Vec<Record> = (0..n)
                        .map(|i| Record::new(body.clone()).with_header("n", i.to_string()))
                        .collect();
                    let t = Instant::now();
                    if ctx.store(records).await.is_err() {
                        return;
                    }
                    load.done(n, t);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    }
}

/// The push source, shared with the benchmark (which needs its bound address).
struct SharedSource(Arc<FlumeSourceReceiver>);

impl Receiver for SharedSource {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        self.0.run(ctx).await
    }
}

/// One Flume agent's Avro sink: `appendBatch`, wait for `OK`, again.
async fn agent(addr: std::net::SocketAddr, o: Opts, load: Arc<Load>) {
    let limits = FrameLimits {
        max_frame_bytes: 1 << 26,
        max_buffers: 1 << 16,
    };
    let protocol = Protocol::parse(AVRO_SOURCE_LEGACY).expect("protocol");
    let mut conn = Client::connect(
        &addr.to_string(),
        protocol,
        false,
        limits,
        Duration::from_secs(60),
    )
    .await
    .expect("connect");
    let events: Vec<(Vec<(String, String)>, Bytes)> = (0..o.events)
        .map(|i| {
            (
                vec![("n".to_string(), i.to_string())],
                Bytes::from(vec![b'x'; o.body]),
            )
        })
        .collect();
    let params = flume::encode_append_batch(&events);
    while !load.stop.load(Relaxed) {
        let t = Instant::now();
        let status = match conn.call(flume::APPEND_BATCH, &params).await {
            Ok(Ok(mut r)) => Status::decode(&mut r).expect("a status"),
            Ok(Err(e)) => panic!("error reply: {e}"),
            Err(e) => panic!("the call failed: {e}"),
        };
        if status != Status::Ok {
            eprintln!("  a call was answered {status:?}");
            continue;
        }
        load.done(o.events, t);
    }
}

fn scenario(o: Opts, flume: bool) -> Figures {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
    rt.block_on(async {
        let load = Arc::new(Load::default());
        let config = StreamingConfig {
            block_interval_ms: o.block_ms,
            ..StreamingConfig::default()
        };
        let mut ctx = StreamingContext::new(config, dir.path());
        let mut agents = Vec::new();
        let source = if flume {
            let c = FlumeSourceConfig {
                address: "127.0.0.1:0".parse().expect("address"),
                max_connections: o.connections.max(64),
                ..FlumeSourceConfig::default()
            };
            let r = Arc::new(FlumeSourceReceiver::new(c).expect("config"));
            ctx.add_receiver("flume", SharedSource(r.clone()));
            Some(r)
        } else {
            ctx.add_receiver(
                "direct",
                Direct {
                    o,
                    load: load.clone(),
                },
            );
            None
        };
        let read_back = Arc::new(AtomicU64::new(0));
        let rb = read_back.clone();
        ctx.foreach_batch("read back", move |b| {
            let n: usize = b.map_partitions(|it| it.count())?.into_iter().sum();
            rb.fetch_add(n as u64, Relaxed);
            Ok(())
        });
        let running = ctx.start().await.expect("start");
        if let Some(r) = &source {
            let addr = r.listening().await;
            for _ in 0..o.connections {
                agents.push(tokio::spawn(agent(addr, o, load.clone())));
            }
        }
        tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
        let m = running.metrics();
        // Whole batches: from just after one completed batch to just after another.
        let after_batch = || async {
            let n = m.engine().batches_completed();
            while m.engine().batches_completed() == n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (m.engine().batch_records(), Instant::now())
        };
        let (b0, tb0) = after_batch().await;
        load.measuring.store(true, Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
        load.measuring.store(false, Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        let (b1, tb1) = after_batch().await;
        load.stop.store(true, Relaxed);
        for a in agents {
            let _ = a.await;
        }
        running.stop().await.expect("stop");
        let mut lat = std::mem::take(&mut *lock(&load.latencies));
        lat.sort_unstable();
        let acked = load.acked.load(Relaxed) as f64 / secs;
        Figures {
            acked_events_per_s: acked,
            body_mb_per_s: acked * o.body as f64 / 1e6,
            batch_events_per_s: (b1 - b0) as f64 / (tb1 - tb0).as_secs_f64(),
            p50_ns: percentile(&lat, 50.0),
            p99_ns: percentile(&lat, 99.0),
        }
    })
}

fn main() {
    let o = parse_args();
    if o.real {
        real::run(o);
        return;
    }
    println!(
        "{} connections, appendBatch of {} events of {} B, one call in flight per connection, {} ms blocks, fsync always; load {}",
        o.connections,
        o.events,
        o.body,
        o.block_ms,
        loadavg()
    );
    let mut flume = Vec::new();
    let mut direct = Vec::new();
    for (i, is_flume) in [true, false, false, true].into_iter().enumerate() {
        settle();
        let f = scenario(o, is_flume);
        println!(
            "{} {:<6} {:>10} events/s OK ({:.1} MB/s of bodies), {:>10} events/s into batches, call p50 {} p99 {}",
            i + 1,
            if is_flume { "flume" } else { "store" },
            fmt_count(f.acked_events_per_s),
            f.body_mb_per_s,
            fmt_count(f.batch_events_per_s),
            fmt_ns(f.p50_ns),
            fmt_ns(f.p99_ns),
        );
        if is_flume { &mut flume } else { &mut direct }.push(f);
    }
    let med = |v: &[Figures], f: fn(&Figures) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (fa, da) = (
        med(&flume, |f| f.acked_events_per_s),
        med(&direct, |f| f.acked_events_per_s),
    );
    println!(
        "median: flume {} events/s ({:.1} MB/s), p50 {} p99 {}; store() {} events/s, p50 {} p99 {}; flume / store = {:.2}",
        fmt_count(fa),
        med(&flume, |f| f.body_mb_per_s),
        fmt_ns(med(&flume, |f| f.p50_ns)),
        fmt_ns(med(&flume, |f| f.p99_ns)),
        fmt_count(da),
        fmt_ns(med(&direct, |f| f.p50_ns)),
        fmt_ns(med(&direct, |f| f.p99_ns)),
        fa / da
    );
}

/// `--real`: a real Flume agent into weir's Flume source, beside the same agent into a null sink.
mod real {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use weir_testkit::peers::flume::{bench_agent, BenchSink, Dist, FlumeAgent, CHANNEL_COUNTERS};

    /// What one scenario measured.
    struct Real {
        /// Events/s the agent's sinks delivered (taken from its channel in committed
        /// transactions: `EventTakeSuccessCount`).
        drained: f64,
        /// Events/s weir answered `OK` (durable); 0 for the null sink.
        acked: f64,
        /// Events/s into completed batches; 0 for the null sink.
        batched: f64,
        /// `appendBatch` latency p50 / p99, ns; 0 for the null sink.
        p50_ns: f64,
        p99_ns: f64,
    }

    /// Call latencies measured by the relays.
    #[derive(Default)]
    struct Calls {
        measuring: AtomicBool,
        latencies: Mutex<Vec<u64>>,
    }

    /// Relays each connection of the agent to `to`, timing every call: from the first request
    /// byte after an answer to the first answer byte. An Avro sink waits for the answer before
    /// its next call, so one call at a time is in flight per connection.
    async fn relay(listener: TcpListener, to: SocketAddr, calls: Arc<Calls>) {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(to).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let calls = calls.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let started: Arc<Mutex<Option<Instant>>> = Arc::default();
                let s2 = started.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        lock(&s2).get_or_insert_with(Instant::now);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Some(t) = lock(&started).take() {
                        if calls.measuring.load(Relaxed) {
                            lock(&calls.latencies).push(t.elapsed().as_nanos() as u64);
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    }

    /// Events taken from the channel in committed transactions: what the sinks delivered.
    fn drained(agent: &FlumeAgent) -> u64 {
        agent
            .counters()
            .get(CHANNEL_COUNTERS, "EventTakeSuccessCount")
    }

    fn start_agent(sink: BenchSink) -> FlumeAgent {
        FlumeAgent::start_with(Dist::Flume, &bench_agent(sink), false)
    }

    /// The agent with a null sink: its own delivery rate.
    fn null(o: Opts, batch: u32) -> Real {
        let agent = start_agent(BenchSink::Null { batch_size: batch });
        std::thread::sleep(Duration::from_secs_f64(o.warmup));
        let (d0, t0) = (drained(&agent), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(o.secs));
        let (d1, secs) = (drained(&agent), t0.elapsed().as_secs_f64());
        Real {
            drained: (d1 - d0) as f64 / secs,
            acked: 0.0,
            batched: 0.0,
            p50_ns: 0.0,
            p99_ns: 0.0,
        }
    }

    /// The agent's Avro sinks into weir's Flume source (default engine, `--block-ms` blocks).
    fn weir(o: Opts, batch: u32) -> Real {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
        rt.block_on(async {
            let config = StreamingConfig {
                block_interval_ms: o.block_ms,
                ..StreamingConfig::default()
            };
            let mut ctx = StreamingContext::new(config, dir.path());
            let c = FlumeSourceConfig {
                address: "127.0.0.1:0".parse().expect("address"),
                ..FlumeSourceConfig::default()
            };
            let r = Arc::new(FlumeSourceReceiver::new(c).expect("config"));
            let stats = r.stats();
            ctx.add_receiver("flume", SharedSource(r.clone()));
            ctx.foreach_batch("read back", move |b| {
                let _: usize = b.map_partitions(|it| it.count())?.into_iter().sum();
                Ok(())
            });
            let running = ctx.start().await.expect("start");
            let addr = r.listening().await;
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay");
            let port = listener.local_addr().expect("relay address").port();
            let calls = Arc::new(Calls::default());
            let relaying = tokio::spawn(relay(listener, addr, calls.clone()));
            let sink = BenchSink::Avro {
                port,
                sinks: o.sinks,
                batch_size: batch,
            };
            let agent = tokio::task::spawn_blocking(move || start_agent(sink))
                .await
                .expect("the agent");
            tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
            let m = running.metrics();
            let (a0, b0, d0, t0) = (
                stats.events_durable.load(Relaxed),
                m.engine().batch_records(),
                drained(&agent),
                Instant::now(),
            );
            calls.measuring.store(true, Relaxed);
            tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
            calls.measuring.store(false, Relaxed);
            let (a1, b1, d1, secs) = (
                stats.events_durable.load(Relaxed),
                m.engine().batch_records(),
                drained(&agent),
                t0.elapsed().as_secs_f64(),
            );
            drop(agent);
            relaying.abort();
            running.stop().await.expect("stop");
            let mut lat = std::mem::take(&mut *lock(&calls.latencies));
            lat.sort_unstable();
            Real {
                drained: (d1 - d0) as f64 / secs,
                acked: (a1 - a0) as f64 / secs,
                batched: (b1 - b0) as f64 / secs,
                p50_ns: percentile(&lat, 50.0),
                p99_ns: percentile(&lat, 99.0),
            }
        })
    }

    pub(super) fn run(o: Opts) {
        println!(
            "a real Flume 1.11 agent: endless seq source -> memory channel -> {} Avro sink(s) into weir's Flume source ({} ms blocks, fsync always), beside a null sink; {} s per scenario; load {}",
            o.sinks,
            o.block_ms,
            o.secs,
            loadavg()
        );
        let mut summary = Vec::new();
        for batch in [100u32, 1000] {
            let (mut nulls, mut weirs) = (Vec::new(), Vec::new());
            for (i, is_null) in [true, false, false, true].into_iter().enumerate() {
                settle();
                let f = if is_null {
                    null(o, batch)
                } else {
                    weir(o, batch)
                };
                if is_null {
                    println!(
                        "batch-size {batch} #{} null sink: {} events/s delivered",
                        i + 1,
                        fmt_count(f.drained)
                    );
                } else {
                    println!(
                        "batch-size {batch} #{} weir:      {} events/s delivered, {} events/s OK, {} events/s into batches, appendBatch p50 {} p99 {}",
                        i + 1,
                        fmt_count(f.drained),
                        fmt_count(f.acked),
                        fmt_count(f.batched),
                        fmt_ns(f.p50_ns),
                        fmt_ns(f.p99_ns)
                    );
                }
                if is_null { &mut nulls } else { &mut weirs }.push(f);
            }
            let med =
                |v: &[Real], f: fn(&Real) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            summary.push((
                batch,
                med(&weirs, |f| f.acked),
                med(&weirs, |f| f.p50_ns),
                med(&weirs, |f| f.p99_ns),
                med(&nulls, |f| f.drained),
            ));
        }
        for (batch, w, p50, p99, n) in summary {
            println!(
                "median, batch-size {batch}: weir {} events/s OK (appendBatch p50 {} p99 {}); null sink {} events/s; weir / null = {:.3}",
                fmt_count(w),
                fmt_ns(p50),
                fmt_ns(p99),
                fmt_count(n),
                w / n
            );
        }
    }
}
