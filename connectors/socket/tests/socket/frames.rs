//! Listen mode, frames: acknowledgements only for durable records.

use std::time::Duration;

use weir_socket::{Protocol, SocketConfig};

use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{start, Event, SOON};

fn frames_config() -> SocketConfig {
    SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_cumulative_and_come_only_after_the_host_confirmed_durability() {
    let host = RecordingHost::holding();
    let r = start(frames_config(), host.clone()).await;
    let mut p = r.connect().await;
    p.send_frames(&["r0", "r1", "r2", "r3", "r4"]).await;
    wait_until_async("the first five are handed to store()", SOON, || {
        host.received_count() == 5
    })
    .await;
    let first_calls = host.calls();
    p.send_frames(&["r5", "r6", "r7", "r8", "r9"]).await;
    wait_until_async("all ten are handed to store()", SOON, || {
        host.received_count() == 10
    })
    .await;
    assert!(host.calls() > first_calls);

    // Nothing is durable yet: no acknowledgement may come.
    assert_eq!(
        p.next_event(Duration::from_millis(300)).await,
        Event::Nothing
    );

    // The first calls (the first five records) become durable: exactly they are acknowledged.
    host.release(first_calls);
    let acks = p.acks_until(5).await;
    assert_eq!(acks.last(), Some(&5));
    assert_eq!(host.confirmed(), 5);
    assert_eq!(
        p.next_event(Duration::from_millis(200)).await,
        Event::Nothing
    );

    host.release_all();
    let acks = p.acks_until(10).await;
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "{acks:?}");
    assert_eq!(acks.last(), Some(&10));
    assert!(host.confirmed() >= 10);

    // End of input: the receiver finishes and closes without acknowledging more.
    p.finish().await;
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
    assert_eq!(
        host.received(),
        (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
    let stats = r.receiver.stats();
    wait_until_async("the connection is closed", SOON, || {
        stats.connections_active() == 0
    })
    .await;
    assert_eq!(stats.records_durable(), 10);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ack_is_at_most_what_the_host_confirmed() {
    // Many small calls resolving at random-ish times: each ack read is checked against the host.
    let host = RecordingHost::with_delay(Duration::from_millis(30));
    let r = start(
        SocketConfig {
            records_per_store: 7,
            ..frames_config()
        },
        host.clone(),
    )
    .await;
    let mut p = r.connect().await;
    let mut sent = 0u64;
    let mut last = 0;
    for round in 0..20 {
        let batch: Vec<String> = (0..(round * 3 + 1))
            .map(|i| format!("{round}-{i}"))
            .collect();
        sent += batch.len() as u64;
        p.send_frames(&batch).await;
        while let Event::Ack(n) = p.next_event(Duration::from_millis(10)).await {
            assert!(
                n <= host.confirmed(),
                "ack {n} > confirmed {}",
                host.confirmed()
            );
            assert!(n > last);
            last = n;
        }
    }
    p.finish().await;
    let acks = p.acks_until_closed().await;
    for n in &acks {
        assert!(*n > last);
        last = *n;
    }
    assert_eq!(last, sent, "the final ack covers everything sent");
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_producer_resends_what_was_not_acknowledged() {
    let host = RecordingHost::holding();
    let r = start(frames_config(), host.clone()).await;
    let records: Vec<String> = (0..10).map(|i| format!("rec-{i}")).collect();

    // First connection: everything is sent, only the first call becomes durable before the
    // producer dies.
    let mut p = r.connect().await;
    p.send_frames(&records[..4]).await;
    wait_until_async("four handed to store()", SOON, || {
        host.received_count() == 4
    })
    .await;
    let first_calls = host.calls();
    p.send_frames(&records[4..]).await;
    wait_until_async("ten handed to store()", SOON, || {
        host.received_count() == 10
    })
    .await;
    host.release(first_calls);
    let acked = *p.acks_until(4).await.last().unwrap();
    assert_eq!(acked, 4);
    drop(p);

    // The producer reconnects and resends what was not acknowledged; its new connection counts
    // from zero.
    let mut p = r.connect().await;
    p.send_frames(&records[acked as usize..]).await;
    wait_until_async("the resent records are handed to store()", SOON, || {
        host.received_count() == 16
    })
    .await;
    host.release_all();
    assert_eq!(p.acks_until(6).await.last(), Some(&6));
    p.finish().await;
    assert!(p.acks_until_closed().await.is_empty());

    // At least once: every record is durable; the unacknowledged ones of the first connection
    // became durable too, so they are there twice.
    wait_until_async("all durable", SOON, || host.confirmed() == 16).await;
    let durable = host.durable();
    for rec in &records {
        let n = durable.iter().filter(|d| *d == rec).count();
        let expected = if rec.as_str() < "rec-4" { 1 } else { 2 };
        assert_eq!(n, expected, "{rec} in {durable:?}");
    }
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_and_empty_frames_pass_intact() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            max_record_bytes: 3 << 20,
            read_buffer_bytes: 64 << 10,
            ..frames_config()
        },
        host.clone(),
    )
    .await;
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut p = r.connect().await;
    p.send_frames(&[&big[..], b"", b"small", &big[..1000]])
        .await;
    assert_eq!(p.acks_until(4).await.last(), Some(&4));
    let got = host.received_records();
    assert_eq!(got.len(), 4);
    assert_eq!(got[0].payload, big[..]);
    assert!(got[1].payload.is_empty());
    assert_eq!(got[2].payload, "small");
    assert_eq!(got[3].payload, big[..1000]);
    assert!(got
        .iter()
        .all(|r| r.position.is_none() && r.headers.is_empty()));
    r.stop().await.0.unwrap();
}
