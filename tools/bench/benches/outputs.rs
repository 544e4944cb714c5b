//! Outputs benchmark: how fast each exactly-once output takes batches, beside the `discard`
//! output (reads every record back, writes nothing) in the same run, and PostgreSQL beside a
//! plain `COPY` of the same rows by `psql` (the anchor).
//!
//! ```text
//! cargo bench --bench outputs                         # every output, both record shapes
//! cargo bench --bench outputs -- --outputs discard,postgres --shapes json1k --records 50000
//! ```
//!
//! For each record shape — `100b` (100-byte opaque payloads; Parquet and PostgreSQL in their raw
//! layout) and `json1k` (JSON objects of about 1 KiB; Parquet and PostgreSQL with typed columns
//! from five JSON fields) — and each output, an in-process engine (WAL fsync `never`: the
//! output is what is measured) ingests `--records` records in 1,000-record `store()` calls as
//! fast as it can, and a job writes each batch (1 s interval) with the node's own output code.
//! Printed per output: records/s of write time (records over the summed duration of the
//! output's `write` calls: the output's own cost, the figure compared), the batches written,
//! MB/s of payload, and for Parquet the bytes written per record. Ingest is not measured here
//! (see `ingest`). PostgreSQL
//! and Kafka run on this machine (started here: Debian's PostgreSQL, Apache Kafka from
//! `interop/`), so they compete with the node for the 2 cores.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::receiver::{Receiver, ReceiverContext, ReceiverError, Record};
use weir::wal::FsyncPolicy;
use weir::{StreamingConfig, StreamingContext};
use weir_node::output::{Output, OutputConfig};

mod common;
use common::*;

#[derive(Debug, Clone)]
struct Opts {
    records: Option<u64>,
    shapes: Vec<String>,
    outputs: Vec<String>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        records: None,
        shapes: vec!["100b".into(), "json1k".into()],
        outputs: ["discard", "parquet", "postgres", "kafka"]
            .map(String::from)
            .to_vec(),
    };
    let mut args = std::env::args().skip(1);
    let list = |v: String| v.split(',').map(String::from).collect::<Vec<_>>();
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--records" => o.records = Some(val("--records").parse().expect("--records: a number")),
            "--shapes" => o.shapes = list(val("--shapes")),
            "--outputs" => o.outputs = list(val("--outputs")),
            "--bench" => {}
            other => {
                eprintln!(
                    "unknown argument {other}\nusage: outputs [--records N] [--shapes 100b,json1k] \
                     [--outputs discard,parquet,postgres,kafka]"
                );
                std::process::exit(2);
            }
        }
    }
    o
}

/// A pseudo-random sequence seeded by `seed` (splitmix64): payloads that compress like
/// real data rather than like a repeated pattern.
fn random(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed;
    std::iter::repeat_with(move || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Words for the JSON records' text.
const WORDS: [&str; 32] = [
    "stream",
    "batch",
    "record",
    "node",
    "kafka",
    "flume",
    "ingest",
    "durable",
    "replica",
    "offset",
    "partition",
    "output",
    "table",
    "parquet",
    "commit",
    "fsync",
    "block",
    "window",
    "latency",
    "sensor",
    "device",
    "event",
    "order",
    "payment",
    "user",
    "session",
    "click",
    "view",
    "error",
    "warning",
    "metric",
    "value",
];

/// Record `i` of a shape: `100b`, an id and 87 random letters; `json1k`, a JSON object of about
/// 1 KiB with a number, a user name, a score, a time, a flag, tags and a text of random words.
fn record(shape: &str, i: u64) -> Vec<u8> {
    match shape {
        "100b" => {
            let mut v = format!("{i:012}-").into_bytes();
            v.extend(random(i).take(87).map(|r| b'a' + (r % 26) as u8));
            v
        }
        _ => {
            let mut text = String::new();
            for r in random(i) {
                if text.len() > 740 {
                    break;
                }
                text.push_str(WORDS[(r % 32) as usize]);
                text.push(' ');
            }
            format!(
                r#"{{"id":{i},"user":"user-{}","score":{}.25,"ts":"2026-12-03T10:{:02}:{:02}Z","ok":{},"tags":["a","b","c"],"text":"{text}"}}"#,
                i % 1000,
                i % 977,
                (i / 60) % 60,
                i % 60,
                i.is_multiple_of(2)
            )
            .into_bytes()
        }
    }
}

/// Stores `total` records of `shape` in calls of 1,000, paced over about five seconds (so that
/// they make five or six batches of the 1 s interval), then waits for the stop.
struct Load {
    shape: String,
    total: u64,
}

impl Receiver for Load {
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let mut pending = std::collections::VecDeque::new();
        let mut i = 0;
        let t0 = Instant::now();
        let per_sec = (self.total / 5).max(1);
        while i < self.total {
            let due = Duration::from_secs_f64(i as f64 / per_sec as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let end = (i + 1000).min(self.total);
            let records: Vec<Record> = (i..end)
                .map(|n| Record::new(Bytes::from(record(&self.shape, n))))
                .collect();
            pending.push_back(ctx.store(records));
            if pending.len() >= 64 {
                pending.pop_front().expect("non-empty").await?;
            }
            i = end;
        }
        for f in pending {
            f.await?;
        }
        while !ctx.is_shutting_down() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

struct Result1 {
    write_rps: f64,
    batches: u64,
    mb_s: f64,
    extra: String,
}

/// Runs `total` records of `shape` through `output`; `after` adds a note (bytes per record).
fn run(
    rt: &tokio::runtime::Runtime,
    shape: &str,
    total: u64,
    output: Output,
    after: impl FnOnce() -> String,
) -> Result1 {
    let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
    let config = StreamingConfig {
        batch_interval_ms: 1000,
        block_interval_ms: 100,
        node_id: Some("bench-1".into()),
        wal: weir::WalConfig {
            fsync: FsyncPolicy::Never,
            ..weir::WalConfig::default()
        },
        ..StreamingConfig::default()
    };
    let mut ctx = StreamingContext::new(config, dir.path());
    ctx.add_receiver(
        "load",
        Load {
            shape: shape.into(),
            total,
        },
    );
    let (write_ns, written, batches) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (w, n, b) = (write_ns.clone(), written.clone(), batches.clone());
    let output = Arc::new(output);
    let out = output.clone();
    ctx.foreach_batch("output", move |batch| {
        let t = Instant::now();
        out.write(batch)
            .map_err(|e| Box::new(e) as weir::stream::JobError)?;
        w.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        n.fetch_add(batch.count(), Relaxed);
        if !batch.is_empty() {
            b.fetch_add(1, Relaxed);
        }
        Ok(())
    });
    rt.block_on(async {
        let running = ctx.start().await.expect("start");
        let t0 = Instant::now();
        while written.load(Relaxed) < total {
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "only {} of {total} records written in 600 s",
                written.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        running.stop().await.expect("graceful stop");
    });
    let write_secs = write_ns.load(Relaxed) as f64 / 1e9;
    let payload: u64 = (0..total).map(|i| record(shape, i).len() as u64).sum();
    Result1 {
        write_rps: total as f64 / write_secs,
        batches: batches.load(Relaxed),
        mb_s: payload as f64 / write_secs / 1e6,
        extra: after(),
    }
}

fn output(toml_text: &str) -> Output {
    let c: OutputConfig = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{toml_text}: {e}"));
    Output::new(&c, 1).unwrap_or_else(|e| panic!("{toml_text}: {e}"))
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        n += if p.is_dir() {
            dir_bytes(&p)
        } else {
            e.metadata().map_or(0, |m| m.len())
        };
    }
    n
}

/// The PostgreSQL anchor: `\copy` of the same rows (CSV, the same columns) into a fresh table.
fn psql_copy(
    pg: &weir_testkit::peers::postgres::PostgresServer,
    shape: &str,
    total: u64,
    create: &str,
    table: &str,
) -> f64 {
    pg.psql(&format!("DROP TABLE IF EXISTS {table}; {create}"));
    let file = tempfile::NamedTempFile::new_in(bench_dir()).expect("a temp file");
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(file.as_file());
        for i in 0..total {
            let r = record(shape, i);
            if shape == "100b" {
                // node, batch_time, receiver, stream, partition, offset, key, payload
                let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(w, "bench-1,1796313600000,load,,,,,\\x{hex}").unwrap();
            } else {
                let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
                writeln!(
                    w,
                    "{},{},{},{},{},\"{}\"",
                    v["id"],
                    v["user"].as_str().unwrap(),
                    v["score"],
                    v["ts"].as_str().unwrap(),
                    v["ok"],
                    v["text"].as_str().unwrap()
                )
                .unwrap();
            }
        }
    }
    let cols = if shape == "100b" {
        "(node, batch_time, receiver, stream, \"partition\", \"offset\", key, payload)"
    } else {
        "(id, \"user\", score, ts, ok, text)"
    };
    let t = Instant::now();
    pg.psql(&format!(
        "\\copy {table} {cols} FROM '{}' (FORMAT csv)",
        file.path().display()
    ));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(pg.count(&format!("SELECT count(*) FROM {table}")), total);
    total as f64 / secs
}

fn main() {
    let o = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "outputs benchmark: {} cores, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let pg = o
        .outputs
        .iter()
        .any(|x| x == "postgres")
        .then(weir_testkit::peers::postgres::PostgresServer::start);
    let kafka = o
        .outputs
        .iter()
        .any(|x| x == "kafka")
        .then(|| weir_testkit::peers::kafka::KafkaCluster::start(1));
    let pw = tempfile::NamedTempFile::new().expect("a password file");
    std::fs::write(pw.path(), weir_testkit::peers::postgres::PASSWORD).expect("writing it");
    for shape in &o.shapes {
        let total = o
            .records
            .unwrap_or(if shape == "100b" { 1_000_000 } else { 200_000 });
        let json = shape != "100b";
        println!("\n{shape}: {} records", fmt_count(total as f64));
        println!(
            "  {:<28} {:>14} {:>8} {:>10}  notes",
            "output", "write rec/s", "batches", "MB/s"
        );
        let mut discard_rps = None;
        for name in &o.outputs {
            let work = tempfile::tempdir_in(bench_dir()).expect("temp dir");
            let (label, result) = match name.as_str() {
                "discard" => (
                    "discard".to_string(),
                    run(&rt, shape, total, output("type = \"discard\""), String::new),
                ),
                "parquet" => {
                    let path = work.path().join("parquet");
                    let cols = if json {
                        "payload = \"json\"\n[columns]\nid = { pointer = \"/id\", type = \"int64\" }\n\
                         user = { pointer = \"/user\", type = \"string\" }\n\
                         score = { pointer = \"/score\", type = \"float64\" }\n\
                         ts = { pointer = \"/ts\", type = \"timestamp_ms\" }\n\
                         ok = { pointer = \"/ok\", type = \"bool\" }\n\
                         text = { pointer = \"/text\", type = \"string\" }\n"
                    } else {
                        ""
                    };
                    let out = output(&format!(
                        "type = \"parquet\"\npath = {:?}\ncompression = \"zstd\"\n{cols}",
                        path.display().to_string()
                    ));
                    let p2 = path.clone();
                    (
                        "parquet (local, zstd)".to_string(),
                        run(&rt, shape, total, out, move || {
                            format!(
                                "{:.1} bytes/record on disk",
                                dir_bytes(&p2) as f64 / total as f64
                            )
                        }),
                    )
                }
                "postgres" => {
                    let Some(pg) = &pg else { continue };
                    let table = format!("bench_{shape}");
                    let (create, cols) = if json {
                        (
                            format!(
                                "CREATE TABLE {table} (id bigint, \"user\" text, score double precision, \
                                 ts timestamptz, ok bool, text text)"
                            ),
                            "create_table = false\n[columns]\nid = \"/id\"\nuser = \"/user\"\n\
                             score = \"/score\"\nts = \"/ts\"\nok = \"/ok\"\ntext = \"/text\"\n",
                        )
                    } else {
                        (String::new(), "")
                    };
                    pg.psql(&format!(
                        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS weir_batches; {create}"
                    ));
                    let out = output(&format!(
                        "type = \"postgres\"\nurl = \"{}\"\npassword_file = {:?}\ntable = \"{table}\"\n{cols}",
                        pg.url(),
                        pw.path().display().to_string()
                    ));
                    let r = run(&rt, shape, total, out, String::new);
                    assert_eq!(pg.count(&format!("SELECT count(*) FROM {table}")), total);
                    let anchor_create = if json {
                        format!(
                            "CREATE TABLE {table}_copy (id bigint, \"user\" text, score double precision, \
                             ts timestamptz, ok bool, text text)"
                        )
                    } else {
                        format!(
                            "CREATE TABLE {table}_copy (node text, batch_time bigint, receiver text, \
                             stream text, \"partition\" integer, \"offset\" bigint, key bytea, payload bytea)"
                        )
                    };
                    let anchor =
                        psql_copy(pg, shape, total, &anchor_create, &format!("{table}_copy"));
                    let extra = format!(
                        "psql \\copy anchor {} rows/s: {:.2} of it",
                        fmt_count(anchor),
                        r.write_rps / anchor
                    );
                    ("postgres (COPY binary)".to_string(), Result1 { extra, ..r })
                }
                "kafka" => {
                    let Some(k) = &kafka else { continue };
                    let topic = format!("bench-{shape}-{}", std::process::id());
                    weir_testkit::peers::kafka::create_topic(&k.bootstrap(), &topic, 4, 1, &[]);
                    let out = output(&format!(
                        "type = \"kafka\"\nbootstrap_servers = \"{}\"\ntopic = \"{topic}\"\nexactly_once = true\n\
                         [properties]\n\"linger.ms\" = \"5\"\n\"compression.type\" = \"lz4\"\n",
                        k.bootstrap()
                    ));
                    (
                        "kafka (exactly once)".to_string(),
                        run(&rt, shape, total, out, String::new),
                    )
                }
                other => panic!("unknown output {other}: discard, parquet, postgres, kafka"),
            };
            let vs = match discard_rps {
                Some(d) if name != "discard" => format!("{:.2}× discard; ", result.write_rps / d),
                _ => String::new(),
            };
            if name == "discard" {
                discard_rps = Some(result.write_rps);
            }
            println!(
                "  {label:<28} {:>14} {:>8} {:>10.1}  {vs}{}",
                fmt_count(result.write_rps),
                result.batches,
                result.mb_s,
                result.extra
            );
        }
    }
}
