//! `y = x @ W^T + b` with `W` kept in its storage format.
//!
//! Output rows of `W` are split into blocks processed in parallel (rayon). A block decodes
//! `ROWS` rows at a time into a small f32 scratch (a few KiB, L1-resident) and multiplies every
//! activation row against them, so the full-precision weight matrix never exists in memory.

use rayon::prelude::*;

use super::act::Act;
use super::dot::dot4;
use super::gemm::{gemm, GEMM_MIN_M};
use super::gemv::{int4_gemv, int8_gemv};
use super::packed::PackedWeights;
use crate::error::{check_len, Result};
use crate::formats::half_float::{convert_to_f32, HalfKind};
use crate::formats::int4::{dequantize_row as int4_row, Int4Layout};
use crate::formats::int8::dequantize_row as int8_row;
use crate::simd::KernelLevel;

/// Rows of `W` decoded together (matches `dot4`).
const ROWS: usize = 4;

/// A weight matrix `[n, k]` that can produce one f32 row at a time.
pub trait RowDecoder: Sync {
    /// (output features n, input features k)
    fn shape(&self) -> (usize, usize);
    fn decode_row(&self, row: usize, out: &mut [f32]);
    /// The quantized formats that have fused SIMD kernels say so here.
    fn fused(&self) -> Option<Fused<'_>> {
        None
    }
}

/// Weights with fused GEMV / blocked GEMM kernels (`gemv.rs`, `gemm.rs`).
pub enum Fused<'a> {
    Int8(&'a Int8Weights<'a>),
    Int4(&'a Int4Weights<'a>),
    /// f16 / bf16: the blocked GEMM only (decode + dot is already bandwidth-bound at batch 1).
    Half(&'a HalfWeights<'a>),
    /// The registry's packed formats: the blocked GEMM only (batch 1 decodes and dots).
    Packed(&'a PackedWeights<'a>),
}

/// Plain f32 weights (the reference the quantized decoders are compared with).
pub struct F32Weights<'a> {
    pub w: &'a [f32],
    pub n: usize,
    pub k: usize,
}

impl<'a> F32Weights<'a> {
    pub fn new(w: &'a [f32], n: usize, k: usize) -> Result<Self> {
        check_len("weight", w.len(), n * k)?;
        Ok(Self { w, n, k })
    }
}

impl RowDecoder for F32Weights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.w[row * self.k..(row + 1) * self.k]);
    }
}

/// f16 / bf16 weights as raw bits.
pub struct HalfWeights<'a> {
    pub w: &'a [u16],
    pub n: usize,
    pub k: usize,
    pub kind: HalfKind,
}

impl<'a> HalfWeights<'a> {
    pub fn new(w: &'a [u16], n: usize, k: usize, kind: HalfKind) -> Result<Self> {
        check_len("weight", w.len(), n * k)?;
        Ok(Self { w, n, k, kind })
    }
}

impl RowDecoder for HalfWeights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        convert_to_f32(&self.w[row * self.k..(row + 1) * self.k], out, self.kind);
    }
    fn fused(&self) -> Option<Fused<'_>> {
        Some(Fused::Half(self))
    }
}

/// INT8 per-channel weights.
pub struct Int8Weights<'a> {
    pub q: &'a [i8],
    pub scales: &'a [f32],
    pub zero_points: &'a [i8],
    pub k: usize,
}

impl<'a> Int8Weights<'a> {
    pub fn new(q: &'a [i8], scales: &'a [f32], zero_points: &'a [i8], k: usize) -> Result<Self> {
        check_len("q", q.len(), scales.len() * k)?;
        check_len("zero_points", zero_points.len(), scales.len())?;
        Ok(Self { q, scales, zero_points, k })
    }
}

impl RowDecoder for Int8Weights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.scales.len(), self.k)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        int8_row(&self.q[row * self.k..(row + 1) * self.k], self.scales[row], self.zero_points[row], out);
    }
    fn fused(&self) -> Option<Fused<'_>> {
        Some(Fused::Int8(self))
    }
}

/// INT4 grouped weights.
pub struct Int4Weights<'a> {
    pub layout: Int4Layout,
    pub packed: &'a [u8],
    pub scales: &'a [f32],
    pub zeros: &'a [u8],
}

impl<'a> Int4Weights<'a> {
    pub fn new(layout: Int4Layout, packed: &'a [u8], scales: &'a [f32], zeros: &'a [u8]) -> Result<Self> {
        layout.check(packed.len(), scales.len(), zeros.len())?;
        Ok(Self { layout, packed, scales, zeros })
    }
}

impl RowDecoder for Int4Weights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.layout.rows, self.layout.cols)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        let (rb, g) = (self.layout.row_bytes(), self.layout.groups());
        int4_row(
            &self.packed[row * rb..(row + 1) * rb],
            &self.scales[row * g..(row + 1) * g],
            &self.zeros[row * g..(row + 1) * g],
            self.layout.group,
            out,
        );
    }
    fn fused(&self) -> Option<Fused<'_>> {
        Some(Fused::Int4(self))
    }
}

/// Raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint set of output columns (its own rows of W).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m, n] = sum_k x[m, k] * W[n, k] + bias[n]`, row-major `x: [m, k]`, `out: [m, n]`.
pub fn linear<D: RowDecoder>(
    x: &[f32],
    m: usize,
    w: &D,
    bias: Option<&[f32]>,
    out: &mut [f32],
    level: KernelLevel,
) -> Result<()> {
    linear_act(Act::F32(x), m, w, bias, out, level)
}

/// `linear` with f32 or bf16 activations. INT8 / INT4 weights at a SIMD level take the fused
/// GEMV (batch < `GEMM_MIN_M`) or the blocked GEMM; everything else (and the `Scalar` level)
/// decodes `ROWS` rows at a time into f32 scratch and runs `dot4`.
pub fn linear_act<D: RowDecoder>(
    x: Act<'_>,
    m: usize,
    w: &D,
    bias: Option<&[f32]>,
    out: &mut [f32],
    level: KernelLevel,
) -> Result<()> {
    let (n, k) = w.shape();
    x.check(m, k)?;
    check_len("output", out.len(), m * n)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), n)?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if level != KernelLevel::Scalar && k > 0 {
        match w.fused() {
            Some(Fused::Int8(w8)) => {
                let xf = x.to_f32(m, k, false);
                if m >= GEMM_MIN_M {
                    gemm(level, &xf, m, w8, bias, out);
                } else {
                    int8_gemv(level, &xf, m, w8, bias, out);
                }
                return Ok(());
            }
            Some(Fused::Half(wh)) if m >= GEMM_MIN_M => {
                let xf = x.to_f32(m, k, false);
                gemm(level, &xf, m, wh, bias, out);
                return Ok(());
            }
            Some(Fused::Int4(w4)) => {
                let xf = x.to_f32(m, k, true);
                if m >= GEMM_MIN_M {
                    gemm(level, &xf, m, w4, bias, out);
                } else {
                    int4_gemv(level, &xf, m, w4, bias, out);
                }
                return Ok(());
            }
            Some(Fused::Packed(wp)) if m >= GEMM_MIN_M => {
                let xf = x.to_f32(m, k, false);
                gemm(level, &xf, m, wp, bias, out);
                return Ok(());
            }
            Some(Fused::Half(_)) | Some(Fused::Packed(_)) | None => {}
        }
    }
    let xf = x.to_f32(m, k, false);
    let x: &[f32] = &xf;
    for_each_row_block(n, out, m * n * k, |n0, n1, ptr| {
        let mut buf = vec![0f32; ROWS * k];
        let mut j = n0;
        while j < n1 {
            let cnt = ROWS.min(n1 - j);
            for r in 0..cnt {
                w.decode_row(j + r, &mut buf[r * k..(r + 1) * k]);
            }
            // unused slots keep stale or zero rows; their results are not written
            let block = Block { x, m, k, n, j, cnt, buf: &buf, bias };
            // SAFETY: columns j..j+cnt of `out` belong to this task alone.
            unsafe { block_dispatch(level, &block, ptr) };
            j += ROWS;
        }
    });
    Ok(())
}

/// Below this many multiply-adds a call runs on the calling thread. Handing tasks to the rayon
/// pool and waiting for them costs a thread wake-up whenever the workers have gone to sleep,
/// which in a model forward (torch ops between our layers) is every call: measured 40-100 us on
/// a 2-vCPU VM for a 512x256 INT8 GEMV that takes ~15 us of compute. 2^18 multiply-adds is
/// ~10-25 us on one core.
pub(crate) const SERIAL_WORK: usize = 1 << 18;

/// Split the `n` rows of `W` into blocks (a multiple of `ROWS`, enough to balance across the
/// rayon threads) and run `f(n0, n1, out)` on each, in parallel unless the call's `work`
/// (multiply-adds) is under `SERIAL_WORK`. `f` may write only output columns `n0..n1`.
pub(crate) fn for_each_row_block(n: usize, out: &mut [f32], work: usize, f: impl Fn(usize, usize, OutPtr) + Sync) {
    let ptr = OutPtr(out.as_mut_ptr());
    if work < SERIAL_WORK {
        return f(0, n, ptr);
    }
    let threads = rayon::current_num_threads().max(1);
    let per_task = n.div_ceil(threads * 8).next_multiple_of(ROWS).clamp(ROWS, 256);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        // rebinding moves the whole `OutPtr` (Send) into the closure, not its raw-pointer field
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        f(t * per_task, ((t + 1) * per_task).min(n), ptr)
    });
}

struct Block<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
    j: usize,
    cnt: usize,
    buf: &'a [f32],
    bias: Option<&'a [f32]>,
}

#[inline(always)]
unsafe fn block_generic<const FMA: bool>(b: &Block, out: OutPtr) {
    let k = b.k;
    let (w0, w1, w2, w3) = (&b.buf[..k], &b.buf[k..2 * k], &b.buf[2 * k..3 * k], &b.buf[3 * k..4 * k]);
    for mi in 0..b.m {
        let d = dot4::<FMA>(&b.x[mi * k..(mi + 1) * k], w0, w1, w2, w3);
        for r in 0..b.cnt {
            let bias = b.bias.map_or(0.0, |bb| bb[b.j + r]);
            *out.0.add(mi * b.n + b.j + r) = d[r] + bias;
        }
    }
}

unsafe fn block_dispatch(level: KernelLevel, b: &Block, out: OutPtr) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(b: &Block, out: OutPtr) {
        block_generic::<true>(b, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn avx512(b: &Block, out: OutPtr) {
        block_generic::<true>(b, out)
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx512 | KernelLevel::Avx512Vnni => avx512(b, out),
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx2 | KernelLevel::AvxVnni => avx2(b, out),
        _ => block_generic::<false>(b, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{half_float, int4, int8};

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 reference on the dequantized weights, and a bound from the summation error:
    /// `(k + 2) * eps * sum |x * w|` (every kernel sums k products, each rounded once or twice).
    fn check<D: RowDecoder>(x: &[f32], m: usize, w: &D, bias: Option<&[f32]>) {
        check_act(Act::F32(x), x, m, w, bias)
    }

    /// `xa` is what the kernel gets, `x` the same values as f32 for the reference.
    fn check_act<D: RowDecoder>(xa: Act, x: &[f32], m: usize, w: &D, bias: Option<&[f32]>) {
        let (n, k) = w.shape();
        let mut dense = vec![0f32; n * k];
        for r in 0..n {
            w.decode_row(r, &mut dense[r * k..(r + 1) * k]);
        }
        for level in KernelLevel::available() {
            let mut out = vec![f32::NAN; m * n];
            linear_act(xa, m, w, bias, &mut out, level).unwrap();
            for mi in 0..m {
                for ni in 0..n {
                    let row = &dense[ni * k..(ni + 1) * k];
                    let xs = &x[mi * k..(mi + 1) * k];
                    let exact: f64 = xs.iter().zip(row).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                        + bias.map_or(0.0, |b| b[ni] as f64);
                    let mag: f64 = xs.iter().zip(row).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    let bound = (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-6;
                    let got = out[mi * n + ni] as f64;
                    assert!((got - exact).abs() <= bound, "{level:?} m={mi}/{m} n={ni}/{n} k={k}: {got} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn odd_shapes_all_formats() {
        // m < GEMM_MIN_M takes the fused GEMV, m >= GEMM_MIN_M the blocked GEMM; n = 70 crosses
        // the GEMM's 64-row task blocks and leaves register-tile tails; k = 4095 crosses KC.
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 33),
            (3, 5, 64),
            (8, 9, 100),
            (2, 13, 4095),
            (17, 4, 7),
            (1, 70, 31),
            (5, 3, 129),
            (16, 70, 300),
            (33, 9, 1000),
            (40, 70, 4095),
            (15, 2, 257),
            (300, 5, 40),
            (20, 3, 0),
            (1, 9, 4133),
            (3, 6, 8200),
            (1, 4, 9000),
            (2, 3, 70001),
            (1, 13, 100),
            (1, 6, 544),
            (1, 11, 14336 + 96),
            (8, 7, 608),
            (15, 5, 96),
            (1, 3, 32),
            (1, 5, 257),
        ] {
            let x = data(m * k, 1);
            let wf = data(n * k, 2);
            let bias = data(n, 3);
            check(&x, m, &F32Weights::new(&wf, n, k).unwrap(), Some(&bias));
            let mut h = vec![0u16; n * k];
            for kind in [HalfKind::F16, HalfKind::BF16] {
                half_float::f32_to_half(&wf, &mut h, kind).unwrap();
                check(&x, m, &HalfWeights::new(&h, n, k, kind).unwrap(), None);
            }
            // bf16 activations: the kernels widen them exactly, so the f32 of the same values is the reference
            let mut xb = vec![0u16; m * k];
            half_float::f32_to_half(&x, &mut xb, HalfKind::BF16).unwrap();
            let mut xbf = vec![0f32; m * k];
            half_float::half_to_f32(&xb, &mut xbf, HalfKind::BF16).unwrap();
            for sym in [true, false] {
                let q8 = int8::quantize(&wf, n, k, sym, KernelLevel::detect()).unwrap();
                let w8 = Int8Weights::new(&q8.q, &q8.scales, &q8.zero_points, k).unwrap();
                check(&x, m, &w8, Some(&bias));
                check_act(Act::Bf16(&xb), &xbf, m, &w8, None);
                // every group size; k = 100 / 257 / 4133 / 8200 end inside a group, n = 5 / 7 / 9 / 13
                // leave rows past the last four-row tile
                for g in [32, 64, 128, 256] {
                    let layout = Int4Layout::new(n, k, g).unwrap();
                    let q4 = int4::quantize(&wf, layout, sym, KernelLevel::detect()).unwrap();
                    let w4 = Int4Weights::new(layout, &q4.packed, &q4.scales, &q4.zeros).unwrap();
                    check(&x, m, &w4, Some(&bias));
                    check_act(Act::Bf16(&xb), &xbf, m, &w4, Some(&bias));
                }
            }
        }
    }

    /// Zero points outside the format's 0..=15 (possible through `Int4Weights::new`, which checks
    /// lengths only) give the same result as the reference at every level.
    #[test]
    fn int4_out_of_range_zero_points() {
        for &(m, n, k, g) in &[(1, 9, 100, 32), (3, 5, 256, 64), (1, 8, 512, 128), (2, 4, 300, 256)] {
            let x = data(m * k, 6);
            let layout = Int4Layout::new(n, k, g).unwrap();
            let packed: Vec<u8> = data(n * layout.row_bytes(), 7).iter().map(|v| (v.abs() * 255.0) as u8).collect();
            let scales: Vec<f32> = data(n * layout.groups(), 8).iter().map(|v| v * 0.01).collect();
            let zeros: Vec<u8> = (0..n * layout.groups()).map(|i| [0u8, 15, 16, 255, 8, 200][i % 6]).collect();
            let w4 = Int4Weights::new(layout, &packed, &scales, &zeros).unwrap();
            check(&x, m, &w4, None);
        }
    }

    /// The portable fallbacks of the fused kernels (reached only through a direct call).
    #[test]
    fn fused_kernels_scalar_fallback() {
        let (m, n, k) = (3, 5, 100);
        let x = data(m * k, 4);
        let wf = data(n * k, 5);
        let layout = Int4Layout::new(n, k, 32).unwrap();
        let q4 = int4::quantize(&wf, layout, false, KernelLevel::Scalar).unwrap();
        let w4 = Int4Weights::new(layout, &q4.packed, &q4.scales, &q4.zeros).unwrap();
        let q8 = int8::quantize(&wf, n, k, false, KernelLevel::Scalar).unwrap();
        let w8 = Int8Weights::new(&q8.q, &q8.scales, &q8.zero_points, k).unwrap();
        let mut want = vec![0f32; m * n];
        let mut got = vec![0f32; m * n];
        for fused in [true, false] {
            let x4 = Act::F32(&x).to_f32(m, k, true);
            linear(&x, m, &w4, None, &mut want, KernelLevel::Scalar).unwrap();
            if fused {
                int4_gemv(KernelLevel::Scalar, &x4, m, &w4, None, &mut got);
            } else {
                gemm(KernelLevel::Scalar, &x4, m, &w4, None, &mut got);
            }
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
            linear(&x, m, &w8, None, &mut want, KernelLevel::Scalar).unwrap();
            if fused {
                int8_gemv(KernelLevel::Scalar, &x, m, &w8, None, &mut got);
            } else {
                gemm(KernelLevel::Scalar, &x, m, &w8, None, &mut got);
            }
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn shape_errors() {
        let w = vec![0f32; 6];
        let fw = F32Weights::new(&w, 2, 3).unwrap();
        let mut out = vec![0f32; 2];
        assert!(linear(&[0.0; 4], 1, &fw, None, &mut out, KernelLevel::Scalar).is_err());
        assert!(linear(&[0.0; 3], 1, &fw, Some(&[0.0]), &mut out, KernelLevel::Scalar).is_err());
        assert!(F32Weights::new(&w, 4, 3).is_err());
    }
}
