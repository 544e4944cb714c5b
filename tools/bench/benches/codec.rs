//! Criterion micro-benchmarks of the WAL's pure parts: framing a record (header + CRC-32) and
//! verifying a whole segment as recovery does. Throughput is payload bytes per second; compare
//! with the WAL end-to-end figures of `benches/wal.rs` (disk-bound) to see how much headroom the
//! CPU side leaves.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weir::wal::codec::{decode_frame, encode_frame, encode_frame_header, encode_header, Frame};
use weir::wal::recovery::scan_segment;

fn payload(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect()
}

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for len in [100usize, 4096, 1 << 20] {
        let p = payload(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encode_header", len), &p, |b, p| {
            b.iter(|| encode_frame_header(black_box(7), black_box(p)));
        });
        let mut f = Vec::new();
        encode_frame(7, &p, &mut f);
        g.bench_with_input(BenchmarkId::new("decode_verify", len), &f, |b, f| {
            b.iter(|| match decode_frame(7, black_box(f), u32::MAX) {
                Frame::Record { payload, .. } => payload.len(),
                other => panic!("{other:?}"),
            });
        });
    }
    g.finish();
}

fn segment_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_segment_16MiB");
    g.sample_size(20);
    for len in [100usize, 4096, 1 << 20] {
        let p = payload(len);
        let mut seg = encode_header(3).to_vec();
        while seg.len() + len + 8 <= 16 << 20 {
            encode_frame(3, &p, &mut seg);
        }
        g.throughput(Throughput::Bytes(seg.len() as u64));
        g.bench_with_input(BenchmarkId::new("records_of", len), &seg, |b, seg| {
            b.iter(|| scan_segment(3, black_box(seg), true).records.len());
        });
    }
    g.finish();
}

criterion_group!(benches, frame, segment_scan);
criterion_main!(benches);
