//! The run, the same for every feed: write the node's configuration, start the node, start the
//! feed's producers, SIGKILL and restart the node at seeded random moments (measuring each
//! recovery), drain, stop the node with SIGTERM, check the output and print the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use weir_receiver::lock;

use crate::feed::{Feed, Shared};
use crate::node;
use crate::verify::{read_output, Verdict};

/// What the driver does, whatever the feed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How many times to SIGKILL the node.
    pub kills: u32,
    /// Seed of the kill schedule.
    pub seed: u64,
    /// Shortest time between a (re)start being ready and the next kill, ms.
    pub min_ms: u64,
    /// Longest time between a (re)start being ready and the next kill, ms.
    pub max_ms: u64,
    /// Working directory; a fresh temporary one if `None`.
    pub dir: Option<PathBuf>,
    /// The receiver-node binary; `None`: the one next to this binary.
    pub node: Option<PathBuf>,
    /// Delete the data directory at every kill; each restart is a new node (or, with a
    /// replica, the same node adopting its replicated state).
    pub lose_disk: bool,
    /// The node's `[engine.replication]` table, if any (the `node_id` then stays the same).
    pub replication: Option<String>,
    /// A destination written beside the `dir` output and checked against it (`--to`).
    pub to: Option<crate::dest::Destination>,
}

impl Plan {
    /// Checks the options the driver uses.
    pub fn check(&self) -> Result<(), String> {
        if self.min_ms > self.max_ms {
            return Err("--min-ms must not exceed --max-ms".into());
        }
        Ok(())
    }
}

/// The kill schedule's generator: seeded, so that a run can be repeated (`--seed`).
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed))
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.u64(lo..=hi)
    }
}

/// Runs `plan` against the feed `open` builds in the work directory. `Ok(true)`: nothing
/// acknowledged missing, nothing corrupt, something acknowledged, and a clean SIGTERM exit;
/// `Err`: a usage or setup error.
pub fn run(
    mut plan: Plan,
    open: impl FnOnce(&Path) -> Result<Box<dyn Feed>, String>,
) -> Result<bool, String> {
    plan.check()?;
    let node = match &plan.node {
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
    // Declared before the feed: the directory outlives it.
    let tmp;
    let dir = match &plan.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mport = node::free_port().map_err(|e| e.to_string())?;
    let maddr = ([127, 0, 0, 1], mport).into();
    let out_dir = dir.join("out");
    let config = dir.join("node.toml");
    let log = dir.join("node.log");
    let mut feed = open(&dir)?;
    if let Some(d) = &mut plan.to {
        d.place(&dir);
        d.prepare()?;
    }
    let plan = &plan;
    let data = dir.join("data");
    let receiver = feed.receiver();
    // With --lose-disk every restart is a new node: a new data directory and node id; with a
    // replica, the same node_id on a new directory (the node adopts its replicated state).
    let write_config = |incarnation: u32| {
        let incarnation = if plan.replication.is_some() {
            0
        } else {
            incarnation
        };
        let mut text = node::config(
            &format!("crash-harness-{incarnation}"),
            &data,
            &receiver,
            &out_dir,
            &plan
                .to
                .as_ref()
                .map(|d| d.output_toml())
                .unwrap_or_default(),
            maddr,
        );
        if let Some(r) = &plan.replication {
            text.push_str(r);
        }
        std::fs::write(&config, text).map_err(|e| e.to_string())
    };
    write_config(0)?;
    println!(
        "crash-harness: source {}, seed {}, {} kills{}, work dir {}, node log {}",
        feed.name(),
        plan.seed,
        plan.kills,
        if plan.lose_disk {
            " each losing the data directory"
        } else {
            ""
        },
        dir.display(),
        log.display()
    );

    let mut rng = Rng::new(plan.seed);
    let mut child = node::NodeProcess(
        node::start_node(&node, &config, &log)
            .map_err(|e| format!("starting {}: {e}", node.display()))?,
    );
    let mut recoveries = vec![node::wait_healthy(&mut child, maddr)?];

    let shared = Shared::default();
    let producers = feed.start(&shared)?;
    for k in 0..plan.kills {
        feed.wait_working(&mut child)?;
        std::thread::sleep(Duration::from_millis(rng.range(plan.min_ms, plan.max_ms)));
        child.kill().map_err(|e| format!("SIGKILL: {e}"))?;
        let _ = child.wait();
        let acked = lock(&shared.ledger).acked_count();
        if plan.lose_disk {
            std::fs::remove_dir_all(&data)
                .map_err(|e| format!("deleting {}: {e}", data.display()))?;
            write_config(k + 1)?;
        }
        feed.killed();
        child =
            node::NodeProcess(node::start_node(&node, &config, &log).map_err(|e| e.to_string())?);
        let r = node::wait_healthy(&mut child, maddr)?;
        println!(
            "  kill {}: {acked} records acknowledged so far; recovered in {} ms",
            k + 1,
            r.as_millis()
        );
        recoveries.push(r);
    }
    feed.wait_working(&mut child)?;
    // Drain: stop sending new records, wait (at most 90 s) for the producers to see every sent
    // record acknowledged.
    shared.done_sending.store(true, SeqCst);
    let t0 = Instant::now();
    let mut producer_error = None;
    for p in producers {
        let left = Duration::from_secs(90).saturating_sub(t0.elapsed());
        let deadline = Instant::now() + left;
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !p.is_finished() {
            shared.stop.store(true, SeqCst);
        }
        if let Ok(Err(e)) = p.join() {
            producer_error.get_or_insert(e);
        }
    }
    shared.stop.store(true, SeqCst);
    if let Some(e) = producer_error {
        let _ = child.kill();
        return Err(e);
    }
    // Then until the node has stored everything acknowledged, as the feed sees it.
    feed.drain()?;
    let status = node::terminate(&mut child);

    let output = read_output(&out_dir)?;
    let l = lock(&shared.ledger);
    let v = Verdict::new(&l, &output);
    // The destination must hold exactly what the batches hold.
    let destination = match &plan.to {
        Some(d) => Some((d.name(), d.read()?)),
        None => None,
    };
    let mut rec: Vec<u128> = recoveries.iter().map(Duration::as_millis).collect();
    rec.sort_unstable();
    println!("crash-harness report (seed {}):", plan.seed);
    println!(
        "  kills: {}{}",
        plan.kills,
        if plan.lose_disk {
            " (data directory deleted at each)"
        } else {
            ""
        }
    );
    for line in feed.counts(l.sent, v.acked) {
        println!("  {line}");
    }
    println!(
        "  batch files: {}, distinct records in output: {}",
        output.files,
        output.seen.len()
    );
    println!(
        "  MISSING (acknowledged, not in output): {}",
        v.missing.len()
    );
    println!("  duplicates ({}): {}", feed.duplicates(), v.duplicates);
    println!("  corrupt lines: {}", v.corrupt);
    println!("  unacknowledged but present: {}", v.unacked_present);
    println!(
        "  recovery ms (start to healthy): min {} / median {} / max {}",
        rec.first().copied().unwrap_or(0),
        rec.get(rec.len() / 2).copied().unwrap_or(0),
        rec.last().copied().unwrap_or(0)
    );
    for line in feed.timings() {
        println!("  {line}");
    }
    let mut same = true;
    if let Some((name, (seen, corrupt))) = &destination {
        let extra: u64 = seen
            .iter()
            .map(|(id, n)| u64::from(n.saturating_sub(output.seen.get(id).copied().unwrap_or(0))))
            .sum();
        let lost: u64 = output
            .seen
            .iter()
            .map(|(id, n)| u64::from(n.saturating_sub(seen.get(id).copied().unwrap_or(0))))
            .sum();
        let once = output
            .seen
            .iter()
            .filter(|(id, n)| **n == 1 && seen.get(id) == Some(&1))
            .count();
        println!(
            "  destination {name}: {} records ({} distinct); beyond the batches: {extra}; \
             short of the batches: {lost}; not records: {corrupt}; records once in both: {once}",
            seen.values().map(|n| u64::from(*n)).sum::<u64>(),
            seen.len()
        );
        same = extra == 0 && lost == 0 && *corrupt == 0;
        // Batches a kill interrupted after the destination had them: run again, and skipped.
        let skipped = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("(a re-run): skipped")
            .count();
        println!("  re-run batches the destination already held (skipped): {skipped}");
    }
    let graceful = matches!(status, Some(s) if s.success());
    println!(
        "  graceful stop: {}",
        match status {
            Some(s) => s.to_string(),
            None => "did not exit within 60 s (killed)".into(),
        }
    );
    if !v.missing.is_empty() {
        println!(
            "  first missing ids: {:?}",
            &v.missing[..v.missing.len().min(10)]
        );
    }
    let ok = v.ok() && graceful && same;
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_schedule_is_seeded_and_in_range() {
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..100).map(|_| r.range(200, 1500)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(draw(7).iter().all(|ms| (200..=1500).contains(ms)));
        assert_eq!(Rng::new(1).range(5, 5), 5);
    }
}
