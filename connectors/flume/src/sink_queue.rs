//! The pull sink's durable queue: events and acknowledgements in a weir write-ahead log, the
//! transactions in memory.
//!
//! (Over 700 lines with its tests, which replay the queue on the simulated disk next to the
//! code they check.)
//!
//! Log records (a version byte, then `postcard`): `Events { first, events }` — events with the
//! consecutive ids `first..`, appended (and fsynced) before a push is answered `OK`; `Acked {
//! ranges }` — ids whose transaction was committed. On open the log is replayed: every event
//! without an `Acked` record is served again (transactions open at a crash are rolled back).
//! Whole segments are deleted once every event in them and in all older segments is acked.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sink_server::{BoxFuture, PullQueue};
use crate::spark::EventBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use weir_receiver::{ConfigError, Header, Record, StoreError};

use weir_wal::{CleanupThreshold, Wal, WalPosition};

const VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct StoredEvent {
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
enum Entry {
    Events {
        first: u64,
        events: Vec<StoredEvent>,
    },
    Acked {
        ranges: Vec<(u64, u64)>,
    },
}

fn encode(entry: &Entry) -> Result<Vec<u8>, String> {
    let mut out = vec![VERSION];
    out.extend(postcard::to_stdvec(entry).map_err(|e| e.to_string())?);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<Entry, String> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown record version {v}")),
        None => Err("empty record".into()),
    }
}

/// Why the queue could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SinkQueueError {
    /// The queue's write-ahead log failed.
    #[error("reading the queue's log: {0}")]
    Wal(#[from] weir_wal::WalError),
    /// A record of the log is not a queue record (another program's log, or a newer format).
    #[error("record at {segment}:{offset} is not a pull-sink queue record: {reason}")]
    Corrupt {
        /// The segment.
        segment: u64,
        /// The record's offset in the segment.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// Settings of the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// A batch not acked within this time is rolled back and served again, ms. Default 60000.
    pub tx_timeout_ms: u64,
    /// How long `getEventBatch` waits for events when none are ready before it answers an
    /// error batch, ms. Default 1000.
    pub empty_wait_ms: u64,
    /// Body and header bytes held (not yet acked) at most; pushes beyond it are answered
    /// `FAILED` (the agent retries). Default 256 MiB.
    pub max_queued_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            tx_timeout_ms: 60_000,
            empty_wait_ms: 1_000,
            max_queued_bytes: 256 << 20,
        }
    }
}

impl QueueConfig {
    /// Checks the fields.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tx_timeout_ms == 0 {
            return Err(ConfigError::new("tx_timeout_ms", "must be at least 1"));
        }
        if self.max_queued_bytes == 0 {
            return Err(ConfigError::new("max_queued_bytes", "must be at least 1"));
        }
        Ok(())
    }
}

/// Counters of the queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Events made durable (pushes answered `OK`).
    pub events_accepted: AtomicU64,
    /// Events whose transaction was committed.
    pub events_acked: AtomicU64,
    /// Events held now (ready or handed out, not acked).
    pub events_queued: AtomicU64,
    /// Transactions rolled back by `nack`.
    pub rollbacks_nack: AtomicU64,
    /// Transactions rolled back by `tx_timeout_ms`.
    pub rollbacks_timeout: AtomicU64,
    /// `ack`/`nack` of unknown or finished sequence numbers (ignored).
    pub ignored: AtomicU64,
    /// Events found again when the queue was opened.
    pub events_recovered: AtomicU64,
    /// 1 while pushes are refused because free space is below the floor (gauge).
    pub below_floor: AtomicU64,
    /// Pushes refused because free space was below the floor (counter).
    pub pushes_refused_floor: AtomicU64,
}

impl weir_receiver::ConnectorStats for QueueStats {
    fn report(&self, out: &mut dyn FnMut(weir_receiver::Stat<'_>)) {
        use weir_receiver::Stat;
        for (name, help, v) in [
            (
                "weir_sink_events_accepted_total",
                "Events made durable (pushes answered OK).",
                &self.events_accepted,
            ),
            (
                "weir_sink_events_acked_total",
                "Events whose transaction was committed.",
                &self.events_acked,
            ),
            (
                "weir_sink_rollbacks_nack_total",
                "Transactions rolled back by nack.",
                &self.rollbacks_nack,
            ),
            (
                "weir_sink_rollbacks_timeout_total",
                "Transactions rolled back by tx_timeout_ms.",
                &self.rollbacks_timeout,
            ),
            (
                "weir_sink_ignored_total",
                "ack/nack of unknown or finished sequence numbers.",
                &self.ignored,
            ),
            (
                "weir_sink_events_recovered_total",
                "Events found again when the queue was opened.",
                &self.events_recovered,
            ),
            (
                "weir_sink_pushes_refused_floor_total",
                "Pushes refused because free space was below the floor.",
                &self.pushes_refused_floor,
            ),
        ] {
            out(Stat::counter(name, help, v.load(Relaxed)));
        }
        out(Stat::gauge(
            "weir_sink_events_queued",
            "Events held now (ready or handed out, not acked).",
            self.events_queued.load(Relaxed),
        ));
        out(Stat {
            name: "weir_waiting_for_space",
            help: "1 while writes at this place wait for disk space (wal: the queue's log; free_space_floor: pushes refused).",
            kind: weir_receiver::StatKind::Gauge,
            labels: &[("place", "free_space_floor")],
            value: self.below_floor.load(Relaxed),
        });
    }
}

/// What a [`SinkQueue`] holds at one moment ([`SinkQueue::occupancy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Events ready to be handed out.
    pub ready: u64,
    /// Transactions handed out and neither acked nor rolled back.
    pub transactions_open: u64,
    /// Events in those transactions (served, not acked).
    pub events_in_transactions: u64,
    /// Payload bytes held (ready or in transactions).
    pub queued_bytes: u64,
}

impl weir_receiver::ConnectorStats for Occupancy {
    fn report(&self, out: &mut dyn FnMut(weir_receiver::Stat<'_>)) {
        use weir_receiver::Stat;
        for (name, help, v) in [
            (
                "weir_sink_events_ready",
                "Events ready to be handed out (not in a transaction).",
                self.ready,
            ),
            (
                "weir_sink_transactions_open",
                "Transactions handed out and neither acked nor rolled back.",
                self.transactions_open,
            ),
            (
                "weir_sink_events_unacked",
                "Events in open transactions (served, not acked).",
                self.events_in_transactions,
            ),
            (
                "weir_sink_queued_bytes",
                "Payload bytes held (ready or in transactions).",
                self.queued_bytes,
            ),
        ] {
            out(Stat::gauge(name, help, v));
        }
    }
}

struct Held {
    id: u64,
    segment: u64,
    record: Record,
}

struct Tx {
    events: Vec<Held>,
    deadline: Instant,
}

struct State {
    next_id: u64,
    ready: BTreeMap<u64, (u64, Record)>,
    txs: HashMap<String, Tx>,
    counter: u64,
    /// Segment → events in it not acked yet (and reservations of appends in flight).
    unacked: BTreeMap<u64, u64>,
    queued_bytes: u64,
}

/// The queue; see the [module documentation](self).
pub struct SinkQueue {
    wal: Wal,
    state: Mutex<State>,
    notify: Notify,
    config: QueueConfig,
    stopping: AtomicBool,
    seq_prefix: String,
    stats: QueueStats,
    /// The free-space floor for pushes (see [`SinkQueue::with_min_free_bytes`]).
    min_free_bytes: u64,
}

impl std::fmt::Debug for SinkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkQueue")
            .field("wal", &self.wal)
            .finish_non_exhaustive()
    }
}

fn size(r: &Record) -> u64 {
    r.size_hint() as u64
}

fn add(map: &mut BTreeMap<u64, u64>, seg: u64, n: u64) {
    *map.entry(seg).or_insert(0) += n;
}

fn sub(map: &mut BTreeMap<u64, u64>, seg: u64, n: u64) {
    if let Some(c) = map.get_mut(&seg) {
        *c = c.saturating_sub(n);
        if *c == 0 {
            map.remove(&seg);
        }
    }
}

impl SinkQueue {
    /// Opens the queue on `wal`, replaying it.
    ///
    /// # Errors
    /// [`SinkQueueError`]: a record that cannot be read or is not a queue record.
    pub fn open(wal: Wal, config: QueueConfig) -> Result<SinkQueue, SinkQueueError> {
        let mut ready = BTreeMap::new();
        let mut unacked = BTreeMap::new();
        let mut next_id = 0;
        for rec in wal.scan(WalPosition::START) {
            let rec = rec?;
            let seg = rec.handle.segment;
            let entry = decode(&rec.payload).map_err(|reason| SinkQueueError::Corrupt {
                segment: rec.handle.segment,
                offset: rec.handle.offset,
                reason,
            })?;
            match entry {
                Entry::Events { first, events } => {
                    for (i, e) in events.into_iter().enumerate() {
                        let record = Record {
                            payload: e.body.into(),
                            headers: e
                                .headers
                                .into_iter()
                                .map(|(name, v)| Header {
                                    name,
                                    value: v.into(),
                                })
                                .collect(),
                            ..Record::default()
                        };
                        let id = first + i as u64;
                        ready.insert(id, (seg, record));
                        add(&mut unacked, seg, 1);
                        next_id = next_id.max(id + 1);
                    }
                }
                Entry::Acked { ranges } => {
                    for (from, until) in ranges {
                        for id in from..until {
                            if let Some((s, _)) = ready.remove(&id) {
                                sub(&mut unacked, s, 1);
                            }
                        }
                    }
                }
            }
        }
        let queued_bytes = ready.values().map(|(_, r)| size(r)).sum();
        let stats = QueueStats::default();
        stats.events_recovered.store(ready.len() as u64, Relaxed);
        stats.events_queued.store(ready.len() as u64, Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let q = SinkQueue {
            wal,
            state: Mutex::new(State {
                next_id,
                ready,
                txs: HashMap::new(),
                counter: 0,
                unacked,
                queued_bytes,
            }),
            notify: Notify::new(),
            config,
            stopping: AtomicBool::new(false),
            seq_prefix: format!("{nanos:x}{:x}-", std::process::id()),
            stats,
            min_free_bytes: 0,
        };
        q.cleanup();
        Ok(q)
    }

    /// Refuses pushes while free space on the log's file system is below the floor (the
    /// smaller of `min_free_bytes` and 5 % of the file system; 0: no floor). Acks are never
    /// refused: recording them is what lets the queue delete segments and free space. Open the
    /// log itself with `min_free_bytes = 0`, or its writer would hold the acks back too.
    #[must_use]
    pub fn with_min_free_bytes(mut self, min_free_bytes: u64) -> Self {
        self.min_free_bytes = min_free_bytes;
        self
    }

    /// 1 while writes of the queue wait for disk space or pushes are refused below the floor.
    pub fn waiting_for_space(&self) -> u64 {
        self.wal.metrics().snapshot().waiting_for_space | self.stats.below_floor.load(Relaxed)
    }

    /// Err with a message while free space is below the floor.
    fn check_floor(&self) -> Result<(), StoreError> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let Ok(Some(space)) = self.wal.space() else {
            return Ok(());
        };
        let floor = weir_wal::space::floor(self.min_free_bytes, space.total);
        if space.available >= floor {
            if self.stats.below_floor.swap(0, Relaxed) == 1 {
                tracing::warn!(
                    available = space.available,
                    floor,
                    "pull sink: free space is above the floor again; accepting pushes"
                );
            }
            return Ok(());
        }
        self.stats.pushes_refused_floor.fetch_add(1, Relaxed);
        if self.stats.below_floor.swap(1, Relaxed) == 0 {
            tracing::error!(
                available = space.available,
                floor,
                "pull sink: free disk space is below the floor (wal.min_free_bytes): pushes are \
                 answered FAILED (senders retry) until space is freed; acks go on"
            );
        }
        Err(StoreError::Storage(format!(
            "the pull sink's disk is below its free-space floor ({} bytes free, floor {floor}); \
             retry later",
            space.available
        )))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        weir_receiver::lock(&self.state)
    }

    /// The counters.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// What the queue holds now (under its lock: a consistent view).
    pub fn occupancy(&self) -> Occupancy {
        let s = self.lock();
        Occupancy {
            ready: s.ready.len() as u64,
            transactions_open: s.txs.len() as u64,
            events_in_transactions: s.txs.values().map(|t| t.events.len() as u64).sum(),
            queued_bytes: s.queued_bytes,
        }
    }

    /// The log.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Stops serving: `getEventBatch` answers error batches, `append` fails.
    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
        self.notify.notify_waiters();
    }

    /// Makes `records` durable in the queue; resolves once they are fsynced.
    ///
    /// # Errors
    /// [`StoreError::ShuttingDown`] after [`SinkQueue::stop`]; [`StoreError::Storage`] when the
    /// queue is full or the log fails.
    pub async fn append(&self, records: Vec<Record>) -> Result<usize, StoreError> {
        let n = records.len() as u64;
        if n == 0 {
            return Ok(0);
        }
        let bytes: u64 = records.iter().map(size).sum();
        self.check_floor()?;
        let (first, reserved, fut) = {
            let mut s = self.lock();
            if self.stopping.load(Relaxed) {
                return Err(StoreError::ShuttingDown);
            }
            if s.queued_bytes + bytes > self.config.max_queued_bytes {
                return Err(StoreError::Storage(format!(
                    "the pull sink's queue is full ({} bytes held, max_queued_bytes = {}); \
                     waiting for receivers to acknowledge",
                    s.queued_bytes, self.config.max_queued_bytes
                )));
            }
            let first = s.next_id;
            let entry = Entry::Events {
                first,
                events: records
                    .iter()
                    .map(|r| StoredEvent {
                        headers: r
                            .headers
                            .iter()
                            .map(|h| (h.name.clone(), h.value.to_vec()))
                            .collect(),
                        body: r.payload.to_vec(),
                    })
                    .collect(),
            };
            let payload = encode(&entry).map_err(StoreError::Storage)?;
            s.next_id += n;
            // The append lands in this segment or a later one: hold it against cleanup.
            let reserved = self.wal.end_position().segment;
            add(&mut s.unacked, reserved, n);
            s.queued_bytes += bytes;
            (first, reserved, self.wal.append(payload))
        };
        let result = fut.await;
        let mut s = self.lock();
        sub(&mut s.unacked, reserved, n);
        match result {
            Ok(handle) => {
                add(&mut s.unacked, handle.segment, n);
                for (i, r) in records.into_iter().enumerate() {
                    s.ready.insert(first + i as u64, (handle.segment, r));
                }
                drop(s);
                self.stats.events_accepted.fetch_add(n, Relaxed);
                self.stats.events_queued.fetch_add(n, Relaxed);
                self.notify.notify_waiters();
                Ok(n as usize)
            }
            Err(e) => {
                s.queued_bytes = s.queued_bytes.saturating_sub(bytes);
                Err(StoreError::Storage(format!("the pull sink's log: {e}")))
            }
        }
    }

    fn rollback(&self, s: &mut State, tx: Tx) {
        for h in tx.events {
            s.ready.insert(h.id, (h.segment, h.record));
        }
        self.notify.notify_waiters();
    }

    /// Rolls back every transaction past its deadline.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        let expired: Vec<String> = s
            .txs
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for seq in expired {
            if let Some(tx) = s.txs.remove(&seq) {
                tracing::info!(
                    seq,
                    events = tx.events.len(),
                    "pull sink: no ack within tx_timeout_ms; rolled back"
                );
                self.stats.rollbacks_timeout.fetch_add(1, Relaxed);
                self.rollback(&mut s, tx);
            }
        }
    }

    fn cleanup(&self) {
        let before = {
            let s = self.lock();
            s.unacked
                .keys()
                .next()
                .copied()
                .unwrap_or_else(|| self.wal.end_position().segment)
        };
        let threshold = CleanupThreshold {
            before: Some(WalPosition {
                segment: before,
                offset: 0,
            }),
            older_than: None,
        };
        if let Err(e) = self.wal.cleanup(threshold) {
            tracing::warn!(error = %e, "pull sink: deleting acknowledged segments failed");
        }
    }

    async fn take(&self, n: usize) -> EventBatch {
        let wait = Duration::from_millis(self.config.empty_wait_ms);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if self.stopping.load(Relaxed) {
                    return EventBatch::error("the pull sink is shutting down");
                }
                if let Some(e) = self.wal.fatal_error() {
                    return EventBatch::error(format!("the pull sink's log failed: {e}"));
                }
                if !s.ready.is_empty() {
                    let ids: Vec<u64> = s.ready.keys().take(n).copied().collect();
                    let events: Vec<Held> = ids
                        .into_iter()
                        .filter_map(|id| {
                            s.ready.remove(&id).map(|(segment, record)| Held {
                                id,
                                segment,
                                record,
                            })
                        })
                        .collect();
                    s.counter += 1;
                    let seq = format!("{}{}", self.seq_prefix, s.counter);
                    let records = events.iter().map(|h| h.record.clone()).collect();
                    let deadline =
                        Instant::now() + Duration::from_millis(self.config.tx_timeout_ms);
                    s.txs.insert(seq.clone(), Tx { events, deadline });
                    return EventBatch {
                        error_msg: String::new(),
                        sequence_number: seq,
                        events: records,
                    };
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return EventBatch::error(format!(
                    "no events within empty_wait_ms = {}",
                    self.config.empty_wait_ms
                ));
            }
        }
    }

    async fn commit(&self, seq: &str) {
        let (tx, fut) = {
            let mut s = self.lock();
            let Some(tx) = s.txs.remove(seq) else {
                self.stats.ignored.fetch_add(1, Relaxed);
                tracing::debug!(
                    seq,
                    "pull sink: ack of an unknown or finished batch ignored"
                );
                return;
            };
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for h in &tx.events {
                match ranges.last_mut() {
                    Some((_, until)) if *until == h.id => *until += 1,
                    _ => ranges.push((h.id, h.id + 1)),
                }
            }
            let fut = encode(&Entry::Acked { ranges }).map(|p| self.wal.append(p));
            (tx, fut)
        };
        let result = match fut {
            Ok(f) => f.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let mut s = self.lock();
        match result {
            Ok(_) => {
                let n = tx.events.len() as u64;
                for h in &tx.events {
                    sub(&mut s.unacked, h.segment, 1);
                    s.queued_bytes = s.queued_bytes.saturating_sub(size(&h.record));
                }
                drop(s);
                self.stats.events_acked.fetch_add(n, Relaxed);
                self.stats.events_queued.fetch_sub(n, Relaxed);
                self.cleanup();
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "pull sink: recording an ack failed; the batch is served again");
                self.rollback(&mut s, tx);
            }
        }
    }

    fn abort(&self, seq: &str) {
        let mut s = self.lock();
        match s.txs.remove(seq) {
            Some(tx) => {
                self.stats.rollbacks_nack.fetch_add(1, Relaxed);
                self.rollback(&mut s, tx);
            }
            None => {
                self.stats.ignored.fetch_add(1, Relaxed);
            }
        }
    }
}

impl PullQueue for SinkQueue {
    fn get_event_batch(&self, n: usize) -> BoxFuture<'_, EventBatch> {
        Box::pin(self.take(n))
    }

    fn ack<'a>(&'a self, seq: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.commit(seq))
    }

    fn nack(&self, seq: &str) {
        self.abort(seq);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn every_counter_is_exported() {
        use weir_receiver::ConnectorStats;
        let s = QueueStats::default();
        let missing = weir_receiver::unreported_fields(&format!("{s:?}"), &s);
        // below_floor is exported as weir_waiting_for_space{place="free_space_floor"}.
        assert_eq!(
            missing,
            ["below_floor"],
            "counted, not exported: {missing:?}"
        );
        let mut seen = false;
        s.report(&mut |st| seen |= st.labels == [("place", "free_space_floor")]);
        assert!(seen);
    }
    use weir_wal::sim::SimStorage;
    use weir_wal::WalConfig;

    fn open(disk: &SimStorage, min_free_bytes: u64) -> Arc<SinkQueue> {
        let config = WalConfig {
            min_free_bytes: 0,
            enospc_max_backoff: Duration::from_millis(20),
            ..WalConfig::default()
        };
        let (wal, _) = Wal::open(Arc::new(disk.clone()), config).unwrap();
        let queue = QueueConfig {
            empty_wait_ms: 50,
            ..QueueConfig::default()
        };
        Arc::new(
            SinkQueue::open(wal, queue)
                .unwrap()
                .with_min_free_bytes(min_free_bytes),
        )
    }

    fn events(from: u32, n: u32) -> Vec<Record> {
        (from..from + n)
            .map(|i| Record::new(format!("event {i}")))
            .collect()
    }

    /// Takes and acks every event served, returning the bodies.
    async fn drain(q: &SinkQueue) -> Vec<String> {
        let mut bodies = Vec::new();
        loop {
            let b = q.get_event_batch(1000).await;
            if !b.error_msg.is_empty() {
                return bodies;
            }
            bodies.extend(
                b.events
                    .iter()
                    .map(|r| String::from_utf8(r.payload.to_vec()).unwrap()),
            );
            q.ack(&b.sequence_number).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enospc_makes_pushes_and_acks_wait_and_loses_nothing_answered_ok() {
        let disk = SimStorage::new();
        let q = open(&disk, 0);
        for i in 0..5 {
            q.append(events(i * 10, 10)).await.unwrap();
        }
        // Serve a batch, then fill the disk: its ack and further pushes wait.
        let served = q.get_event_batch(20).await;
        assert_eq!(served.events.len(), 20);
        disk.set_capacity(Some(disk.used_bytes() + 40));
        let pushes: Vec<_> = (5..15)
            .map(|i| {
                let q = q.clone();
                tokio::spawn(async move { q.append(events(i * 10, 10)).await })
            })
            .collect();
        let ack = {
            let (q, seq) = (q.clone(), served.sequence_number.clone());
            tokio::spawn(async move { q.ack(&seq).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            pushes.iter().all(|p| !p.is_finished()),
            "a push was answered on a full disk"
        );
        assert!(!ack.is_finished(), "an ack was recorded on a full disk");
        assert_eq!(q.waiting_for_space(), 1);
        assert_eq!(q.stats().events_accepted.load(Relaxed), 50);
        // Space back: everything goes through by itself.
        disk.set_capacity(None);
        for p in pushes {
            assert_eq!(p.await.unwrap().unwrap(), 10);
        }
        ack.await.unwrap();
        assert_eq!(q.waiting_for_space(), 0);
        assert_eq!(q.stats().events_acked.load(Relaxed), 20);
        let mut bodies = drain(&q).await;
        bodies.extend(
            served
                .events
                .iter()
                .map(|r| String::from_utf8(r.payload.to_vec()).unwrap()),
        );
        bodies.sort_by_key(|b| b[6..].parse::<u32>().unwrap());
        let want: Vec<String> = (0..150).map(|i| format!("event {i}")).collect();
        assert_eq!(bodies, want, "every event answered OK, once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn below_the_floor_pushes_are_refused_and_acks_still_free_space() {
        let disk = SimStorage::new();
        disk.report_space(true);
        // A 1 MiB disk: the floor is 5 % of it (about 52 KiB).
        disk.set_capacity(Some(1 << 20));
        let q = open(&disk, 256 << 20);
        q.append(events(0, 10)).await.unwrap();
        let served = q.get_event_batch(10).await;
        // A ballast file leaves 16 KiB free: below the floor.
        let ballast = (1 << 20) - disk.used_bytes() - (16 << 10);
        disk.put_file("ballast", &vec![0; ballast as usize]);
        let e = q.append(events(10, 10)).await.unwrap_err().to_string();
        assert!(e.contains("free-space floor"), "{e}");
        assert_eq!(q.waiting_for_space(), 1);
        assert_eq!(q.stats().pushes_refused_floor.load(Relaxed), 1);
        // Acks are not held back by the floor: recording them is what frees space.
        tokio::time::timeout(Duration::from_secs(5), q.ack(&served.sequence_number))
            .await
            .expect("an ack waited below the floor");
        assert_eq!(q.stats().events_acked.load(Relaxed), 10);
        weir_wal::Storage::remove(&disk, "ballast").unwrap();
        q.append(events(10, 10)).await.unwrap();
        assert_eq!(q.waiting_for_space(), 0);
        assert_eq!(drain(&q).await.len(), 10);
    }
}
