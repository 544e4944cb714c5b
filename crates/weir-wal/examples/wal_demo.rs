//! A tour of the write-ahead log on a real directory: concurrent durable appends, a reopen
//! with recovery, reads by handle, a scan, and cleanup.
//!
//! ```text
//! cargo run --release --example wal_demo [-- DIR [SECONDS [APPENDERS [BYTES]]]]
//! ```
//! Defaults: `./weir-data/wal-demo`, 3 seconds, 8 appender threads, 100-byte records.
//! Afterwards, inspect the directory with `cargo run --release --bin receiver-node -- wal verify DIR`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_wal::{CleanupThreshold, Wal, WalConfig, WalPosition};

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let dir: String = arg(1, "weir-data/wal-demo".to_owned());
    let seconds: u64 = arg(2, 3);
    let appenders: usize = arg(3, 8);
    let bytes: usize = arg(4, 100);

    let config = WalConfig {
        segment_max_bytes: 16 << 20,
        ..WalConfig::default()
    };
    println!("opening WAL in {dir} (fsync policy: {})", config.fsync);
    let (wal, report) = Wal::open_dir(&dir, config.clone())?;
    println!(
        "recovered {} records ({} bytes) from {} segments in {:?}",
        report.records, report.record_bytes, report.segments, report.duration
    );
    let wal = Arc::new(wal);
    let before = wal.metrics().snapshot();

    println!("{appenders} threads appending {bytes}-byte records for {seconds} s; each waits for its fsync...");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..appenders)
        .map(|t| {
            let wal = Arc::clone(&wal);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut last = None;
                while !stop.load(Ordering::Relaxed) {
                    let mut p = format!("thread {t} record {n} ").into_bytes();
                    p.resize(bytes, b'.');
                    last = Some(wal.append(p).wait()?);
                    n += 1;
                }
                Ok::<_, weir_wal::WalError>((n, last))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut a_handle = None;
    for w in workers {
        let (n, last) = w.join().expect("appender thread")?;
        total += n;
        a_handle = a_handle.or(last);
    }
    let secs = started.elapsed().as_secs_f64();
    let m = wal.metrics().snapshot();
    let fsyncs = m.fsyncs - before.fsyncs;
    println!(
        "appended {total} durable records: {:.0} records/s, {:.1} MB/s, {fsyncs} fsyncs ({:.1} appends per fsync)",
        total as f64 / secs,
        (total as f64 * bytes as f64) / secs / 1e6,
        total as f64 / fsyncs.max(1) as f64
    );
    if let Some(h) = a_handle {
        let back = wal.read(h)?;
        println!(
            "read back by handle {h:?}: {:?}",
            String::from_utf8_lossy(&back[..back.len().min(40)])
        );
    }
    wal.close()?;
    drop(wal);

    println!("reopening (recovery scans and verifies every record)...");
    let (wal, report) = Wal::open_dir(&dir, config)?;
    println!(
        "recovered {} records, {:.1} MB scanned in {:?} ({:.0} MB/s); torn tails: {}, damaged regions: {}",
        report.records,
        report.bytes_scanned as f64 / 1e6,
        report.duration,
        report.bytes_scanned as f64 / 1e6 / report.duration.as_secs_f64().max(1e-9),
        report.torn_tails.len(),
        report.corrupt.len()
    );
    let scanned = wal.scan(WalPosition::START).count();
    println!("a full scan returns {scanned} records");
    let end = wal.end_position();
    let cleaned = wal.cleanup(CleanupThreshold {
        before: Some(end),
        ..CleanupThreshold::default()
    })?;
    println!(
        "cleanup before {end:?} deleted segments {:?} ({} bytes); the active segment stays",
        cleaned.deleted, cleaned.bytes_freed
    );
    println!("inspect it: cargo run --release --bin receiver-node -- wal verify {dir}");
    Ok(())
}
