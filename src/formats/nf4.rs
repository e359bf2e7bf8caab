//! NF4 with double quantization, as bitsandbytes defines it (QLoRA, Dettmers et al. 2023): blocks
//! of 64 weights, each stored as a 4-bit index into the 16-value NormalFloat code scaled by the
//! block's absmax; the absmaxes are themselves quantized to 8 bits ("double quantization"): their
//! mean is subtracted and the rest is stored as indices into bitsandbytes' signed dynamic 8-bit
//! code, with one f32 scale per 256 absmaxes.
//!
//! Row layout (`cols` a multiple of 64, `nb = cols / 64` blocks, `ng = ceil(nb / 256)` groups):
//! `[cols/2 nibble bytes][nb absmax codes][ng f32 group scales][f32 offset]`, little endian.
//! Two weights per byte, the first in the high nibble (bitsandbytes' packing).
//!
//! Deviation from bitsandbytes, for rows that decode on their own: the mean offset is per row
//! (bitsandbytes: per tensor) and absmax groups never cross a row; a one-row tensor gets
//! bitsandbytes' bytes, except that absmax codes are the nearest code value where bitsandbytes'
//! binary search occasionally returns a neighbour (tests/quant/test_nf4.py checks both).

use super::registry::{self, PackedFormat};
use crate::error::Result;
use crate::simd::KernelLevel;

/// Weights per block.
pub const BLOCK: usize = 64;
/// Absmax values per double-quantization group.
pub const GROUP: usize = 256;

/// The NormalFloat-4 code, `get_4bit_type("nf4")` in bitsandbytes' functional.py (values of the
/// QLoRA paper, appendix E).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map(signed=True)`, the dynamic tree
/// quantization of "8-bit Optimizers via Block-wise Quantization", Dettmers et al. 2022) as f32
/// bit patterns, ascending; read from bitsandbytes 0.50.2.
const DYNAMIC_CODE_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

#[inline(always)]
fn dynamic_code(i: u8) -> f32 {
    f32::from_bits(DYNAMIC_CODE_BITS[i as usize])
}

/// Index of the code value nearest to `v` (the first one on a tie, as `torch.argmin`).
#[inline(always)]
fn nearest(v: f32, code: impl Iterator<Item = f32>) -> u8 {
    let mut best = (0u8, f32::INFINITY);
    for (i, c) in code.enumerate() {
        let d = (v - c).abs();
        if d < best.1 {
            best = (i as u8, d);
        }
    }
    best.0
}

/// The NF4 format (a unit struct: the registry's entry).
pub struct Nf4;

fn groups(nb: usize) -> usize {
    nb.div_ceil(GROUP)
}

fn quantize_row(x: &[f32], out: &mut [u8]) {
    let cols = x.len();
    let nb = cols / BLOCK;
    let (nibbles, rest) = out.split_at_mut(cols / 2);
    let (codes, rest) = rest.split_at_mut(nb);
    let (scales, offset) = rest.split_at_mut(groups(nb) * 4);
    let absmax: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    for ((xb, ob), a) in x.chunks_exact(BLOCK).zip(nibbles.chunks_exact_mut(BLOCK / 2)).zip(&absmax) {
        let q = |v: f32| if *a > 0.0 { nearest(v / a, NF4_CODE.iter().copied()) } else { 7 };
        for (o, pair) in ob.iter_mut().zip(xb.chunks_exact(2)) {
            *o = (q(pair[0]) << 4) | q(pair[1]);
        }
    }
    // double quantization: absmax - mean, in groups of 256, as dynamic-code indices
    let mean = (absmax.iter().map(|v| *v as f64).sum::<f64>() / nb.max(1) as f64) as f32;
    for (g, (ab, cb)) in absmax.chunks(GROUP).zip(codes.chunks_mut(GROUP)).enumerate() {
        let scale = ab.iter().fold(0f32, |m, v| m.max((v - mean).abs()));
        for (c, a) in cb.iter_mut().zip(ab) {
            *c = if scale > 0.0 { nearest((a - mean) / scale, (0..=255u8).map(dynamic_code)) } else { 127 };
        }
        scales[g * 4..g * 4 + 4].copy_from_slice(&scale.to_le_bytes());
    }
    offset.copy_from_slice(&mean.to_le_bytes());
}

#[inline(always)]
fn decode(row: &[u8], cols: usize, b0: usize, b1: usize, out: &mut [f32]) {
    let nb = cols / BLOCK;
    let meta = &row[cols / 2..];
    let f32_at = |i: usize| f32::from_le_bytes([meta[i], meta[i + 1], meta[i + 2], meta[i + 3]]);
    let offset = f32_at(nb + groups(nb) * 4);
    for (b, ob) in (b0..b1).zip(out.chunks_exact_mut(BLOCK)) {
        let absmax = dynamic_code(meta[b]) * f32_at(nb + b / GROUP * 4) + offset;
        for (o, byte) in ob.chunks_exact_mut(2).zip(&row[b * BLOCK / 2..(b + 1) * BLOCK / 2]) {
            o[0] = NF4_CODE[(byte >> 4) as usize] * absmax;
            o[1] = NF4_CODE[(byte & 15) as usize] * absmax;
        }
    }
}

impl PackedFormat for Nf4 {
    fn name(&self) -> &'static str {
        "nf4"
    }
    fn block_size(&self) -> usize {
        BLOCK
    }
    fn row_bytes_of(&self, cols: usize) -> usize {
        let nb = cols / BLOCK;
        cols / 2 + nb + groups(nb) * 4 + 4
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
    fn codes_are_sorted_and_complete() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert!((0..255u8).all(|i| dynamic_code(i) < dynamic_code(i + 1)));
        assert_eq!((dynamic_code(0), dynamic_code(127), dynamic_code(255)), (-0.992_968_75, 0.0, 1.0));
    }

    #[test]
    fn layout_and_exact_values() {
        // one block whose weights are code values times 2: absmax 2, every weight exact
        let x: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16] * 2.0).collect();
        let q = Nf4.quantize_ref(&x, 1, 64, None).unwrap();
        assert_eq!(q.len(), 32 + 1 + 4 + 4);
        assert_eq!(q[0], 0x01); // weights 0 and 1 -> codes 0 (high nibble) and 1
                                // one absmax: mean = 2, absmax - mean = 0, group scale 0, code index 127 (0.0)
        assert_eq!((q[32], f32::from_le_bytes(q[33..37].try_into().unwrap())), (127, 0.0));
        assert_eq!(f32::from_le_bytes(q[37..41].try_into().unwrap()), 2.0);
        let mut y = vec![0f32; 64];
        Nf4.decode_blocks(&q, 64, 0, 1, &mut y, KernelLevel::Scalar);
        assert_eq!(x, y);
    }

    #[test]
    fn zero_block_and_shape_errors() {
        let q = Nf4.quantize_ref(&[0f32; 128], 1, 128, None).unwrap();
        let mut y = vec![1f32; 128];
        Nf4.decode_blocks(&q, 128, 0, 2, &mut y, KernelLevel::Scalar);
        assert!(y.iter().all(|v| *v == 0.0));
        assert!(Nf4.quantize_ref(&[0f32; 96], 1, 96, None).is_err());
        assert!(Nf4.quantize_ref(&[f32::NAN; 64], 1, 64, None).is_err());
    }
}
