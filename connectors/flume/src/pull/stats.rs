//! Counters of a [`FlumePullReceiver`](crate::FlumePullReceiver).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use weir_receiver::{ConnectorStats, Stat};

/// Counters of one pull receiver, shared by its workers; they live as long as the receiver
/// value, across restarts of its `run`.
#[derive(Debug, Default)]
pub struct FlumePullStats {
    /// Connections made (handshake included in the first call).
    pub connects: AtomicU64,
    /// Connection attempts or connections that failed (each followed by a backoff).
    pub connection_failures: AtomicU64,
    /// Workers connected now.
    pub workers_connected: AtomicU64,
    /// Batches with events received.
    pub batches: AtomicU64,
    /// Events received (handed to `store()`).
    pub events: AtomicU64,
    /// Body bytes of those events.
    pub bytes: AtomicU64,
    /// Batches acknowledged (`ack` after they were durable).
    pub acks: AtomicU64,
    /// Events acknowledged.
    pub events_acked: AtomicU64,
    /// Batches `nack`ed (storing failed or the node stopped first).
    pub nacks: AtomicU64,
    /// Error batches (`errorMsg` set; never acknowledged).
    pub error_batches: AtomicU64,
    /// Empty batches.
    pub empty_batches: AtomicU64,
}

impl FlumePullStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

impl ConnectorStats for FlumePullStats {
    fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
        for (name, help, v) in [
            (
                "weir_flume_pull_connects_total",
                "Connections made to pull sinks.",
                &self.connects,
            ),
            (
                "weir_flume_pull_connection_failures_total",
                "Connection attempts or connections that failed (each followed by a backoff).",
                &self.connection_failures,
            ),
            (
                "weir_flume_pull_batches_total",
                "Batches with events received.",
                &self.batches,
            ),
            (
                "weir_flume_pull_events_total",
                "Events received and handed to store().",
                &self.events,
            ),
            (
                "weir_flume_pull_bytes_total",
                "Body bytes of those events.",
                &self.bytes,
            ),
            (
                "weir_flume_pull_acks_total",
                "Batches acknowledged once durable.",
                &self.acks,
            ),
            (
                "weir_flume_pull_events_acked_total",
                "Events acknowledged once durable.",
                &self.events_acked,
            ),
            (
                "weir_flume_pull_nacks_total",
                "Batches nacked (storing failed or the node was stopping).",
                &self.nacks,
            ),
            (
                "weir_flume_pull_error_batches_total",
                "Error batches received (never acknowledged).",
                &self.error_batches,
            ),
            (
                "weir_flume_pull_empty_batches_total",
                "Empty batches received.",
                &self.empty_batches,
            ),
        ] {
            out(Stat::counter(name, help, v.load(Relaxed)));
        }
        out(Stat::gauge(
            "weir_flume_pull_workers_connected",
            "Workers connected to a pull sink now.",
            self.workers_connected.load(Relaxed),
        ));
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn every_counter_is_exported() {
        let s = FlumePullStats::default();
        let missing = weir_receiver::unreported_fields(&format!("{s:?}"), &s);
        assert!(missing.is_empty(), "counted, not exported: {missing:?}");
    }
}
