//! Weighted least-squares scale searches shared by the GGML block formats.
//!
//! The idea is the one behind ggml's `make_qx_quants` / `make_qkx2_quants` / the IQ4_NL search in
//! ggml-quants.c (read for reference, not copied): try a few candidate scales around the
//! round-to-nearest one, round the weights to the grid for each, and keep the candidate whose
//! least-squares-refitted scale (and min) gives the lowest importance-weighted squared error.
//! Every searcher here returns exact floats; the formats then round them to their storage
//! precision and re-round the weights, comparing against the plain round-to-nearest choice so the
//! result is never worse than it under the same weights.

/// Round half away from zero (C `roundf`, numpy-free `np_roundf` in gguf-py).
#[inline(always)]
pub fn round_i(x: f32) -> i32 {
    x.round() as i32
}

#[inline(always)]
fn wt(w: Option<&[f32]>, i: usize) -> f32 {
    match w {
        Some(w) => w[i],
        None => 1.0,
    }
}

/// The element of largest magnitude, with its sign (the first one on ties).
#[inline(always)]
pub fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = 0f32;
    let mut amax = 0f32;
    for v in x {
        if v.abs() > amax {
            amax = v.abs();
            best = *v;
        }
    }
    best
}

/// Best `d` for `x ≈ d * q`, `q` an integer in `[qmin, qmax]`. The candidates map the largest-
/// magnitude element `m` to `qmin + 0.1 t` (the longer, negative end) and to `qmax + 0.1 t`,
/// for `t` in `-ntry..=ntry`; each is scored by the weighted least-squares fit of its rounding.
pub fn search_sym(x: &[f32], w: Option<&[f32]>, qmin: i32, qmax: i32, ntry: i32) -> f32 {
    let m = signed_absmax(x);
    if m == 0.0 {
        return 0.0;
    }
    let (mut best_score, mut best_d) = (-1f32, 0f32);
    for end in [-(qmin as f32), -(qmax as f32)] {
        for t in -ntry..=ntry {
            let iscale = -(end + 0.1 * t as f32) / m;
            let (mut sumlx, mut suml2) = (0f32, 0f32);
            for (i, v) in x.iter().enumerate() {
                let l = round_i(iscale * v).clamp(qmin, qmax) as f32;
                let ww = wt(w, i);
                sumlx += ww * v * l;
                suml2 += ww * l * l;
            }
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
    let mut e = 0f32;
    for (i, v) in x.iter().enumerate() {
        let l = round_i(v * id).clamp(qmin, qmax) as f32;
        let diff = d * l - v;
        e += wt(w, i) * diff * diff;
    }
    e
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
pub fn search_affine(x: &[f32], w: Option<&[f32]>, nmax: i32, ntry: i32, min_le_zero: bool) -> (f32, f32) {
    let mut lo = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if min_le_zero && lo > 0.0 {
        lo = 0.0;
    }
    if hi <= lo {
        return (0.0, lo);
    }
    let (mut sw, mut sx, mut sx2) = (0f32, 0f32, 0f32);
    for (i, v) in x.iter().enumerate() {
        let ww = wt(w, i);
        sw += ww;
        sx += ww * v;
        sx2 += ww * v * v;
    }
    let mut best = ((hi - lo) / nmax as f32, lo);
    let mut best_e = f32::INFINITY;
    for t in -ntry..=ntry {
        let iscale = (nmax as f32 + 0.1 * t as f32) / (hi - lo);
        let (mut sl, mut sl2, mut slx) = (0f32, 0f32, 0f32);
        for (i, v) in x.iter().enumerate() {
            let l = round_i(iscale * (v - lo)).clamp(0, nmax) as f32;
            let ww = wt(w, i);
            sl += ww * l;
            sl2 += ww * l * l;
            slx += ww * l * v;
        }
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
    let mut e = 0f32;
    for (i, v) in x.iter().enumerate() {
        let l = round_i((v - mn) * id).clamp(0, nmax) as f32;
        let diff = d * l + mn - v;
        e += wt(w, i) * diff * diff;
    }
    e
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
pub fn search_ternary(x: &[f32], w: Option<&[f32]>) -> f32 {
    let mut idx: [u16; 256] = [0; 256];
    let n = x.len().min(256);
    for (i, o) in idx.iter_mut().enumerate().take(n) {
        *o = i as u16;
    }
    let idx = &mut idx[..n];
    idx.sort_unstable_by(|a, b| x[*b as usize].abs().total_cmp(&x[*a as usize].abs()));
    let (mut sax, mut sw) = (0f32, 0f32);
    let (mut best_score, mut best_d) = (0f32, 0f32);
    for &i in idx.iter() {
        let i = i as usize;
        let ww = wt(w, i);
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
pub fn search_codebook(x: &[f32], w: Option<&[f32]>, values: &[f32; 16], ntry: i32) -> f32 {
    let m = signed_absmax(x);
    if m == 0.0 {
        return 0.0;
    }
    let (mut best_score, mut best_d) = (-1f32, 0f32);
    for t in -ntry..=ntry {
        let id = (values[0] + t as f32) / m;
        let (mut sqx, mut sq2) = (0f32, 0f32);
        for (i, v) in x.iter().enumerate() {
            let q = values[nearest_in(values, id * v)];
            let ww = wt(w, i);
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
    let mut e = 0f32;
    for (i, v) in x.iter().enumerate() {
        let diff = d * values[nearest_in(values, v * id)] - v;
        e += wt(w, i) * diff * diff;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_in_matches_linear_scan() {
        let vals: [f32; 16] = [-127., -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.];
        for k in -1400..1400 {
            let v = k as f32 * 0.1;
            let lin = (0..16).min_by(|a, b| (vals[*a] - v).abs().total_cmp(&(vals[*b] - v).abs())).unwrap();
            let got = nearest_in(&vals, v);
            assert!((vals[got] - v).abs() == (vals[lin] - v).abs(), "{v}: {got} vs {lin}");
        }
    }

    #[test]
    fn ternary_search_beats_absmax() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let d = search_ternary(&x, None);
        let err = |d: f32| x.iter().map(|v| { let t = (v / d).round().clamp(-1.0, 1.0); (d * t - v).powi(2) }).sum::<f32>();
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
