//! Read-only inspection of a WAL directory: the logic behind `receiver-node wal list`,
//! `wal verify` and `wal dump`.
//!
//! Nothing here takes the directory lock, writes, truncates or removes anything: every segment
//! file is read in full with `std::fs` and classified with the same pure function recovery
//! uses ([`scan_segment`]), so every record checksum is verified and the verdict (record, torn
//! tail, damage) is exactly the one [`Wal::open`](crate::Wal::open) would reach. That makes
//! it safe on a live directory. There, the newest segment may end in a write in progress,
//! which shows as a torn tail, and a segment deleted by cleanup between listing and reading is
//! reported as vanished rather than as an error.

use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::codec::{decode_frame, Frame};
use crate::recovery::{scan_segment, CorruptRegion, HeaderState};
use crate::storage::LOCK_FILE;
use crate::{parse_segment_name, segment_name, WalPosition};

/// Errors of the inspector.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The directory does not exist.
    #[error("WAL directory {} does not exist", .0.display())]
    NoSuchDir(PathBuf),
    /// The path exists but is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADir(PathBuf),
    /// Reading the directory or a segment failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing the output failed (for example a closed pipe).
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
}

impl InspectError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        InspectError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The files of a WAL directory, as listed once.
#[derive(Debug, Clone, Default)]
pub struct DirListing {
    /// The directory.
    pub dir: PathBuf,
    /// Segment ids, oldest first.
    pub segments: Vec<u64>,
    /// Names that are neither segments nor the lock file (left alone, reported).
    pub ignored: Vec<String>,
}

impl DirListing {
    /// The path of segment `id`.
    #[must_use]
    pub fn path_of(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }
}

/// Lists the segment files of `dir`.
///
/// # Errors
/// [`InspectError::NoSuchDir`], [`InspectError::NotADir`], [`InspectError::Io`].
pub fn list_dir(dir: &Path) -> Result<DirListing, InspectError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(InspectError::NotADir(dir.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(InspectError::NoSuchDir(dir.to_path_buf()))
        }
        Err(e) => return Err(InspectError::io("stat", dir, e)),
    }
    let mut listing = DirListing {
        dir: dir.to_path_buf(),
        ..DirListing::default()
    };
    let entries = std::fs::read_dir(dir).map_err(|e| InspectError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| InspectError::io("list", dir, e))?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_segment_name) {
            Some(id) => listing.segments.push(id),
            None if name == LOCK_FILE => {}
            None => listing.ignored.push(name.to_string_lossy().into_owned()),
        }
    }
    listing.segments.sort_unstable();
    listing.ignored.sort();
    Ok(listing)
}

/// Reads a whole segment file; `None` if it no longer exists (deleted by cleanup meanwhile).
fn read_segment(path: &Path) -> Result<Option<Vec<u8>>, InspectError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(InspectError::io("read", path, e)),
    }
}

/// What one segment holds.
#[derive(Debug, Clone)]
pub struct SegmentReport {
    /// Segment id.
    pub id: u64,
    /// File name.
    pub name: String,
    /// File size in bytes (as read).
    pub size: u64,
    /// Whether this was the newest segment when the directory was listed (only the newest
    /// can have a torn tail or be half-created).
    pub newest: bool,
    /// State of the segment header.
    pub header: HeaderState,
    /// Intact (checksum-verified) records.
    pub records: u64,
    /// Payload bytes of the intact records.
    pub record_bytes: u64,
    /// Damaged ranges (a damaged header is a region at offset 0 with 0 records).
    pub corrupt: Vec<CorruptRegion>,
    /// A torn tail: `(offset, bytes)`. Recovery would truncate it.
    pub torn_tail: Option<(u64, u64)>,
}

impl SegmentReport {
    /// Analyses the bytes of segment `id`.
    #[must_use]
    pub fn analyse(id: u64, data: &[u8], newest: bool) -> Self {
        let scan = scan_segment(id, data, newest);
        SegmentReport {
            id,
            name: segment_name(id),
            size: data.len() as u64,
            newest,
            records: scan.records.len() as u64,
            record_bytes: scan.record_bytes(),
            header: scan.header,
            corrupt: scan.corrupt,
            torn_tail: scan.torn_tail,
        }
    }

    /// True if the segment holds damage (not counting a torn tail or a half-created file).
    #[must_use]
    pub fn is_corrupt(&self) -> bool {
        !self.corrupt.is_empty()
    }

    /// True if the newest segment is only a partial header (a crash while creating it).
    #[must_use]
    pub fn is_half_created(&self) -> bool {
        self.header == HeaderState::TornCreation
    }

    /// One-word-or-so status: `ok`, `torn tail at OFFSET (N bytes)`, `N damaged regions`,
    /// `half-created`, or several of them joined by `, `.
    #[must_use]
    pub fn status(&self) -> String {
        if self.is_half_created() {
            return "half-created".to_owned();
        }
        let mut parts = Vec::new();
        if !self.corrupt.is_empty() {
            parts.push(plural(self.corrupt.len() as u64, "damaged region"));
        }
        if let Some((off, bytes)) = self.torn_tail {
            parts.push(format!("torn tail at {off} ({bytes} bytes)"));
        }
        if parts.is_empty() {
            "ok".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Everything found in a WAL directory.
#[derive(Debug, Clone, Default)]
pub struct DirReport {
    /// The directory.
    pub dir: PathBuf,
    /// Segments, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Segments listed but gone before they could be read (cleanup on a live directory).
    pub vanished: Vec<u64>,
    /// Other files in the directory (not segments, not the lock file).
    pub ignored: Vec<String>,
}

/// Totals over a [`DirReport`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Segments read.
    pub segments: u64,
    /// Intact records.
    pub records: u64,
    /// Payload bytes of intact records.
    pub record_bytes: u64,
    /// Bytes of all segment files.
    pub file_bytes: u64,
    /// Torn tails (at most one, in the newest segment).
    pub torn_tails: u64,
    /// Bytes in torn tails.
    pub torn_bytes: u64,
    /// Half-created segments (at most one, the newest).
    pub half_created: u64,
    /// Damaged regions.
    pub damaged_regions: u64,
    /// Bytes in damaged regions.
    pub damaged_bytes: u64,
    /// Records lost to damage (a region whose count is unknowable counts as one).
    pub records_lost: u64,
    /// True if `records_lost` is exact, false if it is a lower bound.
    pub records_lost_exact: bool,
}

impl DirReport {
    /// Totals over all segments.
    #[must_use]
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            records_lost_exact: true,
            ..Totals::default()
        };
        for s in &self.segments {
            t.segments += 1;
            t.records += s.records;
            t.record_bytes += s.record_bytes;
            t.file_bytes += s.size;
            if let Some((_, bytes)) = s.torn_tail {
                t.torn_tails += 1;
                t.torn_bytes += bytes;
            }
            if s.is_half_created() {
                t.half_created += 1;
            }
            for c in &s.corrupt {
                t.damaged_regions += 1;
                t.damaged_bytes += c.bytes;
                t.records_lost += c.records_at_least();
                t.records_lost_exact &= c.records.is_some();
            }
        }
        t
    }

    /// True if any segment holds damage. A torn tail or a half-created newest segment is a
    /// crash artefact (or, on a live directory, a write in progress), not damage.
    #[must_use]
    pub fn is_corrupt(&self) -> bool {
        self.segments.iter().any(SegmentReport::is_corrupt)
    }
}

/// Reads and verifies every segment of `dir`. Read-only; takes no lock.
///
/// # Errors
/// [`InspectError::NoSuchDir`], [`InspectError::NotADir`], [`InspectError::Io`].
pub fn inspect_dir(dir: &Path) -> Result<DirReport, InspectError> {
    let listing = list_dir(dir)?;
    let mut report = DirReport {
        dir: listing.dir.clone(),
        ignored: listing.ignored.clone(),
        ..DirReport::default()
    };
    let last = listing.segments.len().saturating_sub(1);
    for (i, &id) in listing.segments.iter().enumerate() {
        match read_segment(&listing.path_of(id))? {
            Some(data) => report
                .segments
                .push(SegmentReport::analyse(id, &data, i == last)),
            None => report.vanished.push(id),
        }
    }
    Ok(report)
}

/// Something [`dump`] came across, in log order.
#[derive(Debug, Clone, Copy)]
pub enum DumpEvent<'a> {
    /// An intact record.
    Record {
        /// Segment id.
        segment: u64,
        /// Offset of the record's frame in the segment file.
        offset: u64,
        /// The payload.
        payload: &'a [u8],
    },
    /// A damaged range (its records are not shown: they do not verify).
    Damaged(&'a CorruptRegion),
    /// A torn tail at the end of the newest segment.
    TornTail {
        /// Segment id.
        segment: u64,
        /// Offset of the first torn byte.
        offset: u64,
        /// Bytes in the tail.
        bytes: u64,
    },
    /// The newest segment is only a partial header.
    HalfCreated {
        /// Segment id.
        segment: u64,
        /// File size.
        bytes: u64,
    },
    /// A listed segment was deleted before it could be read.
    Vanished {
        /// Segment id.
        segment: u64,
    },
}

/// Walks the records of `dir` in log order from `from` (inclusive: records whose frame starts
/// at or after it; an offset inside the segment header means the first record), calling `f`
/// for each record and for each damaged range, torn tail or half-created segment met on the
/// way. Stops early when `f` returns `Break`. Segments before `from.segment` are not read.
///
/// # Errors
/// As [`inspect_dir`]; [`InspectError::Output`] when `f` fails.
pub fn dump<F>(dir: &Path, from: WalPosition, mut f: F) -> Result<(), InspectError>
where
    F: FnMut(DumpEvent<'_>) -> io::Result<ControlFlow<()>>,
{
    let listing = list_dir(dir)?;
    let last = listing.segments.len().saturating_sub(1);
    let mut emit = |e: DumpEvent<'_>| f(e).map_err(InspectError::Output);
    for (i, &id) in listing.segments.iter().enumerate() {
        if id < from.segment {
            continue;
        }
        let start = if id == from.segment { from.offset } else { 0 };
        let Some(data) = read_segment(&listing.path_of(id))? else {
            if emit(DumpEvent::Vanished { segment: id })?.is_break() {
                return Ok(());
            }
            continue;
        };
        let scan = scan_segment(id, &data, i == last);
        if scan.header == HeaderState::TornCreation {
            if emit(DumpEvent::HalfCreated {
                segment: id,
                bytes: data.len() as u64,
            })?
            .is_break()
            {
                return Ok(());
            }
            continue;
        }
        // Records and damage interleaved by offset; the torn tail, if any, comes last.
        let mut damage = scan
            .corrupt
            .iter()
            .filter(|c| c.offset + c.bytes > start)
            .peekable();
        for r in scan.records.iter().filter(|r| r.offset >= start) {
            while let Some(c) = damage.next_if(|c| c.offset < r.offset) {
                if emit(DumpEvent::Damaged(c))?.is_break() {
                    return Ok(());
                }
            }
            let Some(frame) = usize::try_from(r.offset)
                .ok()
                .and_then(|off| data.get(off..))
            else {
                continue;
            };
            // Re-decode: the payload handed out is the one whose checksum was just verified.
            let Frame::Record { payload, .. } = decode_frame(id, frame, u32::MAX) else {
                continue;
            };
            let ev = DumpEvent::Record {
                segment: id,
                offset: r.offset,
                payload,
            };
            if emit(ev)?.is_break() {
                return Ok(());
            }
        }
        for c in damage {
            if emit(DumpEvent::Damaged(c))?.is_break() {
                return Ok(());
            }
        }
        if let Some((offset, bytes)) = scan.torn_tail {
            if offset + bytes > start
                && emit(DumpEvent::TornTail {
                    segment: id,
                    offset,
                    bytes,
                })?
                .is_break()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Parses a dump start position: `SEGMENT:OFFSET` or `SEGMENT` (offset 0, the first record),
/// where `SEGMENT` is an id (`3`) or a segment file name (`00000000000000000003.wal`).
///
/// # Errors
/// A message saying what is expected.
pub fn parse_position(s: &str) -> Result<WalPosition, String> {
    let (seg, off) = match s.split_once(':') {
        Some((seg, off)) => (seg.trim(), Some(off.trim())),
        None => (s.trim(), None),
    };
    let segment = parse_segment_name(seg)
        .or_else(|| seg.parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "invalid position {s:?}: expected SEGMENT:OFFSET, where SEGMENT is a segment id \
                 or file name and OFFSET a byte offset"
            )
        })?;
    let offset = match off {
        None => 0,
        Some(o) => o
            .parse::<u64>()
            .map_err(|_| format!("invalid offset {o:?} in position {s:?}: expected a number"))?,
    };
    Ok(WalPosition { segment, offset })
}

/// `1 record`, `2 records`.
#[doc(hidden)]
pub fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_frame, encode_header};

    fn segment(id: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut v = encode_header(id).to_vec();
        for p in payloads {
            encode_frame(id, p, &mut v);
        }
        v
    }

    #[test]
    fn positions_parse() {
        assert_eq!(
            parse_position("3:120"),
            Ok(WalPosition {
                segment: 3,
                offset: 120
            })
        );
        assert_eq!(
            parse_position("00000000000000000007.wal:5"),
            Ok(WalPosition {
                segment: 7,
                offset: 5
            })
        );
        assert_eq!(
            parse_position("4"),
            Ok(WalPosition {
                segment: 4,
                offset: 0
            })
        );
        for bad in ["", "x:1", "1:y", "1:-2", ":"] {
            assert!(parse_position(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_strings() {
        let data = segment(2, &[b"one", b"two", b"three"]);
        let ok = SegmentReport::analyse(2, &data, true);
        assert_eq!((ok.records, ok.status().as_str()), (3, "ok"));

        let torn = SegmentReport::analyse(2, &data[..data.len() - 2], true);
        let last = data.len() as u64 - (8 + 5);
        assert_eq!(torn.status(), format!("torn tail at {last} (11 bytes)"));
        assert!(!torn.is_corrupt());

        let older = SegmentReport::analyse(2, &data[..data.len() - 2], false);
        assert_eq!(older.status(), "1 damaged region");
        assert!(older.is_corrupt());

        let half = SegmentReport::analyse(2, &data[..10], true);
        assert_eq!(half.status(), "half-created");
        assert!(!half.is_corrupt());
    }
}
