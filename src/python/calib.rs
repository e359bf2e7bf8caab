//! pyo3 bindings for calibration statistics (`crate::calib`) and the importance-weighted INT4
//! quantizer. Argument extraction and GIL release only; state lives in caller-owned numpy arrays.

use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::errors::{detached, to_py};
use crate::calib::{histogram, smooth, stats};
use crate::formats::{int4, int4_weighted};

/// Add a `[tokens, cols]` float32 batch to running per-column statistics (in place):
/// `sum_sq` float64 (sum of x^2), `absmax`, `min`, `max` float32. `reference=True` runs the
/// scalar reference. Nothing is written if the batch holds a NaN/Inf.
#[pyfunction]
#[pyo3(signature = (x, sum_sq, absmax, min, max, reference=false))]
fn calib_accumulate(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, f32>,
    mut sum_sq: PyReadwriteArray1<'_, f64>,
    mut absmax: PyReadwriteArray1<'_, f32>,
    mut min: PyReadwriteArray1<'_, f32>,
    mut max: PyReadwriteArray1<'_, f32>,
    reference: bool,
) -> PyResult<()> {
    let (rows, cols) = (x.shape()[0], x.shape()[1]);
    let xs = x.as_slice()?;
    let mut acc = stats::ColumnStatsMut {
        sum_sq: sum_sq.as_slice_mut()?,
        absmax: absmax.as_slice_mut()?,
        min: min.as_slice_mut()?,
        max: max.as_slice_mut()?,
    };
    detached(py, || {
        if reference {
            stats::accumulate_ref(xs, rows, cols, &mut acc)
        } else {
            stats::accumulate(xs, rows, cols, &mut acc)
        }
    })
}

/// Number of bins of the |x| histograms (uint64 arrays of this length).
#[pyfunction]
fn calib_histogram_bins() -> usize {
    histogram::NBINS
}

/// Add the magnitudes of a `[tokens, cols]` float32 batch to a uint64 histogram (in place).
#[pyfunction]
fn calib_histogram(py: Python<'_>, x: PyReadonlyArray2<'_, f32>, mut hist: PyReadwriteArray1<'_, u64>) -> PyResult<()> {
    let cols = x.shape()[1];
    let xs = x.as_slice()?;
    let h = hist.as_slice_mut()?;
    detached(py, || histogram::accumulate(xs, cols, h))
}

/// Clip value of an |x| histogram: `method="percentile"` (`percentile` in (0, 100]) or `"mse"`
/// (minimum expected squared error of symmetric `qmax`-level quantization, `steps` candidates).
#[pyfunction]
#[pyo3(signature = (hist, absmax, method, percentile=99.99, qmax=127.0, steps=256))]
fn calib_histogram_clip(
    py: Python<'_>,
    hist: PyReadonlyArray1<'_, u64>,
    absmax: f32,
    method: &str,
    percentile: f64,
    qmax: f32,
    steps: usize,
) -> PyResult<f32> {
    let h = hist.as_slice()?;
    match method {
        "percentile" => detached(py, || histogram::percentile(h, percentile, absmax)),
        "mse" => detached(py, || histogram::mse_clip(h, absmax, qmax, steps)),
        other => Err(to_py(crate::Error::InvalidArgument(format!(
            "unknown clip method {other:?}; supported: \"percentile\", \"mse\""
        )))),
    }
}

/// Fold the column absmax of a `[rows, cols]` float32 weight into `out` (in place).
#[pyfunction]
fn weight_column_absmax(
    py: Python<'_>,
    w: PyReadonlyArray2<'_, f32>,
    mut out: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let ws = w.as_slice()?;
    let o = out.as_slice_mut()?;
    detached(py, || smooth::weight_column_absmax(ws, rows, cols, o))
}

/// SmoothQuant migration scales `max|X_j|^alpha / max|W_j|^(1-alpha)` (floored at 1e-5).
#[pyfunction]
fn smoothquant_scales<'py>(
    py: Python<'py>,
    act_absmax: PyReadonlyArray1<'py, f32>,
    weight_absmax: PyReadonlyArray1<'py, f32>,
    alpha: f32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (a, w) = (act_absmax.as_slice()?, weight_absmax.as_slice()?);
    let s = detached(py, || smooth::smooth_scales(a, w, alpha))?;
    Ok(PyArray1::from_vec(py, s))
}

/// INT4 grouped quantization with an importance-weighted scale/zero-point search per group
/// (`importance`: one float32 per input column) -> (packed, scales, zeros) as `quantize_int4`.
/// `kernel` is checked as `quantize_int4` checks it (an unknown or unavailable level is an
/// error); the search itself is scalar code on rayon threads at every level.
#[pyfunction]
#[pyo3(signature = (w, group_size, importance, symmetric=false, reference=false, kernel="auto"))]
fn quantize_int4_weighted<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    group_size: usize,
    importance: PyReadonlyArray1<'py, f32>,
    symmetric: bool,
    reference: bool,
    kernel: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let lv = super::level(kernel)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    log::debug!("quantize_int4_weighted {rows}x{cols} g{group_size} symmetric={symmetric} kernel={}", lv.name());
    let layout = int4::Int4Layout::new(rows, cols, group_size).map_err(to_py)?;
    let (ws, imp) = (w.as_slice()?, importance.as_slice()?);
    let m = detached(py, || {
        if reference {
            int4_weighted::quantize_weighted_ref(ws, layout, symmetric, imp)
        } else {
            int4_weighted::quantize_weighted(ws, layout, symmetric, imp)
        }
    })?;
    super::int4_arrays(py, m, layout)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(calib_accumulate, m)?)?;
    m.add_function(wrap_pyfunction!(calib_histogram_bins, m)?)?;
    m.add_function(wrap_pyfunction!(calib_histogram, m)?)?;
    m.add_function(wrap_pyfunction!(calib_histogram_clip, m)?)?;
    m.add_function(wrap_pyfunction!(weight_column_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(smoothquant_scales, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_int4_weighted, m)?)?;
    Ok(())
}
