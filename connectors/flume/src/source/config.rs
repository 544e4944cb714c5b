//! Configuration of a [`FlumeSourceReceiver`](crate::FlumeSourceReceiver).

use serde::{Deserialize, Serialize};
use weir_receiver::listener::{ListenerSettings, TlsConfig, DEFAULT_FIRST_BYTES_TIMEOUT_MS};

/// The default `address`: Flume's customary Avro port on the loopback interface.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:41414";
/// The largest accepted `max_frame_bytes` (1 GiB). A call's events must also fit one WAL
/// record (`wal.max_record_bytes`, 256 MiB by default).
pub const MAX_FRAME_BYTES_LIMIT: usize = 1 << 30;
/// The smallest accepted `max_frame_bytes`.
pub const MIN_FRAME_BYTES: usize = 1024;

/// Configuration of Flume's Avro push source. Every field has a default; unknown keys are
/// rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlumeSourceConfig {
    /// Address to bind (`0.0.0.0:PORT` to accept from other hosts; port 0 picks a free port).
    /// Default `127.0.0.1:41414`.
    pub address: String,
    /// Flume's `compression-type = deflate`: both directions are one zlib stream each. Must
    /// match the agents' sink setting (a mismatch shows as malformed frames). Default false.
    pub deflate: bool,
    /// Largest frame (one call: headers, handshake and events together), bytes; a larger one
    /// closes its connection. Default 32 MiB; between 1024 and 1 GiB.
    pub max_frame_bytes: usize,
    /// Most buffers in one frame (Java cuts every 8 KiB); more closes the connection.
    /// Default 65536.
    pub max_buffers_per_frame: usize,
    /// Most events in one `appendBatch`; more is answered with an error. Default 10000.
    pub max_events_per_batch: usize,
    /// Connections served at once. When they are all open, the one idle the longest (one that
    /// never sent data first; never one with calls outstanding) is closed to make room for a
    /// newcomer; only when none can be closed is the newcomer closed at once (and counted as
    /// rejected). Default 64.
    pub max_connections: usize,
    /// Connections served at once from one IP address (the same rule when reached). 0 = no
    /// limit but `max_connections`. Default 0.
    pub max_connections_per_peer: usize,
    /// A new connection must finish its TLS handshake and send its first byte within this long,
    /// ms, or it is closed (and counted). 0 = no limit. Default 10000.
    pub first_bytes_timeout_ms: u64,
    /// The networks agents may connect from (`"10.0.0.0/8"`, `"::1/128"`, or a bare address);
    /// others are closed at once, counted and logged. Empty = everyone (the default).
    pub allow: Vec<String>,
    /// A connection that sent nothing for this long, with no call outstanding, is closed, ms
    /// (a Flume agent reconnects on its next batch). 0 = never. Default 600000 (10 minutes).
    pub idle_timeout_ms: u64,
    /// Per connection: calls read and not yet answered (pipelined calls). When reached, the
    /// connection stops reading until the oldest is answered. Default 16.
    pub max_in_flight: usize,
    /// Once shutdown is requested, how long outstanding calls may wait to become durable before
    /// they are answered `FAILED`, ms. Default 5000.
    pub close_timeout_ms: u64,
    /// Serve TLS (a `tls` table: `cert_file`, `key_file`, optional `client_ca_file` to require
    /// client certificates), as Flume's Avro sink speaks it with `ssl = true`. Default: plain
    /// TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for FlumeSourceConfig {
    fn default() -> Self {
        FlumeSourceConfig {
            address: DEFAULT_ADDRESS.to_string(),
            deflate: false,
            max_frame_bytes: 32 << 20,
            max_buffers_per_frame: 65_536,
            max_events_per_batch: 10_000,
            max_connections: 64,
            max_connections_per_peer: 0,
            first_bytes_timeout_ms: DEFAULT_FIRST_BYTES_TIMEOUT_MS,
            allow: Vec::new(),
            idle_timeout_ms: 600_000,
            max_in_flight: 16,
            close_timeout_ms: 5_000,
            tls: None,
        }
    }
}

impl FlumeSourceConfig {
    /// A configuration binding `address`, other fields at their defaults.
    pub fn listen(address: impl Into<String>) -> Self {
        FlumeSourceConfig {
            address: address.into(),
            ..FlumeSourceConfig::default()
        }
    }

    /// The listener's access settings.
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
        let address = &self.address;
        let (host, port) = address.rsplit_once(':').ok_or_else(|| {
            format!("address = {address:?} must be host:port (for example {DEFAULT_ADDRESS})")
        })?;
        if host.is_empty() || host == "[]" {
            return Err(format!("address = {address:?} has no host"));
        }
        port.parse::<u16>()
            .map_err(|_| format!("address = {address:?} has no valid port (0-65535)"))?;
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES_LIMIT).contains(&self.max_frame_bytes) {
            return Err(format!(
                "max_frame_bytes = {} must be between {MIN_FRAME_BYTES} and \
                 {MAX_FRAME_BYTES_LIMIT} (1 GiB)",
                self.max_frame_bytes
            ));
        }
        for (name, v) in [
            ("max_buffers_per_frame", self.max_buffers_per_frame),
            ("max_events_per_batch", self.max_events_per_batch),
            ("max_connections", self.max_connections),
            ("max_in_flight", self.max_in_flight),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_buffers_per_frame > i32::MAX as usize {
            return Err(format!(
                "max_buffers_per_frame = {} must be at most {}",
                self.max_buffers_per_frame,
                i32::MAX
            ));
        }
        self.listener_settings().validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_serde_rejects_unknown_keys() {
        FlumeSourceConfig::default().validate().unwrap();
        let c: FlumeSourceConfig =
            serde_json::from_str(r#"{"address": "0.0.0.0:4141", "deflate": true}"#).unwrap();
        assert!(c.deflate);
        assert_eq!(c.max_events_per_batch, 10_000);
        assert_eq!(
            (c.first_bytes_timeout_ms, c.max_connections_per_peer),
            (10_000, 0)
        );
        assert!(c.allow.is_empty() && c.tls.is_none());
        let e =
            serde_json::from_str::<FlumeSourceConfig>(r#"{"compression": "deflate"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `compression`"), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |f: fn(&mut FlumeSourceConfig), field: &str| {
            let mut c = FlumeSourceConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(field), "{e:?} should name {field}");
        };
        bad(|c| c.address = "nohost".into(), "address");
        bad(|c| c.address = "h:70000".into(), "address");
        bad(|c| c.max_frame_bytes = 10, "max_frame_bytes");
        bad(|c| c.max_buffers_per_frame = 0, "max_buffers_per_frame");
        bad(|c| c.max_events_per_batch = 0, "max_events_per_batch");
        bad(|c| c.max_connections = 0, "max_connections");
        bad(|c| c.max_in_flight = 0, "max_in_flight");
        bad(|c| c.allow = vec!["x".into()], "allow");
    }
}
