//! Ternary GGML formats for BitNet-style weights, `w = d * t`, `t` in {-1, 0, 1}:
//! * TQ2_0 `{qs[64], d: f16}`: 2 bits per weight (`t + 1`); weight `e` sits in byte
//!   `32 * (e / 128) + e % 32` at bit `2 * ((e % 128) / 32)`.
//! * TQ1_0 `{qs[48], qh[4], d: f16}`: 1.6875 bits per weight; five trits per byte, stored as
//!   `ceil(v * 256 / 243)` of their base-3 value `v` so that digit `p` is
//!   `((byte * 3^p mod 256) * 3) >> 8`. Weights 0..160 use bytes 0..32 (digit `p` = weight
//!   `32 p + byte`), 160..240 use bytes 32..48 (`160 + 16 p + i`), 240..256 the four `qh` bytes
//!   (`240 + 4 p + i`, four digits).
//!
//! Layouts from ggml-common.h (`block_tq1_0`, `block_tq2_0`) and gguf-py's `TQ1_0`/`TQ2_0`.

use super::block::{block_mut, block_ref, f16_bits, f16_round, f16_val, BlockFormat, ByteBlock, GgmlType, QK_K};
use super::search::{absmax, levels_sym, pick_sym, search_ternary};

#[repr(C)]
pub struct BlockTQ1_0 {
    pub qs: [u8; 48],
    pub qh: [u8; 4],
    pub d: [u8; 2],
}
#[repr(C)]
pub struct BlockTQ2_0 {
    pub qs: [u8; 64],
    pub d: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockTQ1_0>() == 54);
const _: () = assert!(std::mem::size_of::<BlockTQ2_0>() == 66);

// SAFETY: repr(C) structs of u8 arrays only.
unsafe impl ByteBlock for BlockTQ1_0 {}
unsafe impl ByteBlock for BlockTQ2_0 {}

/// Search mode: the weighted-optimal ternary scale, or absmax when that is no worse.
#[inline(always)]
fn ternary_levels(x: &[f32], imp: Option<&[f32]>) -> (f32, [i32; QK_K]) {
    let amax = absmax(x);
    let d = pick_sym(x, imp, &[f16_round(search_ternary(x, imp)), f16_round(amax)], -1, 1);
    let mut l = [0i32; QK_K];
    levels_sym(x, d, -1, 1, &mut l);
    for v in l.iter_mut() {
        *v += 1;
    }
    (d, l)
}

/// gguf-py: `d = absmax`, `t = roundf(x / d)` (half away from zero), `+ 1`.
#[inline(always)]
fn ternary_levels_rtn(x: &[f32]) -> (f32, [i32; QK_K]) {
    let d = absmax(x);
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut l = [0i32; QK_K];
    // round half away from zero, clamped to [-1, 1] (gguf-py's `np.round(x * id)` on |x * id| <= 1
    // up to one rounding): 1 at s >= 0.5, -1 at s <= -0.5, else 0 — as comparisons, which the
    // compiler vectorizes (a `round` call per weight it does not)
    for (o, v) in l.iter_mut().zip(x) {
        let s = v * id;
        *o = 1 + (s >= 0.5) as i32 - (s <= -0.5) as i32;
    }
    (d, l)
}

#[inline(always)]
fn pack_tq2(l: &[i32; QK_K], b: &mut BlockTQ2_0) {
    // byte 32 h + i holds weights 128 h + 32 k + i in bits 2k..2k+2
    for h in 0..2 {
        let g = &l[128 * h..128 * h + 128];
        for i in 0..32 {
            b.qs[32 * h + i] = (g[i] | g[32 + i] << 2 | g[64 + i] << 4 | g[96 + i] << 6) as u8;
        }
    }
}

#[inline(always)]
fn encode_trits(digits: impl Iterator<Item = i32>) -> u8 {
    // base-3, most significant digit first (weights 81, 27, 9, 3, 1)
    let v = digits.fold(0u16, |acc, t| acc * 3 + t as u16);
    // ceil(v * 256 / 243), gguf-py's `(v * 256 + (243 - 1)) // 243`
    (v * 256).div_ceil(243) as u8
}

#[inline(always)]
fn pack_tq1(l: &[i32; QK_K], b: &mut BlockTQ1_0) {
    for i in 0..32 {
        b.qs[i] = encode_trits((0..5).map(|p| l[32 * p + i]));
    }
    for i in 0..16 {
        b.qs[32 + i] = encode_trits((0..5).map(|p| l[160 + 16 * p + i]));
    }
    for i in 0..4 {
        // four digits, the fifth (least significant) is zero
        b.qh[i] = encode_trits((0..5).map(|p| if p < 4 { l[240 + 4 * p + i] } else { 0 }));
    }
}

#[inline(always)]
fn trit(byte: u8, p: usize) -> i32 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let q = byte.wrapping_mul(POW3[p]);
    ((q as u16 * 3) >> 8) as i32 - 1
}

pub struct TQ1_0;
impl BlockFormat for TQ1_0 {
    const TYPE: GgmlType = GgmlType::TQ1_0;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockTQ1_0>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, l) = ternary_levels(x, imp);
        let b: &mut BlockTQ1_0 = block_mut(out);
        pack_tq1(&l, b);
        b.d = f16_bits(d);
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let (d, l) = ternary_levels_rtn(x);
        let b: &mut BlockTQ1_0 = block_mut(out);
        pack_tq1(&l, b);
        b.d = f16_bits(d);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockTQ1_0 = block_ref(bytes);
        let d = f16_val(b.d);
        for p in 0..5 {
            for i in 0..32 {
                out[32 * p + i] = d * trit(b.qs[i], p) as f32;
            }
            for i in 0..16 {
                out[160 + 16 * p + i] = d * trit(b.qs[32 + i], p) as f32;
            }
        }
        for p in 0..4 {
            for i in 0..4 {
                out[240 + 4 * p + i] = d * trit(b.qh[i], p) as f32;
            }
        }
    }
}

pub struct TQ2_0;
impl BlockFormat for TQ2_0 {
    const TYPE: GgmlType = GgmlType::TQ2_0;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockTQ2_0>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let (d, l) = ternary_levels(x, imp);
        let b: &mut BlockTQ2_0 = block_mut(out);
        pack_tq2(&l, b);
        b.d = f16_bits(d);
    }

    #[inline(always)]
    fn quantize_block_rtn(x: &[f32], out: &mut [u8]) {
        let (d, l) = ternary_levels_rtn(x);
        let b: &mut BlockTQ2_0 = block_mut(out);
        pack_tq2(&l, b);
        b.d = f16_bits(d);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockTQ2_0 = block_ref(bytes);
        let d = f16_val(b.d);
        for (e, o) in out.iter_mut().enumerate().take(QK_K) {
            let q = (b.qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            *o = d * (q as i32 - 1) as f32;
        }
    }
}
