//! Counters of a [`FlumePullReceiver`](crate::FlumePullReceiver).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
