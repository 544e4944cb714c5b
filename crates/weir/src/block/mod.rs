//! From `store()` to durable blocks: the per-receiver block generator, the shared block writer
//! (WAL append in log order, then completion of every waiter), and the block cache.

pub mod codec;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::histogram::Histogram;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use weir_receiver::{BlockId, Checkpoint, ReceiverHost, Record, StoreError, StoreFuture, Stored};

use crate::rate::RateLimiter;
use crate::stream::metrics::{Metrics, ReceiverMetrics};
use crate::tracker::{BlockLocation, BlockRef};
use crate::wal::{AppendFuture, RecordHandle, Wal, WalError, WalPosition};
use codec::{BlockBuilder, DecodedBlock};
use weir_receiver::lock;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Durable blocks held in memory for batch processing, bounded in bytes; oldest evicted first.
#[derive(Debug)]
pub(crate) struct BlockCache {
    inner: Mutex<CacheInner>,
    max_bytes: u64,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<RecordHandle, Bytes>,
    order: VecDeque<RecordHandle>,
    bytes: u64,
}

impl BlockCache {
    pub(crate) fn new(max_bytes: u64, metrics: Arc<Metrics>) -> Self {
        BlockCache {
            inner: Mutex::default(),
            max_bytes,
            metrics,
        }
    }

    pub(crate) fn insert(&self, handle: RecordHandle, block: Bytes) {
        let len = block.len() as u64;
        if len > self.max_bytes {
            return;
        }
        let mut c = lock(&self.inner);
        while c.bytes + len > self.max_bytes {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(b) = c.map.remove(&old) {
                c.bytes -= b.len() as u64;
            }
        }
        if c.map.insert(handle, block).is_none() {
            c.order.push_back(handle);
            c.bytes += len;
        }
        self.publish(&c);
    }

    pub(crate) fn get(&self, handle: &RecordHandle) -> Option<Bytes> {
        lock(&self.inner).map.get(handle).cloned()
    }

    pub(crate) fn remove(&self, handle: &RecordHandle) {
        let mut c = lock(&self.inner);
        if let Some(b) = c.map.remove(handle) {
            c.bytes -= b.len() as u64;
            // The order queue entry goes when it reaches the front.
            if c.order.len() > 2 * c.map.len() + 64 {
                let CacheInner { map, order, .. } = &mut *c;
                order.retain(|h| map.contains_key(h));
            }
        }
        self.publish(&c);
    }

    fn publish(&self, c: &CacheInner) {
        self.metrics.blocks_cached.set(c.map.len() as u64);
        self.metrics.cache_bytes.set(c.bytes);
    }
}

/// Why a block of a batch could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockErrorKind {
    /// The record or its contents fail their checksum or do not decode.
    Corrupt,
    /// The block is no longer there (a deleted segment, a forgotten direct block).
    Gone,
    /// An I/O error or a stopped WAL.
    Unreadable,
}

/// Reads blocks for batches: from the cache, else from the WAL (checksummed); blocks of direct
/// sources from memory (pinned until their batch is forgotten).
#[derive(Debug)]
pub(crate) struct BlockSource {
    pub(crate) wal: Arc<Wal>,
    pub(crate) cache: Arc<BlockCache>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pinned: Mutex<HashMap<u64, Bytes>>,
    pub(crate) next_pinned: std::sync::atomic::AtomicU64,
}

impl BlockSource {
    pub(crate) fn new(wal: Arc<Wal>, cache: Arc<BlockCache>, metrics: Arc<Metrics>) -> Self {
        BlockSource {
            wal,
            cache,
            metrics,
            pinned: Mutex::default(),
            next_pinned: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Keeps `block` in memory (a direct source's block) until [`unpin`]; returns where it is.
    ///
    /// [`unpin`]: Self::unpin
    pub(crate) fn pin(&self, block: Bytes) -> BlockLocation {
        let id = self.next_pinned.fetch_add(1, Relaxed);
        lock(&self.pinned).insert(id, block);
        BlockLocation::Memory { id }
    }

    /// Forgets `location` if it is a pinned block, or drops a WAL block from the cache.
    pub(crate) fn release(&self, location: &BlockLocation) {
        match location {
            BlockLocation::Memory { id } => {
                lock(&self.pinned).remove(id);
            }
            BlockLocation::Wal(h) => self.cache.remove(h),
        }
    }

    pub(crate) fn load(&self, block: &BlockRef) -> Result<DecodedBlock, (BlockErrorKind, String)> {
        let corrupt =
            |e: &dyn std::fmt::Display| (BlockErrorKind::Corrupt, format!("decoding: {e}"));
        let handle = match block.location {
            BlockLocation::Wal(h) => h,
            BlockLocation::Memory { id } => {
                let bytes = lock(&self.pinned).get(&id).cloned().ok_or_else(|| {
                    (
                        BlockErrorKind::Gone,
                        format!("block {id} of a direct source is gone"),
                    )
                })?;
                return DecodedBlock::decode(bytes).map_err(|e| corrupt(&e));
            }
        };
        let bytes = match self.cache.get(&handle) {
            Some(b) => b,
            None => {
                self.metrics.cache_misses.inc();
                self.wal.read(handle).map_err(|e| {
                    let kind = match e {
                        WalError::Corruption { .. } => BlockErrorKind::Corrupt,
                        WalError::NotFound { .. } => BlockErrorKind::Gone,
                        _ => BlockErrorKind::Unreadable,
                    };
                    (kind, format!("reading from the WAL: {e}"))
                })?
            }
        };
        DecodedBlock::decode(bytes).map_err(|e| corrupt(&e))
    }
}

type Outcome = Option<Result<BlockId, StoreError>>;

/// A cut block on its way through the WAL.
struct Submitted {
    append: Option<AppendFuture>,
    block: Bytes,
    receiver: Arc<str>,
    records: u32,
    payload_bytes: u64,
    checkpoint: Checkpoint,
    done: watch::Sender<Outcome>,
    permit: Option<OwnedSemaphorePermit>,
    metrics: Arc<ReceiverMetrics>,
}

enum Message {
    Block(Box<Submitted>),
    Flush(oneshot::Sender<()>),
}

/// Durable blocks that no batch has yet, in WAL order.
#[derive(Debug, Default)]
pub(crate) struct Unallocated {
    pub(crate) blocks: Vec<BlockRef>,
    /// Position just after the last durable block.
    pub(crate) end: Option<WalPosition>,
    /// Latest checkpoint of each receiver among these blocks.
    pub(crate) checkpoints: BTreeMap<Arc<str>, Checkpoint>,
}

/// The shared block writer: appends cut blocks to the WAL in cut order and completes them in
/// that order, so durable blocks always form a prefix of the log.
pub(crate) struct BlockWriter {
    wal: Arc<Wal>,
    cache: Arc<BlockCache>,
    metrics: Arc<Metrics>,
    submit: Mutex<mpsc::UnboundedSender<Message>>,
    /// Taken through [`take_unallocated`](Self::take_unallocated); in the engine's lock order
    /// after its schedule (see `stream`).
    unallocated: Mutex<Unallocated>,
    fatal: OnceLock<String>,
}

impl BlockWriter {
    /// Creates the writer and spawns its completion task on the current tokio runtime.
    pub(crate) fn start(
        wal: Arc<Wal>,
        cache: Arc<BlockCache>,
        metrics: Arc<Metrics>,
        recovered: Unallocated,
    ) -> (Arc<BlockWriter>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = Arc::new(BlockWriter {
            wal,
            cache,
            metrics,
            submit: Mutex::new(tx),
            unallocated: Mutex::new(recovered),
            fatal: OnceLock::new(),
        });
        let task = tokio::spawn(w.clone().complete(rx));
        (w, task)
    }

    /// Takes every durable block that no batch has yet, with the latest checkpoint of each
    /// receiver among them. The returned `end` (just after the last durable block) stays: it
    /// is where the durable part of the log ends, blocks or not.
    pub(crate) fn take_unallocated(&self) -> Unallocated {
        let mut u = lock(&self.unallocated);
        self.metrics.unallocated_blocks.set(0);
        Unallocated {
            blocks: std::mem::take(&mut u.blocks),
            end: u.end,
            checkpoints: std::mem::take(&mut u.checkpoints),
        }
    }

    /// True if durable blocks wait for a batch.
    pub(crate) fn has_unallocated(&self) -> bool {
        !lock(&self.unallocated).blocks.is_empty()
    }

    pub(crate) fn fatal(&self) -> Option<&str> {
        self.fatal.get().map(String::as_str)
    }

    fn submit(&self, s: Submitted) {
        let tx = lock(&self.submit);
        // Append and enqueue under one lock: completion order is WAL order.
        let mut s = s;
        s.append = Some(self.wal.append(s.block.clone()));
        self.metrics.blocks_pending.inc();
        if let Err(mpsc::error::SendError(Message::Block(s))) = tx.send(Message::Block(Box::new(s)))
        {
            s.done.send_replace(Some(Err(StoreError::ShuttingDown)));
        }
    }

    /// Resolves once every block submitted before the call is durable (or failed).
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if lock(&self.submit).send(Message::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    async fn complete(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Message>) {
        while let Some(msg) = rx.recv().await {
            let s = match msg {
                Message::Block(s) => s,
                Message::Flush(tx) => {
                    let _ = tx.send(());
                    continue;
                }
            };
            let Submitted {
                append,
                block,
                receiver,
                records,
                payload_bytes,
                checkpoint,
                done,
                permit,
                metrics,
            } = *s;
            let result = match append {
                Some(a) => a.await,
                None => continue,
            };
            self.metrics.blocks_pending.dec();
            match result {
                Ok(handle) => {
                    self.cache.insert(handle, block);
                    {
                        let mut u = lock(&self.unallocated);
                        u.blocks
                            .push(BlockRef::in_wal(handle, records, receiver.clone()));
                        u.end = Some(handle.next_position());
                        u.checkpoints.insert(receiver, checkpoint);
                        self.metrics.unallocated_blocks.set(u.blocks.len() as u64);
                    }
                    metrics.records_stored.inc_by(u64::from(records));
                    metrics.bytes_stored.inc_by(payload_bytes);
                    metrics.blocks_stored.inc();
                    done.send_replace(Some(Ok(BlockId {
                        segment: handle.segment,
                        offset: handle.offset,
                    })));
                }
                Err(e) => {
                    let msg = e.to_string();
                    tracing::error!(%receiver, records, error = %msg, "block not stored: nothing of it is acknowledged");
                    metrics.store_failures.inc();
                    let _ = self.fatal.set(msg.clone());
                    done.send_replace(Some(Err(StoreError::Storage(msg))));
                }
            }
            if let Some(p) = &permit {
                metrics.pending_bytes.dec_by((p.num_permits() as u64) << 10);
            }
            drop(permit);
        }
    }
}

struct GenState {
    builder: BlockBuilder,
    checkpoint: Checkpoint,
    done: watch::Sender<Outcome>,
    permit: Option<OwnedSemaphorePermit>,
    payload_bytes: u64,
}

/// One receiver's block generator and its `store()`.
pub(crate) struct Generator {
    name: Arc<str>,
    writer: Arc<BlockWriter>,
    state: Mutex<GenState>,
    budget: Arc<Semaphore>,
    budget_kib: u32,
    pub(crate) limiter: Arc<RateLimiter>,
    metrics: Arc<ReceiverMetrics>,
    block_max: usize,
    max_call: usize,
    closed: AtomicBool,
    slow_waiters: AtomicUsize,
    admit: mpsc::UnboundedSender<Admission>,
    /// The positions of this receiver's records in batches that completed every job and output
    /// (in this run; see [`ReceiverHost::completed`]).
    completed: Mutex<Checkpoint>,
}

/// Size limits of a [`Generator`].
pub(crate) struct GeneratorLimits {
    /// Bytes accepted but not yet durable before `store()` waits.
    pub(crate) max_pending_bytes: u64,
    /// Cut a block at this size.
    pub(crate) block_max: usize,
    /// Largest single `store()` call.
    pub(crate) max_call: usize,
}

/// The sizes of one `store()` call's records, measured in one pass.
#[derive(Clone, Copy)]
struct Sizes {
    /// Encoded size in a block, an upper bound.
    encoded: usize,
    /// Payload bytes.
    payload: u64,
}

impl Sizes {
    fn of(records: &[Record]) -> Sizes {
        let (mut encoded, mut payload) = (64, 0u64);
        for r in records {
            encoded += r.size_hint();
            payload += r.payload.len() as u64;
        }
        Sizes { encoded, payload }
    }
}

/// A `store()` call waiting for the rate limit or the pending-bytes budget.
struct Admission {
    records: Vec<Record>,
    sizes: Sizes,
    kib: u32,
    reply: oneshot::Sender<Result<watch::Receiver<Outcome>, StoreError>>,
}

impl Generator {
    pub(crate) fn new(
        name: Arc<str>,
        writer: Arc<BlockWriter>,
        checkpoint: Checkpoint,
        limits: GeneratorLimits,
        limiter: Arc<RateLimiter>,
        metrics: Arc<ReceiverMetrics>,
    ) -> Arc<Self> {
        let GeneratorLimits {
            max_pending_bytes,
            block_max,
            max_call,
        } = limits;
        let budget_kib = u32::try_from(max_pending_bytes >> 10)
            .unwrap_or(u32::MAX)
            .max(1);
        let (admit, queue) = mpsc::unbounded_channel();
        let g = Arc::new(Generator {
            name,
            writer,
            state: Mutex::new(GenState {
                builder: BlockBuilder::with_capacity(block_max + (64 << 10)),
                checkpoint,
                done: watch::channel(None).0,
                permit: None,
                payload_bytes: 0,
            }),
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            limiter,
            metrics,
            block_max,
            max_call,
            completed: Mutex::new(Checkpoint::new()),
            closed: AtomicBool::new(false),
            slow_waiters: AtomicUsize::new(0),
            admit,
        });
        tokio::spawn(Self::admit_loop(Arc::downgrade(&g), queue));
        g
    }

    /// Admits queued `store()` calls in order. Ends when the generator is dropped.
    async fn admit_loop(
        this: std::sync::Weak<Generator>,
        mut queue: mpsc::UnboundedReceiver<Admission>,
    ) {
        while let Some(a) = queue.recv().await {
            let Some(g) = this.upgrade() else { return };
            let n = a.records.len() as u64;
            let t0 = std::time::Instant::now();
            g.limiter.acquire(n).await;
            let throttled = t0.elapsed();
            if throttled > Duration::from_micros(50) {
                g.metrics.throttled_us.inc_by(throttled.as_micros() as u64);
            }
            let result = match g.budget.clone().acquire_many_owned(a.kib).await {
                Ok(permit) => g.add(&a.records, a.sizes, permit),
                Err(_) => Err(StoreError::ShuttingDown),
            };
            g.slow_waiters.fetch_sub(1, Relaxed);
            // The caller may have given up (dropped its future): its records are still stored,
            // just never acknowledged to it.
            let _ = a.reply.send(result);
        }
    }

    /// The receiver's checkpoint including records not yet durable.
    pub(crate) fn checkpoint(&self) -> Checkpoint {
        lock(&self.state).checkpoint.clone()
    }

    /// A batch holding this receiver's blocks up to `checkpoint` completed (as did every batch
    /// before it).
    pub(crate) fn batch_completed(&self, checkpoint: &Checkpoint) {
        lock(&self.completed).merge(checkpoint);
    }

    /// Cuts the current block if it holds anything.
    pub(crate) fn cut(&self) {
        let mut st = lock(&self.state);
        self.cut_locked(&mut st);
    }

    /// Refuses further `store()` calls and cuts what is buffered.
    pub(crate) fn close(&self) {
        let mut st = lock(&self.state);
        self.closed.store(true, Relaxed);
        self.cut_locked(&mut st);
        self.budget.close();
    }

    /// The engine is going away without a graceful stop: refuse further calls and fail the
    /// waiters of the block that will never be cut (their records were never durable).
    pub(crate) fn abort(&self) {
        let mut st = lock(&self.state);
        self.closed.store(true, Relaxed);
        self.budget.close();
        st.builder = BlockBuilder::with_capacity(0);
        st.done.send_replace(Some(Err(StoreError::ShuttingDown)));
        if let Some(p) = st.permit.take() {
            self.metrics
                .pending_bytes
                .dec_by((p.num_permits() as u64) << 10);
        }
    }

    fn cut_locked(&self, st: &mut GenState) {
        if st.builder.is_empty() {
            return;
        }
        let records = st.builder.records();
        let block = st.builder.finish(&self.name, &st.checkpoint, now_ms());
        let (done, _) = watch::channel(None);
        let done = std::mem::replace(&mut st.done, done);
        let payload_bytes = std::mem::take(&mut st.payload_bytes);
        self.writer.submit(Submitted {
            append: None,
            block,
            receiver: self.name.clone(),
            records,
            payload_bytes,
            checkpoint: st.checkpoint.clone(),
            done,
            permit: st.permit.take(),
            metrics: self.metrics.clone(),
        });
    }

    fn add(
        &self,
        records: &[Record],
        sizes: Sizes,
        permit: OwnedSemaphorePermit,
    ) -> Result<watch::Receiver<Outcome>, StoreError> {
        let mut st = lock(&self.state);
        if self.closed.load(Relaxed) {
            return Err(StoreError::ShuttingDown);
        }
        if let Some(e) = self.writer.fatal() {
            return Err(StoreError::Storage(e.to_string()));
        }
        if !st.builder.is_empty() && st.builder.len() + sizes.encoded > self.block_max {
            self.cut_locked(&mut st);
        }
        for r in records {
            st.builder.push(r);
            if let Some(p) = &r.position {
                st.checkpoint.observe(p);
            }
        }
        st.payload_bytes += sizes.payload;
        self.metrics
            .pending_bytes
            .inc_by((permit.num_permits() as u64) << 10);
        match &mut st.permit {
            Some(p) => p.merge(permit),
            None => st.permit = Some(permit),
        }
        let rx = st.done.subscribe();
        if st.builder.len() >= self.block_max {
            self.cut_locked(&mut st);
        }
        Ok(rx)
    }

    fn kib(&self, size: usize) -> u32 {
        u32::try_from(size.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.budget_kib)
    }

    /// Waits until the block holding the call's records is durable (or failed); observes the
    /// time since the call (`t0`) in the store→durable histogram.
    async fn wait(
        mut rx: watch::Receiver<Outcome>,
        n: usize,
        t0: Instant,
        latency: Histogram,
    ) -> Result<Stored, StoreError> {
        match rx.wait_for(Option::is_some).await {
            Ok(v) => match v.as_ref().expect("checked by wait_for") {
                Ok(id) => {
                    latency.observe(t0.elapsed().as_secs_f64());
                    Ok(Stored {
                        records: n,
                        block: Some(*id),
                    })
                }
                Err(e) => Err(e.clone()),
            },
            Err(_) => Err(StoreError::Storage(
                "the block writer stopped before the block was stored".into(),
            )),
        }
    }

    pub(crate) fn store(self: &Arc<Self>, records: Vec<Record>) -> StoreFuture {
        let t0 = Instant::now();
        let latency = self.writer.metrics.latency.store_to_durable.clone();
        let n = records.len();
        if n == 0 {
            return StoreFuture::ready(Ok(Stored {
                records: 0,
                block: None,
            }));
        }
        if self.closed.load(Relaxed) {
            return StoreFuture::ready(Err(StoreError::ShuttingDown));
        }
        let sizes = Sizes::of(&records);
        let size = sizes.encoded;
        if size > self.max_call {
            self.metrics.store_failures.inc();
            return StoreFuture::ready(Err(StoreError::TooLarge {
                bytes: size,
                max: self.max_call,
            }));
        }
        self.metrics.records_received.inc_by(n as u64);
        self.metrics.bytes_received.inc_by(sizes.payload);
        let kib = self.kib(size);
        // Fast path: no rate limit, room in the budget and nobody queued before us: the records
        // enter the current block now, in call order.
        if self.limiter.limit().is_none() && self.slow_waiters.load(Relaxed) == 0 {
            match self.budget.clone().try_acquire_many_owned(kib) {
                Ok(permit) => {
                    return match self.add(&records, sizes, permit) {
                        Ok(rx) => StoreFuture::new(Self::wait(rx, n, t0, latency)),
                        Err(e) => StoreFuture::ready(Err(e)),
                    };
                }
                Err(_) => {
                    self.metrics.backpressure_waits.inc();
                }
            }
        }
        // Slow path: queue behind earlier waiting calls; the admission task takes them in call
        // order (rate limit, then budget), whether or not the caller polls its future yet.
        let (reply, answer) = oneshot::channel();
        self.slow_waiters.fetch_add(1, Relaxed);
        let queued = self.admit.send(Admission {
            records,
            sizes,
            kib,
            reply,
        });
        if queued.is_err() {
            self.slow_waiters.fetch_sub(1, Relaxed);
            return StoreFuture::ready(Err(StoreError::ShuttingDown));
        }
        StoreFuture::new(async move {
            let rx = answer.await.map_err(|_| StoreError::ShuttingDown)??;
            Self::wait(rx, n, t0, latency).await
        })
    }
}

/// The engine's side of a [`ReceiverContext`](weir_receiver::ReceiverContext).
pub(crate) struct Host {
    pub(crate) generator: Arc<Generator>,
}

impl ReceiverHost for Host {
    fn store(&self, records: Vec<Record>) -> StoreFuture {
        self.generator.store(records)
    }

    fn report_error(&self, message: &str) {
        self.generator.metrics.errors_reported.inc();
        tracing::warn!(receiver = %self.generator.name, error = message, "receiver reported an error");
    }

    fn checkpoint(&self) -> Checkpoint {
        self.generator.checkpoint()
    }

    fn completed(&self) -> Checkpoint {
        lock(&self.generator.completed).clone()
    }
}
