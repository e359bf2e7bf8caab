//! `tch` (libtorch) interop for Rust users, behind the `tch` feature.
//!
//! Quantizes `tch::Tensor`s into the same formats as the rest of the crate ([`crate::formats`])
//! and runs them through the same CPU kernels ([`crate::kernels::linear`]); nothing here
//! re-implements the math, so a weight quantized from a tensor is byte-identical to one
//! quantized from a slice. Every function checks its input and returns [`crate::Error`]:
//! tensors must be on the CPU, dense, of a float dtype, and 2-D where a matrix is expected.
//!
//! ```
//! use diffulex_edge::torch::QuantizedLinear;
//! use diffulex_edge::Format;
//! use tch::nn::{self, Module};
//!
//! let vs = nn::VarStore::new(tch::Device::Cpu);
//! let layer = nn::linear(vs.root(), 512, 256, Default::default());
//! let q = QuantizedLinear::from_linear(&layer, Format::Int4Grouped { group: 32 }).unwrap();
//! let y = q.forward(&tch::Tensor::randn([4, 512], (tch::Kind::Float, tch::Device::Cpu)));
//! assert_eq!(y.size(), [4, 256]);
//! ```
//!
//! Building this feature needs libtorch matching the pinned `tch` (0.26 = PyTorch 2.13.0);
//! `.ci/tch.sh` shows the setup with `LIBTORCH_USE_PYTORCH=1`.

mod linear;
mod quantize;
mod tensor_io;

pub use linear::QuantizedLinear;
pub use quantize::{
    dequantize_half, dequantize_int4, dequantize_int8, quantize_half, quantize_int4, quantize_int8, HalfMatrix,
    QuantizedWeight,
};
pub use tensor_io::{ACTIVATION_KINDS, WEIGHT_KINDS};

pub use crate::formats::half_float::HalfKind;
pub use crate::formats::int4::Int4Matrix;
pub use crate::formats::int8::Int8Matrix;
