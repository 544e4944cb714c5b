//! Configuration of a [`StreamingContext`](super::StreamingContext).

use serde::{Deserialize, Serialize};

use crate::rate::RateConfig;
use crate::replica::ReplicationConfig;
use crate::wal::WalConfig;
use weir_receiver::ConfigError;

/// How batches are triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// A batch every `batch_interval_ms` of wall-clock time (the default).
    #[default]
    Interval,
    /// Batches only when [`RunningContext::run_batch`](super::RunningContext::run_batch) is
    /// called: for embedding weir in a program that decides when to process, and for tests.
    Manual,
}

/// Configuration of the engine between receivers and jobs. Every field has a default; see each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// This node's name in what it writes (output file names, `jsonl` records, Kafka headers;
    /// see [`Batch::node_id`](crate::Batch::node_id)), so that nodes sharing a destination never
    /// overwrite each other's batches. 1 to 64 characters of `A-Z a-z 0-9 . _ -`. Default: the
    /// id recorded in the data directory at an earlier start, else `<host name>-<hash of the
    /// absolute data directory>` (recorded then; see [`crate::identity`]); on custom storage
    /// ([`StreamingContext::with_storage`](super::StreamingContext::with_storage)) the host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Time between batches, ms. Default 1000.
    pub batch_interval_ms: u64,
    /// A receiver's records are cut into a block at least this often, ms. Default 200. This bounds
    /// how long a `store()` waits for durability when its block does not fill up.
    pub block_interval_ms: u64,
    /// A block is cut as soon as it holds this many bytes. Default 4 MiB. One `store()` call's
    /// records always share a block, so a single larger call makes a larger block (up to the WAL's
    /// `max_record_bytes`).
    pub block_max_bytes: u64,
    /// Per receiver: bytes accepted by `store()` but not yet durable. When reached, `store()`
    /// waits (backpressure). Default 32 MiB; at least `block_max_bytes`.
    pub max_pending_bytes: u64,
    /// Bytes of durable blocks kept in memory for batch processing; blocks beyond it are read back
    /// from the WAL (with checksum verification) when needed. Default 128 MiB.
    pub block_cache_bytes: u64,
    /// How batches are triggered. Default `interval`.
    pub clock: ClockMode,
    /// A failed receiver is restarted after this delay (plus up to 25 % jitter; see
    /// `weir_receiver::Backoff`), doubling per consecutive failure up to
    /// `receiver_restart_max_ms`. Default 100.
    pub receiver_restart_initial_ms: u64,
    /// Upper bound of the restart delay, ms. Default 30000.
    pub receiver_restart_max_ms: u64,
    /// A failed job is retried (same batch, same contents) after this delay, doubling up to
    /// `job_retry_max_ms`. Default 100.
    pub job_retry_initial_ms: u64,
    /// Upper bound of the job retry delay, ms. Default 10000.
    pub job_retry_max_ms: u64,
    /// On a graceful stop, receivers get this long to return after the shutdown signal before
    /// they are abandoned (whatever they stored is still made durable and processed). Default 10000.
    pub receiver_stop_timeout_ms: u64,
    /// Rate limits and backpressure (per receiver).
    pub rate: RateConfig,
    /// The write-ahead log.
    pub wal: WalConfig,
    /// Replicated acknowledgements (off when absent): a block is acknowledged only once it is
    /// fsynced locally and durable on the replica, so that a node started with the same
    /// `node_id` on a new machine gives back every acknowledged record (see
    /// [`crate::replica`]). Requires `node_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            node_id: None,
            batch_interval_ms: 1000,
            block_interval_ms: 200,
            block_max_bytes: 4 << 20,
            max_pending_bytes: 32 << 20,
            block_cache_bytes: 128 << 20,
            clock: ClockMode::Interval,
            receiver_restart_initial_ms: 100,
            receiver_restart_max_ms: 30_000,
            job_retry_initial_ms: 100,
            job_retry_max_ms: 10_000,
            receiver_stop_timeout_ms: 10_000,
            rate: RateConfig::default(),
            wal: WalConfig::default(),
            replication: None,
        }
    }
}

impl StreamingConfig {
    /// Checks every field; the message names the field and what is expected.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("batch_interval_ms", self.batch_interval_ms),
            ("block_interval_ms", self.block_interval_ms),
            ("block_max_bytes", self.block_max_bytes),
            (
                "receiver_restart_initial_ms",
                self.receiver_restart_initial_ms,
            ),
            ("job_retry_initial_ms", self.job_retry_initial_ms),
        ];
        if let Some(id) = &self.node_id {
            crate::identity::validate_node_id(id)
                .map_err(|e| ConfigError::new("node_id", format!("{id:?}: {e}")))?;
        }
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::new(name, "must be greater than 0"));
            }
        }
        if self.block_max_bytes > u64::from(self.wal.max_record_bytes) {
            return Err(ConfigError::new(
                "block_max_bytes",
                format!(
                    "= {} exceeds wal.max_record_bytes = {}",
                    self.block_max_bytes, self.wal.max_record_bytes
                ),
            ));
        }
        if self.max_pending_bytes < self.block_max_bytes {
            return Err(ConfigError::new(
                "max_pending_bytes",
                format!(
                    "= {} must be at least block_max_bytes = {}",
                    self.max_pending_bytes, self.block_max_bytes
                ),
            ));
        }
        if self.max_pending_bytes > (u64::from(u32::MAX) << 10) {
            return Err(ConfigError::new("max_pending_bytes", "must be below 4 TiB"));
        }
        if self.receiver_restart_max_ms < self.receiver_restart_initial_ms {
            return Err(ConfigError::new(
                "receiver_restart_max_ms",
                "must be at least receiver_restart_initial_ms",
            ));
        }
        if self.job_retry_max_ms < self.job_retry_initial_ms {
            return Err(ConfigError::new(
                "job_retry_max_ms",
                "must be at least job_retry_initial_ms",
            ));
        }
        if let Some(r) = &self.replication {
            if self.node_id.is_none() {
                return Err(ConfigError::new(
                    "node_id",
                    "must be set when replication is on: a default derived from the host or the \
                     data directory would change on a new machine, which could then not adopt \
                     this node's replicated state",
                ));
            }
            r.validate().map_err(|e| e.within("replication"))?;
        }
        self.rate.validate().map_err(|e| e.within("rate"))?;
        self.wal.validate().map_err(|e| e.within("wal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_docs() {
        let c = StreamingConfig::default();
        c.validate().unwrap();
        assert_eq!(c.batch_interval_ms, 1000);
        assert_eq!(c.block_interval_ms, 200);
    }

    #[test]
    fn errors_name_the_field() {
        let c = StreamingConfig {
            block_interval_ms: 0,
            ..StreamingConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "block_interval_ms");
        let c = StreamingConfig {
            max_pending_bytes: 1,
            ..StreamingConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "max_pending_bytes");
        let err = serde_json::from_str::<StreamingConfig>(r#"{"batch_interval": 5}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `batch_interval`"),
            "{err}"
        );
    }
}
