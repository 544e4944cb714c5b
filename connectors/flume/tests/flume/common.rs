//! A running receiver (on `weir_testkit::RecordingHost`), a Rust client, and the Python peer's
//! runner.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use weir_flume::flume::{self, Status, AVRO_SOURCE_LEGACY};
use weir_flume::ipc::frame::FrameLimits;
use weir_flume::ipc::protocol::Protocol;
use weir_flume::ipc::requestor::{Reply, Requestor};
use weir_flume::ipc::transport::{FrameReader, FrameWriter, TransportError};
use weir_flume::{FlumeSourceConfig, FlumeSourceReceiver};
use weir_receiver::{shutdown_channel, Receiver, ReceiverContext, ReceiverError, ShutdownTrigger};
use weir_testkit::{init_tracing, RecordingHost};

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(20);

/// A receiver running on a recording host.
pub struct Running {
    pub receiver: Arc<FlumeSourceReceiver>,
    pub addr: SocketAddr,
    trigger: ShutdownTrigger,
    handle: JoinHandle<Result<(), ReceiverError>>,
}

pub async fn start(config: FlumeSourceConfig, host: Arc<RecordingHost>) -> Running {
    init_tracing();
    let receiver = Arc::new(FlumeSourceReceiver::new(config).expect("valid config"));
    let (trigger, shutdown) = shutdown_channel();
    let ctx = ReceiverContext::new("flume-test", host.clone(), shutdown, 0);
    let r = receiver.clone();
    let handle = tokio::spawn(async move { r.run(ctx).await });
    let addr = tokio::time::timeout(SOON, receiver.listening())
        .await
        .expect("the receiver listens");
    Running {
        receiver,
        addr,
        trigger,
        handle,
    }
}

impl Running {
    pub fn trigger_shutdown(&self) {
        self.trigger.trigger();
    }

    pub async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(SOON, self.handle)
            .await
            .expect("run returns promptly after shutdown")
            .expect("run does not panic")
            .expect("run returns Ok");
    }
}

/// A Rust Flume client on one connection (the crate's own requestor).
pub struct Client {
    reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    writer: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    pub requestor: Requestor,
    serial: i32,
}

impl Client {
    pub async fn connect(addr: SocketAddr, deflate: bool) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (rd, wr) = s.into_split();
        let limits = FrameLimits {
            max_frame_bytes: 1 << 26,
            max_buffers: 1 << 16,
        };
        Client {
            reader: FrameReader::new(rd, limits, deflate),
            writer: FrameWriter::new(wr, deflate),
            requestor: Requestor::new(Protocol::parse(AVRO_SOURCE_LEGACY).unwrap()),
            serial: 0,
        }
    }

    /// Sends a call, resending after a handshake `NONE`; the reply (or the transport error).
    pub async fn call(&mut self, message: &str, params: &[u8]) -> Result<Reply, TransportError> {
        loop {
            self.serial += 1;
            let buffers = self.requestor.encode_call(message, params);
            self.writer.write(self.serial, &buffers).await?;
            let frame = self
                .reader
                .next()
                .await?
                .ok_or(TransportError::Truncated(0))?;
            assert_eq!(
                frame.serial, self.serial,
                "the reply carries the request's serial"
            );
            match self.requestor.decode_reply(message, frame.payload) {
                Ok(Reply::Resend) => continue,
                Ok(r) => return Ok(r),
                Err(e) => panic!("bad reply: {e}"),
            }
        }
    }

    /// `appendBatch` of `events`; the status.
    pub async fn append_batch(&mut self, events: &[(Vec<(String, String)>, Bytes)]) -> Status {
        let params = flume::encode_append_batch(events);
        match self
            .call(flume::APPEND_BATCH, &params)
            .await
            .expect("a reply")
        {
            Reply::Ok(mut r) => Status::decode(&mut r).expect("a status"),
            other => panic!("appendBatch: {other:?}"),
        }
    }

    /// Sends raw bytes (not a frame) on the connection.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.writer_io().write_all(bytes).await
    }

    fn writer_io(&mut self) -> &mut tokio::net::tcp::OwnedWriteHalf {
        self.writer.get_mut()
    }

    /// The next frame, or why there is none (`Ok(None)`: closed).
    pub async fn next_frame(
        &mut self,
    ) -> Result<Option<weir_flume::ipc::frame::Frame>, TransportError> {
        self.reader.next().await
    }
}

pub fn events(batch: usize, n: usize) -> Vec<(Vec<(String, String)>, Bytes)> {
    (0..n)
        .map(|i| {
            (
                vec![("seq".to_string(), format!("{batch}.{i}"))],
                Bytes::from(format!("rust batch {batch} event {i}")),
            )
        })
        .collect()
}

pub use weir_testkit::python;

/// Runs `peers/<script>` with `args`; fails if it runs longer than [`SOON`].
pub async fn run_peer(script: &str, args: Vec<String>) -> Output {
    let python = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(script);
    tokio::time::timeout(
        SOON,
        tokio::task::spawn_blocking(move || {
            Command::new(python)
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .arg(script)
                .args(args)
                .output()
                .expect("run the Python peer")
        }),
    )
    .await
    .expect("the peer finishes in time")
    .expect("the peer's thread")
}
