//! `receiver-node` with replicated acknowledgements against real replicas started by the tests:
//! moto's S3 server and an Apache Kafka broker. A node paused (SIGSTOP) while a new process
//! takes its `node_id` over on an empty data directory is fenced when it resumes (SIGCONT): it
//! exits 1 naming the new epoch, and every record either acknowledged is in the output. A Kafka
//! replica topic with one replica is refused unless allowed. A replica that stops answering for
//! 10 s (the server or broker SIGSTOPped) holds every acknowledgement meanwhile, and ingest
//! resumes by itself. (Lost disks under load: the crash harness's `real_s3` and
//! `real_kafka_replica` tests.)

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use weir_testkit::peers::s3::{self, ACCESS_KEY, REGION, SECRET_KEY};
use weir_testkit::{frames_producer, free_port, sigterm, wait_until, Node};

/// A node's configuration: `node_id = "zombie"`, a frames listener on `port`, a `jsonl`
/// output into `out`, and `replication` (an `[engine.replication]` table).
fn config(dir: &Path, name: &str, port: u16, out: &Path, replication: &str) -> std::path::PathBuf {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"zombie\"\ndata_dir = {:?}\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             {replication}\n\
             [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
             [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n[metrics]\nenabled = false\n",
            dir.join(format!("data-{name}")).display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    cfg
}

fn signal(node: &Node, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &node.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The payloads in `out`'s batch files.
fn payloads(out: &Path) -> std::collections::HashSet<String> {
    let mut have = std::collections::HashSet::new();
    for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().ends_with(".jsonl") {
            continue;
        }
        for l in std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                have.insert(v["payload"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    have
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Node a ingests; it is paused; node b (same `node_id`, an empty data directory) takes over;
/// a resumes and must exit 1, fenced; the producer moves to b; every record is in the output.
fn a_paused_owner_is_fenced_and_nothing_acknowledged_is_lost(replication: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (pa, pb) = (free_port(), free_port());
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = Node::start(
        "run",
        &config(dir.path(), "a", pa, &out, replication),
        Some(&log_a),
    );
    let port = AtomicU16::new(pa);
    let acked = AtomicUsize::new(0);
    let total = 4000;
    let sent = std::thread::scope(|s| {
        let producer = s.spawn(|| frames_producer(&port, "z", total, &acked));
        wait_until("a third acknowledged by a", Duration::from_secs(60), || {
            acked.load(SeqCst) >= total / 3
        });
        signal(&a, "-STOP");
        let b = Node::start(
            "run",
            &config(dir.path(), "b", pb, &out, replication),
            Some(&log_b),
        );
        wait_until(
            "b to take the node_id over",
            Duration::from_secs(60),
            || log_of(&log_b).contains("adopted the node's state from the replica"),
        );
        let acked_before = acked.load(SeqCst);
        signal(&a, "-CONT");
        let status = a.wait_exit(Duration::from_secs(60), "the paused node did not exit");
        let la = log_of(&log_a);
        assert_eq!(status.code(), Some(1), "{la}");
        assert!(
            la.contains("fenced") && la.contains("epoch 2"),
            "the old owner does not say it was fenced by epoch 2:\n{la}"
        );
        eprintln!(
            "acknowledged by a before the take-over: {acked_before}; after it resumed: {}",
            acked.load(SeqCst) - acked_before
        );
        port.store(pb, SeqCst);
        let sent = producer.join().unwrap();
        (sent, b)
    });
    let (sent, b) = sent;
    assert_eq!(acked.load(SeqCst), total);
    every_record_in_the_output_then_a_clean_stop(&out, &sent, b, &log_b);
}

#[test]
fn real_s3_a_paused_node_taken_over_is_fenced_and_nothing_acknowledged_is_lost() {
    let server = s3::shared();
    let _logs = server.logs_on_failure();
    server.create_bucket("zombie");
    a_paused_owner_is_fenced_and_nothing_acknowledged_is_lost(&format!(
        "[engine.replication]\nkind = \"object_store\"\nendpoint = {:?}\nbucket = \"zombie\"\n\
         region = {REGION:?}\naccess_key_id = {ACCESS_KEY:?}\nsecret_access_key = {SECRET_KEY:?}\n",
        server.endpoint()
    ));
}

#[test]
fn real_kafka_a_paused_node_taken_over_is_fenced_and_nothing_acknowledged_is_lost() {
    let k = weir_testkit::peers::kafka::shared();
    let _logs = k.logs_on_failure();
    // One broker here: the three-broker case is the crash harness's `real_kafka_replica`.
    a_paused_owner_is_fenced_and_nothing_acknowledged_is_lost(&format!(
        "[engine.replication]\nkind = \"kafka\"\nbootstrap_servers = {:?}\ntopic = \"zombie-replica\"\n\
         allow_unreplicated = true\n",
        k.bootstrap()
    ));
}

#[test]
fn real_kafka_a_replica_topic_with_one_replica_is_refused_saying_why() {
    let k = weir_testkit::peers::kafka::shared();
    let _logs = k.logs_on_failure();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "one",
        free_port(),
        &dir.path().join("out"),
        &format!(
            "[engine.replication]\nkind = \"kafka\"\nbootstrap_servers = {:?}\ntopic = \"one-replica\"\n",
            k.bootstrap()
        ),
    );
    let log = dir.path().join("node.log");
    let mut n = Node::start("run", &cfg, Some(&log));
    let status = n.wait_exit(Duration::from_secs(60), "the node did not refuse to start");
    let text = log_of(&log);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("has 1 replica(s) and min.insync.replicas = 1")
            && text.contains("allow_unreplicated = true"),
        "{text}"
    );
}

/// The replica stops answering for 10 s during ingest (`pause`, then `resume`): nothing is
/// acknowledged meanwhile, the node says why and does not exit, and once the replica answers
/// again every record is acknowledged and in the output.
fn while_the_replica_is_down_for_10_s_nothing_is_acknowledged(
    replication: &str,
    pause: &dyn Fn(),
    resume: &dyn Fn(),
) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let p = free_port();
    let log = dir.path().join("node.log");
    let mut n = Node::start(
        "run",
        &config(dir.path(), "n", p, &out, replication),
        Some(&log),
    );
    let port = AtomicU16::new(p);
    let acked = AtomicUsize::new(0);
    let total = 3000;
    let sent = std::thread::scope(|s| {
        let producer = s.spawn(|| frames_producer(&port, "down", total, &acked));
        wait_until("a fifth acknowledged", Duration::from_secs(60), || {
            acked.load(SeqCst) >= total / 5
        });
        pause();
        // A write answered just before the pause may still land.
        std::thread::sleep(Duration::from_secs(2));
        let held_at = acked.load(SeqCst);
        std::thread::sleep(Duration::from_secs(8));
        let after = acked.load(SeqCst);
        let still_running = n.0.try_wait().unwrap().is_none();
        resume();
        assert!(
            still_running,
            "the node exited while the replica was down:\n{}",
            log_of(&log)
        );
        assert_eq!(
            after, held_at,
            "records were acknowledged while the replica was down"
        );
        eprintln!("acknowledged when the replica stopped answering: {held_at} of {total}");
        producer.join().unwrap()
    });
    assert_eq!(acked.load(SeqCst), total);
    let text = log_of(&log);
    assert!(
        text.contains("replica write failed: nothing more is acknowledged until it succeeds")
            && text.contains("replica write succeeded again"),
        "the node does not say that it waited for the replica:\n{text}"
    );
    every_record_in_the_output_then_a_clean_stop(&out, &sent, n, &log);
}

#[test]
fn real_s3_while_the_s3_server_is_down_for_10_s_nothing_is_acknowledged_and_ingest_resumes() {
    // A server of its own: the others' tests must not stall with it.
    let server = s3::S3Server::start();
    let _logs = server.logs_on_failure();
    server.create_bucket("down");
    while_the_replica_is_down_for_10_s_nothing_is_acknowledged(
        &format!(
            "[engine.replication]\nkind = \"object_store\"\nendpoint = {:?}\nbucket = \"down\"\n\
             region = {REGION:?}\naccess_key_id = {ACCESS_KEY:?}\nsecret_access_key = {SECRET_KEY:?}\n\
             request_timeout_ms = 2000\n",
            server.endpoint()
        ),
        &|| server.pause(),
        &|| server.resume(),
    );
}

#[test]
fn real_kafka_while_the_broker_is_down_for_10_s_nothing_is_acknowledged_and_ingest_resumes() {
    let k = weir_testkit::peers::kafka::KafkaCluster::start(1);
    let _logs = k.logs_on_failure();
    while_the_replica_is_down_for_10_s_nothing_is_acknowledged(
        &format!(
            "[engine.replication]\nkind = \"kafka\"\nbootstrap_servers = {:?}\n\
             allow_unreplicated = true\nrequest_timeout_ms = 2000\n",
            k.bootstrap()
        ),
        &|| k.pause(),
        &|| k.resume(),
    );
}

/// Waits until every record of `sent` is in `out`, then stops `node` (SIGTERM): it must exit 0.
fn every_record_in_the_output_then_a_clean_stop(
    out: &Path,
    sent: &[String],
    mut node: Node,
    log: &Path,
) {
    wait_until(
        "every record in the output",
        Duration::from_secs(60),
        || {
            let have = payloads(out);
            sent.iter().all(|r| have.contains(r))
        },
    );
    sigterm(&node.0);
    let status = node.wait_exit(
        Duration::from_secs(30),
        "the node did not exit after SIGTERM",
    );
    assert!(status.success(), "{}", log_of(log));
}
