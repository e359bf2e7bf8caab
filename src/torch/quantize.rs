//! Quantize 2-D `tch::Tensor`s into the core formats and dequantize them back. The math is the
//! core's ([`crate::formats`]); this file only checks inputs and moves data.

use tch::Tensor;

use super::tensor_io::{f32_tensor, matrix_f32, Matrix};
use crate::error::{first_non_finite, Error, Result};
use crate::formats::half_float::{self, HalfKind};
use crate::formats::int4::{self, Int4Layout, Int4Matrix};
use crate::formats::int8::{self, Int8Matrix};
use crate::formats::Format;
use crate::simd::KernelLevel;

/// A `[rows, cols]` matrix stored as f16 or bf16 bit patterns (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct HalfMatrix {
    /// Number of rows (output features of a linear layer).
    pub rows: usize,
    /// Number of columns (input features of a linear layer).
    pub cols: usize,
    /// Which 16-bit float format `bits` holds.
    pub kind: HalfKind,
    /// Row-major `[rows, cols]` raw bits.
    pub bits: Vec<u16>,
}

impl HalfMatrix {
    /// Widen back to row-major f32 (exact: every f16/bf16 value is an f32).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.bits.len()];
        half_float::half_to_f32(&self.bits, &mut out, self.kind)
            .expect("HalfMatrix fields are consistent by construction");
        out
    }
}

fn shape_i64(rows: usize, cols: usize) -> [i64; 2] {
    [rows as i64, cols as i64]
}

/// Quantize a 2-D float CPU tensor to INT8 with one scale (and zero point) per row; see
/// [`crate::formats::int8`] for the mapping. NaN/Inf weights give [`Error::NonFinite`].
pub fn quantize_int8(w: &Tensor, symmetric: bool) -> Result<Int8Matrix> {
    let Matrix { data, rows, cols } = matrix_f32(w, "weight")?;
    int8::quantize(&data, rows, cols, symmetric, KernelLevel::resolve("auto")?)
}

/// Quantize a 2-D float CPU tensor to grouped INT4 (`group` in
/// [`crate::formats::INT4_GROUP_SIZES`]); see [`crate::formats::int4`] for the mapping and the
/// nibble packing. NaN/Inf weights give [`Error::NonFinite`].
pub fn quantize_int4(w: &Tensor, group: usize, symmetric: bool) -> Result<Int4Matrix> {
    let Matrix { data, rows, cols } = matrix_f32(w, "weight")?;
    let layout = Int4Layout::new(rows, cols, group)?;
    int4::quantize(&data, layout, symmetric, KernelLevel::resolve("auto")?)
}

/// Round a 2-D float CPU tensor to f16 or bf16 (nearest, ties to even, like `Tensor::half()`).
///
/// Unlike torch, this refuses NaN/Inf ([`Error::NonFinite`]) and, for f16, finite values that
/// would overflow to infinity (|w| >= 65520), since either would poison every output they touch.
pub fn quantize_half(w: &Tensor, kind: HalfKind) -> Result<HalfMatrix> {
    let Matrix { data, rows, cols } = matrix_f32(w, "weight")?;
    if let Some(e) = first_non_finite(&data, cols) {
        return Err(e);
    }
    let mut bits = vec![0u16; data.len()];
    half_float::f32_to_half(&data, &mut bits, kind)?;
    if kind == HalfKind::F16 {
        // exponent all ones and mantissa zero: +-inf, which only overflow produces here
        if let Some(i) = bits.iter().position(|b| b & 0x7fff == 0x7c00) {
            return Err(Error::InvalidArgument(format!(
                "weight value {} at row {}, column {} overflows f16 (largest finite 65504); \
                 use bf16 or an integer format",
                data[i],
                i / cols,
                i % cols
            )));
        }
    }
    Ok(HalfMatrix { rows, cols, kind, bits })
}

/// Dequantize INT8 weights to an f32 CPU tensor of shape `[rows, cols]`.
pub fn dequantize_int8(m: &Int8Matrix) -> Result<Tensor> {
    let mut out = vec![0f32; m.rows * m.cols];
    int8::dequantize_into(&m.q, &m.scales, &m.zero_points, m.cols, &mut out)?;
    f32_tensor(&out, &shape_i64(m.rows, m.cols))
}

/// Dequantize grouped INT4 weights to an f32 CPU tensor of shape `[rows, cols]`.
pub fn dequantize_int4(m: &Int4Matrix) -> Result<Tensor> {
    let mut out = vec![0f32; m.rows * m.cols];
    int4::dequantize_into(m.layout(), &m.packed, &m.scales, &m.zeros, &mut out)?;
    f32_tensor(&out, &shape_i64(m.rows, m.cols))
}

/// Widen f16/bf16 weights to an f32 CPU tensor of shape `[rows, cols]`.
pub fn dequantize_half(m: &HalfMatrix) -> Result<Tensor> {
    f32_tensor(&m.dequantize(), &shape_i64(m.rows, m.cols))
}

/// Weights in one of the formats a [`QuantizedLinear`](super::QuantizedLinear) can run.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedWeight {
    /// f16 or bf16 bit patterns.
    Half(HalfMatrix),
    /// INT8, per-row scale and zero point.
    Int8(Int8Matrix),
    /// INT4, per-group scale and zero point, packed two to a byte.
    Int4(Int4Matrix),
}

impl QuantizedWeight {
    /// Symmetric or not when the caller does not say: INT8 symmetric (PyTorch's per-channel
    /// weight observer default, zero point 0), INT4 asymmetric (GPTQ's choice, which spends the
    /// 16 levels on the group's actual range). Ignored for f16/bf16.
    pub fn default_symmetric(format: Format) -> bool {
        !matches!(format, Format::Int4Grouped { .. })
    }

    /// Quantize a 2-D float CPU tensor to `format`. [`Format::F32`] is refused: a full-precision
    /// layer is better served by `tch::nn::Linear` itself.
    pub fn quantize(w: &Tensor, format: Format, symmetric: bool) -> Result<Self> {
        Ok(match format {
            Format::F16 => QuantizedWeight::Half(quantize_half(w, HalfKind::F16)?),
            Format::BF16 => QuantizedWeight::Half(quantize_half(w, HalfKind::BF16)?),
            Format::Int8PerChannel => QuantizedWeight::Int8(quantize_int8(w, symmetric)?),
            Format::Int4Grouped { group } => QuantizedWeight::Int4(quantize_int4(w, group, symmetric)?),
            Format::F32 | Format::Ggml(_) | Format::Packed(_) => {
                return Err(Error::Unsupported(format!(
                    "format {:?} has no tch module here; choose one of f16, bf16, int8, \
                     int4_g32, int4_g64, int4_g128, int4_g256 (or keep the tch::nn::Linear; the \
                     packed formats run in the Python package's QuantizedLinear)",
                    format.name()
                )))
            }
        })
    }

    /// The storage format.
    pub fn format(&self) -> Format {
        match self {
            QuantizedWeight::Half(h) => match h.kind {
                HalfKind::F16 => Format::F16,
                HalfKind::BF16 => Format::BF16,
            },
            QuantizedWeight::Int8(_) => Format::Int8PerChannel,
            QuantizedWeight::Int4(m) => Format::Int4Grouped { group: m.group },
        }
    }

    /// `(rows, cols)`, i.e. `(out_features, in_features)` for a linear layer.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantizedWeight::Half(h) => (h.rows, h.cols),
            QuantizedWeight::Int8(m) => (m.rows, m.cols),
            QuantizedWeight::Int4(m) => (m.rows, m.cols),
        }
    }

    /// Bytes of weight storage, scales and zero points included.
    pub fn storage_bytes(&self) -> usize {
        match self {
            QuantizedWeight::Half(h) => 2 * h.bits.len(),
            QuantizedWeight::Int8(m) => m.q.len() + 4 * m.scales.len() + m.zero_points.len(),
            QuantizedWeight::Int4(m) => m.packed.len() + 4 * m.scales.len() + m.zeros.len(),
        }
    }

    /// Dequantize to an f32 CPU tensor of shape `[rows, cols]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        match self {
            QuantizedWeight::Half(h) => dequantize_half(h),
            QuantizedWeight::Int8(m) => dequantize_int8(m),
            QuantizedWeight::Int4(m) => dequantize_int4(m),
        }
    }
}
