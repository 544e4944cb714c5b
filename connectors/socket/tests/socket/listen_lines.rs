//! Listen mode, lines: many producers, no acknowledgements.

use weir_socket::{Protocol, SocketConfig};

use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{start, SOON};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_producers_have_all_their_lines_stored_in_order() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            peer_header: true,
            records_per_store: 100,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Lines)
        },
        host.clone(),
    )
    .await;
    let addr = r.addr();
    let mut producers = Vec::new();
    for p in 0..2 {
        producers.push(tokio::spawn(async move {
            let mut conn = crate::common::Producer::connect(addr).await;
            let local = conn.stream.local_addr().unwrap().to_string();
            let text: String = (0..5000).map(|i| format!("p{p}-{i}\r\n")).collect();
            // Uneven writes, so that lines are split across reads.
            for chunk in text.as_bytes().chunks(777 + p * 300) {
                conn.send(chunk).await;
                tokio::task::yield_now().await;
            }
            conn.finish().await;
            assert!(
                conn.acks_until_closed().await.is_empty(),
                "lines has no acks"
            );
            local
        }));
    }
    let mut locals = Vec::new();
    for p in producers {
        locals.push(p.await.unwrap());
    }
    wait_until_async("10000 lines are stored", SOON, || {
        host.received_count() == 10_000
    })
    .await;
    let records = host.received_records();
    for (p, local) in locals.iter().enumerate() {
        let mine: Vec<String> = records
            .iter()
            .filter(|r| r.headers[0].value == local.as_bytes())
            .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..5000).map(|i| format!("p{p}-{i}")).collect();
        assert_eq!(mine, expected, "producer {p} ({local})");
    }
    assert!(records
        .iter()
        .all(|r| r.headers.len() == 1 && r.headers[0].name == "peer" && r.position.is_none()));
    let stats = r.receiver.stats();
    assert_eq!(stats.connections_accepted(), 2);
    assert_eq!(stats.records(), 10_000);
    assert!(host.errors().is_empty(), "{:?}", host.errors());
    r.stop().await.0.unwrap();
}
