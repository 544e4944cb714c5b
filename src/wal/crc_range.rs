//! Checksums of arbitrary byte ranges of one buffer in O(log n) each, used by recovery to find
//! the next intact record after damage (resynchronisation) without hashing every candidate
//! record in full.
//!
//! CRC-32 is linear: for byte strings A and B, `crc(A‖B) = x^(8|B|)·crc(A) ⊕ crc(B)` (mod the
//! CRC polynomial; the same identity as zlib's `crc32_combine`). So
//! `crc(B) = crc(A‖B) ⊕ x^(8|B|)·crc(A)`: with prefix checksums of the buffer, the checksum
//! of any range follows from two prefixes and one multiplication.

/// The reflected CRC-32 (IEEE) polynomial.
const POLY: u32 = 0xedb8_8320;
/// Distance between stored prefix checksums.
const STRIDE: usize = 64;

/// `a·b mod P` in the reflected bit order used by CRC-32 (zlib's `multmodp`).
fn mult_mod(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// Precomputed `x^(2^k) mod P` for k in 0..64.
fn x2k_table() -> [u32; 64] {
    let mut t = [0u32; 64];
    let mut p: u32 = 1 << 30; // x^1
    for e in &mut t {
        *e = p;
        p = mult_mod(p, p);
    }
    t
}

/// Prefix checksums over one buffer, answering `crc(buf[a..b])` queries.
pub(crate) struct RangeCrc<'a> {
    buf: &'a [u8],
    /// `prefix[i] = crc(buf[0 .. i*STRIDE])`.
    prefix: Vec<u32>,
    x2k: [u32; 64],
}

impl<'a> RangeCrc<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        let mut prefix = Vec::with_capacity(buf.len() / STRIDE + 1);
        let mut h = crc32fast::Hasher::new();
        prefix.push(0);
        for chunk in buf.chunks(STRIDE) {
            if chunk.len() < STRIDE {
                break;
            }
            h.update(chunk);
            prefix.push(h.clone().finalize());
        }
        Self {
            buf,
            prefix,
            x2k: x2k_table(),
        }
    }

    /// `x^(8n) mod P`.
    fn x8n(&self, n: u64) -> u32 {
        let mut p: u32 = 1 << 31; // x^0
        let mut k = 3; // x^(2^3) = x^8
        let mut n = n;
        while n != 0 {
            if n & 1 != 0 {
                p = mult_mod(self.x2k[k & 63], p);
            }
            n >>= 1;
            k += 1;
        }
        p
    }

    /// `crc(A‖B)` from `crc(A)`, `crc(B)` and `|B|`.
    pub(crate) fn combine(&self, crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
        mult_mod(self.x8n(len_b), crc_a) ^ crc_b
    }

    /// `crc(buf[0..i])`.
    fn prefix_crc(&self, i: usize) -> u32 {
        let k = (i / STRIDE).min(self.prefix.len() - 1);
        let start = k * STRIDE;
        let mut h = crc32fast::Hasher::new_with_initial(self.prefix[k]);
        h.update(&self.buf[start..i]);
        h.finalize()
    }

    /// `crc(buf[a..b])`; `a <= b <= buf.len()`.
    pub(crate) fn range(&self, a: usize, b: usize) -> u32 {
        if b - a <= 2 * STRIDE {
            return crc32fast::hash(&self.buf[a..b]);
        }
        let pa = self.prefix_crc(a);
        let pb = self.prefix_crc(b);
        pb ^ mult_mod(self.x8n((b - a) as u64), pa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checksums_match_direct_hashing() {
        let buf: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let r = RangeCrc::new(&buf);
        for (a, b) in [
            (0, 0),
            (0, 5000),
            (1, 4999),
            (63, 64),
            (64, 1000),
            (100, 229),
            (777, 4321),
            (4990, 5000),
        ] {
            assert_eq!(r.range(a, b), crc32fast::hash(&buf[a..b]), "range {a}..{b}");
        }
    }

    #[test]
    fn combine_matches_hashing_the_concatenation() {
        let a = b"segment id and length";
        let b: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let r = RangeCrc::new(&[]);
        let mut ab = a.to_vec();
        ab.extend_from_slice(&b);
        assert_eq!(
            r.combine(crc32fast::hash(a), crc32fast::hash(&b), b.len() as u64),
            crc32fast::hash(&ab)
        );
    }
}
