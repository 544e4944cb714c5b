//! WAL benchmarks, compared with fio on the same disk in the same sitting.
//!
//! (Over 700 lines: one harness with its scenarios — appends at several sizes and concurrencies,
//! recovery — their fio anchors and the report, which read best as one program.)
//!
//! A custom harness (`harness = false`) rather than criterion: "N appenders for T seconds" does
//! not fit criterion's iteration model, and the figures that matter (sustained MiB/s, latency
//! percentiles, appends per fsync) only mean something next to what the disk itself does, run
//! right before or after, on the same filesystem.
//!
//! ```text
//! cargo bench --bench wal -- [--quick] [--secs S] [--rounds N] [--filter NAME]... [--no-fio]
//!                            [--recovery-mib N] [--list]
//! ```
//!
//! Scenarios:
//! - `append/<size>/x<n>`: `n` OS threads each loop `wal.append(payload).wait()` with fsync
//!   `always` (the default policy) for a warm-up, then for `S` seconds (default 5, `--quick` 2).
//!   Throughput and fsync counts come from the WAL's metrics over the measured window; latency
//!   is per append (queue + write + fdatasync + wake-up). Each scenario is paired with a fio job
//!   (`psync`, depth 1, sequential appends to a fresh file, `--fdatasync=1`) whose write size is
//!   the bytes the WAL actually wrote per fsync in its first run: the same write size and fsync
//!   cadence. Runs alternate WAL, fio, fio, WAL, ... (`--rounds`, default 2) so that drift on a
//!   noisy machine hits both sides alike; figures are totals over the rounds, and the per-round
//!   values are printed to show the spread.
//! - `recovery`: writes ~1 GiB (1 MiB records, fsync `never`, then close), then times
//!   `Wal::open_dir` with the page cache dropped (cold) and warm. Compared with fio's sequential
//!   1 MiB reads of a file of the same size, cold and warm, alternating likewise.
//!
//! Files go under `tempfile::tempdir_in($WEIR_BENCH_DIR or the system temp dir)`.
//! Without `--bench` on the command line (as under `cargo test --all-targets`) the program runs
//! a tiny smoke version with no fio, so that it stays quick.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

mod common;
use common::*;
use weir::wal::{FsyncPolicy, Wal, WalConfig, WalMetricsSnapshot};

/// Record frame header (`len | crc`), for bytes-on-disk figures.
const FRAME_HEADER: u64 = 8;

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

struct Opts {
    /// False when run without `--bench` (e.g. by `cargo test`): tiny smoke run.
    bench: bool,
    secs: f64,
    warmup: f64,
    rounds: usize,
    filters: Vec<String>,
    fio: bool,
    recovery_mib: u64,
    list: bool,
}

fn usage() -> &'static str {
    "usage: cargo bench --bench wal -- [--quick] [--secs S] [--rounds N] [--filter NAME]... \
     [--no-fio] [--recovery-mib N] [--list]\n  env WEIR_BENCH_DIR: parent directory for the temp \
     dirs (default: the system temp dir)"
}

fn parse_args() -> Opts {
    let mut o = Opts {
        bench: false,
        secs: 5.0,
        warmup: 1.0,
        rounds: 2,
        filters: Vec::new(),
        fio: true,
        recovery_mib: 1024,
        list: false,
    };
    let mut quick = false;
    let mut secs = None;
    let mut rounds = None;
    let mut recovery = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value\n{}", usage());
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--bench" => o.bench = true,
            "--quick" => quick = true,
            "--no-fio" => o.fio = false,
            "--list" => o.list = true,
            "--filter" => o.filters.push(value("--filter")),
            "--secs" => secs = Some(parse_num::<f64>(&value("--secs"), "--secs")),
            "--rounds" => rounds = Some(parse_num::<usize>(&value("--rounds"), "--rounds")),
            "--recovery-mib" => {
                recovery = Some(parse_num::<u64>(&value("--recovery-mib"), "--recovery-mib"));
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0)
            }
            s if s.starts_with('-') => {} // flags cargo/libtest pass along (e.g. --nocapture)
            s => o.filters.push(s.to_owned()),
        }
    }
    if quick {
        o.secs = 2.0;
        o.warmup = 0.5;
        o.rounds = 1;
        o.recovery_mib = 256;
    }
    if !o.bench {
        o.secs = 0.2;
        o.warmup = 0.05;
        o.rounds = 1;
        o.recovery_mib = 8;
        o.fio = false;
    }
    if let Some(s) = secs {
        o.secs = s;
    }
    if let Some(r) = rounds {
        o.rounds = r.max(1);
    }
    if let Some(r) = recovery {
        o.recovery_mib = r.max(1);
    }
    o
}

fn parse_num<T: std::str::FromStr>(s: &str, name: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("{name}: not a number: {s:?}\n{}", usage());
        std::process::exit(2)
    })
}

struct Scenario {
    name: String,
    payload: usize,
    appenders: usize,
    /// Appenders are tokio tasks on a 2-worker runtime (how weir's receivers use the WAL)
    /// instead of OS threads.
    tasks: bool,
}

fn scenarios(bench: bool) -> Vec<Scenario> {
    let sizes: &[(usize, &str)] = &[(100, "100B"), (4096, "4KiB"), (1 << 20, "1MiB")];
    let counts: &[usize] = &[1, 4, 64];
    let mut v = Vec::new();
    for &(payload, label) in sizes {
        for &appenders in counts {
            // The smoke run (no --bench) keeps one scenario.
            let smoke_pick = payload == 4096 && appenders == 4;
            if !bench && !smoke_pick {
                continue;
            }
            v.push(Scenario {
                name: format!("append/{label}/x{appenders}"),
                payload,
                appenders,
                tasks: false,
            });
        }
    }
    if bench {
        // Many small appenders as async tasks: a thread wake-up per acknowledgement is the
        // cost that dominates with OS threads, and tasks are how weir itself appends.
        for &(payload, label) in &sizes[..2] {
            v.push(Scenario {
                name: format!("append-tasks/{label}/x64"),
                payload,
                appenders: 64,
                tasks: true,
            });
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Small helpers: formatting, percentiles, system state.

/// `a/b/c` with one decimal below 100.
fn fmt_list(xs: &[f64]) -> String {
    xs.iter()
        .map(|&x| {
            if x < 100.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.0}")
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`. Describes what happened.
fn drop_caches() -> Result<String, String> {
    sync_all();
    let before = meminfo_cached_mib();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("NOT dropped (writing /proc/sys/vm/drop_caches: {e})"))?;
    let after = meminfo_cached_mib();
    Ok(match (before, after) {
        (Some(b), Some(a)) => format!("dropped, page cache {b:.0} -> {a:.0} MiB"),
        _ => "dropped".to_owned(),
    })
}

fn payload(len: usize) -> Bytes {
    // Not all zeros, in case anything below compresses or dedups.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

// ---------------------------------------------------------------------------------------------
// Append scenarios.

/// Metric differences over a measured window.
#[derive(Default, Clone, Copy)]
struct Delta {
    appends: u64,
    append_bytes: u64,
    fsyncs: u64,
    dir_fsyncs: u64,
    group_commits: u64,
    write_calls: u64,
    segments_created: u64,
}

impl Delta {
    fn between(a: &WalMetricsSnapshot, b: &WalMetricsSnapshot) -> Self {
        Self {
            appends: b.appends - a.appends,
            append_bytes: b.append_bytes - a.append_bytes,
            fsyncs: b.fsyncs - a.fsyncs,
            dir_fsyncs: b.dir_fsyncs - a.dir_fsyncs,
            group_commits: b.group_commits - a.group_commits,
            write_calls: b.write_calls - a.write_calls,
            segments_created: b.segments_created - a.segments_created,
        }
    }

    fn add(&mut self, o: &Delta) {
        self.appends += o.appends;
        self.append_bytes += o.append_bytes;
        self.fsyncs += o.fsyncs;
        self.dir_fsyncs += o.dir_fsyncs;
        self.group_commits += o.group_commits;
        self.write_calls += o.write_calls;
        self.segments_created += o.segments_created;
    }

    /// Bytes written to segments for these appends (payload + frame headers).
    fn disk_bytes(&self) -> u64 {
        self.append_bytes + self.appends * FRAME_HEADER
    }

    fn per_fsync(&self, x: u64) -> f64 {
        x as f64 / self.fsyncs.max(1) as f64
    }
}

/// One measured window of one scenario.
struct AppendRun {
    secs: f64,
    d: Delta,
    /// Per-append latencies in nanoseconds, sorted.
    lats: Vec<u64>,
    cpu_secs: f64,
    load: String,
}

impl AppendRun {
    fn payload_mibs(&self) -> f64 {
        self.d.append_bytes as f64 / MIB / self.secs
    }
}

fn run_append(sc: &Scenario, o: &Opts, ticks: f64) -> AppendRun {
    let tmp = tempfile::tempdir_in(bench_dir()).expect("create bench temp dir");
    let (wal, _) = Wal::open_dir(
        tmp.path().join("wal"),
        WalConfig {
            fsync: FsyncPolicy::Always,
            ..WalConfig::default()
        },
    )
    .expect("open WAL");
    let data = payload(sc.payload);
    let load_before = loadavg();
    if sc.tasks {
        return run_append_tasks(sc, o, ticks, wal, tmp, data, load_before);
    }
    let phase = AtomicU8::new(WARMUP);
    let (m0, m1, elapsed, cpu, lats) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..sc.appenders)
            .map(|_| {
                let (wal, data, phase) = (&wal, &data, &phase);
                s.spawn(move || {
                    let mut lats: Vec<u64> = Vec::with_capacity(1 << 16);
                    loop {
                        let ph = phase.load(Ordering::Acquire);
                        if ph == STOP {
                            break;
                        }
                        let t = Instant::now();
                        if let Err(e) = wal.append(data.clone()).wait() {
                            panic!("append failed: {e}");
                        }
                        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        if ph == MEASURE {
                            lats.push(ns);
                        }
                    }
                    lats
                })
            })
            .collect();
        let (m0, m1, elapsed, cpu) = measure_window(&wal, &phase, o, ticks);
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("appender thread panicked"));
        }
        (m0, m1, elapsed, cpu, all)
    });
    wal.close().expect("close WAL");
    drop(wal);
    drop(tmp);
    AppendRun::new(elapsed, &m0, &m1, lats, cpu, &load_before)
}

/// Lets the appenders warm up, then measures one window: metrics before and after, seconds,
/// CPU seconds. Sets `phase` to `MEASURE` for the window and to `STOP` after it.
fn measure_window(
    wal: &Wal,
    phase: &AtomicU8,
    o: &Opts,
    ticks: f64,
) -> (WalMetricsSnapshot, WalMetricsSnapshot, f64, f64) {
    std::thread::sleep(Duration::from_secs_f64(o.warmup));
    let m0 = wal.metrics().snapshot();
    let cpu0 = process_cpu_secs(ticks);
    let t0 = Instant::now();
    phase.store(MEASURE, Ordering::Release);
    std::thread::sleep(Duration::from_secs_f64(o.secs));
    phase.store(STOP, Ordering::Release);
    let m1 = wal.metrics().snapshot();
    (
        m0,
        m1,
        t0.elapsed().as_secs_f64(),
        process_cpu_secs(ticks) - cpu0,
    )
}

impl AppendRun {
    /// One run's figures; sorts the latencies.
    fn new(
        secs: f64,
        m0: &WalMetricsSnapshot,
        m1: &WalMetricsSnapshot,
        mut lats: Vec<u64>,
        cpu_secs: f64,
        load_before: &str,
    ) -> Self {
        lats.sort_unstable();
        AppendRun {
            secs,
            d: Delta::between(m0, m1),
            lats,
            cpu_secs,
            load: format!("{load_before} -> {}", loadavg()),
        }
    }
}

/// [`run_append`] with the appenders as tokio tasks.
fn run_append_tasks(
    sc: &Scenario,
    o: &Opts,
    ticks: f64,
    wal: Wal,
    tmp: tempfile::TempDir,
    data: Bytes,
    load_before: String,
) -> AppendRun {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let wal = std::sync::Arc::new(wal);
    let phase = std::sync::Arc::new(AtomicU8::new(WARMUP));
    let tasks: Vec<_> = (0..sc.appenders)
        .map(|_| {
            let (wal, data, phase) = (wal.clone(), data.clone(), phase.clone());
            rt.spawn(async move {
                let mut lats: Vec<u64> = Vec::with_capacity(1 << 16);
                loop {
                    let ph = phase.load(Ordering::Acquire);
                    if ph == STOP {
                        break;
                    }
                    let t = Instant::now();
                    if let Err(e) = wal.append(data.clone()).await {
                        panic!("append failed: {e}");
                    }
                    if ph == MEASURE {
                        lats.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    }
                }
                lats
            })
        })
        .collect();
    let (m0, m1, elapsed, cpu) = measure_window(&wal, &phase, o, ticks);
    let mut lats = Vec::new();
    for t in tasks {
        lats.extend(rt.block_on(t).expect("appender task panicked"));
    }
    drop(rt);
    wal.close().expect("close WAL");
    drop(wal);
    drop(tmp);
    AppendRun::new(elapsed, &m0, &m1, lats, cpu, &load_before)
}

/// All rounds of one scenario.
struct ScenarioResult {
    name: String,
    runs: Vec<AppendRun>,
    /// fio's write size (from the first WAL run) and its runs.
    fio_bs: Option<u64>,
    fio: Vec<Result<FioWrite, String>>,
}

/// Totals over the rounds of one scenario.
struct Totals {
    secs: f64,
    d: Delta,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    cpu_pct: f64,
}

impl ScenarioResult {
    fn totals(&self) -> Totals {
        let mut d = Delta::default();
        let mut lats = Vec::new();
        let (mut secs, mut cpu) = (0.0, 0.0);
        for r in &self.runs {
            d.add(&r.d);
            secs += r.secs;
            cpu += r.cpu_secs;
            lats.extend_from_slice(&r.lats);
        }
        lats.sort_unstable();
        Totals {
            secs,
            d,
            p50: percentile(&lats, 50.0),
            p99: percentile(&lats, 99.0),
            p999: percentile(&lats, 99.9),
            max: lats.last().map_or(f64::NAN, |&x| x as f64),
            cpu_pct: cpu / secs * 100.0,
        }
    }

    fn fio_ok(&self) -> Vec<&FioWrite> {
        self.fio.iter().filter_map(|f| f.as_ref().ok()).collect()
    }
}

fn run_scenario(sc: &Scenario, o: &Opts, ticks: f64, fio: bool, t0: Instant) -> ScenarioResult {
    let mut res = ScenarioResult {
        name: sc.name.clone(),
        runs: Vec::new(),
        fio_bs: None,
        fio: Vec::new(),
    };
    let wal_run = |res: &mut ScenarioResult| {
        let r = run_append(sc, o, ticks);
        eprintln!(
            "  [{:>4.0}s] {} WAL: {:.0} rec/s, {:.1} MiB/s, p50 {}, p99 {}, {:.0} fsyncs/s",
            t0.elapsed().as_secs_f64(),
            sc.name,
            r.d.appends as f64 / r.secs,
            r.payload_mibs(),
            fmt_ns(percentile(&r.lats, 50.0)),
            fmt_ns(percentile(&r.lats, 99.0)),
            r.d.fsyncs as f64 / r.secs
        );
        if res.fio_bs.is_none() && r.d.fsyncs > 0 {
            res.fio_bs = Some(r.d.per_fsync(r.d.disk_bytes()).round().max(1.0) as u64);
        }
        res.runs.push(r);
        settle();
    };
    let fio_run = |res: &mut ScenarioResult| {
        let f = match (res.fio_bs, res.runs.first()) {
            (Some(bs), Some(first)) => {
                // Room for fio to run 3x faster than the WAL for the whole window, within limits.
                let wal_rate = first.d.disk_bytes() as f64 / first.secs;
                let want = (wal_rate * (o.secs + o.warmup) * 3.0) as u64;
                let size = want.clamp((64u64 << 20).max(bs * 16), (8u64 << 30).max(bs * 16));
                fio_write(bs, size / bs * bs, o.secs, o.warmup)
            }
            _ => Err("the WAL did no fsync in its window".to_owned()),
        };
        match &f {
            Ok(f) => eprintln!(
                "  [{:>4.0}s] {} fio bs={} fdatasync=1: {:.1} MiB/s, {:.0} fsyncs/s",
                t0.elapsed().as_secs_f64(),
                sc.name,
                f.bs,
                f.bw_bytes / MIB,
                f.iops
            ),
            Err(e) => eprintln!("  {} fio: {e}", sc.name),
        }
        res.fio.push(f);
        settle();
    };
    for round in 0..o.rounds {
        if !fio {
            wal_run(&mut res);
        } else if round % 2 == 0 {
            wal_run(&mut res);
            fio_run(&mut res);
        } else {
            fio_run(&mut res);
            wal_run(&mut res);
        }
    }
    res
}

// ---------------------------------------------------------------------------------------------
// fio.

// ---------------------------------------------------------------------------------------------
// Recovery.

/// One timed `Wal::open_dir`.
struct OpenRun {
    /// `RecoveryReport::duration`, seconds.
    duration: f64,
    /// Wall time of `open_dir`, seconds.
    wall: f64,
    /// How the page cache was dropped before it (cold runs).
    cache: Option<Result<String, String>>,
}

struct RecoveryResult {
    bytes_scanned: u64,
    records: u64,
    segments: usize,
    write_secs: f64,
    cold: Vec<OpenRun>,
    warm: Vec<OpenRun>,
    /// fio sequential read bandwidths (bytes/s), with the cache note for cold runs.
    fio_cold: Vec<Result<(f64, String), String>>,
    fio_warm: Vec<Result<f64, String>>,
}

fn open_timed(dir: &Path, cold: bool) -> (OpenRun, weir::wal::RecoveryReport) {
    let cache = cold.then(drop_caches);
    let t = Instant::now();
    let (wal, report) = Wal::open_dir(dir, WalConfig::default()).expect("reopen WAL");
    let wall = t.elapsed().as_secs_f64();
    wal.close().expect("close WAL");
    (
        OpenRun {
            duration: report.duration.as_secs_f64(),
            wall,
            cache,
        },
        report,
    )
}

fn run_recovery(o: &Opts, with_fio: bool, t0: Instant) -> RecoveryResult {
    let tmp = tempfile::tempdir_in(bench_dir()).expect("create bench temp dir");
    let dir = tmp.path().join("wal");
    let record = payload(1 << 20);
    let t = Instant::now();
    {
        let (wal, _) = Wal::open_dir(
            &dir,
            WalConfig {
                fsync: FsyncPolicy::Never,
                ..WalConfig::default()
            },
        )
        .expect("open WAL");
        let mut inflight = std::collections::VecDeque::new();
        for _ in 0..o.recovery_mib {
            inflight.push_back(wal.append(record.clone()));
            if inflight.len() >= 32 {
                if let Some(f) = inflight.pop_front() {
                    f.wait().expect("append");
                }
            }
        }
        for f in inflight {
            f.wait().expect("append");
        }
        wal.close().expect("close WAL");
    }
    sync_all();
    let write_secs = t.elapsed().as_secs_f64();
    let size = o.recovery_mib << 20;

    // fio's file of the same size, laid out once and synced.
    let fio_tmp = if with_fio {
        tempfile::tempdir_in(bench_dir()).ok()
    } else {
        None
    };
    let fio_args = |extra: &[&str]| {
        let d = fio_tmp
            .as_ref()
            .map_or_else(bench_dir, |t| t.path().to_owned());
        let mut a = fio_common("walrec", &d);
        a.extend(["--bs=1M".to_owned(), format!("--size={size}")]);
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let mut layout_err = None;
    if fio_tmp.is_some() {
        if let Err(e) = fio_json(&fio_args(&["--rw=write", "--end_fsync=1"])) {
            layout_err = Some(format!("laying out the file: {e}"));
        }
        sync_all();
    }
    let fio_ok = fio_tmp.is_some() && layout_err.is_none();
    let fio_read = |cold: bool| -> Result<(f64, String), String> {
        if let Some(e) = &layout_err {
            return Err(e.clone());
        }
        let cache = if cold {
            drop_caches().unwrap_or_else(|e| e)
        } else {
            "warm".to_owned()
        };
        let inv = if cold {
            "--invalidate=1"
        } else {
            "--invalidate=0"
        };
        let j = fio_json(&fio_args(&["--rw=read", "--runtime=60", inv]))?;
        Ok((num(&j["read"]["bw_bytes"]), cache))
    };

    let mut report = None;
    let (mut cold, mut fio_cold) = (Vec::new(), Vec::new());
    let mut wal_cold = |cold: &mut Vec<OpenRun>| {
        let (r, rep) = open_timed(&dir, true);
        eprintln!(
            "  [{:>4.0}s] recovery cold: {:.0} MiB/s ({})",
            t0.elapsed().as_secs_f64(),
            rep.bytes_scanned as f64 / MIB / r.duration,
            match &r.cache {
                Some(Ok(m) | Err(m)) => m.as_str(),
                None => "",
            }
        );
        cold.push(r);
        report = Some(rep);
    };
    // A smoke run (no --bench) leaves the machine's page cache alone: warm runs only.
    let cold_rounds = if o.bench { o.rounds } else { 0 };
    for round in 0..cold_rounds {
        if !fio_ok {
            wal_cold(&mut cold);
        } else if round % 2 == 0 {
            wal_cold(&mut cold);
            fio_cold.push(fio_read(true));
        } else {
            fio_cold.push(fio_read(true));
            wal_cold(&mut cold);
        }
    }
    if fio_tmp.is_some() && !fio_ok {
        fio_cold.push(fio_read(true));
    }
    let mut warm = Vec::new();
    for _ in 0..3 {
        let (r, rep) = open_timed(&dir, false);
        warm.push(r);
        report.get_or_insert(rep);
    }
    let fio_warm: Vec<Result<f64, String>> = if fio_tmp.is_some() {
        // The first read pulls the file into the cache; the next ones are warm.
        let _ = fio_read(false);
        (0..2).map(|_| fio_read(false).map(|r| r.0)).collect()
    } else {
        Vec::new()
    };
    drop(fio_tmp);
    drop(tmp);
    let report = report.unwrap_or_default();
    RecoveryResult {
        bytes_scanned: report.bytes_scanned,
        records: report.records,
        segments: report.segments,
        write_secs,
        cold,
        warm,
        fio_cold,
        fio_warm,
    }
}

// ---------------------------------------------------------------------------------------------
// Report.

fn print_append_tables(results: &[ScenarioResult], rounds: usize) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nWAL appends, fsync=always: totals over {rounds} run(s) per scenario (payload MiB/s; \
         latency per append; counts per measured second)"
    );
    let _ = writeln!(
        s,
        "{:<16} {:>8} {:>7} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>7} {:>6} {:>4}",
        "scenario",
        "rec/s",
        "MiB/s",
        "MiB/s runs",
        "p50",
        "p99",
        "p99.9",
        "max",
        "fsyncs/s",
        "app/fs",
        "B/fsync",
        "wr/fs",
        "roll/s",
        "cpu%"
    );
    for r in results {
        let t = r.totals();
        let d = &t.d;
        let runs: Vec<f64> = r.runs.iter().map(AppendRun::payload_mibs).collect();
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>7.1} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6.1} {:>9} {:>7.2} {:>6.1} {:>4.0}",
            r.name,
            fmt_count(d.appends as f64 / t.secs),
            d.append_bytes as f64 / MIB / t.secs,
            fmt_list(&runs),
            fmt_ns(t.p50),
            fmt_ns(t.p99),
            fmt_ns(t.p999),
            fmt_ns(t.max),
            fmt_count(d.fsyncs as f64 / t.secs),
            d.per_fsync(d.appends),
            fmt_bytes(d.per_fsync(d.disk_bytes())),
            d.per_fsync(d.write_calls),
            d.segments_created as f64 / t.secs,
            t.cpu_pct,
        );
    }
    let _ = writeln!(
        s,
        "  app/fs = appends per data fdatasync; B/fsync = bytes written to segments (payload + \
         8 B frame header) per fdatasync; wr/fs = write calls per fdatasync; fsyncs include \
         those of segment rolls (roll/s; each roll = 2 fdatasync + 1 directory fsync); cpu% = \
         whole process, user + system, 100 = one core."
    );
    let _ = writeln!(s, "  per run: load average (1/5/15) before -> after; group commits per fsync; directory fsyncs");
    for r in results {
        for (i, run) in r.runs.iter().enumerate() {
            let _ = writeln!(
                s,
                "    {:<16} #{} {}  gc/fsync {:.2}  dir fsyncs {}",
                r.name,
                i + 1,
                run.load,
                run.d.per_fsync(run.d.group_commits),
                run.d.dir_fsyncs,
            );
        }
    }

    if results.iter().any(|r| !r.fio.is_empty()) {
        let _ = writeln!(
            s,
            "\nSame sitting, fio on the same filesystem (psync, depth 1, sequential appends to a \
             fresh file, fdatasync after every write; bs = the WAL's bytes per fsync in its \
             first run); runs alternate WAL, fio, fio, WAL"
        );
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>9} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>11}",
            "scenario",
            "fio bs",
            "fio MiB/s",
            "MiB/s runs",
            "fsyncs/s",
            "sync p50",
            "sync p99",
            "WAL/fio",
            "WAL/fio",
            "fsyncs/s",
            "WAL/fio"
        );
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>9} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>11}",
            "", "", "", "", "", "", "", "payload", "disk B", "WAL/fio", "by round"
        );
        for r in results {
            let ok = r.fio_ok();
            for e in r.fio.iter().filter_map(|f| f.as_ref().err()) {
                let _ = writeln!(s, "{:<16} fio: {e}", r.name);
            }
            if ok.is_empty() {
                continue;
            }
            let t = r.totals();
            let fio_secs: f64 = ok.iter().map(|f| f.secs).sum();
            let fio_bw = ok.iter().map(|f| f.bw_bytes * f.secs).sum::<f64>() / fio_secs;
            let fio_iops = ok.iter().map(|f| f.iops * f.secs).sum::<f64>() / fio_secs;
            let by_round: Vec<f64> = r
                .runs
                .iter()
                .zip(&r.fio)
                .filter_map(|(w, f)| {
                    f.as_ref()
                        .ok()
                        .map(|f| w.d.append_bytes as f64 / w.secs / f.bw_bytes * 100.0)
                })
                .collect();
            let _ =
                writeln!(
                s,
                "{:<16} {:>9} {:>9.1} {:>11} {:>8} {:>8} {:>8} {:>8.0}% {:>8.0}% {:>8.0}% {:>11}",
                r.name,
                fmt_bytes(ok[0].bs as f64),
                fio_bw / MIB,
                fmt_list(&ok.iter().map(|f| f.bw_bytes / MIB).collect::<Vec<_>>()),
                fmt_count(fio_iops),
                fmt_ns(median(&ok.iter().map(|f| f.sync_p50_ns).collect::<Vec<_>>())),
                fmt_ns(median(&ok.iter().map(|f| f.sync_p99_ns).collect::<Vec<_>>())),
                t.d.append_bytes as f64 / t.secs / fio_bw * 100.0,
                t.d.disk_bytes() as f64 / t.secs / fio_bw * 100.0,
                t.d.fsyncs as f64 / t.secs / fio_iops * 100.0,
                by_round
                    .iter()
                    .map(|x| format!("{x:.0}%"))
                    .collect::<Vec<_>>()
                    .join("/"),
            );
        }
        let _ = writeln!(
            s,
            "  target: WAL sustained throughput >= 85% of fio at the same write size and fsync \
             cadence (sync p50/p99: fio's fdatasync latency, median over its runs)."
        );
    }
    print!("{s}");
}

fn print_recovery(r: &RecoveryResult) {
    let mbs = |secs: f64| r.bytes_scanned as f64 / MIB / secs;
    println!(
        "\nWAL recovery (Wal::open_dir): {} scanned, {} records, {} segments (written with \
         fsync=never in {:.1}s incl. close + sync)",
        fmt_bytes(r.bytes_scanned as f64),
        r.records,
        r.segments,
        r.write_secs
    );
    println!(
        "  {:<14} {:>10} {:>10} {:>9}  page cache",
        "run", "duration", "wall", "MiB/s"
    );
    let row = |name: String, o: &OpenRun| {
        println!(
            "  {:<14} {:>10} {:>10} {:>9.0}  {}",
            name,
            fmt_ns(o.duration * 1e9),
            fmt_ns(o.wall * 1e9),
            mbs(o.duration),
            match &o.cache {
                Some(Ok(m)) => m.clone(),
                Some(Err(m)) => format!("{m} -- NOT a cold-cache figure"),
                None => "warm".to_owned(),
            }
        );
    };
    for (i, o) in r.cold.iter().enumerate() {
        row(format!("cold #{}", i + 1), o);
    }
    for (i, o) in r.warm.iter().enumerate() {
        row(format!("warm #{}", i + 1), o);
    }
    let cold_wal = median(&r.cold.iter().map(|o| mbs(o.duration)).collect::<Vec<_>>());
    let warm_wal = median(&r.warm.iter().map(|o| mbs(o.duration)).collect::<Vec<_>>());
    if r.fio_cold.is_empty() && r.fio_warm.is_empty() {
        return;
    }
    println!("  same sitting, fio sequential read of a file of the same size (psync, bs=1M):");
    let mut cold_fio = Vec::new();
    for (i, f) in r.fio_cold.iter().enumerate() {
        match f {
            Ok((bw, cache)) => {
                println!("    cold #{}: {:>6.0} MiB/s  ({cache})", i + 1, bw / MIB);
                cold_fio.push(bw / MIB);
            }
            Err(e) => println!("    cold #{}: fio: {e}", i + 1),
        }
    }
    let mut warm_fio = Vec::new();
    for (i, f) in r.fio_warm.iter().enumerate() {
        match f {
            Ok(bw) => {
                println!("    warm #{}: {:>6.0} MiB/s", i + 1, bw / MIB);
                warm_fio.push(bw / MIB);
            }
            Err(e) => println!("    warm #{}: fio: {e}", i + 1),
        }
    }
    println!(
        "  WAL/fio (medians): cold {:.0} / {:.0} MiB/s = {:.0}%;  warm {:.0} / {:.0} MiB/s = {:.0}%",
        cold_wal,
        median(&cold_fio),
        cold_wal / median(&cold_fio) * 100.0,
        warm_wal,
        median(&warm_fio),
        warm_wal / median(&warm_fio) * 100.0
    );
}

fn main() {
    let o = parse_args();
    let selected = |name: &str| o.filters.is_empty() || o.filters.iter().any(|f| name.contains(f));
    let scs: Vec<Scenario> = scenarios(o.bench)
        .into_iter()
        .filter(|s| selected(&s.name))
        .collect();
    let recovery = selected("recovery");
    if o.list {
        for s in &scs {
            println!("{}", s.name);
        }
        if recovery {
            println!("recovery");
        }
        return;
    }

    let fio = if o.fio { fio_available() } else { None };
    let ticks = clock_ticks();
    println!(
        "weir WAL bench{}: {} s per run after {} s warm-up, {} round(s); dir {} \
         (WEIR_BENCH_DIR); {} CPUs; kernel {}; load average {}; fio: {}",
        if o.bench {
            ""
        } else {
            " (smoke run: not --bench)"
        },
        o.secs,
        o.warmup,
        o.rounds,
        bench_dir().display(),
        std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned()),
        loadavg(),
        match (&fio, o.fio) {
            (Some(v), _) => v.clone(),
            (None, true) => "not found on PATH (no comparison)".to_owned(),
            (None, false) => "off".to_owned(),
        }
    );
    let started = Instant::now();

    let results: Vec<ScenarioResult> = scs
        .iter()
        .map(|sc| run_scenario(sc, &o, ticks, fio.is_some(), started))
        .collect();
    let rec = recovery.then(|| run_recovery(&o, fio.is_some(), started));

    if !results.is_empty() {
        print_append_tables(&results, o.rounds);
    }
    if let Some(r) = &rec {
        print_recovery(r);
    }
    println!(
        "\ntotal {:.0} s; load average at the end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
