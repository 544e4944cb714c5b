//! Who may connect, and connection floods: eviction of the idlest connection at
//! `max_connections`, the first-bytes timeout, `allow`, TLS (with and without client
//! certificates).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_receiver::listener::TlsConfig;
use weir_socket::{Protocol, SocketConfig};
use weir_testkit::tls::{tls_connect, TestPki};
use weir_testkit::{wait_until_async, RecordingHost, Scratch};

use crate::common::{frame, start, Event, SOON};

fn frames(payloads: &[String]) -> Vec<u8> {
    payloads.iter().flat_map(|p| frame(p.as_bytes())).collect()
}

/// Reads cumulative acks until `count` (or fails: a close or 10 s of nothing).
async fn acks_until<S: AsyncRead + Unpin>(s: &mut S, count: u64) -> Result<(), String> {
    let mut b = [0u8; 8];
    loop {
        match tokio::time::timeout(SOON, s.read_exact(&mut b)).await {
            Err(_) => return Err(format!("no ack up to {count} within {SOON:?}")),
            Ok(Err(e)) => return Err(format!("closed before ack {count}: {e}")),
            Ok(Ok(_)) if u64::from_be_bytes(b) >= count => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether the server closes `s` within `within` (EOF or an error, before any data).
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut b = [0u8; 8];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_does_not_lock_out_a_producer_that_sends() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig::listen("127.0.0.1:0", Protocol::Frames),
        host.clone(),
    )
    .await;
    let addr = r.addr();
    let stats = r.receiver.stats();
    let rss_before = rss_kib();

    // The producer: 100 frames a round, waits for their acknowledgement, records the longest
    // wait between acknowledgements.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr)
                .await
                .expect("the producer connects");
            let (mut sent, mut longest, mut last) = (0u64, Duration::ZERO, Instant::now());
            while !stop.load(Relaxed) {
                let batch: Vec<String> = (sent..sent + 100).map(|i| format!("p{i}")).collect();
                s.write_all(&frames(&batch))
                    .await
                    .expect("the producer sends");
                sent += 100;
                acks_until(&mut s, sent)
                    .await
                    .expect("the producer is acknowledged");
                longest = longest.max(last.elapsed());
                last = Instant::now();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (sent, longest)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let durable_before = host.durable_count();

    // The flood: 500 connections that never send anything, opened as fast as they connect.
    let t0 = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..500 {
        flood.push(TcpStream::connect(addr).await.expect("a flood connection"));
    }
    // Every one but the last max_connections - 1 (the producer holds one place) is evicted.
    wait_until_async("the flood is evicted", SOON, || {
        stats.listener().evicted.load(Relaxed) >= 500 - 63
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_secs = t0.elapsed().as_secs_f64();
    let durable_during = host.durable_count() - durable_before;
    let mut closed = 0;
    for s in &mut flood {
        if closed_within(s, Duration::from_millis(1)).await {
            closed += 1;
        }
    }
    // A producer arriving after the flood (the 64 places are taken by silent connections) is
    // served too: before eviction it was refused for the whole idle timeout.
    let mut late = r.connect().await;
    late.send_frames(&["late"]).await;
    assert_eq!(late.acks_until(1).await, [1]);
    let rss_after = rss_kib();
    stop.store(true, Relaxed);
    let (sent, longest) = producer.await.unwrap();
    let evicted = stats.listener().evicted.load(Relaxed);
    println!(
        "flood: {} connections opened, {evicted} evicted ({closed} seen closed by the \
         client), {} active at the end; producer: {sent} records acknowledged, {:.0} records \
         acknowledged/s during the flood, longest wait for an ack {longest:?}; RSS {rss_before} KiB before, \
         {rss_after} KiB after",
        flood.len(),
        stats.connections_active(),
        durable_during as f64 / flood_secs,
    );
    assert!(evicted >= 438, "{evicted}");
    assert!(closed >= 430, "{closed} closed");
    assert!(stats.connections_active() <= 64);
    assert_eq!(stats.connections_rejected(), 0);
    assert!(longest < Duration::from_secs(3), "{longest:?}");
    assert!(durable_during > 0);
    // Memory stays bounded: 500 connections cost far less than their read buffers would.
    assert!(
        rss_after < rss_before + 200 * 1024,
        "{rss_before} -> {rss_after} KiB"
    );
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_first_bytes_timeout() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            first_bytes_timeout_ms: 300,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let stats = r.receiver.stats();
    let mut silent = r.connect().await;
    let mut talker = r.connect().await;
    talker.send_frames(&["hello"]).await;
    assert_eq!(talker.acks_until(1).await, [1]);
    let t0 = Instant::now();
    assert_eq!(silent.next_event(SOON).await, Event::Closed);
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(stats.listener().first_bytes_timeouts.load(Relaxed), 1);
    // The talker sent in time: it stays served past the timeout.
    tokio::time::sleep(Duration::from_millis(400)).await;
    talker.send_frames(&["again"]).await;
    assert_eq!(talker.acks_until(2).await, [2]);
    assert_eq!(stats.listener().first_bytes_timeouts.load(Relaxed), 1);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_allow_is_closed_at_once_and_counted() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            allow: vec!["10.0.0.0/8".into()],
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let stats = r.receiver.stats();
    let mut p = r.connect().await;
    let _ = p.stream.write_all(&frame(b"not allowed")).await;
    assert_eq!(p.next_event(SOON).await, Event::Closed);
    assert_eq!(stats.listener().refused_not_allowed.load(Relaxed), 1);
    assert_eq!(stats.connections_accepted(), 0);
    assert_eq!(host.received_count(), 0);
    r.stop().await.0.unwrap();

    // 127.0.0.1 in the list: served.
    let r = start(
        SocketConfig {
            allow: vec!["10.0.0.0/8".into(), "127.0.0.1/32".into()],
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    p.send_frames(&["allowed"]).await;
    assert_eq!(p.acks_until(1).await, [1]);
    assert_eq!(host.received(), ["allowed"]);
    r.stop().await.0.unwrap();
}

/// Sends one frame and waits for its acknowledgement.
async fn one_frame_acked<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    what: &str,
) -> Result<(), String> {
    s.write_all(&frame(what.as_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    acks_until(s, 1).await
}

fn tls_config(pki: &TestPki, client_ca: bool) -> SocketConfig {
    SocketConfig {
        tls: Some(TlsConfig {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: client_ca.then(|| pki.ca.clone()),
        }),
        ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_producer_is_acknowledged_and_plain_text_is_refused() {
    let scratch = Scratch::new("socket-tls");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let host = RecordingHost::new();
    let r = start(tls_config(&pki, false), host.clone()).await;
    let stats = r.receiver.stats();
    let mut s = tls_connect(r.addr(), &pki.ca, None)
        .await
        .expect("the handshake");
    one_frame_acked(&mut s, "over tls").await.unwrap();
    let batch: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
    s.write_all(&frames(&batch)).await.unwrap();
    acks_until(&mut s, 1001).await.unwrap();
    assert_eq!(host.durable_count(), 1001);
    assert_eq!(host.received()[0], "over tls");

    // A plain-text producer: its frame is no TLS record; closed (after a TLS alert), nothing
    // stored, counted.
    let mut plain = r.connect().await;
    let _ = plain.stream.write_all(&frame(b"plain")).await;
    let mut answer = Vec::new();
    let end = tokio::time::timeout(SOON, plain.stream.read_to_end(&mut answer)).await;
    assert!(end.is_ok(), "the plain-text connection is closed");
    // A TLS alert record (content type 21), never an acknowledgement.
    assert!(answer.is_empty() || answer[0] == 21, "{answer:?}");
    assert_eq!(stats.listener().tls_handshake_failures.load(Relaxed), 1);
    assert_eq!(host.durable_count(), 1001);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_ca_file_only_clients_with_a_certificate_from_that_ca_are_served() {
    let scratch = Scratch::new("socket-mtls");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let host = RecordingHost::new();
    let r = start(tls_config(&pki, true), host.clone()).await;
    let stats = r.receiver.stats();
    let failures = || stats.listener().tls_handshake_failures.load(Relaxed);

    let mut good = tls_connect(r.addr(), &pki.ca, Some((&pki.client_cert, &pki.client_key)))
        .await
        .expect("the handshake with a good client certificate");
    one_frame_acked(&mut good, "trusted").await.unwrap();

    // TLS 1.3: the client finishes its side before the server has checked its certificate, so
    // the refusal shows on the first read.
    for (what, client) in [
        ("no client certificate", None),
        (
            "a certificate from another CA",
            Some((&pki.other_client_cert, &pki.other_client_key)),
        ),
    ] {
        let before = failures();
        let refused = match tls_connect(
            r.addr(),
            &pki.ca,
            client.map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .await
        {
            Err(_) => true,
            Ok(mut s) => one_frame_acked(&mut s, what).await.is_err(),
        };
        assert!(refused, "{what}: served");
        wait_until_async(what, SOON, || failures() == before + 1).await;
    }
    assert_eq!(host.received(), ["trusted"]);
    assert_eq!(failures(), 2);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_named_by_validate() {
    let scratch = Scratch::new("socket-tls-files");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let not_pem = scratch.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let check = |f: &dyn Fn(&mut TlsConfig), expect: &[&str]| {
        let mut c = tls_config(&pki, true);
        f(c.tls.as_mut().unwrap());
        let e = c.validate().unwrap_err();
        for x in expect {
            assert!(e.contains(x), "{e:?} should say {x:?}");
        }
    };
    tls_config(&pki, true).validate().unwrap();
    check(
        &|t| t.cert_file = "/no/such/file.pem".into(),
        &["`tls.cert_file`", "cannot read"],
    );
    check(
        &|t| t.cert_file = not_pem.clone(),
        &["`tls.cert_file`", "no certificate"],
    );
    check(
        &|t| t.key_file = not_pem.clone(),
        &["`tls.key_file`", "no private key"],
    );
    check(
        &|t| t.key_file = pki.client_key.clone(),
        &["`tls.key_file`", "does not match"],
    );
    check(
        &|t| t.client_ca_file = Some(not_pem.clone()),
        &["`tls.client_ca_file`", "no certificate"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_producer_over_tls_with_a_client_certificate_gets_every_record_durable() {
    // Python's ssl module (OpenSSL) as the client: another TLS implementation than the server's.
    let scratch = Scratch::new("socket-tls-python");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            records_per_store: 100,
            ..tls_config(&pki, true)
        },
        host.clone(),
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/frames_producer.py");
    let args: Vec<String> = vec![
        script.into(),
        "127.0.0.1".into(),
        r.addr().port().to_string(),
        "--tls-ca".into(),
        pki.ca.display().to_string(),
        "--tls-cert".into(),
        pki.client_cert.display().to_string(),
        "--tls-key".into(),
        pki.client_key.display().to_string(),
    ];
    let input: String = (0..1000).map(|i| format!("py-{i}\n")).collect();
    let out = tokio::time::timeout(
        SOON,
        tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new("python3")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .args(&args)
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("python3 runs (apt-get install python3)");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }),
    )
    .await
    .expect("the producer finishes")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("1000 records durable"), "{stderr}");
    let durable = host.durable();
    assert_eq!(durable.len(), 1000, "one connection, nothing resent");
    assert_eq!(durable[999], "py-999");
    assert_eq!(
        r.receiver
            .stats()
            .listener()
            .tls_handshake_failures
            .load(Relaxed),
        0
    );
    r.stop().await.0.unwrap();
}
