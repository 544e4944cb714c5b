//! `receiver-node`: the daemon around the engine — configuration file, receivers, outputs,
//! metrics endpoint, logging and signals.

pub mod config;
pub mod connectors;
pub mod http;
pub mod inspect_text;
pub mod output;
pub mod sink;
pub mod stats;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use config::{LogFormat, NodeConfig};
use weir::receiver::lock;
use weir::stream::{EngineError, StreamingContext};

/// Why the node stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The engine could not start or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Something else at startup (metrics listener, signal handlers).
    #[error("{0}")]
    Startup(String),
    /// A part of the configuration was refused when it was built (e.g. an output's client
    /// settings): a configuration error, like those found when the file is read.
    #[error("{0}")]
    Config(String),
}

/// Sets up `tracing` output as configured (`RUST_LOG` overrides the level). Call once.
pub fn init_logging(log: &config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Builds the streaming context for `config`: its receivers, and one job per output (returned
/// too, in the configuration's order, for the status page).
///
/// # Errors
/// [`NodeError::Startup`] if a receiver refuses its configuration, [`NodeError::Config`] if an
/// output does.
pub fn context(
    config: &NodeConfig,
) -> Result<(StreamingContext, Vec<Arc<output::Output>>), NodeError> {
    // The identity first: every `dir` output claims it before it writes anything, and a node
    // whose id another data directory already claimed there does not start.
    let identity = loop {
        match weir::identity::resolve(&config.data_dir, config.node_id.as_deref()) {
            // Only at the first start (the identity is written once): wait for space.
            Err(e) if weir::space::is_no_space(&e) => {
                tracing::error!(error = %e, "disk full recording the node identity: waiting for space");
                std::thread::sleep(Duration::from_secs(1));
            }
            r => break r.map_err(identity_error)?,
        }
    };
    let mut engine = config.engine.clone();
    engine.node_id = Some(identity.node_id.clone());
    let mut ctx = StreamingContext::new(engine, &config.data_dir);
    // A Kafka replica comes from weir-kafka (the engine does not link librdkafka).
    if let Some(weir::replica::ReplicationConfig::Kafka(k)) = &config.engine.replication {
        let r = weir_kafka::replica::replica(k, &identity.node_id)
            .map_err(|e| NodeError::Config(format!("[engine.replication] {e}")))?;
        ctx.with_replica(r);
    }
    for r in &config.receivers {
        r.kind
            .add_to(&r.name, &mut ctx)
            .map_err(NodeError::Startup)?;
    }
    // Every output is built here, once (a Kafka output's producer lives as long as the node).
    let mut outputs = Vec::new();
    for (i, o) in config.outputs.iter().enumerate() {
        let out = output::Output::new(o, i + 1)
            .map_err(|e| NodeError::Config(format!("[[output]] #{}: {e}", i + 1)))?
            .claiming(identity.clone());
        // With replication, an empty data directory adopts the node's instance at the engine's
        // start: the claim waits for the first write, after that.
        let claimed = if config.engine.replication.is_some() {
            Ok(())
        } else {
            out.claim()
        };
        match claimed {
            Ok(()) => {}
            Err(e @ weir::identity::IdentityError::Claimed(_)) => return Err(identity_error(e)),
            // A directory not writable yet (a mount not there yet): not a reason to refuse to
            // start; the output claims before its first write, and fails that batch (retried)
            // until it can.
            Err(e) => tracing::warn!(
                output = i + 1, error = %e,
                "cannot claim the node id in the output directory yet: retried before the first write"
            ),
        }
        let name = format!("output {} ({})", i + 1, out.describe());
        let out = Arc::new(out);
        outputs.push(out.clone());
        ctx.add_metrics(stats::output(i + 1, out.clone()));
        ctx.foreach_batch(name, move |batch| {
            out.write(batch)
                .map_err(|e| Box::new(e) as weir::stream::JobError)
        });
    }
    Ok((ctx, outputs))
}

/// What `run` and `run_sink` share: the signal handlers and, when enabled, the HTTP endpoint.
struct Daemon {
    signals: Signals,
    status: http::SharedStatus,
    /// Serves until dropped with the runtime.
    _http: Option<tokio::task::JoinHandle<()>>,
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Waits for the next SIGTERM or SIGINT and names it.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

impl Daemon {
    async fn start(http_enabled: bool, address: std::net::SocketAddr) -> Result<Daemon, NodeError> {
        let term = signal(SignalKind::terminate())
            .map_err(|e| NodeError::Startup(format!("SIGTERM handler: {e}")))?;
        let int = signal(SignalKind::interrupt())
            .map_err(|e| NodeError::Startup(format!("SIGINT handler: {e}")))?;
        let status: http::SharedStatus = Arc::default();
        let _http = if http_enabled {
            Some(
                http::serve(address, status.clone())
                    .await
                    .map_err(NodeError::Startup)?,
            )
        } else {
            None
        };
        Ok(Daemon {
            signals: Signals { term, int },
            status,
            _http,
        })
    }
}

/// A refused or conflicting id is a configuration error (exit 2); I/O errors are not.
fn identity_error(e: weir::identity::IdentityError) -> NodeError {
    use weir::identity::IdentityError as E;
    match e {
        E::Invalid { .. } | E::Claimed(_) => NodeError::Config(e.to_string()),
        _ => NodeError::Startup(e.to_string()),
    }
}

/// Runs the node until SIGTERM/SIGINT (graceful: stop receivers, persist pending blocks, finish
/// the in-flight batch) or a fatal error. A second signal during the drain exits at once with
/// status 130 (still safe: the WAL holds everything acknowledged).
///
/// # Errors
/// [`NodeError`] if the node could not start or failed.
pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    let Daemon {
        mut signals,
        status,
        _http,
    } = Daemon::start(config.metrics.enabled, config.metrics.address).await?;
    tracing::info!(
        data_dir = %config.data_dir.display(), receivers = config.receivers.len(),
        outputs = config.outputs.len(), fsync = %config.engine.wal.fsync,
        "receiver-node starting (recovery first)"
    );
    // Recovery waits for disk space rather than failing on a full disk; a signal meanwhile
    // ends the wait (nothing was acknowledged yet in this run, and the WAL is as it was).
    let (ctx, outputs) = context(&config)?;
    let running = tokio::select! {
        r = ctx.start() => r?,
        signal = signals.next() => {
            tracing::info!(signal, "signal during recovery: exiting");
            return Ok(());
        }
    };
    let info = status::NodeInfo::new(&config, running.node_id().to_string());
    let node_status = status::NodeStatus::new(running.metrics(), info, outputs);
    lock(&status).metrics = Some(Arc::new(node_status));
    tracing::info!("ready");
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let signal_name = loop {
        tokio::select! {
            signal = signals.next() => break signal,
            _ = check.tick() => {
                if let Some(f) = running.failure() {
                    lock(&status).failure = Some(f.clone());
                    tracing::error!(error = %f, "the engine failed; exiting (restart to recover: nothing acknowledged is lost)");
                    return Err(NodeError::Engine(EngineError::Failed(f)));
                }
            }
        }
    };
    tracing::info!(signal = signal_name, "draining: stopping receivers, persisting pending blocks, finishing the batch in flight (signal again to exit at once)");
    lock(&status).stopping = true;
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!(
            "second signal: exiting now without draining (the WAL holds everything acknowledged)"
        );
        std::process::exit(130);
    });
    let report = running.stop().await?;
    tracing::info!(completed_through = ?report.completed_through, abandoned = ?report.receivers_abandoned, "stopped cleanly");
    Ok(())
}

/// Runs a pull sink (`receiver-node sink`) until SIGTERM/SIGINT: its queue, push and pull
/// listeners, and the same `/metrics` and `/health` endpoint as a node (with the sink's
/// figures; `/health` is degraded while its queue waits for disk space).
///
/// # Errors
/// [`NodeError::Startup`] if a listener cannot be bound, the signal handlers cannot be
/// installed or the queue cannot be opened.
pub async fn run_sink(config: crate::sink::PullSinkConfig) -> Result<(), NodeError> {
    let mut daemon = Daemon::start(config.metrics.enabled, config.metrics.address).await?;
    let status = daemon.status.clone();
    let sink = crate::sink::PullSink::start(config)
        .await
        .map_err(|e| NodeError::Startup(e.to_string()))?;
    lock(&status).metrics = Some(Arc::new(stats::SinkStatus::new(&sink)));
    tracing::info!(push = %sink.push_addr, pull = %sink.pull_addr, "pull sink ready");
    eprintln!(
        "receiver-node: pull sink ready: push {} pull {}",
        sink.push_addr, sink.pull_addr
    );
    let signal = daemon.signals.next().await;
    tracing::info!(signal, "stopping the pull sink");
    lock(&status).stopping = true;
    sink.stop().await;
    Ok(())
}
