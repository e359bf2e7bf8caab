//! The lattice-codebook GGML formats: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and IQ1_M.
//!
//! Each stores groups of 8 (IQ2, IQ1) or 4 (IQ3) weights as the index of a point of a fixed
//! codebook (`iq_grids`), a sign pattern (IQ2/IQ3) or a shift of +-1/8 (IQ1), and a small scale
//! per 16 or 32 weights under one f16 super-block scale. Layouts are those of `block_iq*` in
//! ggml-common.h (llama.cpp, MIT) and decode like gguf-py's `dequantize_blocks` (tested byte for
//! byte in tests/gguf_container/test_iq_formats.py):
//!
//! | type    | bytes/256 | codebook            | signs           | sub-block scale            |
//! |---------|-----------|---------------------|-----------------|----------------------------|
//! | IQ2_XXS | 66        | 256 x 8, 3 levels   | 7 bits per 8    | 4 bits / 32: d(ls+1/2)/4    |
//! | IQ2_XS  | 74        | 512 x 8             | 7 bits per 8    | 4 bits / 16: d(ls+1/2)/4    |
//! | IQ2_S   | 82        | 1024 x 8            | 8 bits per 8    | 4 bits / 16: d(ls+1/2)/4    |
//! | IQ3_XXS | 98        | 256 x 4, 8 levels   | 7 bits per 8    | 4 bits / 32: d(ls+1/2)/2    |
//! | IQ3_S   | 110       | 512 x 4             | 8 bits per 8    | 4 bits / 32: d(2ls+1)       |
//! | IQ1_S   | 50        | 2048 x 8, {-1,0,1}  | shift +-1/8 /32 | 3 bits / 32: d(2ls+1)       |
//! | IQ1_M   | 56        | 2048 x 8            | shift +-1/8 / 8 | 3 bits / 16: d(2ls+1)       |
//!
//! "7 bits per 8": the eighth sign is the parity of the other seven (`ksigns_iq2xs`), so a group
//! always has an even number of negative weights.
//!
//! The quantizer is ours (the idea of lattice rounding plus a neighbour search is the one of
//! ggml-quants.c, read for reference, not copied). Per group the weights, divided by a trial
//! scale, are rounded coordinate by coordinate to the nearest level: when that lattice point is in
//! the codebook it is the weighted optimum; when not, the codebook points in the nearest distance
//! shells around it (precomputed once per codebook) are scored by the importance-weighted error.
//! Each sub-block tries a geometric range of scales, refits each by least squares and keeps the
//! best; the super-block scale then comes from the largest sub-block scale, and every sub-block
//! picks the better of the two nearest storable scales, re-rounding its groups under it.
//!
//! Weights: `imp * sqrt(sigma^2 + x^2)` (sigma^2 the mean square of the super-block), or without
//! an importance matrix `sqrt(sigma^2 + x^2)` alone: llama.cpp refuses IQ1/IQ2 without an imatrix;
//! here the magnitude weighting still gives a usable model (the Python layer says so).

// index loops mirror the byte layouts of ggml-common.h, which read more plainly than iterator chains
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use super::block::{block_mut, block_ref, f16_bits, f16_round, f16_val, BlockFormat, ByteBlock, GgmlType, QK_K};
use super::iq_grids::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};

const IQ2_LEVELS: [f32; 3] = [8.0, 25.0, 43.0];
const IQ3XXS_LEVELS: [f32; 8] = [4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0];
const IQ3S_LEVELS: [f32; 8] = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0];
const IQ1_LEVELS: [f32; 3] = [-1.0, 0.0, 1.0];
/// IQ1's shift of every weight of a group (`IQ1S_DELTA` in ggml-common.h).
pub const IQ1_DELTA: f32 = 0.125;

/// `ksigns_iq2xs[i]`: the 7 stored sign bits `i` plus their parity as bit 7.
#[inline(always)]
pub fn ksigns(i: u32) -> u8 {
    let i = i & 0x7F;
    (i | ((i.count_ones() & 1) << 7)) as u8
}

/// A codebook with its lattice lookup: `map[code]` is the codebook index of a lattice point
/// (levels packed `bits` per coordinate, as in `iq_grids`) or `-(1 + k)` for an off-codebook point
/// whose candidate list is `nb[nb_off[k]..nb_off[k + 1]]`.
pub struct Lattice {
    dim: usize,
    bits: usize,
    levels: &'static [f32],
    /// Midpoints between consecutive levels.
    mids: [f32; 7],
    /// Level values of every codebook entry, `dim` per entry.
    vals: Vec<f32>,
    map: Vec<i32>,
    nb_off: Vec<u32>,
    nb: Vec<u16>,
}

impl Lattice {
    fn build(codes: &[u16], bits: usize, dim: usize, levels: &'static [f32], shells: usize) -> Lattice {
        let mask = (1usize << bits) - 1;
        let n = codes.len();
        let mut vals = vec![0f32; n * dim];
        for (i, c) in codes.iter().enumerate() {
            for j in 0..dim {
                vals[i * dim + j] = levels[(*c as usize >> (bits * j)) & mask];
            }
        }
        let mut mids = [f32::INFINITY; 7];
        for k in 0..levels.len() - 1 {
            mids[k] = 0.5 * (levels[k] + levels[k + 1]);
        }
        let size = 1usize << (bits * dim);
        let mut map = vec![i32::MIN; size];
        for (i, c) in codes.iter().enumerate() {
            map[*c as usize] = i as i32;
        }
        let (mut nb_off, mut nb) = (vec![0u32], Vec::new());
        let mut dist = vec![0f32; n];
        let mut p = [0f32; 8];
        for code in 0..size {
            if map[code] >= 0 || (0..dim).any(|j| (code >> (bits * j)) & mask >= levels.len()) {
                continue;
            }
            for (j, pj) in p.iter_mut().enumerate().take(dim) {
                *pj = levels[(code >> (bits * j)) & mask];
            }
            for (i, d) in dist.iter_mut().enumerate() {
                *d = (0..dim).map(|j| (p[j] - vals[i * dim + j]).powi(2)).sum();
            }
            // the `shells` smallest distinct distances
            let mut lim = f32::NEG_INFINITY;
            for _ in 0..shells {
                let next = dist.iter().copied().filter(|d| *d > lim).fold(f32::INFINITY, f32::min);
                if next.is_finite() {
                    lim = next;
                }
            }
            map[code] = -(nb_off.len() as i32);
            nb.extend((0..n).filter(|i| dist[*i] <= lim).map(|i| i as u16));
            nb_off.push(nb.len() as u32);
        }
        Lattice { dim, bits, levels, mids, vals, map, nb_off, nb }
    }

    /// The codebook entry closest to `y` (level units) under weights `w` (exact when the
    /// coordinate-wise rounding of `y` is in the codebook, else the best of its neighbours).
    #[inline(always)]
    pub fn best(&self, y: &[f32], w: &[f32]) -> usize {
        let nm = self.levels.len() - 1;
        let mut code = 0usize;
        for j in 0..self.dim {
            let mut k = 0usize;
            for m in &self.mids[..nm] {
                k += (y[j] > *m) as usize;
            }
            code |= k << (self.bits * j);
        }
        let m = self.map[code];
        if m >= 0 {
            return m as usize;
        }
        let k = (-m - 1) as usize;
        let list = &self.nb[self.nb_off[k] as usize..self.nb_off[k + 1] as usize];
        let (mut best, mut best_err) = (list[0] as usize, f32::INFINITY);
        for &i in list {
            let v = &self.vals[i as usize * self.dim..(i as usize + 1) * self.dim];
            let mut e = 0f32;
            for j in 0..self.dim {
                let t = y[j] - v[j];
                e += w[j] * t * t;
            }
            if e < best_err {
                best_err = e;
                best = i as usize;
            }
        }
        best
    }

    #[inline(always)]
    pub fn entry(&self, i: usize) -> &[f32] {
        &self.vals[i * self.dim..(i + 1) * self.dim]
    }

    pub fn len(&self) -> usize {
        self.vals.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }
}

macro_rules! lattice {
    ($f:ident, $codes:expr, $bits:expr, $dim:expr, $levels:expr, $shells:expr) => {
        pub fn $f() -> &'static Lattice {
            static L: OnceLock<Lattice> = OnceLock::new();
            L.get_or_init(|| Lattice::build(&$codes, $bits, $dim, &$levels, $shells))
        }
    };
}
// Shells searched around an off-codebook lattice point: 3, except where the lists grow long
// (IQ2_S: mean 17.6 / max 378 entries at 3 shells; IQ1: 72.6 / 205) and 2 shells cost < 0.3% of
// weighted error for 2.5-4x less time (benchmarks/iq_vs_ggml.py).
lattice!(iq2xxs, IQ2XXS_GRID, 2, 8, IQ2_LEVELS, 3);
lattice!(iq2xs, IQ2XS_GRID, 2, 8, IQ2_LEVELS, 3);
lattice!(iq2s, IQ2S_GRID, 2, 8, IQ2_LEVELS, 2);
lattice!(iq3xxs, IQ3XXS_GRID, 3, 4, IQ3XXS_LEVELS, 3);
lattice!(iq3s, IQ3S_GRID, 3, 4, IQ3S_LEVELS, 3);
lattice!(iq1s, IQ1S_GRID, 2, 8, IQ1_LEVELS, 2);

/// Which IQ1 shifts a group may use.
#[derive(Clone, Copy, PartialEq)]
enum Delta {
    /// No shift (IQ2/IQ3).
    None,
    /// One fixed shift for the whole call.
    Fixed(f32),
    /// The better of +-1/8 per group (IQ1_M).
    PerGroup,
    /// The better of +-1/8 per sub-block (IQ1_S; resolved to `Fixed` before `assign`).
    PerSub,
}

/// The result of rounding a sub-block's groups at one scale.
#[derive(Clone, Copy)]
struct Assign {
    sumqx: f32,
    sumq2: f32,
}

/// Round each group of `xp` (sign-adjusted weights) at scale `s`: codebook index into `idx`,
/// the chosen shift's sign into `neg` (IQ1: true = -1/8); returns the least-squares sums.
#[inline(always)]
fn assign(lat: &Lattice, xp: &[f32], w: &[f32], s: f32, delta: Delta, idx: &mut [u16], neg: &mut [bool]) -> Assign {
    let dim = lat.dim;
    let is = 1.0 / s;
    let mut y = [0f32; 8];
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for (g, (xg, wg)) in xp.chunks_exact(dim).zip(w.chunks_exact(dim)).enumerate() {
        let opts: &[f32] = match delta {
            Delta::None => &[0.0],
            Delta::Fixed(d) => {
                if d > 0.0 {
                    &[IQ1_DELTA]
                } else {
                    &[-IQ1_DELTA]
                }
            }
            Delta::PerGroup | Delta::PerSub => &[IQ1_DELTA, -IQ1_DELTA],
        };
        let (mut bi, mut bd, mut be) = (0usize, 0f32, f32::INFINITY);
        for &d in opts {
            for j in 0..dim {
                y[j] = xg[j] * is - d;
            }
            let i = lat.best(&y[..dim], wg);
            let v = lat.entry(i);
            let mut e = 0f32;
            for j in 0..dim {
                let t = y[j] - v[j];
                e += wg[j] * t * t;
            }
            if e < be {
                (bi, bd, be) = (i, d, e);
            }
        }
        idx[g] = bi as u16;
        neg[g] = bd < 0.0;
        let v = lat.entry(bi);
        for j in 0..dim {
            let q = v[j] + bd;
            sumqx += wg[j] * xg[j] * q;
            sumq2 += wg[j] * q * q;
        }
    }
    Assign { sumqx, sumq2 }
}

/// Trial scales per sub-block, as multiples of `absmax / top level` (geometric, 0.5x .. 2.5x).
const NTRIAL: usize = 24;
fn trial_factors() -> &'static [f32; NTRIAL] {
    static F: OnceLock<[f32; NTRIAL]> = OnceLock::new();
    F.get_or_init(|| {
        let mut f = [0f32; NTRIAL];
        for (t, v) in f.iter_mut().enumerate() {
            *v = 0.5 * 5f32.powf(t as f32 / (NTRIAL - 1) as f32);
        }
        f
    })
}

/// The best least-squares scale of one sub-block (0 for an all-zero one).
fn search_scale(lat: &Lattice, xp: &[f32], w: &[f32], delta: Delta) -> f32 {
    let amax = xp.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return 0.0;
    }
    let top = lat.levels[lat.levels.len() - 1] + if delta == Delta::None { 0.0 } else { IQ1_DELTA };
    let ng = xp.len() / lat.dim;
    let (mut idx, mut neg) = ([0u16; 32], [false; 32]);
    let (mut best_s, mut best_score) = (amax / top, -1f32);
    let mut consider = |s: f32, best_s: &mut f32, best_score: &mut f32| {
        let a = assign(lat, xp, w, s, delta, &mut idx[..ng], &mut neg[..ng]);
        if a.sumq2 > 0.0 && a.sumqx > 0.0 {
            let score = a.sumqx * a.sumqx / a.sumq2;
            if score > *best_score {
                *best_score = score;
                *best_s = a.sumqx / a.sumq2;
            }
        }
    };
    for f in trial_factors() {
        consider(amax / (top * f), &mut best_s, &mut best_score);
    }
    // one refinement: re-round at the refitted scale
    let s = best_s;
    consider(s, &mut best_s, &mut best_score);
    best_s
}

/// Weighted squared error of a sub-block at scale `s` from its least-squares sums.
#[inline(always)]
fn err_at(sumx2: f32, a: Assign, s: f32) -> f32 {
    sumx2 - 2.0 * s * a.sumqx + s * s * a.sumq2
}

/// Per-weight importances of one super-block: `imp * sqrt(sigma^2 + x^2)`.
#[inline(always)]
fn block_weights(x: &[f32], imp: Option<&[f32]>, w: &mut [f32; QK_K]) {
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
    for j in 0..QK_K {
        let m = (sigma2 + x[j] * x[j]).sqrt();
        w[j] = match imp {
            Some(q) => q[j] * m,
            None => m,
        };
    }
}

/// Sign handling of the IQ2/IQ3 formats: `xp = |x|`, the sign bits of each 8 weights, and with
/// `parity` (7 stored bits) the least important weight of an odd group flipped (its target
/// becomes `-|x|`, so the rounding sends it to the smallest level).
#[inline(always)]
fn split_signs(x: &[f32], w: &[f32], parity: bool, xp: &mut [f32], signs: &mut [u8]) {
    for (k, s) in signs.iter_mut().enumerate() {
        let mut bits = 0u8;
        for j in 0..8 {
            let v = x[8 * k + j];
            xp[8 * k + j] = v.abs();
            bits |= ((v < 0.0) as u8) << j;
        }
        if parity && bits.count_ones() % 2 == 1 {
            let mut jmin = 0;
            let mut emin = f32::INFINITY;
            for j in 0..8 {
                let e = w[8 * k + j] * x[8 * k + j] * x[8 * k + j];
                if e < emin {
                    emin = e;
                    jmin = j;
                }
            }
            bits ^= 1 << jmin;
            xp[8 * k + jmin] = -xp[8 * k + jmin];
        }
        *s = bits;
    }
}

/// The IQ2/IQ3 quantizers' inputs: per-weight importances, sign-adjusted weights and sign bits
/// (`parity`: 7 stored bits per 8 weights).
#[inline(always)]
fn signed_inputs(x: &[f32], imp: Option<&[f32]>, parity: bool) -> ([f32; QK_K], [f32; QK_K], [u8; 32]) {
    let mut w = [0f32; QK_K];
    block_weights(x, imp, &mut w);
    let (mut xp, mut signs) = ([0f32; QK_K], [0u8; 32]);
    split_signs(x, &w, parity, &mut xp, &mut signs);
    (w, xp, signs)
}

/// IQ2 scale: `d * (0.5 + ls) * 0.25` (computed in that order, as gguf-py does).
#[inline(always)]
fn iq2_scale(d: f32, ls: i32) -> f32 {
    d * (0.5 + ls as f32) * 0.25
}

/// The shared quantizer: `x` one super-block, `sub` weights per scale, `stored(d, ls)` the
/// format's sub-block scale for codes `ls` in `0..=max_ls` (affine in `ls`, computed as the
/// decoder does), `delta` the IQ1 shift rule. Writes the codebook indices, shift signs and scale
/// codes; returns the f16 super-block scale.
#[allow(clippy::too_many_arguments)]
fn quantize_super(
    lat: &Lattice,
    xp: &[f32],
    w: &[f32],
    sub: usize,
    stored: impl Fn(f32, i32) -> f32,
    max_ls: i32,
    delta: Delta,
    idx: &mut [u16],
    neg: &mut [bool],
    ls_out: &mut [i32],
) -> f32 {
    let nsub = QK_K / sub;
    let gps = sub / lat.dim;
    let mut scales = [0f32; 16];
    let mut dsign = [0f32; 16];
    let mut sumx2 = [0f32; 16];
    for ib in 0..nsub {
        let (xs, ws) = (&xp[ib * sub..(ib + 1) * sub], &w[ib * sub..(ib + 1) * sub]);
        sumx2[ib] = xs.iter().zip(ws).map(|(x, w)| w * x * x).sum();
        if delta != Delta::PerSub {
            scales[ib] = search_scale(lat, xs, ws, delta);
        } else {
            // IQ1_S: one shift per sub-block, the better of the two signs
            let (mut bs, mut be, mut bd) = (0f32, f32::INFINITY, IQ1_DELTA);
            for d in [IQ1_DELTA, -IQ1_DELTA] {
                let s = search_scale(lat, xs, ws, Delta::Fixed(d));
                let (mut i2, mut n2) = ([0u16; 32], [false; 32]);
                let a = assign(lat, xs, ws, s.max(f32::MIN_POSITIVE), Delta::Fixed(d), &mut i2[..gps], &mut n2[..gps]);
                let e = err_at(sumx2[ib], a, s);
                if e < be {
                    (bs, be, bd) = (s, e, d);
                }
            }
            scales[ib] = bs;
            dsign[ib] = bd;
        }
    }
    let smax = scales[..nsub].iter().fold(0f32, |m, v| m.max(*v));
    let d = f16_round(smax / stored(1.0, max_ls));
    // stored(d, ls) = d * (a + b ls): a and b are exact for every format here (1/8 .. 2)
    let (a0, b0) = (stored(1.0, 0), stored(1.0, 1) - stored(1.0, 0));
    if d == 0.0 {
        idx.fill(0);
        neg.fill(false);
        ls_out.fill(0);
        return 0.0;
    }
    for ib in 0..nsub {
        let (xs, ws) = (&xp[ib * sub..(ib + 1) * sub], &w[ib * sub..(ib + 1) * sub]);
        let ideal = ((scales[ib] / d - a0) / b0).clamp(0.0, max_ls as f32);
        let lo = (ideal.floor() as i32).clamp(0, max_ls);
        let dl = if delta == Delta::PerSub { Delta::Fixed(dsign[ib]) } else { delta };
        let mut be = f32::INFINITY;
        let (mut ti, mut tn) = ([0u16; 32], [false; 32]);
        for ls in [lo, (lo + 1).min(max_ls)] {
            let s = stored(d, ls);
            let a = assign(lat, xs, ws, s, dl, &mut ti[..gps], &mut tn[..gps]);
            let e = err_at(sumx2[ib], a, s);
            if e < be {
                be = e;
                ls_out[ib] = ls;
                idx[ib * gps..(ib + 1) * gps].copy_from_slice(&ti[..gps]);
                neg[ib * gps..(ib + 1) * gps].copy_from_slice(&tn[..gps]);
            }
        }
    }
    d
}

macro_rules! byte_block {
    ($name:ident { $($field:ident : $n:expr),* }, $size:expr) => {
        #[repr(C)]
        pub struct $name {
            $(pub $field: [u8; $n]),*
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        // SAFETY: repr(C) struct of u8 arrays only.
        unsafe impl ByteBlock for $name {}
    };
}

byte_block!(BlockIQ2XXS { d: 2, qs: 64 }, 66);
byte_block!(BlockIQ2XS { d: 2, qs: 64, scales: 8 }, 74);
byte_block!(BlockIQ2S { d: 2, qs: 32, signs: 32, qh: 8, scales: 8 }, 82);
byte_block!(BlockIQ3XXS { d: 2, qs: 64, sas: 32 }, 98);
byte_block!(BlockIQ3S { d: 2, qs: 64, qh: 8, signs: 32, scales: 4 }, 110);
byte_block!(BlockIQ1S { d: 2, qs: 32, qh: 16 }, 50);
byte_block!(BlockIQ1M { qs: 32, qh: 16, scales: 8 }, 56);

/// Write `dl * level * sign` for one group of `dim` weights.
#[inline(always)]
fn put_signed<const D: usize>(lat: &Lattice, i: usize, dl: f32, signs: u8, out: &mut [f32]) {
    // fixed-size views: the compiler unrolls and vectorizes the D lanes
    let v: &[f32; D] = lat.vals[i * D..i * D + D].try_into().expect("codebook entry");
    let out: &mut [f32; D] = (&mut out[..D]).try_into().expect("group");
    for j in 0..D {
        // times -1 as a sign flip (the same float, -0.0 included), branch-free
        let flip = (((signs >> j) & 1) as u32) << 31;
        out[j] = f32::from_bits((dl * v[j]).to_bits() ^ flip);
    }
}

/// IQ3: two codebook entries of 4 under one scale and one sign byte, as 8 weights.
#[inline(always)]
fn put_pair_signed(lat: &Lattice, i0: usize, i1: usize, dl: f32, signs: u8, out: &mut [f32]) {
    let v0: &[f32; 4] = lat.vals[i0 * 4..i0 * 4 + 4].try_into().expect("codebook entry");
    let v1: &[f32; 4] = lat.vals[i1 * 4..i1 * 4 + 4].try_into().expect("codebook entry");
    let v = [v0[0], v0[1], v0[2], v0[3], v1[0], v1[1], v1[2], v1[3]];
    let out: &mut [f32; 8] = (&mut out[..8]).try_into().expect("group");
    for j in 0..8 {
        let flip = (((signs >> j) & 1) as u32) << 31;
        out[j] = f32::from_bits((dl * v[j]).to_bits() ^ flip);
    }
}

/// IQ1: write `dl * (level + delta)` for one group of 8.
#[inline(always)]
fn put_shifted(lat: &Lattice, i: usize, dl: f32, neg: bool, out: &mut [f32]) {
    let v: &[f32; 8] = lat.vals[i * 8..i * 8 + 8].try_into().expect("codebook entry");
    let out: &mut [f32; 8] = (&mut out[..8]).try_into().expect("group");
    let delta = if neg { -IQ1_DELTA } else { IQ1_DELTA };
    for j in 0..8 {
        out[j] = dl * (v[j] + delta);
    }
}

pub struct IQ2XXS;
impl BlockFormat for IQ2XXS {
    const TYPE: GgmlType = GgmlType::IQ2_XXS;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 66;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (w, xp, signs) = signed_inputs(x, imp, true);
        let (mut idx, mut neg, mut ls) = ([0u16; 32], [false; 32], [0i32; 8]);
        let d = quantize_super(iq2xxs(), &xp, &w, 32, iq2_scale, 15, Delta::None, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ2XXS = block_mut(out);
        b.d = f16_bits(d);
        for ib in 0..8 {
            let mut aux1 = (ls[ib] as u32) << 28;
            for k in 0..4 {
                b.qs[8 * ib + k] = idx[4 * ib + k] as u8;
                aux1 |= ((signs[4 * ib + k] & 0x7F) as u32) << (7 * k);
            }
            b.qs[8 * ib + 4..8 * ib + 8].copy_from_slice(&aux1.to_le_bytes());
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ2XXS = block_ref(bytes);
        let d = f16_val(b.d);
        let lat = iq2xxs();
        for ib in 0..8 {
            let q = &b.qs[8 * ib..8 * ib + 8];
            let aux1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
            let dl = iq2_scale(d, (aux1 >> 28) as i32);
            for k in 0..4 {
                let s = ksigns(aux1 >> (7 * k));
                put_signed::<8>(lat, q[k] as usize, dl, s, &mut out[32 * ib + 8 * k..32 * ib + 8 * k + 8]);
            }
        }
    }
}

pub struct IQ2XS;
impl BlockFormat for IQ2XS {
    const TYPE: GgmlType = GgmlType::IQ2_XS;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 74;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (w, xp, signs) = signed_inputs(x, imp, true);
        let (mut idx, mut neg, mut ls) = ([0u16; 32], [false; 32], [0i32; 16]);
        let d = quantize_super(iq2xs(), &xp, &w, 16, iq2_scale, 15, Delta::None, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ2XS = block_mut(out);
        b.d = f16_bits(d);
        for g in 0..32 {
            let v = idx[g] | (((signs[g] & 0x7F) as u16) << 9);
            b.qs[2 * g..2 * g + 2].copy_from_slice(&v.to_le_bytes());
        }
        for i in 0..8 {
            b.scales[i] = (ls[2 * i] as u8) | ((ls[2 * i + 1] as u8) << 4);
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ2XS = block_ref(bytes);
        let d = f16_val(b.d);
        let lat = iq2xs();
        for g in 0..32 {
            let v = u16::from_le_bytes([b.qs[2 * g], b.qs[2 * g + 1]]);
            let ls = (b.scales[g / 4] >> (4 * ((g / 2) % 2))) & 0x0F;
            let dl = iq2_scale(d, ls as i32);
            put_signed::<8>(lat, (v & 511) as usize, dl, ksigns((v >> 9) as u32), &mut out[8 * g..8 * g + 8]);
        }
    }
}

pub struct IQ2S;
impl BlockFormat for IQ2S {
    const TYPE: GgmlType = GgmlType::IQ2_S;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 82;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (w, xp, signs) = signed_inputs(x, imp, false);
        let (mut idx, mut neg, mut ls) = ([0u16; 32], [false; 32], [0i32; 16]);
        let d = quantize_super(iq2s(), &xp, &w, 16, iq2_scale, 15, Delta::None, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ2S = block_mut(out);
        b.d = f16_bits(d);
        b.qh = [0; 8];
        for g in 0..32 {
            b.qs[g] = idx[g] as u8;
            b.signs[g] = signs[g];
            b.qh[g / 4] |= ((idx[g] >> 8) as u8 & 3) << (2 * (g % 4));
        }
        for i in 0..8 {
            b.scales[i] = (ls[2 * i] as u8) | ((ls[2 * i + 1] as u8) << 4);
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ2S = block_ref(bytes);
        let d = f16_val(b.d);
        let lat = iq2s();
        for g in 0..32 {
            let i = b.qs[g] as usize | ((((b.qh[g / 4] >> (2 * (g % 4))) & 3) as usize) << 8);
            let ls = (b.scales[g / 4] >> (4 * ((g / 2) % 2))) & 0x0F;
            put_signed::<8>(lat, i, iq2_scale(d, ls as i32), b.signs[g], &mut out[8 * g..8 * g + 8]);
        }
    }
}

/// IQ3_XXS scale: `d * (0.5 + ls) * 0.5`.
#[inline(always)]
fn iq3xxs_scale(d: f32, ls: i32) -> f32 {
    d * (0.5 + ls as f32) * 0.5
}

/// IQ3_S / IQ1 scale: `d * (2 ls + 1)` (an integer factor, as in gguf-py).
#[inline(always)]
fn odd_scale(d: f32, ls: i32) -> f32 {
    d * (2 * ls + 1) as f32
}

pub struct IQ3XXS;
impl BlockFormat for IQ3XXS {
    const TYPE: GgmlType = GgmlType::IQ3_XXS;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 98;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (w, xp, signs) = signed_inputs(x, imp, true);
        let (mut idx, mut neg, mut ls) = ([0u16; 64], [false; 64], [0i32; 8]);
        let d = quantize_super(iq3xxs(), &xp, &w, 32, iq3xxs_scale, 15, Delta::None, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ3XXS = block_mut(out);
        b.d = f16_bits(d);
        for g in 0..64 {
            b.qs[g] = idx[g] as u8;
        }
        for ib in 0..8 {
            let mut v = (ls[ib] as u32) << 28;
            for k in 0..4 {
                v |= ((signs[4 * ib + k] & 0x7F) as u32) << (7 * k);
            }
            b.sas[4 * ib..4 * ib + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ3XXS = block_ref(bytes);
        let d = f16_val(b.d);
        let lat = iq3xxs();
        for ib in 0..8 {
            let v = u32::from_le_bytes([b.sas[4 * ib], b.sas[4 * ib + 1], b.sas[4 * ib + 2], b.sas[4 * ib + 3]]);
            let dl = iq3xxs_scale(d, (v >> 28) as i32);
            for k in 0..4 {
                let s = ksigns(v >> (7 * k));
                let o = 32 * ib + 8 * k;
                let (i0, i1) = (b.qs[8 * ib + 2 * k] as usize, b.qs[8 * ib + 2 * k + 1] as usize);
                put_pair_signed(lat, i0, i1, dl, s, &mut out[o..o + 8]);
            }
        }
    }
}

pub struct IQ3S;
impl BlockFormat for IQ3S {
    const TYPE: GgmlType = GgmlType::IQ3_S;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 110;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (w, xp, signs) = signed_inputs(x, imp, false);
        let (mut idx, mut neg, mut ls) = ([0u16; 64], [false; 64], [0i32; 8]);
        let d = quantize_super(iq3s(), &xp, &w, 32, odd_scale, 15, Delta::None, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ3S = block_mut(out);
        b.d = f16_bits(d);
        b.qh = [0; 8];
        for g in 0..64 {
            b.qs[g] = idx[g] as u8;
            b.qh[g / 8] |= ((idx[g] >> 8) as u8 & 1) << (g % 8);
        }
        b.signs = signs;
        for i in 0..4 {
            b.scales[i] = (ls[2 * i] as u8) | ((ls[2 * i + 1] as u8) << 4);
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ3S = block_ref(bytes);
        let d = f16_val(b.d);
        let lat = iq3s();
        for ib in 0..8 {
            let ls = (b.scales[ib / 2] >> (4 * (ib % 2))) & 0x0F;
            let dl = odd_scale(d, ls as i32);
            let qh = b.qh[ib];
            for k in 0..4 {
                let g = 8 * ib + 2 * k;
                let i0 = b.qs[g] as usize | ((((qh >> (2 * k)) & 1) as usize) << 8);
                let i1 = b.qs[g + 1] as usize | ((((qh >> (2 * k + 1)) & 1) as usize) << 8);
                put_pair_signed(lat, i0, i1, dl, b.signs[4 * ib + k], &mut out[4 * g..4 * g + 8]);
            }
        }
    }
}

pub struct IQ1S;
impl BlockFormat for IQ1S {
    const TYPE: GgmlType = GgmlType::IQ1_S;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 50;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let mut w = [0f32; QK_K];
        block_weights(x, imp, &mut w);
        let (mut idx, mut neg, mut ls) = ([0u16; 32], [false; 32], [0i32; 8]);
        let d = quantize_super(iq1s(), x, &w, 32, odd_scale, 7, Delta::PerSub, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ1S = block_mut(out);
        b.d = f16_bits(d);
        for ib in 0..8 {
            let mut h = (ls[ib] as u16) << 12;
            if neg[4 * ib] {
                h |= 0x8000;
            }
            for k in 0..4 {
                let i = idx[4 * ib + k];
                b.qs[4 * ib + k] = i as u8;
                h |= (i >> 8) << (3 * k);
            }
            b.qh[2 * ib..2 * ib + 2].copy_from_slice(&h.to_le_bytes());
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ1S = block_ref(bytes);
        let d = f16_val(b.d);
        let lat = iq1s();
        for ib in 0..8 {
            let h = u16::from_le_bytes([b.qh[2 * ib], b.qh[2 * ib + 1]]);
            let dl = odd_scale(d, ((h >> 12) & 7) as i32);
            let neg = h & 0x8000 != 0;
            for k in 0..4 {
                let i = b.qs[4 * ib + k] as usize | ((((h >> (3 * k)) & 7) as usize) << 8);
                put_shifted(lat, i, dl, neg, &mut out[32 * ib + 8 * k..32 * ib + 8 * k + 8]);
            }
        }
    }
}

pub struct IQ1M;
impl BlockFormat for IQ1M {
    const TYPE: GgmlType = GgmlType::IQ1_M;
    const BLOCK: usize = QK_K;
    const BYTES: usize = 56;

    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let mut w = [0f32; QK_K];
        block_weights(x, imp, &mut w);
        let (mut idx, mut neg, mut ls) = ([0u16; 32], [false; 32], [0i32; 16]);
        let d = quantize_super(iq1s(), x, &w, 16, odd_scale, 7, Delta::PerGroup, &mut idx, &mut neg, &mut ls);
        let b: &mut BlockIQ1M = block_mut(out);
        let dbits = u16::from_le_bytes(f16_bits(d));
        for g in 0..32 {
            b.qs[g] = idx[g] as u8;
        }
        for i in 0..16 {
            let nib = |g: usize| ((idx[g] >> 8) as u8 & 7) | ((neg[g] as u8) << 3);
            b.qh[i] = nib(2 * i) | (nib(2 * i + 1) << 4);
        }
        for m in 0..4 {
            let mut s = 0u16;
            for k in 0..4 {
                s |= (ls[4 * m + k] as u16) << (3 * k);
            }
            s |= ((dbits >> (4 * m)) & 0xF) << 12;
            b.scales[2 * m..2 * m + 2].copy_from_slice(&s.to_le_bytes());
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ1M = block_ref(bytes);
        let sc: [u16; 4] = std::array::from_fn(|m| u16::from_le_bytes([b.scales[2 * m], b.scales[2 * m + 1]]));
        let dbits = (sc[0] >> 12) | ((sc[1] >> 12) << 4) | ((sc[2] >> 12) << 8) | ((sc[3] >> 12) << 12);
        let d = f16_val(dbits.to_le_bytes());
        let lat = iq1s();
        for g in 0..32 {
            let h = g / 2; // the scale of the group's 16 weights
            let ls = (sc[h / 4] >> (3 * (h % 4))) & 7;
            let nib = (b.qh[g / 2] >> (4 * (g % 2))) & 0xF;
            let i = b.qs[g] as usize | (((nib & 7) as usize) << 8);
            put_shifted(lat, i, odd_scale(d, ls as i32), nib & 8 != 0, &mut out[8 * g..8 * g + 8]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksigns_have_even_parity() {
        for i in 0..128u32 {
            assert_eq!(ksigns(i).count_ones() % 2, 0);
            assert_eq!(ksigns(i) & 0x7F, i as u8);
        }
    }

    #[test]
    fn codebooks_have_their_sizes_and_levels() {
        for (lat, n) in
            [(iq2xxs(), 256), (iq2xs(), 512), (iq2s(), 1024), (iq3xxs(), 256), (iq3s(), 512), (iq1s(), 2048)]
        {
            assert_eq!(lat.len(), n);
        }
    }

    /// The neighbour search returns the codebook's weighted optimum for points near it (exactly
    /// on the rounded lattice point or one shell away), checked against an exhaustive search.
    #[test]
    fn lattice_search_matches_exhaustive_near_the_codebook() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32
        };
        for lat in [iq2xxs(), iq2s(), iq3xxs(), iq1s()] {
            let (mut worse, trials) = (0, 2000);
            for _ in 0..trials {
                let i = (rnd() * lat.len() as f32) as usize % lat.len();
                let step = lat.levels[1] - lat.levels[0];
                let y: Vec<f32> = lat.entry(i).iter().map(|v| v + (rnd() - 0.5) * 0.9 * step).collect();
                let w: Vec<f32> = (0..lat.dim).map(|_| 0.1 + rnd()).collect();
                let err = |k: usize| -> f32 {
                    lat.entry(k).iter().zip(&y).zip(&w).map(|((v, y), w)| w * (y - v) * (y - v)).sum()
                };
                let got = err(lat.best(&y, &w));
                let opt = (0..lat.len()).map(err).fold(f32::INFINITY, f32::min);
                assert!(got <= err(i) + 1e-4, "worse than the point the target was drawn around");
                worse += (got > opt + 1e-4) as usize;
            }
            // the search is exhaustive within its shells; far-away optima are rare
            assert!(worse * 50 < trials, "{worse} of {trials} not optimal");
        }
    }
}
