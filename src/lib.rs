//! diffulex-edge core: weight formats, CPU kernels for quantized matmul and the error type.
//!
//! The crate is framework-agnostic: it works on plain slices. The `python` feature adds the pyo3
//! bindings (`diffulex_edge._native`), the `tch` feature adds `tch::Tensor` adapters.

pub mod calib;
pub mod error;
pub mod formats;
pub mod gguf;
pub mod kernels;
mod mem;
pub mod simd;

#[cfg(feature = "python")]
mod python;

#[cfg(feature = "tch")]
pub mod torch;

pub use error::{Error, Result};
pub use formats::Format;
