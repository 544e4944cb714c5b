//! Spark's `SparkFlumeProtocol` (`sparkflume.avdl`, the pull sink of `spark-streaming-flume`):
//! the protocol text Spark hashes, and the codec of its messages.
//!
//! ```text
//! record SparkSinkEvent { map<string> headers; bytes body; }
//! record EventBatch { string errorMsg = ""; string sequenceNumber; array<SparkSinkEvent> events; }
//! EventBatch getEventBatch(int n);
//! void ack(string sequenceNumber);
//! void nack(string sequenceNumber);
//! ```
//!
//! A batch with a non-empty `errorMsg` is an error batch: it carries no events and must not be
//! acknowledged.

use weir_receiver::{Header, Record};

use crate::flume::{encode_event, MAX_HEADERS_PER_EVENT};
use crate::ipc::datum::{write, DatumError, DatumReader};

/// The protocol text every Spark release hashes (generated with Avro < 1.11.1): MD5
/// `45f3c2c4aa53244ceaacda6731dedffb`.
pub const SPARK_FLUME_LEGACY: &str = include_str!("../protocols/SparkFlumeProtocol.legacy.json");

/// `getEventBatch`'s message name.
pub const GET_EVENT_BATCH: &str = "getEventBatch";
/// `ack`'s message name.
pub const ACK: &str = "ack";
/// `nack`'s message name.
pub const NACK: &str = "nack";

/// One `EventBatch`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBatch {
    /// Empty for a valid batch; otherwise why the sink could not serve (no events).
    pub error_msg: String,
    /// The transaction's sequence number (opaque; acknowledge with it).
    pub sequence_number: String,
    /// The events: body as payload, headers in wire order.
    pub events: Vec<Record>,
}

impl EventBatch {
    /// An error batch.
    pub fn error(message: impl Into<String>) -> Self {
        EventBatch {
            error_msg: message.into(),
            ..EventBatch::default()
        }
    }

    /// True for an error batch.
    pub fn is_error(&self) -> bool {
        !self.error_msg.is_empty()
    }

    /// Appends the batch's encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write::string(out, &self.error_msg);
        write::string(out, &self.sequence_number);
        if !self.events.is_empty() {
            write::long(out, self.events.len() as i64);
            for e in &self.events {
                let headers: Vec<(&str, &[u8])> = e
                    .headers
                    .iter()
                    .map(|h| (h.name.as_str(), &h.value[..]))
                    .collect();
                encode_event(out, &headers, &e.payload);
            }
        }
        write::long(out, 0);
    }

    /// Reads one batch of at most `max_events` events.
    ///
    /// # Errors
    /// Malformed bytes, or more than `max_events` events.
    pub fn decode(r: &mut DatumReader, max_events: u64) -> Result<EventBatch, DatumError> {
        let error_msg = r.string()?;
        let sequence_number = r.string()?;
        let mut events: Vec<Record> = Vec::new();
        loop {
            // An event takes at least 2 bytes: an empty map and an empty body.
            let n = r.block("EventBatch events", events.len() as u64, max_events, 2)?;
            if n == 0 {
                break;
            }
            events.reserve(n as usize);
            for _ in 0..n {
                let headers = r
                    .string_map(MAX_HEADERS_PER_EVENT)?
                    .into_iter()
                    .map(|(name, value)| Header { name, value })
                    .collect();
                let body = r.bytes()?;
                events.push(Record {
                    payload: body,
                    headers,
                    ..Record::default()
                });
            }
        }
        Ok(EventBatch {
            error_msg,
            sequence_number,
            events,
        })
    }
}

/// `getEventBatch`'s parameters.
pub fn encode_get_event_batch(n: i32) -> Vec<u8> {
    let mut out = Vec::new();
    write::long(&mut out, i64::from(n));
    out
}

/// `ack`'s and `nack`'s parameters.
pub fn encode_sequence_number(seq: &str) -> Vec<u8> {
    let mut out = Vec::new();
    write::string(&mut out, seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::protocol::{hex, Protocol};

    #[test]
    fn the_text_hashes_as_spark_sends_it_and_batches_round_trip() {
        let p = Protocol::parse(SPARK_FLUME_LEGACY).unwrap();
        assert_eq!(hex(&p.hash()), "45f3c2c4aa53244ceaacda6731dedffb");
        for m in [GET_EVENT_BATCH, ACK, NACK] {
            assert!(p.message(m).is_some(), "{m}");
        }
        let batch = EventBatch {
            error_msg: String::new(),
            sequence_number: "abc1".into(),
            events: vec![
                Record::new("x").with_header("h", "v"),
                Record::new(Vec::new()),
            ],
        };
        let mut out = Vec::new();
        batch.encode(&mut out);
        let mut r = DatumReader::new(out.clone().into());
        assert_eq!(EventBatch::decode(&mut r, 10).unwrap(), batch);
        assert_eq!(r.remaining(), 0);
        let mut r = DatumReader::new(out.into());
        assert!(EventBatch::decode(&mut r, 1).is_err());
        let mut out = Vec::new();
        EventBatch::error("nothing").encode(&mut out);
        let b = EventBatch::decode(&mut DatumReader::new(out.into()), 10).unwrap();
        assert!(b.is_error() && b.events.is_empty());
        let mut r = DatumReader::new(encode_get_event_batch(-3).into());
        assert_eq!(r.int().unwrap(), -3);
        let mut r = DatumReader::new(encode_sequence_number("s").into());
        assert_eq!(r.string().unwrap(), "s");
    }
}
