//! [`QuantizedLinear`]: a drop-in, inference-only replacement for `tch::nn::Linear` whose weights
//! stay quantized and are decoded row by row inside [`crate::kernels::linear::linear`].

use std::fmt;

use tch::{Kind, Tensor};

use super::quantize::QuantizedWeight;
use super::tensor_io::{check_cpu_float, dims, f32_tensor, tch_error, to_f32_vec, vector_f32, ACTIVATION_KINDS};
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::kernels::linear::{linear, HalfWeights, Int4Weights, Int8Weights};
use crate::simd::KernelLevel;

/// A linear layer `y = x W^T + b` with `W` stored as f16/bf16, INT8 or grouped INT4.
///
/// It implements [`tch::nn::Module`], so it slots in wherever an `nn::Linear` was used for
/// inference. Inputs are CPU tensors of shape `[..., in_features]` and dtype f32, f16 or bf16;
/// the output has the input's dtype and shape `[..., out_features]`. The product is accumulated
/// in f32 regardless of the input dtype. The output does not track gradients.
#[derive(Clone)]
pub struct QuantizedLinear {
    weight: QuantizedWeight,
    bias: Option<Vec<f32>>,
    level: KernelLevel,
}

impl QuantizedLinear {
    /// Quantize an existing `tch::nn::Linear` (its `ws` `[out, in]` and optional `bs`), with the
    /// format's default symmetry ([`QuantizedWeight::default_symmetric`]).
    pub fn from_linear(layer: &tch::nn::Linear, format: Format) -> Result<Self> {
        Self::from_tensors(&layer.ws, layer.bs.as_ref(), format)
    }

    /// Quantize a weight `[out_features, in_features]` and an optional bias `[out_features]`
    /// (any float dtype, CPU), with the format's default symmetry.
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>, format: Format) -> Result<Self> {
        Self::from_tensors_with(weight, bias, format, QuantizedWeight::default_symmetric(format))
    }

    /// As [`from_tensors`](Self::from_tensors), choosing symmetric or asymmetric integer
    /// quantization explicitly (ignored for f16/bf16).
    pub fn from_tensors_with(weight: &Tensor, bias: Option<&Tensor>, format: Format, symmetric: bool) -> Result<Self> {
        let weight = QuantizedWeight::quantize(weight, format, symmetric)?;
        let (out_features, _) = weight.shape();
        let bias = bias.map(|b| vector_f32(b, "bias", out_features)).transpose()?;
        Self::from_parts(weight, bias)
    }

    /// Assemble a layer from weights quantized elsewhere (for example loaded from a file) and an
    /// optional f32 bias of `out_features` values.
    pub fn from_parts(weight: QuantizedWeight, bias: Option<Vec<f32>>) -> Result<Self> {
        let (out_features, _) = weight.shape();
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(Error::Shape(format!(
                    "bias has {} elements, expected out_features = {out_features}",
                    b.len()
                )));
            }
        }
        let level = KernelLevel::resolve("auto")?;
        log::debug!(
            "QuantizedLinear {}x{} {}: kernel {}",
            out_features,
            weight.shape().1,
            weight.format().name(),
            level.name()
        );
        Ok(Self { weight, bias, level })
    }

    /// Use a specific kernel (`"auto"`, `"scalar"`, `"avx2"`, `"avx512"`) instead of the one
    /// chosen at construction; naming a level this CPU lacks is an error.
    pub fn with_kernel(mut self, kernel: &str) -> Result<Self> {
        self.level = KernelLevel::resolve(kernel)?;
        Ok(self)
    }

    /// The kernel level `forward` runs with.
    pub fn kernel(&self) -> KernelLevel {
        self.level
    }

    /// The stored weights.
    pub fn weight(&self) -> &QuantizedWeight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The weight format.
    pub fn format(&self) -> Format {
        self.weight.format()
    }

    /// Number of input features (columns of `W`).
    pub fn in_features(&self) -> usize {
        self.weight.shape().1
    }

    /// Number of output features (rows of `W`).
    pub fn out_features(&self) -> usize {
        self.weight.shape().0
    }

    /// Bytes held by weights, scales, zero points and bias.
    pub fn storage_bytes(&self) -> usize {
        self.weight.storage_bytes() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }

    /// `forward`, reporting bad input (wrong device, dtype or last dimension) as an error.
    pub fn try_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let kind = check_cpu_float(xs, "input", &ACTIVATION_KINDS)?;
        let shape = dims(xs);
        let (n, k) = self.weight.shape();
        let Some((&last, lead)) = shape.split_last() else {
            return Err(Error::Shape(format!("input is a 0-d tensor; expected shape [..., {k}] (in_features = {k})")));
        };
        if last != k {
            return Err(Error::Shape(format!(
                "input has shape {shape:?}, but its last dimension must be in_features = {k}"
            )));
        }
        let m: usize = lead.iter().product();
        let x = to_f32_vec(xs)?;
        let mut out = vec![0f32; m * n];
        let (bias, level) = (self.bias.as_deref(), self.level);
        match &self.weight {
            QuantizedWeight::Half(h) => {
                let w = HalfWeights::new(&h.bits, h.rows, h.cols, h.kind)?;
                linear(&x, m, &w, bias, &mut out, level)?
            }
            QuantizedWeight::Int8(q) => {
                let w = Int8Weights::new(&q.q, &q.scales, &q.zero_points, q.cols)?;
                linear(&x, m, &w, bias, &mut out, level)?
            }
            QuantizedWeight::Int4(q) => {
                let w = Int4Weights::new(q.layout(), &q.packed, &q.scales, &q.zeros)?;
                linear(&x, m, &w, bias, &mut out, level)?
            }
        }
        let out_shape: Vec<i64> = lead.iter().map(|d| *d as i64).chain([n as i64]).collect();
        let y = f32_tensor(&out, &out_shape)?;
        if kind == Kind::Float {
            Ok(y)
        } else {
            tch::no_grad(|| y.f_to_kind(kind)).map_err(tch_error)
        }
    }
}

impl tch::nn::Module for QuantizedLinear {
    /// Runs [`try_forward`](QuantizedLinear::try_forward).
    ///
    /// # Panics
    /// On bad input (non-CPU tensor, unsupported dtype, last dimension not `in_features`), with
    /// the error's message, as `tch::nn::Linear` does; use `try_forward` to get a `Result`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.try_forward(xs) {
            Ok(y) => y,
            Err(e) => panic!("QuantizedLinear::forward: {e}"),
        }
    }
}

impl fmt::Debug for QuantizedLinear {
    /// A summary; the weights themselves are far too long to print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantizedLinear")
            .field("in_features", &self.in_features())
            .field("out_features", &self.out_features())
            .field("format", &self.format().name())
            .field("bias", &self.bias.is_some())
            .field("kernel", &self.level.name())
            .finish()
    }
}
