//! The `postgres` output (being built).

use serde::{Deserialize, Serialize};
use weir::batch::Batch;

use super::dead_letter::{DeadLetterConfig, DeadLetters};
use super::{OutputError, Written};

/// `[[output]] type = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The table.
    pub table: String,
    /// Where records the output cannot accept go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
}

impl PostgresConfig {
    /// Where it writes, for logs.
    pub fn destination(&self) -> String {
        self.table.clone()
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A built `postgres` output.
#[derive(Debug)]
pub struct PostgresOutput {
    config: PostgresConfig,
}

impl PostgresOutput {
    /// Builds it (connects nowhere).
    ///
    /// # Errors
    /// Why the configuration is refused.
    pub fn new(config: &PostgresConfig) -> Result<Self, String> {
        Ok(PostgresOutput {
            config: config.clone(),
        })
    }

    /// Writes `batch`.
    ///
    /// # Errors
    /// [`OutputError`]: the batch is retried.
    pub fn write(&self, _batch: &Batch, _dead: &DeadLetters) -> Result<Written, OutputError> {
        Err(OutputError::Destination(format!(
            "postgres {} is not built yet",
            self.config.destination()
        )))
    }
}
