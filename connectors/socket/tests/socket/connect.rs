//! Connect mode: a line source we connect to (Spark's `socketTextStream`).

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use weir_socket::SocketConfig;

use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{start, SOON};

fn config(addr: std::net::SocketAddr) -> SocketConfig {
    SocketConfig {
        reconnect_initial_ms: 20,
        reconnect_max_ms: 200,
        ..SocketConfig::connect(addr.to_string())
    }
}

async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    tokio::time::timeout(SOON, listener.accept())
        .await
        .expect("the receiver connects")
        .expect("accept")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_split_and_crlf_lines_stores_the_last_unterminated_one_and_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = start(config(addr), RecordingHost::new()).await;
    let stats = r.receiver.stats();

    let mut source = accept(&listener).await;
    source.write_all(b"alpha\r\nbe").await.unwrap();
    wait_until_async("alpha is stored", SOON, || r.host.received_count() == 1).await;
    source.write_all(b"ta\n\ngam").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    source.write_all(b"ma").await.unwrap();
    // The source goes away: the unterminated last line is stored at end of input.
    drop(source);
    drop(listener);
    wait_until_async("the last line is stored", SOON, || {
        r.host.received_count() == 4
    })
    .await;
    assert_eq!(r.host.received(), ["alpha", "beta", "", "gamma"]);
    // While the source is down, attempts fail and are retried with backoff.
    wait_until_async("reconnect attempts fail", SOON, || {
        stats.connect_failures() >= 2
    })
    .await;

    let listener = TcpListener::bind(addr)
        .await
        .expect("rebind the source's port");
    let mut source = accept(&listener).await;
    source.write_all(b"delta\n").await.unwrap();
    wait_until_async("delta is stored", SOON, || r.host.received_count() == 5).await;
    assert_eq!(r.host.received(), ["alpha", "beta", "", "gamma", "delta"]);
    wait_until_async("everything is durable", SOON, || r.host.confirmed() == 5).await;
    assert_eq!(stats.connections_accepted(), 2);
    assert_eq!(stats.connections_active(), 1);
    assert_eq!(stats.records(), 5);
    assert_eq!(stats.bytes(), 19);
    assert!(r.host.errors().is_empty(), "{:?}", r.host.errors());

    let (result, took) = r.stop().await;
    result.unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(stats.connections_active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_line_drops_the_connection_and_the_receiver_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = start(
        SocketConfig {
            max_record_bytes: 16,
            ..config(addr)
        },
        RecordingHost::new(),
    )
    .await;
    let mut source = accept(&listener).await;
    let mut bytes = b"ok\n".to_vec();
    bytes.extend_from_slice(&[b'x'; 100]);
    bytes.extend_from_slice(b"\nnever\n");
    let _ = source.write_all(&bytes).await;
    let mut source2 = accept(&listener).await;
    source2.write_all(b"after\n").await.unwrap();
    wait_until_async("after is stored", SOON, || r.host.received_count() == 2).await;
    assert_eq!(r.host.received(), ["ok", "after"]);
    let errors = r.host.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("exceeds max_record_bytes = 16"),
        "{errors:?}"
    );
    assert_eq!(r.receiver.stats().oversize_errors(), 1);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_are_pipelined_not_awaited_one_by_one() {
    // 200 calls of 10 lines, each durable 200 ms after it is made: one at a time that would take
    // 40 s; with up to 64 calls in flight it takes about a second.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let host = RecordingHost::with_delay(Duration::from_millis(200));
    let r = start(
        SocketConfig {
            records_per_store: 10,
            ..config(addr)
        },
        host.clone(),
    )
    .await;
    let mut source = accept(&listener).await;
    let lines: String = (0..2000).map(|i| format!("line-{i:05}\n")).collect();
    let t = Instant::now();
    source.write_all(lines.as_bytes()).await.unwrap();
    wait_until_async("all 2000 lines are durable", SOON, || {
        host.confirmed() == 2000
    })
    .await;
    let took = t.elapsed();
    assert!(host.calls() >= 200, "{} calls", host.calls());
    assert!(
        host.max_outstanding() >= 16,
        "at most {} calls were outstanding at once",
        host.max_outstanding()
    );
    assert!(host.max_outstanding() <= 64, "max_in_flight is a bound");
    assert!(took < Duration::from_secs(8), "{took:?}");
    let expected: Vec<String> = (0..2000).map(|i| format!("line-{i:05}")).collect();
    assert_eq!(host.received(), expected);
    r.stop().await.0.unwrap();
}
