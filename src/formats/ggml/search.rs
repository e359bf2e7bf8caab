//! Weighted least-squares scale searches shared by the GGML block formats.
//!
//! The idea is the one behind ggml's `make_qx_quants` / `make_qkx2_quants` / the IQ4_NL search in
//! ggml-quants.c (read for reference, not copied): try a few candidate scales around the
//! round-to-nearest one, round the weights to the grid for each, and keep the candidate whose
//! least-squares-refitted scale (and min) gives the lowest importance-weighted squared error.
//! Every searcher here returns exact floats; the formats then round them to their storage
//! precision and re-round the weights, comparing against the plain round-to-nearest choice so the
//! result is never worse than it under the same weights.

/// Lanes of the accumulators below: every reduction runs as `L` independent partial sums added
/// in a fixed order at the end, so the compiler can vectorize it and every SIMD level (and the
/// scalar reference) computes the same floats.
const L: usize = 8;

/// Unit importances, for blocks quantized without an importance matrix.
static ONES: [f32; 256] = [1.0; 256];

/// `sqrt(sigma^2 + x^2)` per weight, sigma^2 the block's mean square (len of x <= 32): the
/// weighting IQ4_NL uses without an imatrix. On SmolLM2-135M (llama-perplexity KL vs FP32,
/// 20x512 WikiText-2 test tokens) it lowered IQ4_NL from 0.1733 to 0.1590 against unit weights
/// (Q4_0 0.2742 -> 0.2706, but round-to-nearest gave 0.2641 there; Q5_0 0.0744 -> 0.0750, so
/// Q5_0 keeps unit weights).
#[inline(always)]
pub fn magnitude_weights(x: &[f32], out: &mut [f32; 32]) {
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (sigma2 + v * v).sqrt();
    }
}

#[inline(always)]
fn weights(w: Option<&[f32]>, n: usize) -> &[f32] {
    match w {
        Some(w) => w,
        None => &ONES[..n],
    }
}

#[inline(always)]
fn hsum(a: [f32; L]) -> f32 {
    a.iter().fold(0f32, |s, v| s + v)
}

/// Round half away from zero (C `roundf`, gguf-py's `np_roundf`), as an integer. Branch-free so it
/// vectorizes: truncate, then step by one when the (exact) fraction reaches one half. Exact for
/// |x| < 1e9; larger magnitudes saturate at +-1e9 (callers clamp to their small grids anyway).
#[inline(always)]
pub fn round_i(x: f32) -> i32 {
    let x = x.clamp(-1.0e9, 1.0e9);
    let t = x as i32;
    let f = x - t as f32;
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

/// Largest magnitude of a slice whose length is a multiple of 8.
#[inline(always)]
pub fn absmax(x: &[f32]) -> f32 {
    let mut m = [0f32; L];
    for c in x.chunks_exact(L) {
        for i in 0..L {
            let a = c[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
        }
    }
    m.iter().fold(0f32, |a, v| if *v > a { *v } else { a })
}

/// (min, max) of a slice whose length is a multiple of 8.
#[inline(always)]
pub fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; L], [f32::NEG_INFINITY; L]);
    for c in x.chunks_exact(L) {
        for i in 0..L {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    (lo.iter().fold(f32::INFINITY, |a, v| a.min(*v)), hi.iter().fold(f32::NEG_INFINITY, |a, v| a.max(*v)))
}

/// The element of largest magnitude, with its sign (the first one on ties, like numpy's argmax).
#[inline(always)]
pub fn signed_absmax(x: &[f32]) -> f32 {
    let amax = absmax_any(x);
    // first index with |x| == amax, via a bit mask per 32 elements (compare + movemask, no
    // data-dependent branch per element)
    for (c, chunk) in x.chunks(32).enumerate() {
        let mut mask = 0u32;
        for (i, v) in chunk.iter().enumerate() {
            mask |= ((v.abs() == amax) as u32) << i;
        }
        if mask != 0 {
            return x[32 * c + mask.trailing_zeros() as usize];
        }
    }
    0.0
}

/// `absmax` for any length (the lane-wise version wants multiples of 8).
#[inline(always)]
fn absmax_any(x: &[f32]) -> f32 {
    if x.len().is_multiple_of(L) {
        absmax(x)
    } else {
        x.iter().fold(0f32, |a, v| if v.abs() > a { v.abs() } else { a })
    }
}

/// Best `d` for `x ≈ d * q`, `q` an integer in `[qmin, qmax]`. The candidates map the largest-
/// magnitude element `m` to `qmin + 0.1 t` (the longer, negative end) and to `qmax + 0.1 t`,
/// for `t` in `-ntry..=ntry`; each is scored by the weighted least-squares fit of its rounding.
#[inline(always)]
pub fn search_sym(x: &[f32], w: Option<&[f32]>, qmin: i32, qmax: i32, ntry: i32) -> f32 {
    let m = signed_absmax(x);
    if m == 0.0 {
        return 0.0;
    }
    let w = weights(w, x.len());
    let (mut best_score, mut best_d) = (-1f32, 0f32);
    for end in [-(qmin as f32), -(qmax as f32)] {
        for t in -ntry..=ntry {
            let iscale = -(end + 0.1 * t as f32) / m;
            let (mut alx, mut al2) = ([0f32; L], [0f32; L]);
            for (xc, wc) in x.chunks_exact(L).zip(w.chunks_exact(L)) {
                for i in 0..L {
                    let l = round_i(iscale * xc[i]).clamp(qmin, qmax) as f32;
                    alx[i] += wc[i] * xc[i] * l;
                    al2[i] += wc[i] * l * l;
                }
            }
            let (sumlx, suml2) = (hsum(alx), hsum(al2));
            if suml2 > 0.0 {
                let score = sumlx * sumlx / suml2;
                if score > best_score {
                    best_score = score;
                    best_d = sumlx / suml2;
                }
            }
        }
    }
    best_d
}

/// Round `x / d` to the grid `[qmin, qmax]` (zeros when `d == 0`).
#[inline(always)]
pub fn levels_sym(x: &[f32], d: f32, qmin: i32, qmax: i32, out: &mut [i32]) {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in out.iter_mut().zip(x) {
        *o = round_i(v * id).clamp(qmin, qmax);
    }
}

/// Weighted squared error of `d * round(x / d)` on the grid.
#[inline(always)]
pub fn error_sym(x: &[f32], w: Option<&[f32]>, d: f32, qmin: i32, qmax: i32) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let w = weights(w, x.len());
    let mut e = [0f32; L];
    for (xc, wc) in x.chunks_exact(L).zip(w.chunks_exact(L)) {
        for i in 0..L {
            let l = round_i(xc[i] * id).clamp(qmin, qmax) as f32;
            let diff = d * l - xc[i];
            e[i] += wc[i] * diff * diff;
        }
    }
    hsum(e)
}

/// Of the candidate stored scales, the one with the lowest weighted error (first on ties).
#[inline(always)]
pub fn pick_sym(x: &[f32], w: Option<&[f32]>, cands: &[f32], qmin: i32, qmax: i32) -> f32 {
    let mut best = cands[0];
    let mut best_e = f32::INFINITY;
    for &d in cands {
        if !d.is_finite() {
            continue;
        }
        let e = error_sym(x, w, d, qmin, qmax);
        if e < best_e {
            best_e = e;
            best = d;
        }
    }
    best
}

/// Best `(d, mn)` for `x ≈ d * q + mn`, `q` in `[0, nmax]`. With `min_le_zero` the offset is kept
/// `<= 0` (K-quants store `-mn` as an unsigned min). Candidates stretch the range by
/// `(nmax + 0.1 t) / (max - min)`; each rounding gets a weighted 2x2 least-squares refit.
#[inline(always)]
pub fn search_affine(x: &[f32], w: Option<&[f32]>, nmax: i32, ntry: i32, min_le_zero: bool) -> (f32, f32) {
    let (mut lo, hi) = min_max(x);
    if min_le_zero && lo > 0.0 {
        lo = 0.0;
    }
    if hi <= lo {
        return (0.0, lo);
    }
    let w = weights(w, x.len());
    let (mut aw, mut ax, mut ax2) = ([0f32; L], [0f32; L], [0f32; L]);
    for (xc, wc) in x.chunks_exact(L).zip(w.chunks_exact(L)) {
        for i in 0..L {
            aw[i] += wc[i];
            ax[i] += wc[i] * xc[i];
            ax2[i] += wc[i] * xc[i] * xc[i];
        }
    }
    let (sw, sx, sx2) = (hsum(aw), hsum(ax), hsum(ax2));
    let mut best = ((hi - lo) / nmax as f32, lo);
    let mut best_e = f32::INFINITY;
    for t in -ntry..=ntry {
        let iscale = (nmax as f32 + 0.1 * t as f32) / (hi - lo);
        let (mut al, mut al2, mut alx) = ([0f32; L], [0f32; L], [0f32; L]);
        for (xc, wc) in x.chunks_exact(L).zip(w.chunks_exact(L)) {
            for i in 0..L {
                let l = round_i(iscale * (xc[i] - lo)).clamp(0, nmax) as f32;
                al[i] += wc[i] * l;
                al2[i] += wc[i] * l * l;
                alx[i] += wc[i] * l * xc[i];
            }
        }
        let (sl, sl2, slx) = (hsum(al), hsum(al2), hsum(alx));
        let det = sw * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut d = (sw * slx - sl * sx) / det;
        let mut mn = (sl2 * sx - sl * slx) / det;
        if min_le_zero && mn > 0.0 {
            mn = 0.0;
            d = slx / sl2;
        }
        // sum w (d l + mn - x)^2 expanded in the sums
        let e = d * d * sl2 + 2.0 * d * mn * sl + mn * mn * sw - 2.0 * d * slx - 2.0 * mn * sx + sx2;
        if e < best_e && d.is_finite() && mn.is_finite() {
            best_e = e;
            best = (d, mn);
        }
    }
    best
}

/// Weighted squared error of `d * clamp(round((x - mn) / d), 0, nmax) + mn`.
#[inline(always)]
pub fn error_affine(x: &[f32], w: Option<&[f32]>, d: f32, mn: f32, nmax: i32) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let w = weights(w, x.len());
    let mut e = [0f32; L];
    for (xc, wc) in x.chunks_exact(L).zip(w.chunks_exact(L)) {
        for i in 0..L {
            let l = round_i((xc[i] - mn) * id).clamp(0, nmax) as f32;
            let diff = d * l + mn - xc[i];
            e[i] += wc[i] * diff * diff;
        }
    }
    hsum(e)
}

#[inline(always)]
pub fn levels_affine(x: &[f32], d: f32, mn: f32, nmax: i32, out: &mut [i32]) {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in out.iter_mut().zip(x) {
        *o = round_i((v - mn) * id).clamp(0, nmax);
    }
}

/// Of the candidate stored `(d, mn)` pairs, the one with the lowest weighted error.
#[inline(always)]
pub fn pick_affine(x: &[f32], w: Option<&[f32]>, cands: &[(f32, f32)], nmax: i32) -> (f32, f32) {
    let mut best = cands[0];
    let mut best_e = f32::INFINITY;
    for &(d, mn) in cands {
        if !(d.is_finite() && mn.is_finite()) {
            continue;
        }
        let e = error_affine(x, w, d, mn, nmax);
        if e < best_e {
            best_e = e;
            best = (d, mn);
        }
    }
    best
}

/// Optimal ternary scale for `x ≈ d * t`, `t` in {-1, 0, 1}: for a given `d` the non-zero set is
/// `{|x| > d/2}`, a top-k set by magnitude, so scanning k over the sorted magnitudes and taking
/// the weighted least-squares `d` of each finds the exact optimum.
#[inline(always)]
pub fn search_ternary(x: &[f32], w: Option<&[f32]>) -> f32 {
    let mut idx: [u16; 256] = [0; 256];
    let n = x.len().min(256);
    for (i, o) in idx.iter_mut().enumerate().take(n) {
        *o = i as u16;
    }
    let idx = &mut idx[..n];
    idx.sort_unstable_by(|a, b| x[*b as usize].abs().total_cmp(&x[*a as usize].abs()));
    let w = weights(w, n);
    let (mut sax, mut sw) = (0f32, 0f32);
    let (mut best_score, mut best_d) = (0f32, 0f32);
    for &i in idx.iter() {
        let i = i as usize;
        let ww = w[i];
        sax += ww * x[i].abs();
        sw += ww;
        if sw > 0.0 {
            let score = sax * sax / sw;
            if score > best_score {
                best_score = score;
                best_d = sax / sw;
            }
        }
    }
    best_d
}

/// Index of the nearest entry of an ascending codebook (the lower one on ties).
#[inline(always)]
pub fn nearest_in(values: &[f32; 16], v: f32) -> usize {
    // branch-light binary search over the 15 midpoints
    let mut lo = 0usize;
    let mut step = 8usize;
    while step > 0 {
        let mid = lo + step;
        if mid < 16 && v > 0.5 * (values[mid - 1] + values[mid]) {
            lo = mid;
        }
        step /= 2;
    }
    lo
}

/// Best `d` for `x ≈ d * values[q]` with a non-uniform ascending codebook (IQ4_NL): candidates
/// map the largest-magnitude element to `values[0] + t` for `t` in `-ntry..=ntry`.
#[inline(always)]
pub fn search_codebook(x: &[f32], w: Option<&[f32]>, values: &[f32; 16], ntry: i32) -> f32 {
    let m = signed_absmax(x);
    if m == 0.0 {
        return 0.0;
    }
    let w = weights(w, x.len());
    let (mut best_score, mut best_d) = (-1f32, 0f32);
    // the candidates map the block's extreme weight near the codebook's longest end (values[0]),
    // plus one that maps it to the other, shorter end (the codebook is asymmetric: which side
    // the extreme goes to changes every other weight's rounding)
    let ids = std::iter::once(-values[0] / m).chain((-ntry..=ntry).map(|t| (values[0] + t as f32) / m));
    for id in ids {
        let (mut sqx, mut sq2) = (0f32, 0f32);
        for (i, v) in x.iter().enumerate() {
            let q = values[nearest_in(values, id * v)];
            let ww = w[i];
            sqx += ww * q * v;
            sq2 += ww * q * q;
        }
        if sq2 > 0.0 {
            let score = sqx * sqx / sq2;
            if score > best_score {
                best_score = score;
                best_d = sqx / sq2;
            }
        }
    }
    best_d
}

/// Weighted error of `d * values[nearest(x / d)]`.
#[inline(always)]
pub fn error_codebook(x: &[f32], w: Option<&[f32]>, values: &[f32; 16], d: f32) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let w = weights(w, x.len());
    let mut e = 0f32;
    for (i, v) in x.iter().enumerate() {
        let diff = d * values[nearest_in(values, v * id)] - v;
        e += w[i] * diff * diff;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_in_matches_linear_scan() {
        let vals: [f32; 16] =
            [-127., -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.];
        for k in -1400..1400 {
            let v = k as f32 * 0.1;
            let lin = (0..16).min_by(|a, b| (vals[*a] - v).abs().total_cmp(&(vals[*b] - v).abs())).unwrap();
            let got = nearest_in(&vals, v);
            assert!((vals[got] - v).abs() == (vals[lin] - v).abs(), "{v}: {got} vs {lin}");
        }
    }

    #[test]
    fn round_i_is_roundf() {
        for k in -100000..100000 {
            let x = k as f32 * 0.00125 + (k % 7) as f32 * 1e-7;
            assert_eq!(round_i(x), x.round() as i32, "{x}");
        }
        for x in [0.5f32, -0.5, 1.5, -2.5, 0.49999997, -0.49999997, 8388607.5, 0.0, -0.0, 9.9e8, -9.9e8] {
            assert_eq!(round_i(x), x.round() as i32, "{x}");
        }
        assert_eq!(round_i(1e10), 1_000_000_000);
        assert_eq!(round_i(-1e30), -1_000_000_000);
        assert_eq!(round_i(f32::NAN), 0);
    }

    #[test]
    fn ternary_search_beats_absmax() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let d = search_ternary(&x, None);
        let err = |d: f32| {
            x.iter()
                .map(|v| {
                    let t = (v / d).round().clamp(-1.0, 1.0);
                    (d * t - v).powi(2)
                })
                .sum::<f32>()
        };
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(err(d) <= err(amax));
    }

    #[test]
    fn sym_search_is_no_worse_than_rtn() {
        let x: Vec<f32> = (0..32).map(|i| ((i * 13 % 29) as f32 - 14.0).powi(3) / 100.0).collect();
        let m = signed_absmax(&x);
        let d = search_sym(&x, None, -8, 7, 9);
        assert!(error_sym(&x, None, d, -8, 7) <= error_sym(&x, None, m / -8.0, -8, 7));
    }
}
