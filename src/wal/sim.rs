//! An in-memory [`Storage`] for tests: a disk that can crash, tear the last write, flip bits and
//! fail on command.
//!
//! The model, per file: `data` (what reads see) and `synced` (what survives a crash). Appends
//! change `data`; [`StorageFile::sync_data`] copies `data` to `synced`. Per directory: the live
//! names and the durable names; [`Storage::sync_dir`] makes the live names durable. A crash
//! ([`SimStorage::crash`]) throws away every unsynced byte and every unsynced creation or
//! removal, optionally keeping a torn part of the last write, and kills every handle opened
//! before it (the process that held them is gone), including the directory lock.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

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
    /// Lowest offset changed since the last sync.
    dirty_from: usize,
    modified: u64,
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
    sync_delay: Duration,
    clock_secs: u64,
    stats: SimStats,
}

/// Operation counts of a [`SimStorage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Successful `append` calls.
    pub appends: u64,
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
                sync_delay: Duration::ZERO,
                clock_secs: 1_700_000_000,
                stats: SimStats::default(),
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
    /// before returns errors from now on, and the directory lock is released.
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
            let mut after = inode.synced.clone();
            if Some(id) == last && inode.dirty_from < inode.data.len() {
                let base = inode.dirty_from.min(inode.synced.len());
                let unsynced = &inode.data[inode.dirty_from..];
                after.truncate(base);
                match tear {
                    Tear::None => after.clone_from(&inode.synced),
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
            inode.data.clone_from(&after);
            inode.synced = after;
            inode.dirty_from = inode.data.len();
        }
    }

    /// Flips bit `bit` (0..8) of byte `offset` of file `name`, on the medium itself (durable
    /// and in-memory copies alike). Returns false if there is no such byte.
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
        inode.data[off] ^= 1 << (bit % 8);
        if off < inode.synced.len() {
            inode.synced[off] ^= 1 << (bit % 8);
        }
        true
    }

    /// The next `times` appends fail with `fault` (nothing is written).
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
    /// not fit writes what fits, then fails with `ENOSPC`.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.disk().capacity = bytes;
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
        inode.modified = now;
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
        let room = match d.capacity {
            Some(cap) => usize::try_from(cap.saturating_sub(d.used())).unwrap_or(usize::MAX),
            None => usize::MAX,
        };
        if wanted > 0 && room == 0 {
            return Err(Fault::Enospc.error("write"));
        }
        let n = wanted.min(room);
        let now = d.clock_secs;
        let inode = d.inode(self.inode)?;
        inode.dirty_from = inode.dirty_from.min(inode.data.len());
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            inode.data.extend_from_slice(&b[..take]);
            left -= take;
        }
        inode.modified = now;
        d.last_written = Some(self.inode);
        d.stats.appends += 1;
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = self.disk().sync_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut d = self.disk();
        d.check_epoch(self.epoch)?;
        if !d.sync_faults.is_empty() {
            let fault = d.sync_faults.remove(0);
            return Err(fault.error("fsync"));
        }
        let inode = d.inode(self.inode)?;
        let from = inode.dirty_from.min(inode.synced.len());
        inode.synced.truncate(from);
        let tail = &inode.data[from.min(inode.data.len())..];
        inode.synced.extend_from_slice(tail);
        inode.synced.truncate(inode.data.len());
        inode.dirty_from = inode.data.len();
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
        if len < inode.data.len() {
            inode.data.truncate(len);
        } else {
            inode.data.resize(len, 0);
        }
        inode.dirty_from = inode.dirty_from.min(len);
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
}
