//! In-process ingest benchmark: receivers → blocks → WAL (fsync `always`) → batches → a job that
//! reads every record back (like the Spark anchor's per-batch JVM-side `count()`).
//!
//! ```text
//! cargo bench --bench ingest                       # 1 and 4 receivers, 100-byte records, 10 s each
//! cargo bench --bench ingest -- --receivers 4 --secs 20 --fsync never --no-fio
//! ```
//!
//! Each scenario runs in a child process (so its peak RSS is its own) and prints: records/s and
//! MB/s acknowledged durable and into completed batches, store-to-durable latency p50/p99 (per
//! `store()` call of 1,000 records), batch total delay p50/p95, fsyncs/s and peak RSS. After each
//! scenario fio measures the disk's own sequential write rate with an fdatasync after every write
//! of the size the WAL wrote per fdatasync in that scenario: the anchor for MB/s.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::receiver::{Receiver, ReceiverContext, ReceiverError, Record};
use weir::wal::FsyncPolicy;
use weir::{StreamingConfig, StreamingContext};

mod common;
use common::*;

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

#[derive(Debug, Clone)]
struct Opts {
    receivers: Vec<usize>,
    secs: f64,
    warmup: f64,
    record_bytes: usize,
    per_call: usize,
    in_flight: usize,
    block_interval_ms: u64,
    fsync: FsyncPolicy,
    fio: bool,
    child: Option<usize>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        receivers: vec![1, 4],
        secs: 10.0,
        warmup: 3.0,
        record_bytes: 100,
        per_call: 1000,
        // 256 calls of 1,000 × 100 B: about 26 MiB in flight, within the default 32 MiB budget.
        in_flight: 256,
        block_interval_ms: 200,
        fsync: FsyncPolicy::Always,
        fio: true,
        child: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--receivers" => {
                o.receivers = val("--receivers")
                    .split(',')
                    .map(|s| s.parse().expect("--receivers: numbers, comma-separated"))
                    .collect();
            }
            "--secs" => o.secs = val("--secs").parse().expect("--secs: seconds"),
            "--warmup" => o.warmup = val("--warmup").parse().expect("--warmup: seconds"),
            "--record-bytes" => o.record_bytes = val("--record-bytes").parse().expect("bytes"),
            "--per-call" => o.per_call = val("--per-call").parse().expect("records"),
            "--in-flight" => o.in_flight = val("--in-flight").parse().expect("calls"),
            "--block-interval-ms" => {
                o.block_interval_ms = val("--block-interval-ms").parse().expect("ms");
            }
            "--fsync" => o.fsync = val("--fsync").parse().expect("always|never|interval(ms)"),
            "--no-fio" => o.fio = false,
            "--quick" => {
                o.secs = 3.0;
                o.warmup = 1.0;
            }
            "--child" => o.child = Some(val("--child").parse().expect("receivers")),
            // cargo bench passes --bench.
            "--bench" => {}
            other => {
                eprintln!(
                    "unknown argument {other}\nusage: ingest [--receivers 1,4] [--secs S] [--warmup S] \
                     [--record-bytes N] [--per-call N] [--in-flight N] [--block-interval-ms MS] \
                     [--fsync always|never|interval(ms)] [--no-fio] [--quick]"
                );
                std::process::exit(2);
            }
        }
    }
    o
}

/// Stores fixed-size records as fast as the engine takes them, keeping `in_flight` calls
/// outstanding, and records each call's store-to-durable latency while measuring.
struct Load {
    payload: Bytes,
    record_bytes: usize,
    per_call: usize,
    in_flight: usize,
    phase: Arc<AtomicU8>,
    lat_us: Arc<Mutex<Vec<u32>>>,
}

impl Receiver for Load {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let slots = self.payload.len() / self.record_bytes;
        let mut slot = 0;
        let mut pending = VecDeque::with_capacity(self.in_flight);
        let mut lats = Vec::new();
        while self.phase.load(Relaxed) != STOP && !ctx.is_shutting_down() {
            let mut records = Vec::with_capacity(self.per_call);
            for _ in 0..self.per_call {
                let at = slot * self.record_bytes;
                records.push(Record::new(self.payload.slice(at..at + self.record_bytes)));
                slot = (slot + 1) % slots;
            }
            pending.push_back((Instant::now(), ctx.store(records)));
            if pending.len() >= self.in_flight {
                let (t, f) = pending.pop_front().expect("non-empty");
                f.await?;
                if self.phase.load(Relaxed) == MEASURE {
                    lats.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
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

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Runs one scenario in this process and prints its figures as one JSON line.
fn child(o: &Opts, receivers: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let lat_us = Arc::new(Mutex::new(Vec::new()));
    let delays_ms = Arc::new(Mutex::new(Vec::new()));
    let read_back = Arc::new(AtomicU64::new(0));
    let config = StreamingConfig {
        block_interval_ms: o.block_interval_ms,
        wal: weir::WalConfig {
            fsync: o.fsync,
            ..weir::WalConfig::default()
        },
        ..StreamingConfig::default()
    };
    let mut ctx = StreamingContext::new(config, dir.path());
    for i in 0..receivers {
        // Each receiver its own payload buffer: no shared reference count between threads.
        let payload: Vec<u8> = (0..(1 << 20))
            .map(|j| b'a' + ((i * 7 + j) % 26) as u8)
            .collect();
        ctx.add_receiver(
            format!("load-{i}"),
            Load {
                payload: Bytes::from(payload),
                record_bytes: o.record_bytes,
                per_call: o.per_call,
                in_flight: o.in_flight,
                phase: phase.clone(),
                lat_us: lat_us.clone(),
            },
        );
    }
    let (d, p, rb) = (delays_ms.clone(), phase.clone(), read_back.clone());
    ctx.foreach_batch("count", move |b| {
        // Read every record back, as Spark's per-batch count() does.
        let n: usize = b.map_partitions(|it| it.count())?.into_iter().sum();
        rb.fetch_add(n as u64, Relaxed);
        if p.load(Relaxed) == MEASURE {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            d.lock().expect("lock").push(now.saturating_sub(b.time()));
        }
        Ok(())
    });
    let out = rt.block_on(async {
        let running = ctx.start().await.expect("start");
        let m = running.metrics();
        tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
        let e = m.engine().clone();
        let stored = || {
            e.receiver_names()
                .iter()
                .map(|n| e.receiver(n).records_stored())
                .sum::<u64>()
        };
        let w0 = m.wal().snapshot();
        let (s0, b0) = (stored(), e.batch_records());
        let t0 = Instant::now();
        phase.store(MEASURE, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
        let w1 = m.wal().snapshot();
        let (s1, b1) = (stored(), e.batch_records());
        let fsyncs = w1.fsyncs - w0.fsyncs;
        let wal_bytes = w1.append_bytes - w0.append_bytes;
        let secs = t0.elapsed().as_secs_f64();
        phase.store(STOP, Relaxed);
        running.stop().await.expect("graceful stop");
        let mut lats = lat_us.lock().expect("lock").clone();
        lats.sort_unstable();
        let mut delays = delays_ms.lock().expect("lock").clone();
        delays.sort_unstable();
        let lats: Vec<u64> = lats.into_iter().map(u64::from).collect();
        let all_stored = stored();
        assert_eq!(
            read_back.load(Relaxed),
            all_stored,
            "every stored record must be read back from a batch"
        );
        serde_json::json!({
            "receivers": receivers,
            "secs": secs,
            "stored_per_s": (s1 - s0) as f64 / secs,
            "batched_per_s": (b1 - b0) as f64 / secs,
            "record_bytes": o.record_bytes,
            "fsyncs_per_s": fsyncs as f64 / secs,
            "wal_bytes_per_s": wal_bytes as f64 / secs,
            "bytes_per_fsync": wal_bytes.checked_div(fsyncs).unwrap_or(0),
            "lat_p50_us": percentile(&lats, 50.0),
            "lat_p99_us": percentile(&lats, 99.0),
            "delay_p50_ms": percentile(&delays, 50.0),
            "delay_p95_ms": percentile(&delays, 95.0),
            "peak_rss": peak_rss_bytes(),
            "total_records": all_stored,
        })
    });
    println!("{out}");
}

fn main() {
    let o = parse_args();
    if let Some(r) = o.child {
        child(&o, r);
        return;
    }
    let fio = if o.fio { fio_available() } else { None };
    if o.fio && fio.is_none() {
        eprintln!("fio not found: no disk anchor (apt-get install fio); running without it");
    }
    eprintln!(
        "ingest: {} B records, {} per store() call, {} calls in flight per receiver, block \
         interval {} ms, fsync {}, {} s measured after {} s warm-up; load {}",
        o.record_bytes,
        o.per_call,
        o.in_flight,
        o.block_interval_ms,
        o.fsync,
        o.secs,
        o.warmup,
        loadavg()
    );
    let mut rows = Vec::new();
    for &r in &o.receivers {
        let v = run_scenario(
            &["--child".to_string(), r.to_string()],
            &format!("with {r} receivers"),
        );
        eprintln!("  {r} receiver(s): {v}");
        settle();
        // The anchor: fio writing as many bytes per fdatasync as this run's WAL did, right after
        // the run and again after a pause. The disk of these machines is bursty (a second run in
        // a row is often much slower), so the faster of the two counts.
        let anchor = fio.as_ref().map(|_| {
            let per_fsync = v["bytes_per_fsync"].as_u64().unwrap_or(0);
            let bs = (per_fsync / 4096 * 4096).clamp(4096, 256 << 20);
            let mut best: Option<Result<FioWrite, String>> = None;
            for _ in 0..2 {
                let f = fio_write(
                    bs,
                    (bs * 64).max(4 << 30) / bs * bs,
                    o.secs,
                    o.warmup.min(2.0),
                );
                match &f {
                    Ok(f) => eprintln!(
                        "  fio {} B writes + fdatasync each: {:.1} MiB/s",
                        f.bs,
                        f.bw_bytes / MIB
                    ),
                    Err(e) => eprintln!("  fio: {e}"),
                }
                best = match (best, f) {
                    (Some(Ok(b)), Ok(f)) => Some(Ok(if f.bw_bytes > b.bw_bytes { f } else { b })),
                    (Some(Ok(b)), Err(_)) => Some(Ok(b)),
                    (_, f) => Some(f),
                };
                settle();
                std::thread::sleep(Duration::from_secs(5));
            }
            best.expect("two fio runs")
        });
        rows.push((v, anchor));
    }
    let ceiling = fio.as_ref().map(|_| {
        let f = fio_write_buffered(8 << 30, o.secs);
        if let Ok(f) = &f {
            eprintln!(
                "  fio 1 MiB buffered writes, one fsync at the end: {:.1} MiB/s",
                f.bw_bytes / MIB
            );
        }
        f
    });
    println!();
    println!(
        "| receivers | stored records/s | into batches records/s | payload MB/s | WAL MB/s vs fio, same bytes per fdatasync | store→durable p50 / p99 | batch delay p50 / p95 | fsyncs/s | peak RSS |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (v, anchor) in &rows {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let mb = f("batched_per_s") * f("record_bytes") / 1e6;
        let wal = f("wal_bytes_per_s");
        let ratio = match anchor {
            Some(Ok(a)) => format!(
                "{:.0} vs {:.0} ({:.0}%)",
                wal / 1e6,
                a.bw_bytes / 1e6,
                100.0 * wal / a.bw_bytes
            ),
            Some(Err(e)) => format!("fio failed: {e}"),
            None => "-".into(),
        };
        println!(
            "| {} | {:.2} M | {:.2} M | {:.0} | {} | {} / {} | {:.0} ms / {:.0} ms | {:.0} | {:.0} MiB |",
            v["receivers"],
            f("stored_per_s") / 1e6,
            f("batched_per_s") / 1e6,
            mb,
            ratio,
            fmt_ns(f("lat_p50_us") * 1e3),
            fmt_ns(f("lat_p99_us") * 1e3),
            f("delay_p50_ms"),
            f("delay_p95_ms"),
            f("fsyncs_per_s"),
            f("peak_rss") / MIB,
        );
    }
    if let Some(Ok(c)) = &ceiling {
        println!(
            "\nThe disk's ceiling in this sitting (fio, 1 MiB buffered writes, one fsync at the end): {:.0} MB/s.",
            c.bw_bytes / 1e6
        );
    }
}
