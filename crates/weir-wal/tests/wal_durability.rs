//! Property-based durability test of the WAL on the simulated disk.
//!
//! Random sequences of appends (0 B to 1 MiB, queued concurrently with the writer), waits,
//! crashes (with torn and zero-filled last writes), bit flips, clean reopens, failed fsyncs and
//! writes (EIO) and a full disk (partial writes, then ENOSPC). After every recovery:
//! - every append whose future resolved `Ok` (durable) is read back intact, in append order,
//!   unless a bit flip hit it, in which case recovery reported it (strict mode refused to open,
//!   naming the segment and offset; skip_corrupt mode reported a region covering it, with an
//!   exact record count whenever it claims one);
//! - nothing that was never appended is ever returned, and damage is never returned as data;
//! - every reported damaged region contains a flipped byte (no invented damage).
//!
//! The two ambiguities of the format are honoured and checked precisely (see `recovery.rs`): a
//! damaged record of the newest segment that only damaged records follow may be reported as the
//! start of a torn tail instead of damage when the file ends in zeros over it (a zero-filled torn write looks the same), or when its
//! length field is damaged together with another part of it, or in more than three bits (a
//! partial write looks the same).
//!
//! Default run: 2,000 cases. `PROPTEST_CASES=100000 cargo test --release --test
//! wal_durability` runs a long soak. Failing cases are saved under `proptest-regressions/` and
//! replayed first on every run; commit them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use weir_wal::codec::{decode_frame, Frame};
use weir_wal::sim::{Fault, SimStorage, Tear};
use weir_wal::{
    parse_segment_name, segment_name, AppendFuture, CorruptRegion, RecordHandle, RecoveryMode,
    RecoveryReport, Wal, WalConfig, WalError, WalPosition,
};

const FRAME_HEADER: u64 = 8;
const SEGMENT_HEADER: u64 = 32;

#[derive(Debug, Clone)]
enum Op {
    /// Queue an append (do not wait for it).
    Append(usize),
    /// Wait for every queued append.
    Wait,
    /// Crash (tearing the last write) and recover.
    Crash(Tear),
    /// Wait, then flip one bit somewhere in a segment file.
    Flip { file: usize, at: u64, bit: u8 },
    /// Close cleanly and recover.
    Reopen,
    /// The next fsync fails with EIO (the log must stop without acknowledging).
    FailSync,
    /// The next write fails with EIO.
    FailWrite,
    /// Only `room` more bytes fit on the disk until the next wait, reopen, flip or crash:
    /// writes go partially through, then hit ENOSPC and wait.
    DiskFull(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        8 => 0usize..64,
        8 => 64usize..4096,
        2 => 4096usize..65_536,
        1 => 65_536usize..=1 << 20,
    ];
    let tear = prop_oneof![
        1 => Just(Tear::None),
        2 => (0usize..70_000).prop_map(|keep| Tear::Prefix { keep }),
        1 => (0usize..70_000, 0usize..70_000)
            .prop_map(|(keep, zeros_from)| Tear::PrefixThenZeros { keep, zeros_from }),
    ];
    prop_oneof![
        12 => len.prop_map(Op::Append),
        3 => Just(Op::Wait),
        3 => tear.prop_map(Op::Crash),
        2 => (any::<usize>(), any::<u64>(), 0u8..8).prop_map(|(file, at, bit)| Op::Flip { file, at, bit }),
        1 => Just(Op::Reopen),
        1 => Just(Op::FailSync),
        1 => Just(Op::FailWrite),
        1 => (0u64..5000).prop_map(Op::DiskFull),
    ]
}

/// The payload of append number `id`: unique content for 8 bytes and more, and a last byte
/// that is never zero (so that damage to it is distinguishable from a zero-filled tear).
fn payload(id: u64, len: usize) -> Bytes {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xabcd;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if len >= 8 {
        v[..8].copy_from_slice(&id.to_le_bytes());
    }
    if let Some(last) = v.last_mut() {
        *last |= 1;
    }
    v.into()
}

fn config(mode: RecoveryMode) -> WalConfig {
    WalConfig {
        segment_max_bytes: 64 * 1024,
        recovery: mode,
        ..WalConfig::default()
    }
}

struct Model {
    disk: SimStorage,
    wal: Option<Wal>,
    next_id: u64,
    outstanding: Vec<(u64, Bytes, AppendFuture)>,
    /// Every record known to be on disk (durable), intact or damaged: handle -> (id, payload).
    records: BTreeMap<RecordHandle, (u64, Bytes)>,
    /// Appends whose outcome is unknown (pending or failed at a crash).
    maybe: Vec<(u64, Bytes)>,
    /// Flipped bits still on disk: (segment, offset) -> xor mask.
    flips: BTreeMap<(u64, u64), u8>,
    /// Records in reported damaged regions that were never acknowledged (a fault or crash left
    /// them on disk before a flip hit them).
    damaged_unacked: u64,
    /// Those unacknowledged appends themselves, as far as they are known: `maybe` entries that
    /// a recovery found neither intact nor gone, but damaged on disk. They are not gone for
    /// good: recovery skips damage without rewriting it, so a later flip of the same bit
    /// restores such a record, and then it verifies and scans rightly return it (it was
    /// appended, and its bytes are exactly what was appended; see
    /// `an_unacknowledged_record_restored_by_a_second_flip_is_returned_intact`).
    damaged_maybe: Vec<(u64, Bytes)>,
    /// A fault was injected into the open log: appends may fail (and must not be counted).
    faulted: bool,
}

impl Model {
    fn new() -> Self {
        let disk = SimStorage::new();
        let (wal, _) = Wal::open(Arc::new(disk.clone()), config(RecoveryMode::Strict)).unwrap();
        Self {
            disk,
            wal: Some(wal),
            next_id: 0,
            outstanding: Vec::new(),
            records: BTreeMap::new(),
            maybe: Vec::new(),
            flips: BTreeMap::new(),
            faulted: false,
            damaged_unacked: 0,
            damaged_maybe: Vec::new(),
        }
    }

    fn wal(&self) -> &Wal {
        self.wal.as_ref().expect("open")
    }

    fn wait_all(&mut self) -> Result<(), TestCaseError> {
        self.disk.set_capacity(None);
        for (id, p, f) in std::mem::take(&mut self.outstanding) {
            match f.wait() {
                Ok(h) => {
                    prop_assert_eq!(h.len as usize, p.len());
                    prop_assert!(self.records.insert(h, (id, p)).is_none(), "handle reused");
                }
                Err(WalError::Fatal(_)) if self.faulted => self.maybe.push((id, p)),
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "append failed without a fault: {e}"
                    )))
                }
            }
        }
        Ok(())
    }

    fn damaged(&self, h: &RecordHandle) -> bool {
        let end = h.offset + FRAME_HEADER + u64::from(h.len);
        self.flips
            .range((h.segment, h.offset)..(h.segment, end))
            .next()
            .is_some()
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Append(len) => {
                let id = self.next_id;
                self.next_id += 1;
                let p = payload(id, len);
                let f = self.wal().append(p.clone());
                self.outstanding.push((id, p, f));
            }
            Op::Wait => self.wait_all()?,
            Op::Crash(tear) => {
                self.disk.crash(tear);
                self.disk.set_capacity(None);
                // Flips of bytes that the crash threw away (never synced) are gone with them.
                let disk = self.disk.clone();
                self.flips.retain(|(seg, off), _| {
                    disk.contents(&segment_name(*seg))
                        .is_some_and(|c| *off < c.len() as u64)
                });
                drop(self.wal.take());
                for (id, p, f) in std::mem::take(&mut self.outstanding) {
                    match f.wait() {
                        // Resolved Ok: its fsync completed before the crash.
                        Ok(h) => {
                            prop_assert!(self.records.insert(h, (id, p)).is_none());
                        }
                        Err(_) => self.maybe.push((id, p)),
                    }
                }
                self.recover()?;
            }
            Op::Flip { file, at, bit } => {
                self.wait_all()?;
                let names: Vec<String> = self
                    .disk
                    .file_names()
                    .into_iter()
                    .filter(|n| parse_segment_name(n).is_some())
                    .collect();
                if names.is_empty() {
                    return Ok(());
                }
                let name = &names[file % names.len()];
                let len = self.disk.contents(name).map_or(0, |c| c.len() as u64);
                if len == 0 {
                    return Ok(());
                }
                let seg = parse_segment_name(name).unwrap();
                let off = at % len;
                prop_assert!(self.disk.flip_bit(name, off, bit));
                let mask = self.flips.entry((seg, off)).or_insert(0);
                *mask ^= 1 << bit;
                if *mask == 0 {
                    self.flips.remove(&(seg, off));
                }
            }
            Op::Reopen => {
                self.wait_all()?;
                let wal = self.wal.take().unwrap();
                let closed = wal.close();
                prop_assert!(closed.is_ok() || self.faulted, "close failed: {closed:?}");
                drop(wal);
                self.recover()?;
            }
            Op::FailSync => {
                self.disk.fail_syncs(Fault::Eio, 1);
                self.faulted = true;
            }
            Op::FailWrite => {
                self.disk.fail_writes(Fault::Eio, 1);
                self.faulted = true;
            }
            Op::DiskFull(room) => {
                self.disk.set_capacity(Some(self.disk.used_bytes() + room));
            }
        }
        Ok(())
    }

    /// Bytes from which the file is zero to its end (its length if it does not end in zero).
    fn zeros_from(&self, segment: u64) -> u64 {
        let c = self
            .disk
            .contents(&segment_name(segment))
            .unwrap_or_default();
        (c.len() - c.iter().rev().take_while(|&&b| b == 0).count()) as u64
    }

    /// The payloads of the records in the damaged regions `corrupt` as they were written (with
    /// the flips on disk undone), found by following their length fields from each region's
    /// start (a frame boundary): where unacknowledged appends may lie damaged.
    fn damaged_payloads(&self, corrupt: &[CorruptRegion]) -> Vec<Bytes> {
        let mut found = Vec::new();
        for c in corrupt {
            let Some(mut data) = self.disk.contents(&segment_name(c.segment)) else {
                continue;
            };
            for (&(_, off), mask) in self.flips.range((c.segment, 0)..=(c.segment, u64::MAX)) {
                if let Some(b) = data.get_mut(off as usize) {
                    *b ^= mask;
                }
            }
            let end = ((c.offset + c.bytes) as usize).min(data.len());
            let mut pos = c.offset.max(SEGMENT_HEADER) as usize;
            while pos < end {
                let Frame::Record { payload, frame_len } =
                    decode_frame(c.segment, &data[pos..], u32::MAX)
                else {
                    break;
                };
                found.push(Bytes::copy_from_slice(payload));
                pos += frame_len;
            }
        }
        found
    }

    fn recover(&mut self) -> Result<(), TestCaseError> {
        // Faults injected into the previous run must not hit recovery itself.
        self.disk.clear_faults();
        self.faulted = false;
        // What recovery is allowed to call a torn tail although it is damage (see module docs).
        let newest = self
            .disk
            .file_names()
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .max();
        let newest_len = newest.map_or(0, |s| {
            self.disk
                .contents(&segment_name(s))
                .map_or(0, |c| c.len() as u64)
        });
        let zeros_from = newest.map(|s| self.zeros_from(s));
        let newest_bytes = newest
            .and_then(|s| self.disk.contents(&segment_name(s)))
            .unwrap_or_default();

        let report: RecoveryReport =
            match Wal::open(Arc::new(self.disk.clone()), config(RecoveryMode::Strict)) {
                Ok((wal, report)) => {
                    prop_assert!(report.corrupt.is_empty());
                    self.wal = Some(wal);
                    report
                }
                Err(WalError::Corruption {
                    segment, offset, ..
                }) => {
                    // Strict mode names real damage: a flipped byte at or in the region it names.
                    let named_damage = self
                        .flips
                        .range((segment, offset)..(segment, u64::MAX))
                        .next()
                        .is_some();
                    prop_assert!(
                        named_damage,
                        "strict recovery named {segment}:{offset} without damage there"
                    );
                    let (wal, report) = Wal::open(
                        Arc::new(self.disk.clone()),
                        config(RecoveryMode::SkipCorrupt),
                    )
                    .map_err(|e| TestCaseError::fail(format!("skip_corrupt open failed: {e}")))?;
                    prop_assert!(report
                        .corrupt
                        .iter()
                        .any(|c| c.segment == segment && c.offset == offset));
                    self.wal = Some(wal);
                    report
                }
                Err(e) => return Err(TestCaseError::fail(format!("recovery failed: {e}"))),
            };

        // Half-created segments hold no records; their flips go with them.
        for seg in &report.removed_segments {
            prop_assert!(Some(*seg) == newest);
            prop_assert!(newest_len <= SEGMENT_HEADER);
            self.flips.retain(|(s, _), _| s != seg);
        }
        // Torn tails: only in the newest segment; they may swallow damaged records only in the
        // ambiguous zero-filled case, and never an intact durable one.
        for &(seg, off, bytes) in &report.torn_tails {
            prop_assert_eq!(Some(seg), newest);
            prop_assert_eq!(off + bytes, newest_len);
            // A tail may begin inside a durable record only where that record's length field
            // is damaged (recovery then cannot know where it ends).
            let straddling = self
                .records
                .keys()
                .find(|h| h.segment == seg && h.offset < off && off < h.next_position().offset)
                .copied();
            if let Some(h) = straddling {
                let len_bits: u32 = self
                    .flips
                    .range((seg, h.offset)..(seg, h.offset + 4))
                    .map(|(_, m)| m.count_ones())
                    .sum();
                prop_assert!(
                    len_bits > 0,
                    "a torn tail at {off} began inside durable record {h:?} with an intact length"
                );
            }
            let swallowed: Vec<RecordHandle> = self
                .records
                .range(
                    RecordHandle {
                        segment: seg,
                        offset: off,
                        len: 0,
                    }..,
                )
                .take_while(|(h, _)| h.segment == seg)
                .map(|(h, _)| *h)
                .collect();
            for (i, h) in swallowed.iter().enumerate() {
                prop_assert!(
                    self.damaged(h),
                    "an intact durable record {h:?} was truncated as a torn tail"
                );
                if i > 0 {
                    // Damaged records after the one the tail starts at go with it.
                    self.records.remove(h);
                    continue;
                }
                prop_assert_eq!(h.offset, off, "a torn tail began inside a durable record");
                let frame_end = h.offset + FRAME_HEADER + u64::from(h.len);
                // Zero-filled: the file ends in zeros over the record, or the damaged record
                // itself ends in a zero byte (it would, once what follows it is cut off).
                let zero_filled = zeros_from.is_some_and(|z| z < newest_len && z <= frame_end)
                    || newest_bytes.get(frame_end as usize - 1) == Some(&0);
                let len_field = h.offset..h.offset + 4;
                let flipped: Vec<u64> = self
                    .flips
                    .range((seg, h.offset)..(seg, frame_end))
                    .map(|((_, o), _)| *o)
                    .collect();
                let len_bits: u32 = self
                    .flips
                    .range((seg, h.offset)..(seg, h.offset + 4))
                    .map(|(_, m)| m.count_ones())
                    .sum();
                let length_and_more = len_bits > 3
                    || (len_bits > 0 && flipped.iter().any(|o| !len_field.contains(o)));
                prop_assert!(
                    zero_filled || length_and_more,
                    "damaged record {h:?} (flips at {flipped:?}) truncated as a torn tail, though distinguishable"
                );
                self.records.remove(h);
            }
            self.flips.retain(|(s, o), _| !(*s == seg && *o >= off));
        }
        // Every damaged region holds a flip; counts of one-bit damage are exact.
        let mut extra = 0;
        for c in &report.corrupt {
            let end = c.offset + c.bytes;
            prop_assert!(
                self.flips
                    .range((c.segment, c.offset)..(c.segment, end))
                    .next()
                    .is_some(),
                "reported damage {c:?} where nothing was flipped"
            );
            let flipped_bits: u32 = self
                .flips
                .range((c.segment, c.offset)..(c.segment, end))
                .map(|(_, m)| m.count_ones())
                .sum();
            // Counts are exact when the damage is one flipped bit (confined to one record);
            // with more, they are estimates from damaged length fields.
            if flipped_bits == 1 {
                let header = c.offset == 0 && c.bytes == SEGMENT_HEADER;
                prop_assert_eq!(c.records, Some(u64::from(!header)), "region {:?}", c);
            }
            if let (Some(n), 1) = (c.records, flipped_bits) {
                let inside = self
                    .records
                    .keys()
                    .filter(|h| h.segment == c.segment && h.offset >= c.offset && h.offset < end)
                    .count() as u64;
                // Exact counts are exact: the durable records inside, plus any unacknowledged
                // appends that reached the disk (a fault or crash can leave them there).
                let unacked = self.maybe.len() as u64 + self.damaged_unacked;
                prop_assert!(
                    n >= inside && n - inside <= unacked,
                    "region {:?} claims {} records; {} durable inside, {} unacknowledged appends",
                    c,
                    n,
                    inside,
                    unacked
                );
                extra += n - inside;
            }
        }
        // Damaged unacknowledged records stay on disk, and are reported again next time.
        self.damaged_unacked = extra;
        // Every damaged durable record is covered by a reported region.
        for h in self.records.keys().filter(|h| self.damaged(h)) {
            prop_assert!(
                report.corrupt.iter().any(|c| c.segment == h.segment
                    && c.offset <= h.offset
                    && h.offset < c.offset + c.bytes),
                "damaged record {h:?} not reported (report: {:?})",
                report.corrupt
            );
        }

        // Read everything back.
        let wal = self.wal.as_ref().unwrap();
        let mut seen = 0usize;
        let mut last_id: Option<u64> = None;
        // Candidates in append order: appends left damaged on disk by earlier runs, then this
        // run's appends of unknown outcome.
        let mut maybe = std::mem::take(&mut self.damaged_maybe);
        maybe.append(&mut self.maybe);
        let mut survivors = Vec::new();
        for r in wal.scan(WalPosition::START) {
            let r = r.map_err(|e| TestCaseError::fail(format!("scan after recovery: {e}")))?;
            let id = if let Some((id, p)) = self.records.get(&r.handle) {
                prop_assert!(!self.damaged(&r.handle), "damaged record returned as data");
                prop_assert_eq!(&r.payload, p);
                seen += 1;
                *id
            } else {
                // Not acknowledged, but appended: a write that made it to disk before the crash.
                let pos = maybe
                    .iter()
                    .position(|(id, p)| *p == r.payload && last_id.is_none_or(|l| *id > l));
                let Some(pos) = pos else {
                    return Err(TestCaseError::fail(format!(
                        "scan returned a record that was never appended at {:?}",
                        r.handle
                    )));
                };
                let (id, p) = maybe.remove(pos);
                survivors.push((r.handle, (id, p)));
                id
            };
            prop_assert!(
                last_id.is_none_or(|l| id > l),
                "records out of append order"
            );
            last_id = Some(id);
            // Reads by handle agree with the scan.
            prop_assert_eq!(wal.read(r.handle).ok(), Some(r.payload.clone()));
        }
        let intact = self.records.keys().filter(|h| !self.damaged(h)).count();
        if seen != intact {
            let found: std::collections::BTreeSet<RecordHandle> = wal
                .scan(WalPosition::START)
                .filter_map(Result::ok)
                .map(|r| r.handle)
                .collect();
            let missing: Vec<_> = self
                .records
                .keys()
                .filter(|h| !self.damaged(h) && !found.contains(h))
                .collect();
            return Err(TestCaseError::fail(format!(
                "durable records missing after recovery: {missing:?}; report: torn {:?}, \
                 removed {:?}, corrupt {:?}; flips {:?}; segments {:?}",
                report.torn_tails,
                report.removed_segments,
                report.corrupt,
                self.flips,
                wal.segments()
            )));
        }
        // Survivors are on disk now (the crash already happened); the rest are gone for good,
        // except those lying damaged in a reported region (a flip may restore them).
        self.records.extend(survivors);
        let damaged = self.damaged_payloads(&report.corrupt);
        self.damaged_maybe = maybe
            .into_iter()
            .filter(|(_, p)| damaged.contains(p))
            .collect();
        Ok(())
    }
}

/// The regression `cc 67dff174…` on the WAL alone (deterministic): an append whose fsync
/// failed reached the disk; a flip damaged it; recovery (skip_corrupt) reported and skipped it,
/// leaving its bytes as they were; a second flip of the same bit restored them. The record is
/// then exactly what was appended, so recovery and scans return it, in log order (as they do
/// any unacknowledged append that reached the disk): neither damage nor something never
/// appended.
#[test]
fn an_unacknowledged_record_restored_by_a_second_flip_is_returned_intact() {
    let disk = SimStorage::new();
    let open = |mode| Wal::open(Arc::new(disk.clone()), config(mode));
    let (wal, report) = open(RecoveryMode::Strict).unwrap();
    let seg = report.end.segment;
    let name = segment_name(seg);
    disk.fail_syncs(Fault::Eio, 1);
    let p = payload(0, 25);
    assert!(matches!(
        wal.append(p.clone()).wait(),
        Err(WalError::Fatal(_))
    ));
    assert!(wal.close().is_err());
    drop(wal);
    // The last byte of the record's checksum (frame: len | crc | payload).
    let crc_byte = SEGMENT_HEADER + FRAME_HEADER - 1;
    assert!(disk.flip_bit(&name, crc_byte, 1));
    match open(RecoveryMode::Strict) {
        Err(WalError::Corruption {
            segment, offset, ..
        }) => {
            assert_eq!((segment, offset), (seg, SEGMENT_HEADER));
        }
        other => panic!("strict recovery opened a damaged log: {other:?}"),
    }
    let (wal, report) = open(RecoveryMode::SkipCorrupt).unwrap();
    let c = &report.corrupt[..];
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].segment, c[0].offset, c[0].bytes, c[0].records),
        (seg, SEGMENT_HEADER, FRAME_HEADER + 25, Some(1))
    );
    assert!(wal.scan(WalPosition::START).next().is_none());
    let later = payload(1, 41);
    let later_handle = wal.append(later.clone()).wait().unwrap();
    assert!(later_handle.segment > seg);
    wal.close().unwrap();
    drop(wal);
    // The same bit flipped back: the record is as appended again.
    assert!(disk.flip_bit(&name, crc_byte, 1));
    let (wal, report) = open(RecoveryMode::Strict).unwrap();
    assert!(report.corrupt.is_empty());
    let got: Vec<(RecordHandle, Bytes)> = wal
        .scan(WalPosition::START)
        .map(|r| r.map(|r| (r.handle, r.payload)).unwrap())
        .collect();
    let restored = RecordHandle {
        segment: seg,
        offset: SEGMENT_HEADER,
        len: 25,
    };
    assert_eq!(got, vec![(restored, p), (later_handle, later)]);
}

/// The regression `cc 67dff174…` on the model (deterministic: every append is waited for, so
/// the batches do not depend on timing). The model must still know the damaged unacknowledged
/// append when the second flip restores it.
#[test]
fn the_model_knows_an_unacknowledged_record_restored_by_a_second_flip() {
    let crc_byte = SEGMENT_HEADER + FRAME_HEADER - 1;
    let flip = Op::Flip {
        file: 0,
        at: crc_byte,
        bit: 1,
    };
    let mut m = Model::new();
    for op in [
        Op::FailSync,
        Op::Append(25),
        Op::Wait,
        flip.clone(),
        Op::Reopen,
        flip,
        Op::Reopen,
        Op::Crash(Tear::None),
    ] {
        if let Err(e) = m.apply(op.clone()) {
            panic!("{op:?}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn acknowledged_appends_survive_crashes_tears_and_bit_flips(ops in prop::collection::vec(op(), 1..40)) {
        let mut m = Model::new();
        for op in ops {
            m.apply(op)?;
        }
        // Finally: a crash with nothing torn, and one more full check.
        m.apply(Op::Crash(Tear::None))?;
    }
}
