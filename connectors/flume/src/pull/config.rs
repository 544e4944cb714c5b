//! Configuration of a [`FlumePullReceiver`](crate::FlumePullReceiver).

use serde::{Deserialize, Serialize};

use crate::source::{MAX_FRAME_BYTES_LIMIT, MIN_FRAME_BYTES};

/// Most workers per address.
pub const MAX_WORKERS: usize = 256;

/// Configuration of the pull receiver (a `SparkFlumeProtocol` client). Every field but
/// `addresses` has a default; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlumePullConfig {
    /// The pull sinks to poll, `host:port` each (at least one).
    pub addresses: Vec<String>,
    /// Connections (workers) per address, each polling on its own. Default 1; at most 256.
    pub workers: usize,
    /// `n` of each `getEventBatch(n)`: the most events one batch (and one `store()`) holds.
    /// Default 1000 (Spark's `maxBatchSize`).
    pub max_batch: usize,
    /// Pause after an empty batch or an error batch before polling again, ms. Default 500.
    pub poll_interval_ms: u64,
    /// First pause before reconnecting after a connection failed, ms; doubled after each
    /// further failure. Default 100.
    pub reconnect_backoff_ms: u64,
    /// Longest pause between reconnection attempts, ms. Default 10000.
    pub reconnect_backoff_max_ms: u64,
    /// `compression-type = deflate` on the connection (must match the sink). Default false.
    pub deflate: bool,
    /// How long one call may take (connecting included) before the connection is dropped and
    /// made again, ms. A sink may hold `getEventBatch` while it has no events (Spark's sink up
    /// to several seconds), so keep this well above that. Default 30000.
    pub request_timeout_ms: u64,
    /// Once shutdown is requested, how long a batch being stored may take to become durable
    /// before it is `nack`ed instead of `ack`ed, ms. Default 5000.
    pub close_timeout_ms: u64,
    /// Largest reply frame accepted, bytes. Default 64 MiB; between 1024 and 1 GiB.
    pub max_frame_bytes: usize,
}

impl Default for FlumePullConfig {
    fn default() -> Self {
        FlumePullConfig {
            addresses: Vec::new(),
            workers: 1,
            max_batch: 1000,
            poll_interval_ms: 500,
            reconnect_backoff_ms: 100,
            reconnect_backoff_max_ms: 10_000,
            deflate: false,
            request_timeout_ms: 30_000,
            close_timeout_ms: 5_000,
            max_frame_bytes: 64 << 20,
        }
    }
}

impl FlumePullConfig {
    /// A configuration polling `addresses`, other fields at their defaults.
    pub fn poll<S: Into<String>>(addresses: impl IntoIterator<Item = S>) -> Self {
        FlumePullConfig {
            addresses: addresses.into_iter().map(Into::into).collect(),
            ..FlumePullConfig::default()
        }
    }

    /// Checks every field; the message names the field and what is expected.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        if self.addresses.is_empty() {
            return Err(
                "addresses must name at least one pull sink (for example [\"127.0.0.1:41415\"])"
                    .into(),
            );
        }
        for address in &self.addresses {
            let (host, port) = address
                .rsplit_once(':')
                .ok_or_else(|| format!("addresses: {address:?} must be host:port"))?;
            if host.is_empty() {
                return Err(format!("addresses: {address:?} has no host"));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => {
                    return Err(format!(
                        "addresses: {address:?} has no valid port (1-65535)"
                    ))
                }
            }
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(format!(
                "workers = {} must be between 1 and {MAX_WORKERS}",
                self.workers
            ));
        }
        if !(1..=i32::MAX as usize).contains(&self.max_batch) {
            return Err(format!(
                "max_batch = {} must be between 1 and {}",
                self.max_batch,
                i32::MAX
            ));
        }
        for (name, v) in [
            ("poll_interval_ms", self.poll_interval_ms),
            ("reconnect_backoff_ms", self.reconnect_backoff_ms),
            ("request_timeout_ms", self.request_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_ms {
            return Err(format!(
                "reconnect_backoff_max_ms = {} must be at least reconnect_backoff_ms = {}",
                self.reconnect_backoff_max_ms, self.reconnect_backoff_ms
            ));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES_LIMIT).contains(&self.max_frame_bytes) {
            return Err(format!(
                "max_frame_bytes = {} must be between {MIN_FRAME_BYTES} and \
                 {MAX_FRAME_BYTES_LIMIT} (1 GiB)",
                self.max_frame_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_an_address_and_validate_names_the_field() {
        let e = FlumePullConfig::default().validate().unwrap_err();
        assert!(e.contains("addresses"), "{e}");
        FlumePullConfig::poll(["127.0.0.1:41415"])
            .validate()
            .unwrap();
        let bad = |f: fn(&mut FlumePullConfig), field: &str| {
            let mut c = FlumePullConfig::poll(["h:1"]);
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(field), "{e:?} should name {field}");
        };
        bad(|c| c.addresses = vec!["nope".into()], "addresses");
        bad(|c| c.addresses = vec!["h:0".into()], "addresses");
        bad(|c| c.workers = 0, "workers");
        bad(|c| c.max_batch = 0, "max_batch");
        bad(|c| c.poll_interval_ms = 0, "poll_interval_ms");
        bad(
            |c| c.reconnect_backoff_max_ms = 1,
            "reconnect_backoff_max_ms",
        );
        bad(|c| c.max_frame_bytes = 1, "max_frame_bytes");
        let e = serde_json::from_str::<FlumePullConfig>(r#"{"sinks": []}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `sinks`"), "{e}");
    }
}
