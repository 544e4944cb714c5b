//! Apache Flume agents (`interop/flume.xml`, Flume 1.11) and the Flume 1.8 agent carrying Spark's
//! sink (`interop/spark-sink.xml`).
//!
//! [`FlumeAgent::start`] runs `org.apache.flume.node.Application -n <agent> -f <file>
//! --no-reload-conf` on a properties text (see [`avro_sink_agent`] and [`spark_sink_agent`]) with a
//! heap of at most 256 MiB, and waits until every source and sink of it has started. Every agent
//! serves Flume's JSON counters over HTTP (`-Dflume.monitoring.type=http`), read with
//! [`FlumeAgent::counters`]: a test learns from the agent itself how many events it generated,
//! how many its sink delivered, and how often delivery or connecting failed.
//!
//! Java 17 needs no extra flag for either agent (no `--add-opens`): Flume 1.11 (Netty 4.1, Avro
//! 1.11, Jetty 9) and Flume 1.8 (Netty 3.9, Jetty 6) with Spark 2.4.7's `SparkSink` (Scala
//! 2.11.12) were run here on OpenJDK 17.0.15, with the seq source, the memory channel, the Avro
//! sink (with and without deflate), the `SparkSink` and the HTTP counters, and logged no
//! `InaccessibleObjectException` nor illegal-access warning. What the `SparkSink` does need is
//! Avro 1.8 (its generated classes call `new SpecificData()`, protected in Avro 1.7.4, the one
//! Flume 1.8 brings); `interop/spark-sink.xml` pins it, as Spark's own build does.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{classpath, log_lines, peer_dir, tail, PeerProcess};
use crate::{free_port, workspace_root};

/// The heap of one agent: the tests' channels hold at most some 100k small events.
const HEAP_MB: u32 = 256;

/// Which Flume to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dist {
    /// Apache Flume 1.11.0 (`interop/lib/flume`; Log4j 2).
    Flume,
    /// Apache Flume 1.8.0 with Spark 2.4.7's `SparkSink` (`interop/lib/spark-sink`; Log4j 1).
    SparkSink,
}

impl Dist {
    fn lib(self) -> &'static str {
        match self {
            Dist::Flume => "flume",
            Dist::SparkSink => "spark-sink",
        }
    }

    /// The JVM flag that points the distribution's logging at `interop/log4j*.properties`.
    fn log_config(self) -> String {
        let interop = workspace_root().join("interop");
        match self {
            Dist::Flume => format!(
                "-Dlog4j2.configurationFile={}",
                interop.join("log4j2.properties").display()
            ),
            Dist::SparkSink => format!(
                "-Dlog4j.configuration=file:{}",
                interop.join("log4j.properties").display()
            ),
        }
    }
}

/// A `seq` source: events whose bodies are `0`, `1`, ... `total_events - 1` (decimal text), put
/// into the channel `batch_size` at a time.
#[derive(Debug, Clone, Copy)]
pub struct SeqSource {
    pub total_events: u64,
    pub batch_size: u32,
}

/// The names the generated agents use (agent, source, channel, sink).
pub const AGENT: &str = "agent";
pub const SOURCE: &str = "seq";
pub const CHANNEL: &str = "mem";
pub const SINK: &str = "out";

/// The counter groups of the generated agents, as [`Counters::get`] takes them.
pub const SOURCE_COUNTERS: &str = "SOURCE.seq";
pub const CHANNEL_COUNTERS: &str = "CHANNEL.mem";
pub const SINK_COUNTERS: &str = "SINK.out";

/// The agent, its seq source and a memory channel large enough for every event (so that the
/// source never meets a full channel: the test is about the sink's side).
fn seq_into_memory(seq: SeqSource, take_batch: u32) -> String {
    let capacity = seq.total_events.max(10_000);
    let tx = u64::from(seq.batch_size.max(take_batch)).max(1000);
    format!(
        "{AGENT}.sources = {SOURCE}\n\
         {AGENT}.channels = {CHANNEL}\n\
         {AGENT}.sinks = {SINK}\n\
         {AGENT}.sources.{SOURCE}.type = seq\n\
         {AGENT}.sources.{SOURCE}.totalEvents = {}\n\
         {AGENT}.sources.{SOURCE}.batchSize = {}\n\
         {AGENT}.sources.{SOURCE}.channels = {CHANNEL}\n\
         {AGENT}.channels.{CHANNEL}.type = memory\n\
         {AGENT}.channels.{CHANNEL}.capacity = {capacity}\n\
         {AGENT}.channels.{CHANNEL}.transactionCapacity = {tx}\n",
        seq.total_events, seq.batch_size
    )
}

/// `seq` source -> memory channel -> Avro sink to `127.0.0.1:port`, `batch_size` events per
/// `appendBatch`, `compression-type = deflate` when `deflate`.
pub fn avro_sink_agent(seq: SeqSource, port: u16, batch_size: u32, deflate: bool) -> String {
    format!(
        "{}{}",
        seq_into_memory(seq, batch_size),
        avro_sink(SINK, port, batch_size, deflate)
    )
}

/// [`avro_sink_agent`] over TLS: the Avro sink's `ssl = true`, trusting the Java truststore
/// `truststore` (`truststore_type` `JKS` or `PKCS12`, password `password`; see
/// [`crate::tls::TestPki::java_truststore`]).
pub fn avro_sink_agent_tls(
    seq: SeqSource,
    port: u16,
    batch_size: u32,
    truststore: &std::path::Path,
    truststore_type: &str,
    password: &str,
) -> String {
    format!(
        "{}{AGENT}.sinks.{SINK}.ssl = true
         {AGENT}.sinks.{SINK}.truststore = {}
         {AGENT}.sinks.{SINK}.truststore-password = {password}
         {AGENT}.sinks.{SINK}.truststore-type = {truststore_type}
",
        avro_sink_agent(seq, port, batch_size, false),
        truststore.display()
    )
}

/// The properties of one Avro sink named `name` draining the channel.
fn avro_sink(name: &str, port: u16, batch_size: u32, deflate: bool) -> String {
    format!(
        "{AGENT}.sinks.{name}.type = avro\n\
         {AGENT}.sinks.{name}.channel = {CHANNEL}\n\
         {AGENT}.sinks.{name}.hostname = 127.0.0.1\n\
         {AGENT}.sinks.{name}.port = {port}\n\
         {AGENT}.sinks.{name}.batch-size = {batch_size}\n\
         {AGENT}.sinks.{name}.compression-type = {}\n",
        if deflate { "deflate" } else { "none" }
    )
}

/// What drains a benchmark agent's channel (see [`bench_agent`]).
#[derive(Debug, Clone, Copy)]
pub enum BenchSink {
    /// `sinks` Avro sinks to `127.0.0.1:port`, each its own connection and thread, sending
    /// `appendBatch` calls of `batch_size` events without compression.
    Avro {
        port: u16,
        sinks: u32,
        batch_size: u32,
    },
    /// Flume's null sink taking `batch_size` events per transaction: what the agent delivers
    /// when the sink costs nothing.
    Null { batch_size: u32 },
}

/// For benchmarks: an endless `seq` source putting `batch_size` events at a time into a memory
/// channel of 100,000 events, drained by `sink`. The source backs off for at most 10 ms when the
/// channel is full (Flume's default is up to 5 s, which would make the source the bottleneck).
/// The sinks' counters are `SINK.out`, `SINK.out1`, ... (see [`sink_names`]).
pub fn bench_agent(sink: BenchSink) -> String {
    let (names, sinks, batch_size) = match sink {
        BenchSink::Avro {
            port,
            sinks,
            batch_size,
        } => {
            let names = sink_names(sinks);
            let props: String = names
                .iter()
                .map(|n| avro_sink(n, port, batch_size, false))
                .collect();
            (names, props, batch_size)
        }
        BenchSink::Null { batch_size } => (
            sink_names(1),
            format!(
                "{AGENT}.sinks.{SINK}.type = null\n\
                 {AGENT}.sinks.{SINK}.channel = {CHANNEL}\n\
                 {AGENT}.sinks.{SINK}.batchSize = {batch_size}\n"
            ),
            batch_size,
        ),
    };
    let tx = batch_size.max(1000);
    format!(
        "{AGENT}.sources = {SOURCE}\n\
         {AGENT}.channels = {CHANNEL}\n\
         {AGENT}.sinks = {}\n\
         {AGENT}.sources.{SOURCE}.type = seq\n\
         {AGENT}.sources.{SOURCE}.batchSize = {batch_size}\n\
         {AGENT}.sources.{SOURCE}.backoffSleepIncrement = 1\n\
         {AGENT}.sources.{SOURCE}.maxBackoffSleep = 10\n\
         {AGENT}.sources.{SOURCE}.channels = {CHANNEL}\n\
         {AGENT}.channels.{CHANNEL}.type = memory\n\
         {AGENT}.channels.{CHANNEL}.capacity = 100000\n\
         {AGENT}.channels.{CHANNEL}.transactionCapacity = {tx}\n{sinks}",
        names.join(" ")
    )
}

/// The names of `n` sinks in [`bench_agent`]: `out`, `out1`, `out2`, ...
pub fn sink_names(n: u32) -> Vec<String> {
    (0..n.max(1))
        .map(|i| {
            if i == 0 {
                SINK.to_string()
            } else {
                format!("{SINK}{i}")
            }
        })
        .collect()
}

/// `seq` source -> memory channel -> Spark's `SparkSink` serving `SparkFlumeProtocol` on
/// `127.0.0.1:port`; a batch not acked within `tx_timeout_secs` is rolled back. Polls may ask
/// for at most `max_batch` events (the channel's transaction capacity is at least that).
pub fn spark_sink_agent(seq: SeqSource, port: u16, tx_timeout_secs: u32, max_batch: u32) -> String {
    format!(
        "{}{AGENT}.sinks.{SINK}.type = org.apache.spark.streaming.flume.sink.SparkSink\n\
         {AGENT}.sinks.{SINK}.channel = {CHANNEL}\n\
         {AGENT}.sinks.{SINK}.hostname = 127.0.0.1\n\
         {AGENT}.sinks.{SINK}.port = {port}\n\
         {AGENT}.sinks.{SINK}.threads = 4\n\
         {AGENT}.sinks.{SINK}.timeout = {tx_timeout_secs}\n",
        seq_into_memory(seq, max_batch)
    )
}

/// What the `SparkSink` logs when it rolls a batch back (nacked, or not acked in time).
pub const SPARK_SINK_ROLLBACK: &str = "Transaction is being rolled back";

/// A running Flume agent; dropping it kills the JVM and removes its directory (kept, and said
/// where, when the test panics).
pub struct FlumeAgent {
    pub dist: Dist,
    dir: PathBuf,
    /// Its output (`interop/log4j*.properties`: INFO and up).
    pub log: PathBuf,
    /// The port of its JSON counters (`GET /metrics`).
    pub monitoring_port: u16,
    process: Option<PeerProcess>,
}

impl FlumeAgent {
    /// Writes `properties` (one agent; its name is taken from the first `NAME.sources` key) into
    /// a fresh peer directory, starts the agent, and waits until every source and sink in it has
    /// started and its counters answer.
    pub fn start(dist: Dist, properties: &str) -> FlumeAgent {
        FlumeAgent::start_with(dist, properties, true)
    }

    /// [`FlumeAgent::start`], choosing the JIT: `quick_start` stops it at its first tier (the
    /// agent is up sooner; what tests want), otherwise the JVM compiles fully (what benchmarks
    /// want).
    pub fn start_with(dist: Dist, properties: &str, quick_start: bool) -> FlumeAgent {
        let cp = classpath(dist.lib());
        let dir = peer_dir(&format!("flume-{}", dist.lib()));
        let file = dir.join("agent.properties");
        fs::write(&file, properties).expect("writing the agent's properties");
        let layout = Layout::parse(properties);
        let log = dir.join("log");
        let monitoring_port = free_port();
        let mut jvm_args = vec![
            dist.log_config(),
            "-Dflume.monitoring.type=http".to_string(),
            format!("-Dflume.monitoring.port={monitoring_port}"),
        ];
        if quick_start {
            jvm_args.push("-XX:TieredStopAtLevel=1".to_string());
        }
        let args = vec![
            "-n".to_string(),
            layout.agent.clone(),
            "-f".to_string(),
            file.display().to_string(),
            "--no-reload-conf".to_string(),
        ];
        let process = PeerProcess::start(
            &format!("flume agent ({})", dist.lib()),
            &cp,
            HEAP_MB,
            &jvm_args,
            "org.apache.flume.node.Application",
            &args,
            &log,
        );
        let mut agent = FlumeAgent {
            dist,
            dir,
            log,
            monitoring_port,
            process: Some(process),
        };
        let p = agent.process.as_mut().expect("just started");
        for needle in layout.ready_lines() {
            p.wait_for_log(&needle, 0, Duration::from_secs(60));
        }
        let t0 = Instant::now();
        while agent.try_counters().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the agent's counters (port {monitoring_port}) never answered; its log {}:\n{}",
                agent.log.display(),
                tail(&agent.log, 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    /// The agent's counters now; panics (with the log's tail) when they cannot be read.
    pub fn counters(&self) -> Counters {
        self.try_counters().unwrap_or_else(|| {
            panic!(
                "reading the agent's counters (port {}) failed; its log {}:\n{}",
                self.monitoring_port,
                self.log.display(),
                tail(&self.log, 40)
            )
        })
    }

    /// Waits until the agent's sink ([`SINK_COUNTERS`]) has had `target` events accepted
    /// downstream; panics after `timeout` with the counters and the log's tail.
    pub fn wait_drained(&self, target: u64, timeout: Duration) {
        let t0 = Instant::now();
        while self.counters().get(SINK_COUNTERS, "EventDrainSuccessCount") < target {
            assert!(
                t0.elapsed() < timeout,
                "the agent's sink did not deliver {target} events within {timeout:?}: {:?}\n{}",
                self.counters(),
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's counters, or `None` when the HTTP request fails.
    pub fn try_counters(&self) -> Option<Counters> {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitoring_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        // HTTP/1.0: Jetty then answers without chunked encoding and closes.
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return None;
        }
        Counters::parse(body)
    }

    /// The lines of its log that contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        log_lines(&self.log)
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// True while the JVM runs.
    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(PeerProcess::running)
    }

    /// Kills the agent at once (its memory channel is lost).
    pub fn kill(&mut self) {
        // Dropping the process kills and reaps it (once).
        drop(self.process.take());
    }

    /// The directory holding its properties and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FlumeAgent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let _ = fs::write(self.dir.join("keep"), b"");
            eprintln!(
                "the Flume agent's properties and log are kept in {} (remove the folder when done)",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Flume's JSON counters: component (`SOURCE.seq`, `CHANNEL.mem`, `SINK.out`) -> counter ->
/// value, as `GET /metrics` gives them (every value a string).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<String, BTreeMap<String, String>>);

impl Counters {
    /// A counter as a number; 0 when the component or counter is absent or not a number.
    pub fn get(&self, component: &str, counter: &str) -> u64 {
        self.0
            .get(component)
            .and_then(|c| c.get(counter))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Parses `{"A":{"k":"v",...},...}`; `None` if the text is not of that shape.
    pub fn parse(text: &str) -> Option<Counters> {
        let mut p = Json {
            s: text.as_bytes(),
            i: 0,
        };
        let mut out = BTreeMap::new();
        p.expect(b'{')?;
        if !p.eat(b'}') {
            loop {
                let component = p.string()?;
                p.expect(b':')?;
                p.expect(b'{')?;
                let mut fields = BTreeMap::new();
                if !p.eat(b'}') {
                    loop {
                        let k = p.string()?;
                        p.expect(b':')?;
                        let v = p.value()?;
                        fields.insert(k, v);
                        if p.eat(b'}') {
                            break;
                        }
                        p.expect(b',')?;
                    }
                }
                out.insert(component, fields);
                if p.eat(b'}') {
                    break;
                }
                p.expect(b',')?;
            }
        }
        Some(Counters(out))
    }
}

/// Just enough JSON for Flume's counters: objects of strings (or bare numbers).
struct Json<'a> {
    s: &'a [u8],
    i: usize,
}

impl Json<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    fn string(&mut self) -> Option<String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    out.push(*self.s.get(self.i)?);
                    self.i += 1;
                }
                c => out.push(c),
            }
        }
    }

    fn value(&mut self) -> Option<String> {
        self.skip_ws();
        if self.s.get(self.i) == Some(&b'"') {
            return self.string();
        }
        let start = self.i;
        while self
            .s
            .get(self.i)
            .is_some_and(|c| !matches!(c, b',' | b'}') && !c.is_ascii_whitespace())
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
}

/// The agent name and its components, from a properties text.
struct Layout {
    agent: String,
    sources: Vec<String>,
    /// (name, type)
    sinks: Vec<(String, String)>,
}

impl Layout {
    fn parse(properties: &str) -> Layout {
        let pairs: Vec<(&str, &str)> = properties
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let agent = pairs
            .iter()
            .find_map(|(k, _)| k.strip_suffix(".sources"))
            .expect("the properties name no `AGENT.sources`")
            .to_string();
        let list = |key: &str| -> Vec<String> {
            pairs
                .iter()
                .find(|(k, _)| *k == format!("{agent}.{key}"))
                .map(|(_, v)| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let sources = list("sources");
        let sinks = list("sinks")
            .into_iter()
            .map(|name| {
                let ty = pairs
                    .iter()
                    .find(|(k, _)| *k == format!("{agent}.sinks.{name}.type"))
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
                (name, ty)
            })
            .collect();
        Layout {
            agent,
            sources,
            sinks,
        }
    }

    /// The log lines that say the agent is up, in the order Flume starts things: sinks, then
    /// sources. The `SparkSink` has no counter group; its server is bound once it says it starts
    /// it.
    fn ready_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .sinks
            .iter()
            .map(|(name, ty)| {
                if ty.ends_with("SparkSink") {
                    format!("Starting Avro server for sink: {name}")
                } else if ty == "null" {
                    format!("Null sink {name} started")
                } else {
                    format!("Component type: SINK, name: {name} started")
                }
            })
            .collect();
        v.extend(
            self.sources
                .iter()
                .map(|s| format!("Component type: SOURCE, name: {s} started")),
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_flumes_json() {
        let c = Counters::parse(
            r#"{"CHANNEL.mem":{"ChannelSize":"0","ChannelFillPercentage":"0.0"},"SINK.out":{"EventDrainSuccessCount":"40000","X":7}}"#,
        )
        .unwrap();
        assert_eq!(c.get(SINK_COUNTERS, "EventDrainSuccessCount"), 40000);
        assert_eq!(c.get(SINK_COUNTERS, "X"), 7);
        assert_eq!(c.get(CHANNEL_COUNTERS, "ChannelSize"), 0);
        assert_eq!(c.get("SOURCE.none", "EventAcceptedCount"), 0);
        assert_eq!(Counters::parse("{}"), Some(Counters::default()));
        assert_eq!(Counters::parse("{\"a\":"), None);
    }

    #[test]
    fn the_agents_name_and_ready_lines_come_from_the_properties() {
        let seq = SeqSource {
            total_events: 10,
            batch_size: 5,
        };
        let l = Layout::parse(&avro_sink_agent(seq, 1, 100, true));
        assert_eq!(l.agent, AGENT);
        assert_eq!(
            l.ready_lines(),
            [
                "Component type: SINK, name: out started",
                "Component type: SOURCE, name: seq started"
            ]
        );
        let l = Layout::parse(&spark_sink_agent(seq, 1, 3, 500));
        assert_eq!(
            l.ready_lines()[0],
            "Starting Avro server for sink: out".to_string()
        );
        assert!(spark_sink_agent(seq, 1, 3, 5000).contains("transactionCapacity = 5000"));
    }
}
