//! Splitting a connection's bytes into records: newline-delimited lines, or length-prefixed frames.

use bytes::{Buf, Bytes, BytesMut};

use crate::config::Protocol;

/// Length of a frame header: the payload length as a `u32`, big-endian.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Length of an acknowledgement: the cumulative durable record count as a `u64`, big-endian.
pub const ACK_BYTES: usize = 8;

/// A record larger than `max_record_bytes`: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Oversize(pub String);

/// Takes records off the front of a read buffer.
#[derive(Debug)]
pub(crate) struct Decoder {
    protocol: Protocol,
    max_record: usize,
    /// Lines: bytes at the front of the buffer known to hold no `\n` (so as not to rescan them).
    scanned: usize,
}

impl Decoder {
    pub(crate) fn new(protocol: Protocol, max_record: usize) -> Self {
        Decoder {
            protocol,
            max_record,
            scanned: 0,
        }
    }

    /// The next complete record, if the buffer holds one.
    pub(crate) fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Oversize> {
        match self.protocol {
            Protocol::Lines => self.next_line(buf),
            Protocol::Frames => self.next_frame(buf),
        }
    }

    /// After [`Decoder::next`] returned `Ok(None)`: how many bytes the buffer must hold before the
    /// next record can be complete (a lower bound for lines, exact for frames).
    pub(crate) fn need(&self, buf: &BytesMut) -> usize {
        match self.protocol {
            // A line of max_record bytes, plus "\r\n".
            Protocol::Lines => self.max_record + 2,
            Protocol::Frames if buf.len() < FRAME_HEADER_BYTES => FRAME_HEADER_BYTES,
            Protocol::Frames => FRAME_HEADER_BYTES + frame_len(buf),
        }
    }

    fn next_line(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Oversize> {
        match memchr::memchr(b'\n', &buf[self.scanned..]) {
            Some(i) => {
                let end = self.scanned + i;
                self.scanned = 0;
                let mut line = buf.split_to(end + 1);
                line.truncate(strip_cr(&line[..end]));
                if line.len() > self.max_record {
                    return Err(self.oversize_line(line.len()));
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = buf.len();
                // Even a following "\n" (and a "\r" to strip) would leave more than max_record.
                if buf.len() >= self.max_record + 2 {
                    return Err(self.oversize_line(buf.len() - 1));
                }
                Ok(None)
            }
        }
    }

    fn oversize_line(&self, at_least: usize) -> Oversize {
        Oversize(format!(
            "a line of {at_least} bytes or more exceeds max_record_bytes = {}",
            self.max_record
        ))
    }

    fn next_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Oversize> {
        if buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = frame_len(buf);
        if len > self.max_record {
            return Err(Oversize(format!(
                "a frame of {len} bytes exceeds max_record_bytes = {}",
                self.max_record
            )));
        }
        if buf.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_BYTES);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// At the end of the input: lines stores an unterminated last line as a record (`Ok(Some)`);
    /// frames has none (`Ok(None)`; the caller reports leftover bytes as a partial frame).
    pub(crate) fn finish(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Oversize> {
        if self.protocol == Protocol::Frames || buf.is_empty() {
            return Ok(None);
        }
        self.scanned = 0;
        let mut line = buf.split();
        line.truncate(strip_cr(&line));
        if line.len() > self.max_record {
            return Err(self.oversize_line(line.len()));
        }
        Ok(Some(line.freeze()))
    }
}

fn frame_len(buf: &[u8]) -> usize {
    let header: [u8; FRAME_HEADER_BYTES] = buf[..FRAME_HEADER_BYTES]
        .try_into()
        .expect("a 4-byte slice");
    u32::from_be_bytes(header) as usize
}

/// The length of `line` without one trailing `\r`.
fn strip_cr(line: &[u8]) -> usize {
    match line.last() {
        Some(b'\r') => line.len() - 1,
        _ => line.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(d: &mut Decoder, buf: &mut BytesMut) -> Result<Vec<Bytes>, Oversize> {
        let mut out = Vec::new();
        while let Some(r) = d.next(buf)? {
            out.push(r);
        }
        Ok(out)
    }

    #[test]
    fn lines_strip_lf_and_one_cr_and_keep_empty_lines() {
        let mut d = Decoder::new(Protocol::Lines, 100);
        let mut buf = BytesMut::from(&b"a\r\nb\n\nc\r\r\n\rd"[..]);
        let got = all(&mut d, &mut buf).unwrap();
        assert_eq!(got, vec!["a", "b", "", "c\r"]);
        assert_eq!(&buf[..], b"\rd");
        buf.extend_from_slice(b"e");
        assert_eq!(all(&mut d, &mut buf).unwrap(), Vec::<Bytes>::new());
        assert_eq!(d.finish(&mut buf).unwrap().unwrap(), "\rde");
        assert!(buf.is_empty());
        assert_eq!(d.finish(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_line_split_across_reads_is_scanned_once_and_joined() {
        let mut d = Decoder::new(Protocol::Lines, 100);
        let mut buf = BytesMut::new();
        for part in [&b"hel"[..], b"lo wo", b"rld\r", b"\nnext"] {
            buf.extend_from_slice(part);
            let got = all(&mut d, &mut buf).unwrap();
            if part.starts_with(b"\n") {
                assert_eq!(got, vec!["hello world"]);
            } else {
                assert!(got.is_empty());
            }
        }
        assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn line_limits_count_the_record_without_its_delimiter() {
        let mut d = Decoder::new(Protocol::Lines, 4);
        let mut buf = BytesMut::from(&b"abcd\r\nabcd\n"[..]);
        assert_eq!(all(&mut d, &mut buf).unwrap(), vec!["abcd", "abcd"]);
        // "abcd\r" may still be "abcd\r\n": not yet too long.
        buf.extend_from_slice(b"abcd\r");
        assert_eq!(d.next(&mut buf), Ok(None));
        assert_eq!(d.need(&buf), 6);
        buf.extend_from_slice(b"x");
        assert!(d
            .next(&mut buf)
            .unwrap_err()
            .0
            .contains("max_record_bytes = 4"));
        let mut buf = BytesMut::from(&b"abcde\n"[..]);
        let e = Decoder::new(Protocol::Lines, 4).next(&mut buf).unwrap_err();
        assert!(e.0.contains("a line of 5 bytes"), "{e:?}");
        let mut buf = BytesMut::from(&b"abcde"[..]);
        assert!(Decoder::new(Protocol::Lines, 4).finish(&mut buf).is_err());
    }

    #[test]
    fn frames_decode_including_empty_payloads_and_wait_for_the_rest() {
        let mut d = Decoder::new(Protocol::Frames, 10);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0, 0]);
        assert_eq!(all(&mut d, &mut buf).unwrap(), vec!["abc", ""]);
        assert_eq!(d.need(&buf), 4);
        buf.extend_from_slice(&[0, 2, b'x']);
        assert_eq!(d.next(&mut buf), Ok(None));
        assert_eq!(d.need(&buf), 6);
        buf.extend_from_slice(b"y");
        assert_eq!(all(&mut d, &mut buf).unwrap(), vec!["xy"]);
        buf.extend_from_slice(&[0, 0]);
        assert_eq!(d.finish(&mut buf), Ok(None));
    }

    #[test]
    fn an_oversize_frame_is_refused_from_its_header() {
        let mut d = Decoder::new(Protocol::Frames, 10);
        let mut buf = BytesMut::from(&[0, 0, 0, 11][..]);
        let e = d.next(&mut buf).unwrap_err();
        assert_eq!(e.0, "a frame of 11 bytes exceeds max_record_bytes = 10");
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        assert!(d.next(&mut buf).is_err());
    }
}
