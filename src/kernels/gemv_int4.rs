//! AVX-512 INT4 GEMV with a lookup-table decode: a tile of `NR` weight rows times `R` activation
//! rows (batch 1: four weight rows share every activation load).
//!
//! Decode: for each (row, group) a 16-entry f32 table `T[u] = (u - zp) * scale` is built (one
//! unaligned load from a constant ramp, one multiply), and `vpermps` turns a dword holding a
//! nibble in its low four bits straight into its dequantized weight. `vpermps` ignores the index
//! bits above 3, so the low nibbles need no masking and the high nibbles one shift; the scale is
//! folded into the table, so there is no per-group scale multiply and no per-group horizontal
//! work: each (weight row, activation row) keeps two vector accumulators for the whole row.
//! The table entries are the exact values `dequantize_row` produces (`(u - zp) * scale`, rounded
//! once), so the products are those of the f32 reference.
//!
//! Why several weight rows per pass: a 14336-wide f32 activation row (57 KiB) does not fit L1;
//! reloading it from L2 once per weight row (128 activation bytes per 16 weight bytes) was the
//! bottleneck of the one-row kernel on wide rows. Four rows cut that traffic by four. The
//! batch-1 tile also prefetches the next tile's bytes (see `tile`): the four short row streams
//! are not followed far enough ahead by the hardware prefetcher once the weights come from DRAM.
//!
//! Batch 2..15 runs one weight row against up to four activation rows (the decode is shared by
//! the activation rows instead).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::linear::{for_each_row_block, Int4Weights};

/// Weight rows per batch-1 tile.
const NR1: usize = 4;

/// `RAMP[255 + i] = i` for i in -255..=15: `RAMP[255 - zp..][..16]` is `[0 - zp, .., 15 - zp]`.
/// Covers every u8 zero point: the format keeps them in 0..=15, but `Int4Weights` does not
/// check that, and a larger one must not read outside the table.
static RAMP: [f32; 271] = {
    let mut r = [0f32; 271];
    let mut i = 0;
    while i < 271 {
        r[i] = i as f32 - 255.0;
        i += 1;
    }
    r
};

/// One weight row's pointers.
#[derive(Clone, Copy)]
struct RowPtr {
    packed: *const u8,
    scales: *const f32,
    zeros: *const u8,
}

/// `out[mi, ni] = x[mi] . W[ni] + b[ni]` for `m <= 15` activation rows in INT4 kernel order, at
/// AVX-512. The caller has checked the level.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `x` holds `m * k` values.
pub unsafe fn int4_gemv_avx512(x: &[f32], m: usize, w: &Int4Weights, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.layout.rows, w.layout.cols);
    assert!(x.len() >= m * k && out.len() >= m * n);
    match w.layout.group {
        32 => by_group::<32>(x, m, w, bias, out),
        64 => by_group::<64>(x, m, w, bias, out),
        128 => by_group::<128>(x, m, w, bias, out),
        _ => by_group::<256>(x, m, w, bias, out),
    }
}

#[inline(always)]
unsafe fn by_group<const G: usize>(x: &[f32], m: usize, w: &Int4Weights, bias: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(w.layout.group, G);
    let (n, k) = (w.layout.rows, w.layout.cols);
    let (rb, g) = (w.layout.row_bytes(), w.layout.groups());
    let row = |ni: usize| RowPtr {
        packed: w.packed.as_ptr().add(ni * rb),
        scales: w.scales.as_ptr().add(ni * g),
        zeros: w.zeros.as_ptr().add(ni * g),
    };
    for_each_row_block(n, out, m * n * k, |n0, n1, ptr| {
        let xp = x.as_ptr();
        // SAFETY (whole closure): rows n0..n1 exist; each output element is written by this task alone.
        let put = |ni: usize, mi: usize, v: f32| {
            let b = bias.map_or(0.0, |b| b[ni]);
            *ptr.0.add(mi * n + ni) = v + tail(w, ni, &x[mi * k..(mi + 1) * k]) + b;
        };
        let mut ni = n0;
        if m == 1 {
            while ni + NR1 <= n1 {
                let d = tile::<NR1, 1, G, true>([0, 1, 2, 3].map(|r| row(ni + r)), [xp], k);
                for r in 0..NR1 {
                    put(ni + r, 0, d[r][0]);
                }
                ni += NR1;
            }
            while ni < n1 {
                put(ni, 0, tile::<1, 1, G, false>([row(ni)], [xp], k)[0][0]);
                ni += 1;
            }
            return;
        }
        for ni in n0..n1 {
            let mut mi = 0;
            while mi < m {
                let rows = 4.min(m - mi);
                let p = xp.add(mi * k);
                let d = match rows {
                    1 => pad(tile::<1, 1, G, false>([row(ni)], [p], k)[0]),
                    2 => pad(tile::<1, 2, G, false>([row(ni)], [p, p.add(k)], k)[0]),
                    3 => pad(tile::<1, 3, G, false>([row(ni)], [p, p.add(k), p.add(2 * k)], k)[0]),
                    _ => pad(tile::<1, 4, G, false>([row(ni)], [p, p.add(k), p.add(2 * k), p.add(3 * k)], k)[0]),
                };
                for (r, v) in d[..rows].iter().enumerate() {
                    put(ni, mi + r, *v);
                }
                mi += rows;
            }
        }
    });
}

#[inline(always)]
fn pad<const R: usize>(v: [f32; R]) -> [f32; 4] {
    let mut o = [0f32; 4];
    o[..R].copy_from_slice(&v);
    o
}

/// Scalar sum over the columns past the last full 32-column chunk (natural order there).
fn tail(w: &Int4Weights, ni: usize, x: &[f32]) -> f32 {
    let (k, group) = (w.layout.cols, w.layout.group);
    let (rb, g) = (w.layout.row_bytes(), w.layout.groups());
    let mut s = 0f32;
    for c in k / 32 * 32..k {
        let b = w.packed[ni * rb + c / 2];
        let u = if c % 2 == 0 { b & 0x0f } else { b >> 4 };
        let gi = ni * g + c / group;
        s += x[c] * ((u as f32 - w.zeros[gi] as f32) * w.scales[gi]);
    }
    s
}

/// `d[r][a] = sum over the full 32-column chunks of W[r] . x[a]`.
///
/// Whole groups run with a constant chunk count (straight-line code for every group size: with
/// a run-time inner loop, the loop control was a large share of the instructions at g32), then
/// the group cut short by the row's scalar tail, if any.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn tile<const NR: usize, const R: usize, const G: usize, const PREFETCH: bool>(
    rows: [RowPtr; NR],
    x: [*const f32; R],
    k: usize,
) -> [[f32; R]; NR] {
    let full = k / 32 * 32;
    let (rb, ng) = (k.div_ceil(2), k.div_ceil(G));
    let ramp = RAMP.as_ptr().add(255);
    let mut acc = [[[_mm512_setzero_ps(); 2]; R]; NR];
    let table = |gi: usize| {
        let mut tab = [_mm512_setzero_ps(); NR];
        for r in 0..NR {
            let z = *rows[r].zeros.add(gi) as usize;
            tab[r] = _mm512_mul_ps(_mm512_loadu_ps(ramp.sub(z)), _mm512_set1_ps(*rows[r].scales.add(gi)));
        }
        tab
    };
    let chunk = |c: usize, tab: &[__m512; NR], acc: &mut [[[__m512; 2]; R]; NR]| {
        let mut xv = [[_mm512_setzero_ps(); 2]; R];
        for a in 0..R {
            xv[a] = [_mm512_loadu_ps(x[a].add(c)), _mm512_loadu_ps(x[a].add(c + 16))];
        }
        for r in 0..NR {
            if PREFETCH && c.is_multiple_of(128) {
                // Prefetch the next tile (the rows NR further on) at the place this tile reads.
                // Four interleaved row streams, each only k / 2 bytes long, restart at every tile
                // and the hardware prefetcher does not follow them far enough ahead: without this
                // the DRAM-bound shapes (4096 x 14336, 14336 x 4096) ran at ~75% of the speed.
                // wrapping_add: past the last tile these are addresses outside the matrix, which
                // a prefetch may name (it never faults).
                _mm_prefetch::<_MM_HINT_T0>(rows[r].packed.wrapping_add(c / 2 + NR * rb).cast());
                if c.is_multiple_of(512) {
                    _mm_prefetch::<_MM_HINT_T0>(rows[r].scales.wrapping_add(c / G + NR * ng).cast());
                    _mm_prefetch::<_MM_HINT_T0>(rows[r].zeros.wrapping_add(c / G + NR * ng).cast());
                }
            }
            // byte j of the chunk -> dword lane j; vpermps reads only its low 4 bits (the low nibble)
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(rows[r].packed.add(c / 2).cast()));
            let lo = _mm512_permutexvar_ps(v, tab[r]);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), tab[r]);
            for a in 0..R {
                acc[r][a][0] = _mm512_fmadd_ps(lo, xv[a][0], acc[r][a][0]);
                acc[r][a][1] = _mm512_fmadd_ps(hi, xv[a][1], acc[r][a][1]);
            }
        }
    };
    let whole = full / G;
    for gi in 0..whole {
        let tab = table(gi);
        for q in 0..G / 32 {
            chunk(gi * G + 32 * q, &tab, &mut acc);
        }
    }
    if whole * G < full {
        let tab = table(whole);
        let mut c = whole * G;
        while c < full {
            chunk(c, &tab, &mut acc);
            c += 32;
        }
    }
    let mut out = [[0f32; R]; NR];
    for r in 0..NR {
        for a in 0..R {
            out[r][a] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][a][0], acc[r][a][1]));
        }
    }
    out
}
