//! Recovery: classify every byte of every segment as a verified record, a torn tail, or damage.
//!
//! This module is pure: [`scan_segment`] looks at a segment's bytes and says what is there;
//! [`Wal::open`](super::Wal::open) then acts on it (truncates torn tails, removes a torn new
//! segment, refuses or skips damage according to [`RecoveryMode`](super::RecoveryMode)). Both
//! actions are idempotent, so a crash during recovery followed by another recovery ends in the
//! same state.
//!
//! # Torn tail or damage?
//! The writer fsyncs a segment before it creates the next one, so only the **newest** segment
//! can end in a torn write. A crash can leave the last write as a prefix of what was written,
//! possibly followed by zeros (the size reached the disk, the data blocks did not). So, at the
//! first frame F at offset X that does not verify, in the newest segment, the rest of the file
//! is a torn tail when **no intact record follows X** and one of these holds:
//! - fewer than 8 bytes remain (a partial frame header);
//! - F's length runs past the end of the file (a partial payload), and no change of up to three
//!   bits of the length field makes F verify (which would make it a complete record with a
//!   damaged length);
//! - F is complete but the file ends in zeros that start inside F or before its end (a
//!   zero-filled torn write).
//!
//! Everything else is damage: in `strict` mode recovery fails naming segment and offset; in
//! `skip_corrupt` mode the damaged range is skipped up to the next intact record (found by
//! `next_intact_frame`). Bytes lost are exact; records lost are exact when the damage is
//! confined to one record, estimated from the range's length fields when it spans several, and
//! reported as "at least one" when those do not chain.
//!
//! Two cases are ambiguous by nature, both at the end of the newest segment, where no intact
//! record follows: damage to a record that ends in zeros or is followed by zeros to the end of
//! the file (a zero-filled torn write looks the same), and damage to the length field together with other
//! damage to the record, or to more than three bits of it (a partial write looks the same).
//! Such a record, and the damaged ones after it, are truncated and reported as a torn tail (with
//! offset and size), never returned as data.

use super::codec::{
    decode_frame, decode_header, le_u32, Frame, FrameError, HeaderError, FRAME_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use super::crc_range::RangeCrc;

/// A verified record found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLoc {
    /// Offset of the frame in the segment file.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

/// A damaged byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRegion {
    /// Segment id.
    pub segment: u64,
    /// Offset of the first damaged byte.
    pub offset: u64,
    /// Damaged bytes (up to the next intact record or the end of the file).
    pub bytes: u64,
    /// Records lost in the range. Exact when the damage is confined to one record (a damaged
    /// payload or checksum, or a damaged length field, which the checksum then proves);
    /// otherwise what the length fields in the range say (damaged data themselves, so a best
    /// estimate), and `None` when they do not even chain to the end of the range (then at
    /// least one).
    pub records: Option<u64>,
    /// What was wrong at `offset`.
    pub reason: String,
}

impl CorruptRegion {
    /// Records lost, counting an unknown count as one (the lower bound).
    #[must_use]
    pub fn records_at_least(&self) -> u64 {
        self.records.unwrap_or(1)
    }
}

/// What the header of a scanned segment looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderState {
    /// Intact.
    Ok,
    /// The newest segment holds only part of a header: it was being created when the process
    /// died. It holds no records and is removed.
    TornCreation,
    /// Damaged; records after it are still verified (their checksums include the segment id).
    Damaged(HeaderError),
}

/// The result of scanning one segment.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    /// Segment id.
    pub segment: u64,
    /// File length before any repair.
    pub file_len: u64,
    /// Header state.
    pub header: HeaderState,
    /// Verified records, in order.
    pub records: Vec<RecordLoc>,
    /// Damaged ranges (including a damaged header, as a region at offset 0 with 0 records).
    pub corrupt: Vec<CorruptRegion>,
    /// A torn tail to truncate: `(offset, bytes)`.
    pub torn_tail: Option<(u64, u64)>,
}

impl SegmentScan {
    /// Where the valid data ends: appends may continue here when there is no damage.
    #[must_use]
    pub fn valid_end(&self) -> u64 {
        match self.torn_tail {
            Some((off, _)) => off,
            None => self.file_len,
        }
    }

    /// Payload bytes of verified records.
    #[must_use]
    pub fn record_bytes(&self) -> u64 {
        self.records.iter().map(|r| u64::from(r.len)).sum()
    }
}

/// Scans one segment's complete contents. `newest` enables torn-tail handling.
#[must_use]
pub fn scan_segment(segment: u64, data: &[u8], newest: bool) -> SegmentScan {
    let mut scan = SegmentScan {
        segment,
        file_len: data.len() as u64,
        header: HeaderState::Ok,
        records: Vec::new(),
        corrupt: Vec::new(),
        torn_tail: None,
    };
    match decode_header(data, segment) {
        Ok(_) => {}
        Err(e) => {
            if newest && data.len() <= SEGMENT_HEADER_LEN {
                scan.header = HeaderState::TornCreation;
                return scan;
            }
            scan.corrupt.push(CorruptRegion {
                segment,
                offset: 0,
                bytes: SEGMENT_HEADER_LEN.min(data.len()) as u64,
                records: Some(0),
                reason: format!("segment header: {e}"),
            });
            scan.header = HeaderState::Damaged(e);
            if data.len() <= SEGMENT_HEADER_LEN {
                return scan;
            }
        }
    }
    let mut resync: Option<RangeCrc<'_>> = None;
    let mut pos = SEGMENT_HEADER_LEN;
    while pos < data.len() {
        match decode_frame(segment, &data[pos..], u32::MAX) {
            Frame::Record { payload, frame_len } => {
                scan.records.push(RecordLoc {
                    offset: pos as u64,
                    len: payload.len() as u32,
                });
                pos += frame_len;
            }
            bad => {
                let rc = resync.get_or_insert_with(|| RangeCrc::new(data));
                let next = next_intact_frame(segment, data, rc, pos + 1);
                // A record whose only damage is its length field: its extent is known.
                let repaired = repaired_frame_end(segment, data, rc, pos)
                    .filter(|&e| next.is_none_or(|n| e <= n));
                // Nothing intact follows a complete damaged record at the end of the newest
                // segment: the record is the damage, and what follows it may be a torn write
                // (a crash after the damage), examined on its own.
                let damaged_then_rest = match (&bad, repaired, next) {
                    (Frame::Corrupt(FrameError::Checksum { len, .. }), None, None) if newest => {
                        Some(pos + FRAME_HEADER_LEN + *len as usize).filter(|&e| e < data.len())
                    }
                    _ => None,
                };
                // Torn if it looks torn now, or would once the rest is cut off (so that a
                // second recovery agrees with the first).
                if repaired.is_none()
                    && next.is_none()
                    && newest
                    && (is_torn_tail(data, pos, &bad)
                        || damaged_then_rest.is_some_and(|e| is_torn_tail(&data[..e], pos, &bad)))
                {
                    scan.torn_tail = Some((pos as u64, (data.len() - pos) as u64));
                    break;
                }
                let end = repaired
                    .or(next)
                    .or(damaged_then_rest)
                    .unwrap_or(data.len());
                scan.corrupt.push(CorruptRegion {
                    segment,
                    offset: pos as u64,
                    bytes: (end - pos) as u64,
                    records: repaired
                        .map(|_| 1)
                        .or_else(|| one_frame_with_damaged_length(segment, data, rc, pos, end))
                        .or_else(|| count_frames(data, pos, end)),
                    reason: describe(&bad),
                });
                pos = end;
            }
        }
    }
    scan
}

fn describe(bad: &Frame<'_>) -> String {
    match bad {
        Frame::Corrupt(e) => e.to_string(),
        Frame::Incomplete { frame_len: Some(n) } => {
            format!("record length field says {n} bytes, past the end of the segment")
        }
        Frame::Incomplete { frame_len: None } => "partial record header".to_owned(),
        Frame::Record { .. } => "intact record".to_owned(),
    }
}

/// Is the damage at `pos` (with nothing intact after it, and no repairable length) a torn
/// write? See the module docs.
fn is_torn_tail(data: &[u8], pos: usize, bad: &Frame<'_>) -> bool {
    match bad {
        Frame::Incomplete { .. } => true,
        Frame::Corrupt(_) => {
            let len = le_u32(&data[pos..]) as usize;
            let frame_end = pos + FRAME_HEADER_LEN + len;
            let zeros_from = data.len() - data.iter().rev().take_while(|&&b| b == 0).count();
            zeros_from < data.len() && zeros_from <= frame_end
        }
        Frame::Record { .. } => false,
    }
}

/// Most bits of a length field that recovery tries to correct when telling a damaged final
/// record from a torn write. Every candidate is a chance (2^-32 each) that garbage verifies, so
/// the candidates are limited: up to 3 bits gives 5,488 candidates, about one false match per
/// 780,000 crashes in the worst case, and an accidental match only makes strict recovery stop
/// and ask (it never drops data).
const LENGTH_REPAIR_BITS: u32 = 3;

/// If changing at most [`LENGTH_REPAIR_BITS`] bits of the length field at `pos` gives a frame
/// that verifies, the end of that frame: the record is complete and intact except for its
/// length (damage, not a torn write).
fn repaired_frame_end(segment: u64, data: &[u8], rc: &RangeCrc<'_>, pos: usize) -> Option<usize> {
    if pos + FRAME_HEADER_LEN > data.len() {
        return None;
    }
    let stored_len = le_u32(&data[pos..]);
    let stored_crc = le_u32(&data[pos + 4..]);
    if stored_len == 0 && stored_crc == 0 {
        return None; // zeroed space, not a damaged length
    }
    let body = pos + FRAME_HEADER_LEN;
    let fits = |mask: u32| {
        let len = stored_len ^ mask;
        let end = body + len as usize;
        (end <= data.len() && rc.extend(head_crc(segment, len), body, end) == stored_crc)
            .then_some(end)
    };
    debug_assert_eq!(LENGTH_REPAIR_BITS, 3);
    (0..32).find_map(|i| {
        fits(1 << i).or_else(|| {
            (i + 1..32).find_map(|j| {
                fits((1 << i) | (1 << j))
                    .or_else(|| (j + 1..32).find_map(|k| fits((1 << i) | (1 << j) | (1 << k))))
            })
        })
    })
}

/// CRC-32 of the part of a record's checksummed bytes before its payload.
fn head_crc(segment: u64, len: u32) -> u32 {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&segment.to_le_bytes());
    head[8..].copy_from_slice(&len.to_le_bytes());
    crc32fast::hash(&head)
}

/// The offset of the first intact frame starting at or after `from`, if any.
///
/// Every offset is a candidate whose length field fits in the buffer; its checksum is computed
/// from prefix checksums with a few multiplications (see `RangeCrc`), so a scan over damaged
/// data costs O(n), not O(n²).
pub(crate) fn next_intact_frame(
    segment: u64,
    data: &[u8],
    rc: &RangeCrc<'_>,
    from: usize,
) -> Option<usize> {
    let mut y = from;
    while y + FRAME_HEADER_LEN <= data.len() {
        let len = le_u32(&data[y..]) as usize;
        let end = y + FRAME_HEADER_LEN + len;
        let stored = le_u32(&data[y + 4..]);
        // An all-zero frame header is never a record (see `codec::decode_frame`).
        if end <= data.len()
            && !(len == 0 && stored == 0)
            && rc.extend(head_crc(segment, len as u32), y + FRAME_HEADER_LEN, end) == stored
        {
            return Some(y);
        }
        y += 1;
    }
    None
}

/// `Some(1)` if `data[from..to]` is exactly one record whose only damage is its length field
/// (its checksum verifies with the length the range implies).
fn one_frame_with_damaged_length(
    segment: u64,
    data: &[u8],
    rc: &RangeCrc<'_>,
    from: usize,
    to: usize,
) -> Option<u64> {
    let len = u32::try_from(to.checked_sub(from + FRAME_HEADER_LEN)?).ok()?;
    let stored = le_u32(&data[from + 4..]);
    (rc.extend(head_crc(segment, len), from + FRAME_HEADER_LEN, to) == stored).then_some(1)
}

/// Counts frames in `data[from..to]` by following length fields; `None` unless they land
/// exactly on `to`.
fn count_frames(data: &[u8], from: usize, to: usize) -> Option<u64> {
    let mut pos = from;
    let mut n = 0u64;
    while pos < to {
        if pos + FRAME_HEADER_LEN > to {
            return None;
        }
        pos += FRAME_HEADER_LEN + le_u32(&data[pos..]) as usize;
        n += 1;
    }
    (pos == to).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_frame, encode_header};

    fn segment(id: u64, payloads: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut v = encode_header(id).to_vec();
        let mut offs = Vec::new();
        for p in payloads {
            offs.push(v.len());
            encode_frame(id, p, &mut v);
        }
        (v, offs)
    }

    fn payloads() -> Vec<Vec<u8>> {
        (0..6u8)
            .map(|i| {
                (0..(10 + 30 * i as usize))
                    .map(|j| i ^ (j as u8) | 1)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn clean_segment_has_every_record() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (data, offs) = segment(4, &refs);
        let s = scan_segment(4, &data, true);
        assert_eq!(s.header, HeaderState::Ok);
        assert_eq!(
            s.records
                .iter()
                .map(|r| r.offset as usize)
                .collect::<Vec<_>>(),
            offs
        );
        assert!(s.corrupt.is_empty() && s.torn_tail.is_none());
    }

    #[test]
    fn every_truncation_of_the_last_record_is_a_torn_tail() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (data, offs) = segment(4, &refs);
        let last = *offs.last().unwrap();
        for cut in last + 1..data.len() {
            let s = scan_segment(4, &data[..cut], true);
            assert_eq!(s.records.len(), p.len() - 1, "cut {cut}");
            assert_eq!(s.torn_tail, Some((last as u64, (cut - last) as u64)));
            assert!(s.corrupt.is_empty());
        }
    }

    #[test]
    fn a_zero_filled_tail_is_torn() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (mut data, offs) = segment(4, &refs);
        let cut = offs[3] + 5;
        for b in &mut data[cut..] {
            *b = 0;
        }
        let s = scan_segment(4, &data, true);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.torn_tail.map(|t| t.0), Some(offs[3] as u64));
        assert!(s.corrupt.is_empty());
    }

    #[test]
    fn a_flipped_bit_mid_segment_is_corruption_and_the_rest_is_kept() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (data, offs) = segment(4, &refs);
        // Every bit of record 2 (header and payload).
        for byte in offs[2]..offs[3] {
            for bit in 0..8 {
                let mut d = data.clone();
                d[byte] ^= 1 << bit;
                let s = scan_segment(4, &d, true);
                assert_eq!(s.records.len(), p.len() - 1, "byte {byte} bit {bit}");
                assert_eq!(s.corrupt.len(), 1);
                let c = &s.corrupt[0];
                assert_eq!(c.offset, offs[2] as u64);
                assert_eq!(c.bytes, (offs[3] - offs[2]) as u64);
                // Exact whether the length field is intact or is the only damage.
                assert_eq!(c.records, Some(1));
                assert!(s.torn_tail.is_none());
            }
        }
    }

    #[test]
    fn a_flipped_length_bit_in_the_last_record_is_corruption_not_a_tear() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (data, offs) = segment(4, &refs);
        let last = *offs.last().unwrap();
        for bit in 0..32 {
            let mut d = data.clone();
            d[last + bit / 8] ^= 1 << (bit % 8);
            let s = scan_segment(4, &d, true);
            assert!(s.torn_tail.is_none(), "bit {bit}");
            assert_eq!(s.corrupt.len(), 1, "bit {bit}");
            assert_eq!(s.records.len(), p.len() - 1);
        }
    }

    #[test]
    fn up_to_three_damaged_length_bits_in_the_last_record_are_corruption() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (data, offs) = segment(4, &refs);
        let last = *offs.last().unwrap();
        let bit_sets: [&[usize]; 5] = [&[0], &[6, 8], &[0, 1, 2], &[3, 17, 30], &[9, 10, 31]];
        for bits in bit_sets {
            let mut d = data.clone();
            for &bit in bits {
                d[last + bit / 8] ^= 1 << (bit % 8);
            }
            let s = scan_segment(4, &d, true);
            assert!(s.torn_tail.is_none(), "bits {bits:?}");
            assert_eq!(s.corrupt.len(), 1, "bits {bits:?}");
        }
    }

    #[test]
    fn a_torn_write_after_a_damaged_last_record_is_still_a_torn_tail() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (mut data, offs) = segment(4, &refs);
        let last = *offs.last().unwrap();
        // Damage the second-to-last record, then cut the last one short (a crash).
        data[offs[4] + 12] ^= 1;
        data.truncate(last + 20);
        let s = scan_segment(4, &data, true);
        assert_eq!(s.corrupt.len(), 1);
        assert_eq!(s.corrupt[0].offset, offs[4] as u64);
        assert_eq!(s.corrupt[0].bytes, (last - offs[4]) as u64);
        assert_eq!(s.corrupt[0].records, Some(1));
        assert_eq!(s.torn_tail, Some((last as u64, 20)));
    }

    #[test]
    fn damage_in_an_older_segment_is_never_a_tear() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (data, offs) = segment(4, &refs);
        let s = scan_segment(4, &data[..data.len() - 1], false);
        assert!(s.torn_tail.is_none());
        assert_eq!(s.corrupt.len(), 1);
        assert_eq!(s.corrupt[0].offset, *offs.last().unwrap() as u64);
    }

    #[test]
    fn a_zeroed_page_over_several_records_is_skipped_to_the_next_intact_one() {
        let p: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i | 0x80; 50]).collect();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (mut data, offs) = segment(9, &refs);
        for b in &mut data[offs[5] + 3..offs[9] + 10] {
            *b = 0;
        }
        let s = scan_segment(9, &data, true);
        assert_eq!(s.corrupt.len(), 1);
        assert_eq!(s.corrupt[0].offset, offs[5] as u64);
        assert_eq!(s.corrupt[0].bytes, (offs[10] - offs[5]) as u64);
        assert_eq!(s.records.len(), 40 - 5);
    }

    #[test]
    fn a_partial_header_in_the_newest_segment_is_a_torn_creation() {
        let h = encode_header(12);
        for cut in 0..=h.len() {
            let mut d = h[..cut].to_vec();
            if cut == h.len() {
                d[30] = 1; // damaged reserved bytes, nothing after the header
            }
            assert_eq!(scan_segment(12, &d, true).header, HeaderState::TornCreation);
        }
        let s = scan_segment(12, &h[..10], false);
        assert!(matches!(s.header, HeaderState::Damaged(_)));
    }

    #[test]
    fn a_damaged_header_does_not_hide_the_records() {
        let p = payloads();
        let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
        let (mut data, _) = segment(4, &refs);
        data[2] ^= 0x10;
        let s = scan_segment(4, &data, true);
        assert!(matches!(s.header, HeaderState::Damaged(_)));
        assert_eq!(s.records.len(), p.len());
        assert_eq!(s.corrupt[0].offset, 0);
    }
}
