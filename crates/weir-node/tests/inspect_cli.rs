//! `receiver-node wal list|verify|dump` on real WAL directories: clean, damaged, torn, live,
//! missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use weir::wal::codec::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use weir::wal::{segment_name, Wal, WalConfig};
use weir::RecordHandle;

fn node(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_receiver-node"))
        .args(args)
        .output()
        .expect("run receiver-node")
}

fn wal(args: &[&str], dir: &Path) -> (i32, String, String) {
    let mut a = vec!["wal"];
    a.extend_from_slice(&args[..1]);
    let d = dir.to_str().expect("utf-8 temp path");
    a.push(d);
    a.extend_from_slice(&args[1..]);
    let o = node(&a);
    (
        o.status.code().expect("exited normally"),
        String::from_utf8(o.stdout).expect("utf-8 stdout"),
        String::from_utf8(o.stderr).expect("utf-8 stderr"),
    )
}

fn payload(i: usize) -> Vec<u8> {
    format!("record-{i:04}:{}", "x".repeat(300 + i % 7)).into_bytes()
}

/// A closed WAL in a new temp dir holding `n` records of [`payload`]; small segments so that
/// there are several.
fn make_wal(n: usize, config: WalConfig) -> (tempfile::TempDir, Vec<RecordHandle>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, _) = Wal::open_dir(dir.path(), config).expect("open");
    let handles = (0..n)
        .map(|i| w.append(payload(i)).wait().expect("append"))
        .collect();
    w.close().expect("close");
    (dir, handles)
}

fn small_segments() -> WalConfig {
    WalConfig {
        segment_max_bytes: 4096,
        ..WalConfig::default()
    }
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_name(id))
}

fn segments_of(handles: &[RecordHandle]) -> Vec<u64> {
    let mut s: Vec<u64> = handles.iter().map(|h| h.segment).collect();
    s.dedup();
    s
}

#[test]
fn a_clean_directory_verifies_with_exit_0_and_the_right_counts() {
    let (dir, handles) = make_wal(40, small_segments());
    let segs = segments_of(&handles);
    assert!(segs.len() >= 3, "want several segments, got {segs:?}");

    let (code, out, err) = wal(&["verify"], dir.path());
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let payload_bytes: usize = (0..40).map(|i| payload(i).len()).sum();
    assert!(
        out.contains(&format!(
            "totals: {} segments, 40 intact records ({payload_bytes} payload bytes)",
            segs.len()
        )),
        "{out}"
    );
    assert!(out.contains("0 damaged regions"), "{out}");
    assert!(out.contains("result: ok"), "{out}");
    for id in &segs {
        assert!(out.contains(&segment_name(*id)), "{out}");
    }
}

#[test]
fn an_empty_log_verifies_clean() {
    let (dir, _) = make_wal(0, WalConfig::default());
    let (code, out, _) = wal(&["verify"], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 segment, 0 intact records"), "{out}");
}

#[test]
fn a_flipped_byte_mid_segment_exits_1_naming_segment_and_offset() {
    let (dir, handles) = make_wal(40, small_segments());
    // A record in the middle of the second segment, with intact records after it.
    let seg = segments_of(&handles)[1];
    let in_seg: Vec<&RecordHandle> = handles.iter().filter(|h| h.segment == seg).collect();
    assert!(in_seg.len() >= 3);
    let victim = in_seg[in_seg.len() / 2];
    let path = seg_path(dir.path(), seg);
    let mut bytes = std::fs::read(&path).unwrap();
    let size_before = bytes.len();
    let at = victim.offset as usize + FRAME_HEADER_LEN + 17;
    bytes[at] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();

    let (code, out, err) = wal(&["verify"], dir.path());
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    let frame = FRAME_HEADER_LEN as u64 + u64::from(victim.len);
    let want = format!(
        "DAMAGED: segment {seg} ({}) offset {}: {frame} bytes, 1 record lost",
        segment_name(seg),
        victim.offset
    );
    assert!(out.contains(&want), "want {want:?} in\n{out}");
    assert!(out.contains("39 intact records"), "{out}");
    assert!(out.contains("result: CORRUPT"), "{out}");

    // Read-only: the file is untouched.
    assert_eq!(std::fs::read(&path).unwrap().len(), size_before);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    let (code, out, _) = wal(&["list"], dir.path());
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.contains(&segment_name(seg)))
        .expect("segment listed");
    assert!(line.ends_with("1 damaged region"), "{line}");

    // dump skips the damaged record, says so on stderr, and exits 1.
    let (code, out, err) = wal(&["dump"], dir.path());
    assert_eq!(code, 1);
    assert_eq!(out.lines().count(), 39);
    assert!(err.contains(&format!("offset {}", victim.offset)), "{err}");
}

#[test]
fn a_torn_tail_in_the_newest_segment_is_ok_and_is_not_truncated() {
    let (dir, handles) = make_wal(10, WalConfig::default());
    let last = handles.last().unwrap();
    let path = seg_path(dir.path(), last.segment);
    let bytes = std::fs::read(&path).unwrap();
    let cut = last.offset as usize + 20;
    std::fs::write(&path, &bytes[..cut]).unwrap();

    let (code, out, err) = wal(&["verify"], dir.path());
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("9 intact records"), "{out}");
    assert!(
        out.contains(&format!("torn tail at {} (20 bytes)", last.offset)),
        "{out}"
    );
    assert!(out.contains("1 torn tail (20 bytes)"), "{out}");
    // verify must not repair anything.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), cut as u64);
}

#[test]
fn list_shows_every_segment_with_size_records_and_status() {
    let (dir, handles) = make_wal(40, small_segments());
    let (code, out, err) = wal(&["list"], dir.path());
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let segs = segments_of(&handles);
    assert_eq!(lines.len(), 1 + segs.len(), "{out}");
    assert!(lines[0].contains("SEGMENT") && lines[0].contains("STATUS"));
    for (line, id) in lines[1..].iter().zip(&segs) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let size = std::fs::metadata(seg_path(dir.path(), *id)).unwrap().len();
        let records = handles.iter().filter(|h| h.segment == *id).count();
        assert_eq!(
            cols,
            [
                id.to_string(),
                segment_name(*id),
                size.to_string(),
                records.to_string(),
                "ok".to_owned()
            ],
            "{out}"
        );
    }
}

#[test]
fn dump_prints_every_payload_in_order_in_each_format() {
    let (dir, handles) = make_wal(12, small_segments());

    // By default text shows at most 200 bytes of each payload.
    let (code, out, err) = wal(&["dump", "--max-bytes", "5"], dir.path());
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    let p0 = String::from_utf8(payload(0)).unwrap();
    assert_eq!(
        first,
        format!(
            "segment {} offset {} len {}: \"{}\" ... ({} more bytes; --max-bytes shows more)",
            handles[0].segment,
            handles[0].offset,
            handles[0].len,
            &p0[..5],
            p0.len() - 5
        )
    );

    let (code, out, err) = wal(&["dump", "--max-bytes", "0"], dir.path());
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 12);
    for (i, (line, h)) in lines.iter().zip(&handles).enumerate() {
        let want = format!(
            "segment {} offset {} len {}: \"{}\"",
            h.segment,
            h.offset,
            h.len,
            String::from_utf8(payload(i)).unwrap()
        );
        assert_eq!(*line, want);
    }

    let (code, out, _) = wal(&["dump", "--format", "json"], dir.path());
    assert_eq!(code, 0);
    for (i, (line, h)) in out.lines().zip(&handles).enumerate() {
        let hex: String = payload(i).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            line,
            format!(
                "{{\"segment\":{},\"offset\":{},\"len\":{},\"payload_hex\":\"{hex}\"}}",
                h.segment, h.offset, h.len
            )
        );
    }

    let (code, out, _) = wal(
        &[
            "dump",
            "--format",
            "hex",
            "--limit",
            "1",
            "--max-bytes",
            "0",
        ],
        dir.path(),
    );
    assert_eq!(code, 0);
    let h = handles[0];
    assert!(
        out.starts_with(&format!(
            "segment {} offset {} len {}:\n  00000000  72 65 63 6f 72 64 2d 30  30 30 30 3a 78 78 78 78  |record-0000:xxxx|\n",
            h.segment, h.offset, h.len
        )),
        "{out}"
    );
    assert!(!out.contains("record-0001"));
}

#[test]
fn dump_from_and_limit_select_records() {
    let (dir, handles) = make_wal(30, small_segments());
    let start = handles[13];
    let from = format!("{}:{}", start.segment, start.offset);
    let (code, out, _) = wal(&["dump", "--from", &from, "--limit", "5"], dir.path());
    assert_eq!(code, 0);
    let got: Vec<String> = out.lines().map(str::to_owned).collect();
    let want: Vec<String> = handles[13..18]
        .iter()
        .map(|h| format!("segment {} offset {} len {}:", h.segment, h.offset, h.len))
        .collect();
    assert_eq!(got.len(), 5);
    for (g, w) in got.iter().zip(&want) {
        assert!(g.starts_with(w), "{g} vs {w}");
    }

    // An offset inside a record starts at the next one; a bare segment at its first record.
    let inside = format!("{}:{}", start.segment, start.offset + 1);
    let (_, out, _) = wal(&["dump", "--from", &inside, "--limit", "1"], dir.path());
    assert!(
        out.contains(&format!("offset {} ", handles[14].offset)),
        "{out}"
    );
    let seg = handles.last().unwrap().segment;
    let first_of_last = handles.iter().find(|h| h.segment == seg).unwrap();
    assert_eq!(first_of_last.offset, SEGMENT_HEADER_LEN as u64);
    let (_, out, _) = wal(
        &["dump", "--from", &seg.to_string(), "--limit", "1"],
        dir.path(),
    );
    assert!(
        out.starts_with(&format!("segment {seg} offset {} ", SEGMENT_HEADER_LEN)),
        "{out}"
    );

    let (code, _, err) = wal(&["dump", "--from", "nonsense"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("invalid position"), "{err}");
}

#[test]
fn verify_works_on_a_live_directory_without_taking_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = Wal::open_dir(dir.path(), WalConfig::default()).unwrap();
    for i in 0..5 {
        w.append(payload(i)).wait().unwrap();
    }
    let (code, out, err) = wal(&["verify"], dir.path());
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("5 intact records"), "{out}");
    // The log is still usable: verify neither took nor broke the lock.
    w.append(b"after verify".to_vec()).wait().unwrap();
    w.close().unwrap();
    let (_, out, _) = wal(&["dump", "--format", "text"], dir.path());
    assert!(out.lines().last().unwrap().ends_with("\"after verify\""));
}

#[test]
fn a_missing_directory_is_a_clear_error_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-wal");
    for cmd in ["list", "verify", "dump"] {
        let (code, out, err) = wal(&[cmd], &missing);
        assert_eq!(code, 2, "{cmd}");
        assert!(out.is_empty(), "{cmd}: {out}");
        assert!(
            err.contains(&format!(
                "WAL directory {} does not exist",
                missing.display()
            )),
            "{cmd}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(
        !missing.exists(),
        "inspection must not create the directory"
    );
}

#[test]
fn usage_errors_exit_2_and_help_is_everywhere() {
    assert_eq!(node(&["wal"]).status.code(), Some(2));
    assert_eq!(node(&["wal", "verify"]).status.code(), Some(2));
    assert_eq!(
        node(&["wal", "dump", ".", "--format", "xml"]).status.code(),
        Some(2)
    );
    for args in [
        &["--help"][..],
        &["wal", "--help"],
        &["wal", "list", "--help"],
        &["wal", "verify", "--help"],
        &["wal", "dump", "--help"],
    ] {
        let o = node(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: receiver-node"));
    }
}
