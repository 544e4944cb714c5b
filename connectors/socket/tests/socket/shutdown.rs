//! Shutdown, store failures, bind failures.

use std::time::Duration;

use tokio::net::TcpListener;
use weir_receiver::StoreError;
use weir_socket::{Protocol, SocketConfig};

use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{start, Event, SOON};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_pending_stores_sends_the_final_ack_and_returns_ok() {
    let host = RecordingHost::holding();
    let r = start(
        SocketConfig::listen("127.0.0.1:0", Protocol::Frames),
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    p.send_frames(&["a", "b", "c"]).await;
    wait_until_async("three handed to store()", SOON, || {
        host.received_count() == 3
    })
    .await;
    let first_calls = host.calls();
    p.send_frames(&["d", "e", "f"]).await;
    wait_until_async("six handed to store()", SOON, || host.received_count() == 6).await;
    host.release(first_calls);
    assert_eq!(p.acks_until(3).await.last(), Some(&3));

    // Shutdown with the last calls pending; they resolve a little later.
    r.trigger_shutdown();
    assert_eq!(
        p.next_event(Duration::from_millis(200)).await,
        Event::Nothing
    );
    host.release_all();
    let acks = p.acks_until_closed().await;
    assert_eq!(acks.last(), Some(&6), "{acks:?}");
    assert!(acks.iter().all(|&n| n > 3 && n <= 6), "{acks:?}");
    let (result, took) = r.join().await;
    result.unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(host.errors().is_empty(), "{:?}", host.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_stores_that_never_resolve_after_close_timeout() {
    let host = RecordingHost::holding();
    let r = start(
        SocketConfig {
            close_timeout_ms: 300,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    p.send_frames(&["stuck"]).await;
    wait_until_async("handed to store()", SOON, || host.received_count() == 1).await;
    let (result, took) = r.stop().await;
    result.unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stores_the_complete_lines_already_read() {
    let host = RecordingHost::holding();
    let r = start(
        SocketConfig {
            records_per_store: 1,
            max_in_flight: 1,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Lines)
        },
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    // One write: read at once; "a" fills the one in-flight slot, "b" and "c" wait in the buffer,
    // and "part" is no complete line.
    p.send(b"a\nb\nc\npart").await;
    wait_until_async("a handed to store()", SOON, || host.received_count() == 1).await;
    r.trigger_shutdown();
    wait_until_async("b and c handed to store()", SOON, || {
        host.received_count() == 3
    })
    .await;
    host.release_all();
    let (result, _) = r.join().await;
    result.unwrap();
    assert_eq!(host.received(), ["a", "b", "c"]);
    assert_eq!(host.durable().len(), 3);
    assert_eq!(p.next_event(SOON).await, Event::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_store_errors_are_not_reported() {
    let host = RecordingHost::new();
    host.fail_all(StoreError::ShuttingDown);
    let r = start(
        SocketConfig::listen("127.0.0.1:0", Protocol::Frames),
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    p.send_frames(&["x"]).await;
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
    r.stop().await.0.unwrap();
    assert!(host.errors().is_empty(), "{:?}", host.errors());
    assert_eq!(host.confirmed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_closes_the_connection_without_acknowledging_the_failed_records() {
    let host = RecordingHost::new();
    host.fail_if(
        |r| r.payload.starts_with(b"FAIL"),
        StoreError::Storage("injected failure".into()),
    );
    let r = start(
        SocketConfig::listen("127.0.0.1:0", Protocol::Frames),
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    p.send_frames(&["a", "b"]).await;
    assert_eq!(p.acks_until(2).await.last(), Some(&2));
    p.send_frames(&["FAIL-c", "d"]).await;
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
    let errors = host.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("injected failure"), "{errors:?}");
    let stats = r.receiver.stats();
    assert_eq!(stats.store_failures(), 1);
    assert_eq!(stats.records_durable(), 2);
    // Other and later connections are unaffected.
    let mut q = r.connect().await;
    q.send_frames(&["e"]).await;
    assert_eq!(q.acks_until(1).await, [1]);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_failure_is_an_error_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let receiver =
        weir_socket::SocketReceiver::new(SocketConfig::listen(addr.clone(), Protocol::Frames))
            .unwrap();
    let (_trigger, shutdown) = weir_receiver::shutdown_channel();
    let ctx = weir_receiver::ReceiverContext::new("sock", RecordingHost::new(), shutdown, 0);
    let e = tokio::time::timeout(SOON, weir_receiver::Receiver::run(&receiver, ctx))
        .await
        .expect("fails at once")
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("cannot listen on {addr}")), "{e}");
    assert!(e.to_lowercase().contains("in use"), "{e}");
    assert_eq!(receiver.local_addr(), None);
}
