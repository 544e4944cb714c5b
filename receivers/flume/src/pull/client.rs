//! One connection to a pull sink: the crate's [`Requestor`] over a framed socket, one call at a
//! time.

use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::ipc::frame::FrameLimits;
use crate::ipc::protocol::Protocol;
use crate::ipc::requestor::{Reply, Requestor};
use crate::ipc::transport::{FrameReader, FrameWriter};
use crate::spark::{
    encode_get_event_batch, encode_sequence_number, EventBatch, ACK, GET_EVENT_BATCH, NACK,
    SPARK_FLUME_LEGACY,
};

/// A connection to a pull sink.
pub(crate) struct SinkClient {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    requestor: Requestor,
    serial: i32,
    timeout: Duration,
    max_events: u64,
}

/// Most handshake round trips per call (`NONE`, then the call again with the protocol text).
const MAX_RESENDS: usize = 2;

impl SinkClient {
    /// Connects to `address` (within `timeout`).
    pub async fn connect(
        address: &str,
        deflate: bool,
        max_frame_bytes: usize,
        max_events: u64,
        request_timeout: Duration,
    ) -> Result<SinkClient, String> {
        let stream = timeout(request_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connecting timed out after {request_timeout:?}"))?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let limits = FrameLimits {
            max_frame_bytes,
            max_buffers: 1 << 20,
        };
        let protocol = Protocol::parse(SPARK_FLUME_LEGACY)
            .map_err(|e| format!("the bundled SparkFlumeProtocol text: {e}"))?;
        Ok(SinkClient {
            reader: FrameReader::new(rd, limits, deflate),
            writer: FrameWriter::new(wr, deflate),
            requestor: Requestor::new(protocol),
            serial: 0,
            timeout: request_timeout,
            max_events,
        })
    }

    /// One call; the reply's reader, or why the connection is unusable (an Avro error reply
    /// is returned as `Ok(Err(message))`: the connection stays usable).
    async fn call(
        &mut self,
        message: &str,
        params: &[u8],
    ) -> Result<Result<crate::ipc::datum::DatumReader, String>, String> {
        let limit = self.timeout;
        timeout(limit, async {
            for _ in 0..=MAX_RESENDS {
                self.serial = self.serial.wrapping_add(1);
                let buffers = self.requestor.encode_call(message, params);
                self.writer
                    .write(self.serial, &buffers)
                    .await
                    .map_err(|e| format!("sending {message}: {e}"))?;
                let frame = self
                    .reader
                    .next()
                    .await
                    .map_err(|e| format!("reading the reply to {message}: {e}"))?
                    .ok_or_else(|| format!("the sink closed the connection during {message}"))?;
                if frame.serial != self.serial {
                    return Err(format!(
                        "the reply to {message} carries serial {} instead of {}",
                        frame.serial, self.serial
                    ));
                }
                match self
                    .requestor
                    .decode_reply(message, frame.payload)
                    .map_err(|e| format!("{message}: {e}"))?
                {
                    Reply::Resend => continue,
                    Reply::Ok(r) => return Ok(Ok(r)),
                    Reply::Error(e) => return Ok(Err(e)),
                }
            }
            Err(format!("{message}: the handshake did not complete"))
        })
        .await
        .map_err(|_| format!("{message} got no reply within {limit:?}"))?
    }

    /// `getEventBatch(n)`; an Avro error reply becomes an error batch.
    pub async fn get_event_batch(&mut self, n: i32) -> Result<EventBatch, String> {
        match self
            .call(GET_EVENT_BATCH, &encode_get_event_batch(n))
            .await?
        {
            Ok(mut r) => EventBatch::decode(&mut r, self.max_events)
                .map_err(|e| format!("malformed EventBatch: {e}")),
            Err(e) => Ok(EventBatch::error(format!(
                "the sink answered an error: {e}"
            ))),
        }
    }

    /// `ack(seq)` (`nack` when `ack` is false).
    pub async fn settle(&mut self, seq: &str, ack: bool) -> Result<(), String> {
        let message = if ack { ACK } else { NACK };
        match self.call(message, &encode_sequence_number(seq)).await? {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "the sink answered {message}({seq}) with an error: {e}"
            )),
        }
    }
}
