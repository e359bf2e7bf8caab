//! Bindings of the packed-format registry (`formats::registry`): one set of functions for every
//! registered format, selected by name.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{detached, to_py};
use super::{level, XIn};
use crate::formats::registry::{self, PackedFormat};
use crate::kernels::linear;
use crate::kernels::packed::PackedWeights;

fn format(name: &str) -> PyResult<&'static dyn PackedFormat> {
    registry::lookup(name).map_err(to_py)
}

/// Every registered packed format: a dict per format with `name`, `block_size`,
/// `takes_importance` and `ggml_type` (the GGUF type name whose bytes these are, or None).
#[pyfunction]
fn packed_formats(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    registry::REGISTRY
        .iter()
        .map(|f| {
            let d = PyDict::new(py);
            d.set_item("name", f.name())?;
            d.set_item("block_size", f.block_size())?;
            d.set_item("takes_importance", f.takes_importance())?;
            d.set_item("ggml_type", f.ggml_type().map(|t| t.name()))?;
            Ok(d)
        })
        .collect()
}

/// Bytes of one row of `cols` weights in format `name` (a ShapeError when `cols` is not whole blocks).
#[pyfunction]
fn packed_row_bytes(name: &str, cols: usize) -> PyResult<usize> {
    format(name)?.row_bytes(cols).map_err(to_py)
}

/// Quantize a `[rows, cols]` f32 matrix -> uint8 `[rows, row_bytes]`. `importance`: per-column
/// weights (formats with `takes_importance`); `reference=True` runs the scalar reference.
#[pyfunction]
#[pyo3(signature = (name, w, importance=None, kernel="auto", reference=false))]
fn packed_quantize<'py>(
    py: Python<'py>,
    name: &str,
    w: PyReadonlyArray2<'py, f32>,
    importance: Option<PyReadonlyArray1<'py, f32>>,
    kernel: &str,
    reference: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let f = format(name)?;
    let lv = level(kernel)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let rb = f.row_bytes(cols).map_err(to_py)?;
    if importance.is_some() && !f.takes_importance() {
        return Err(to_py(crate::Error::InvalidArgument(format!(
            "{} does not use importance weights; pass importance=None",
            f.name()
        ))));
    }
    let ws = w.as_slice()?;
    let imp = importance.as_ref().map(|a| a.as_slice()).transpose()?;
    let out = detached(py, || {
        log::debug!("packed_quantize {} {rows}x{cols} kernel={} reference={reference}", f.name(), lv.name());
        if reference {
            f.quantize_ref(ws, rows, cols, imp)
        } else {
            f.quantize(ws, rows, cols, imp, lv)
        }
    })?;
    Ok(PyArray1::from_vec(py, out).reshape([rows, rb])?.into_any())
}

/// Decode uint8 `[rows, row_bytes]` -> f32 `[rows, cols]`.
#[pyfunction]
#[pyo3(signature = (name, packed, cols, kernel="auto", reference=false))]
fn packed_dequantize<'py>(
    py: Python<'py>,
    name: &str,
    packed: PyReadonlyArray2<'py, u8>,
    cols: usize,
    kernel: &str,
    reference: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let f = format(name)?;
    let lv = level(kernel)?;
    let rows = packed.shape()[0];
    let p = packed.as_slice()?;
    let out = detached(py, || {
        if reference {
            registry::dequantize_ref(f, p, cols)
        } else {
            let mut out = crate::mem::zeroed_vec::<f32>(rows * cols);
            registry::dequantize_into(f, p, cols, &mut out, lv).map(|_| out)
        }
    })?;
    Ok(PyArray1::from_vec(py, out).reshape([rows, cols])?.into_any())
}

/// The first `(row, column)` whose decoded weight is NaN/Inf (corrupt scales), or None.
#[pyfunction]
fn packed_first_non_finite(
    py: Python<'_>,
    name: &str,
    packed: PyReadonlyArray2<'_, u8>,
    cols: usize,
) -> PyResult<Option<(usize, usize)>> {
    let f = format(name)?;
    let p = packed.as_slice()?;
    detached(py, || registry::first_non_finite(f, p, cols))
}

/// `out = x @ W^T + bias` with `W` packed `[n, row_bytes]` of `in_features` columns.
#[pyfunction]
#[pyo3(signature = (name, x, packed, in_features, out, bias=None, kernel="auto"))]
#[allow(clippy::too_many_arguments)]
fn packed_linear(
    py: Python<'_>,
    name: &str,
    x: XIn<'_>,
    packed: PyReadonlyArray2<'_, u8>,
    in_features: usize,
    mut out: PyReadwriteArray2<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    kernel: &str,
) -> PyResult<()> {
    let f = format(name)?;
    let lv = level(kernel)?;
    let m = x.rows();
    let (xs, p) = (x.act()?, packed.as_slice()?);
    let b = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    let o = out.as_slice_mut()?;
    detached(py, || linear::linear_act(xs, m, &PackedWeights::new(f, p, in_features, lv)?, b, o, lv))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(packed_formats, m)?)?;
    m.add_function(wrap_pyfunction!(packed_row_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(packed_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(packed_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(packed_first_non_finite, m)?)?;
    m.add_function(wrap_pyfunction!(packed_linear, m)?)?;
    Ok(())
}
