//! One connection: read, split into records, store with pipelining, acknowledge (frames).

use std::collections::VecDeque;
use std::future::{poll_fn, Future as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use weir_receiver::listener::{closed_by_gate, Activity, BusyGuard, GateClosed};
use weir_receiver::{ReceiverContext, Record, StoreError, StoreFuture, Stored};

use crate::config::{Protocol, SocketConfig};
use crate::framing::{Decoder, Oversize};
use crate::stats::{Counter, SocketStats};

/// Largest single read into a connection's buffer.
const READ_CHUNK: usize = 64 << 10;

/// What a connection shares with its receiver.
pub(crate) struct Shared {
    pub(crate) config: SocketConfig,
    pub(crate) stats: Arc<SocketStats>,
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The peer closed its side.
    Eof,
    /// Reading failed (a reset, most often: the peer died).
    ReadFailed(std::io::Error),
    /// Shutdown was requested.
    Shutdown,
    /// Nothing arrived for `idle_timeout_ms`.
    Idle,
    /// A record larger than `max_record_bytes`.
    Oversize(String),
    /// A `store()` failed: nothing after it may be acknowledged.
    StoreFailed(StoreError),
    /// The listener's gate closed it (evicted to make room, or no data in time).
    Gate(GateClosed),
}

/// What a connection did.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) end: End,
    /// Bytes read from the peer.
    pub(crate) bytes_read: u64,
}

/// Serves one connection until it ends, logging and reporting why before it is closed. Frames
/// connections get a writer for acknowledgements, driven next to the reader.
pub(crate) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    protocol: Protocol,
    ctx: &ReceiverContext,
    shared: &Shared,
    activity: Activity,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Send,
{
    let close_timeout = Duration::from_millis(shared.config.close_timeout_ms);
    let (rd, wr) = tokio::io::split(stream);
    let outcome = match protocol {
        Protocol::Lines => {
            Conn::new(peer, protocol, ctx, shared, None, activity)
                .run(rd)
                .await
        }
        Protocol::Frames => {
            let (tx, rx) = watch::channel(0u64);
            let reader = Conn::new(peer, protocol, ctx, shared, Some(tx), activity).run(rd);
            let writer = write_acks(wr, rx);
            tokio::pin!(reader, writer);
            let mut writer_done = false;
            let outcome = loop {
                tokio::select! {
                    outcome = &mut reader => break outcome,
                    r = &mut writer, if !writer_done => {
                        writer_done = true;
                        if let Err(e) = r {
                            // Reading goes on: the peer may still close cleanly; it resends
                            // whatever it did not see acknowledged.
                            tracing::debug!(%peer, error = %e, "writing acknowledgements failed");
                        }
                    }
                }
            };
            // The reader dropped its sender: the writer sends the last count, then closes.
            if !writer_done && timeout(close_timeout, &mut writer).await.is_err() {
                tracing::warn!(
                    %peer,
                    "the final acknowledgement could not be written within close_timeout_ms \
                     (the producer is not reading); closing"
                );
            }
            outcome
        }
    };
    outcome
}

/// Logs, counts and (for errors) reports why a connection ended.
fn explain(end: &End, peer: SocketAddr, ctx: &ReceiverContext, shared: &Shared) {
    let stats = &shared.stats;
    match end {
        End::Eof => tracing::info!(%peer, "connection closed by the peer"),
        End::ReadFailed(e) => tracing::warn!(%peer, error = %e, "connection failed"),
        End::Shutdown => tracing::debug!(%peer, "connection closed for shutdown"),
        // Counted (and logged, rate-limited) by the gate.
        End::Gate(why) => tracing::debug!(%peer, "connection closed: {why}"),
        End::Idle => {
            stats.add(Counter::Idle, 1);
            tracing::info!(
                %peer,
                idle_timeout_ms = shared.config.idle_timeout_ms,
                "connection closed: nothing received within idle_timeout_ms"
            );
        }
        End::Oversize(reason) => {
            stats.add(Counter::Oversize, 1);
            let msg = format!("socket connection {peer} closed: {reason}");
            tracing::warn!("{msg}");
            ctx.report_error(&msg);
        }
        End::StoreFailed(StoreError::ShuttingDown) => {
            tracing::info!(%peer, "connection closed: the node is shutting down");
        }
        End::StoreFailed(e) => {
            stats.add(Counter::StoreFailures, 1);
            let msg = format!(
                "socket connection {peer} closed: storing failed ({e}); nothing after the last \
                 acknowledgement was acknowledged"
            );
            tracing::warn!("{msg}");
            ctx.report_error(&msg);
        }
    }
}

/// Writes the latest durable count whenever it rises (coalescing), until the reader is done; then
/// closes the write side.
async fn write_acks<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut durable: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let mut sent = 0u64;
    loop {
        let open = durable.changed().await.is_ok();
        let count = *durable.borrow_and_update();
        if count > sent {
            wr.write_all(&count.to_be_bytes()).await?;
            sent = count;
        }
        if !open {
            break;
        }
    }
    wr.shutdown().await
}

/// Store calls not yet resolved, oldest first. Every call is polled (a host's future may need it
/// to make progress); results are taken in call order.
#[derive(Default)]
struct InFlight {
    calls: VecDeque<Call>,
}

struct Call {
    future: Option<StoreFuture>,
    result: Option<Result<Stored, StoreError>>,
    records: u64,
    /// The connection is not evicted while a store is outstanding.
    _busy: BusyGuard,
}

impl InFlight {
    fn push(&mut self, future: StoreFuture, records: u64, busy: BusyGuard) {
        self.calls.push_back(Call {
            future: Some(future),
            result: None,
            records,
            _busy: busy,
        });
    }

    fn len(&self) -> usize {
        self.calls.len()
    }

    fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<(u64, Result<Stored, StoreError>)> {
        for call in &mut self.calls {
            if let Some(f) = &mut call.future {
                if let Poll::Ready(r) = Pin::new(f).poll(cx) {
                    call.result = Some(r);
                    call.future = None;
                }
            }
        }
        match self.calls.front() {
            Some(c) if c.result.is_some() => {
                let c = self.calls.pop_front().expect("front exists");
                Poll::Ready((c.records, c.result.expect("checked")))
            }
            _ => Poll::Pending,
        }
    }

    /// The oldest call's result (records, outcome). Cancel-safe. Never resolves when empty.
    async fn oldest(&mut self) -> (u64, Result<Stored, StoreError>) {
        poll_fn(|cx| self.poll_oldest(cx)).await
    }
}

/// The reading side of a connection.
struct Conn<'a> {
    peer: SocketAddr,
    ctx: &'a ReceiverContext,
    shared: &'a Shared,
    decoder: Decoder,
    buf: BytesMut,
    in_flight: InFlight,
    /// Records of this connection that are durable.
    durable: u64,
    /// Frames: where the durable count goes to be acknowledged.
    acks: Option<watch::Sender<u64>>,
    peer_header: Option<Bytes>,
    bytes_read: u64,
    activity: Activity,
}

impl<'a> Conn<'a> {
    fn new(
        peer: SocketAddr,
        protocol: Protocol,
        ctx: &'a ReceiverContext,
        shared: &'a Shared,
        acks: Option<watch::Sender<u64>>,
        activity: Activity,
    ) -> Self {
        let config = &shared.config;
        Conn {
            peer,
            ctx,
            shared,
            decoder: Decoder::new(protocol, config.max_record_bytes),
            buf: BytesMut::with_capacity(config.read_buffer_bytes.min(READ_CHUNK)),
            in_flight: InFlight::default(),
            durable: 0,
            acks,
            peer_header: config.peer_header.then(|| Bytes::from(peer.to_string())),
            bytes_read: 0,
            activity,
        }
    }

    /// Reads and stores until the connection ends; then stores what may still be stored and waits
    /// for outstanding stores (acknowledging them), except after a failed store.
    async fn run<R: AsyncRead + Unpin>(mut self, mut rd: R) -> Outcome {
        let mut end = self.read_loop(&mut rd).await;
        match end {
            End::Eof => match self.decoder.finish(&mut self.buf) {
                Ok(Some(last)) => {
                    let record = self.record(last);
                    self.submit(vec![record]);
                }
                Ok(None) if !self.buf.is_empty() => tracing::warn!(
                    peer = %self.peer,
                    bytes = self.buf.len(),
                    "connection closed inside a frame: its bytes are dropped (not acknowledged)"
                ),
                Ok(None) => {}
                Err(Oversize(reason)) => end = End::Oversize(reason),
            },
            // Complete records already read are stored (a lines producer considers them sent);
            // a partial one is dropped.
            End::Shutdown => loop {
                let (batch, oversize) = self.decode_batch();
                if batch.is_empty() {
                    break;
                }
                self.submit(batch);
                if oversize.is_some() {
                    break;
                }
            },
            _ => {}
        }
        if !matches!(end, End::StoreFailed(_)) {
            if let Err(failed) = self.drain().await {
                end = failed;
            }
        }
        // Counted and reported before the connection closes (the ack sender drops with `self`).
        explain(&end, self.peer, self.ctx, self.shared);
        Outcome {
            end,
            bytes_read: self.bytes_read,
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> End {
        // Copies of the references, so that they borrow nothing from `self`.
        let (shared, ctx): (&Shared, &ReceiverContext) = (self.shared, self.ctx);
        let config = &shared.config;
        let idle =
            (config.idle_timeout_ms > 0).then(|| Duration::from_millis(config.idle_timeout_ms));
        let shutdown = ctx.shutdown();
        let mut last_read = Instant::now();
        loop {
            // Store every complete record buffered, in calls of up to records_per_store.
            loop {
                if self.in_flight.len() >= config.max_in_flight {
                    tokio::select! {
                        biased;
                        () = shutdown.requested() => return End::Shutdown,
                        r = self.in_flight.oldest() => {
                            if let Err(e) = self.settle(r) {
                                return e;
                            }
                        }
                    }
                    continue;
                }
                let (batch, oversize) = self.decode_batch();
                let drained = batch.is_empty();
                if !drained {
                    self.submit(batch);
                }
                if let Some(Oversize(reason)) = oversize {
                    return End::Oversize(reason);
                }
                if drained {
                    break;
                }
            }
            // Then read more: up to read_buffer_bytes ahead, or as much as the next record needs.
            let target = config.read_buffer_bytes.max(self.decoder.need(&self.buf));
            let want = target.saturating_sub(self.buf.len()).max(1);
            let idle_deadline = idle.map(|d| last_read + d);
            tokio::select! {
                biased;
                () = shutdown.requested() => return End::Shutdown,
                r = self.in_flight.oldest(), if !self.in_flight.is_empty() => {
                    if let Err(e) = self.settle(r) {
                        return e;
                    }
                }
                r = read_some(rd, &mut self.buf, want) => match r {
                    Ok(0) => return End::Eof,
                    Ok(n) => {
                        self.bytes_read += n as u64;
                        last_read = Instant::now();
                    }
                    Err(e) => return match closed_by_gate(&e) {
                        Some(why) => End::Gate(why),
                        // A TLS peer that closed without close_notify (most clients do) at a
                        // record boundary: nothing was cut short, an ordinary end.
                        None if e.kind() == std::io::ErrorKind::UnexpectedEof
                            && self.buf.is_empty() => End::Eof,
                        None => End::ReadFailed(e),
                    },
                },
                () = sleep_until(idle_deadline.unwrap_or_else(Instant::now)),
                    if idle_deadline.is_some() && self.in_flight.is_empty() => return End::Idle,
            }
        }
    }

    /// Up to records_per_store complete records from the buffer, and the oversize error that
    /// stopped the decoding, if one did (the records before it are good).
    fn decode_batch(&mut self) -> (Vec<Record>, Option<Oversize>) {
        let max = self.shared.config.records_per_store;
        let mut batch = Vec::new();
        while batch.len() < max {
            match self.decoder.next(&mut self.buf) {
                Ok(Some(payload)) => {
                    if batch.is_empty() {
                        batch.reserve(max.min(1024));
                    }
                    batch.push(self.record(payload));
                }
                Ok(None) => break,
                Err(e) => return (batch, Some(e)),
            }
        }
        (batch, None)
    }

    fn record(&self, payload: Bytes) -> Record {
        let record = Record::new(payload);
        match &self.peer_header {
            Some(peer) => record.with_header("peer", peer.clone()),
            None => record,
        }
    }

    fn submit(&mut self, batch: Vec<Record>) {
        let n = batch.len() as u64;
        let bytes: usize = batch.iter().map(|r| r.payload.len()).sum();
        let stats = &self.shared.stats;
        stats.add(Counter::Records, n);
        stats.add(Counter::Bytes, bytes as u64);
        let busy = self.activity.busy();
        self.in_flight.push(self.ctx.store(batch), n, busy);
    }

    /// Takes one resolved store: a success raises the durable count (and the acknowledgement).
    fn settle(&mut self, (records, result): (u64, Result<Stored, StoreError>)) -> Result<(), End> {
        match result {
            Ok(_) => {
                self.durable += records;
                self.shared.stats.add(Counter::Durable, records);
                if let Some(acks) = &self.acks {
                    acks.send_replace(self.durable);
                }
                Ok(())
            }
            Err(e) => Err(End::StoreFailed(e)),
        }
    }

    /// Waits for every outstanding store. Once shutdown is requested (now or while waiting), for
    /// at most close_timeout_ms; what is still outstanding then is not acknowledged.
    async fn drain(&mut self) -> Result<(), End> {
        let grace = Duration::from_millis(self.shared.config.close_timeout_ms);
        let ctx: &ReceiverContext = self.ctx;
        let shutdown = ctx.shutdown();
        let mut deadline = shutdown.is_requested().then(|| Instant::now() + grace);
        while !self.in_flight.is_empty() {
            tokio::select! {
                biased;
                r = self.in_flight.oldest() => self.settle(r)?,
                () = shutdown.requested(), if deadline.is_none() => {
                    deadline = Some(Instant::now() + grace);
                }
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    tracing::warn!(
                        peer = %self.peer,
                        calls = self.in_flight.len(),
                        "store calls still outstanding after close_timeout_ms of shutdown; \
                         closing without acknowledging them"
                    );
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Reads at most `want` bytes into `buf` (cancel-safe: nothing is read unless it is returned).
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<usize> {
    buf.reserve(want.min(READ_CHUNK));
    (&mut *rd).take(want as u64).read_buf(buf).await
}
