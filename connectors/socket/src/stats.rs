//! Counters of a [`SocketReceiver`](crate::SocketReceiver).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use weir_receiver::listener::{ListenerMetricNames, ListenerStats};
use weir_receiver::{listener_metric_names, ConnectorStats, Stat};

/// The names of the listener's counters.
const LISTENER_NAMES: ListenerMetricNames = listener_metric_names!("weir_socket");

macro_rules! stats {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Counters of one socket receiver, shared with its connections (see
        /// [`SocketReceiver::stats`](crate::SocketReceiver::stats)). They live as long as the
        /// receiver value, across restarts of its `run`.
        #[derive(Debug, Default)]
        pub struct SocketStats {
            $($name: AtomicU64,)*
            /// Listen mode: the listener's gate (evictions, refusals, TLS, first bytes).
            connections: Arc<ListenerStats>,
        }

        impl SocketStats {
            $(
                $(#[doc = $doc])*
                pub fn $name(&self) -> u64 {
                    self.$name.load(Relaxed)
                }
            )*

            /// All counters at once (each read separately: not one atomic snapshot).
            pub fn snapshot(&self) -> SocketStatsSnapshot {
                SocketStatsSnapshot { $($name: self.$name()),* }
            }
        }

        /// A copy of the [`SocketStats`] counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct SocketStatsSnapshot {
            $(
                $(#[doc = $doc])*
                pub $name: u64,
            )*
        }
    };
}

stats! {
    /// Connections served: accepted and not rejected (listen), or established (connect).
    connections_accepted,
    /// Connections open right now.
    connections_active,
    /// Listen mode: connections closed at once because `max_connections` were open.
    connections_rejected,
    /// Connect mode: connection attempts that failed (each is followed by a backoff).
    connect_failures,
    /// Records handed to `store()`.
    records,
    /// Payload bytes of those records.
    bytes,
    /// Records whose `store()` resolved Ok (durable).
    records_durable,
    /// Connections closed for a line or frame larger than `max_record_bytes`.
    oversize_errors,
    /// Connections closed by `idle_timeout_ms`.
    idle_closed,
    /// `store()` calls that failed, other than because the node is shutting down; each closed
    /// its connection.
    store_failures,
}

impl SocketStats {
    /// Listen mode: the listener's counters (evicted and refused connections, TLS handshake
    /// failures, first-bytes timeouts).
    pub fn listener(&self) -> &ListenerStats {
        &self.connections
    }

    pub(crate) fn listener_arc(&self) -> Arc<ListenerStats> {
        self.connections.clone()
    }

    pub(crate) fn add(&self, counter: Counter, n: u64) {
        let c = match counter {
            Counter::Accepted => &self.connections_accepted,
            Counter::Rejected => &self.connections_rejected,
            Counter::ConnectFailures => &self.connect_failures,
            Counter::Records => &self.records,
            Counter::Bytes => &self.bytes,
            Counter::Durable => &self.records_durable,
            Counter::Oversize => &self.oversize_errors,
            Counter::Idle => &self.idle_closed,
            Counter::StoreFailures => &self.store_failures,
        };
        c.fetch_add(n, Relaxed);
    }

    /// Counts a connection as active until the guard is dropped.
    pub(crate) fn active(self: &Arc<Self>) -> ActiveGuard {
        self.connections_active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }
}

/// The counters a connection adds to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    Accepted,
    Rejected,
    ConnectFailures,
    Records,
    Bytes,
    Durable,
    Oversize,
    Idle,
    StoreFailures,
}

/// Decrements `connections_active` when dropped.
pub(crate) struct ActiveGuard(Arc<SocketStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}

impl ConnectorStats for SocketStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        let s = self.snapshot();
        for (name, help, v) in [
            (
                "weir_socket_connections_accepted_total",
                "Connections served (accepted, or established in connect mode).",
                s.connections_accepted,
            ),
            (
                "weir_socket_connections_rejected_total",
                "Connections closed at once because max_connections were open.",
                s.connections_rejected,
            ),
            (
                "weir_socket_connect_failures_total",
                "Failed connection attempts (connect mode).",
                s.connect_failures,
            ),
            (
                "weir_socket_records_total",
                "Records handed to store().",
                s.records,
            ),
            (
                "weir_socket_bytes_total",
                "Payload bytes of those records.",
                s.bytes,
            ),
            (
                "weir_socket_records_durable_total",
                "Records whose store() resolved durable.",
                s.records_durable,
            ),
            (
                "weir_socket_oversize_errors_total",
                "Connections closed for a record larger than max_record_bytes.",
                s.oversize_errors,
            ),
            (
                "weir_socket_idle_closed_total",
                "Connections closed by idle_timeout_ms.",
                s.idle_closed,
            ),
            (
                "weir_socket_store_failures_total",
                "store() calls that failed (each closed its connection).",
                s.store_failures,
            ),
        ] {
            out(Stat::counter(name, help, v));
        }
        self.connections.report(&LISTENER_NAMES, out);
        out(Stat::gauge(
            "weir_socket_connections_active",
            "Connections open now.",
            s.connections_active,
        ));
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn every_counter_is_exported() {
        let s = SocketStats::default();
        let missing = weir_receiver::unreported_fields(&format!("{s:?}"), &s);
        assert!(missing.is_empty(), "counted, not exported: {missing:?}");
    }
}
