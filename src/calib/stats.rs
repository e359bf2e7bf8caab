//! Per-column activation statistics of a `[tokens, cols]` batch: sum of squares (the imatrix of
//! llama.cpp's `tools/imatrix`: importance of column j = mean over tokens of x_j^2), absmax, min
//! and max.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};

/// Running per-column statistics (caller-owned buffers, all of length `cols`).
pub struct ColumnStatsMut<'a> {
    pub sum_sq: &'a mut [f64],
    pub absmax: &'a mut [f32],
    pub min: &'a mut [f32],
    pub max: &'a mut [f32],
}

impl ColumnStatsMut<'_> {
    fn check(&self, cols: usize) -> Result<()> {
        check_len("sum_sq", self.sum_sq.len(), cols)?;
        check_len("absmax", self.absmax.len(), cols)?;
        check_len("min", self.min.len(), cols)?;
        check_len("max", self.max.len(), cols)
    }
}

/// One block's reduction: first column, sums of squares, absmax, min, max.
type BlockStats = (usize, Vec<f64>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Columns per task of the fast path: wide enough for full SIMD registers, narrow enough that the
/// four accumulators of a block stay in L1 while the rows stream past.
const BLOCK: usize = 64;

fn non_finite(x: &[f32], cols: usize) -> Error {
    let i = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Error::InvalidArgument(format!(
        "activation value {} at token {}, column {} is not finite; calibration statistics need finite \
         activations (run the model in float32, or check the calibration inputs)",
        x[i],
        i / cols.max(1),
        i % cols.max(1)
    ))
}

/// Reduce one block of columns `[c0, c0 + n)` over all rows into fresh accumulators.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn reduce_block(
    x: &[f32],
    cols: usize,
    rows: usize,
    c0: usize,
    s2: &mut [f64],
    amax: &mut [f32],
    lo: &mut [f32],
    hi: &mut [f32],
) {
    let n = s2.len();
    for r in 0..rows {
        let xr = &x[r * cols + c0..r * cols + c0 + n];
        for j in 0..n {
            let v = xr[j];
            let d = v as f64;
            s2[j] += d * d;
            let a = v.abs();
            amax[j] = if a > amax[j] { a } else { amax[j] };
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
        }
    }
}

fn merge(acc: &mut ColumnStatsMut<'_>, c0: usize, s2: &[f64], amax: &[f32], lo: &[f32], hi: &[f32]) {
    for j in 0..s2.len() {
        let c = c0 + j;
        acc.sum_sq[c] += s2[j];
        acc.absmax[c] = acc.absmax[c].max(amax[j]);
        acc.min[c] = acc.min[c].min(lo[j]);
        acc.max[c] = acc.max[c].max(hi[j]);
    }
}

/// Scalar reference: one element at a time, rows in order.
pub fn accumulate_ref(x: &[f32], rows: usize, cols: usize, acc: &mut ColumnStatsMut<'_>) -> Result<()> {
    check_len("activations", x.len(), rows * cols)?;
    acc.check(cols)?;
    if x.iter().any(|v| !v.is_finite()) {
        return Err(non_finite(x, cols));
    }
    let mut s2 = vec![0f64; cols];
    let mut amax = vec![0f32; cols];
    let mut lo = vec![f32::INFINITY; cols];
    let mut hi = vec![f32::NEG_INFINITY; cols];
    for r in 0..rows {
        for c in 0..cols {
            let v = x[r * cols + c];
            s2[c] += (v as f64) * (v as f64);
            amax[c] = amax[c].max(v.abs());
            lo[c] = lo[c].min(v);
            hi[c] = hi[c].max(v);
        }
    }
    merge(acc, 0, &s2, &amax, &lo, &hi);
    Ok(())
}

/// Fast path: blocks of columns in parallel, bit-identical to `accumulate_ref` (each column still
/// sums its rows in order, in f64). Nothing is written unless every value is finite.
pub fn accumulate(x: &[f32], rows: usize, cols: usize, acc: &mut ColumnStatsMut<'_>) -> Result<()> {
    check_len("activations", x.len(), rows * cols)?;
    acc.check(cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let nblocks = cols.div_ceil(BLOCK);
    let partial: Vec<BlockStats> = (0..nblocks)
        .into_par_iter()
        .map(|b| {
            let c0 = b * BLOCK;
            let n = BLOCK.min(cols - c0);
            let mut s2 = vec![0f64; n];
            let mut amax = vec![0f32; n];
            let mut lo = vec![f32::INFINITY; n];
            let mut hi = vec![f32::NEG_INFINITY; n];
            reduce_block(x, cols, rows, c0, &mut s2, &mut amax, &mut lo, &mut hi);
            (c0, s2, amax, lo, hi)
        })
        .collect();
    // a NaN or Inf anywhere makes its column's sum of squares non-finite
    if partial.iter().any(|p| p.1.iter().any(|v| !v.is_finite())) {
        return Err(non_finite(x, cols));
    }
    for (c0, s2, amax, lo, hi) in &partial {
        merge(acc, *c0, s2, amax, lo, hi);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Owned {
        s2: Vec<f64>,
        amax: Vec<f32>,
        lo: Vec<f32>,
        hi: Vec<f32>,
    }

    impl Owned {
        fn new(cols: usize) -> Self {
            Owned {
                s2: vec![0.0; cols],
                amax: vec![0.0; cols],
                lo: vec![f32::INFINITY; cols],
                hi: vec![f32::NEG_INFINITY; cols],
            }
        }
        fn view(&mut self) -> ColumnStatsMut<'_> {
            ColumnStatsMut { sum_sq: &mut self.s2, absmax: &mut self.amax, min: &mut self.lo, max: &mut self.hi }
        }
    }

    #[test]
    fn golden() {
        let x = [1.0f32, -2.0, 3.0, -4.0, 0.5, 0.0];
        let mut o = Owned::new(2);
        accumulate(&x, 3, 2, &mut o.view()).unwrap();
        assert_eq!(o.s2, vec![1.0 + 9.0 + 0.25, 4.0 + 16.0]);
        assert_eq!(o.amax, vec![3.0, 4.0]);
        assert_eq!(o.lo, vec![0.5, -4.0]);
        assert_eq!(o.hi, vec![3.0, 0.0]);
    }

    #[test]
    fn non_finite_is_an_error_and_writes_nothing() {
        let mut x = vec![1.0f32; 300];
        x[131] = f32::NAN;
        let mut o = Owned::new(100);
        let e = accumulate(&x, 3, 100, &mut o.view()).unwrap_err();
        assert!(e.to_string().contains("token 1, column 31"), "{e}");
        assert!(o.s2.iter().all(|v| *v == 0.0));
        assert!(accumulate(&x, 2, 100, &mut o.view()).is_err());
        assert!(matches!(accumulate(&x, 4, 100, &mut o.view()), Err(Error::Shape(_))));
    }

    proptest! {
        #[test]
        fn fast_equals_reference(rows in 0usize..20, cols in 1usize..200, seed in any::<u64>(), batches in 1usize..4) {
            let mut a = Owned::new(cols);
            let mut b = Owned::new(cols);
            let mut state = seed | 1;
            for _ in 0..batches {
                let x: Vec<f32> = (0..rows * cols).map(|_| {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 20.0
                }).collect();
                accumulate(&x, rows, cols, &mut a.view()).unwrap();
                accumulate_ref(&x, rows, cols, &mut b.view()).unwrap();
            }
            prop_assert_eq!(&a.s2, &b.s2);
            prop_assert_eq!(&a.amax, &b.amax);
            prop_assert_eq!(&a.lo, &b.lo);
            prop_assert_eq!(&a.hi, &b.hi);
        }
    }
}
