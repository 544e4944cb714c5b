//! The `receiver-node` daemon, run as real processes.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_testkit::{
    cargo_bin, frames_producer, free_port, http_get, python, sigterm, wait_until, workspace_root,
    Node,
};

fn spawn_node(config: &Path) -> Node {
    Node::spawn(config)
}

fn wait_exit(node: &mut Node, timeout: Duration, what: &str) -> std::process::ExitStatus {
    node.wait_exit(timeout, what)
}

#[test]
fn every_example_configuration_is_valid() {
    let dir = workspace_root().join("examples");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        // A pull sink's file (`receiver-node sink`), checked by weir::sink's unit test.
        if p.file_name().is_some_and(|f| f == "flume-pull-sink.toml") {
            continue;
        }
        if p.extension().is_some_and(|x| x == "toml") {
            let out = Command::new(cargo_bin("receiver-node"))
                .arg("check-config")
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("[[receiver]]") && text.contains("[engine.wal]"),
                "{text}"
            );
            n += 1;
        }
    }
    assert!(n >= 3, "expected an example per socket mode, found {n}");
}

#[test]
fn a_bad_configuration_names_the_key_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "data_dir = \"d\"\n\n[[receiver]]\nname = \"s\"\ntype = \"socket\"\nmode = \"listen\"\nadress = \"127.0.0.1:1\"\n\n[[output]]\ntype = \"stdout\"\n",
    )
    .unwrap();
    let out = Command::new(cargo_bin("receiver-node"))
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adress") && err.contains("line 7"), "{err}");
    let out = Command::new(cargo_bin("receiver-node"))
        .args(["run", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_node_ingests_lines_writes_batches_serves_metrics_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    let out_dir = dir.path().join("out");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             [[receiver]]\nname = \"lines\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"lines\"\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let node = spawn_node(&config);
    wait_until("health", Duration::from_secs(30), || {
        http_get(mport, "/health").is_some_and(|(c, _)| c == 200)
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for i in 0..100 {
        writeln!(s, "line {i}").unwrap();
    }
    drop(s);
    let read_all = || jsonl_in(&out_dir);
    wait_until(
        "100 records in batch files",
        Duration::from_secs(30),
        || read_all().len() == 100,
    );
    let recs = read_all();
    assert!(recs.iter().all(|r| r["receiver"] == "lines"));
    let mut payloads: Vec<String> = recs
        .iter()
        .map(|r| r["payload"].as_str().unwrap().to_string())
        .collect();
    payloads.sort_by_key(|p| p[5..].parse::<u32>().unwrap());
    assert_eq!(
        payloads,
        (0..100).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
    let (code, metrics) = http_get(mport, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("weir_receiver_records_stored_total{receiver=\"lines\"} 100"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_socket_connections_accepted_total{receiver=\"lines\"} 1"),
        "{metrics}"
    );
    assert_eq!(http_get(mport, "/nope").unwrap().0, 404);
    sigterm(&node.0);
    let mut node = node;
    let status = wait_exit(&mut node, Duration::from_secs(30), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
    // Nothing half-written is left behind.
    for e in std::fs::read_dir(&out_dir).unwrap() {
        assert!(!e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
    }
}

#[test]
fn a_failing_output_fails_the_batch_which_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    // The output path is a file, so creating the directory fails.
    let out_dir = dir.path().join("out");
    std::fs::write(&out_dir, b"not a directory").unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\njob_retry_max_ms = 200\n\
             [[receiver]]\nname = \"lines\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let node = spawn_node(&config);
    wait_until("health", Duration::from_secs(30), || {
        http_get(mport, "/health").is_some_and(|(c, _)| c == 200)
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    writeln!(s, "kept").unwrap();
    drop(s);
    let metric = |name: &str| -> f64 {
        http_get(mport, "/metrics")
            .and_then(|(_, body)| {
                body.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            })
            .unwrap_or(0.0)
    };
    wait_until("failed job runs", Duration::from_secs(30), || {
        metric("weir_job_failures_total ") >= 2.0
    });
    // The batch holding the record never completes while the output fails.
    assert_eq!(metric("weir_batch_records_total "), 0.0);
    // Repair the output: the same batch is retried and completes.
    std::fs::remove_file(&out_dir).unwrap();
    wait_until(
        "the record in a batch file",
        Duration::from_secs(30),
        || {
            std::fs::read_dir(&out_dir).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t == "kept\n"))
            })
        },
    );
    // The batch is counted complete just after its output returns.
    wait_until("the batch completed", Duration::from_secs(30), || {
        metric("weir_batch_records_total ") == 1.0
    });
    sigterm(&node.0);
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    // A failing output makes the drain retry the last batch for a while.
    let out_dir = dir.path().join("out");
    std::fs::write(&out_dir, b"not a directory").unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\njob_retry_initial_ms = 2000\njob_retry_max_ms = 2000\n\
             [[receiver]]\nname = \"lines\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let mut node = spawn_node(&config);
    wait_until("health", Duration::from_secs(30), || {
        http_get(mport, "/health").is_some_and(|(c, _)| c == 200)
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    writeln!(s, "pending").unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    sigterm(&node.0);
    wait_until("stopping", Duration::from_secs(10), || {
        http_get(mport, "/health").is_some_and(|(c, b)| c == 503 && b.starts_with("stopping"))
    });
    sigterm(&node.0);
    let status = wait_exit(
        &mut node,
        Duration::from_secs(10),
        "no exit after the second signal",
    );
    assert_eq!(status.code(), Some(130));
    // The record is still in the WAL: a restart with a working output processes it.
    std::fs::remove_file(&out_dir).unwrap();
    let node = spawn_node(&config);
    wait_until(
        "the record after the restart",
        Duration::from_secs(30),
        || {
            std::fs::read_dir(&out_dir).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t == "pending\n"))
            })
        },
    );
    sigterm(&node.0);
}

#[test]
fn the_node_consumes_a_kafka_topic_from_a_mock_cluster_in_another_process() {
    kafka_node_consumes_200_events("group");
}

#[test]
fn a_direct_mode_node_reads_kafka_ranges_and_commits_them_back() {
    kafka_node_consumes_200_events("direct");
}

/// A node with a Kafka receiver in `mode` consumes 200 events from a mock cluster in this
/// process: each once in the batch files, with its position; the group's offsets end at 200.
fn kafka_node_consumes_200_events(mode: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("events", 2, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    for i in 0..200 {
        let payload = format!("event {i}");
        p.send(BaseRecord::<(), _>::to("events").payload(&payload))
            .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let out_dir = dir.path().join("out");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             [[receiver]]\nname = \"events\"\ntype = \"kafka\"\nmode = \"{mode}\"\nbootstrap_servers = \"{bs}\"\ngroup_id = \"g\"\ntopics = [\"events\"]\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let node = spawn_node(&config);
    let read_all = || jsonl_in(&out_dir);
    wait_until("200 events in batch files", Duration::from_secs(60), || {
        read_all().len() >= 200
    });
    let recs = read_all();
    assert_eq!(recs.len(), 200);
    let mut offsets: Vec<(i64, i64)> = recs
        .iter()
        .map(|r| {
            assert_eq!(r["position"]["stream"], "events");
            (
                r["position"]["partition"].as_i64().unwrap(),
                r["position"]["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 200, "a Kafka record stored twice");
    // The group receiver measures lag every 5 s.
    let lag = "weir_kafka_lag{receiver=\"events\",topic=\"events\",partition=\"0\"}";
    wait_until("lag 0 in /metrics", Duration::from_secs(15), || {
        http_get(mport, "/metrics").is_some_and(|(_, m)| m.contains(&format!("{lag} 0")))
    });
    let (_, metrics) = http_get(mport, "/metrics").expect("metrics");
    if mode == "direct" {
        assert!(
            metrics.contains("weir_direct_records_read_total 200"),
            "{metrics}"
        );
    }
    // The receiver's own counters: records consumed, and lag per partition.
    assert!(
        metrics.contains("weir_kafka_records_total{receiver=\"events\"} 200"),
        "{metrics}"
    );
    sigterm(&node.0);
    let mut node = node;
    wait_exit(&mut node, Duration::from_secs(30), "no exit after SIGTERM");
    // The node committed what it stored before leaving the group.
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", "g")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition("events", 0);
    tpl.add_partition("events", 1);
    use rdkafka::consumer::Consumer;
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let total: i64 = got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    assert_eq!(total, 200);
}

/// Writes a node configuration with a Kafka receiver in group `group` and a `lines` dir output.
fn kafka_node_config(
    dir: &Path,
    name: &str,
    bs: &str,
    group: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = dir.join(format!("{name}-out"));
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             [[receiver]]\nname = \"events\"\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\ngroup_id = \"{group}\"\ntopics = [\"events\"]\ncommit_interval_ms = 100\n\
             [receiver.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"lines\"\n[metrics]\nenabled = false\n",
            dir.join(format!("{name}-data")).display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    (cfg, out)
}

/// Every record of the `jsonl` batch files in `dir` (none if it does not exist yet).
fn jsonl_in(dir: &Path) -> Vec<serde_json::Value> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".jsonl") {
                for l in std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                {
                    v.push(serde_json::from_str(l).unwrap());
                }
            }
        }
    }
    v
}

fn lines_in(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".txt") {
                v.extend(
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .lines()
                        .map(str::to_string),
                );
            }
        }
    }
    v
}

#[test]
fn two_nodes_in_one_group_lose_nothing_when_one_is_killed() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("events", 4, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    let produce = |from: u32, to: u32| {
        let p: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bs)
            .create()
            .unwrap();
        for i in from..to {
            let payload = format!("e{i}");
            p.send(BaseRecord::<(), _>::to("events").payload(&payload))
                .unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let (cfg_a, out_a) = kafka_node_config(dir.path(), "a", &bs, "g");
    let (cfg_b, out_b) = kafka_node_config(dir.path(), "b", &bs, "g");
    produce(0, 400);
    let mut a = spawn_node(&cfg_a);
    let b = spawn_node(&cfg_b);
    wait_until("the first 400 records", Duration::from_secs(60), || {
        lines_in(&out_a).len() + lines_in(&out_b).len() >= 400
    });
    // Kill a (no drain, no final commit); b takes over its partitions after the session timeout.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    produce(400, 800);
    let distinct = |outs: &[&Path]| {
        let mut s = std::collections::BTreeSet::new();
        for o in outs {
            s.extend(lines_in(o));
        }
        s
    };
    // Records a committed before dying are in a's WAL; restarting a drains them into its output.
    wait_until("b to take over", Duration::from_secs(60), || {
        lines_in(&out_b)
            .iter()
            .any(|l| l[1..].parse::<u32>().unwrap() >= 400)
    });
    let a = spawn_node(&cfg_a);
    wait_until(
        "all 800 records in the outputs",
        Duration::from_secs(90),
        || distinct(&[&out_a, &out_b]).len() == 800,
    );
    let all = distinct(&[&out_a, &out_b]);
    assert!((0..800).all(|i| all.contains(&format!("e{i}"))));
    sigterm(&a.0);
    sigterm(&b.0);
}

#[test]
fn the_node_produces_its_batches_to_a_kafka_topic_with_keys_and_headers() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("in", 2, 1).unwrap();
    cluster.create_topic("out", 3, 1).unwrap();
    let bs = cluster.bootstrap_servers();
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    for i in 0..300 {
        let (payload, key) = (format!("event {i}"), format!("key {i}"));
        let headers = OwnedHeaders::new().insert(Header {
            key: "n",
            value: Some(&i.to_string()),
        });
        p.send(
            BaseRecord::to("in")
                .payload(&payload)
                .key(&key)
                .headers(headers),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nnode_id = \"kafka-out-1\"\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             [[receiver]]\nname = \"in\"\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\ngroup_id = \"g\"\ntopics = [\"in\"]\n\
             [[output]]\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\ntopic = \"out\"\ndelivery_timeout_ms = 5000\n\
             [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
        ),
    )
    .unwrap();
    let mut node = spawn_node(&config);
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", "reader")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for part in 0..3 {
        tpl.add_partition_offset("out", part, rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut seen: Vec<(String, String, String)> = Vec::new();
    let text = |b: Option<&[u8]>| String::from_utf8(b.unwrap_or_default().to_vec()).unwrap();
    let t0 = Instant::now();
    while seen.len() < 300 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "only {} records in the output topic",
            seen.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let header = |k: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == k).map(|h| text(h.value)))
            };
            let n = header("n").unwrap_or_default();
            // Which node produced it, and in which batch (a batch time on the clock's grid).
            assert_eq!(header("weir.node").as_deref(), Some("kafka-out-1"));
            let time: u64 = header("weir.batch_time").unwrap().parse().unwrap();
            assert_eq!(time % 200, 0, "batch time {time}");
            seen.push((text(m.payload()), text(m.key()), n));
        }
    }
    // Anything more (a record produced twice) would show up now.
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_millis(500) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            seen.push((text(m.payload()), text(m.key()), String::new()));
        }
    }
    seen.sort_by_key(|(p, _, _)| p[6..].parse::<u32>().unwrap());
    let want: Vec<(String, String, String)> = (0..300)
        .map(|i| (format!("event {i}"), format!("key {i}"), i.to_string()))
        .collect();
    assert_eq!(seen, want);
    // Counted once the producer has every delivery report of the batch.
    wait_until("300 delivered in /metrics", Duration::from_secs(10), || {
        http_get(mport, "/metrics").is_some_and(|(_, m)| {
            m.contains("weir_kafka_output_records_delivered_total{output=\"1\"} 300")
        })
    });
    sigterm(&node.0);
    let status = wait_exit(&mut node, Duration::from_secs(30), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn a_kafka_output_the_client_refuses_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    let write = |props: &str| {
        std::fs::write(
            &f,
            format!(
                "data_dir = {:?}\n[[receiver]]\nname = \"s\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{}\"\n\
                 [[output]]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"\ntopic = \"out\"\n[output.properties]\n{props}\n\
                 [metrics]\nenabled = false\n",
                dir.path().join("data").display().to_string(),
                free_port()
            ),
        )
        .unwrap();
    };
    // Refused by librdkafka when the property is set; by weir for a key it owns; and by
    // librdkafka only when the producer is created (a combination of properties).
    for (props, says) in [
        ("\"linger.ms\" = \"soon\"", "linger.ms"),
        ("\"enable.idempotence\" = \"false\"", "enable.idempotence"),
        (
            "\"max.in.flight.requests.per.connection\" = \"10\"",
            "max.in.flight",
        ),
    ] {
        write(props);
        for args in [&["check-config"][..], &["run", "--config"][..]] {
            let out = Command::new(cargo_bin("receiver-node"))
                .args(args)
                .arg(&f)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {props}: {err}");
            assert!(
                err.contains("configuration error") && err.contains(says),
                "{args:?} {props}: {err}"
            );
        }
    }
}

#[test]
fn a_flume_agent_pushes_to_the_node_and_batches_show_bodies_and_headers() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    let out_dir = dir.path().join("out");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             [[receiver]]\nname = \"agents\"\ntype = \"flume\"\naddress = \"127.0.0.1:{port}\"\ndeflate = true\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let node = spawn_node(&config);
    wait_until("health", Duration::from_secs(30), || {
        http_get(mport, "/health").is_some_and(|(c, _)| c == 200)
    });
    let client = weir_testkit::flume_peer("flume_avro_client.py");
    let out = Command::new(&python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(&client)
        .args([
            "--port",
            &port.to_string(),
            "--deflate",
            "--batches",
            "4",
            "--batch-size",
            "5",
        ])
        .args(["--header", "host=agent-7"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("-> OK").count(), 4, "{stdout}");
    // Every OK'd event is durable; the batch files show it with its headers.
    let read_all = || jsonl_in(&out_dir);
    wait_until("20 events in batch files", Duration::from_secs(30), || {
        read_all().len() == 20
    });
    let mut seen: Vec<(String, String)> = read_all()
        .iter()
        .map(|r| {
            assert_eq!(r["receiver"], "agents");
            assert_eq!(r["headers"]["host"], "agent-7", "{r}");
            (
                r["headers"]["seq"].as_str().unwrap().to_string(),
                r["payload"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut want: Vec<(String, String)> = (0..4)
        .flat_map(|b| (0..5).map(move |i| (format!("{b}.{i}"), format!("batch {b} event {i}"))))
        .collect();
    want.sort();
    assert_eq!(seen, want);
    let (_, metrics) = http_get(mport, "/metrics").unwrap();
    assert!(
        metrics.contains("weir_flume_events_durable_total{receiver=\"agents\"} 20"),
        "{metrics}"
    );
    sigterm(&node.0);
    let mut node = node;
    let status = wait_exit(&mut node, Duration::from_secs(30), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn a_flume_pull_receiver_polls_a_spark_sink_and_batches_show_bodies_and_headers() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let peer = weir_testkit::flume_peer("spark_sink_peer.py");
    let mut sink = Command::new(&python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(&peer)
        .args([
            "serve",
            "--port",
            "0",
            "--events",
            "25",
            "--empty-wait",
            "0.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sink.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let out_dir = dir.path().join("out");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             [[receiver]]\nname = \"pulled\"\ntype = \"flume_pull\"\naddresses = [\"127.0.0.1:{port}\"]\nmax_batch = 10\npoll_interval_ms = 50\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            dir.path().join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let node = spawn_node(&config);
    let read_all = || jsonl_in(&out_dir);
    wait_until("25 events in batch files", Duration::from_secs(30), || {
        read_all().len() == 25
    });
    let mut seen: Vec<(u32, String)> = read_all()
        .iter()
        .map(|r| {
            assert_eq!(r["receiver"], "pulled");
            (
                r["headers"]["n"].as_str().unwrap().parse().unwrap(),
                r["payload"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let want: Vec<(u32, String)> = (0..25).map(|i| (i, format!("event {i}"))).collect();
    assert_eq!(seen, want);
    wait_until("25 acked in /metrics", Duration::from_secs(10), || {
        http_get(mport, "/metrics").is_some_and(|(_, m)| {
            m.contains("weir_flume_pull_events_acked_total{receiver=\"pulled\"} 25")
        })
    });
    sigterm(&node.0);
    let mut node = node;
    let status = wait_exit(&mut node, Duration::from_secs(30), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
    let _ = sink.kill();
    let _ = sink.wait();
}

/// Every `jsonl` record in `dir`'s batch files, as (file node id, record node, payload).
fn shared_records(dir: &Path) -> Vec<(String, String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // batch-<16 digits>-<node>.jsonl
        let Some(node) = name
            .strip_prefix("batch-")
            .and_then(|n| n.strip_suffix(".jsonl"))
            .map(|n| n[17..].to_string())
        else {
            continue;
        };
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            v.push((
                node.clone(),
                r["node"].as_str().unwrap().to_string(),
                r["payload"].as_str().unwrap().to_string(),
            ));
        }
    }
    v
}

#[test]
fn two_nodes_sharing_an_output_directory_keep_every_acknowledged_record_across_a_kill() {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared-out");
    let write_config = |name: &str, node_id: Option<&str>, data: &str, port: u16| {
        let cfg = dir.path().join(format!("{name}.toml"));
        let id = node_id.map_or(String::new(), |i| format!("node_id = \"{i}\"\n"));
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n{id}[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
                 [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
                 [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n[metrics]\nenabled = false\n",
                dir.path().join(data).display().to_string(),
                shared.display().to_string()
            ),
        )
        .unwrap();
        cfg
    };
    // a: the default id (host name and data directory); b: a configured one.
    let (port_a, port_b) = (free_port(), free_port());
    let cfg_a = write_config("a", None, "data-a", port_a);
    let cfg_b = write_config("b", Some("node-b"), "data-b", port_b);
    let mut a = spawn_node(&cfg_a);
    let b = spawn_node(&cfg_b);
    let (acked_a, acked_b) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let total = 3000;
    let (at_a, at_b) = (AtomicU16::new(port_a), AtomicU16::new(port_b));
    let (sent_a, sent_b) = std::thread::scope(|s| {
        let pa = s.spawn(|| frames_producer(&at_a, "a", total, &acked_a));
        let pb = s.spawn(|| frames_producer(&at_b, "b", total, &acked_b));
        // Kill a in the middle of its stream (no drain), then start it again.
        wait_until(
            "a third of a's records acknowledged",
            Duration::from_secs(60),
            || acked_a.load(SeqCst) >= total / 3,
        );
        a.0.kill().unwrap();
        a.0.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        a = spawn_node(&cfg_a);
        (pa.join().unwrap(), pb.join().unwrap())
    });
    assert_eq!((acked_a.load(SeqCst), acked_b.load(SeqCst)), (total, total));
    let id_a = String::from_utf8(
        Command::new(cargo_bin("receiver-node"))
            .arg("check-config")
            .arg(&cfg_a)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let id_a = id_a
        .lines()
        .find_map(|l| l.strip_prefix("node_id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("check-config prints the effective node_id")
        .to_string();
    assert!(id_a.contains('-') && id_a != "node-b", "{id_a}");
    // Every acknowledged record of both nodes reaches the shared directory, in files named
    // (and records tagged) by the node that ran the batch.
    wait_until(
        "every acknowledged record in the shared directory",
        Duration::from_secs(60),
        || {
            let have: std::collections::HashSet<String> = shared_records(&shared)
                .into_iter()
                .map(|(_, _, p)| p)
                .collect();
            sent_a.iter().chain(&sent_b).all(|r| have.contains(r))
        },
    );
    let recs = shared_records(&shared);
    for (file_node, node, payload) in &recs {
        assert_eq!(file_node, node, "{payload}");
        let want = if payload.starts_with("a-") {
            &id_a
        } else {
            "node-b"
        };
        assert_eq!(node, want, "{payload}");
    }
    // The nodes' batch times coincide (the same clock grid): both files exist side by side.
    let times = |id: &str| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(&shared)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(&format!("-{id}.jsonl")))
            .map(|n| n[6..22].to_string())
            .collect()
    };
    assert!(
        times(&id_a).intersection(&times("node-b")).next().is_some(),
        "no batch time written by both nodes: {:?} {:?}",
        times(&id_a),
        times("node-b")
    );
    // Each node claimed its id in the directory.
    for id in [id_a.as_str(), "node-b"] {
        let claim = shared.join(format!(".weir-node-{id}.json"));
        let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&claim).unwrap()).unwrap();
        assert_eq!(c["node_id"], id);
    }

    // A third node configured with a's id by mistake (its own data directory) refuses to start,
    // and says why and how to resolve it; nothing it could write reaches the directory.
    let cfg_c = write_config("c", Some(&id_a), "data-c", free_port());
    let out = Command::new(cargo_bin("receiver-node"))
        .args(["run", "--config"])
        .arg(&cfg_c)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("node_id \"{id_a}\" is already used in"))
            && err.contains("data-a")
            && err.contains("data-c")
            && err.contains("set a different top-level `node_id`"),
        "{err}"
    );
    sigterm(&a.0);
    sigterm(&b.0);
    for mut n in [a, b] {
        let status = wait_exit(&mut n, Duration::from_secs(30), "no exit after SIGTERM");
        assert!(status.success(), "{status}");
    }
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "this test fills a real small file system: it mounts a {size} tmpfs at {} with \
             `mount -t tmpfs`, which needs root (or CAP_SYS_ADMIN), as CI has. Run the tests as \
             root, e.g. `sudo -E scripts/test --test node`. mount said: {:?}",
            dir.display(),
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stalls_producers_without_acks_and_the_node_continues_by_itself() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "8m");
    // The WAL, the tracker and the output all on the small file system.
    let out_dir = small.0.join("out");
    let (port, mport) = (free_port(), free_port());
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\njob_retry_max_ms = 500\n\
             [engine.wal]\nsegment_max_bytes = 1048576\nenospc_max_backoff = 200\n\
             [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"lines\"\n[metrics]\naddress = \"127.0.0.1:{mport}\"\n",
            small.0.join("data").display().to_string(),
            out_dir.display().to_string()
        ),
    )
    .unwrap();
    let mut node = spawn_node(&config);
    wait_until("health", Duration::from_secs(30), || {
        http_get(mport, "/health").is_some_and(|(c, _)| c == 200)
    });
    // 100-byte records, about 5,000 a second.
    let prefix = "r".repeat(90);
    let total = 20_000;
    let acked = AtomicUsize::new(0);
    let alive = |node: &mut Node| node.0.try_wait().unwrap().is_none();
    let at = std::sync::atomic::AtomicU16::new(port);
    let sent = std::thread::scope(|s| {
        let producer = s.spawn(|| frames_producer(&at, &prefix, total, &acked));
        wait_until("3,000 acknowledged", Duration::from_secs(60), || {
            acked.load(SeqCst) >= 3_000
        });
        // Fill the file system with a ballast file.
        let ballast = small.0.join("ballast");
        let mut f = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        // The node waits for space: degraded, acknowledging nothing, alive.
        wait_until("/health degraded", Duration::from_secs(10), || {
            http_get(mport, "/health").is_some_and(|(c, b)| c == 200 && b.starts_with("degraded"))
        });
        let metrics = http_get(mport, "/metrics").unwrap().1;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("weir_waiting_for_space{") && l.ends_with(" 1")),
            "{metrics}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let stalled_at = acked.load(SeqCst);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            acked.load(SeqCst),
            stalled_at,
            "records were acknowledged while the disk was full"
        );
        assert!(
            stalled_at < total,
            "the producer finished before the disk was full"
        );
        assert!(alive(&mut node), "the node exited on a full disk");
        // Free the space: the node continues by itself.
        drop(f);
        std::fs::remove_file(&ballast).unwrap();
        let sent = producer.join().unwrap();
        assert!(alive(&mut node), "the node exited");
        sent
    });
    wait_until(
        "every acknowledged record in the output",
        Duration::from_secs(60),
        || {
            let have: std::collections::HashSet<String> = lines_in(&out_dir).into_iter().collect();
            sent.iter().all(|r| have.contains(r))
        },
    );
    wait_until("/health ok", Duration::from_secs(10), || {
        http_get(mport, "/health").is_some_and(|(c, b)| c == 200 && b == "ok\n")
    });
    sigterm(&node.0);
    let status = wait_exit(&mut node, Duration::from_secs(30), "no exit after SIGTERM");
    assert!(status.success(), "{status}");
    drop(small);
}
