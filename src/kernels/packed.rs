//! The matmul of every packed format in `formats::registry`: weights decode block by block
//! through the format's `decode_blocks`, so one generic kernel serves them all. Batch < 16 runs
//! the decode-and-dot path of `linear` (4 rows decoded into L1 scratch, `dot4`), larger batches
//! the blocked GEMM over decoded panels (`gemm`, each panel shared by the whole batch).

use super::gemm::Panel;
use super::linear::{Fused, RowDecoder};
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
