//! Non-linear 4-bit GGML formats: IQ4_NL and IQ4_XS, 16 levels from a fixed codebook
//! (`kvalues_iq4nl` in ggml-common.h; the same table is in gguf-py's `IQ4_NL.kvalues`).
//! * IQ4_NL `{d: f16, qs[16]}`, 32 weights: byte j holds weight j (low nibble) and j + 16.
//! * IQ4_XS `{d: f16, scales_h: u16, scales_l[4], qs[128]}`, 256 weights in 8 sub-blocks of 32,
//!   each with a 6-bit scale `ls` (low 4 bits in `scales_l[ib / 2]` nibble `ib % 2`, high 2 bits at
//!   bit `2 ib` of `scales_h`): w = d * (ls - 32) * kvalues[q]; sub-block `ib` uses bytes
//!   `16 ib .. 16 ib + 16` like an IQ4_NL block.

use super::block::{block_mut, block_ref, f16_bits, f16_round, f16_val, BlockFormat, ByteBlock, GgmlType, QK_K};
use super::search::{error_codebook, nearest_in, round_i, search_codebook, signed_absmax};

pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
const KV: [f32; 16] = {
    let mut v = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        v[i] = KVALUES_IQ4NL[i] as f32;
        i += 1;
    }
    v
};
const NTRY: i32 = 7;

#[repr(C)]
pub struct BlockIQ4NL {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}
#[repr(C)]
pub struct BlockIQ4XS {
    pub d: [u8; 2],
    pub scales_h: [u8; 2],
    pub scales_l: [u8; 4],
    pub qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);
const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == 136);

// SAFETY: repr(C) structs of u8 arrays only.
unsafe impl ByteBlock for BlockIQ4NL {}
unsafe impl ByteBlock for BlockIQ4XS {}

/// Codebook indices of `x / d`, packed as 16 bytes (low nibble j, high nibble j + 16).
#[inline(always)]
fn pack32(x: &[f32], d: f32, qs: &mut [u8]) {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for j in 0..16 {
        let lo = nearest_in(&KV, x[j] * id) as u8;
        let hi = nearest_in(&KV, x[j + 16] * id) as u8;
        qs[j] = lo | (hi << 4);
    }
}

#[inline(always)]
fn unpack32(qs: &[u8], d: f32, out: &mut [f32]) {
    for j in 0..16 {
        out[j] = d * KV[(qs[j] & 0x0F) as usize];
        out[j + 16] = d * KV[(qs[j] >> 4) as usize];
    }
}

/// Best stored scale of a 32-weight group: the searched one or the absmax one, whichever is
/// better after rounding to f16.
#[inline(always)]
fn group_scale(x: &[f32], imp: Option<&[f32]>) -> f32 {
    let a = f16_round(search_codebook(x, imp, &KV, NTRY));
    let b = f16_round(signed_absmax(x) / KV[0]);
    if error_codebook(x, imp, &KV, b) < error_codebook(x, imp, &KV, a) {
        b
    } else {
        a
    }
}

pub struct IQ4NL;
impl BlockFormat for IQ4NL {
    const TYPE: GgmlType = GgmlType::IQ4_NL;
    const BLOCK: usize = 32;
    const BYTES: usize = std::mem::size_of::<BlockIQ4NL>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        // without an imatrix: magnitude weights (see `search::magnitude_weights` for the measurement)
        let mut mw = [0f32; 32];
        let imp = if imp.is_none() {
            super::search::magnitude_weights(x, &mut mw);
            Some(&mw[..])
        } else {
            imp
        };
        let d = group_scale(x, imp);
        let b: &mut BlockIQ4NL = block_mut(out);
        b.d = f16_bits(d);
        pack32(x, d, &mut b.qs);
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ4NL = block_ref(bytes);
        unpack32(&b.qs, f16_val(b.d), out);
    }
}

pub struct IQ4XS;
impl BlockFormat for IQ4XS {
    const TYPE: GgmlType = GgmlType::IQ4_XS;
    const BLOCK: usize = QK_K;
    const BYTES: usize = std::mem::size_of::<BlockIQ4XS>();

    #[inline(always)]
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]) {
        let mut scales = [0f32; 8];
        for (ib, s) in scales.iter_mut().enumerate() {
            let xs = &x[32 * ib..32 * (ib + 1)];
            *s = search_codebook(xs, imp.map(|w| &w[32 * ib..32 * (ib + 1)]), &KV, NTRY);
        }
        let m = signed_absmax(&scales);
        let d = f16_round(m / -32.0);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let b: &mut BlockIQ4XS = block_mut(out);
        b.d = f16_bits(d);
        b.scales_l = [0; 4];
        let mut sh = 0u16;
        for (ib, s) in scales.iter().enumerate() {
            let ls = round_i(s * id).clamp(-32, 31);
            let code = (ls + 32) as u8;
            b.scales_l[ib / 2] |= (code & 0x0F) << (4 * (ib % 2));
            sh |= (((code >> 4) & 3) as u16) << (2 * ib);
            pack32(&x[32 * ib..32 * (ib + 1)], d * ls as f32, &mut b.qs[16 * ib..16 * (ib + 1)]);
        }
        b.scales_h = sh.to_le_bytes();
    }

    #[inline(always)]
    fn dequantize_block(bytes: &[u8], out: &mut [f32]) {
        let b: &BlockIQ4XS = block_ref(bytes);
        let d = f16_val(b.d);
        let sh = u16::from_le_bytes(b.scales_h);
        for ib in 0..8 {
            let lo = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
            let hi = ((sh >> (2 * ib)) & 3) as u8;
            let dl = d * ((lo | (hi << 4)) as i32 - 32) as f32;
            unpack32(&b.qs[16 * ib..16 * (ib + 1)], dl, &mut out[32 * ib..32 * (ib + 1)]);
        }
    }
}
