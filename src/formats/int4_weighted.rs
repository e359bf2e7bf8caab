//! Importance-weighted scale search for the INT4 grouped format (same storage as `int4`: an f32
//! scale and a 4-bit zero point per group, `w ≈ (u - zp) * scale`).
//!
//! With per-column importances `a_j` (an imatrix: mean of x_j^2 over calibration tokens) the
//! output error of a row is, to first order, `sum_j a_j (w_j - ŵ_j)^2`, so each group picks the
//! scale/zero point that minimises that weighted error instead of covering the full range. The
//! candidates are the round-to-nearest parameters of the range shrunk by `r = 1, 0.975, ..., 0.5`
//! (clipping, as AWQ's clip search does), each followed by a weighted least-squares refit of the
//! scale for its codes (`s* = Σ a w q / Σ a q²`, q = u - zp, as ggml's `make_qx_quants` refits).
//! Asymmetric groups also try the weighted affine refit of scale and offset (the offset rounded to
//! a zero point). `r = 1` without refit is exactly `int4::quantize`, and it is tried first and kept on ties, so
//! the weighted error is never above round-to-nearest's.

use rayon::prelude::*;

use super::int4::{group_params, Int4Layout, Int4Matrix};
use crate::error::{check_len, first_non_finite, Error, Result};

/// Shrink steps: r = 1 - SHRINK_STEP * t for t in 0..=SHRINK_TRIES (down to r = 0.5).
const SHRINK_TRIES: usize = 20;
const SHRINK_STEP: f32 = 0.025;

#[inline]
fn code(v: f32, s: f32, zp: f32) -> f32 {
    ((v / s).round_ties_even() + zp).clamp(0.0, 15.0)
}

fn weighted_error(vals: &[f32], imp: &[f32], s: f32, zp: f32) -> f64 {
    vals.iter()
        .zip(imp)
        .map(|(v, a)| {
            let e = (v - (code(*v, s, zp) - zp) * s) as f64;
            *a as f64 * e * e
        })
        .sum()
}

fn refit(vals: &[f32], imp: &[f32], s: f32, zp: f32) -> Option<f32> {
    let (mut num, mut den) = (0f64, 0f64);
    for (v, a) in vals.iter().zip(imp) {
        let q = (code(*v, s, zp) - zp) as f64;
        num += *a as f64 * *v as f64 * q;
        den += *a as f64 * q * q;
    }
    let s2 = (num / den) as f32;
    (den > 0.0 && s2.is_finite() && s2 > 0.0).then_some(s2)
}

/// Asymmetric only: the weighted least-squares affine fit `w ≈ s·u + b` for the codes `u` of
/// (s, zp) (ggml's `make_qkx2_quants` refits scale and min the same way), with the offset rounded
/// back to a zero point `zp = round(-b / s)` in 0..=15.
fn affine_refit(vals: &[f32], imp: &[f32], s: f32, zp: f32) -> Option<(f32, u8)> {
    let (mut sa, mut su, mut sw, mut suu, mut suw) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (v, a) in vals.iter().zip(imp) {
        let (a, u, w) = (*a as f64, code(*v, s, zp) as f64, *v as f64);
        sa += a;
        su += a * u;
        sw += a * w;
        suu += a * u * u;
        suw += a * u * w;
    }
    let det = sa * suu - su * su;
    if det.is_nan() || det <= 0.0 {
        return None;
    }
    let s2 = ((sa * suw - su * sw) / det) as f32;
    let b = ((suu * sw - su * suw) / det) as f32;
    if !(s2.is_finite() && s2 > 0.0 && b.is_finite()) {
        return None;
    }
    Some((s2, (-b / s2).round_ties_even().clamp(0.0, 15.0) as u8))
}

/// Best (scale, zero point) of one group under importances `imp`.
fn search_group(vals: &[f32], imp: &[f32], symmetric: bool) -> Option<(f32, u8)> {
    let lo = vals.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let absmax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
    let rtn = group_params(lo, hi, absmax, symmetric)?;
    if imp.iter().all(|a| *a == 0.0) || absmax == 0.0 {
        return Some(rtn);
    }
    let mut best = (weighted_error(vals, imp, rtn.0, rtn.1 as f32), rtn);
    for t in 0..=SHRINK_TRIES {
        let r = 1.0 - SHRINK_STEP * t as f32;
        let Some((s, zp)) = group_params(lo * r, hi * r, absmax * r, symmetric) else { continue };
        let zf = zp as f32;
        let mut cands = [Some((s, zp)), refit(vals, imp, s, zf).map(|s| (s, zp)), None, None];
        if t == 0 {
            cands[0] = None; // r = 1 without refit is the round-to-nearest start
        }
        if !symmetric {
            if let Some((s2, z2)) = affine_refit(vals, imp, s, zf) {
                cands[2] = Some((s2, z2));
                cands[3] = refit(vals, imp, s2, z2 as f32).map(|s3| (s3, z2));
            }
        }
        for (s, zp) in cands.into_iter().flatten() {
            let e = weighted_error(vals, imp, s, zp as f32);
            if e < best.0 {
                best = (e, (s, zp));
            }
        }
    }
    Some(best.1)
}

fn check_importance(importance: &[f32], cols: usize) -> Result<()> {
    check_len("importance", importance.len(), cols)?;
    if let Some(j) = importance.iter().position(|a| !a.is_finite() || *a < 0.0) {
        return Err(Error::InvalidArgument(format!(
            "importance of column {j} is {}; importances must be finite and >= 0",
            importance[j]
        )));
    }
    Ok(())
}

fn quantize_row(
    wr: &[f32],
    importance: &[f32],
    group: usize,
    symmetric: bool,
    pr: &mut [u8],
    sr: &mut [f32],
    zr: &mut [u8],
) -> std::result::Result<(), usize> {
    for (gi, (s_out, z_out)) in sr.iter_mut().zip(zr.iter_mut()).enumerate() {
        let start = gi * group;
        let end = (start + group).min(wr.len());
        let (s, zp) = search_group(&wr[start..end], &importance[start..end], symmetric).ok_or(gi)?;
        *s_out = s;
        *z_out = zp;
        for c in start..end {
            let u = code(wr[c], s, zp as f32) as u8;
            pr[c / 2] |= if c % 2 == 0 { u } else { u << 4 };
        }
    }
    Ok(())
}

/// One row's work item: (row, ((packed out, weights), (scales out, zeros out))).
type RowTask<'a> = (usize, ((&'a mut [u8], &'a [f32]), (&'a mut [f32], &'a mut [u8])));

fn run(w: &[f32], layout: Int4Layout, symmetric: bool, importance: &[f32], parallel: bool) -> Result<Int4Matrix> {
    let Int4Layout { rows, cols, group } = layout;
    check_len("weight", w.len(), rows * cols)?;
    check_importance(importance, cols)?;
    if let Some(e) = first_non_finite(w, cols) {
        return Err(e);
    }
    let g = layout.groups();
    let rb = layout.row_bytes();
    let mut m = Int4Matrix {
        rows,
        cols,
        group,
        packed: vec![0; rows * rb],
        scales: vec![0.0; rows * g],
        zeros: vec![0; rows * g],
    };
    if rows == 0 || cols == 0 {
        return Ok(m);
    }
    let task = |(r, ((pr, wr), (sr, zr))): RowTask<'_>| {
        quantize_row(wr, importance, group, symmetric, pr, sr, zr).err().map(|gi| (r, gi))
    };
    let bad = if parallel {
        m.packed
            .par_chunks_mut(rb)
            .zip(w.par_chunks(cols))
            .zip(m.scales.par_chunks_mut(g).zip(m.zeros.par_chunks_mut(g)))
            .enumerate()
            .filter_map(task)
            .min()
    } else {
        m.packed
            .chunks_mut(rb)
            .zip(w.chunks(cols))
            .zip(m.scales.chunks_mut(g).zip(m.zeros.chunks_mut(g)))
            .enumerate()
            .filter_map(task)
            .min()
    };
    match bad {
        None => Ok(m),
        Some((r, gi)) => Err(Error::InvalidArgument(format!(
            "row {r}, group {gi}: the weight range overflows float32 when divided into steps; rescale the weights"
        ))),
    }
}

/// Scalar reference: rows one after another.
pub fn quantize_weighted_ref(w: &[f32], layout: Int4Layout, symmetric: bool, importance: &[f32]) -> Result<Int4Matrix> {
    run(w, layout, symmetric, importance, false)
}

/// Rows in parallel; identical to `quantize_weighted_ref`.
pub fn quantize_weighted(w: &[f32], layout: Int4Layout, symmetric: bool, importance: &[f32]) -> Result<Int4Matrix> {
    run(w, layout, symmetric, importance, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::int4;
    use crate::simd::KernelLevel;
    use proptest::prelude::*;

    fn werr(w: &[f32], d: &[f32], imp: &[f32], cols: usize) -> f64 {
        w.iter().zip(d).enumerate().map(|(i, (a, b))| imp[i % cols] as f64 * ((a - b) as f64).powi(2)).sum()
    }

    #[test]
    fn uniform_importance_of_zero_is_round_to_nearest() {
        let w: Vec<f32> = (0..4 * 96).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let layout = Int4Layout::new(4, 96, 32).unwrap();
        for sym in [false, true] {
            let a = quantize_weighted(&w, layout, sym, &[0.0; 96]).unwrap();
            assert_eq!(a, int4::quantize_ref(&w, layout, sym).unwrap());
        }
        assert!(quantize_weighted(&w, layout, false, &[1.0; 95]).is_err());
        let mut bad = vec![1.0f32; 96];
        bad[3] = -1.0;
        assert!(quantize_weighted(&w, layout, false, &bad).unwrap_err().to_string().contains("column 3"));
    }

    #[test]
    fn concentrated_importance_cuts_weighted_error() {
        // heavy-tailed weights, a few columns carry almost all the activation energy
        let (rows, cols) = (64, 128);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let t = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
                t * t * t * 40.0
            })
            .collect();
        let imp: Vec<f32> = (0..cols).map(|j| if j % 16 == 3 { 100.0 } else { 0.01 }).collect();
        let layout = Int4Layout::new(rows, cols, 32).unwrap();
        let rtn = int4::quantize(&w, layout, false, KernelLevel::detect()).unwrap().dequantize();
        let weighted = quantize_weighted(&w, layout, false, &imp).unwrap().dequantize();
        let (e0, e1) = (werr(&w, &rtn, &imp, cols), werr(&w, &weighted, &imp, cols));
        assert!(e1 < 0.8 * e0, "weighted {e1} vs round-to-nearest {e0}");
    }

    proptest! {
        #[test]
        fn never_worse_than_rtn_and_parallel_equals_reference(
            rows in 1usize..4, cols in 1usize..150, sym in any::<bool>(), seed in any::<u32>()
        ) {
            let mut st = seed as u64 | 1;
            let mut next = || { st ^= st << 13; st ^= st >> 7; st ^= st << 17; (st >> 40) as f32 / (1u64 << 24) as f32 };
            let w: Vec<f32> = (0..rows * cols).map(|_| (next() - 0.5) * 8.0).collect();
            let imp: Vec<f32> = (0..cols).map(|_| { let u = next(); u * u * u * 10.0 }).collect();
            let layout = Int4Layout::new(rows, cols, 32).unwrap();
            let a = quantize_weighted(&w, layout, sym, &imp).unwrap();
            prop_assert_eq!(&a, &quantize_weighted_ref(&w, layout, sym, &imp).unwrap());
            let rtn = int4::quantize_ref(&w, layout, sym).unwrap().dequantize();
            let e_rtn = werr(&w, &rtn, &imp, cols);
            let e = werr(&w, &a.dequantize(), &imp, cols);
            prop_assert!(e <= e_rtn * (1.0 + 1e-9) + 1e-12, "{} > {}", e, e_rtn);
        }
    }
}
