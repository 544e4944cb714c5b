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
use crate::replica::stage::{AllocRequest, Stage};
use crate::stream::metrics::{Metrics, ReceiverMetrics};
use crate::tracker::{BlockLocation, BlockRef};
use crate::wal::{AppendFuture, RecordHandle, Wal, WalError, WalPosition};
use codec::{BlockBuilder, DecodedBlock};
use std::future::Future;
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
    /// A batch allocation to record in the replica before the batch runs.
    Allocated(AllocRequest, oneshot::Sender<Result<(), String>>),
}

/// What the writer completes together: with a replica, every block whose WAL append is done
/// when the first one is (one WAL group commit, give or take), in one replica write.
#[derive(Default)]
struct Group {
    blocks: Vec<(Box<Submitted>, Result<RecordHandle, WalError>)>,
    bytes: usize,
    flushes: Vec<oneshot::Sender<()>>,
    allocations: Vec<(AllocRequest, oneshot::Sender<Result<(), String>>)>,
}

/// A group's replica write stops taking blocks beyond this size.
const GROUP_MAX_BYTES: usize = 64 << 20;

/// Durable blocks that no batch has yet, in WAL order.
#[derive(Debug, Default)]
pub(crate) struct Unallocated {
    pub(crate) blocks: Vec<BlockRef>,
    /// Position just after the last durable block.
    pub(crate) end: Option<WalPosition>,
    /// Latest checkpoint of each receiver among these blocks.
    pub(crate) checkpoints: BTreeMap<Arc<str>, Checkpoint>,
    /// With a replica: the replica's number after the last durable block.
    pub(crate) replica_end: u64,
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
    replicating: bool,
}

impl BlockWriter {
    /// Creates the writer and spawns its completion task on the current tokio runtime.
    ///
    /// With a replica `stage`, each group of blocks is written to the replica before its waiters
    /// are resolved, with the latest of `completed` (the time through which batches are
    /// complete).
    pub(crate) fn start(
        wal: Arc<Wal>,
        cache: Arc<BlockCache>,
        metrics: Arc<Metrics>,
        recovered: Unallocated,
        stage: Option<Stage>,
        completed: watch::Receiver<Option<u64>>,
    ) -> (Arc<BlockWriter>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = Arc::new(BlockWriter {
            wal,
            cache,
            metrics,
            submit: Mutex::new(tx),
            unallocated: Mutex::new(recovered),
            fatal: OnceLock::new(),
            replicating: stage.is_some(),
        });
        let task = tokio::spawn(w.clone().complete(rx, stage, completed));
        (w, task)
    }

    /// True if blocks are replicated before they are acknowledged.
    pub(crate) fn replicating(&self) -> bool {
        self.replicating
    }

    /// Records a batch allocation in the replica (after every block it holds, which are already
    /// there). Resolves once it is durable there; an error if this process was fenced or the
    /// writer stopped.
    pub(crate) fn replicate_allocation(
        &self,
        request: AllocRequest,
    ) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Message::Allocated(_, tx))) =
            lock(&self.submit).send(Message::Allocated(request, tx))
        {
            let _ = tx.send(Err("the block writer stopped".into()));
        }
        rx
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
            replica_end: u.replica_end,
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

    /// Takes one message into `group`; a block's WAL append is awaited.
    async fn take(group: &mut Group, msg: Message) {
        match msg {
            Message::Block(mut s) => {
                let Some(a) = s.append.take() else { return };
                let r = a.await;
                group.bytes += s.block.len();
                group.blocks.push((s, r));
            }
            Message::Flush(tx) => group.flushes.push(tx),
            Message::Allocated(r, tx) => group.allocations.push((r, tx)),
        }
    }

    /// The next message if it can join the group now: anything but a block whose WAL append is
    /// still pending (that one is kept in `held` for the next group).
    fn ready(
        rx: &mut mpsc::UnboundedReceiver<Message>,
        held: &mut Option<Message>,
    ) -> Option<Message> {
        let mut msg = rx.try_recv().ok()?;
        if let Message::Block(s) = &mut msg {
            if let Some(a) = &mut s.append {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(r) = std::pin::Pin::new(a).poll(&mut cx) {
                    s.append = Some(crate::wal::AppendFuture::from_result(r));
                } else {
                    *held = Some(msg);
                    return None;
                }
            }
        }
        Some(msg)
    }

    async fn complete(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Message>,
        mut stage: Option<Stage>,
        mut completed: watch::Receiver<Option<u64>>,
    ) {
        let mut held: Option<Message> = None;
        loop {
            let msg = match held.take() {
                Some(m) => m,
                None => match &stage {
                    // With a replica, a completed batch is news to write even when idle.
                    Some(st) => {
                        let c = *completed.borrow_and_update();
                        if st.completion_is_new(c) && self.fatal().is_none() {
                            self.replicate(&mut stage, Group::default(), c).await;
                            continue;
                        }
                        tokio::select! {
                            m = rx.recv() => match m { Some(m) => m, None => break },
                            r = completed.changed() => {
                                if r.is_err() {
                                    // The engine is gone; finish what is queued.
                                    match rx.recv().await { Some(m) => m, None => break }
                                } else {
                                    continue;
                                }
                            }
                        }
                    }
                    None => match rx.recv().await {
                        Some(m) => m,
                        None => break,
                    },
                },
            };
            let mut group = Group::default();
            Self::take(&mut group, msg).await;
            if stage.is_some() {
                while group.bytes < GROUP_MAX_BYTES {
                    let Some(m) = Self::ready(&mut rx, &mut held) else {
                        break;
                    };
                    Self::take(&mut group, m).await;
                }
                let c = *completed.borrow_and_update();
                self.replicate(&mut stage, group, c).await;
            } else {
                self.resolve(group, None);
            }
        }
    }

    /// Writes the group's durable blocks and allocations to the replica, then resolves it. A
    /// fenced process (or a damaged replica) fails the group and everything after: nothing more
    /// is acknowledged.
    async fn replicate(&self, stage: &mut Option<Stage>, group: Group, completed: Option<u64>) {
        let Some(st) = stage.as_mut() else {
            return self.resolve(group, None);
        };
        if let Some(f) = self.fatal() {
            let f = f.to_string();
            return self.fail_group(group, &f);
        }
        let blocks = group
            .blocks
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(s, _)| s.block.clone())
            .collect();
        let requests = group.allocations.iter().map(|(r, _)| r.clone()).collect();
        let first = st.next_block();
        match st.write(blocks, requests, completed).await {
            Ok(()) => self.resolve(group, Some(first)),
            Err(e) => {
                let msg = format!("{e}: acknowledging nothing more");
                tracing::error!(error = %msg, "replica write refused");
                let _ = self.fatal.set(msg.clone());
                self.fail_group(group, &msg);
            }
        }
    }

    fn fail_group(&self, group: Group, msg: &str) {
        for (s, _) in group.blocks {
            let Submitted {
                done,
                permit,
                metrics,
                records,
                receiver,
                ..
            } = *s;
            self.metrics.blocks_pending.dec();
            tracing::error!(%receiver, records, error = msg, "block not replicated: nothing of it is acknowledged");
            metrics.store_failures.inc();
            done.send_replace(Some(Err(StoreError::Storage(msg.to_string()))));
            if let Some(p) = &permit {
                metrics.pending_bytes.dec_by((p.num_permits() as u64) << 10);
            }
        }
        for (_, tx) in group.allocations {
            let _ = tx.send(Err(msg.to_string()));
        }
        for tx in group.flushes {
            let _ = tx.send(());
        }
    }

    /// Completes a group: durable blocks join the unallocated set and their waiters are
    /// acknowledged; failed ones fail the engine. `first` is the replica's number of the
    /// group's first durable block, if replicated.
    fn resolve(&self, group: Group, first: Option<u64>) {
        let mut number = first;
        for (s, result) in group.blocks {
            let Submitted {
                block,
                receiver,
                records,
                payload_bytes,
                checkpoint,
                done,
                permit,
                metrics,
                ..
            } = *s;
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
                        if let Some(n) = &mut number {
                            *n += 1;
                            u.replica_end = *n;
                        }
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
        for (_, tx) in group.allocations {
            let _ = tx.send(Ok(()));
        }
        for tx in group.flushes {
            let _ = tx.send(());
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
        self.generator.metrics.note_error(message);
        tracing::warn!(receiver = %self.generator.name, error = message, "receiver reported an error");
    }

    fn checkpoint(&self) -> Checkpoint {
        self.generator.checkpoint()
    }

    fn completed(&self) -> Checkpoint {
        lock(&self.generator.completed).clone()
    }
}
