//! The pull sink: a sink node that accepts events over Flume's Avro push protocol into its own
//! durable queue and serves them to pull receivers over Spark's `SparkFlumeProtocol`,
//! transactionally.
//!
//! - Push side: weir's Flume Avro source (the same code as `type = "flume"` receivers); a call is
//!   answered `OK` only once its events are fsynced in the queue's write-ahead log.
//! - Pull side: `getEventBatch(n)` hands out up to `n` events not handed out yet under a new
//!   sequence number (unique per sink lifetime); `ack(seq)` commits them (recorded durably in
//!   the log, so a restart does not serve them again); `nack(seq)`, or no ack within
//!   `tx_timeout_ms`, rolls them back and they are served again. Unknown or late acks are
//!   ignored. An error batch when there are no events within `empty_wait_ms`, or when stopping.
//! - A crash loses nothing that was answered `OK`: the log is replayed on open, and batches that
//!   were handed out but not acked are served again (at-least-once).
//!
//! Run it embedded with [`PullSink::start`], or as `receiver-node sink --config FILE`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use weir_flume::sink_server::{self, PullServerConfig, PullServerStats};
use weir_flume::{FlumeSourceConfig, FlumeSourceReceiver, FlumeSourceStats};
use weir_receiver::{
    shutdown_channel, Checkpoint, Receiver, ReceiverContext, ReceiverHost, Record, ShutdownTrigger,
    StoreFuture, Stored,
};

pub use weir_flume::sink_queue::{QueueConfig, QueueStats, SinkQueue};

use weir::wal::{Wal, WalConfig};

/// Configuration of a pull sink (the file of `receiver-node sink --config`). Unknown keys are
/// rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PullSinkConfig {
    /// Where the queue's log lives (`DIR/queue`). Default `weir-data/sink`.
    pub data_dir: PathBuf,
    /// The push side: a Flume Avro source's keys (`address` default `127.0.0.1:41414`,
    /// `deflate`, limits).
    pub push: FlumeSourceConfig,
    /// The pull side: `address` (default `127.0.0.1:41415`), `deflate`, `max_batch`, limits.
    pub pull: PullServerConfig,
    /// Transactions and capacity: `tx_timeout_ms`, `empty_wait_ms`, `max_queued_bytes`.
    pub queue: QueueConfig,
    /// The queue's write-ahead log (`fsync = "always"` by default: keep it for the promise).
    pub wal: WalConfig,
    /// The HTTP endpoint (`/metrics`, `/health`) of `receiver-node sink`.
    pub metrics: SinkMetricsConfig,
    /// Logging of `receiver-node sink`: `format`, `level` (as a node's `[log]`).
    pub log: crate::config::LogConfig,
}

impl Default for PullSinkConfig {
    fn default() -> Self {
        PullSinkConfig {
            data_dir: PathBuf::from("weir-data/sink"),
            push: FlumeSourceConfig::default(),
            pull: PullServerConfig::default(),
            queue: QueueConfig::default(),
            wal: WalConfig::default(),
            metrics: SinkMetricsConfig::default(),
            log: crate::config::LogConfig::default(),
        }
    }
}

/// `[metrics]` of a pull sink's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkMetricsConfig {
    /// Listen address of `/metrics` and `/health`. Default 127.0.0.1:9899 (a node's is 9898).
    pub address: std::net::SocketAddr,
    /// Set to false to run without the endpoint. Default true.
    pub enabled: bool,
}

impl Default for SinkMetricsConfig {
    fn default() -> Self {
        SinkMetricsConfig {
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 9899)),
            enabled: true,
        }
    }
}

impl PullSinkConfig {
    /// Parses a TOML text and validates it.
    ///
    /// # Errors
    /// A message naming the section and key.
    pub fn parse(text: &str) -> Result<PullSinkConfig, String> {
        let c: PullSinkConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a file, parses and validates it; relative paths of the `[push.tls]` and
    /// `[pull.tls]` files are relative to the file's directory.
    ///
    /// # Errors
    /// A message naming the section and key (the caller names the file).
    pub fn load(path: &std::path::Path) -> Result<PullSinkConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
        let base = path.parent().unwrap_or(std::path::Path::new(""));
        for side in ["push", "pull"] {
            if let Some(toml::Value::Table(t)) = table.get_mut(side) {
                crate::config::resolve_tls_paths(t, base);
            }
        }
        let c: PullSinkConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// Checks every section.
    ///
    /// # Errors
    /// A message naming the section and key.
    pub fn validate(&self) -> Result<(), String> {
        self.push.validate().map_err(|e| format!("[push]: {e}"))?;
        self.pull.validate().map_err(|e| format!("[pull]: {e}"))?;
        self.queue.validate().map_err(|e| format!("[queue]: {e}"))?;
        self.wal.validate().map_err(|e| format!("[wal]: {e}"))?;
        Ok(())
    }
}

/// Why a sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration is invalid.
    #[error("invalid pull sink configuration: {0}")]
    Config(String),
    /// The queue's log could not be opened.
    #[error("the pull sink's queue log {}: {source}", dir.display())]
    Log {
        /// The log's directory.
        dir: PathBuf,
        /// Why.
        source: weir::WalError,
    },
    /// The queue's log could not be replayed.
    #[error("the pull sink's queue: {0}")]
    Queue(#[from] weir_flume::sink_queue::SinkQueueError),
    /// The task opening the queue panicked.
    #[error("opening the pull sink's queue: {0}")]
    Panicked(String),
    /// An address could not be bound.
    #[error("the pull sink cannot listen: {0}")]
    Listen(String),
}

/// The push source's host: stores go to the queue.
struct QueueHost(Arc<SinkQueue>);

impl ReceiverHost for QueueHost {
    fn store(&self, records: Vec<Record>) -> StoreFuture {
        let q = self.0.clone();
        StoreFuture::new(async move {
            let n = q.append(records).await?;
            Ok(Stored {
                records: n,
                block: None,
            })
        })
    }
    fn report_error(&self, message: &str) {
        tracing::warn!("pull sink: {message}");
    }
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new()
    }
}

/// A running pull sink.
pub struct PullSink {
    /// Where pushes are accepted.
    pub push_addr: std::net::SocketAddr,
    /// Where receivers poll.
    pub pull_addr: std::net::SocketAddr,
    queue: Arc<SinkQueue>,
    push_stats: Arc<FlumeSourceStats>,
    pull_stats: Arc<PullServerStats>,
    trigger: ShutdownTrigger,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PullSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullSink")
            .field("push_addr", &self.push_addr)
            .field("pull_addr", &self.pull_addr)
            .finish_non_exhaustive()
    }
}

impl PullSink {
    /// Opens (replaying) the queue in `config.data_dir`, binds both addresses and starts
    /// serving on the current Tokio runtime.
    ///
    /// # Errors
    /// [`SinkError`].
    pub async fn start(config: PullSinkConfig) -> Result<PullSink, SinkError> {
        config.validate().map_err(SinkError::Config)?;
        let dir = config.data_dir.join("queue");
        // The floor is the queue's (pushes are refused below it), not the log writer's: acks
        // must still be written when space is short, as they are what frees it.
        let min_free = config.wal.min_free_bytes;
        let wal_config = WalConfig {
            min_free_bytes: 0,
            ..config.wal.clone()
        };
        let queue_config = config.queue.clone();
        let queue = tokio::task::spawn_blocking(move || {
            let (wal, report) =
                Wal::open_dir(&dir, wal_config).map_err(|source| SinkError::Log { dir, source })?;
            tracing::info!(?report, "pull sink: queue log opened");
            Ok::<_, SinkError>(SinkQueue::open(wal, queue_config)?.with_min_free_bytes(min_free))
        })
        .await
        .map_err(|e| SinkError::Panicked(e.to_string()))??;
        let queue = Arc::new(queue);
        tracing::info!(
            events = queue
                .stats()
                .events_recovered
                .load(std::sync::atomic::Ordering::Relaxed),
            "pull sink: events waiting to be served"
        );
        let listener = sink_server::bind(&config.pull)
            .await
            .map_err(SinkError::Listen)?;
        let pull_addr = listener
            .local_addr()
            .map_err(|e| SinkError::Listen(e.to_string()))?;
        let source = Arc::new(
            FlumeSourceReceiver::new(config.push.clone())
                .map_err(|e| SinkError::Config(format!("[push]: {e}")))?,
        );
        let (trigger, shutdown) = shutdown_channel();
        let mut tasks = Vec::new();
        let pull_stats = Arc::new(PullServerStats::default());
        let serving = sink_server::serve(
            listener,
            queue.clone(),
            config.pull.clone(),
            pull_stats.clone(),
            shutdown.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serving.await {
                // The TLS files were readable at validation: they changed since.
                tracing::error!(error = %e, "pull sink: the pull port cannot serve");
            }
        }));
        let ctx = ReceiverContext::new(
            "pull-sink",
            Arc::new(QueueHost(queue.clone())),
            shutdown.clone(),
            0,
        );
        let (src, push_error) = (source.clone(), tokio::sync::oneshot::channel());
        let (error_tx, error_rx) = push_error;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = src.run(ctx).await {
                let _ = error_tx.send(e.to_string());
            }
        }));
        let push_addr = tokio::select! {
            a = source.listening() => a,
            e = error_rx => {
                trigger.trigger();
                return Err(SinkError::Listen(e.unwrap_or_else(|_| "the push source stopped".into())));
            }
        };
        let reap_every = Duration::from_millis((config.queue.tx_timeout_ms / 4).clamp(10, 1000));
        let (q, sd) = (queue.clone(), shutdown);
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = sd.requested() => break,
                    () = tokio::time::sleep(reap_every) => q.reap(),
                }
            }
        }));
        tracing::info!(%push_addr, %pull_addr, "pull sink serving");
        Ok(PullSink {
            push_addr,
            pull_addr,
            queue,
            push_stats: source.stats(),
            pull_stats,
            trigger,
            tasks,
        })
    }

    /// The queue (its counters, its log).
    pub fn queue(&self) -> &Arc<SinkQueue> {
        &self.queue
    }

    /// The push side's counters.
    pub fn push_stats(&self) -> &Arc<FlumeSourceStats> {
        &self.push_stats
    }

    /// The pull side's counters.
    pub fn pull_stats(&self) -> &Arc<PullServerStats> {
        &self.pull_stats
    }

    /// Stops gracefully: no more pushes or batches; pushes in flight are answered; the log is
    /// closed. Batches handed out and not acked are served again after a restart.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.queue.stop();
        let q = self.queue.clone();
        drop(self);
        let _ = tokio::task::spawn_blocking(move || q.wal().close()).await;
    }

    /// Stops at once, as a crash would: tasks are aborted mid-call and nothing is flushed or
    /// answered (for tests of recovery).
    pub async fn abort(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses_and_errors_name_the_key() {
        let c =
            PullSinkConfig::parse(include_str!("../../../examples/flume-pull-sink.toml")).unwrap();
        assert_eq!(c.pull.address, "127.0.0.1:41415");
        assert_eq!(c.queue.tx_timeout_ms, 60_000);
        let e = PullSinkConfig::parse("[queue]\ntx_timeout_ms = 0\n").unwrap_err();
        assert!(e.contains("[queue]") && e.contains("tx_timeout_ms"), "{e}");
        let e = PullSinkConfig::parse("[pull]\nmax_batch = 0\n").unwrap_err();
        assert!(e.contains("max_batch"), "{e}");
        let e = PullSinkConfig::parse("[pul]\n").unwrap_err();
        assert!(e.contains("pul"), "{e}");
    }

    #[test]
    fn listener_keys_on_both_sides_and_tls_paths_relative_to_the_file() {
        let c = PullSinkConfig::parse(
            "[push]\nallow = [\"10.0.0.0/8\"]\nfirst_bytes_timeout_ms = 500\n\
             [pull]\nmax_connections_per_peer = 2\n",
        )
        .unwrap();
        assert_eq!(c.push.allow, ["10.0.0.0/8"]);
        assert_eq!(c.push.first_bytes_timeout_ms, 500);
        assert_eq!(c.pull.max_connections_per_peer, 2);
        let e = PullSinkConfig::parse("[pull]\nallow = [\"nonsense\"]\n").unwrap_err();
        assert!(e.contains("[pull]") && e.contains("`allow`[0]"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sink.toml");
        std::fs::write(
            &file,
            "[pull.tls]\ncert_file = \"certs/server.pem\"\nkey_file = \"certs/server.key\"\n",
        )
        .unwrap();
        let e = PullSinkConfig::load(&file).unwrap_err();
        let expected = dir.path().join("certs/server.pem");
        assert!(
            e.contains("[pull]") && e.contains(&format!("{:?}", expected.display().to_string())),
            "{e}"
        );
    }
}
