//! `crash-harness`: proves zero data loss by killing the real `receiver-node`.
//!
//! It writes a configuration of its own (a socket receiver in `frames` mode on a free loopback
//! port, a `dir` output in `lines` format, fsync `always`), starts `receiver-node`, and runs a
//! producer that sends numbered records and records every acknowledgement (the cumulative
//! durable count the node writes back). At random moments (seeded, reproducible) it SIGKILLs the
//! node and starts it again, K times; the producer reconnects and resends what was not
//! acknowledged. Then it lets the node drain, stops it with SIGTERM (which must exit 0), and
//! reads every batch file:
//!
//! - missing: acknowledged records absent from the output (must be 0),
//! - duplicates: records present more than once (at-least-once: resent after a kill),
//! - corrupt: output lines that are not records the producer sent,
//! - unacked but present: sent, never acknowledged (the node died first), yet stored,
//! - kills, and the recovery time of each restart (start to `/health` answering 200).
//!
//! Exit status: 0 if nothing acknowledged is missing and nothing is corrupt, 1 otherwise, 2 on
//! usage or setup errors.
//!
//! ```text
//! cargo build --release --bins
//! target/release/crash-harness --kills 300 --seed 7          # a long run
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

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
    /// Producer connections sending at once.
    #[arg(long, default_value_t = 2)]
    producers: u32,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn healthy(metrics: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&metrics, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
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

fn run(o: &Opts) -> Result<bool, String> {
    if o.min_ms > o.max_ms {
        return Err("--min-ms must not exceed --max-ms".into());
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
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\n\
             [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"{addr}\"\nprotocol = \"frames\"\n\n\
             [[output]]\ntype = \"dir\"\npath = {out:?}\nformat = \"lines\"\n\n[metrics]\naddress = \"{maddr}\"\n",
            data = dir.join("data").display().to_string(),
            out = out_dir.display().to_string(),
        ),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "crash-harness: seed {}, {} kills, work dir {}, node log {}",
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
    let producers: Vec<_> = (0..o.producers)
        .map(|_| {
            let (l, n, s, d) = (
                ledger.clone(),
                next_id.clone(),
                stop.clone(),
                done_sending.clone(),
            );
            std::thread::spawn(move || producer(addr, l, n, s, d))
        })
        .collect();

    for k in 0..o.kills {
        std::thread::sleep(Duration::from_millis(rng.range(o.min_ms, o.max_ms)));
        child.kill().map_err(|e| format!("SIGKILL: {e}"))?;
        let _ = child.wait();
        let acked = lock(&ledger).acked.iter().filter(|a| **a).count();
        child = start_node(&node, &config, &log).map_err(|e| e.to_string())?;
        let r = wait_healthy(&mut child, maddr)?;
        println!(
            "  kill {}: {acked} records acknowledged so far; recovered in {} ms",
            k + 1,
            r.as_millis()
        );
        recoveries.push(r);
    }
    // Drain: stop sending new records, wait for every sent record to be acknowledged.
    done_sending.store(true, SeqCst);
    let t0 = Instant::now();
    for p in producers {
        let left = Duration::from_secs(60).saturating_sub(t0.elapsed());
        let deadline = Instant::now() + left;
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !p.is_finished() {
            stop.store(true, SeqCst);
        }
        let _ = p.join();
    }
    stop.store(true, SeqCst);
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
    println!("  records sent: {}, acknowledged: {}", l.sent, acked.len());
    println!(
        "  batch files: {files}, distinct records in output: {}",
        seen.len()
    );
    println!("  MISSING (acknowledged, not in output): {}", missing.len());
    println!("  duplicates (resent after a kill): {duplicates}");
    println!("  corrupt lines: {}", corrupt + never_sent as u64);
    println!("  unacknowledged but present: {unacked_present}");
    println!(
        "  recovery ms (start to healthy): min {} / median {} / max {}",
        rec.first().copied().unwrap_or(0),
        rec.get(rec.len() / 2).copied().unwrap_or(0),
        rec.last().copied().unwrap_or(0)
    );
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
