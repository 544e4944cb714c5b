//! The Avro IPC handshake records (`org.apache.avro.ipc.HandshakeRequest` and
//! `HandshakeResponse`), encoded and decoded by hand: their schemas are fixed by the Avro
//! specification.
//!
//! ```text
//! HandshakeRequest  { clientHash: MD5, clientProtocol: union{null, string},
//!                     serverHash: MD5, meta: union{null, map<bytes>} }
//! HandshakeResponse { match: enum HandshakeMatch {BOTH, CLIENT, NONE},
//!                     serverProtocol: union{null, string}, serverHash: union{null, MD5},
//!                     meta: union{null, map<bytes>} }
//! ```

use bytes::Bytes;

use super::datum::{write, DatumError, DatumReader};

/// Most metadata entries read from a handshake or call.
pub const MAX_META_ENTRIES: u64 = 1024;

/// The client's half of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRequest {
    /// MD5 of the client's protocol text.
    pub client_hash: [u8; 16],
    /// The client's protocol text, sent after a `NONE`.
    pub client_protocol: Option<String>,
    /// The hash of the protocol the client believes the server speaks.
    pub server_hash: [u8; 16],
    /// Handshake metadata.
    pub meta: Option<Vec<(String, Bytes)>>,
}

/// How the server matched the client's hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMatch {
    /// The server knows the client's protocol and the client guessed the server's.
    Both,
    /// The server knows the client's protocol; the response carries the server's.
    Client,
    /// The server does not know the client's protocol: the call was not executed; the client
    /// resends it with its protocol text.
    None,
}

impl HandshakeMatch {
    /// The symbol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeMatch::Both => "BOTH",
            HandshakeMatch::Client => "CLIENT",
            HandshakeMatch::None => "NONE",
        }
    }
}

/// The server's half of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// The match.
    pub matched: HandshakeMatch,
    /// The server's protocol text (with `CLIENT` and `NONE`).
    pub server_protocol: Option<String>,
    /// Its hash (with `CLIENT` and `NONE`).
    pub server_hash: Option<[u8; 16]>,
    /// Handshake metadata.
    pub meta: Option<Vec<(String, Bytes)>>,
}

fn optional_meta(r: &mut DatumReader) -> Result<Option<Vec<(String, Bytes)>>, DatumError> {
    Ok(match r.index("handshake meta union", 2)? {
        0 => None,
        _ => Some(r.bytes_map(MAX_META_ENTRIES)?),
    })
}

fn write_optional_meta(out: &mut Vec<u8>, meta: &Option<Vec<(String, Bytes)>>) {
    match meta {
        None => write::long(out, 0),
        Some(m) => {
            write::long(out, 1);
            write::map(out, m);
        }
    }
}

fn write_optional_string(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => write::long(out, 0),
        Some(s) => {
            write::long(out, 1);
            write::string(out, s);
        }
    }
}

impl HandshakeRequest {
    /// Decodes one from the start of `r`.
    ///
    /// # Errors
    /// [`DatumError`] for malformed bytes.
    pub fn decode(r: &mut DatumReader) -> Result<Self, DatumError> {
        let client_hash = r.fixed::<16>()?;
        let client_protocol = match r.index("clientProtocol union", 2)? {
            0 => None,
            _ => Some(r.string()?),
        };
        let server_hash = r.fixed::<16>()?;
        let meta = optional_meta(r)?;
        Ok(HandshakeRequest {
            client_hash,
            client_protocol,
            server_hash,
            meta,
        })
    }

    /// Appends its encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.client_hash);
        write_optional_string(out, &self.client_protocol);
        out.extend_from_slice(&self.server_hash);
        write_optional_meta(out, &self.meta);
    }
}

impl HandshakeResponse {
    /// Decodes one from the start of `r`.
    ///
    /// # Errors
    /// [`DatumError`] for malformed bytes.
    pub fn decode(r: &mut DatumReader) -> Result<Self, DatumError> {
        let matched = match r.index("HandshakeMatch", 3)? {
            0 => HandshakeMatch::Both,
            1 => HandshakeMatch::Client,
            _ => HandshakeMatch::None,
        };
        let server_protocol = match r.index("serverProtocol union", 2)? {
            0 => None,
            _ => Some(r.string()?),
        };
        let server_hash = match r.index("serverHash union", 2)? {
            0 => None,
            _ => Some(r.fixed::<16>()?),
        };
        let meta = optional_meta(r)?;
        Ok(HandshakeResponse {
            matched,
            server_protocol,
            server_hash,
            meta,
        })
    }

    /// Appends its encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write::long(
            out,
            match self.matched {
                HandshakeMatch::Both => 0,
                HandshakeMatch::Client => 1,
                HandshakeMatch::None => 2,
            },
        );
        write_optional_string(out, &self.server_protocol);
        match &self.server_hash {
            None => write::long(out, 0),
            Some(h) => {
                write::long(out, 1);
                out.extend_from_slice(h);
            }
        }
        write_optional_meta(out, &self.meta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let req = HandshakeRequest {
            client_hash: [1; 16],
            client_protocol: Some("{\"protocol\":\"P\"}".into()),
            server_hash: [2; 16],
            meta: Some(vec![("k".into(), Bytes::from_static(b"v"))]),
        };
        let mut out = Vec::new();
        req.encode(&mut out);
        let mut r = DatumReader::new(out.into());
        assert_eq!(HandshakeRequest::decode(&mut r).unwrap(), req);
        assert_eq!(r.remaining(), 0);
        for matched in [
            HandshakeMatch::Both,
            HandshakeMatch::Client,
            HandshakeMatch::None,
        ] {
            let resp = HandshakeResponse {
                matched,
                server_protocol: (matched != HandshakeMatch::Both).then(|| "x".into()),
                server_hash: (matched != HandshakeMatch::Both).then_some([3; 16]),
                meta: None,
            };
            let mut out = Vec::new();
            resp.encode(&mut out);
            let mut r = DatumReader::new(out.into());
            assert_eq!(HandshakeResponse::decode(&mut r).unwrap(), resp);
        }
        // Java's BOTH: four zero bytes.
        let mut out = Vec::new();
        HandshakeResponse {
            matched: HandshakeMatch::Both,
            server_protocol: None,
            server_hash: None,
            meta: None,
        }
        .encode(&mut out);
        assert_eq!(out, [0, 0, 0, 0]);
    }
}
