//! weir: ingest data streams without losing data.
//!
//! Receivers ([`receiver`], the `weir-receiver` crate) hand records to a block generator; every
//! block is written, checksummed, to a write-ahead log ([`wal`]) and fsynced before the source is
//! acknowledged; a batch clock turns durable blocks into immutable batches ([`Batch`]) that jobs
//! process; after a crash, recovery gives back every acknowledged record. The entry point is
//! [`StreamingContext`]; the pieces are [`block`] (generator, writer, cache), [`tracker`] (batch
//! allocation in `redb`), [`batch`], [`stream`] (clock, scheduler, recovery, supervisor, metrics)
//! and [`rate`] (rate limits and PID backpressure).
//!
//! The WAL on its own:
//!
//! ```
//! use weir::wal::{Wal, WalConfig, WalPosition};
//!
//! let dir = tempfile::tempdir()?;
//! let (wal, _recovery) = Wal::open_dir(dir.path(), WalConfig::default())?;
//! let handle = wal.append(b"hello".to_vec()).wait()?; // returns once fdatasync'ed
//! assert_eq!(&wal.read(handle)?[..], b"hello");
//! assert_eq!(wal.scan(WalPosition::START).count(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod block;
pub mod identity;
pub mod rate;
pub mod replica;
pub mod space;
pub mod stream;
pub mod tracker;

pub use batch::{Batch, BatchError, BlockErrorKind, Partitioned};
pub use stream::{
    ClockMode, EngineError, JobError, MetricsRegistry, RunningContext, StopReport, StreamingConfig,
    StreamingContext,
};
pub use wal::{RecordHandle, Wal, WalConfig, WalError, WalPosition};
pub use weir_receiver as receiver;
pub use weir_receiver::{Checkpoint, Position, Receiver, ReceiverContext, ReceiverError, Record};
pub use weir_wal as wal;
