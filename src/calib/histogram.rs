//! Histograms of |x| for the percentile and MSE activation-range observers of static INT8.
//!
//! Bins follow the float32 bit pattern: bin `i` holds the magnitudes whose top 16 bits (sign
//! dropped: 8 exponent + 7 mantissa bits, the bfloat16 truncation) equal `i`, i.e. the interval
//! `[f32::from_bits(i << 16), f32::from_bits((i + 1) << 16))`. Every bin is 2^-7 (0.8%) wide
//! relative to its values over the whole float range, so no range has to be known in advance,
//! bins never need re-scaling when a larger value arrives, and counts from any batch order add up
//! to the same histogram (integer sums).

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};

/// Number of bins: every finite magnitude (bit patterns below 0x7f80_0000, the infinity).
pub const NBINS: usize = 0x7f80;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

#[inline(always)]
fn bin(v: f32) -> usize {
    ((v.to_bits() & 0x7fff_ffff) >> 16) as usize
}

/// Lower edge of bin `i`.
pub fn bin_lo(i: usize) -> f32 {
    f32::from_bits((i as u32) << 16)
}

/// Upper edge of bin `i` (the lower edge of the next one).
pub fn bin_hi(i: usize) -> f32 {
    f32::from_bits(((i as u32) + 1) << 16)
}

fn non_finite() -> Error {
    Error::InvalidArgument(
        "an activation is NaN or infinite; range observers need finite activations (run the model in float32, \
         or check the calibration inputs)"
            .into(),
    )
}

/// Scalar reference: one element at a time.
pub fn accumulate_ref(x: &[f32], hist: &mut [u64]) -> Result<()> {
    check_len("histogram", hist.len(), NBINS)?;
    if x.iter().any(|v| !v.is_finite()) {
        return Err(non_finite());
    }
    for v in x {
        hist[bin(*v)] += 1;
    }
    Ok(())
}

/// Fast path: chunks of the batch counted in parallel into private histograms, then summed
/// (integer counts, so the result equals `accumulate_ref` exactly). Nothing is written on error.
pub fn accumulate(x: &[f32], cols: usize, hist: &mut [u64]) -> Result<()> {
    check_len("histogram", hist.len(), NBINS)?;
    let chunk = (cols.max(1) * ROWS_PER_TASK).max(4096);
    let parts: Vec<Option<Vec<u32>>> = x
        .par_chunks(chunk)
        .map(|c| {
            // Inf/NaN bit patterns map past the last finite bin: reject the chunk before counting
            if !c.iter().all(|v| v.is_finite()) {
                return None;
            }
            let mut h = vec![0u32; NBINS];
            for v in c {
                h[bin(*v)] += 1;
            }
            Some(h)
        })
        .collect();
    if parts.iter().any(|p| p.is_none()) {
        return Err(non_finite());
    }
    for h in parts.into_iter().flatten() {
        for (d, s) in hist.iter_mut().zip(&h) {
            *d += *s as u64;
        }
    }
    Ok(())
}

fn total(hist: &[u64]) -> Result<u64> {
    check_len("histogram", hist.len(), NBINS)?;
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return Err(Error::InvalidArgument("the histogram is empty: no activations were observed".into()));
    }
    Ok(n)
}

/// Smallest bin upper edge below which at least `pct` percent of the magnitudes lie, capped at
/// `absmax` (the largest magnitude seen, which lies in the last non-empty bin).
pub fn percentile(hist: &[u64], pct: f64, absmax: f32) -> Result<f32> {
    let n = total(hist)?;
    if !(pct > 0.0 && pct <= 100.0) {
        return Err(Error::InvalidArgument(format!("percentile must be in (0, 100], got {pct}")));
    }
    let target = ((pct / 100.0) * n as f64).ceil().max(1.0) as u64;
    let mut cum = 0u64;
    for (i, c) in hist.iter().enumerate() {
        cum += c;
        if cum >= target {
            return Ok(bin_hi(i).min(absmax));
        }
    }
    Ok(absmax)
}

/// Squared error of symmetric quantization with clip `c` (scale `c / qmax`, codes clamped to
/// `[-qmax, qmax]`) over the non-empty bins, each represented by its midpoint (capped at absmax).
fn clip_error(bins: &[(f32, u64)], c: f32, qmax: f32) -> f64 {
    let s = c / qmax;
    bins.iter()
        .map(|&(v, n)| {
            let q = (v / s).round_ties_even().min(qmax);
            let e = (v - q * s) as f64;
            e * e * n as f64
        })
        .sum()
}

/// The clip value minimising the expected squared error of symmetric `qmax`-level quantization
/// over the histogram (the MSE observer): candidates `absmax * k / steps`, `k = 1..=steps`; on ties
/// the larger clip wins. `absmax` must be the largest magnitude seen.
pub fn mse_clip(hist: &[u64], absmax: f32, qmax: f32, steps: usize) -> Result<f32> {
    total(hist)?;
    let valid = absmax.is_finite() && absmax >= 0.0 && qmax >= 1.0 && steps > 0;
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "mse_clip needs a finite absmax >= 0, qmax >= 1 and steps >= 1; got {absmax}, {qmax}, {steps}"
        )));
    }
    if absmax == 0.0 {
        return Ok(0.0);
    }
    let bins: Vec<(f32, u64)> = hist
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| ((0.5 * (bin_lo(i) + bin_hi(i))).min(absmax), *n))
        .collect();
    let errs: Vec<f64> =
        (1..=steps).into_par_iter().map(|k| clip_error(&bins, absmax * k as f32 / steps as f32, qmax)).collect();
    let mut best = steps - 1;
    for (i, e) in errs.iter().enumerate().rev() {
        if *e < errs[best] {
            best = i;
        }
    }
    Ok(absmax * (best + 1) as f32 / steps as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_of(x: &[f32]) -> Vec<u64> {
        let mut h = vec![0u64; NBINS];
        accumulate(x, 16, &mut h).unwrap();
        h
    }

    #[test]
    fn bins_cover_values_and_fast_equals_reference() {
        let x: Vec<f32> = (0..100_000).map(|i| ((i as f32) * 0.7391).sin() * 10f32.powi(i % 7 - 3)).collect();
        let h = hist_of(&x);
        let mut r = vec![0u64; NBINS];
        accumulate_ref(&x, &mut r).unwrap();
        assert_eq!(h, r);
        assert_eq!(h.iter().sum::<u64>(), x.len() as u64);
        for v in &x[..1000] {
            let b = bin(*v);
            assert!(bin_lo(b) <= v.abs() && v.abs() < bin_hi(b), "{v} not in bin {b}");
        }
        let mut bad = x.clone();
        bad[5000] = f32::INFINITY;
        let mut h2 = h.clone();
        assert!(accumulate(&bad, 16, &mut h2).is_err());
        assert_eq!(h2, h, "nothing written on error");
    }

    #[test]
    fn percentile_of_uniform_values() {
        // 1..=1000: the 99th percentile is 990, reported as the upper edge of its bin (<= 0.8% above)
        let x: Vec<f32> = (1..=1000).map(|i| i as f32).collect();
        let h = hist_of(&x);
        let p = percentile(&h, 99.0, 1000.0).unwrap();
        assert!((990.0..=990.0 * (1.0 + 1.0 / 128.0)).contains(&p), "{p}");
        assert_eq!(percentile(&h, 100.0, 1000.0).unwrap(), 1000.0);
        assert!(percentile(&h, 0.0, 1000.0).is_err());
        assert!(percentile(&vec![0; NBINS], 50.0, 1.0).is_err());
    }

    #[test]
    fn mse_clips_a_lone_outlier() {
        // 10M values in [-1, 1] and one at 100: clipping the outlier (error 99^2) costs less than
        // the rounding noise a 100/127 step adds to every other value (10M * step^2 / 12)
        let mut x: Vec<f32> = (0..10_000).map(|i| ((i as f32) * 0.123).sin()).collect();
        let mut h = hist_of(&x);
        h.iter_mut().for_each(|c| *c *= 1000);
        h[bin(100.0)] += 1;
        x.push(100.0);
        let c = mse_clip(&h, 100.0, 127.0, 200).unwrap();
        assert!((1.0..100.0).contains(&c), "{c}");
        // without an outlier the best clip keeps (nearly) the full range
        let h2 = hist_of(&x[..10_000]);
        let amax = x[..10_000].iter().fold(0f32, |a, v| a.max(v.abs()));
        let c2 = mse_clip(&h2, amax, 127.0, 200).unwrap();
        assert!(c2 > 0.5 * amax, "{c2} vs {amax}");
        assert!(mse_clip(&h2, f32::NAN, 127.0, 10).is_err());
    }
}
