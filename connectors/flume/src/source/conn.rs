//! One Flume agent's connection: read calls in order, store each call's events with one
//! `store()`, answer each call (by serial, in the order received) once its store resolved.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use weir_receiver::listener::{closed_by_gate, Activity, BusyGuard};
use weir_receiver::{ReceiverContext, StoreFuture};

use crate::flume::{self, Status};
use crate::ipc::frame::FrameLimits;
use crate::ipc::responder::{Call, ConnectionState, Incoming, Responder};
use crate::ipc::transport::{FrameReader, FrameWriter, TransportError};

use super::config::FlumeSourceConfig;
use super::stats::FlumeSourceStats;

/// What a connection shares with its receiver.
pub(crate) struct Shared {
    pub config: FlumeSourceConfig,
    pub stats: Arc<FlumeSourceStats>,
    pub responder: Responder,
}

/// A reply, ready or waiting for a store.
enum Pending {
    Ready(Vec<Vec<u8>>),
    Store {
        call: Call,
        events: u64,
        store: StoreFuture,
        /// The connection is not evicted until the call is answered.
        _busy: BusyGuard,
    },
}

/// Serves one connection until the peer closes it, it breaks a limit, it idles out, or the
/// receiver shuts down.
pub(crate) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    ctx: &ReceiverContext,
    shared: &Shared,
    activity: Activity,
) where
    S: AsyncRead + AsyncWrite + Send,
{
    let config = &shared.config;
    let (rd, wr) = tokio::io::split(stream);
    let limits = FrameLimits {
        max_frame_bytes: config.max_frame_bytes,
        max_buffers: config.max_buffers_per_frame,
    };
    let mut reader = FrameReader::new(rd, limits, config.deflate);
    let writer = FrameWriter::new(wr, config.deflate);
    let (tx, rx) = mpsc::channel::<(i32, Pending)>(config.max_in_flight);
    let (writer_failed_tx, mut writer_failed) = oneshot::channel::<()>();
    let write_side = write_replies(writer, rx, writer_failed_tx, peer, ctx, shared);
    let read_side = async {
        let mut state = ConnectionState::default();
        let idle = Duration::from_millis(config.idle_timeout_ms);
        let end = loop {
            let next = async {
                if idle.is_zero() {
                    Ok(reader.next().await)
                } else {
                    timeout(idle, reader.next()).await
                }
            };
            let frame = tokio::select! {
                biased;
                () = ctx.shutdown().requested() => break "shutdown".to_string(),
                _ = &mut writer_failed => break "writing a reply failed".to_string(),
                r = next => r,
            };
            let frame = match frame {
                Err(_) if tx.capacity() == tx.max_capacity() => {
                    FlumeSourceStats::add(&shared.stats.idle_closed, 1);
                    break format!("idle for {} ms", config.idle_timeout_ms);
                }
                Err(_) => continue, // calls outstanding: not idle
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) => break "closed by the client".to_string(),
                // Counted (and logged, rate-limited) by the gate.
                Ok(Err(TransportError::Io(e))) if closed_by_gate(&e).is_some() => {
                    break e.to_string();
                }
                Ok(Err(e)) => {
                    FlumeSourceStats::add(&shared.stats.malformed_closed, 1);
                    let msg = format!("connection from {peer} closed: {e}");
                    tracing::warn!(receiver = ctx.name(), "{msg}");
                    ctx.report_error(&msg);
                    break format!("malformed input: {e}");
                }
            };
            let pending = match shared.responder.respond(frame.payload, &mut state) {
                Err(e) => {
                    FlumeSourceStats::add(&shared.stats.malformed_closed, 1);
                    let msg = format!(
                        "connection from {peer} closed: request {} is malformed: {e}",
                        frame.serial
                    );
                    tracing::warn!(receiver = ctx.name(), "{msg}");
                    ctx.report_error(&msg);
                    break format!("malformed request: {e}");
                }
                Ok(Incoming::Reply(buffers)) => Pending::Ready(buffers),
                Ok(Incoming::Call(call)) => execute(call, peer, ctx, shared, &activity),
            };
            if tx.send((frame.serial, pending)).await.is_err() {
                break "writing a reply failed".to_string();
            }
        };
        drop(tx);
        end
    };
    let (end, ()) = tokio::join!(read_side, write_side);
    tracing::info!(receiver = ctx.name(), %peer, reason = %end, "connection closed");
}

/// Decodes a call's events and starts storing them.
fn execute(
    mut call: Call,
    peer: SocketAddr,
    ctx: &ReceiverContext,
    shared: &Shared,
    activity: &Activity,
) -> Pending {
    let decoded = match call.message.as_str() {
        flume::APPEND => flume::decode_append(&mut call.params),
        flume::APPEND_BATCH => {
            flume::decode_append_batch(&mut call.params, shared.config.max_events_per_batch as u64)
        }
        other => {
            FlumeSourceStats::add(&shared.stats.error_replies, 1);
            return Pending::Ready(call.error(&format!(
                "org.apache.avro.AvroRuntimeException: message {other} is not served here"
            )));
        }
    };
    let records = match decoded {
        Ok(r) => r,
        Err(e) => {
            FlumeSourceStats::add(&shared.stats.error_replies, 1);
            let msg = format!("{}: bad parameters from {peer}: {e}", call.message);
            tracing::warn!(receiver = ctx.name(), "{msg}");
            ctx.report_error(&msg);
            return Pending::Ready(
                call.error(&format!("org.apache.avro.AvroRuntimeException: {msg}")),
            );
        }
    };
    let stats = &shared.stats;
    let events = records.len() as u64;
    FlumeSourceStats::add(&stats.calls, 1);
    FlumeSourceStats::add(&stats.events, events);
    FlumeSourceStats::add(
        &stats.bytes,
        records.iter().map(|r| r.payload.len() as u64).sum(),
    );
    Pending::Store {
        call,
        events,
        store: ctx.store(records),
        _busy: activity.busy(),
    }
}

fn status_reply(call: &Call, status: Status) -> Vec<Vec<u8>> {
    let mut payload = Vec::with_capacity(1);
    status.encode(&mut payload);
    call.reply(&payload)
}

/// Answers calls in order as their stores resolve.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<(i32, Pending)>,
    failed: oneshot::Sender<()>,
    peer: SocketAddr,
    ctx: &ReceiverContext,
    shared: &Shared,
) {
    let close_timeout = Duration::from_millis(shared.config.close_timeout_ms);
    let stats = &shared.stats;
    while let Some((serial, pending)) = rx.recv().await {
        let buffers = match pending {
            Pending::Ready(b) => b,
            Pending::Store {
                call,
                events,
                mut store,
                _busy,
            } => {
                let result = tokio::select! {
                    r = &mut store => Some(r),
                    () = async {
                        ctx.shutdown().requested().await;
                        tokio::time::sleep_until(Instant::now() + close_timeout).await;
                    } => None,
                };
                let status = match result {
                    Some(Ok(_)) => {
                        FlumeSourceStats::add(&stats.events_durable, events);
                        Status::Ok
                    }
                    Some(Err(e)) => {
                        FlumeSourceStats::add(&stats.calls_failed, 1);
                        let msg = format!(
                            "{} of {events} events from {peer} answered FAILED (the agent \
                             retries): {e}",
                            call.message
                        );
                        tracing::warn!(receiver = ctx.name(), "{msg}");
                        ctx.report_error(&msg);
                        Status::Failed
                    }
                    None => {
                        FlumeSourceStats::add(&stats.calls_failed, 1);
                        tracing::warn!(
                            receiver = ctx.name(),
                            %peer,
                            "{} of {events} events answered FAILED: not durable within \
                             close_timeout_ms after shutdown was requested (the agent retries)",
                            call.message
                        );
                        Status::Failed
                    }
                };
                status_reply(&call, status)
            }
        };
        if let Err(e) = writer.write(serial, &buffers).await {
            tracing::warn!(receiver = ctx.name(), %peer, error = %e, "cannot send a reply");
            let _ = failed.send(());
            // Outstanding calls are not answered; the agent sees the connection fail and retries.
            return;
        }
    }
    let _ = writer.shutdown().await;
}
