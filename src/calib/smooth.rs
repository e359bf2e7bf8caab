//! SmoothQuant scale migration (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
//! Quantization for Large Language Models", 2023, eq. 4): per input channel j,
//! `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`; the activations become `X diag(s)^-1` (folded
//! into the preceding norm) and the weights `diag(s) W` (in `[out, in]` layout: column j times s_j).
//! As in the paper's reference code, both maxima are floored at 1e-5 and so is the scale, so a
//! channel that never fires (or a zero weight column) cannot produce 0 or inf.

use rayon::prelude::*;

use crate::error::{check_len, first_non_finite, Error, Result};

/// Floor for the maxima and the scale (the SmoothQuant reference code's `clamp(min=1e-5)`).
pub const FLOOR: f32 = 1e-5;

/// Fold the column absmax of a row-major `[rows, cols]` weight into `out` (`out[j] = max(out[j],
/// max_i |W_ij|)`), so several matrices reading the same activations share one vector.
pub fn weight_column_absmax(w: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    check_len("weight", w.len(), rows * cols)?;
    check_len("absmax", out.len(), cols)?;
    if let Some(e) = first_non_finite(w, cols) {
        return Err(e);
    }
    if cols == 0 {
        return Ok(());
    }
    out.par_chunks_mut(64).enumerate().for_each(|(b, o)| {
        let c0 = b * 64;
        for r in 0..rows {
            let wr = &w[r * cols + c0..r * cols + c0 + o.len()];
            for (d, v) in o.iter_mut().zip(wr) {
                let a = v.abs();
                *d = if a > *d { a } else { *d };
            }
        }
    });
    Ok(())
}

/// Migration scales from the activation and weight column maxima.
pub fn smooth_scales(act_absmax: &[f32], weight_absmax: &[f32], alpha: f32) -> Result<Vec<f32>> {
    check_len("weight absmax", weight_absmax.len(), act_absmax.len())?;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::InvalidArgument(format!("alpha must be in [0, 1], got {alpha}")));
    }
    if let Some(i) = act_absmax.iter().chain(weight_absmax).position(|v| !v.is_finite() || *v < 0.0) {
        return Err(Error::InvalidArgument(format!(
            "channel {}: maxima must be finite and >= 0",
            i % act_absmax.len().max(1)
        )));
    }
    let a = alpha as f64;
    Ok(act_absmax
        .iter()
        .zip(weight_absmax)
        .map(|(x, w)| {
            let (x, w) = (x.max(FLOOR) as f64, w.max(FLOOR) as f64);
            ((x.powf(a) / w.powf(1.0 - a)) as f32).max(FLOOR)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_absmax_over_several_matrices() {
        let a = [1.0f32, -5.0, 2.0, 0.5, 3.0, -1.0]; // [2, 3]
        let b = [-4.0f32, 0.0, 0.0]; // [1, 3]
        let mut out = vec![0f32; 3];
        weight_column_absmax(&a, 2, 3, &mut out).unwrap();
        weight_column_absmax(&b, 1, 3, &mut out).unwrap();
        assert_eq!(out, vec![4.0, 5.0, 2.0]);
        let wide: Vec<f32> = (0..3 * 130).map(|i| i as f32 - 200.0).collect();
        let mut o = vec![0f32; 130];
        weight_column_absmax(&wide, 3, 130, &mut o).unwrap();
        for (j, v) in o.iter().enumerate() {
            let want = (0..3).map(|r| wide[r * 130 + j].abs()).fold(0f32, f32::max);
            assert_eq!(*v, want);
        }
        assert!(weight_column_absmax(&[f32::NAN], 1, 1, &mut [0.0]).is_err());
    }

    #[test]
    fn scales_follow_the_formula() {
        let s = smooth_scales(&[16.0, 1.0, 0.0], &[4.0, 1.0, 2.0], 0.5).unwrap();
        assert_eq!(s[0], 2.0); // sqrt(16) / sqrt(4)
        assert_eq!(s[1], 1.0);
        assert!((s[2] - (1e-5f64.sqrt() / 2f64.sqrt()) as f32).abs() < 1e-9);
        assert_eq!(smooth_scales(&[8.0], &[2.0], 1.0).unwrap(), vec![8.0]);
        assert_eq!(smooth_scales(&[8.0], &[2.0], 0.0).unwrap(), vec![0.5]);
        assert!(smooth_scales(&[1.0], &[1.0], 1.5).is_err());
        assert!(smooth_scales(&[f32::INFINITY], &[1.0], 0.5).is_err());
        assert!(smooth_scales(&[1.0, 2.0], &[1.0], 0.5).is_err());
    }
}
