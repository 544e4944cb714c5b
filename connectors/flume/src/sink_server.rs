//! The server side of `SparkFlumeProtocol`: what a pull sink runs so that pull receivers can
//! poll it. The transactions themselves (which events a batch holds, commit, rollback) belong to
//! a [`PullQueue`]; this module does the IPC: handshake, `getEventBatch`, `ack`, `nack`, limits.
//!
//! Calls on one connection are answered one at a time, in order.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::timeout;
use weir_receiver::listener::{
    closed_by_gate, Activity, Gate, ListenerMetricNames, ListenerSettings, ListenerStats, Refusal,
    TlsConfig, DEFAULT_FIRST_BYTES_TIMEOUT_MS,
};
use weir_receiver::{listener_metric_names, Shutdown};

use crate::ipc::datum::DatumReader;
use crate::ipc::frame::FrameLimits;
use crate::ipc::protocol::Protocol;
use crate::ipc::responder::{Call, ConnectionState, Incoming, Responder};
use crate::ipc::transport::{FrameReader, FrameWriter, TransportError};
use crate::source::{MAX_FRAME_BYTES_LIMIT, MIN_FRAME_BYTES};
use crate::spark::{EventBatch, ACK, GET_EVENT_BATCH, NACK, SPARK_FLUME_LEGACY};

/// A boxed future, as [`PullQueue`] returns them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The transactional queue behind a pull sink.
pub trait PullQueue: Send + Sync + 'static {
    /// Opens a transaction of up to `n` events not handed out yet (`n` is at least 1), under a
    /// new sequence number; may wait a while for events, and answers an error batch when it
    /// cannot serve.
    fn get_event_batch(&self, n: usize) -> BoxFuture<'_, EventBatch>;
    /// Commits the transaction `seq`: its events are done. Unknown or late sequence numbers are
    /// ignored. Resolves once the commit is recorded.
    fn ack<'a>(&'a self, seq: &'a str) -> BoxFuture<'a, ()>;
    /// Rolls the transaction `seq` back: its events will be served again. Unknown sequence
    /// numbers are ignored.
    fn nack(&self, seq: &str);
}

/// The IPC settings of a pull sink's `SparkFlumeProtocol` server. Unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PullServerConfig {
    /// Address to bind (port 0 picks a free port). Default `127.0.0.1:41415`.
    pub address: String,
    /// `compression-type = deflate` (must match the receivers). Default false.
    pub deflate: bool,
    /// The most events one `getEventBatch` hands out, whatever `n` asks. Default 10000.
    pub max_batch: usize,
    /// Largest request frame, bytes. Default 1 MiB; between 1024 and 1 GiB.
    pub max_frame_bytes: usize,
    /// Connections served at once. When they are all open, the one idle the longest (one that
    /// never sent data first; never one inside a call) is closed to make room for a newcomer;
    /// only when none can be closed is the newcomer closed at once. Default 64.
    pub max_connections: usize,
    /// Connections served at once from one IP address (the same rule when reached). 0 = no
    /// limit but `max_connections`. Default 0.
    pub max_connections_per_peer: usize,
    /// A new connection must finish its TLS handshake and send its first byte within this long,
    /// ms, or it is closed (and counted). 0 = no limit. Default 10000.
    pub first_bytes_timeout_ms: u64,
    /// The networks pull receivers may connect from (`"10.0.0.0/8"`, `"::1/128"`, or a bare
    /// address); others are closed at once, counted and logged. Empty = everyone (the default).
    pub allow: Vec<String>,
    /// A connection that sent nothing for this long is closed, ms. 0 = never. Default 600000.
    pub idle_timeout_ms: u64,
    /// Serve TLS (a `tls` table: `cert_file`, `key_file`, optional `client_ca_file` to require
    /// client certificates). Default: plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for PullServerConfig {
    fn default() -> Self {
        PullServerConfig {
            address: "127.0.0.1:41415".into(),
            deflate: false,
            max_batch: 10_000,
            max_frame_bytes: 1 << 20,
            max_connections: 64,
            max_connections_per_peer: 0,
            first_bytes_timeout_ms: DEFAULT_FIRST_BYTES_TIMEOUT_MS,
            allow: Vec::new(),
            idle_timeout_ms: 600_000,
            tls: None,
        }
    }
}

impl PullServerConfig {
    /// The listener's access settings.
    pub fn listener_settings(&self) -> ListenerSettings {
        ListenerSettings {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            first_bytes_timeout_ms: self.first_bytes_timeout_ms,
            allow: self.allow.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Checks every field (and loads the TLS files); the message names the field.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        let address = &self.address;
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("address = {address:?} must be host:port"))?;
        if host.is_empty() {
            return Err(format!("address = {address:?} has no host"));
        }
        port.parse::<u16>()
            .map_err(|_| format!("address = {address:?} has no valid port (0-65535)"))?;
        if !(1..=i32::MAX as usize).contains(&self.max_batch) {
            return Err(format!(
                "max_batch = {} must be between 1 and {}",
                self.max_batch,
                i32::MAX
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES_LIMIT).contains(&self.max_frame_bytes) {
            return Err(format!(
                "max_frame_bytes = {} must be between {MIN_FRAME_BYTES} and \
                 {MAX_FRAME_BYTES_LIMIT} (1 GiB)",
                self.max_frame_bytes
            ));
        }
        self.listener_settings().validate()
    }
}

/// Counters of a pull sink's server.
#[derive(Debug, Default)]
pub struct PullServerStats {
    /// Connections served.
    pub connections_accepted: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_rejected: AtomicU64,
    /// Batches handed out with events.
    pub batches_served: AtomicU64,
    /// Events handed out (redeliveries included).
    pub events_served: AtomicU64,
    /// Error batches answered.
    pub error_batches: AtomicU64,
    /// `ack` calls.
    pub acks: AtomicU64,
    /// `nack` calls.
    pub nacks: AtomicU64,
    /// Connections closed for malformed input.
    pub malformed_closed: AtomicU64,
    /// The listener's gate: evicted and refused connections, TLS handshake failures,
    /// first-bytes timeouts.
    pub connections: Arc<ListenerStats>,
}

/// The names of the pull listener's counters.
const LISTENER_NAMES: ListenerMetricNames = listener_metric_names!("weir_sink_pull");

impl weir_receiver::ConnectorStats for PullServerStats {
    fn report(&self, out: &mut dyn FnMut(weir_receiver::Stat<'_>)) {
        use std::sync::atomic::Ordering::Relaxed;
        use weir_receiver::Stat;
        for (name, help, v) in [
            (
                "weir_sink_pull_connections_accepted_total",
                "Pull connections served.",
                &self.connections_accepted,
            ),
            (
                "weir_sink_pull_connections_rejected_total",
                "Pull connections closed at once (max_connections).",
                &self.connections_rejected,
            ),
            (
                "weir_sink_pull_batches_served_total",
                "Batches handed out with events.",
                &self.batches_served,
            ),
            (
                "weir_sink_pull_events_served_total",
                "Events handed out (redeliveries included).",
                &self.events_served,
            ),
            (
                "weir_sink_pull_error_batches_total",
                "Error batches answered (nothing to serve).",
                &self.error_batches,
            ),
            ("weir_sink_pull_acks_total", "ack calls.", &self.acks),
            ("weir_sink_pull_nacks_total", "nack calls.", &self.nacks),
            (
                "weir_sink_pull_malformed_closed_total",
                "Pull connections closed for malformed input.",
                &self.malformed_closed,
            ),
        ] {
            out(Stat::counter(name, help, v.load(Relaxed)));
        }
        self.connections.report(&LISTENER_NAMES, out);
        out(Stat::gauge(
            "weir_sink_pull_connections_active",
            "Pull connections open now.",
            self.connections_active.load(Relaxed),
        ));
    }
}

/// The `SparkFlumeProtocol` responder (presents Spark's text).
///
/// # Panics
/// Never: the bundled text parses (a unit test checks it).
pub fn spark_responder() -> Responder {
    Responder::new(
        Protocol::parse(SPARK_FLUME_LEGACY).expect("the bundled SparkFlumeProtocol text parses"),
        &[],
    )
}

/// Binds `config.address`.
///
/// # Errors
/// The bind error, naming the address.
pub async fn bind(config: &PullServerConfig) -> Result<TcpListener, String> {
    TcpListener::bind(&config.address)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.address))
}

/// Serves `listener` until `shutdown`; open connections are closed then.
///
/// # Errors
/// The TLS files could not be loaded (or other invalid access settings): nothing is served.
pub async fn serve<Q: PullQueue>(
    listener: TcpListener,
    queue: Arc<Q>,
    config: PullServerConfig,
    stats: Arc<PullServerStats>,
    shutdown: Shutdown,
) -> Result<(), String> {
    let gate = Gate::new(
        "pull-sink",
        config.listener_settings(),
        stats.connections.clone(),
    )?;
    let responder = Arc::new(spark_responder());
    let config = Arc::new(config);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let admitted = match gate.admit(peer) {
                        Ok(a) => a,
                        Err(Refusal::Full) => {
                            stats.connections_rejected.fetch_add(1, Relaxed);
                            tracing::warn!(
                                %peer,
                                "pull sink: max_connections are open, all inside a call; \
                                 closing the new one"
                            );
                            continue;
                        }
                        // Counted and logged by the gate.
                        Err(_) => continue,
                    };
                    stats.connections_accepted.fetch_add(1, Relaxed);
                    stats.connections_active.fetch_add(1, Relaxed);
                    let (q, c, s, r, sd) = (
                        queue.clone(),
                        config.clone(),
                        stats.clone(),
                        responder.clone(),
                        shutdown.clone(),
                    );
                    connections.spawn(async move {
                        // The TLS handshake, if any, runs here, not in the accept loop.
                        if let Some(stream) = admitted.open(stream).await {
                            stream.set_nodelay(true);
                            let activity = stream.activity();
                            connection(stream, peer, &*q, &c, &s, &r, &sd, activity).await;
                        }
                        s.connections_active.fetch_sub(1, Relaxed);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pull sink: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn connection<Q: PullQueue, S: AsyncRead + AsyncWrite>(
    stream: S,
    peer: SocketAddr,
    queue: &Q,
    config: &PullServerConfig,
    stats: &PullServerStats,
    responder: &Responder,
    shutdown: &Shutdown,
    activity: Activity,
) {
    let (rd, wr) = tokio::io::split(stream);
    let limits = FrameLimits {
        max_frame_bytes: config.max_frame_bytes,
        max_buffers: 65_536,
    };
    let mut reader = FrameReader::new(rd, limits, config.deflate);
    let mut writer = FrameWriter::new(wr, config.deflate);
    let mut state = ConnectionState::default();
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let end = loop {
        let next = async {
            if idle.is_zero() {
                Ok(reader.next().await)
            } else {
                timeout(idle, reader.next()).await
            }
        };
        let frame = tokio::select! {
            () = shutdown.requested() => break "shutdown".to_string(),
            f = next => f,
        };
        let frame = match frame {
            Err(_) => break format!("idle for {} ms", config.idle_timeout_ms),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break "closed by the client".to_string(),
            // Counted (and logged, rate-limited) by the gate.
            Ok(Err(TransportError::Io(e))) if closed_by_gate(&e).is_some() => break e.to_string(),
            Ok(Err(e)) => {
                stats.malformed_closed.fetch_add(1, Relaxed);
                tracing::warn!(%peer, "pull sink: connection closed: {e}");
                break format!("malformed input: {e}");
            }
        };
        let reply = match responder.respond(frame.payload, &mut state) {
            Err(e) => {
                stats.malformed_closed.fetch_add(1, Relaxed);
                tracing::warn!(%peer, "pull sink: connection closed: malformed request: {e}");
                break format!("malformed request: {e}");
            }
            Ok(Incoming::Reply(buffers)) => buffers,
            Ok(Incoming::Call(call)) => {
                // Not evicted inside a call (a batch being handed out, an ack being recorded).
                let _busy = activity.busy();
                let executed = tokio::select! {
                    () = shutdown.requested() => None,
                    r = execute(call, queue, config, stats) => Some(r),
                };
                match executed {
                    Some(r) => r,
                    None => break "shutdown".to_string(),
                }
            }
        };
        if let Err(e) = writer.write(frame.serial, &reply).await {
            break format!("cannot send a reply: {e}");
        }
    };
    tracing::debug!(%peer, reason = %end, "pull sink connection closed");
}

async fn execute<Q: PullQueue>(
    mut call: Call,
    queue: &Q,
    config: &PullServerConfig,
    stats: &PullServerStats,
) -> Vec<Vec<u8>> {
    let bad = |call: &Call, e: &dyn std::fmt::Display| {
        call.error(&format!(
            "org.apache.avro.AvroRuntimeException: {}: bad parameters: {e}",
            call.message
        ))
    };
    match call.message.as_str() {
        GET_EVENT_BATCH => {
            let n = match call.params.int() {
                Ok(n) => n,
                Err(e) => return bad(&call, &e),
            };
            let batch = if n <= 0 {
                EventBatch::error(format!("getEventBatch({n}): n must be at least 1"))
            } else {
                let n = usize::try_from(n).unwrap_or(1).min(config.max_batch);
                queue.get_event_batch(n).await
            };
            if batch.is_error() {
                stats.error_batches.fetch_add(1, Relaxed);
            } else if !batch.events.is_empty() {
                stats.batches_served.fetch_add(1, Relaxed);
                stats
                    .events_served
                    .fetch_add(batch.events.len() as u64, Relaxed);
            }
            let mut out = Vec::new();
            batch.encode(&mut out);
            call.reply(&out)
        }
        ACK | NACK => {
            let seq = match read_seq(&mut call.params) {
                Ok(s) => s,
                Err(e) => return bad(&call, &e),
            };
            if call.message == ACK {
                stats.acks.fetch_add(1, Relaxed);
                queue.ack(&seq).await;
            } else {
                stats.nacks.fetch_add(1, Relaxed);
                queue.nack(&seq);
            }
            call.reply(&[]) // null
        }
        other => call.error(&format!(
            "org.apache.avro.AvroRuntimeException: message {other} is not served here"
        )),
    }
}

fn read_seq(r: &mut DatumReader) -> Result<String, crate::ipc::datum::DatumError> {
    r.string()
}
