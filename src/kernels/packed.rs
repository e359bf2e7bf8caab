//! The matmul of every packed format in `formats::registry`: weights decode block by block
//! through the format's `decode_blocks`, so one generic kernel serves them all. Batch < 16 runs
//! [`packed_gemv`] (4 rows decoded `CHUNK` columns at a time into 8 KiB of L1 scratch and dotted
//! with the matching slice of every input row), larger batches the blocked GEMM over decoded
//! panels (`gemm`, each panel shared by the whole batch).

use super::dot::dot4;
use super::gemm::Panel;
use super::linear::{for_each_row_block, Fused, OutPtr, RowDecoder};
use crate::error::{check_len, Result};
use crate::formats::registry::PackedFormat;
use crate::simd::KernelLevel;

/// A `[n, k]` weight in a packed format: `n` rows of `fmt.row_bytes(k)` bytes.
pub struct PackedWeights<'a> {
    pub fmt: &'a dyn PackedFormat,
    pub packed: &'a [u8],
    pub n: usize,
    pub k: usize,
    row_bytes: usize,
    /// the level the block decoders run at (the matmul's own level)
    level: KernelLevel,
}

impl<'a> PackedWeights<'a> {
    pub fn new(fmt: &'a dyn PackedFormat, packed: &'a [u8], k: usize, level: KernelLevel) -> Result<Self> {
        let row_bytes = fmt.row_bytes(k)?;
        let n = packed.len().checked_div(row_bytes).unwrap_or(0);
        check_len(&format!("{} weight (bytes)", fmt.name()), packed.len(), n * row_bytes)?;
        Ok(Self { fmt, packed, n, k, row_bytes, level })
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.packed[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

impl RowDecoder for PackedWeights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        let nb = self.k / self.fmt.block_size();
        self.fmt.decode_blocks(self.row(row), self.k, 0, nb, out, self.level);
    }
    fn fused(&self) -> Option<Fused<'_>> {
        Some(Fused::Packed(self))
    }
}

impl Panel for PackedWeights<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    /// `k0` is a multiple of the GEMM's 512-column slice and `k1` one too or `k`, so both are
    /// whole blocks for every registered block size (32, 64, 256).
    fn decode(&self, row: usize, k0: usize, k1: usize, dst: &mut [f32]) {
        let b = self.fmt.block_size();
        debug_assert!(k0.is_multiple_of(b) && k1.is_multiple_of(b));
        self.fmt.decode_blocks(self.row(row), self.k, k0 / b, k1 / b, dst, self.level);
    }
}

/// Columns decoded per step of [`packed_gemv`]: 4 rows of 512 f32 are 8 KiB, so the scratch stays
/// in L1 between the decode and the dot products; 512 is a multiple of every block size.
const CHUNK: usize = 512;

/// `out[m, n] = x[m, k] @ W^T + bias` for small `m`: per group of 4 weight rows, `CHUNK` columns
/// are decoded at a time and dotted with the same columns of each input row, partial sums
/// carried across chunks. Before this, whole rows were decoded (`4 k` floats, 64 KiB at
/// k = 4096, out of L1) and then dotted.
pub(crate) fn packed_gemv(
    level: KernelLevel,
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    for_each_row_block(n, out, m * n * k, |n0, n1, ptr| {
        // SAFETY: this task writes output columns n0..n1 only; levels above Scalar come from
        // KernelLevel::detect/resolve, which check the CPU.
        unsafe { gemv_dispatch(level, x, m, w, bias, n0, n1, ptr) }
    });
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_rows<const FMA: bool>(
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    n0: usize,
    n1: usize,
    out: OutPtr,
) {
    let (n, k, b) = (w.n, w.k, w.fmt.block_size());
    let mut buf = [0f32; 4 * CHUNK];
    let mut acc = vec![[0f32; 4]; m];
    let mut j = n0;
    while j < n1 {
        let cnt = 4.min(n1 - j);
        acc.iter_mut().for_each(|a| *a = [0.0; 4]);
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + CHUNK).min(k);
            let len = k1 - k0;
            for r in 0..cnt {
                w.fmt.decode_blocks(w.row(j + r), k, k0 / b, k1 / b, &mut buf[r * CHUNK..r * CHUNK + len], w.level);
            }
            // rows past `cnt` hold stale values; their sums are never written
            let (w0, rest) = buf.split_at(CHUNK);
            let (w1, rest) = rest.split_at(CHUNK);
            let (w2, w3) = rest.split_at(CHUNK);
            for (mi, a) in acc.iter_mut().enumerate() {
                let d = dot4::<FMA>(&x[mi * k + k0..mi * k + k1], &w0[..len], &w1[..len], &w2[..len], &w3[..len]);
                for r in 0..4 {
                    a[r] += d[r];
                }
            }
            k0 = k1;
        }
        for (mi, a) in acc.iter().enumerate() {
            for r in 0..cnt {
                *out.0.add(mi * n + j + r) = a[r] + bias.map_or(0.0, |bb| bb[j + r]);
            }
        }
        j += 4;
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemv_dispatch(
    level: KernelLevel,
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    n0: usize,
    n1: usize,
    out: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(x: &[f32], m: usize, w: &PackedWeights, bias: Option<&[f32]>, n0: usize, n1: usize, out: OutPtr) {
        gemv_rows::<true>(x, m, w, bias, n0, n1, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn avx512(x: &[f32], m: usize, w: &PackedWeights, bias: Option<&[f32]>, n0: usize, n1: usize, out: OutPtr) {
        gemv_rows::<true>(x, m, w, bias, n0, n1, out)
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx512 | KernelLevel::Avx512Vnni => avx512(x, m, w, bias, n0, n1, out),
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx2 | KernelLevel::AvxVnni => avx2(x, m, w, bias, n0, n1, out),
        _ => gemv_rows::<false>(x, m, w, bias, n0, n1, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::registry::REGISTRY;
    use crate::kernels::linear::linear;

    #[test]
    fn every_format_matches_the_dense_reference() {
        // k spans several GEMM slices (512) and block sizes; m covers the GEMV and GEMM paths
        let (n, k) = (13, 1536);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0).collect();
        for f in REGISTRY {
            let q = f.quantize(&w, n, k, None, KernelLevel::detect()).unwrap();
            let dense = crate::formats::registry::dequantize_ref(*f, &q, k).unwrap();
            for m in [1, 3, 17, 40] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 40503) % 997) as f32 / 500.0 - 1.0).collect();
                let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
                for level in KernelLevel::available() {
                    let pw = PackedWeights::new(*f, &q, k, level).unwrap();
                    let mut out = vec![f32::NAN; m * n];
                    linear(&x, m, &pw, Some(&bias), &mut out, level).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let (mut s, mut mag) = (bias[j] as f64, bias[j].abs() as f64);
                            for c in 0..k {
                                let p = x[i * k + c] as f64 * dense[j * k + c] as f64;
                                s += p;
                                mag += p.abs();
                            }
                            // summation error bound: (k + 2) eps sum |x w|
                            let tol = (k + 2) as f64 * f32::EPSILON as f64 * mag;
                            let got = out[i * n + j] as f64;
                            assert!((got - s).abs() <= tol, "{} m={m} {:?}: {got} vs {s}", f.name(), level);
                        }
                    }
                }
            }
        }
    }
}
