//! FP16 and BF16 storage. Conversions round to nearest, ties to even (IEEE 754), which is what
//! `torch.Tensor.half()` / `.bfloat16()` do; the `half` crate uses F16C at run time when present.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{check_len, Result};

/// Elements per rayon task: large enough that scheduling is noise, small enough to balance.
const CHUNK: usize = 1 << 16;

/// The two 16-bit float formats, as raw `u16` bit patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    BF16,
}

/// Scalar reference: one element at a time.
pub fn f32_to_half_ref(src: &[f32], dst: &mut [u16], kind: HalfKind) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = match kind {
            HalfKind::F16 => f16::from_f32(*s).to_bits(),
            HalfKind::BF16 => bf16::from_f32(*s).to_bits(),
        };
    }
}

/// Scalar reference for the widening direction.
pub fn half_to_f32_ref(src: &[u16], dst: &mut [f32], kind: HalfKind) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = match kind {
            HalfKind::F16 => f16::from_bits(*s).to_f32(),
            HalfKind::BF16 => bf16::from_bits(*s).to_f32(),
        };
    }
}

/// Narrow f32 to f16/bf16 bits in parallel.
pub fn f32_to_half(src: &[f32], dst: &mut [u16], kind: HalfKind) -> Result<()> {
    check_len("destination", dst.len(), src.len())?;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| convert_from_f32(s, d, kind));
    Ok(())
}

/// Widen f16/bf16 bits to f32 in parallel.
pub fn half_to_f32(src: &[u16], dst: &mut [f32], kind: HalfKind) -> Result<()> {
    check_len("destination", dst.len(), src.len())?;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| convert_to_f32(s, d, kind));
    Ok(())
}

/// Serial widening of one slice (used by the kernels to decode a weight row).
#[inline]
pub fn convert_to_f32(src: &[u16], dst: &mut [f32], kind: HalfKind) {
    match kind {
        HalfKind::F16 => {
            // SAFETY: f16 is repr(transparent) over u16.
            let s: &[f16] = unsafe { std::slice::from_raw_parts(src.as_ptr().cast(), src.len()) };
            s.convert_to_f32_slice(dst);
        }
        HalfKind::BF16 => {
            // bf16 -> f32 is a 16-bit shift; written as a plain loop so it vectorizes.
            for (d, s) in dst.iter_mut().zip(src) {
                *d = f32::from_bits((*s as u32) << 16);
            }
        }
    }
}

#[inline]
fn convert_from_f32(src: &[f32], dst: &mut [u16], kind: HalfKind) {
    match kind {
        HalfKind::F16 => {
            // SAFETY: f16 is repr(transparent) over u16.
            let d: &mut [f16] = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), dst.len()) };
            d.convert_from_f32_slice(src);
        }
        HalfKind::BF16 => {
            let d: &mut [bf16] = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), dst.len()) };
            d.convert_from_f32_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_both(src: &[f32], kind: HalfKind) {
        let mut a = vec![0u16; src.len()];
        let mut b = vec![0u16; src.len()];
        f32_to_half_ref(src, &mut a, kind);
        f32_to_half(src, &mut b, kind).unwrap();
        // NaN payloads may differ between paths; compare NaN-ness for those.
        for (x, y) in a.iter().zip(&b) {
            let nan = |v: u16| match kind {
                HalfKind::F16 => f16::from_bits(v).is_nan(),
                HalfKind::BF16 => bf16::from_bits(v).is_nan(),
            };
            assert!(x == y || (nan(*x) && nan(*y)), "{x:#06x} vs {y:#06x}");
        }
    }

    #[test]
    fn golden_values() {
        let src = [1.0f32, -2.0, 65504.0, 65520.0, 1e-8, 0.1, f32::INFINITY];
        let mut out = [0u16; 7];
        f32_to_half(&src, &mut out, HalfKind::F16).unwrap();
        // IEEE binary16 encodings: 1.0, -2.0, max finite, overflow->inf, underflow->0, 0.1, inf
        assert_eq!(out, [0x3C00, 0xC000, 0x7BFF, 0x7C00, 0x0000, 0x2E66, 0x7C00]);
        f32_to_half(&src, &mut out, HalfKind::BF16).unwrap();
        // bf16 keeps the f32 exponent: 65520 rounds to 65536 (0x4780), 0.1 -> 0x3DCD
        assert_eq!(out[..4], [0x3F80, 0xC000, 0x4780, 0x4780]);
        assert_eq!(out[5], 0x3DCD);
    }

    #[test]
    fn ties_round_to_even() {
        // 1 + 2^-11 lies halfway between 1 and the next f16; ties to even gives 1.0
        let mut out = [0u16; 2];
        f32_to_half(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)], &mut out, HalfKind::F16).unwrap();
        assert_eq!(out, [0x3C00, 0x3C02]);
        // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
        f32_to_half(&[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)], &mut out, HalfKind::BF16).unwrap();
        assert_eq!(out, [0x3F80, 0x3F82]);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut out = [0u16; 2];
        assert!(f32_to_half(&[1.0; 3], &mut out, HalfKind::F16).is_err());
    }

    proptest! {
        #[test]
        fn fast_equals_reference(v in proptest::collection::vec(proptest::num::f32::ANY, 0..300)) {
            check_both(&v, HalfKind::F16);
            check_both(&v, HalfKind::BF16);
        }

        #[test]
        fn round_trip_error_is_half_an_ulp(v in proptest::collection::vec(-60000f32..60000f32, 1..200)) {
            for kind in [HalfKind::F16, HalfKind::BF16] {
                let mut h = vec![0u16; v.len()];
                let mut back = vec![0f32; v.len()];
                f32_to_half(&v, &mut h, kind).unwrap();
                half_to_f32(&h, &mut back, kind).unwrap();
                let mut r = vec![0f32; v.len()];
                half_to_f32_ref(&h, &mut r, kind);
                prop_assert_eq!(&back, &r);
                // relative step: 2^-10 (f16, 10 mantissa bits) or 2^-7 (bf16); half a step each way.
                let (rel, tiny) = match kind { HalfKind::F16 => (2f32.powi(-11), 2f32.powi(-25)), HalfKind::BF16 => (2f32.powi(-8), 0.0) };
                for (a, b) in v.iter().zip(&back) {
                    prop_assert!((a - b).abs() <= a.abs() * rel + tiny, "{} -> {}", a, b);
                }
            }
        }
    }
}
