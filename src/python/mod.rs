//! pyo3 bindings: argument extraction, GIL release, error mapping. No algorithms live here.
//!
//! Arrays cross as numpy arrays (C-contiguous; the Python layer guarantees it). Outputs of the
//! matmul kernels are written into caller-provided arrays so no copy is made on the way back.

mod calib;
mod errors;
mod gguf;
mod packed;

use numpy::{
    PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::formats::half_float::{self, HalfKind};
use crate::formats::{int4, int8};
use crate::kernels::act::Act;
use crate::kernels::linear::{self, HalfWeights, Int4Weights, Int8Weights};
use crate::kernels::w8a8;
use crate::simd::KernelLevel;
use errors::{detached, to_py};

type Int8Out<'py> = (Bound<'py, PyAny>, Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<i8>>);
type Int4Out<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);

/// Activations: float32, or bfloat16 bits as uint16 (`t.view(torch.int16).numpy().view(np.uint16)`).
#[derive(FromPyObject)]
pub(crate) enum XIn<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    Bf16(PyReadonlyArray2<'py, u16>),
}

impl XIn<'_> {
    fn rows(&self) -> usize {
        match self {
            XIn::F32(a) => a.shape()[0],
            XIn::Bf16(a) => a.shape()[0],
        }
    }
    fn cols(&self) -> usize {
        match self {
            XIn::F32(a) => a.shape()[1],
            XIn::Bf16(a) => a.shape()[1],
        }
    }
    fn act(&self) -> PyResult<Act<'_>> {
        Ok(match self {
            XIn::F32(a) => Act::F32(a.as_slice()?),
            XIn::Bf16(a) => Act::Bf16(a.as_slice()?),
        })
    }
}

pub(crate) fn level(kernel: &str) -> PyResult<KernelLevel> {
    KernelLevel::resolve(kernel).map_err(to_py)
}

fn half_kind(bf16: bool) -> HalfKind {
    if bf16 {
        HalfKind::BF16
    } else {
        HalfKind::F16
    }
}

fn shape2<T: numpy::Element>(a: &PyReadonlyArray2<'_, T>) -> (usize, usize) {
    let s = a.shape();
    (s[0], s[1])
}

/// CPU features and kernel levels seen by the native module.
#[pyfunction]
fn kernel_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("detected", KernelLevel::detect().name())?;
    d.set_item("available", KernelLevel::available().iter().map(|l| l.name()).collect::<Vec<_>>())?;
    d.set_item("selected", level("auto")?.name())?;
    d.set_item("num_threads", rayon::current_num_threads())?;
    Ok(d)
}

/// Narrow f32 to f16 (or bf16) bits, round to nearest even. `out` is uint16 of the same length.
#[pyfunction]
#[pyo3(signature = (src, out, bf16=false))]
fn f32_to_half(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, f32>,
    mut out: PyReadwriteArray1<'_, u16>,
    bf16: bool,
) -> PyResult<()> {
    let s = src.as_slice()?;
    let o = out.as_slice_mut()?;
    detached(py, || half_float::f32_to_half(s, o, half_kind(bf16)))
}

/// Widen f16 (or bf16) bits to f32.
#[pyfunction]
#[pyo3(signature = (src, out, bf16=false))]
fn half_to_f32(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u16>,
    mut out: PyReadwriteArray1<'_, f32>,
    bf16: bool,
) -> PyResult<()> {
    let s = src.as_slice()?;
    let o = out.as_slice_mut()?;
    detached(py, || half_float::half_to_f32(s, o, half_kind(bf16)))
}

/// INT8 per-output-channel quantization of a `[rows, cols]` f32 matrix -> (q, scales, zero_points).
#[pyfunction]
#[pyo3(signature = (w, symmetric=true, kernel="auto"))]
fn quantize_int8<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    symmetric: bool,
    kernel: &str,
) -> PyResult<Int8Out<'py>> {
    let (rows, cols) = shape2(&w);
    let lv = level(kernel)?;
    let ws = w.as_slice()?;
    let m = detached(py, || {
        log::debug!("quantize_int8 {rows}x{cols} symmetric={symmetric} kernel={}", lv.name());
        int8::quantize(ws, rows, cols, symmetric, lv)
    })?;
    let q = PyArray1::from_vec(py, m.q).reshape([rows, cols])?.into_any();
    Ok((q, PyArray1::from_vec(py, m.scales), PyArray1::from_vec(py, m.zero_points)))
}

/// Inverse of `quantize_int8`, into a new f32 array.
#[pyfunction]
fn dequantize_int8<'py>(
    py: Python<'py>,
    q: PyReadonlyArray2<'py, i8>,
    scales: PyReadonlyArray1<'py, f32>,
    zero_points: PyReadonlyArray1<'py, i8>,
) -> PyResult<Bound<'py, PyAny>> {
    let (rows, cols) = shape2(&q);
    let (qs, ss, zs) = (q.as_slice()?, scales.as_slice()?, zero_points.as_slice()?);
    let out = detached(py, || {
        let mut out = vec![0f32; rows * cols];
        int8::dequantize_into(qs, ss, zs, cols, &mut out).map(|_| out)
    })?;
    Ok(PyArray1::from_vec(py, out).reshape([rows, cols])?.into_any())
}

/// INT4 grouped quantization -> (packed [rows, ceil(cols/2)] u8, scales [rows, groups] f32,
/// zeros [rows, groups] u8).
#[pyfunction]
#[pyo3(signature = (w, group_size, symmetric=false, kernel="auto"))]
fn quantize_int4<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    group_size: usize,
    symmetric: bool,
    kernel: &str,
) -> PyResult<Int4Out<'py>> {
    let (rows, cols) = shape2(&w);
    let layout = int4::Int4Layout::new(rows, cols, group_size).map_err(to_py)?;
    let lv = level(kernel)?;
    let ws = w.as_slice()?;
    let m = detached(py, || {
        log::debug!("quantize_int4 {rows}x{cols} g{group_size} symmetric={symmetric} kernel={}", lv.name());
        int4::quantize(ws, layout, symmetric, lv)
    })?;
    int4_arrays(py, m, layout)
}

/// An `Int4Matrix` as numpy arrays: packed [rows, row_bytes] u8, scales [rows, groups] f32,
/// zeros [rows, groups] u8 (moved, not copied).
pub(crate) fn int4_arrays<'py>(
    py: Python<'py>,
    m: int4::Int4Matrix,
    layout: int4::Int4Layout,
) -> PyResult<Int4Out<'py>> {
    let (rows, g) = (layout.rows, layout.groups());
    Ok((
        PyArray1::from_vec(py, m.packed).reshape([rows, layout.row_bytes()])?.into_any(),
        PyArray1::from_vec(py, m.scales).reshape([rows, g])?.into_any(),
        PyArray1::from_vec(py, m.zeros).reshape([rows, g])?.into_any(),
    ))
}

/// Inverse of `quantize_int4`, into a new `[rows, in_features]` f32 array.
#[pyfunction]
fn dequantize_int4<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, u8>,
    group_size: usize,
    in_features: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let rows = shape2(&packed).0;
    let layout = int4::Int4Layout::new(rows, in_features, group_size).map_err(to_py)?;
    let (p, s, z) = (packed.as_slice()?, scales.as_slice()?, zeros.as_slice()?);
    let out = detached(py, || {
        let mut out = vec![0f32; rows * in_features];
        int4::dequantize_into(layout, p, s, z, &mut out).map(|_| out)
    })?;
    Ok(PyArray1::from_vec(py, out).reshape([rows, in_features])?.into_any())
}

/// `out = x @ W^T + bias` with `W` stored as f16/bf16 bits `[n, k]`.
#[pyfunction]
#[pyo3(signature = (x, w, out, bias=None, bf16=false, kernel="auto"))]
fn linear_half(
    py: Python<'_>,
    x: XIn<'_>,
    w: PyReadonlyArray2<'_, u16>,
    mut out: PyReadwriteArray2<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    bf16: bool,
    kernel: &str,
) -> PyResult<()> {
    let (n, k) = shape2(&w);
    let m = x.rows();
    let lv = level(kernel)?;
    let (xs, ws, b) = (x.act()?, w.as_slice()?, bias.as_ref().map(|b| b.as_slice()).transpose()?);
    let o = out.as_slice_mut()?;
    detached(py, || linear::linear_act(xs, m, &HalfWeights::new(ws, n, k, half_kind(bf16))?, b, o, lv))
}

/// `out = x @ W^T + bias` with `W` INT8 per-channel.
#[pyfunction]
#[pyo3(signature = (x, q, scales, zero_points, out, bias=None, kernel="auto"))]
#[allow(clippy::too_many_arguments)]
fn linear_int8(
    py: Python<'_>,
    x: XIn<'_>,
    q: PyReadonlyArray2<'_, i8>,
    scales: PyReadonlyArray1<'_, f32>,
    zero_points: PyReadonlyArray1<'_, i8>,
    mut out: PyReadwriteArray2<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    kernel: &str,
) -> PyResult<()> {
    let k = shape2(&q).1;
    let m = x.rows();
    let lv = level(kernel)?;
    let (xs, qs, ss, zs) = (x.act()?, q.as_slice()?, scales.as_slice()?, zero_points.as_slice()?);
    let b = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    let o = out.as_slice_mut()?;
    detached(py, || linear::linear_act(xs, m, &Int8Weights::new(qs, ss, zs, k)?, b, o, lv))
}

/// `out = x @ W^T + bias` with `W` INT4 grouped and packed.
#[pyfunction]
#[pyo3(signature = (x, packed, scales, zeros, group_size, in_features, out, bias=None, kernel="auto"))]
#[allow(clippy::too_many_arguments)]
fn linear_int4(
    py: Python<'_>,
    x: XIn<'_>,
    packed: PyReadonlyArray2<'_, u8>,
    scales: PyReadonlyArray2<'_, f32>,
    zeros: PyReadonlyArray2<'_, u8>,
    group_size: usize,
    in_features: usize,
    mut out: PyReadwriteArray2<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    kernel: &str,
) -> PyResult<()> {
    let n = shape2(&packed).0;
    let m = x.rows();
    let layout = int4::Int4Layout::new(n, in_features, group_size).map_err(to_py)?;
    let lv = level(kernel)?;
    let (xs, p, s, z) = (x.act()?, packed.as_slice()?, scales.as_slice()?, zeros.as_slice()?);
    let b = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    let o = out.as_slice_mut()?;
    detached(py, || linear::linear_act(xs, m, &Int4Weights::new(layout, p, s, z)?, b, o, lv))
}

/// Quantize activations `[m, k]` to int8 per row (dynamic) or with one fixed scale (static).
#[pyfunction]
#[pyo3(signature = (x, q, scales, static_scale=None, kernel="auto"))]
fn quantize_act_int8(
    py: Python<'_>,
    x: XIn<'_>,
    mut q: PyReadwriteArray2<'_, i8>,
    mut scales: PyReadwriteArray1<'_, f32>,
    static_scale: Option<f32>,
    kernel: &str,
) -> PyResult<()> {
    let (m, k) = (x.rows(), x.cols());
    let lv = level(kernel)?;
    let xs = x.act()?;
    let (qs, ss) = (q.as_slice_mut()?, scales.as_slice_mut()?);
    detached(py, || w8a8::quantize_activations_act(xs, m, k, static_scale, qs, ss, lv))
}

/// `out = (xq * x_scales) @ ((q - zp) * scales)^T + bias` with int32 accumulation.
#[pyfunction]
#[pyo3(signature = (xq, x_scales, q, scales, zero_points, out, bias=None, kernel="auto"))]
#[allow(clippy::too_many_arguments)]
fn linear_w8a8(
    py: Python<'_>,
    xq: PyReadonlyArray2<'_, i8>,
    x_scales: PyReadonlyArray1<'_, f32>,
    q: PyReadonlyArray2<'_, i8>,
    scales: PyReadonlyArray1<'_, f32>,
    zero_points: PyReadonlyArray1<'_, i8>,
    mut out: PyReadwriteArray2<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    kernel: &str,
) -> PyResult<()> {
    let k = shape2(&q).1;
    let lv = level(kernel)?;
    let (xqs, xss, qs, ss, zs) =
        (xq.as_slice()?, x_scales.as_slice()?, q.as_slice()?, scales.as_slice()?, zero_points.as_slice()?);
    let b = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    let o = out.as_slice_mut()?;
    detached(py, || w8a8::linear_w8a8(xqs, xss, qs, ss, zs, k, b, o, lv))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust `log` records go to Python's `logging` under the "diffulex_edge" logger tree.
    let _ = pyo3_log::try_init();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(kernel_info, m)?)?;
    m.add_function(wrap_pyfunction!(f32_to_half, m)?)?;
    m.add_function(wrap_pyfunction!(half_to_f32, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_int8, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_int8, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_int4, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_int4, m)?)?;
    m.add_function(wrap_pyfunction!(linear_half, m)?)?;
    m.add_function(wrap_pyfunction!(linear_int8, m)?)?;
    m.add_function(wrap_pyfunction!(linear_int4, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_act_int8, m)?)?;
    m.add_function(wrap_pyfunction!(linear_w8a8, m)?)?;
    gguf::register(m)?;
    calib::register(m)?;
    packed::register(m)?;
    Ok(())
}
