//! K-quants: 256-weight super-blocks split into sub-blocks whose scales (and mins) are themselves
//! quantized against one f16 super-scale. Layouts are ggml-common.h's `block_q2_K` ... `block_q6_K`
//! (`QK_K = 256`); the bit placement below is the one gguf-py's `dequantize_blocks` decodes.
//!
//! Quantization: each sub-block gets a weighted least-squares scale (and min) search
//! (`search`), the sub-block scales are rounded to their 4/6/8-bit codes, and the weights are
//! re-rounded against the scales exactly as they will be decoded.

use super::block::{block_mut, block_ref, f16_bits, f16_round, f16_val, BlockFormat, ByteBlock, GgmlType, QK_K};
use super::search::{error_affine, round_i, search_affine, search_sym};

#[repr(C)]
pub struct BlockQ2K {
    pub scales: [u8; 16],
    pub qs: [u8; 64],
    pub d: [u8; 2],
    pub dmin: [u8; 2],
}
#[repr(C)]
pub struct BlockQ3K {
    pub hmask: [u8; 32],
    pub qs: [u8; 64],
    pub scales: [u8; 12],
    pub d: [u8; 2],
}
#[repr(C)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}
#[repr(C)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [u8; 16],
    pub d: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

// SAFETY: repr(C) structs of u8 arrays only.
unsafe impl ByteBlock for BlockQ2K {}
unsafe impl ByteBlock for BlockQ3K {}
unsafe impl ByteBlock for BlockQ4K {}
unsafe impl ByteBlock for BlockQ5K {}
unsafe impl ByteBlock for BlockQ6K {}

const NTRY: i32 = 8;

#[inline(always)]
fn sub(w: Option<&[f32]>, lo: usize, n: usize) -> Option<&[f32]> {
    w.map(|w| &w[lo..lo + n])
}

#[inline(always)]
fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// Per sub-block `(scale >= 0, min >= 0)` for `x ≈ scale * q - min`, `q` in `[0, nmax]`.
#[inline(always)]
fn affine_subblocks<const NS: usize>(x: &[f32], imp: Option<&[f32]>, nmax: i32) -> ([f32; NS], [f32; NS]) {
    let n = QK_K / NS;
    let (mut sc, mut mn) = ([0f32; NS], [0f32; NS]);
    for j in 0..NS {
        let (d, m) = search_affine(&x[j * n..(j + 1) * n], sub(imp, j * n, n), nmax, NTRY, true);
        sc[j] = d.max(0.0);
        mn[j] = (-m).max(0.0);
    }
    (sc, mn)
}

/// Quantize non-negative sub-block values to `[0, qmax]` codes against a stored f16 super-scale.
#[inline(always)]
fn super_codes<const NS: usize>(v: &[f32; NS], qmax: i32) -> (f32, [i32; NS]) {
    let vmax = v.iter().fold(0f32, |a, b| if *b > a { *b } else { a });
    let d = f16_round(vmax / qmax as f32);
    let id = inv(d);
    let mut codes = [0i32; NS];
    for (c, x) in codes.iter_mut().zip(v) {
        *c = round_i(x * id).clamp(0, qmax);
    }
    (d, codes)
}

/// Signed sub-block scales -> codes in `[-half, half - 1]` against an f16 super-scale that maps the
/// largest-magnitude scale to `-half`.
#[inline(always)]
fn signed_super_codes<const NS: usize>(v: &[f32; NS], half: i32) -> (f32, [i32; NS]) {
    let m = super::search::signed_absmax(v);
    let d = f16_round(m / -(half as f32));
    let id = inv(d);
    let mut codes = [0i32; NS];
    for (c, x) in codes.iter_mut().zip(v) {
        *c = round_i(x * id).clamp(-half, half - 1);
    }
    (d, codes)
}

/// Re-pick one sub-block's (scale, min) codes among their neighbours (+-1) by the weighted error of
/// the decoded values: rounding each code on its own ignores how the two interact.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn refine_codes(x: &[f32], w: Option<&[f32]>, d: f32, dmin: f32, sc: &mut i32, mc: &mut i32, qmax: i32, nmax: i32) {
    let (s0, m0) = (*sc, *mc);
    let mut best = error_affine(x, w, d * s0 as f32, -(dmin * m0 as f32), nmax);
    for s in (s0 - 1).max(0)..=(s0 + 1).min(qmax) {
        for m in (m0 - 1).max(0)..=(m0 + 1).min(qmax) {
            if s == s0 && m == m0 {
                continue;
            }
            let e = error_affine(x, w, d * s as f32, -(dmin * m as f32), nmax);
            if e < best {
                best = e;
                *sc = s;
                *mc = m;
            }
        }
    }
}

/// Weights to unsigned levels for `x ≈ dl * q - ml`.
#[inline(always)]
fn affine_levels(x: &[f32], dl: f32, ml: f32, nmax: i32, out: &mut [i32]) {
    let id = inv(dl);
    for (o, v) in out.iter_mut().zip(x) {
        *o = round_i((v + ml) * id).clamp(0, nmax);
    }
}

#[inline(always)]
fn sym_levels(x: &[f32], dl: f32, qmin: i32, qmax: i32, out: &mut [i32]) {
    let id = inv(dl);
    for (o, v) in out.iter_mut().zip(x) {
        *o = round_i(v * id).clamp(qmin, qmax) - qmin;
    }
}

/// The 12-byte 6-bit scale/min packing of Q4_K and Q5_K (`get_scale_min_k4` in ggml).
#[inline(always)]
fn pack_scale_min_k4(sc: &[i32; 8], mn: &[i32; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] as u8 & 63) | (((sc[j + 4] as u8) >> 4) << 6);
        s[j + 4] = (mn[j] as u8 & 63) | (((mn[j + 4] as u8) >> 4) << 6);
        s[j + 8] = (sc[j + 4] as u8 & 0x0F) | ((mn[j + 4] as u8 & 0x0F) << 4);
    }
    s
}

#[inline(always)]
fn unpack_scale_min_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Shared Q4_K / Q5_K quantizer: 8 sub-blocks of 32, levels in `[0, nmax]`.
#[inline(always)]
fn quantize_q45k(x: &[f32], imp: Option<&[f32]>, nmax: i32) -> (f32, f32, [u8; 12], [i32; QK_K]) {
    let (scales, mins) = affine_subblocks::<8>(x, imp, nmax);
    let (d, sc) = super_codes(&scales, 63);
    let (dmin, mut mc) = super_codes(&mins, 63);
    let mut sc = sc;
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        refine_codes(xs, sub(imp, 32 * j, 32), d, dmin, &mut sc[j], &mut mc[j], 63, nmax);
    }
    let mut l = [0i32; QK_K];
    for j in 0..8 {
        let dl = d * sc[j] as f32;
        let ml = dmin * mc[j] as f32;
        affine_levels(&x[32 * j..32 * (j + 1)], dl, ml, nmax, &mut l[32 * j..32 * (j + 1)]);
    }
    (d, dmin, pack_scale_min_k4(&sc, &mc), l)
}

pub struct Q4K;
impl BlockFormat for Q4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockQ4K>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, dmin, scales, l) = quantize_q45k(x, imp, 15);
        let b: &mut BlockQ4K = block_mut(out);
        b.d = f16_bits(d);
        b.dmin = f16_bits(dmin);
        b.scales = scales;
        for c in 0..4 {
            for i in 0..32 {
                b.qs[c * 32 + i] = l[c * 64 + i] as u8 | ((l[c * 64 + 32 + i] as u8) << 4);
            }
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ4K = block_ref(bytes);
        let (d, dmin) = (f16_val(b.d), f16_val(b.dmin));
        let (sc, mn) = unpack_scale_min_k4(&b.scales);
        for j in 0..8 {
            let dl = d * sc[j] as f32;
            let ml = dmin * mn[j] as f32;
            let (c, shift) = (j / 2, 4 * (j % 2));
            for i in 0..32 {
                let q = (b.qs[c * 32 + i] >> shift) & 0x0F;
                out[32 * j + i] = dl * q as f32 - ml;
            }
        }
    }
}

pub struct Q5K;
impl BlockFormat for Q5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockQ5K>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, dmin, scales, l) = quantize_q45k(x, imp, 31);
        let b: &mut BlockQ5K = block_mut(out);
        b.d = f16_bits(d);
        b.dmin = f16_bits(dmin);
        b.scales = scales;
        b.qh = [0; 32];
        for c in 0..4 {
            for i in 0..32 {
                let (lo, hi) = (l[c * 64 + i] as u8, l[c * 64 + 32 + i] as u8);
                b.qs[c * 32 + i] = (lo & 0x0F) | ((hi & 0x0F) << 4);
            }
        }
        for (e, v) in l.iter().enumerate() {
            b.qh[e % 32] |= (((*v as u8) >> 4) & 1) << (e / 32);
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ5K = block_ref(bytes);
        let (d, dmin) = (f16_val(b.d), f16_val(b.dmin));
        let (sc, mn) = unpack_scale_min_k4(&b.scales);
        for j in 0..8 {
            let dl = d * sc[j] as f32;
            let ml = dmin * mn[j] as f32;
            let (c, shift) = (j / 2, 4 * (j % 2));
            for i in 0..32 {
                let q = ((b.qs[c * 32 + i] >> shift) & 0x0F) | (((b.qh[i] >> j) & 1) << 4);
                out[32 * j + i] = dl * q as f32 - ml;
            }
        }
    }
}

/// Position of weight `e` in the 2-bit planes of Q2_K/Q3_K: (byte, shift).
#[inline(always)]
fn two_bit_pos(e: usize) -> (usize, usize) {
    let (half, r) = (e / 128, e % 128);
    (half * 32 + r % 32, 2 * (r / 32))
}

pub struct Q2K;
impl BlockFormat for Q2K {
    const TYPE: GgmlType = GgmlType::Q2_K;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockQ2K>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (scales, mins) = affine_subblocks::<16>(x, imp, 3);
        let (d, mut sc) = super_codes(&scales, 15);
        let (dmin, mut mc) = super_codes(&mins, 15);
        for j in 0..16 {
            refine_codes(&x[16 * j..16 * (j + 1)], sub(imp, 16 * j, 16), d, dmin, &mut sc[j], &mut mc[j], 15, 3);
        }
        let mut l = [0i32; QK_K];
        for j in 0..16 {
            affine_levels(
                &x[16 * j..16 * (j + 1)],
                d * sc[j] as f32,
                dmin * mc[j] as f32,
                3,
                &mut l[16 * j..16 * (j + 1)],
            );
        }
        let b: &mut BlockQ2K = block_mut(out);
        for j in 0..16 {
            b.scales[j] = sc[j] as u8 | ((mc[j] as u8) << 4);
        }
        b.qs = [0; 64];
        for (e, v) in l.iter().enumerate() {
            let (byte, shift) = two_bit_pos(e);
            b.qs[byte] |= (*v as u8) << shift;
        }
        b.d = f16_bits(d);
        b.dmin = f16_bits(dmin);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ2K = block_ref(bytes);
        let (d, dmin) = (f16_val(b.d), f16_val(b.dmin));
        // the loops of `two_bit_pos` unrolled so each innermost run of 16 weights has one shift,
        // one scale and consecutive bytes (vectorizable); the same floats as weight by weight
        for half in 0..2 {
            for j in 0..4 {
                for sub in 0..2 {
                    let s = b.scales[half * 8 + j * 2 + sub];
                    let (dl, ml) = (d * (s & 0x0F) as f32, dmin * (s >> 4) as f32);
                    let qs = &b.qs[half * 32 + sub * 16..half * 32 + sub * 16 + 16];
                    let o = &mut out[half * 128 + j * 32 + sub * 16..half * 128 + j * 32 + sub * 16 + 16];
                    for (o, q) in o.iter_mut().zip(qs) {
                        *o = dl * ((*q as u32 >> (2 * j)) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Symmetric sub-block scales for Q3_K/Q6_K: 16 sub-blocks of 16 on the grid `[qmin, qmax]`.
#[inline(always)]
fn sym_subblocks(x: &[f32], imp: Option<&[f32]>, qmin: i32, qmax: i32) -> [f32; 16] {
    let mut s = [0f32; 16];
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = search_sym(&x[16 * j..16 * (j + 1)], sub(imp, 16 * j, 16), qmin, qmax, NTRY);
    }
    s
}

/// Q3_K / Q6_K: searched sub-block scales, coded as signed integers (`[-half, half)`) under one
/// f16 super-scale `d`, then the weights re-rounded against the decoded scales. Returns
/// `(d, scale codes, weight levels in [qmin, qmax])`.
#[inline(always)]
fn sym_super_block(x: &[f32], imp: Option<&[f32]>, qmin: i32, qmax: i32, half: i32) -> (f32, [i32; 16], [i32; QK_K]) {
    let scales = sym_subblocks(x, imp, qmin, qmax);
    let (d, sc) = signed_super_codes(&scales, half);
    let mut l = [0i32; QK_K];
    for j in 0..16 {
        sym_levels(&x[16 * j..16 * (j + 1)], d * sc[j] as f32, qmin, qmax, &mut l[16 * j..16 * (j + 1)]);
    }
    (d, sc, l)
}

pub struct Q3K;
impl BlockFormat for Q3K {
    const TYPE: GgmlType = GgmlType::Q3_K;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockQ3K>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, sc, l) = sym_super_block(x, imp, -4, 3, 32);
        let b: &mut BlockQ3K = block_mut(out);
        b.hmask = [0; 32];
        b.qs = [0; 64];
        b.scales = [0; 12];
        for (e, v) in l.iter().enumerate() {
            let (byte, shift) = two_bit_pos(e);
            b.qs[byte] |= ((*v & 3) as u8) << shift;
            b.hmask[e % 32] |= (((*v >> 2) & 1) as u8) << (e / 32);
        }
        for (k, c) in sc.iter().enumerate() {
            let v = (c + 32) as u8;
            b.scales[k % 8] |= (v & 0x0F) << (4 * (k / 8));
            b.scales[8 + k % 4] |= ((v >> 4) & 3) << (2 * (k / 4));
        }
        b.d = f16_bits(d);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ3K = block_ref(bytes);
        let d = f16_val(b.d);
        let mut dl = [0f32; 16];
        for (k, o) in dl.iter_mut().enumerate() {
            let lo = (b.scales[k % 8] >> (4 * (k / 8))) & 0x0F;
            let hi = (b.scales[8 + k % 4] >> (2 * (k / 4))) & 3;
            *o = d * ((lo | (hi << 4)) as i32 - 32) as f32;
        }
        // `two_bit_pos` and the hmask bit unrolled as in Q2_K's decoder (same floats)
        for half in 0..2 {
            for j in 0..4 {
                for sub in 0..2 {
                    let scale = dl[half * 8 + j * 2 + sub];
                    let qs = &b.qs[half * 32 + sub * 16..half * 32 + sub * 16 + 16];
                    let hm = &b.hmask[sub * 16..sub * 16 + 16];
                    let o = &mut out[half * 128 + j * 32 + sub * 16..half * 128 + j * 32 + sub * 16 + 16];
                    for ((o, q), h) in o.iter_mut().zip(qs).zip(hm) {
                        let low = ((*q as u32 >> (2 * j)) & 3) as i32;
                        let high = ((*h as u32 >> (half * 4 + j)) & 1) as i32;
                        *o = scale * (low - 4 * (1 - high)) as f32;
                    }
                }
            }
        }
    }
}

/// Position of weight `e` in Q6_K: (ql byte, ql shift, qh byte, qh shift).
#[inline(always)]
fn q6_pos(e: usize) -> (usize, usize, usize, usize) {
    let (h, r) = (e / 128, e % 128);
    (h * 64 + r % 64, 4 * (r / 64), h * 32 + r % 32, 2 * (r / 32))
}

pub struct Q6K;
impl BlockFormat for Q6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockQ6K>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, sc, l) = sym_super_block(x, imp, -32, 31, 128);
        let b: &mut BlockQ6K = block_mut(out);
        b.ql = [0; 128];
        b.qh = [0; 64];
        for (e, v) in l.iter().enumerate() {
            let (qlb, qls, qhb, qhs) = q6_pos(e);
            b.ql[qlb] |= ((*v & 0x0F) as u8) << qls;
            b.qh[qhb] |= (((*v >> 4) & 3) as u8) << qhs;
        }
        for (s, c) in b.scales.iter_mut().zip(&sc) {
            *s = *c as i8 as u8;
        }
        b.d = f16_bits(d);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ6K = block_ref(bytes);
        let d = f16_val(b.d);
        let mut dl = [0f32; 16];
        for (o, s) in dl.iter_mut().zip(&b.scales) {
            *o = d * (*s as i8) as f32;
        }
        // `q6_pos` unrolled: runs of 16 weights with one scale and shift, consecutive bytes (same floats)
        for h in 0..2 {
            for j in 0..4 {
                for sub in 0..2 {
                    let scale = dl[h * 8 + j * 2 + sub];
                    let l0 = sub * 16;
                    let ql = &b.ql[h * 64 + (j % 2) * 32 + l0..h * 64 + (j % 2) * 32 + l0 + 16];
                    let qh = &b.qh[h * 32 + l0..h * 32 + l0 + 16];
                    let o = &mut out[h * 128 + j * 32 + l0..h * 128 + j * 32 + l0 + 16];
                    for ((o, lo), hi) in o.iter_mut().zip(ql).zip(qh) {
                        // widened first: a uniform shift of 32-bit lanes vectorizes, of bytes it does not
                        let q =
                            (((*lo as u32 >> (4 * (j / 2))) & 0x0F) | (((*hi as u32 >> (2 * j)) & 3) << 4)) as i32 - 32;
                        *o = scale * q as f32;
                    }
                }
            }
        }
    }
}
