//! An in-memory [`Storage`] for tests: a disk that can crash, tear the last write, flip bits and
//! fail on command.
//!
//! (Over 700 lines: one disk model — files, what is synced, crash images, injected faults and the
//! redb backend over the same files — whose parts share one lock and one set of invariants;
//! about 700 of the lines are its own tests.)
//!
//! The model, per file: `data` (what reads see) and `synced` (what survives a crash). Appends
//! change `data`; [`StorageFile::sync_data`] copies `data` to `synced`. Per directory: the live
//! names and the durable names; [`Storage::sync_dir`] makes the live names durable. A crash
//! ([`SimStorage::crash`]) throws away every unsynced byte and every unsynced creation or
//! removal, optionally keeping a torn part of the last write, and kills every handle opened
//! before it (the process that held them is gone), including the directory lock.
//!
//! # Files written at offsets
//! [`SimStorage::redb_backend`] gives a `redb` storage backend ([`SimRedbBackend`]) on a file
//! of the same disk, so that a crash test can crash the WAL and a `redb` database together.
//! Such a file is written at any offset and resized (grown with zeros or shrunk). Once a file
//! has been written that way since its last sync, its unsynced changes are kept as a log of
//! operations in issue order (its pending appends and truncations included), and a crash keeps
//! a prefix of that log (see [`Tear`]): nothing with [`Tear::None`], or, when the file was the
//! most recently written, the operations up to the one where the kept bytes run out, that one
//! torn. A torn write never changes a byte outside the range it was writing (no truncation, no
//! zeroing of old bytes): each byte it covers holds either its old or its new value, as `redb`
//! assumes of a disk ("powersafe overwrite", atomic single bytes). The model does not reorder
//! unsynced writes (a real disk may persist a later write and lose an earlier one); it only
//! loses a suffix of them. Files that are only appended to keep the byte model above.
//!
//! The tear is byte-granular, not sector-granular: stricter than a real disk.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use redb::{BackendError, StorageBackend};

use super::storage::{LockGuard, Storage, StorageFile};

/// Which error an injected fault produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: the medium failed.
    Eio,
    /// `ENOSPC`: no space left.
    Enospc,
}

impl Fault {
    fn error(self, what: &str) -> io::Error {
        match self {
            Fault::Eio => io::Error::other(format!("simulated EIO on {what} (input/output error)")),
            Fault::Enospc => io::Error::new(
                io::ErrorKind::StorageFull,
                format!("simulated ENOSPC on {what} (no space left on device)"),
            ),
        }
    }
}

/// How the last write is torn by a crash.
///
/// Only the most recently written file (by an append, a positional write or a resize) is
/// torn; every other file loses all its unsynced changes.
///
/// For a file written at offsets since its last sync (see the [module docs](self)), `keep`
/// counts bytes of the unsynced writes in issue order: the operations survive in order until
/// `keep` bytes have, the write in which they run out keeps only its first bytes, and nothing
/// issued after it survives. Resizes issued before that write survive whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// Every unsynced byte is lost.
    None,
    /// The first `keep` unsynced bytes of the most recently written file survive.
    Prefix {
        /// Bytes kept.
        keep: usize,
    },
    /// The file keeps `keep` unsynced bytes, but those from `zeros_from` on read as zeros
    /// (the size was persisted, the data blocks were not).
    ///
    /// For a file written at offsets: of the kept bytes, those from `zeros_from` on were not
    /// written, but a write's growth of the file was: the bytes past the old end of the file
    /// read as zeros, and the bytes it was overwriting keep their old values.
    PrefixThenZeros {
        /// Bytes kept (their count; the file grows by this much).
        keep: usize,
        /// Offset within the kept bytes where zeros start.
        zeros_from: usize,
    },
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
    /// Lowest offset changed since the last sync (byte model only: meaningless while `ops` is
    /// `Some`).
    dirty_from: usize,
    modified: u64,
    /// The unsynced changes as operations in issue order, once the file has been written at an
    /// offset or resized by a backend since its last sync; `None` while only appends and
    /// truncations happened, when the byte model (`dirty_from`) describes them.
    /// Invariant: replaying `ops` on `synced` gives `data`.
    ops: Option<Vec<Op>>,
}

/// An unsynced change of a file written at offsets.
#[derive(Debug)]
enum Op {
    /// `bytes` written at `offset`; the file grows (with zeros before `offset`) if they end past
    /// its end.
    Write { offset: usize, bytes: Vec<u8> },
    /// The length set: shrunk, or grown with zeros.
    SetLen(usize),
}

/// Replays `ops` on `file` in order until `keep` bytes of writes have been kept: the write in
/// which they run out is cut there, and nothing after it is replayed. Of the kept bytes, those
/// from `zeros_from` on (counted over all writes) are not written, but the file still grows to
/// cover them (zeros past the old end; old bytes stay where the write overwrote).
fn replay(file: &mut Vec<u8>, ops: &[Op], keep: usize, zeros_from: usize) {
    let mut kept = 0usize;
    for op in ops {
        match op {
            Op::SetLen(len) => file.resize(*len, 0),
            Op::Write { offset, bytes } => {
                let take = bytes.len().min(keep - kept);
                let real = take.min(zeros_from.saturating_sub(kept));
                let end = offset + take;
                if take > 0 && file.len() < end {
                    file.resize(end, 0);
                }
                if real > 0 {
                    file[*offset..offset + real].copy_from_slice(&bytes[..real]);
                }
                kept += take;
                if take < bytes.len() {
                    return;
                }
            }
        }
    }
}

impl Inode {
    /// The operation log, started (if needed) with the unsynced appends and truncations so
    /// far: the file cut to `dirty_from`, then the bytes after it written.
    fn ops_log(&mut self) -> &mut Vec<Op> {
        let (data, synced, from) = (&self.data, &self.synced, self.dirty_from);
        self.ops.get_or_insert_with(|| {
            let mut ops = Vec::new();
            if from < synced.len() {
                ops.push(Op::SetLen(from));
            }
            if from < data.len() {
                ops.push(Op::Write {
                    offset: from,
                    bytes: data[from..].to_vec(),
                });
            }
            ops
        })
    }

    /// Writes `bytes` at `offset` (as `pwrite(2)`: growing the file if they end past it).
    fn write_at(&mut self, offset: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.ops_log().push(Op::Write {
            offset,
            bytes: bytes.to_vec(),
        });
        let end = offset + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[offset..end].copy_from_slice(bytes);
    }

    /// Sets the length (as `ftruncate(2)`: shrinking, or growing with zeros).
    fn set_len(&mut self, len: usize) {
        self.ops_log().push(Op::SetLen(len));
        self.data.resize(len, 0);
    }

    /// Appends the first `n` bytes of `bufs`.
    fn append(&mut self, bufs: &[IoSlice<'_>], n: usize) {
        if self.ops.is_some() {
            let bytes: Vec<u8> = bufs
                .iter()
                .flat_map(|b| b.iter().copied())
                .take(n)
                .collect();
            let end = self.data.len();
            self.write_at(end, &bytes);
            return;
        }
        self.dirty_from = self.dirty_from.min(self.data.len());
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            self.data.extend_from_slice(&b[..take]);
            left -= take;
        }
    }

    /// Cuts (or grows with zeros) the file to `len` for [`StorageFile::truncate`].
    fn truncate(&mut self, len: usize) {
        if self.ops.is_some() {
            self.set_len(len);
            return;
        }
        if len < self.data.len() {
            self.data.truncate(len);
        } else {
            self.data.resize(len, 0);
        }
        self.dirty_from = self.dirty_from.min(len);
    }

    /// Makes everything durable.
    fn sync(&mut self) {
        if let Some(ops) = self.ops.take() {
            replay(&mut self.synced, &ops, usize::MAX, usize::MAX);
            debug_assert!(self.synced == self.data, "replaying the log gives the data");
        } else {
            let from = self.dirty_from.min(self.synced.len());
            self.synced.truncate(from);
            let tail = &self.data[from.min(self.data.len())..];
            self.synced.extend_from_slice(tail);
            self.synced.truncate(self.data.len());
        }
        self.dirty_from = self.data.len();
    }

    /// What survives a crash, torn by `tear` (`Tear::None` unless this file was the last one
    /// written).
    fn crash(&mut self, tear: Tear) {
        let after = if let Some(ops) = self.ops.take() {
            let mut after = std::mem::take(&mut self.synced);
            match tear {
                Tear::None => {}
                Tear::Prefix { keep } => replay(&mut after, &ops, keep, keep),
                Tear::PrefixThenZeros { keep, zeros_from } => {
                    replay(&mut after, &ops, keep, zeros_from.min(keep));
                }
            }
            after
        } else {
            let mut after = self.synced.clone();
            if self.dirty_from < self.data.len() {
                let base = self.dirty_from.min(self.synced.len());
                let unsynced = &self.data[self.dirty_from..];
                after.truncate(base);
                match tear {
                    Tear::None => after.clone_from(&self.synced),
                    Tear::Prefix { keep } => {
                        after.extend_from_slice(&unsynced[..keep.min(unsynced.len())]);
                    }
                    Tear::PrefixThenZeros { keep, zeros_from } => {
                        let keep = keep.min(unsynced.len());
                        let zeros_from = zeros_from.min(keep);
                        after.extend_from_slice(&unsynced[..zeros_from]);
                        after.resize(after.len() + (keep - zeros_from), 0);
                    }
                }
            }
            after
        };
        self.data.clone_from(&after);
        self.synced = after;
        self.dirty_from = self.data.len();
    }
}

#[derive(Debug)]
struct Disk {
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    epoch: u64,
    lock_epoch: Option<u64>,
    last_written: Option<u64>,
    write_faults: Vec<Fault>,
    sync_faults: Vec<Fault>,
    dir_sync_faults: Vec<Fault>,
    capacity: Option<u64>,
    /// Whether `space()` reports the capacity (off: no free-space floor, as before).
    report_space: bool,
    sync_delay: Duration,
    clock_secs: u64,
    stats: SimStats,
    /// Whole-file locks taken through `redb` backends: inode → (backend id, exclusive).
    backend_locks: HashMap<u64, Vec<(u64, bool)>>,
    next_backend: u64,
}

/// Operation counts of a [`SimStorage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Successful `append` calls.
    pub appends: u64,
    /// Successful positional writes (through a [`SimRedbBackend`]).
    pub writes: u64,
    /// Successful file syncs.
    pub syncs: u64,
    /// Successful directory syncs.
    pub dir_syncs: u64,
    /// Crashes.
    pub crashes: u64,
}

/// The simulated disk. Cheap to clone; clones share the disk.
#[derive(Debug, Clone)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
}

impl Default for SimStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl SimStorage {
    /// An empty disk with unlimited space.
    #[must_use]
    pub fn new() -> Self {
        Self {
            disk: Arc::new(Mutex::new(Disk {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                inodes: HashMap::new(),
                next_inode: 1,
                epoch: 0,
                lock_epoch: None,
                last_written: None,
                write_faults: Vec::new(),
                sync_faults: Vec::new(),
                dir_sync_faults: Vec::new(),
                capacity: None,
                report_space: false,
                sync_delay: Duration::ZERO,
                clock_secs: 1_700_000_000,
                stats: SimStats::default(),
                backend_locks: HashMap::new(),
                next_backend: 1,
            })),
        }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A test thread that panicked while holding the lock leaves consistent data behind
        // (every mutation is completed before it can panic), so poisoning is ignored.
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Simulates a power cut / `kill -9`: every unsynced byte and unsynced directory change is
    /// lost, except the torn part of the last write that `tear` keeps. Every handle opened
    /// before (files and `redb` backends) returns errors from now on, and the directory lock and
    /// the backends' file locks are released.
    pub fn crash(&self, tear: Tear) {
        let mut d = self.disk();
        d.epoch += 1;
        d.lock_epoch = None;
        d.stats.crashes += 1;
        d.write_faults.clear();
        d.sync_faults.clear();
        d.dir_sync_faults.clear();
        d.live = d.durable.clone();
        let last = d.last_written.take();
        let live: Vec<u64> = d.live.values().copied().collect();
        d.inodes.retain(|id, _| live.contains(id));
        for (&id, inode) in &mut d.inodes {
            inode.crash(if Some(id) == last { tear } else { Tear::None });
        }
        d.backend_locks.clear();
    }

    /// Flips bit `bit` (0..8) of byte `offset` of file `name`, on the medium itself (durable
    /// and in-memory copies alike, and the unsynced writes of a file written at offsets).
    /// Returns false if there is no such byte.
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) -> bool {
        let mut d = self.disk();
        let Some(&id) = d.live.get(name) else {
            return false;
        };
        let Some(inode) = d.inodes.get_mut(&id) else {
            return false;
        };
        let Ok(off) = usize::try_from(offset) else {
            return false;
        };
        if off >= inode.data.len() {
            return false;
        }
        let mask = 1 << (bit % 8);
        inode.data[off] ^= mask;
        if off < inode.synced.len() {
            inode.synced[off] ^= mask;
        }
        for op in inode.ops.iter_mut().flatten() {
            if let Op::Write { offset, bytes } = op {
                if let Some(b) = off.checked_sub(*offset).and_then(|i| bytes.get_mut(i)) {
                    *b ^= mask;
                }
            }
        }
        true
    }

    /// The next `times` appends or positional writes fail with `fault` (nothing is written).
    pub fn fail_writes(&self, fault: Fault, times: usize) {
        self.disk()
            .write_faults
            .extend(std::iter::repeat_n(fault, times));
    }

    /// The next `times` file syncs fail with `fault` (nothing is made durable).
    pub fn fail_syncs(&self, fault: Fault, times: usize) {
        self.disk()
            .sync_faults
            .extend(std::iter::repeat_n(fault, times));
    }

    /// The next `times` directory syncs fail with `fault`.
    pub fn fail_dir_syncs(&self, fault: Fault, times: usize) {
        self.disk()
            .dir_sync_faults
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Cancels every injected fault that has not fired yet.
    pub fn clear_faults(&self) {
        let mut d = self.disk();
        d.write_faults.clear();
        d.sync_faults.clear();
        d.dir_sync_faults.clear();
    }

    /// Limits the bytes all files may hold together (`None`: unlimited). An append that does
    /// not fit writes what fits, then fails with `ENOSPC`. A positional write that would grow
    /// the file past the limit writes what fits, then fails with `ENOSPC`; so does a resize
    /// that would (writing nothing): the model has no sparse files, a grown file holds its
    /// zeros.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.disk().capacity = bytes;
    }

    /// Makes [`Storage::space`] report the capacity (total) and what is left of it
    /// (available), so that the WAL's free-space floor applies; off by default (no floor). A
    /// disk without a capacity reports nothing either way.
    pub fn report_space(&self, on: bool) {
        self.disk().report_space = on;
    }

    /// Makes every file sync take at least `d` (like a slow disk), so that concurrent appends
    /// pile up behind it.
    pub fn set_sync_delay(&self, d: Duration) {
        self.disk().sync_delay = d;
    }

    /// Bytes all live files hold together.
    #[must_use]
    pub fn used_bytes(&self) -> u64 {
        let d = self.disk();
        d.used()
    }

    /// Moves the simulated clock (used for modification times) forward.
    pub fn advance_clock(&self, by: Duration) {
        self.disk().clock_secs += by.as_secs().max(1);
    }

    /// The simulated clock's current time.
    #[must_use]
    pub fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.disk().clock_secs)
    }

    /// Operation counts so far.
    #[must_use]
    pub fn stats(&self) -> SimStats {
        self.disk().stats
    }

    /// The live names, sorted.
    #[must_use]
    pub fn file_names(&self) -> Vec<String> {
        self.disk().live.keys().cloned().collect()
    }

    /// A copy of a live file's contents (what a read would see).
    #[must_use]
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let d = self.disk();
        let id = d.live.get(name)?;
        d.inodes.get(id).map(|i| i.data.clone())
    }

    /// Replaces (or creates, durably) a file's contents, for tests that plant files.
    pub fn put_file(&self, name: &str, bytes: &[u8]) {
        let mut d = self.disk();
        let id = match d.live.get(name) {
            Some(&id) => id,
            None => {
                let id = d.alloc_inode();
                d.live.insert(name.to_owned(), id);
                id
            }
        };
        d.durable.insert(name.to_owned(), id);
        let now = d.clock_secs;
        let inode = d.inodes.entry(id).or_default();
        inode.data = bytes.to_vec();
        inode.synced = bytes.to_vec();
        inode.dirty_from = bytes.len();
        inode.ops = None;
        inode.modified = now;
    }

    /// A `redb` storage backend on file `name`, created if missing, for crash tests that run a
    /// `redb` database on this disk (see [`SimRedbBackend`]).
    ///
    /// When this returns `Ok`, the file's directory entry is durable, as after
    /// [`Storage::sync_dir`] but for this name only: other pending creations and removals stay
    /// pending (a crash still loses them). Making the entry durable is a directory sync: a
    /// pending [`SimStorage::fail_dir_syncs`] fault fails the call (the file then exists, not
    /// durably; a retry makes it durable). A file that is already durable is just opened.
    ///
    /// # Errors
    /// The injected directory-sync fault, when the entry had to be made durable.
    pub fn redb_backend(&self, name: &str) -> io::Result<SimRedbBackend> {
        let mut d = self.disk();
        let id = match d.live.get(name) {
            Some(&id) => id,
            None => {
                let id = d.alloc_inode();
                d.live.insert(name.to_owned(), id);
                id
            }
        };
        if d.durable.get(name) != Some(&id) {
            if !d.dir_sync_faults.is_empty() {
                let fault = d.dir_sync_faults.remove(0);
                return Err(fault.error("directory fsync"));
            }
            d.durable.insert(name.to_owned(), id);
            d.stats.dir_syncs += 1;
        }
        let backend = d.next_backend;
        d.next_backend += 1;
        Ok(SimRedbBackend {
            disk: Arc::clone(&self.disk),
            inode: id,
            epoch: d.epoch,
            id: backend,
            name: name.to_owned(),
        })
    }
}

impl Disk {
    fn used(&self) -> u64 {
        self.live
            .values()
            .filter_map(|id| self.inodes.get(id))
            .map(|i| i.data.len() as u64)
            .sum()
    }

    fn alloc_inode(&mut self) -> u64 {
        let id = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(
            id,
            Inode {
                modified: self.clock_secs,
                ..Inode::default()
            },
        );
        id
    }

    fn check_epoch(&self, epoch: u64) -> io::Result<()> {
        if epoch == self.epoch {
            Ok(())
        } else {
            Err(io::Error::other(
                "simulated crash: this handle belongs to a process that no longer exists",
            ))
        }
    }

    fn inode(&mut self, id: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "simulated file was removed"))
    }

    /// Bytes the capacity still allows.
    fn room(&self) -> usize {
        match self.capacity {
            Some(cap) => usize::try_from(cap.saturating_sub(self.used())).unwrap_or(usize::MAX),
            None => usize::MAX,
        }
    }
}

/// Waits out the disk's sync delay, without holding its lock.
fn sync_delay(disk: &Mutex<Disk>) {
    let delay = disk
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .sync_delay;
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
}

#[derive(Debug)]
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    inode: u64,
    epoch: u64,
}

impl SimFile {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut d = self.disk();
        d.check_epoch(self.epoch)?;
        let inode = d.inode(self.inode)?;
        let Ok(off) = usize::try_from(offset) else {
            return Ok(0);
        };
        if off >= inode.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(inode.data.len() - off);
        buf[..n].copy_from_slice(&inode.data[off..off + n]);
        Ok(n)
    }

    fn append(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut d = self.disk();
        d.check_epoch(self.epoch)?;
        if !d.write_faults.is_empty() {
            let fault = d.write_faults.remove(0);
            return Err(fault.error("write"));
        }
        let wanted: usize = bufs.iter().map(|b| b.len()).sum();
        let room = d.room();
        if wanted > 0 && room == 0 {
            return Err(Fault::Enospc.error("write"));
        }
        let n = wanted.min(room);
        let now = d.clock_secs;
        let inode = d.inode(self.inode)?;
        inode.append(bufs, n);
        inode.modified = now;
        d.last_written = Some(self.inode);
        d.stats.appends += 1;
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        sync_delay(&self.disk);
        let mut d = self.disk();
        d.check_epoch(self.epoch)?;
        if !d.sync_faults.is_empty() {
            let fault = d.sync_faults.remove(0);
            return Err(fault.error("fsync"));
        }
        d.inode(self.inode)?.sync();
        d.stats.syncs += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut d = self.disk();
        d.check_epoch(self.epoch)?;
        Ok(d.inode(self.inode)?.data.len() as u64)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut d = self.disk();
        d.check_epoch(self.epoch)?;
        let inode = d.inode(self.inode)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        inode.truncate(len);
        Ok(())
    }
}

/// A file of a [`SimStorage`] as a `redb` [`StorageBackend`], from
/// [`SimStorage::redb_backend`].
///
/// A write at any offset grows the file if it ends past its end (with zeros before it, like
/// `pwrite(2)`); [`set_len`](StorageBackend::set_len) shrinks or grows with zeros. Both follow
/// the crash model of the [module docs](self). Faults apply as to appends and file syncs:
/// [`SimStorage::fail_writes`] fails writes, [`SimStorage::fail_syncs`] fails `sync_data`, the
/// capacity ([`SimStorage::set_capacity`]) fails growth with `ErrorKind::StorageFull`, and
/// `sync_data` takes the sync delay. After a [`SimStorage::crash`] every operation fails, as
/// with every handle opened before it: open a new backend (and database) to see what survived.
///
/// Locks: whole-file exclusive and shared locks only (as `redb`'s own file backend where it
/// has no byte-range locks), enough for `redb`'s default `ConcurrencyMode::ExclusiveWriter`: a
/// second database on the same file fails to open with `DatabaseAlreadyOpen` until the first
/// is closed (or the disk crashes, which releases every lock). Byte-range locks are
/// unsupported.
#[derive(Debug)]
pub struct SimRedbBackend {
    disk: Arc<Mutex<Disk>>,
    inode: u64,
    epoch: u64,
    /// Owner of this backend's locks.
    id: u64,
    name: String,
}

impl SimRedbBackend {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The disk, or the dead-handle error after a crash.
    fn live(&self) -> io::Result<MutexGuard<'_, Disk>> {
        let d = self.disk();
        d.check_epoch(self.epoch)?;
        Ok(d)
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<(usize, usize)> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| Some((start, start.checked_add(len)?)))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("simulated file {}: offset {offset} out of range", self.name),
                )
            })
    }

    fn lock_whole(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
        exclusive: bool,
    ) -> Result<bool, BackendError> {
        if !matches!(start, Bound::Unbounded | Bound::Included(0)) || end != Bound::Unbounded {
            return Err(BackendError::Unsupported);
        }
        let mut d = self.live().map_err(BackendError::Io)?;
        let holders = d.backend_locks.entry(self.inode).or_default();
        if holders
            .iter()
            .any(|&(id, ex)| id != self.id && (exclusive || ex))
        {
            return Ok(false);
        }
        holders.retain(|&(id, _)| id != self.id);
        holders.push((self.id, exclusive));
        Ok(true)
    }

    /// Releases this backend's lock, if it holds one (a crash already released it).
    fn unlock(&self) {
        let mut d = self.disk();
        if let Some(holders) = d.backend_locks.get_mut(&self.inode) {
            holders.retain(|&(id, _)| id != self.id);
            if holders.is_empty() {
                d.backend_locks.remove(&self.inode);
            }
        }
    }
}

impl Drop for SimRedbBackend {
    fn drop(&mut self) {
        // Closing the descriptor releases its locks, even without `close`.
        self.unlock();
    }
}

impl StorageBackend for SimRedbBackend {
    fn len(&self) -> io::Result<u64> {
        let mut d = self.live()?;
        Ok(d.inode(self.inode)?.data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let (start, end) = self.range(offset, out.len())?;
        let mut d = self.live()?;
        let data = &d.inode(self.inode)?.data;
        let Some(bytes) = data.get(start..end) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "simulated file {}: read of {start}..{end} past its end ({})",
                    self.name,
                    data.len()
                ),
            ));
        };
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (len, _) = self.range(len, 0)?;
        let mut d = self.live()?;
        let room = d.room();
        let now = d.clock_secs;
        let inode = d.inode(self.inode)?;
        if len.saturating_sub(inode.data.len()) > room {
            return Err(Fault::Enospc.error("set_len"));
        }
        inode.set_len(len);
        inode.modified = now;
        d.last_written = Some(self.inode);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        sync_delay(&self.disk);
        let mut d = self.live()?;
        if !d.sync_faults.is_empty() {
            let fault = d.sync_faults.remove(0);
            return Err(fault.error("fsync"));
        }
        d.inode(self.inode)?.sync();
        d.stats.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let (start, end) = self.range(offset, data.len())?;
        let mut d = self.live()?;
        if !d.write_faults.is_empty() {
            let fault = d.write_faults.remove(0);
            return Err(fault.error("write"));
        }
        let room = d.room();
        let now = d.clock_secs;
        let inode = d.inode(self.inode)?;
        // Like `write_all_at`: what fits is written, then the write fails.
        let fits = (inode.data.len().saturating_add(room))
            .saturating_sub(start)
            .min(data.len());
        if fits > 0 {
            inode.write_at(start, &data[..fits]);
            inode.modified = now;
            d.last_written = Some(self.inode);
        }
        if end - start > fits {
            return Err(Fault::Enospc.error("write"));
        }
        d.stats.writes += 1;
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.unlock();
        self.live().map(drop)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.lock_whole(start, end, true)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.lock_whole(start, end, false)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        if !matches!(start, Bound::Unbounded | Bound::Included(0)) || end != Bound::Unbounded {
            return Err(BackendError::Unsupported);
        }
        self.unlock();
        Ok(())
    }
}

#[derive(Debug)]
struct SimLock {
    disk: Arc<Mutex<Disk>>,
    epoch: u64,
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut d = self
            .disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.lock_epoch == Some(self.epoch) && d.epoch == self.epoch {
            d.lock_epoch = None;
        }
    }
}

impl Storage for SimStorage {
    fn describe(&self) -> String {
        "<simulated disk>".to_owned()
    }

    fn space(&self) -> io::Result<Option<crate::space::DiskSpace>> {
        let d = self.disk();
        Ok(match (d.report_space, d.capacity) {
            (true, Some(total)) => Some(crate::space::DiskSpace {
                available: total.saturating_sub(d.used()),
                total,
            }),
            _ => None,
        })
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.file_names())
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut d = self.disk();
        if d.live.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("simulated file {name} exists"),
            ));
        }
        let id = d.alloc_inode();
        d.live.insert(name.to_owned(), id);
        Ok(Arc::new(SimFile {
            disk: Arc::clone(&self.disk),
            inode: id,
            epoch: d.epoch,
        }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let d = self.disk();
        let id = *d.live.get(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("simulated file {name} not found"),
            )
        })?;
        Ok(Arc::new(SimFile {
            disk: Arc::clone(&self.disk),
            inode: id,
            epoch: d.epoch,
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut d = self.disk();
        d.live.remove(name).map(|_| ()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("simulated file {name} not found"),
            )
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut d = self.disk();
        if !d.dir_sync_faults.is_empty() {
            let fault = d.dir_sync_faults.remove(0);
            return Err(fault.error("directory fsync"));
        }
        d.durable = d.live.clone();
        d.stats.dir_syncs += 1;
        Ok(())
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        let d = self.disk();
        let id = d.live.get(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("simulated file {name} not found"),
            )
        })?;
        let secs = d.inodes.get(id).map_or(0, |i| i.modified);
        Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn lock(&self) -> io::Result<Box<dyn LockGuard>> {
        let mut d = self.disk();
        if d.lock_epoch.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "simulated directory is locked by another opener",
            ));
        }
        let epoch = d.epoch;
        d.lock_epoch = Some(epoch);
        Ok(Box::new(SimLock {
            disk: Arc::clone(&self.disk),
            epoch,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{
        Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    };

    fn write(f: &Arc<dyn StorageFile>, b: &[u8]) {
        assert_eq!(f.append(&[IoSlice::new(b)]).unwrap(), b.len());
    }

    #[test]
    fn crash_keeps_only_synced_bytes_and_durable_names() {
        let s = SimStorage::new();
        let f = s.create("a").unwrap();
        write(&f, b"hello");
        f.sync_data().unwrap();
        s.sync_dir().unwrap();
        write(&f, b" world");
        let _g = s.create("b").unwrap();
        s.crash(Tear::None);
        assert_eq!(s.file_names(), vec!["a".to_owned()]);
        assert_eq!(s.contents("a").unwrap(), b"hello");
        assert!(f.len().is_err(), "old handles die with the crash");
    }

    #[test]
    fn tears_keep_a_prefix_or_zeros() {
        let s = SimStorage::new();
        let f = s.create("a").unwrap();
        s.sync_dir().unwrap();
        write(&f, b"abc");
        f.sync_data().unwrap();
        write(&f, b"defgh");
        s.crash(Tear::Prefix { keep: 2 });
        assert_eq!(s.contents("a").unwrap(), b"abcde");
        let f = s.open("a").unwrap();
        write(&f, b"XYZW");
        s.crash(Tear::PrefixThenZeros {
            keep: 3,
            zeros_from: 1,
        });
        assert_eq!(s.contents("a").unwrap(), b"abcdeX\0\0");
    }

    #[test]
    fn capacity_gives_partial_writes_then_enospc() {
        let s = SimStorage::new();
        s.set_capacity(Some(4));
        let f = s.create("a").unwrap();
        assert_eq!(f.append(&[IoSlice::new(b"abcdef")]).unwrap(), 4);
        let e = f.append(&[IoSlice::new(b"g")]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
    }

    #[test]
    fn lock_is_exclusive_and_released_by_drop_or_crash() {
        let s = SimStorage::new();
        let g = s.lock().unwrap();
        assert_eq!(s.lock().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(g);
        let _g = s.lock().unwrap();
        s.crash(Tear::None);
        assert!(s.lock().is_ok());
    }

    /// A backend on file `name` holding exactly `bytes`, durably.
    fn backend_with(s: &SimStorage, name: &str, bytes: &[u8]) -> SimRedbBackend {
        let b = s.redb_backend(name).unwrap();
        b.set_len(bytes.len() as u64).unwrap();
        b.write(0, bytes).unwrap();
        b.sync_data().unwrap();
        b
    }

    fn read_all(b: &SimRedbBackend) -> Vec<u8> {
        let mut out = vec![0; usize::try_from(b.len().unwrap()).unwrap()];
        b.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn positional_overwrite_is_lost_by_a_crash_unless_synced() {
        let s = SimStorage::new();
        let b = backend_with(&s, "db", b"abcdefgh");
        b.write(2, b"XY").unwrap();
        assert_eq!(read_all(&b), b"abXYefgh");
        s.crash(Tear::None);
        assert_eq!(s.contents("db").unwrap(), b"abcdefgh");
        assert!(b.len().is_err());
        assert!(b.read(0, &mut [0; 1]).is_err());
        assert!(b.write(0, b"z").is_err());
        assert!(b.set_len(0).is_err());
        assert!(b.sync_data().is_err());
        assert!(b.close().is_err());
        assert_eq!(
            s.contents("db").unwrap(),
            b"abcdefgh",
            "the dead handle wrote nothing"
        );

        let b = s.redb_backend("db").unwrap();
        b.write(2, b"XY").unwrap();
        b.write(10, b"!").unwrap();
        assert_eq!(
            read_all(&b),
            b"abXYefgh\0\0!",
            "a write past the end leaves zeros"
        );
        b.sync_data().unwrap();
        s.crash(Tear::None);
        assert_eq!(s.contents("db").unwrap(), b"abXYefgh\0\0!");
        let mut past = [0; 2];
        let b = s.redb_backend("db").unwrap();
        assert_eq!(
            b.read(10, &mut past).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn set_len_grows_with_zeros_shrinks_and_lasts_once_synced() {
        let s = SimStorage::new();
        let b = backend_with(&s, "db", b"abcdefgh");
        b.set_len(3).unwrap();
        b.set_len(5).unwrap();
        assert_eq!(read_all(&b), b"abc\0\0");
        s.crash(Tear::None);
        assert_eq!(s.contents("db").unwrap(), b"abcdefgh");

        let b = s.redb_backend("db").unwrap();
        b.set_len(10).unwrap();
        b.write(9, b"!").unwrap();
        b.sync_data().unwrap();
        b.set_len(4).unwrap();
        s.crash(Tear::None);
        assert_eq!(s.contents("db").unwrap(), b"abcdefgh\0!");

        let b = s.redb_backend("db").unwrap();
        b.set_len(4).unwrap();
        b.sync_data().unwrap();
        s.crash(Tear::Prefix { keep: 100 });
        assert_eq!(s.contents("db").unwrap(), b"abcd");
    }

    #[test]
    fn tears_keep_a_prefix_of_the_operations() {
        let s = SimStorage::new();
        let run = |tear| {
            let b = backend_with(&s, "db", b"abcdefgh");
            b.write(0, b"XYZ").unwrap();
            b.set_len(10).unwrap();
            b.write(8, b"12").unwrap();
            s.crash(tear);
            s.contents("db").unwrap()
        };
        assert_eq!(run(Tear::None), b"abcdefgh");
        assert_eq!(run(Tear::Prefix { keep: 0 }), b"abcdefgh");
        assert_eq!(run(Tear::Prefix { keep: 2 }), b"XYcdefgh");
        assert_eq!(run(Tear::Prefix { keep: 3 }), b"XYZdefgh\0\0");
        assert_eq!(run(Tear::Prefix { keep: 4 }), b"XYZdefgh1\0");
        assert_eq!(run(Tear::Prefix { keep: 99 }), b"XYZdefgh12");
        // Bytes not written keep their old values where they were overwriting.
        let zeros = Tear::PrefixThenZeros {
            keep: 5,
            zeros_from: 1,
        };
        assert_eq!(run(zeros), b"Xbcdefgh\0\0");

        // ...and read as zeros where the write was growing the file.
        let b = backend_with(&s, "db", b"abcdefgh");
        b.write(6, b"GHIJ").unwrap();
        s.crash(Tear::PrefixThenZeros {
            keep: 4,
            zeros_from: 0,
        });
        assert_eq!(s.contents("db").unwrap(), b"abcdefgh\0\0");

        // A write past the end that keeps nothing does not grow the file.
        for tear in [
            Tear::Prefix { keep: 0 },
            Tear::PrefixThenZeros {
                keep: 0,
                zeros_from: 0,
            },
        ] {
            let b = backend_with(&s, "db", b"abcd");
            b.write(6, b"xy").unwrap();
            s.crash(tear);
            assert_eq!(s.contents("db").unwrap(), b"abcd");
        }
        let b = backend_with(&s, "db", b"abcd");
        b.write(6, b"xy").unwrap();
        s.crash(Tear::PrefixThenZeros {
            keep: 1,
            zeros_from: 0,
        });
        assert_eq!(s.contents("db").unwrap(), b"abcd\0\0\0");
    }

    #[test]
    fn only_the_last_written_file_is_torn() {
        let s = SimStorage::new();
        let f = s.create("wal").unwrap();
        s.sync_dir().unwrap();
        let b = backend_with(&s, "db", b"abcd");
        b.write(0, b"XY").unwrap();
        write(&f, b"123");
        s.crash(Tear::Prefix { keep: 1 });
        assert_eq!(s.contents("db").unwrap(), b"abcd");
        assert_eq!(s.contents("wal").unwrap(), b"1");

        let b = s.redb_backend("db").unwrap();
        let f = s.open("wal").unwrap();
        write(&f, b"23");
        b.write(0, b"XY").unwrap();
        s.crash(Tear::Prefix { keep: 1 });
        assert_eq!(s.contents("db").unwrap(), b"Xbcd");
        assert_eq!(s.contents("wal").unwrap(), b"1");
    }

    #[test]
    fn appends_and_truncations_join_the_log_of_a_positional_write() {
        let s = SimStorage::new();
        let f = s.create("a").unwrap();
        s.sync_dir().unwrap();
        write(&f, b"abc");
        f.sync_data().unwrap();
        write(&f, b"def");
        let b = s.redb_backend("a").unwrap();
        b.write(0, b"X").unwrap();
        write(&f, b"g");
        assert_eq!(read_all(&b), b"Xbcdefg");
        s.crash(Tear::Prefix { keep: 4 });
        assert_eq!(s.contents("a").unwrap(), b"Xbcdef");

        let f = s.open("a").unwrap();
        let b = s.redb_backend("a").unwrap();
        b.write(1, b"Y").unwrap();
        f.truncate(3).unwrap();
        write(&f, b"!");
        f.sync_data().unwrap();
        s.crash(Tear::None);
        assert_eq!(s.contents("a").unwrap(), b"XYc!");
    }

    #[test]
    fn flip_bit_reaches_unsynced_positional_writes() {
        let s = SimStorage::new();
        let b = backend_with(&s, "db", b"abcd");
        b.write(1, b"B").unwrap();
        assert!(s.flip_bit("db", 1, 5));
        b.sync_data().unwrap();
        assert_eq!(s.contents("db").unwrap(), b"abcd");
    }

    #[test]
    fn backend_faults_capacity_and_sync_delay() {
        let s = SimStorage::new();
        let b = backend_with(&s, "db", b"abcd");
        s.fail_writes(Fault::Eio, 1);
        assert!(b.write(0, b"X").is_err());
        assert_eq!(read_all(&b), b"abcd");
        b.write(0, b"X").unwrap();
        s.fail_syncs(Fault::Eio, 1);
        assert!(b.sync_data().is_err());
        s.crash(Tear::None);
        assert_eq!(
            s.contents("db").unwrap(),
            b"abcd",
            "a failed sync made nothing durable"
        );

        let b = s.redb_backend("db").unwrap();
        s.set_capacity(Some(6));
        let full = b.set_len(7).unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull);
        assert_eq!(b.len().unwrap(), 4);
        let full = b.write(3, b"DEFG").unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull);
        assert_eq!(read_all(&b), b"abcDEF", "what fits is written");
        b.write(0, b"ABC").unwrap();
        s.set_capacity(None);
        assert_eq!(s.stats().writes, 3);

        s.set_sync_delay(Duration::from_millis(20));
        let start = std::time::Instant::now();
        b.sync_data().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn redb_backend_makes_only_its_own_entry_durable() {
        let s = SimStorage::new();
        let _pending = s.create("other").unwrap();
        s.fail_dir_syncs(Fault::Eio, 1);
        assert!(s.redb_backend("db").is_err());
        s.crash(Tear::None);
        assert!(s.file_names().is_empty());

        let _pending = s.create("other").unwrap();
        s.fail_dir_syncs(Fault::Eio, 1);
        assert!(s.redb_backend("db").is_err());
        let _b = s.redb_backend("db").unwrap();
        s.crash(Tear::None);
        assert_eq!(s.file_names(), vec!["db".to_owned()]);
    }

    #[test]
    fn a_second_database_is_refused_until_the_first_closes_or_crashes() {
        let s = SimStorage::new();
        let open = || Database::builder().create_with_backend(s.redb_backend("db").unwrap());
        let first = open().unwrap();
        assert!(matches!(open(), Err(DatabaseError::DatabaseAlreadyOpen)));
        drop(first);
        let first = open().unwrap();
        s.crash(Tear::None);
        let second = open().unwrap();
        drop(first);
        assert!(
            matches!(open(), Err(DatabaseError::DatabaseAlreadyOpen)),
            "the dead database's close released nothing of the live one"
        );
        drop(second);
    }

    /// SplitMix64: the seeded generator of the randomized tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `0..n` (near enough), `n > 0`.
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn below_usize(&mut self, n: usize) -> usize {
            usize::try_from(self.below(n as u64)).unwrap()
        }
    }

    /// Bytes of unsynced writes of the most recently written file: what a tear chooses from.
    fn torn_candidates(s: &SimStorage) -> usize {
        let d = s.disk();
        let Some(inode) = d.last_written.and_then(|id| d.inodes.get(&id)) else {
            return 0;
        };
        match &inode.ops {
            Some(ops) => ops
                .iter()
                .map(|op| match op {
                    Op::Write { bytes, .. } => bytes.len(),
                    Op::SetLen(_) => 0,
                })
                .sum(),
            None => inode.data.len().saturating_sub(inode.dirty_from),
        }
    }

    /// When and how a [`CrashingBackend`] crashes the disk.
    #[derive(Debug)]
    struct CrashPlan {
        /// Mutating operations (writes, resizes, syncs) let through before the crash.
        ops_left: u64,
        /// 0: `Tear::None`, 1: `Tear::Prefix`, 2: `Tear::PrefixThenZeros`.
        kind: u64,
        /// Random draws for the tear's `keep` and `zeros_from`.
        keep: u64,
        zeros: u64,
        fired: Option<Tear>,
    }

    impl CrashPlan {
        fn random(rng: &mut Rng, max_ops: u64) -> Self {
            Self {
                ops_left: rng.below(max_ops),
                kind: rng.below(3),
                keep: rng.next(),
                zeros: rng.next(),
                fired: None,
            }
        }

        fn fire(&mut self, s: &SimStorage) {
            if self.fired.is_some() {
                return;
            }
            let candidates = torn_candidates(s) as u64;
            // Tear inside the unsynced bytes, or keep them all, about as often.
            let keep = usize::try_from(self.keep % (candidates + candidates / 4 + 1)).unwrap();
            let zeros_from = usize::try_from(self.zeros % (keep as u64 + 1)).unwrap();
            let tear = match self.kind {
                0 => Tear::None,
                1 => Tear::Prefix { keep },
                _ => Tear::PrefixThenZeros { keep, zeros_from },
            };
            s.crash(tear);
            self.fired = Some(tear);
        }
    }

    /// A backend that crashes the whole disk just before its plan's next mutating operation,
    /// which then fails (its handle is dead).
    #[derive(Debug)]
    struct CrashingBackend {
        inner: SimRedbBackend,
        sim: SimStorage,
        plan: Arc<Mutex<CrashPlan>>,
    }

    impl CrashingBackend {
        fn tick(&self) {
            let mut plan = self.plan.lock().unwrap();
            if plan.ops_left == 0 {
                plan.fire(&self.sim);
            } else {
                plan.ops_left -= 1;
            }
        }
    }

    impl StorageBackend for CrashingBackend {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.tick();
            self.inner.set_len(len)
        }

        fn sync_data(&self) -> io::Result<()> {
            self.tick();
            self.inner.sync_data()
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.tick();
            self.inner.write(offset, data)
        }

        fn close(&self) -> io::Result<()> {
            self.inner.close()
        }

        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(start, end)
        }

        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }

        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(start, end)
        }
    }

    const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    /// Holds the index of the last transaction committed.
    const LAST: u64 = u64::MAX;

    /// One transaction of the randomized test: keys set (`Some`) or removed (`None`).
    type Txn = Vec<(u64, Option<Vec<u8>>)>;

    fn random_txn(rng: &mut Rng, index: usize) -> Txn {
        (0..1 + rng.below(6))
            .map(|_| {
                let key = rng.below(48);
                if rng.below(5) == 0 {
                    return (key, None);
                }
                let len = match rng.below(4) {
                    0 => rng.below_usize(6000),
                    _ => rng.below_usize(200),
                };
                let mut value = format!("txn {index} key {key}:").into_bytes();
                value.extend((0..len).map(|_| rng.next() as u8));
                (key, Some(value))
            })
            .collect()
    }

    fn commit(db: &Database, index: usize, txn: &Txn) -> Result<(), redb::Error> {
        let mut w = db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        {
            let mut table = w.open_table(TABLE)?;
            for (key, value) in txn {
                match value {
                    Some(v) => {
                        table.insert(key, v.as_slice())?;
                    }
                    None => {
                        table.remove(key)?;
                    }
                }
            }
            table.insert(LAST, (index as u64).to_le_bytes().as_slice())?;
        }
        w.commit()?;
        Ok(())
    }

    /// Checks that `db` holds exactly the transactions of `history`, or those and `in_flight`
    /// (a commit the crash interrupted), and records which it was.
    fn check(db: &Database, history: &mut Vec<Txn>, in_flight: &mut Option<Txn>, ctx: &str) {
        let r = db.begin_read().unwrap();
        let mut found = BTreeMap::new();
        match r.open_table(TABLE) {
            Ok(table) => {
                for entry in table.iter().unwrap() {
                    let (k, v) = entry.unwrap();
                    found.insert(k.value(), v.value().to_vec());
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => panic!("{ctx}: {e}"),
        }
        let applied = found.remove(&LAST).map_or(0, |v| {
            usize::try_from(u64::from_le_bytes(v.try_into().unwrap())).unwrap() + 1
        });
        let pending = in_flight.take();
        if applied == history.len() + 1 {
            history.push(pending.unwrap_or_else(|| {
                panic!(
                    "{ctx}: {applied} transactions visible, {} committed",
                    history.len()
                )
            }));
        }
        assert_eq!(
            applied,
            history.len(),
            "{ctx}: a committed transaction is missing"
        );
        let mut expected = BTreeMap::new();
        for txn in history.iter() {
            for (key, value) in txn {
                match value {
                    Some(v) => expected.insert(*key, v.clone()),
                    None => expected.remove(key),
                };
            }
        }
        assert!(
            found == expected,
            "{ctx}: the database does not hold exactly the {applied} transactions"
        );
    }

    /// The first bytes of a `redb` file.
    const REDB_MAGIC: &[u8] = b"redb\x1a\x0a\xa9\x0d\x0a";

    /// `redb` writes its magic number last when it creates a database (after a sync), and
    /// refuses a non-empty file without it: a crash while creating leaves a file that no open
    /// accepts. Nothing can have been committed to such a file (the magic number is durable
    /// before `create` returns, and a torn overwrite of the header rewrites it with the same
    /// bytes), so it is emptied, to be created again: what the tracker has to do at start-up.
    /// The test checks that this never happens once a `create` has returned.
    fn reset_unfinished_creation(s: &SimStorage, created: bool, tally: &mut Tally, ctx: &str) {
        let file = s.contents(DB_FILE).unwrap_or_default();
        if file.is_empty() || file.starts_with(REDB_MAGIC) {
            return;
        }
        assert!(
            !created,
            "{ctx}: the magic number of a created database vanished"
        );
        tally.unfinished_creations += 1;
        let b = s.redb_backend(DB_FILE).unwrap();
        b.set_len(0).unwrap();
        b.sync_data().unwrap();
    }

    const DB_FILE: &str = "meta.redb";

    /// Counts of what the randomized cases did, to see that they exercise what they should.
    #[derive(Debug, Default)]
    struct Tally {
        unfinished_creations: u64,
        crashes_in_open: u64,
        crashes_in_commit: u64,
        crashes_after: u64,
        in_flight_survived: u64,
        tears: [u64; 3],
        commits: u64,
    }

    fn redb_case(seed: u64, tally: &mut Tally) {
        const ROUNDS: usize = 3;
        const MAX_OPS: u64 = 100;
        const MAX_TXNS: usize = 8;
        let mut rng = Rng(seed);
        let s = SimStorage::new();
        // A WAL beside the database, so that the crash tears one or the other.
        let mut wal = s.create("wal").unwrap();
        s.sync_dir().unwrap();
        let (mut wal_bytes, mut wal_synced) = (Vec::new(), 0);
        let mut history: Vec<Txn> = Vec::new();
        let mut in_flight: Option<Txn> = None;
        // Whether a `create` ever returned: the magic number is durable from then on.
        let mut created = false;
        for round in 0..ROUNDS {
            let ctx = format!("seed {seed:#x} round {round}");
            reset_unfinished_creation(&s, created, tally, &ctx);
            let plan = Arc::new(Mutex::new(CrashPlan::random(&mut rng, MAX_OPS)));
            let backend = CrashingBackend {
                inner: s.redb_backend(DB_FILE).unwrap(),
                sim: s.clone(),
                plan: Arc::clone(&plan),
            };
            let db = match Database::builder().create_with_backend(backend) {
                Ok(db) => {
                    created = true;
                    Some(db)
                }
                Err(e) => {
                    assert!(
                        plan.lock().unwrap().fired.is_some(),
                        "{ctx}: open failed without a crash: {e}"
                    );
                    tally.crashes_in_open += 1;
                    None
                }
            };
            if let Some(db) = db {
                if plan.lock().unwrap().fired.is_none() {
                    let in_flight_before = in_flight.is_some();
                    let before = history.len();
                    check(&db, &mut history, &mut in_flight, &ctx);
                    if in_flight_before && history.len() > before {
                        tally.in_flight_survived += 1;
                    }
                    for _ in 0..MAX_TXNS {
                        let txn = random_txn(&mut rng, history.len());
                        let result = commit(&db, history.len(), &txn);
                        let crashed = plan.lock().unwrap().fired.is_some();
                        match result {
                            // Acknowledged: it must survive, crash or not.
                            Ok(()) => history.push(txn),
                            Err(_) if crashed => in_flight = Some(txn),
                            Err(e) => panic!("{ctx}: commit failed without a crash: {e}"),
                        }
                        if crashed {
                            tally.crashes_in_commit += 1;
                            break;
                        }
                        tally.commits += 1;
                        // Some WAL traffic, synced or not.
                        let record = vec![history.len() as u8; rng.below_usize(300)];
                        assert_eq!(wal.append(&[IoSlice::new(&record)]).unwrap(), record.len());
                        wal_bytes.extend_from_slice(&record);
                        if rng.below(2) == 0 {
                            wal.sync_data().unwrap();
                            wal_synced = wal_bytes.len();
                        }
                    }
                }
                let mut plan = plan.lock().unwrap();
                if plan.fired.is_none() {
                    plan.fire(&s);
                    tally.crashes_after += 1;
                }
                // The dead process's database goes away; nothing it does reaches the disk.
                drop(plan);
                drop(db);
            }
            let tear = plan.lock().unwrap().fired.unwrap();
            tally.tears[match tear {
                Tear::None => 0,
                Tear::Prefix { .. } => 1,
                Tear::PrefixThenZeros { .. } => 2,
            }] += 1;
            let now = s.contents("wal").unwrap();
            assert!(
                now.len() >= wal_synced
                    && now.len() <= wal_bytes.len()
                    && now[..wal_synced] == wal_bytes[..wal_synced],
                "{ctx}: the WAL lost synced bytes"
            );
            wal_bytes = now;
            wal_synced = wal_bytes.len();
            wal = s.open("wal").unwrap();
        }
        let ctx = format!("seed {seed:#x} after the last crash");
        reset_unfinished_creation(&s, created, tally, &ctx);
        let db = Database::builder()
            .create_with_backend(s.redb_backend(DB_FILE).unwrap())
            .unwrap_or_else(|e| panic!("{ctx}: the database does not open: {e}"));
        check(&db, &mut history, &mut in_flight, &ctx);
        commit(&db, history.len(), &random_txn(&mut rng, history.len()))
            .unwrap_or_else(|e| panic!("{ctx}: cannot commit: {e}"));
    }

    /// A `redb` database on the simulated disk, crashed at random points (inside opens and
    /// commits, or between them) with every kind of tear, keeps every committed transaction
    /// whole, shows no part of an uncommitted one, and always opens again.
    #[test]
    fn redb_survives_crashes_anywhere() {
        let mut tally = Tally::default();
        for case in 0..200u64 {
            redb_case(0x5EED_0000 + case, &mut tally);
        }
        eprintln!("{tally:?}");
        assert!(
            tally.crashes_in_commit > 50 && tally.crashes_in_open > 5,
            "{tally:?}"
        );
        assert!(tally.tears.iter().all(|&n| n > 50), "{tally:?}");
    }
}
