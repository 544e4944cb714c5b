//! Fuzzes the WAL decoder: segment headers (`decode_header`), record frames (`decode_frame`)
//! and the recovery scan (`recovery::scan_segment`).
//!
//! Input layout. Byte 0 selects the mode; bytes 1..9 are the segment id (little-endian,
//! zero-padded when the input is shorter).
//! - Byte 0 even, **raw**: the rest of the input is a segment file's contents, fed as is.
//! - Byte 0 odd, **structured**: the rest builds a valid segment (a record count, then per
//!   record a length byte and the payload; a length byte >= 0x80 means a generated payload of
//!   `(b & 0x7f) * 61` bytes from a fill byte and a step byte), so that checksums pass and the
//!   scan gets past the first frame. The remaining bytes are up to four edits of 4 bytes each
//!   (kind, 24-bit position) that damage it the way a crash or a bad disk would: bit flip,
//!   truncation, zero fill to the end, zeroed run, byte overwrite.
//!
//! Invariants checked on every input:
//! - nothing panics;
//! - `decode_header` accepts exactly the canonical header of the id;
//! - `decode_frame` agrees across max sizes (a frame of length L decodes the same for every
//!   max >= L and is `TooLong` for every max < L); a `Record` lies within the buffer, is
//!   `buf[8..frame_len]`, and re-encodes to the same bytes;
//! - `scan_segment` classifies every byte exactly once: intact header, records, damaged regions
//!   and torn tail are disjoint and cover the file; every record re-decodes with `decode_frame`
//!   to the same length; a torn tail only in the newest segment, and at its end; the same
//!   records whether the segment is the newest or not, with the torn tail turning into one
//!   more damaged region;
//! - recovery is idempotent: truncating the torn tail and scanning again gives the same
//!   records and damage, and no torn tail;
//! - structured inputs: an unedited segment scans to exactly its records; after a single
//!   truncation or single-byte change the records before it are intact and the first trouble
//!   (damage or torn tail) starts exactly at the frame that was hit; after zero-filling the end
//!   of the file, no record is found in the zeros.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_wal::codec::{
    decode_frame, decode_header, encode_frame, encode_header, Frame, FrameError, HeaderError,
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use weir_wal::recovery::{scan_segment, HeaderState, RecordLoc, SegmentScan};

/// Max record sizes `decode_frame` is tried with (besides ones derived from the input).
const MAXES: [u32; 8] = [0, 1, 7, 8, 255, 4096, 256 << 20, u32::MAX];

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let (id, rest) = take_id(rest);
    if mode & 1 == 0 {
        check_bytes(id, rest);
    } else {
        check_structured(id, rest);
    }
});

fn take_id(b: &[u8]) -> (u64, &[u8]) {
    let n = b.len().min(8);
    let mut a = [0u8; 8];
    a[..n].copy_from_slice(&b[..n]);
    (u64::from_le_bytes(a), &b[n..])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Every generic check on one segment's bytes; returns the scans as newest and as older.
fn check_bytes(id: u64, data: &[u8]) -> (SegmentScan, SegmentScan) {
    check_header(id, data);
    check_header(id.wrapping_add(1), data);
    for off in [0, 1, 3, SEGMENT_HEADER_LEN] {
        if let Some(b) = data.get(off..) {
            check_frame(id, b);
        }
    }
    let newest = scan_segment(id, data, true);
    let older = scan_segment(id, data, false);
    check_scan(id, data, &newest, true);
    check_scan(id, data, &older, false);

    if newest.header != HeaderState::TornCreation {
        assert_eq!(newest.header, older.header);
        assert_eq!(newest.records, older.records, "records depend on `newest`");
        // The same bytes are unusable either way; an older segment just calls the torn tail
        // damage (and may merge it with damage just before it).
        let covered = |spans: Vec<(u64, u64)>| -> Vec<(u64, u64)> {
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (off, len) in spans {
                match merged.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => merged.push((off, len)),
                }
            }
            merged
        };
        let mut want: Vec<(u64, u64)> =
            newest.corrupt.iter().map(|c| (c.offset, c.bytes)).collect();
        want.extend(newest.torn_tail);
        let got: Vec<(u64, u64)> = older.corrupt.iter().map(|c| (c.offset, c.bytes)).collect();
        assert_eq!(
            covered(got),
            covered(want),
            "an older segment must see the newest's torn tail as damage over the same bytes"
        );
    }

    // Idempotence: what recovery leaves behind after truncating the torn tail scans clean.
    if let Some((off, _)) = newest.torn_tail {
        let cut = &data[..off as usize];
        let again = scan_segment(id, cut, true);
        assert!(
            again.torn_tail.is_none(),
            "second recovery found another torn tail"
        );
        assert_eq!(
            again.records, newest.records,
            "truncation changed the records"
        );
        let header_only =
            matches!(newest.header, HeaderState::Damaged(_)) && cut.len() <= SEGMENT_HEADER_LEN;
        if !header_only {
            let regions = |s: &SegmentScan| -> Vec<(u64, u64, Option<u64>)> {
                s.corrupt
                    .iter()
                    .map(|c| (c.offset, c.bytes, c.records))
                    .collect()
            };
            assert_eq!(
                regions(&again),
                regions(&newest),
                "truncation changed the damage"
            );
        }
    }
    (newest, older)
}

fn check_header(id: u64, data: &[u8]) {
    let canonical = encode_header(id);
    match decode_header(data, id) {
        Ok(h) => {
            assert_eq!(h.segment_id, id);
            assert_eq!(&data[..SEGMENT_HEADER_LEN], &canonical[..]);
        }
        Err(HeaderError::Incomplete { have }) => {
            assert!(data.len() < SEGMENT_HEADER_LEN);
            assert_eq!(have, data.len());
        }
        Err(HeaderError::WrongSegment { expected, found }) => {
            assert_eq!(expected, id);
            assert_ne!(found, id);
            assert_eq!(&data[..SEGMENT_HEADER_LEN], &encode_header(found)[..]);
        }
        Err(_) => assert_ne!(
            data.get(..SEGMENT_HEADER_LEN),
            Some(&canonical[..]),
            "the canonical header was rejected"
        ),
    }
}

fn check_frame(id: u64, buf: &[u8]) {
    let base = decode_frame(id, buf, u32::MAX);
    match base {
        Frame::Record { payload, frame_len } => {
            assert!(frame_len <= buf.len());
            assert_eq!(frame_len, FRAME_HEADER_LEN + payload.len());
            assert_eq!(payload, &buf[FRAME_HEADER_LEN..frame_len]);
            assert_eq!(le_u32(buf) as usize, payload.len());
            let mut re = Vec::with_capacity(frame_len);
            encode_frame(id, payload, &mut re);
            assert_eq!(
                &re[..],
                &buf[..frame_len],
                "a verified frame does not re-encode"
            );
        }
        Frame::Incomplete { frame_len: None } => assert!(buf.len() < FRAME_HEADER_LEN),
        Frame::Incomplete { frame_len: Some(n) } => {
            assert!(buf.len() >= FRAME_HEADER_LEN);
            assert_eq!(n, (FRAME_HEADER_LEN as u64) + u64::from(le_u32(buf)));
            assert!(n > buf.len() as u64);
        }
        Frame::Corrupt(FrameError::Checksum {
            len,
            stored,
            computed,
        }) => {
            assert_eq!(len, le_u32(buf));
            assert_eq!(stored, le_u32(&buf[4..]));
            assert_ne!(stored, computed);
            assert!(FRAME_HEADER_LEN + len as usize <= buf.len());
        }
        Frame::Corrupt(FrameError::TooLong { .. }) => panic!("TooLong with max u32::MAX"),
        Frame::Corrupt(FrameError::Zeroed) => assert_eq!(&buf[..FRAME_HEADER_LEN], &[0u8; 8]),
    }
    if buf.len() < FRAME_HEADER_LEN {
        for max in MAXES {
            assert_eq!(decode_frame(id, buf, max), base);
        }
        return;
    }
    let len = le_u32(buf);
    let derived = [len, len.saturating_sub(1), len.saturating_add(1)];
    for max in MAXES.into_iter().chain(derived) {
        let f = decode_frame(id, buf, max);
        if len > max {
            assert_eq!(f, Frame::Corrupt(FrameError::TooLong { len, max }));
        } else {
            assert_eq!(f, base, "max {max} changed the verdict");
        }
    }
}

fn check_scan(id: u64, data: &[u8], scan: &SegmentScan, newest: bool) {
    assert_eq!(scan.segment, id);
    assert_eq!(scan.file_len, data.len() as u64);
    let header = decode_header(data, id);
    match &scan.header {
        HeaderState::TornCreation => {
            assert!(newest, "half-created is only for the newest segment");
            assert!(header.is_err() && data.len() <= SEGMENT_HEADER_LEN);
            assert!(scan.records.is_empty() && scan.corrupt.is_empty());
            assert!(scan.torn_tail.is_none());
            return;
        }
        HeaderState::Ok => assert!(header.is_ok()),
        HeaderState::Damaged(e) => assert_eq!(header.as_ref().err(), Some(e)),
    }
    if !newest {
        assert!(scan.torn_tail.is_none(), "torn tail in an older segment");
    }

    // Every byte classified exactly once, in order.
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    if scan.header == HeaderState::Ok {
        spans.push((0, SEGMENT_HEADER_LEN as u64, "header"));
    }
    for r in &scan.records {
        assert!(r.offset >= SEGMENT_HEADER_LEN as u64);
        let frame_len = match decode_frame(id, &data[r.offset as usize..], u32::MAX) {
            Frame::Record { payload, frame_len } => {
                assert_eq!(payload.len(), r.len as usize, "record length differs");
                frame_len
            }
            other => panic!("record at {} does not re-decode: {other:?}", r.offset),
        };
        spans.push((r.offset, r.offset + frame_len as u64, "record"));
    }
    for c in &scan.corrupt {
        assert_eq!(c.segment, id);
        assert!(c.bytes > 0 || data.is_empty(), "empty damaged region");
        if let Some(n) = c.records {
            assert!(n * FRAME_HEADER_LEN as u64 <= c.bytes);
        }
        spans.push((c.offset, c.offset + c.bytes, "damage"));
    }
    if let Some((off, bytes)) = scan.torn_tail {
        assert!(bytes > 0);
        assert_eq!(off + bytes, data.len() as u64, "torn tail not at the end");
        spans.push((off, off + bytes, "torn tail"));
    }
    spans.sort_unstable();
    let mut at = 0;
    for (start, end, what) in &spans {
        assert_eq!(
            *start, at,
            "gap or overlap before {what} at {start}: {spans:?}"
        );
        at = *end;
    }
    assert_eq!(at, data.len() as u64, "bytes left unclassified: {spans:?}");
    assert!(scan.records.windows(2).all(|w| w[0].offset < w[1].offset));
}

fn take<'a>(cur: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(cur.len());
    let (a, b) = cur.split_at(n);
    *cur = b;
    a
}

fn take_u8(cur: &mut &[u8]) -> u8 {
    take(cur, 1).first().copied().unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
enum Edit {
    /// Bytes from here on were cut off.
    Truncate(usize),
    /// One byte at this position changed.
    Byte(usize),
    /// Everything from here on was zeroed (the size reached the disk, the data did not).
    ZeroFrom(usize),
    /// A run of bytes starting here was zeroed.
    ZeroRun(usize),
}

fn check_structured(id: u64, rest: &[u8]) {
    let mut cur = rest;
    let count = take_u8(&mut cur) % 9;
    let mut seg = encode_header(id).to_vec();
    let mut originals = Vec::new();
    for _ in 0..count {
        let b = take_u8(&mut cur);
        let payload: Vec<u8> = if b < 0x80 {
            take(&mut cur, b as usize).to_vec()
        } else {
            let fill = take_u8(&mut cur);
            let step = take_u8(&mut cur);
            (0..usize::from(b & 0x7f) * 61)
                .map(|i| fill.wrapping_add((i as u8).wrapping_mul(step)))
                .collect()
        };
        originals.push(RecordLoc {
            offset: seg.len() as u64,
            len: payload.len() as u32,
        });
        encode_frame(id, &payload, &mut seg);
    }

    let (newest, older) = check_bytes(id, &seg);
    for s in [&newest, &older] {
        assert_eq!(s.header, HeaderState::Ok);
        assert_eq!(
            s.records, originals,
            "an intact segment lost or gained records"
        );
        assert!(s.corrupt.is_empty() && s.torn_tail.is_none());
    }

    let mut data = seg.clone();
    let mut edits = Vec::new();
    while edits.len() < 4 && cur.len() >= 4 {
        let e = take(&mut cur, 4);
        let kind = e[0];
        let raw = usize::from(e[1]) | usize::from(e[2]) << 8 | usize::from(e[3]) << 16;
        let pos = raw % (data.len() + 1);
        let edit = match kind % 5 {
            0 if pos < data.len() => {
                data[pos] ^= 1 << ((kind >> 3) & 7);
                Edit::Byte(pos)
            }
            4 if pos < data.len() && data[pos] != kind => {
                data[pos] = kind;
                Edit::Byte(pos)
            }
            1 => {
                data.truncate(pos);
                Edit::Truncate(pos)
            }
            2 => {
                data[pos..].fill(0);
                Edit::ZeroFrom(pos)
            }
            3 => {
                let end = (pos + usize::from(kind >> 3) * 16 + 1).min(data.len());
                data[pos..end].fill(0);
                Edit::ZeroRun(pos)
            }
            _ => continue,
        };
        edits.push(edit);
    }
    if edits.is_empty() {
        return;
    }
    let (newest, older) = check_bytes(id, &data);

    // The original frame containing byte `pos`: (index, start offset).
    let frame_at = |pos: usize| -> Option<(usize, u64)> {
        originals.iter().enumerate().find_map(|(i, r)| {
            let start = r.offset as usize;
            let end = start + FRAME_HEADER_LEN + r.len as usize;
            (start <= pos && pos < end).then_some((i, r.offset))
        })
    };
    let first_trouble = |s: &SegmentScan| -> Option<u64> {
        s.corrupt
            .iter()
            .map(|c| c.offset)
            .chain(s.torn_tail.map(|t| t.0))
            .min()
    };

    if let [edit] = edits[..] {
        match edit {
            Edit::Truncate(cut) if cut < SEGMENT_HEADER_LEN => {
                assert_eq!(newest.header, HeaderState::TornCreation);
                assert!(older.records.is_empty());
            }
            Edit::Truncate(cut) => {
                let intact = originals
                    .iter()
                    .take_while(|r| r.offset as usize + FRAME_HEADER_LEN + r.len as usize <= cut)
                    .count();
                for s in [&newest, &older] {
                    assert_eq!(s.records[..intact], originals[..intact], "{edit:?}");
                }
                match frame_at(cut) {
                    // Cut on a frame boundary: a shorter, clean segment.
                    None => {
                        assert_eq!(newest.records, originals[..intact], "{edit:?}");
                        assert!(newest.corrupt.is_empty() && newest.torn_tail.is_none());
                    }
                    Some((_, start)) if start as usize == cut => {
                        assert_eq!(newest.records, originals[..intact], "{edit:?}");
                        assert!(newest.corrupt.is_empty() && newest.torn_tail.is_none());
                    }
                    Some((_, start)) => {
                        assert_eq!(first_trouble(&newest), Some(start), "{edit:?}");
                        assert_eq!(first_trouble(&older), Some(start), "{edit:?}");
                    }
                }
            }
            Edit::Byte(pos) | Edit::ZeroRun(pos) => {
                let changed = data != seg;
                if !changed {
                    return;
                }
                if pos < SEGMENT_HEADER_LEN && matches!(edit, Edit::Byte(_)) {
                    if data.len() == SEGMENT_HEADER_LEN {
                        // A bare damaged header as the newest file: a crash while creating it.
                        assert_eq!(newest.header, HeaderState::TornCreation);
                    }
                    let scans = if data.len() == SEGMENT_HEADER_LEN {
                        vec![&older]
                    } else {
                        vec![&newest, &older]
                    };
                    for s in scans {
                        assert!(matches!(s.header, HeaderState::Damaged(_)));
                        assert_eq!(s.records, originals, "a damaged header hid records");
                        assert_eq!(s.corrupt.len(), 1);
                        assert!(s.torn_tail.is_none());
                    }
                } else if let (Edit::Byte(_), Some((k, start))) = (edit, frame_at(pos)) {
                    for s in [&newest, &older] {
                        assert_eq!(s.records[..k], originals[..k], "{edit:?}");
                        assert_eq!(first_trouble(s), Some(start), "damage undetected: {edit:?}");
                    }
                }
            }
            Edit::ZeroFrom(pos) => {
                for s in [&newest, &older] {
                    if let Some(r) = s.records.iter().find(|r| r.offset as usize >= pos) {
                        panic!(
                            "zero-filled bytes from {pos} read back as a record at offset {} \
                             (len {}) in segment {id:#x}",
                            r.offset, r.len
                        );
                    }
                }
            }
        }
    }
}
