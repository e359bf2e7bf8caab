//! Integer dot-product tiles for W8A8: `sum_k x[r, k] * w[j, k]` for a tile of activation rows
//! `r` and weight rows `j`, exact in wrapping i32 arithmetic.
//!
//! VNNI (`vpdpbusd`) multiplies unsigned by signed bytes. Flipping the sign bit of a weight byte
//! (`w ^ 0x80`) reads it as the unsigned `w + 128`, so the instruction yields
//! `sum (w + 128) * x = sum w * x + 128 * sum x`; the per-row activation sum (computed once per
//! call) removes the second term. Partial sums may wrap, but the true result fits in i32 for the
//! `k` the caller allows, and wrapping arithmetic is exact modulo 2^32.
//! Without VNNI the tiles widen bytes to i16 and use `vpmaddwd` (exact i32 pair sums).

use crate::simd::KernelLevel;

/// Largest tile: activation rows x weight rows.
pub const TILE_M: usize = 4;
pub const TILE_N: usize = 4;

/// Call `f(mi, ni, dot)` for every activation row `mi < m` and weight row `ni` in `n0..n1`,
/// with `dot = sum_k xq[mi, k] * wq[ni, k]` (wrapping i32). `xsum[mi] = sum_k xq[mi, k]`.
#[allow(clippy::too_many_arguments)]
pub fn dot_block(
    level: KernelLevel,
    xq: &[i8],
    xsum: &[i32],
    m: usize,
    k: usize,
    wq: &[i8],
    n0: usize,
    n1: usize,
    mut f: impl FnMut(usize, usize, i32),
) {
    let max_m = if level.has_avx512() { TILE_M } else { 2 };
    let mut j = n0;
    while j < n1 {
        let cols = if n1 - j >= TILE_N { TILE_N } else { 1 };
        let mut i = 0;
        while i < m {
            let rows = max_m.min(m - i);
            let mut d = [[0i32; TILE_N]; TILE_M];
            tile(
                level,
                &xq[i * k..(i + rows) * k],
                &xsum[i..i + rows],
                &wq[j * k..(j + cols) * k],
                k,
                rows,
                cols,
                &mut d,
            );
            for (r, dr) in d.iter().enumerate().take(rows) {
                for (c, v) in dr.iter().enumerate().take(cols) {
                    f(i + r, j + c, *v);
                }
            }
            i += rows;
        }
        j += cols;
    }
}

/// Exact scalar tile (the reference the SIMD tiles must match bit for bit).
fn tile_scalar(x: &[i8], w: &[i8], k: usize, rows: usize, cols: usize, d: &mut [[i32; TILE_N]; TILE_M]) {
    for r in 0..rows {
        for c in 0..cols {
            let (xr, wr) = (&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
            d[r][c] = xr.iter().zip(wr).fold(0i32, |a, (p, q)| a.wrapping_add(*p as i32 * *q as i32));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn tile(
    level: KernelLevel,
    x: &[i8],
    xsum: &[i32],
    w: &[i8],
    k: usize,
    rows: usize,
    cols: usize,
    d: &mut [[i32; TILE_N]; TILE_M],
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! call {
            ($f:ident, $r:literal, $c:literal) => {{
                let xp: [*const i8; $r] = std::array::from_fn(|i| x[i * k..].as_ptr());
                let wp: [*const i8; $c] = std::array::from_fn(|i| w[i * k..].as_ptr());
                let xs: [i32; $r] = std::array::from_fn(|i| xsum[i]);
                // SAFETY: the level was checked by KernelLevel::resolve; every pointer has k bytes.
                let v = unsafe { $f::<$r, $c>(xp, wp, k, xs) };
                for r in 0..$r {
                    d[r][..$c].copy_from_slice(&v[r]);
                }
                return;
            }};
        }
        macro_rules! shapes {
            ($f:ident) => {
                match (rows, cols) {
                    (1, 1) => call!($f, 1, 1),
                    (2, 1) => call!($f, 2, 1),
                    (3, 1) => call!($f, 3, 1),
                    (4, 1) => call!($f, 4, 1),
                    (1, 4) => call!($f, 1, 4),
                    (2, 4) => call!($f, 2, 4),
                    (3, 4) => call!($f, 3, 4),
                    (4, 4) => call!($f, 4, 4),
                    _ => unreachable!("tile {rows}x{cols}"),
                }
            };
        }
        match level {
            KernelLevel::Avx512Vnni => shapes!(tile_avx512_vnni),
            KernelLevel::Avx512 => shapes!(tile_avx512),
            KernelLevel::AvxVnni => shapes!(tile_avx_vnni),
            KernelLevel::Avx2 => shapes!(tile_avx2),
            KernelLevel::Scalar => {}
        }
    }
    let _ = (level, xsum);
    tile_scalar(x, w, k, rows, cols, d)
}

/// Scalar remainder `sum_{kk >= from} x * (w + shift)` per (r, c), wrapping.
#[inline(always)]
unsafe fn tail<const R: usize, const C: usize>(
    x: [*const i8; R],
    w: [*const i8; C],
    from: usize,
    k: usize,
    shift: i32,
    acc: &mut [[i32; C]; R],
) {
    for kk in from..k {
        for r in 0..R {
            let xv = *x[r].add(kk) as i32;
            for c in 0..C {
                acc[r][c] = acc[r][c].wrapping_add(xv * (*w[c].add(kk) as i32 + shift));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn tile_avx512_vnni<const R: usize, const C: usize>(
    x: [*const i8; R],
    w: [*const i8; C],
    k: usize,
    xsum: [i32; R],
) -> [[i32; C]; R] {
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_si512(); C]; R];
    let mut i = 0;
    while i + 64 <= k {
        let wv: [__m512i; C] = std::array::from_fn(|c| _mm512_xor_si512(_mm512_loadu_si512(w[c].add(i).cast()), flip));
        for r in 0..R {
            let xv = _mm512_loadu_si512(x[r].add(i).cast());
            for c in 0..C {
                acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[c], xv);
            }
        }
        i += 64;
    }
    let mut out = [[0i32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = _mm512_reduce_add_epi32(acc[r][c]);
        }
    }
    tail(x, w, i, k, 128, &mut out);
    for r in 0..R {
        for c in 0..C {
            out[r][c] = out[r][c].wrapping_sub(xsum[r].wrapping_mul(128));
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn tile_avx512<const R: usize, const C: usize>(
    x: [*const i8; R],
    w: [*const i8; C],
    k: usize,
    _xsum: [i32; R],
) -> [[i32; C]; R] {
    let mut acc = [[_mm512_setzero_si512(); C]; R];
    let mut i = 0;
    while i + 32 <= k {
        let wv: [__m512i; C] = std::array::from_fn(|c| _mm512_cvtepi8_epi16(_mm256_loadu_si256(w[c].add(i).cast())));
        for r in 0..R {
            let xv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(x[r].add(i).cast()));
            for c in 0..C {
                acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_madd_epi16(xv, wv[c]));
            }
        }
        i += 32;
    }
    let mut out = [[0i32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = _mm512_reduce_add_epi32(acc[r][c]);
        }
    }
    tail(x, w, i, k, 0, &mut out);
    out
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn tile_avx_vnni<const R: usize, const C: usize>(
    x: [*const i8; R],
    w: [*const i8; C],
    k: usize,
    xsum: [i32; R],
) -> [[i32; C]; R] {
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [[_mm256_setzero_si256(); C]; R];
    let mut i = 0;
    while i + 32 <= k {
        let wv: [__m256i; C] = std::array::from_fn(|c| _mm256_xor_si256(_mm256_loadu_si256(w[c].add(i).cast()), flip));
        for r in 0..R {
            let xv = _mm256_loadu_si256(x[r].add(i).cast());
            for c in 0..C {
                acc[r][c] = _mm256_dpbusd_avx_epi32(acc[r][c], wv[c], xv);
            }
        }
        i += 32;
    }
    let mut out = [[0i32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum_epi32(acc[r][c]);
        }
    }
    tail(x, w, i, k, 128, &mut out);
    for r in 0..R {
        for c in 0..C {
            out[r][c] = out[r][c].wrapping_sub(xsum[r].wrapping_mul(128));
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const C: usize>(
    x: [*const i8; R],
    w: [*const i8; C],
    k: usize,
    _xsum: [i32; R],
) -> [[i32; C]; R] {
    let mut acc = [[_mm256_setzero_si256(); C]; R];
    let mut i = 0;
    while i + 16 <= k {
        let wv: [__m256i; C] = std::array::from_fn(|c| _mm256_cvtepi8_epi16(_mm_loadu_si128(w[c].add(i).cast())));
        for r in 0..R {
            let xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(x[r].add(i).cast()));
            for c in 0..C {
                acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(xv, wv[c]));
            }
        }
        i += 16;
    }
    let mut out = [[0i32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum_epi32(acc[r][c]);
        }
    }
    tail(x, w, i, k, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile shape at every level equals the exact i64 sum, including extreme bytes.
    #[test]
    fn tiles_are_exact() {
        for k in [1usize, 7, 15, 16, 31, 33, 64, 65, 127, 200, 4095] {
            let m = 5;
            let n = 9;
            let x: Vec<i8> =
                (0..m * k).map(|i| if i % 11 == 0 { -128 } else { ((i * 37 + 3) % 255) as i32 as i8 }).collect();
            let w: Vec<i8> = (0..n * k)
                .map(|i| {
                    if i % 13 == 0 {
                        -128
                    } else if i % 7 == 0 {
                        127
                    } else {
                        ((i * 53) % 256) as u8 as i8
                    }
                })
                .collect();
            let xsum: Vec<i32> = (0..m).map(|r| x[r * k..(r + 1) * k].iter().map(|v| *v as i32).sum()).collect();
            for level in KernelLevel::available() {
                let mut seen = 0;
                dot_block(level, &x, &xsum, m, k, &w, 1, n, |mi, ni, dot| {
                    let want: i64 = (0..k).map(|kk| x[mi * k + kk] as i64 * w[ni * k + kk] as i64).sum();
                    assert_eq!(dot as i64, want, "{level:?} k={k} m={mi} n={ni}");
                    seen += 1;
                });
                assert_eq!(seen, m * (n - 1));
            }
        }
    }
}
