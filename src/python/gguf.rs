//! pyo3 bindings for the GGML block formats and the GGUF container. Argument checks, GIL release
//! and conversion only; the algorithms live in `formats::ggml_*` and `gguf`.

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::IntoPyObjectExt;

use super::errors::{detached, to_py};
use crate::error::Error;
use crate::formats::ggml::any as ggml_any;
use crate::formats::ggml::block::{GgmlType, QuantMode};
use crate::gguf::writer::TensorData;
use crate::gguf::{reader, writer, Value, ValueType};
use crate::simd::KernelLevel;

fn ggml_type(name: &str) -> PyResult<GgmlType> {
    GgmlType::parse(name).map_err(to_py)
}

/// `(name, id, block_size, type_size, has_rtn)` for every GGML type this build handles.
#[pyfunction]
fn ggml_types() -> Vec<(&'static str, u32, usize, usize, bool)> {
    GgmlType::ALL.iter().map(|t| (t.name(), t.id(), t.block_size(), t.type_size(), t.has_rtn())).collect()
}

/// Quantize a `[rows, cols]` f32 matrix to a GGML type -> uint8 `[rows, row_bytes]`.
/// `imatrix`: optional per-column importances; `mode`: "search" or "rtn" (gguf-py bytes);
/// `reference=True` runs the single-threaded scalar reference instead of the fast path.
#[pyfunction]
#[pyo3(signature = (w, qtype, imatrix=None, mode="search", kernel="auto", reference=false))]
fn ggml_quantize<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    qtype: &str,
    imatrix: Option<PyReadonlyArray1<'py, f32>>,
    mode: &str,
    kernel: &str,
    reference: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let t = ggml_type(qtype)?;
    let mode = QuantMode::parse(mode).map_err(to_py)?;
    let lv = KernelLevel::resolve(kernel).map_err(to_py)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let row_bytes = t.row_bytes(cols).map_err(to_py)?;
    let ws = w.as_slice()?;
    let imp = imatrix.as_ref().map(|a| a.as_slice()).transpose()?;
    let out = detached(py, || {
        log::debug!("ggml_quantize {rows}x{cols} {} mode={mode:?} kernel={}", t.name(), lv.name());
        if reference {
            ggml_any::quantize_ref(t, ws, rows, cols, imp, mode)
        } else {
            ggml_any::quantize(t, ws, rows, cols, imp, mode, lv)
        }
    })?;
    Ok(PyArray1::from_vec(py, out).reshape([rows, row_bytes])?.into_any())
}

/// Dequantize `n` weights of a GGML type from contiguous uint8 bytes -> f32 `[n]`.
#[pyfunction]
#[pyo3(signature = (data, qtype, n, kernel="auto", reference=false))]
fn ggml_dequantize<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
    qtype: &str,
    n: usize,
    kernel: &str,
    reference: bool,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let t = ggml_type(qtype)?;
    let lv = KernelLevel::resolve(kernel).map_err(to_py)?;
    let b = data.as_slice()?;
    let out = detached(py, || {
        if reference {
            ggml_any::dequantize_ref(t, b, n)
        } else {
            let mut out = crate::mem::zeroed_vec::<f32>(n);
            ggml_any::dequantize_into(t, b, &mut out, lv).map(|_| out)
        }
    })?;
    Ok(PyArray1::from_vec(py, out))
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    match v {
        Value::U8(x) => x.into_bound_py_any(py),
        Value::I8(x) => x.into_bound_py_any(py),
        Value::U16(x) => x.into_bound_py_any(py),
        Value::I16(x) => x.into_bound_py_any(py),
        Value::U32(x) => x.into_bound_py_any(py),
        Value::I32(x) => x.into_bound_py_any(py),
        Value::F32(x) => x.into_bound_py_any(py),
        Value::Bool(x) => x.into_bound_py_any(py),
        Value::String(x) => x.into_bound_py_any(py),
        Value::U64(x) => x.into_bound_py_any(py),
        Value::I64(x) => x.into_bound_py_any(py),
        Value::F64(x) => x.into_bound_py_any(py),
        Value::Array(_, items) => {
            let l = PyList::empty(py);
            for i in items {
                l.append(value_to_py(py, i)?)?;
            }
            Ok(l.into_any())
        }
    }
}

/// The type path of a value: `[type]`, or `[9, element type, ...]` for (nested) arrays.
fn type_path(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(t, items) => {
            let mut p = vec![ValueType::Array as u32];
            match items.first() {
                Some(first) if *t == ValueType::Array => p.extend(type_path(first)),
                _ => p.push(*t as u32),
            }
            p
        }
        other => vec![other.value_type() as u32],
    }
}

fn bad_value(key: &str, what: &str) -> PyErr {
    to_py(Error::InvalidArgument(format!("metadata {key:?}: {what}")))
}

fn py_to_value(key: &str, obj: &Bound<'_, PyAny>, types: &[u32]) -> PyResult<Value> {
    let t = types
        .first()
        .and_then(|t| ValueType::from_u32(*t))
        .ok_or_else(|| bad_value(key, &format!("unknown value type path {types:?}")))?;
    let conv = |e: PyErr| {
        bad_value(key, &format!("cannot store {} as {t:?}: {e}", obj.repr().map(|r| r.to_string()).unwrap_or_default()))
    };
    Ok(match t {
        ValueType::U8 => Value::U8(obj.extract().map_err(conv)?),
        ValueType::I8 => Value::I8(obj.extract().map_err(conv)?),
        ValueType::U16 => Value::U16(obj.extract().map_err(conv)?),
        ValueType::I16 => Value::I16(obj.extract().map_err(conv)?),
        ValueType::U32 => Value::U32(obj.extract().map_err(conv)?),
        ValueType::I32 => Value::I32(obj.extract().map_err(conv)?),
        ValueType::F32 => Value::F32(obj.extract().map_err(conv)?),
        ValueType::Bool => Value::Bool(obj.extract().map_err(conv)?),
        ValueType::String => Value::String(obj.extract().map_err(conv)?),
        ValueType::U64 => Value::U64(obj.extract().map_err(conv)?),
        ValueType::I64 => Value::I64(obj.extract().map_err(conv)?),
        ValueType::F64 => Value::F64(obj.extract().map_err(conv)?),
        ValueType::Array => {
            let et = types
                .get(1)
                .and_then(|t| ValueType::from_u32(*t))
                .ok_or_else(|| bad_value(key, "array without an element type"))?;
            let mut items = Vec::new();
            for item in obj.try_iter().map_err(conv)? {
                items.push(py_to_value(key, &item?, &types[1..])?);
            }
            Value::Array(et, items)
        }
    })
}

/// Parse a GGUF file's header -> dict(version, alignment, data_offset, file_size,
/// metadata=[(key, type_path, value)], tensors=[(name, dims, ggml_type, offset, nbytes)]).
#[pyfunction]
fn gguf_read_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let h = detached(py, || reader::read_file(&path))?;
    let d = PyDict::new(py);
    d.set_item("version", h.version)?;
    d.set_item("alignment", h.alignment)?;
    d.set_item("data_offset", h.data_offset)?;
    d.set_item("file_size", h.file_size)?;
    let md = PyList::empty(py);
    for (k, v) in &h.metadata {
        md.append((k, type_path(v), value_to_py(py, v)?))?;
    }
    d.set_item("metadata", md)?;
    let ts = PyList::empty(py);
    for t in &h.tensors {
        ts.append((&t.name, t.dims.clone(), t.ggml_type, t.offset, t.nbytes))?;
    }
    d.set_item("tensors", ts)?;
    Ok(d)
}

type PyTensor<'py> = (String, Vec<u64>, u32, PyReadonlyArray1<'py, u8>);

/// Write a GGUF v3 file atomically. `metadata`: [(key, type_path, value)];
/// `tensors`: [(name, gguf_dims, ggml_type_id, uint8 data)].
#[pyfunction]
fn gguf_write(
    py: Python<'_>,
    path: PathBuf,
    metadata: Vec<(String, Vec<u32>, Bound<'_, PyAny>)>,
    tensors: Vec<PyTensor<'_>>,
) -> PyResult<()> {
    let md = metadata.iter().map(|(k, t, v)| Ok((k.clone(), py_to_value(k, v, t)?))).collect::<PyResult<Vec<_>>>()?;
    let mut td = Vec::with_capacity(tensors.len());
    for (name, dims, ty, data) in &tensors {
        td.push(TensorData { name: name.clone(), dims: dims.clone(), ggml_type: *ty, data: data.as_slice()? });
    }
    detached(py, || writer::write_file(&path, &md, &td))
}

/// `(header bytes, data offsets, sizes, file length)`
type PyLayout<'py> = (Bound<'py, pyo3::types::PyBytes>, Vec<u64>, Vec<u64>, u64);

/// The layout of a GGUF file (see `gguf::writer::layout`): `(header bytes, data offsets, sizes,
/// file length)` for the metadata and `[(name, gguf_dims, ggml_type_id)]`.
#[pyfunction]
fn gguf_layout<'py>(
    py: Python<'py>,
    metadata: Vec<(String, Vec<u32>, Bound<'py, PyAny>)>,
    tensors: Vec<(String, Vec<u64>, u32)>,
) -> PyResult<PyLayout<'py>> {
    let md = metadata.iter().map(|(k, t, v)| Ok((k.clone(), py_to_value(k, v, t)?))).collect::<PyResult<Vec<_>>>()?;
    let specs: Vec<writer::TensorSpec> =
        tensors.into_iter().map(|(name, dims, ggml_type)| writer::TensorSpec { name, dims, ggml_type }).collect();
    let l = writer::layout(&md, &specs).map_err(to_py)?;
    Ok((pyo3::types::PyBytes::new(py, &l.header), l.data_offsets, l.sizes, l.file_len))
}

/// A GGUF file written tensor by tensor (see `gguf::writer::StreamWriter`): created with the
/// metadata and `[(name, gguf_dims, ggml_type_id)]`, then `write_tensor` in that order, then
/// `finish` (atomic rename). `abort`, or dropping it unfinished, deletes the temporary file.
#[pyclass(module = "diffulex_edge._native")]
struct GGUFStreamWriter {
    inner: std::sync::Mutex<Option<writer::StreamWriter>>,
}

impl GGUFStreamWriter {
    fn with<R>(&self, f: impl FnOnce(&mut Option<writer::StreamWriter>) -> PyResult<R>) -> PyResult<R> {
        // try_lock: a thread waiting here would hold the GIL that the writing thread needs back
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(to_py(Error::InvalidArgument("this GGUF stream writer is in use by another thread".into())))
            }
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err(to_py(Error::InvalidArgument("GGUF writer poisoned by an earlier panic".into())))
            }
        };
        f(&mut g)
    }
}

fn closed() -> PyErr {
    to_py(Error::InvalidArgument("this GGUF stream writer is already finished or aborted".into()))
}

#[pymethods]
impl GGUFStreamWriter {
    #[new]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        metadata: Vec<(String, Vec<u32>, Bound<'_, PyAny>)>,
        tensors: Vec<(String, Vec<u64>, u32)>,
    ) -> PyResult<Self> {
        let md =
            metadata.iter().map(|(k, t, v)| Ok((k.clone(), py_to_value(k, v, t)?))).collect::<PyResult<Vec<_>>>()?;
        let specs: Vec<writer::TensorSpec> =
            tensors.into_iter().map(|(name, dims, ggml_type)| writer::TensorSpec { name, dims, ggml_type }).collect();
        let w = detached(py, || writer::StreamWriter::create(&path, &md, &specs))?;
        Ok(GGUFStreamWriter { inner: std::sync::Mutex::new(Some(w)) })
    }

    /// Name of the tensor expected next (None when all are written or the writer is closed).
    fn next_tensor(&self) -> PyResult<Option<String>> {
        self.with(|w| Ok(w.as_ref().and_then(|w| w.next_tensor().map(str::to_owned))))
    }

    fn write_tensor(&self, py: Python<'_>, name: &str, data: PyReadonlyArray1<'_, u8>) -> PyResult<()> {
        let bytes = data.as_slice()?;
        self.with(|w| {
            let w = w.as_mut().ok_or_else(closed)?;
            detached(py, || w.write_tensor(name, bytes))
        })
    }

    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        self.with(|w| {
            let w = w.take().ok_or_else(closed)?;
            detached(py, || w.finish())
        })
    }

    /// Delete the temporary file; the target is left as it was. Idempotent.
    fn abort(&self) -> PyResult<()> {
        self.with(|w| {
            drop(w.take());
            Ok(())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GGUFStreamWriter>()?;
    m.add_function(wrap_pyfunction!(gguf_read_header, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_layout, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_write, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_types, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_dequantize, m)?)?;
    Ok(())
}
