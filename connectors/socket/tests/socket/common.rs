//! A fake host, a receiver harness and protocol helpers shared by the tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_receiver::{
    shutdown_channel, Checkpoint, Receiver, ReceiverContext, ReceiverError, ReceiverHost, Record,
    ShutdownTrigger, StoreError, StoreFuture, Stored,
};
use weir_socket::{SocketConfig, SocketReceiver};

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A [`ReceiverHost`] that records every `store()` call and resolves it after `delay`, or when
/// released (`hold`), or fails it: records whose payload starts with `FAIL` fail their call with a
/// storage error; `fail_all` fails every call with the given error.
#[derive(Default)]
pub struct FakeHost(Arc<State>);

#[derive(Default)]
struct State {
    received: Mutex<Vec<Record>>,
    durable: Mutex<Vec<Record>>,
    calls: AtomicU64,
    confirmed: AtomicU64,
    outstanding: AtomicU64,
    max_outstanding: AtomicU64,
    errors: Mutex<Vec<String>>,
    delay: Mutex<Duration>,
    hold: AtomicBool,
    released: watch::Sender<u64>,
    fail_all: Mutex<Option<StoreError>>,
    fail_calls: Mutex<Vec<u64>>,
}

impl FakeHost {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeHost::default())
    }

    /// Every call resolves `delay` after it was made (concurrently, like blocks cut on a timer).
    pub fn with_delay(delay: Duration) -> Arc<Self> {
        let h = FakeHost::default();
        *h.0.delay.lock().unwrap() = delay;
        Arc::new(h)
    }

    /// Calls resolve only once released with [`FakeHost::release`].
    pub fn holding() -> Arc<Self> {
        let h = FakeHost::default();
        h.0.hold.store(true, SeqCst);
        Arc::new(h)
    }

    /// Lets calls `0..calls` resolve (in any order the receiver polls them).
    pub fn release(&self, calls: u64) {
        self.0.released.send_modify(|r| *r = (*r).max(calls));
    }

    pub fn release_all(&self) {
        self.release(u64::MAX);
    }

    /// Fails call number `id` (counting from 0) with a storage error.
    pub fn fail_call(&self, id: u64) {
        self.0.fail_calls.lock().unwrap().push(id);
    }

    pub fn fail_all(&self, e: StoreError) {
        *self.0.fail_all.lock().unwrap() = Some(e);
    }

    /// Payloads handed to `store()`, in call order.
    pub fn received(&self) -> Vec<String> {
        payloads(&self.0.received.lock().unwrap())
    }

    pub fn received_records(&self) -> Vec<Record> {
        self.0.received.lock().unwrap().clone()
    }

    /// Payloads whose call resolved Ok, in resolution order.
    pub fn durable(&self) -> Vec<String> {
        payloads(&self.0.durable.lock().unwrap())
    }

    pub fn received_count(&self) -> usize {
        self.0.received.lock().unwrap().len()
    }

    pub fn calls(&self) -> u64 {
        self.0.calls.load(SeqCst)
    }

    /// Records whose call resolved Ok (counted before the future returns).
    pub fn confirmed(&self) -> u64 {
        self.0.confirmed.load(SeqCst)
    }

    /// The most calls that were waiting to resolve at the same time.
    pub fn max_outstanding(&self) -> u64 {
        self.0.max_outstanding.load(SeqCst)
    }

    pub fn errors(&self) -> Vec<String> {
        self.0.errors.lock().unwrap().clone()
    }
}

fn payloads(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

impl ReceiverHost for FakeHost {
    fn store(&self, records: Vec<Record>) -> StoreFuture {
        let state = self.0.clone();
        let id = state.calls.fetch_add(1, SeqCst);
        state
            .received
            .lock()
            .unwrap()
            .extend(records.iter().cloned());
        let now = state.outstanding.fetch_add(1, SeqCst) + 1;
        state.max_outstanding.fetch_max(now, SeqCst);
        let fail = state.fail_all.lock().unwrap().clone().or_else(|| {
            (records.iter().any(|r| r.payload.starts_with(b"FAIL"))
                || state.fail_calls.lock().unwrap().contains(&id))
            .then(|| StoreError::Storage("injected failure".into()))
        });
        let delay = *state.delay.lock().unwrap();
        let mut released = state.hold.load(SeqCst).then(|| state.released.subscribe());
        StoreFuture::new(async move {
            if let Some(rx) = &mut released {
                let _ = rx.wait_for(|r| *r > id).await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            state.outstanding.fetch_sub(1, SeqCst);
            if let Some(e) = fail {
                return Err(e);
            }
            let n = records.len();
            state.durable.lock().unwrap().extend(records);
            state.confirmed.fetch_add(n as u64, SeqCst);
            Ok(Stored {
                records: n,
                block: None,
            })
        })
    }

    fn report_error(&self, message: &str) {
        self.0.errors.lock().unwrap().push(message.to_string());
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new()
    }
}

/// A receiver running on a fake host.
pub struct Running {
    pub receiver: Arc<SocketReceiver>,
    pub host: Arc<FakeHost>,
    /// Listen mode: the bound address.
    pub addr: Option<SocketAddr>,
    trigger: ShutdownTrigger,
    handle: JoinHandle<Result<(), ReceiverError>>,
}

/// Starts `config` on `host` (waiting until a listen-mode receiver listens).
pub async fn start(config: SocketConfig, host: Arc<FakeHost>) -> Running {
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

/// Polls `cond` every 5 ms until it holds; panics with `what` after [`SOON`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
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
