//! INT4 grouped weights: each row is split into groups of `group` consecutive columns (the last
//! group may be shorter), each group has an f32 scale and a 4-bit zero point, and values are
//! stored as unsigned nibbles `u` in 0..=15 with `w ≈ (u - zp) * scale`.
//!
//! Asymmetric (default): the group range is widened to include 0 (as GPTQ's quantizer does, so 0 is
//! exact), `scale = (hi - lo) / 15`, `zp = clamp(-round(lo / scale), 0, 15)`.
//! Symmetric: `scale = absmax / 7.5` (torchao's SYMMETRIC mapping: absmax over (qmax - qmin) / 2),
//! `zp = 8`. In both, `u = clamp(round(w / scale) + zp, 0, 15)` and |w - dequant(w)| <= scale / 2.
//!
//! Packing: byte `j` of a row holds column `2j` in its low nibble and column `2j + 1` in its high
//! nibble; a row takes `ceil(cols / 2)` bytes (an odd last column leaves the high nibble 0).

use rayon::prelude::*;

use super::int8::{round_even_small, row_stats, usable_step};
use crate::error::{check_len, first_non_finite, Error, Result};
use crate::formats::INT4_GROUP_SIZES;
use crate::simd::{dispatch, KernelLevel};

/// A quantized `[rows, cols]` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `[rows, ceil(cols / 2)]` packed nibbles.
    pub packed: Vec<u8>,
    /// `[rows, groups]`.
    pub scales: Vec<f32>,
    /// `[rows, groups]`, each in 0..=15.
    pub zeros: Vec<u8>,
}

/// Shape facts of a grouped INT4 matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Layout {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

impl Int4Layout {
    pub fn new(rows: usize, cols: usize, group: usize) -> Result<Self> {
        if !INT4_GROUP_SIZES.contains(&group) {
            return Err(Error::InvalidArgument(format!(
                "group size {group} is not supported; use one of {INT4_GROUP_SIZES:?}"
            )));
        }
        Ok(Self { rows, cols, group })
    }
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }
    pub fn row_bytes(&self) -> usize {
        self.cols.div_ceil(2)
    }
    pub fn check(&self, packed: usize, scales: usize, zeros: usize) -> Result<()> {
        check_len("packed", packed, self.rows * self.row_bytes())?;
        check_len("scales", scales, self.rows * self.groups())?;
        check_len("zeros", zeros, self.rows * self.groups())
    }
}

impl Int4Matrix {
    pub fn layout(&self) -> Int4Layout {
        Int4Layout { rows: self.rows, cols: self.cols, group: self.group }
    }
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = crate::mem::zeroed_vec(self.rows * self.cols);
        dequantize_into(self.layout(), &self.packed, &self.scales, &self.zeros, &mut out)
            .expect("Int4Matrix fields are consistent by construction");
        out
    }
}

pub(crate) fn group_params(lo: f32, hi: f32, absmax: f32, symmetric: bool) -> Option<(f32, u8)> {
    if symmetric {
        let s = usable_step(absmax / 7.5);
        s.is_finite().then_some((s, 8))
    } else {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let s = usable_step((hi - lo) / 15.0);
        if !s.is_finite() {
            return None;
        }
        Some((s, (-(lo / s).round_ties_even()).clamp(0.0, 15.0) as u8))
    }
}

fn range_error(row: usize, group: usize) -> Error {
    Error::InvalidArgument(format!(
        "row {row}, group {group}: the weight range overflows float32 when divided into steps; rescale the weights"
    ))
}

/// Scalar reference: quantize element by element, then pack.
pub fn quantize_ref(w: &[f32], layout: Int4Layout, symmetric: bool) -> Result<Int4Matrix> {
    let Int4Layout { rows, cols, group } = layout;
    check_len("weight", w.len(), rows * cols)?;
    if let Some(e) = first_non_finite(w, cols) {
        return Err(e);
    }
    let g = layout.groups();
    let mut m = Int4Matrix {
        rows,
        cols,
        group,
        packed: vec![0; rows * layout.row_bytes()],
        scales: vec![0.0; rows * g],
        zeros: vec![0; rows * g],
    };
    for r in 0..rows {
        for gi in 0..g {
            let start = gi * group;
            let end = (start + group).min(cols);
            let vals = &w[r * cols + start..r * cols + end];
            let lo = vals.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let absmax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (s, zp) = group_params(lo, hi, absmax, symmetric).ok_or_else(|| range_error(r, gi))?;
            m.scales[r * g + gi] = s;
            m.zeros[r * g + gi] = zp;
            for c in start..end {
                let u = ((w[r * cols + c] / s).round_ties_even() + zp as f32).clamp(0.0, 15.0) as u8;
                let byte = &mut m.packed[r * layout.row_bytes() + c / 2];
                *byte |= if c % 2 == 0 { u } else { u << 4 };
            }
        }
    }
    Ok(m)
}

/// Fast path: rows in parallel, SIMD-friendly loops, bit-identical to `quantize_ref`.
pub fn quantize(w: &[f32], layout: Int4Layout, symmetric: bool, level: KernelLevel) -> Result<Int4Matrix> {
    let g = layout.groups();
    let mut m = Int4Matrix {
        rows: layout.rows,
        cols: layout.cols,
        group: layout.group,
        packed: crate::mem::zeroed_vec(layout.rows * layout.row_bytes()),
        scales: vec![0.0; layout.rows * g],
        zeros: vec![0; layout.rows * g],
    };
    quantize_into(w, layout, symmetric, level, &mut m.packed, &mut m.scales, &mut m.zeros)?;
    Ok(m)
}

/// `quantize` into caller-provided buffers.
pub fn quantize_into(
    w: &[f32],
    layout: Int4Layout,
    symmetric: bool,
    level: KernelLevel,
    packed: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [u8],
) -> Result<()> {
    let Int4Layout { rows, cols, group } = layout;
    check_len("weight", w.len(), rows * cols)?;
    layout.check(packed.len(), scales.len(), zeros.len())?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let g = layout.groups();
    let rb = layout.row_bytes();
    let bad = packed
        .par_chunks_mut(rb)
        .zip(w.par_chunks(cols))
        .zip(scales.par_chunks_mut(g).zip(zeros.par_chunks_mut(g)))
        .enumerate()
        .filter_map(|(r, ((pr, wr), (sr, zr)))| {
            #[cfg(target_arch = "x86_64")]
            if level.has_avx512() {
                // SAFETY: the level was checked by KernelLevel::resolve.
                return unsafe { crate::formats::quantize_avx512::int4_row_avx512(wr, group, symmetric, pr, sr, zr) }
                    .err()
                    .map(|gi| (r, gi));
            }
            // one f32 scratch row of nibble values per task, packed afterwards
            let mut u = vec![0u8; cols + 1];
            for gi in 0..g {
                let start = gi * group;
                let end = (start + group).min(cols);
                let vals = &wr[start..end];
                let (lo, hi, absmax, finite) = row_stats(level, vals);
                if !finite {
                    return Some((r, gi));
                }
                let Some((s, zp)) = group_params(lo, hi, absmax, symmetric) else {
                    return Some((r, gi));
                };
                sr[gi] = s;
                zr[gi] = zp;
                nibbles(level, vals, &mut u[start..end], s, zp as f32);
            }
            pack_row(level, &u[..cols + (cols & 1)], pr);
            None
        })
        .min();
    match bad {
        None => Ok(()),
        Some((r, gi)) => {
            let row = &w[r * cols..(r + 1) * cols];
            Err(match first_non_finite(row, cols) {
                Some(Error::NonFinite { col, value, .. }) => Error::NonFinite { row: r, col, value },
                _ => range_error(r, gi),
            })
        }
    }
}

fn nibbles(level: KernelLevel, w: &[f32], u: &mut [u8], scale: f32, zp: f32) {
    dispatch!(
        level,
        fn nib(w: &[f32], u: &mut [u8], scale: f32, zp: f32) -> () {
            for (d, v) in u.iter_mut().zip(w) {
                let t = round_even_small((v / scale).clamp(-32.0, 32.0)) + zp;
                *d = t.clamp(0.0, 15.0) as u8;
            }
        }
    )
}

/// Pack pairs of nibbles (low nibble = even column). `u.len()` is even (padded with 0).
fn pack_row(level: KernelLevel, u: &[u8], out: &mut [u8]) {
    dispatch!(
        level,
        fn pack(u: &[u8], out: &mut [u8]) -> () {
            for (o, pair) in out.iter_mut().zip(u.chunks_exact(2)) {
                *o = pair[0] | (pair[1] << 4);
            }
        }
    )
}

/// Unpack one row's nibbles into `u` (`u.len()` = cols).
#[inline]
pub fn unpack_row(packed: &[u8], u: &mut [u8]) {
    let cols = u.len();
    let (even, odd) = (cols / 2, cols % 2);
    for (pair, b) in u[..even * 2].chunks_exact_mut(2).zip(packed) {
        pair[0] = b & 0x0f;
        pair[1] = b >> 4;
    }
    if odd == 1 {
        u[cols - 1] = packed[even] & 0x0f;
    }
}

/// Dequantize one row into `out` (`out.len()` = cols).
#[inline]
pub fn dequantize_row(packed: &[u8], scales: &[f32], zeros: &[u8], group: usize, out: &mut [f32]) {
    let cols = out.len();
    for (gi, (s, z)) in scales.iter().zip(zeros).enumerate() {
        let start = gi * group;
        let end = (start + group).min(cols);
        let z = *z as f32;
        // start is even (group sizes are even), so pairs line up with bytes
        let bytes = &packed[start / 2..end.div_ceil(2)];
        let o = &mut out[start..end];
        let full = o.len() / 2;
        for (pair, b) in o[..full * 2].chunks_exact_mut(2).zip(bytes) {
            pair[0] = ((b & 0x0f) as f32 - z) * s;
            pair[1] = ((b >> 4) as f32 - z) * s;
        }
        if o.len() % 2 == 1 {
            o[full * 2] = ((bytes[full] & 0x0f) as f32 - z) * s;
        }
    }
}

/// Dequantize a whole matrix, rows in parallel.
pub fn dequantize_into(layout: Int4Layout, packed: &[u8], scales: &[f32], zeros: &[u8], out: &mut [f32]) -> Result<()> {
    layout.check(packed.len(), scales.len(), zeros.len())?;
    check_len("output", out.len(), layout.rows * layout.cols)?;
    if layout.rows == 0 || layout.cols == 0 {
        return Ok(());
    }
    let (rb, g) = (layout.row_bytes(), layout.groups());
    out.par_chunks_mut(layout.cols).enumerate().for_each(|(r, o)| {
        dequantize_row(
            &packed[r * rb..(r + 1) * rb],
            &scales[r * g..(r + 1) * g],
            &zeros[r * g..(r + 1) * g],
            layout.group,
            o,
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_packing_layout() {
        // symmetric, absmax 7.5 -> scale 1, zp 8: u = w + 8
        let mut w = vec![0f32; 32];
        w[0] = -7.0; // u = 1
        w[1] = 7.5; // 7.5 -> 8 (ties to even) -> 16 -> clamped to 15
        w[2] = 3.0; // 11
        w[31] = -7.5; // -7.5 -> -8 (ties to even) -> u = 0
        let m = quantize(&w, Int4Layout::new(1, 32, 32).unwrap(), true, KernelLevel::Scalar).unwrap();
        assert_eq!(m.scales, vec![1.0]);
        assert_eq!(m.zeros, vec![8]);
        assert_eq!(m.packed[0], 0xF1); // col 0 low nibble = 1, col 1 high nibble = 15
        assert_eq!(m.packed[1], 0x8B); // col 2 = 11 (low), col 3 = 8 (high)
        assert_eq!(m.packed[15], 0x08); // col 30 = 8 (low), col 31 = 0 (high)
        assert_eq!(m.packed.len(), 16);
    }

    #[test]
    fn odd_columns_and_partial_group() {
        let cols = 37; // one full group of 32 and a partial group of 5, odd byte count
        let w: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let layout = Int4Layout::new(2, cols, 32).unwrap();
        let m = quantize(&w, layout, false, KernelLevel::detect()).unwrap();
        assert_eq!(m.packed.len(), 2 * 19);
        assert_eq!(m.scales.len(), 4);
        assert_eq!(m, quantize_ref(&w, layout, false).unwrap());
        // the unused high nibble of the last byte stays zero
        assert_eq!(m.packed[18] >> 4, 0);
    }

    #[test]
    fn bad_group_and_nonfinite() {
        assert!(matches!(Int4Layout::new(1, 64, 48), Err(Error::InvalidArgument(_))));
        let mut w = vec![0.5f32; 128];
        w[70] = f32::INFINITY;
        let e = quantize(&w, Int4Layout::new(2, 64, 32).unwrap(), false, KernelLevel::detect()).unwrap_err();
        assert_eq!(e, Error::NonFinite { row: 1, col: 6, value: f32::INFINITY });
    }

    fn matrix() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>)> {
        (1usize..4, 1usize..300, prop::sample::select(INT4_GROUP_SIZES.to_vec()))
            .prop_flat_map(|(r, c, g)| (Just(r), Just(c), Just(g), proptest::collection::vec(-10f32..10f32, r * c)))
    }

    proptest! {
        #[test]
        fn every_level_matches_reference((r, c, g, w) in matrix(), sym in any::<bool>()) {
            let layout = Int4Layout::new(r, c, g).unwrap();
            let reference = quantize_ref(&w, layout, sym).unwrap();
            for level in KernelLevel::available() {
                prop_assert_eq!(&quantize(&w, layout, sym, level).unwrap(), &reference);
            }
        }

        #[test]
        fn error_is_at_most_half_a_step((r, c, g, w) in matrix(), sym in any::<bool>()) {
            let layout = Int4Layout::new(r, c, g).unwrap();
            let m = quantize(&w, layout, sym, KernelLevel::detect()).unwrap();
            let d = m.dequantize();
            let groups = layout.groups();
            for row in 0..r {
                for col in 0..c {
                    let s = m.scales[row * groups + col / g];
                    let i = row * c + col;
                    prop_assert!((w[i] - d[i]).abs() <= 0.5 * s * (1.0 + 1e-5) + w[i].abs() * 4.0 * f32::EPSILON,
                        "row {} col {}: {} vs {} (scale {})", row, col, w[i], d[i], s);
                }
            }
        }

        #[test]
        fn unpack_inverts_pack((r, c, g, w) in matrix()) {
            let layout = Int4Layout::new(r, c, g).unwrap();
            let m = quantize(&w, layout, false, KernelLevel::Scalar).unwrap();
            let mut u = vec![0u8; c];
            for row in 0..r {
                unpack_row(&m.packed[row * layout.row_bytes()..(row + 1) * layout.row_bytes()], &mut u);
                #[allow(clippy::needless_range_loop)]
                for col in 0..c {
                    let z = m.zeros[row * layout.groups() + col / g] as f32;
                    let s = m.scales[row * layout.groups() + col / g];
                    prop_assert_eq!((u[col] as f32 - z) * s, m.dequantize()[row * c + col]);
                }
            }
        }
    }
}
