//! `receiver-node` against real Apache Kafka 4.1 brokers in KRaft mode (issue 14), started from
//! the jars `interop/fetch kafka` resolves (`weir_testkit::peers::kafka`): two nodes in one
//! consumer group, one SIGKILLed mid-stream, on the binary's shared single broker; and one node
//! consuming topic `in` and producing to topic `out` of a three-broker cluster while a leader of
//! its partitions (the group's coordinator or not) is SIGKILLed and restarted. The tests run
//! one at a time. Records are `m<i>` (key `k<i>`) for `i` in
//! `0..N`, produced with `acks=all`, so "nothing lost" is "every number is in the outputs".
//! Every test here is named `real_kafka::...`: `cargo test -- --skip real_` leaves them out,
//! `cargo test -- real_` runs only them.

mod real_kafka {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs::{self};
    use std::path::{Path, PathBuf};

    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;
    use weir_testkit::peers::kafka::{self, create_topic, read_all, KafkaCluster};
    use weir_testkit::peers::log_lines;
    use weir_testkit::{
        free_port, http_get, metric, send_frames, wait_healthy, wait_until, Node, Scratch,
    };

    /// One test at a time: a failover's timings mean little when the other test's brokers and
    /// nodes share the 2 cores.
    fn one_at_a_time() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A name no other test of this binary uses.
    fn unique(prefix: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, SeqCst))
    }

    /// `receiver-node run --config <config>`, its output appended to `log`.
    fn spawn(config: &Path, log: &Path) -> Node {
        Node::start("run", config, Some(log))
    }

    /// The partitions a node's Kafka receiver is assigned, as its `weir_kafka_lag` series tell
    /// (refreshed every 5 s), or `None` if `/metrics` does not answer.
    fn assigned(mport: u16) -> Option<BTreeSet<i32>> {
        let (_, body) = http_get(mport, "/metrics")?;
        Some(
            body.lines()
                .filter(|l| l.starts_with("weir_kafka_lag{"))
                .filter_map(|l| {
                    l.split("partition=\"")
                        .nth(1)?
                        .split('"')
                        .next()?
                        .parse()
                        .ok()
                })
                .collect(),
        )
    }

    /// The consumer-group part of a node's configuration: the reliable consumer of `topic`,
    /// committing every 100 ms. With `fast_session`, a dead member is noticed after 6 s (the
    /// broker's minimum) instead of librdkafka's 45 s.
    fn group_receiver(bs: &str, group: &str, topic: &str, fast_session: bool) -> String {
        let mut r = format!(
            "[[receiver]]\nname = \"events\"\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\n\
             group_id = \"{group}\"\ntopics = [\"{topic}\"]\ncommit_interval_ms = 100\n"
        );
        if fast_session {
            r.push_str(
                "[receiver.properties]\n\"session.timeout.ms\" = \"6000\"\n\
                 \"heartbeat.interval.ms\" = \"500\"\n",
            );
        }
        r
    }

    /// Writes `dir/<name>.toml`: data in `dir/<name>-data`, batches every `batch_ms` of 20 ms
    /// blocks, the `receiver` and `outputs` tables, a `jsonl` dir output in `dir/<name>-out`
    /// and metrics on a free port. Returns the file, the dir output and the port.
    fn node_config(
        dir: &Path,
        name: &str,
        batch_ms: u64,
        receiver: &str,
        outputs: &str,
    ) -> (PathBuf, PathBuf, u16) {
        let mport = free_port();
        let out = dir.join(format!("{name}-out"));
        let config = dir.join(format!("{name}.toml"));
        fs::write(
            &config,
            format!(
                "data_dir = {:?}\n\
                 [engine]\nbatch_interval_ms = {batch_ms}\nblock_interval_ms = 20\n\
                 {receiver}\
                 [[output]]\ntype = \"dir\"\npath = {:?}\nformat = \"jsonl\"\n\
                 {outputs}\
                 [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
                dir.join(format!("{name}-data")).display().to_string(),
                out.display().to_string()
            ),
        )
        .unwrap();
        (config, out, mport)
    }

    /// One record of a batch file: its number and where it came from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Seen {
        n: u64,
        partition: i32,
        offset: i64,
    }

    /// Every record in the `jsonl` batch files of `out` (none if it does not exist yet).
    fn batch_records(out: &Path) -> Vec<Seen> {
        let mut v = Vec::new();
        for e in fs::read_dir(out).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("batch-") && name.ends_with(".jsonl")) {
                continue;
            }
            for l in fs::read_to_string(e.path()).unwrap_or_default().lines() {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                let n = r["payload"]
                    .as_str()
                    .and_then(|p| p.strip_prefix('m')?.parse().ok())
                    .unwrap_or_else(|| panic!("a payload that is no m<i>: {r}"));
                v.push(Seen {
                    n,
                    partition: r["position"]["partition"].as_i64().unwrap() as i32,
                    offset: r["position"]["offset"].as_i64().unwrap(),
                });
            }
        }
        v
    }

    /// Record number -> how many times it is in `records`.
    fn counts(records: impl IntoIterator<Item = u64>) -> BTreeMap<u64, u32> {
        let mut m = BTreeMap::new();
        for n in records {
            *m.entry(n).or_insert(0) += 1;
        }
        m
    }

    /// Panics naming what is missing from `seen` (record numbers) of `0..total`, or what was
    /// never produced; returns the number of duplicates.
    fn complete(seen: &BTreeMap<u64, u32>, total: u64, what: &str) -> u64 {
        let missing: Vec<u64> = (0..total).filter(|n| !seen.contains_key(n)).collect();
        assert!(
            missing.is_empty(),
            "{what}: {} of {total} records lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        let extra: Vec<&u64> = seen.keys().filter(|n| **n >= total).take(10).collect();
        assert!(extra.is_empty(), "{what}: never produced: {extra:?}");
        seen.values().map(|c| u64::from(*c)).sum::<u64>() - total
    }

    /// Produces `m<i>` (key `k<i>`, `acks=all`, idempotent, librdkafka's default retries) with
    /// one producer, in chunks of `chunk` records with `pause` between them, on a thread of its
    /// own until stopped. A chunk counts once every record of it was acknowledged: then exactly
    /// `0..acked()` are in the topic (a failed delivery panics the thread, and `stop` with it).
    struct Feeder {
        stop: Arc<AtomicBool>,
        acked: Arc<AtomicU64>,
        slowest_ms: Arc<AtomicU64>,
        thread: Option<JoinHandle<()>>,
    }

    impl Feeder {
        fn start(bs: &str, topic: &str, chunk: u64, pause: Duration) -> Feeder {
            let (stop, acked, slowest_ms) = (Arc::default(), Arc::default(), Arc::default());
            let thread = {
                let (stop, acked, slowest): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) = (
                    Arc::clone(&stop),
                    Arc::clone(&acked),
                    Arc::clone(&slowest_ms),
                );
                let topic = topic.to_string();
                let p = kafka::TestProducer::new(bs);
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(SeqCst) {
                        let t = Instant::now();
                        p.produce(&topic, n, n + chunk);
                        slowest.fetch_max(t.elapsed().as_millis() as u64, SeqCst);
                        n += chunk;
                        acked.store(n, SeqCst);
                        std::thread::sleep(pause);
                    }
                })
            };
            Feeder {
                stop,
                acked,
                slowest_ms,
                thread: Some(thread),
            }
        }

        /// Records acknowledged so far: `0..acked()`.
        fn acked(&self) -> u64 {
            self.acked.load(SeqCst)
        }

        /// Stops after the chunk in flight; the records acknowledged and the slowest chunk.
        fn stop(mut self) -> (u64, Duration) {
            self.stop.store(true, SeqCst);
            if let Err(e) = self.thread.take().unwrap().join() {
                std::panic::resume_unwind(e);
            }
            (
                self.acked(),
                Duration::from_millis(self.slowest_ms.load(SeqCst)),
            )
        }
    }

    impl Drop for Feeder {
        fn drop(&mut self) {
            self.stop.store(true, SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The end (high watermark) of each of `topic`'s `n` partitions.
    fn ends(bs: &str, topic: &str, n: i32) -> Vec<i64> {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bs)
            .create()
            .unwrap();
        (0..n)
            .map(|p| {
                probe
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .collect()
    }

    /// Lines of `log` from line `from` on that contain `needle`.
    fn log_since(log: &Path, from: usize, needle: &str) -> Vec<String> {
        log_lines(log)
            .into_iter()
            .skip(from)
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Two `receiver-node` processes in one consumer group read a 4-partition topic of the
    /// shared broker, each into its own `dir` output, while a producer keeps writing. The
    /// receiver subscribes with `partition.assignment.strategy = cooperative-sticky`
    /// (connectors/kafka/src/lib.rs), so the group settles on two partitions per node by
    /// cooperative rebalance. Node A is then SIGKILLed mid-stream: once the broker has given up
    /// on it (session timeout, 6 s), B must be assigned A's partitions incrementally, without
    /// giving up its own (nothing revoked in its log), read them from the group's committed
    /// offsets, and catch up with the producer (its output reaches every partition's end).
    ///
    /// A commits an offset once its record is in A's WAL, which is not yet a batch file (the
    /// nodes cut 1 s batches, the node's default): the records A had made durable and committed
    /// but not yet written out are, at that point, in A's WAL only. They are counted, then A is
    /// restarted on its data directory (it recovers them into its output and rejoins the group,
    /// taking two partitions back). At the end every produced record must be in the union of
    /// the two outputs, and the group's committed offsets at the end of every partition.
    /// Duplicates are allowed (at-least-once across the kill: what A had durable but not
    /// committed is read again by B) and counted; each must be the same Kafka record (partition
    /// and offset) on one of A's partitions.
    #[test]
    fn a_killed_nodes_partitions_are_taken_over_by_the_other_node_of_its_group_without_loss() {
        let _serial = one_at_a_time();
        let t0 = Instant::now();
        let broker = kafka::shared();
        let (bs, _logs) = (broker.bootstrap(), broker.logs_on_failure());
        let topic = unique("takeover");
        create_topic(&bs, &topic, 4, 1, &[]);
        let scratch = Scratch::new("real-kafka-takeover");
        let dir = scratch.path();
        let receiver = group_receiver(&bs, &format!("{topic}-g"), &topic, true);
        let (a_config, a_out, a_port) = node_config(dir, "a", 1000, &receiver, "");
        let (b_config, b_out, b_port) = node_config(dir, "b", 1000, &receiver, "");
        let (a_log, b_log) = (dir.join("a.log"), dir.join("b.log"));
        let a = spawn(&a_config, &a_log);
        let b = spawn(&b_config, &b_log);
        wait_healthy(a_port);
        wait_healthy(b_port);
        let feeder = Feeder::start(&bs, &topic, 100, Duration::from_millis(20));

        // The group settles: two partitions each.
        wait_until(
            "each node assigned two partitions",
            Duration::from_secs(60),
            || match (assigned(a_port), assigned(b_port)) {
                (Some(pa), Some(pb)) => pa.len() == 2 && pb.len() == 2 && pa.is_disjoint(&pb),
                _ => false,
            },
        );
        let a_parts = assigned(a_port).unwrap();
        let settled = t0.elapsed();
        // Mid-stream: both nodes writing batches.
        std::thread::sleep(Duration::from_secs(2));
        let per_partition = |records: &[Seen]| {
            let mut m: BTreeMap<i32, usize> = BTreeMap::new();
            for r in records {
                *m.entry(r.partition).or_default() += 1;
            }
            m
        };
        let a_before = batch_records(&a_out);
        assert!(
            a_parts
                .iter()
                .all(|p| per_partition(&a_before).contains_key(p)),
            "A wrote nothing from its partitions {a_parts:?} before the kill"
        );
        // Kill A while it holds records it has not written to its batch files yet.
        let mut a_stored = 0;
        wait_until(
            "A holding records not in its batch files",
            Duration::from_secs(10),
            || {
                let received = metric(a_port, "weir_receiver_records_received_total");
                a_stored = metric(a_port, "weir_receiver_records_stored_total").unwrap_or(0);
                received.unwrap_or(0) > batch_records(&a_out).len() as u64
            },
        );
        drop(a); // SIGKILL, reaped
        let a_unwritten = a_stored.saturating_sub(batch_records(&a_out).len() as u64);
        let b_before = per_partition(&batch_records(&b_out));
        let b_log_at_kill = log_lines(&b_log).len();
        let acked_at_kill = feeder.acked();
        let killed = Instant::now();

        // B takes over A's partitions: records of them in its batch files.
        wait_until(
            "B writing records of A's partitions",
            Duration::from_secs(60),
            || {
                let now = per_partition(&batch_records(&b_out));
                a_parts.iter().all(|p| {
                    now.get(p).copied().unwrap_or(0) > b_before.get(p).copied().unwrap_or(0)
                })
            },
        );
        let takeover = killed.elapsed();
        wait_until(
            "B assigned all 4 partitions in /metrics",
            Duration::from_secs(30),
            || assigned(b_port).is_some_and(|p| p.len() == 4),
        );
        // Cooperative: B was given A's partitions without giving up its own.
        let revoked = log_since(&b_log, b_log_at_kill, "partitions revoked");
        assert!(
            revoked.is_empty(),
            "B gave up partitions when A died: {revoked:?}"
        );
        let newly = log_since(&b_log, b_log_at_kill, "partition assigned");
        for p in &a_parts {
            assert!(
                newly.iter().any(|l| l.contains(&format!("partition={p} "))),
                "B's log shows no assignment of partition {p}: {newly:?}"
            );
        }
        // Keep producing into B alone for a while.
        std::thread::sleep(Duration::from_secs(2));
        let (total, slowest) = feeder.stop();

        // B reaches the end of every partition.
        let ends = ends(&bs, &topic, 4);
        assert_eq!(
            ends.iter().sum::<i64>() as u64,
            total,
            "the topic holds other than the {total} records produced"
        );
        wait_until(
            "B's output at the end of every partition",
            Duration::from_secs(60),
            || {
                let mut last: BTreeMap<i32, i64> = BTreeMap::new();
                for r in batch_records(&b_out) {
                    let e = last.entry(r.partition).or_insert(r.offset);
                    *e = (*e).max(r.offset);
                }
                (0..4)
                    .all(|p| ends[p as usize] == 0 || last.get(&p) == Some(&(ends[p as usize] - 1)))
            },
        );
        let caught_up = killed.elapsed();
        let union = || {
            let mut v = batch_records(&a_out);
            v.extend(batch_records(&b_out));
            v
        };
        let only_in_a_wal = total - counts(union().iter().map(|r| r.n)).len() as u64;

        // A, restarted on its data, writes what only its WAL had.
        let a = spawn(&a_config, &a_log);
        wait_healthy(a_port);
        let restarted = Instant::now();
        wait_until(
            "every record in the union of the outputs",
            Duration::from_secs(60),
            || counts(union().iter().map(|r| r.n)).len() as u64 >= total,
        );
        let drained = restarted.elapsed();
        let all = union();
        let duplicates = complete(&counts(all.iter().map(|r| r.n)), total, "A ∪ B");
        // Every copy of a record is the same Kafka record, redelivered on one of A's partitions.
        let mut by_n: BTreeMap<u64, BTreeSet<(i32, i64)>> = BTreeMap::new();
        for r in &all {
            by_n.entry(r.n).or_default().insert((r.partition, r.offset));
        }
        for (n, at) in &by_n {
            assert_eq!(at.len(), 1, "m{n} at several positions: {at:?}");
        }
        let dup_partitions: BTreeSet<i32> = counts(all.iter().map(|r| r.n))
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, _)| by_n[n].first().unwrap().0)
            .collect();
        assert!(
            dup_partitions.is_subset(&a_parts),
            "duplicates on partitions {dup_partitions:?}, A had {a_parts:?}"
        );
        // Everything is committed: the group's offsets reach the end of every partition.
        wait_until(
            "the group's offsets at the end of the topic",
            Duration::from_secs(30),
            || {
                kafka::committed_offsets(&bs, &format!("{topic}-g"), &topic, 4)
                    == Some(ends.iter().copied().map(Some).collect())
            },
        );
        wait_healthy(a_port);
        wait_healthy(b_port);
        let rebalances = metric(b_port, "weir_kafka_rebalances_total").unwrap_or(0);
        drop((a, b));
        println!(
            "two nodes, one group, 4 partitions (cooperative-sticky): {total} records \
             ({acked_at_kill} before the kill), {duplicates} duplicates (on partitions \
             {dup_partitions:?}; A had {a_parts:?}); group settled {:.1} s after the start; \
             A SIGKILLed holding about {a_unwritten} durable records not in its batch files; \
             B wrote A's partitions {:.1} s later and reached the end of every \
             partition after {:.1} s ({rebalances} rebalance callbacks in B); {only_in_a_wal} \
             records were in A's WAL only, written {:.1} s after A's restart; slowest produced \
             chunk {} ms; {:.1} s",
            settled.as_secs_f64(),
            takeover.as_secs_f64(),
            caught_up.as_secs_f64(),
            drained.as_secs_f64(),
            slowest.as_millis(),
            t0.elapsed().as_secs_f64()
        );
    }

    /// Kafka's group coordinator for `group`: the leader of partition
    /// `abs(group.hashCode()) % 4` of `__consumer_offsets` (4 partitions in these clusters),
    /// or `None` before the topic exists.
    fn coordinator(probe: &BaseConsumer, group: &str) -> Option<i32> {
        let hash = group
            .encode_utf16()
            .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)));
        let partition = if hash == i32::MIN { 0 } else { hash.abs() } % 4;
        let md = probe
            .fetch_metadata(Some("__consumer_offsets"), Duration::from_secs(5))
            .ok()?;
        let t = md.topics().first()?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        (p.leader() >= 0).then_some(p.leader())
    }

    /// The leader of every partition of `topics`, `(topic, partition) -> broker` (-1: none),
    /// or `None` if the metadata did not come.
    fn leaders(probe: &BaseConsumer, topics: &[&str]) -> Option<BTreeMap<(String, i32), i32>> {
        let mut m = BTreeMap::new();
        for t in topics {
            let md = probe.fetch_metadata(Some(t), Duration::from_secs(5)).ok()?;
            for p in md.topics().first()?.partitions() {
                m.insert((t.to_string(), p.id()), p.leader());
            }
        }
        Some(m)
    }

    /// A node consumes topic `in` of a three-broker cluster (replication factor 3,
    /// `min.insync.replicas` 2) with the reliable consumer and writes every batch to topic `out`
    /// (the Kafka output: idempotent, `acks=all`) and to a `dir` output, while a producer keeps
    /// writing to `in`. Mid-stream a broker that leads a partition of `in` and one of `out`
    /// (from the metadata) is SIGKILLed, not the group's coordinator; production goes on; the
    /// brokers elect new leaders; the broker is then restarted on its data. The node is never
    /// restarted: the same process must carry on through both, still healthy at the end.
    /// Nothing acknowledged is lost: every record produced to `in` must end up in `out` (read
    /// from the cluster) and in the batch files, and the group's committed offsets at the end
    /// of `in`; duplicates are allowed (a batch retried after a failed delivery is produced
    /// again) and counted. The consumer keeps librdkafka's session timeout (45 s). With 6 s it
    /// sometimes lost its session here: its heartbeat waited (same coordinator connection)
    /// behind an offset commit that waited for the dead broker's replica of
    /// `__consumer_offsets`, about 5 s; librdkafka then revoked everything as lost and rejoined,
    /// and the rejoin waited out the old member's 6 s: about 12 s without consuming.
    #[test]
    fn a_node_carries_on_through_a_partition_leaders_kill_and_restart_without_loss() {
        leader_killed_and_restarted(false);
    }

    /// As above, but the broker killed also is the consumer group's coordinator (the leader of
    /// the group's `__consumer_offsets` partition): the node's consumer must find the new
    /// coordinator and go on, losing nothing.
    #[test]
    fn a_node_carries_on_when_the_killed_leader_is_also_its_group_coordinator() {
        leader_killed_and_restarted(true);
    }

    fn leader_killed_and_restarted(kill_coordinator: bool) {
        let _serial = one_at_a_time();
        let t0 = Instant::now();
        let mut cluster = KafkaCluster::start(3);
        let _logs = cluster.logs_on_failure();
        let bs = cluster.bootstrap();
        let started = t0.elapsed();
        create_topic(&bs, "in", 3, 3, &[]);
        create_topic(&bs, "out", 3, 3, &[]);
        let scratch = Scratch::new(if kill_coordinator {
            "real-kafka-coordinator"
        } else {
            "real-kafka-leader"
        });
        let dir = scratch.path();
        let group = "weir-leader-kill";
        let (config, dir_out, mport) = node_config(
            dir,
            "node",
            200,
            &group_receiver(&bs, group, "in", false),
            &format!(
                "[[output]]\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\ntopic = \"out\"\n"
            ),
        );
        let node_log = dir.join("node.log");
        let mut node = spawn(&config, &node_log);
        wait_healthy(mport);
        let feeder = Feeder::start(&bs, "in", 100, Duration::from_millis(30));
        let consumed = || metric(mport, "weir_kafka_records_total").unwrap_or(0);
        let delivered = || metric(mport, "weir_kafka_output_records_delivered_total").unwrap_or(0);
        wait_until(
            "5000 records through the node",
            Duration::from_secs(60),
            || delivered() >= 5000,
        );

        // The victim: a broker leading a partition of `in` and one of `out` (with 3 partitions
        // each on 3 brokers every broker leads one of each), the coordinator or not.
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bs)
            .create()
            .unwrap();
        let before = leaders(&probe, &["in", "out"]).expect("metadata");
        let coord = coordinator(&probe, group).expect("the group's coordinator");
        let leads_both = |id: i32| {
            ["in", "out"]
                .iter()
                .all(|t| before.iter().any(|((topic, _), l)| topic == t && *l == id))
        };
        let victim = cluster
            .broker_ids()
            .into_iter()
            .find(|id| (*id == coord) == kill_coordinator && leads_both(*id))
            .unwrap_or_else(|| {
                panic!("no broker to kill: leaders {before:?}, coordinator {coord}")
            });
        let led: Vec<String> = before
            .iter()
            .filter(|(_, l)| **l == victim)
            .map(|((t, p), _)| format!("{t}-{p}"))
            .collect();
        // Mid-stream: records acknowledged to `in` that `out` does not have yet.
        wait_until(
            "the node behind the producer",
            Duration::from_secs(10),
            || delivered() < feeder.acked(),
        );
        let (acked_at_kill, consumed_at_kill, delivered_at_kill) =
            (feeder.acked(), consumed(), delivered());
        cluster.kill(victim);
        let killed = Instant::now();

        // New leaders. Then the producer gets its first chunk after the kill acknowledged, and
        // the node consumes and delivers through it; the longest stalls of each are measured.
        wait_until("new leaders", Duration::from_secs(60), || {
            leaders(&probe, &["in", "out"])
                .is_some_and(|m| m.values().all(|l| *l >= 0 && *l != victim))
        });
        let elected = killed.elapsed();
        let after = leaders(&probe, &["in", "out"]).expect("metadata");
        let (mut produced_back, mut consumed_back, mut delivered_back) = (None, None, None);
        let mut first_ack_after = u64::MAX;
        let (mut last_c, mut last_d) = (consumed_at_kill, delivered_at_kill);
        let (mut since_c, mut since_d) = (killed, killed);
        let (mut stall_c, mut stall_d) = (Duration::ZERO, Duration::ZERO);
        while delivered_back.is_none() || killed.elapsed() < Duration::from_secs(12) {
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "the node did not recover from the loss of broker {victim}: it consumed \
                 {last_c} and delivered {last_d} records; {} acknowledged to `in` \
                 ({acked_at_kill} at the kill); /health {:?}",
                feeder.acked(),
                http_get(mport, "/health")
            );
            let (c, d) = (consumed(), delivered());
            if c != last_c {
                stall_c = stall_c.max(since_c.elapsed());
                (last_c, since_c) = (c, Instant::now());
            }
            if d != last_d {
                stall_d = stall_d.max(since_d.elapsed());
                (last_d, since_d) = (d, Instant::now());
            }
            let acked = feeder.acked();
            if produced_back.is_none() && acked > acked_at_kill {
                produced_back = Some(killed.elapsed());
                first_ack_after = acked;
            }
            if consumed_back.is_none() && c >= first_ack_after {
                consumed_back = Some(killed.elapsed());
            }
            if consumed_back.is_some() && delivered_back.is_none() && d >= first_ack_after {
                delivered_back = Some(killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            node.0.try_wait().unwrap().is_none(),
            "the node exited while broker {victim} was down"
        );

        // The broker comes back on its data; production goes on a little longer.
        let restart = Instant::now();
        cluster.restart(victim);
        let restarted = restart.elapsed();
        std::thread::sleep(Duration::from_secs(3));
        let (total, slowest) = feeder.stop();

        // Every acknowledged record of `in` reaches `out` and the batch files.
        wait_until(
            "the node's output to deliver every record",
            Duration::from_secs(60),
            || delivered() >= total,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = read_all(&bs, "out", false);
            let mut seen = BTreeMap::new();
            for (payload, c) in &out {
                let p = String::from_utf8_lossy(payload);
                let n: u64 = p
                    .strip_prefix('m')
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("a record in `out` that is no m<i>: {p:?}"));
                seen.insert(n, *c);
            }
            if seen.len() as u64 >= total || Instant::now() > deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        let out_duplicates = complete(&out, total, "topic `out`");
        let in_files = counts(batch_records(&dir_out).iter().map(|r| r.n));
        let file_duplicates = complete(&in_files, total, "the dir output");
        // Everything consumed is committed: the group's offsets reach the end of `in`.
        let in_ends = ends(&bs, "in", 3);
        assert_eq!(in_ends.iter().sum::<i64>() as u64, total);
        wait_until(
            "the group's offsets at the end of `in`",
            Duration::from_secs(30),
            || {
                kafka::committed_offsets(&bs, group, "in", 3)
                    == Some(in_ends.iter().copied().map(Some).collect())
            },
        );

        // The same process, healthy, its receiver running.
        assert!(
            node.0.try_wait().unwrap().is_none(),
            "the node exited during the test"
        );
        wait_healthy(mport);
        assert_eq!(metric(mport, "weir_receiver_running"), Some(1));
        let m = |name| metric(mport, name).unwrap_or(0);
        println!(
            "three brokers (started in {:.1} s), topics `in` and `out` with 3 partitions, RF 3: \
             leaders {before:?}, group coordinator {coord}; broker {victim} (leading {led:?}) \
             SIGKILLed with {acked_at_kill} records in `in` ({consumed_at_kill} consumed, \
             {delivered_at_kill} delivered); new leaders {after:?} after {:.1} s; the \
             producer's first chunk after the kill acknowledged after {:.1} s (records up to \
             {first_ack_after}), the node had consumed them after {:.1} s and delivered them to \
             `out` after {:.1} s (its longest stalls: consuming {:.1} s, delivering {:.1} s); \
             broker {victim} restarted in {:.1} s; {total} records produced (slowest chunk {} \
             ms), {out_duplicates} duplicates in `out`, \
             {file_duplicates} in the batch files; node: {} output batches failed, {} producer \
             rebuilds, {} commits failed, {} receiver restarts, {} receiver errors; {:.1} s",
            started.as_secs_f64(),
            elected.as_secs_f64(),
            produced_back.unwrap().as_secs_f64(),
            consumed_back.unwrap().as_secs_f64(),
            delivered_back.unwrap().as_secs_f64(),
            stall_c.as_secs_f64(),
            stall_d.as_secs_f64(),
            restarted.as_secs_f64(),
            slowest.as_millis(),
            m("weir_kafka_output_batches_failed_total"),
            m("weir_kafka_output_producer_rebuilds_total"),
            m("weir_kafka_commit_failures_total"),
            m("weir_receiver_restarts_total"),
            m("weir_receiver_errors_total"),
            t0.elapsed().as_secs_f64()
        );
        let _ = node.0.kill();
    }

    /// `commit = "after_batch"`: Kafka is the replica, the WAL a cache. See
    /// [`a_lost_disk_loses_nothing`].
    #[test]
    fn with_commit_after_batch_a_node_whose_disk_is_lost_loses_nothing() {
        a_lost_disk_loses_nothing("lose-disk", |bs, group, topic| {
            let r = group_receiver(bs, group, topic, true).replacen(
                "commit_interval_ms = 100\n",
                "commit_interval_ms = 100\ncommit = \"after_batch\"\n",
                1,
            );
            assert!(r.contains("after_batch"), "{r}");
            r
        });
    }

    /// Direct mode keeps nothing in the WAL and commits each completed batch's ranges: a node
    /// on a new machine resumes from the group's committed offsets. See
    /// [`a_lost_disk_loses_nothing`].
    #[test]
    fn in_direct_mode_a_node_on_a_new_machine_resumes_from_the_committed_offsets() {
        a_lost_disk_loses_nothing("lose-disk-direct", |bs, group, topic| {
            format!(
                "[[receiver]]\nname = \"events\"\ntype = \"kafka\"\nmode = \"direct\"\n\
                 bootstrap_servers = \"{bs}\"\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n"
            )
        });
    }

    /// Node A (the `receiver` table that `receiver(bootstrap, group, topic)` writes) reads a
    /// 3-partition topic of the shared broker (2 s batches, a `dir` output) while a producer
    /// writes. Once A's output holds 2,000 records (and, in group mode, 1,000 more are durable
    /// in its WAL only), A is SIGKILLed and its data directory deleted: the machine is lost.
    /// The group's committed offsets must then cover no more than A's output. Node B, a new data
    /// directory and the same `group_id`, reads on from them: every produced record must be in
    /// A's output or B's, and the duplicates are exactly the records of A's output beyond the
    /// committed offsets (which B reads again).
    fn a_lost_disk_loses_nothing(name: &str, receiver: impl Fn(&str, &str, &str) -> String) {
        let _serial = one_at_a_time();
        let broker = kafka::shared();
        let (bs, _logs) = (broker.bootstrap(), broker.logs_on_failure());
        let topic = unique(name);
        let group = format!("{topic}-g");
        create_topic(&bs, &topic, 3, 1, &[]);
        let scratch = Scratch::new(&format!("real-kafka-{name}"));
        let dir = scratch.path();
        let receiver = receiver(&bs, &group, &topic);
        let direct = receiver.contains("direct");
        let (a_config, a_out, a_port) = node_config(dir, "a", 2000, &receiver, "");
        let (b_config, b_out, b_port) = node_config(dir, "b", 500, &receiver, "");
        let a = spawn(&a_config, &dir.join("a.log"));
        wait_healthy(a_port);
        let feeder = Feeder::start(&bs, &topic, 200, Duration::from_millis(20));

        let mut at_kill = (0, 0);
        wait_until(
            "node A with records in its output (and more durable only in its WAL)",
            Duration::from_secs(60),
            || {
                let out = batch_records(&a_out).len() as u64;
                let stored = metric(a_port, "weir_receiver_records_stored_total").unwrap_or(0);
                at_kill = (out, stored);
                out >= 2000 && (direct || stored >= out + 1000)
            },
        );
        drop(a); // SIGKILL
        fs::remove_dir_all(dir.join("a-data")).unwrap();
        let a_seen = batch_records(&a_out);
        let committed: u64 = kafka::committed_offsets(&bs, &group, &topic, 3)
            .expect("the group coordinator answers")
            .into_iter()
            .map(|o| o.unwrap_or(0) as u64)
            .sum();
        assert!(
            committed <= a_seen.len() as u64,
            "the group committed {committed} records but A's output holds only {} (at the kill \
             {} in the output, {} stored)",
            a_seen.len(),
            at_kill.0,
            at_kill.1
        );

        // A new machine: a new data directory, the same group.
        let b = spawn(&b_config, &dir.join("b.log"));
        wait_healthy(b_port);
        std::thread::sleep(Duration::from_secs(2));
        let (total, _) = feeder.stop();
        wait_until(
            "every produced record in A's or B's output",
            Duration::from_secs(90),
            || {
                let n: BTreeSet<u64> = a_seen
                    .iter()
                    .chain(batch_records(&b_out).iter())
                    .map(|s| s.n)
                    .collect();
                n.len() as u64 >= total
            },
        );
        let b_seen = batch_records(&b_out);
        let seen = counts(a_seen.iter().chain(b_seen.iter()).map(|s| s.n));
        let duplicates = complete(&seen, total, name);
        assert_eq!(
            duplicates,
            a_seen.len() as u64 - committed,
            "duplicates other than A's output beyond the committed offsets"
        );
        eprintln!(
            "{name}: {total} records, {} in A's output ({} stored at the kill, {committed} \
             committed), {} in B's, {duplicates} duplicates",
            a_seen.len(),
            at_kill.1,
            b_seen.len()
        );
        drop(b);
    }

    /// `exactly_once = true`: node A produces batches to the topic in transactions, but a
    /// second output (a `dir` whose path is a file) keeps them from completing; A is SIGKILLed
    /// and restarted on its data directory, so its batches run again. A `read_committed`
    /// consumer must see every record exactly once, the re-runs must be skipped (the batches
    /// topic shows them committed), and records over `message.max.bytes` go to the dead-letter
    /// directory with the reason while the rest of their batch is produced.
    #[test]
    fn an_exactly_once_output_produces_each_record_once_across_a_kill_and_rerun() {
        let _serial = one_at_a_time();
        let broker = kafka::shared();
        let (bs, _logs) = (broker.bootstrap(), broker.logs_on_failure());
        let topic = unique("eos-out");
        create_topic(&bs, &topic, 3, 1, &[]);
        let scratch = Scratch::new("real-kafka-eos");
        let dir = scratch.path();
        let blocker = dir.join("blocked");
        fs::write(&blocker, "a file where a directory should be").unwrap();
        let dead = dir.join("dead");
        let port = free_port();
        let mport = free_port();
        let config = dir.join("a.toml");
        fs::write(
            &config,
            format!(
                "data_dir = {:?}\nnode_id = \"eos-a\"\n\
                 [engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\njob_retry_max_ms = 500\n\
                 [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\n\
                 address = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
                 [[output]]\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\ntopic = \"{topic}\"\n\
                 exactly_once = true\ndead_letter = {{ type = \"dir\", path = {:?} }}\n\
                 [output.properties]\n\"message.max.bytes\" = \"10000\"\n\
                 [[output]]\ntype = \"dir\"\npath = {:?}\n\
                 [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
                dir.join("a-data").display().to_string(),
                dead.display().to_string(),
                blocker.display().to_string()
            ),
        )
        .unwrap();
        let log = dir.join("a.log");
        let a = spawn(&config, &log);
        wait_healthy(mport);
        let small: Vec<Vec<u8>> = (0..1500).map(|i| format!("m{i}").into_bytes()).collect();
        let big: Vec<Vec<u8>> = (0..3).map(|i| vec![b'a' + i; 20_000]).collect();
        send_frames(port, &small[..700]);
        send_frames(port, &big);
        send_frames(port, &small[700..]);
        // Batches run one at a time: the first one with records is committed to Kafka and then
        // held by the failing directory, and every later batch waits behind it.
        wait_until(
            "a batch committed to the topic",
            Duration::from_secs(60),
            || !read_all(&bs, &topic, true).is_empty(),
        );
        drop(a); // SIGKILL: that batch is in Kafka, not complete
        fs::remove_file(&blocker).unwrap();
        let a = spawn(&config, &log);
        wait_healthy(mport);
        wait_until("every record committed", Duration::from_secs(60), || {
            read_all(&bs, &topic, true).len() >= 1500
        });
        // The batch records: this node's key, increasing times, one per non-empty batch.
        let mut times = Vec::new();
        kafka::read_each(&bs, &format!("{topic}.weir-batches"), true, |m| {
            use rdkafka::Message;
            assert_eq!(m.key(), Some(format!("{topic}/eos-a").as_bytes()));
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            times.push(v["batch_time"].as_u64().unwrap());
        });
        assert!(
            !times.is_empty() && times.windows(2).all(|w| w[0] < w[1]),
            "{times:?}"
        );
        // Every one of those batches ran again and completed: the second output (now a
        // directory) has a file for each.
        wait_until(
            "every batch run again and completed",
            Duration::from_secs(60),
            || fs::read_dir(&blocker).map_or(0, |d| d.count()) > times.len(),
        );
        assert!(
            metric(mport, "weir_output_batches_skipped_total{output=\"1\"}")
                .is_some_and(|n| n >= 1),
            "the batch committed before the kill was not skipped"
        );
        let committed = read_all(&bs, &topic, true);
        for p in &small {
            assert_eq!(committed.get(p), Some(&1), "{}", String::from_utf8_lossy(p));
        }
        assert_eq!(
            committed.len(),
            1500,
            "records nobody sent, or the big ones"
        );
        let lines: Vec<serde_json::Value> = fs::read_dir(&dead)
            .unwrap()
            .flatten()
            .flat_map(|e| {
                fs::read_to_string(e.path())
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        for l in &lines {
            assert!(
                l["reason"].as_str().unwrap().contains("message.max.bytes"),
                "{l}"
            );
            assert_eq!(l["record"]["payload"].as_str().unwrap().len(), 20_000);
        }
        let text = fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("batch already at the destination (a re-run): skipped"),
            "{text}"
        );
        drop(a);
    }

    /// `exactly_once = true` while the broker stops answering (SIGSTOP): records keep being
    /// acknowledged (they are in the WAL), the output fails and says so, and once the broker
    /// is back every record is committed exactly once. The same node's second output sends
    /// the records it cannot take (JSON parquet columns: a payload that is not JSON) to a
    /// dead-letter *topic*, each with a `weir.reason` header.
    #[test]
    fn an_exactly_once_output_waits_out_a_stopped_broker_and_dead_letters_go_to_a_topic() {
        use rdkafka::Message;
        let _serial = one_at_a_time();
        let broker = kafka::shared();
        let (bs, _logs) = (broker.bootstrap(), broker.logs_on_failure());
        let topic = unique("eos-pause");
        let dlq = unique("dead");
        create_topic(&bs, &topic, 2, 1, &[]);
        create_topic(&bs, &dlq, 1, 1, &[]);
        let scratch = Scratch::new("real-kafka-eos-pause");
        let dir = scratch.path();
        let port = free_port();
        let mport = free_port();
        let config = dir.join("a.toml");
        fs::write(
            &config,
            format!(
                "data_dir = {:?}\nnode_id = \"eos-p\"\n\
                 [engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\njob_retry_max_ms = 500\n\
                 [[receiver]]\nname = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\n\
                 address = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n\
                 [[output]]\ntype = \"kafka\"\nbootstrap_servers = \"{bs}\"\ntopic = \"{topic}\"\n\
                 exactly_once = true\ndelivery_timeout_ms = 5000\ntransaction_timeout_ms = 10000\n\
                 [[output]]\ntype = \"parquet\"\npath = {:?}\npayload = \"json\"\n\
                 dead_letter = {{ type = \"kafka\", bootstrap_servers = \"{bs}\", topic = \"{dlq}\" }}\n\
                 [output.columns]\nn = {{ pointer = \"/n\", type = \"int64\" }}\n\
                 [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
                dir.join("a-data").display().to_string(),
                dir.join("parquet").display().to_string(),
            ),
        )
        .unwrap();
        let log = dir.join("a.log");
        let a = spawn(&config, &log);
        wait_healthy(mport);
        let first: Vec<Vec<u8>> = (0..300)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        send_frames(port, &first);
        wait_until(
            "the first records committed",
            Duration::from_secs(60),
            || read_all(&bs, &topic, true).len() >= 300,
        );
        broker.pause();
        // Acknowledged while the broker is stopped: in the WAL, waiting for the output.
        let second: Vec<Vec<u8>> = (300..600)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .chain(["not json".as_bytes().to_vec()])
            .collect();
        send_frames(port, &second);
        wait_until("the output failing", Duration::from_secs(60), || {
            metric(mport, "weir_output_failing{output=\"1\"}") == Some(1)
        });
        broker.resume();
        // The node's own account first (reading the topics right after the resume can meet
        // the broker still settling its partitions).
        wait_until(
            "every record written by both outputs",
            Duration::from_secs(120),
            || {
                metric(mport, "weir_output_records_total{output=\"1\"}").is_some_and(|n| n >= 601)
                    && metric(mport, "weir_output_dead_letters_total{output=\"2\"}")
                        .is_some_and(|n| n >= 1)
            },
        );
        let committed = read_all(&bs, &topic, true);
        for p in first.iter().chain(&second) {
            assert_eq!(committed.get(p), Some(&1), "{}", String::from_utf8_lossy(p));
        }
        let mut dead = Vec::new();
        kafka::read_each(&bs, &dlq, false, |m| {
            use rdkafka::message::Headers;
            let reason = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "weir.reason"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string());
            dead.push((m.payload().unwrap_or_default().to_vec(), reason));
        });
        assert!(!dead.is_empty(), "no dead letter");
        for (payload, reason) in &dead {
            assert_eq!(payload, b"not json");
            assert!(
                reason.as_deref().is_some_and(|r| r.contains("JSON")),
                "{reason:?}"
            );
        }
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("batch step failed"), "{text}");
        drop(a);
    }
}
