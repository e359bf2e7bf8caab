//! The one error type of the core. The Python bindings map every variant to a typed Python
//! exception in `src/python/errors.rs` (the only place that mapping lives).

/// Errors raised by the core. Messages say what was wrong and what would fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Shapes or lengths that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// A NaN or infinite value in data to be quantized.
    #[error("non-finite value {value} at row {row}, column {col}; replace NaN/Inf weights before quantizing")]
    NonFinite { row: usize, col: usize, value: f32 },
    /// A format, option or kernel this build does not support.
    #[error("{0}")]
    Unsupported(String),
    /// An argument outside its valid range.
    #[error("{0}")]
    InvalidArgument(String),
    /// Bytes that do not decode as the format says they should.
    #[error("{0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Check that a buffer has exactly `expected` elements.
pub(crate) fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Shape(format!("{what} has {got} elements, expected {expected}")));
    }
    Ok(())
}

/// Locate the first non-finite value of a row-major `[rows, cols]` matrix as an error.
pub(crate) fn first_non_finite(w: &[f32], cols: usize) -> Option<Error> {
    w.iter().position(|v| !v.is_finite()).map(|i| Error::NonFinite {
        row: i.checked_div(cols).unwrap_or(0),
        col: i.checked_rem(cols).unwrap_or(0),
        value: w[i],
    })
}
