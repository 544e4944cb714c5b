//! The `parquet` output (being built).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use weir::batch::Batch;

use super::dead_letter::{DeadLetterConfig, DeadLetters};
use super::{OutputError, Written};

/// `[[output]] type = "parquet"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// A local directory.
    pub path: PathBuf,
    /// Where records the output cannot accept go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
}

impl ParquetConfig {
    /// Where it writes, for logs.
    pub fn destination(&self) -> String {
        self.path.display().to_string()
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A built `parquet` output.
#[derive(Debug)]
pub struct ParquetOutput {
    config: ParquetConfig,
}

impl ParquetOutput {
    /// Builds it (connects nowhere).
    ///
    /// # Errors
    /// Why the configuration is refused.
    pub fn new(config: &ParquetConfig) -> Result<Self, String> {
        Ok(ParquetOutput {
            config: config.clone(),
        })
    }

    /// Writes `batch`.
    ///
    /// # Errors
    /// [`OutputError`]: the batch is retried.
    pub fn write(&self, _batch: &Batch, _dead: &DeadLetters) -> Result<Written, OutputError> {
        Err(OutputError::Destination(format!(
            "parquet {} is not built yet",
            self.config.destination()
        )))
    }
}
