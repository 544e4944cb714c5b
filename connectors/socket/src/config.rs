//! Configuration of a [`SocketReceiver`](crate::SocketReceiver).

use serde::{Deserialize, Serialize};
use weir_receiver::listener::{ListenerSettings, TlsConfig, DEFAULT_FIRST_BYTES_TIMEOUT_MS};

/// The default `address`: port 9999 on the loopback interface only.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9999";
/// The smallest accepted `read_buffer_bytes`.
pub const MIN_READ_BUFFER_BYTES: usize = 4096;
/// The largest accepted `max_record_bytes` (1 GiB). A store call must also fit the engine's
/// largest WAL record (`wal.max_record_bytes`, 256 MiB by default).
pub const MAX_RECORD_BYTES_LIMIT: usize = 1 << 30;

/// Whether the receiver connects to a source or accepts producers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Connect to `address` and read newline-delimited records (Spark's `socketTextStream`);
    /// reconnect with backoff when the connection ends. No acknowledgements are possible.
    Connect,
    /// Bind `address` and accept up to `max_connections` producers (the default).
    #[default]
    Listen,
}

/// How records are delimited on a connection (see the crate's README for the byte layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// One record per line, ended by `\n` (a `\r` before it is stripped too). No acknowledgements:
    /// a producer never learns what was stored. The default, and the only protocol of `connect`.
    #[default]
    Lines,
    /// `len: u32 big-endian | payload` per record; the receiver writes back the connection's
    /// cumulative count of durable records as a `u64` big-endian. `listen` mode only.
    Frames,
}

/// Configuration of a socket receiver. Every field has a default; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    /// `connect` or `listen`. Default `listen`.
    pub mode: Mode,
    /// `connect`: the `host:port` to connect to. `listen`: the address to bind (`0.0.0.0:PORT` to
    /// accept from other hosts; port 0 picks a free port, see
    /// [`SocketReceiver::local_addr`](crate::SocketReceiver::local_addr)). Default
    /// `127.0.0.1:9999`.
    pub address: String,
    /// `lines` or `frames` (`frames` only in `listen` mode). Default `lines`.
    pub protocol: Protocol,
    /// Largest record payload, bytes (a line without its `\n`/`\r\n`, a frame without its 4-byte
    /// header). A larger one closes its connection with an error. Default 16 MiB; at most 1 GiB.
    pub max_record_bytes: usize,
    /// `listen`: connections served at once. When they are all open, the one idle the longest
    /// (one that never sent data first; never one with stores outstanding) is closed to make room
    /// for a newcomer; only when none can be closed is the newcomer closed at once (and counted
    /// as rejected). Default 64.
    pub max_connections: usize,
    /// `listen`: connections served at once from one IP address (the same rule when reached:
    /// that address's connection idle the longest makes room). 0 = no limit but
    /// `max_connections`. Default 0.
    pub max_connections_per_peer: usize,
    /// `listen`: a new connection must finish its TLS handshake and send its first byte within
    /// this long, ms, or it is closed (and counted). 0 = no limit. Default 10000.
    pub first_bytes_timeout_ms: u64,
    /// `listen`: the networks producers may connect from (`"10.0.0.0/8"`, `"::1/128"`, or a bare
    /// address); others are closed at once, counted and logged. Empty = everyone (the default).
    pub allow: Vec<String>,
    /// A connection that sent nothing for this long, and has no store outstanding, is closed, ms.
    /// 0 = never. Default 300000 (5 minutes).
    pub idle_timeout_ms: u64,
    /// Bytes read ahead per connection. The buffer never holds more than the larger of this and
    /// one record (`max_record_bytes` plus its delimiter or header). Default 1 MiB; at least 4096.
    pub read_buffer_bytes: usize,
    /// `connect`: first delay before reconnecting after a failed attempt or a closed connection,
    /// ms; it doubles per failure up to `reconnect_max_ms` and starts over after a connection
    /// that delivered data. Default 100.
    pub reconnect_initial_ms: u64,
    /// `connect`: the largest reconnect delay, ms. Default 10000.
    pub reconnect_max_ms: u64,
    /// Most records handed to one `store()` call. A call takes whatever complete records are
    /// already buffered, up to this many. Default 10000.
    pub records_per_store: usize,
    /// Per connection: `store()` calls not yet durable. When reached, the connection stops reading
    /// (TCP backpressure) until the oldest resolves. Default 64.
    pub max_in_flight: usize,
    /// Once shutdown is requested, how long a connection waits for its outstanding stores before
    /// closing without acknowledging them; also how long any closing connection waits for its
    /// final acknowledgement to be written, ms. Default 5000.
    pub close_timeout_ms: u64,
    /// Adds a `peer` header (the producer's `ip:port`, as text) to every record. Off by default:
    /// it costs about 25 bytes per record in the log, and a peer address is no stable identity.
    pub peer_header: bool,
    /// `listen`: serve TLS (`[receiver.tls]`: `cert_file`, `key_file`, optional
    /// `client_ca_file` to require client certificates). Default: plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            mode: Mode::Listen,
            address: DEFAULT_ADDRESS.to_string(),
            protocol: Protocol::Lines,
            max_record_bytes: 16 << 20,
            max_connections: 64,
            max_connections_per_peer: 0,
            first_bytes_timeout_ms: DEFAULT_FIRST_BYTES_TIMEOUT_MS,
            allow: Vec::new(),
            idle_timeout_ms: 300_000,
            read_buffer_bytes: 1 << 20,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 10_000,
            records_per_store: 10_000,
            max_in_flight: 64,
            close_timeout_ms: 5_000,
            peer_header: false,
            tls: None,
        }
    }
}

impl SocketConfig {
    /// A `connect` configuration for `address` (`host:port`), other fields at their defaults.
    pub fn connect(address: impl Into<String>) -> Self {
        SocketConfig {
            mode: Mode::Connect,
            address: address.into(),
            ..SocketConfig::default()
        }
    }

    /// A `listen` configuration binding `address` with `protocol`, other fields at their
    /// defaults.
    pub fn listen(address: impl Into<String>, protocol: Protocol) -> Self {
        SocketConfig {
            mode: Mode::Listen,
            address: address.into(),
            protocol,
            ..SocketConfig::default()
        }
    }

    /// The listener's access settings (`listen` mode).
    pub fn listener_settings(&self) -> ListenerSettings {
        ListenerSettings {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            first_bytes_timeout_ms: self.first_bytes_timeout_ms,
            allow: self.allow.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Checks every field (and loads the TLS files); the message names the field and what is
    /// expected.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        check_address(&self.address, self.mode)?;
        if self.mode == Mode::Connect && (self.tls.is_some() || !self.allow.is_empty()) {
            return Err(
                "`tls` and `allow` are listen-mode settings: connect mode dials its source".into(),
            );
        }
        if self.mode == Mode::Connect && self.protocol == Protocol::Frames {
            return Err(
                "protocol = \"frames\" needs mode = \"listen\": connect mode reads \
                        newline-delimited lines only (a plain line source cannot take acks)"
                    .into(),
            );
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(format!(
                "max_record_bytes = {} must be between 1 and {MAX_RECORD_BYTES_LIMIT} (1 GiB)",
                self.max_record_bytes
            ));
        }
        if self.read_buffer_bytes < MIN_READ_BUFFER_BYTES {
            return Err(format!(
                "read_buffer_bytes = {} must be at least {MIN_READ_BUFFER_BYTES}",
                self.read_buffer_bytes
            ));
        }
        if self.read_buffer_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(format!(
                "read_buffer_bytes = {} must be at most {MAX_RECORD_BYTES_LIMIT} (1 GiB)",
                self.read_buffer_bytes
            ));
        }
        for (name, v) in [
            ("max_connections", self.max_connections),
            ("records_per_store", self.records_per_store),
            ("max_in_flight", self.max_in_flight),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.reconnect_initial_ms == 0 {
            return Err("reconnect_initial_ms must be greater than 0".into());
        }
        if self.reconnect_max_ms < self.reconnect_initial_ms {
            return Err(format!(
                "reconnect_max_ms = {} must be at least reconnect_initial_ms = {}",
                self.reconnect_max_ms, self.reconnect_initial_ms
            ));
        }
        if self.mode == Mode::Listen {
            self.listener_settings().validate()?;
        }
        Ok(())
    }
}

fn check_address(address: &str, mode: Mode) -> Result<(), String> {
    let (host, port) = address.rsplit_once(':').ok_or_else(|| {
        format!("address = {address:?} must be host:port (for example {DEFAULT_ADDRESS})")
    })?;
    if host.is_empty() || host == "[]" {
        return Err(format!("address = {address:?} has no host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address = {address:?} has no valid port (0-65535)"))?;
    if port == 0 && mode == Mode::Connect {
        return Err(format!(
            "address = {address:?}: connect mode needs a port other than 0"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = SocketConfig::default();
        c.validate().unwrap();
        assert_eq!(c.mode, Mode::Listen);
        assert_eq!(c.address, "127.0.0.1:9999");
        assert_eq!(c.protocol, Protocol::Lines);
        assert_eq!(c.max_record_bytes, 16 << 20);
        assert_eq!(c.max_connections, 64);
        assert_eq!(c.idle_timeout_ms, 300_000);
        assert_eq!(c.read_buffer_bytes, 1 << 20);
        assert_eq!((c.reconnect_initial_ms, c.reconnect_max_ms), (100, 10_000));
        assert_eq!((c.records_per_store, c.max_in_flight), (10_000, 64));
        assert_eq!(c.max_connections_per_peer, 0);
        assert_eq!(c.first_bytes_timeout_ms, 10_000);
        assert!(c.allow.is_empty() && c.tls.is_none());
        SocketConfig::connect("localhost:7").validate().unwrap();
        SocketConfig::listen("[::1]:0", Protocol::Frames)
            .validate()
            .unwrap();
    }

    #[test]
    fn serde_fills_defaults_and_rejects_unknown_keys() {
        let c: SocketConfig = serde_json::from_str(
            r#"{"mode": "connect", "address": "example.org:9000", "idle_timeout_ms": 0}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Connect);
        assert_eq!(c.address, "example.org:9000");
        assert_eq!(c.idle_timeout_ms, 0);
        assert_eq!(c.max_in_flight, 64);
        let e = serde_json::from_str::<SocketConfig>(r#"{"adress": "x:1"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `adress`"), "{e}");
        let c: SocketConfig = serde_json::from_str(
            r#"{"allow": ["10.0.0.0/8"], "tls": {"cert_file": "c.pem", "key_file": "k.pem"}}"#,
        )
        .unwrap();
        assert_eq!(c.allow, ["10.0.0.0/8"]);
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file.to_str(), Some("c.pem"));
        assert!(tls.client_ca_file.is_none());
        let e = serde_json::from_str::<SocketConfig>(r#"{"tls": {"cert": "c.pem"}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `cert`"), "{e}");
        let e = serde_json::from_str::<SocketConfig>(r#"{"protocol": "json"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `json`"), "{e}");
        let back: SocketConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |f: fn(&mut SocketConfig), field: &str| {
            let mut c = SocketConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(field), "{e:?} should name {field}");
        };
        bad(|c| c.address = "nohost".into(), "address");
        bad(|c| c.address = ":80".into(), "address");
        bad(|c| c.address = "h:99999".into(), "address");
        bad(|c| *c = SocketConfig::connect("h:0"), "address");
        bad(
            |c| {
                c.mode = Mode::Connect;
                c.protocol = Protocol::Frames;
            },
            "frames",
        );
        bad(|c| c.max_record_bytes = 0, "max_record_bytes");
        bad(|c| c.max_record_bytes = (1 << 30) + 1, "max_record_bytes");
        bad(|c| c.read_buffer_bytes = 100, "read_buffer_bytes");
        bad(|c| c.max_connections = 0, "max_connections");
        bad(|c| c.records_per_store = 0, "records_per_store");
        bad(|c| c.max_in_flight = 0, "max_in_flight");
        bad(|c| c.reconnect_initial_ms = 0, "reconnect_initial_ms");
        bad(|c| c.reconnect_max_ms = 50, "reconnect_max_ms");
        bad(|c| c.allow = vec!["10.0.0.0/33".into()], "allow");
        bad(
            |c| {
                *c = SocketConfig::connect("h:1");
                c.allow = vec!["10.0.0.0/8".into()];
            },
            "allow",
        );
    }
}
