//! Disk space for the WAL and everything else that writes: recognising a full disk
//! (`ENOSPC`, `EDQUOT`), reading free space (`statvfs(2)`), and the free-space floor.

use std::io;

/// True if `e` is "no space left" (`ENOSPC`) or "quota exceeded" (`EDQUOT`).
pub fn is_no_space_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// True if `e`, or any error in its `source()` chain, is an [`io::Error`] for which
/// [`is_no_space_io`] holds.
pub fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if is_no_space_io(io) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Free and total bytes of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes available to this (unprivileged) process.
    pub available: u64,
    /// The file system's size.
    pub total: u64,
}

/// The free-space floor for a file system of `total` bytes: the smaller of `min_free_bytes` and
/// 5 % of the file system (so that a small disk can still be used). 0 disables the floor.
pub fn floor(min_free_bytes: u64, total: u64) -> u64 {
    min_free_bytes.min(total / 20)
}

/// Free space on the file system holding `path` (`statvfs(2)`).
///
/// # Errors
/// I/O errors.
pub fn disk_space(path: &std::path::Path) -> io::Result<DiskSpace> {
    let s = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(DiskSpace {
        available: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_found_through_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing a batch")]
        struct Outer(#[source] io::Error);
        let full = Outer(io::Error::new(io::ErrorKind::StorageFull, "no space"));
        assert!(is_no_space(&full));
        let quota = io::Error::new(io::ErrorKind::QuotaExceeded, "quota");
        assert!(is_no_space(&quota));
        let other = Outer(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        assert!(!is_no_space(&other));
    }

    #[test]
    fn the_floor_is_a_fraction_on_small_disks() {
        assert_eq!(floor(256 << 20, 100 << 30), 256 << 20);
        assert_eq!(floor(256 << 20, 8 << 20), (8 << 20) / 20);
        assert_eq!(floor(0, 100 << 30), 0);
        let here = disk_space(std::path::Path::new(".")).unwrap();
        assert!(here.total >= here.available && here.total > 0, "{here:?}");
    }
}
