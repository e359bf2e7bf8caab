//! The one place core errors become Python exceptions, and the one GIL helper.
//!
//! The exception classes are defined in `diffulex_edge/errors.py` (so they can inherit from both
//! `QuantizationError` and the matching builtin, e.g. `ValueError`); this module looks them up.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Error;

fn exception(py: Python<'_>, class: &str, msg: String) -> PyErr {
    let cls = py
        .import("diffulex_edge.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match cls {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

/// Map a core error to its typed Python exception.
pub fn to_py(e: Error) -> PyErr {
    let class = match &e {
        Error::Shape(_) => "ShapeError",
        Error::NonFinite { .. } => "NonFiniteWeightError",
        Error::Unsupported(_) => "UnsupportedFormatError",
        Error::InvalidArgument(_) => "ConfigError",
        Error::Corrupt(_) => "CorruptFileError",
    };
    Python::attach(|py| exception(py, class, e.to_string()))
}

/// Run `f` without the GIL, turning a core error or a panic into a Python exception.
pub fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(exception(
                py,
                "QuantizationError",
                format!("internal error in the native core: {what}; please report it"),
            ))
        }
    }
}
