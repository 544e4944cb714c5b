//! `receiver-node` against real Apache Flume agents (issue 14): a Flume 1.11 agent's Avro sink
//! pushing into weir's Flume source, Spark 2.4's `SparkSink` (in a Flume 1.8 agent) polled by
//! weir's `flume_pull` receiver, and a Flume 1.11 agent feeding `receiver-node sink` polled by a
//! node; each with `receiver-node` processes SIGKILLed mid-stream and restarted on their data.
//! The agents come from the jars `interop/fetch` resolves (`weir_testkit::peers::flume`); their
//! `seq` sources number the events `0..N`, so "nothing lost" is "every number is in the node's
//! batch files". Every test here is named `real_flume::...`: `cargo test -- --skip real_` leaves
//! them out, `cargo test -- real_` runs only them.

mod real_flume {
    use std::collections::BTreeMap;
    use std::fs::{self};
    use std::path::{Path, PathBuf};

    use std::time::{Duration, Instant};

    use weir_testkit::peers::flume::{
        avro_sink_agent, spark_sink_agent, Dist, FlumeAgent, SeqSource, CHANNEL_COUNTERS,
        SINK_COUNTERS, SOURCE_COUNTERS, SPARK_SINK_ROLLBACK,
    };
    use weir_testkit::{free_port, metric, wait_healthy, wait_until, Node, Scratch};

    /// `receiver-node <command> --config <config>`, its output appended to `log`.
    fn spawn(command: &str, config: &Path, log: &Path) -> Node {
        Node::start(command, config, Some(log))
    }

    /// SIGKILL, and reaped (so that its data directory's lock is free).
    fn kill9(node: Node) {
        drop(node);
    }

    /// A node configuration: `receiver` (a `[[receiver]]` table's keys), blocks cut every
    /// `block_ms`, 200 ms batches and a `jsonl` output.
    fn node_config(dir: &Path, mport: u16, block_ms: u64, receiver: &str) -> (PathBuf, PathBuf) {
        let out = dir.join("out");
        let config = dir.join("node.toml");
        fs::write(
            &config,
            format!(
                "data_dir = {:?}\n\
                 [engine]\nbatch_interval_ms = 200\nblock_interval_ms = {block_ms}\n\
                 [[receiver]]\n{receiver}\n\
                 [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n\
                 [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
                dir.join("data").display().to_string(),
                out.display().to_string()
            ),
        )
        .unwrap();
        (config, out)
    }

    /// Event number -> how many times it is in the node's batch files.
    fn delivered(out: &Path) -> BTreeMap<u64, u32> {
        let mut seen = BTreeMap::new();
        for e in fs::read_dir(out).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().ends_with(".jsonl") {
                continue;
            }
            for l in fs::read_to_string(e.path()).unwrap_or_default().lines() {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                let n: u64 = r["payload"]
                    .as_str()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("a payload that is no seq number: {r}"));
                *seen.entry(n).or_insert(0) += 1;
            }
        }
        seen
    }

    /// Waits until every event `0..total` is in `out`, then checks that nothing else is and
    /// returns the number of duplicates (at-least-once).
    fn every_event_delivered(out: &Path, total: u64, what: &str) -> u64 {
        let t0 = Instant::now();
        loop {
            let seen = delivered(out);
            if seen.len() as u64 >= total {
                assert!(
                    seen.keys().all(|n| *n < total),
                    "{what}: events that were never generated: {:?}",
                    seen.keys()
                        .filter(|n| **n >= total)
                        .take(10)
                        .collect::<Vec<_>>()
                );
                let records: u64 = seen.values().map(|c| u64::from(*c)).sum();
                return records - total;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                let missing: Vec<u64> = (0..total).filter(|n| !seen.contains_key(n)).collect();
                panic!(
                    "{what}: {} of {total} events lost, e.g. {:?}",
                    missing.len(),
                    &missing[..missing.len().min(20)]
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the agent's Avro sink has been refused a connection more than `before`
    /// times: it tried the node (or sink) while that was down.
    fn wait_refused(agent: &FlumeAgent, before: u64) -> Duration {
        let t0 = Instant::now();
        while agent.counters().get(SINK_COUNTERS, "ConnectionFailedCount") <= before {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the agent never tried the stopped peer: {:?}",
                agent.counters()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t0.elapsed()
    }

    /// A Flume 1.11 agent's Avro sink pushes `total` numbered events into a node that is
    /// SIGKILLed `kills` times during the ingest. After each kill the test waits until the agent
    /// has tried the dead node and been refused, then restarts the node on the same data
    /// directory; the agent's retries then succeed. Every event must be in the batch files.
    fn agent_pushes_through_node_kills(total: u64, batch: u32, deflate: bool, kills: u64) {
        let t0 = Instant::now();
        let scratch = Scratch::new(&format!("real-flume-push-{batch}"));
        let dir = scratch.path();
        let (port, mport) = (free_port(), free_port());
        let (config, out) = node_config(
            dir,
            mport,
            10,
            &format!(
                "name = \"agent\"\ntype = \"flume\"\naddress = \"127.0.0.1:{port}\"\n\
                 deflate = {deflate}\nmax_events_per_batch = {batch}"
            ),
        );
        let log = dir.join("node.log");
        let mut node = spawn("run", &config, &log);
        wait_healthy(mport);
        let seq = SeqSource {
            total_events: total,
            batch_size: 100,
        };
        let mut agent = FlumeAgent::start(Dist::Flume, &avro_sink_agent(seq, port, batch, deflate));
        let mut down = Duration::ZERO;
        for k in 1..=kills {
            agent.wait_drained(total * k / (kills + 1), Duration::from_secs(90));
            let before = agent.counters();
            kill9(node);
            let refused = before.get(SINK_COUNTERS, "ConnectionFailedCount");
            let t = Instant::now();
            wait_refused(&agent, refused);
            down += t.elapsed();
            println!(
                "kill {k}: node SIGKILLed after the agent had {} events accepted; the agent was \
                 refused by the dead node {:.1} s later",
                before.get(SINK_COUNTERS, "EventDrainSuccessCount"),
                t.elapsed().as_secs_f64()
            );
            node = spawn("run", &config, &log);
        }
        let duplicates =
            every_event_delivered(&out, total, &format!("batch {batch}, deflate {deflate}"));
        // The sink sends one call at a time: only the call in flight at a kill can have been
        // durable without its OK reaching the agent, and be sent again.
        assert!(
            duplicates <= kills * u64::from(batch),
            "{duplicates} duplicates from {kills} kills of batches of {batch}"
        );
        let c = agent.counters();
        assert_eq!(c.get(SOURCE_COUNTERS, "EventAcceptedCount"), total, "{c:?}");
        assert_eq!(
            c.get(SINK_COUNTERS, "EventDrainSuccessCount"),
            total,
            "{c:?}"
        );
        assert!(
            c.get(SINK_COUNTERS, "ConnectionFailedCount") >= kills,
            "{c:?}"
        );
        assert!(agent.running());
        wait_healthy(mport);
        drop(node);
        println!(
            "Flume 1.11 Avro sink (batch-size {batch}, compression {}) -> weir: {total} events, \
             {duplicates} duplicates, {kills} node kills ({} failed sends, {} refused connects, \
             {:.1} s down), {:.1} s",
            if deflate { "deflate" } else { "none" },
            c.get(SINK_COUNTERS, "EventWriteFail"),
            c.get(SINK_COUNTERS, "ConnectionFailedCount"),
            down.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }

    #[test]
    fn a_flume_agent_pushes_batches_of_100_through_three_node_kills_without_loss() {
        agent_pushes_through_node_kills(30_000, 100, false, 3);
    }

    #[test]
    fn a_flume_agent_pushes_deflated_batches_of_1000_through_two_node_kills_without_loss() {
        agent_pushes_through_node_kills(50_000, 1000, true, 2);
    }

    /// Spark's `SparkSink` in a Flume 1.8 agent, polled by a node's `flume_pull` receiver (two
    /// workers). The node is SIGKILLed twice while it holds batches it has not acked yet: each
    /// time the sink rolls them back after its transaction timeout and serves them again to the
    /// restarted node. Every event must be in the batch files, and the agent's channel empty
    /// with every event committed once.
    ///
    /// A kill only proves a rollback if a batch was handed out at that moment: the node's
    /// `/metrics` must show events received and not acked, and blocks are cut every 100 ms so
    /// that this lasts. Should a batch still have been acked in between (the kill comes a few ms
    /// after the look), the sink has nothing to roll back, and the test kills again.
    #[test]
    fn spark_sink_rolls_back_batches_of_a_killed_node_and_loses_nothing() {
        let t0 = Instant::now();
        let (total, kills, tx_timeout, workers, max_batch) = (30_000u64, 2u64, 4, 2u64, 1000u32);
        let scratch = Scratch::new("real-flume-spark-sink");
        let dir = scratch.path();
        let (port, mport) = (free_port(), free_port());
        let seq = SeqSource {
            total_events: total,
            batch_size: 100,
        };
        let agent = FlumeAgent::start(
            Dist::SparkSink,
            &spark_sink_agent(seq, port, tx_timeout, max_batch),
        );
        let (config, out) = node_config(
            dir,
            mport,
            100,
            &format!(
                "name = \"pulled\"\ntype = \"flume_pull\"\naddresses = [\"127.0.0.1:{port}\"]\n\
                 workers = {workers}\nmax_batch = {max_batch}\npoll_interval_ms = 50\n\
                 reconnect_backoff_ms = 50\nreconnect_backoff_max_ms = 500"
            ),
        );
        let log = dir.join("node.log");
        let mut node = spawn("run", &config, &log);
        let committed =
            |a: &FlumeAgent| a.counters().get(CHANNEL_COUNTERS, "EventTakeSuccessCount");
        // Events the node has received and not acked (in its current life).
        let holding = || {
            let received = metric(mport, "weir_flume_pull_events_total").unwrap_or(0);
            let acked = metric(mport, "weir_flume_pull_events_acked_total").unwrap_or(0);
            received.saturating_sub(acked)
        };
        let (mut attempts, mut rolled_back) = (0, 0u64);
        while rolled_back < kills {
            attempts += 1;
            assert!(attempts <= 6, "{attempts} kills, {rolled_back} rolled back");
            let target = total * (rolled_back + 1) / (kills + 1);
            wait_until("events committed", Duration::from_secs(90), || {
                committed(&agent) >= target
            });
            wait_until("the node holding a batch", Duration::from_secs(30), || {
                holding() > 0
            });
            let rollbacks = agent.log_count(SPARK_SINK_ROLLBACK);
            let at = committed(&agent);
            kill9(node);
            let t = Instant::now();
            let deadline = Duration::from_secs(u64::from(tx_timeout) + 6);
            while agent.log_count(SPARK_SINK_ROLLBACK) == rollbacks && t.elapsed() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let n = agent.log_count(SPARK_SINK_ROLLBACK) - rollbacks;
            if n > 0 {
                rolled_back += 1;
            }
            println!(
                "kill {attempts}: node SIGKILLed holding a batch, {at} events committed; the \
                 SparkSink rolled back {n} batch(es) within {:.1} s",
                t.elapsed().as_secs_f64()
            );
            node = spawn("run", &config, &log);
        }
        let duplicates = every_event_delivered(&out, total, "SparkSink -> flume_pull");
        // Only the batches handed out at a kill (one per worker) can come again.
        assert!(
            duplicates <= attempts * workers * u64::from(max_batch),
            "{duplicates} duplicates from {attempts} kills"
        );
        wait_until(
            "every event committed in the agent's channel",
            Duration::from_secs(30),
            || {
                let c = agent.counters();
                c.get(CHANNEL_COUNTERS, "ChannelSize") == 0
                    && c.get(CHANNEL_COUNTERS, "EventTakeSuccessCount") == total
            },
        );
        let c = agent.counters();
        assert_eq!(c.get(SOURCE_COUNTERS, "EventAcceptedCount"), total, "{c:?}");
        let rollbacks = agent.log_count(SPARK_SINK_ROLLBACK);
        wait_until("acks in /metrics", Duration::from_secs(30), || {
            metric(mport, "weir_flume_pull_events_acked_total").is_some_and(|n| n > 0)
        });
        drop(node);
        println!(
            "Spark 2.4.7 SparkSink (Flume 1.8) -> weir flume_pull: {total} events, {duplicates} \
             duplicates, {attempts} node kills, {rollbacks} sink rollbacks, {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }

    /// A Flume 1.11 agent pushes into `receiver-node sink`, which a node polls with its
    /// `flume_pull` receiver. The sink is SIGKILLed twice mid-stream; after each kill the test
    /// waits until the agent has been refused by it, then restarts it on the same data
    /// directory and ports. Every event must reach the node's batch files and the sink's queue
    /// must end empty (every event acked).
    #[test]
    fn a_flume_agent_feeds_weirs_pull_sink_through_sink_kills_without_loss() {
        let t0 = Instant::now();
        let (total, kills) = (30_000u64, 2u64);
        let scratch = Scratch::new("real-flume-pull-sink");
        let dir = scratch.path();
        let (push_port, pull_port, sink_mport, mport) =
            (free_port(), free_port(), free_port(), free_port());
        let sink_config = dir.join("sink.toml");
        fs::write(
            &sink_config,
            format!(
                "data_dir = {:?}\n\
                 [push]\naddress = \"127.0.0.1:{push_port}\"\nmax_events_per_batch = 1000\n\
                 [pull]\naddress = \"127.0.0.1:{pull_port}\"\n\
                 [queue]\ntx_timeout_ms = 5000\nempty_wait_ms = 300\n\
                 [metrics]\naddress = \"127.0.0.1:{sink_mport}\"\n",
                dir.join("sink-data").display().to_string()
            ),
        )
        .unwrap();
        let sink_log = dir.join("sink.log");
        let mut sink = spawn("sink", &sink_config, &sink_log);
        wait_healthy(sink_mport);
        let (config, out) = node_config(
            dir,
            mport,
            10,
            &format!(
                "name = \"pulled\"\ntype = \"flume_pull\"\naddresses = [\"127.0.0.1:{pull_port}\"]\n\
                 max_batch = 1000\npoll_interval_ms = 50\n\
                 reconnect_backoff_ms = 50\nreconnect_backoff_max_ms = 500\n\
                 request_timeout_ms = 5000"
            ),
        );
        let node = spawn("run", &config, &dir.join("node.log"));
        wait_healthy(mport);
        let seq = SeqSource {
            total_events: total,
            batch_size: 100,
        };
        let agent = FlumeAgent::start(Dist::Flume, &avro_sink_agent(seq, push_port, 100, false));
        let mut recovered = 0;
        for k in 1..=kills {
            agent.wait_drained(total * k / (kills + 1), Duration::from_secs(90));
            let before = agent.counters();
            kill9(sink);
            let waited = wait_refused(&agent, before.get(SINK_COUNTERS, "ConnectionFailedCount"));
            sink = spawn("sink", &sink_config, &sink_log);
            wait_healthy(sink_mport);
            let r = metric(sink_mport, "weir_sink_events_recovered_total").unwrap_or(0);
            recovered += r;
            println!(
                "kill {k}: sink SIGKILLed after it had OK'd {} events; the agent was refused \
                 {:.1} s later; the restarted sink recovered {r} unacked events",
                before.get(SINK_COUNTERS, "EventDrainSuccessCount"),
                waited.as_secs_f64()
            );
        }
        let duplicates = every_event_delivered(&out, total, "agent -> pull sink -> flume_pull");
        // Per kill: the agent's call in flight (100) and the node's batch whose ack the sink
        // had not logged (at most 1000) can come again.
        assert!(
            duplicates <= kills * (100 + 1000),
            "{duplicates} duplicates from {kills} kills"
        );
        let c = agent.counters();
        assert_eq!(
            c.get(SINK_COUNTERS, "EventDrainSuccessCount"),
            total,
            "{c:?}"
        );
        wait_until("the sink's queue empty", Duration::from_secs(30), || {
            metric(sink_mport, "weir_sink_events_queued") == Some(0)
        });
        let failures = metric(mport, "weir_flume_pull_connection_failures_total").unwrap_or(0);
        assert!(
            failures >= kills,
            "the node's receiver lost its sink {failures} times"
        );
        drop(node);
        drop(sink);
        println!(
            "Flume 1.11 -> receiver-node sink -> flume_pull: {total} events, {duplicates} \
             duplicates, {kills} sink kills ({recovered} events recovered from the sink's log, \
             {failures} receiver connection failures), {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
}
