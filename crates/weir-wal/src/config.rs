//! WAL configuration: segment size, fsync policy, recovery mode, limits.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_receiver::ConfigError;

/// When appended records are fsynced, and therefore what an acknowledgement means.
///
/// In configuration files it is a string: `"always"`, `"never"` or `"interval(MS)"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum FsyncPolicy {
    /// Every group commit ends with one `fdatasync`; an append's future resolves only after
    /// it. **An acknowledgement means durable**: the record survives a crash or power loss.
    /// This is the default and the only policy under which weir's zero-loss promise holds.
    #[default]
    Always,
    /// Writes are flushed to the OS at once and fsynced at most every `ms` milliseconds (and
    /// when the writer goes idle after that time). **An acknowledgement means written to the
    /// OS**, not durable: a power loss or kernel crash can lose up to `ms` of acknowledged
    /// records (a process crash loses nothing, the OS still has the pages).
    Interval {
        /// Maximum time between fsyncs, in milliseconds.
        ms: u64,
    },
    /// Never fsync records (segments are still fsynced when they are rolled or closed).
    /// **An acknowledgement means written to the OS only.** For comparisons and for data that
    /// may be lost.
    Never,
}

impl TryFrom<String> for FsyncPolicy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<FsyncPolicy> for String {
    fn from(p: FsyncPolicy) -> String {
        p.to_string()
    }
}

impl FsyncPolicy {
    /// True if an acknowledgement under this policy means the record is durable.
    #[must_use]
    pub fn acks_are_durable(self) -> bool {
        matches!(self, FsyncPolicy::Always)
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval { ms } => write!(f, "interval({ms})"),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Parses `always`, `never` or `interval(MS)` (also `interval:MS`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "always" => return Ok(FsyncPolicy::Always),
            "never" => return Ok(FsyncPolicy::Never),
            _ => {}
        }
        let ms = s
            .strip_prefix("interval(")
            .and_then(|r| r.strip_suffix(')'))
            .or_else(|| s.strip_prefix("interval:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .filter(|&ms| ms > 0);
        ms.map(|ms| FsyncPolicy::Interval { ms }).ok_or_else(|| {
            format!(
                "invalid fsync policy {s:?}: expected always, never or interval(MS) with MS > 0"
            )
        })
    }
}

/// What recovery does when it finds damage that is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryMode {
    /// Refuse to open, with an error naming the segment and offset. The default: nothing is
    /// dropped without an operator deciding so.
    #[default]
    Strict,
    /// Skip damaged records, count and log exactly what was lost, and open. Skipped regions
    /// stay on disk (for forensics) and are skipped by reads and scans.
    SkipCorrupt,
}

impl FromStr for RecoveryMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "strict" => Ok(RecoveryMode::Strict),
            "skip_corrupt" | "skip-corrupt" => Ok(RecoveryMode::SkipCorrupt),
            other => Err(format!(
                "invalid recovery mode {other:?}: expected strict or skip_corrupt"
            )),
        }
    }
}

/// Configuration of a [`Wal`](super::Wal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// Roll to a new segment once the current one would exceed this size. Default 64 MiB;
    /// minimum 4 KiB. A record larger than this gets a segment to itself.
    pub segment_max_bytes: u64,
    /// When to fsync. Default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// What recovery does with corruption. Default [`RecoveryMode::Strict`].
    pub recovery: RecoveryMode,
    /// Largest payload accepted by `append` (and believed by the decoder). Default 256 MiB;
    /// at most `u32::MAX`.
    pub max_record_bytes: u32,
    /// Upper bound of the wait between retries while the disk is full. Default 1 s.
    #[serde(with = "millis")]
    pub enospc_max_backoff: Duration,
    /// The free-space floor (like Flume's `minimumRequiredSpace`): while the file system holding
    /// the log has less free space than the smaller of this and 5 % of its size, appends wait
    /// (so `store()` waits and nothing new is acknowledged) before the disk is actually full,
    /// keeping room for the tracker's commits, recovery and cleanup. Default 256 MiB; 0
    /// disables it. See [`crate::space`].
    pub min_free_bytes: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            segment_max_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
            recovery: RecoveryMode::Strict,
            max_record_bytes: 256 * 1024 * 1024,
            enospc_max_backoff: Duration::from_secs(1),
            min_free_bytes: 256 << 20,
        }
    }
}

/// Smallest accepted `segment_max_bytes`.
pub const MIN_SEGMENT_BYTES: u64 = 4096;

impl WalConfig {
    /// Checks the limits documented on each field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field and what is expected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.segment_max_bytes < MIN_SEGMENT_BYTES {
            return Err(ConfigError::new(
                "segment_max_bytes",
                format!(
                    "= {} is too small: expected at least {MIN_SEGMENT_BYTES}",
                    self.segment_max_bytes
                ),
            ));
        }
        if let FsyncPolicy::Interval { ms: 0 } = self.fsync {
            return Err(ConfigError::new("fsync", "interval must be at least 1 ms"));
        }
        if self.enospc_max_backoff.is_zero() {
            return Err(ConfigError::new(
                "enospc_max_backoff",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        for s in ["always", "never", "interval(50)"] {
            assert_eq!(s.parse::<FsyncPolicy>().unwrap().to_string(), s);
        }
        assert_eq!(
            "interval:7".parse::<FsyncPolicy>(),
            Ok(FsyncPolicy::Interval { ms: 7 })
        );
        for bad in ["", "sometimes", "interval(0)", "interval(x)"] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_are_durable_and_strict() {
        let c = WalConfig::default();
        assert!(c.fsync.acks_are_durable());
        assert_eq!(c.recovery, RecoveryMode::Strict);
        assert_eq!(c.segment_max_bytes, 64 << 20);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn tiny_segments_are_rejected_with_the_field_name() {
        let c = WalConfig {
            segment_max_bytes: 10,
            ..WalConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "segment_max_bytes");
    }
}
