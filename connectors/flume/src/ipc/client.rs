//! One client connection: a [`Requestor`] over a framed socket, one call at a time (as Flume's
//! Avro sink and Spark's pull receiver use theirs).

use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::datum::DatumReader;
use super::frame::FrameLimits;
use super::protocol::Protocol;
use super::requestor::{Reply, Requestor};
use super::transport::{FrameReader, FrameWriter};

/// Most handshake round trips per call (`NONE`, then the call again with the protocol text).
const MAX_RESENDS: usize = 2;

/// A client connection speaking one protocol.
pub struct Client {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    requestor: Requestor,
    serial: i32,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `address` within `request_timeout`, which also bounds every call.
    ///
    /// # Errors
    /// Why the connection could not be made.
    pub async fn connect(
        address: &str,
        protocol: Protocol,
        deflate: bool,
        limits: FrameLimits,
        request_timeout: Duration,
    ) -> Result<Client, String> {
        let stream = timeout(request_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connecting timed out after {request_timeout:?}"))?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        Ok(Client {
            reader: FrameReader::new(rd, limits, deflate),
            writer: FrameWriter::new(wr, deflate),
            requestor: Requestor::new(protocol),
            serial: 0,
            timeout: request_timeout,
        })
    }

    /// One call of `message` with encoded `params` (resent with the protocol text after a
    /// handshake `NONE`). The reply's reader; an Avro error reply is `Ok(Err(message))` (the
    /// connection stays usable); `Err` means the connection is unusable.
    ///
    /// # Errors
    /// A transport failure, a malformed reply, a refused handshake or no reply in time.
    pub async fn call(
        &mut self,
        message: &str,
        params: &[u8],
    ) -> Result<Result<DatumReader, String>, String> {
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
                    .ok_or_else(|| format!("the server closed the connection during {message}"))?;
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
}
