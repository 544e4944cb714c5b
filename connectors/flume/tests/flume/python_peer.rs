//! The Python Flume client (`peers/flume_avro_client.py`, an independent implementation on
//! Apache `avro`) pushing to the source: every variant and option; every call must return `OK`
//! and every event must reach storage exactly as sent.

use weir_flume::FlumeSourceConfig;
use weir_testkit::RecordingHost;

use crate::common::{run_peer, start};

struct Case {
    args: &'static [&'static str],
    batches: usize,
    batch_size: usize,
    body_size: usize,
    deflate: bool,
    /// Handshake matches the client reports, in order.
    matches: &'static [&'static str],
}

async fn push(case: Case) {
    let host = RecordingHost::new();
    let config = FlumeSourceConfig {
        deflate: case.deflate,
        ..FlumeSourceConfig::listen("127.0.0.1:0")
    };
    let r = start(config, host.clone()).await;
    let mut args: Vec<String> = vec![
        "--port".into(),
        r.addr.port().to_string(),
        "--batches".into(),
        case.batches.to_string(),
        "--batch-size".into(),
        case.batch_size.to_string(),
        "--header".into(),
        "host=agent-1".into(),
        "--header".into(),
        "topic=a=b".into(),
    ];
    if case.body_size > 0 {
        args.extend(["--body-size".into(), case.body_size.to_string()]);
    }
    if case.deflate {
        args.push("--deflate".into());
    }
    args.extend(case.args.iter().map(|a| a.to_string()));
    let out = run_peer("flume_avro_client.py", args.clone()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let matches: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split("handshake response: match=").nth(1))
        .map(|m| m.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(matches, case.matches, "{stderr}");

    let durable = host.durable_records();
    assert_eq!(durable.len(), case.batches * case.batch_size, "{stdout}");
    let mut i = 0;
    for b in 0..case.batches {
        for e in 0..case.batch_size {
            let r = &durable[i];
            i += 1;
            let mut body = format!("batch {b} event {e}").into_bytes();
            if case.body_size > body.len() {
                body.resize(case.body_size, b'.');
            }
            assert_eq!(&r.payload[..], &body[..], "event {b}.{e}");
            let mut headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| (h.name.clone(), String::from_utf8(h.value.to_vec()).unwrap()))
                .collect();
            headers.sort();
            assert_eq!(
                headers,
                vec![
                    ("host".to_string(), "agent-1".to_string()),
                    ("seq".to_string(), format!("{b}.{e}")),
                    ("topic".to_string(), "a=b".to_string()),
                ],
                "event {b}.{e}"
            );
        }
    }
    let stats = r.receiver.stats();
    assert_eq!(
        stats
            .events_durable
            .load(std::sync::atomic::Ordering::Relaxed),
        durable.len() as u64
    );
    assert!(host.errors().is_empty(), "{:?}", host.errors());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_flume_clients_get_both_at_once() {
    push(Case {
        args: &["--variant", "legacy"],
        batches: 4,
        batch_size: 3,
        body_size: 0,
        deflate: false,
        matches: &["BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_1_11_1_clients_get_both_at_once() {
    push(Case {
        args: &["--variant", "avro1111"],
        batches: 3,
        batch_size: 4,
        body_size: 0,
        deflate: false,
        matches: &["BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_protocol_hash_gets_none_then_both_after_the_resend() {
    push(Case {
        args: &["--variant", "python"],
        batches: 3,
        batch_size: 2,
        body_size: 0,
        deflate: false,
        matches: &["NONE", "BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_appends_are_stored_one_by_one() {
    push(Case {
        args: &["--single"],
        batches: 2,
        batch_size: 3,
        body_size: 0,
        deflate: false,
        matches: &["BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflated_connections_carry_large_bodies() {
    push(Case {
        args: &[],
        batches: 3,
        batch_size: 3,
        body_size: 10_000,
        deflate: true,
        matches: &["BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_then_pipelined_calls_with_multi_buffer_frames() {
    push(Case {
        args: &["--ping", "--pipeline", "--variant", "avro1111"],
        batches: 5,
        batch_size: 2,
        body_size: 20_000,
        deflate: false,
        matches: &["BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_deflated_python_variant_single_appends() {
    push(Case {
        args: &["--pipeline", "--variant", "python", "--single", "--ping"],
        batches: 3,
        batch_size: 3,
        body_size: 9_000,
        deflate: true,
        matches: &["NONE", "BOTH"],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_body_crosses_in_many_buffers() {
    push(Case {
        args: &[],
        batches: 2,
        batch_size: 2,
        body_size: 1 << 20,
        deflate: false,
        matches: &["BOTH"],
    })
    .await;
}
