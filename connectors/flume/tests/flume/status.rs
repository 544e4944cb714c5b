//! What the agent is told when events are not durable, or a call is wrong.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use weir_flume::flume::Status;
use weir_flume::ipc::requestor::Reply;
use weir_flume::FlumeSourceConfig;
use weir_receiver::StoreError;
use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{events, run_peer, start, Client, SOON};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_is_answered_failed_and_the_python_client_sees_it() {
    let host = RecordingHost::failing(StoreError::Storage("injected: fsync failed".into()));
    let r = start(FlumeSourceConfig::listen("127.0.0.1:0"), host.clone()).await;
    let out = run_peer(
        "flume_avro_client.py",
        vec![
            "--port".into(),
            r.addr.port().to_string(),
            "--batches".into(),
            "2".into(),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(stdout.matches("-> FAILED").count(), 2, "{stdout}");
    // The same with the Rust client, which also sees the connection stay usable.
    let mut c = Client::connect(r.addr, false).await;
    assert_eq!(c.append_batch(&events(0, 3)).await, Status::Failed);
    assert_eq!(c.append_batch(&events(1, 3)).await, Status::Failed);
    let stats = r.receiver.stats();
    assert_eq!(stats.calls_failed.load(Relaxed), 4);
    assert_eq!(stats.events_durable.load(Relaxed), 0);
    assert!(
        host.errors()
            .iter()
            .any(|e| e.contains("FAILED") && e.contains("fsync failed")),
        "{:?}",
        host.errors()
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_shutting_down_answers_failed() {
    let host = RecordingHost::failing(StoreError::ShuttingDown);
    let r = start(FlumeSourceConfig::listen("127.0.0.1:0"), host.clone()).await;
    let mut c = Client::connect(r.addr, false).await;
    assert_eq!(c.append_batch(&events(0, 2)).await, Status::Failed);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_waiting_when_shutdown_comes_is_answered_failed_after_close_timeout() {
    let host = RecordingHost::new();
    host.set_delay(Duration::from_secs(3600));
    let r = start(
        FlumeSourceConfig {
            close_timeout_ms: 100,
            ..FlumeSourceConfig::listen("127.0.0.1:0")
        },
        host.clone(),
    )
    .await;
    let mut c = Client::connect(r.addr, false).await;
    let call = tokio::spawn(async move { c.append_batch(&events(0, 2)).await });
    let stats = r.receiver.stats();
    wait_until_async("the call is stored", SOON, || {
        stats.calls.load(Relaxed) == 1
    })
    .await;
    r.trigger_shutdown();
    let status = tokio::time::timeout(SOON, call).await.unwrap().unwrap();
    assert_eq!(status, Status::Failed);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_messages_and_oversized_batches_get_error_replies_on_a_live_connection() {
    let host = RecordingHost::new();
    let r = start(
        FlumeSourceConfig {
            max_events_per_batch: 5,
            ..FlumeSourceConfig::listen("127.0.0.1:0")
        },
        host.clone(),
    )
    .await;
    let mut c = Client::connect(r.addr, false).await;
    match c.call("teleport", b"").await.unwrap() {
        Reply::Error(e) => assert!(e.contains("No such remote message: teleport"), "{e}"),
        other => panic!("{other:?}"),
    }
    let params = weir_flume::flume::encode_append_batch(&events(0, 6));
    match c.call("appendBatch", &params).await.unwrap() {
        Reply::Error(e) => assert!(e.contains("more than the limit of 5"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Truncated parameters.
    match c
        .call("appendBatch", &params[..params.len() / 2])
        .await
        .unwrap()
    {
        Reply::Error(e) => assert!(e.contains("bad parameters"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.append_batch(&events(1, 5)).await, Status::Ok);
    assert_eq!(host.durable_count(), 5);
    assert_eq!(r.receiver.stats().error_replies.load(Relaxed), 2);
    r.stop().await;
}
