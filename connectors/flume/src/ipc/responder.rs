//! The server side of a stateful Avro IPC connection (Avro's Java `Responder` over Netty).
//!
//! A request is `[HandshakeRequest] meta: map<bytes> | name: string | params`, the handshake part
//! present until the connection has had one handshake with a match other than `NONE`. The reply
//! is `[HandshakeResponse] meta | error: boolean | response or error`, where an error is the
//! union `["string"]` (Avro's system errors). The [`Responder`] is shared by all connections and
//! caches client protocols by hash; each connection keeps a [`ConnectionState`].
//!
//! [`Responder::respond`] does the handshake and reads the call's head; it hands the call to
//! the caller ([`Incoming::Call`]), who decodes the parameters for its message and answers with
//! [`Call::reply`] or [`Call::error`]. Replies are lists of buffers laid out as Java lays them
//! out: `[handshake (empty once connected), meta, payload in 8 KiB pieces]`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::datum::{write, DatumError, DatumReader};
use super::frame::java_buffers;
use super::handshake::{HandshakeMatch, HandshakeRequest, HandshakeResponse, MAX_META_ENTRIES};
use super::protocol::{hex, Protocol, ProtocolError};

/// Client protocols remembered by hash across connections; more are used for their connection
/// only.
pub const MAX_CACHED_PROTOCOLS: usize = 32;

/// Why a request could not be answered at all: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespondError {
    /// The handshake or the call's head is malformed.
    #[error("malformed request: {0}")]
    Malformed(#[from] DatumError),
    /// The client sent a protocol text that does not parse.
    #[error("the client's protocol (hash {hash}) is invalid: {error}")]
    BadClientProtocol {
        /// Its hash, hex.
        hash: String,
        /// Why.
        error: ProtocolError,
    },
}

/// Per-connection handshake state.
#[derive(Debug, Default, Clone)]
pub struct ConnectionState {
    remote: Option<Arc<Protocol>>,
}

impl ConnectionState {
    /// The client's protocol once a handshake succeeded.
    pub fn remote(&self) -> Option<&Arc<Protocol>> {
        self.remote.as_ref()
    }
}

/// The server's protocol and the client protocols it knows.
#[derive(Debug)]
pub struct Responder {
    local: Arc<Protocol>,
    /// Hashes under which clients may know the server's protocol (its own, and equivalent
    /// texts): a client guessing any of them gets `BOTH`.
    aliases: Vec<[u8; 16]>,
    cache: Mutex<HashMap<[u8; 16], Arc<Protocol>>>,
}

/// What to do with one request.
#[derive(Debug)]
pub enum Incoming {
    /// Send this reply; there is nothing to execute (a handshake `NONE`, or a ping).
    Reply(Vec<Vec<u8>>),
    /// A call: execute it and reply with [`Call::reply`] or [`Call::error`].
    Call(Call),
}

/// A call whose handshake is done and whose head has been read.
#[derive(Debug)]
pub struct Call {
    /// The message name.
    pub message: String,
    /// The parameters (positioned after the head).
    pub params: DatumReader,
    /// The client's protocol.
    pub remote: Arc<Protocol>,
    handshake: Vec<u8>,
}

impl Call {
    /// The reply to a successful call; `payload` is the response datum.
    pub fn reply(&self, payload: &[u8]) -> Vec<Vec<u8>> {
        let mut body = Vec::with_capacity(payload.len() + 1);
        write::boolean(&mut body, false);
        body.extend_from_slice(payload);
        self.with_head(&body)
    }

    /// An error reply (error flag set, the union `["string"]` holding `message`).
    pub fn error(&self, message: &str) -> Vec<Vec<u8>> {
        error_reply(self.handshake.clone(), message)
    }

    fn with_head(&self, body: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![self.handshake.clone(), empty_meta()];
        out.extend(java_buffers(body).into_iter().map(<[u8]>::to_vec));
        out
    }
}

fn empty_meta() -> Vec<u8> {
    let mut m = Vec::new();
    write::long(&mut m, 0);
    m
}

fn error_reply(handshake: Vec<u8>, message: &str) -> Vec<Vec<u8>> {
    let mut body = Vec::with_capacity(message.len() + 8);
    write::boolean(&mut body, true);
    write::long(&mut body, 0); // union branch 0: string
    write::string(&mut body, message);
    let mut out = vec![handshake, empty_meta()];
    out.extend(java_buffers(&body).into_iter().map(<[u8]>::to_vec));
    out
}

impl Responder {
    /// A responder for `local`, answering `BOTH` to clients that guess its hash or one of
    /// `aliases` (hashes of equivalent texts), and knowing those texts' clients.
    pub fn new(local: Protocol, aliases: &[Protocol]) -> Self {
        let local = Arc::new(local);
        let mut cache = HashMap::new();
        let mut hashes = vec![local.hash()];
        cache.insert(local.hash(), local.clone());
        for a in aliases {
            hashes.push(a.hash());
            cache.insert(a.hash(), Arc::new(a.clone()));
        }
        Responder {
            local,
            aliases: hashes,
            cache: Mutex::new(cache),
        }
    }

    /// The server's protocol.
    pub fn local(&self) -> &Arc<Protocol> {
        &self.local
    }

    fn handshake(
        &self,
        r: &mut DatumReader,
        state: &mut ConnectionState,
    ) -> Result<(Option<Arc<Protocol>>, Vec<u8>), RespondError> {
        let req = HandshakeRequest::decode(r)?;
        let mut remote = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&req.client_hash)
            .cloned();
        if remote.is_none() {
            if let Some(text) = &req.client_protocol {
                let p = Protocol::parse(text).map_err(|error| RespondError::BadClientProtocol {
                    hash: hex(&req.client_hash),
                    error,
                })?;
                let p = Arc::new(p);
                let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                if cache.len() < MAX_CACHED_PROTOCOLS {
                    // Keyed by the hash the client sent, as Java does.
                    cache.insert(req.client_hash, p.clone());
                }
                remote = Some(p);
            }
        }
        let guessed = self.aliases.contains(&req.server_hash);
        let matched = match (&remote, guessed) {
            (None, _) => HandshakeMatch::None,
            (Some(_), true) => HandshakeMatch::Both,
            (Some(_), false) => HandshakeMatch::Client,
        };
        let carries_ours = matched != HandshakeMatch::Both;
        let resp = HandshakeResponse {
            matched,
            server_protocol: carries_ours.then(|| self.local.text().to_string()),
            server_hash: carries_ours.then(|| self.local.hash()),
            meta: None,
        };
        tracing::debug!(
            client_hash = %hex(&req.client_hash),
            server_hash = %hex(&req.server_hash),
            client_protocol = req.client_protocol.is_some(),
            matched = matched.as_str(),
            "Avro IPC handshake"
        );
        let mut out = Vec::new();
        resp.encode(&mut out);
        if matched != HandshakeMatch::None {
            state.remote.clone_from(&remote);
        }
        Ok((remote.filter(|_| matched != HandshakeMatch::None), out))
    }

    /// Handles one request's bytes (a frame's payload) on a connection.
    ///
    /// # Errors
    /// [`RespondError`] if the handshake or call head is malformed: close the connection.
    pub fn respond(
        &self,
        payload: Bytes,
        state: &mut ConnectionState,
    ) -> Result<Incoming, RespondError> {
        let mut r = DatumReader::new(payload);
        let (remote, handshake) = match state.remote.clone() {
            Some(remote) => (remote, Vec::new()),
            None => match self.handshake(&mut r, state)? {
                (Some(remote), hs) => (remote, hs),
                (None, hs) => return Ok(Incoming::Reply(vec![hs])),
            },
        };
        r.bytes_map(MAX_META_ENTRIES)?;
        let message = r.string()?;
        if message.is_empty() {
            return Ok(Incoming::Reply(vec![handshake]));
        }
        if remote.message(&message).is_none() {
            return Ok(Incoming::Reply(error_reply(
                handshake,
                &format!("org.apache.avro.AvroRuntimeException: No such remote message: {message}"),
            )));
        }
        if self.local.message(&message).is_none() {
            return Ok(Incoming::Reply(error_reply(
                handshake,
                &format!(
                    "org.apache.avro.AvroRuntimeException: No message named {message} in protocol {}",
                    self.local.name()
                ),
            )));
        }
        if !self.local.agrees_on(&remote, &message) {
            return Ok(Incoming::Reply(error_reply(
                handshake,
                &format!(
                    "org.apache.avro.AvroRuntimeException: message {message}: the client's schema \
                     differs from the server's ({}); schema resolution is not supported",
                    self.local
                        .message(&message)
                        .map_or("", |m| m.canonical.as_str())
                ),
            )));
        }
        Ok(Incoming::Call(Call {
            message,
            params: r,
            remote,
            handshake,
        }))
    }
}
