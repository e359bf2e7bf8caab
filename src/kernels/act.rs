//! Activations as the kernels read them: f32 or bf16 rows, converted (and, for INT4, reordered)
//! once per call so the inner loops see contiguous f32 in the weight's own column order.

use std::borrow::Cow;

use crate::error::{check_len, Result};

/// Row-major `[m, k]` activations in one of the dtypes the kernels accept.
#[derive(Debug, Clone, Copy)]
pub enum Act<'a> {
    F32(&'a [f32]),
    /// bfloat16 bit patterns (what `tensor.view(torch.int16)` gives); widening is exact.
    Bf16(&'a [u16]),
}

impl<'a> Act<'a> {
    pub fn len(&self) -> usize {
        match self {
            Act::F32(x) => x.len(),
            Act::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn check(&self, m: usize, k: usize) -> Result<()> {
        check_len("input", self.len(), m * k)
    }

    /// Row `mi` (width `k`) as f32, natural column order.
    pub fn row_into(&self, mi: usize, k: usize, dst: &mut [f32]) {
        match self {
            Act::F32(x) => dst.copy_from_slice(&x[mi * k..(mi + 1) * k]),
            Act::Bf16(x) => bf16_to_f32(&x[mi * k..(mi + 1) * k], dst),
        }
    }

    /// All rows as f32; borrowed when no conversion or reordering is needed.
    pub fn to_f32(&self, m: usize, k: usize, int4_order: bool) -> Cow<'a, [f32]> {
        match self {
            Act::F32(x) if !int4_order => Cow::Borrowed(&x[..m * k]),
            _ => {
                let mut out = vec![0f32; m * k];
                let mut row = vec![0f32; k];
                for mi in 0..m {
                    let dst = &mut out[mi * k..(mi + 1) * k];
                    if int4_order {
                        self.row_into(mi, k, &mut row);
                        to_int4_order(&row, dst);
                    } else {
                        self.row_into(mi, k, dst);
                    }
                }
                Cow::Owned(out)
            }
        }
    }
}

/// bf16 bits -> f32 (a 16-bit shift, exact). Written as a plain loop so it vectorizes.
#[inline]
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((*s as u32) << 16);
    }
}

/// Columns per INT4 chunk: 16 packed bytes.
pub const INT4_CHUNK: usize = 32;

/// The column order of the INT4 kernels: inside each full 32-column chunk, the 16 even columns
/// then the 16 odd ones (the low, then the high nibbles of 16 packed bytes), so a kernel decodes
/// nibbles without interleaving them back. Columns past the last full chunk keep their place.
/// Groups are multiples of 32 columns, so chunks never straddle a group.
pub fn to_int4_order(src: &[f32], dst: &mut [f32]) {
    let k = src.len();
    let full = k / INT4_CHUNK * INT4_CHUNK;
    for (s, d) in src[..full].chunks_exact(INT4_CHUNK).zip(dst[..full].chunks_exact_mut(INT4_CHUNK)) {
        for i in 0..INT4_CHUNK / 2 {
            d[i] = s[2 * i];
            d[INT4_CHUNK / 2 + i] = s[2 * i + 1];
        }
    }
    dst[full..k].copy_from_slice(&src[full..]);
}

/// Position in kernel order of natural column `c` (test helper and documentation of the order).
pub fn int4_order_index(c: usize, k: usize) -> usize {
    let full = k / INT4_CHUNK * INT4_CHUNK;
    if c >= full {
        return c;
    }
    let base = c / INT4_CHUNK * INT4_CHUNK;
    let i = c - base;
    base + if i.is_multiple_of(2) { i / 2 } else { INT4_CHUNK / 2 + i / 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_order_is_a_permutation() {
        for k in [1usize, 7, 31, 32, 33, 64, 100] {
            let src: Vec<f32> = (0..k).map(|i| i as f32).collect();
            let mut dst = vec![0f32; k];
            to_int4_order(&src, &mut dst);
            for c in 0..k {
                assert_eq!(dst[int4_order_index(c, k)], c as f32, "k={k} c={c}");
            }
        }
    }

    #[test]
    fn bf16_rows() {
        let bits = [0x3f80u16, 0xc000, 0x0000, 0x7f80];
        let a = Act::Bf16(&bits);
        assert_eq!(&*a.to_f32(2, 2, false), &[1.0, -2.0, 0.0, f32::INFINITY]);
        assert!(a.check(3, 2).is_err());
    }
}
