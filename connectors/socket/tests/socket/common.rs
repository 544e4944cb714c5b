//! A receiver harness (on `weir_testkit::RecordingHost`) and protocol helpers shared by the tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use weir_receiver::{shutdown_channel, Receiver, ReceiverContext, ReceiverError, ShutdownTrigger};
use weir_socket::{SocketConfig, SocketReceiver};
use weir_testkit::{init_tracing, RecordingHost};

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(10);

/// A receiver running on a recording host.
pub struct Running {
    pub receiver: Arc<SocketReceiver>,
    pub host: Arc<RecordingHost>,
    /// Listen mode: the bound address.
    pub addr: Option<SocketAddr>,
    trigger: ShutdownTrigger,
    handle: JoinHandle<Result<(), ReceiverError>>,
}

/// Starts `config` on `host` (waiting until a listen-mode receiver listens).
pub async fn start(config: SocketConfig, host: Arc<RecordingHost>) -> Running {
    init_tracing();
    let receiver = Arc::new(SocketReceiver::new(config).expect("valid config"));
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("socket-test", host.clone(), shutdown, 0);
    let r = receiver.clone();
    let handle = tokio::spawn(async move { r.run(ctx).await });
    let addr = if receiver.config().mode == weir_socket::Mode::Listen {
        Some(
            tokio::time::timeout(SOON, receiver.listening())
                .await
                .expect("the receiver listens"),
        )
    } else {
        None
    };
    Running {
        receiver,
        host,
        addr,
        trigger,
        handle,
    }
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("listen mode")
    }

    pub async fn connect(&self) -> Producer {
        Producer::connect(self.addr()).await
    }

    pub fn trigger_shutdown(&self) {
        self.trigger.trigger();
    }

    /// Asks the receiver to stop and returns `run`'s result and how long it took to return.
    pub async fn stop(self) -> (Result<(), ReceiverError>, Duration) {
        self.trigger.trigger();
        self.join().await
    }

    /// Waits for `run` to return (after a shutdown was triggered).
    pub async fn join(self) -> (Result<(), ReceiverError>, Duration) {
        let t = Instant::now();
        let r = tokio::time::timeout(SOON, self.handle)
            .await
            .expect("run returns promptly after shutdown")
            .expect("run does not panic");
        (r, t.elapsed())
    }
}

/// One frame: `len: u32 BE | payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// What a producer read from the receiver.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An acknowledgement: the connection's cumulative durable record count.
    Ack(u64),
    /// The receiver closed the connection (EOF or reset).
    Closed,
    /// Nothing within the wait.
    Nothing,
}

/// A test producer on one connection.
pub struct Producer {
    pub stream: TcpStream,
    acks: BytesMut,
}

impl Producer {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(SOON, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Producer {
            stream,
            acks: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends each payload as a frame, in one write.
    pub async fn send_frames<S: AsRef<[u8]>>(&mut self, payloads: &[S]) {
        let bytes: Vec<u8> = payloads.iter().flat_map(|p| frame(p.as_ref())).collect();
        self.send(&bytes).await;
    }

    /// The next acknowledgement, a close, or nothing within `within`.
    pub async fn next_event(&mut self, within: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + within;
        while self.acks.len() < 8 {
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.acks)).await {
                Err(_) => return Event::Nothing,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    assert!(self.acks.is_empty(), "a torn acknowledgement");
                    return Event::Closed;
                }
                Ok(Ok(_)) => {}
            }
        }
        let ack = self.acks.split_to(8);
        Event::Ack(u64::from_be_bytes(ack[..].try_into().unwrap()))
    }

    /// Reads events until the acknowledged count reaches `count`; returns every ack seen.
    pub async fn acks_until(&mut self, count: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        loop {
            match self.next_event(SOON).await {
                Event::Ack(n) => {
                    seen.push(n);
                    if n >= count {
                        return seen;
                    }
                }
                e => panic!("expected acks up to {count}, got {e:?} after {seen:?}"),
            }
        }
    }

    /// Reads to the end: the acks that came, then asserts the connection closed.
    pub async fn acks_until_closed(&mut self) -> Vec<u64> {
        let mut seen = Vec::new();
        loop {
            match self.next_event(SOON).await {
                Event::Ack(n) => seen.push(n),
                Event::Closed => return seen,
                Event::Nothing => panic!("the connection was not closed; acks {seen:?}"),
            }
        }
    }

    /// Closes the write side (the receiver sees end of input) and keeps reading.
    pub async fn finish(&mut self) {
        self.stream.shutdown().await.expect("half-close");
    }
}
