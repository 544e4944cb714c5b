//! [`Batch`]: an immutable, partitioned view of the records of one batch interval (or of a window
//! of recent batches). Partitions are blocks; operations process partitions in parallel (rayon),
//! reading each block from the in-memory cache or, when it is gone, from the WAL with checksum
//! verification.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use rayon::prelude::*;
use weir_receiver::Record;

use crate::block::codec::DecodedBlock;
pub use crate::block::BlockErrorKind;
use crate::block::BlockSource;
use crate::tracker::{BlockLocation, BlockRef};

/// A block of the batch could not be read: which batch, which block, what kind of failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch {time}, block {block}: {message}")]
pub struct BatchError {
    /// The batch's time.
    pub time: u64,
    /// Where the block lives.
    pub block: BlockLocation,
    /// What kind of failure.
    pub kind: BlockErrorKind,
    /// What went wrong.
    pub message: String,
}

/// The records of one batch (or window), partitioned by block.
#[derive(Clone)]
pub struct Batch {
    time: u64,
    times: Arc<[u64]>,
    blocks: Arc<[BlockRef]>,
    source: Arc<BlockSource>,
    node_id: Arc<str>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("time", &self.time)
            .field("times", &self.times)
            .field("partitions", &self.blocks.len())
            .field("records", &self.count())
            .finish()
    }
}

impl Batch {
    pub(crate) fn new(
        time: u64,
        times: Arc<[u64]>,
        blocks: Arc<[BlockRef]>,
        source: Arc<BlockSource>,
        node_id: Arc<str>,
    ) -> Self {
        Batch {
            time,
            times,
            blocks,
            source,
            node_id,
        }
    }

    /// The node that runs this batch ([`StreamingConfig::node_id`](crate::StreamingConfig::node_id),
    /// or its default). Batch times coincide across nodes: an output that several nodes may
    /// share must key what it writes by batch time **and** node id, or one node's batch
    /// replaces another's.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The batch time, ms since the Unix epoch (a multiple of the batch interval, normally).
    /// Outputs should key what they write by it: a batch re-run after a crash has the same time
    /// and the same records.
    pub fn time(&self) -> u64 {
        self.time
    }

    /// The batch times this view covers, oldest first: one for a batch, up to N for a window.
    pub fn times(&self) -> &[u64] {
        &self.times
    }

    /// Number of partitions (blocks).
    pub fn num_partitions(&self) -> usize {
        self.blocks.len()
    }

    /// The blocks, in log order.
    pub fn blocks(&self) -> &[BlockRef] {
        &self.blocks
    }

    /// Number of records (from block metadata; reads nothing).
    pub fn count(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.records)).sum()
    }

    /// True if the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    fn load(&self, i: usize) -> Result<DecodedBlock, BatchError> {
        self.source
            .load(&self.blocks[i])
            .map_err(|(kind, message)| BatchError {
                time: self.time,
                block: self.blocks[i].location,
                kind,
                message,
            })
    }

    fn decode_err(&self, i: usize, e: impl std::fmt::Display) -> BatchError {
        BatchError {
            time: self.time,
            block: self.blocks[i].location,
            kind: BlockErrorKind::Corrupt,
            message: e.to_string(),
        }
    }

    /// The records of partition `i`, in the order they were stored.
    ///
    /// # Errors
    /// [`BatchError`] if the block cannot be read.
    ///
    /// # Panics
    /// If `i >= num_partitions()`.
    pub fn partition(&self, i: usize) -> Result<Vec<Record>, BatchError> {
        self.load(i)?.to_vec().map_err(|e| self.decode_err(i, e))
    }

    /// Runs `f` on the records of partition `i`, decoded as it iterates; a record that does not
    /// decode ends the iteration and becomes the error.
    fn with_records<T>(
        &self,
        i: usize,
        f: impl FnOnce(&mut dyn Iterator<Item = Record>) -> T,
    ) -> Result<T, BatchError> {
        let block = self.load(i)?;
        let mut err = None;
        let mut it = block.records().map_while(|r| match r {
            Ok(r) => Some(r),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        let out = f(&mut it);
        drop(it);
        match err {
            Some(e) => Err(self.decode_err(i, e)),
            None => Ok(out),
        }
    }

    /// Runs `f` on each block (partition) and its records, one block after another in log
    /// order, stopping at the first error. Memory holds one block at a time: for outputs.
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read, or `f`'s error.
    pub fn for_each_block<E, F>(&self, mut f: F) -> Result<(), E>
    where
        E: From<BatchError>,
        F: FnMut(&BlockRef, &mut dyn Iterator<Item = Record>) -> Result<(), E>,
    {
        for i in 0..self.blocks.len() {
            self.with_records(i, |it| f(&self.blocks[i], it))??;
        }
        Ok(())
    }

    /// Runs `f` over every partition's records in parallel; results in partition order.
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read.
    pub fn map_partitions<T, F>(&self, f: F) -> Result<Vec<T>, BatchError>
    where
        T: Send,
        F: Fn(&mut dyn Iterator<Item = Record>) -> T + Sync + Send,
    {
        (0..self.blocks.len())
            .into_par_iter()
            .map(|i| self.with_records(i, &f))
            .collect()
    }

    /// Every record, in log order.
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read.
    pub fn collect(&self) -> Result<Vec<Record>, BatchError> {
        Ok(self.map_partitions(|it| it.collect::<Vec<_>>())?.concat())
    }

    /// Applies `f` to every record.
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read.
    pub fn map<T, F>(&self, f: F) -> Result<Partitioned<T>, BatchError>
    where
        T: Send,
        F: Fn(Record) -> T + Sync + Send,
    {
        Ok(Partitioned {
            parts: self.map_partitions(|it| it.map(&f).collect())?,
        })
    }

    /// Keeps the records for which `f` is true.
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read.
    pub fn filter<F>(&self, f: F) -> Result<Partitioned<Record>, BatchError>
    where
        F: Fn(&Record) -> bool + Sync + Send,
    {
        Ok(Partitioned {
            parts: self.map_partitions(|it| it.filter(&f).collect())?,
        })
    }

    /// Maps every record to any number of values.
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read.
    pub fn flat_map<T, I, F>(&self, f: F) -> Result<Partitioned<T>, BatchError>
    where
        T: Send,
        I: IntoIterator<Item = T>,
        F: Fn(Record) -> I + Sync + Send,
    {
        Ok(Partitioned {
            parts: self.map_partitions(|it| it.flat_map(&f).collect())?,
        })
    }

    /// Maps every record to a key and value, and combines the values of each key with `reduce`
    /// (partition by partition in parallel, then across partitions).
    ///
    /// # Errors
    /// [`BatchError`] if a block cannot be read.
    pub fn reduce_by_key<K, V, KV, R>(&self, kv: KV, reduce: R) -> Result<HashMap<K, V>, BatchError>
    where
        K: Eq + Hash + Send,
        V: Send,
        KV: Fn(Record) -> (K, V) + Sync + Send,
        R: Fn(V, V) -> V + Sync + Send,
    {
        let parts = self.map_partitions(|it| combine(it.map(&kv), &reduce))?;
        Ok(merge(parts, &reduce))
    }
}

fn combine<K: Eq + Hash, V>(
    it: impl Iterator<Item = (K, V)>,
    reduce: &(impl Fn(V, V) -> V + ?Sized),
) -> HashMap<K, V> {
    let mut m: HashMap<K, V> = HashMap::new();
    for (k, v) in it {
        match m.remove(&k) {
            Some(old) => m.insert(k, reduce(old, v)),
            None => m.insert(k, v),
        };
    }
    m
}

fn merge<K: Eq + Hash, V>(
    parts: Vec<HashMap<K, V>>,
    reduce: &(impl Fn(V, V) -> V + ?Sized),
) -> HashMap<K, V> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_default();
    for m in it {
        acc = combine(acc.into_iter().chain(m), reduce);
    }
    acc
}

/// The result of a transformation: values, still partitioned (partition `i` came from block `i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioned<T> {
    parts: Vec<Vec<T>>,
}

impl<T: Send + Sync> Partitioned<T> {
    /// Wraps partitions.
    pub fn from_partitions(parts: Vec<Vec<T>>) -> Self {
        Partitioned { parts }
    }

    /// The partitions.
    pub fn partitions(&self) -> &[Vec<T>] {
        &self.parts
    }

    /// Number of values.
    pub fn count(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    /// Every value, partition by partition.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.parts.iter().flatten()
    }

    /// Every value, partition by partition.
    pub fn collect(self) -> Vec<T> {
        self.parts.into_iter().flatten().collect()
    }

    /// Applies `f` to every value (partitions in parallel).
    pub fn map<U: Send, F: Fn(T) -> U + Sync + Send>(self, f: F) -> Partitioned<U> {
        Partitioned {
            parts: self
                .parts
                .into_par_iter()
                .map(|p| p.into_iter().map(&f).collect())
                .collect(),
        }
    }

    /// Keeps the values for which `f` is true.
    pub fn filter<F: Fn(&T) -> bool + Sync + Send>(self, f: F) -> Partitioned<T> {
        Partitioned {
            parts: self
                .parts
                .into_par_iter()
                .map(|p| p.into_iter().filter(&f).collect())
                .collect(),
        }
    }

    /// Maps every value to any number of values.
    pub fn flat_map<U: Send, I: IntoIterator<Item = U>, F: Fn(T) -> I + Sync + Send>(
        self,
        f: F,
    ) -> Partitioned<U> {
        Partitioned {
            parts: self
                .parts
                .into_par_iter()
                .map(|p| p.into_iter().flat_map(&f).collect())
                .collect(),
        }
    }
}

impl<K: Eq + Hash + Send + Sync, V: Send + Sync> Partitioned<(K, V)> {
    /// Combines the values of each key with `reduce`.
    pub fn reduce_by_key<R: Fn(V, V) -> V + Sync + Send>(self, reduce: R) -> HashMap<K, V> {
        let parts: Vec<HashMap<K, V>> = self
            .parts
            .into_par_iter()
            .map(|p| combine(p.into_iter(), &reduce))
            .collect();
        merge(parts, &reduce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::codec::BlockBuilder;
    use crate::block::BlockCache;
    use crate::stream::Metrics;
    use crate::wal::sim::SimStorage;
    use crate::wal::{Wal, WalConfig};
    use weir_receiver::Checkpoint;

    /// A batch of one block in a WAL on the simulated disk (not cached, so reads go to the
    /// WAL), and one in-memory block that was never pinned.
    #[test]
    fn a_block_that_cannot_be_read_is_a_typed_error_naming_batch_and_block() {
        let disk = Arc::new(SimStorage::new());
        let (wal, _) = Wal::open(disk.clone(), WalConfig::default()).unwrap();
        let mut b = BlockBuilder::with_capacity(64);
        b.push(&Record::new("hello"));
        let handle = wal
            .append(b.finish("r", &Checkpoint::new(), 0))
            .wait()
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let cache = Arc::new(BlockCache::new(0, metrics.clone()));
        let source = Arc::new(BlockSource::new(Arc::new(wal), cache, metrics));
        let blocks: Arc<[BlockRef]> = Arc::from(vec![
            BlockRef::in_wal(handle, 1, Arc::from("r")),
            BlockRef {
                location: BlockLocation::Memory { id: 7 },
                records: 1,
                receiver: Arc::from("d"),
            },
        ]);
        let batch = Batch::new(1000, Arc::from([1000]), blocks, source, Arc::from("n"));
        assert_eq!(batch.partition(0).unwrap().len(), 1);
        let gone = batch.partition(1).unwrap_err();
        assert_eq!((gone.time, gone.kind), (1000, BlockErrorKind::Gone));
        assert_eq!(gone.block, BlockLocation::Memory { id: 7 });

        let name = disk
            .file_names()
            .into_iter()
            .find(|n| n.ends_with(".wal"))
            .unwrap();
        assert!(disk.flip_bit(&name, handle.offset + 10, 3));
        let bad = batch.partition(0).unwrap_err();
        assert_eq!(bad.kind, BlockErrorKind::Corrupt, "{bad}");
        assert_eq!(bad.block, BlockLocation::Wal(handle));
        assert!(bad.to_string().starts_with("batch 1000, block "), "{bad}");
    }

    #[test]
    fn partitioned_operations_compose() {
        let p = Partitioned::from_partitions(vec![vec![1, 2, 3], vec![], vec![4, 5]]);
        assert_eq!(p.count(), 5);
        let q = p.clone().map(|x| x * 10).filter(|x| *x != 20);
        assert_eq!(q.partitions(), &[vec![10, 30], vec![], vec![40, 50]]);
        let r = p
            .clone()
            .flat_map(|x| std::iter::repeat_n(x, x as usize % 2));
        assert_eq!(r.collect(), vec![1, 3, 5]);
        let counts = p.map(|x| (x % 2, x)).reduce_by_key(|a, b| a + b);
        assert_eq!(counts, HashMap::from([(0, 6), (1, 9)]));
    }
}
