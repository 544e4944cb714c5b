//! weir: ingest data streams without losing data.
//!
//! Receivers hand records to a block generator; every block is written, checksummed, to a
//! write-ahead log and fsynced before the source is acknowledged; a batch clock turns durable
//! blocks into immutable batches. This crate currently provides the foundation: the
//! write-ahead log ([`wal`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod inspect;
pub mod wal;

pub use wal::{RecordHandle, Wal, WalConfig, WalError, WalPosition};
