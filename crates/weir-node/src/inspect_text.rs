//! The WAL inspector's output for people and scripts: the `wal list` table, the `wal verify`
//! report and `wal dump` records as text, hex or JSON lines. The analysis behind them (reading
//! every segment, classifying every byte) is `weir_wal::inspect`.

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::str::FromStr;

use weir_wal::inspect::{plural, DirReport, DumpEvent};
use weir_wal::recovery::CorruptRegion;
use weir_wal::segment_name;

/// Output format of `wal dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DumpFormat {
    /// One line per record; the payload as escaped text (valid UTF-8 shown as is, control
    /// characters and invalid bytes escaped).
    #[default]
    Text,
    /// A line per record followed by a hex dump of the payload.
    Hex,
    /// One JSON object per line; the payload hex-encoded.
    Json,
}

impl FromStr for DumpFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(DumpFormat::Text),
            "hex" => Ok(DumpFormat::Hex),
            "json" => Ok(DumpFormat::Json),
            other => Err(format!(
                "invalid format {other:?}: expected text, hex or json"
            )),
        }
    }
}

impl fmt::Display for DumpFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DumpFormat::Text => "text",
            DumpFormat::Hex => "hex",
            DumpFormat::Json => "json",
        })
    }
}

/// A payload as a quoted, escaped string: valid UTF-8 is kept (with control characters,
/// quotes and backslashes escaped as in Rust), invalid bytes become `\xNN`. Lossless.
#[must_use]
pub fn escape_payload(payload: &[u8]) -> String {
    let mut s = String::with_capacity(payload.len() + 2);
    s.push('"');
    for chunk in payload.utf8_chunks() {
        for c in chunk.valid().chars() {
            // `escape_debug` keeps printable non-ASCII characters readable.
            let _ = write!(s, "{}", c.escape_debug());
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s.push('"');
    s
}

/// Lower-case hex of `bytes`, without separators.
#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A classic hex dump (offset, 16 bytes in hex, printable ASCII), each line prefixed by
/// `indent` and ended by a newline.
#[must_use]
pub fn hex_dump(bytes: &[u8], indent: &str) -> String {
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "{indent}{:08x} ", i * 16);
        for j in 0..16 {
            if j == 8 {
                s.push(' ');
            }
            match line.get(j) {
                Some(b) => {
                    let _ = write!(s, " {b:02x}");
                }
                None => s.push_str("   "),
            }
        }
        s.push_str("  |");
        s.extend(line.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        }));
        s.push_str("|\n");
    }
    s
}

/// One damaged region, for people: where, how much (with `what_happened`, e.g. " skipped"),
/// records lost and why.
fn damage(c: &CorruptRegion, what_happened: &str) -> String {
    format!(
        "segment {} ({}) offset {}: {}{what_happened}, {}: {}",
        c.segment,
        segment_name(c.segment),
        c.offset,
        plural(c.bytes, "byte"),
        lost(c.records),
        c.reason
    )
}

fn lost(records: Option<u64>) -> String {
    match records {
        Some(n) => format!("{} lost", plural(n, "record")),
        None => "at least 1 record lost (record boundaries destroyed)".to_owned(),
    }
}

/// Writes the `wal list` table: one line per segment (id, file, size, intact records,
/// status) after a header line; then notes on vanished and ignored files.
///
/// # Errors
/// Output errors.
pub fn write_list(report: &DirReport, out: &mut dyn Write) -> io::Result<()> {
    let width = |header: &str, values: &mut dyn Iterator<Item = u64>| {
        values
            .map(|v| v.to_string().len())
            .chain([header.len()])
            .max()
            .unwrap_or(0)
    };
    let segs = &report.segments;
    let w_id = width("SEGMENT", &mut segs.iter().map(|s| s.id));
    let w_size = width("BYTES", &mut segs.iter().map(|s| s.size));
    let w_rec = width("RECORDS", &mut segs.iter().map(|s| s.records));
    let w_name = segment_name(0).len();
    writeln!(
        out,
        "{:>w_id$}  {:<w_name$}  {:>w_size$}  {:>w_rec$}  STATUS",
        "SEGMENT", "FILE", "BYTES", "RECORDS"
    )?;
    for s in segs {
        writeln!(
            out,
            "{:>w_id$}  {:<w_name$}  {:>w_size$}  {:>w_rec$}  {}",
            s.id,
            s.name,
            s.size,
            s.records,
            s.status()
        )?;
    }
    write_notes(report, out)
}

fn write_notes(report: &DirReport, out: &mut dyn Write) -> io::Result<()> {
    for id in &report.vanished {
        writeln!(
            out,
            "note: {} was deleted while being inspected (cleanup on a live directory)",
            segment_name(*id)
        )?;
    }
    if !report.ignored.is_empty() {
        writeln!(
            out,
            "note: ignored (not WAL segments): {}",
            report.ignored.join(", ")
        )?;
    }
    Ok(())
}

/// Writes the `wal verify` report: a line per segment, a line per damaged region and torn
/// tail, totals, and a verdict line.
///
/// # Errors
/// Output errors.
pub fn write_verify(report: &DirReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "WAL directory {}", report.dir.display())?;
    for s in &report.segments {
        writeln!(
            out,
            "segment {} ({}): {} bytes, {} ({} payload bytes): {}",
            s.id,
            s.name,
            s.size,
            plural(s.records, "intact record"),
            s.record_bytes,
            s.status()
        )?;
        if s.is_half_created() {
            writeln!(
                out,
                "  half-created: only {} of a segment header and no records (a crash while \
                 creating it; recovery removes it)",
                plural(s.size, "byte")
            )?;
        }
        for c in &s.corrupt {
            writeln!(out, "  DAMAGED: {}", damage(c, ""))?;
        }
        if let Some((off, bytes)) = s.torn_tail {
            writeln!(
                out,
                "  torn tail: segment {} ({}) offset {}: {} (an unacknowledged write cut by a \
                 crash, or a write in progress; recovery truncates it)",
                s.id,
                s.name,
                off,
                plural(bytes, "byte")
            )?;
        }
    }
    let t = report.totals();
    writeln!(
        out,
        "totals: {}, {} ({} payload bytes), {} file bytes; {} ({} bytes), {}; {} ({} bytes, {}{})",
        plural(t.segments, "segment"),
        plural(t.records, "intact record"),
        t.record_bytes,
        t.file_bytes,
        plural(t.torn_tails, "torn tail"),
        t.torn_bytes,
        plural(t.half_created, "half-created segment"),
        plural(t.damaged_regions, "damaged region"),
        t.damaged_bytes,
        if t.records_lost_exact {
            ""
        } else {
            "at least "
        },
        plural(t.records_lost, "record") + " lost",
    )?;
    write_notes(report, out)?;
    if report.is_corrupt() {
        let first = report
            .segments
            .iter()
            .flat_map(|s| s.corrupt.first())
            .next();
        if let Some(c) = first {
            writeln!(
                out,
                "result: CORRUPT: {} (first at segment {} offset {}); opening this directory \
                 fails in strict recovery mode, skip_corrupt would drop the damage",
                plural(t.damaged_regions, "damaged region"),
                c.segment,
                c.offset
            )?;
        }
    } else if t.torn_tails + t.half_created > 0 {
        writeln!(
            out,
            "result: ok (every record verifies; the newest segment ends in a crash artefact \
             or a write in progress)"
        )?;
    } else {
        writeln!(out, "result: ok (every record verifies)")?;
    }
    Ok(())
}

/// Writes one [`DumpEvent`] of a record in `format`; other events are written to `notes` as
/// one line each.
///
/// # Errors
/// Output errors.
pub fn write_dump_event(
    ev: &DumpEvent<'_>,
    format: DumpFormat,
    max_bytes: Option<usize>,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> io::Result<()> {
    match *ev {
        DumpEvent::Record {
            segment,
            offset,
            payload: full,
        } => {
            // Text and hex show at most `max_bytes` of each payload; JSON is always complete.
            let cut = match format {
                DumpFormat::Json => full.len(),
                _ => max_bytes.map_or(full.len(), |m| m.min(full.len())),
            };
            let payload = &full[..cut];
            let more = if cut < full.len() {
                format!(
                    " ... ({} more bytes; --max-bytes shows more)",
                    full.len() - cut
                )
            } else {
                String::new()
            };
            match format {
                DumpFormat::Text => writeln!(
                    out,
                    "segment {segment} offset {offset} len {}: {}{more}",
                    full.len(),
                    escape_payload(payload)
                ),
                DumpFormat::Hex => {
                    writeln!(
                        out,
                        "segment {segment} offset {offset} len {}:{more}",
                        full.len()
                    )?;
                    out.write_all(hex_dump(payload, "  ").as_bytes())
                }
                DumpFormat::Json => writeln!(
                out,
                "{{\"segment\":{segment},\"offset\":{offset},\"len\":{},\"payload_hex\":\"{}\"}}",
                payload.len(),
                to_hex(payload)
            ),
            }
        }
        DumpEvent::Damaged(c) => writeln!(notes, "warning: DAMAGED: {}", damage(c, " skipped")),
        DumpEvent::TornTail {
            segment,
            offset,
            bytes,
        } => writeln!(
            notes,
            "note: torn tail: segment {segment} ({}) offset {offset}: {} (not a record; a \
             crash artefact or a write in progress)",
            segment_name(segment),
            plural(bytes, "byte")
        ),
        DumpEvent::HalfCreated { segment, bytes } => writeln!(
            notes,
            "note: {} is half-created ({}, no records)",
            segment_name(segment),
            plural(bytes, "byte")
        ),
        DumpEvent::Vanished { segment } => writeln!(
            notes,
            "note: {} was deleted while being read (cleanup on a live directory)",
            segment_name(segment)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_escaping_is_lossless_and_readable() {
        assert_eq!(escape_payload(b"hello"), "\"hello\"");
        assert_eq!(escape_payload(b"a\"b\\c\n\t"), r#""a\"b\\c\n\t""#);
        assert_eq!(escape_payload("é".as_bytes()), "\"é\"");
        assert_eq!(escape_payload(&[0xff, b'a', 0x00]), r#""\xffa\0""#);
    }

    #[test]
    fn hex_dump_layout() {
        let d = hex_dump(b"0123456789abcdefXY", "");
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            "00000000  30 31 32 33 34 35 36 37  38 39 61 62 63 64 65 66  |0123456789abcdef|"
        );
        assert!(lines[1].starts_with("00000010  58 59 "));
        assert!(lines[1].ends_with("|XY|"));
        assert_eq!(hex_dump(b"", ""), "");
        assert_eq!(to_hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
