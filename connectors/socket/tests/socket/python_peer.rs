//! The README's Python producer (`peers/frames_producer.py`) against the receiver: an independent
//! implementation of the frames protocol, including the resend after a failed store.

use std::collections::HashSet;
use std::process::Command;

use weir_receiver::StoreError;
use weir_socket::{Protocol, SocketConfig};
use weir_testkit::RecordingHost;

use crate::common::{start, SOON};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_producer_gets_every_record_durable_despite_a_failed_store() {
    assert!(
        Command::new("python3").arg("--version").output().is_ok(),
        "python3 not found: this test runs peers/frames_producer.py; install Python 3 (apt-get install python3)"
    );
    let host = RecordingHost::new();
    host.fail_call(3, StoreError::Storage("injected failure".into()));
    let r = start(
        SocketConfig {
            records_per_store: 50,
            ..SocketConfig::listen("127.0.0.1:0", Protocol::Frames)
        },
        host.clone(),
    )
    .await;
    let addr = r.addr();
    let peers = concat!(env!("CARGO_MANIFEST_DIR"), "/peers");
    let script = format!(
        "import sys; sys.path.insert(0, {peers:?}); import frames_producer as p; \
         p.send_all([b'rec-%d' % i for i in range(1000)], {:?}, {}, retry_delay=0.05)",
        addr.ip().to_string(),
        addr.port()
    );
    let out = tokio::time::timeout(
        SOON,
        tokio::task::spawn_blocking(move || {
            Command::new("python3")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .args(["-c", &script])
                .output()
                .expect("run python3")
        }),
    )
    .await
    .expect("the producer finishes")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The failed call closed the first connection; the producer reconnected and resent.
    assert!(
        stderr.is_empty() || stderr.contains("connection failed"),
        "{stderr}"
    );
    let stats = r.receiver.stats();
    assert_eq!(stats.store_failures(), 1);
    assert!(stats.connections_accepted() >= 2);
    let durable: HashSet<String> = host.durable().into_iter().collect();
    for i in 0..1000 {
        assert!(
            durable.contains(&format!("rec-{i}")),
            "rec-{i} is not durable"
        );
    }
    r.stop().await.0.unwrap();
}
