//! The status page, `/api/status` and `receiver-node status`, on a real `receiver-node` with live
//! traffic, the page loaded in headless Chromium (`weir_testkit::peers::browser`; screenshots in
//! `target/test-artefacts/`).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use weir_testkit::peers::browser::{self, LoadOptions};
use weir_testkit::{cargo_bin, free_port, http_get, send_frames, wait_healthy, wait_until, Node};

/// `/api/status` as JSON.
fn status(port: u16) -> Value {
    let (code, body) = http_get(port, "/api/status").expect("/api/status answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/api/status is JSON")
}

/// `receiver-node status --address 127.0.0.1:<port>`: (exit code, stdout).
fn status_command(port: u16, extra: &[&str]) -> (i32, String) {
    let out = Command::new(cargo_bin("receiver-node"))
        .args(["status", "--address", &format!("127.0.0.1:{port}")])
        .args(extra)
        .output()
        .expect("running receiver-node status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Sends 50 frames every 100 ms to `port` until dropped.
struct Traffic(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Traffic {
    fn start(port: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let payloads: Vec<String> = (0..50).map(|i| format!("{{\"n\":{i}}}")).collect();
            while !flag.load(Ordering::Relaxed) {
                send_frames(port, &payloads);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Traffic(stop, Some(thread))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

/// What the page shows, read in the browser.
const READ_PAGE: &str = r#"(() => {
  const charts = document.getElementById('charts');
  return {
    mode: document.body.dataset.mode,
    health: document.getElementById('health').textContent,
    batches: +charts.dataset.batches,
    max_records: +charts.dataset.maxRecords,
    charts: [...charts.querySelectorAll('svg[data-chart]')].map((s) => ({
      id: s.dataset.chart, points: +s.dataset.points,
      series: !!s.querySelector('path.series'), reference: !!s.querySelector('line.ref') })),
    receivers: [...document.querySelectorAll('#receivers tbody tr')].map((r) => ({
      name: r.dataset.name, state: r.querySelector('.state').textContent.trim(),
      error: r.querySelector('.error').textContent })),
    outputs: [...document.querySelectorAll('#outputs tbody tr')].map((r) => ({
      position: +r.dataset.position, state: r.querySelector('.state').textContent.trim(),
      error: r.querySelector('.error').textContent })),
  };
})()"#;

fn write_config(dir: &Path, frames: u16, lines: u16, flume: u16, mport: u16) -> std::path::PathBuf {
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nnode_id = \"status-test\"\n[engine]\nbatch_interval_ms = 500\nblock_interval_ms = 50\n\
             [[receiver]]\nname = \"orders\"\ntype = \"socket\"\naddress = \"127.0.0.1:{frames}\"\nprotocol = \"frames\"\n\
             [[receiver]]\nname = \"logs\"\ntype = \"socket\"\naddress = \"127.0.0.1:{lines}\"\n\
             [[receiver]]\nname = \"from-flume\"\ntype = \"flume\"\naddress = \"127.0.0.1:{flume}\"\n\
             [[output]]\ntype = \"dir\"\npath = {out:?}\n\
             [[output]]\ntype = \"discard\"\n\
             [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            data = dir.join("data").display().to_string(),
            out = dir.join("out").display().to_string(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn real_browser_status_page_shows_live_batches_every_receiver_and_a_failing_output() {
    let dir = tempfile::tempdir().unwrap();
    let (frames, lines, flume, mport) = (free_port(), free_port(), free_port(), free_port());
    let config = write_config(dir.path(), frames, lines, flume, mport);
    // The `logs` receiver's port is taken: it fails and is restarted, again and again.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", lines)).unwrap();
    let log = dir.path().join("node.log");
    let _node = Node::start("run", &config, Some(&log));
    wait_healthy(mport);
    let traffic = Traffic::start(frames);
    wait_until(
        "three batches with records and a receiving rate in /api/status",
        Duration::from_secs(30),
        || {
            let doc = status(mport);
            doc["receivers"][0]["records_per_s"].as_f64() > Some(0.0)
                && doc["batches"].as_array().is_some_and(|b| {
                    b.iter().filter(|b| b["records"].as_u64() > Some(0)).count() >= 3
                })
        },
    );

    // The JSON that scripts read.
    let doc = status(mport);
    assert_eq!(doc["mode"], "run");
    assert_eq!(doc["health"], "ok");
    assert_eq!(doc["node_id"], "status-test");
    assert_eq!(doc["batch_interval_ms"], 500);
    let names: Vec<&str> = doc["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "logs", "from-flume"]);
    let orders = &doc["receivers"][0];
    assert_eq!(orders["state"], "running");
    assert!(orders["records_stored"].as_u64() > Some(0), "{orders}");
    assert!(orders["records_per_s"].as_f64() > Some(0.0), "{orders}");
    assert!(
        orders["figures"]["weir_socket_connections_accepted_total"].as_u64() > Some(0),
        "the connector's own figures: {orders}"
    );
    assert_eq!(doc["receivers"][2]["type"], "flume");
    assert_eq!(doc["receivers"][2]["state"], "running");
    let logs = &doc["receivers"][1];
    assert_eq!(logs["state"], "restarting", "{logs}");
    assert!(logs["restarts"].as_u64() > Some(0), "{logs}");
    let message = logs["last_error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot listen"), "{logs}");
    assert!(logs["last_error"]["at_ms"].as_u64() <= doc["now_ms"].as_u64());
    assert_eq!(doc["outputs"][0]["state"], "ok");
    assert!(doc["wal"]["weir_wal_segments"].as_u64() >= Some(1));
    assert!(
        doc["wal"]["fsync_p99_ms"].as_f64().is_some(),
        "{}",
        doc["wal"]
    );
    let t = &doc["tracker"];
    assert!(t["last_completed_batch_ms"].as_u64() <= t["last_allocated_batch_ms"].as_u64());
    assert!(t["batches_completed"].as_u64() >= Some(3));

    // The page, in a real browser.
    let shot = browser::artefact_path("status-page.png");
    let page = browser::load(
        &format!("http://127.0.0.1:{mport}/"),
        &LoadOptions {
            wait_js: Some(
                "+document.getElementById('charts').dataset.maxRecords > 0 && document.querySelectorAll('#receivers tbody tr').length === 3"
                    .into(),
            ),
            eval: Some(READ_PAGE.into()),
            screenshot: Some(shot.clone()),
            ..LoadOptions::default()
        },
    );
    page.assert_clean("the status page");
    let r = &page.result;
    assert_eq!(r["mode"], "run", "{r}");
    assert_eq!(r["health"], "ok", "{r}");
    assert!(r["batches"].as_u64() >= Some(3), "{r}");
    assert!(r["max_records"].as_u64() > Some(0), "{r}");
    let charts = r["charts"].as_array().unwrap();
    let ids: Vec<&str> = charts.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["input", "scheduling", "processing", "total"], "{r}");
    for c in charts {
        assert!(
            c["points"].as_u64() >= Some(3) && c["series"] == true,
            "{c}"
        );
    }
    // The batch interval as the delays' reference line.
    assert_eq!(
        charts.iter().filter(|c| c["reference"] == true).count(),
        3,
        "{r}"
    );
    let shown: Vec<(&str, &str)> = r["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        shown,
        [
            ("orders", "running"),
            ("logs", "restarting"),
            ("from-flume", "running")
        ],
        "{r}"
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 20_000);

    // The terminal summary.
    let (code, text) = status_command(mport, &[]);
    assert_eq!(code, 1, "a receiver restarting is not healthy:\n{text}");
    for needle in [
        "health ok",
        "orders",
        "from-flume",
        "running",
        "dir ",
        "wal:",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }

    // The dir output's directory becomes a file: the output fails (batches are retried).
    let out = dir.path().join("out");
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&out, b"not a directory").unwrap();
    wait_until("output 1 failing", Duration::from_secs(30), || {
        status(mport)["outputs"][0]["state"] == "failing"
    });
    let page = browser::load(
        &format!("http://127.0.0.1:{mport}/ui"),
        &LoadOptions {
            wait_for: Some("#outputs tr[data-position='1'][data-state='failing']".into()),
            eval: Some(READ_PAGE.into()),
            screenshot: Some(browser::artefact_path("status-page-failing-output.png")),
            ..LoadOptions::default()
        },
    );
    page.assert_clean("the status page with a failing output");
    let outputs = page.result["outputs"].as_array().unwrap().clone();
    assert_eq!(outputs[0]["state"], "failing", "{outputs:?}");
    assert!(
        outputs[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("ago: ")),
        "the page shows why: {outputs:?}"
    );
    assert_eq!(outputs[1]["state"], "ok", "{outputs:?}");
    let doc = status(mport);
    assert!(doc["outputs"][0]["failures"].as_u64() > Some(0), "{doc}");
    let why = doc["outputs"][0]["last_error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains(&out.display().to_string()),
        "the error names the path: {doc}"
    );
    assert_eq!(doc["outputs"][1]["last_error"], Value::Null);
    let (code, text) = status_command(mport, &[]);
    assert_eq!(code, 1, "a failing output is not healthy:\n{text}");
    assert!(text.contains("failing"), "{text}");
    let (code, json) = status_command(mport, &["--json"]);
    assert_eq!(code, 1);
    let parsed: Value = serde_json::from_str(&json).expect("--json prints the document");
    assert_eq!(parsed["outputs"][0]["state"], "failing");
    drop(traffic);
}

#[test]
fn status_command_says_when_no_node_answers() {
    let port = free_port();
    let out = Command::new(cargo_bin("receiver-node"))
        .args(["status", "--address", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[test]
fn real_browser_pull_sink_has_the_same_endpoints_with_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (push, pull, mport) = (free_port(), free_port(), free_port());
    let config = dir.path().join("sink.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[push]\naddress = \"127.0.0.1:{push}\"\n[pull]\naddress = \"127.0.0.1:{pull}\"\n\
             [queue]\ntx_timeout_ms = 60000\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let _sink = Node::start("sink", &config, Some(&dir.path().join("sink.log")));
    wait_healthy(mport);
    // 3 calls of 40 events from the Python Flume client (Apache avro).
    let out = Command::new(weir_testkit::python())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(weir_testkit::flume_peer("flume_avro_client.py"))
        .args([
            "--port",
            &push.to_string(),
            "--batches",
            "3",
            "--batch-size",
            "40",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("120 events queued", Duration::from_secs(20), || {
        status(mport)["queue"]["events_queued"] == 120
    });
    let doc = status(mport);
    assert_eq!(doc["mode"], "sink");
    assert_eq!(doc["health"], "ok");
    assert_eq!(doc["queue"]["events_ready"], 120, "{doc}");
    assert_eq!(doc["queue"]["transactions_open"], 0, "{doc}");
    assert_eq!(doc["push"]["address"], format!("127.0.0.1:{push}"));
    assert_eq!(
        doc["push"]["figures"]["weir_flume_events_durable_total"], 120,
        "{doc}"
    );
    let page = browser::load(
        &format!("http://127.0.0.1:{mport}/"),
        &LoadOptions {
            wait_js: Some("document.body.dataset.mode === 'sink' && !!document.querySelector('#queue dd')".into()),
            eval: Some(
                "({ visible: !document.getElementById('sink').hidden, run_hidden: document.getElementById('run').hidden, queue: document.getElementById('queue').textContent, charts: document.querySelectorAll('#sink-charts svg[data-chart]').length })"
                    .into(),
            ),
            screenshot: Some(browser::artefact_path("status-page-sink.png")),
            ..LoadOptions::default()
        },
    );
    page.assert_clean("the pull sink's status page");
    let r = &page.result;
    assert_eq!(r["visible"], true, "{r}");
    assert_eq!(r["run_hidden"], true, "{r}");
    assert_eq!(r["charts"], 3, "{r}");
    assert!(r["queue"].as_str().unwrap().contains("120"), "{r}");
    let (code, text) = status_command(mport, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("sink mode") && text.contains("120 events held"),
        "{text}"
    );
}
