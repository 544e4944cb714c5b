//! The on-disk format: segment header and record framing.
//!
//! Everything here is pure (no I/O) so that it can be unit-tested exhaustively and fuzzed.
//!
//! ```text
//! segment header (32 bytes, little-endian; do not reorder)
//!   0..8    magic            b"WEIR-WAL"
//!   8..12   format version   u32 = 1
//!   12..16  flags            u32 = 0 (reserved, must be zero)
//!   16..24  segment id       u64 (equals the number in the file name)
//!   24..28  header crc       CRC-32 of bytes 0..24
//!   28..32  reserved         u32 = 0
//!
//! record frame (8 bytes + payload, little-endian)
//!   0..4    len              u32, payload length in bytes
//!   4..8    crc              CRC-32 of (segment id as u64 LE || len as u32 LE || payload)
//!   8..     payload          len bytes
//! ```
//!
//! Mixing the segment id into every record's checksum means that bytes left over from another
//! segment (an old file, a recycled block) can never pass as a record of this one.

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WEIR-WAL";
/// The only format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment header in bytes; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Size of a record frame header (`len | crc`) in bytes.
pub const FRAME_HEADER_LEN: usize = 8;

/// A decoded, verified segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment id recorded in the header.
    pub segment_id: u64,
}

/// Why a segment header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than [`SEGMENT_HEADER_LEN`] bytes are present.
    #[error("segment header is incomplete ({have} of {SEGMENT_HEADER_LEN} bytes)")]
    Incomplete {
        /// Bytes present.
        have: usize,
    },
    /// The magic bytes are wrong: this is not a weir WAL segment.
    #[error("bad magic {found:02x?}: not a weir WAL segment")]
    BadMagic {
        /// The bytes found where the magic belongs.
        found: [u8; 8],
    },
    /// The header checksum does not match its contents.
    #[error("segment header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum computed over the header bytes.
        computed: u32,
    },
    /// The header is intact but written by an unknown format version.
    #[error("unsupported segment format version {0} (this build reads version {FORMAT_VERSION})")]
    Version(u32),
    /// Reserved fields are not zero.
    #[error("reserved header fields are not zero")]
    Reserved,
    /// The header names a different segment than the file name.
    #[error("header says segment {found}, file name says {expected}")]
    WrongSegment {
        /// Id from the file name.
        expected: u64,
        /// Id in the header.
        found: u64,
    },
}

/// Encodes the header of segment `segment_id`.
#[must_use]
pub fn encode_header(segment_id: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&segment_id.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes and verifies a segment header. `expected_id` is the id from the file name.
///
/// # Errors
/// Any [`HeaderError`]; the checksum is checked before the version so that a damaged
/// version field is reported as damage.
pub fn decode_header(buf: &[u8], expected_id: u64) -> Result<SegmentHeader, HeaderError> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::Incomplete { have: buf.len() });
    }
    let h = &buf[..SEGMENT_HEADER_LEN];
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[0..8]);
    if magic != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic { found: magic });
    }
    let stored = le_u32(&h[24..28]);
    let computed = crc32fast::hash(&h[0..24]);
    if stored != computed {
        return Err(HeaderError::Checksum { stored, computed });
    }
    let version = le_u32(&h[8..12]);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    if le_u32(&h[12..16]) != 0 || le_u32(&h[28..32]) != 0 {
        return Err(HeaderError::Reserved);
    }
    let segment_id = le_u64(&h[16..24]);
    if segment_id != expected_id {
        return Err(HeaderError::WrongSegment {
            expected: expected_id,
            found: segment_id,
        });
    }
    Ok(SegmentHeader { segment_id })
}

/// CRC-32 of a record: over the segment id, the length and the payload.
#[must_use]
pub fn record_crc(segment_id: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&segment_id.to_le_bytes());
    h.update(&frame_len_field(payload.len()).to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn frame_len_field(len: usize) -> u32 {
    // Callers check `len <= u32::MAX` (the writer rejects larger records up front).
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// True if records of segment `id` can be told from zeroed space: the checksum of an empty
/// record in it is not 0. About one id in 2^32 fails; the writer skips those.
#[must_use]
pub fn usable_segment_id(id: u64) -> bool {
    record_crc(id, &[]) != 0
}

/// The first usable segment id after `id` (see [`usable_segment_id`]).
#[must_use]
pub fn next_segment_id(id: u64) -> u64 {
    let mut next = id.wrapping_add(1).max(1);
    while !usable_segment_id(next) {
        next += 1;
    }
    next
}

/// Encodes the 8-byte frame header (`len | crc`) for `payload` in segment `segment_id`.
///
/// The payload itself follows the header unchanged, so that large payloads can be written
/// straight from the caller's buffer with a vectored write.
#[must_use]
pub fn encode_frame_header(segment_id: u64, payload: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    let mut f = [0u8; FRAME_HEADER_LEN];
    f[0..4].copy_from_slice(&frame_len_field(payload.len()).to_le_bytes());
    f[4..8].copy_from_slice(&record_crc(segment_id, payload).to_le_bytes());
    f
}

/// Encodes the frame header from the payload's length and its own CRC-32 (`crc32fast::hash`
/// of the payload), so that the expensive part of the checksum can be computed before the
/// segment id is known, on the appender's thread. Equal to [`encode_frame_header`].
#[must_use]
pub fn encode_frame_header_with_payload_crc(
    segment_id: u64,
    payload_len: usize,
    payload_crc: u32,
) -> [u8; FRAME_HEADER_LEN] {
    let len = frame_len_field(payload_len);
    let mut h = crc32fast::Hasher::new();
    h.update(&segment_id.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.combine(&crc32fast::Hasher::new_with_initial_len(
        payload_crc,
        payload_len as u64,
    ));
    let mut f = [0u8; FRAME_HEADER_LEN];
    f[0..4].copy_from_slice(&len.to_le_bytes());
    f[4..8].copy_from_slice(&h.finalize().to_le_bytes());
    f
}

/// Appends a whole frame (header and payload) to `out`.
pub fn encode_frame(segment_id: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&encode_frame_header(segment_id, payload));
    out.extend_from_slice(payload);
}

/// Total on-disk size of a frame carrying `payload_len` bytes.
#[must_use]
pub fn frame_size(payload_len: usize) -> u64 {
    FRAME_HEADER_LEN as u64 + payload_len as u64
}

/// The outcome of decoding one frame at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete frame whose checksum verified.
    Record {
        /// The payload.
        payload: &'a [u8],
        /// Bytes the whole frame occupies (header plus payload).
        frame_len: usize,
    },
    /// The buffer ends before the frame does (a partial record, or just the end of a read
    /// chunk). `frame_len` is the full frame size when the header was readable.
    Incomplete {
        /// Full frame size, if the length field could be read.
        frame_len: Option<u64>,
    },
    /// The frame is complete (or its length is impossible) but does not verify.
    Corrupt(FrameError),
}

/// Why a frame is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field exceeds the configured maximum record size.
    #[error("record length {len} exceeds the maximum {max}")]
    TooLong {
        /// Length field.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The frame header is all zeros: zeroed space, never a record.
    #[error("zeroed frame header (zero-filled space, not a record)")]
    Zeroed,
    /// The stored checksum does not match the frame.
    #[error(
        "record checksum mismatch (len {len}, stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum {
        /// Length field.
        len: u32,
        /// Checksum stored in the frame.
        stored: u32,
        /// Checksum computed over segment id, length and payload.
        computed: u32,
    },
}

/// Decodes the frame at the start of `buf`, verifying its checksum.
///
/// Never panics and never allocates, whatever `buf` holds.
#[must_use]
pub fn decode_frame(segment_id: u64, buf: &[u8], max_record: u32) -> Frame<'_> {
    if buf.len() < FRAME_HEADER_LEN {
        return Frame::Incomplete { frame_len: None };
    }
    let len = le_u32(&buf[0..4]);
    let stored = le_u32(&buf[4..8]);
    if len == 0 && stored == 0 {
        // Zeroed bytes (a zero-filled torn write, a zeroed page) must never read as an empty
        // record, even for the rare segment id whose empty-record checksum is 0 (the writer
        // never uses such ids: see `usable_segment_id`).
        return Frame::Corrupt(FrameError::Zeroed);
    }
    if len > max_record {
        return Frame::Corrupt(FrameError::TooLong {
            len,
            max: max_record,
        });
    }
    let frame_len = FRAME_HEADER_LEN + len as usize;
    if buf.len() < frame_len {
        return Frame::Incomplete {
            frame_len: Some(frame_len as u64),
        };
    }
    let payload = &buf[FRAME_HEADER_LEN..frame_len];
    let computed = record_crc(segment_id, payload);
    if computed != stored {
        return Frame::Corrupt(FrameError::Checksum {
            len,
            stored,
            computed,
        });
    }
    Frame::Record { payload, frame_len }
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1 << 20;

    fn frame(seg: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(seg, payload, &mut v);
        v
    }

    #[test]
    fn header_round_trips() {
        for id in [0, 1, 42, u64::MAX] {
            let h = encode_header(id);
            assert_eq!(decode_header(&h, id), Ok(SegmentHeader { segment_id: id }));
        }
    }

    #[test]
    fn header_of_another_segment_is_rejected() {
        let h = encode_header(7);
        assert_eq!(
            decode_header(&h, 8),
            Err(HeaderError::WrongSegment {
                expected: 8,
                found: 7
            })
        );
    }

    #[test]
    fn every_header_truncation_is_incomplete() {
        let h = encode_header(3);
        for cut in 0..SEGMENT_HEADER_LEN {
            assert_eq!(
                decode_header(&h[..cut], 3),
                Err(HeaderError::Incomplete { have: cut })
            );
        }
    }

    #[test]
    fn every_header_bit_flip_is_detected() {
        let h = encode_header(0x0102_0304_0506_0708);
        for byte in 0..SEGMENT_HEADER_LEN {
            for bit in 0..8 {
                let mut c = h;
                c[byte] ^= 1 << bit;
                assert!(
                    decode_header(&c, 0x0102_0304_0506_0708).is_err(),
                    "flip of byte {byte} bit {bit} went undetected"
                );
            }
        }
    }

    #[test]
    fn frame_header_from_the_payload_crc_is_the_same() {
        for len in [0usize, 1, 100, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            assert_eq!(
                encode_frame_header_with_payload_crc(77, len, crc32fast::hash(&payload)),
                encode_frame_header(77, &payload)
            );
        }
    }

    #[test]
    fn record_round_trips_for_many_sizes() {
        for len in [0usize, 1, 7, 8, 9, 100, 4096, 65_537] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let f = frame(5, &payload);
            assert_eq!(f.len() as u64, frame_size(len));
            match decode_frame(5, &f, MAX) {
                Frame::Record {
                    payload: p,
                    frame_len,
                } => {
                    assert_eq!(p, &payload[..]);
                    assert_eq!(frame_len, f.len());
                }
                other => panic!("len {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_truncation_of_a_record_is_incomplete() {
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let f = frame(9, &payload);
        for cut in 0..f.len() {
            match decode_frame(9, &f[..cut], MAX) {
                Frame::Incomplete { frame_len } => {
                    if cut >= FRAME_HEADER_LEN {
                        assert_eq!(frame_len, Some(f.len() as u64));
                    } else {
                        assert_eq!(frame_len, None);
                    }
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_single_bit_flip_of_a_record_is_detected() {
        let payload: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        let f = frame(11, &payload);
        for byte in 0..f.len() {
            for bit in 0..8 {
                let mut c = f.clone();
                c[byte] ^= 1 << bit;
                match decode_frame(11, &c, MAX) {
                    Frame::Record { .. } => panic!("flip of byte {byte} bit {bit} undetected"),
                    // A flipped length can make the frame look longer than the buffer: that is
                    // still not data, and recovery treats it as damage (see recovery.rs).
                    Frame::Incomplete { .. } | Frame::Corrupt(_) => {}
                }
            }
        }
    }

    #[test]
    fn a_record_of_another_segment_fails_its_checksum() {
        let f = frame(1, b"hello");
        assert!(matches!(
            decode_frame(2, &f, MAX),
            Frame::Corrupt(FrameError::Checksum { .. })
        ));
    }

    #[test]
    fn an_overlong_length_is_corrupt_not_an_allocation() {
        let mut f = frame(1, b"x");
        f[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_frame(1, &f, MAX),
            Frame::Corrupt(FrameError::TooLong {
                len: u32::MAX,
                max: MAX
            })
        );
    }

    #[test]
    fn zeroed_bytes_are_not_a_record() {
        let z = [0u8; 64];
        // 1503905684 is a segment id whose empty-record checksum is 0.
        for id in [3, 1_503_905_684] {
            assert_eq!(
                decode_frame(id, &z, MAX),
                Frame::Corrupt(FrameError::Zeroed)
            );
        }
        assert!(!usable_segment_id(1_503_905_684));
        assert_eq!(next_segment_id(1_503_905_683), 1_503_905_685);
        assert_eq!(next_segment_id(0), 1);
        assert_eq!(next_segment_id(1), 2);
    }
}
