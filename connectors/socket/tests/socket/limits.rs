//! Limits and malformed input: oversize records, garbage, partial frames, max_connections, idle.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use weir_socket::{Protocol, SocketConfig};

use weir_testkit::{wait_until_async, RecordingHost};

use crate::common::{start, Event, SOON};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_closes_only_its_connection() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            max_record_bytes: 1024,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let mut good = r.connect().await;
    good.send_frames(&["one"]).await;
    assert_eq!(good.acks_until(1).await, [1]);

    let mut bad = r.connect().await;
    let mut bytes = 5000u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[7; 100]);
    bad.send(&bytes).await;
    assert_eq!(bad.acks_until_closed().await, Vec::<u64>::new());

    good.send_frames(&["two"]).await;
    assert_eq!(good.acks_until(2).await, [2]);
    assert_eq!(host.received(), ["one", "two"]);
    let errors = host.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("a frame of 5000 bytes exceeds max_record_bytes = 1024"),
        "{errors:?}"
    );
    assert_eq!(r.receiver.stats().oversize_errors(), 1);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_line_closes_only_its_connection_after_storing_the_lines_before_it() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            max_record_bytes: 10,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Lines)
        },
        host.clone(),
    )
    .await;
    let mut good = r.connect().await;
    good.send(b"g1\n").await;
    wait_until_async("g1 stored", SOON, || host.received_count() == 1).await;
    let mut bad = r.connect().await;
    bad.send(b"b1\nthis line is far too long\nb2\n").await;
    assert_eq!(bad.next_event(SOON).await, Event::Closed);
    good.send(b"g2\n").await;
    wait_until_async("g2 stored", SOON, || host.received_count() == 3).await;
    assert_eq!(host.received(), ["g1", "b1", "g2"]);
    assert!(host.errors()[0].contains("max_record_bytes = 10"));
    // A line without any newline is refused as soon as it cannot fit any more.
    let mut endless = r.connect().await;
    endless.send(&[b'z'; 64]).await;
    assert_eq!(endless.next_event(SOON).await, Event::Closed);
    assert_eq!(r.receiver.stats().oversize_errors(), 2);
    assert_eq!(host.received_count(), 3);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_partial_frames_are_never_acknowledged_and_never_hang() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig::listen("127.0.0.1:0", Protocol::Frames),
        host.clone(),
    )
    .await;
    // A partial header, then end of input.
    let mut p = r.connect().await;
    p.send(&[0, 0]).await;
    p.finish().await;
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
    // A header promising 100 bytes, 50 of them, then end of input.
    let mut p = r.connect().await;
    let mut bytes = 100u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[1; 50]);
    p.send(&bytes).await;
    p.finish().await;
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
    // Text sent to a frames port: "GET " is a length of about 1.2 GB.
    let mut p = r.connect().await;
    p.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(p.acks_until_closed().await, Vec::<u64>::new());
    // Pseudo-random garbage, and a producer that vanishes mid-frame without closing cleanly.
    let mut x = 0x9e37_79b9_u32;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    let mut garbage = garbage;
    garbage[0] = 0xde; // a length far above max_record_bytes
    let mut p = r.connect().await;
    let _ = p.stream.write_all(&garbage).await;
    let _ = p.next_event(SOON).await;
    let mut p = r.connect().await;
    p.send(&[0, 0, 1, 0, 1, 2, 3]).await;
    drop(p);

    // Nothing was stored, and the receiver still serves.
    let stats = r.receiver.stats();
    wait_until_async("those connections are closed", SOON, || {
        stats.connections_active() == 0
    })
    .await;
    assert_eq!(host.received_count(), 0);
    let mut p = r.connect().await;
    p.send_frames(&["fine"]).await;
    assert_eq!(p.acks_until(1).await, [1]);
    assert_eq!(host.received(), ["fine"]);
    assert!(stats.oversize_errors() >= 1);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_idlest_makes_room_and_only_busy_ones_refuse_newcomers() {
    // Stores are held (not durable) until released: connections with stores outstanding are
    // busy and never evicted.
    let host = RecordingHost::holding();
    let r = start(
        SocketConfig {
            max_connections: 2,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let stats = r.receiver.stats();
    let mut a = r.connect().await;
    let mut b = r.connect().await;
    a.send_frames(&["a"]).await;
    b.send_frames(&["b"]).await;
    wait_until_async("a and b are stored", SOON, || host.received_count() == 2).await;

    // Both have a store outstanding: the newcomer is refused.
    let mut c = r.connect().await;
    assert_eq!(c.next_event(SOON).await, Event::Closed);
    assert_eq!(stats.connections_rejected(), 1);
    assert_eq!(stats.connections_active(), 2);

    // Once durable (and acknowledged), a was idle longer than b: d takes a's place.
    host.release_all();
    assert_eq!(a.acks_until(1).await, [1]);
    assert_eq!(b.acks_until(1).await, [1]);
    b.send_frames(&["b2"]).await;
    wait_until_async("b2 is stored", SOON, || host.received_count() == 3).await;
    host.release_all();
    assert_eq!(b.acks_until(2).await, [2]);
    let mut d = r.connect().await;
    assert_eq!(a.acks_until_closed().await, Vec::<u64>::new());
    assert_eq!(
        stats
            .listener()
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    d.send_frames(&["d"]).await;
    wait_until_async("d is stored", SOON, || host.received_count() == 4).await;
    host.release_all();
    assert_eq!(d.acks_until(1).await, [1]);
    b.send_frames(&["b3"]).await;
    wait_until_async("b still works", SOON, || host.received_count() == 5).await;
    host.release_all();
    assert_eq!(b.acks_until(3).await, [3]);
    assert_eq!(stats.connections_accepted(), 3);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_closes_silent_connections_but_not_busy_ones() {
    let host = RecordingHost::new();
    let r = start(
        SocketConfig {
            idle_timeout_ms: 400,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let stats = r.receiver.stats();
    let mut silent = r.connect().await;
    let mut talker = r.connect().await;
    // The talker sends every 50 ms for 1.2 s (three idle timeouts).
    for i in 0..24 {
        talker.send_frames(&[format!("t{i}")]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(silent.next_event(SOON).await, Event::Closed);
    assert_eq!(stats.idle_closed(), 1);
    talker.send_frames(&["last"]).await;
    assert_eq!(talker.acks_until(25).await.last(), Some(&25));
    // Silent from now on, the talker is closed in its turn.
    assert_eq!(talker.acks_until_closed().await, Vec::<u64>::new());
    assert_eq!(stats.idle_closed(), 2);
    r.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_waits_for_outstanding_stores() {
    let host = RecordingHost::holding();
    let r = start(
        SocketConfig {
            idle_timeout_ms: 200,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let mut waiting = r.connect().await;
    waiting.send_frames(&["held"]).await;
    wait_until_async("held is handed to store()", SOON, || {
        host.received_count() == 1
    })
    .await;
    // Silent for three idle timeouts, but its store is outstanding: still open.
    assert_eq!(
        waiting.next_event(Duration::from_millis(600)).await,
        Event::Nothing
    );
    assert_eq!(r.receiver.stats().idle_closed(), 0);
    host.release_all();
    assert_eq!(waiting.acks_until(1).await, [1]);
    // Once acknowledged and silent, it is closed.
    assert_eq!(waiting.acks_until_closed().await, Vec::<u64>::new());
    assert_eq!(r.receiver.stats().idle_closed(), 1);
    r.stop().await.0.unwrap();
}
