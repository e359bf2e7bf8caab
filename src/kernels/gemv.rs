//! Fused GEMV for weight-only INT8 / INT4: the weights are decoded in registers straight from
//! their packed bytes and multiplied into up to `MR` activation rows at once, so no f32 copy of a
//! weight row is ever written. This is the batch-1 (decode) path and the small-batch path.
//!
//! INT8: `y = scale * sum_k x[k] * (q[k] - zp) + b` (integer subtraction, exact conversion).
//! INT4: per group `scale_g * sum x * (u - zp_g)`; activations arrive in the INT4 kernel order
//! (`act::to_int4_order`) so the low and the high nibbles of 16 bytes meet 16 contiguous
//! activations each. Columns past the last full 32-column chunk are summed in scalar code.
//! The AVX-512 INT4 GEMV lives in `gemv_int4.rs` (table decode, four weight rows per pass at
//! batch 1); this file keeps the AVX2 and portable INT4 loops.

use super::linear::{for_each_row_block, Int4Weights, Int8Weights};
use crate::simd::KernelLevel;

/// Activation rows per weight decode.
pub const MR: usize = 4;

/// Columns per pass. Splitting rows into column blocks (so the activation slice stays in L1)
/// was measured to hurt: DRAM streaming of the weights suffers more from the shorter per-row
/// runs than the L2-resident activations cost (a 14336-wide f32 activation row is 57 KiB, L2
/// holds it). So in practice one pass covers the whole row; the blocking stays for rows wider
/// than this. A multiple of every INT4 group size.
fn k_block(_m: usize) -> usize {
    65536
}

/// Run `f(ni, c0, c1, mi, rows, d)` over the task's rows and column blocks, accumulating the
/// partial sums `d[..rows]` per (row, activation row); then `finish(ni, mi, sum)` writes them.
fn blocked(
    m: usize,
    k: usize,
    n0: usize,
    n1: usize,
    mut f: impl FnMut(usize, usize, usize, usize, usize, &mut [f32; MR]),
    mut finish: impl FnMut(usize, usize, f32),
) {
    let kb = k_block(m);
    let mut acc = vec![0f32; (n1 - n0) * m];
    let mut c0 = 0;
    while c0 < k {
        let c1 = (c0 + kb).min(k);
        for ni in n0..n1 {
            let mut mi = 0;
            while mi < m {
                let rows = MR.min(m - mi);
                let mut d = [0f32; MR];
                f(ni, c0, c1, mi, rows, &mut d);
                for r in 0..rows {
                    acc[(ni - n0) * m + mi + r] += d[r];
                }
                mi += rows;
            }
        }
        c0 = c1;
    }
    for ni in n0..n1 {
        for mi in 0..m {
            finish(ni, mi, acc[(ni - n0) * m + mi]);
        }
    }
}

/// `out[m, n] = x @ W^T + b` for INT8 weights, `x` f32 in natural order, rows of W in parallel.
pub fn int8_gemv(level: KernelLevel, x: &[f32], m: usize, w: &Int8Weights, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.scales.len(), w.k);
    #[cfg(target_arch = "x86_64")]
    if m == 1 && k > 4096 && level.has_avx512() {
        // batch 1, wide rows: four weight rows per pass share every activation load (an
        // activation row over 16 KiB lives in L2, and reloading it once per weight row was the
        // bottleneck); narrower rows stay in L1 and the one-row kernel is faster there
        for_each_row_block(n, out, m * n * k, |n0, n1, ptr| {
            let mut ni = n0;
            while ni < n1 {
                let cnt = 4.min(n1 - ni);
                let d = if cnt == 4 {
                    let q: [*const i8; 4] = [0, 1, 2, 3].map(|r| w.q[(ni + r) * k..].as_ptr());
                    let zp = [0, 1, 2, 3].map(|r| w.zero_points[ni + r] as i32);
                    // SAFETY: the level was checked by KernelLevel::resolve; each row has k bytes.
                    unsafe {
                        if zp == [0; 4] {
                            int8_dot4_avx512::<false>(q, zp, k, x.as_ptr())
                        } else {
                            int8_dot4_avx512::<true>(q, zp, k, x.as_ptr())
                        }
                    }
                } else {
                    let mut d = [0f32; MR];
                    for r in 0..cnt {
                        let mut one = [0f32; MR];
                        int8_rows(
                            level,
                            &w.q[(ni + r) * k..(ni + r + 1) * k],
                            w.zero_points[ni + r] as i32,
                            x,
                            k,
                            1,
                            &mut one,
                        );
                        d[r] = one[0];
                    }
                    d
                };
                for r in 0..cnt {
                    let b = bias.map_or(0.0, |b| b[ni + r]);
                    // SAFETY: column ni + r belongs to this block alone.
                    unsafe { *ptr.0.add(ni + r) = w.scales[ni + r] * d[r] + b };
                }
                ni += cnt;
            }
        });
        return;
    }
    for_each_row_block(n, out, m * n * k, |n0, n1, ptr| {
        blocked(
            m,
            k,
            n0,
            n1,
            |ni, c0, c1, mi, rows, d| {
                let q = &w.q[ni * k + c0..ni * k + c1];
                int8_rows(level, q, w.zero_points[ni] as i32, &x[mi * k + c0..], k, rows, d)
            },
            // SAFETY: column ni belongs to this block alone.
            |ni, mi, sum| unsafe { *ptr.0.add(mi * n + ni) = w.scales[ni] * sum + bias.map_or(0.0, |b| b[ni]) },
        )
    });
}

/// `out[m, n] = x @ W^T + b` for INT4 weights, `x` f32 in INT4 kernel order.
pub fn int4_gemv(level: KernelLevel, x: &[f32], m: usize, w: &Int4Weights, bias: Option<&[f32]>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level.has_avx512() {
        // table decode, several weight rows per activation load at batch 1 (gemv_int4.rs)
        // SAFETY: the level was checked by KernelLevel::resolve.
        unsafe { super::gemv_int4::int4_gemv_avx512(x, m, w, bias, out) };
        return;
    }
    let (n, k) = (w.layout.rows, w.layout.cols);
    let (rb, g) = (w.layout.row_bytes(), w.layout.groups());
    for_each_row_block(n, out, m * n * k, |n0, n1, ptr| {
        blocked(
            m,
            k,
            n0,
            n1,
            |ni, c0, c1, mi, rows, d| {
                let row = Int4Row {
                    packed: &w.packed[ni * rb..(ni + 1) * rb],
                    scales: &w.scales[ni * g..(ni + 1) * g],
                    zeros: &w.zeros[ni * g..(ni + 1) * g],
                    group: w.layout.group,
                    k,
                    c0,
                    c1,
                };
                int4_rows(level, &row, &x[mi * k..(mi + rows) * k], rows, d)
            },
            // SAFETY: column ni belongs to this block alone.
            |ni, mi, sum| unsafe { *ptr.0.add(mi * n + ni) = sum + bias.map_or(0.0, |b| b[ni]) },
        )
    });
}

/// One INT4 weight row, restricted to columns `c0..c1` (`c0` a multiple of the group size).
pub struct Int4Row<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [f32],
    pub zeros: &'a [u8],
    pub group: usize,
    pub k: usize,
    pub c0: usize,
    pub c1: usize,
}

impl Int4Row<'_> {
    /// End of the columns handled by the SIMD loops (whole 32-column chunks).
    #[inline(always)]
    fn full(&self) -> usize {
        self.c1.min(self.k / 32 * 32)
    }

    /// Groups the SIMD loops cover.
    #[inline(always)]
    fn simd_groups(&self) -> std::ops::Range<usize> {
        self.c0 / self.group..self.full().div_ceil(self.group).max(self.c0 / self.group)
    }

    /// Scalar sum over the columns past the last full chunk (natural order there).
    #[inline(always)]
    fn tail(&self, x: &[f32]) -> f32 {
        let mut s = 0f32;
        for c in (self.k / 32 * 32).max(self.c0)..self.c1 {
            let b = self.packed[c / 2];
            let u = if c % 2 == 0 { b & 0x0f } else { b >> 4 };
            let gi = c / self.group;
            s += x[c] * ((u as i32 - self.zeros[gi] as i32) as f32 * self.scales[gi]);
        }
        s
    }
}

/// `d[r] = sum_j x[r * stride + j] * (q[j] - zp)` over `j < q.len()`, for `rows` rows of `x`.
fn int8_rows(level: KernelLevel, q: &[i8], zp: i32, x: &[f32], stride: usize, rows: usize, d: &mut [f32; MR]) {
    let k = q.len();
    assert!(rows >= 1 && x.len() >= (rows - 1) * stride + k);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! rows {
            ($f:ident, $zp:literal) => {{
                let p = x.as_ptr();
                // SAFETY: the level was checked by KernelLevel::resolve; pointers stay in bounds (k columns).
                unsafe {
                    match rows {
                        1 => d[..1].copy_from_slice(&$f::<1, $zp>(q.as_ptr(), k, zp, [p])),
                        2 => d[..2].copy_from_slice(&$f::<2, $zp>(q.as_ptr(), k, zp, [p, p.add(stride)])),
                        3 => d[..3].copy_from_slice(&$f::<3, $zp>(
                            q.as_ptr(),
                            k,
                            zp,
                            [p, p.add(stride), p.add(2 * stride)],
                        )),
                        _ => d.copy_from_slice(&$f::<4, $zp>(
                            q.as_ptr(),
                            k,
                            zp,
                            [p, p.add(stride), p.add(2 * stride), p.add(3 * stride)],
                        )),
                    }
                }
            }};
        }
        macro_rules! go {
            ($f:ident) => {{
                if zp == 0 {
                    rows!($f, false)
                } else {
                    rows!($f, true)
                }
                return;
            }};
        }
        if level.has_avx512() {
            go!(int8_dot_avx512)
        }
        if level.has_avx2_only() {
            go!(int8_dot_avx2)
        }
    }
    for r in 0..rows {
        let xr = &x[r * stride..r * stride + k];
        d[r] = xr.iter().zip(q).map(|(a, b)| a * (*b as i32 - zp) as f32).sum();
    }
}

fn int4_rows(level: KernelLevel, w: &Int4Row, x: &[f32], rows: usize, d: &mut [f32; MR]) {
    let k = w.k;
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! go {
            ($f:ident) => {{
                let p = x.as_ptr();
                // SAFETY: the level was checked by KernelLevel::resolve; pointers stay in bounds.
                let v: [f32; MR] = unsafe {
                    match rows {
                        1 => pad($f::<1>(w, [p])),
                        2 => pad($f::<2>(w, [p, p.add(k)])),
                        3 => pad($f::<3>(w, [p, p.add(k), p.add(2 * k)])),
                        _ => pad($f::<4>(w, [p, p.add(k), p.add(2 * k), p.add(3 * k)])),
                    }
                };
                for r in 0..rows {
                    d[r] = v[r] + w.tail(&x[r * k..(r + 1) * k]);
                }
                return;
            }};
        }
        // AVX-512 never gets here: int4_gemv hands it to gemv_int4.rs
        if level.has_avx2_only() {
            go!(int4_dot_avx2)
        }
    }
    // portable: decode a chunk at a time into a small buffer
    let full = w.full();
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        let mut s = 0f32;
        for c in (w.c0..full).step_by(32) {
            let gi = c / w.group;
            let (z, sc) = (w.zeros[gi] as i32, w.scales[gi]);
            let bytes = &w.packed[c / 2..c / 2 + 16];
            let mut t = 0f32;
            for i in 0..16 {
                t += xr[c + i] * ((bytes[i] & 0x0f) as i32 - z) as f32;
                t += xr[c + 16 + i] * ((bytes[i] >> 4) as i32 - z) as f32;
            }
            s += t * sc;
        }
        d[r] = s + w.tail(xr);
    }
}

#[inline(always)]
fn pad<const R: usize>(v: [f32; R]) -> [f32; MR] {
    let mut o = [0f32; MR];
    o[..R].copy_from_slice(&v);
    o
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// INT8 row against `R` activation rows, 16 lanes, 4 independent accumulator chains per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn int8_dot_avx512<const R: usize, const ZP: bool>(
    q: *const i8,
    k: usize,
    zp: i32,
    x: [*const f32; R],
) -> [f32; R] {
    let z = _mm512_set1_epi32(zp);
    // symmetric weights (zero point 0, the default) skip the subtraction
    let dec = |i: usize| {
        let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(i).cast()));
        _mm512_cvtepi32_ps(if ZP { _mm512_sub_epi32(v, z) } else { v })
    };
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let mut i = 0;
    while i + 64 <= k {
        let w = [dec(i), dec(i + 16), dec(i + 32), dec(i + 48)];
        for r in 0..R {
            for u in 0..4 {
                acc[r][u] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(x[r].add(i + 16 * u)), acc[r][u]);
            }
        }
        i += 64;
    }
    while i + 16 <= k {
        let w = dec(i);
        for r in 0..R {
            acc[r][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[r].add(i)), acc[r][0]);
        }
        i += 16;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let s = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
        let mut t = _mm512_reduce_add_ps(s);
        for j in i..k {
            t += *x[r].add(j) * (*q.add(j) as i32 - zp) as f32;
        }
        out[r] = t;
    }
    out
}

/// Four INT8 weight rows against one activation row: `d[r] = sum_j x[j] * (q[r][j] - zp[r])`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn int8_dot4_avx512<const ZP: bool>(q: [*const i8; 4], zp: [i32; 4], k: usize, x: *const f32) -> [f32; 4] {
    let z = [_mm512_set1_epi32(zp[0]), _mm512_set1_epi32(zp[1]), _mm512_set1_epi32(zp[2]), _mm512_set1_epi32(zp[3])];
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 32 <= k {
        let x0 = _mm512_loadu_ps(x.add(i));
        let x1 = _mm512_loadu_ps(x.add(i + 16));
        for r in 0..4 {
            let mut v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(q[r].add(i).cast()));
            let mut v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(q[r].add(i + 16).cast()));
            if ZP {
                v0 = _mm512_sub_epi32(v0, z[r]);
                v1 = _mm512_sub_epi32(v1, z[r]);
            }
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), x1, acc[r][1]);
        }
        i += 32;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let mut t = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        for j in i..k {
            t += *x.add(j) * (*q[r].add(j) as i32 - zp[r]) as f32;
        }
        out[r] = t;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int8_dot_avx2<const R: usize, const ZP: bool>(
    q: *const i8,
    k: usize,
    zp: i32,
    x: [*const f32; R],
) -> [f32; R] {
    let z = _mm256_set1_epi32(zp);
    let dec = |i: usize| {
        let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(i).cast()));
        _mm256_cvtepi32_ps(if ZP { _mm256_sub_epi32(v, z) } else { v })
    };
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut i = 0;
    while i + 16 <= k {
        let w = [dec(i), dec(i + 8)];
        for r in 0..R {
            for u in 0..2 {
                acc[r][u] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(x[r].add(i + 8 * u)), acc[r][u]);
            }
        }
        i += 16;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut t = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
        for j in i..k {
            t += *x[r].add(j) * (*q.add(j) as i32 - zp) as f32;
        }
        out[r] = t;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int4_dot_avx2<const R: usize>(w: &Int4Row, x: [*const f32; R]) -> [f32; R] {
    let full = w.full();
    let mask = _mm256_set1_epi32(0x0f);
    let p = w.packed.as_ptr();
    let group_sum = |gi: usize, acc: &mut [__m256; R]| {
        let start = gi * w.group;
        let end = (start + w.group).min(full);
        let z = _mm256_set1_epi32(*w.zeros.get_unchecked(gi) as i32);
        let mut t = [[_mm256_setzero_ps(); 2]; R];
        let mut c = start;
        while c < end {
            let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(c / 2).cast()));
            let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(c / 2 + 8).cast()));
            let d = |v: __m256i| _mm256_cvtepi32_ps(_mm256_sub_epi32(v, z));
            let ws = [
                d(_mm256_and_si256(v0, mask)),
                d(_mm256_and_si256(v1, mask)),
                d(_mm256_srli_epi32(v0, 4)),
                d(_mm256_srli_epi32(v1, 4)),
            ];
            for r in 0..R {
                for (u, wv) in ws.iter().enumerate() {
                    t[r][u & 1] = _mm256_fmadd_ps(*wv, _mm256_loadu_ps(x[r].add(c + 8 * u)), t[r][u & 1]);
                }
            }
            c += 32;
        }
        let s = _mm256_set1_ps(*w.scales.get_unchecked(gi));
        for r in 0..R {
            acc[r] = _mm256_fmadd_ps(_mm256_add_ps(t[r][0], t[r][1]), s, acc[r]);
        }
    };
    let groups = w.simd_groups();
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let (mut gi, groups) = (groups.start, groups.end);
    while gi + 2 <= groups {
        group_sum(gi, &mut a0);
        group_sum(gi + 1, &mut a1);
        gi += 2;
    }
    if gi < groups {
        group_sum(gi, &mut a0);
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum256(_mm256_add_ps(a0[r], a1[r]));
    }
    out
}
