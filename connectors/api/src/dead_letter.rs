//! Where an output sends the records its destination cannot accept (`dead_letter = { ... }` in
//! an `[[output]]`). Shared by the outputs of every crate; `receiver-node` writes them (see its
//! `output::dead_letter`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A dead-letter output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeadLetterConfig {
    /// One jsonl file per batch that had rejects, in `path` (created if missing), written
    /// atomically; a re-run batch rewrites the same file.
    Dir {
        /// The directory.
        path: PathBuf,
    },
    /// Each rejected record produced to `topic` (idempotent producer, `acks=all`) with its
    /// payload, key and headers, plus `weir.reason`, `weir.output`, `weir.node` and
    /// `weir.batch_time` headers. At-least-once: a re-run batch produces its rejects again.
    Kafka {
        /// `bootstrap.servers`.
        bootstrap_servers: String,
        /// The topic.
        topic: String,
    },
}

impl DeadLetterConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            DeadLetterConfig::Dir { path } if path.as_os_str().is_empty() => {
                Err("dead_letter: `path` must not be empty".into())
            }
            DeadLetterConfig::Kafka {
                bootstrap_servers,
                topic,
            } if bootstrap_servers.trim().is_empty() || topic.is_empty() => {
                Err("dead_letter: `bootstrap_servers` and `topic` are required".into())
            }
            _ => Ok(()),
        }
    }
}
