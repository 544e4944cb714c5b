//! Who may connect to a real `receiver-node`'s listeners, and connection floods: a flood of
//! idle connections while a frames producer keeps being acknowledged (with the node's memory
//! measured), the listener counters on `/metrics`, `check-config` naming bad TLS files, and a
//! real Apache Flume 1.11 agent pushing over TLS into weir's Flume source.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_testkit::tls::TestPki;
use weir_testkit::{cargo_bin, free_port, metric, wait_healthy, wait_until, Node, Scratch};

/// A node with one `[[receiver]]` of `receiver`'s keys, 50 ms blocks, a `jsonl` output.
fn node_config(dir: &Path, mport: u16, receiver: &str) -> (PathBuf, PathBuf) {
    let out = dir.join("out");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n\
             [engine]\nbatch_interval_ms = 200\nblock_interval_ms = 20\n\
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

/// The resident set size of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn frames(payloads: impl Iterator<Item = String>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// Reads cumulative acknowledgements until `count`.
fn acked(s: &mut TcpStream, count: u64) -> std::io::Result<()> {
    let mut b = [0u8; 8];
    loop {
        s.read_exact(&mut b)?;
        if u64::from_be_bytes(b) >= count {
            return Ok(());
        }
    }
}

#[test]
fn a_flood_of_idle_connections_does_not_lock_producers_out_of_a_node() {
    let scratch = Scratch::new("listener-flood");
    let (port, mport) = (free_port(), free_port());
    let (config, _) = node_config(
        scratch.path(),
        mport,
        &format!(
            "name = \"frames\"\ntype = \"socket\"\nmode = \"listen\"\n\
             address = \"127.0.0.1:{port}\"\nprotocol = \"frames\"\n"
        ),
    );
    let node = Node::start("run", &config, Some(&scratch.path().join("node.log")));
    wait_healthy(mport);
    let pid = node.0.id();

    // A producer: 100 frames a round, each round waits for its acknowledgement.
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer = {
        let (stop, acked_total) = (stop.clone(), acked_total.clone());
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the producer connects");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (mut sent, mut longest, mut last) = (0u64, Duration::ZERO, Instant::now());
            while !stop.load(Relaxed) {
                s.write_all(&frames((sent..sent + 100).map(|i| format!("p{i}"))))
                    .expect("the producer sends");
                sent += 100;
                acked(&mut s, sent).expect("the producer is acknowledged");
                acked_total.store(sent, Relaxed);
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            (sent, longest)
        })
    };
    wait_until(
        "the producer is acknowledged",
        Duration::from_secs(30),
        || acked_total.load(Relaxed) > 0,
    );
    let (t, a) = (Instant::now(), acked_total.load(Relaxed));
    std::thread::sleep(Duration::from_millis(1000));
    let rate_before = (acked_total.load(Relaxed) - a) as f64 / t.elapsed().as_secs_f64();
    let rss_before = rss_kib(pid);

    // 500 connections that never send a byte, held open.
    let (t0, acked_before) = (Instant::now(), acked_total.load(Relaxed));
    let mut flood = Vec::new();
    for _ in 0..500 {
        flood.push(TcpStream::connect(("127.0.0.1", port)).expect("a flood connection"));
    }
    let evicted = || metric(mport, "weir_socket_connections_evicted_total").unwrap_or(0);
    wait_until("the flood is evicted", Duration::from_secs(30), || {
        evicted() >= 500 - 63
    });
    // A producer arriving now (the places are held by silent connections) is served.
    let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    late.write_all(&frames(std::iter::once("late".to_string())))
        .unwrap();
    acked(&mut late, 1).expect("the late producer is acknowledged");
    std::thread::sleep(Duration::from_millis(500));
    let flood_secs = t0.elapsed().as_secs_f64();
    let acked_during = acked_total.load(Relaxed) - acked_before;
    let rss_after = rss_kib(pid);
    let mut closed = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    stop.store(true, Relaxed);
    let (sent, longest) = producer.join().unwrap();
    let active = metric(mport, "weir_socket_connections_active").unwrap();
    let rejected = metric(mport, "weir_socket_connections_rejected_total").unwrap();
    println!(
        "node flood: {} idle connections opened, {} evicted ({closed} seen closed), {active} \
         active after; producer: {sent} records acknowledged in all, {:.0} records \
         acknowledged/s during the flood ({flood_secs:.1} s; {rate_before:.0}/s before it), longest wait for an \
         acknowledgement {longest:?}; node RSS {rss_before} KiB before the flood, {rss_after} \
         KiB after",
        flood.len(),
        evicted(),
        acked_during as f64 / flood_secs,
    );
    assert!(evicted() >= 437);
    assert!(closed >= 430, "{closed}");
    assert!(active <= 64, "{active}");
    assert_eq!(rejected, 0);
    assert!(acked_during > 0);
    assert!(longest < Duration::from_secs(3), "{longest:?}");
    assert!(
        rss_after < rss_before + 100 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    // Every counter of the gate is on /metrics.
    for name in [
        "weir_socket_connections_refused_not_allowed_total",
        "weir_socket_connections_refused_per_peer_total",
        "weir_socket_tls_handshake_failures_total",
        "weir_socket_first_bytes_timeouts_total",
    ] {
        assert_eq!(metric(mport, name), Some(0), "{name}");
    }
}

#[test]
fn check_config_names_what_is_wrong_with_tls_files_and_allow() {
    let scratch = Scratch::new("listener-check");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let not_pem = scratch.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let check = |tls: &str, allow: &str| {
        let (config, _) = node_config(
            scratch.path(),
            free_port(),
            &format!(
                "name = \"s\"\ntype = \"socket\"\nmode = \"listen\"\naddress = \"127.0.0.1:0\"\n\
                 allow = {allow}\n[receiver.tls]\n{tls}\n"
            ),
        );
        let out = Command::new(cargo_bin("receiver-node"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let files = |cert: &Path, key: &Path, ca: &Path| {
        format!("cert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {ca:?}")
    };
    let good = files(&pki.server_cert, &pki.server_key, &pki.ca);
    assert_eq!(check(&good, "[\"127.0.0.1/32\"]").0, Some(0));
    for (tls, allow, expect) in [
        (
            files(Path::new("/no/such.pem"), &pki.server_key, &pki.ca),
            "[]",
            "`tls.cert_file` = \"/no/such.pem\": cannot read it",
        ),
        (
            files(&not_pem, &pki.server_key, &pki.ca),
            "[]",
            "no certificate in it",
        ),
        (
            files(&pki.server_cert, &not_pem, &pki.ca),
            "[]",
            "`tls.key_file`",
        ),
        (
            files(&pki.server_cert, &pki.client_key, &pki.ca),
            "[]",
            "does not match the certificate",
        ),
        (
            files(&pki.server_cert, &pki.server_key, &not_pem),
            "[]",
            "`tls.client_ca_file`",
        ),
        (
            good.clone(),
            "[\"10.0.0.0/33\"]",
            "`allow`[0] = \"10.0.0.0/33\"",
        ),
    ] {
        let (code, err) = check(&tls, allow);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(expect), "{err:?} should say {expect:?}");
    }
}

mod real_flume_tls {
    use super::*;
    use weir_testkit::peers::flume::{avro_sink_agent_tls, Dist, FlumeAgent, SeqSource};
    use weir_testkit::peers::flume::{SINK_COUNTERS, SOURCE_COUNTERS};
    use weir_testkit::tls::TRUSTSTORE_PASSWORD;

    /// Event numbers in the node's batch files.
    fn delivered(out: &Path) -> std::collections::BTreeSet<u64> {
        let mut seen = std::collections::BTreeSet::new();
        for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().ends_with(".jsonl") {
                continue;
            }
            for l in std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
            {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                seen.extend(r["payload"].as_str().and_then(|p| p.parse::<u64>().ok()));
            }
        }
        seen
    }

    /// A Flume 1.11 agent's Avro sink with `ssl = true` (trusting the test CA through a JKS
    /// truststore) pushes every event into weir's Flume source over TLS.
    #[test]
    fn a_flume_agent_pushes_every_event_over_tls() {
        let scratch = Scratch::new("real-flume-tls");
        let pki = TestPki::create(&scratch.path().join("pki"));
        let truststore = pki.java_truststore("JKS");
        let (port, mport) = (free_port(), free_port());
        let (config, out) = node_config(
            scratch.path(),
            mport,
            &format!(
                "name = \"flume\"\ntype = \"flume\"\naddress = \"127.0.0.1:{port}\"\n\
                 allow = [\"127.0.0.1/32\"]\n\
                 [receiver.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.server_cert, pki.server_key
            ),
        );
        let _node = Node::start("run", &config, Some(&scratch.path().join("node.log")));
        wait_healthy(mport);
        let total = 20_000;
        let agent = FlumeAgent::start(
            Dist::Flume,
            &avro_sink_agent_tls(
                SeqSource {
                    total_events: total,
                    batch_size: 500,
                },
                port,
                500,
                &truststore,
                "JKS",
                TRUSTSTORE_PASSWORD,
            ),
        );
        agent.wait_drained(total, Duration::from_secs(120));
        let counters = agent.counters();
        assert_eq!(counters.get(SOURCE_COUNTERS, "EventAcceptedCount"), total);
        wait_until(
            "every event in the batch files",
            Duration::from_secs(60),
            || delivered(&out).len() as u64 == total,
        );
        assert_eq!(delivered(&out), (0..total).collect());
        assert!(metric(mport, "weir_flume_events_durable_total").unwrap() >= total);
        assert_eq!(
            metric(mport, "weir_flume_tls_handshake_failures_total"),
            Some(0)
        );
        println!(
            "real Flume over TLS: {total} events, agent counters {:?}",
            counters.0.get(SINK_COUNTERS)
        );
    }

    /// The same agent over TLS into `receiver-node sink`'s push port (`[push.tls]`, `allow`),
    /// whose pull port is TLS too: every event queued, none refused.
    #[test]
    fn a_flume_agent_pushes_every_event_over_tls_into_a_pull_sink() {
        let scratch = Scratch::new("real-flume-tls-sink");
        let pki = TestPki::create(&scratch.path().join("pki"));
        let truststore = pki.java_truststore("PKCS12");
        let (push, pull, mport) = (free_port(), free_port(), free_port());
        let tls = format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            pki.server_cert, pki.server_key
        );
        let config = scratch.path().join("sink.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n\
                 [push]\naddress = \"127.0.0.1:{push}\"\nallow = [\"127.0.0.0/8\"]\n\
                 [push.tls]\n{tls}\
                 [pull]\naddress = \"127.0.0.1:{pull}\"\n[pull.tls]\n{tls}\
                 [metrics]\naddress = \"127.0.0.1:{mport}\"\n",
                scratch.path().join("data").display().to_string()
            ),
        )
        .unwrap();
        let _sink = Node::start("sink", &config, Some(&scratch.path().join("sink.log")));
        wait_healthy(mport);
        let total = 5_000;
        let agent = FlumeAgent::start(
            Dist::Flume,
            &avro_sink_agent_tls(
                SeqSource {
                    total_events: total,
                    batch_size: 250,
                },
                push,
                250,
                &truststore,
                "PKCS12",
                TRUSTSTORE_PASSWORD,
            ),
        );
        agent.wait_drained(total, Duration::from_secs(120));
        assert_eq!(
            metric(mport, "weir_flume_events_durable_total"),
            Some(total)
        );
        assert_eq!(
            metric(mport, "weir_flume_tls_handshake_failures_total"),
            Some(0)
        );
        assert_eq!(
            metric(mport, "weir_flume_connections_refused_not_allowed_total"),
            Some(0)
        );
        // Plain text on the TLS pull port: refused and counted.
        let mut plain = TcpStream::connect(("127.0.0.1", pull)).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = plain.write_all(b"\0\0\0\x01\0\0\0\x01\0\0\0\0");
        let mut rest = Vec::new();
        let _ = plain.read_to_end(&mut rest);
        wait_until(
            "the pull port counts the failed handshake",
            Duration::from_secs(10),
            || metric(mport, "weir_sink_pull_tls_handshake_failures_total") == Some(1),
        );
    }
}
