//! CPU matmul kernels for quantized weights (GEMV, GEMM, W8A8), dispatched per instruction-set
//! level with `crate::simd`.

pub mod act;
pub mod dot;
// register tiles are indexed by row / column on purpose: the loops unroll over const bounds
#[allow(clippy::needless_range_loop)]
pub mod gemm;
#[allow(clippy::needless_range_loop)]
pub mod gemv;
#[allow(clippy::needless_range_loop)]
mod gemv_int4;
pub mod linear;
pub mod packed;
#[allow(clippy::needless_range_loop)]
pub mod vnni;
pub mod w8a8;
