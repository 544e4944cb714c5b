//! Helpers shared by the custom-harness benchmarks: formatting, percentiles, process and system
//! readings, and fio (the disk's own figures, measured in the same run as an anchor).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const MIB: f64 = 1024.0 * 1024.0;

pub fn fmt_ns(ns: f64) -> String {
    if ns.is_nan() {
        "-".to_owned()
    } else if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.0}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

pub fn fmt_bytes(b: f64) -> String {
    if b < 1024.0 {
        format!("{b:.0}B")
    } else if b < MIB {
        format!("{:.1}KiB", b / 1024.0)
    } else {
        format!("{:.2}MiB", b / MIB)
    }
}

pub fn fmt_count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Nearest-rank percentile of sorted data.
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) used by this process so far.
pub fn process_cpu_secs(ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces): the first
    // is field 3 (state); utime is field 14, stime field 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (num(11) + num(12)) / ticks
}

pub fn meminfo_cached_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("Cached:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn sync_all() {
    let _ = Command::new("sync").status();
}

/// The same pause between every measured run, so that writeback and the (virtual) machine
/// settle alike for the WAL and for fio.
pub fn settle() {
    sync_all();
    std::thread::sleep(Duration::from_secs(1));
}

pub fn bench_dir() -> PathBuf {
    std::env::var_os("WEIR_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

pub struct FioWrite {
    pub bs: u64,
    pub bw_bytes: f64,
    pub iops: f64,
    pub secs: f64,
    pub sync_p50_ns: f64,
    pub sync_p99_ns: f64,
}

pub fn fio_available() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs fio with `args` and returns its (only) job as JSON.
pub fn fio_json(args: &[String]) -> Result<serde_json::Value, String> {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio failed ({}): {} {}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // fio may print warnings before the JSON.
    let start = text.find('{').ok_or("fio printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    v["jobs"]
        .get(0)
        .cloned()
        .ok_or_else(|| "fio JSON has no jobs".to_owned())
}

pub fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

pub fn fio_common(name: &str, dir: &Path) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--directory={}", dir.display()),
        "--ioengine=psync".to_owned(),
        "--iodepth=1".to_owned(),
        "--numjobs=1".to_owned(),
        "--fallocate=none".to_owned(),
    ]
}

/// Sequential appends to a fresh file, `bs` bytes per write, fdatasync after every write,
/// bounded by `secs` seconds and by `size` bytes, after `warmup` seconds that are not measured
/// (as the WAL's are not: on this kind of VM the first second of a run is often faster, while
/// the page cache reuses pages freed by the previous run).
pub fn fio_write(bs: u64, size: u64, secs: f64, warmup: f64) -> Result<FioWrite, String> {
    let tmp = tempfile::tempdir_in(bench_dir()).map_err(|e| format!("temp dir: {e}"))?;
    let mut args = fio_common("walcmp", tmp.path());
    args.extend([
        "--rw=write".to_owned(),
        format!("--bs={bs}"),
        format!("--size={size}"),
        "--fdatasync=1".to_owned(),
        format!("--runtime={}", secs.ceil() as u64),
        format!("--ramp_time={}", warmup.ceil() as u64),
        "--time_based=0".to_owned(),
        "--lat_percentiles=1".to_owned(),
        "--percentile_list=50:99".to_owned(),
    ]);
    let j = fio_json(&args);
    drop(tmp);
    let j = j?;
    let w = &j["write"];
    let sync = &j["sync"]["lat_ns"]["percentile"];
    Ok(FioWrite {
        bs,
        bw_bytes: num(&w["bw_bytes"]),
        iops: num(&w["iops"]),
        secs: num(&w["runtime"]) / 1000.0,
        sync_p50_ns: num(&sync["50.000000"]),
        sync_p99_ns: num(&sync["99.000000"]),
    })
}

/// Sequential 1 MiB buffered writes to a fresh file, one fsync at the end, bounded by `secs`
/// seconds and `size` bytes: the most the disk absorbs when nobody waits for durability (the
/// ceiling for any WAL).
pub fn fio_write_buffered(size: u64, secs: f64) -> Result<FioWrite, String> {
    let tmp = tempfile::tempdir_in(bench_dir()).map_err(|e| format!("temp dir: {e}"))?;
    let mut args = fio_common("ceiling", tmp.path());
    args.extend([
        "--rw=write".to_owned(),
        "--bs=1M".to_owned(),
        format!("--size={size}"),
        "--end_fsync=1".to_owned(),
        format!("--runtime={}", secs.ceil() as u64),
    ]);
    let j = fio_json(&args);
    drop(tmp);
    let j = j?;
    let w = &j["write"];
    Ok(FioWrite {
        bs: 1 << 20,
        bw_bytes: num(&w["bw_bytes"]),
        iops: num(&w["iops"]),
        secs: num(&w["runtime"]) / 1000.0,
        sync_p50_ns: f64::NAN,
        sync_p99_ns: f64::NAN,
    })
}

/// Runs this bench again as a child with its own arguments plus `extra`, and returns the JSON
/// object on the last line of its output; exits the bench, with the child's stderr, if it
/// failed (`what` names the scenario).
#[allow(dead_code)] // Not every bench runs children.
pub fn run_scenario(extra: &[String], what: &str) -> serde_json::Value {
    let exe = std::env::current_exe().expect("current exe");
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.extend(extra.iter().cloned());
    let out = std::process::Command::new(&exe)
        .args(&args)
        .output()
        .expect("running a scenario");
    if !out.status.success() {
        eprintln!(
            "scenario {what} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        std::process::exit(1);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default()).expect("scenario JSON")
}
