//! The block format: one WAL record holds one block.
//!
//! Records are encoded straight into the block buffer as `store()` receives them (a block is
//! encoded once, never re-serialised); the block's metadata goes into a trailer written when the
//! block is cut, because only then is it known:
//!
//! ```text
//! record*                          each: flags u8 | varint len | payload
//!                                        [| varint len | key]                     flags & 1
//!                                        [| varint n | (varint len | name | varint len | value)*]  & 2
//!                                        [| varint stream | zigzag partition | varint offset]     & 4
//! trailer:
//!   varint n | (varint len | stream name)*      names used by positions and the checkpoint
//!   varint n | (varint stream | zigzag partition | varint offset)*   the receiver's checkpoint
//!   varint len | receiver name
//!   record_count u32 | created_ms u64 | records_len u32 | version u8 (1) | magic u8 (b'B')
//! ```
//!
//! Integers in the fixed tail are little-endian. The WAL's CRC covers the whole block, so decoding
//! errors mean a bug or a foreign record, and are reported, never panicked on.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use weir_receiver::{Checkpoint, Header, Position, Record};

const MAGIC: u8 = b'B';
const VERSION: u8 = 1;
const FIXED_TAIL: usize = 4 + 8 + 4 + 1 + 1;

const HAS_KEY: u8 = 1;
const HAS_HEADERS: u8 = 2;
const HAS_POSITION: u8 = 4;

/// A block that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed block: {0}")]
pub struct BlockDecodeError(pub String);

fn bad(msg: impl Into<String>) -> BlockDecodeError {
    BlockDecodeError(msg.into())
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn zigzag(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn unzigzag(v: u64) -> Result<i32, BlockDecodeError> {
    let v = u32::try_from(v).map_err(|_| bad("partition out of range"))?;
    Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
}

/// Accumulates encoded records for one block.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    buf: BytesMut,
    /// Capacity of each new block's buffer: blocks are cut before they outgrow it, so the
    /// buffer never reallocates (and never doubles its memory) while records are added.
    capacity: usize,
    records: u32,
    streams: HashMap<Arc<str>, u64>,
    stream_names: Vec<Arc<str>>,
}

impl BlockBuilder {
    /// An empty block with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        BlockBuilder {
            buf: BytesMut::new(),
            capacity,
            ..BlockBuilder::default()
        }
    }

    /// Encoded bytes so far (without the trailer).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Number of records so far.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// True if no record was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    fn stream_index(&mut self, name: &Arc<str>) -> u64 {
        if let Some(i) = self.streams.get(name) {
            return *i;
        }
        let i = self.stream_names.len() as u64;
        self.streams.insert(name.clone(), i);
        self.stream_names.push(name.clone());
        i
    }

    /// Appends one record.
    pub fn push(&mut self, r: &Record) {
        let mut flags = 0;
        if r.key.is_some() {
            flags |= HAS_KEY;
        }
        if !r.headers.is_empty() {
            flags |= HAS_HEADERS;
        }
        if r.position.is_some() {
            flags |= HAS_POSITION;
        }
        if self.buf.capacity() == 0 {
            self.buf = BytesMut::with_capacity(self.capacity);
        }
        self.buf.reserve(r.payload.len() + 11);
        self.buf.put_u8(flags);
        put_varint(&mut self.buf, r.payload.len() as u64);
        self.buf.put_slice(&r.payload);
        if let Some(k) = &r.key {
            put_varint(&mut self.buf, k.len() as u64);
            self.buf.put_slice(k);
        }
        if !r.headers.is_empty() {
            put_varint(&mut self.buf, r.headers.len() as u64);
            for h in &r.headers {
                put_varint(&mut self.buf, h.name.len() as u64);
                self.buf.put_slice(h.name.as_bytes());
                put_varint(&mut self.buf, h.value.len() as u64);
                self.buf.put_slice(&h.value);
            }
        }
        if let Some(p) = &r.position {
            let i = self.stream_index(&p.stream);
            put_varint(&mut self.buf, i);
            put_varint(&mut self.buf, zigzag(p.partition));
            put_varint(&mut self.buf, p.offset);
        }
        self.records += 1;
    }

    /// Writes the trailer and returns the finished block, leaving this builder empty.
    pub fn finish(&mut self, receiver: &str, checkpoint: &Checkpoint, created_ms: u64) -> Bytes {
        let records_len = self.buf.len();
        let entries: Vec<(u64, i32, u64)> = checkpoint
            .iter()
            .map(|(s, p, o)| (self.stream_index(&Arc::from(s)), p, o))
            .collect();
        let mut buf = std::mem::take(&mut self.buf);
        put_varint(&mut buf, self.stream_names.len() as u64);
        for s in &self.stream_names {
            put_varint(&mut buf, s.len() as u64);
            buf.put_slice(s.as_bytes());
        }
        put_varint(&mut buf, entries.len() as u64);
        for (i, p, o) in entries {
            put_varint(&mut buf, i);
            put_varint(&mut buf, zigzag(p));
            put_varint(&mut buf, o);
        }
        put_varint(&mut buf, receiver.len() as u64);
        buf.put_slice(receiver.as_bytes());
        buf.put_u32_le(self.records);
        buf.put_u64_le(created_ms);
        buf.put_u32_le(records_len as u32);
        buf.put_u8(VERSION);
        buf.put_u8(MAGIC);
        self.records = 0;
        self.streams.clear();
        self.stream_names.clear();
        buf.freeze()
    }
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Result<u8, BlockDecodeError> {
        let b = *self.data.get(self.pos).ok_or_else(|| bad("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, BlockDecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }

    fn take(&mut self) -> Result<std::ops::Range<usize>, BlockDecodeError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| bad("length out of range"))?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| bad("length beyond the end of the block"))?;
        let r = self.pos..end;
        self.pos = end;
        Ok(r)
    }
}

/// A decoded block: its metadata, plus lazy access to its records.
#[derive(Debug, Clone)]
pub struct DecodedBlock {
    bytes: Bytes,
    records_len: usize,
    streams: Vec<Arc<str>>,
    /// The receiver that stored it.
    pub receiver: Arc<str>,
    /// Number of records.
    pub record_count: u32,
    /// When the block was cut (ms since the Unix epoch).
    pub created_ms: u64,
    /// The receiver's checkpoint when the block was cut.
    pub checkpoint: Checkpoint,
}

impl DecodedBlock {
    /// Decodes a block's trailer.
    ///
    /// # Errors
    /// [`BlockDecodeError`] when the bytes are not a block of this format.
    pub fn decode(bytes: Bytes) -> Result<Self, BlockDecodeError> {
        let n = bytes.len();
        if n < FIXED_TAIL {
            return Err(bad(format!("{n} bytes is shorter than a block trailer")));
        }
        let tail = &bytes[n - FIXED_TAIL..];
        if tail[FIXED_TAIL - 1] != MAGIC {
            return Err(bad("no block magic"));
        }
        if tail[FIXED_TAIL - 2] != VERSION {
            return Err(bad(format!(
                "block format version {} (this build reads {VERSION})",
                tail[FIXED_TAIL - 2]
            )));
        }
        let record_count = u32::from_le_bytes(tail[0..4].try_into().expect("4 bytes"));
        let created_ms = u64::from_le_bytes(tail[4..12].try_into().expect("8 bytes"));
        let records_len = u32::from_le_bytes(tail[12..16].try_into().expect("4 bytes")) as usize;
        if records_len > n - FIXED_TAIL {
            return Err(bad("records section longer than the block"));
        }
        let mut c = Cursor {
            data: &bytes[..n - FIXED_TAIL],
            pos: records_len,
        };
        let ns = c.varint()?;
        let mut streams = Vec::new();
        for _ in 0..ns {
            let r = c.take()?;
            let s = std::str::from_utf8(&c.data[r]).map_err(|_| bad("stream name not UTF-8"))?;
            streams.push(Arc::<str>::from(s));
        }
        let nc = c.varint()?;
        let mut checkpoint = Checkpoint::new();
        for _ in 0..nc {
            let i = c.varint()?;
            let s = streams
                .get(i as usize)
                .ok_or_else(|| bad("checkpoint names an unknown stream"))?
                .clone();
            let p = unzigzag(c.varint()?)?;
            let o = c.varint()?;
            checkpoint.raise(s, p, o);
        }
        let r = c.take()?;
        let receiver =
            std::str::from_utf8(&c.data[r]).map_err(|_| bad("receiver name not UTF-8"))?;
        let receiver = Arc::<str>::from(receiver);
        if c.pos != c.data.len() {
            return Err(bad("trailing bytes after the block trailer"));
        }
        Ok(DecodedBlock {
            bytes,
            records_len,
            streams,
            receiver,
            record_count,
            created_ms,
            checkpoint,
        })
    }

    /// The block's records, decoded on the fly (payloads share the block's buffer).
    pub fn records(&self) -> RecordIter<'_> {
        RecordIter {
            block: self,
            pos: 0,
            left: self.record_count,
        }
    }

    /// Decodes every record.
    ///
    /// # Errors
    /// [`BlockDecodeError`] on a malformed record.
    pub fn to_vec(&self) -> Result<Vec<Record>, BlockDecodeError> {
        self.records().collect()
    }
}

/// Iterator over a block's records.
#[derive(Debug)]
pub struct RecordIter<'a> {
    block: &'a DecodedBlock,
    pos: usize,
    left: u32,
}

impl RecordIter<'_> {
    fn next_record(&mut self) -> Result<Record, BlockDecodeError> {
        let b = self.block;
        let mut c = Cursor {
            data: &b.bytes[..b.records_len],
            pos: self.pos,
        };
        let flags = c.u8()?;
        if flags & !(HAS_KEY | HAS_HEADERS | HAS_POSITION) != 0 {
            return Err(bad(format!("unknown record flags {flags:#x}")));
        }
        let payload = b.bytes.slice(c.take()?);
        let key = if flags & HAS_KEY != 0 {
            Some(b.bytes.slice(c.take()?))
        } else {
            None
        };
        let mut headers = Vec::new();
        if flags & HAS_HEADERS != 0 {
            let n = c.varint()?;
            for _ in 0..n {
                let r = c.take()?;
                let name = std::str::from_utf8(&c.data[r])
                    .map_err(|_| bad("header name not UTF-8"))?
                    .to_string();
                let value = b.bytes.slice(c.take()?);
                headers.push(Header { name, value });
            }
        }
        let position = if flags & HAS_POSITION != 0 {
            let i = c.varint()?;
            let stream = b
                .streams
                .get(i as usize)
                .ok_or_else(|| bad("record names an unknown stream"))?
                .clone();
            let partition = unzigzag(c.varint()?)?;
            let offset = c.varint()?;
            Some(Position {
                stream,
                partition,
                offset,
            })
        } else {
            None
        };
        self.pos = c.pos;
        Ok(Record {
            payload,
            key,
            headers,
            position,
        })
    }
}

impl Iterator for RecordIter<'_> {
    type Item = Result<Record, BlockDecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return (self.pos != self.block.records_len)
                .then(|| Err(bad("bytes left after the last record")))
                .inspect(|_| self.pos = self.block.records_len);
        }
        self.left -= 1;
        let r = self.next_record();
        if r.is_err() {
            self.left = 0;
            self.pos = self.block.records_len;
        }
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::collection::vec(
                ("[a-z]{0,5}", proptest::collection::vec(any::<u8>(), 0..8)),
                0..3,
            ),
            proptest::option::of((0..3usize, any::<i32>(), any::<u64>())),
        )
            .prop_map(|(p, k, h, pos)| {
                let mut r = Record::new(p);
                r.key = k.map(Bytes::from);
                for (n, v) in h {
                    r = r.with_header(n, v);
                }
                r.position = pos.map(|(s, p, o)| Position::offset(["a", "bb", "ccc"][s], p, o));
                r
            })
    }

    proptest! {
        #[test]
        fn blocks_round_trip(records in proptest::collection::vec(record(), 0..40), ms in any::<u64>()) {
            let mut b = BlockBuilder::default();
            let mut cp = Checkpoint::new();
            for r in &records {
                b.push(r);
                if let Some(p) = &r.position { cp.observe(p); }
            }
            cp.raise(Arc::from("only-in-checkpoint"), -3, 9);
            let bytes = b.finish("recv", &cp, ms);
            prop_assert!(b.is_empty());
            let d = DecodedBlock::decode(bytes.clone()).unwrap();
            prop_assert_eq!(&*d.receiver, "recv");
            prop_assert_eq!(d.record_count as usize, records.len());
            prop_assert_eq!(d.created_ms, ms);
            prop_assert_eq!(&d.checkpoint, &cp);
            prop_assert_eq!(d.to_vec().unwrap(), records);
            // Any truncation or trailing junk is an error, never a panic.
            for cut in [0, 1, bytes.len() / 2, bytes.len().saturating_sub(1)] {
                if let Ok(d) = DecodedBlock::decode(bytes.slice(..cut)) {
                    let _ = d.to_vec();
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = bytes;
            if bytes.len() >= 2 {
                let n = bytes.len();
                bytes[n - 1] = MAGIC;
                bytes[n - 2] = VERSION;
            }
            if let Ok(d) = DecodedBlock::decode(Bytes::from(bytes)) {
                let _ = d.records().take(1000).count();
            }
        }
    }

    #[test]
    fn foreign_bytes_are_a_clear_error() {
        let e = DecodedBlock::decode(Bytes::from_static(b"hello world, not a block")).unwrap_err();
        assert_eq!(e.to_string(), "malformed block: no block magic");
        let mut b = BlockBuilder::default();
        b.push(&Record::new("x"));
        let mut v = b.finish("r", &Checkpoint::new(), 0).to_vec();
        let n = v.len();
        v[n - 2] = 9;
        let e = DecodedBlock::decode(Bytes::from(v)).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
    }
}
