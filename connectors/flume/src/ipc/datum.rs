//! Avro binary encoding of the primitive values the IPC layer and Flume's events use, decoded
//! from untrusted bytes without panicking and without allocating more than the input holds.
//!
//! Longs and ints are zig-zag varints; `bytes` and `string` are a long length and the bytes;
//! maps and arrays are blocks of `count` items ended by a zero count (a negative count is followed
//! by the block's byte size). Every length is checked against the bytes actually left before
//! anything is allocated, so a forged length costs an error, not memory.

use bytes::Bytes;

/// Why Avro bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatumError {
    /// The input ended inside a value.
    #[error("truncated Avro datum: {what} needs {need} more bytes, {have} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes left.
        have: usize,
    },
    /// A varint longer than 10 bytes, or one that overflows 64 bits.
    #[error("invalid Avro varint")]
    BadVarint,
    /// A negative length, or an `int` out of range.
    #[error("invalid Avro {what}: {value}")]
    BadValue {
        /// What was being read.
        what: &'static str,
        /// The value found.
        value: i64,
    },
    /// A string that is not UTF-8.
    #[error("an Avro string is not valid UTF-8")]
    NotUtf8,
    /// An array or map with more items than allowed.
    #[error("{what} holds {count} items, more than the limit of {max}")]
    TooMany {
        /// What was being read.
        what: &'static str,
        /// Items announced so far.
        count: u64,
        /// The limit.
        max: u64,
    },
}

/// Reads Avro values from a [`Bytes`] buffer; `bytes` values are zero-copy slices of it.
#[derive(Debug, Clone)]
pub struct DatumReader {
    buf: Bytes,
    pos: usize,
}

impl DatumReader {
    /// A reader at the start of `buf`.
    pub fn new(buf: Bytes) -> Self {
        DatumReader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The unread rest, as a slice of the buffer.
    pub fn rest(&self) -> Bytes {
        self.buf.slice(self.pos..)
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<Bytes, DatumError> {
        let have = self.remaining();
        if n > have as u64 {
            return Err(DatumError::Truncated {
                what,
                need: n,
                have,
            });
        }
        let n = n as usize;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// A zig-zag varint `long`.
    ///
    /// # Errors
    /// Truncated input or an over-long varint.
    pub fn long(&mut self) -> Result<i64, DatumError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(DatumError::Truncated {
                    what: "varint",
                    need: 1,
                    have: 0,
                });
            };
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(DatumError::BadVarint);
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(DatumError::BadVarint)
    }

    /// An `int` (a varint in the 32-bit range).
    ///
    /// # Errors
    /// As [`DatumReader::long`], or a value outside `i32`.
    pub fn int(&mut self) -> Result<i32, DatumError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| DatumError::BadValue {
            what: "int",
            value: v,
        })
    }

    /// A `boolean` (one byte, 0 or 1).
    ///
    /// # Errors
    /// Truncated input or a byte other than 0 and 1.
    pub fn boolean(&mut self) -> Result<bool, DatumError> {
        match self.take(1, "boolean")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DatumError::BadValue {
                what: "boolean",
                value: i64::from(b),
            }),
        }
    }

    fn length(&mut self, what: &'static str) -> Result<u64, DatumError> {
        let n = self.long()?;
        u64::try_from(n).map_err(|_| DatumError::BadValue { what, value: n })
    }

    /// A `bytes` value, as a slice of the buffer.
    ///
    /// # Errors
    /// A negative or too large length.
    pub fn bytes(&mut self) -> Result<Bytes, DatumError> {
        let n = self.length("bytes length")?;
        self.take(n, "bytes")
    }

    /// A `string` value.
    ///
    /// # Errors
    /// As [`DatumReader::bytes`], or invalid UTF-8.
    pub fn string(&mut self) -> Result<String, DatumError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DatumError::NotUtf8)
    }

    /// A `fixed` of `N` bytes.
    ///
    /// # Errors
    /// Truncated input.
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DatumError> {
        let b = self.take(N as u64, "fixed")?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    /// The index of a union branch or enum symbol, checked against `count` branches.
    ///
    /// # Errors
    /// An index outside `0..count`.
    pub fn index(&mut self, what: &'static str, count: u32) -> Result<u32, DatumError> {
        let i = self.long()?;
        match u32::try_from(i) {
            Ok(i) if i < count => Ok(i),
            _ => Err(DatumError::BadValue { what, value: i }),
        }
    }

    /// The item count of the next array or map block (0 ends the array or map). A negative count
    /// is followed by the block's size in bytes, which is read and ignored. `seen` is the number
    /// of items so far, checked with the new block against `max`; every item takes at least
    /// `min_item_bytes` of input, which bounds the count by the bytes left.
    ///
    /// # Errors
    /// A count over `max`, or more items than the input can hold.
    pub fn block(
        &mut self,
        what: &'static str,
        seen: u64,
        max: u64,
        min_item_bytes: usize,
    ) -> Result<u64, DatumError> {
        let n = self.long()?;
        let count = if n < 0 {
            self.length("block size")?;
            n.unsigned_abs()
        } else {
            n as u64
        };
        let total = seen.saturating_add(count);
        if total > max {
            return Err(DatumError::TooMany {
                what,
                count: total,
                max,
            });
        }
        let need = count.saturating_mul(min_item_bytes.max(1) as u64);
        if need > self.remaining() as u64 {
            return Err(DatumError::Truncated {
                what,
                need,
                have: self.remaining(),
            });
        }
        Ok(count)
    }

    /// A `map<string>` as (key, value) pairs in wire order, at most `max` entries.
    ///
    /// # Errors
    /// Any malformed block, key or value.
    pub fn string_map(&mut self, max: u64) -> Result<Vec<(String, Bytes)>, DatumError> {
        let mut out = Vec::new();
        loop {
            let n = self.block("map", out.len() as u64, max, 2)?;
            if n == 0 {
                return Ok(out);
            }
            out.reserve(n as usize);
            for _ in 0..n {
                let k = self.string()?;
                let v = self.bytes()?;
                if std::str::from_utf8(&v).is_err() {
                    return Err(DatumError::NotUtf8);
                }
                out.push((k, v));
            }
        }
    }

    /// A `map<bytes>` (IPC metadata), at most `max` entries.
    ///
    /// # Errors
    /// Any malformed block, key or value.
    pub fn bytes_map(&mut self, max: u64) -> Result<Vec<(String, Bytes)>, DatumError> {
        let mut out = Vec::new();
        loop {
            let n = self.block("map", out.len() as u64, max, 2)?;
            if n == 0 {
                return Ok(out);
            }
            out.reserve(n as usize);
            for _ in 0..n {
                let k = self.string()?;
                let v = self.bytes()?;
                out.push((k, v));
            }
        }
    }
}

/// Appends Avro values to a `Vec<u8>`.
pub mod write {
    /// A zig-zag varint `long`.
    pub fn long(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    /// A `boolean`.
    pub fn boolean(out: &mut Vec<u8>, v: bool) {
        out.push(u8::from(v));
    }

    /// A `bytes` value.
    pub fn bytes(out: &mut Vec<u8>, v: &[u8]) {
        long(out, v.len() as i64);
        out.extend_from_slice(v);
    }

    /// A `string` value.
    pub fn string(out: &mut Vec<u8>, v: &str) {
        bytes(out, v.as_bytes());
    }

    /// A map of string or bytes values (one block, then the end marker).
    pub fn map<K: AsRef<str>, V: AsRef<[u8]>>(out: &mut Vec<u8>, entries: &[(K, V)]) {
        if !entries.is_empty() {
            long(out, entries.len() as i64);
            for (k, v) in entries {
                string(out, k.as_ref());
                bytes(out, v.as_ref());
            }
        }
        long(out, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(b: &[u8]) -> DatumReader {
        DatumReader::new(Bytes::copy_from_slice(b))
    }

    #[test]
    fn longs_round_trip_through_zigzag_varints() {
        for v in [
            0,
            1,
            -1,
            63,
            -64,
            64,
            300,
            i64::from(i32::MAX),
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = Vec::new();
            write::long(&mut out, v);
            let mut r = reader(&out);
            assert_eq!(r.long().unwrap(), v);
            assert_eq!(r.remaining(), 0);
        }
        let mut out = Vec::new();
        write::long(&mut out, 11);
        assert_eq!(out, [0x16]);
    }

    #[test]
    fn malformed_values_are_errors_not_panics_or_allocations() {
        assert_eq!(reader(&[0xff; 11]).long(), Err(DatumError::BadVarint));
        assert!(matches!(
            reader(&[0x80]).long(),
            Err(DatumError::Truncated { .. })
        ));
        // A length of 2^62 with nothing behind it.
        let mut huge = Vec::new();
        write::long(&mut huge, 1 << 62);
        assert!(matches!(
            reader(&huge).bytes(),
            Err(DatumError::Truncated { .. })
        ));
        assert!(matches!(
            reader(&[0x01]).bytes(),
            Err(DatumError::BadValue { .. })
        ));
        assert_eq!(reader(&[0x02, 0xff]).string(), Err(DatumError::NotUtf8));
        assert!(matches!(
            reader(&[2]).boolean(),
            Err(DatumError::BadValue { .. })
        ));
        // A map announcing a billion entries in three bytes.
        let mut m = Vec::new();
        write::long(&mut m, 1_000_000_000);
        assert!(matches!(
            reader(&m).string_map(u64::MAX),
            Err(DatumError::Truncated { .. })
        ));
        assert!(matches!(
            reader(&m).string_map(10),
            Err(DatumError::TooMany { .. })
        ));
    }

    #[test]
    fn negative_block_counts_carry_a_byte_size() {
        // map<bytes> with one block of -1 items and a byte size of 4: {"a": "b"}.
        let r = reader(&[0x01, 0x08, 0x02, b'a', 0x02, b'b', 0x00]).bytes_map(8);
        assert_eq!(
            r.unwrap(),
            vec![("a".to_string(), Bytes::from_static(b"b"))]
        );
    }
}
