//! Replicated acknowledgements: a block is acknowledged only once it is fsynced in the local WAL
//! **and** durable on a replica that outlives the machine, so that a node started with the same
//! `node_id` on a new machine (an empty data directory) gives back every acknowledged record.
//!
//! # What the replica holds
//! A log of *entries*, appended in order by the one process that owns the `node_id` (its
//! *epoch*). Each entry carries:
//! - the blocks of one WAL group commit (their WAL record bytes), numbered consecutively;
//! - the batches allocated since the last entry, each as a range of block numbers (batches take
//!   every durable block in log order, so a range says exactly which blocks a batch has) and
//!   its direct sources' offset ranges;
//! - the time through which batches are complete.
//!
//! A *snapshot* entry, written by every process when it takes the `node_id` over, restates the
//! whole state that recovery needs (the blocks of incomplete batches and of no batch yet, the
//! incomplete allocations, the completed time) and numbers the blocks afresh: everything before
//! it is superseded and trimmed. Entries before the first block any incomplete batch (or no
//! batch) needs, and with no allocation of an incomplete batch, are trimmed as batches complete.
//!
//! # Ownership and fencing
//! Taking a `node_id` over raises the epoch in the replica; the previous owner's next write
//! fails ([`ReplicaError::Fenced`]) and that process acknowledges nothing more. Everything it did
//! acknowledge was written before the fence, so the new owner reads it back.
//!
//! # Format of an entry
//! `WEIRREP1`, CRC-32 (little-endian) of everything after it, the length of the metadata (u32
//! LE), the metadata (postcard: [`EntryMeta`]), then the blocks back to back (lengths in the
//! metadata).

pub mod object_store;
pub(crate) mod restore;
pub(crate) mod stage;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use weir_receiver::{ConfigError, OffsetRange};

use crate::tracker::DirectRange;

pub use self::object_store::{ObjectStoreConfig, ObjectStoreReplica};

const MAGIC: &[u8; 8] = b"WEIRREP1";

/// Where acknowledged blocks are replicated (`[engine.replication]`, off when absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ReplicationConfig {
    /// S3-compatible object storage (see [`ObjectStoreConfig`]).
    ObjectStore(ObjectStoreConfig),
    /// A Kafka topic (see [`KafkaReplicaConfig`]; implemented by `weir-kafka`).
    Kafka(KafkaReplicaConfig),
}

/// `[engine.replication]` with `kind = "kafka"`: entries are appended to a topic of their own,
/// one Kafka transaction each, by a transactional producer with `transactional.id =
/// weir-replica-<node_id>` (so that a new owner's `init_transactions` fences the previous one).
/// The engine does not link librdkafka: `weir_kafka::KafkaReplica` implements it, and
/// `receiver-node` wires it in (with the library, pass it to
/// [`StreamingContext::with_replica`](crate::StreamingContext::with_replica)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaReplicaConfig {
    /// `bootstrap.servers`. Required.
    pub bootstrap_servers: String,
    /// The topic, used by this node alone (its partition 0). Default
    /// `weir-replica.<node_id>`. Created if missing with `replication_factor` replicas,
    /// `min.insync.replicas = 2` and no time or size retention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Replicas of a topic this node creates. Default 3.
    pub replication_factor: i32,
    /// Start even if the topic has fewer than 2 replicas or `min.insync.replicas` below 2
    /// (then one broker's loss can lose acknowledged records). Default false.
    pub allow_unreplicated: bool,
    /// How long a replica write (one transaction) may take before it is retried, ms. Default
    /// 10000.
    pub request_timeout_ms: u64,
    /// librdkafka producer properties passed through (security, SASL, SSL, ...).
    /// `transactional.id`, `enable.idempotence` and `acks` are set by weir.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaReplicaConfig {
    fn default() -> Self {
        KafkaReplicaConfig {
            bootstrap_servers: String::new(),
            topic: None,
            replication_factor: 3,
            allow_unreplicated: false,
            request_timeout_ms: 10_000,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaReplicaConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// The first problem, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.is_empty() {
            return Err(ConfigError::new("bootstrap_servers", "is required"));
        }
        if self.replication_factor < 1 {
            return Err(ConfigError::new("replication_factor", "must be at least 1"));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::new(
                "request_timeout_ms",
                "must be greater than 0",
            ));
        }
        for k in [
            "transactional.id",
            "enable.idempotence",
            "acks",
            "bootstrap.servers",
        ] {
            if self.properties.contains_key(k) {
                return Err(ConfigError::new(
                    format!("properties.{k}"),
                    "is set by weir for the replica's transactions",
                ));
            }
        }
        Ok(())
    }

    /// The topic for `node_id`.
    #[must_use]
    pub fn topic_for(&self, node_id: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("weir-replica.{node_id}"))
    }
}

impl ReplicationConfig {
    /// Checks every field; the message names the field.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ReplicationConfig::ObjectStore(c) => c.validate(),
            ReplicationConfig::Kafka(c) => c.validate(),
        }
    }

    /// The replica for `node_id`.
    ///
    /// # Errors
    /// A configuration the client refuses (a malformed endpoint).
    pub fn open(&self, node_id: &str) -> Result<Arc<dyn Replica>, ConfigError> {
        match self {
            ReplicationConfig::ObjectStore(c) => {
                Ok(Arc::new(ObjectStoreReplica::from_config(c, node_id)?))
            }
            ReplicationConfig::Kafka(_) => Err(ConfigError::new(
                "kind",
                "\"kafka\" is implemented by weir-kafka (weir_kafka::KafkaReplica): pass one to \
                 StreamingContext::with_replica (receiver-node does)",
            )),
        }
    }
}

/// Why a replica operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// Another process took the `node_id` over: this one must acknowledge nothing more.
    #[error("fenced: node_id {node_id} was taken over by another process (epoch {new_epoch}; this process had epoch {our_epoch})")]
    Fenced {
        /// The `node_id`.
        node_id: String,
        /// The new owner's epoch.
        new_epoch: u64,
        /// This process's epoch.
        our_epoch: u64,
    },
    /// The replica cannot be reached or refused the request: retried.
    #[error("{0}")]
    Unavailable(String),
    /// The replica holds something this process cannot use (a damaged entry, a gap).
    #[error("the replica is damaged: {0}")]
    Damaged(String),
    /// The replica is not fit to hold acknowledgements (too few replicas, a compacted topic):
    /// the node refuses to start.
    #[error("{0}")]
    Refused(String),
}

/// A boxed future of a replica operation.
pub type ReplicaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ReplicaError>> + Send + 'a>>;

/// Who owns a `node_id` in the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Raised by every take-over.
    pub epoch: u64,
    /// The data directory instance token of the owner (kept by adoption, so that destinations
    /// claimed by the node's instance admit the adopting node).
    pub instance: String,
}

/// What taking a `node_id` over found.
#[derive(Debug)]
pub struct TakenOver {
    /// The epoch now owned.
    pub epoch: u64,
    /// Every entry in the replica, in order (entries before a snapshot included).
    pub entries: Vec<Bytes>,
}

/// A replica of one node's acknowledged blocks (see the module docs). Implementations: object
/// storage ([`ObjectStoreReplica`]).
pub trait Replica: Send + Sync + std::fmt::Debug + 'static {
    /// Where the replica is, for logs and errors.
    fn describe(&self) -> String;

    /// The current owner, if the `node_id` was ever owned.
    fn owner(&self) -> ReplicaFuture<'_, Option<Owner>>;

    /// Takes the `node_id` over with `instance`, fencing the previous owner: raises the epoch
    /// (calling `before` with the new epoch first, so that the caller can record it locally),
    /// then returns every entry the previous owners appended.
    fn take_over<'a>(
        &'a self,
        instance: &'a str,
        before: &'a (dyn Fn(u64) -> std::io::Result<()> + Send + Sync),
    ) -> ReplicaFuture<'a, TakenOver>;

    /// Appends one entry after every earlier one; returns its position (increasing).
    /// [`ReplicaError::Fenced`] if another process took the `node_id` over.
    fn append(&self, entry: Bytes) -> ReplicaFuture<'_, u64>;

    /// Deletes the entries before position `before`; returns how many.
    fn trim(&self, before: u64) -> ReplicaFuture<'_, u64>;
}

/// A direct source's offset range as the replica records it: (source, stream, partition, from,
/// until).
pub(crate) type StoredRange = (String, String, i32, u64, u64);

/// A batch allocation as the replica records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Allocation {
    pub(crate) time: u64,
    /// Block numbers `start..end`.
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Direct sources' ranges: (source, stream, partition, from, until).
    pub(crate) direct: Vec<StoredRange>,
}

impl Allocation {
    pub(crate) fn direct_ranges(&self) -> Vec<DirectRange> {
        self.direct
            .iter()
            .map(|(source, stream, partition, from, until)| DirectRange {
                source: Arc::from(source.as_str()),
                range: OffsetRange {
                    stream: Arc::from(stream.as_str()),
                    partition: *partition,
                    from: *from,
                    until: *until,
                },
            })
            .collect()
    }

    pub(crate) fn encode_direct(ranges: &[DirectRange]) -> Vec<StoredRange> {
        ranges
            .iter()
            .map(|d| {
                (
                    d.source.to_string(),
                    d.range.stream.to_string(),
                    d.range.partition,
                    d.range.from,
                    d.range.until,
                )
            })
            .collect()
    }
}

/// An entry's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryMeta {
    pub(crate) epoch: u64,
    /// Restates the whole state: entries before it are superseded.
    pub(crate) snapshot: bool,
    /// The number of the first block.
    pub(crate) first_block: u64,
    pub(crate) block_lens: Vec<u32>,
    pub(crate) allocations: Vec<Allocation>,
    pub(crate) completed_through: Option<u64>,
}

/// A decoded entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    pub(crate) meta: EntryMeta,
    pub(crate) blocks: Vec<Bytes>,
}

impl Entry {
    pub(crate) fn encode(&self) -> Bytes {
        let meta = postcard::to_stdvec(&self.meta).expect("entry metadata is serialisable");
        let blocks: usize = self.blocks.iter().map(Bytes::len).sum();
        let mut b = BytesMut::with_capacity(16 + meta.len() + blocks);
        b.put_slice(MAGIC);
        b.put_u32_le(0);
        b.put_u32_le(meta.len() as u32);
        b.put_slice(&meta);
        for block in &self.blocks {
            b.put_slice(block);
        }
        let crc = crc32fast::hash(&b[12..]);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        b.freeze()
    }

    /// Decodes an entry; `None` for something that is not an entry (a fence marker).
    pub(crate) fn decode(bytes: &Bytes) -> Result<Option<Entry>, String> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[12..]) != crc {
            return Err("checksum mismatch".into());
        }
        let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let meta_end = 16usize
            .checked_add(len)
            .filter(|e| *e <= bytes.len())
            .ok_or("metadata length beyond the entry")?;
        let meta: EntryMeta =
            postcard::from_bytes(&bytes[16..meta_end]).map_err(|e| format!("metadata: {e}"))?;
        let mut at = meta_end;
        let mut blocks = Vec::with_capacity(meta.block_lens.len());
        for l in &meta.block_lens {
            let end = at + *l as usize;
            if end > bytes.len() {
                return Err("block lengths beyond the entry".into());
            }
            blocks.push(bytes.slice(at..end));
            at = end;
        }
        if at != bytes.len() {
            return Err("bytes after the last block".into());
        }
        Ok(Some(Entry { meta, blocks }))
    }
}

/// What the replica says recovery needs: the state as of its last entry.
#[derive(Debug, Default)]
pub(crate) struct ReplicaState {
    pub(crate) completed_through: Option<u64>,
    /// Incomplete batches: their blocks (in order) and direct ranges.
    pub(crate) batches: BTreeMap<u64, (Vec<Bytes>, Vec<DirectRange>)>,
    /// Blocks of no batch yet, in order.
    pub(crate) unallocated: Vec<Bytes>,
}

impl ReplicaState {
    /// Rebuilds the state from the entries in order (see the module docs).
    pub(crate) fn rebuild(entries: &[Bytes]) -> Result<ReplicaState, ReplicaError> {
        let mut decoded = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match Entry::decode(e) {
                Ok(Some(d)) => decoded.push(d),
                Ok(None) => {}
                Err(why) => return Err(ReplicaError::Damaged(format!("entry {i}: {why}"))),
            }
        }
        let from = decoded.iter().rposition(|e| e.meta.snapshot).unwrap_or(0);
        let decoded = &decoded[from..];
        let mut blocks: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut allocations: BTreeMap<u64, Allocation> = BTreeMap::new();
        let mut completed = None;
        let mut next: Option<u64> = None;
        for e in decoded {
            let m = &e.meta;
            if !e.blocks.is_empty() {
                // An entry may be there twice: a write that failed after reaching the replica
                // is written again (a Kafka replica reads aborted transactions too). Its
                // blocks are the same; only a gap is damage.
                if let Some(n) = next {
                    if m.first_block > n {
                        return Err(ReplicaError::Damaged(format!(
                            "blocks {n}..{} are missing",
                            m.first_block
                        )));
                    }
                }
                for (i, b) in e.blocks.iter().enumerate() {
                    blocks.insert(m.first_block + i as u64, b.clone());
                }
                let end = m.first_block + e.blocks.len() as u64;
                next = Some(next.map_or(end, |n| n.max(end)));
            }
            for a in &m.allocations {
                allocations.insert(a.time, a.clone());
            }
            completed = completed.max(m.completed_through);
        }
        let first = blocks.keys().next().copied().unwrap_or(0);
        let allocated_end = allocations.values().map(|a| a.end).max().unwrap_or(first);
        let mut state = ReplicaState {
            completed_through: completed,
            ..ReplicaState::default()
        };
        for (t, a) in allocations {
            if completed.is_some_and(|c| t <= c) {
                continue;
            }
            let mut bs = Vec::new();
            for n in a.start..a.end {
                let b = blocks.get(&n).ok_or_else(|| {
                    ReplicaError::Damaged(format!("block {n} of incomplete batch {t} is missing"))
                })?;
                bs.push(b.clone());
            }
            state.batches.insert(t, (bs, a.direct_ranges()));
        }
        state.unallocated = blocks
            .range(allocated_end..)
            .map(|(_, b)| b.clone())
            .collect();
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(first: u64, blocks: &[&'static str], allocs: &[(u64, u64, u64)]) -> Entry {
        Entry {
            meta: EntryMeta {
                epoch: 1,
                snapshot: false,
                first_block: first,
                block_lens: blocks.iter().map(|b| b.len() as u32).collect(),
                allocations: allocs
                    .iter()
                    .map(|&(time, start, end)| Allocation {
                        time,
                        start,
                        end,
                        direct: vec![],
                    })
                    .collect(),
                completed_through: None,
            },
            blocks: blocks
                .iter()
                .map(|b| Bytes::from_static(b.as_bytes()))
                .collect(),
        }
    }

    #[test]
    fn an_entry_round_trips_and_damage_is_refused() {
        let e = entry(7, &["one", "", "three"], &[(1000, 5, 8)]);
        let bytes = e.encode();
        let d = Entry::decode(&bytes).unwrap().unwrap();
        assert_eq!(d.meta, e.meta);
        assert_eq!(d.blocks, e.blocks);
        let mut bad = bytes.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(Entry::decode(&Bytes::from(bad)).is_err());
        assert!(Entry::decode(&Bytes::from_static(b"fence"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_state_is_the_incomplete_batches_and_the_unallocated_blocks_since_the_last_snapshot() {
        let mut old = entry(0, &["stale"], &[]);
        old.meta.snapshot = true;
        let mut snap = entry(0, &["a", "b"], &[(1000, 0, 1)]);
        snap.meta.snapshot = true;
        let e1 = entry(2, &["c"], &[(2000, 1, 3)]);
        let mut e2 = entry(3, &["d"], &[]);
        e2.meta.completed_through = Some(1000);
        let all: Vec<Bytes> = [old, snap, e1, e2].iter().map(Entry::encode).collect();
        let s = ReplicaState::rebuild(&all).unwrap();
        assert_eq!(s.completed_through, Some(1000));
        assert_eq!(s.batches.keys().copied().collect::<Vec<_>>(), vec![2000]);
        assert_eq!(s.batches[&2000].0, vec![Bytes::from("b"), Bytes::from("c")]);
        assert_eq!(s.unallocated, vec![Bytes::from("d")]);

        // A gap in the block numbers is damage, not silently fewer records.
        let gap: Vec<Bytes> = [entry(0, &["a"], &[]), entry(2, &["c"], &[])]
            .iter()
            .map(Entry::encode)
            .collect();
        assert!(matches!(
            ReplicaState::rebuild(&gap),
            Err(ReplicaError::Damaged(_))
        ));
    }

    #[test]
    fn an_entry_written_twice_counts_once() {
        let e1 = entry(0, &["a", "b"], &[(1000, 0, 1)]);
        let e2 = entry(2, &["c"], &[]);
        let all: Vec<Bytes> = [&e1, &e1, &e2, &e2].iter().map(|e| e.encode()).collect();
        let s = ReplicaState::rebuild(&all).unwrap();
        assert_eq!(s.batches[&1000].0, vec![Bytes::from("a")]);
        assert_eq!(s.unallocated, vec![Bytes::from("b"), Bytes::from("c")]);
    }
}
