//! The tracker: which blocks make up which batch, which batches are complete, how far the WAL has
//! been allocated, and each receiver's checkpoint. Stored in `redb`, one transaction per batch
//! interval (never one per block: a durable WAL record *is* the block).
//!
//! (Over 700 lines with its tests, about a sixth of the file, kept next to the transactions
//! they check.)
//!
//! Blocks are allocated in WAL order — every batch takes all blocks that became durable before it,
//! and blocks become durable in log order — so "which blocks are allocated" is a single position,
//! `allocated_end`: everything before it belongs to some batch, everything after it to none yet.
//!
//! **A failed commit** (what redb guarantees, and what the engine relies on). Every commit is
//! `Durability::Immediate`: redb writes the transaction's pages, syncs, then switches its header
//! to the new commit and syncs again. A commit that returns an error therefore leaves either the
//! previous commit current (the failure came before the switch — the normal case for `ENOSPC`,
//! which hits when the file must grow for the new pages) or, rarely, the new one (the switch was
//! written but a later step failed). After any I/O error redb latches it and answers every
//! further operation on that `Database` with `PreviousIo` ("close and re-open the database"),
//! and it marks the file as needing repair, which the next open performs (repair may itself need
//! to write, and so wait for space). The engine relies on exactly this: on a commit that failed
//! for lack of space it keeps the allocation unchanged, closes the database, reopens it once it
//! can, reads the state back, and either finds the allocation there (then it was committed) or
//! commits the same allocation again. It never assumes the failed commit did nothing, and never
//! uses the database after an error without reopening it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use weir_receiver::{Checkpoint, OffsetRange};

use crate::wal::{RecordHandle, WalPosition};

const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// Per batch time: the offset ranges of direct sources (read from the source, not the WAL).
const DIRECT: TableDefinition<u64, &[u8]> = TableDefinition::new("direct_ranges");

const ALLOCATED_END: &str = "allocated_end";
const COMPLETED_THROUGH: &str = "completed_through";
const FORMAT: &str = "format";
const FORMAT_VERSION: u32 = 1;
/// The first bytes of every complete redb file (written last when redb creates one).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// A tracker failure: the step that failed, what kind of failure it is, and the detail. The
/// engine treats these as fatal (it stops rather than guess), except for a full disk
/// ([`TrackerErrorKind::NoSpace`]): then it waits, reopens the database and tries again.
#[derive(Debug, thiserror::Error)]
#[error("tracker {what}: {detail}")]
pub struct TrackerError {
    what: &'static str,
    kind: TrackerErrorKind,
    detail: String,
}

/// What kind of failure a [`TrackerError`] is, for callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackerErrorKind {
    /// Another process (or another engine in this one) has the database open.
    Locked,
    /// The disk is full (`ENOSPC`, `EDQUOT`). redb then refuses every further operation on this
    /// database (`PreviousIo`): it must be closed and opened again, which brings back the state
    /// of the last successful commit (see the module docs).
    NoSpace,
    /// Another I/O error.
    Io,
    /// The database or a value in it is damaged, half-created, or of another format version.
    Corrupt,
    /// Anything else redb reports (a bug rather than an environment problem).
    Other,
}

impl TrackerError {
    /// An I/O error at step `what`.
    pub fn from_io(what: &'static str, e: &std::io::Error) -> TrackerError {
        io_error(what, e.to_string(), e)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TrackerErrorKind {
        self.kind
    }

    /// The step that failed (`open`, `commit`, `load`, ...).
    pub fn step(&self) -> &'static str {
        self.what
    }

    /// True if the disk was full: see [`TrackerErrorKind::NoSpace`].
    pub fn is_no_space(&self) -> bool {
        self.kind == TrackerErrorKind::NoSpace
    }

    fn corrupt(what: &'static str, detail: String) -> TrackerError {
        TrackerError {
            what,
            kind: TrackerErrorKind::Corrupt,
            detail,
        }
    }
}

fn io_kind(e: &std::io::Error) -> TrackerErrorKind {
    if crate::space::is_no_space_io(e) {
        TrackerErrorKind::NoSpace
    } else {
        TrackerErrorKind::Io
    }
}

fn err(what: &'static str) -> impl FnOnce(redb::Error) -> TrackerError {
    move |e| TrackerError {
        what,
        kind: match &e {
            redb::Error::Io(io) => io_kind(io),
            redb::Error::DatabaseAlreadyOpen => TrackerErrorKind::Locked,
            redb::Error::Corrupted(_) | redb::Error::UpgradeRequired(_) => {
                TrackerErrorKind::Corrupt
            }
            _ => TrackerErrorKind::Other,
        },
        detail: e.to_string(),
    }
}

fn io_error(what: &'static str, detail: String, e: &std::io::Error) -> TrackerError {
    TrackerError {
        what,
        detail,
        kind: io_kind(e),
    }
}

fn enc_err(what: &'static str) -> impl FnOnce(postcard::Error) -> TrackerError {
    move |e| TrackerError::corrupt(what, e.to_string())
}

type Result<T> = std::result::Result<T, TrackerError>;

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockLocation {
    /// A record of the write-ahead log.
    Wal(RecordHandle),
    /// In memory only: a block read from a direct source (which is its own log) when its batch
    /// is processed, pinned until the batch is forgotten. Never in the WAL, never persisted.
    Memory {
        /// A number unique within the engine's run.
        id: u64,
    },
}

impl BlockLocation {
    /// The WAL record, if the block is in the WAL.
    pub fn wal(&self) -> Option<RecordHandle> {
        match self {
            BlockLocation::Wal(h) => Some(*h),
            BlockLocation::Memory { .. } => None,
        }
    }
}

impl std::fmt::Display for BlockLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockLocation::Wal(h) => write!(f, "{}@{}", h.segment, h.offset),
            BlockLocation::Memory { id } => write!(f, "in-memory block {id}"),
        }
    }
}

/// One block of a batch, as the tracker records it (only blocks in the WAL are recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    /// Where the block lives.
    pub location: BlockLocation,
    /// Number of records in the block.
    pub records: u32,
    /// The receiver that stored it.
    pub receiver: Arc<str>,
}

impl BlockRef {
    /// A block in the WAL.
    pub fn in_wal(handle: RecordHandle, records: u32, receiver: Arc<str>) -> BlockRef {
        BlockRef {
            location: BlockLocation::Wal(handle),
            records,
            receiver,
        }
    }
}

/// A [`BlockRef`] as the tracker stores it (the format of version 1: handle, records, receiver).
#[derive(Serialize, Deserialize)]
struct StoredBlockRef {
    handle: RecordHandle,
    records: u32,
    receiver: Arc<str>,
}

impl Serialize for BlockRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let Some(handle) = self.location.wal() else {
            return Err(serde::ser::Error::custom(
                "an in-memory block of a direct source is never recorded in the tracker",
            ));
        };
        StoredBlockRef {
            handle,
            records: self.records,
            receiver: self.receiver.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for BlockRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let b = StoredBlockRef::deserialize(d)?;
        Ok(BlockRef::in_wal(b.handle, b.records, b.receiver))
    }
}

/// One offset range of a direct source in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRange {
    /// The direct source's name.
    pub source: Arc<str>,
    /// The range.
    pub range: OffsetRange,
}

type RangeRow<'a> = (&'a str, &'a str, i32, u64, u64);

fn encode_ranges(r: &[DirectRange]) -> std::result::Result<Vec<u8>, postcard::Error> {
    let v: Vec<RangeRow<'_>> = r
        .iter()
        .map(|d| {
            (
                &*d.source,
                &*d.range.stream,
                d.range.partition,
                d.range.from,
                d.range.until,
            )
        })
        .collect();
    postcard::to_stdvec(&v)
}

fn decode_ranges(b: &[u8]) -> std::result::Result<Vec<DirectRange>, postcard::Error> {
    let v: Vec<RangeRow<'_>> = postcard::from_bytes(b)?;
    Ok(v.into_iter()
        .map(|(source, stream, partition, from, until)| DirectRange {
            source: Arc::from(source),
            range: OffsetRange {
                stream: Arc::from(stream),
                partition,
                from,
                until,
            },
        })
        .collect())
}

/// Everything the tracker knows, as loaded at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackerState {
    /// Every WAL record before this position belongs to an allocated batch.
    pub allocated_end: WalPosition,
    /// Batches up to and including this time are complete.
    pub completed_through: Option<u64>,
    /// Allocated batches still on record (incomplete ones, and complete ones kept for windows).
    pub batches: BTreeMap<u64, Vec<BlockRef>>,
    /// Per-receiver checkpoints as of the last allocation (for a direct source: the last offset
    /// planned into a batch, per partition).
    pub checkpoints: BTreeMap<String, Checkpoint>,
    /// The direct sources' ranges of the batches on record.
    pub direct: BTreeMap<u64, Vec<DirectRange>>,
}

impl TrackerState {
    /// Times of the allocated batches that are not complete, in order.
    pub fn incomplete(&self) -> impl Iterator<Item = (&u64, &Vec<BlockRef>)> {
        let done = self.completed_through;
        self.batches
            .iter()
            .filter(move |(t, _)| done.is_none_or(|d| **t > d))
    }

    /// The last allocated batch time.
    pub fn last_allocated(&self) -> Option<u64> {
        self.batches
            .keys()
            .next_back()
            .copied()
            .max(self.completed_through)
    }
}

/// The changes of one tracker transaction.
#[derive(Debug, Default)]
pub struct Commit<'a> {
    /// Allocate batch `time` with these blocks, moving `allocated_end` to the given position.
    pub allocate: Option<(u64, &'a [BlockRef], WalPosition)>,
    /// The direct sources' ranges of the allocated batch.
    pub direct: &'a [DirectRange],
    /// Batches up to and including this time are now complete.
    pub completed_through: Option<u64>,
    /// New receiver checkpoints.
    pub checkpoints: Vec<(&'a str, &'a Checkpoint)>,
    /// Forget batches with a time below this one (complete ones no window needs any more).
    pub forget_before: Option<u64>,
}

impl Commit<'_> {
    /// True if the commit changes nothing.
    pub fn is_empty(&self) -> bool {
        self.allocate.is_none()
            && self.completed_through.is_none()
            && self.checkpoints.is_empty()
            && self.forget_before.is_none()
    }
}

/// The tracker database.
pub struct Tracker {
    db: Database,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracker")
    }
}

fn encode_checkpoint(c: &Checkpoint) -> std::result::Result<Vec<u8>, postcard::Error> {
    let v: Vec<(&str, i32, u64)> = c.iter().collect();
    postcard::to_stdvec(&v)
}

fn decode_checkpoint(b: &[u8]) -> std::result::Result<Checkpoint, postcard::Error> {
    let v: Vec<(String, i32, u64)> = postcard::from_bytes(b)?;
    let mut c = Checkpoint::new();
    for (s, p, o) in v {
        c.raise(Arc::from(s), p, o);
    }
    Ok(c)
}

impl Tracker {
    /// Opens (or creates) the tracker file at `path`.
    ///
    /// `first_start` says that the WAL holds no records, so no batch can have been allocated: a
    /// tracker file left half-created by a crash (redb writes its header's magic last) is then
    /// emptied and created afresh. Otherwise such a file is reported as damaged.
    ///
    /// # Errors
    /// [`TrackerError`] if the file cannot be opened (e.g. another process has it open) or is
    /// damaged.
    pub fn open(path: &Path, first_start: bool) -> Result<Tracker> {
        let io = |e: std::io::Error| io_error("open", format!("{}: {e}", path.display()), &e);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            use std::io::Read;
            let len = f.metadata().map_err(io)?.len();
            let mut head = [0u8; REDB_MAGIC.len()];
            let n = f.read(&mut head).map_err(io)?;
            if len > 0 && (n < head.len() || head != REDB_MAGIC) {
                Self::half_created(path.display().to_string(), first_start)?;
                f.set_len(0).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
        }
        let db = Database::create(path).map_err(|e| {
            let e = redb::Error::from(e);
            TrackerError {
                detail: format!("{}: {e}", path.display()),
                ..err("open")(e)
            }
        })?;
        Tracker::init(db)
    }

    /// Opens (or creates) the tracker on a custom redb storage backend (used with the simulated
    /// disk in crash tests). `first_start` as for [`Tracker::open`].
    ///
    /// # Errors
    /// [`TrackerError`] if the database cannot be opened or is damaged.
    pub fn open_backend(backend: impl redb::StorageBackend, first_start: bool) -> Result<Tracker> {
        let io = |e: std::io::Error| io_error("open", e.to_string(), &e);
        let len = backend.len().map_err(io)?;
        if len > 0 {
            let mut head = [0u8; REDB_MAGIC.len()];
            let n = (len as usize).min(head.len());
            backend.read(0, &mut head[..n]).map_err(io)?;
            if n < head.len() || head != REDB_MAGIC {
                Self::half_created(format!("{backend:?}"), first_start)?;
                backend.set_len(0).map_err(io)?;
                backend.sync_data().map_err(io)?;
            }
        }
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| err("open")(e.into()))?;
        Tracker::init(db)
    }

    fn half_created(what: String, first_start: bool) -> Result<()> {
        if !first_start {
            return Err(TrackerError::corrupt(
                "open",
                format!(
                    "{what} has no database header although the WAL holds data: the tracker is \
                     damaged; refusing to reset it (move it away to start over, which re-processes \
                     every block in the WAL)"
                ),
            ));
        }
        tracing::warn!(file = %what, "the tracker was left half-created by a crash; creating it afresh");
        Ok(())
    }

    fn init(db: Database) -> Result<Tracker> {
        let t = Tracker { db };
        if t.is_initialised()? {
            // Nothing to write: opening an existing tracker needs no disk space.
            return Ok(t);
        }
        let tx = t.db.begin_write().map_err(|e| err("begin")(e.into()))?;
        {
            let mut meta = tx
                .open_table(META)
                .map_err(|e| err("open table")(e.into()))?;
            let format = meta
                .get(FORMAT)
                .map_err(|e| err("read")(e.into()))?
                .map(|v| v.value().to_vec());
            match format {
                None => {
                    meta.insert(FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                        .map_err(|e| err("write")(e.into()))?;
                }
                Some(v) if v == FORMAT_VERSION.to_le_bytes() => {}
                Some(v) => {
                    return Err(TrackerError::corrupt(
                        "open",
                        format!(
                        "tracker format {v:?} is not the one this build writes ({FORMAT_VERSION})"
                    ),
                    ))
                }
            }
            tx.open_table(BATCHES)
                .map_err(|e| err("open table")(e.into()))?;
            tx.open_table(CHECKPOINTS)
                .map_err(|e| err("open table")(e.into()))?;
            tx.open_table(DIRECT)
                .map_err(|e| err("open table")(e.into()))?;
        }
        tx.commit().map_err(|e| err("commit")(e.into()))?;
        Ok(t)
    }

    /// True if every table exists and the format is this build's (checked without writing).
    fn is_initialised(&self) -> Result<bool> {
        let tx = self.db.begin_read().map_err(|e| err("begin")(e.into()))?;
        let meta = match tx.open_table(META) {
            Ok(m) => m,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(err("open table")(e.into())),
        };
        let format_ok = meta
            .get(FORMAT)
            .map_err(|e| err("read")(e.into()))?
            .is_some_and(|v| v.value() == FORMAT_VERSION.to_le_bytes());
        if !format_ok {
            return Ok(false);
        }
        let exists = |r: std::result::Result<(), redb::TableError>| match r {
            Ok(()) => Ok(true),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(e) => Err(err("open table")(e.into())),
        };
        Ok(exists(tx.open_table(BATCHES).map(drop))?
            && exists(tx.open_table(CHECKPOINTS).map(drop))?
            && exists(tx.open_table(DIRECT).map(drop))?)
    }

    /// Reads everything.
    ///
    /// # Errors
    /// [`TrackerError`] on a read or decoding failure.
    pub fn load(&self) -> Result<TrackerState> {
        let tx = self.db.begin_read().map_err(|e| err("begin")(e.into()))?;
        let mut s = TrackerState::default();
        let meta = tx
            .open_table(META)
            .map_err(|e| err("open table")(e.into()))?;
        if let Some(v) = meta.get(ALLOCATED_END).map_err(|e| err("read")(e.into()))? {
            s.allocated_end = postcard::from_bytes(v.value()).map_err(enc_err("decode"))?;
        }
        if let Some(v) = meta
            .get(COMPLETED_THROUGH)
            .map_err(|e| err("read")(e.into()))?
        {
            s.completed_through = Some(postcard::from_bytes(v.value()).map_err(enc_err("decode"))?);
        }
        let batches = tx
            .open_table(BATCHES)
            .map_err(|e| err("open table")(e.into()))?;
        for row in batches.iter().map_err(|e| err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| err("read")(e.into()))?;
            let blocks: Vec<BlockRef> =
                postcard::from_bytes(v.value()).map_err(enc_err("decode batch"))?;
            s.batches.insert(k.value(), blocks);
        }
        let cps = tx
            .open_table(CHECKPOINTS)
            .map_err(|e| err("open table")(e.into()))?;
        for row in cps.iter().map_err(|e| err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| err("read")(e.into()))?;
            let c = decode_checkpoint(v.value()).map_err(enc_err("decode checkpoint"))?;
            s.checkpoints.insert(k.value().to_string(), c);
        }
        let direct = tx
            .open_table(DIRECT)
            .map_err(|e| err("open table")(e.into()))?;
        for row in direct.iter().map_err(|e| err("read")(e.into()))? {
            let (k, v) = row.map_err(|e| err("read")(e.into()))?;
            let r = decode_ranges(v.value()).map_err(enc_err("decode ranges"))?;
            s.direct.insert(k.value(), r);
        }
        Ok(s)
    }

    /// Applies `c` in one durable transaction (fsynced before returning).
    ///
    /// # Errors
    /// [`TrackerError`]; the transaction is then not applied.
    pub fn commit(&self, c: &Commit<'_>) -> Result<()> {
        let mut tx = self.db.begin_write().map_err(|e| err("begin")(e.into()))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| err("begin")(e.into()))?;
        {
            let mut meta = tx
                .open_table(META)
                .map_err(|e| err("open table")(e.into()))?;
            let mut batches = tx
                .open_table(BATCHES)
                .map_err(|e| err("open table")(e.into()))?;
            let mut direct = tx
                .open_table(DIRECT)
                .map_err(|e| err("open table")(e.into()))?;
            if let Some((time, blocks, end)) = c.allocate {
                if !c.direct.is_empty() {
                    let v = encode_ranges(c.direct).map_err(enc_err("encode"))?;
                    direct
                        .insert(time, v.as_slice())
                        .map_err(|e| err("write")(e.into()))?;
                }
                let v = postcard::to_stdvec(blocks).map_err(enc_err("encode"))?;
                batches
                    .insert(time, v.as_slice())
                    .map_err(|e| err("write")(e.into()))?;
                let v = postcard::to_stdvec(&end).map_err(enc_err("encode"))?;
                meta.insert(ALLOCATED_END, v.as_slice())
                    .map_err(|e| err("write")(e.into()))?;
            }
            if let Some(t) = c.completed_through {
                let v = postcard::to_stdvec(&t).map_err(enc_err("encode"))?;
                meta.insert(COMPLETED_THROUGH, v.as_slice())
                    .map_err(|e| err("write")(e.into()))?;
            }
            if let Some(before) = c.forget_before {
                batches
                    .retain_in(..before, |_, _| false)
                    .map_err(|e| err("write")(e.into()))?;
                direct
                    .retain_in(..before, |_, _| false)
                    .map_err(|e| err("write")(e.into()))?;
            }
            let mut cps = tx
                .open_table(CHECKPOINTS)
                .map_err(|e| err("open table")(e.into()))?;
            for (name, cp) in &c.checkpoints {
                let v = encode_checkpoint(cp).map_err(enc_err("encode"))?;
                cps.insert(*name, v.as_slice())
                    .map_err(|e| err("write")(e.into()))?;
            }
        }
        tx.commit().map_err(|e| err("commit")(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_receiver::Position;

    fn block(segment: u64, offset: u64) -> BlockRef {
        BlockRef::in_wal(
            RecordHandle {
                segment,
                offset,
                len: 10,
            },
            3,
            Arc::from("r"),
        )
    }

    #[test]
    fn a_tracker_open_elsewhere_is_a_locked_error_and_a_damaged_one_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracker.redb");
        let first = Tracker::open(&path, true).unwrap();
        let Err(e) = Tracker::open(&path, false) else {
            panic!("the file is in use")
        };
        assert_eq!(e.kind(), TrackerErrorKind::Locked, "{e}");
        assert_eq!(e.step(), "open");
        drop(first);
        Tracker::open(&path, false).unwrap();

        let other = dir.path().join("other.redb");
        std::fs::write(&other, b"not a database").unwrap();
        let Err(e) = Tracker::open(&other, false) else {
            panic!("a damaged file")
        };
        assert_eq!(e.kind(), TrackerErrorKind::Corrupt, "{e}");
        assert!(!e.is_no_space());
    }

    #[test]
    fn commits_survive_reopening_and_forgetting_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracker.redb");
        let mut cp = Checkpoint::new();
        cp.observe(&Position::offset("t", 2, 41));
        {
            let t = Tracker::open(&path, true).unwrap();
            assert_eq!(t.load().unwrap(), TrackerState::default());
            let b1 = [block(1, 32), block(1, 80)];
            let end1 = WalPosition {
                segment: 1,
                offset: 128,
            };
            t.commit(&Commit {
                allocate: Some((1000, &b1, end1)),
                checkpoints: vec![("r", &cp)],
                ..Commit::default()
            })
            .unwrap();
            let b2 = [block(2, 32)];
            let end2 = WalPosition {
                segment: 2,
                offset: 80,
            };
            t.commit(&Commit {
                allocate: Some((2000, &b2, end2)),
                completed_through: Some(1000),
                ..Commit::default()
            })
            .unwrap();
        }
        let t = Tracker::open(&path, true).unwrap();
        let s = t.load().unwrap();
        assert_eq!(s.completed_through, Some(1000));
        assert_eq!(s.allocated_end.segment, 2);
        assert_eq!(s.last_allocated(), Some(2000));
        assert_eq!(
            s.incomplete().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![2000]
        );
        assert_eq!(s.batches[&1000].len(), 2);
        assert_eq!(s.checkpoints["r"].get("t", 2), Some(41));
        t.commit(&Commit {
            completed_through: Some(2000),
            forget_before: Some(2000),
            ..Commit::default()
        })
        .unwrap();
        let s = t.load().unwrap();
        assert_eq!(s.batches.keys().copied().collect::<Vec<_>>(), vec![2000]);
        assert_eq!(s.incomplete().count(), 0);
        assert_eq!(s.last_allocated(), Some(2000));
    }

    #[test]
    fn a_half_created_file_is_reset_only_when_nothing_can_have_been_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracker.redb");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let e = Tracker::open(&path, false).unwrap_err();
        assert!(e.to_string().contains("refusing to reset it"), "{e}");
        let t = Tracker::open(&path, true).unwrap();
        assert_eq!(t.load().unwrap(), TrackerState::default());
    }

    #[test]
    fn a_second_open_of_the_same_file_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracker.redb");
        let _t = Tracker::open(&path, true).unwrap();
        let e = Tracker::open(&path, true).unwrap_err();
        assert!(e.to_string().starts_with("tracker open:"), "{e}");
    }
}
