//! Flume's Avro push source: an Avro IPC server speaking `AvroSourceProtocol`, which a Flume
//! agent's Avro sink (or any `NettyAvroRpcClient`) pushes events to.
//!
//! Each `append`/`appendBatch` call's events are stored with one `store()` call and the call is
//! answered `OK` only once they are durable; `FAILED` when storing fails or the node stops first,
//! so the agent rolls its transaction back and retries (at-least-once: a retried batch may have
//! been durable already). Calls on one connection are answered in the order they arrived;
//! pipelined calls are stored concurrently, up to `max_in_flight`.

mod config;
mod conn;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use tokio::task::JoinSet;
use tokio::time::sleep;
use weir_receiver::listener::{Gate, Refusal};
use weir_receiver::{BoundAddress, Receiver, ReceiverContext, ReceiverError};

pub use config::{FlumeSourceConfig, DEFAULT_ADDRESS, MAX_FRAME_BYTES_LIMIT, MIN_FRAME_BYTES};
pub use stats::FlumeSourceStats;

use crate::flume::{AVRO_SOURCE_AVRO1111, AVRO_SOURCE_LEGACY};
use crate::ipc::protocol::Protocol;
use crate::ipc::responder::Responder;
use conn::Shared;

/// Pause after a failed `accept` (out of file descriptors, say) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A [`FlumeSourceConfig`] that failed [`FlumeSourceConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid flume receiver configuration: {0}")]
pub struct ConfigError(pub String);

/// The Flume Avro push source: see the [module documentation](self).
pub struct FlumeSourceReceiver {
    shared: Arc<Shared>,
    bound: BoundAddress,
}

impl std::fmt::Debug for FlumeSourceReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlumeSourceReceiver")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// The responder of `AvroSourceProtocol`: it presents the legacy text and answers `BOTH` to
/// clients that hash either Flume text.
pub fn avro_source_responder() -> Responder {
    let parse = |t: &str| Protocol::parse(t).expect("the bundled Flume protocol texts parse");
    Responder::new(parse(AVRO_SOURCE_LEGACY), &[parse(AVRO_SOURCE_AVRO1111)])
}

impl FlumeSourceReceiver {
    /// A receiver with a checked configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid field.
    pub fn new(config: FlumeSourceConfig) -> Result<Self, ConfigError> {
        config.validate().map_err(ConfigError)?;
        Ok(FlumeSourceReceiver {
            shared: Arc::new(Shared {
                config,
                stats: Arc::default(),
                responder: avro_source_responder(),
            }),
            bound: BoundAddress::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FlumeSourceConfig {
        &self.shared.config
    }

    /// The receiver's counters (shared: they keep counting).
    pub fn stats(&self) -> Arc<FlumeSourceStats> {
        self.shared.stats.clone()
    }

    /// The address bound while `run` is listening (with the real port when `address` asked for
    /// port 0); `None` before and after.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bound.get()
    }

    /// Waits until `run` is listening and returns the bound address (for ever if binding keeps
    /// failing: put a timeout around it).
    pub async fn listening(&self) -> SocketAddr {
        self.bound.wait().await
    }
}

fn note_panic(ctx: &ReceiverContext, joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        let msg = format!("a flume connection task failed: {e}");
        tracing::error!(receiver = ctx.name(), "{msg}");
        ctx.report_error(&msg);
    }
}

impl Receiver for FlumeSourceReceiver {
    /// Serves until shutdown; returns `Err` if the address cannot be bound (the supervisor
    /// retries with backoff).
    async fn run(&self, ctx: ReceiverContext) -> Result<(), ReceiverError> {
        let config = &self.shared.config;
        // Built per run, so that a restart reads the certificate files again.
        let gate = Gate::new(
            ctx.name(),
            config.listener_settings(),
            self.shared.stats.connections.clone(),
        )
        .map_err(|e| ReceiverError::msg(format!("flume receiver `{}`: {e}", ctx.name())))?;
        let listener = TcpListener::bind(&config.address).await.map_err(|e| {
            ReceiverError::context(
                format!(
                    "flume receiver `{}` cannot listen on {}",
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
            deflate = config.deflate,
            tls = gate.is_tls(),
            "flume avro source listening"
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
                                FlumeSourceStats::add(&stats.connections_rejected, 1);
                                tracing::warn!(
                                    receiver = ctx.name(),
                                    %peer,
                                    max_connections = config.max_connections,
                                    "connection refused: max_connections are open, all with \
                                     calls outstanding; closing it"
                                );
                                continue;
                            }
                            // Counted and logged by the gate.
                            Err(_) => continue,
                        };
                        FlumeSourceStats::add(&stats.connections_accepted, 1);
                        tracing::debug!(receiver = ctx.name(), %peer, "connection accepted");
                        let (ctx, shared) = (ctx.clone(), self.shared.clone());
                        let guard = shared.stats.active();
                        connections.spawn(async move {
                            let _guard = guard;
                            // The TLS handshake, if any, runs here, not in the accept loop.
                            let Some(stream) = admitted.open(stream).await else {
                                return;
                            };
                            stream.set_nodelay(true);
                            let activity = stream.activity();
                            conn::serve(stream, peer, &ctx, &shared, activity).await;
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
        while let Some(joined) = connections.join_next().await {
            note_panic(&ctx, joined);
        }
        self.bound.set(None);
        Ok(())
    }
}
