//! The engine: [`StreamingContext`] wires receivers, block generators, the block writer, the
//! tracker, the batch clock and the jobs together; [`RunningContext`] is the running engine.
//!
//! Order of events for one batch at time T: allocate every durable, unallocated block to T and
//! commit that (together with the completions since the last commit) to the tracker; delete WAL
//! segments that no remembered batch needs; then, in time order, run the jobs for T and mark it
//! complete in memory (persisted by the next commit, or by the final commit of a graceful stop).
//! A crash before that persists re-runs T with exactly the same blocks: outputs keyed by batch
//! time are idempotent.

pub mod config;
pub mod metrics;
mod recovery;
mod supervisor;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use weir_receiver::{
    shutdown_channel, Checkpoint, DirectSource, DynReceiver, OffsetRange, Receiver, ShutdownTrigger,
};

use crate::batch::Batch;
use crate::block::codec::BlockBuilder;
use crate::block::{
    now_ms, BlockCache, BlockSource, BlockWriter, Generator, GeneratorLimits, Host, DIRECT_SEGMENT,
};
use crate::rate::{PidRateEstimator, RateLimiter};
use crate::space::Place;
use crate::tracker::{BlockRef, Commit, DirectRange, Tracker, TrackerError};
use crate::wal::{CleanupThreshold, Storage, Wal, WalError, WalPosition};
pub use config::{ClockMode, StreamingConfig};
pub use metrics::{Collector, Metrics, MetricsRegistry, ReceiverMetrics};
use weir_receiver::lock;

/// What a job returns on failure.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

type JobFn = Arc<dyn Fn(&Batch) -> Result<(), JobError> + Send + Sync>;

#[derive(Clone)]
struct Job {
    name: Arc<str>,
    window: usize,
    f: JobFn,
}

/// Why the engine could not start, or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The write-ahead log failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The tracker failed.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// The node's identity could not be established (see [`crate::identity`]).
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Recovery found something it cannot resolve on its own.
    #[error("recovery: {0}")]
    Recovery(String),
    /// A step is waiting for disk space (not fatal: nothing is lost, try again later).
    #[error("waiting for disk space: {0}")]
    NoSpace(String),
    /// The engine stopped after a fatal error (storage, tracker); restart it to recover.
    #[error("the engine failed: {0}")]
    Failed(String),
    /// A graceful stop could not complete a batch (a job kept failing); it re-runs at the next
    /// start.
    #[error("batch {time} did not complete before the stop: {reason}")]
    Incomplete {
        /// The batch.
        time: u64,
        /// The job's last error.
        reason: String,
    },
}

impl EngineError {
    /// True if the data directory is in use by another engine or process: the WAL's directory
    /// lock, or the tracker's database, is held. An engine dropped a moment ago releases both
    /// once its last tasks end, so a caller may retry.
    pub fn is_locked(&self) -> bool {
        match self {
            EngineError::Wal(WalError::Locked { .. }) => true,
            EngineError::Tracker(t) => t.kind() == crate::tracker::TrackerErrorKind::Locked,
            _ => false,
        }
    }
}

/// Opens the tracker; the argument is `first_start` (see [`Tracker::open`]). Called again to
/// reopen it after a failed commit (redb refuses every operation after an I/O error).
pub(crate) type TrackerOpener =
    Arc<dyn Fn(bool) -> Result<Tracker, TrackerError> + Send + Sync + 'static>;

pub(crate) enum StorageChoice {
    Dir(PathBuf),
    Custom {
        wal: Arc<dyn Storage>,
        /// Opens the tracker; the argument is `first_start` (see [`Tracker::open`]).
        tracker: TrackerOpener,
    },
}

/// The library's entry point: configure receivers and jobs, then [`start`](Self::start).
///
/// ```no_run
/// use weir::stream::{StreamingConfig, StreamingContext};
/// use weir_receiver::{Receiver, ReceiverContext, ReceiverError, Record};
///
/// struct Hello;
/// impl Receiver for Hello {
///     async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
///         ctx.store(vec![Record::new("hello")]).await?;
///         Ok(())
///     }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut ctx = StreamingContext::new(StreamingConfig::default(), "weir-data");
/// ctx.add_receiver("hello", Hello);
/// ctx.foreach_batch("print", |batch| {
///     println!("batch {}: {} records", batch.time(), batch.count());
///     Ok(())
/// });
/// let running = ctx.start().await?;
/// tokio::time::sleep(std::time::Duration::from_secs(3)).await;
/// running.stop().await?;
/// # Ok(()) }
/// ```
pub struct StreamingContext {
    config: StreamingConfig,
    storage: StorageChoice,
    receivers: Vec<(Arc<str>, DynReceiver)>,
    direct: Vec<(Arc<str>, Arc<dyn DirectSource>)>,
    jobs: Vec<Job>,
    collectors: Vec<Collector>,
}

impl std::fmt::Debug for StreamingContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingContext")
            .field("config", &self.config)
            .field("receivers", &self.receivers.len())
            .field("jobs", &self.jobs.len())
            .finish()
    }
}

impl StreamingContext {
    /// A context keeping its data (WAL under `wal/`, tracker in `tracker.redb`) in `data_dir`.
    pub fn new(config: StreamingConfig, data_dir: impl Into<PathBuf>) -> Self {
        StreamingContext {
            config,
            storage: StorageChoice::Dir(data_dir.into()),
            receivers: Vec::new(),
            direct: Vec::new(),
            jobs: Vec::new(),
            collectors: Vec::new(),
        }
    }

    /// A context on custom storage: the WAL on `wal`, the tracker on the redb storage backend
    /// that `tracker` opens (e.g. both on [`SimStorage`](crate::wal::sim::SimStorage) for crash
    /// tests: `move || sim.redb_backend("tracker.redb")`). `tracker` is called again to reopen
    /// the database after a commit failed for lack of space.
    pub fn with_storage<B, F>(config: StreamingConfig, wal: Arc<dyn Storage>, tracker: F) -> Self
    where
        B: redb::StorageBackend,
        F: Fn() -> std::io::Result<B> + Send + Sync + 'static,
    {
        StreamingContext {
            config,
            storage: StorageChoice::Custom {
                wal,
                tracker: Arc::new(move |first| {
                    let backend = tracker().map_err(|e| TrackerError::from_io("open", &e))?;
                    Tracker::open_backend(backend, first)
                }),
            },
            receivers: Vec::new(),
            direct: Vec::new(),
            jobs: Vec::new(),
            collectors: Vec::new(),
        }
    }

    /// Adds a receiver. Names identify receivers in blocks, checkpoints and metrics: keep them
    /// stable across restarts.
    pub fn add_receiver<R: Receiver>(
        &mut self,
        name: impl Into<Arc<str>>,
        receiver: R,
    ) -> &mut Self {
        self.receivers
            .push((name.into(), DynReceiver::new(receiver)));
        self
    }

    /// Adds a direct source (Spark's "direct approach"): a source that is its own durable log,
    /// such as a Kafka topic. Nothing of it goes through the WAL: at every batch the source
    /// plans offset ranges, which the tracker records with the batch before it is processed;
    /// processing reads exactly those ranges (one partition of the batch per range), and a
    /// batch re-run after a crash reads the same ranges again. The name shares the namespace of
    /// receivers (it keys the source's position in the tracker): keep it stable.
    pub fn add_direct_source<S: DirectSource>(
        &mut self,
        name: impl Into<Arc<str>>,
        source: S,
    ) -> &mut Self {
        self.direct.push((name.into(), Arc::new(source)));
        self
    }

    /// Adds samples to the engine's metrics (e.g. a receiver's own counters: Kafka lag, socket
    /// connections), taken at every read of [`RunningContext::metrics`].
    pub fn add_metrics(&mut self, collector: Collector) -> &mut Self {
        self.collectors.push(collector);
        self
    }

    /// Adds a job run on every batch, in registration order. A job that fails (or panics) is
    /// retried on the same batch after a backoff; the batch completes only when every job
    /// succeeded, so jobs must be idempotent per batch time.
    pub fn foreach_batch<F>(&mut self, name: impl Into<Arc<str>>, f: F) -> &mut Self
    where
        F: Fn(&Batch) -> Result<(), JobError> + Send + Sync + 'static,
    {
        self.foreach_window(name, 1, f)
    }

    /// Adds a job run on every batch with a view of the last `batches` batches (the current one
    /// and up to `batches - 1` before it, including batches from before a restart).
    pub fn foreach_window<F>(
        &mut self,
        name: impl Into<Arc<str>>,
        batches: usize,
        f: F,
    ) -> &mut Self
    where
        F: Fn(&Batch) -> Result<(), JobError> + Send + Sync + 'static,
    {
        self.jobs.push(Job {
            name: name.into(),
            window: batches.max(1),
            f: Arc::new(f),
        });
        self
    }

    /// Recovers, then starts receivers, the block timer and the batch clock on the current tokio
    /// runtime. Batches allocated before a crash but not completed run first, with exactly their
    /// recorded blocks; durable blocks that no batch had go to the first new batch.
    ///
    /// # Errors
    /// [`EngineError`] if the configuration is invalid or recovery fails.
    pub async fn start(self) -> Result<RunningContext, EngineError> {
        let StreamingContext {
            config,
            storage,
            receivers,
            direct,
            jobs,
            collectors,
        } = self;
        config.validate().map_err(EngineError::Config)?;
        let mut names = std::collections::HashSet::new();
        for n in receivers
            .iter()
            .map(|r| &r.0)
            .chain(direct.iter().map(|d| &d.0))
        {
            if n.is_empty() || !names.insert(n.clone()) {
                return Err(EngineError::Config(format!(
                    "receiver names must be unique and non-empty: {n:?}"
                )));
            }
        }
        let metrics = Arc::new(Metrics::default());
        for c in collectors {
            metrics.add_collector(c);
        }
        let cache = Arc::new(BlockCache::new(config.block_cache_bytes, metrics.clone()));
        let rec = {
            let (config, cache, metrics) = (config.clone(), cache.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || {
                recovery::recover(&config, storage, &cache, &metrics)
            })
            .await
            .map_err(|e| EngineError::Recovery(format!("recovery task failed: {e}")))??
        };
        let wal = rec.wal.clone();
        let (writer, writer_task) =
            BlockWriter::start(wal.clone(), cache.clone(), metrics.clone(), rec.unallocated);
        let source = Arc::new(BlockSource::new(
            wal.clone(),
            cache.clone(),
            metrics.clone(),
        ));
        let max_call = (config.wal.max_record_bytes as usize).saturating_sub(1 << 16);
        let mut generators = Vec::new();
        for (name, _) in &receivers {
            let limit = config.rate.max_records_per_sec.map(|r| r as f64);
            let limit = if config.rate.backpressure {
                match (limit, config.rate.initial_rate) {
                    (Some(l), Some(i)) => Some(l.min(i as f64)),
                    (l, i) => l.or(i.map(|i| i as f64)),
                }
            } else {
                limit
            };
            let rm = metrics.receiver(name);
            rm.rate_limit.store(limit.map_or(0, |l| l as u64), Relaxed);
            let g = Generator::new(
                name.clone(),
                writer.clone(),
                rec.checkpoints.get(&**name).cloned().unwrap_or_default(),
                GeneratorLimits {
                    max_pending_bytes: config.max_pending_bytes,
                    block_max: config.block_max_bytes as usize,
                    max_call,
                },
                Arc::new(RateLimiter::new(limit)),
                rm,
            );
            generators.push((name.clone(), g));
        }
        let retention = jobs.iter().map(|j| j.window).max().unwrap_or(1) - 1;
        let completed = rec.state.completed_through;
        // Direct sources: where each stands, and the ranges of the batches on record (read
        // again when such a batch is processed or shown in a window).
        let direct_positions = direct
            .iter()
            .map(|(n, _)| {
                let cp = rec.checkpoints.get(&**n).cloned().unwrap_or_default();
                (n.clone(), cp)
            })
            .collect();
        let ranges: BTreeMap<u64, Arc<[DirectRange]>> = rec
            .state
            .direct
            .iter()
            .filter(|(t, _)| rec.batches.contains_key(t))
            .map(|(t, r)| (*t, Arc::from(r.as_slice())))
            .collect();
        let (completed_tx, _) = watch::channel(completed);
        let (failure_tx, _) = watch::channel(None);
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let pid = generators
            .iter()
            .map(|(n, _)| {
                (
                    n.clone(),
                    PidRateEstimator::new(
                        Duration::from_millis(config.batch_interval_ms),
                        &config.rate,
                    ),
                )
            })
            .collect();
        tracing::info!(node_id = %rec.node_id, "node identity");
        let engine = Arc::new(Engine {
            node_id: rec.node_id.clone(),
            config: config.clone(),
            wal: wal.clone(),
            tracker: Mutex::new(Some(rec.tracker)),
            tracker_broken: AtomicBool::new(false),
            reopen: rec.reopen,
            pending_alloc: Mutex::new(None),
            writer: writer.clone(),
            source,
            cache,
            metrics: metrics.clone(),
            generators,
            schedule: Mutex::new(Schedule {
                batches: rec.batches,
                unfetched: ranges.clone(),
                ranges,
                persisted_completed: completed,
                last_time: rec.state.last_allocated(),
                allocated_end: rec.state.allocated_end,
            }),
            commit_lock: Mutex::new(()),
            jobs,
            retention,
            completed: completed_tx,
            failure: failure_tx,
            queue: Mutex::new(Some(queue_tx)),
            stopping: AtomicBool::new(false),
            incomplete: Mutex::new(None),
            pid: Mutex::new(pid),
            direct,
            direct_positions: Mutex::new(direct_positions),
        });
        if let Some(c) = completed {
            metrics.last_completed_batch_ms.store(c, Relaxed);
        }
        // Re-run what was allocated but not completed, in time order, before anything new.
        for t in &rec.rerun {
            metrics.batches_rerun.fetch_add(1, Relaxed);
            tracing::info!(batch = t, "re-running a batch allocated before the restart");
            engine.enqueue(*t);
        }
        if !rec.report.corrupt.is_empty() {
            tracing::error!(
                regions = rec.report.corrupt.len(),
                blocks_lost = rec.report.records_lost(),
                bytes_lost = rec.report.bytes_lost(),
                "recovery skipped corrupt WAL data (skip_corrupt)"
            );
        }

        let processor = tokio::spawn(engine.clone().process_loop(queue_rx));
        let (clock_stop, clock_stop_rx) = shutdown_channel();
        let block_timer = tokio::spawn(engine.clone().block_timer(clock_stop_rx.clone()));
        let clock = match config.clock {
            ClockMode::Interval => Some(tokio::spawn(engine.clone().clock_loop(clock_stop_rx))),
            ClockMode::Manual => None,
        };
        let (receivers_stop, receivers_stop_rx) = shutdown_channel();
        let mut supervisors = Vec::new();
        for ((name, receiver), (_, g)) in receivers.into_iter().zip(engine.generators.iter()) {
            let s = supervisor::Supervised {
                name: name.clone(),
                receiver,
                host: Arc::new(Host {
                    generator: g.clone(),
                }),
                shutdown: receivers_stop_rx.clone(),
                metrics: metrics.receiver(&name),
                initial: Duration::from_millis(config.receiver_restart_initial_ms),
                max: Duration::from_millis(config.receiver_restart_max_ms),
            };
            supervisors.push((name, tokio::spawn(supervisor::supervise(s))));
        }
        Ok(RunningContext {
            engine,
            receivers_stop,
            clock_stop,
            supervisors,
            writer_task: Some(writer_task),
            processor: Some(processor),
            block_timer: Some(block_timer),
            clock,
        })
    }
}

struct Schedule {
    /// Allocated batches still remembered: incomplete ones and the complete ones windows need.
    /// Once a batch's direct ranges are read, their in-memory blocks are appended here.
    batches: BTreeMap<u64, Arc<[BlockRef]>>,
    /// Direct ranges of remembered batches.
    ranges: BTreeMap<u64, Arc<[DirectRange]>>,
    /// Direct ranges not read yet.
    unfetched: BTreeMap<u64, Arc<[DirectRange]>>,
    /// Completions the tracker has persisted.
    persisted_completed: Option<u64>,
    last_time: Option<u64>,
    allocated_end: WalPosition,
}

/// Why a step of batch processing (a job, a direct read) failed.
struct StepError {
    message: String,
    /// The disk was full: retried like any failure, but shown as waiting for space.
    no_space: bool,
}

impl From<String> for StepError {
    fn from(message: String) -> Self {
        StepError {
            message,
            no_space: false,
        }
    }
}

/// A batch allocation on its way to the tracker (kept as it is while a commit waits for space).
struct PendingAlloc {
    time: u64,
    blocks: Arc<[BlockRef]>,
    end: WalPosition,
    checkpoints: BTreeMap<Arc<str>, Checkpoint>,
    ranges: Vec<DirectRange>,
    positions: Vec<(Arc<str>, Checkpoint)>,
    /// The completion part of the last commit attempt.
    completed_through: Option<u64>,
    forget_before: Option<u64>,
}

struct Engine {
    /// The effective `node_id` (given to every batch).
    node_id: Arc<str>,
    config: StreamingConfig,
    wal: Arc<Wal>,
    /// Taken (closed) by a graceful stop, so that the file is free when `stop` returns.
    tracker: Mutex<Option<Tracker>>,
    /// Set when a commit failed for lack of space: the tracker must be reopened.
    tracker_broken: AtomicBool,
    /// Opens the tracker again.
    reopen: TrackerOpener,
    /// An allocation whose commit failed for lack of space, tried again as it is.
    pending_alloc: Mutex<Option<PendingAlloc>>,
    writer: Arc<BlockWriter>,
    source: Arc<BlockSource>,
    cache: Arc<BlockCache>,
    metrics: Arc<Metrics>,
    generators: Vec<(Arc<str>, Arc<Generator>)>,
    schedule: Mutex<Schedule>,
    commit_lock: Mutex<()>,
    jobs: Vec<Job>,
    retention: usize,
    /// Completed through this batch time (in memory).
    completed: watch::Sender<Option<u64>>,
    failure: watch::Sender<Option<String>>,
    queue: Mutex<Option<mpsc::UnboundedSender<u64>>>,
    stopping: AtomicBool,
    /// Set when a stop gave up on a batch whose job kept failing: (batch, last error).
    incomplete: Mutex<Option<(u64, String)>>,
    pid: Mutex<HashMap<Arc<str>, PidRateEstimator>>,
    direct: Vec<(Arc<str>, Arc<dyn DirectSource>)>,
    /// Per direct source: the last offset planned into a batch, per partition.
    direct_positions: Mutex<HashMap<Arc<str>, Checkpoint>>,
}

impl Engine {
    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "the engine stops: restart it to recover");
        self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(msg);
                true
            } else {
                false
            }
        });
    }

    fn failed(&self) -> Option<String> {
        self.failure
            .borrow()
            .clone()
            .or_else(|| self.writer.fatal().map(str::to_string))
    }

    fn enqueue(&self, t: u64) {
        if let Some(q) = &*lock(&self.queue) {
            let _ = q.send(t);
        }
    }

    fn next_time(&self, last: Option<u64>) -> u64 {
        let i = self.config.batch_interval_ms;
        let aligned = now_ms() / i * i;
        match last {
            Some(l) if aligned <= l => l + i,
            _ => aligned,
        }
    }

    /// Allocates every durable, unallocated block to a new batch, commits, cleans up, and queues
    /// the batch. Blocking (tracker fsync): call from a blocking thread.
    ///
    /// A commit that fails for lack of disk space is not fatal: the allocation is kept as it is
    /// (same time, same blocks) and tried again at the next call, after the tracker is reopened
    /// (redb refuses every operation after an I/O error). Returns `Ok(None)` while waiting.
    fn allocate(&self) -> Result<Option<u64>, EngineError> {
        if let Some(f) = self.failed() {
            return Err(EngineError::Failed(f));
        }
        let _commit = lock(&self.commit_lock);
        if self.tracker_broken.load(Relaxed) && !self.reopen_tracker()? {
            return Ok(None);
        }
        let mut p = match lock(&self.pending_alloc).take() {
            Some(p) => p,
            None => self.next_allocation(),
        };
        let completed = *self.completed.borrow();
        {
            let s = lock(&self.schedule);
            p.completed_through = completed.filter(|c| Some(*c) > s.persisted_completed);
            p.forget_before = self.forget_before(&s, completed);
        }
        let cps: Vec<(&str, &weir_receiver::Checkpoint)> = p
            .checkpoints
            .iter()
            .map(|(k, v)| (&**k, v))
            .chain(p.positions.iter().map(|(k, v)| (&**k, v)))
            .collect();
        let commit = Commit {
            allocate: Some((p.time, &p.blocks, p.end)),
            direct: &p.ranges,
            completed_through: p.completed_through,
            checkpoints: cps,
            forget_before: p.forget_before,
        };
        let committed = match &*lock(&self.tracker) {
            Some(t) => t.commit(&commit),
            None => {
                let msg = format!("allocating batch {}: the engine has stopped", p.time);
                self.fail(msg.clone());
                return Err(EngineError::Failed(msg));
            }
        };
        match committed {
            Ok(()) => {
                self.metrics.space.succeeded(Place::Tracker);
                let time = p.time;
                self.allocated(p);
                Ok(Some(time))
            }
            Err(e) if e.is_no_space() => {
                self.metrics
                    .space
                    .failed(Place::Tracker, &format!("allocating batch {}: {e}", p.time));
                self.tracker_broken.store(true, Relaxed);
                *lock(&self.pending_alloc) = Some(p);
                Ok(None)
            }
            Err(e) => {
                let msg = format!("allocating batch {}: {e}", p.time);
                self.fail(msg.clone());
                Err(EngineError::Failed(msg))
            }
        }
    }

    /// Takes every durable, unallocated block (and the direct sources' next ranges) into a new
    /// allocation; not recorded anywhere until committed.
    fn next_allocation(&self) -> PendingAlloc {
        let (ranges, positions) = self.plan_direct();
        let s = lock(&self.schedule);
        let time = self.next_time(s.last_time);
        let mut u = lock(&self.writer.unallocated);
        let blocks: Arc<[BlockRef]> = Arc::from(std::mem::take(&mut u.blocks));
        let end = u.end.unwrap_or(s.allocated_end).max(s.allocated_end);
        let checkpoints = std::mem::take(&mut u.checkpoints);
        self.metrics.unallocated_blocks.store(0, Relaxed);
        PendingAlloc {
            time,
            blocks,
            end,
            checkpoints,
            ranges,
            positions,
            completed_through: None,
            forget_before: None,
        }
    }

    /// Applies a committed allocation: remembers the batch, cleans up, queues it.
    fn allocated(&self, p: PendingAlloc) {
        self.metrics.tracker_commits.fetch_add(1, Relaxed);
        self.metrics.batches_allocated.fetch_add(1, Relaxed);
        if !p.positions.is_empty() {
            lock(&self.direct_positions).extend(p.positions);
        }
        {
            let mut s = lock(&self.schedule);
            s.batches.insert(p.time, p.blocks);
            if !p.ranges.is_empty() {
                let ranges: Arc<[DirectRange]> = Arc::from(p.ranges);
                s.ranges.insert(p.time, ranges.clone());
                s.unfetched.insert(p.time, ranges);
            }
            s.last_time = Some(p.time);
            s.allocated_end = p.end;
            s.persisted_completed = p.completed_through.max(s.persisted_completed);
            self.forget_and_clean(&mut s, p.forget_before);
        }
        self.enqueue(p.time);
    }

    /// Closes and reopens the tracker after a commit failed for lack of space. True once it is
    /// open again; false while there is still no space (redb's recovery of a database whose
    /// last commit failed may need to write). A pending allocation that the failed commit did
    /// make durable after all (it failed after redb switched to it) is applied as committed.
    fn reopen_tracker(&self) -> Result<bool, EngineError> {
        // redb holds the file until the database is dropped: close it first.
        lock(&self.tracker).take();
        let reopened = (self.reopen)(false).and_then(|t| t.load().map(|state| (t, state)));
        let (tracker, state) = match reopened {
            Ok(x) => x,
            Err(e) if e.is_no_space() => {
                self.metrics
                    .space
                    .failed(Place::Tracker, &format!("reopening the tracker: {e}"));
                return Ok(false);
            }
            Err(e) => {
                let msg = format!("reopening the tracker after a full disk: {e}");
                self.fail(msg.clone());
                return Err(EngineError::Failed(msg));
            }
        };
        tracing::debug!("tracker reopened after a full disk");
        *lock(&self.tracker) = Some(tracker);
        self.tracker_broken.store(false, Relaxed);
        let landed = lock(&self.pending_alloc).take_if(|p| state.batches.contains_key(&p.time));
        if let Some(mut p) = landed {
            tracing::info!(
                batch = p.time,
                "the allocation whose commit failed was durable after all"
            );
            p.completed_through = state.completed_through;
            self.allocated(p);
        }
        {
            let mut s = lock(&self.schedule);
            s.persisted_completed = state.completed_through.max(s.persisted_completed);
        }
        Ok(true)
    }

    /// Asks every direct source for the next batch's ranges. A source that cannot plan (its
    /// log unreachable) contributes nothing to this batch and plans from the same position at
    /// the next one. Returns the ranges and each source's new position.
    fn plan_direct(&self) -> (Vec<DirectRange>, Vec<(Arc<str>, Checkpoint)>) {
        let mut ranges = Vec::new();
        let mut positions = Vec::new();
        for (name, src) in &self.direct {
            let position = lock(&self.direct_positions)
                .get(name)
                .cloned()
                .unwrap_or_default();
            let planned = match src.plan(&position) {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.direct_plan_failures.fetch_add(1, Relaxed);
                    tracing::warn!(source = %name, error = %e, "planning the direct source's ranges failed; this batch goes ahead without it");
                    continue;
                }
            };
            let mut next = position.clone();
            for r in planned.into_iter().filter(|r| !r.is_empty()) {
                // A range must start after what earlier batches took: an overlap would give
                // records to two batches.
                if let Some(last) = position.get(&r.stream, r.partition) {
                    if r.from <= last {
                        self.metrics.direct_plan_failures.fetch_add(1, Relaxed);
                        tracing::error!(source = %name, range = %r, last_planned = last, "a planned range overlaps earlier batches; left out");
                        continue;
                    }
                }
                next.raise(r.stream.clone(), r.partition, r.until - 1);
                ranges.push(DirectRange {
                    source: name.clone(),
                    range: r,
                });
            }
            if next != position {
                positions.push((name.clone(), next));
            }
        }
        (ranges, positions)
    }

    /// Reads the direct ranges of batch `t`, and of the batches before it that a window shows,
    /// into in-memory blocks appended to those batches. Blocking (reads the sources).
    fn fetch_direct(&self, t: u64) -> Result<(), String> {
        let todo: Vec<(u64, Arc<[DirectRange]>)> = {
            let s = lock(&self.schedule);
            s.batches
                .range(..=t)
                .rev()
                .take(self.retention + 1)
                .filter_map(|(bt, _)| s.unfetched.get(bt).map(|r| (*bt, r.clone())))
                .collect()
        };
        for (bt, ranges) in todo {
            let mut refs = Vec::new();
            let pinned = |refs: &[BlockRef]| {
                for r in refs {
                    self.source.unpin(&r.handle);
                }
            };
            for (name, src) in &self.direct {
                let mine: Vec<OffsetRange> = ranges
                    .iter()
                    .filter(|d| d.source == *name)
                    .map(|d| d.range.clone())
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let parts = match src.read(&mine) {
                    Ok(p) if p.len() == mine.len() => p,
                    Ok(p) => {
                        pinned(&refs);
                        return Err(format!(
                            "direct source {name} returned {} parts for {} ranges",
                            p.len(),
                            mine.len()
                        ));
                    }
                    Err(e) => {
                        pinned(&refs);
                        return Err(format!("batch {bt}, direct source {name}: {e}"));
                    }
                };
                for (range, records) in mine.iter().zip(parts) {
                    if records.is_empty() {
                        continue;
                    }
                    let size: usize = records.iter().map(|r| r.size_hint()).sum();
                    let mut b = BlockBuilder::with_capacity(size + 64);
                    for r in &records {
                        b.push(r);
                    }
                    let mut cp = Checkpoint::new();
                    cp.raise(range.stream.clone(), range.partition, range.until - 1);
                    let block = b.finish(name, &cp, now_ms());
                    self.metrics
                        .direct_records_read
                        .fetch_add(records.len() as u64, Relaxed);
                    refs.push(BlockRef {
                        handle: self.source.pin(block),
                        records: records.len() as u32,
                        receiver: name.clone(),
                    });
                }
            }
            let mut s = lock(&self.schedule);
            let still_wanted = s.unfetched.remove(&bt).is_some();
            match s.batches.get_mut(&bt) {
                Some(blocks) if still_wanted => {
                    let mut all = blocks.to_vec();
                    all.extend(refs);
                    *blocks = Arc::from(all);
                }
                _ => pinned(&refs),
            }
        }
        Ok(())
    }

    /// Runs `attempt` (a step of batch `t`: a job, or reading its direct ranges) on a blocking
    /// thread until it succeeds, retrying after a doubling backoff and counting each failure in
    /// `failures`. False if it gave up: the engine failed, or the step failed 3 more times
    /// during a stop (the batch then stays incomplete and re-runs at the next start).
    async fn retry(
        self: &Arc<Self>,
        t: u64,
        what: &str,
        failures: &std::sync::atomic::AtomicU64,
        attempt: Arc<dyn Fn() -> Result<(), StepError> + Send + Sync>,
    ) -> bool {
        let mut backoff = weir_receiver::Backoff::new(
            Duration::from_millis(self.config.job_retry_initial_ms),
            Duration::from_millis(self.config.job_retry_max_ms),
        );
        let mut failures_while_stopping = 0;
        loop {
            let a = attempt.clone();
            let (err, no_space) = match tokio::task::spawn_blocking(move || a()).await {
                Ok(Ok(())) => {
                    self.metrics.space.succeeded(Place::Output);
                    return true;
                }
                Ok(Err(e)) => (e.message, e.no_space),
                Err(e) => (format!("panicked: {e}"), false),
            };
            failures.fetch_add(1, Relaxed);
            let delay = backoff.next_delay();
            if no_space {
                // Logged once as an error, then as a reminder, while the episode lasts.
                self.metrics
                    .space
                    .failed(Place::Output, &format!("batch {t}, {what}: {err}"));
            } else {
                tracing::error!(batch = t, step = what, error = %err, retry_in_ms = delay.as_millis() as u64, "batch step failed; retrying it on the same batch");
            }
            if self.stopping.load(Relaxed) {
                failures_while_stopping += 1;
                if failures_while_stopping >= 3 {
                    *lock(&self.incomplete) = Some((t, format!("{what}: {err}")));
                    return false;
                }
            }
            if self.failed().is_some() {
                return false;
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Tells each direct source that batch `t`'s ranges are done (it may commit them back).
    async fn direct_completed(self: &Arc<Self>, t: u64) {
        let Some(ranges) = lock(&self.schedule).ranges.get(&t).cloned() else {
            return;
        };
        let e = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (name, src) in &e.direct {
                let mine: Vec<OffsetRange> = ranges
                    .iter()
                    .filter(|d| d.source == *name)
                    .map(|d| d.range.clone())
                    .collect();
                if !mine.is_empty() {
                    src.completed(&mine);
                }
            }
        })
        .await;
    }

    /// Persists completions without allocating (graceful stop).
    fn commit_completions(&self) -> Result<(), EngineError> {
        let _commit = lock(&self.commit_lock);
        let completed = *self.completed.borrow();
        let (persisted, forget_before) = {
            let s = lock(&self.schedule);
            (s.persisted_completed, self.forget_before(&s, completed))
        };
        if completed <= persisted {
            return Ok(());
        }
        let no_space = |e: &dyn std::fmt::Display| {
            tracing::warn!(
                error = %e,
                "the final tracker commit waits for disk space: not waiting during a stop; the \
                 batches completed since the last commit run again at the next start"
            );
        };
        if self.tracker_broken.load(Relaxed) && !self.reopen_tracker()? {
            no_space(&"the tracker could not be reopened");
            return Ok(());
        }
        if let Some(t) = &*lock(&self.tracker) {
            match t.commit(&Commit {
                completed_through: completed,
                forget_before,
                ..Commit::default()
            }) {
                Ok(()) => {}
                Err(e) if e.is_no_space() => {
                    self.tracker_broken.store(true, Relaxed);
                    no_space(&e);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.metrics.tracker_commits.fetch_add(1, Relaxed);
        let mut s = lock(&self.schedule);
        s.persisted_completed = completed;
        self.forget_and_clean(&mut s, forget_before);
        Ok(())
    }

    /// The oldest batch time to keep once `completed` is persisted: complete batches older than
    /// the window retention are forgotten.
    fn forget_before(&self, s: &Schedule, completed: Option<u64>) -> Option<u64> {
        let c = completed?;
        let done: Vec<u64> = s.batches.range(..=c).map(|(t, _)| *t).collect();
        if done.len() <= self.retention {
            return None;
        }
        Some(if self.retention == 0 {
            c + 1
        } else {
            done[done.len() - self.retention]
        })
    }

    fn forget_and_clean(&self, s: &mut Schedule, forget_before: Option<u64>) {
        if let Some(before) = forget_before {
            let keep = s.batches.split_off(&before);
            let gone = std::mem::replace(&mut s.batches, keep);
            for blocks in gone.values() {
                for b in blocks.iter() {
                    if b.handle.segment == DIRECT_SEGMENT {
                        self.source.unpin(&b.handle);
                    } else {
                        self.cache.remove(&b.handle);
                    }
                }
            }
            s.ranges = s.ranges.split_off(&before);
            s.unfetched = s.unfetched.split_off(&before);
        }
        // Every block at or after `allocated_end` is unallocated (or not yet durable); every
        // remembered batch's blocks must stay. Segments wholly before the minimum can go.
        let watermark = s
            .batches
            .values()
            .flat_map(|b| b.iter().map(|b| b.handle.position()))
            .filter(|p| p.segment != DIRECT_SEGMENT)
            .min()
            .unwrap_or(s.allocated_end)
            .min(s.allocated_end);
        match self.wal.cleanup(CleanupThreshold {
            before: Some(watermark),
            older_than: None,
        }) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "WAL cleanup failed; retrying after the next batch")
            }
        }
    }

    fn window(&self, time: u64, n: usize) -> Batch {
        let s = lock(&self.schedule);
        let picked: Vec<(u64, Arc<[BlockRef]>)> = s
            .batches
            .range(..=time)
            .rev()
            .take(n)
            .map(|(t, b)| (*t, b.clone()))
            .collect();
        drop(s);
        let times: Vec<u64> = picked.iter().rev().map(|(t, _)| *t).collect();
        let blocks: Vec<BlockRef> = picked
            .iter()
            .rev()
            .flat_map(|(_, b)| b.iter().cloned())
            .collect();
        Batch::new(
            time,
            Arc::from(times),
            Arc::from(blocks),
            self.source.clone(),
            self.node_id.clone(),
        )
    }

    async fn clock_loop(self: Arc<Self>, stop: weir_receiver::Shutdown) {
        let i = self.config.batch_interval_ms;
        let first = i - now_ms() % i;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_millis(first),
            Duration::from_millis(i),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.requested() => return,
            }
            let e = self.clone();
            match tokio::task::spawn_blocking(move || e.allocate()).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return,
                Err(e) => {
                    self.fail(format!("batch allocation panicked: {e}"));
                    return;
                }
            }
        }
    }

    async fn block_timer(self: Arc<Self>, stop: weir_receiver::Shutdown) {
        let period = Duration::from_millis(self.config.block_interval_ms);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.requested() => return,
            }
            for (_, g) in &self.generators {
                g.cut();
            }
        }
    }

    async fn process_loop(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<u64>) {
        while let Some(t) = queue.recv().await {
            if self.failed().is_some() {
                return;
            }
            if !self.process(t).await {
                // Stopping with a batch that would not complete: leave it for the next start.
                return;
            }
        }
    }

    /// Runs every job on batch `t`; true once the batch completed.
    async fn process(self: &Arc<Self>, t: u64) -> bool {
        let started = now_ms();
        let t0 = Instant::now();
        if !self.direct.is_empty() {
            let e = self.clone();
            let read = Arc::new(move || e.fetch_direct(t).map_err(StepError::from));
            let failures = &self.metrics.direct_read_failures;
            if !self.retry(t, "reading direct ranges", failures, read).await {
                return false;
            }
        }
        let Some(blocks) = lock(&self.schedule).batches.get(&t).cloned() else {
            tracing::error!(batch = t, "batch to process is not remembered");
            return false;
        };
        let batch = Batch::new(
            t,
            Arc::from([t]),
            blocks.clone(),
            self.source.clone(),
            self.node_id.clone(),
        );
        for job in &self.jobs {
            let view = if job.window > 1 {
                self.window(t, job.window)
            } else {
                batch.clone()
            };
            let f = job.f.clone();
            let run = Arc::new(move || {
                f(&view).map_err(|e| StepError {
                    no_space: crate::space::is_no_space(&*e),
                    message: e.to_string(),
                })
            });
            let what = format!("job {}", job.name);
            if !self.retry(t, &what, &self.metrics.job_failures, run).await {
                return false;
            }
        }
        let processing = t0.elapsed().as_millis() as u64;
        let scheduling = started.saturating_sub(t);
        let m = &self.metrics;
        m.processing_delay_ms.store(processing, Relaxed);
        m.scheduling_delay_ms.store(scheduling, Relaxed);
        m.total_delay_ms.store(scheduling + processing, Relaxed);
        m.batches_completed.fetch_add(1, Relaxed);
        m.batch_records.fetch_add(batch.count(), Relaxed);
        m.last_completed_batch_ms.store(t, Relaxed);
        self.completed.send_replace(Some(t));
        if !self.direct.is_empty() {
            self.direct_completed(t).await;
        }
        if self.config.rate.backpressure {
            self.update_rates(&blocks, processing, scheduling);
        }
        true
    }

    fn update_rates(&self, blocks: &[BlockRef], processing_ms: u64, scheduling_ms: u64) {
        let mut per: HashMap<&str, u64> = HashMap::new();
        for b in blocks {
            *per.entry(&b.receiver).or_default() += u64::from(b.records);
        }
        let mut pid = lock(&self.pid);
        for (name, g) in &self.generators {
            let Some(est) = pid.get_mut(name) else {
                continue;
            };
            let n = per.get(&**name).copied().unwrap_or(0);
            if let Some(rate) = est.compute(now_ms(), n, processing_ms.max(1), scheduling_ms) {
                let max = self.config.rate.max_records_per_sec.map(|m| m as f64);
                let limit = max.map_or(rate, |m| m.min(rate));
                g.limiter.set_limit(Some(limit));
                self.metrics
                    .receiver(name)
                    .rate_limit
                    .store(limit as u64, Relaxed);
            }
        }
    }
}

/// What a graceful stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// The last completed batch.
    pub completed_through: Option<u64>,
    /// Receivers that did not return within the stop timeout (abandoned).
    pub receivers_abandoned: Vec<String>,
}

/// A running engine. Stop it with [`stop`](Self::stop); dropping it stops everything abruptly
/// (like a crash, and as safe: what was acknowledged is in the WAL; pending `store()` calls
/// fail). After a drop the data directory stays locked until the engine's last tasks (a running
/// job, say) have ended; `stop` releases it before it returns.
pub struct RunningContext {
    engine: Arc<Engine>,
    receivers_stop: ShutdownTrigger,
    clock_stop: ShutdownTrigger,
    supervisors: Vec<(Arc<str>, JoinHandle<()>)>,
    writer_task: Option<JoinHandle<()>>,
    processor: Option<JoinHandle<()>>,
    block_timer: Option<JoinHandle<()>>,
    clock: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningContext").finish_non_exhaustive()
    }
}

impl RunningContext {
    /// The effective `node_id` (see [`StreamingConfig::node_id`]).
    pub fn node_id(&self) -> &str {
        &self.engine.node_id
    }

    /// Every metric of the engine, its receivers and its WAL.
    pub fn metrics(&self) -> MetricsRegistry {
        MetricsRegistry {
            engine: self.engine.metrics.clone(),
            wal: self.engine.wal.metrics().clone(),
        }
    }

    /// The fatal error that stopped the engine, if any.
    pub fn failure(&self) -> Option<String> {
        self.engine.failed()
    }

    /// The last completed batch time.
    pub fn completed_through(&self) -> Option<u64> {
        *self.engine.completed.borrow()
    }

    /// Allocates a batch now and waits until it (and every batch before it) completed. The only
    /// way batches happen with [`ClockMode::Manual`]; also usable with the interval clock.
    ///
    /// # Errors
    /// [`EngineError::Failed`] if the engine failed before the batch completed;
    /// [`EngineError::NoSpace`] if the tracker could not record the batch for lack of disk space
    /// (nothing is lost: the same allocation is tried again at the next call).
    pub async fn run_batch(&self) -> Result<u64, EngineError> {
        for (_, g) in &self.engine.generators {
            g.cut();
        }
        self.engine.writer.flush().await;
        let e = self.engine.clone();
        let t = tokio::task::spawn_blocking(move || e.allocate())
            .await
            .map_err(|e| EngineError::Failed(format!("allocation panicked: {e}")))??;
        let Some(t) = t else {
            return Err(EngineError::NoSpace(
                "the tracker's commit is waiting for disk space; call run_batch again".into(),
            ));
        };
        self.wait_completed(t).await?;
        Ok(t)
    }

    async fn wait_completed(&self, t: u64) -> Result<(), EngineError> {
        let mut done = self.engine.completed.subscribe();
        let mut failure = self.engine.failure.subscribe();
        loop {
            if done.borrow_and_update().is_some_and(|c| c >= t) {
                return Ok(());
            }
            if let Some(f) = self.engine.failed() {
                return Err(EngineError::Failed(f));
            }
            tokio::select! {
                r = done.changed() => if r.is_err() { return Err(EngineError::Failed("engine gone".into())) },
                _ = failure.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Stops gracefully: stops the receivers (waiting up to `receiver_stop_timeout_ms`), makes
    /// every accepted record durable, processes every durable block in a final batch, persists
    /// the completions and closes the WAL.
    ///
    /// # Errors
    /// [`EngineError::Failed`] if the engine had failed (nothing acknowledged is lost: restart
    /// to recover), [`EngineError::Incomplete`] if a job kept failing on the last batch.
    pub async fn stop(mut self) -> Result<StopReport, EngineError> {
        let e = self.engine.clone();
        self.receivers_stop.trigger();
        let timeout = Duration::from_millis(e.config.receiver_stop_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut abandoned = Vec::new();
        for (name, h) in std::mem::take(&mut self.supervisors) {
            let abort = h.abort_handle();
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                tracing::warn!(receiver = %name, "receiver did not stop in time; abandoning it");
                abort.abort();
                abandoned.push(name.to_string());
            }
        }
        for (_, g) in &e.generators {
            g.close();
        }
        e.writer.flush().await;
        self.clock_stop.trigger();
        for h in [self.clock.take(), self.block_timer.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.await;
        }
        e.stopping.store(true, Relaxed);
        let has_unallocated =
            !lock(&e.writer.unallocated).blocks.is_empty() || lock(&e.pending_alloc).is_some();
        if has_unallocated && e.failed().is_none() {
            let e2 = e.clone();
            let _ = tokio::task::spawn_blocking(move || e2.allocate()).await;
        }
        lock(&e.queue).take();
        if let Some(p) = self.processor.take() {
            let _ = p.await;
        }
        let commit = {
            let e2 = e.clone();
            tokio::task::spawn_blocking(move || e2.commit_completions())
                .await
                .map_err(|err| EngineError::Failed(format!("final commit panicked: {err}")))?
        };
        if let Some(w) = self.writer_task.take() {
            w.abort();
            let _ = w.await;
        }
        // Close the tracker and the WAL now (not when the last reference goes), so that the data
        // directory can be opened again as soon as `stop` returns.
        lock(&e.tracker).take();
        let closed = e.wal.close();
        if let Some(f) = e.failed() {
            return Err(EngineError::Failed(f));
        }
        if let Some((time, reason)) = lock(&e.incomplete).take() {
            return Err(EngineError::Incomplete { time, reason });
        }
        commit?;
        closed?;
        let completed_through = *e.completed.borrow();
        Ok(StopReport {
            completed_through,
            receivers_abandoned: abandoned,
        })
    }
}

impl Drop for RunningContext {
    fn drop(&mut self) {
        self.receivers_stop.trigger();
        self.clock_stop.trigger();
        for (_, h) in &self.supervisors {
            h.abort();
        }
        for h in [
            &self.writer_task,
            &self.processor,
            &self.block_timer,
            &self.clock,
        ]
        .into_iter()
        .flatten()
        {
            h.abort();
        }
        lock(&self.engine.queue).take();
        for (_, g) in &self.engine.generators {
            g.abort();
        }
    }
}
