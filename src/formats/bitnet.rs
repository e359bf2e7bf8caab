//! BitNet b1.58 ternary weights ("The Era of 1-bit LLMs", Ma et al. 2024, eq. 1-3):
//! `W~ = RoundClip(W / (gamma + eps), -1, 1)` with `gamma = mean |W|` (absmean), dequantized as
//! `W~ * gamma`. The paper takes one gamma per tensor; here it is one per row (output channel),
//! so rows decode on their own and an outlier row does not flatten the others.
//!
//! Row layout (`cols` a multiple of 32): `[cols / 4 bytes of 2-bit codes][f32 gamma]`, little
//! endian; code `c` in bits `2 * (i % 4)` of byte `i / 4` stands for `c - 1` (0, 1, 2 -> -1, 0, +1;
//! 3 never occurs). 2.0 bits per weight plus 32 bits per row.

use super::registry::{self, PackedFormat};
use crate::error::Result;
use crate::simd::KernelLevel;

/// Weights per block: a row length must be a multiple of it (the 2-bit codes fill whole bytes,
/// and blocks of 32 line up with the kernels' 512-column panels).
pub const BLOCK: usize = 32;
/// The paper's epsilon in `W / (gamma + eps)`, which keeps an all-zero row finite.
pub const EPS: f32 = 1e-5;

/// The ternary format (the registry's entry).
pub struct BitNet;

fn quantize_row(x: &[f32], out: &mut [u8]) {
    let cols = x.len();
    let gamma = (x.iter().map(|v| v.abs() as f64).sum::<f64>() / cols.max(1) as f64) as f32;
    let (codes, tail) = out.split_at_mut(cols / 4);
    for (byte, xs) in codes.iter_mut().zip(x.chunks_exact(4)) {
        let mut b = 0u8;
        for (i, v) in xs.iter().enumerate() {
            // round half to even, then clip to [-1, 1]: the paper's RoundClip
            let q = (v / (gamma + EPS)).round_ties_even().clamp(-1.0, 1.0) as i32;
            b |= ((q + 1) as u8) << (2 * i);
        }
        *byte = b;
    }
    tail.copy_from_slice(&gamma.to_le_bytes());
}

#[inline(always)]
fn decode(row: &[u8], cols: usize, b0: usize, b1: usize, out: &mut [f32]) {
    let t = &row[cols / 4..cols / 4 + 4];
    let gamma = f32::from_le_bytes([t[0], t[1], t[2], t[3]]);
    // (code - 1) * gamma as arithmetic, not a table lookup, so the loop vectorizes: the same
    // floats as -gamma / 0 / +gamma (code 3 never occurs in data this quantizer wrote)
    for (o, byte) in out[..(b1 - b0) * BLOCK].chunks_exact_mut(4).zip(&row[b0 * BLOCK / 4..b1 * BLOCK / 4]) {
        let b = *byte as u32;
        for (i, v) in o.iter_mut().enumerate() {
            *v = (((b >> (2 * i)) & 3) as i32 - 1) as f32 * gamma;
        }
    }
}

impl PackedFormat for BitNet {
    fn name(&self) -> &'static str {
        "ternary"
    }
    fn block_size(&self) -> usize {
        BLOCK
    }
    fn row_bytes_of(&self, cols: usize) -> usize {
        cols / 4 + 4
    }
    fn takes_importance(&self) -> bool {
        false
    }
    fn quantize(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        _imp: Option<&[f32]>,
        _level: KernelLevel,
    ) -> Result<Vec<u8>> {
        registry::quantize_rows(self, x, rows, cols, true, quantize_row)
    }
    fn quantize_ref(&self, x: &[f32], rows: usize, cols: usize, _imp: Option<&[f32]>) -> Result<Vec<u8>> {
        registry::quantize_rows(self, x, rows, cols, false, quantize_row)
    }
    fn decode_blocks(&self, row: &[u8], cols: usize, b0: usize, b1: usize, out: &mut [f32], level: KernelLevel) {
        registry::at_level(level, || decode(row, cols, b0, b1, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundclip_of_the_absmean() {
        // mean |w| = 1: values round to -1, 0, +1 and clip beyond; 0.5 ties to even (0)
        let x: Vec<f32> = [2.5, -0.4, 0.6, -3.0, 0.5, -0.5, 1.4, 0.0].repeat(4);
        let gamma = x.iter().map(|v| v.abs()).sum::<f32>() / 32.0;
        let q = BitNet.quantize_ref(&x, 1, 32, None).unwrap();
        assert_eq!(q.len(), 32 / 4 + 4);
        assert_eq!(f32::from_le_bytes(q[8..12].try_into().unwrap()), gamma);
        let mut y = vec![0f32; 32];
        BitNet.decode_blocks(&q, 32, 0, 1, &mut y, KernelLevel::Scalar);
        let want: Vec<f32> = x.iter().map(|v| (v / (gamma + EPS)).round_ties_even().clamp(-1.0, 1.0) * gamma).collect();
        assert_eq!(y, want);
        assert!(y.iter().all(|v| *v == 0.0 || v.abs() == gamma));
    }

    #[test]
    fn zero_rows_and_shapes() {
        let q = BitNet.quantize_ref(&[0f32; 64], 1, 64, None).unwrap();
        let mut y = vec![1f32; 64];
        BitNet.decode_blocks(&q, 64, 0, 2, &mut y, KernelLevel::Scalar);
        assert!(y.iter().all(|v| *v == 0.0));
        assert!(BitNet.quantize_ref(&[0f32; 48], 1, 48, None).is_err());
        assert!(BitNet.quantize_ref(&[f32::INFINITY; 32], 1, 32, None).is_err());
    }
}
