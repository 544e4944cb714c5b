//! What was sent and acknowledged (the [`Ledger`] every feed records into), the records
//! themselves, and the check of the node's output against the ledger.

use std::collections::HashMap;
use std::path::Path;

/// What the producers know.
#[derive(Default)]
pub struct Ledger {
    /// Every record id ever sent (first send).
    pub sent: u64,
    /// Ids acknowledged durable.
    pub acked: Vec<bool>,
}

impl Ledger {
    /// Records that every id below `end` has been sent.
    pub fn sent_below(&mut self, end: u64) {
        self.sent = self.sent.max(end);
    }

    /// Records that `id` was acknowledged.
    pub fn ack(&mut self, id: u64) {
        let i = id as usize;
        if self.acked.len() <= i {
            self.acked.resize(i + 1, false);
        }
        self.acked[i] = true;
    }

    /// How many ids were acknowledged.
    pub fn acked_count(&self) -> usize {
        self.acked.iter().filter(|a| **a).count()
    }

    fn is_acked(&self, id: u64) -> bool {
        self.acked.get(id as usize).copied().unwrap_or(false)
    }
}

/// The payload of record `id`.
pub fn record(id: u64) -> String {
    // Sizes vary with the id; the id leads so the verifier can parse any line.
    let pad = (id.wrapping_mul(2_654_435_761) % 120) as usize;
    format!("rec-{id:012}-{}", "x".repeat(pad))
}

/// The id of a line that is exactly a record the producers send, or `None`.
pub fn parse_record(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("rec-")?;
    let (id, pad) = rest.split_at_checked(12)?;
    let id: u64 = id.parse().ok()?;
    let pad = pad.strip_prefix('-')?;
    (record(id) == format!("rec-{id:012}-{pad}")).then_some(id)
}

/// What the node's `dir` output holds.
#[derive(Debug, Default)]
pub struct Output {
    /// How many times each record id appears.
    pub seen: HashMap<u64, u32>,
    /// Lines that are not records.
    pub corrupt: u64,
    /// Batch files read.
    pub files: usize,
}

/// Reads every `batch-*` file in `out_dir` (`lines` format), in name order.
pub fn read_output(out_dir: &Path) -> Result<Output, String> {
    let mut out = Output::default();
    let mut entries: Vec<_> = std::fs::read_dir(out_dir)
        .map_err(|e| format!("{}: {e}", out_dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("batch-"))
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        out.files += 1;
        let text =
            std::fs::read(e.path()).map_err(|err| format!("{}: {err}", e.path().display()))?;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match std::str::from_utf8(line).ok().and_then(parse_record) {
                Some(id) => *out.seen.entry(id).or_default() += 1,
                None => out.corrupt += 1,
            }
        }
    }
    Ok(out)
}

/// The output checked against the ledger.
#[derive(Debug)]
pub struct Verdict {
    /// Records acknowledged.
    pub acked: usize,
    /// Acknowledged records absent from the output, in id order.
    pub missing: Vec<u64>,
    /// Extra copies of records present more than once.
    pub duplicates: u64,
    /// Lines that are not records, and records that were never sent.
    pub corrupt: u64,
    /// Records present that were never acknowledged.
    pub unacked_present: usize,
}

impl Verdict {
    pub fn new(ledger: &Ledger, output: &Output) -> Verdict {
        let acked: Vec<u64> = ledger
            .acked
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| i as u64)
            .collect();
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|id| !output.seen.contains_key(id))
            .collect();
        let duplicates: u64 = output
            .seen
            .values()
            .map(|c| u64::from(c.saturating_sub(1)))
            .sum();
        let never_sent = output.seen.keys().filter(|id| **id >= ledger.sent).count();
        let unacked_present = output
            .seen
            .keys()
            .filter(|id| !ledger.is_acked(**id))
            .count();
        Verdict {
            acked: acked.len(),
            missing,
            duplicates,
            corrupt: output.corrupt + never_sent as u64,
            unacked_present,
        }
    }

    /// Nothing acknowledged missing, nothing corrupt, and something acknowledged at all.
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt == 0 && self.acked > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_rejected() {
        for id in [0, 1, 77, 123_456_789] {
            assert_eq!(parse_record(&record(id)), Some(id));
        }
        assert_eq!(parse_record("rec-000000000001-xxxxxxxxxxxx"), None);
        assert_eq!(parse_record("hello"), None);
        assert_eq!(parse_record(&record(5)[..10]), None);
    }

    #[test]
    fn the_verdict_counts_missing_duplicates_corrupt_and_unacked() {
        let dir = tempfile::tempdir().unwrap();
        let lines = |ids: &[u64]| ids.iter().map(|i| record(*i) + "\n").collect::<String>();
        std::fs::write(dir.path().join("batch-1"), lines(&[0, 1, 3])).unwrap();
        std::fs::write(dir.path().join("batch-2"), lines(&[3, 9]) + "garbage\n").unwrap();
        std::fs::write(dir.path().join("other"), "not read\n").unwrap();
        let output = read_output(dir.path()).unwrap();
        assert_eq!((output.files, output.seen.len(), output.corrupt), (2, 4, 1));

        let mut ledger = Ledger::default();
        ledger.sent_below(5);
        for id in [0, 1, 2] {
            ledger.ack(id);
        }
        assert_eq!(ledger.acked_count(), 3);
        let v = Verdict::new(&ledger, &output);
        assert_eq!(v.acked, 3);
        assert_eq!(v.missing, [2]);
        assert_eq!(v.duplicates, 1);
        // "garbage" and record 9, which was never sent.
        assert_eq!(v.corrupt, 2);
        // 3 and 9.
        assert_eq!(v.unacked_present, 2);
        assert!(!v.ok());
    }
}
