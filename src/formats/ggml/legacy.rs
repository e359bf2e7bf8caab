//! GGML's original 32-weight block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Layouts (`block_q4_0` ... `block_q8_0` in ggml-common.h; the decoding in gguf-py quants.py):
//! * Q4_0 `{d: f16, qs[16]}`: w = d * (q - 8); byte j holds weight j (low nibble) and j + 16.
//! * Q4_1 `{d: f16, m: f16, qs[16]}`: w = d * q + m.
//! * Q5_0 `{d: f16, qh: u32, qs[16]}`: 5-bit q, bit j of `qh` is bit 4 of weight j; w = d * (q - 16).
//! * Q5_1 `{d, m, qh, qs[16]}`: w = d * q + m.
//! * Q8_0 `{d: f16, qs: i8[32]}`: w = d * q.
//!
//! `quantize_block_rtn` reproduces gguf-py's numpy quantizers operation by operation (same f32
//! divisions, truncations and half-away-from-zero rounding), hence the same bytes.

use super::block::{block_mut, block_ref, f16_bits, f16_round, f16_val, BlockFormat, ByteBlock, GgmlType};
use super::search::{
    absmax, levels_affine, levels_sym, min_max, pick_affine, pick_sym, round_i, search_affine, search_sym,
    signed_absmax,
};

#[repr(C)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

// SAFETY: repr(C) structs of u8 arrays only.
unsafe impl ByteBlock for BlockQ4_0 {}
unsafe impl ByteBlock for BlockQ4_1 {}
unsafe impl ByteBlock for BlockQ5_0 {}
unsafe impl ByteBlock for BlockQ5_1 {}
unsafe impl ByteBlock for BlockQ8_0 {}

/// Candidate-scale counts of the searches (more for coarser grids, where they pay off most).
const NTRY_4BIT: i32 = 8;
const NTRY_5BIT: i32 = 6;
const NTRY_8BIT: i32 = 3;

#[inline(always)]
fn pack_nibbles(l: &[i32; 32], qs: &mut [u8; 16]) {
    for j in 0..16 {
        qs[j] = (l[j] as u8 & 0x0F) | ((l[j + 16] as u8 & 0x0F) << 4);
    }
}

#[inline(always)]
fn pack_high_bits(l: &[i32; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, v) in l.iter().enumerate() {
        qh |= (((*v as u32) >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

/// gguf-py's reciprocal: `np.where(d == 0, 0, 1 / d)`.
#[inline(always)]
fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// Symmetric 4/5-bit: (stored d, levels shifted to unsigned).
#[inline(always)]
fn quantize_sym_block(x: &[f32], imp: Option<&[f32]>, half: i32, ntry: i32) -> (f32, [i32; 32]) {
    let rtn = f16_round(signed_absmax(x) / -(half as f32));
    let best = f16_round(search_sym(x, imp, -half, half - 1, ntry));
    let d = pick_sym(x, imp, &[best, rtn], -half, half - 1);
    let mut l = [0i32; 32];
    levels_sym(x, d, -half, half - 1, &mut l);
    for v in l.iter_mut() {
        *v += half;
    }
    (d, l)
}

#[inline(always)]
fn quantize_affine_block(x: &[f32], imp: Option<&[f32]>, nmax: i32, ntry: i32) -> (f32, f32, [i32; 32]) {
    let (lo, hi) = min_max(x);
    let rtn = (f16_round((hi - lo) / nmax as f32), f16_round(lo));
    let (d, mn) = search_affine(x, imp, nmax, ntry, false);
    let (d, mn) = pick_affine(x, imp, &[(f16_round(d), f16_round(mn)), rtn], nmax);
    let mut l = [0i32; 32];
    levels_affine(x, d, mn, nmax, &mut l);
    (d, mn, l)
}

/// gguf-py Q4_0 / Q5_0: `d = max / -half`, `q = trunc(x / d + half + 0.5)` clipped.
#[inline(always)]
fn rtn_sym(x: &[f32], half: f32, qmax: u8) -> (f32, [i32; 32]) {
    let d = signed_absmax(x) / -half;
    let id = inv(d);
    let mut l = [0i32; 32];
    for (o, v) in l.iter_mut().zip(x) {
        // v * id >= -half, so the sum is positive and `as i32` is numpy's trunc
        *o = ((v * id + (half + 0.5)) as i32).clamp(0, qmax as i32);
    }
    (d, l)
}

/// gguf-py Q4_1 / Q5_1: `d = (max - min) / nmax`, `q = trunc((x - min) / d + 0.5)` clipped.
#[inline(always)]
fn rtn_affine(x: &[f32], nmax: f32) -> (f32, f32, [i32; 32]) {
    let (lo, hi) = min_max(x);
    let d = (hi - lo) / nmax;
    let id = inv(d);
    let mut l = [0i32; 32];
    for (o, v) in l.iter_mut().zip(x) {
        *o = (((v - lo) * id + 0.5) as i32).clamp(0, nmax as i32);
    }
    (d, lo, l)
}

// Block writers shared by the search and the round-to-nearest quantizers: `l` are the unsigned
// codes (Q4: 0..15, Q5: 0..31; the high bit of a Q5 code goes to `qh`).
#[inline(always)]
fn store_q4_0(d: f32, l: &[i32; 32], out: &mut [u8]) {
    let b: &mut BlockQ4_0 = block_mut(out);
    b.d = f16_bits(d);
    pack_nibbles(l, &mut b.qs);
}

#[inline(always)]
fn store_q4_1(d: f32, m: f32, l: &[i32; 32], out: &mut [u8]) {
    let b: &mut BlockQ4_1 = block_mut(out);
    b.d = f16_bits(d);
    b.m = f16_bits(m);
    pack_nibbles(l, &mut b.qs);
}

#[inline(always)]
fn store_q5_0(d: f32, l: &[i32; 32], out: &mut [u8]) {
    let b: &mut BlockQ5_0 = block_mut(out);
    b.d = f16_bits(d);
    b.qh = pack_high_bits(l);
    pack_nibbles(l, &mut b.qs);
}

#[inline(always)]
fn store_q5_1(d: f32, m: f32, l: &[i32; 32], out: &mut [u8]) {
    let b: &mut BlockQ5_1 = block_mut(out);
    b.d = f16_bits(d);
    b.m = f16_bits(m);
    b.qh = pack_high_bits(l);
    pack_nibbles(l, &mut b.qs);
}

pub struct Q4_0;
impl BlockFormat for Q4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const BLOCK: usize = 32;
    const BYTES: usize = std::mem::size_of::<BlockQ4_0>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        // Without an imatrix, round to nearest: llama.cpp's choice too (quantize_row_q4_0_ref),
        // and on SmolLM2-135M it beat both searches we tried (llama-perplexity KL vs FP32, 20x512
        // WikiText-2 test tokens: round-to-nearest 0.2641, magnitude-weighted search 0.2706,
        // unit-weight search 0.2742).
        let Some(imp) = imp else {
            return Self::quantize_block_rtn(x, out);
        };
        let (d, l) = quantize_sym_block(x, Some(imp), 8, NTRY_4BIT);
        store_q4_0(d, &l, out);
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let (d, l) = rtn_sym(x, 8.0, 15);
        store_q4_0(d, &l, out);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ4_0 = block_ref(bytes);
        let d = f16_val(b.d);
        for j in 0..16 {
            out[j] = d * ((b.qs[j] & 0x0F) as i32 - 8) as f32;
            out[j + 16] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
        }
    }
}

pub struct Q4_1;
impl BlockFormat for Q4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const BLOCK: usize = 32;
    const BYTES: usize = std::mem::size_of::<BlockQ4_1>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, mn, l) = quantize_affine_block(x, imp, 15, NTRY_4BIT);
        store_q4_1(d, mn, &l, out);
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let (d, mn, l) = rtn_affine(x, 15.0);
        store_q4_1(d, mn, &l, out);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ4_1 = block_ref(bytes);
        let (d, m) = (f16_val(b.d), f16_val(b.m));
        for j in 0..16 {
            out[j] = d * (b.qs[j] & 0x0F) as f32 + m;
            out[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
        }
    }
}

pub struct Q5_0;
impl BlockFormat for Q5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const BLOCK: usize = 32;
    const BYTES: usize = std::mem::size_of::<BlockQ5_0>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, l) = quantize_sym_block(x, imp, 16, NTRY_5BIT);
        store_q5_0(d, &l, out);
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let (d, l) = rtn_sym(x, 16.0, 31);
        store_q5_0(d, &l, out);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ5_0 = block_ref(bytes);
        let d = f16_val(b.d);
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..16 {
            let lo = (b.qs[j] & 0x0F) as i32 | ((((qh >> j) & 1) as i32) << 4);
            let hi = (b.qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
            out[j] = d * (lo - 16) as f32;
            out[j + 16] = d * (hi - 16) as f32;
        }
    }
}

pub struct Q5_1;
impl BlockFormat for Q5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const BLOCK: usize = 32;
    const BYTES: usize = std::mem::size_of::<BlockQ5_1>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, mn, l) = quantize_affine_block(x, imp, 31, NTRY_5BIT);
        store_q5_1(d, mn, &l, out);
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let (d, mn, l) = rtn_affine(x, 31.0);
        store_q5_1(d, mn, &l, out);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ5_1 = block_ref(bytes);
        let (d, m) = (f16_val(b.d), f16_val(b.m));
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..16 {
            let lo = (b.qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
            let hi = (b.qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            out[j] = d * lo as f32 + m;
            out[j + 16] = d * hi as f32 + m;
        }
    }
}

pub struct Q8_0;
impl BlockFormat for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const BLOCK: usize = 32;
    const BYTES: usize = std::mem::size_of::<BlockQ8_0>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let amax = absmax(x);
        let rtn = f16_round(amax / 127.0);
        let best = f16_round(search_sym(x, imp, -128, 127, NTRY_8BIT));
        let d = pick_sym(x, imp, &[best, rtn], -128, 127);
        let mut l = [0i32; 32];
        levels_sym(x, d, -128, 127, &mut l);
        let b: &mut BlockQ8_0 = block_mut(out);
        b.d = f16_bits(d);
        for (q, v) in b.qs.iter_mut().zip(&l) {
            *q = *v as i8 as u8;
        }
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let amax = absmax(x);
        let d = amax / 127.0;
        let id = inv(d);
        let b: &mut BlockQ8_0 = block_mut(out);
        b.d = f16_bits(d);
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = round_i(v * id).clamp(-128, 127) as i8 as u8;
        }
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockQ8_0 = block_ref(bytes);
        let d = f16_val(b.d);
        for (o, q) in out.iter_mut().zip(&b.qs) {
            *o = (*q as i8) as f32 * d;
        }
    }
}
