//! Reading: random reads by handle and sequential scans, both checksum-verified.

use std::sync::Arc;

use bytes::Bytes;

use super::codec::{decode_frame, frame_size, Frame, FRAME_HEADER_LEN};
use super::{
    first_record_offset, segment_name, RecordHandle, Result, Shared, StorageFile, WalError,
    WalPosition,
};

/// Reads one record by handle.
pub(crate) fn read(shared: &Shared, h: RecordHandle) -> Result<Bytes> {
    let file = {
        let segs = shared.lock_segments();
        let info = segs.map.get(&h.segment).ok_or_else(|| WalError::NotFound {
            segment: h.segment,
            offset: h.offset,
            reason: "no such segment (deleted by cleanup, or never written)".to_owned(),
        })?;
        if h.offset < first_record_offset() || h.offset + frame_size(h.len as usize) > info.len {
            return Err(WalError::NotFound {
                segment: h.segment,
                offset: h.offset,
                reason: format!("outside the segment's {} acknowledged bytes", info.len),
            });
        }
        Arc::clone(&info.file)
    };
    let mut buf = vec![0u8; FRAME_HEADER_LEN + h.len as usize];
    file.read_exact_at(&mut buf, h.offset)
        .map_err(|e| WalError::io("read", segment_name(h.segment), e))?;
    match decode_frame(h.segment, &buf, h.len) {
        Frame::Record { payload, .. } if payload.len() == h.len as usize => {
            buf.drain(..FRAME_HEADER_LEN);
            Ok(Bytes::from(buf))
        }
        Frame::Record { payload, .. } => Err(WalError::Corruption {
            segment: h.segment,
            offset: h.offset,
            reason: format!(
                "record length {} does not match the handle's {}",
                payload.len(),
                h.len
            ),
        }),
        Frame::Corrupt(e) => Err(WalError::Corruption {
            segment: h.segment,
            offset: h.offset,
            reason: e.to_string(),
        }),
        Frame::Incomplete { .. } => Err(WalError::Corruption {
            segment: h.segment,
            offset: h.offset,
            reason: "record length does not match the handle".to_owned(),
        }),
    }
}

/// A record returned by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    /// Where it lives.
    pub handle: RecordHandle,
    /// Its payload (verified).
    pub payload: Bytes,
}

/// Bytes read from a segment at a time by scans.
const SCAN_CHUNK: usize = 1 << 20;

/// A sequential scan; see [`Wal::scan`](super::Wal::scan). Yields records in log order. A
/// checksum failure is yielded as an error naming segment and offset, and ends the scan.
pub struct WalScan {
    shared: Arc<Shared>,
    pos: WalPosition,
    /// Current segment: file, readable length, pin held.
    current: Option<(Arc<dyn StorageFile>, u64, super::SegmentPin)>,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_off: u64,
    done: bool,
}

impl std::fmt::Debug for WalScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalScan").field("pos", &self.pos).finish()
    }
}

impl WalScan {
    pub(crate) fn new(shared: Arc<Shared>, from: WalPosition) -> Self {
        Self {
            shared,
            pos: from,
            current: None,
            buf: Vec::new(),
            buf_off: 0,
            done: false,
        }
    }

    /// The position of the next record the scan will look at.
    #[must_use]
    pub fn position(&self) -> WalPosition {
        self.pos
    }

    /// Opens the first segment at or after `self.pos.segment`, pinning it.
    fn open_segment(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut segs = shared.lock_segments();
        let Some((&id, info)) = segs.map.range(self.pos.segment..).next() else {
            return false;
        };
        let file = Arc::clone(&info.file);
        let len = info.len;
        *segs.pins.entry(id).or_insert(0) += 1;
        drop(segs);
        let pin = super::SegmentPin {
            shared: Arc::new(super::SharedRef(Arc::clone(&self.shared))),
            segment: id,
        };
        if id != self.pos.segment {
            self.pos = WalPosition {
                segment: id,
                offset: 0,
            };
        }
        self.pos.offset = self.pos.offset.max(first_record_offset());
        self.current = Some((file, len, pin));
        self.buf.clear();
        self.buf_off = self.pos.offset;
        true
    }

    fn next_segment(&mut self) {
        self.current = None;
        self.pos = WalPosition {
            segment: self.pos.segment + 1,
            offset: 0,
        };
    }

    /// Steps over regions skipped by recovery (adjacent ones included), if `pos` is at one.
    fn skip_known_damage(&mut self) {
        while let Some(r) = self
            .shared
            .skipped
            .iter()
            .find(|r| r.segment == self.pos.segment && r.offset == self.pos.offset)
        {
            self.pos.offset = r.offset + r.bytes;
        }
    }

    fn next_record(&mut self) -> Option<Result<WalRecord>> {
        loop {
            if self.done {
                return None;
            }
            if self.current.is_none() && !self.open_segment() {
                self.done = true;
                return None;
            }
            self.skip_known_damage();
            let (file, len, _) = self.current.as_ref()?;
            let (file, len) = (Arc::clone(file), *len);
            if self.pos.offset >= len {
                self.next_segment();
                continue;
            }
            let seg = self.pos.segment;
            let mut rel = usize::try_from(self.pos.offset - self.buf_off).unwrap_or(usize::MAX);
            if rel > self.buf.len() {
                self.buf.clear();
                self.buf_off = self.pos.offset;
                rel = 0;
            }
            let want = match decode_frame(seg, &self.buf[rel..], u32::MAX) {
                Frame::Record { payload, frame_len } => {
                    let rec = WalRecord {
                        handle: RecordHandle {
                            segment: seg,
                            offset: self.pos.offset,
                            len: payload.len() as u32,
                        },
                        payload: Bytes::copy_from_slice(payload),
                    };
                    self.pos.offset += frame_len as u64;
                    return Some(Ok(rec));
                }
                Frame::Corrupt(e) => {
                    self.done = true;
                    return Some(Err(WalError::Corruption {
                        segment: seg,
                        offset: self.pos.offset,
                        reason: e.to_string(),
                    }));
                }
                Frame::Incomplete { frame_len } => frame_len.unwrap_or(FRAME_HEADER_LEN as u64),
            };
            let avail = len - self.pos.offset;
            if want > avail || (self.buf.len() - rel) as u64 >= avail {
                self.done = true;
                return Some(Err(WalError::Corruption {
                    segment: seg,
                    offset: self.pos.offset,
                    reason: format!(
                        "record runs past the acknowledged end of {} ({len} bytes)",
                        segment_name(seg)
                    ),
                }));
            }
            // Keep the partial frame, then read at least a chunk more.
            self.buf.drain(..rel);
            self.buf_off = self.pos.offset;
            let have = self.buf.len();
            let target =
                usize::try_from(want.max(SCAN_CHUNK as u64).min(avail)).unwrap_or(usize::MAX);
            self.buf.resize(target, 0);
            if let Err(e) = file.read_exact_at(&mut self.buf[have..], self.buf_off + have as u64) {
                self.done = true;
                return Some(Err(WalError::io("read", segment_name(seg), e)));
            }
        }
    }
}

impl Iterator for WalScan {
    type Item = Result<WalRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record()
    }
}
