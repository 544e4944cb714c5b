//! WAL errors. Callers can act on the variant: `Corruption` needs an operator (or
//! `skip_corrupt`), `Fatal` needs a restart into recovery, `Locked` another directory.

use std::io;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// File or directory concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Wal` in this one) holds the directory.
    #[error("WAL directory {dir} is in use: {detail}")]
    Locked {
        /// The directory.
        dir: String,
        /// Who holds it, when known.
        detail: String,
    },
    /// Damaged data that is not a torn tail.
    #[error("corruption in WAL segment {segment} at offset {offset}: {reason}")]
    Corruption {
        /// Segment id.
        segment: u64,
        /// Byte offset within the segment file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log stopped after a failure that makes further acknowledgements unsafe (a failed
    /// fsync or write). Every pending and later append fails with this; reopen to recover.
    #[error("WAL stopped: {0}")]
    Fatal(String),
    /// The log was closed.
    #[error("WAL is closed")]
    Closed,
    /// A payload larger than `max_record_bytes`.
    #[error("record of {len} bytes exceeds max_record_bytes = {max}")]
    RecordTooLarge {
        /// Payload length.
        len: usize,
        /// Configured maximum.
        max: u32,
    },
    /// A handle or position that does not name a readable record.
    #[error("no record at segment {segment} offset {offset}: {reason}")]
    NotFound {
        /// Segment id.
        segment: u64,
        /// Offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Invalid configuration.
    #[error("invalid WAL configuration: {0}")]
    Config(weir_receiver::ConfigError),
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<String>, source: io::Error) -> Self {
        WalError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Result type of the WAL.
pub type Result<T, E = WalError> = std::result::Result<T, E>;
