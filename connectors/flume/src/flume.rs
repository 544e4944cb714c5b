//! Flume's `AvroSourceProtocol` (`flume.avdl`): the protocol texts Flume clients hash, and the
//! codec of its messages.
//!
//! ```text
//! enum Status { OK, FAILED, UNKNOWN }
//! record AvroFlumeEvent { map<string> headers; bytes body; }
//! Status append(AvroFlumeEvent event);
//! Status appendBatch(array<AvroFlumeEvent> events);
//! ```

use bytes::Bytes;
use weir_receiver::{Header, Record};

use crate::ipc::datum::{write, DatumError, DatumReader};

/// The protocol text Flume releases up to 1.11.0 (and every Spark release) hash: MD5
/// `86aadae2c45474c0fe93ffd0f2350a65`. The server presents this one.
pub const AVRO_SOURCE_LEGACY: &str = include_str!("../protocols/AvroSourceProtocol.legacy.json");
/// The same protocol as Avro IDL 1.11.1 and later print it (the doc comment without its ` * `
/// prefixes): MD5 `8076c53714e01f6e2c1deb9544e7b1fe`.
pub const AVRO_SOURCE_AVRO1111: &str =
    include_str!("../protocols/AvroSourceProtocol.avro1111.json");

/// `append`'s message name.
pub const APPEND: &str = "append";
/// `appendBatch`'s message name.
pub const APPEND_BATCH: &str = "appendBatch";

/// Most headers read per event.
pub const MAX_HEADERS_PER_EVENT: u64 = 65_536;

/// Flume's `Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Stored: the agent commits its transaction.
    Ok,
    /// Not stored: the agent rolls back and retries.
    Failed,
    /// Unknown (never sent by weir).
    Unknown,
}

impl Status {
    /// Appends the enum's encoding.
    pub fn encode(self, out: &mut Vec<u8>) {
        write::long(
            out,
            match self {
                Status::Ok => 0,
                Status::Failed => 1,
                Status::Unknown => 2,
            },
        );
    }

    /// Reads one.
    ///
    /// # Errors
    /// An index outside the enum.
    pub fn decode(r: &mut DatumReader) -> Result<Status, DatumError> {
        Ok(match r.index("Status", 3)? {
            0 => Status::Ok,
            1 => Status::Failed,
            _ => Status::Unknown,
        })
    }
}

/// Reads one `AvroFlumeEvent` as a record: body as payload, headers in wire order.
///
/// # Errors
/// Malformed bytes.
pub fn decode_event(r: &mut DatumReader) -> Result<Record, DatumError> {
    let headers = r
        .string_map(MAX_HEADERS_PER_EVENT)?
        .into_iter()
        .map(|(name, value)| Header { name, value })
        .collect();
    let body = r.bytes()?;
    Ok(Record {
        payload: body,
        headers,
        ..Record::default()
    })
}

/// Reads `append`'s parameters: one event.
///
/// # Errors
/// Malformed bytes.
pub fn decode_append(r: &mut DatumReader) -> Result<Vec<Record>, DatumError> {
    Ok(vec![decode_event(r)?])
}

/// Reads `appendBatch`'s parameters: an array of at most `max_events` events.
///
/// # Errors
/// Malformed bytes, or more than `max_events` events.
pub fn decode_append_batch(
    r: &mut DatumReader,
    max_events: u64,
) -> Result<Vec<Record>, DatumError> {
    let mut out: Vec<Record> = Vec::new();
    loop {
        // An event takes at least 2 bytes: an empty map and an empty body.
        let n = r.block("appendBatch events", out.len() as u64, max_events, 2)?;
        if n == 0 {
            return Ok(out);
        }
        out.reserve(n as usize);
        for _ in 0..n {
            out.push(decode_event(r)?);
        }
    }
}

/// Appends one `AvroFlumeEvent`.
pub fn encode_event<K: AsRef<str>, V: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    headers: &[(K, V)],
    body: &[u8],
) {
    write::map(out, headers);
    write::bytes(out, body);
}

/// `appendBatch`'s parameters for `events` (headers, body).
pub fn encode_append_batch(events: &[(Vec<(String, String)>, Bytes)]) -> Vec<u8> {
    let mut out = Vec::new();
    if !events.is_empty() {
        write::long(&mut out, events.len() as i64);
        for (h, b) in events {
            encode_event(&mut out, h, b);
        }
    }
    write::long(&mut out, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_limits_hold() {
        let events = vec![
            (
                vec![("a".to_string(), "1".to_string())],
                Bytes::from_static(b"x"),
            ),
            (Vec::new(), Bytes::new()),
        ];
        let bytes = encode_append_batch(&events);
        let mut r = DatumReader::new(bytes.clone().into());
        let recs = decode_append_batch(&mut r, 10).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(&recs[0].payload[..], b"x");
        assert_eq!(recs[0].headers[0].name, "a");
        assert_eq!(&recs[0].headers[0].value[..], b"1");
        assert_eq!(r.remaining(), 0);
        let mut r = DatumReader::new(bytes.into());
        assert!(matches!(
            decode_append_batch(&mut r, 1),
            Err(DatumError::TooMany { .. })
        ));
        let mut out = Vec::new();
        Status::Failed.encode(&mut out);
        assert_eq!(
            Status::decode(&mut DatumReader::new(out.into())),
            Ok(Status::Failed)
        );
    }
}
