//! The GGML block formats of llama.cpp's GGUF files, one module per family, all described by one
//! table (`block::GgmlType`: name, type id, block size and bytes, compile-time size checks):
//!
//! * `block`: the type table, the `BlockFormat` trait every block type implements, and the generic
//!   row-parallel quantize / dequantize drivers;
//! * `legacy` (Q4_0 ... Q8_1), `k_quants` (Q2_K ... Q8_K), `ternary` (TQ1_0, TQ2_0), `iq`
//!   (IQ4_NL, IQ4_XS), `iq_lattice` (IQ1_S ... IQ3_S over the `iq_grids` codebooks): the block
//!   layouts with their scalar references;
//! * `search`: the scale searches (plain and importance-weighted) shared by the families;
//! * `rtn`: AVX-512 round-to-nearest codes of the legacy and K blocks, byte-exact with the scalar
//!   references;
//! * `any`: dispatch from a run-time `GgmlType` to the block type.

pub mod any;
pub mod block;
pub mod iq;
pub mod iq_grids;
pub mod iq_lattice;
pub mod k_quants;
pub mod legacy;
pub(crate) mod rtn;
pub mod search;
pub mod ternary;
