//! Counters of a [`FlumeSourceReceiver`](crate::FlumeSourceReceiver).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use weir_receiver::listener::{ListenerMetricNames, ListenerStats};
use weir_receiver::{listener_metric_names, ConnectorStats, Stat};

/// The names of the listener's counters.
const LISTENER_NAMES: ListenerMetricNames = listener_metric_names!("weir_flume");

/// Counters of one Flume source, shared with its connections; they live as long as the
/// receiver value, across restarts of its `run`.
#[derive(Debug, Default)]
pub struct FlumeSourceStats {
    /// Connections served (accepted and not rejected).
    pub connections_accepted: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_rejected: AtomicU64,
    /// `append` and `appendBatch` calls whose events were handed to `store()`.
    pub calls: AtomicU64,
    /// Events handed to `store()`.
    pub events: AtomicU64,
    /// Body bytes of those events.
    pub bytes: AtomicU64,
    /// Events answered `OK` (durable).
    pub events_durable: AtomicU64,
    /// Calls answered `FAILED` (store failed, or the node is stopping).
    pub calls_failed: AtomicU64,
    /// Calls answered with an Avro error (unknown message, bad parameters, too many events).
    pub error_replies: AtomicU64,
    /// Connections closed for a malformed frame, handshake or compressed stream.
    pub malformed_closed: AtomicU64,
    /// Connections closed by `idle_timeout_ms`.
    pub idle_closed: AtomicU64,
    /// The listener's gate: evicted and refused connections, TLS handshake failures,
    /// first-bytes timeouts.
    pub connections: Arc<ListenerStats>,
}

impl FlumeSourceStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    /// Counts a connection as active until the guard is dropped.
    pub(crate) fn active(self: &Arc<Self>) -> ActiveGuard {
        self.connections_active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Decrements `connections_active` when dropped.
pub(crate) struct ActiveGuard(Arc<FlumeSourceStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}

impl ConnectorStats for FlumeSourceStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        for (name, help, v) in [
            ("weir_flume_connections_accepted_total", "Connections served (accepted and not rejected).", &self.connections_accepted),
            ("weir_flume_connections_rejected_total", "Connections closed at once because max_connections were open.", &self.connections_rejected),
            ("weir_flume_calls_total", "append/appendBatch calls whose events were handed to store().", &self.calls),
            ("weir_flume_events_total", "Events handed to store().", &self.events),
            ("weir_flume_bytes_total", "Body bytes of those events.", &self.bytes),
            ("weir_flume_events_durable_total", "Events answered OK (durable).", &self.events_durable),
            ("weir_flume_calls_failed_total", "Calls answered FAILED (store failed or the node was stopping).", &self.calls_failed),
            ("weir_flume_error_replies_total", "Calls answered with an Avro error (unknown message, bad parameters, too many events).", &self.error_replies),
            ("weir_flume_malformed_closed_total", "Connections closed for a malformed frame, handshake or compressed stream.", &self.malformed_closed),
            ("weir_flume_idle_closed_total", "Connections closed by idle_timeout_ms.", &self.idle_closed),
        ] {
            out(Stat::counter(name, help, v.load(Relaxed)));
        }
        self.connections.report(&LISTENER_NAMES, out);
        out(Stat::gauge(
            "weir_flume_connections_active",
            "Connections open now.",
            self.connections_active.load(Relaxed),
        ));
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn every_counter_is_exported() {
        let s = FlumeSourceStats::default();
        let missing = weir_receiver::unreported_fields(&format!("{s:?}"), &s);
        assert!(missing.is_empty(), "counted, not exported: {missing:?}");
    }
}
