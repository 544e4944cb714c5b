//! Who may connect to a listening receiver, and how many: what the socket receiver, the Flume
//! Avro source and a pull sink's pull port share.
//!
//! A [`Gate`] sits between `accept()` and a connection's task:
//!
//! - **allow-list** (`allow`): a peer outside every listed network is closed at once, counted and
//!   logged (at most one line a second);
//! - **connection limits** (`max_connections`, `max_connections_per_peer`): when the limit is
//!   reached, the connection *idle the longest* is closed to make room (one that never sent a
//!   byte counts as idler than any that did; one with work outstanding, such as a store not yet
//!   durable, is never chosen); only when none can be closed is the newcomer refused. A flood of
//!   silent connections therefore churns among itself and cannot lock out producers that send
//!   data;
//! - **first bytes** (`first_bytes_timeout_ms`): a connection that finished no TLS handshake, or
//!   sent no byte of data, within this time of being accepted is closed and counted;
//! - **TLS** (`[tls]`: `cert_file`, `key_file`, optional `client_ca_file` to require client
//!   certificates signed by that CA), over rustls; the handshake runs in the connection's task,
//!   inside the first-bytes time, so a slow one never holds up `accept()`.
//!
//! The accept loop calls [`Gate::admit`] and, in the connection's task, [`Admitted::open`], which
//! returns a [`ConnStream`]: the (TLS or plain) stream that records when data arrives and fails
//! reads with an error that [`closed_by_gate`] recognises once the connection is evicted or its
//! first bytes are late. A connection marks work outstanding with [`Activity::busy`] (an evicted
//! connection has none; if it takes some on in the meantime, it finishes it as usual: what it
//! acknowledges is durable, what it does not the producer sends again).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::stats::Stat;

/// The default `first_bytes_timeout_ms`: 10 seconds.
pub const DEFAULT_FIRST_BYTES_TIMEOUT_MS: u64 = 10_000;

/// `[tls]` of a listener: serve TLS (1.2 and 1.3, rustls) instead of plain TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM: the server's certificate first, then any
    /// intermediates).
    pub cert_file: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC), matching `cert_file`.
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by one of the CA certificates in
    /// this PEM file (mutual TLS); a client without one, or with one from another CA, fails the
    /// handshake. Default: no client certificate asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// The access settings of one listener, as its configuration holds them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListenerSettings {
    /// Connections served at once (at least 1).
    pub max_connections: usize,
    /// Connections served at once from one IP address; 0 = no limit of its own.
    pub max_connections_per_peer: usize,
    /// A connection must finish its TLS handshake and send its first byte of data within this
    /// long of being accepted, ms; 0 = no limit.
    pub first_bytes_timeout_ms: u64,
    /// Networks (`10.0.0.0/8`, `::1/128`, or a bare address) whose peers may connect; empty =
    /// everyone.
    pub allow: Vec<String>,
    /// TLS, if on.
    pub tls: Option<TlsConfig>,
}

impl ListenerSettings {
    /// Checks the settings, loading the TLS files as serving would. The message names the key
    /// (`allow`, `max_connections_per_peer`, `tls.cert_file`, ...) and what is wrong.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        self.prepare().map(|_| ())
    }

    fn prepare(&self) -> Result<(Vec<IpNet>, Option<TlsAcceptor>), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        let allow = parse_allow(&self.allow)?;
        let tls = self.tls.as_ref().map(tls_acceptor).transpose()?;
        Ok((allow, tls))
    }
}

/// Parses `allow`: each entry a network (`10.0.0.0/8`) or an address (`10.1.2.3`).
///
/// # Errors
/// Names the entry that does not parse.
pub fn parse_allow(allow: &[String]) -> Result<Vec<IpNet>, String> {
    allow
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = s.trim();
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    format!(
                        "`allow`[{i}] = {s:?} is not an IP network or address (expected CIDR \
                         notation such as \"10.0.0.0/8\", \"127.0.0.1/32\" or \"::1/128\")"
                    )
                })
        })
        .collect()
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("`{key}` = {:?}: cannot read it: {e}", path.display()))
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(key, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{key}` = {:?}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "`{key}` = {:?}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// Builds the TLS acceptor of `config`: reads the files and checks that the key matches the
/// certificate and that the client CA file holds usable CA certificates.
///
/// # Errors
/// Names the key (`tls.cert_file`, `tls.key_file`, `tls.client_ca_file`) and what is wrong.
pub fn tls_acceptor(config: &TlsConfig) -> Result<TlsAcceptor, String> {
    let certs = read_certs("tls.cert_file", &config.cert_file)?;
    let key_bytes = read_file("tls.key_file", &config.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "`tls.key_file` = {:?}: no private key in it (expected PEM: -----BEGIN PRIVATE \
             KEY-----, -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----)",
            config.key_file.display()
        ),
        e => format!(
            "`tls.key_file` = {:?}: not valid PEM: {e}",
            config.key_file.display()
        ),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("`tls`: {e}"))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for (i, c) in read_certs("tls.client_ca_file", path)?
                .into_iter()
                .enumerate()
            {
                roots.add(c).map_err(|e| {
                    format!(
                        "`tls.client_ca_file` = {:?}: certificate #{} is not usable as a CA: {e}",
                        path.display(),
                        i + 1
                    )
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("`tls.client_ca_file` = {:?}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "`tls.key_file` = {:?} does not match the certificate of `tls.cert_file` = {:?}",
            config.key_file.display(),
            config.cert_file.display()
        ),
        e => format!(
            "`tls.key_file` = {:?} / `tls.cert_file` = {:?}: {e}",
            config.key_file.display(),
            config.cert_file.display()
        ),
    })?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Counters of one listener's gate. A connector reports them with its own names (see
/// [`ListenerMetricNames`]).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections closed to make room for a new one (idle the longest).
    pub evicted: AtomicU64,
    /// Connections closed at once because their peer is outside `allow`.
    pub refused_not_allowed: AtomicU64,
    /// Connections closed at once because their peer had `max_connections_per_peer` open,
    /// none of them idle.
    pub refused_per_peer: AtomicU64,
    /// TLS handshakes that failed (plain text on a TLS listener, an unknown or missing client
    /// certificate, a client that gave up).
    pub tls_handshake_failures: AtomicU64,
    /// Connections closed because they finished no handshake or sent no data within
    /// `first_bytes_timeout_ms`.
    pub first_bytes_timeouts: AtomicU64,
}

/// The metric names a connector reports [`ListenerStats`] under; see
/// [`listener_metric_names!`](crate::listener_metric_names).
#[derive(Debug, Clone, Copy)]
pub struct ListenerMetricNames {
    /// For [`ListenerStats::evicted`].
    pub evicted: &'static str,
    /// For [`ListenerStats::refused_not_allowed`].
    pub refused_not_allowed: &'static str,
    /// For [`ListenerStats::refused_per_peer`].
    pub refused_per_peer: &'static str,
    /// For [`ListenerStats::tls_handshake_failures`].
    pub tls_handshake_failures: &'static str,
    /// For [`ListenerStats::first_bytes_timeouts`].
    pub first_bytes_timeouts: &'static str,
}

/// The [`ListenerMetricNames`] under a prefix: `listener_metric_names!("weir_socket")` names
/// `weir_socket_connections_evicted_total`, `weir_socket_connections_refused_not_allowed_total`,
/// `weir_socket_connections_refused_per_peer_total`, `weir_socket_tls_handshake_failures_total`
/// and `weir_socket_first_bytes_timeouts_total`.
#[macro_export]
macro_rules! listener_metric_names {
    ($prefix:literal) => {
        $crate::listener::ListenerMetricNames {
            evicted: concat!($prefix, "_connections_evicted_total"),
            refused_not_allowed: concat!($prefix, "_connections_refused_not_allowed_total"),
            refused_per_peer: concat!($prefix, "_connections_refused_per_peer_total"),
            tls_handshake_failures: concat!($prefix, "_tls_handshake_failures_total"),
            first_bytes_timeouts: concat!($prefix, "_first_bytes_timeouts_total"),
        }
    };
}

impl ListenerStats {
    /// Reports every counter under `names`.
    pub fn report(&self, names: &ListenerMetricNames, out: &mut dyn FnMut(Stat<'_>)) {
        for (name, help, v) in [
            (
                names.evicted,
                "Connections closed to make room for a new one (the one idle the longest).",
                &self.evicted,
            ),
            (
                names.refused_not_allowed,
                "Connections closed at once: the peer is outside `allow`.",
                &self.refused_not_allowed,
            ),
            (
                names.refused_per_peer,
                "Connections closed at once: the peer had max_connections_per_peer open.",
                &self.refused_per_peer,
            ),
            (
                names.tls_handshake_failures,
                "TLS handshakes that failed (plain text, no or an unknown client certificate).",
                &self.tls_handshake_failures,
            ),
            (
                names.first_bytes_timeouts,
                "Connections closed: no TLS handshake or no data within first_bytes_timeout_ms.",
                &self.first_bytes_timeouts,
            ),
        ] {
            out(Stat::counter(name, help, v.load(Relaxed)));
        }
    }
}

/// Why a gate refused a new connection (it is to be closed at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is outside `allow` (counted in [`ListenerStats::refused_not_allowed`]).
    NotAllowed,
    /// The peer had `max_connections_per_peer` open, none evictable (counted in
    /// [`ListenerStats::refused_per_peer`]).
    PerPeer,
    /// `max_connections` were open, none evictable: the connector counts this one.
    Full,
}

/// One connection's entry in its gate's table.
#[derive(Debug)]
struct Slot {
    id: u64,
    ip: IpAddr,
    /// Milliseconds since the gate's epoch at accept.
    accepted_ms: u64,
    /// Milliseconds since the gate's epoch, plus 1, when data last arrived; 0: never.
    last_data_ms: AtomicU64,
    /// Work outstanding (guards alive).
    busy: AtomicU32,
    evicted: AtomicBool,
    evict: watch::Sender<bool>,
    epoch: Instant,
}

impl Slot {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.last_data_ms.store(ms, Relaxed);
    }

    /// The eviction order: the smallest goes first. A connection that never sent data ranks
    /// before any that did (oldest first); then the least recently active.
    fn idleness_key(&self) -> (bool, u64) {
        match self.last_data_ms.load(Relaxed) {
            0 => (false, self.accepted_ms),
            ms => (true, ms),
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    slots: HashMap<u64, Arc<Slot>>,
    per_peer: HashMap<IpAddr, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Arc<Slot>> {
        let slot = self.slots.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&slot.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&slot.ip);
            }
        }
        Some(slot)
    }

    /// The connection idle the longest without work outstanding, among those `filter` keeps.
    fn evictable(&self, filter: impl Fn(&Slot) -> bool) -> Option<u64> {
        self.slots
            .values()
            .filter(|s| s.busy.load(Relaxed) == 0 && filter(s))
            .min_by_key(|s| s.idleness_key())
            .map(|s| s.id)
    }
}

/// At most one log line a second per kind of event; the lines in between are counted into the
/// next one.
#[derive(Debug)]
struct Quiet {
    last: Mutex<(Option<Instant>, u64)>,
}

impl Quiet {
    fn new() -> Quiet {
        Quiet {
            last: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut g = crate::lock(&self.last);
        let now = Instant::now();
        match g.0 {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                g.1 += 1;
                None
            }
            _ => {
                let suppressed = g.1;
                *g = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// The gate of one listener: see the [module documentation](self).
pub struct Gate {
    name: String,
    settings: ListenerSettings,
    allow: Vec<IpNet>,
    tls: Option<TlsAcceptor>,
    stats: Arc<ListenerStats>,
    table: Arc<Mutex<Table>>,
    epoch: Instant,
    quiet_refused: Quiet,
    quiet_evicted: Quiet,
    logs: Logs,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate for the listener `name` (named in log lines), counting into `stats`.
    ///
    /// # Errors
    /// Invalid settings, or TLS files that cannot be loaded (as [`ListenerSettings::validate`]).
    pub fn new(
        name: impl Into<String>,
        settings: ListenerSettings,
        stats: Arc<ListenerStats>,
    ) -> Result<Gate, String> {
        let (allow, tls) = settings.prepare()?;
        Ok(Gate {
            name: name.into(),
            settings,
            allow,
            tls,
            stats,
            table: Arc::default(),
            epoch: Instant::now(),
            quiet_refused: Quiet::new(),
            quiet_evicted: Quiet::new(),
            logs: Logs {
                tls: Arc::new(Quiet::new()),
                first: Arc::new(Quiet::new()),
            },
        })
    }

    /// Whether connections are served over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connections admitted and not closed yet (evicted ones are no longer counted).
    pub fn open(&self) -> usize {
        crate::lock(&self.table).slots.len()
    }

    /// Decides about a connection just accepted from `peer`: admitted (possibly after evicting
    /// the connection idle the longest), or refused. Refusals other than
    /// [`Refusal::Full`] are counted and logged here.
    ///
    /// # Errors
    /// The [`Refusal`]: close the connection at once.
    pub fn admit(&self, peer: SocketAddr) -> Result<Admitted, Refusal> {
        let ip = peer.ip().to_canonical();
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            self.stats.refused_not_allowed.fetch_add(1, Relaxed);
            if let Some(more) = self.quiet_refused.allow() {
                tracing::warn!(
                    receiver = %self.name,
                    %peer,
                    refused_since_last_line = more,
                    "connection refused: the peer is not in `allow`"
                );
            }
            return Err(Refusal::NotAllowed);
        }
        let mut evicted = Vec::new();
        let slot = {
            let mut table = crate::lock(&self.table);
            let per_peer = self.settings.max_connections_per_peer;
            if per_peer > 0 && table.per_peer.get(&ip).copied().unwrap_or(0) >= per_peer {
                match table.evictable(|s| s.ip == ip) {
                    Some(id) => evicted.extend(table.remove(id)),
                    None => {
                        drop(table);
                        self.stats.refused_per_peer.fetch_add(1, Relaxed);
                        if let Some(more) = self.quiet_refused.allow() {
                            tracing::warn!(
                                receiver = %self.name,
                                %peer,
                                max_connections_per_peer = per_peer,
                                refused_since_last_line = more,
                                "connection refused: max_connections_per_peer are open from \
                                 this address, all of them busy"
                            );
                        }
                        return Err(Refusal::PerPeer);
                    }
                }
            }
            if table.slots.len() >= self.settings.max_connections {
                match table.evictable(|_| true) {
                    Some(id) => evicted.extend(table.remove(id)),
                    None => return Err(Refusal::Full),
                }
            }
            table.next_id += 1;
            let slot = Arc::new(Slot {
                id: table.next_id,
                ip,
                accepted_ms: self.epoch.elapsed().as_millis() as u64,
                last_data_ms: AtomicU64::new(0),
                busy: AtomicU32::new(0),
                evicted: AtomicBool::new(false),
                evict: watch::Sender::new(false),
                epoch: self.epoch,
            });
            table.slots.insert(slot.id, slot.clone());
            *table.per_peer.entry(ip).or_default() += 1;
            slot
        };
        for old in evicted {
            old.evicted.store(true, Relaxed);
            old.evict.send_replace(true);
            self.stats.evicted.fetch_add(1, Relaxed);
            if let Some(more) = self.quiet_evicted.allow() {
                tracing::info!(
                    receiver = %self.name,
                    for_peer = %peer,
                    evicted_since_last_line = more,
                    "connection limit reached: closing the connection idle the longest to make \
                     room"
                );
            }
        }
        Ok(Admitted {
            registration: Registration {
                slot,
                table: self.table.clone(),
            },
            peer,
            tls: self.tls.clone(),
            first_bytes: (self.settings.first_bytes_timeout_ms > 0)
                .then(|| Duration::from_millis(self.settings.first_bytes_timeout_ms)),
            accepted: tokio::time::Instant::now(),
            stats: self.stats.clone(),
            name: self.name.clone(),
            log: self.logs.clone(),
        })
    }
}

/// The connection's log throttles (shared by a gate's connections).
#[derive(Debug, Clone)]
struct Logs {
    tls: Arc<Quiet>,
    first: Arc<Quiet>,
}

/// Removes a connection from its gate's table when dropped.
#[derive(Debug)]
struct Registration {
    slot: Arc<Slot>,
    table: Arc<Mutex<Table>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::lock(&self.table).remove(self.slot.id);
    }
}

/// A connection the gate admitted: [`open`](Self::open) it in its task.
pub struct Admitted {
    registration: Registration,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    first_bytes: Option<Duration>,
    accepted: tokio::time::Instant,
    stats: Arc<ListenerStats>,
    name: String,
    log: Logs,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("peer", &self.peer)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Admitted {
    /// Its activity handle (to mark work outstanding with [`Activity::busy`]).
    pub fn activity(&self) -> Activity {
        Activity(self.registration.slot.clone())
    }

    /// Runs the TLS handshake, if the listener has TLS, within the first-bytes time; `None`
    /// (counted and logged) when it fails, times out, or the connection is evicted meanwhile.
    pub async fn open(self, stream: TcpStream) -> Option<ConnStream> {
        let deadline = self.first_bytes.map(|d| self.accepted + d);
        let inner = match &self.tls {
            None => Inner::Plain(stream),
            Some(acceptor) => {
                let mut evicted = self.registration.slot.evict.subscribe();
                let handshake = acceptor.accept(stream);
                let timeout = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let outcome = tokio::select! {
                    r = handshake => Some(r),
                    () = timeout => None,
                    _ = evicted.wait_for(|e| *e) => return None,
                };
                match outcome {
                    Some(Ok(tls)) => Inner::Tls(Box::new(tls)),
                    Some(Err(e)) => {
                        self.stats.tls_handshake_failures.fetch_add(1, Relaxed);
                        if let Some(more) = self.log.tls.allow() {
                            tracing::warn!(
                                receiver = %self.name,
                                peer = %self.peer,
                                error = %e,
                                failed_since_last_line = more,
                                "TLS handshake failed; closing the connection"
                            );
                        }
                        return None;
                    }
                    None => {
                        self.stats.first_bytes_timeouts.fetch_add(1, Relaxed);
                        if let Some(more) = self.log.first.allow() {
                            tracing::info!(
                                receiver = %self.name,
                                peer = %self.peer,
                                closed_since_last_line = more,
                                "TLS handshake not finished within first_bytes_timeout_ms; \
                                 closing the connection"
                            );
                        }
                        return None;
                    }
                }
            }
        };
        let rx = self.registration.slot.evict.subscribe();
        let evicted: Pin<Box<dyn Future<Output = ()> + Send + Sync>> = Box::pin(async move {
            let mut rx = rx;
            // The sender lives in the slot, which this stream holds: it is never dropped first.
            let _ = rx.wait_for(|e| *e).await;
        });
        Some(ConnStream {
            inner,
            slot: self.registration.slot.clone(),
            evicted,
            first_bytes: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            stats: self.stats,
            peer: self.peer,
            name: self.name,
            log: self.log,
            _registration: self.registration,
        })
    }
}

/// A connection's activity: mark work outstanding so that it is not evicted meanwhile.
#[derive(Debug, Clone)]
pub struct Activity(Arc<Slot>);

impl Activity {
    /// A handle for a connection no gate tracks (connect mode): marking it does nothing.
    pub fn detached() -> Activity {
        Activity(Arc::new(Slot {
            id: 0,
            ip: IpAddr::from([0, 0, 0, 0]),
            accepted_ms: 0,
            last_data_ms: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            evicted: AtomicBool::new(false),
            evict: watch::Sender::new(false),
            epoch: Instant::now(),
        }))
    }

    /// Work outstanding until the guard is dropped: the connection is not evicted meanwhile.
    pub fn busy(&self) -> BusyGuard {
        self.0.busy.fetch_add(1, Relaxed);
        BusyGuard(self.0.clone())
    }

    /// Whether the gate evicted this connection.
    pub fn is_evicted(&self) -> bool {
        self.0.evicted.load(Relaxed)
    }
}

/// Work outstanding on a connection (see [`Activity::busy`]).
#[derive(Debug)]
pub struct BusyGuard(Arc<Slot>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
    }
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why the gate closed a connection (the error of its reads, see [`closed_by_gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateClosed {
    /// Evicted to make room for a new connection.
    #[error("closed to make room for a new connection (this one was idle the longest)")]
    Evicted,
    /// No data within `first_bytes_timeout_ms`.
    #[error("no data within first_bytes_timeout_ms")]
    FirstBytesTimeout,
}

/// The gate's reason, if `e` is how a [`ConnStream`] read reported it closed the connection.
pub fn closed_by_gate(e: &io::Error) -> Option<GateClosed> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<GateClosed>())
        .copied()
}

/// A connection admitted by a [`Gate`]: plain TCP or TLS, with its reads watched (data arrival
/// time, eviction, first-bytes time). Dropping it frees its place in the gate.
pub struct ConnStream {
    inner: Inner,
    slot: Arc<Slot>,
    evicted: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
    stats: Arc<ListenerStats>,
    peer: SocketAddr,
    name: String,
    log: Logs,
    _registration: Registration,
}

impl std::fmt::Debug for ConnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnStream")
            .field("peer", &self.peer)
            .field("tls", &matches!(self.inner, Inner::Tls(_)))
            .finish_non_exhaustive()
    }
}

impl ConnStream {
    /// Its activity handle (to mark work outstanding).
    pub fn activity(&self) -> Activity {
        Activity(self.slot.clone())
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// Sets `TCP_NODELAY` on the socket.
    pub fn set_nodelay(&self, on: bool) {
        let tcp = match &self.inner {
            Inner::Plain(s) => s,
            Inner::Tls(s) => s.get_ref().0,
        };
        let _ = tcp.set_nodelay(on);
    }
}

impl AsyncRead for ConnStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.evicted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::other(GateClosed::Evicted)));
        }
        let before = buf.filled().len();
        let r = match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.slot.touch();
                this.first_bytes = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(sleep) = &mut this.first_bytes {
                    if sleep.as_mut().poll(cx).is_ready() {
                        this.first_bytes = None;
                        this.stats.first_bytes_timeouts.fetch_add(1, Relaxed);
                        if let Some(more) = this.log.first.allow() {
                            tracing::info!(
                                receiver = %this.name,
                                peer = %this.peer,
                                closed_since_last_line = more,
                                "no data within first_bytes_timeout_ms; closing the connection"
                            );
                        }
                        // Later reads fail too: the connection is done.
                        this.evicted = Box::pin(std::future::ready(()));
                        return Poll::Ready(Err(io::Error::other(GateClosed::FirstBytesTimeout)));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, per_peer: usize, allow: &[&str]) -> Gate {
        Gate::new(
            "t",
            ListenerSettings {
                max_connections: max,
                max_connections_per_peer: per_peer,
                first_bytes_timeout_ms: 0,
                allow: allow.iter().map(|s| s.to_string()).collect(),
                tls: None,
            },
            Arc::default(),
        )
        .unwrap()
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_parses_networks_and_addresses_and_names_a_bad_entry() {
        let nets =
            parse_allow(&["10.0.0.0/8".into(), " ::1 ".into(), "10.1.2.3/8".into()]).unwrap();
        assert_eq!(nets[0].to_string(), "10.0.0.0/8");
        assert_eq!(nets[1].to_string(), "::1/128");
        assert_eq!(nets[2].to_string(), "10.0.0.0/8");
        let e = parse_allow(&["127.0.0.1/32".into(), "10.0.0/8".into()]).unwrap_err();
        assert!(e.contains("`allow`[1]") && e.contains("10.0.0/8"), "{e}");
    }

    #[test]
    fn peers_outside_allow_are_refused_and_counted_ipv4_mapped_included() {
        let g = gate(10, 0, &["10.0.0.0/8", "::1/128"]);
        assert_eq!(
            g.admit(peer("127.0.0.1:5")).unwrap_err(),
            Refusal::NotAllowed
        );
        assert!(g.admit(peer("10.9.9.9:5")).is_ok());
        assert!(g.admit(peer("[::ffff:10.1.1.1]:5")).is_ok());
        assert!(g.admit(peer("[::1]:5")).is_ok());
        assert_eq!(g.stats.refused_not_allowed.load(Relaxed), 1);
    }

    #[test]
    fn when_full_the_connection_idle_the_longest_makes_room_and_busy_ones_never_do() {
        let g = gate(3, 0, &[]);
        let a = g.admit(peer("127.0.0.1:1")).unwrap();
        let b = g.admit(peer("127.0.0.1:2")).unwrap();
        let c = g.admit(peer("127.0.0.1:3")).unwrap();
        // a and c sent data (c last); b never did: b goes first.
        a.activity().0.touch();
        std::thread::sleep(Duration::from_millis(5));
        c.activity().0.touch();
        let d = g.admit(peer("127.0.0.1:4")).unwrap();
        assert!(b.activity().is_evicted() && !a.activity().is_evicted());
        assert_eq!(g.open(), 3);
        // d never sent data either: it goes next, before a and c.
        let _e = g.admit(peer("127.0.0.1:5")).unwrap();
        assert!(d.activity().is_evicted());
        // Everything busy: the newcomer is refused.
        let guards: Vec<BusyGuard> = [&a, &c, &_e].iter().map(|x| x.activity().busy()).collect();
        assert_eq!(g.admit(peer("127.0.0.1:6")).unwrap_err(), Refusal::Full);
        drop(guards);
        // a is idle longer than c.
        let _f = g.admit(peer("127.0.0.1:7")).unwrap();
        assert!(_e.activity().is_evicted() && !a.activity().is_evicted());
        assert_eq!(g.stats.evicted.load(Relaxed), 3);
        // Dropping a connection frees its place.
        drop((a, b, c, d));
        assert!(g.open() <= 2, "{}", g.open());
    }

    #[test]
    fn per_peer_limit_evicts_that_peers_idlest_or_refuses() {
        let g = gate(10, 1, &[]);
        let a = g.admit(peer("127.0.0.1:1")).unwrap();
        let _other = g.admit(peer("127.0.0.2:1")).unwrap();
        let _b = g.admit(peer("127.0.0.1:2")).unwrap();
        assert!(a.activity().is_evicted());
        let _busy = _b.activity().busy();
        assert_eq!(g.admit(peer("127.0.0.1:3")).unwrap_err(), Refusal::PerPeer);
        assert_eq!(g.stats.refused_per_peer.load(Relaxed), 1);
        assert!(!_other.activity().is_evicted());
    }

    #[test]
    fn every_counter_is_reported() {
        #[derive(Debug, Default)]
        struct S(ListenerStats);
        impl crate::ConnectorStats for S {
            fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
                self.0.report(&crate::listener_metric_names!("weir_x"), out);
            }
        }
        let s = S::default();
        let missing = crate::unreported_fields(&format!("{:?}", s.0), &s);
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(crate::stat_names(&s).len(), 5);
    }

    #[test]
    fn missing_tls_files_are_named() {
        let s = ListenerSettings {
            max_connections: 1,
            tls: Some(TlsConfig {
                cert_file: "/nonexistent/cert.pem".into(),
                key_file: "/nonexistent/key.pem".into(),
                client_ca_file: None,
            }),
            ..ListenerSettings::default()
        };
        let e = s.validate().unwrap_err();
        assert!(
            e.contains("`tls.cert_file`") && e.contains("cannot read"),
            "{e}"
        );
    }
}
