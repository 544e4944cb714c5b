//! [`ConfigError`]: an invalid setting, with the key it is about.

/// An invalid setting: the key it is about (dotted within its section, as in the configuration
/// file: `wal.segment_max_bytes`) and what is wrong with it. Shown as `<key> <reason>`, so the
/// reason reads on from the key: `block_interval_ms must be greater than 0`.
///
/// Hosts use the key to point at the offending line of a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {reason}")]
pub struct ConfigError {
    /// The key, dotted within its section (`wal.fsync`, `rate.min_rate`).
    pub key: String,
    /// What is wrong and what is expected, reading on from the key.
    pub reason: String,
}

impl ConfigError {
    /// `key` is wrong: `reason`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The same error for a key inside `section`: `segment_max_bytes` in `wal` becomes
    /// `wal.segment_max_bytes`.
    #[must_use]
    pub fn within(mut self, section: &str) -> ConfigError {
        self.key = format!("{section}.{}", self.key);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_leads_and_sections_nest() {
        let e = ConfigError::new("segment_max_bytes", "= 10 is too small").within("wal");
        assert_eq!(e.key, "wal.segment_max_bytes");
        assert_eq!(e.to_string(), "wal.segment_max_bytes = 10 is too small");
    }
}
