//! The `postgres` output against a real PostgreSQL server (Debian's package, started by the
//! test kit on loopback), with real `receiver-node` processes fed by a `frames` producer that
//! counts acknowledgements: every acknowledged record must be in the table exactly once.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use weir_testkit::peers::postgres::{self, PostgresServer, PASSWORD};
use weir_testkit::{frames_producer, free_port, metric, send_frames, sigterm, wait_until, Node};

/// A node config: frames on `port`, metrics on `metrics`, the given `[[output]]` tables.
fn node_config(
    dir: &Path,
    name: &str,
    node_id: &str,
    port: u16,
    metrics: u16,
    outputs: &str,
) -> PathBuf {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nnode_id = \"{node_id}\"\n[engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
             job_retry_max_ms = 500\n\
             [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
             {outputs}\n[metrics]\naddress = \"127.0.0.1:{metrics}\"\n",
            dir.join(format!("data-{name}")).display().to_string(),
        ),
    )
    .unwrap();
    cfg
}

fn password_file(dir: &Path, password: &str) -> PathBuf {
    let f = dir.join("pg-password");
    std::fs::write(&f, format!("{password}\n")).unwrap();
    f
}

fn postgres_output(server: &PostgresServer, table: &str, pw: &Path, extra: &str) -> String {
    format!(
        "[[output]]\ntype = \"postgres\"\nurl = \"{}\"\npassword_file = {:?}\ntable = \"{table}\"\n{extra}\n",
        server.url(),
        pw.display().to_string()
    )
}

/// payload -> number of rows holding it.
fn payload_counts(server: &PostgresServer, table: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let out = server.psql(&format!(
        "SELECT convert_from(payload, 'UTF8') FROM {table}"
    ));
    for l in out.lines().filter(|l| !l.is_empty()) {
        *m.entry(l.to_string()).or_insert(0) += 1;
    }
    m
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn real_postgres_two_nodes_one_table_a_kill_and_a_rerun_leave_every_record_exactly_once() {
    let pg = postgres::shared();
    let _logs = pg.logs_on_failure();
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), PASSWORD);
    let table = "shared_events";
    // Node a also writes to a `dir` output that fails at first (its path is a file): its
    // batches are written to PostgreSQL but cannot complete, so after a's kill they are run
    // again: the bookkeeping table must turn each re-run into a skip.
    let blocker = dir.path().join("blocked-out");
    std::fs::write(&blocker, "not a directory").unwrap();
    let (port_a, port_b, m_a, m_b) = (free_port(), free_port(), free_port(), free_port());
    let out_a = format!(
        "{}[[output]]\ntype = \"dir\"\npath = {:?}\n",
        postgres_output(pg, table, &pw, ""),
        blocker.display().to_string()
    );
    let cfg_a = node_config(dir.path(), "a", "node-a", port_a, m_a, &out_a);
    let cfg_b = node_config(
        dir.path(),
        "b",
        "node-b",
        port_b,
        m_b,
        &postgres_output(pg, table, &pw, ""),
    );
    let log_a = dir.path().join("a.log");
    let mut a = Node::start("run", &cfg_a, Some(&log_a));
    let b = Node::start("run", &cfg_b, Some(&dir.path().join("b.log")));
    let (acked_a, acked_b) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let total = 2000;
    let (at_a, at_b) = (AtomicU16::new(port_a), AtomicU16::new(port_b));
    let (sent_a, sent_b) = std::thread::scope(|s| {
        let pa = s.spawn(|| frames_producer(&at_a, "a", total, &acked_a));
        let pb = s.spawn(|| frames_producer(&at_b, "b", total, &acked_b));
        wait_until(
            "a third of a's records acknowledged and some in PostgreSQL",
            Duration::from_secs(60),
            || {
                acked_a.load(SeqCst) >= total / 3
                    && pg
                        .try_count(&format!(
                            "SELECT count(*) FROM weir_batches WHERE target = '{table}' AND node_id = 'node-a'"
                        ))
                        .is_some_and(|n| n > 0)
            },
        );
        a.0.kill().unwrap();
        a.0.wait().unwrap();
        // Let a's batches complete from now on.
        std::fs::remove_file(&blocker).unwrap();
        a = Node::start("run", &cfg_a, Some(&log_a));
        (pa.join().unwrap(), pb.join().unwrap())
    });
    assert_eq!((acked_a.load(SeqCst), acked_b.load(SeqCst)), (total, total));
    wait_until(
        "every acknowledged record in the table",
        Duration::from_secs(60),
        || {
            let have = payload_counts(pg, table);
            sent_a.iter().chain(&sent_b).all(|r| have.contains_key(r))
        },
    );
    wait_until("a's re-runs counted", Duration::from_secs(30), || {
        metric(m_a, "weir_output_batches_skipped_total").is_some_and(|n| n > 0)
    });
    let have = payload_counts(pg, table);
    let dups: Vec<_> = have.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicated rows: {dups:?}");
    let sent: HashSet<&String> = sent_a.iter().chain(&sent_b).collect();
    assert!(have.keys().all(|p| sent.contains(p)), "rows nobody sent");
    // Rows carry their node, and both nodes recorded batches at the same times without
    // skipping each other's (the bookkeeping key holds the node).
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM {table} WHERE (node = 'node-a') <> (convert_from(payload, 'UTF8') LIKE 'a-%')"
        )),
        0
    );
    let both = pg.count(&format!(
        "SELECT count(*) FROM (SELECT batch_time FROM weir_batches WHERE target = '{table}' \
         GROUP BY batch_time HAVING count(DISTINCT node_id) = 2) t"
    ));
    assert!(both > 0, "no batch time recorded by both nodes");
    // The bookkeeping rows' record counts add up to the table's rows.
    assert_eq!(
        pg.count(&format!(
            "SELECT sum(records) FROM weir_batches WHERE target = '{table}'"
        )),
        2 * total as u64
    );
    assert!(
        log_of(&log_a).contains("batch already at the destination (a re-run): skipped"),
        "{}",
        log_of(&log_a)
    );
    for n in [&a, &b] {
        sigterm(&n.0);
    }
    for mut n in [a, b] {
        let status = n.wait_exit(Duration::from_secs(30), "no exit after SIGTERM");
        assert!(status.success(), "{status}");
    }
    // Stopping drops the output with its client runtime: no panic on the way out.
    for log in [log_a, dir.path().join("b.log")] {
        assert!(!log_of(&log).contains("panicked"), "{}", log_of(&log));
    }
}

#[test]
fn real_postgres_rejected_rows_fail_the_batch_without_a_dead_letter_output_and_go_there_with_one() {
    let pg = postgres::shared();
    let _logs = pg.logs_on_failure();
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), PASSWORD);
    let table = "typed_events";
    pg.psql(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, name text NOT NULL, score double precision, \
         at timestamptz, body jsonb, node text, batch_time timestamptz)"
    ));
    let columns = "create_table = false\n[output.columns]\nid = \"/id\"\nname = \"/name\"\n\
                   score = \"/score\"\nat = \"/at\"\nbody = \"$payload\"\nnode = \"$node\"\n\
                   batch_time = \"$batch_time\"\n";
    let (port, m) = (free_port(), free_port());
    let cfg = node_config(
        dir.path(),
        "n",
        "typed-1",
        port,
        m,
        &postgres_output(pg, table, &pw, columns),
    );
    let log = dir.path().join("n.log");
    let mut node = Node::start("run", &cfg, Some(&log));
    // Good records, then one that is not JSON, one without its NOT NULL name, one whose id
    // repeats an earlier one, one with a score that is not a number.
    let mut records: Vec<String> = (0..50)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"user {i}","score":{i}.5,"at":"2026-12-03T10:00:{:02}Z"}}"#,
                i % 60
            )
        })
        .collect();
    let bad = [
        "not json at all".to_string(),
        r#"{"id":1000,"score":1}"#.to_string(),
        r#"{"id":7,"name":"again"}"#.to_string(),
        r#"{"id":1001,"name":"x","score":"high"}"#.to_string(),
    ];
    records.extend(bad.iter().cloned());
    send_frames(port, &records);
    // Without a dead-letter output: the batch fails (and is retried), nothing is committed.
    wait_until("the rejection logged", Duration::from_secs(30), || {
        log_of(&log).contains("rejected and no dead_letter output is configured")
    });
    assert!(metric(m, "weir_output_failures_total").is_some_and(|n| n > 0));
    assert_eq!(metric(m, "weir_output_failing"), Some(1));
    assert_eq!(pg.count(&format!("SELECT count(*) FROM {table}")), 0);
    node.0.kill().unwrap();
    node.0.wait().unwrap();

    // With one: the same batch (re-run from the WAL) completes without its bad records.
    let dead = dir.path().join("dead");
    let cfg = node_config(
        dir.path(),
        "n",
        "typed-1",
        port,
        m,
        &postgres_output(
            pg,
            table,
            &pw,
            &format!(
                "dead_letter = {{ type = \"dir\", path = {:?} }}\n{columns}",
                dead.display().to_string()
            ),
        ),
    );
    let node = Node::start("run", &cfg, Some(&log));
    wait_until(
        "the good rows in the table",
        Duration::from_secs(60),
        || pg.count(&format!("SELECT count(*) FROM {table}")) == 50,
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT name, score, extract(epoch from at)::bigint, body->>'id', node FROM {table} WHERE id = 7"
        )),
        format!("user 7|7.5|{}|7|typed-1", 1_796_292_007)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_dir(&dead)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let reasons: BTreeMap<String, String> = lines
        .iter()
        .map(|l| {
            (
                l["record"]["payload"].as_str().unwrap().to_string(),
                l["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 4, "{lines:?}");
    assert!(reasons[&bad[0]].contains("not JSON"), "{reasons:?}");
    assert!(reasons[&bad[1]].contains("null value"), "{reasons:?}");
    assert!(reasons[&bad[2]].contains("duplicate key"), "{reasons:?}");
    assert!(reasons[&bad[3]].contains("\"score\""), "{reasons:?}");
    for l in &lines {
        assert_eq!(l["record"]["node"], "typed-1");
        assert_eq!(l["output"], format!("postgres table {table}"));
        assert!(l["batch_time"].as_u64().is_some());
    }
    assert_eq!(metric(m, "weir_output_dead_letters_total"), Some(4));
    assert_eq!(metric(m, "weir_output_records_total"), Some(50));
    assert_eq!(
        pg.count(&format!(
            "SELECT sum(dead_letters) FROM weir_batches WHERE target = '{table}'"
        )),
        4
    );
    sigterm(&node.0);
}

#[test]
fn real_postgres_down_or_a_wrong_password_holds_batches_until_it_is_back_and_loses_nothing() {
    let mut pg = PostgresServer::start();
    let _logs = pg.logs_on_failure();
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), "wrong password");
    let table = "events";
    let (port, m) = (free_port(), free_port());
    let cfg = node_config(
        dir.path(),
        "n",
        "n-1",
        port,
        m,
        &postgres_output(&pg, table, &pw, ""),
    );
    let log = dir.path().join("n.log");
    let node = Node::start("run", &cfg, Some(&log));
    let at = AtomicU16::new(port);
    let acked = AtomicUsize::new(0);
    let first = frames_producer(&at, "first", 500, &acked);
    wait_until(
        "the authentication failure logged",
        Duration::from_secs(30),
        || log_of(&log).contains("password authentication failed"),
    );
    assert_eq!(metric(m, "weir_output_failing"), Some(1));
    // The password file is read at each connection: fixing it is enough.
    password_file(dir.path(), PASSWORD);
    wait_until(
        "the first records in the table",
        Duration::from_secs(60),
        || pg.try_count(&format!("SELECT count(*) FROM {table}")) == Some(500),
    );
    // The server goes away while records keep coming (acknowledged: they are in the WAL).
    pg.kill();
    let second = frames_producer(&at, "second", 500, &acked);
    wait_until(
        "the connection failure counted",
        Duration::from_secs(30),
        || metric(m, "weir_output_failing") == Some(1),
    );
    pg.restart();
    wait_until("every record in the table", Duration::from_secs(60), || {
        pg.try_count(&format!("SELECT count(*) FROM {table}")) == Some(1000)
    });
    let have = payload_counts(&pg, table);
    for r in first.iter().chain(&second) {
        assert_eq!(have.get(r), Some(&1), "{r}");
    }
    assert_eq!(metric(m, "weir_output_failing"), Some(0));
    sigterm(&node.0);
}

#[test]
fn real_postgres_over_tls_rows_arrive_and_plain_text_or_an_unknown_ca_is_refused_with_a_clear_error(
) {
    // The server takes TCP connections only over TLS, with a certificate signed by a test CA.
    let pg = PostgresServer::start_tls();
    let _logs = pg.logs_on_failure();
    let ca = pg.ca_file().expect("a TLS server has a CA").to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), PASSWORD);
    let table = "secure_events";
    let (port, m) = (free_port(), free_port());
    let log = dir.path().join("n.log");
    let phase = |tls: &str, wait_for: &str| {
        let cfg = node_config(
            dir.path(),
            "n",
            "tls-1",
            port,
            m,
            &postgres_output(&pg, table, &pw, tls),
        );
        let log = dir
            .path()
            .join(format!("{}.log", wait_for.replace(' ', "-")));
        let mut node = Node::start("run", &cfg, Some(&log));
        wait_until(wait_for, Duration::from_secs(30), || {
            log_of(&log).contains(wait_for) && metric(m, "weir_output_failing") == Some(1)
        });
        node.0.kill().unwrap();
        node.0.wait().unwrap();
    };
    // Records first, acknowledged while nothing can reach the table.
    let cfg = node_config(
        dir.path(),
        "n",
        "tls-1",
        port,
        m,
        &postgres_output(&pg, table, &pw, ""),
    );
    let node = Node::start("run", &cfg, Some(&log));
    let acked = AtomicUsize::new(0);
    let sent = frames_producer(&AtomicU16::new(port), "tls", 300, &acked);
    drop(node);
    // Plain text: the server says no.
    phase("tls = \"disable\"", "no encryption");
    // TLS, but the test CA is not among the system's roots: the certificate is refused.
    phase("tls = \"require\"", "invalid peer certificate");
    // TLS with the CA: everything arrives, once.
    let cfg = node_config(
        dir.path(),
        "n",
        "tls-1",
        port,
        m,
        &postgres_output(
            &pg,
            table,
            &pw,
            &format!(
                "tls = \"require\"\nca_file = {:?}",
                ca.display().to_string()
            ),
        ),
    );
    let node = Node::start("run", &cfg, Some(&log));
    wait_until("every record in the table", Duration::from_secs(60), || {
        pg.try_count(&format!("SELECT count(*) FROM {table}")) == Some(300)
    });
    let have = payload_counts(&pg, table);
    for r in &sent {
        assert_eq!(have.get(r), Some(&1), "{r}");
    }
    // The server saw TLS connections from the output.
    assert!(
        pg.count("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.application_name = 'weir'") >= 1
    );
    sigterm(&node.0);
}
