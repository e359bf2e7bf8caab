//! The float "block" formats (F32, F16, BF16: blocks of one weight) and the run-time dispatch from
//! a [`GgmlType`] value to its [`BlockFormat`] implementation.

use super::block::{self as gb, BlockFormat, GgmlType, QuantMode};
use super::{iq, iq_lattice as iql, k_quants as kq, legacy, ternary};
use crate::error::Result;
use crate::formats::half_float::f32_to_bf16_bits;
use crate::simd::KernelLevel;

pub struct F32;
impl BlockFormat for F32 {
    const TYPE: GgmlType = GgmlType::F32;
    const BLOCK: usize = 1;
    const BYTES: usize = 4;
    #[inline(always)]
    fn quantize_block(x: &[f32], _imp: Option<&[f32]>, out: &mut [u8]) {
        out[..4].copy_from_slice(&x[0].to_le_bytes());
    }
    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        Self::quantize_block(x, None, out)
    }
    #[inline(always)]
    fn dequantize_block(b: &[u8], out: &mut [f32]) {
        out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub struct F16;
impl BlockFormat for F16 {
    const TYPE: GgmlType = GgmlType::F16;
    const BLOCK: usize = 1;
    const BYTES: usize = 2;
    #[inline(always)]
    fn quantize_block(x: &[f32], _imp: Option<&[f32]>, out: &mut [u8]) {
        out[..2].copy_from_slice(&gb::f16_bits(x[0]));
    }
    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        Self::quantize_block(x, None, out)
    }
    #[inline(always)]
    fn dequantize_block(b: &[u8], out: &mut [f32]) {
        out[0] = gb::f16_val([b[0], b[1]]);
    }
}

pub struct BF16;
impl BlockFormat for BF16 {
    const TYPE: GgmlType = GgmlType::BF16;
    const BLOCK: usize = 1;
    const BYTES: usize = 2;
    #[inline(always)]
    fn quantize_block(x: &[f32], _imp: Option<&[f32]>, out: &mut [u8]) {
        out[..2].copy_from_slice(&f32_to_bf16_bits(x[0]).to_le_bytes());
    }
    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        Self::quantize_block(x, None, out)
    }
    #[inline(always)]
    fn dequantize_block(b: &[u8], out: &mut [f32]) {
        out[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// Call `$body` with `$F` bound to the block-format type of `$t`.
macro_rules! with_format {
    ($t:expr, $F:ident => $body:expr) => {
        match $t {
            GgmlType::F32 => {
                type $F = F32;
                $body
            }
            GgmlType::F16 => {
                type $F = F16;
                $body
            }
            GgmlType::BF16 => {
                type $F = BF16;
                $body
            }
            GgmlType::Q4_0 => {
                type $F = legacy::Q4_0;
                $body
            }
            GgmlType::Q4_1 => {
                type $F = legacy::Q4_1;
                $body
            }
            GgmlType::Q5_0 => {
                type $F = legacy::Q5_0;
                $body
            }
            GgmlType::Q5_1 => {
                type $F = legacy::Q5_1;
                $body
            }
            GgmlType::Q8_0 => {
                type $F = legacy::Q8_0;
                $body
            }
            GgmlType::Q2_K => {
                type $F = kq::Q2K;
                $body
            }
            GgmlType::Q3_K => {
                type $F = kq::Q3K;
                $body
            }
            GgmlType::Q4_K => {
                type $F = kq::Q4K;
                $body
            }
            GgmlType::Q5_K => {
                type $F = kq::Q5K;
                $body
            }
            GgmlType::Q6_K => {
                type $F = kq::Q6K;
                $body
            }
            GgmlType::TQ1_0 => {
                type $F = ternary::TQ1_0;
                $body
            }
            GgmlType::TQ2_0 => {
                type $F = ternary::TQ2_0;
                $body
            }
            GgmlType::IQ4_NL => {
                type $F = iq::IQ4NL;
                $body
            }
            GgmlType::IQ2_XXS => {
                type $F = iql::IQ2XXS;
                $body
            }
            GgmlType::IQ2_XS => {
                type $F = iql::IQ2XS;
                $body
            }
            GgmlType::IQ2_S => {
                type $F = iql::IQ2S;
                $body
            }
            GgmlType::IQ3_XXS => {
                type $F = iql::IQ3XXS;
                $body
            }
            GgmlType::IQ3_S => {
                type $F = iql::IQ3S;
                $body
            }
            GgmlType::IQ1_S => {
                type $F = iql::IQ1S;
                $body
            }
            GgmlType::IQ1_M => {
                type $F = iql::IQ1M;
                $body
            }
            GgmlType::IQ4_XS => {
                type $F = iq::IQ4XS;
                $body
            }
        }
    };
}

/// Quantize a row-major `[rows, cols]` f32 matrix to `t` (fast path).
pub fn quantize(
    t: GgmlType,
    x: &[f32],
    rows: usize,
    cols: usize,
    imp: Option<&[f32]>,
    mode: QuantMode,
    level: KernelLevel,
) -> Result<Vec<u8>> {
    #[cfg(target_arch = "x86_64")]
    if mode == QuantMode::Rtn && level != KernelLevel::Scalar {
        use crate::formats::ggml::rtn::LegacyKind as K;
        let fast = match t {
            GgmlType::Q4_0 => Some(gb::quantize_legacy_rtn::<legacy::Q4_0>(K::Q4_0, x, rows, cols, level)),
            GgmlType::Q4_1 => Some(gb::quantize_legacy_rtn::<legacy::Q4_1>(K::Q4_1, x, rows, cols, level)),
            GgmlType::Q5_0 => Some(gb::quantize_legacy_rtn::<legacy::Q5_0>(K::Q5_0, x, rows, cols, level)),
            GgmlType::Q5_1 => Some(gb::quantize_legacy_rtn::<legacy::Q5_1>(K::Q5_1, x, rows, cols, level)),
            GgmlType::Q8_0 => Some(gb::quantize_legacy_rtn::<legacy::Q8_0>(K::Q8_0, x, rows, cols, level)),
            _ => None,
        };
        if let Some(r) = fast {
            return r;
        }
    }
    with_format!(t, F => gb::quantize::<F>(x, rows, cols, imp, mode, level))
}

/// The scalar reference of [`quantize`].
pub fn quantize_ref(
    t: GgmlType,
    x: &[f32],
    rows: usize,
    cols: usize,
    imp: Option<&[f32]>,
    mode: QuantMode,
) -> Result<Vec<u8>> {
    with_format!(t, F => gb::quantize_ref::<F>(x, rows, cols, imp, mode))
}

/// Dequantize `out.len()` weights of type `t` (fast path).
pub fn dequantize_into(t: GgmlType, b: &[u8], out: &mut [f32], level: KernelLevel) -> Result<()> {
    with_format!(t, F => gb::dequantize_into::<F>(b, out, level))
}

/// The scalar reference of [`dequantize_into`].
pub fn dequantize_ref(t: GgmlType, b: &[u8], n: usize) -> Result<Vec<f32>> {
    with_format!(t, F => gb::dequantize_ref::<F>(b, n))
}

/// Check the compile-time constants of every implementation against the registry table.
pub fn registry_is_consistent() -> bool {
    GgmlType::ALL
        .iter()
        .all(|t| with_format!(*t, F => F::TYPE == *t && F::BLOCK == t.block_size() && F::BYTES == t.type_size()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registry_matches_implementations() {
        assert!(registry_is_consistent());
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::parse(&t.name().to_ascii_lowercase()).unwrap(), *t);
            assert_eq!(GgmlType::from_id(t.id()), Some(*t));
        }
        assert!(GgmlType::parse("q9_k").unwrap_err().to_string().contains("Q4_K"));
    }

    #[test]
    fn rtn_only_where_gguf_py_has_it() {
        let x = vec![0.5f32; 256];
        for t in GgmlType::ALL {
            let r = quantize(*t, &x, 1, 256, None, QuantMode::Rtn, KernelLevel::Scalar);
            assert_eq!(r.is_ok(), t.has_rtn(), "{}", t.name());
        }
    }

    fn matrix() -> impl Strategy<Value = (usize, Vec<f32>, Vec<f32>)> {
        (1usize..4).prop_flat_map(|r| {
            (Just(r), proptest::collection::vec(-50f32..50f32, r * 512), proptest::collection::vec(0f32..4f32, 512))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn fast_paths_equal_reference((r, x, imp) in matrix()) {
            for t in GgmlType::ALL {
                let modes: &[QuantMode] = if t.has_rtn() { &[QuantMode::Search, QuantMode::Rtn] } else { &[QuantMode::Search] };
                for &mode in modes {
                    for w in [None, Some(&imp[..])] {
                        let reference = quantize_ref(*t, &x, r, 512, w, mode).unwrap();
                        for level in KernelLevel::available() {
                            prop_assert_eq!(&quantize(*t, &x, r, 512, w, mode, level).unwrap(), &reference, "{}", t.name());
                        }
                        let back = dequantize_ref(*t, &reference, r * 512).unwrap();
                        for level in KernelLevel::available() {
                            let mut out = vec![0f32; r * 512];
                            dequantize_into(*t, &reference, &mut out, level).unwrap();
                            prop_assert!(out.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
                        }
                    }
                }
            }
        }

        #[test]
        fn round_trip_error_is_bounded((r, x, _imp) in matrix()) {
            // loose bound: every format keeps each weight within its block's absmax range
            for t in GgmlType::ALL {
                let q = quantize(*t, &x, r, 512, None, QuantMode::Search, KernelLevel::detect()).unwrap();
                let y = dequantize_ref(*t, &q, r * 512).unwrap();
                for (a, b) in x.iter().zip(&y) {
                    prop_assert!((a - b).abs() <= 50.0 * 1.05, "{}: {} vs {}", t.name(), a, b);
                }
            }
        }
    }
}
