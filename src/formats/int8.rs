//! INT8 per-output-channel (row) weights: `w ≈ (q - zero_point) * scale`.
//!
//! Symmetric: `scale = absmax / 127.5`, `q = clamp(round(w / scale), -128, 127)`, zero point 0.
//! Asymmetric: the row range is widened to include 0 (so 0 is exact), `scale = (hi - lo) / 255`,
//! `zp = clamp(-128 - round(lo / scale), -128, 127)`, `q = clamp(round(w / scale) + zp, -128, 127)`.
//! These are the affine mappings of torchao's `choose_qparams_affine` (SYMMETRIC divides the
//! absmax by (qmax - qmin) / 2 = 127.5) and PyTorch's per-channel observers. Rounding is to nearest,
//! ties to even (`torch.round`), so a torch implementation of the same formulas gives the same bytes.
//! Both give |w - dequant(w)| <= scale / 2.

use rayon::prelude::*;

use crate::error::{check_len, first_non_finite, Error, Result};
use crate::simd::{dispatch, KernelLevel};

/// A quantized `[rows, cols]` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Row-major `[rows, cols]`.
    pub q: Vec<i8>,
    /// One per row.
    pub scales: Vec<f32>,
    /// One per row; all zero when symmetric.
    pub zero_points: Vec<i8>,
}

impl Int8Matrix {
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = crate::mem::zeroed_vec(self.rows * self.cols);
        dequantize_into(&self.q, &self.scales, &self.zero_points, self.cols, &mut out)
            .expect("Int8Matrix fields are consistent by construction");
        out
    }
}

/// Round to nearest, ties to even, for |x| < 2^22 (callers clamp first). The classic magic-number
/// trick: adding 1.5 * 2^23 pushes the fraction out of the mantissa under the default rounding
/// mode. It is bit-identical to `f32::round_ties_even` in that range and vectorizes on every
/// x86-64 level (SSE2 has no round instruction).
#[inline(always)]
pub(crate) fn round_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12582912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

/// The step a row or group is stored with: 1 for an all-zero range (any step decodes zeros
/// exactly), and never below the smallest normal float. A subnormal step carries only a few
/// significant bits, so `absmax / step` could land well past the clamp limit and the error
/// exceed half a step; with the floor, weights that small all decode within half a step.
#[inline(always)]
pub(crate) fn usable_step(s: f32) -> f32 {
    if s == 0.0 {
        1.0
    } else {
        s.max(f32::MIN_POSITIVE)
    }
}

pub(crate) fn row_params(lo: f32, hi: f32, absmax: f32, symmetric: bool) -> Option<(f32, i8)> {
    if symmetric {
        let s = usable_step(absmax / 127.5);
        s.is_finite().then_some((s, 0))
    } else {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let s = usable_step((hi - lo) / 255.0);
        if !s.is_finite() {
            return None;
        }
        let zp = (-128.0 - (lo / s).round_ties_even()).clamp(-128.0, 127.0);
        Some((s, zp as i8))
    }
}

fn range_error(row: usize) -> Error {
    Error::InvalidArgument(format!(
        "row {row}: the weight range overflows float32 when divided into steps; rescale the weights"
    ))
}

/// Scalar reference. Obviously correct, one element at a time.
pub fn quantize_ref(w: &[f32], rows: usize, cols: usize, symmetric: bool) -> Result<Int8Matrix> {
    check_len("weight", w.len(), rows * cols)?;
    if let Some(e) = first_non_finite(w, cols) {
        return Err(e);
    }
    let mut out =
        Int8Matrix { rows, cols, q: vec![0; rows * cols], scales: vec![0.0; rows], zero_points: vec![0; rows] };
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let lo = row.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let absmax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (s, zp) = row_params(lo, hi, absmax, symmetric).ok_or_else(|| range_error(r))?;
        out.scales[r] = s;
        out.zero_points[r] = zp;
        for (c, v) in row.iter().enumerate() {
            let q = ((v / s).round_ties_even() + zp as f32).clamp(-128.0, 127.0);
            out.q[r * cols + c] = q as i8;
        }
    }
    Ok(out)
}

/// Fast path: rows in parallel, SIMD-friendly loops, bit-identical to `quantize_ref`.
pub fn quantize(w: &[f32], rows: usize, cols: usize, symmetric: bool, level: KernelLevel) -> Result<Int8Matrix> {
    let mut out = Int8Matrix {
        rows,
        cols,
        q: crate::mem::zeroed_vec(rows * cols),
        scales: vec![0.0; rows],
        zero_points: vec![0; rows],
    };
    quantize_into(w, rows, cols, symmetric, level, &mut out.q, &mut out.scales, &mut out.zero_points)?;
    Ok(out)
}

/// `quantize` into caller-provided buffers (`q`: rows*cols, `scales`/`zero_points`: rows).
#[allow(clippy::too_many_arguments)]
pub fn quantize_into(
    w: &[f32],
    rows: usize,
    cols: usize,
    symmetric: bool,
    level: KernelLevel,
    q: &mut [i8],
    scales: &mut [f32],
    zero_points: &mut [i8],
) -> Result<()> {
    check_len("weight", w.len(), rows * cols)?;
    check_len("q", q.len(), rows * cols)?;
    check_len("scales", scales.len(), rows)?;
    check_len("zero_points", zero_points.len(), rows)?;
    if cols == 0 || rows == 0 {
        scales.iter_mut().for_each(|s| *s = 1.0);
        zero_points.iter_mut().for_each(|z| *z = 0);
        return Ok(());
    }
    let bad_row = q
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .zip(scales.par_iter_mut().zip(zero_points.par_iter_mut()))
        .enumerate()
        .filter_map(|(r, ((qr, wr), (s, z)))| {
            #[cfg(target_arch = "x86_64")]
            if level.has_avx512() {
                // SAFETY: the level was checked by KernelLevel::resolve.
                return match unsafe { crate::formats::quantize_avx512::int8_row_avx512(wr, qr, symmetric) } {
                    Some((sc, zp)) => {
                        *s = sc;
                        *z = zp;
                        None
                    }
                    None => Some(r),
                };
            }
            let (lo, hi, absmax, finite) = row_stats(level, wr);
            if !finite {
                return Some(r);
            }
            match row_params(lo, hi, absmax, symmetric) {
                Some((sc, zp)) => {
                    *s = sc;
                    *z = zp;
                    quantize_row(level, wr, qr, sc, zp as f32);
                    None
                }
                None => Some(r),
            }
        })
        .min();
    match bad_row {
        None => Ok(()),
        Some(r) => {
            let row = &w[r * cols..(r + 1) * cols];
            Err(first_non_finite(row, cols)
                .map(|e| match e {
                    Error::NonFinite { col, value, .. } => Error::NonFinite { row: r, col, value },
                    other => other,
                })
                .unwrap_or_else(|| range_error(r)))
        }
    }
}

/// (min, max, absmax, all finite) of a slice, with lane-wise accumulators so it vectorizes.
pub(crate) fn row_stats(level: KernelLevel, w: &[f32]) -> (f32, f32, f32, bool) {
    dispatch!(
        level,
        fn stats(w: &[f32]) -> (f32, f32, f32, bool) {
            const L: usize = 16;
            let mut lo = [f32::INFINITY; L];
            let mut hi = [f32::NEG_INFINITY; L];
            let mut bad = [0u32; L];
            let chunks = w.chunks_exact(L);
            let tail = chunks.remainder();
            for c in chunks {
                for i in 0..L {
                    lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
                    hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
                    // exponent all ones <=> NaN or Inf
                    bad[i] |= ((c[i].to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
                }
            }
            for (i, v) in tail.iter().enumerate() {
                lo[i] = if *v < lo[i] { *v } else { lo[i] };
                hi[i] = if *v > hi[i] { *v } else { hi[i] };
                bad[i] |= ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
            }
            let l = lo.iter().cloned().fold(f32::INFINITY, f32::min);
            let h = hi.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            (l, h, l.abs().max(h.abs()), bad.iter().all(|b| *b == 0))
        }
    )
}

fn quantize_row(level: KernelLevel, w: &[f32], q: &mut [i8], scale: f32, zp: f32) {
    dispatch!(
        level,
        fn qrow(w: &[f32], q: &mut [i8], scale: f32, zp: f32) -> () {
            for (d, v) in q.iter_mut().zip(w) {
                // clamp before rounding keeps the magic-number rounding in range; same result.
                let t = round_even_small((v / scale).clamp(-256.0, 256.0)) + zp;
                *d = t.clamp(-128.0, 127.0) as i8;
            }
        }
    )
}

/// `out[r, c] = (q[r, c] - zp[r]) * scale[r]`.
pub fn dequantize_into(q: &[i8], scales: &[f32], zero_points: &[i8], cols: usize, out: &mut [f32]) -> Result<()> {
    let rows = scales.len();
    check_len("q", q.len(), rows * cols)?;
    check_len("zero_points", zero_points.len(), rows)?;
    check_len("output", out.len(), rows * cols)?;
    if cols == 0 {
        return Ok(());
    }
    out.par_chunks_mut(cols)
        .zip(q.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, qr))| dequantize_row(qr, scales[r], zero_points[r], o));
    Ok(())
}

#[inline]
pub fn dequantize_row(q: &[i8], scale: f32, zp: i8, out: &mut [f32]) {
    let z = zp as f32;
    for (o, v) in out.iter_mut().zip(q) {
        *o = (*v as f32 - z) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_symmetric() {
        let w = [1.0f32, -0.5, 0.25, 0.0];
        let m = quantize(&w, 1, 4, true, KernelLevel::Scalar).unwrap();
        assert_eq!(m.scales, vec![1.0 / 127.5]);
        // 127.5 rounds to 128 (ties to even) and clamps to 127; -63.75 -> -64; 31.875 -> 32
        assert_eq!(m.q, vec![127, -64, 32, 0]);
        assert_eq!(m.zero_points, vec![0]);
    }

    #[test]
    fn golden_asymmetric() {
        let w = [0.0f32, 1.0, 2.0, 2.55];
        let m = quantize(&w, 1, 4, false, KernelLevel::Scalar).unwrap();
        let s = 2.55f32 / 255.0;
        assert_eq!(m.scales, vec![s]);
        assert_eq!(m.zero_points, vec![-128]);
        assert_eq!(m.q[0], -128);
        assert_eq!(m.q[3], 127);
    }

    #[test]
    fn zero_rows_and_nonfinite() {
        let m = quantize(&[0.0; 8], 2, 4, false, KernelLevel::Scalar).unwrap();
        assert_eq!(m.dequantize(), vec![0.0; 8]);
        let mut w = vec![1.0f32; 12];
        w[7] = f32::NAN;
        let e = quantize(&w, 3, 4, true, KernelLevel::detect()).unwrap_err();
        assert!(matches!(e, Error::NonFinite { row: 1, col: 3, .. }), "{e:?}");
        w[7] = 1.0;
        w[10] = f32::NEG_INFINITY;
        assert!(matches!(quantize_ref(&w, 3, 4, true), Err(Error::NonFinite { row: 2, col: 2, .. })));
        assert!(matches!(quantize(&w, 4, 4, true, KernelLevel::Scalar), Err(Error::Shape(_))));
    }

    #[test]
    fn huge_range_is_an_error() {
        let w = [f32::MAX, -f32::MAX];
        assert!(matches!(quantize(&w, 1, 2, false, KernelLevel::Scalar), Err(Error::InvalidArgument(_))));
    }

    fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
        (1usize..6, 1usize..70)
            .prop_flat_map(|(r, c)| (Just(r), Just(c), proptest::collection::vec(-100f32..100f32, r * c)))
    }

    proptest! {
        #[test]
        fn every_level_matches_reference((r, c, w) in matrix(), sym in any::<bool>()) {
            let reference = quantize_ref(&w, r, c, sym).unwrap();
            for level in KernelLevel::available() {
                prop_assert_eq!(&quantize(&w, r, c, sym, level).unwrap(), &reference);
            }
        }

        #[test]
        fn error_is_at_most_half_a_step((r, c, w) in matrix(), sym in any::<bool>()) {
            let m = quantize(&w, r, c, sym, KernelLevel::detect()).unwrap();
            let d = m.dequantize();
            for row in 0..r {
                let s = m.scales[row];
                for col in 0..c {
                    let i = row * c + col;
                    // half a step, plus float rounding of the product (a few ulps of |w|)
                    prop_assert!((w[i] - d[i]).abs() <= 0.5 * s * (1.0 + 1e-5) + w[i].abs() * 4.0 * f32::EPSILON,
                        "row {} col {}: {} vs {} (scale {})", row, col, w[i], d[i], s);
                }
            }
        }
    }
}
