//! The TCP socket receiver of weir.
//!
//! [`SocketReceiver`] has two modes (see [`SocketConfig`] and the crate's `README.md`, which
//! specifies the wire protocol precisely enough to write a producer):
//!
//! - **connect** (Spark's `socketTextStream`): connects to `host:port`, reads newline-delimited
//!   records, and reconnects with exponential backoff whenever the connection fails or ends. Plain
//!   TCP has no way to acknowledge: what was read is stored, but the source never learns it, so a
//!   crash of the node loses what was read and not yet durable.
//! - **listen**: accepts up to `max_connections` producers (at the limit the connection idle the
//!   longest makes room; `allow`, `first_bytes_timeout_ms`, `max_connections_per_peer` and TLS
//!   through [`weir_receiver::listener`]), one task each, speaking either
//!   - `lines`: newline-delimited records, no acknowledgements (at most once across a crash), or
//!   - `frames`: `len: u32 BE | payload` records; the receiver writes back the connection's
//!     cumulative count of durable records as a `u64` BE, only after the records are durable. A
//!     producer that resends whatever was not acknowledged gets at-least-once delivery.
//!
//! Records are stored in pipelined calls: each call takes the complete records already buffered
//! (up to `records_per_store`), and up to `max_in_flight` calls per connection wait for
//! durability at once, resolved in order. Records carry no [`Position`](weir_receiver::Position)
//! (a peer address is no stable identity), and a `peer` header only with `peer_header = true`.
//!
//! ```no_run
//! use weir_receiver::{shutdown_channel, Receiver, ReceiverContext};
//! use weir_socket::{Protocol, SocketConfig, SocketReceiver};
//! # async fn demo(host: std::sync::Arc<dyn weir_receiver::ReceiverHost>) {
//! let receiver = SocketReceiver::new(SocketConfig::listen("127.0.0.1:9999", Protocol::Frames))
//!     .expect("a valid configuration");
//! let (_stop, shutdown) = shutdown_channel();
//! receiver.run(ReceiverContext::new("socket", host, shutdown, 0)).await.unwrap();
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod conn;
mod framing;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use weir_receiver::listener::{Activity, Gate, Refusal};
use weir_receiver::{BoundAddress, Receiver, ReceiverContext, ReceiverError};

pub use config::{
    Mode, Protocol, SocketConfig, DEFAULT_ADDRESS, MAX_RECORD_BYTES_LIMIT, MIN_READ_BUFFER_BYTES,
};
pub use framing::{ACK_BYTES, FRAME_HEADER_BYTES};
pub use stats::{SocketStats, SocketStatsSnapshot};

use conn::{End, Shared};
use stats::Counter;

/// How long a connect attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, say) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A [`SocketConfig`] that failed [`SocketConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid socket receiver configuration: {0}")]
pub struct ConfigError(pub String);

/// The socket receiver: see the [crate documentation](crate).
#[derive(Debug)]
pub struct SocketReceiver {
    shared: Arc<Shared>,
    bound: BoundAddress,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SocketReceiver {
    /// A receiver with a checked configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid field.
    pub fn new(config: SocketConfig) -> Result<Self, ConfigError> {
        config.validate().map_err(ConfigError)?;
        Ok(SocketReceiver {
            shared: Arc::new(Shared {
                config,
                stats: Arc::default(),
            }),
            bound: BoundAddress::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SocketConfig {
        &self.shared.config
    }

    /// The receiver's counters (shared: they keep counting).
    pub fn stats(&self) -> Arc<SocketStats> {
        self.shared.stats.clone()
    }

    /// Listen mode: the address actually bound (with the real port when `address` asked for port
    /// 0) while `run` is listening; `None` before binding, after `run` returned, and in connect
    /// mode.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bound.get()
    }

    /// Listen mode: waits until `run` is listening and returns the bound address (it waits for
    /// ever in connect mode, or if binding keeps failing: put a timeout around it).
    pub async fn listening(&self) -> SocketAddr {
        self.bound.wait().await
    }

    async fn listen(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let config = &self.shared.config;
        // Built per run, so that a restart reads the certificate files again.
        let gate = Gate::new(
            ctx.name(),
            config.listener_settings(),
            self.shared.stats.listener_arc(),
        )
        .map_err(|e| ReceiverError::msg(format!("socket receiver `{}`: {e}", ctx.name())))?;
        let listener = TcpListener::bind(&config.address).await.map_err(|e| {
            ReceiverError::context(
                format!(
                    "socket receiver `{}` cannot listen on {}",
                    ctx.name(),
                    config.address
                ),
                e,
            )
        })?;
        let local = listener.local_addr()?;
        self.bound.set(Some(local));
        tracing::info!(
            receiver = ctx.name(),
            address = %local,
            protocol = ?config.protocol,
            tls = gate.is_tls(),
            "socket receiver listening"
        );
        let stats = &self.shared.stats;
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = ctx.shutdown().requested() => break,
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    note_panic(&ctx, joined);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let admitted = match gate.admit(peer) {
                            Ok(a) => a,
                            Err(Refusal::Full) => {
                                stats.add(Counter::Rejected, 1);
                                tracing::warn!(
                                    receiver = ctx.name(),
                                    %peer,
                                    max_connections = config.max_connections,
                                    "connection refused: max_connections are open, all with \
                                     stores outstanding; closing it"
                                );
                                continue;
                            }
                            // Counted and logged by the gate.
                            Err(_) => continue,
                        };
                        stats.add(Counter::Accepted, 1);
                        tracing::debug!(receiver = ctx.name(), %peer, "connection accepted");
                        let (ctx, shared) = (ctx.clone(), self.shared.clone());
                        // Counted as active from here, so the next accept sees it.
                        let guard = shared.stats.active();
                        connections.spawn(async move {
                            let _guard = guard;
                            // The TLS handshake, if any, runs here, not in the accept loop.
                            let Some(stream) = admitted.open(stream).await else {
                                return;
                            };
                            if shared.config.protocol == Protocol::Frames {
                                // Acknowledgements are 8 bytes: do not let Nagle hold them.
                                stream.set_nodelay(true);
                            }
                            let activity = stream.activity();
                            conn::serve(stream, peer, shared.config.protocol, &ctx, &shared, activity)
                                .await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(receiver = ctx.name(), error = %e, "accept failed");
                        tokio::select! {
                            () = ctx.shutdown().requested() => break,
                            () = sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        tracing::info!(
            receiver = ctx.name(),
            connections = connections.len(),
            "socket receiver stopping: closing connections"
        );
        // Each connection sees the shutdown itself: it stores what it has, waits for its stores
        // (bounded by close_timeout_ms) and sends its final acknowledgement.
        while let Some(joined) = connections.join_next().await {
            note_panic(&ctx, joined);
        }
        self.bound.set(None);
        Ok(())
    }

    async fn connect(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let config = &self.shared.config;
        let stats = &self.shared.stats;
        let initial = Duration::from_millis(config.reconnect_initial_ms);
        let max = Duration::from_millis(config.reconnect_max_ms);
        let mut backoff = weir_receiver::Backoff::new(initial, max);
        let address = &config.address;
        loop {
            let attempt = tokio::select! {
                biased;
                () = ctx.shutdown().requested() => return Ok(()),
                r = timeout(CONNECT_TIMEOUT, TcpStream::connect(address)) => r,
            };
            let reason = match attempt {
                Ok(Ok(stream)) => {
                    let peer = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    stats.add(Counter::Accepted, 1);
                    tracing::info!(receiver = ctx.name(), %address, %peer, "connected");
                    let outcome = {
                        let _active = stats.active();
                        let activity = Activity::detached();
                        conn::serve(stream, peer, Protocol::Lines, &ctx, &self.shared, activity)
                            .await
                    };
                    if matches!(outcome.end, End::Shutdown) || ctx.is_shutting_down() {
                        return Ok(());
                    }
                    if outcome.bytes_read > 0 {
                        backoff.reset();
                    }
                    format!("the connection ended ({})", describe(&outcome.end))
                }
                Ok(Err(e)) => {
                    stats.add(Counter::ConnectFailures, 1);
                    format!("connecting failed: {e}")
                }
                Err(_) => {
                    stats.add(Counter::ConnectFailures, 1);
                    format!("connecting timed out after {CONNECT_TIMEOUT:?}")
                }
            };
            let delay = backoff.next_delay();
            tracing::warn!(
                receiver = ctx.name(),
                %address,
                retry_in_ms = delay.as_millis() as u64,
                "{reason}; reconnecting"
            );
            tokio::select! {
                biased;
                () = ctx.shutdown().requested() => return Ok(()),
                () = sleep(delay) => {}
            }
        }
    }
}

fn describe(end: &End) -> String {
    match end {
        End::Eof => "closed by the source".into(),
        End::ReadFailed(e) => format!("read failed: {e}"),
        End::Shutdown => "shutdown".into(),
        End::Idle => "idle_timeout_ms passed without data".into(),
        End::Oversize(reason) => reason.clone(),
        End::StoreFailed(e) => format!("store failed: {e}"),
        End::Gate(why) => why.to_string(),
    }
}

fn note_panic(ctx: &ReceiverContext, joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        let msg = format!("a socket connection task failed: {e}");
        tracing::error!(receiver = ctx.name(), "{msg}");
        ctx.report_error(&msg);
    }
}

impl Receiver for SocketReceiver {
    /// Serves until shutdown. Listen mode returns `Err` if the address cannot be bound (the
    /// supervisor retries with backoff); connect mode retries by itself and only returns `Ok`.
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        match self.shared.config.mode {
            Mode::Listen => self.listen(ctx).await,
            Mode::Connect => self.connect(ctx).await,
        }
    }
}
