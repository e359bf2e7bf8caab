//! The GGML/GGUF block-format registry and the generic drivers every block format shares.
//!
//! Each format module defines one `#[repr(C)]` block struct made only of byte arrays (so its size
//! is its on-disk size, asserted at compile time) and implements [`BlockFormat`] for it: a scalar
//! `quantize_block` / `dequantize_block` pair written once. The drivers here turn that pair into
//!
//! * `quantize_ref` / `dequantize_ref`: one block after the other on one thread (the reference);
//! * `quantize` / `dequantize`: rows in parallel (rayon), the block loop instantiated per SIMD level
//!   (`#[target_feature]`) so the compiler can vectorize it, bit-identical to the reference (Rust
//!   never contracts `a * b + c` into an FMA, so the per-level code computes the same floats).
//!
//! Type ids, block sizes and byte sizes are those of `ggml_type` in ggml.h / `GGML_QUANT_SIZES` in
//! gguf-py's constants.py.

use rayon::prelude::*;

use crate::error::{check_len, first_non_finite, Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::formats::ggml::rtn::{self as ggml_rtn, LegacyKind};
use crate::formats::half_float::f32_to_f16_bits;
use crate::simd::KernelLevel;

/// Weights per K-quant super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// How a block quantizer chooses its scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// Weighted least-squares search over candidate scales (and mins); uses importance weights.
    Search,
    /// Plain round-to-nearest, byte-identical to gguf-py's numpy quantizers (only where gguf-py
    /// has one: F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0).
    Rtn,
}

impl QuantMode {
    pub fn parse(s: &str) -> Result<QuantMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "search" | "default" | "auto" => Ok(QuantMode::Search),
            "rtn" => Ok(QuantMode::Rtn),
            other => {
                Err(Error::InvalidArgument(format!("unknown quantization mode {other:?}; use \"search\" or \"rtn\"")))
            }
        }
    }
}

macro_rules! ggml_types {
    ($( $var:ident = $id:expr, $name:expr, $block:expr, $bytes:expr, $rtn:expr; )*) => {
        /// The GGML tensor types this build can quantize and dequantize (ids as in ggml.h).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType { $( $var ),* }

        impl GgmlType {
            pub const ALL: &'static [GgmlType] = &[$( GgmlType::$var ),*];

            /// The `ggml_type` number stored in GGUF tensor infos.
            pub fn id(self) -> u32 { match self { $( GgmlType::$var => $id ),* } }
            /// The GGUF spelling (`Q4_K`, `TQ1_0`, ...).
            pub fn name(self) -> &'static str { match self { $( GgmlType::$var => $name ),* } }
            /// Weights per block.
            pub fn block_size(self) -> usize { match self { $( GgmlType::$var => $block ),* } }
            /// Bytes per block.
            pub fn type_size(self) -> usize { match self { $( GgmlType::$var => $bytes ),* } }
            /// Whether `QuantMode::Rtn` (gguf-py-identical bytes) exists for this type.
            pub fn has_rtn(self) -> bool { match self { $( GgmlType::$var => $rtn ),* } }

            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id { $( $id => Some(GgmlType::$var), )* _ => None }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4, true;
    F16 = 1, "F16", 1, 2, true;
    Q4_0 = 2, "Q4_0", 32, 18, true;
    Q4_1 = 3, "Q4_1", 32, 20, true;
    Q5_0 = 6, "Q5_0", 32, 22, true;
    Q5_1 = 7, "Q5_1", 32, 24, true;
    Q8_0 = 8, "Q8_0", 32, 34, true;
    Q2_K = 10, "Q2_K", 256, 84, false;
    Q3_K = 11, "Q3_K", 256, 110, false;
    Q4_K = 12, "Q4_K", 256, 144, false;
    Q5_K = 13, "Q5_K", 256, 176, false;
    Q6_K = 14, "Q6_K", 256, 210, false;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66, false;
    IQ2_XS = 17, "IQ2_XS", 256, 74, false;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98, false;
    IQ1_S = 19, "IQ1_S", 256, 50, false;
    IQ4_NL = 20, "IQ4_NL", 32, 18, false;
    IQ3_S = 21, "IQ3_S", 256, 110, false;
    IQ2_S = 22, "IQ2_S", 256, 82, false;
    IQ4_XS = 23, "IQ4_XS", 256, 136, false;
    IQ1_M = 29, "IQ1_M", 256, 56, false;
    BF16 = 30, "BF16", 1, 2, true;
    TQ1_0 = 34, "TQ1_0", 256, 54, true;
    TQ2_0 = 35, "TQ2_0", 256, 66, true;
}

impl GgmlType {
    /// Case-insensitive parse of a GGUF type name; unknown names list the supported ones.
    pub fn parse(name: &str) -> Result<GgmlType> {
        let up = name.trim().to_ascii_uppercase();
        GgmlType::ALL.iter().copied().find(|t| t.name() == up).ok_or_else(|| {
            Error::Unsupported(format!(
                "unknown GGML type {name:?}; supported: {}",
                GgmlType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Storage bits per weight (block bytes * 8 / block weights).
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }

    /// Bytes of a row of `cols` weights; an error when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        let b = self.block_size();
        if !cols.is_multiple_of(b) {
            return Err(Error::Shape(format!(
                "{}: row length {cols} is not a multiple of the block size {b}",
                self.name()
            )));
        }
        Ok(cols / b * self.type_size())
    }
}

/// Marker for block structs that are plain bytes: `#[repr(C)]`, only `u8` arrays, alignment 1.
///
/// # Safety
/// Implementors must have no padding, alignment 1 and every bit pattern valid.
pub unsafe trait ByteBlock: Sized {}

/// View `BYTES` bytes as a block struct.
#[inline(always)]
pub fn block_ref<B: ByteBlock>(b: &[u8]) -> &B {
    assert!(b.len() >= std::mem::size_of::<B>());
    // SAFETY: B is bytes only with alignment 1 (ByteBlock contract), and the slice is long enough.
    unsafe { &*(b.as_ptr() as *const B) }
}

#[inline(always)]
pub fn block_mut<B: ByteBlock>(b: &mut [u8]) -> &mut B {
    assert!(b.len() >= std::mem::size_of::<B>());
    // SAFETY: as in `block_ref`; the exclusive borrow of the slice is carried over.
    unsafe { &mut *(b.as_mut_ptr() as *mut B) }
}

/// One GGML block format: a scalar quantize/dequantize pair for one block.
pub trait BlockFormat: Sync {
    const TYPE: GgmlType;
    /// Weights per block.
    const BLOCK: usize;
    /// Bytes per block.
    const BYTES: usize;

    /// Quantize `x` (len `BLOCK`) into `out` (len `BYTES`). `imp` are per-weight importances
    /// (all > 0 when present) that the scale search minimizes `sum imp * err^2` for.
    fn quantize_block(x: &[f32], imp: Option<&[f32]>, out: &mut [u8]);

    /// gguf-py's round-to-nearest quantizer, bit for bit. Only called when `TYPE.has_rtn()`.
    fn quantize_block_rtn(_x: &[f32], _out: &mut [u8]) {
        unreachable!("no rtn quantizer for {}", Self::TYPE.name())
    }

    fn dequantize_block(b: &[u8], out: &mut [f32]);
}

#[inline(always)]
fn quantize_blocks<F: BlockFormat>(x: &[f32], imp: Option<&[f32]>, mode: QuantMode, out: &mut [u8]) {
    for (i, (xb, ob)) in x.chunks_exact(F::BLOCK).zip(out.chunks_exact_mut(F::BYTES)).enumerate() {
        match mode {
            QuantMode::Rtn => F::quantize_block_rtn(xb, ob),
            QuantMode::Search => F::quantize_block(xb, imp.map(|w| &w[i * F::BLOCK..(i + 1) * F::BLOCK]), ob),
        }
    }
}

#[inline(always)]
fn dequantize_blocks<F: BlockFormat>(b: &[u8], out: &mut [f32]) {
    for (bb, ob) in b.chunks_exact(F::BYTES).zip(out.chunks_exact_mut(F::BLOCK)) {
        F::dequantize_block(bb, ob);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2<F: BlockFormat>(x: &[f32], imp: Option<&[f32]>, mode: QuantMode, out: &mut [u8]) {
    quantize_blocks::<F>(x, imp, mode, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_blocks_avx2<F: BlockFormat>(b: &[u8], out: &mut [f32]) {
    dequantize_blocks::<F>(b, out)
}

/// The generic block loops are compiled for AVX2 + FMA and used at every level above Scalar (all
/// of which include AVX2). An AVX-512 build of the same loops measured slower or equal for every
/// type on Zen 4 (search mode, 512x14336: Q4_K 311 vs 167 ms, Q5_K 356 vs 176, Q2_K 470 vs 244,
/// Q6_K 278 vs 253, others within 5%; dequantize within noise except Q6_K/TQ2_0/IQ4_XS, again
/// slower): the compiler's 512-bit versions of these short per-block loops pay in masked tails.
fn quantize_blocks_at<F: BlockFormat>(
    level: KernelLevel,
    x: &[f32],
    imp: Option<&[f32]>,
    mode: QuantMode,
    out: &mut [u8],
) {
    match level {
        // SAFETY: levels above Scalar only come from `KernelLevel::detect`/`resolve`, which check
        // the CPU, and each of them includes AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        l if l != KernelLevel::Scalar => unsafe { quantize_blocks_avx2::<F>(x, imp, mode, out) },
        _ => quantize_blocks::<F>(x, imp, mode, out),
    }
}

pub(crate) fn dequantize_blocks_at<F: BlockFormat>(level: KernelLevel, b: &[u8], out: &mut [f32]) {
    match level {
        // SAFETY: as in `quantize_blocks_at`.
        #[cfg(target_arch = "x86_64")]
        l if l != KernelLevel::Scalar => unsafe { dequantize_blocks_avx2::<F>(b, out) },
        _ => dequantize_blocks::<F>(b, out),
    }
}

fn check_quantize_args<F: BlockFormat>(
    x: &[f32],
    rows: usize,
    cols: usize,
    imp: Option<&[f32]>,
    mode: QuantMode,
    scan_finite: bool,
) -> Result<usize> {
    check_len("weight", x.len(), rows * cols)?;
    let row_bytes = F::TYPE.row_bytes(cols)?;
    if let Some(w) = imp {
        check_len("importance weights (one per column)", w.len(), cols)?;
        if let Some(j) = w.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::InvalidArgument(format!(
                "importance weight {j} is {}; importances must be finite and >= 0",
                w[j]
            )));
        }
    }
    if mode == QuantMode::Rtn && !F::TYPE.has_rtn() {
        return Err(Error::Unsupported(format!(
            "{} has no round-to-nearest (gguf-py) quantizer; use mode=\"search\"",
            F::TYPE.name()
        )));
    }
    // F32/F16/BF16 store what they are given; every block format needs finite input.
    // (`scan_finite == false`: the caller's kernel checks while it quantizes)
    if scan_finite && F::BLOCK > 1 && !all_finite(x) {
        if let Some(e) = first_non_finite(x, cols) {
            return Err(e);
        }
    }
    Ok(row_bytes)
}

/// Whether every value is finite: a parallel, vectorizable scan (exponent all ones <=> NaN/Inf).
fn all_finite(x: &[f32]) -> bool {
    x.par_chunks(1 << 16).all(|c| {
        let mut bad = [0u32; 16];
        let chunks = c.chunks_exact(16);
        let tail = chunks.remainder();
        for v in chunks {
            for i in 0..16 {
                bad[i] |= ((v[i].to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
            }
        }
        bad.iter().all(|b| *b == 0) && tail.iter().all(|v| v.is_finite())
    })
}

/// Importances with zeros lifted to a tiny positive value, so a block whose weights are all
/// unimportant still gets a well-defined least-squares scale.
fn sanitize_importance(imp: Option<&[f32]>) -> Option<Vec<f32>> {
    imp.map(|w| {
        let mean = w.iter().map(|v| *v as f64).sum::<f64>() / w.len().max(1) as f64;
        let floor = ((mean * 1e-6) as f32).max(f32::MIN_POSITIVE);
        w.iter().map(|v| v.max(floor)).collect()
    })
}

/// Scalar reference: quantize a row-major `[rows, cols]` matrix one block at a time.
pub fn quantize_ref<F: BlockFormat>(
    x: &[f32],
    rows: usize,
    cols: usize,
    imp: Option<&[f32]>,
    mode: QuantMode,
) -> Result<Vec<u8>> {
    let row_bytes = check_quantize_args::<F>(x, rows, cols, imp, mode, true)?;
    let imp = sanitize_importance(imp);
    let mut out = vec![0u8; rows * row_bytes];
    for r in 0..rows {
        quantize_blocks::<F>(
            &x[r * cols..(r + 1) * cols],
            imp.as_deref(),
            mode,
            &mut out[r * row_bytes..(r + 1) * row_bytes],
        );
    }
    Ok(out)
}

/// Fast path: rows in parallel, block loop compiled for `level`; bytes equal `quantize_ref`'s.
pub fn quantize<F: BlockFormat>(
    x: &[f32],
    rows: usize,
    cols: usize,
    imp: Option<&[f32]>,
    mode: QuantMode,
    level: KernelLevel,
) -> Result<Vec<u8>> {
    let row_bytes = check_quantize_args::<F>(x, rows, cols, imp, mode, true)?;
    let imp = sanitize_importance(imp);
    let mut out = crate::mem::zeroed_vec::<u8>(rows * row_bytes);
    if row_bytes == 0 {
        return Ok(out);
    }
    let imp = imp.as_deref();
    // Several rows per task when rows are short, so scheduling stays negligible.
    let rows_per_task = (16384 / cols.max(1)).max(1);
    out.par_chunks_mut(row_bytes * rows_per_task).zip(x.par_chunks(cols * rows_per_task)).for_each(|(o, xr)| {
        for (ob, xb) in o.chunks_mut(row_bytes).zip(xr.chunks(cols)) {
            quantize_blocks_at::<F>(level, xb, imp, mode, ob);
        }
    });
    Ok(out)
}

/// Round-to-nearest fast path of the 32-weight legacy formats: rows in parallel through the SIMD
/// row kernels of `formats::ggml::rtn` (which check for NaN/Inf as they go, so the input is read
/// once), into a huge-page-backed output. Bytes equal `quantize_ref::<F>(.., QuantMode::Rtn)`'s.
/// `level` must be above `Scalar` (the caller falls back to [`quantize`] otherwise).
#[cfg(target_arch = "x86_64")]
pub(crate) fn quantize_legacy_rtn<F: BlockFormat>(
    kind: LegacyKind,
    x: &[f32],
    rows: usize,
    cols: usize,
    level: KernelLevel,
) -> Result<Vec<u8>> {
    debug_assert_eq!(kind.block_bytes(), F::BYTES);
    let row_bytes = check_quantize_args::<F>(x, rows, cols, None, QuantMode::Rtn, false)?;
    let n = rows * row_bytes;
    // Not zeroed: the row kernels write every byte, and zeroing would be a serial pass over the
    // whole output on the calling thread before the parallel work (first touch of every page).
    let mut out = crate::mem::uninit_vec::<u8>(n);
    if row_bytes == 0 {
        return Ok(out);
    }
    let row = |xr: &[f32], o: &mut [std::mem::MaybeUninit<u8>]| -> bool {
        // SAFETY: levels above Scalar only come from `KernelLevel::detect`/`resolve`, which check the CPU.
        unsafe {
            if level.has_avx512() {
                ggml_rtn::rtn_row_avx512(kind, xr, o)
            } else {
                ggml_rtn::rtn_row_avx2(kind, xr, o)
            }
        }
    };
    // ~64 KiB of input per task: few enough tasks that scheduling is noise, enough to balance
    let rows_per_task = (16384 / cols.max(1)).max(1);
    let finite = out.spare_capacity_mut()[..n]
        .par_chunks_mut(row_bytes * rows_per_task)
        .zip(x.par_chunks(cols * rows_per_task))
        .all(|(o, xr)| o.chunks_mut(row_bytes).zip(xr.chunks(cols)).fold(true, |ok, (ob, xb)| row(xb, ob) & ok));
    if !finite {
        return Err(first_non_finite(x, cols).unwrap_or_else(|| Error::InvalidArgument("non-finite weight".into())));
    }
    // SAFETY: every row kernel ran (`all` only stops early on a `false`, which returned above)
    // and wrote all `row_bytes` bytes of its row.
    unsafe { out.set_len(n) };
    Ok(out)
}

fn check_dequantize_args<F: BlockFormat>(b: &[u8], n: usize) -> Result<()> {
    if !n.is_multiple_of(F::BLOCK) {
        return Err(Error::Shape(format!(
            "{}: {n} weights are not a whole number of {}-weight blocks",
            F::TYPE.name(),
            F::BLOCK
        )));
    }
    check_len(&format!("{} data (bytes)", F::TYPE.name()), b.len(), n / F::BLOCK * F::BYTES)
}

/// Scalar reference dequantization of `n` weights.
pub fn dequantize_ref<F: BlockFormat>(b: &[u8], n: usize) -> Result<Vec<f32>> {
    check_dequantize_args::<F>(b, n)?;
    let mut out = vec![0f32; n];
    dequantize_blocks::<F>(b, &mut out);
    Ok(out)
}

/// Fast dequantization of `n` weights into `out`.
pub fn dequantize_into<F: BlockFormat>(b: &[u8], out: &mut [f32], level: KernelLevel) -> Result<()> {
    check_dequantize_args::<F>(b, out.len())?;
    const CHUNK_BLOCKS: usize = 1024;
    out.par_chunks_mut(F::BLOCK * CHUNK_BLOCKS)
        .zip(b.par_chunks(F::BYTES * CHUNK_BLOCKS))
        .for_each(|(o, bb)| dequantize_blocks_at::<F>(level, bb, o));
    Ok(())
}

/// `f32 -> f16` little-endian bytes.
#[inline(always)]
pub fn f16_bits(x: f32) -> [u8; 2] {
    f32_to_f16_bits(x).to_le_bytes()
}

#[inline(always)]
pub fn f16_val(b: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// Round an f32 to the nearest f16 and back (the value a stored scale will have).
#[inline(always)]
pub fn f16_round(x: f32) -> f32 {
    half::f16::from_bits(f32_to_f16_bits(x)).to_f32()
}
