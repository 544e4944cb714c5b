//! The client side of a stateful Avro IPC connection (Avro's Java `Requestor`): sends the
//! handshake with each call until one succeeds, resends a call with the protocol text after a
//! `NONE`, and decodes replies. Transport-free: it makes and reads frame payloads.

use bytes::Bytes;

use super::datum::{write, DatumError, DatumReader};
use super::frame::java_buffers;
use super::handshake::{HandshakeMatch, HandshakeRequest, HandshakeResponse, MAX_META_ENTRIES};
use super::protocol::{Protocol, ProtocolError};

/// Why a reply could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The reply's bytes are malformed.
    #[error("malformed reply: {0}")]
    Malformed(#[from] DatumError),
    /// The server answered `NONE` although the protocol text was sent.
    #[error("the server does not accept the client's protocol (handshake NONE twice)")]
    Refused,
    /// The server's protocol text is invalid.
    #[error("the server's protocol is invalid: {0}")]
    BadServerProtocol(#[from] ProtocolError),
}

/// The outcome of one reply.
#[derive(Debug)]
pub enum Reply {
    /// Handshake `NONE`: the call was not executed; encode and send it again.
    Resend,
    /// The call succeeded (or the ping was answered); the reader holds the response datum.
    Ok(DatumReader),
    /// The server returned an error (its message, when it is a string).
    Error(String),
}

/// The client's connection state.
#[derive(Debug)]
pub struct Requestor {
    local: Protocol,
    server_hash: [u8; 16],
    connected: bool,
    send_text: bool,
}

impl Requestor {
    /// A requestor speaking `local`, guessing the server speaks the same.
    pub fn new(local: Protocol) -> Self {
        Requestor {
            server_hash: local.hash(),
            local,
            connected: false,
            send_text: false,
        }
    }

    /// True once a handshake succeeded: calls no longer carry one.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The buffers of a call of `message` with encoded `params` (an empty name is a ping).
    pub fn encode_call(&self, message: &str, params: &[u8]) -> Vec<Vec<u8>> {
        let mut head = Vec::new();
        if !self.connected {
            HandshakeRequest {
                client_hash: self.local.hash(),
                client_protocol: self.send_text.then(|| self.local.text().to_string()),
                server_hash: self.server_hash,
                meta: None,
            }
            .encode(&mut head);
        }
        write::long(&mut head, 0); // empty metadata
        write::string(&mut head, message);
        let mut out = vec![head];
        if !message.is_empty() {
            out.extend(java_buffers(params).into_iter().map(<[u8]>::to_vec));
        }
        out
    }

    /// Reads the reply to a call of `message`.
    ///
    /// # Errors
    /// [`RequestError`] for malformed replies or a refused handshake.
    pub fn decode_reply(&mut self, message: &str, payload: Bytes) -> Result<Reply, RequestError> {
        let mut r = DatumReader::new(payload);
        if !self.connected {
            let hs = HandshakeResponse::decode(&mut r)?;
            if let (Some(text), Some(hash)) = (&hs.server_protocol, hs.server_hash) {
                Protocol::parse(text)?;
                self.server_hash = hash;
            }
            if hs.matched == HandshakeMatch::None {
                if self.send_text {
                    return Err(RequestError::Refused);
                }
                self.send_text = true;
                return Ok(Reply::Resend);
            }
            self.send_text = false;
            self.connected = true;
        }
        if message.is_empty() {
            return Ok(Reply::Ok(r));
        }
        r.bytes_map(MAX_META_ENTRIES)?;
        if r.boolean()? {
            return Ok(Reply::Error(match r.index("error union", u32::MAX)? {
                0 => r.string()?,
                i => format!("an error of union branch {i}"),
            }));
        }
        Ok(Reply::Ok(r))
    }
}
