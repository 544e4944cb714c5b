//! [`RecordingHost`]: a [`ReceiverHost`] for receiver tests, standing in for the engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use weir_receiver::{lock, Checkpoint, ReceiverHost, Record, StoreError, StoreFuture, Stored};

/// Decides whether one record makes its whole `store()` call fail.
type RecordFilter = Box<dyn Fn(&Record) -> bool + Send + Sync>;

/// A [`ReceiverHost`] that records every `store()` call and answers it as the test chose.
///
/// * **When a call resolves**: at once ([`RecordingHost::new`]); `delay` after it was made
///   ([`RecordingHost::with_delay`], [`RecordingHost::set_delay`], or for one call
///   [`RecordingHost::delay_call`]), concurrently like blocks cut on a timer; or only once released
///   ([`RecordingHost::holding`], then [`RecordingHost::release`] /
///   [`RecordingHost::release_all`]). A held call resolves once released and its delay is over.
/// * **Whether it fails**: every call ([`RecordingHost::failing`], [`RecordingHost::fail_all`]),
///   call number `n` ([`RecordingHost::fail_call`]), or any call holding a record that matches a
///   filter ([`RecordingHost::fail_if`]), each with the given [`StoreError`]. What fails is decided
///   when the call is made; a failed call's records are received but never durable.
/// * **What it saw**: the records of every call in call order ([`RecordingHost::received`]), those
///   of the calls that resolved `Ok` in resolution order ([`RecordingHost::durable`]; they are
///   recorded before the future returns), counts of calls, confirmed records and the most calls
///   outstanding at once, and every [`ReceiverHost::report_error`] message
///   ([`RecordingHost::errors`]).
/// * **Its checkpoint**: what [`RecordingHost::set_checkpoint`] set, raised by the position of every
///   durable record, as the engine's checkpoint is (so a receiver run again on the same host
///   resumes after what it stored).
///
/// Constructors return an `Arc`, which is what [`weir_receiver::ReceiverContext::new`] takes.
#[derive(Default)]
pub struct RecordingHost(Arc<State>);

#[derive(Default)]
struct State {
    calls: AtomicU64,
    received: Mutex<Vec<Record>>,
    durable: Mutex<Vec<Record>>,
    confirmed: AtomicU64,
    outstanding: AtomicU64,
    max_outstanding: AtomicU64,
    errors: Mutex<Vec<String>>,
    checkpoint: Mutex<Checkpoint>,
    delay: Mutex<Duration>,
    call_delays: Mutex<HashMap<u64, Duration>>,
    hold: AtomicBool,
    /// Calls `0..released` may resolve (when holding).
    released: watch::Sender<u64>,
    fail_all: Mutex<Option<StoreError>>,
    fail_calls: Mutex<HashMap<u64, StoreError>>,
    fail_if: Mutex<Vec<(RecordFilter, StoreError)>>,
}

impl RecordingHost {
    /// Every call resolves `Ok` at once.
    pub fn new() -> Arc<Self> {
        Arc::new(RecordingHost::default())
    }

    /// Every call resolves `delay` after it was made.
    pub fn with_delay(delay: Duration) -> Arc<Self> {
        let h = RecordingHost::new();
        h.set_delay(delay);
        h
    }

    /// Calls resolve only once released with [`RecordingHost::release`] or
    /// [`RecordingHost::release_all`].
    pub fn holding() -> Arc<Self> {
        let h = RecordingHost::new();
        h.0.hold.store(true, SeqCst);
        h
    }

    /// Every call fails with `error`.
    pub fn failing(error: StoreError) -> Arc<Self> {
        let h = RecordingHost::new();
        h.fail_all(error);
        h
    }

    /// Calls made from now on resolve `delay` after they were made.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.0.delay) = delay;
    }

    /// Call number `id` (counting from 0) resolves `delay` after it was made, whatever the
    /// delay of the others.
    pub fn delay_call(&self, id: u64, delay: Duration) {
        lock(&self.0.call_delays).insert(id, delay);
    }

    /// Lets calls `0..calls` resolve (in whatever order the receiver polls them).
    pub fn release(&self, calls: u64) {
        self.0.released.send_modify(|r| *r = (*r).max(calls));
    }

    /// Lets every call resolve, including those made from now on.
    pub fn release_all(&self) {
        self.release(u64::MAX);
    }

    /// Call number `id` (counting from 0) fails with `error`.
    pub fn fail_call(&self, id: u64, error: StoreError) {
        lock(&self.0.fail_calls).insert(id, error);
    }

    /// Calls made from now on that hold a record matching `filter` fail with `error`.
    pub fn fail_if(
        &self,
        filter: impl Fn(&Record) -> bool + Send + Sync + 'static,
        error: StoreError,
    ) {
        lock(&self.0.fail_if).push((Box::new(filter), error));
    }

    /// Calls made from now on fail with `error`.
    pub fn fail_all(&self, error: StoreError) {
        *lock(&self.0.fail_all) = Some(error);
    }

    /// Sets the checkpoint the host reports (before the positions of durable records raise it),
    /// as if blocks written before a restart held it.
    pub fn set_checkpoint(&self, checkpoint: Checkpoint) {
        *lock(&self.0.checkpoint) = checkpoint;
    }

    /// Payloads handed to `store()` (lossy UTF-8), in call order, failed calls included.
    pub fn received(&self) -> Vec<String> {
        payloads(&lock(&self.0.received))
    }

    /// Records handed to `store()`, in call order, failed calls included.
    pub fn received_records(&self) -> Vec<Record> {
        lock(&self.0.received).clone()
    }

    /// How many records were handed to `store()`.
    pub fn received_count(&self) -> usize {
        lock(&self.0.received).len()
    }

    /// Payloads (lossy UTF-8) of the calls that resolved `Ok`, in resolution order.
    pub fn durable(&self) -> Vec<String> {
        payloads(&lock(&self.0.durable))
    }

    /// Records of the calls that resolved `Ok`, in resolution order.
    pub fn durable_records(&self) -> Vec<Record> {
        lock(&self.0.durable).clone()
    }

    /// How many records are durable (as [`RecordingHost::confirmed`], as a `usize`).
    pub fn durable_count(&self) -> usize {
        lock(&self.0.durable).len()
    }

    /// How many `store()` calls were made.
    pub fn calls(&self) -> u64 {
        self.0.calls.load(SeqCst)
    }

    /// Records whose call resolved `Ok` (counted before the future returns).
    pub fn confirmed(&self) -> u64 {
        self.0.confirmed.load(SeqCst)
    }

    /// Calls made and neither resolved nor dropped yet.
    pub fn outstanding(&self) -> u64 {
        self.0.outstanding.load(SeqCst)
    }

    /// The most calls that were outstanding at the same time.
    pub fn max_outstanding(&self) -> u64 {
        self.0.max_outstanding.load(SeqCst)
    }

    /// Every message given to [`ReceiverHost::report_error`], in order.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.0.errors).clone()
    }

    /// The error call `id` with `records` fails with, if any.
    fn failure(&self, id: u64, records: &[Record]) -> Option<StoreError> {
        let s = &self.0;
        if let Some(e) = lock(&s.fail_all).clone() {
            return Some(e);
        }
        if let Some(e) = lock(&s.fail_calls).get(&id) {
            return Some(e.clone());
        }
        lock(&s.fail_if)
            .iter()
            .find(|(filter, _)| records.iter().any(filter))
            .map(|(_, e)| e.clone())
    }
}

fn payloads(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

/// One outstanding call: counted down when it resolves or its future is dropped.
struct Outstanding(Arc<State>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, SeqCst);
    }
}

impl ReceiverHost for RecordingHost {
    fn store(&self, records: Vec<Record>) -> StoreFuture {
        let state = self.0.clone();
        let id = state.calls.fetch_add(1, SeqCst);
        lock(&state.received).extend(records.iter().cloned());
        let now = state.outstanding.fetch_add(1, SeqCst) + 1;
        state.max_outstanding.fetch_max(now, SeqCst);
        let outstanding = Outstanding(state.clone());
        let fail = self.failure(id, &records);
        let delay = lock(&state.call_delays)
            .get(&id)
            .copied()
            .unwrap_or_else(|| *lock(&state.delay));
        let due = tokio::time::Instant::now() + delay;
        let mut released = state.hold.load(SeqCst).then(|| state.released.subscribe());
        StoreFuture::new(async move {
            if let Some(rx) = &mut released {
                // An error means the sender is gone, which it cannot be while `state` lives.
                let _ = rx.wait_for(|r| *r > id).await;
            }
            if !delay.is_zero() {
                tokio::time::sleep_until(due).await;
            }
            drop(outstanding);
            if let Some(e) = fail {
                return Err(e);
            }
            let n = records.len();
            lock(&state.durable).extend(records);
            state.confirmed.fetch_add(n as u64, SeqCst);
            Ok(Stored {
                records: n,
                block: None,
            })
        })
    }

    fn report_error(&self, message: &str) {
        eprintln!("reported: {message}");
        lock(&self.0.errors).push(message.to_string());
    }

    fn checkpoint(&self) -> Checkpoint {
        let mut c = lock(&self.0.checkpoint).clone();
        for r in lock(&self.0.durable).iter() {
            if let Some(p) = &r.position {
                c.observe(p);
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_receiver::Position;

    fn rec(s: &str) -> Record {
        Record::new(s.to_string())
    }

    #[tokio::test]
    async fn calls_are_recorded_failed_held_and_released_as_asked() {
        let h = RecordingHost::holding();
        h.fail_call(1, StoreError::ShuttingDown);
        h.fail_if(
            |r| r.payload.starts_with(b"FAIL"),
            StoreError::Storage("injected failure".into()),
        );
        let a = h.store(vec![rec("a"), rec("b")]);
        let b = h.store(vec![rec("c")]);
        let c = h.store(vec![rec("FAIL-d")]);
        assert_eq!((h.calls(), h.outstanding(), h.max_outstanding()), (3, 3, 3));
        assert_eq!(h.received(), ["a", "b", "c", "FAIL-d"]);
        h.release(2);
        assert_eq!(a.await.unwrap().records, 2);
        assert_eq!(b.await, Err(StoreError::ShuttingDown));
        assert_eq!(h.durable(), ["a", "b"]);
        let held = tokio::time::timeout(Duration::from_millis(50), c).await;
        assert!(held.is_err(), "call 2 was not released");
        assert_eq!(
            (h.confirmed(), h.outstanding()),
            (2, 0),
            "dropped calls count down"
        );
        h.release_all();
        let e = h.store(vec![rec("FAIL-e")]).await.unwrap_err();
        assert_eq!(e.to_string(), "storage failed: injected failure");
        h.store(vec![rec("f")]).await.unwrap();
        assert_eq!(h.durable_count(), 3);
        h.fail_all(StoreError::ShuttingDown);
        assert!(h.store(vec![rec("g")]).await.is_err());
        assert_eq!((h.received_count(), h.calls()), (7, 6));
    }

    #[tokio::test]
    async fn delays_checkpoints_and_errors() {
        let h = RecordingHost::with_delay(Duration::from_millis(30));
        h.delay_call(1, Duration::ZERO);
        let mut cp = Checkpoint::new();
        cp.observe(&Position::sequence("s", 3));
        h.set_checkpoint(cp);
        let slow = h.store(vec![rec("slow").with_position(Position::sequence("s", 9))]);
        h.store(vec![rec("fast")]).await.unwrap();
        assert_eq!(h.durable(), ["fast"]);
        assert_eq!(h.checkpoint().get("s", 0), Some(3));
        slow.await.unwrap();
        assert_eq!(h.durable(), ["fast", "slow"]);
        assert_eq!(h.checkpoint().get("s", 0), Some(9));
        h.report_error("oops");
        assert_eq!(h.errors(), ["oops"]);
        let f = RecordingHost::failing(StoreError::ShuttingDown);
        assert!(f.store(vec![rec("x")]).await.is_err());
        assert_eq!((f.received_count(), f.durable_count()), (1, 0));
    }
}
