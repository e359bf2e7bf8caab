//! FP16 and BF16: the one implementation of the f32 -> f16/bf16 conversions in the crate (the
//! `QuantizedLinear` FP16/BF16 formats and the GGML F16/BF16 types and block scales all use it).
//!
//! Rounding is to nearest, ties to even (IEEE 754), which is what `torch.Tensor.half()` /
//! `.bfloat16()`, numpy's `astype(np.float16)`, F16C's `vcvtps2ph` and ggml do. One NaN rule: a NaN
//! stays a NaN with its sign, is quieted (f16: bit 9; bf16: bit 6) and keeps the top bits of its
//! payload (f16: `sign | 0x7e00 | payload >> 13`; bf16: `bits >> 16 | 0x40`), as F16C and ggml's
//! `ggml_compute_fp32_to_bf16` do. The scalar functions below are written out in integer
//! operations so they inline into block loops; the slice conversions use the `half` crate (F16C at
//! run time when present) and are tested bit-exact against them, NaN payloads included.

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

/// `f32 -> f16` bits, round to nearest even, NaN rule of the module docs.
/// Written out in integer operations so it inlines into the block loops (no run-time CPU-feature
/// check per call); tested against the `half` crate over a dense sample of all f32 bit patterns.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7fff_ffff;
    if a >= 0x7f80_0000 {
        // Inf stays Inf; NaN stays a (quiet) NaN keeping the top payload bits
        let nan = if a > 0x7f80_0000 { 0x0200 | ((a >> 13) & 0x03ff) as u16 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    if a >= 0x4780_0000 {
        return sign | 0x7c00; // >= 65536: overflow
    }
    if a >= 0x3880_0000 {
        // normal: rebias the exponent (127 -> 15), round the 13 dropped bits to nearest even;
        // a carry out of the mantissa correctly bumps the exponent (up to Inf for >= 65520)
        let m = a - 0x3800_0000;
        return sign | ((m + 0x0fff + ((m >> 13) & 1)) >> 13) as u16;
    }
    if a < 0x3300_0000 {
        return sign; // below half the smallest subnormal (2^-25): rounds to zero
    }
    // subnormal: value = mant * 2^(e - 150) = m16 * 2^-24  =>  m16 = mant >> (126 - e), rounded
    let e = a >> 23;
    let mant = (a & 0x007f_ffff) | 0x0080_0000;
    let s = 126 - e;
    let half = 1u32 << (s - 1);
    let rem = mant & ((1u32 << s) - 1);
    let mut r = mant >> s;
    if rem > half || (rem == half && (r & 1) == 1) {
        r += 1;
    }
    sign | r as u16
}

/// `f32 -> bf16` bits, round to nearest even, NaN rule of the module docs (ggml's
/// `ggml_compute_fp32_to_bf16` and gguf-py do the same).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

/// Scalar reference: one element at a time.
pub fn f32_to_half_ref(src: &[f32], dst: &mut [u16], kind: HalfKind) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = match kind {
            HalfKind::F16 => f32_to_f16_bits(*s),
            HalfKind::BF16 => f32_to_bf16_bits(*s),
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
        for ((x, y), s) in a.iter().zip(&b).zip(src) {
            assert_eq!(x, y, "{:#010x}: {x:#06x} vs {y:#06x}", s.to_bits());
        }
    }

    /// The scalar conversions against the `half` crate's (an independent implementation, F16C
    /// when present) over a dense sample of all f32 bit patterns, NaNs included, bit for bit.
    #[test]
    fn scalar_conversions_match_the_half_crate() {
        let check = |b: u32| {
            let x = f32::from_bits(b);
            assert_eq!(f32_to_f16_bits(x), f16::from_f32(x).to_bits(), "f16 {b:#x} ({x})");
            assert_eq!(f32_to_bf16_bits(x), bf16::from_f32(x).to_bits(), "bf16 {b:#x} ({x})");
        };
        // every pattern in the interesting exponent range (subnormal/normal f16, both signs), with
        // a stride elsewhere
        for b in (0x3200_0000u32..0x4800_0000).step_by(3) {
            check(b);
            check(b | 0x8000_0000);
        }
        for b in (0..=u32::MAX).step_by(9973) {
            check(b);
        }
        // edges, and NaNs: quiet, signalling, with low and high payload bits, both signs
        for b in [
            0,
            0x8000_0000,
            0x3300_0000,
            0x3300_0001,
            0x477f_f000,
            0x477f_efff,
            0x7f80_0000,
            0x7fc0_0000,
            0x3880_0000,
            0x387f_ffff,
            0x7f80_0001,
            0x7f80_2000,
            0x7fbf_ffff,
            0x7fff_ffff,
            0xff80_0001,
            0xffc1_2345,
            0x7f81_0000,
        ] {
            check(b);
        }
        // the slice path (F16C when present) on the same NaNs
        let nans: Vec<f32> = [0x7f80_0001u32, 0x7f80_2000, 0x7fbf_ffff, 0x7fff_ffff, 0xff80_0001, 0xffc1_2345]
            .map(f32::from_bits)
            .to_vec();
        check_both(&nans, HalfKind::F16);
        check_both(&nans, HalfKind::BF16);
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
