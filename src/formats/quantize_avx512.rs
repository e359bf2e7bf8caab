//! AVX-512 row kernels for weight quantization (INT8 per channel, INT4 grouped): one pass for
//! the range (with the NaN/Inf check), one over the L1/L2-resident row for the codes, rounding
//! with `vrndscaleps` (ties to even) and narrowing with `vpmovdb` / `vpmovqb`. They produce the
//! same bytes as `formats::{int8, int4}::quantize_ref` (same division, rounding and clamps; the
//! scale and zero point come from the same scalar `row_params` / `group_params`), which the
//! format tests check at every level.

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::*;

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use crate::formats::int4::group_params;
    use crate::formats::int8::row_params;

    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    #[inline(always)]
    fn tail_mask(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// (min, max, absmax, all finite) of `w`.
    #[inline(always)]
    unsafe fn stats(w: &[f32]) -> (f32, f32, f32, bool) {
        let p = w.as_ptr();
        let exp = _mm512_set1_epi32(0x7f80_0000);
        let mut lo = _mm512_set1_ps(f32::INFINITY);
        let mut hi = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut bad: u16 = 0;
        let mut i = 0;
        while i < w.len() {
            let mask = tail_mask(w.len() - i);
            let v = _mm512_maskz_loadu_ps(mask, p.add(i));
            lo = _mm512_mask_min_ps(lo, mask, lo, v);
            hi = _mm512_mask_max_ps(hi, mask, hi, v);
            bad |= _mm512_mask_cmpeq_epi32_mask(mask, _mm512_and_si512(_mm512_castps_si512(v), exp), exp);
            i += 16;
        }
        let (l, h) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        (l, h, l.abs().max(h.abs()), bad == 0)
    }

    /// `clamp(round_ties_even(v / scale) + zp, lo, hi)` as i32 lanes.
    #[inline(always)]
    unsafe fn codes(v: __m512, scale: __m512, zp: __m512, lo: __m512, hi: __m512) -> __m512i {
        let t = _mm512_add_ps(_mm512_roundscale_ps::<NEAREST>(_mm512_div_ps(v, scale)), zp);
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t, lo), hi))
    }

    /// Quantize one INT8 row; `None` when it has a non-finite value or an unusable range.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(crate) unsafe fn int8_row_avx512(w: &[f32], q: &mut [i8], symmetric: bool) -> Option<(f32, i8)> {
        let (lo, hi, absmax, finite) = stats(w);
        if !finite {
            return None;
        }
        let (s, zp) = row_params(lo, hi, absmax, symmetric)?;
        let (sv, zv) = (_mm512_set1_ps(s), _mm512_set1_ps(zp as f32));
        let (qlo, qhi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        let (p, o) = (w.as_ptr(), q.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= w.len() {
            let c = codes(_mm512_loadu_ps(p.add(i)), sv, zv, qlo, qhi);
            _mm_storeu_si128(o.add(i).cast(), _mm512_cvtepi32_epi8(c));
            i += 16;
        }
        if i < w.len() {
            let mask = tail_mask(w.len() - i);
            let c = codes(_mm512_maskz_loadu_ps(mask, p.add(i)), sv, zv, qlo, qhi);
            _mm512_mask_cvtepi32_storeu_epi8(o.add(i).cast(), mask, c);
        }
        Some((s, zp))
    }

    /// A whole 32-column group without masks: two vectors, one 16-byte store. (Its own
    /// target features so that its closures get them too and their intrinsics inline.)
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn full_group32(vals: &[f32], symmetric: bool, out: *mut u8, scale: &mut f32, zero: &mut u8) -> Option<()> {
        let p = vals.as_ptr();
        let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let exp = _mm512_set1_epi32(0x7f80_0000);
        let e = |v: __m512| _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exp), exp);
        if (e(v0) | e(v1)) != 0 {
            return None;
        }
        let (lo, hi) = (_mm512_reduce_min_ps(_mm512_min_ps(v0, v1)), _mm512_reduce_max_ps(_mm512_max_ps(v0, v1)));
        let (s, zp) = group_params(lo, hi, lo.abs().max(hi.abs()), symmetric)?;
        *scale = s;
        *zero = zp;
        let (sv, zv) = (_mm512_set1_ps(s), _mm512_set1_ps(zp as f32));
        let (qlo, qhi) = (_mm512_set1_ps(0.0), _mm512_set1_ps(15.0));
        let pack = |v: __m512| {
            let c = codes(v, sv, zv, qlo, qhi);
            _mm512_cvtepi64_epi8(_mm512_or_si512(c, _mm512_srli_epi64::<28>(c)))
        };
        _mm_storeu_si128(out.cast(), _mm_unpacklo_epi64(pack(v0), pack(v1)));
        Some(())
    }

    /// Quantize and pack one INT4 row. `Err(group)` names the first bad group.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(crate) unsafe fn int4_row_avx512(
        w: &[f32],
        group: usize,
        symmetric: bool,
        packed: &mut [u8],
        scales: &mut [f32],
        zeros: &mut [u8],
    ) -> Result<(), usize> {
        let cols = w.len();
        let (qlo, qhi) = (_mm512_set1_ps(0.0), _mm512_set1_ps(15.0));
        let o = packed.as_mut_ptr();
        for gi in 0..cols.div_ceil(group) {
            let start = gi * group;
            let end = (start + group).min(cols);
            let vals = &w[start..end];
            if vals.len() == 32 {
                full_group32(vals, symmetric, o.add(start / 2), &mut scales[gi], &mut zeros[gi]).ok_or(gi)?;
                continue;
            }
            let (lo, hi, absmax, finite) = stats(vals);
            if !finite {
                return Err(gi);
            }
            let (s, zp) = group_params(lo, hi, absmax, symmetric).ok_or(gi)?;
            scales[gi] = s;
            zeros[gi] = zp;
            let (sv, zv) = (_mm512_set1_ps(s), _mm512_set1_ps(zp as f32));
            let p = vals.as_ptr();
            let mut i = 0;
            // 16 codes -> 8 bytes: in each 64-bit lane (even col low, odd col high) fold the odd
            // code down next to the even one, then keep the low byte of each lane.
            while i < vals.len() {
                let n = vals.len() - i;
                let mask = tail_mask(n);
                let c = codes(_mm512_maskz_loadu_ps(mask, p.add(i)), sv, zv, qlo, qhi);
                // masked-off lanes are 0 after the load, but may clamp to zp: zero them
                let c = _mm512_maskz_mov_epi32(mask, c);
                let t = _mm512_or_si512(c, _mm512_srli_epi64::<28>(c));
                let bytes = n.min(16).div_ceil(2);
                let bmask: u8 = if bytes >= 8 { u8::MAX } else { (1u8 << bytes) - 1 };
                _mm512_mask_cvtepi64_storeu_epi8(o.add((start + i) / 2).cast(), bmask, t);
                i += 16;
            }
        }
        Ok(())
    }
}
