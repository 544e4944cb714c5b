//! The pull receiver against `peers/spark_sink_peer.py serve` (an independent emulation of
//! Spark's pull sink on Apache `avro`): every event stored as sent, rollback after `nack` and
//! after the sink's transaction timeout, error batches never acknowledged.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use weir_flume::{FlumePullConfig, FlumePullReceiver, FlumePullStats};
use weir_receiver::{shutdown_channel, Receiver, ReceiverContext, Record, StoreError};
use weir_testkit::{init_tracing, wait_until_async, RecordingHost};

use crate::common::{python, SOON};

/// `spark_sink_peer.py serve` as a child process, and its port.
struct Peer {
    child: Child,
    port: u16,
}

impl Peer {
    fn serve(args: &[&str]) -> Peer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/spark_sink_peer.py");
        let mut child = Command::new(python())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .arg(script)
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sink peer");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        // "[sink] listening on 127.0.0.1:PORT seqBase=..."
        let port = line
            .split("listening on 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in the peer's first line: {line:?}"));
        Peer { child, port }
    }

    /// Stops the peer; its stdout (commit/rollback records) as JSON values.
    fn finish(mut self) -> Vec<serde_json::Value> {
        let _ = self.child.kill();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = self.child.wait();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

fn config(port: u16, max_batch: usize) -> FlumePullConfig {
    FlumePullConfig {
        max_batch,
        poll_interval_ms: 50,
        reconnect_backoff_ms: 20,
        reconnect_backoff_max_ms: 200,
        request_timeout_ms: 10_000,
        ..FlumePullConfig::poll([format!("127.0.0.1:{port}")])
    }
}

/// (n header, body) of every record, sorted by n.
fn events(records: &[Record]) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = records
        .iter()
        .map(|r| {
            assert_eq!(r.headers.len(), 1, "{r:?}");
            assert_eq!(r.headers[0].name, "n");
            let n = std::str::from_utf8(&r.headers[0].value).unwrap();
            (
                n.parse().unwrap(),
                String::from_utf8(r.payload.to_vec()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn actions(out: &[serde_json::Value], action: &str) -> Vec<serde_json::Value> {
    out.iter()
        .filter(|r| r["action"] == action)
        .cloned()
        .collect()
}

async fn run_until(
    host: Arc<RecordingHost>,
    config: FlumePullConfig,
    what: &str,
    done: impl Fn(&RecordingHost, &FlumePullStats) -> bool,
) -> Arc<FlumePullStats> {
    init_tracing();
    let receiver = Arc::new(FlumePullReceiver::new(config).unwrap());
    let stats = receiver.stats();
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("pull-test", host.clone(), shutdown, 0);
    let r = receiver.clone();
    let handle = tokio::spawn(async move { r.run(ctx).await });
    wait_until_async(what, SOON, || done(&host, &stats)).await;
    trigger.trigger();
    tokio::time::timeout(SOON, handle)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_stored_as_sent_and_error_batches_are_never_acked() {
    let peer = Peer::serve(&["--events", "45", "--empty-wait", "0.2"]);
    let host = RecordingHost::new();
    let mut c = config(peer.port, 10);
    c.workers = 2;
    let stats = run_until(
        host.clone(),
        c,
        "45 events stored and two error batches seen",
        |h, s| h.durable_count() >= 45 && FlumePullStats::get(&s.error_batches) >= 2,
    )
    .await;
    let out = peer.finish();
    let want: Vec<(u32, String)> = (0..45).map(|i| (i, format!("event {i}"))).collect();
    assert_eq!(events(&host.durable_records()), want);
    let committed: u64 = actions(&out, "commit")
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(committed, 45, "{out:?}");
    // Error batches (sequence number "") were never acknowledged.
    assert!(actions(&out, "ignored-ack").is_empty(), "{out:?}");
    assert!(actions(&out, "rollback").is_empty(), "{out:?}");
    assert_eq!(FlumePullStats::get(&stats.events_acked), 45);
    assert_eq!(FlumePullStats::get(&stats.nacks), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_stores_are_nacked_slow_ones_time_out_and_everything_is_redelivered() {
    // The sink rolls a transaction back after 1 s without an ack.
    let peer = Peer::serve(&["--events", "30", "--tx-timeout", "1", "--empty-wait", "0.2"]);
    // The first two calls fail, the third is durable only after 1.6 s, the rest at once.
    let host = RecordingHost::new();
    host.fail_call(0, StoreError::Storage("scripted failure".into()));
    host.fail_call(1, StoreError::Storage("scripted failure".into()));
    host.delay_call(2, Duration::from_millis(1600));
    let stats = run_until(
        host.clone(),
        config(peer.port, 8),
        "30 events stored",
        |h, s| {
            let mut e = events(&h.durable_records());
            e.dedup();
            e.len() == 30 && FlumePullStats::get(&s.error_batches) >= 1
        },
    )
    .await;
    let out = peer.finish();
    let mut got = events(&host.durable_records());
    // The slow batch was stored, but its ack came after the rollback: delivered twice.
    let total = got.len();
    got.dedup();
    let want: Vec<(u32, String)> = (0..30).map(|i| (i, format!("event {i}"))).collect();
    assert_eq!(got, want, "every event at least once");
    assert_eq!(
        total, 38,
        "the timed-out batch of 8 was delivered again: {out:?}"
    );
    let rollbacks = actions(&out, "rollback");
    let reasons: Vec<&str> = rollbacks
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["nack", "nack", "timeout"], "{out:?}");
    assert_eq!(
        actions(&out, "ignored-ack").len(),
        1,
        "the late ack: {out:?}"
    );
    let committed: u64 = actions(&out, "commit")
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(committed, 30, "{out:?}");
    assert_eq!(FlumePullStats::get(&stats.nacks), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_not_there_yet_is_reached_with_backoff() {
    // A free port with nothing listening: connection failures, then the sink appears.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = RecordingHost::new();
    init_tracing();
    let receiver = Arc::new(FlumePullReceiver::new(config(port, 5)).unwrap());
    let stats = receiver.stats();
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("pull-test", host.clone(), shutdown, 0);
    let r = receiver.clone();
    let handle = tokio::spawn(async move { r.run(ctx).await });
    wait_until_async("connection failures", SOON, || {
        FlumePullStats::get(&stats.connection_failures) >= 2
    })
    .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/spark_sink_peer.py");
    let mut child = Command::new(python())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(script)
        .args(["serve", "--port", &port.to_string(), "--events", "12"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_async("12 events", SOON, || host.durable_count() == 12).await;
    trigger.trigger();
    tokio::time::timeout(SOON, handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(FlumePullStats::get(&stats.events_acked), 12);
}
