//! The pull receiver: a `SparkFlumeProtocol` client polling pull sinks (Spark's
//! `FlumePollingInputDStream`), acknowledging a batch only once it is durable.
//!
//! Each worker (`workers` per address) owns one connection and loops: `getEventBatch(max_batch)`
//! → an error batch (`errorMsg` set) is never acknowledged: it is logged and the worker waits
//! `poll_interval_ms` → an empty batch is acknowledged (there is nothing to store) and the
//! worker waits → otherwise the events are stored with one `store()` call; `ack(seq)` once they
//! are durable, `nack(seq)` if storing failed. A connection error drops the connection and the
//! worker reconnects with exponential backoff; a batch whose `ack` was lost that way is rolled
//! back by the sink after its transaction timeout and delivered again (at-least-once).

mod client;
mod config;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use weir_receiver::{Receiver, ReceiverContext, ReceiverError, StoreError};

pub use config::{FlumePullConfig, MAX_WORKERS};
pub use stats::FlumePullStats;

use crate::source::ConfigError;
use client::SinkClient;

/// The pull receiver: see the [module documentation](self).
#[derive(Debug)]
pub struct FlumePullReceiver {
    config: Arc<FlumePullConfig>,
    stats: Arc<FlumePullStats>,
}

impl FlumePullReceiver {
    /// A receiver with a checked configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid field.
    pub fn new(config: FlumePullConfig) -> Result<Self, ConfigError> {
        config.validate().map_err(ConfigError)?;
        Ok(FlumePullReceiver {
            config: Arc::new(config),
            stats: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FlumePullConfig {
        &self.config
    }

    /// The receiver's counters (shared: they keep counting).
    pub fn stats(&self) -> Arc<FlumePullStats> {
        self.stats.clone()
    }
}

impl Receiver for FlumePullReceiver {
    /// Polls until shutdown; every worker has settled (acked or nacked) its batch by then.
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let mut workers = JoinSet::new();
        for address in &self.config.addresses {
            for worker in 0..self.config.workers {
                let w = Worker {
                    address: address.clone(),
                    worker,
                    config: self.config.clone(),
                    stats: self.stats.clone(),
                    ctx: ctx.clone(),
                };
                workers.spawn(async move { w.run().await });
            }
        }
        tracing::info!(
            receiver = ctx.name(),
            addresses = ?self.config.addresses,
            workers = self.config.workers,
            "flume pull receiver polling"
        );
        while let Some(joined) = workers.join_next().await {
            if let Err(e) = joined {
                let msg = format!("a flume pull worker failed: {e}");
                tracing::error!(receiver = ctx.name(), "{msg}");
                ctx.report_error(&msg);
            }
        }
        Ok(())
    }
}

struct Worker {
    address: String,
    worker: usize,
    config: Arc<FlumePullConfig>,
    stats: Arc<FlumePullStats>,
    ctx: ReceiverContext,
}

/// Why a poll loop ended.
enum End {
    /// Shutdown: stop.
    Stop,
    /// The connection is unusable: reconnect after a backoff.
    Reconnect(String),
}

impl Worker {
    /// Sleeps `d` unless shutdown comes first; false if it did.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = self.ctx.shutdown().requested() => false,
            () = sleep(d) => true,
        }
    }

    async fn run(&self) {
        let c = &self.config;
        let first = Duration::from_millis(c.reconnect_backoff_ms);
        let max = Duration::from_millis(c.reconnect_backoff_max_ms);
        let mut backoff = weir_receiver::Backoff::new(first, max);
        while !self.ctx.is_shutting_down() {
            let connected = tokio::select! {
                () = self.ctx.shutdown().requested() => break,
                r = SinkClient::connect(
                    &self.address,
                    c.deflate,
                    c.max_frame_bytes,
                    c.max_batch as u64,
                    Duration::from_millis(c.request_timeout_ms),
                ) => r,
            };
            let reason = match connected {
                Err(e) => e,
                Ok(client) => {
                    FlumePullStats::add(&self.stats.connects, 1);
                    self.stats
                        .workers_connected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut made_progress = false;
                    let end = self.poll(client, &mut made_progress).await;
                    self.stats
                        .workers_connected
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    if made_progress {
                        backoff.reset();
                    }
                    match end {
                        End::Stop => break,
                        End::Reconnect(reason) => reason,
                    }
                }
            };
            FlumePullStats::add(&self.stats.connection_failures, 1);
            let delay = backoff.next_delay();
            tracing::warn!(
                receiver = self.ctx.name(),
                sink = %self.address,
                worker = self.worker,
                retry_in_ms = delay.as_millis() as u64,
                "pull sink connection failed: {reason}"
            );
            if !self.pause(delay).await {
                break;
            }
        }
    }

    /// Polls on one connection until it fails or shutdown is requested.
    async fn poll(&self, mut client: SinkClient, made_progress: &mut bool) -> End {
        let c = &self.config;
        let stats = &self.stats;
        let interval = Duration::from_millis(c.poll_interval_ms);
        let n = i32::try_from(c.max_batch).unwrap_or(i32::MAX);
        loop {
            let batch = tokio::select! {
                biased;
                () = self.ctx.shutdown().requested() => return End::Stop,
                b = client.get_event_batch(n) => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => return End::Reconnect(e),
            };
            *made_progress = true;
            if batch.is_error() {
                FlumePullStats::add(&stats.error_batches, 1);
                tracing::debug!(
                    receiver = self.ctx.name(),
                    sink = %self.address,
                    "error batch (not acknowledged): {}",
                    batch.error_msg
                );
                if !self.pause(interval).await {
                    return End::Stop;
                }
                continue;
            }
            let seq = batch.sequence_number;
            if batch.events.is_empty() {
                FlumePullStats::add(&stats.empty_batches, 1);
                if let Err(e) = client.settle(&seq, true).await {
                    return End::Reconnect(e);
                }
                if !self.pause(interval).await {
                    return End::Stop;
                }
                continue;
            }
            let count = batch.events.len() as u64;
            FlumePullStats::add(&stats.batches, 1);
            FlumePullStats::add(&stats.events, count);
            FlumePullStats::add(
                &stats.bytes,
                batch.events.iter().map(|r| r.payload.len() as u64).sum(),
            );
            let mut store = self.ctx.store(batch.events);
            let close_timeout = Duration::from_millis(c.close_timeout_ms);
            let stored = tokio::select! {
                r = &mut store => Some(r),
                () = async {
                    self.ctx.shutdown().requested().await;
                    tokio::time::sleep_until(Instant::now() + close_timeout).await;
                } => None,
            };
            match stored {
                Some(Ok(_)) => {
                    if let Err(e) = client.settle(&seq, true).await {
                        // Durable here; the sink redelivers after its timeout (a duplicate).
                        return End::Reconnect(format!(
                            "{e} (the batch {seq} of {count} events is durable; the sink will \
                             deliver it again after its transaction timeout)"
                        ));
                    }
                    FlumePullStats::add(&stats.acks, 1);
                    FlumePullStats::add(&stats.events_acked, count);
                }
                failed => {
                    let why = match &failed {
                        Some(Err(e)) => e.to_string(),
                        _ => "not durable within close_timeout_ms after shutdown was requested"
                            .to_string(),
                    };
                    let msg = format!(
                        "batch {seq} of {count} events from {} not stored ({why}): nack, the \
                         sink delivers it again",
                        self.address
                    );
                    tracing::warn!(receiver = self.ctx.name(), "{msg}");
                    self.ctx.report_error(&msg);
                    let settled = client.settle(&seq, false).await;
                    if settled.is_ok() {
                        FlumePullStats::add(&stats.nacks, 1);
                    }
                    let stopping = failed.is_none()
                        || matches!(failed, Some(Err(StoreError::ShuttingDown)))
                        || self.ctx.is_shutting_down();
                    if stopping {
                        return End::Stop;
                    }
                    if let Err(e) = settled {
                        return End::Reconnect(e);
                    }
                    let backoff = Duration::from_millis(c.reconnect_backoff_ms);
                    if !self.pause(backoff).await {
                        return End::Stop;
                    }
                }
            }
        }
    }
}
