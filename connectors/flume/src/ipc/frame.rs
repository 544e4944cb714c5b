//! Avro's Netty framing (`NettyTransportCodec`): one call or reply is one frame,
//!
//! ```text
//! serial: i32 BE | count: i32 BE | count × (len: i32 BE | len bytes)
//! ```
//!
//! A reply carries its request's serial. The buffers are one byte stream cut anywhere (Java cuts
//! every 8 KiB, even inside a value; zero-length buffers occur), so they are concatenated before
//! decoding. [`FrameDecoder`] checks the limits as soon as the headers that break them arrive,
//! so a forged count or length is refused before its bytes are awaited or allocated.

use bytes::{Buf, Bytes, BytesMut};

/// Bytes of the `serial` and `count` fields.
pub const FRAME_HEAD_BYTES: usize = 8;
/// Bytes of one buffer's length field.
pub const BUFFER_HEAD_BYTES: usize = 4;
/// Where Java's `ByteBufferOutputStream` cuts its buffers, and where [`encode_frame`] callers
/// usually split large payloads.
pub const JAVA_BUFFER_BYTES: usize = 8192;

/// Limits a [`FrameDecoder`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame: headers and buffers together, bytes.
    pub max_frame_bytes: usize,
    /// Most buffers in one frame.
    pub max_buffers: usize,
}

/// One decoded frame: its serial and its buffers concatenated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The request's serial (a reply carries the same one).
    pub serial: i32,
    /// The payload: every buffer of the frame, concatenated.
    pub payload: Bytes,
    /// How many buffers it came in.
    pub buffers: usize,
}

/// A malformed or oversized frame. The connection that sent it cannot be read any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A negative buffer count.
    #[error("frame {serial}: negative buffer count {count}")]
    NegativeCount {
        /// The frame's serial.
        serial: i32,
        /// The count found.
        count: i32,
    },
    /// More buffers than allowed.
    #[error("frame {serial}: {count} buffers, more than max_buffers_per_frame = {max}")]
    TooManyBuffers {
        /// The frame's serial.
        serial: i32,
        /// The count found.
        count: i32,
        /// The limit.
        max: usize,
    },
    /// A negative buffer length.
    #[error("frame {serial}: buffer {index} has a negative length {len}")]
    NegativeLength {
        /// The frame's serial.
        serial: i32,
        /// Which buffer.
        index: usize,
        /// The length found.
        len: i32,
    },
    /// A frame larger than allowed.
    #[error("frame {serial}: at least {bytes} bytes, more than max_frame_bytes = {max}")]
    TooLarge {
        /// The frame's serial.
        serial: i32,
        /// Bytes announced so far.
        bytes: u64,
        /// The limit.
        max: usize,
    },
}

/// Splits a byte stream into frames. Feed bytes with [`FrameDecoder::extend`], take frames with
/// [`FrameDecoder::decode`].
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new(limits: FrameLimits) -> Self {
        FrameDecoder {
            limits,
            buf: BytesMut::new(),
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The internal buffer, for reading into directly.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received and not yet part of a returned frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, or `None` if more bytes are needed.
    ///
    /// # Errors
    /// [`FrameError`] as soon as the bytes received show the frame is malformed or too large;
    /// the decoder is then unusable.
    pub fn decode(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(total) = self.scan()? else {
            return Ok(None);
        };
        let mut frame = self.buf.split_to(total);
        let serial = frame.get_i32();
        let count = frame.get_i32() as usize;
        if count == 1 {
            frame.advance(BUFFER_HEAD_BYTES);
            return Ok(Some(Frame {
                serial,
                payload: frame.freeze(),
                buffers: 1,
            }));
        }
        let mut payload =
            BytesMut::with_capacity(total - FRAME_HEAD_BYTES - BUFFER_HEAD_BYTES * count);
        for _ in 0..count {
            let len = frame.get_i32() as usize;
            payload.extend_from_slice(&frame[..len]);
            frame.advance(len);
        }
        Ok(Some(Frame {
            serial,
            payload: payload.freeze(),
            buffers: count,
        }))
    }

    /// Checks the headers present; `Some(total frame bytes)` once the whole frame is here.
    fn scan(&self) -> Result<Option<usize>, FrameError> {
        let b = &self.buf[..];
        if b.len() < FRAME_HEAD_BYTES {
            return Ok(None);
        }
        let serial = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let count = i32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if count < 0 {
            return Err(FrameError::NegativeCount { serial, count });
        }
        if count as usize > self.limits.max_buffers {
            return Err(FrameError::TooManyBuffers {
                serial,
                count,
                max: self.limits.max_buffers,
            });
        }
        let max = self.limits.max_frame_bytes;
        // Headers alone must fit.
        let mut at = FRAME_HEAD_BYTES as u64;
        let heads = at + (count as u64) * BUFFER_HEAD_BYTES as u64;
        if heads > max as u64 {
            return Err(FrameError::TooLarge {
                serial,
                bytes: heads,
                max,
            });
        }
        for index in 0..count as usize {
            let p = at as usize;
            let Some(h) = b.get(p..p + BUFFER_HEAD_BYTES) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            if len < 0 {
                return Err(FrameError::NegativeLength { serial, index, len });
            }
            at += (BUFFER_HEAD_BYTES as u64) + len as u64;
            let announced = at + ((count as usize - index - 1) * BUFFER_HEAD_BYTES) as u64;
            if announced > max as u64 {
                return Err(FrameError::TooLarge {
                    serial,
                    bytes: announced,
                    max,
                });
            }
            if at > b.len() as u64 {
                return Ok(None);
            }
        }
        Ok(Some(at as usize))
    }
}

/// Appends one frame: `serial`, then each buffer with its length.
///
/// # Panics
/// If there are more than `i32::MAX` buffers or a buffer is longer than `i32::MAX` bytes (the
/// framing cannot express them; callers split payloads into [`JAVA_BUFFER_BYTES`] pieces).
pub fn encode_frame<B: AsRef<[u8]>>(out: &mut Vec<u8>, serial: i32, buffers: &[B]) {
    let count = i32::try_from(buffers.len()).expect("fewer than 2^31 buffers");
    out.extend_from_slice(&serial.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for b in buffers {
        let b = b.as_ref();
        let len = i32::try_from(b.len()).expect("a buffer shorter than 2 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(b);
    }
}

/// Splits `payload` into buffers of at most [`JAVA_BUFFER_BYTES`] (one empty buffer for an empty
/// payload), the way Java does.
pub fn java_buffers(payload: &[u8]) -> Vec<&[u8]> {
    if payload.is_empty() {
        return vec![payload];
    }
    payload.chunks(JAVA_BUFFER_BYTES).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_frame_bytes: 1 << 20,
        max_buffers: 64,
    };

    #[test]
    fn buffers_are_concatenated_and_zero_length_buffers_are_fine() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, 7, &[&b"ab"[..], b"", b"cde"]);
        encode_frame::<&[u8]>(&mut wire, 8, &[]);
        let mut d = FrameDecoder::new(LIMITS);
        // Byte by byte: nothing until the frame is complete.
        for (i, b) in wire.iter().enumerate() {
            d.extend(&[*b]);
            let f = d.decode().unwrap();
            if i + 1 == 8 + 4 * 3 + 5 {
                let f = f.unwrap();
                assert_eq!((f.serial, &f.payload[..], f.buffers), (7, &b"abcde"[..], 3));
            } else if i + 1 == wire.len() {
                assert_eq!(f.unwrap().payload.len(), 0);
            } else {
                assert!(f.is_none(), "frame early at byte {i}");
            }
        }
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn limits_are_enforced_before_the_bytes_arrive() {
        let mut d = FrameDecoder::new(LIMITS);
        d.extend(&[0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff]);
        assert!(matches!(d.decode(), Err(FrameError::TooManyBuffers { .. })));
        let mut d = FrameDecoder::new(LIMITS);
        d.extend(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.decode(), Err(FrameError::NegativeCount { .. })));
        let mut d = FrameDecoder::new(LIMITS);
        d.extend(&[0, 0, 0, 1, 0, 0, 0, 1, 0x7f, 0, 0, 0]);
        assert!(matches!(d.decode(), Err(FrameError::TooLarge { .. })));
        let mut d = FrameDecoder::new(LIMITS);
        d.extend(&[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'x', 0xff, 0, 0, 0]);
        assert!(matches!(
            d.decode(),
            Err(FrameError::NegativeLength { index: 1, .. })
        ));
    }
}
