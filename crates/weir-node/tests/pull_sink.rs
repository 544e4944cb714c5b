//! The pull sink (`weir_node::sink`): fed by the Python Flume client (`flume_avro_client.py`), polled
//! by the Python Spark poller (`spark_sink_peer.py poll`) and by weir's own pull receiver; it
//! survives being aborted in process and `kill -9` as a `receiver-node sink` process without
//! losing an event it answered `OK`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_flume::ipc::frame::FrameLimits;
use weir_flume::ipc::protocol::Protocol;
use weir_flume::spark::{self, EventBatch};
use weir_flume::{FlumePullConfig, FlumePullReceiver, FlumeSourceConfig};
use weir_node::sink::{PullSink, PullSinkConfig, QueueConfig};
use weir_receiver::{
    shutdown_channel, Checkpoint, Receiver, ReceiverContext, ReceiverHost, Record, StoreFuture,
    Stored,
};

fn peer(script: &str, args: &[String]) -> Output {
    let path = weir_testkit::flume_peer(script);
    let out = Command::new(weir_testkit::python())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Pushes `batches` × `size` events with the Python Flume client; every call must be `OK`.
async fn push(port: u16, batches: usize, size: usize, tag: &str) {
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--batches",
        &batches.to_string(),
        "--batch-size",
        &size.to_string(),
        "--header",
        &format!("tag={tag}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = tokio::task::spawn_blocking(move || peer("flume_avro_client.py", &args))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("-> OK").count(), batches, "{stdout}");
}

fn sink_config(dir: &Path) -> PullSinkConfig {
    let mut c = PullSinkConfig {
        data_dir: dir.to_path_buf(),
        push: FlumeSourceConfig::listen("127.0.0.1:0"),
        queue: QueueConfig {
            tx_timeout_ms: 500,
            empty_wait_ms: 1500,
            ..QueueConfig::default()
        },
        ..PullSinkConfig::default()
    };
    c.pull.address = "127.0.0.1:0".into();
    c.wal.segment_max_bytes = 4096;
    c
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A minimal SparkFlumeProtocol client on the crate's IPC client.
struct Client(weir_flume::ipc::client::Client);

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        let limits = FrameLimits {
            max_frame_bytes: 1 << 24,
            max_buffers: 1 << 16,
        };
        let protocol = Protocol::parse(spark::SPARK_FLUME_LEGACY).unwrap();
        let timeout = Duration::from_secs(30);
        Client(
            weir_flume::ipc::client::Client::connect(
                &addr.to_string(),
                protocol,
                false,
                limits,
                timeout,
            )
            .await
            .unwrap(),
        )
    }

    async fn call(&mut self, message: &str, params: &[u8]) -> weir_flume::ipc::datum::DatumReader {
        match self.0.call(message, params).await.unwrap() {
            Ok(r) => r,
            Err(e) => panic!("{message}: {e}"),
        }
    }

    async fn get(&mut self, n: i32) -> EventBatch {
        let mut r = self
            .call(spark::GET_EVENT_BATCH, &spark::encode_get_event_batch(n))
            .await;
        EventBatch::decode(&mut r, 10_000).unwrap()
    }

    async fn settle(&mut self, message: &str, seq: &str) {
        self.call(message, &spark::encode_sequence_number(seq))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spark_poller_gets_every_pushed_event_with_nacks_and_timeouts_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let sink = PullSink::start(sink_config(dir.path())).await.unwrap();
    push(sink.push_addr.port(), 4, 10, "p").await;
    assert_eq!(sink.queue().stats().events_accepted.load(Relaxed), 40);

    // Unknown sequence numbers are ignored; a batch settled twice counts once.
    let mut c = Client::connect(sink.pull_addr).await;
    c.settle(spark::ACK, "no-such-batch").await;
    c.settle(spark::NACK, "no-such-batch").await;
    let b = c.get(3).await;
    assert!(!b.is_error() && b.events.len() == 3, "{b:?}");
    c.settle(spark::NACK, &b.sequence_number).await;
    c.settle(spark::ACK, &b.sequence_number).await; // late: already rolled back
    let bad = c.get(0).await;
    assert!(bad.is_error(), "n = 0 is an error batch: {bad:?}");
    drop(c);
    assert_eq!(sink.queue().stats().ignored.load(Relaxed), 3);
    assert_eq!(sink.queue().stats().events_acked.load(Relaxed), 0);

    let port = sink.pull_addr.port().to_string();
    let args: Vec<String> = [
        "poll",
        "--port",
        &port,
        "--batch-size",
        "7",
        "--nack-every",
        "3",
        "--no-ack-every",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = tokio::task::spawn_blocking(move || peer("spark_sink_peer.py", &args))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    // "batch I: seq=S N events: body, body" then "  ack S" / "  nack S" / "  (no ack ...".
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut seqs = BTreeSet::new();
    let lines: Vec<&str> = stdout.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(rest) = l.strip_prefix("batch ") {
            if rest.contains("error batch") {
                continue;
            }
            let seq = rest
                .split("seq=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            assert!(
                seqs.insert(seq.to_string()),
                "sequence numbers are unique: {stdout}"
            );
            let bodies = rest.split("events: ").nth(1).unwrap_or("");
            if lines
                .get(i + 1)
                .is_some_and(|n| n.trim() == format!("ack {seq}"))
            {
                acked.extend(bodies.split(", ").map(str::to_string));
            }
        }
    }
    let want: BTreeSet<String> = (0..4)
        .flat_map(|b| (0..10).map(move |e| format!("batch {b} event {e}")))
        .collect();
    assert_eq!(acked, want, "{stdout}");
    assert!(stdout.contains("error batch"), "{stdout}");
    assert!(stdout.contains("acked 40 events"), "{stdout}");
    let st = sink.queue().stats();
    assert_eq!(st.events_acked.load(Relaxed), 40);
    assert_eq!(st.events_queued.load(Relaxed), 0);
    assert!(st.rollbacks_nack.load(Relaxed) >= 2, "{st:?}");
    assert!(st.rollbacks_timeout.load(Relaxed) >= 1, "{st:?}");
    sink.stop().await;

    // Acks are durable: a restarted sink serves nothing again, and the log was cleaned.
    let sink = PullSink::start(sink_config(dir.path())).await.unwrap();
    assert_eq!(sink.queue().stats().events_recovered.load(Relaxed), 0);
    assert_eq!(sink.queue().wal().segments().len(), 1);
    sink.stop().await;
}

/// Keeps what it stores, slowly (so that batches are in flight when the sink dies).
#[derive(Default)]
struct SlowHost {
    stored: Mutex<Vec<Record>>,
}

impl ReceiverHost for SlowHost {
    fn store(&self, records: Vec<Record>) -> StoreFuture {
        let n = records.len();
        self.stored.lock().unwrap().extend(records);
        StoreFuture::new(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok(Stored {
                records: n,
                block: None,
            })
        })
    }
    fn report_error(&self, _: &str) {}
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new()
    }
}

fn distinct(host: &SlowHost) -> BTreeSet<(String, String)> {
    host.stored
        .lock()
        .unwrap()
        .iter()
        .map(|r| {
            let tag = r
                .headers
                .iter()
                .find(|h| h.name == "tag")
                .map(|h| String::from_utf8(h.value.to_vec()).unwrap())
                .unwrap_or_default();
            (tag, String::from_utf8(r.payload.to_vec()).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weirs_receiver_drains_the_sink_across_an_abort_without_losing_an_ok_event() {
    let dir = tempfile::tempdir().unwrap();
    let sink = PullSink::start(sink_config(dir.path())).await.unwrap();
    let (push_port, pull_port) = (sink.push_addr.port(), sink.pull_addr.port());
    push(push_port, 5, 20, "before").await;

    let host = Arc::new(SlowHost::default());
    let receiver = Arc::new(
        FlumePullReceiver::new(FlumePullConfig {
            max_batch: 6,
            workers: 2,
            poll_interval_ms: 20,
            reconnect_backoff_ms: 20,
            reconnect_backoff_max_ms: 100,
            ..FlumePullConfig::poll([format!("127.0.0.1:{pull_port}")])
        })
        .unwrap(),
    );
    let stats = receiver.stats();
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("pull", host.clone(), shutdown, 0);
    let r = receiver.clone();
    let handle = tokio::spawn(async move { r.run(ctx).await });
    wait_for("some events pulled", || {
        host.stored.lock().unwrap().len() >= 30
    })
    .await;

    // The sink dies mid-stream (tasks aborted, nothing answered or flushed) and comes back on
    // the same ports with the same directory.
    sink.abort().await;
    let mut config = sink_config(dir.path());
    config.push.address = format!("127.0.0.1:{push_port}");
    config.pull.address = format!("127.0.0.1:{pull_port}");
    let t0 = Instant::now();
    let sink = loop {
        match PullSink::start(config.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(10), "restart: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(sink.queue().stats().events_recovered.load(Relaxed) > 0);
    push(push_port, 2, 10, "after").await;

    let want: BTreeSet<(String, String)> = (0..5)
        .flat_map(|b| (0..20).map(move |e| ("before".to_string(), format!("batch {b} event {e}"))))
        .chain((0..2).flat_map(|b| {
            (0..10).map(move |e| ("after".to_string(), format!("batch {b} event {e}")))
        }))
        .collect();
    wait_for("every OK'd event stored", || distinct(&host) == want).await;
    wait_for("everything acked", || {
        sink.queue().stats().events_queued.load(Relaxed) == 0
    })
    .await;
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(stats.connection_failures.load(Relaxed) >= 1, "{stats:?}");
    sink.stop().await;
}

#[test]
fn receiver_node_sink_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (push_port, pull_port, mport) = (port(()), port(()), port(()));
    let file = dir.path().join("sink.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\n[push]\naddress = \"127.0.0.1:{push_port}\"\n\
             [pull]\naddress = \"127.0.0.1:{pull_port}\"\n[queue]\nempty_wait_ms = 300\n\
             [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let node = env!("CARGO_BIN_EXE_receiver-node");
    // Killed and reaped when dropped, should an assertion fail.
    let spawn = || weir_testkit::Node::start("sink", &file, None);
    let up = |p: u16| {
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "sink not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let child = spawn();
    up(push_port);
    up(pull_port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(push(push_port, 3, 10, "k"));
    // The sink's own /metrics and /health, as a node has.
    weir_testkit::wait_healthy(mport);
    let (code, metrics) = weir_testkit::http_get(mport, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{metrics}");
    for want in [
        "weir_sink_events_accepted_total 30",
        "weir_sink_events_queued 30",
        "weir_flume_events_total{receiver=\"push\"} 30",
        "weir_waiting_for_space{place=\"wal\"} 0",
        "weir_wal_fsyncs_total",
    ] {
        assert!(metrics.contains(want), "{want} not in {metrics}");
    }
    assert_eq!(
        weir_testkit::http_get(mport, "/health"),
        Some((200, "ok\n".to_string()))
    );
    drop(child); // SIGKILL
    let mut child = spawn();
    up(pull_port);
    let args: Vec<String> = [
        "poll",
        "--port",
        &pull_port.to_string(),
        "--batch-size",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = peer("spark_sink_peer.py", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("acked 30 events"), "{stdout}");
    for b in 0..3 {
        for e in 0..10 {
            assert!(stdout.contains(&format!("batch {b} event {e}")), "{stdout}");
        }
    }
    // The bad configuration is refused with exit status 2 and the key named.
    std::fs::write(dir.path().join("bad.toml"), "[queue]\ntx_timeout = 5\n").unwrap();
    let bad = Command::new(node)
        .args(["sink", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tx_timeout"));
    weir_testkit::sigterm(&child.0);
    let status = child.wait_exit(Duration::from_secs(20), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
}
