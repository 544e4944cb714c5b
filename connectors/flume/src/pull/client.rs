//! One connection to a pull sink: the crate's IPC [`Client`] with SparkFlumeProtocol's calls,
//! one at a time.

use std::time::Duration;

use crate::ipc::client::Client;
use crate::ipc::frame::FrameLimits;
use crate::ipc::protocol::Protocol;
use crate::spark::{
    encode_get_event_batch, encode_sequence_number, EventBatch, ACK, GET_EVENT_BATCH, NACK,
    SPARK_FLUME_LEGACY,
};

/// A connection to a pull sink.
pub(crate) struct SinkClient {
    conn: Client,
    max_events: u64,
}

impl SinkClient {
    /// Connects to `address` (within `timeout`).
    pub async fn connect(
        address: &str,
        deflate: bool,
        max_frame_bytes: usize,
        max_events: u64,
        request_timeout: Duration,
    ) -> Result<SinkClient, String> {
        let limits = FrameLimits {
            max_frame_bytes,
            max_buffers: 1 << 20,
        };
        let protocol = Protocol::parse(SPARK_FLUME_LEGACY)
            .map_err(|e| format!("the bundled SparkFlumeProtocol text: {e}"))?;
        Ok(SinkClient {
            conn: Client::connect(address, protocol, deflate, limits, request_timeout).await?,
            max_events,
        })
    }

    /// `getEventBatch(n)`; an Avro error reply becomes an error batch.
    pub async fn get_event_batch(&mut self, n: i32) -> Result<EventBatch, String> {
        match self
            .conn
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
        match self
            .conn
            .call(message, &encode_sequence_number(seq))
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "the sink answered {message}({seq}) with an error: {e}"
            )),
        }
    }
}
