//! The `Storage` trait: every byte the WAL reads or writes goes through it.
//!
//! Two implementations: [`FileStorage`] (a real directory) and
//! [`SimStorage`](super::sim::SimStorage) (an in-memory disk for tests that can crash, tear
//! writes, flip bits and fail on command).
//!
//! # Contract
//! - A `Storage` is one flat directory. Names are plain file names (no separators).
//! - [`StorageFile::append`] writes at the end of the file and returns how many bytes it wrote
//!   (possibly fewer than offered, as `write(2)` may). Nothing it wrote is durable until
//!   [`StorageFile::sync_data`] returns `Ok`.
//! - A newly created or removed name is durable only after [`Storage::sync_dir`] returns `Ok`.
//! - [`StorageFile::truncate`] is durable after the next successful `sync_data`.
//! - Reads see every byte written so far, durable or not.
//! - Errors are `std::io::Error`s; `ErrorKind::StorageFull` means "out of space" (`ENOSPC`).

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// An open file of a [`Storage`].
pub trait StorageFile: Send + Sync + Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at end of file.
    ///
    /// # Errors
    /// I/O errors from the medium.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Appends (part of) `bufs` at the end of the file; returns the number of bytes written.
    ///
    /// # Errors
    /// I/O errors; `ErrorKind::StorageFull` when the medium is full and nothing was written.
    fn append(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Makes every byte written so far (and the file size) durable, like `fdatasync(2)`.
    ///
    /// # Errors
    /// I/O errors. After an error the state of unsynced data is unknown.
    fn sync_data(&self) -> io::Result<()>;

    /// Current length of the file in bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn len(&self) -> io::Result<u64>;

    /// True if the file holds no bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Cuts the file to `len` bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn truncate(&self, len: u64) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// `ErrorKind::UnexpectedEof` if the file ends first; I/O errors.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file ends before the requested range",
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Something that holds the directory's lock until dropped.
pub trait LockGuard: Send + Sync + Debug {}

/// A flat directory of files.
pub trait Storage: Send + Sync + Debug {
    /// Human-readable location, used in error messages.
    fn describe(&self) -> String;

    /// Names of the files in the directory.
    ///
    /// # Errors
    /// I/O errors.
    fn list(&self) -> io::Result<Vec<String>>;

    /// Creates a new, empty file; fails with `AlreadyExists` if the name is taken.
    ///
    /// # Errors
    /// I/O errors.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;

    /// Opens an existing file for reading and appending.
    ///
    /// # Errors
    /// `NotFound` and other I/O errors.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;

    /// Removes a file. Durable after [`Storage::sync_dir`].
    ///
    /// # Errors
    /// I/O errors.
    fn remove(&self, name: &str) -> io::Result<()>;

    /// Makes creations and removals durable (fsync of the directory).
    ///
    /// # Errors
    /// I/O errors.
    fn sync_dir(&self) -> io::Result<()>;

    /// When the file was last modified.
    ///
    /// # Errors
    /// I/O errors.
    fn modified(&self, name: &str) -> io::Result<SystemTime>;

    /// Free and total space of the file system holding the directory, for the free-space floor
    /// (`None` where unknown: no floor then).
    ///
    /// # Errors
    /// I/O errors.
    fn space(&self) -> io::Result<Option<crate::space::DiskSpace>> {
        Ok(None)
    }

    /// Takes the directory's exclusive lock, held until the guard is dropped (or the process
    /// dies). Fails with `WouldBlock` if another holder has it; the error message then says
    /// who holds it, when that is known.
    ///
    /// # Errors
    /// `WouldBlock` when held elsewhere; I/O errors.
    fn lock(&self) -> io::Result<Box<dyn LockGuard>>;
}

/// The name of the lock file inside a WAL directory.
pub const LOCK_FILE: &str = "LOCK";

/// [`Storage`] on a real directory.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
}

impl FileStorage {
    /// Uses `dir`, creating it (and its parents) if needed.
    ///
    /// # Errors
    /// I/O errors creating the directory.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

#[derive(Debug)]
struct RealFile {
    file: File,
}

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
    }

    fn append(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // The file is opened with O_APPEND: every write lands at the current end.
        (&self.file).write_vectored(bufs)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

#[derive(Debug)]
struct FileLock {
    _file: File,
}

impl LockGuard for FileLock {}

impl Storage for FileStorage {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.path(name))?;
        Ok(Arc::new(RealFile { file }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(self.path(name))?;
        Ok(Arc::new(RealFile { file }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn space(&self) -> io::Result<Option<crate::space::DiskSpace>> {
        crate::space::disk_space(&self.dir).map(Some)
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        std::fs::metadata(self.path(name))?.modified()
    }

    fn lock(&self) -> io::Result<Box<dyn LockGuard>> {
        let path = self.path(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("another process ({holder})")
                };
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is locked by {who}", path.display()),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // Record who holds the lock, for the error message of a second opener.
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "pid {}", std::process::id())?;
        Ok(Box::new(FileLock { _file: file }))
    }
}
