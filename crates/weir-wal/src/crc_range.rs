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

/// Prefix checksums over one buffer, answering "checksum of some prefix followed by
/// `buf[a..b]`" in O(1) multiplications.
pub(crate) struct RangeCrc<'a> {
    buf: &'a [u8],
    /// `prefix[i] = crc(buf[0 .. i*STRIDE])`.
    prefix: Vec<u32>,
    /// `shift[j][b] = x^(8 * b * 256^j) mod P`: multiplying by `x^(8n)` for any 32-bit `n`
    /// takes at most four table entries.
    shift: Box<[[u32; 256]; 4]>,
}

/// Ranges up to this long are hashed directly.
const DIRECT: usize = 256;

impl<'a> RangeCrc<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        let mut prefix = Vec::with_capacity(buf.len() / STRIDE + 1);
        let mut h = crc32fast::Hasher::new();
        prefix.push(0);
        for chunk in buf.chunks_exact(STRIDE) {
            h.update(chunk);
            prefix.push(h.clone().finalize());
        }
        let mut shift = Box::new([[0u32; 256]; 4]);
        // x^8, then x^(8*256), x^(8*256^2), x^(8*256^3) by repeated 256th powers.
        let mut base: u32 = 1 << (31 - 8);
        for table in shift.iter_mut() {
            table[0] = 1 << 31; // x^0
            for b in 1..256 {
                table[b] = mult_mod(table[b - 1], base);
            }
            base = mult_mod(table[255], base);
        }
        Self { buf, prefix, shift }
    }

    /// `x^(8n) mod P`.
    fn x8n(&self, n: u32) -> u32 {
        let mut p = self.shift[0][(n & 0xff) as usize];
        for j in 1..4 {
            let b = ((n >> (8 * j)) & 0xff) as usize;
            if b != 0 {
                p = mult_mod(p, self.shift[j][b]);
            }
        }
        p
    }

    /// `crc(buf[0..i])`.
    fn prefix_crc(&self, i: usize) -> u32 {
        let k = (i / STRIDE).min(self.prefix.len() - 1);
        let mut h = crc32fast::Hasher::new_with_initial(self.prefix[k]);
        h.update(&self.buf[k * STRIDE..i]);
        h.finalize()
    }

    /// `crc(X ‖ buf[a..b])` given `crc_x = crc(X)`; `a <= b <= buf.len()`, `b - a < 2^32`.
    pub(crate) fn extend(&self, crc_x: u32, a: usize, b: usize) -> u32 {
        if b - a <= DIRECT {
            let mut h = crc32fast::Hasher::new_with_initial(crc_x);
            h.update(&self.buf[a..b]);
            return h.finalize();
        }
        // crc(X‖B) = x^(8|B|)·crc(X) ⊕ crc(B), and crc(B) = P(b) ⊕ x^(8|B|)·P(a).
        let shift = self.x8n(u32::try_from(b - a).unwrap_or(u32::MAX));
        mult_mod(shift, crc_x ^ self.prefix_crc(a)) ^ self.prefix_crc(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_checksums_match_direct_hashing() {
        let buf: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let r = RangeCrc::new(&buf);
        let head = b"segment id and length";
        for (a, b) in [
            (0, 0),
            (0, 70_000),
            (1, 69_999),
            (63, 64),
            (64, 1000),
            (100, 229),
            (100, 357),
            (777, 4321),
            (4990, 5000),
            (3, 65_539),
        ] {
            let mut whole = head.to_vec();
            whole.extend_from_slice(&buf[a..b]);
            assert_eq!(
                r.extend(crc32fast::hash(head), a, b),
                crc32fast::hash(&whole),
                "range {a}..{b}"
            );
        }
    }
}
