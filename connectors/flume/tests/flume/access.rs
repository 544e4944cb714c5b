//! Who may connect to the Flume source and to a pull sink's pull port: TLS (with and without
//! client certificates), `allow`, eviction of the idlest connection at `max_connections`, the
//! first-bytes timeout. Rust-side clients (the crate's requestor over TLS).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use weir_flume::flume::{self, Status, AVRO_SOURCE_LEGACY};
use weir_flume::ipc::frame::FrameLimits;
use weir_flume::ipc::protocol::Protocol;
use weir_flume::ipc::requestor::{Reply, Requestor};
use weir_flume::ipc::transport::{FrameReader, FrameWriter};
use weir_flume::sink_server::{self, BoxFuture, PullQueue, PullServerConfig, PullServerStats};
use weir_flume::spark::{encode_get_event_batch, EventBatch, GET_EVENT_BATCH, SPARK_FLUME_LEGACY};
use weir_flume::FlumeSourceConfig;
use weir_receiver::listener::TlsConfig;
use weir_receiver::{shutdown_channel, Record};
use weir_testkit::tls::{tls_connect, TestPki};
use weir_testkit::{wait_until_async, RecordingHost, Scratch};

use crate::common::{events, start, Client, SOON};

/// An Avro IPC client over any stream (TLS here).
struct AnyClient<S> {
    reader: FrameReader<ReadHalf<S>>,
    writer: FrameWriter<WriteHalf<S>>,
    requestor: Requestor,
    serial: i32,
}

impl<S: AsyncRead + AsyncWrite> AnyClient<S> {
    fn new(stream: S, protocol: &str) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let limits = FrameLimits {
            max_frame_bytes: 1 << 26,
            max_buffers: 1 << 16,
        };
        AnyClient {
            reader: FrameReader::new(rd, limits, false),
            writer: FrameWriter::new(wr, false),
            requestor: Requestor::new(Protocol::parse(protocol).unwrap()),
            serial: 0,
        }
    }

    /// One call; `Err` when the connection fails or closes.
    async fn call(&mut self, message: &str, params: &[u8]) -> Result<Reply, String> {
        tokio::time::timeout(SOON, async {
            loop {
                self.serial += 1;
                let buffers = self.requestor.encode_call(message, params);
                self.writer
                    .write(self.serial, &buffers)
                    .await
                    .map_err(|e| e.to_string())?;
                let frame = self
                    .reader
                    .next()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("closed")?;
                match self.requestor.decode_reply(message, frame.payload) {
                    Ok(Reply::Resend) => continue,
                    Ok(r) => return Ok(r),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no reply in time".to_string())?
    }

    async fn append_batch(&mut self, batch: usize, n: usize) -> Result<Status, String> {
        let params = flume::encode_append_batch(&events(batch, n));
        match self.call(flume::APPEND_BATCH, &params).await? {
            Reply::Ok(mut r) => Ok(Status::decode(&mut r).expect("a status")),
            other => Err(format!("appendBatch: {other:?}")),
        }
    }
}

fn tls(pki: &TestPki, client_ca: bool) -> Option<TlsConfig> {
    Some(TlsConfig {
        cert_file: pki.server_cert.clone(),
        key_file: pki.server_key.clone(),
        client_ca_file: client_ca.then(|| pki.ca.clone()),
    })
}

fn source_config() -> FlumeSourceConfig {
    FlumeSourceConfig::listen("127.0.0.1:0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_over_tls_answers_ok_and_refuses_plain_text_and_unknown_clients() {
    let scratch = Scratch::new("flume-tls");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let host = RecordingHost::new();
    let r = start(
        FlumeSourceConfig {
            tls: tls(&pki, true),
            ..source_config()
        },
        host.clone(),
    )
    .await;
    let failures = || {
        r.receiver
            .stats()
            .connections
            .tls_handshake_failures
            .load(Relaxed)
    };

    let s = tls_connect(r.addr, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
        .await
        .expect("the handshake with a trusted client certificate");
    let mut c = AnyClient::new(s, AVRO_SOURCE_LEGACY);
    assert_eq!(c.append_batch(0, 50).await, Ok(Status::Ok));
    assert_eq!(c.append_batch(1, 50).await, Ok(Status::Ok));
    assert_eq!(host.durable_count(), 100);

    // Plain text: the Avro frame is no TLS record.
    let mut plain = Client::connect(r.addr, false).await;
    let _ = plain.send_raw(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]).await;
    let end = tokio::time::timeout(SOON, plain.next_frame())
        .await
        .unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    wait_until_async("plain text counted", SOON, || failures() == 1).await;

    // No client certificate, or one from another CA.
    for (what, client) in [
        ("no client certificate", None),
        (
            "another CA's client certificate",
            Some((
                pki.other_client_cert.as_path(),
                pki.other_client_key.as_path(),
            )),
        ),
    ] {
        let before = failures();
        if let Ok(s) = tls_connect(r.addr, &pki.ca, client).await {
            let mut c = AnyClient::new(s, AVRO_SOURCE_LEGACY);
            assert!(c.append_batch(9, 1).await.is_err(), "{what}: served");
        }
        wait_until_async(what, SOON, || failures() == before + 1).await;
    }
    assert_eq!(host.durable_count(), 100);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_refuses_peers_outside_allow_and_evicts_silent_connections_for_agents() {
    let host = RecordingHost::new();
    let r = start(
        FlumeSourceConfig {
            allow: vec!["10.0.0.0/8".into()],
            ..source_config()
        },
        host.clone(),
    )
    .await;
    let mut c = Client::connect(r.addr, false).await;
    let end = tokio::time::timeout(SOON, c.next_frame()).await.unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    let stats = r.receiver.stats();
    assert_eq!(stats.connections.refused_not_allowed.load(Relaxed), 1);
    assert_eq!(stats.connections_accepted.load(Relaxed), 0);
    r.stop().await;

    // A flood of silent connections, four times max_connections: an agent connecting after it
    // is served, the first-bytes timeout closes the rest.
    let r = start(
        FlumeSourceConfig {
            max_connections: 8,
            first_bytes_timeout_ms: 1500,
            ..source_config()
        },
        host.clone(),
    )
    .await;
    let stats = r.receiver.stats();
    let mut agent = Client::connect(r.addr, false).await;
    assert_eq!(agent.append_batch(&events(0, 10)).await, Status::Ok);
    let mut flood = Vec::new();
    for _ in 0..32 {
        flood.push(TcpStream::connect(r.addr).await.unwrap());
    }
    wait_until_async("the flood evicted", SOON, || {
        stats.connections.evicted.load(Relaxed) >= 32 - 7
    })
    .await;
    assert_eq!(agent.append_batch(&events(1, 10)).await, Status::Ok);
    let mut late = Client::connect(r.addr, false).await;
    assert_eq!(late.append_batch(&events(2, 10)).await, Status::Ok);
    assert_eq!(stats.connections_rejected.load(Relaxed), 0);
    // The silent ones left are closed by the first-bytes timeout.
    wait_until_async("first-bytes timeouts", SOON, || {
        stats.connections.first_bytes_timeouts.load(Relaxed) >= 1
    })
    .await;
    let mut closed = 0;
    for s in &mut flood {
        let mut b = [0u8; 1];
        if matches!(
            tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            closed += 1;
        }
    }
    assert_eq!(closed, 32);
    assert_eq!(host.durable_count(), 30);
    r.stop().await;
}

/// A pull queue that hands out `left` events, one batch at a time, and records acks.
struct TestQueue {
    left: std::sync::Mutex<usize>,
    acks: std::sync::atomic::AtomicU64,
}

impl PullQueue for TestQueue {
    fn get_event_batch(&self, n: usize) -> BoxFuture<'_, EventBatch> {
        Box::pin(async move {
            let mut left = self.left.lock().unwrap();
            let take = n.min(*left);
            *left -= take;
            if take == 0 {
                return EventBatch::error("no events");
            }
            EventBatch {
                error_msg: String::new(),
                sequence_number: format!("seq-{left}"),
                events: (0..take).map(|i| Record::new(format!("e{i}"))).collect(),
            }
        })
    }
    fn ack<'a>(&'a self, _seq: &'a str) -> BoxFuture<'a, ()> {
        self.acks.fetch_add(1, Relaxed);
        Box::pin(async {})
    }
    fn nack(&self, _seq: &str) {}
}

async fn get_batch<S: AsyncRead + AsyncWrite>(
    c: &mut AnyClient<S>,
    n: i32,
) -> Result<usize, String> {
    match c.call(GET_EVENT_BATCH, &encode_get_event_batch(n)).await? {
        Reply::Ok(mut r) => {
            let b = EventBatch::decode(&mut r, 100_000).map_err(|e| e.to_string())?;
            Ok(b.events.len())
        }
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_port_serves_over_tls_refuses_outside_allow_and_evicts_idle_pollers() {
    let scratch = Scratch::new("pull-tls");
    let pki = TestPki::create(&scratch.path().join("pki"));
    let serve = |config: PullServerConfig| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(PullServerStats::default());
        let queue = Arc::new(TestQueue {
            left: std::sync::Mutex::new(1000),
            acks: Default::default(),
        });
        let (trigger, shutdown) = shutdown_channel();
        let task = tokio::spawn(sink_server::serve(
            listener,
            queue,
            config,
            stats.clone(),
            shutdown,
        ));
        (addr, stats, trigger, task)
    };

    // TLS with client certificates.
    let (addr, stats, trigger, task) = serve(PullServerConfig {
        tls: tls(&pki, true),
        ..PullServerConfig::default()
    })
    .await;
    let s = tls_connect(addr, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
        .await
        .unwrap();
    let mut c = AnyClient::new(s, SPARK_FLUME_LEGACY);
    assert_eq!(get_batch(&mut c, 10).await, Ok(10));
    if let Ok(s) = tls_connect(
        addr,
        &pki.ca,
        Some((&pki.other_client_cert, &pki.other_client_key)),
    )
    .await
    {
        let mut other = AnyClient::new(s, SPARK_FLUME_LEGACY);
        assert!(get_batch(&mut other, 10).await.is_err());
    }
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let _ = plain.write_all(b"\0\0\0\x01\0\0\0\x01\0\0\0\0").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(SOON, plain.read_to_end(&mut rest))
        .await
        .unwrap();
    wait_until_async("two handshakes fail", SOON, || {
        stats.connections.tls_handshake_failures.load(Relaxed) == 2
    })
    .await;
    assert_eq!(get_batch(&mut c, 10).await, Ok(10));
    trigger.trigger();
    task.await.unwrap().unwrap();

    // allow.
    let (addr, stats, trigger, task) = serve(PullServerConfig {
        allow: vec!["10.0.0.0/8".into()],
        ..PullServerConfig::default()
    })
    .await;
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let end = tokio::time::timeout(SOON, refused.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert_eq!(stats.connections.refused_not_allowed.load(Relaxed), 1);
    trigger.trigger();
    task.await.unwrap().unwrap();

    // Eviction: two places; a poller that polled, then a silent connection; a third poller
    // takes the silent one's place, then a fourth the idle poller's.
    let (addr, stats, trigger, task) = serve(PullServerConfig {
        max_connections: 2,
        ..PullServerConfig::default()
    })
    .await;
    let mut first = AnyClient::new(TcpStream::connect(addr).await.unwrap(), SPARK_FLUME_LEGACY);
    assert_eq!(get_batch(&mut first, 5).await, Ok(5));
    let mut silent = TcpStream::connect(addr).await.unwrap();
    wait_until_async("two open", SOON, || {
        stats.connections_active.load(Relaxed) == 2
    })
    .await;
    let mut third = AnyClient::new(TcpStream::connect(addr).await.unwrap(), SPARK_FLUME_LEGACY);
    assert_eq!(get_batch(&mut third, 5).await, Ok(5));
    let end = tokio::time::timeout(SOON, silent.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert_eq!(stats.connections.evicted.load(Relaxed), 1);
    assert_eq!(get_batch(&mut first, 5).await, Ok(5));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(get_batch(&mut third, 5).await, Ok(5));
    // first is now the idlest.
    let mut fourth = AnyClient::new(TcpStream::connect(addr).await.unwrap(), SPARK_FLUME_LEGACY);
    assert_eq!(get_batch(&mut fourth, 5).await, Ok(5));
    assert!(get_batch(&mut first, 5).await.is_err());
    assert_eq!(get_batch(&mut third, 5).await, Ok(5));
    assert_eq!(stats.connections.evicted.load(Relaxed), 2);
    assert_eq!(stats.connections_rejected.load(Relaxed), 0);
    trigger.trigger();
    task.await.unwrap().unwrap();
}
