//! The one registry of packed layer formats: every format whose weight is stored as one byte
//! string per row (the GGML block types, NF4, ...) implements [`PackedFormat`] and has one line in
//! [`REGISTRY`]. The generic drivers here (quantize, dequantize, finiteness check) and the generic
//! matmul in `kernels::packed` work for every entry, the Python bindings expose them by name, and
//! the Python package builds its layer formats, `QuantizationDtype` members, scheme names and CLI
//! choices from [`REGISTRY`]: adding a format is one module implementing the trait plus one line
//! here.
//!
//! INT8 / INT4 / FP16 / BF16 layers keep their own multi-buffer layouts (scales and zero points in
//! separate arrays, files written before this registry) and their fused kernels; they are listed
//! by `Format` for sizes and names, and by the Python registry for layers.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::bitnet::BitNet;
use super::ggml::block::{self as gb, BlockFormat, GgmlType, QuantMode};
use super::ggml::{iq, iq_lattice as iql, k_quants as kq, legacy, ternary};
use super::nf4::Nf4;
use crate::error::{check_len, Error, Result};
use crate::simd::KernelLevel;

/// A weight format stored as `row_bytes(cols)` bytes per row of `cols` weights, made of whole
/// blocks of `block_size()` weights that decode independently (given their row).
pub trait PackedFormat: Sync {
    /// The canonical spelling (`q4_K`, `iq4_xs`, `nf4`): ggml's `ggml_type_name` for GGML types.
    fn name(&self) -> &'static str;
    /// Weights per block: a row length must be a multiple of it.
    fn block_size(&self) -> usize;
    /// Bytes of a row of `cols` weights (`cols` a multiple of `block_size()`).
    fn row_bytes_of(&self, cols: usize) -> usize;
    /// Whether per-column importances (an imatrix row) steer the quantizer.
    fn takes_importance(&self) -> bool;
    /// The GGUF tensor type whose bytes these are (`export_gguf` writes them unchanged).
    fn ggml_type(&self) -> Option<GgmlType> {
        None
    }
    /// Quantize a row-major `[rows, cols]` matrix (fast path; bytes equal `quantize_ref`'s).
    fn quantize(&self, x: &[f32], rows: usize, cols: usize, imp: Option<&[f32]>, level: KernelLevel)
        -> Result<Vec<u8>>;
    /// The scalar reference quantizer.
    fn quantize_ref(&self, x: &[f32], rows: usize, cols: usize, imp: Option<&[f32]>) -> Result<Vec<u8>>;
    /// Decode blocks `b0..b1` of one row (`row`: its `row_bytes_of(cols)` bytes) into
    /// `out[..(b1 - b0) * block_size()]`. Every SIMD level gives the scalar level's floats.
    fn decode_blocks(&self, row: &[u8], cols: usize, b0: usize, b1: usize, out: &mut [f32], level: KernelLevel);

    /// Bytes of a row, or a shape error naming the format when `cols` is not whole blocks.
    fn row_bytes(&self, cols: usize) -> Result<usize> {
        let b = self.block_size();
        if !cols.is_multiple_of(b) {
            return Err(Error::Shape(format!(
                "{}: row length {cols} is not a multiple of the block size {b}",
                self.name()
            )));
        }
        Ok(self.row_bytes_of(cols))
    }

    /// Storage bits per weight of a row of `cols` weights.
    fn bits_per_weight(&self, cols: usize) -> f64 {
        self.row_bytes_of(cols) as f64 * 8.0 / cols.max(1) as f64
    }
}

/// A GGML block type as a packed layer format (the quantizer is the importance-aware search).
pub struct Ggml<F: BlockFormat>(PhantomData<F>);

impl<F: BlockFormat> Ggml<F> {
    pub const NEW: Self = Ggml(PhantomData);
}

impl<F: BlockFormat> PackedFormat for Ggml<F> {
    fn name(&self) -> &'static str {
        // ggml's spelling: lower case except the K of K-quants (`ggml_type_name`)
        match F::TYPE {
            GgmlType::Q2_K => "q2_K",
            GgmlType::Q3_K => "q3_K",
            GgmlType::Q4_K => "q4_K",
            GgmlType::Q5_K => "q5_K",
            GgmlType::Q6_K => "q6_K",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::IQ4_NL => "iq4_nl",
            GgmlType::IQ4_XS => "iq4_xs",
            GgmlType::IQ3_S => "iq3_s",
            GgmlType::IQ3_XXS => "iq3_xxs",
            GgmlType::IQ2_S => "iq2_s",
            GgmlType::IQ2_XS => "iq2_xs",
            GgmlType::IQ2_XXS => "iq2_xxs",
            GgmlType::IQ1_M => "iq1_m",
            GgmlType::IQ1_S => "iq1_s",
            GgmlType::TQ1_0 => "tq1_0",
            GgmlType::TQ2_0 => "tq2_0",
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
        }
    }
    fn block_size(&self) -> usize {
        F::BLOCK
    }
    fn row_bytes_of(&self, cols: usize) -> usize {
        cols / F::BLOCK * F::BYTES
    }
    fn takes_importance(&self) -> bool {
        // the ternary types have a fixed grid: their scale is the block's absmax either way
        !matches!(F::TYPE, GgmlType::TQ1_0 | GgmlType::TQ2_0)
    }
    fn ggml_type(&self) -> Option<GgmlType> {
        Some(F::TYPE)
    }
    fn quantize(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        imp: Option<&[f32]>,
        level: KernelLevel,
    ) -> Result<Vec<u8>> {
        gb::quantize::<F>(x, rows, cols, imp, QuantMode::Search, level)
    }
    fn quantize_ref(&self, x: &[f32], rows: usize, cols: usize, imp: Option<&[f32]>) -> Result<Vec<u8>> {
        gb::quantize_ref::<F>(x, rows, cols, imp, QuantMode::Search)
    }
    fn decode_blocks(&self, row: &[u8], _cols: usize, b0: usize, b1: usize, out: &mut [f32], level: KernelLevel) {
        gb::dequantize_blocks_at::<F>(level, &row[b0 * F::BYTES..b1 * F::BYTES], &mut out[..(b1 - b0) * F::BLOCK]);
    }
}

/// Every packed layer format, in the order the Python package lists them. One line per format.
pub static REGISTRY: &[&dyn PackedFormat] = &[
    &Ggml::<legacy::Q8_0>::NEW,
    &Ggml::<legacy::Q5_0>::NEW,
    &Ggml::<legacy::Q5_1>::NEW,
    &Ggml::<legacy::Q4_0>::NEW,
    &Ggml::<legacy::Q4_1>::NEW,
    &Ggml::<kq::Q6K>::NEW,
    &Ggml::<kq::Q5K>::NEW,
    &Ggml::<kq::Q4K>::NEW,
    &Ggml::<kq::Q3K>::NEW,
    &Ggml::<kq::Q2K>::NEW,
    &Ggml::<iq::IQ4NL>::NEW,
    &Ggml::<iq::IQ4XS>::NEW,
    &Ggml::<iql::IQ3S>::NEW,
    &Ggml::<iql::IQ3XXS>::NEW,
    &Ggml::<iql::IQ2S>::NEW,
    &Ggml::<iql::IQ2XS>::NEW,
    &Ggml::<iql::IQ2XXS>::NEW,
    &Ggml::<iql::IQ1M>::NEW,
    &Ggml::<iql::IQ1S>::NEW,
    &Ggml::<ternary::TQ2_0>::NEW,
    &Ggml::<ternary::TQ1_0>::NEW,
    &Nf4,
    &BitNet,
];

/// The packed format called `name` (case-insensitive except that `q4_k` also finds `q4_K`);
/// an unknown name lists the registered ones.
pub fn lookup(name: &str) -> Result<&'static dyn PackedFormat> {
    let want = name.trim();
    REGISTRY.iter().copied().find(|f| f.name().eq_ignore_ascii_case(want)).ok_or_else(|| {
        Error::Unsupported(format!(
            "unknown packed format {name:?}; supported: {}",
            REGISTRY.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// The quantize driver of a format whose rows quantize independently: checks the shape and
/// that every weight is finite, then runs `row(x_row, out_row)` on each row, in parallel
/// (rayon) or one after the other (the scalar reference); both give the same bytes.
pub fn quantize_rows(
    f: &dyn PackedFormat,
    x: &[f32],
    rows: usize,
    cols: usize,
    parallel: bool,
    row: impl Fn(&[f32], &mut [u8]) + Sync,
) -> Result<Vec<u8>> {
    let rb = f.row_bytes(cols)?;
    check_len("weight", x.len(), rows * cols)?;
    if let Some(e) = crate::error::first_non_finite(x, cols) {
        return Err(e);
    }
    let mut out = vec![0u8; rows * rb];
    if rb > 0 && cols > 0 {
        if parallel {
            out.par_chunks_mut(rb).zip(x.par_chunks(cols)).for_each(|(o, xr)| row(xr, o));
        } else {
            out.chunks_mut(rb).zip(x.chunks(cols)).for_each(|(o, xr)| row(xr, o));
        }
    }
    Ok(out)
}

/// Run `decode` compiled for AVX2 + FMA at every level above Scalar (all of which include them),
/// as is otherwise: the decoders of the registry's own formats are written once and vectorized
/// by the compiler under the wider target features (the same floats at every level).
#[inline(always)]
pub fn at_level(level: KernelLevel, decode: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(decode: impl FnOnce()) {
        decode()
    }
    match level {
        // SAFETY: levels above Scalar only come from `KernelLevel::detect`/`resolve`, which check
        // the CPU, and each of them includes AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        l if l != KernelLevel::Scalar => unsafe { avx2(decode) },
        _ => decode(),
    }
}

fn check_packed(f: &dyn PackedFormat, packed: &[u8], cols: usize) -> Result<(usize, usize)> {
    let rb = f.row_bytes(cols)?;
    let rows = packed.len().checked_div(rb).unwrap_or(0);
    check_len(&format!("{} data (bytes)", f.name()), packed.len(), rows * rb)?;
    Ok((rows, rb))
}

/// Decode a whole `[rows, cols]` matrix into `out` (rows in parallel).
pub fn dequantize_into(
    f: &dyn PackedFormat,
    packed: &[u8],
    cols: usize,
    out: &mut [f32],
    level: KernelLevel,
) -> Result<()> {
    let (rows, rb) = check_packed(f, packed, cols)?;
    check_len("output", out.len(), rows * cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let nb = cols / f.block_size();
    out.par_chunks_mut(cols).zip(packed.par_chunks(rb)).for_each(|(o, r)| f.decode_blocks(r, cols, 0, nb, o, level));
    Ok(())
}

/// Scalar, single-threaded decode (the reference every level is tested against).
pub fn dequantize_ref(f: &dyn PackedFormat, packed: &[u8], cols: usize) -> Result<Vec<f32>> {
    let (rows, rb) = check_packed(f, packed, cols)?;
    let mut out = vec![0f32; rows * cols];
    if cols > 0 {
        for (o, r) in out.chunks_mut(cols).zip(packed.chunks(rb)) {
            f.decode_blocks(r, cols, 0, cols / f.block_size(), o, KernelLevel::Scalar);
        }
    }
    Ok(out)
}

/// The first (row, column) whose decoded weight is NaN or infinite (a corrupt scale), if any;
/// decodes row by row, so it needs no full-size buffer.
pub fn first_non_finite(f: &dyn PackedFormat, packed: &[u8], cols: usize) -> Result<Option<(usize, usize)>> {
    let (rows, rb) = check_packed(f, packed, cols)?;
    if cols == 0 {
        return Ok(None);
    }
    let nb = cols / f.block_size();
    Ok((0..rows).into_par_iter().find_map_first(|r| {
        let mut buf = vec![0f32; cols];
        f.decode_blocks(&packed[r * rb..(r + 1) * rb], cols, 0, nb, &mut buf, KernelLevel::detect());
        buf.iter().position(|v| !v.is_finite()).map(|c| (r, c))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, f) in REGISTRY.iter().enumerate() {
            assert_eq!(lookup(f.name()).unwrap().name(), f.name());
            assert_eq!(lookup(&f.name().to_ascii_uppercase()).unwrap().name(), f.name());
            assert!(REGISTRY[..i].iter().all(|g| !g.name().eq_ignore_ascii_case(f.name())));
            if let Some(t) = f.ggml_type() {
                assert_eq!(f.row_bytes(t.block_size() * 3).unwrap(), t.row_bytes(t.block_size() * 3).unwrap());
                assert_eq!(crate::formats::Format::Ggml(t).name(), f.name());
            }
        }
        let msg = lookup("q3").err().unwrap().to_string();
        assert!(msg.contains("q4_K") && msg.contains("iq4_xs"), "{msg}");
        assert!(matches!(lookup("q4_K").unwrap().row_bytes(100), Err(Error::Shape(_))));
    }

    #[test]
    fn every_format_round_trips_and_levels_agree() {
        let (rows, cols) = (3, 512);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let imp: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 5) as f32).collect();
        for f in REGISTRY {
            let w = f.takes_importance().then_some(&imp[..]);
            let q = f.quantize_ref(&x, rows, cols, w).unwrap();
            assert_eq!(q.len(), rows * f.row_bytes(cols).unwrap(), "{}", f.name());
            let back = dequantize_ref(*f, &q, cols).unwrap();
            for level in KernelLevel::available() {
                assert_eq!(f.quantize(&x, rows, cols, w, level).unwrap(), q, "{} {:?}", f.name(), level);
                let mut out = vec![0f32; rows * cols];
                dequantize_into(*f, &q, cols, &mut out, level).unwrap();
                assert!(out.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", f.name());
            }
            // a partial decode equals the same slice of the full decode
            let nb = cols / f.block_size();
            let mut part = vec![0f32; (nb - 1) * f.block_size()];
            f.decode_blocks(&q[..f.row_bytes(cols).unwrap()], cols, 1, nb, &mut part, KernelLevel::Scalar);
            assert_eq!(&part[..], &back[f.block_size()..cols], "{}", f.name());
            // a coarse sanity bound (the per-format bounds are in the Python tolerance table):
            // ternary grids are off by up to half the absmax (0.1 here), and q2_K's 4-bit
            // quantized scale and min add to its 4-level grid's half step. The 1-3 bit lattice
            // codebooks hold only 256-2048 of a group's 3^8 (8^4) lattice points, and their
            // 7-bit sign codes flip one weight of an odd group: only the range is bounded there.
            let err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let lattice = f.name().starts_with("iq") && !f.name().starts_with("iq4");
            let bound = if lattice { 0.1 * 1.5 } else { 0.1 * 0.75 };
            assert!(err <= bound, "{}: max error {err}", f.name());
            assert_eq!(first_non_finite(*f, &q, cols).unwrap(), None);
        }
    }
}
