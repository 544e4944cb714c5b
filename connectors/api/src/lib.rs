//! The receiver API of weir.
//!
//! (Over 700 lines with its tests: the whole receiver API is on this one page on purpose, so
//! that a connector author reads one file.)
//!
//! A receiver talks to one source (a socket, a Kafka consumer group, a Flume agent, ...) and hands
//! what it reads to weir with [`ReceiverContext::store`]. The returned [`StoreFuture`] resolves only
//! when every record of that call is durable (in a write-ahead-log block that has been fsynced);
//! only then may the receiver acknowledge the source. That is the whole contract:
//!
//! ```
//! use weir_receiver::{Receiver, ReceiverContext, ReceiverError, Record};
//!
//! /// Stores the numbers 0..count, ten per call, then stops.
//! struct Counter {
//!     count: u64,
//! }
//!
//! impl Receiver for Counter {
//!     async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
//!         let mut next = 0;
//!         while next < self.count && !ctx.is_shutting_down() {
//!             let batch: Vec<Record> = (next..(next + 10).min(self.count))
//!                 .map(|n| Record::new(n.to_string()))
//!                 .collect();
//!             next += batch.len() as u64;
//!             ctx.store(batch).await?; // durable from here on: acknowledge the source now
//!         }
//!         Ok(())
//!     }
//! }
//! ```
//!
//! This crate depends on nothing of weir's internals: the engine implements [`ReceiverHost`], and so
//! can a test harness. A receiver that returns an error (or panics) is restarted by weir's supervisor
//! with exponential backoff; one that returns `Ok(())` is finished.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

mod backoff;
mod config_error;
mod dead_letter;
pub mod listener;
mod stats;

pub use backoff::Backoff;
pub use bytes::Bytes;
pub use config_error::ConfigError;
pub use dead_letter::DeadLetterConfig;
pub use stats::{stat_names, unreported_fields, ConnectorStats, Stat, StatKind};
use tokio::sync::watch;

/// One record: a payload, an optional key, headers, and where it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The record's bytes.
    pub payload: Bytes,
    /// An optional key (a Kafka key, say), used by key-based operations and outputs.
    pub key: Option<Bytes>,
    /// Named headers (Flume event headers, Kafka headers), in source order.
    pub headers: Vec<Header>,
    /// Where the source keeps this record (partition/offset, sequence number), if it has such a
    /// notion. It is stored with the record and summarised per block into a [`Checkpoint`].
    pub position: Option<Position>,
}

impl Record {
    /// A record with just a payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Record {
            payload: payload.into(),
            ..Record::default()
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Sets the source position.
    #[must_use]
    pub fn with_position(mut self, position: Position) -> Self {
        self.position = Some(position);
        self
    }

    /// Bytes this record occupies in a block, roughly: payload, key, headers and position.
    pub fn size_hint(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum();
        self.payload.len()
            + self.key.as_ref().map_or(0, |k| k.len() + 4)
            + headers
            + self.position.as_ref().map_or(0, |_| 12)
            + 4
    }
}

/// A named header value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: Bytes,
}

/// A position in a source: `offset` within `partition` of `stream`.
///
/// Kafka: stream = topic, partition, offset. A sequenced source (a pull sink, a framed socket
/// connection): stream = the source's name, partition 0, offset = sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Topic, sink or connection name.
    pub stream: Arc<str>,
    /// Partition within the stream (0 when the source has none).
    pub partition: i32,
    /// Offset or sequence number within the partition; increases with newer records.
    pub offset: u64,
}

impl Position {
    /// A partition/offset position (Kafka style).
    pub fn offset(stream: impl Into<Arc<str>>, partition: i32, offset: u64) -> Self {
        Position {
            stream: stream.into(),
            partition,
            offset,
        }
    }

    /// A sequence number within one unpartitioned stream.
    pub fn sequence(stream: impl Into<Arc<str>>, seq: u64) -> Self {
        Position::offset(stream, 0, seq)
    }
}

/// The highest durable offset per (stream, partition) of one receiver.
///
/// Each block carries its receiver's checkpoint as of the moment the block was cut (taken under the
/// same lock as the block's contents), so after a restart [`ReceiverContext::checkpoint`] tells a
/// receiver exactly how far its durable data goes — e.g. where a Kafka consumer should resume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    offsets: BTreeMap<(Arc<str>, i32), u64>,
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Checkpoint::default()
    }

    /// The highest durable offset of `partition` of `stream`, if any.
    pub fn get(&self, stream: &str, partition: i32) -> Option<u64> {
        self.offsets.get(&(Arc::from(stream), partition)).copied()
    }

    /// Raises the offset of the position's (stream, partition) to the position's offset.
    pub fn observe(&mut self, position: &Position) {
        self.raise(position.stream.clone(), position.partition, position.offset);
    }

    /// Raises the offset of (stream, partition) to `offset` if it is higher.
    pub fn raise(&mut self, stream: Arc<str>, partition: i32, offset: u64) {
        let e = self.offsets.entry((stream, partition)).or_insert(offset);
        *e = (*e).max(offset);
    }

    /// Takes the higher offset of each (stream, partition) from `other`.
    pub fn merge(&mut self, other: &Checkpoint) {
        for ((s, p), o) in &other.offsets {
            self.raise(s.clone(), *p, *o);
        }
    }

    /// (stream, partition, offset) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i32, u64)> {
        self.offsets.iter().map(|((s, p), o)| (&**s, *p, *o))
    }

    /// Number of (stream, partition) entries.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// True if no offsets are known.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

/// Where a stored block lives (opaque outside weir; useful in logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId {
    /// WAL segment id.
    pub segment: u64,
    /// Byte offset of the block's WAL record in that segment.
    pub offset: u64,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.segment, self.offset)
    }
}

/// Answer to a successful [`ReceiverContext::store`]: the records are durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// How many records the call stored.
    pub records: usize,
    /// The block that holds them (`None` for an empty call).
    pub block: Option<BlockId>,
}

/// Why a [`ReceiverContext::store`] did not make its records durable.
///
/// After an error nothing may be acknowledged to the source; some of the records may nevertheless
/// be durable (an fsync that failed after the write), so a source that redelivers them gets
/// at-least-once delivery.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The node is stopping and takes no more records.
    #[error("the node is shutting down and takes no more records")]
    ShuttingDown,
    /// One call's records are larger than a block may be.
    #[error("one store() call of {bytes} bytes exceeds the largest block ({max} bytes); store fewer records per call")]
    TooLarge {
        /// Encoded size of the call.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The write-ahead log failed (I/O error, failed fsync): nothing more will be stored.
    #[error("storage failed: {0}")]
    Storage(String),
}

/// The future returned by [`ReceiverContext::store`]; resolves once the records are durable.
#[must_use = "records are durable only when this future resolves Ok"]
pub struct StoreFuture(Pin<Box<dyn Future<Output = Result<Stored, StoreError>> + Send>>);

impl StoreFuture {
    /// Wraps a future (for [`ReceiverHost`] implementations).
    pub fn new(fut: impl Future<Output = Result<Stored, StoreError>> + Send + 'static) -> Self {
        StoreFuture(Box::pin(fut))
    }

    /// An already-decided answer.
    pub fn ready(result: Result<Stored, StoreError>) -> Self {
        StoreFuture::new(std::future::ready(result))
    }
}

impl Future for StoreFuture {
    type Output = Result<Stored, StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for StoreFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreFuture")
    }
}

/// What a receiver's host (weir's engine, or a test harness) provides.
pub trait ReceiverHost: Send + Sync + 'static {
    /// Stores `records` (all in one block), resolving when they are durable.
    fn store(&self, records: Vec<Record>) -> StoreFuture;
    /// Records a non-fatal problem (logged and counted by the host).
    fn report_error(&self, message: &str);
    /// The receiver's durable checkpoint (see [`Checkpoint`]).
    fn checkpoint(&self) -> Checkpoint;
    /// The highest position per (stream, partition) among the receiver's records in batches
    /// that completed every job and output, in this run (see [`ReceiverContext::completed`]).
    /// A host without batches completes nothing: the default is empty.
    fn completed(&self) -> Checkpoint {
        Checkpoint::new()
    }
}

/// Creates a shutdown signal and the trigger that fires it.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

/// Fires a [`Shutdown`] signal.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    /// Asks every holder of the matching [`Shutdown`] to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// A new signal fed by this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

/// The signal telling a receiver to stop: finish or abandon what it is doing, and return.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// True once stopping was requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when stopping is requested (at once if it already was). Cancel-safe; use it in
    /// `tokio::select!` next to the source's reads.
    pub async fn requested(&self) {
        let mut rx = self.0.clone();
        // An error means the trigger is gone: treat that as a request to stop.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// A receiver's handle on weir: store records, watch for shutdown, report problems.
#[derive(Clone)]
pub struct ReceiverContext {
    name: Arc<str>,
    host: Arc<dyn ReceiverHost>,
    shutdown: Shutdown,
    attempt: u32,
}

impl fmt::Debug for ReceiverContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverContext")
            .field("name", &self.name)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl ReceiverContext {
    /// A context for the receiver `name` (for hosts). `attempt` counts restarts (0 = first run).
    pub fn new(
        name: impl Into<Arc<str>>,
        host: Arc<dyn ReceiverHost>,
        shutdown: Shutdown,
        attempt: u32,
    ) -> Self {
        ReceiverContext {
            name: name.into(),
            host,
            shutdown,
            attempt,
        }
    }

    /// The receiver's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times this receiver was restarted before this run (0 on the first run).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Stores `records`; the future resolves when all of them are durable. Store a source's batch
    /// with one call: one call's records always share one block, and calls are cheap only per call,
    /// not per record. The call may wait before accepting the records (backpressure, rate limits).
    pub fn store(&self, records: Vec<Record>) -> StoreFuture {
        self.host.store(records)
    }

    /// Stores one record (prefer [`ReceiverContext::store`] with many).
    pub fn store_one(&self, record: Record) -> StoreFuture {
        self.host.store(vec![record])
    }

    /// Reports a non-fatal problem: it is logged and counted. For a fatal one, return an error from
    /// [`Receiver::run`] instead, and the supervisor restarts the receiver.
    pub fn report_error(&self, message: &str) {
        self.host.report_error(message);
    }

    /// The receiver's durable checkpoint: the highest stored offset per (stream, partition),
    /// including blocks written before a restart.
    pub fn checkpoint(&self) -> Checkpoint {
        self.host.checkpoint()
    }

    /// The highest position per (stream, partition) among this receiver's records that are in
    /// batches which completed every job and output: what a source may forget (e.g. commit) when
    /// it must not rely on this node's disk. Starts empty at each start of the engine and grows
    /// as batches complete; batches re-run after a restart add nothing until a batch allocated
    /// in this run completes, which covers them (batches complete in order and each block
    /// carries the receiver's whole checkpoint).
    pub fn completed(&self) -> Checkpoint {
        self.host.completed()
    }

    /// The shutdown signal.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// True once the receiver should stop.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_requested()
    }
}

/// Why a receiver's run ended badly; the supervisor logs it and restarts the receiver.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// A message.
    #[error("{0}")]
    Message(String),
    /// Storing failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An I/O error talking to the source.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Any other error, with context.
    #[error("{context}: {source}")]
    Other {
        /// What was being done.
        context: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ReceiverError {
    /// An error with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        ReceiverError::Message(message.into())
    }

    /// Wraps `source` with what was being done.
    pub fn context(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ReceiverError::Other {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// A source of records. `run` is called again after a failure, so keep connection state inside it.
pub trait Receiver: Send + Sync + 'static {
    /// Reads from the source and stores records until the source ends (return `Ok(())`), the
    /// context's shutdown signal fires (return `Ok(())` promptly), or a failure (return `Err`: the
    /// supervisor restarts the receiver after a backoff).
    fn run(&self, ctx: ReceiverContext) -> impl Future<Output = Result<(), ReceiverError>> + Send;
}

/// The future of a type-erased receiver run.
pub type RunFuture = Pin<Box<dyn Future<Output = Result<(), ReceiverError>> + Send>>;

/// A type-erased [`Receiver`], so hosts can keep receivers of different types in one list.
#[derive(Clone)]
pub struct DynReceiver(Arc<dyn Fn(ReceiverContext) -> RunFuture + Send + Sync>);

impl DynReceiver {
    /// Erases the receiver's type.
    pub fn new<R: Receiver>(receiver: R) -> Self {
        let receiver = Arc::new(receiver);
        DynReceiver(Arc::new(move |ctx| {
            let r = receiver.clone();
            Box::pin(async move { r.run(ctx).await })
        }))
    }

    /// Starts one run.
    pub fn run(&self, ctx: ReceiverContext) -> RunFuture {
        (self.0)(ctx)
    }
}

impl fmt::Debug for DynReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DynReceiver")
    }
}

/// The address a listening receiver has bound (with the real port when it was asked for port
/// 0), for tests and tools that need it: set while the receiver listens, `None` before and after.
#[derive(Debug)]
pub struct BoundAddress(watch::Sender<Option<std::net::SocketAddr>>);

impl Default for BoundAddress {
    fn default() -> Self {
        BoundAddress(watch::Sender::new(None))
    }
}

impl BoundAddress {
    /// Records the bound address (`None` once the receiver stopped listening).
    pub fn set(&self, addr: Option<std::net::SocketAddr>) {
        self.0.send_replace(addr);
    }

    /// The bound address, if the receiver is listening now.
    pub fn get(&self) -> Option<std::net::SocketAddr> {
        *self.0.borrow()
    }

    /// Waits until the receiver listens and returns the address (for ever if binding keeps
    /// failing: put a timeout around it).
    pub async fn wait(&self) -> std::net::SocketAddr {
        let mut rx = self.0.subscribe();
        let addr = rx
            .wait_for(Option::is_some)
            .await
            .expect("the sender lives in self");
        addr.expect("waited for Some")
    }
}

/// A half-open range `[from, until)` of offsets of one partition of a replayable source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OffsetRange {
    /// The stream (a Kafka topic, say).
    pub stream: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The first offset of the range.
    pub from: u64,
    /// One past the last offset of the range.
    pub until: u64,
}

impl OffsetRange {
    /// Number of offsets in the range (records, unless the source has gaps such as compacted
    /// or transaction-marker offsets).
    pub fn len(&self) -> u64 {
        self.until.saturating_sub(self.from)
    }

    /// True if the range holds no offset.
    pub fn is_empty(&self) -> bool {
        self.until <= self.from
    }
}

impl fmt::Display for OffsetRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}] {}..{}",
            self.stream, self.partition, self.from, self.until
        )
    }
}

/// A source that is itself a durable, replayable log (Kafka): Spark's "direct approach".
///
/// Nothing is stored in weir's WAL. At every batch the engine asks the source to [`plan`] the
/// next offset ranges, records them in its tracker before processing, and has the source
/// [`read`] exactly those ranges when the batch is processed — again after a crash, from the
/// same ranges, so a re-run batch sees the same records. All methods block (the engine calls
/// them on blocking threads).
///
/// [`plan`]: DirectSource::plan
/// [`read`]: DirectSource::read
pub trait DirectSource: Send + Sync + 'static {
    /// The ranges of the next batch. `position` holds, per partition, the last offset already
    /// planned into a batch (the ranges must start right after it); partitions missing from it
    /// start where the source decides (a committed offset, or its reset policy). Empty ranges
    /// may be left out.
    ///
    /// # Errors
    /// If the source cannot be reached: the batch goes ahead without this source's data, and
    /// the next batch plans again from the same position.
    fn plan(&self, position: &Checkpoint) -> Result<Vec<OffsetRange>, ReceiverError>;

    /// Reads the records of each range, in offset order, one `Vec` per range. Every offset of a
    /// range still in the source must be returned (offsets the source itself skips, such as
    /// compacted ones, are absent).
    ///
    /// # Errors
    /// If a range cannot be read completely (the engine retries the batch with backoff).
    fn read(&self, ranges: &[OffsetRange]) -> Result<Vec<Vec<Record>>, ReceiverError>;

    /// Called once a batch holding these ranges is complete: for example, to commit offsets
    /// back to the source for monitoring. Best effort; the default does nothing.
    fn completed(&self, ranges: &[OffsetRange]) {
        let _ = ranges;
    }
}

/// Locks `m`, going on after a panic elsewhere (a poisoned mutex). The one lock helper of every
/// weir crate: each critical section leaves its data consistent before anything can panic, so a
/// panic in one task must not take down the others that share the lock.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Host {
        stored: Mutex<Vec<Record>>,
        errors: Mutex<Vec<String>>,
    }

    impl ReceiverHost for Host {
        fn store(&self, records: Vec<Record>) -> StoreFuture {
            let n = records.len();
            self.stored.lock().unwrap().extend(records);
            StoreFuture::ready(Ok(Stored {
                records: n,
                block: None,
            }))
        }
        fn report_error(&self, message: &str) {
            self.errors.lock().unwrap().push(message.to_string());
        }
        fn checkpoint(&self) -> Checkpoint {
            let mut c = Checkpoint::new();
            for r in self.stored.lock().unwrap().iter() {
                if let Some(p) = &r.position {
                    c.observe(p);
                }
            }
            c
        }
    }

    struct Seq(u64);

    impl Receiver for Seq {
        async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
            let from = ctx.checkpoint().get("s", 0).map_or(0, |o| o + 1);
            for i in from..self.0 {
                if ctx.is_shutting_down() {
                    break;
                }
                let r = Record::new(i.to_string()).with_position(Position::sequence("s", i));
                ctx.store_one(r).await?;
            }
            ctx.report_error("done");
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_receiver_runs_through_the_erased_interface_and_resumes_from_its_checkpoint() {
        let host = Arc::new(Host::default());
        let (trigger, shutdown) = shutdown_channel();
        let r = DynReceiver::new(Seq(5));
        let ctx = ReceiverContext::new("seq", host.clone(), shutdown.clone(), 0);
        r.run(ctx).await.unwrap();
        assert_eq!(host.stored.lock().unwrap().len(), 5);
        // A second run resumes after the checkpoint: nothing stored twice.
        let ctx = ReceiverContext::new("seq", host.clone(), shutdown, 1);
        r.run(ctx).await.unwrap();
        assert_eq!(host.stored.lock().unwrap().len(), 5);
        assert_eq!(host.checkpoint().get("s", 0), Some(4));
        assert_eq!(host.errors.lock().unwrap().len(), 2);
        trigger.trigger();
    }

    #[tokio::test]
    async fn shutdown_is_seen_by_every_clone_and_resolves_waiters() {
        let (trigger, shutdown) = shutdown_channel();
        let s2 = shutdown.clone();
        assert!(!shutdown.is_requested());
        let waiter = tokio::spawn(async move { s2.requested().await });
        trigger.trigger();
        waiter.await.unwrap();
        assert!(shutdown.is_requested());
        assert!(trigger.subscribe().is_requested());
        // A dropped trigger also means stop.
        let (t, s) = shutdown_channel();
        drop(t);
        s.requested().await;
    }

    #[test]
    fn checkpoints_keep_the_highest_offset_per_partition() {
        let mut a = Checkpoint::new();
        a.observe(&Position::offset("t", 0, 5));
        a.observe(&Position::offset("t", 0, 3));
        a.observe(&Position::offset("t", 1, 7));
        let mut b = Checkpoint::new();
        b.observe(&Position::offset("t", 0, 9));
        b.observe(&Position::offset("u", 0, 1));
        a.merge(&b);
        assert_eq!(a.get("t", 0), Some(9));
        assert_eq!(a.get("t", 1), Some(7));
        assert_eq!(a.get("u", 0), Some(1));
        assert_eq!(a.get("u", 1), None);
        assert_eq!(a.len(), 3);
        let v: Vec<_> = a.iter().collect();
        assert_eq!(v, vec![("t", 0, 9), ("t", 1, 7), ("u", 0, 1)]);
    }

    #[test]
    fn errors_explain_themselves() {
        let e = StoreError::TooLarge { bytes: 10, max: 5 };
        assert!(e
            .to_string()
            .contains("10 bytes exceeds the largest block (5 bytes)"));
        let r: ReceiverError = e.into();
        assert!(r.to_string().contains("store fewer records per call"));
        let c = ReceiverError::context("connecting to 1.2.3.4:5", "refused");
        assert_eq!(c.to_string(), "connecting to 1.2.3.4:5: refused");
    }
}
