//! The node's status for people and scripts: `GET /api/status` (JSON, documented in the README),
//! the live page at `/` that draws it, and `receiver-node status`, which prints it.
//!
//! The figures come from the same place as `/metrics`: the OpenMetrics text is parsed back into
//! samples ([`Samples`]), so the page can never show a number `/metrics` does not have. Only two
//! things come from elsewhere: the engine's last completed batches (the timeline) and each
//! receiver's last error. Rates (records/s, bytes/s) are the change of the counters over the
//! last [`RATE_WINDOW`], sampled once a second by the HTTP endpoint ([`RateWindow`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use weir::receiver::lock;
use weir::stream::MetricsRegistry;

/// How far back rates look.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// One sample of the metrics text: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (a histogram's `_bucket`, `_count` and `_sum` included).
    pub name: String,
    /// Its labels, in the text's order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `name{k="v",...}` without the labels in `skip`: a key for the status's figure maps.
    fn key(&self, skip: &[&str]) -> String {
        let rest: Vec<String> = self
            .labels
            .iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        if rest.is_empty() {
            self.name.clone()
        } else {
            format!("{}{{{}}}", self.name, rest.join(","))
        }
    }
}

/// The samples of one reading of `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Parses OpenMetrics text (comments skipped; a line that does not parse is skipped too).
    pub fn parse(text: &str) -> Samples {
        Samples(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(parse_line)
                .collect(),
        )
    }

    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0
            .iter()
            .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// The sum of the samples [`matching`](Self::matching) (`None` when there are none).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.matching(name, labels) {
            *found.get_or_insert(0.0) += s.value;
        }
        found
    }

    /// The `q` quantile (0..1) of histogram `name` (its `_bucket` samples with `labels`), in the
    /// histogram's unit, interpolated within the bucket as Prometheus's `histogram_quantile`
    /// does; `None` without observations.
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&bucket, labels)
            .filter_map(|s| {
                let le = s.label("le")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (le, count) in buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let within = count - below;
                let frac = if within > 0.0 {
                    (rank - below) / within
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            (lower, below) = (le, count);
        }
        Some(lower)
    }
}

/// `name{k="v",...} value` or `name value` (a trailing timestamp or exemplar is ignored).
fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        _ => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The labels after `{` up to the closing `}`, and the text after it.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        s = &rest[end + 1..];
    }
}

/// The counters of the last [`RATE_WINDOW`], sampled by [`StatusSource::tick`] once a second.
#[derive(Debug, Default)]
pub struct RateWindow {
    readings: Mutex<VecDeque<(Instant, BTreeMap<String, f64>)>>,
}

impl RateWindow {
    /// Remembers the counters (samples named `*_total`) of `samples`, now.
    pub fn record(&self, samples: &Samples) {
        let counters = samples
            .0
            .iter()
            .filter(|s| s.name.ends_with("_total"))
            .map(|s| (s.key(&[]), s.value))
            .collect();
        let now = Instant::now();
        let mut r = lock(&self.readings);
        r.push_back((now, counters));
        while r
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            r.pop_front();
        }
    }

    /// Per second, the change of the counter `key` (`name{k="v",...}` in the text's label
    /// order) over the window; `None` before two readings.
    pub fn rate(&self, key: &str) -> Option<f64> {
        let r = lock(&self.readings);
        let (t0, first) = r.front()?;
        let (t1, last) = r.back()?;
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let (a, b) = (first.get(key).copied().unwrap_or(0.0), last.get(key)?);
        Some(((b - a) / secs).max(0.0))
    }
}

/// What the node's status names that `/metrics` does not: its receivers' and outputs' types.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// The node's id.
    pub node_id: String,
    /// `batch_interval_ms` of the engine.
    pub batch_interval_ms: u64,
    /// Receivers: (name, type), in the configuration's order.
    pub receivers: Vec<(String, String)>,
    /// Outputs: (type, description), in the configuration's order (position = index + 1).
    pub outputs: Vec<(String, String)>,
    /// The replica's kind (`object_store`, `kafka`) when replication is configured.
    pub replication: Option<String>,
}

impl NodeInfo {
    /// What `config` names, with the node id it resolved to.
    pub fn new(config: &crate::config::NodeConfig, node_id: String) -> NodeInfo {
        NodeInfo {
            node_id,
            batch_interval_ms: config.engine.batch_interval_ms,
            receivers: config
                .receivers
                .iter()
                .map(|r| {
                    let kind = serde_json::to_value(&r.kind)
                        .ok()
                        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_default();
                    (r.name.clone(), kind)
                })
                .collect(),
            outputs: config
                .outputs
                .iter()
                .map(|o| (o.type_name().to_string(), o.describe()))
                .collect(),
            replication: config.engine.replication.as_ref().map(|r| {
                match r {
                    weir::replica::ReplicationConfig::ObjectStore(_) => "object_store",
                    weir::replica::ReplicationConfig::Kafka(_) => "kafka",
                    _ => "configured",
                }
                .to_string()
            }),
        }
    }
}

/// The status of a running node (`receiver-node run`).
pub struct NodeStatus {
    registry: MetricsRegistry,
    info: NodeInfo,
    rates: RateWindow,
    /// The outputs, in the configuration's order (their last errors).
    outputs: Vec<std::sync::Arc<crate::output::Output>>,
}

impl NodeStatus {
    /// The status of the engine whose metrics are `registry`, with its `outputs`.
    pub fn new(
        registry: MetricsRegistry,
        info: NodeInfo,
        outputs: Vec<std::sync::Arc<crate::output::Output>>,
    ) -> NodeStatus {
        NodeStatus {
            registry,
            info,
            rates: RateWindow::default(),
            outputs,
        }
    }
}

/// A last error as JSON (`at_ms`, `ago_s`, `message`), or null.
fn incident(e: Option<weir::stream::ReceiverIncident>, now: u64) -> Value {
    e.map_or(Value::Null, |e| {
        json!({
            "at_ms": e.at_ms,
            "ago_s": now.saturating_sub(e.at_ms) / 1000,
            "message": e.message,
        })
    })
}

/// `value` rounded to three decimals (JSON numbers people read).
fn round(value: f64) -> Value {
    json!((value * 1000.0).round() / 1000.0)
}

/// A figure as JSON: an integer when it is one.
fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        json!(value as i64)
    } else {
        round(value)
    }
}

/// Every sample labelled `key="value"` whose name does not start with one of `skip`, keyed
/// `name{other labels}`; histograms (`_bucket`, `_sum`, `_count`, `_created`) left out.
fn figures(samples: &Samples, key: &str, value: &str, skip: &[&str]) -> Map<String, Value> {
    samples
        .0
        .iter()
        .filter(|s| s.label(key) == Some(value))
        .filter(|s| !skip.iter().any(|p| s.name.starts_with(p)))
        .filter(|s| {
            !["_bucket", "_sum", "_count", "_created"]
                .iter()
                .any(|x| s.name.ends_with(x))
        })
        .map(|s| (s.key(&[key]), number(s.value)))
        .collect()
}

/// Every unlabelled sample whose name starts with `prefix`.
fn unlabelled(samples: &Samples, prefix: &str) -> Map<String, Value> {
    samples
        .0
        .iter()
        .filter(|s| s.name.starts_with(prefix) && s.labels.is_empty())
        .filter(|s| {
            !["_bucket", "_sum", "_count", "_created"]
                .iter()
                .any(|x| s.name.ends_with(x))
        })
        .map(|s| (s.name.clone(), number(s.value)))
        .collect()
}

/// The p50 and p99 of histogram `name` (seconds) in ms, or nulls.
fn percentiles_ms(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> (Value, Value) {
    let q = |q| {
        samples
            .quantile(name, labels, q)
            .map_or(Value::Null, |s| round(s * 1000.0))
    };
    (q(0.5), q(0.99))
}

/// Now, ms since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NodeStatus {
    /// The `/api/status` document (without `health`, which the endpoint adds).
    pub fn document(&self, samples: &Samples) -> Value {
        let engine = self.registry.engine();
        let g = |name: &str| samples.get(name, &[]).map_or(Value::Null, number);
        let interval = self.info.batch_interval_ms.max(1) as f64;
        let batches: Vec<Value> = engine
            .recent_batches()
            .iter()
            .map(|b| {
                json!({
                    "time": b.time,
                    "records": b.records,
                    "input_rate": round(b.records as f64 * 1000.0 / interval),
                    "scheduling_ms": b.scheduling_ms,
                    "processing_ms": b.processing_ms,
                    "total_ms": b.scheduling_ms + b.processing_ms,
                })
            })
            .collect();
        let now = now_ms();
        let receivers: Vec<Value> = self
            .info
            .receivers
            .iter()
            .map(|(name, kind)| {
                let m = engine.receiver(name);
                let last_error = m.last_error();
                let state = if m.running() == 1 {
                    "running"
                } else if last_error.is_some() && m.restarts() > 0 {
                    "restarting"
                } else {
                    "stopped"
                };
                let rate = |counter: &str| {
                    let key = format!("{counter}{{receiver=\"{name}\"}}");
                    self.rates.rate(&key).map_or(Value::Null, round)
                };
                json!({
                    "name": name,
                    "type": kind,
                    "state": state,
                    "records_per_s": rate("weir_receiver_records_stored_total"),
                    "bytes_per_s": rate("weir_receiver_bytes_stored_total"),
                    "records_stored": m.records_stored(),
                    "bytes_stored": m.bytes_stored(),
                    "pending_bytes": m.pending_bytes(),
                    "store_failures": m.store_failures(),
                    "restarts": m.restarts(),
                    "errors": m.errors_reported(),
                    "last_error": incident(last_error, now),
                    "figures": figures(samples, "receiver", name, &["weir_receiver_"]),
                })
            })
            .collect();
        let outputs: Vec<Value> = self
            .info
            .outputs
            .iter()
            .enumerate()
            .map(|(i, (kind, describe))| {
                let position = (i + 1).to_string();
                let label = [("output", position.as_str())];
                let v = |name: &str| samples.get(name, &label).unwrap_or(0.0);
                let (p50, p99) = percentiles_ms(samples, "weir_output_write_seconds", &label);
                json!({
                    "position": i + 1,
                    "type": kind,
                    "describe": describe,
                    "state": if v("weir_output_failing") > 0.0 { "failing" } else { "ok" },
                    "records": number(v("weir_output_records_total")),
                    "batches": number(v("weir_output_batches_total")),
                    "batches_skipped": number(v("weir_output_batches_skipped_total")),
                    "failures": number(v("weir_output_failures_total")),
                    "dead_letters": number(v("weir_output_dead_letters_total")),
                    "last_write_ms": number(v("weir_output_last_write_ms")),
                    "write_p50_ms": p50,
                    "write_p99_ms": p99,
                    "last_error": incident(
                        self.outputs.get(i).and_then(|o| o.stats().last_error()),
                        now,
                    ),
                    "records_per_s": self.rates
                        .rate(&format!("weir_output_records_total{{output=\"{position}\"}}"))
                        .map_or(Value::Null, round),
                })
            })
            .collect();
        let (fsync_p50, fsync_p99) = percentiles_ms(samples, "weir_wal_fsync_seconds", &[]);
        let replication = self.info.replication.as_ref().map(|kind| {
            let (p50, p99) = percentiles_ms(samples, "weir_replica_write_seconds", &[]);
            let mut m = unlabelled(samples, "weir_replica_");
            m.insert("kind".into(), json!(kind));
            m.insert("write_p50_ms".into(), p50);
            m.insert("write_p99_ms".into(), p99);
            Value::Object(m)
        });
        let waiting: Vec<&str> = self.registry.waiting_for_space();
        json!({
            "mode": "run",
            "node_id": self.info.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "now_ms": now,
            "batch_interval_ms": self.info.batch_interval_ms,
            "batches": batches,
            "tracker": {
                "last_allocated_batch_ms": g("weir_last_allocated_batch_ms"),
                "last_completed_batch_ms": g("weir_last_completed_batch_ms"),
                "batches_allocated": g("weir_batches_allocated_total"),
                "batches_completed": g("weir_batches_completed_total"),
                "batches_rerun": g("weir_batches_rerun_total"),
                "unallocated_blocks": g("weir_unallocated_blocks"),
                "blocks_pending": g("weir_blocks_pending"),
                "job_failures": g("weir_job_failures_total"),
                "records_per_s": self.rates.rate("weir_batch_records_total").map_or(Value::Null, round),
            },
            "receivers": receivers,
            "outputs": outputs,
            "wal": wal(samples, fsync_p50, fsync_p99),
            "replication": replication,
            "waiting_for_space": waiting,
        })
    }
}

/// The WAL's figures: segments, bytes, fsync percentiles, corruption counters.
fn wal(samples: &Samples, fsync_p50: Value, fsync_p99: Value) -> Value {
    let mut m = unlabelled(samples, "weir_wal_");
    for name in [
        "weir_records_lost_corruption_total",
        "weir_blocks_lost_corruption_total",
    ] {
        if let Some(v) = samples.get(name, &[]) {
            m.insert(name.into(), number(v));
        }
    }
    m.insert("fsync_p50_ms".into(), fsync_p50);
    m.insert("fsync_p99_ms".into(), fsync_p99);
    Value::Object(m)
}

impl crate::http::StatusSource for NodeStatus {
    fn prometheus_text(&self) -> String {
        self.registry.prometheus_text()
    }

    fn waiting_for_space(&self) -> Vec<&'static str> {
        self.registry.waiting_for_space()
    }

    fn status(&self) -> Value {
        self.document(&Samples::parse(&self.prometheus_text()))
    }

    fn tick(&self) {
        self.rates.record(&Samples::parse(&self.prometheus_text()));
    }
}

/// The `/api/status` document of a pull sink (`receiver-node sink`).
pub fn sink_document(samples: &Samples, rates: &RateWindow, push: &str, pull: &str) -> Value {
    let (fsync_p50, fsync_p99) = percentiles_ms(samples, "weir_wal_fsync_seconds", &[]);
    let rate = |key: &str| rates.rate(key).map_or(Value::Null, round);
    json!({
        "mode": "sink",
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": now_ms(),
        "push": {
            "address": push,
            "events_per_s": rate("weir_sink_events_accepted_total"),
            "figures": figures(samples, "receiver", "push", &[]),
        },
        "pull": {
            "address": pull,
            "events_per_s": rate("weir_sink_pull_events_served_total"),
            "acked_per_s": rate("weir_sink_events_acked_total"),
            "figures": unlabelled(samples, "weir_sink_pull_"),
        },
        "queue": {
            "events_queued": samples.get("weir_sink_events_queued", &[]).map_or(Value::Null, number),
            "events_ready": samples.get("weir_sink_events_ready", &[]).map_or(Value::Null, number),
            "events_unacked": samples.get("weir_sink_events_unacked", &[]).map_or(Value::Null, number),
            "transactions_open": samples.get("weir_sink_transactions_open", &[]).map_or(Value::Null, number),
            "queued_bytes": samples.get("weir_sink_queued_bytes", &[]).map_or(Value::Null, number),
            "rollbacks_nack": samples.get("weir_sink_rollbacks_nack_total", &[]).map_or(Value::Null, number),
            "rollbacks_timeout": samples.get("weir_sink_rollbacks_timeout_total", &[]).map_or(Value::Null, number),
            "figures": unlabelled(samples, "weir_sink_")
                .into_iter()
                .filter(|(k, _)| !k.starts_with("weir_sink_pull_"))
                .collect::<Map<String, Value>>(),
        },
        "wal": wal(samples, fsync_p50, fsync_p99),
    })
}

/// How long `receiver-node status` waits for the node.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `http://<address>/api/status` (what `receiver-node status` prints).
///
/// # Errors
/// What went wrong, naming the address: not reachable, not a weir node, a timeout.
pub async fn fetch(address: &str) -> Result<Value, String> {
    use http_body_util::BodyExt;
    let get = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot connect to {address}: {e} (is the node running, with [metrics] enabled on this address?)"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("{address}: {e}"))?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::get("/api/status")
            .header(hyper::header::HOST, address)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{address}: {e}"))?
            .to_bytes();
        driver.abort();
        if !code.is_success() {
            return Err(format!(
                "{address} answered {code} to /api/status: is it a weir node of this version?"
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| format!("{address}: /api/status is not JSON ({e})"))
    };
    tokio::time::timeout(FETCH_TIMEOUT, get)
        .await
        .map_err(|_| format!("{address} did not answer within {FETCH_TIMEOUT:?}"))?
}

/// Whether a status document shows a healthy node: health `ok`, no output failing and no
/// receiver restarting.
pub fn healthy(doc: &Value) -> bool {
    let any = |list: &str, state: &str| {
        doc[list]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["state"] == state)
    };
    doc["health"] == "ok" && !any("outputs", "failing") && !any("receivers", "restarting")
}

/// The terminal summary of a status document (`receiver-node status`).
pub fn render_text(doc: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let _ = writeln!(
        out,
        "weir {} ({} mode){}: health {}",
        s(&doc["version"]),
        s(&doc["mode"]),
        doc["node_id"]
            .as_str()
            .map(|id| format!(", node {id}"))
            .unwrap_or_default(),
        s(&doc["health"])
    );
    if doc["mode"] == "sink" {
        let q = &doc["queue"];
        let _ = writeln!(
            out,
            "push {}: {} events/s   pull {}: {} events/s served, {} acked/s",
            s(&doc["push"]["address"]),
            s(&doc["push"]["events_per_s"]),
            s(&doc["pull"]["address"]),
            s(&doc["pull"]["events_per_s"]),
            s(&doc["pull"]["acked_per_s"])
        );
        let _ = writeln!(
            out,
            "queue: {} events held ({} ready, {} unacked in {} open transactions), {} bytes; rolled back: {} by nack, {} by timeout",
            s(&q["events_queued"]),
            s(&q["events_ready"]),
            s(&q["events_unacked"]),
            s(&q["transactions_open"]),
            s(&q["queued_bytes"]),
            s(&q["rollbacks_nack"]),
            s(&q["rollbacks_timeout"])
        );
        wal_line(&mut out, &doc["wal"]);
        return out;
    }
    let batches = doc["batches"].as_array().cloned().unwrap_or_default();
    let t = &doc["tracker"];
    let _ = writeln!(
        out,
        "batches: every {} ms; allocated {} (last {}), completed {} (last {}), unallocated blocks {}, job failures {}",
        s(&doc["batch_interval_ms"]),
        s(&t["batches_allocated"]),
        clock(&t["last_allocated_batch_ms"]),
        s(&t["batches_completed"]),
        clock(&t["last_completed_batch_ms"]),
        s(&t["unallocated_blocks"]),
        s(&t["job_failures"])
    );
    if let Some(last) = batches.last() {
        let _ = writeln!(
            out,
            "last batch: {} records, scheduling {} ms, processing {} ms, total delay {} ms",
            s(&last["records"]),
            s(&last["scheduling_ms"]),
            s(&last["processing_ms"]),
            s(&last["total_ms"])
        );
    }
    let mut rows = vec![[
        "RECEIVER",
        "TYPE",
        "STATE",
        "RECORDS/S",
        "BYTES/S",
        "STORED",
        "RESTARTS",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for r in doc["receivers"].as_array().into_iter().flatten() {
        rows.push(vec![
            s(&r["name"]),
            s(&r["type"]),
            s(&r["state"]),
            s(&r["records_per_s"]),
            s(&r["bytes_per_s"]),
            s(&r["records_stored"]),
            s(&r["restarts"]),
            last_error(&r["last_error"]),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    let mut rows = vec![[
        "OUTPUT",
        "STATE",
        "RECORDS",
        "FAILURES",
        "DEAD LETTERS",
        "LAST WRITE MS",
        "P99 MS",
    ]
    .map(String::from)
    .to_vec()];
    for o in doc["outputs"].as_array().into_iter().flatten() {
        rows.push(vec![
            format!("{} {}", s(&o["position"]), s(&o["describe"])),
            s(&o["state"]),
            s(&o["records"]),
            s(&o["failures"]),
            s(&o["dead_letters"]),
            s(&o["last_write_ms"]),
            s(&o["write_p99_ms"]),
            last_error(&o["last_error"]),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    out.push('\n');
    wal_line(&mut out, &doc["wal"]);
    if let Value::Object(r) = &doc["replication"] {
        let _ = writeln!(
            out,
            "replica ({}): epoch {}, writes {}, failures {}, waiting {}, fenced {}",
            s(&r["kind"]),
            s(&r["weir_replica_epoch"]),
            s(&r["weir_replica_writes_total"]),
            s(&r["weir_replica_failures_total"]),
            s(&r["weir_replica_waiting"]),
            s(&r["weir_replica_fenced_total"])
        );
    }
    if let Some(w) = doc["waiting_for_space"]
        .as_array()
        .filter(|w| !w.is_empty())
    {
        let places: Vec<String> = w.iter().map(s).collect();
        let _ = writeln!(out, "waiting for disk space: {}", places.join(", "));
    }
    out
}

/// `rows` as columns padded to their widest cell (the last column is not padded).
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// A last error (`ago_s`, `message`) as `N s ago: message`, or `-`.
fn last_error(e: &Value) -> String {
    match e {
        Value::Null => "-".to_string(),
        e => format!(
            "{} s ago: {}",
            e["ago_s"],
            e["message"].as_str().unwrap_or_default()
        ),
    }
}

/// A time (ms since the epoch) as `HH:MM:SS.mmm UTC`, or `-`.
fn clock(v: &Value) -> String {
    v.as_i64()
        .filter(|ms| *ms > 0)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".into(), |t| t.format("%H:%M:%S%.3f UTC").to_string())
}

fn wal_line(out: &mut String, w: &Value) {
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        v => v.to_string(),
    };
    let _ = writeln!(
        out,
        "wal: {} segments, {} bytes, fsync p50 {} ms p99 {} ms, corrupt records {}",
        s(&w["weir_wal_segments"]),
        s(&w["weir_wal_bytes"]),
        s(&w["fsync_p50_ms"]),
        s(&w["fsync_p99_ms"]),
        s(&w["weir_wal_corrupt_records_total"])
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn samples_parse_labels_escapes_and_histograms() {
        let text = "# TYPE a counter\na_total{receiver=\"x \\\"y\\\"\",p=\"1\"} 7\nb 2.5\n\
            h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 90\nh_bucket{le=\"+Inf\"} 100\n\
            h_count 100\n# EOF\n";
        let s = Samples::parse(text);
        assert_eq!(s.get("a_total", &[("receiver", "x \"y\"")]), Some(7.0));
        assert_eq!(s.get("a_total", &[("receiver", "z")]), None);
        assert_eq!(s.get("b", &[]), Some(2.5));
        // The median: rank 50 lies in (0.001, 0.01], 40 of its 80.
        let p50 = s.quantile("h", &[], 0.5).unwrap();
        assert!((p50 - (0.001 + 0.009 * 0.5)).abs() < 1e-9, "{p50}");
        // p99 is beyond the last finite bucket: its bound.
        assert_eq!(s.quantile("h", &[], 0.99), Some(0.01));
        assert_eq!(s.quantile("none", &[], 0.5), None);
    }

    /// A node's document from an engine registry: one receiver that failed, two outputs (the
    /// second failing), an object-store replica configured.
    #[test]
    fn node_document_names_states_errors_and_the_replica() {
        let metrics = Arc::new(weir::stream::Metrics::default());
        let registry =
            MetricsRegistry::new(metrics.clone(), Arc::new(weir::wal::WalMetrics::default()));
        let outputs: Vec<Arc<crate::output::Output>> = (1..=2)
            .map(|i| {
                Arc::new(
                    crate::output::Output::new(&crate::output::OutputConfig::Discard, i).unwrap(),
                )
            })
            .collect();
        for (i, o) in outputs.iter().enumerate() {
            registry.add_stats(crate::stats::output(i + 1, o.clone()));
        }
        outputs[1].stats().failed("the destination is on fire");
        let _ = metrics.receiver("in");
        let info = NodeInfo {
            node_id: "n1".into(),
            batch_interval_ms: 250,
            receivers: vec![("in".into(), "socket".into())],
            outputs: vec![("discard".into(), "discard".into()); 2],
            replication: Some("object_store".into()),
        };
        let status = NodeStatus::new(registry, info, outputs.clone());
        let doc = crate::http::StatusSource::status(&status);
        assert_eq!(doc["mode"], "run");
        assert_eq!(doc["node_id"], "n1");
        assert_eq!(doc["batch_interval_ms"], 250);
        assert_eq!(doc["batches"], json!([]));
        // Never started, no error: stopped.
        assert_eq!(doc["receivers"][0]["state"], "stopped");
        assert_eq!(doc["receivers"][0]["last_error"], Value::Null);
        assert_eq!(doc["outputs"][0]["state"], "ok");
        assert_eq!(doc["outputs"][1]["state"], "failing");
        assert_eq!(doc["outputs"][1]["failures"], 1);
        assert_eq!(
            doc["outputs"][1]["last_error"]["message"],
            "the destination is on fire"
        );
        assert_eq!(doc["outputs"][0]["last_error"], Value::Null);
        assert_eq!(doc["replication"]["kind"], "object_store");
        assert_eq!(doc["replication"]["weir_replica_epoch"], 0);
        let mut with_health = doc.clone();
        with_health["health"] = json!("ok");
        assert!(!healthy(&with_health), "an output fails");
        let text = render_text(&with_health);
        assert!(
            text.contains("failing") && text.contains("replica (object_store)"),
            "{text}"
        );
    }

    #[test]
    fn rates_are_the_change_over_the_window() {
        let w = RateWindow::default();
        w.record(&Samples::parse("x_total{r=\"a\"} 100\n"));
        assert_eq!(w.rate("x_total{r=\"a\"}"), None);
        std::thread::sleep(Duration::from_millis(200));
        w.record(&Samples::parse("x_total{r=\"a\"} 300\n"));
        let r = w.rate("x_total{r=\"a\"}").unwrap();
        // 200 over about 0.2 s.
        assert!((600.0..=1000.0).contains(&r), "{r}");
    }
}
