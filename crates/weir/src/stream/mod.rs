//! The engine: [`StreamingContext`] wires receivers, block generators, the block writer, the
//! tracker, the batch clock and the jobs together; [`RunningContext`] is the running engine.
//!
//! Order of events for one batch at time T: allocate every durable, unallocated block to T and
//! commit that (together with the completions since the last commit) to the tracker; delete WAL
//! segments that no remembered batch needs; then, in time order, run the jobs for T and mark it
//! complete in memory (persisted by the next commit, or by the final commit of a graceful stop).
//! A crash before that persists re-runs T with exactly the same blocks: outputs keyed by batch
//! time are idempotent.

mod allocate;
pub mod config;
mod direct;
pub mod metrics;
mod process;
mod recovery;
mod running;
mod schedule;
mod supervisor;

use schedule::Schedule;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use weir_receiver::{
    shutdown_channel, Checkpoint, ConfigError, DirectSource, DynReceiver, OffsetRange, Receiver,
    ShutdownTrigger,
};

use crate::batch::Batch;
use crate::block::codec::BlockBuilder;
use crate::block::{
    now_ms, BlockCache, BlockSource, BlockWriter, Generator, GeneratorLimits, Host,
};
use crate::rate::{PidRateEstimator, RateLimiter};
use crate::replica::restore;
use crate::replica::stage::Stage;
use crate::replica::Replica;
use crate::space::Place;
use crate::tracker::{BlockRef, Commit, DirectRange, Tracker, TrackerError};
use crate::wal::{CleanupThreshold, Storage, Wal, WalError, WalPosition};
pub use config::{ClockMode, StreamingConfig};
pub use metrics::{
    BatchSummary, EngineMetrics, LabelledStats, Metrics, MetricsRegistry, ReceiverIncident,
    ReceiverMetrics,
};
pub use running::{RunningContext, StopReport};
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
    /// The configuration is invalid: which key, and why.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
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
    /// A block that a batch needs is damaged or unreadable in the WAL.
    #[error("WAL segment {segment} offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        segment: u64,
        /// The offset of the block in the segment.
        offset: u64,
        /// What is wrong, and what to do about it.
        reason: String,
    },
    /// A file or directory could not be created, read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The step.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Replication: the replica is damaged, this data directory is stale, or this process was
    /// fenced by a new owner of the `node_id`.
    #[error("replication: {0}")]
    Replica(String),
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
    collectors: Vec<LabelledStats>,
    replica: Option<Arc<dyn Replica>>,
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
            replica: None,
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
            replica: None,
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

    /// Replicates acknowledged blocks to `replica` (instead of the one `config.replication`
    /// describes): for embedding weir with a replica of its own, e.g. an `object_store`
    /// implementation other than S3. `node_id` must be set, and the context must have a data
    /// directory ([`StreamingContext::new`]).
    pub fn with_replica(&mut self, replica: Arc<dyn Replica>) -> &mut Self {
        self.replica = Some(replica);
        self
    }

    /// Adds a component's own metrics (a connector's [`ConnectorStats`](weir_receiver::ConnectorStats):
    /// Kafka lag, socket connections), read at every scrape of [`RunningContext::metrics`].
    pub fn add_metrics(&mut self, stats: LabelledStats) -> &mut Self {
        self.collectors.push(stats);
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
            replica,
        } = self;
        config.validate()?;
        let mut names = std::collections::HashSet::new();
        for n in receivers
            .iter()
            .map(|r| &r.0)
            .chain(direct.iter().map(|d| &d.0))
        {
            if n.is_empty() || !names.insert(n.clone()) {
                return Err(EngineError::Config(ConfigError::new(
                    "receiver name",
                    format!("{n:?} is empty or used twice: names must be unique and non-empty"),
                )));
            }
        }
        let metrics = Arc::new(Metrics::default());
        for c in collectors {
            metrics.add_stats(c);
        }
        let cache = Arc::new(BlockCache::new(config.block_cache_bytes, metrics.clone()));
        let replica = match (replica, &config.replication) {
            (Some(r), _) => Some(r),
            (None, Some(c)) => {
                let id = config.node_id.as_deref().unwrap_or_default();
                Some(c.open(id).map_err(|e| e.within("replication"))?)
            }
            (None, None) => None,
        };
        let prepared = match &replica {
            Some(r) => {
                let (StorageChoice::Dir(dir), Some(id)) = (&storage, config.node_id.as_deref())
                else {
                    return Err(EngineError::Config(ConfigError::new(
                        "replication",
                        "needs a data directory (StreamingContext::new) and an explicit node_id",
                    )));
                };
                Some(restore::prepare(dir, id, r, &config.wal, &metrics).await?)
            }
            None => None,
        };
        let rec = {
            let (config, cache, metrics) = (config.clone(), cache.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || {
                recovery::recover(&config, storage, &cache, &metrics)
            })
            .await
            .map_err(|e| EngineError::Recovery(format!("recovery task failed: {e}")))??
        };
        let wal = rec.wal.clone();
        let completed = rec.state.completed_through;
        let (completed_tx, completed_rx) = watch::channel(completed);
        let mut rec = rec;
        let (stage, replica_lock) = match (replica, prepared) {
            (Some(r), Some(p)) => {
                let snapshot = snapshot_of(&rec, &cache)?;
                let stage = Stage::start(r, p.epoch, snapshot, metrics.clone())
                    .await
                    .map_err(|e| EngineError::Replica(e.to_string()))?;
                rec.unallocated.replica_end = stage.next_block();
                if let Some(marker) = p.adopting {
                    // The snapshot holds everything adopted: the adoption is complete.
                    std::fs::remove_file(&marker).map_err(|source| EngineError::Io {
                        what: "removing",
                        path: marker.clone(),
                        source,
                    })?;
                }
                (Some(stage), Some(p.lock))
            }
            _ => (None, None),
        };
        let (writer, writer_task) = BlockWriter::start(
            wal.clone(),
            cache.clone(),
            metrics.clone(),
            rec.unallocated,
            stage,
            completed_rx,
        );
        let source = Arc::new(BlockSource::new(
            wal.clone(),
            cache.clone(),
            metrics.clone(),
        ));
        let max_call = (config.wal.max_record_bytes as usize).saturating_sub(1 << 16);
        let mut generators = Vec::new();
        for (name, _) in &receivers {
            let limit = config.rate.starting_limit();
            let rm = metrics.receiver(name);
            rm.rate_limit.set(limit.map_or(0, |l| l as u64));
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
            metrics: metrics.clone(),
            registry: MetricsRegistry::new(metrics.clone(), wal.metrics().clone()),
            generators,
            schedule: Mutex::new(Schedule::recovered(
                rec.batches,
                ranges,
                completed,
                rec.state.last_allocated(),
                rec.state.allocated_end,
            )),
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
            batch_checkpoints: Mutex::new(BTreeMap::new()),
            replicated: Mutex::new(HashMap::new()),
            _replica_lock: replica_lock,
        });
        if let Some(c) = completed {
            metrics.last_completed_batch_ms.set(c);
        }
        // Re-run what was allocated but not completed, in time order, before anything new.
        for t in &rec.rerun {
            metrics.batches_rerun.inc();
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
    /// With a replica: the batch's blocks end before this replica block number.
    replica_end: u64,
    /// The completion part of the last commit attempt.
    completed_through: Option<u64>,
    forget_before: Option<u64>,
}

/// The engine's shared state, used by the clock, the processing loop and the running context.
/// Its methods live by concern: allocation and commits (`allocate.rs`), direct sources
/// (`direct.rs`), processing (`process.rs`), stopping (`running.rs`).
///
/// # Lock order
/// Every mutex is taken with [`lock`]. Outermost first; a lock is never taken while one later
/// in this list is held, and none is held across an `.await`:
/// 1. `commit_lock`: one tracker commit at a time (allocation, completions, the final commit).
/// 2. `pending_alloc`, `direct_positions`, `tracker`: each taken alone, under `commit_lock`;
///    `tracker` is held during a commit, which takes no other lock.
/// 3. `schedule`.
/// 4. Under `schedule`: the block writer's unallocated set ([`BlockWriter::take_unallocated`]),
///    the block source's pinned blocks and the block cache (releasing forgotten blocks), the
///    WAL's own locks (cleanup).
/// 5. Leaves, never held while taking another engine lock: `queue`, `incomplete`, `pid` (which
///    takes the receivers' rate limiters inside), `batch_checkpoints` (which takes the
///    receivers' completed checkpoints inside).
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
    metrics: Arc<Metrics>,
    /// The engine's metrics with the WAL's and the connectors', for scrapes.
    registry: MetricsRegistry,
    generators: Vec<(Arc<str>, Arc<Generator>)>,
    /// Allocated batches in memory (see [`Schedule`]).
    schedule: Mutex<Schedule>,
    /// Serialises tracker commits; first in the lock order.
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
    /// Per batch allocated in this run and not yet complete: each receiver's checkpoint as of
    /// its last block in the batch, handed to the receiver once the batch completes.
    batch_checkpoints: Mutex<BTreeMap<u64, BTreeMap<Arc<str>, Checkpoint>>>,
    /// With a replica: per batch allocated in this run, its allocation's replica write (awaited
    /// before the batch runs, so that a node adopting this one re-runs it with the same blocks).
    replicated: Mutex<HashMap<u64, tokio::sync::oneshot::Receiver<Result<(), String>>>>,
    /// The data directory's replica lock (see [`crate::replica`]), held while the engine lives.
    _replica_lock: Option<Box<dyn crate::wal::LockGuard>>,
}

/// What the first replica write of this process restates: the batches to re-run with their
/// blocks and direct ranges, the blocks of no batch, and the completed time.
fn snapshot_of(
    rec: &recovery::Recovered,
    cache: &BlockCache,
) -> Result<crate::replica::stage::Snapshot, EngineError> {
    let bytes_of = |b: &BlockRef| -> Result<bytes::Bytes, EngineError> {
        let Some(h) = b.location.wal() else {
            return Err(EngineError::Recovery(
                "a recovered block is not in the WAL".into(),
            ));
        };
        match cache.get(&h) {
            Some(bytes) => Ok(bytes),
            None => Ok(rec.wal.read(h)?),
        }
    };
    let mut batches = Vec::new();
    for t in &rec.rerun {
        let blocks = rec.batches.get(t).map_or(Ok(Vec::new()), |bs| {
            bs.iter().map(bytes_of).collect::<Result<Vec<_>, _>>()
        })?;
        let direct = rec
            .state
            .direct
            .get(t)
            .map(|r| crate::replica::Allocation::encode_direct(r))
            .unwrap_or_default();
        batches.push((*t, blocks, direct));
    }
    let unallocated = rec
        .unallocated
        .blocks
        .iter()
        .map(bytes_of)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::replica::stage::Snapshot {
        batches,
        unallocated,
        completed_through: rec.state.completed_through,
    })
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
}
