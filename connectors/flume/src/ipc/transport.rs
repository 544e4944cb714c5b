//! Frames over an async byte stream, optionally through Flume's `compression-type = deflate`:
//! one zlib stream (with its zlib header, as Netty's `ZlibEncoder`/`ZlibDecoder` use) per
//! direction, sync-flushed after every frame so that each frame can be decoded on arrival.
//!
//! Reading inflates only while no complete frame is buffered, so what a peer can make the
//! reader hold is bounded by the frame limits plus one inflate step, however well its bytes
//! compress.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{encode_frame, Frame, FrameDecoder, FrameError, FrameLimits};

/// Bytes read from the socket at a time, and inflated per step.
const CHUNK: usize = 64 * 1024;

/// Why a connection cannot be read or written any further.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A malformed or oversized frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The compressed stream is corrupt.
    #[error("corrupt deflate stream: {0}")]
    Inflate(String),
    /// The peer closed the connection in the middle of a frame.
    #[error("the connection ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
}

/// Reads frames.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    decoder: FrameDecoder,
    inflater: Option<Decompress>,
    /// Compressed bytes not yet inflated.
    compressed: Vec<u8>,
    consumed: usize,
    /// The last inflate step filled its output: the inflater may hold more output although
    /// every compressed byte was taken, and must be asked again before reading the socket.
    drain: bool,
    /// Bytes inflated per step at most ([`CHUNK`]; smaller in tests).
    step: usize,
    bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader over `io`; `deflate` expects a zlib stream.
    pub fn new(io: R, limits: FrameLimits, deflate: bool) -> Self {
        FrameReader {
            io,
            decoder: FrameDecoder::new(limits),
            inflater: deflate.then(|| Decompress::new(true)),
            compressed: Vec::new(),
            consumed: 0,
            drain: false,
            step: CHUNK,
            bytes_read: 0,
        }
    }

    /// Bytes read from the socket so far (compressed, if deflating).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next frame; `None` when the peer closed the connection between frames.
    /// Cancel-safe: a cancelled call loses no bytes.
    ///
    /// # Errors
    /// [`TransportError`]; the reader is then unusable.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(f) = self.decoder.decode()? {
                return Ok(Some(f));
            }
            if let Some(inflater) = &mut self.inflater {
                if self.consumed < self.compressed.len() || self.drain {
                    let out = self.decoder.buffer_mut();
                    out.reserve(CHUNK);
                    let spare = out.capacity() - out.len();
                    let start_len = out.len();
                    let space = spare.min(self.step);
                    out.resize(start_len + space, 0);
                    let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
                    let status = inflater
                        .decompress(
                            &self.compressed[self.consumed..],
                            &mut out[start_len..],
                            FlushDecompress::None,
                        )
                        .map_err(|e| TransportError::Inflate(e.to_string()))?;
                    let produced = (inflater.total_out() - before_out) as usize;
                    out.truncate(start_len + produced);
                    self.drain = produced == space;
                    let taken = (inflater.total_in() - before_in) as usize;
                    self.consumed += taken;
                    if self.consumed == self.compressed.len() {
                        self.compressed.clear();
                        self.consumed = 0;
                    }
                    if status == Status::StreamEnd {
                        return Err(TransportError::Inflate(
                            "the peer ended its zlib stream".into(),
                        ));
                    }
                    if produced > 0 || taken > 0 {
                        continue;
                    }
                    // No progress with input left: the inflater needs more input.
                }
                let mut chunk = [0u8; CHUNK];
                let n = self.io.read(&mut chunk).await?;
                if n == 0 {
                    return self.eof();
                }
                self.bytes_read += n as u64;
                self.compressed.extend_from_slice(&chunk[..n]);
            } else {
                let buf = self.decoder.buffer_mut();
                buf.reserve(CHUNK);
                let n = self.io.read_buf(buf).await?;
                if n == 0 {
                    return self.eof();
                }
                self.bytes_read += n as u64;
            }
        }
    }

    fn eof(&self) -> Result<Option<Frame>, TransportError> {
        match self.decoder.pending() + (self.compressed.len() - self.consumed) {
            0 => Ok(None),
            n => Err(TransportError::Truncated(n)),
        }
    }
}

/// Writes frames.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    deflater: Option<Compress>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer over `io`; `deflate` writes one zlib stream, sync-flushed per frame.
    pub fn new(io: W, deflate: bool) -> Self {
        FrameWriter {
            io,
            deflater: deflate.then(|| Compress::new(Compression::new(6), true)),
        }
    }

    /// The underlying stream (writing to it directly bypasses the framing and compression).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.io
    }

    /// Writes one frame and flushes it.
    ///
    /// # Errors
    /// The socket's error.
    pub async fn write<B: AsRef<[u8]>>(
        &mut self,
        serial: i32,
        buffers: &[B],
    ) -> Result<(), TransportError> {
        let mut plain = Vec::new();
        encode_frame(&mut plain, serial, buffers);
        let bytes = match &mut self.deflater {
            None => plain,
            Some(d) => deflate_sync(d, &plain)?,
        };
        self.io.write_all(&bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Shuts the write side down.
    ///
    /// # Errors
    /// The socket's error.
    pub async fn shutdown(&mut self) -> Result<(), TransportError> {
        self.io.shutdown().await?;
        Ok(())
    }
}

/// Compresses `input` into the stream and sync-flushes it.
fn deflate_sync(d: &mut Compress, input: &[u8]) -> Result<Vec<u8>, TransportError> {
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let mut consumed = 0;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
        let before = d.total_in();
        d.compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .map_err(|e| TransportError::Inflate(format!("deflate failed: {e}")))?;
        consumed += (d.total_in() - before) as usize;
        // Done once all input is in and the flush left room in the output.
        if consumed == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_frame_bytes: 1 << 20,
        max_buffers: 1024,
    };

    #[tokio::test]
    async fn frames_cross_a_deflated_stream_one_by_one() {
        for deflate in [false, true] {
            let (a, b) = tokio::io::duplex(256);
            let mut w = FrameWriter::new(a, deflate);
            let mut r = FrameReader::new(b, LIMITS, deflate);
            let big = vec![b'x'; 100_000];
            let writer = tokio::spawn(async move {
                for serial in 1..=5 {
                    w.write(serial, &[&b"head"[..], &big[..], b""])
                        .await
                        .unwrap();
                }
                w.shutdown().await.unwrap();
            });
            for serial in 1..=5 {
                let f = r.next().await.unwrap().unwrap();
                assert_eq!(f.serial, serial);
                assert_eq!(f.payload.len(), 100_004);
            }
            assert!(r.next().await.unwrap().is_none());
            writer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn frames_whose_inflated_bytes_outgrow_one_step_arrive_without_more_input() {
        // Pipelined frames that arrive in one read and inflate to more than one step's output:
        // once every compressed byte is taken, the rest is inside the inflater, and no more
        // input comes (the peer waits for replies). It must be drained, not waited for. (A
        // small step makes this happen on every frame; with the real one it happened now and
        // then, under load.)
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut d = Compress::new(Compression::new(6), true);
        let mut bytes = Vec::new();
        for serial in 1..=3 {
            let mut plain = Vec::new();
            encode_frame(&mut plain, serial, &[vec![b'x'; 10_000]]);
            bytes.extend(deflate_sync(&mut d, &plain).unwrap());
        }
        let mut w = a;
        w.write_all(&bytes).await.unwrap();
        let mut r = FrameReader::new(b, LIMITS, true);
        r.step = 1000;
        for serial in 1..=3 {
            let f = tokio::time::timeout(std::time::Duration::from_secs(5), r.next())
                .await
                .unwrap_or_else(|_| panic!("frame {serial} never decoded from what arrived"))
                .unwrap()
                .unwrap();
            assert_eq!((f.serial, f.payload.len()), (serial, 10_000));
        }
        drop(w);
    }

    #[tokio::test]
    async fn a_compression_bomb_is_stopped_by_the_frame_limit() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut d = Compress::new(Compression::new(9), true);
        // A frame announcing 16 MiB of zeros, compressed to a few KiB.
        let mut plain = Vec::new();
        plain.extend_from_slice(&1i32.to_be_bytes());
        plain.extend_from_slice(&1i32.to_be_bytes());
        plain.extend_from_slice(&(16i32 << 20).to_be_bytes());
        plain.resize(plain.len() + (16 << 20), 0);
        let bytes = deflate_sync(&mut d, &plain).unwrap();
        assert!(bytes.len() < 100_000);
        let mut w = a;
        tokio::spawn(async move {
            let _ = w.write_all(&bytes).await;
        });
        let mut r = FrameReader::new(b, LIMITS, true);
        assert!(matches!(
            r.next().await,
            Err(TransportError::Frame(FrameError::TooLarge { .. }))
        ));
    }
}
