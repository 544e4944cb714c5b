//! The engine end to end, with no external services: a receiver stores numbered "sensor
//! readings", every block is fsynced to the WAL before `store()` resolves, and two jobs process
//! each 1-second batch (per-sensor averages; a 3-batch window count).
//!
//! ```text
//! cargo run --release --example stream_demo                 # 5 s into ./weir-data/stream-demo
//! cargo run --release --example stream_demo -- DIR SECONDS
//! ```
//!
//! Run it twice: the second run resumes after the first one's checkpoint (the receiver asks for
//! it), and re-runs any batch a crash (Ctrl-C, kill -9) left incomplete.

use std::time::Duration;

use weir::receiver::{Position, Receiver, ReceiverContext, ReceiverError, Record};
use weir::{StreamingConfig, StreamingContext};

/// Emits readings `sensor-N,value` at about 200,000 per second, resuming after its checkpoint.
///
/// A `store()` resolves when its block is durable: blocks are cut every 200 ms (or at 4 MiB), so
/// a receiver that awaited each call before reading on would manage one call per 200 ms. This one
/// keeps up to 64 calls in flight and acknowledges them in order as they resolve.
struct Sensors;

impl Receiver for Sensors {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let mut seq = ctx.checkpoint().get("sensors", 0).map_or(0, |s| s + 1);
        if seq > 0 {
            println!("receiver: resuming after reading {}", seq - 1);
        }
        let mut in_flight = std::collections::VecDeque::new();
        while !ctx.is_shutting_down() {
            let batch: Vec<Record> = (seq..seq + 2_000)
                .map(|i| {
                    Record::new(format!("sensor-{},{}", i % 8, i % 100))
                        .with_key(format!("sensor-{}", i % 8))
                        .with_position(Position::sequence("sensors", i))
                })
                .collect();
            seq += 2_000;
            in_flight.push_back(ctx.store(batch));
            if in_flight.len() == 64 {
                // Durable once this resolves: a real source would be acknowledged here.
                in_flight.pop_front().expect("non-empty").await?;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for f in in_flight {
            f.await?;
        }
        Ok(())
    }
}

/// `HH:MM:SS` (UTC) of a batch time.
fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().map_or("weir-data/stream-demo", String::as_str);
    let secs: u64 = args.get(1).map_or(Ok(5), |s| s.parse())?;

    let mut ctx = StreamingContext::new(StreamingConfig::default(), dir);
    ctx.add_receiver("sensors", Sensors);
    ctx.foreach_batch("averages", |batch| {
        let sums = batch.reduce_by_key(
            |r| {
                let text = String::from_utf8_lossy(&r.payload).into_owned();
                let value: u64 = text
                    .rsplit(',')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (r.key.unwrap_or_default(), (value, 1u64))
            },
            |a, b| (a.0 + b.0, a.1 + b.1),
        )?;
        let mut avgs: Vec<String> = sums
            .iter()
            .map(|(k, (sum, n))| {
                format!(
                    "{}={:.1}",
                    String::from_utf8_lossy(k),
                    *sum as f64 / *n as f64
                )
            })
            .collect();
        avgs.sort();
        println!(
            "batch {} ({} blocks, {} records): {}",
            clock(batch.time()),
            batch.num_partitions(),
            batch.count(),
            avgs.iter().take(3).cloned().collect::<Vec<_>>().join(" ")
        );
        Ok(())
    });
    ctx.foreach_window("last-3", 3, |window| {
        println!(
            "  window of {} batches: {} records",
            window.times().len(),
            window.count()
        );
        Ok(())
    });

    let running = ctx.start().await?;
    println!("weir: data in {dir}; running {secs} s");
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let m = running.metrics();
    let report = running.stop().await?;
    let e = m.engine();
    let r = e.receiver("sensors");
    let w = m.wal().snapshot();
    println!(
        "stopped: {} records stored durably in {} blocks, {} fsyncs; {} batches completed \
         (last {}); {} re-run after a restart",
        r.records_stored(),
        r.blocks_stored(),
        w.fsyncs,
        e.batches_completed(),
        report.completed_through.map_or("none".into(), clock),
        e.batches_rerun()
    );
    Ok(())
}
