//! Malformed and oversized input closes the connection that sent it, with a logged reason;
//! other connections keep working; nothing panics.

use std::sync::atomic::Ordering::Relaxed;

use weir_flume::flume::Status;
use weir_flume::FlumeSourceConfig;

use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{events, start, Client, SOON};

fn config() -> FlumeSourceConfig {
    FlumeSourceConfig {
        max_frame_bytes: 1 << 20,
        max_buffers_per_frame: 64,
        ..FlumeSourceConfig::listen("127.0.0.1:0")
    }
}

/// Sends `bytes` on a new connection (after a good call when `handshaken`) and asserts that
/// the receiver closes it, while a second connection keeps working.
async fn closes(bytes: &[u8], deflate: bool, handshaken: bool, reason: &str) {
    let host = RecordingHost::new();
    let r = start(
        FlumeSourceConfig {
            deflate,
            ..config()
        },
        host.clone(),
    )
    .await;
    let mut good = Client::connect(r.addr, deflate).await;
    assert_eq!(good.append_batch(&events(0, 2)).await, Status::Ok);
    let mut bad = Client::connect(r.addr, deflate).await;
    if handshaken {
        assert_eq!(bad.append_batch(&events(1, 2)).await, Status::Ok);
    }
    bad.send_raw(bytes).await.unwrap();
    let end = tokio::time::timeout(SOON, bad.next_frame()).await.unwrap();
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "expected the connection closed, got {end:?}"
    );
    let stats = r.receiver.stats();
    wait_until_async("the close is counted", SOON, || {
        stats.malformed_closed.load(Relaxed) == 1
    })
    .await;
    assert!(
        host.errors().iter().any(|e| e.contains(reason)),
        "{reason:?} not in {:?}",
        host.errors()
    );
    // The other connection is unaffected.
    assert_eq!(good.append_batch(&events(2, 2)).await, Status::Ok);
    assert_eq!(
        host.durable_count(),
        if handshaken { 6 } else { 4 },
        "every OK'd event is stored"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_buffer_length_closes_the_connection() {
    let mut f = 1i32.to_be_bytes().to_vec();
    f.extend(1i32.to_be_bytes());
    f.extend(i32::MAX.to_be_bytes());
    closes(&f, false, false, "max_frame_bytes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_buffers_close_the_connection() {
    let mut f = 1i32.to_be_bytes().to_vec();
    f.extend(100_000i32.to_be_bytes());
    closes(&f, false, true, "max_buffers_per_frame").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_length_closes_the_connection() {
    let mut f = 1i32.to_be_bytes().to_vec();
    f.extend(1i32.to_be_bytes());
    f.extend((-5i32).to_be_bytes());
    closes(&f, false, false, "negative length").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_handshake_closes_the_connection() {
    // A well-formed frame whose payload is no handshake (a union index out of range).
    let mut f = 1i32.to_be_bytes().to_vec();
    f.extend(1i32.to_be_bytes());
    f.extend(20i32.to_be_bytes());
    f.extend([0x7e; 20]);
    closes(&f, false, false, "malformed request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_call_head_after_the_handshake_closes_the_connection() {
    let mut f = 9i32.to_be_bytes().to_vec();
    f.extend(1i32.to_be_bytes());
    f.extend(3i32.to_be_bytes());
    f.extend([0x00, 0x7f, 0xff]); // empty meta, then a name length running past the end
    closes(&f, false, true, "malformed request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_deflated_stream_closes_the_connection() {
    closes(b"this is not a zlib stream at all", true, false, "deflate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_idle_one_makes_room_and_idle_ones_time_out() {
    let host = RecordingHost::new();
    let r = start(
        FlumeSourceConfig {
            max_connections: 1,
            idle_timeout_ms: 300,
            ..config()
        },
        host.clone(),
    )
    .await;
    let stats = r.receiver.stats();
    let mut first = Client::connect(r.addr, false).await;
    assert_eq!(first.append_batch(&events(0, 1)).await, Status::Ok);
    // The first one has no call outstanding: it makes room for the second.
    let mut second = Client::connect(r.addr, false).await;
    let end = tokio::time::timeout(SOON, first.next_frame())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert_eq!(stats.connections.evicted.load(Relaxed), 1);
    assert_eq!(stats.connections_rejected.load(Relaxed), 0);
    assert_eq!(second.append_batch(&events(1, 1)).await, Status::Ok);
    // Then the second one idles out.
    let end = tokio::time::timeout(SOON, second.next_frame())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert_eq!(stats.idle_closed.load(Relaxed), 1);
    wait_until_async("the idle connection is gone", SOON, || {
        stats.connections_active.load(Relaxed) == 0
    })
    .await;
    let mut third = Client::connect(r.addr, false).await;
    assert_eq!(third.append_batch(&events(2, 1)).await, Status::Ok);
    assert_eq!(host.durable_count(), 3);
    r.stop().await;
}
