//! SIMD row kernels for the round-to-nearest (gguf-py-identical) quantizers of GGML's 32-weight
//! block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (`formats::ggml::legacy`).
//!
//! One block (32 weights) is two AVX-512 or four AVX2 vectors. Per block:
//! * the range: the largest magnitude as an unsigned integer maximum of the sign-cleared bit
//!   patterns (for finite floats the integer order is the float order, and NaN/Inf patterns are
//!   larger than every finite one, so the same maximum doubles as the NaN/Inf check); min/max for
//!   the affine types;
//! * the scale, its reciprocal and its f16 bits with the *scalar* code of the reference (same f32
//!   divisions), so d and 1/d are the reference's bit for bit;
//! * the codes with the reference's f32 operations in the same order (`v * id (+ off)`, never
//!   fused), truncation with `vcvttps2dq`, and for Q8_0 the half-away-from-zero rounding as
//!   `trunc(x) ± (|x - trunc(x)| >= 0.5)`, exactly `round_i`;
//! * narrowing with saturation (`vpmovsdb` / `packs`) = the reference's clamps.
//!
//! Blocks where the fast arithmetic could differ from the reference are handed to the scalar
//! block quantizer: a reciprocal scale that overflows to Inf (only for |max| below ~4e-37), and,
//! for the affine types, a block whose min or max is a zero (the sign of that zero, which the
//! reference picks by scan order, reaches the stored bytes). Both are vanishingly rare in real
//! weights. Tested bit-exact against the scalar reference at every level the CPU has.

/// Which legacy block format a row kernel writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegacyKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl LegacyKind {
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            LegacyKind::Q4_0 => 18,
            LegacyKind::Q4_1 => 20,
            LegacyKind::Q5_0 => 22,
            LegacyKind::Q5_1 => 24,
            LegacyKind::Q8_0 => 34,
        }
    }

    /// The 4/5-bit codes as the reference computes them, for the SIMD emitters:
    /// `(symmetric, top code, added before truncation)`; symmetric: `trunc(v * id + (half + 0.5))`,
    /// affine: `trunc((v - min) * id + 0.5)`, both clamped to `0..=top`. Not for Q8_0, which
    /// rounds half away from zero and has its own emitters.
    pub(crate) const fn code_params(self) -> (bool, i32, f32) {
        match self {
            LegacyKind::Q4_0 => (true, 15, 8.5),
            LegacyKind::Q5_0 => (true, 31, 16.5),
            LegacyKind::Q4_1 => (false, 15, 0.5),
            LegacyKind::Q5_1 => (false, 31, 0.5),
            LegacyKind::Q8_0 => panic!("Q8_0 codes are not 4/5-bit"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::*;

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::LegacyKind;
    use crate::formats::ggml::block::BlockFormat;
    use crate::formats::ggml::legacy;
    use crate::formats::ggml::search::signed_absmax;
    use crate::formats::half_float::f32_to_f16_bits as f32_to_f16;

    const TRUNC: i32 = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
    const ABS: i32 = 0x7fff_ffff;
    const INF_BITS: u32 = 0x7f80_0000;

    /// gguf-py's reciprocal, as in `legacy::inv`.
    #[inline(always)]
    fn inv(d: f32) -> f32 {
        if d == 0.0 {
            0.0
        } else {
            1.0 / d
        }
    }

    /// The scalar reference for one block (the rare cases described in the module docs), written
    /// to the (possibly uninitialised) block at `ob`.
    #[inline(never)]
    unsafe fn scalar_block(kind: LegacyKind, x: &[f32], ob: *mut u8) {
        // SAFETY: the caller passes a pointer to a whole block of `kind`; zeroed first so the
        // slice the reference writes through is initialised memory.
        let out = unsafe {
            ob.write_bytes(0, kind.block_bytes());
            std::slice::from_raw_parts_mut(ob, kind.block_bytes())
        };
        match kind {
            LegacyKind::Q4_0 => legacy::Q4_0::quantize_block_rtn(x, out),
            LegacyKind::Q4_1 => legacy::Q4_1::quantize_block_rtn(x, out),
            LegacyKind::Q5_0 => legacy::Q5_0::quantize_block_rtn(x, out),
            LegacyKind::Q5_1 => legacy::Q5_1::quantize_block_rtn(x, out),
            LegacyKind::Q8_0 => legacy::Q8_0::quantize_block_rtn(x, out),
        }
    }

    /// Scale parameters of one block from its range, with the reference's scalar arithmetic.
    /// `None`: hand the block to the scalar quantizer.
    #[inline(always)]
    fn params(kind: LegacyKind, signed_max: f32, amax: f32, lo: f32, hi: f32) -> Option<(f32, f32, f32)> {
        // (stored d, 1/d, offset: min for the affine types)
        let (d, off) = match kind {
            LegacyKind::Q8_0 => (amax / 127.0, 0.0),
            LegacyKind::Q4_0 => (signed_max / -8.0, 0.0),
            LegacyKind::Q5_0 => (signed_max / -16.0, 0.0),
            LegacyKind::Q4_1 | LegacyKind::Q5_1 => {
                if lo == 0.0 || hi == 0.0 {
                    return None;
                }
                let nmax = if kind == LegacyKind::Q4_1 { 15.0 } else { 31.0 };
                ((hi - lo) / nmax, lo)
            }
        };
        let id = inv(d);
        if id.is_infinite() {
            return None;
        }
        Some((d, id, off))
    }

    /// Write the block header: f16 bits of d (and of the min), and the 5th bits `qh`.
    #[inline(always)]
    fn write_header(kind: LegacyKind, out: *mut u8, dh: u16, mh: u16, qh: u32) {
        // SAFETY (all writes): the caller passes a pointer to a whole block of `kind`.
        unsafe {
            out.copy_from_nonoverlapping(dh.to_le_bytes().as_ptr(), 2);
            match kind {
                LegacyKind::Q4_0 | LegacyKind::Q8_0 => {}
                LegacyKind::Q4_1 => out.add(2).copy_from_nonoverlapping(mh.to_le_bytes().as_ptr(), 2),
                LegacyKind::Q5_0 => out.add(2).copy_from_nonoverlapping(qh.to_le_bytes().as_ptr(), 4),
                LegacyKind::Q5_1 => {
                    out.add(2).copy_from_nonoverlapping(mh.to_le_bytes().as_ptr(), 2);
                    out.add(4).copy_from_nonoverlapping(qh.to_le_bytes().as_ptr(), 4);
                }
            }
        }
    }

    /// Offset of the `qs` array within a block.
    #[inline(always)]
    const fn qs_offset(kind: LegacyKind) -> usize {
        match kind {
            LegacyKind::Q4_0 | LegacyKind::Q8_0 => 2,
            LegacyKind::Q4_1 => 4,
            LegacyKind::Q5_0 => 6,
            LegacyKind::Q5_1 => 8,
        }
    }

    // ---------------------------------------------------------------- AVX-512

    /// Quantize one row (`x.len()` a multiple of 32) into `out`, writing every byte (so `out` may
    /// be uninitialised); `false` when the row has a NaN or an Inf (the bytes are then unspecified).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(crate) unsafe fn rtn_row_avx512(kind: LegacyKind, x: &[f32], out: &mut [MaybeUninit<u8>]) -> bool {
        match kind {
            LegacyKind::Q4_0 => row512::<0>(x, out),
            LegacyKind::Q4_1 => row512::<1>(x, out),
            LegacyKind::Q5_0 => row512::<2>(x, out),
            LegacyKind::Q5_1 => row512::<3>(x, out),
            LegacyKind::Q8_0 => row512::<4>(x, out),
        }
    }

    const fn kind_of(k: u8) -> LegacyKind {
        match k {
            0 => LegacyKind::Q4_0,
            1 => LegacyKind::Q4_1,
            2 => LegacyKind::Q5_0,
            3 => LegacyKind::Q5_1,
            _ => LegacyKind::Q8_0,
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn row512<const K: u8>(x: &[f32], out: &mut [MaybeUninit<u8>]) -> bool {
        let bytes = kind_of(K).block_bytes();
        let nb = x.len() / 32;
        assert!(x.len().is_multiple_of(32) && out.len() >= nb * bytes);
        let out = out.as_mut_ptr().cast::<u8>();
        let mut ok = true;
        let mut b = 0;
        while b + 16 <= nb {
            ok &= group512::<K>(&x[b * 32..(b + 16) * 32], out.add(b * bytes));
            b += 16;
        }
        while b < nb {
            ok &= block512::<K>(&x[b * 32..b * 32 + 32], out.add(b * bytes));
            b += 1;
        }
        ok
    }

    /// Codes and header of one block from its parameters (d's and the min's f16 bits given).
    #[inline(always)]
    unsafe fn emit512<const K: u8>(v0: __m512, v1: __m512, id: f32, off: f32, dh: u16, mh: u16, ob: *mut u8) {
        let kind = kind_of(K);
        let idv = _mm512_set1_ps(id);
        let qs = ob.add(qs_offset(kind));
        if kind == LegacyKind::Q8_0 {
            let (one, half, mhalf) = (_mm512_set1_epi32(1), _mm512_set1_ps(0.5), _mm512_set1_ps(-0.5));
            let code = |v: __m512| {
                let s = _mm512_mul_ps(v, idv);
                let t = _mm512_roundscale_ps::<TRUNC>(s);
                let f = _mm512_sub_ps(s, t);
                let q = _mm512_cvttps_epi32(t);
                let q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half), q, one);
                _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, mhalf), q, one)
            };
            _mm_storeu_si128(qs.cast(), _mm512_cvtsepi32_epi8(code(v0)));
            _mm_storeu_si128(qs.add(16).cast(), _mm512_cvtsepi32_epi8(code(v1)));
            write_header(kind, ob, dh, 0, 0);
            return;
        }
        let (sym, qmax, add) = kind.code_params();
        let add = _mm512_set1_ps(add);
        let offv = _mm512_set1_ps(off);
        let (zero, top) = (_mm512_setzero_si512(), _mm512_set1_epi32(qmax));
        let code = |v: __m512| {
            let s = if sym { _mm512_mul_ps(v, idv) } else { _mm512_mul_ps(_mm512_sub_ps(v, offv), idv) };
            let q = _mm512_cvttps_epi32(_mm512_add_ps(s, add));
            _mm512_min_epi32(_mm512_max_epi32(q, zero), top)
        };
        let (q0, q1) = (code(v0), code(v1));
        let qh = if qmax == 31 {
            let b4 = _mm512_set1_epi32(16);
            _mm512_test_epi32_mask(q0, b4) as u32 | ((_mm512_test_epi32_mask(q1, b4) as u32) << 16)
        } else {
            0
        };
        let nib = _mm512_set1_epi32(15);
        let packed = _mm512_or_si512(_mm512_and_si512(q0, nib), _mm512_slli_epi32::<4>(_mm512_and_si512(q1, nib)));
        _mm_storeu_si128(qs.cast(), _mm512_cvtepi32_epi8(packed));
        write_header(kind, ob, dh, mh, qh);
    }

    /// One block on its own (the row's last `nb % 16` blocks).
    #[inline(always)]
    unsafe fn block512<const K: u8>(xb: &[f32], ob: *mut u8) -> bool {
        let kind = kind_of(K);
        let p = xb.as_ptr();
        let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let abs = _mm512_set1_epi32(ABS);
        let a0 = _mm512_and_si512(_mm512_castps_si512(v0), abs);
        let a1 = _mm512_and_si512(_mm512_castps_si512(v1), abs);
        let amax_bits = _mm512_reduce_max_epu32(_mm512_max_epu32(a0, a1));
        if amax_bits >= INF_BITS {
            return false;
        }
        let amax = f32::from_bits(amax_bits);
        let (mut signed_max, mut lo, mut hi) = (0.0, 0.0, 0.0);
        match kind {
            LegacyKind::Q4_0 | LegacyKind::Q5_0 => signed_max = signed_absmax(xb),
            LegacyKind::Q4_1 | LegacyKind::Q5_1 => {
                lo = _mm512_reduce_min_ps(_mm512_min_ps(v0, v1));
                hi = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1));
            }
            LegacyKind::Q8_0 => {}
        }
        match params(kind, signed_max, amax, lo, hi) {
            Some((d, id, off)) => emit512::<K>(v0, v1, id, off, f32_to_f16(d), f32_to_f16(off), ob),
            None => scalar_block(kind, xb, ob),
        }
        true
    }

    /// `vpermt2d` indices of round `r` of [`transpose_reduce`]: with `s = 8 >> r` partials per
    /// block after the round and `16 / (2 s)` blocks per input vector, output lane `l` belongs to
    /// block `l / s` (the first vector's blocks, then the second's, index + 16) and takes that
    /// block's partial `l % s` (`lo`) or `l % s + s` (`hi`).
    const fn perm_idx(r: usize, hi: bool) -> [i32; 16] {
        let s = 8 >> r;
        let nb_in = 16 / (2 * s);
        let mut out = [0i32; 16];
        let mut l = 0;
        while l < 16 {
            let (b, p) = (l / s, l % s);
            let (src, blk) = if b < nb_in { (0, b) } else { (16, b - nb_in) };
            out[l] = (src + blk * 2 * s + p + if hi { s } else { 0 }) as i32;
            l += 1;
        }
        out
    }

    const PERM: [[[i32; 16]; 2]; 4] = [
        [perm_idx(0, false), perm_idx(0, true)],
        [perm_idx(1, false), perm_idx(1, true)],
        [perm_idx(2, false), perm_idx(2, true)],
        [perm_idx(3, false), perm_idx(3, true)],
    ];

    /// Lane `k` of the result = `op` over all lanes of `v[k]`, for 16 vectors: four rounds of
    /// two-source permutes, each halving the partials per block and the number of vectors (lane
    /// order ends up as block order).
    #[inline(always)]
    unsafe fn transpose_reduce<T: Copy>(
        mut v: [T; 16],
        perm: impl Fn(T, __m512i, T) -> T,
        op: impl Fn(T, T) -> T,
    ) -> T {
        for (r, idx) in PERM.iter().enumerate() {
            let (il, ih) = (_mm512_loadu_si512(idx[0].as_ptr().cast()), _mm512_loadu_si512(idx[1].as_ptr().cast()));
            for i in 0..(8 >> r) {
                v[i] = op(perm(v[2 * i], il, v[2 * i + 1]), perm(v[2 * i], ih, v[2 * i + 1]));
            }
        }
        v[0]
    }

    /// 16 consecutive blocks: ranges reduced across blocks at once, then d, 1/d and the f16 bits of
    /// d (and of the min) for all 16 with one vector division and one `vcvtps2ph` (round to nearest
    /// even, the same rounding as `f32_to_f16`; checked in the tests).
    #[inline(always)]
    unsafe fn group512<const K: u8>(x: &[f32], out: *mut u8) -> bool {
        let kind = kind_of(K);
        let bytes = kind.block_bytes();
        let p = x.as_ptr();
        if kind == LegacyKind::Q8_0 {
            // Q8_0 only: fetching the group after next (2 KiB ahead) cut its time by ~20% on
            // the Zen 4 VM this was tuned on (min of 30 calls 17.5-20.8 -> 13.1-15.1 ms for
            // 4096x14336); the 4- and 5-bit types measured no gain or a loss, so they rely on
            // the hardware prefetcher.
            for l in 0..32 {
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(2048 + 64 * l));
            }
        }
        let v0: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(p.add(32 * k)));
        let v1: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(p.add(32 * k + 16)));
        let permi = |a: __m512i, i: __m512i, b: __m512i| _mm512_permutex2var_epi32(a, i, b);
        let permf = |a: __m512, i: __m512i, b: __m512| _mm512_permutex2var_ps(a, i, b);
        let zero = _mm512_setzero_ps();
        let (mut amax, mut lo, mut hi) = (zero, zero, zero);
        if kind == LegacyKind::Q8_0 {
            // integer max of |bits| per block: the magnitude and the NaN/Inf check in one
            let abs = _mm512_set1_epi32(ABS);
            let parts: [__m512i; 16] = std::array::from_fn(|k| {
                _mm512_max_epu32(
                    _mm512_and_si512(_mm512_castps_si512(v0[k]), abs),
                    _mm512_and_si512(_mm512_castps_si512(v1[k]), abs),
                )
            });
            let m = transpose_reduce(parts, permi, |a, b| _mm512_max_epu32(a, b));
            if _mm512_cmpge_epu32_mask(m, _mm512_set1_epi32(INF_BITS as i32)) != 0 {
                return false;
            }
            amax = _mm512_castsi512_ps(m);
        } else {
            // only min and max are needed: an Inf reaches them, a NaN may not (min/max return
            // an operand, not NaN), so NaNs are found with unordered compares
            let mut nan: __mmask16 = 0;
            for k in 0..16 {
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v0[k], v1[k]);
            }
            lo = transpose_reduce(std::array::from_fn(|k| _mm512_min_ps(v0[k], v1[k])), permf, |a, b| {
                _mm512_min_ps(a, b)
            });
            hi = transpose_reduce(std::array::from_fn(|k| _mm512_max_ps(v0[k], v1[k])), permf, |a, b| {
                _mm512_max_ps(a, b)
            });
            let inf = _mm512_set1_ps(f32::INFINITY);
            if nan != 0 || _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_max_ps(_mm512_sub_ps(zero, lo), hi), inf) != 0 {
                return false;
            }
        }
        // blocks for the one-at-a-time path (bit k = block k)
        let mut slow: u16 = 0;
        let (d, off) = match kind {
            LegacyKind::Q8_0 => (_mm512_div_ps(amax, _mm512_set1_ps(127.0)), zero),
            LegacyKind::Q4_0 | LegacyKind::Q5_0 => {
                // the signed element of largest magnitude is min or max, unless they tie in
                // magnitude (then the first occurrence decides; this includes all-zero blocks)
                let neg_lo = _mm512_sub_ps(zero, lo);
                slow |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(neg_lo, hi);
                let sm = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(neg_lo, hi), hi, lo);
                let half = if kind == LegacyKind::Q4_0 { -8.0 } else { -16.0 };
                (_mm512_div_ps(sm, _mm512_set1_ps(half)), zero)
            }
            _ => {
                slow |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(lo, zero) | _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(hi, zero);
                let nmax = if kind == LegacyKind::Q4_1 { 15.0 } else { 31.0 };
                (_mm512_div_ps(_mm512_sub_ps(hi, lo), _mm512_set1_ps(nmax)), lo)
            }
        };
        // gguf-py's reciprocal: 0 where d == 0
        let nz = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(d, zero);
        let id = _mm512_maskz_div_ps(nz, _mm512_set1_ps(1.0), d);
        slow |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(id), _mm512_set1_ps(f32::INFINITY));
        const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let mut dh = [0u16; 16];
        let mut mh = [0u16; 16];
        _mm256_storeu_si256(dh.as_mut_ptr().cast(), _mm512_cvtps_ph::<RNE>(d));
        _mm256_storeu_si256(mh.as_mut_ptr().cast(), _mm512_cvtps_ph::<RNE>(off));
        let mut ids = [0f32; 16];
        let mut offs = [0f32; 16];
        _mm512_storeu_ps(ids.as_mut_ptr(), id);
        _mm512_storeu_ps(offs.as_mut_ptr(), off);
        for k in 0..16 {
            let ob = out.add(k * bytes);
            if slow & (1 << k) != 0 {
                block512::<K>(&x[32 * k..32 * k + 32], ob);
            } else {
                // reloaded from L1 rather than kept in 32 registers across the reductions
                let (a, b) = (_mm512_loadu_ps(p.add(32 * k)), _mm512_loadu_ps(p.add(32 * k + 16)));
                emit512::<K>(a, b, ids[k], offs[k], dh[k], mh[k], ob);
            }
        }
        true
    }

    // ---------------------------------------------------------------- AVX2

    /// The AVX2 counterpart of [`rtn_row_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn rtn_row_avx2(kind: LegacyKind, x: &[f32], out: &mut [MaybeUninit<u8>]) -> bool {
        match kind {
            LegacyKind::Q4_0 => row256::<0>(x, out),
            LegacyKind::Q4_1 => row256::<1>(x, out),
            LegacyKind::Q5_0 => row256::<2>(x, out),
            LegacyKind::Q5_1 => row256::<3>(x, out),
            LegacyKind::Q8_0 => row256::<4>(x, out),
        }
    }

    #[inline(always)]
    unsafe fn hmax_epu32(v: __m256i) -> u32 {
        let m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
        let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
        _mm_cvtsi128_si32(m) as u32
    }

    #[inline(always)]
    unsafe fn hmin_ps(v: __m256) -> f32 {
        let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_min_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        _mm_cvtss_f32(m)
    }

    #[inline(always)]
    unsafe fn hmax_ps(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        _mm_cvtss_f32(m)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn row256<const K: u8>(x: &[f32], out: &mut [MaybeUninit<u8>]) -> bool {
        let kind = kind_of(K);
        let bytes = kind.block_bytes();
        let nb = x.len() / 32;
        assert!(x.len().is_multiple_of(32) && out.len() >= nb * bytes);
        let abs = _mm256_set1_epi32(ABS);
        // dword order after the in-lane packs: [0, 4, 1, 5, 2, 6, 3, 7] restores element order
        let fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut ok = true;
        for b in 0..nb {
            let xb = &x[b * 32..b * 32 + 32];
            let ob = out.as_mut_ptr().cast::<u8>().add(b * bytes);
            let p = xb.as_ptr();
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let a = v.map(|t| _mm256_and_si256(_mm256_castps_si256(t), abs));
            let amax_bits = hmax_epu32(_mm256_max_epu32(_mm256_max_epu32(a[0], a[1]), _mm256_max_epu32(a[2], a[3])));
            if amax_bits >= INF_BITS {
                ok = false;
                continue;
            }
            let amax = f32::from_bits(amax_bits);
            let (mut signed_max, mut lo, mut hi) = (0.0, 0.0, 0.0);
            match kind {
                LegacyKind::Q4_0 | LegacyKind::Q5_0 => {
                    let am = _mm256_set1_epi32(amax_bits as i32);
                    let mut m = 0u32;
                    for (i, ai) in a.iter().enumerate() {
                        m |= (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(*ai, am))) as u32) << (8 * i);
                    }
                    signed_max = xb[m.trailing_zeros() as usize];
                }
                LegacyKind::Q4_1 | LegacyKind::Q5_1 => {
                    lo = hmin_ps(_mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3])));
                    hi = hmax_ps(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
                }
                LegacyKind::Q8_0 => {}
            }
            let Some((d, id, off)) = params(kind, signed_max, amax, lo, hi) else {
                scalar_block(kind, xb, ob);
                continue;
            };
            let idv = _mm256_set1_ps(id);
            let qs = ob.add(qs_offset(kind));
            match kind {
                LegacyKind::Q8_0 => {
                    let (half, mhalf) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
                    let code = |v: __m256| {
                        let s = _mm256_mul_ps(v, idv);
                        let t = _mm256_round_ps::<TRUNC>(s);
                        let f = _mm256_sub_ps(s, t);
                        let q = _mm256_cvttps_epi32(t);
                        // comparison masks are -1 where true
                        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half));
                        let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, mhalf));
                        _mm256_add_epi32(_mm256_sub_epi32(q, up), down)
                    };
                    let q = v.map(code);
                    // saturating packs = clamp(-128, 127)
                    let w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                    _mm256_storeu_si256(qs.cast(), _mm256_permutevar8x32_epi32(w, fix));
                    write_header(kind, ob, f32_to_f16(d), 0, 0);
                }
                _ => {
                    let (sym, qmax, add) = kind.code_params();
                    let add = _mm256_set1_ps(add);
                    let offv = _mm256_set1_ps(off);
                    let (zero, top) = (_mm256_setzero_si256(), _mm256_set1_epi32(qmax));
                    let code = |v: __m256| {
                        let s = if sym { _mm256_mul_ps(v, idv) } else { _mm256_mul_ps(_mm256_sub_ps(v, offv), idv) };
                        let q = _mm256_cvttps_epi32(_mm256_add_ps(s, add));
                        _mm256_min_epi32(_mm256_max_epi32(q, zero), top)
                    };
                    let q = v.map(code);
                    let qh = if qmax == 31 {
                        let mut h = 0u32;
                        for (i, qi) in q.iter().enumerate() {
                            // bit 4 to the sign bit, then one bit per lane
                            h |= (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<27>(*qi))) as u32)
                                << (8 * i);
                        }
                        h
                    } else {
                        0
                    };
                    let nib = _mm256_set1_epi32(15);
                    let lo8 = _mm256_or_si256(
                        _mm256_and_si256(q[0], nib),
                        _mm256_slli_epi32::<4>(_mm256_and_si256(q[2], nib)),
                    );
                    let hi8 = _mm256_or_si256(
                        _mm256_and_si256(q[1], nib),
                        _mm256_slli_epi32::<4>(_mm256_and_si256(q[3], nib)),
                    );
                    // bytes 0..8 from lo8, 8..16 from hi8 (values <= 255, so the packs are exact)
                    let w = _mm256_packus_epi16(_mm256_packs_epi32(lo8, hi8), _mm256_setzero_si256());
                    let w = _mm256_permutevar8x32_epi32(w, fix);
                    _mm_storeu_si128(qs.cast(), _mm256_castsi256_si128(w));
                    write_header(kind, ob, f32_to_f16(d), f32_to_f16(off), qh);
                }
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use crate::formats::ggml::any::{quantize, quantize_ref};
    use crate::formats::ggml::block::{GgmlType, QuantMode};
    use crate::simd::KernelLevel;

    const TYPES: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

    /// A deterministic mix of hard blocks: zeros of both signs, constants, ties after scaling,
    /// tiny (subnormal) and huge magnitudes, repeated maxima of both signs, all-positive and
    /// all-negative blocks, and plain noise.
    fn hard_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut x = vec![0f32; rows * cols];
        for blk in x.chunks_mut(32) {
            let kind = rnd() % 14;
            for (j, v) in blk.iter_mut().enumerate() {
                let u = (rnd() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                *v = match kind {
                    0 => 0.0,
                    1 => {
                        if j % 3 == 0 {
                            -0.0
                        } else {
                            0.0
                        }
                    }
                    2 => 0.75,
                    3 => (((rnd() % 33) as f32) - 16.0) * 0.5, // halves: ties for Q8_0 / Q4_0
                    4 => u as f32 * 1e-38,                     // subnormal scale (scalar fallback)
                    5 => u as f32 * 3e-37,
                    6 => u as f32 * 1e30,
                    7 => {
                        if j == 5 || j == 20 {
                            -2.0
                        } else if j == 9 {
                            2.0
                        } else {
                            u as f32
                        }
                    }
                    8 => u.abs() as f32 + 0.25,
                    9 => -(u.abs() as f32) - 0.25,
                    10 => {
                        if j % 2 == 0 {
                            0.0
                        } else {
                            u.abs() as f32
                        }
                    }
                    11 => ((rnd() % 255) as f32 - 127.0) / 127.0 * 3.0,
                    12 => (u * 1000.0).round() as f32 / 64.0,
                    _ => u as f32 * 7.0,
                };
            }
        }
        x
    }

    #[test]
    fn rtn_fast_paths_equal_scalar_reference_at_every_level() {
        for (rows, nblocks, seed) in [(1usize, 1usize, 1u64), (3, 7, 2), (5, 33, 3), (17, 3, 4), (2, 449, 5)] {
            let cols = nblocks * 32;
            let x = hard_matrix(rows, cols, seed);
            for t in TYPES {
                let reference = quantize_ref(t, &x, rows, cols, None, QuantMode::Rtn).unwrap();
                for level in KernelLevel::available() {
                    let fast = quantize(t, &x, rows, cols, None, QuantMode::Rtn, level).unwrap();
                    if let Some(i) = fast.iter().zip(&reference).position(|(a, b)| a != b) {
                        let blk = i / t.type_size();
                        panic!(
                            "{} at {}: block {blk} differs (byte {}): {:?} vs {:?}; input {:?}",
                            t.name(),
                            level.name(),
                            i % t.type_size(),
                            &fast[blk * t.type_size()..(blk + 1) * t.type_size()],
                            &reference[blk * t.type_size()..(blk + 1) * t.type_size()],
                            &x[blk * 32..blk * 32 + 32]
                        );
                    }
                }
            }
        }
    }

    /// The 16-block path rounds scales to f16 with `vcvtps2ph` (round to nearest even); it must
    /// agree with the scalar `f32_to_f16` everywhere a finite scale can land, subnormals included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vcvtps2ph_equals_f32_to_f16() {
        use crate::formats::half_float::f32_to_f16_bits as f32_to_f16;
        use std::arch::x86_64::*;
        if !KernelLevel::Avx512.supported() {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn conv(x: &[f32; 16]) -> [u16; 16] {
            let mut o = [0u16; 16];
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(x.as_ptr()));
            _mm256_storeu_si256(o.as_mut_ptr().cast(), h);
            o
        }
        let mut buf = [0f32; 16];
        let mut n = 0;
        let mut check = |b: u32| {
            buf[n] = f32::from_bits(b);
            n += 1;
            if n == 16 {
                // SAFETY: AVX-512F checked above.
                let got = unsafe { conv(&buf) };
                for (x, g) in buf.iter().zip(got) {
                    assert_eq!(g, f32_to_f16(*x), "{:#x}", x.to_bits());
                }
                n = 0;
            }
        };
        // every f16 rounding boundary: the midpoints between neighbouring f16 values (ties) and
        // one f32 ulp either side, both signs
        for h in 0u16..0x7bff {
            let (a, b) = (half::f16::from_bits(h).to_f32(), half::f16::from_bits(h + 1).to_f32());
            let mid = ((a as f64 + b as f64) / 2.0) as f32; // exact: f16 midpoints fit in f32
            for m in [mid.to_bits() - 1, mid.to_bits(), mid.to_bits() + 1] {
                check(m);
                check(m | 0x8000_0000);
            }
        }
        // and a dense stride over the range where f16 is not zero or Inf, and a coarse one elsewhere
        for b in (0x3300_0000u32..0x4780_0000).step_by(31) {
            check(b);
            check(b | 0x8000_0000);
        }
        for b in (0..0x7f80_0000u32).step_by(997) {
            check(b);
        }
    }

    #[test]
    fn rtn_fast_paths_report_non_finite_weights() {
        // a lone block (96 columns: three blocks, no 16-block group) and positions in the first
        // and second 16-block groups and in the tail of a 40-block row, at both block halves
        for (cols, col) in [(96usize, 40usize), (1280, 3), (1280, 31), (1280, 16 * 32 + 20), (1280, 33 * 32 + 17)] {
            let rows = 3;
            for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = hard_matrix(rows, cols, 9);
                x[cols + col] = bad;
                for t in TYPES {
                    for level in KernelLevel::available() {
                        let e = quantize(t, &x, rows, cols, None, QuantMode::Rtn, level).unwrap_err().to_string();
                        assert!(
                            e.contains("row 1") && e.contains(&col.to_string()),
                            "{} {} {bad} at {col}: {e}",
                            t.name(),
                            level.name()
                        );
                    }
                }
            }
        }
    }
}
