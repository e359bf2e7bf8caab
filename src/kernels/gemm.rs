//! Blocked GEMM for weight-only INT8 / INT4 / FP16 / BF16 at larger batch (prefill).
//!
//! Each rayon task owns `NB` rows of `W` (output columns). For every `KC`-column slice it decodes
//! its rows once into an f32 panel (L2-resident) and runs a register-tiled microkernel over all
//! `M` activation rows, so the decode cost is shared by the whole batch. The activations are
//! packed once per call, transposed into tiles of `MT` rows (`[tile][k][MT]`, zero padded), so
//! the microkernel loads `MT` consecutive activations as vectors and broadcasts one weight per
//! output: `MT x NR` accumulators stay in registers for the whole slice.
//! AVX-512: MT = 64 (4 zmm) x NR = 6 for batches over 32 rows, else MT = 32 (2 zmm) x NR = 8;
//! 24 / 16 accumulators. AVX2: MT = 16, NR = 4 (8 accumulators).

use rayon::prelude::*;

use super::linear::{HalfWeights, Int4Weights, Int8Weights, OutPtr};
use crate::formats::half_float::convert_to_f32;
use crate::simd::KernelLevel;

/// Batch size from which the blocked GEMM beats the fused GEMV.
pub const GEMM_MIN_M: usize = 16;
/// Columns of `W` per panel slice (a multiple of the 32-column INT4 chunk).
const KC: usize = 512;
/// Rows of `W` per rayon task (a multiple of every microkernel's NR: 4, 6, 8).
const NB: usize = 48;

/// A weight matrix whose rows decode to f32 in the kernels' column order.
pub trait Panel: Sync {
    fn shape(&self) -> (usize, usize);
    /// Decode row `row`, columns `k0..k1` (`k0` a multiple of 32), into `dst[..k1 - k0]`.
    fn decode(&self, row: usize, k0: usize, k1: usize, dst: &mut [f32]);
}

impl Panel for Int8Weights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.scales.len(), self.k)
    }
    #[inline(always)]
    fn decode(&self, row: usize, k0: usize, k1: usize, dst: &mut [f32]) {
        let q = &self.q[row * self.k + k0..row * self.k + k1];
        let (z, s) = (self.zero_points[row] as f32, self.scales[row]);
        for (d, v) in dst.iter_mut().zip(q) {
            *d = (*v as f32 - z) * s;
        }
    }
}

impl Panel for Int4Weights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.layout.rows, self.layout.cols)
    }
    /// Full 32-column chunks come out in INT4 order (low nibbles, then high nibbles).
    #[inline(always)]
    fn decode(&self, row: usize, k0: usize, k1: usize, dst: &mut [f32]) {
        let (k, group) = (self.layout.cols, self.layout.group);
        let (rb, g) = (self.layout.row_bytes(), self.layout.groups());
        let full = k / 32 * 32;
        let packed = &self.packed[row * rb..(row + 1) * rb];
        let (scales, zeros) = (&self.scales[row * g..(row + 1) * g], &self.zeros[row * g..(row + 1) * g]);
        let mut c = k0;
        while c + 32 <= k1.min(full) {
            let gi = c / group;
            let (z, s) = (zeros[gi] as f32, scales[gi]);
            let b: &[u8; 16] = packed[c / 2..c / 2 + 16].try_into().unwrap();
            let d: &mut [f32; 32] = (&mut dst[c - k0..c - k0 + 32]).try_into().unwrap();
            for i in 0..16 {
                d[i] = ((b[i] & 0x0f) as f32 - z) * s;
                d[16 + i] = ((b[i] >> 4) as f32 - z) * s;
            }
            c += 32;
        }
        for c in c..k1 {
            let b = packed[c / 2];
            let u = if c % 2 == 0 { b & 0x0f } else { b >> 4 };
            let gi = c / group;
            dst[c - k0] = (u as f32 - zeros[gi] as f32) * scales[gi];
        }
    }
}

impl Panel for HalfWeights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    #[inline(always)]
    fn decode(&self, row: usize, k0: usize, k1: usize, dst: &mut [f32]) {
        convert_to_f32(&self.w[row * self.k + k0..row * self.k + k1], &mut dst[..k1 - k0], self.kind);
    }
}

/// Activation rows per pass: bounds the transposed copy of `x` (and keeps it cache-friendly)
/// while still sharing each decoded panel across many rows.
const M_CHUNK: usize = 256;

/// `out[m, n] = x @ W^T + b`, `x` f32 `[m, k]` in the weight's column order.
pub fn gemm<P: Panel>(level: KernelLevel, x: &[f32], m: usize, w: &P, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = w.shape();
    if m == 0 || n == 0 {
        return;
    }
    if m > M_CHUNK {
        let mut m0 = 0;
        while m0 < m {
            let mc = M_CHUNK.min(m - m0);
            gemm(level, &x[m0 * k..(m0 + mc) * k], mc, w, bias, &mut out[m0 * n..(m0 + mc) * n]);
            m0 += mc;
        }
        return;
    }
    // a 64-row tile issues 24 FMAs per 6 weight broadcasts (vs 16 per 8): on cores where a
    // broadcast competes with the FMAs for a pipe that is the difference; below 33 rows it
    // would be mostly padding
    let wide = level.has_avx512() && m > 32;
    let mt = if wide {
        64
    } else if level.has_avx512() {
        32
    } else {
        16
    };
    let xt = pack_x(x, m, k, mt);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(NB)).into_par_iter().for_each(|t| {
        // capture the whole (Send) wrapper, not its raw-pointer field
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        let (n0, n1) = (t * NB, ((t + 1) * NB).min(n));
        let args = BlockArgs { xt: &xt, m, k, n, n0, n1, bias, out: ptr };
        // SAFETY: the level was checked by KernelLevel::resolve; columns n0..n1 belong to this task.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            {
                if wide {
                    return block_avx512_wide(w, &args);
                }
                if level.has_avx512() {
                    return block_avx512(w, &args);
                }
                if level.has_avx2_only() {
                    return block_avx2(w, &args);
                }
            }
            block::<P, ScalarMicro>(w, &args)
        }
    });
}

/// `[tiles][k][mt]`, rows past `m` zero.
fn pack_x(x: &[f32], m: usize, k: usize, mt: usize) -> Vec<f32> {
    let tiles = m.div_ceil(mt);
    let mut xt = vec![0f32; tiles * k * mt];
    if k == 0 {
        return xt;
    }
    xt.par_chunks_mut(k * mt).enumerate().for_each(|(t, dst)| {
        for j in 0..mt.min(m - t * mt) {
            let row = &x[(t * mt + j) * k..(t * mt + j + 1) * k];
            for (kk, v) in row.iter().enumerate() {
                dst[kk * mt + j] = *v;
            }
        }
    });
    xt
}

struct BlockArgs<'a> {
    xt: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
    n0: usize,
    n1: usize,
    bias: Option<&'a [f32]>,
    out: OutPtr,
}

/// A register-tiled microkernel: `c[r * ldc + j] += sum_kk w[r * ldw + kk] * xt[kk * MT + j]`.
trait Micro {
    const MT: usize;
    const NR: usize;
    unsafe fn run(xt: *const f32, w: *const f32, ldw: usize, kc: usize, c: *mut f32, ldc: usize);
}

#[inline(always)]
unsafe fn block<P: Panel, M: Micro>(w: &P, a: &BlockArgs) {
    let (mt, nr) = (M::MT, M::NR);
    let rows = a.n1 - a.n0;
    let rows_p = rows.next_multiple_of(nr);
    let tiles = a.m.div_ceil(mt);
    let m_pad = tiles * mt;
    // the task's outputs, transposed ([row of W][activation row]) so the microkernel adds whole
    // vectors; written to `out` once at the end (strided stores into `out` per slice were the
    // bottleneck: every one of them lands in the same cache set)
    let mut c = vec![0f32; rows_p * m_pad];
    let mut panel = vec![0f32; rows_p * KC];
    let mut k0 = 0;
    while k0 < a.k {
        let k1 = (k0 + KC).min(a.k);
        let kc = k1 - k0;
        for r in 0..rows {
            w.decode(a.n0 + r, k0, k1, &mut panel[r * KC..r * KC + kc]);
        }
        for g in (0..rows_p).step_by(nr) {
            for t in 0..tiles {
                M::run(
                    a.xt.as_ptr().add(t * a.k * mt + k0 * mt),
                    panel.as_ptr().add(g * KC),
                    KC,
                    kc,
                    c.as_mut_ptr().add(g * m_pad + t * mt),
                    m_pad,
                );
            }
        }
        k0 = k1;
    }
    let out = a.out.0;
    for mi in 0..a.m {
        for r in 0..rows {
            *out.add(mi * a.n + a.n0 + r) = c[r * m_pad + mi] + a.bias.map_or(0.0, |b| b[a.n0 + r]);
        }
    }
}

struct ScalarMicro;
impl Micro for ScalarMicro {
    const MT: usize = 16;
    const NR: usize = 4;
    #[inline(always)]
    unsafe fn run(xt: *const f32, w: *const f32, ldw: usize, kc: usize, c: *mut f32, ldc: usize) {
        let mut a = [[0f32; 16]; 4];
        for kk in 0..kc {
            for (r, ar) in a.iter_mut().enumerate() {
                let b = *w.add(r * ldw + kk);
                for (j, v) in ar.iter_mut().enumerate() {
                    *v += b * *xt.add(kk * 16 + j);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (j, v) in ar.iter().enumerate() {
                *c.add(r * ldc + j) += v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
struct Avx512Micro;
#[cfg(target_arch = "x86_64")]
impl Micro for Avx512Micro {
    const MT: usize = 32;
    const NR: usize = 8;
    #[inline(always)]
    unsafe fn run(xt: *const f32, w: *const f32, ldw: usize, kc: usize, c: *mut f32, ldc: usize) {
        let mut a = [[_mm512_setzero_ps(); 2]; 8];
        for kk in 0..kc {
            let x0 = _mm512_loadu_ps(xt.add(kk * 32));
            let x1 = _mm512_loadu_ps(xt.add(kk * 32 + 16));
            for (r, ar) in a.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*w.add(r * ldw + kk));
                ar[0] = _mm512_fmadd_ps(b, x0, ar[0]);
                ar[1] = _mm512_fmadd_ps(b, x1, ar[1]);
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (v, av) in ar.iter().enumerate() {
                let p = c.add(r * ldc + 16 * v);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *av));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512WideMicro;
#[cfg(target_arch = "x86_64")]
impl Micro for Avx512WideMicro {
    const MT: usize = 64;
    const NR: usize = 6;
    #[inline(always)]
    unsafe fn run(xt: *const f32, w: *const f32, ldw: usize, kc: usize, c: *mut f32, ldc: usize) {
        let mut a = [[_mm512_setzero_ps(); 4]; 6];
        for kk in 0..kc {
            // no closures here: this body is inlined into a #[target_feature] caller, a closure
            // would not be (and its intrinsics would become calls)
            let p = xt.add(kk * 64);
            let x = [
                _mm512_loadu_ps(p),
                _mm512_loadu_ps(p.add(16)),
                _mm512_loadu_ps(p.add(32)),
                _mm512_loadu_ps(p.add(48)),
            ];
            for (r, ar) in a.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*w.add(r * ldw + kk));
                for v in 0..4 {
                    ar[v] = _mm512_fmadd_ps(b, x[v], ar[v]);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (v, av) in ar.iter().enumerate() {
                let p = c.add(r * ldc + 16 * v);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *av));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn block_avx512_wide<P: Panel>(w: &P, a: &BlockArgs) {
    block::<P, Avx512WideMicro>(w, a)
}

#[cfg(target_arch = "x86_64")]
struct Avx2Micro;
#[cfg(target_arch = "x86_64")]
impl Micro for Avx2Micro {
    const MT: usize = 16;
    const NR: usize = 4;
    #[inline(always)]
    unsafe fn run(xt: *const f32, w: *const f32, ldw: usize, kc: usize, c: *mut f32, ldc: usize) {
        let mut a = [[_mm256_setzero_ps(); 2]; 4];
        for kk in 0..kc {
            let x0 = _mm256_loadu_ps(xt.add(kk * 16));
            let x1 = _mm256_loadu_ps(xt.add(kk * 16 + 8));
            for (r, ar) in a.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*w.add(r * ldw + kk));
                ar[0] = _mm256_fmadd_ps(b, x0, ar[0]);
                ar[1] = _mm256_fmadd_ps(b, x1, ar[1]);
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (v, av) in ar.iter().enumerate() {
                let p = c.add(r * ldc + 8 * v);
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), *av));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn block_avx512<P: Panel>(w: &P, a: &BlockArgs) {
    block::<P, Avx512Micro>(w, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<P: Panel>(w: &P, a: &BlockArgs) {
    block::<P, Avx2Micro>(w, a)
}
