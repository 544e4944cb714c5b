//! The crash harness against real `receiver-node` processes: kills under load in each source
//! mode, and nothing acknowledged missing afterwards.

use std::process::Command;
use std::time::Instant;

use weir_testkit::cargo_bin;

const HARNESS: &str = env!("CARGO_BIN_EXE_crash-harness");

/// Runs the crash harness with `args` (and `--node`, and a fresh `--dir`) and returns its report,
/// failing the test (with the node's log) unless it passed with nothing acknowledged missing,
/// nothing corrupt and the kills done.
fn harness_passes(args: &[&str], kills: u32) -> String {
    harness_passes_with(args, kills, &[])
}

/// As [`harness_passes`], with `env` set for the harness and the nodes it starts.
fn harness_passes_with(args: &[&str], kills: u32, env: &[(&str, &str)]) -> String {
    harness_passes_during(args, kills, env, || {})
}

/// As [`harness_passes_with`], running `during` while the harness runs.
fn harness_passes_during(
    args: &[&str],
    kills: u32,
    env: &[(&str, &str)],
    during: impl FnOnce(),
) -> String {
    let (out, report, dir) = harness_with(args, kills, env, during);
    assert!(
        out.status.success(),
        "{report}\n{}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default()
    );
    for want in [
        "MISSING (acknowledged, not in output): 0".to_string(),
        "corrupt lines: 0".to_string(),
        format!("kills: {kills}"),
        "result: PASS".to_string(),
    ] {
        assert!(report.contains(&want), "{want}: {report}");
    }
    report
}

#[test]
fn the_crash_harness_finds_nothing_acknowledged_missing_after_kills() {
    harness_passes(&["--seed", "11", "--min-ms", "150", "--max-ms", "600"], 3);
}

#[test]
fn the_crash_harness_in_flume_push_and_pull_modes_finds_nothing_acknowledged_missing() {
    for source in ["flume", "flume-pull"] {
        let report = harness_passes(
            &[
                "--source", source, "--seed", "3", "--min-ms", "150", "--max-ms", "600",
            ],
            2,
        );
        assert!(report.contains(&format!("source {source},")), "{report}");
        let acked: u64 = report
            .lines()
            .find_map(|l| l.split("acknowledged: ").nth(1))
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or(0);
        assert!(acked > 1000, "{report}");
    }
}

#[test]
fn the_crash_harness_in_kafka_mode_finds_nothing_delivered_missing_after_kills() {
    let report = harness_passes(
        &[
            "--source", "kafka", "--seed", "5", "--min-ms", "200", "--max-ms", "1200", "--rate",
            "3000",
        ],
        2,
    );
    assert!(report.contains("source kafka"), "{report}");
    // Something was delivered and consumed between the kills.
    assert!(delivered(&report) > 1000, "{report}");
    // Duplicates are reported, not asserted: one node resumes after the highest offset in its
    // WAL, so the target is 0, but a rebalance inside one run (a session lost on a loaded
    // machine) may redeliver from the committed offset (at-least-once).
    let duplicates = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("duplicates (stored twice): "))
        .and_then(|d| d.parse::<u64>().ok());
    assert!(duplicates.is_some(), "{report}");
    eprintln!("duplicates seen: {duplicates:?}");
}

/// `--lose-disk` with Kafka as the replica (`--commit after-batch`): every kill also deletes
/// the data directory, and still nothing delivered to Kafka is missing from the output.
#[test]
fn with_commit_after_batch_the_crash_harness_loses_the_disk_at_each_kill_and_nothing_delivered() {
    let report = harness_passes(
        &[
            "--source",
            "kafka",
            "--commit",
            "after-batch",
            "--lose-disk",
            "--seed",
            "6",
            "--min-ms",
            "300",
            "--max-ms",
            "1200",
            "--rate",
            "3000",
        ],
        2,
    );
    assert!(report.contains("data directory deleted"), "{report}");
    assert!(delivered(&report) > 1000, "{report}");
}

/// Without a replica, a lost disk loses what was acknowledged but not yet in a completed batch,
/// and the harness says so: the socket source with `--lose-disk` fails with records MISSING.
#[test]
fn without_a_replica_the_crash_harness_reports_what_a_lost_disk_lost() {
    let (out, report, _dir) = harness(
        &[
            "--lose-disk",
            "--seed",
            "4",
            "--min-ms",
            "300",
            "--max-ms",
            "600",
        ],
        2,
    );
    assert_eq!(out.status.code(), Some(1), "{report}");
    let missing: u64 = report
        .lines()
        .find_map(|l| l.split("MISSING (acknowledged, not in output): ").nth(1))
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(0);
    assert!(missing > 0, "{report}");
    assert!(report.contains("result: FAIL"), "{report}");
}

/// Runs the crash harness with `args`, `--kills`, `--node` and a fresh `--dir`: its exit, its
/// report and the directory (kept until dropped).
fn harness(args: &[&str], kills: u32) -> (std::process::Output, String, tempfile::TempDir) {
    harness_with(args, kills, &[], || {})
}

/// Runs the harness with `env` set, calling `during` once it has started.
fn harness_with(
    args: &[&str],
    kills: u32,
    env: &[(&str, &str)],
    during: impl FnOnce(),
) -> (std::process::Output, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let child = Command::new(HARNESS)
        .envs(env.iter().copied())
        .args(args)
        .args(["--kills", &kills.to_string(), "--node"])
        .arg(cargo_bin("receiver-node"))
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    during();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{report}(in {:?})", t0.elapsed());
    (out, report, dir)
}

/// Records the Kafka feed saw delivered to Kafka, from the harness's report (0 if absent).
fn delivered(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.split("acknowledged (delivered to Kafka): ").nth(1))
        .and_then(|r| r.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

mod real_kafka {
    /// `--bootstrap`: the harness against a real Kafka 4 broker (started once for this test
    /// binary by `weir_testkit::peers::kafka`), a few kills; the long runs use the same
    /// command with `--kills 50`.
    #[test]
    fn the_crash_harness_on_a_real_broker_finds_nothing_delivered_missing_after_kills() {
        let k = weir_testkit::peers::kafka::shared();
        let _logs = k.logs_on_failure();
        let bootstrap = k.bootstrap();
        let report = super::harness_passes(
            &[
                "--source",
                "kafka",
                "--bootstrap",
                &bootstrap,
                "--seed",
                "11",
                "--min-ms",
                "300",
                "--max-ms",
                "1500",
                "--rate",
                "3000",
            ],
            3,
        );
        assert!(report.contains("source kafka"), "{report}");
        assert!(super::delivered(&report) > 1000, "{report}");
    }
}

mod real_s3 {
    use weir_testkit::peers::s3::{self, ACCESS_KEY, REGION, SECRET_KEY};

    /// `--lose-disk` with an object-store replica (moto's S3 server, started once for this test
    /// binary): every kill deletes the data directory, the restart is the same `node_id` on an
    /// empty one, adopts the replicated state, and nothing acknowledged is missing.
    #[test]
    fn with_an_object_store_replica_the_crash_harness_loses_the_disk_at_each_kill_and_nothing_acknowledged(
    ) {
        let server = s3::shared();
        let _logs = server.logs_on_failure();
        server.create_bucket("harness-replica");
        let endpoint = server.endpoint();
        let report = super::harness_passes_with(
            &[
                "--lose-disk",
                "--replica-endpoint",
                &endpoint,
                "--replica-bucket",
                "harness-replica",
                "--seed",
                "4",
                "--min-ms",
                "300",
                "--max-ms",
                "900",
            ],
            3,
            // The nodes inherit the credentials.
            &[
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                ("AWS_REGION", REGION),
            ],
        );
        assert!(report.contains("data directory deleted"), "{report}");
    }
}

mod real_kafka_replica {
    use std::time::Duration;

    use weir_testkit::peers::kafka::KafkaCluster;

    /// `--lose-disk` with a Kafka replica on a three-broker cluster: every kill deletes the data
    /// directory and the restart adopts from the replica topic, while a broker is killed during
    /// ingest and restarted later. Nothing acknowledged is missing.
    #[test]
    fn with_a_kafka_replica_on_three_brokers_a_lost_disk_and_a_lost_broker_lose_nothing() {
        let mut cluster = KafkaCluster::start(3);
        let _logs = cluster.logs_on_failure();
        let bootstrap = cluster.bootstrap();
        let args = [
            "--lose-disk",
            "--replica-kafka",
            &bootstrap,
            "--seed",
            "8",
            "--min-ms",
            "1500",
            "--max-ms",
            "3000",
        ];
        let report = super::harness_passes_during(&args, 3, &[], || {
            // A broker goes down a few seconds in (the node is ingesting by then), comes back.
            std::thread::sleep(Duration::from_secs(4));
            let victim = cluster.broker_ids()[1];
            cluster.kill(victim);
            std::thread::sleep(Duration::from_secs(5));
            cluster.restart(victim);
        });
        assert!(report.contains("data directory deleted"), "{report}");
    }
}

mod real_exactly_once {
    //! `--to`: kills while every batch also goes to an exactly-once destination, which must end
    //! up holding exactly what the batches hold (no record missing, none written twice by a
    //! batch that ran again after a kill).

    fn same_as_the_batches(report: &str) {
        assert!(
            report.contains("beyond the batches: 0; short of the batches: 0; not records: 0"),
            "{report}"
        );
    }

    #[test]
    fn with_kills_a_postgres_table_holds_every_batch_exactly_once() {
        use weir_testkit::peers::postgres::{self, PASSWORD};
        let pg = postgres::shared();
        let _logs = pg.logs_on_failure();
        let url = pg.url();
        let report = super::harness_passes_with(
            &[
                "--to", "postgres", "--pg-url", &url, "--seed", "5", "--min-ms", "300", "--max-ms",
                "1200",
            ],
            4,
            &[("PGPASSWORD", PASSWORD)],
        );
        assert!(report.contains("destination postgres table"), "{report}");
        same_as_the_batches(&report);
    }

    #[test]
    fn with_kills_a_parquet_directory_holds_every_batch_exactly_once_as_pyarrow_reads_it() {
        let python = weir_testkit::python_importing(
            "pyarrow",
            "pyarrow, which reads the Parquet files back",
        );
        let report = super::harness_passes(
            &[
                "--to",
                "parquet",
                "--python",
                &python.display().to_string(),
                "--seed",
                "7",
                "--min-ms",
                "300",
                "--max-ms",
                "1200",
            ],
            4,
        );
        assert!(report.contains("destination parquet"), "{report}");
        same_as_the_batches(&report);
    }

    #[test]
    fn with_kills_an_exactly_once_kafka_topic_holds_every_batch_exactly_once() {
        let k = weir_testkit::peers::kafka::shared();
        let _logs = k.logs_on_failure();
        let bootstrap = k.bootstrap();
        let report = super::harness_passes(
            &[
                "--to",
                "kafka",
                "--to-bootstrap",
                &bootstrap,
                "--seed",
                "6",
                "--min-ms",
                "500",
                "--max-ms",
                "1500",
            ],
            3,
        );
        assert!(report.contains("(exactly once)"), "{report}");
        same_as_the_batches(&report);
    }
}
