//! Moving data between `tch::Tensor`s and the plain slices the core works on, with the input
//! checks every adapter shares. All checks return [`crate::Error`]; nothing here panics on bad
//! input.

use tch::{Device, Kind, TchError, Tensor};

use crate::error::{Error, Result};

/// Float dtypes accepted for weights. Everything is widened or narrowed to f32 first, because
/// the core quantizes f32 (f64 weights beyond the f32 range become inf and are reported as
/// [`Error::NonFinite`] by the core).
pub const WEIGHT_KINDS: [Kind; 4] = [Kind::Float, Kind::Half, Kind::BFloat16, Kind::Double];

/// Dtypes accepted for activations by [`QuantizedLinear`](super::QuantizedLinear). The kernels
/// accumulate in f32 and the output is cast back to the input's dtype.
pub const ACTIVATION_KINDS: [Kind; 3] = [Kind::Float, Kind::Half, Kind::BFloat16];

/// Map a libtorch failure (a C++ exception surfaced by tch) into the core error type.
pub(crate) fn tch_error(e: TchError) -> Error {
    Error::InvalidArgument(format!("libtorch: {e}"))
}

fn kind_names(kinds: &[Kind]) -> String {
    kinds.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
}

/// Check that `t` is a dense CPU tensor whose dtype is one of `kinds`; returns its dtype.
pub(crate) fn check_cpu_float(t: &Tensor, what: &str, kinds: &[Kind]) -> Result<Kind> {
    let device = t.device();
    if device != Device::Cpu {
        return Err(Error::Unsupported(format!(
            "{what} is on {device:?}, but the diffulex_edge kernels run on the CPU; \
             move the tensor to CPU first (`t.to_device(tch::Device::Cpu)`)"
        )));
    }
    if t.is_sparse() {
        return Err(Error::Unsupported(format!("{what} is a sparse tensor; convert it with `to_dense` first")));
    }
    let kind = t.f_kind().map_err(tch_error)?;
    if !kinds.contains(&kind) {
        return Err(Error::Unsupported(format!("{what} has dtype {kind:?}; supported dtypes: {}", kind_names(kinds))));
    }
    Ok(kind)
}

/// Convert a tensor's sizes to `usize`, naming the tensor in errors.
pub(crate) fn dims(t: &Tensor) -> Vec<usize> {
    // libtorch sizes are never negative.
    t.size().into_iter().map(|d| d as usize).collect()
}

/// Copy any float CPU tensor into a row-major `Vec<f32>` (converting dtype and making it
/// contiguous on the way). Runs without autograd so weights that require grad work too.
pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    tch::no_grad(|| {
        let f = t.f_to_kind(Kind::Float).map_err(tch_error)?;
        let n = f.numel();
        let mut v = vec![0f32; n];
        // at_copy_data copies from a contiguous view, so strided inputs are fine.
        f.f_copy_data(&mut v, n).map_err(tch_error)?;
        Ok(v)
    })
}

/// A checked 2-D weight: `[rows, cols]` as row-major f32.
pub(crate) struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Check that `t` is a 2-D float CPU tensor and copy it out as f32.
pub(crate) fn matrix_f32(t: &Tensor, what: &str) -> Result<Matrix> {
    check_cpu_float(t, what, &WEIGHT_KINDS)?;
    let size = dims(t);
    let [rows, cols] = size[..] else {
        return Err(Error::Shape(format!(
            "{what} must be 2-D [rows, cols] (for a linear layer [out_features, in_features]), \
             got shape {size:?}"
        )));
    };
    Ok(Matrix { data: to_f32_vec(t)?, rows, cols })
}

/// Check that `t` is a 1-D float CPU tensor of `len` elements and copy it out as f32.
pub(crate) fn vector_f32(t: &Tensor, what: &str, len: usize) -> Result<Vec<f32>> {
    check_cpu_float(t, what, &WEIGHT_KINDS)?;
    let size = dims(t);
    if size != [len] {
        return Err(Error::Shape(format!("{what} must have shape [{len}], got {size:?}")));
    }
    let v = to_f32_vec(t)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { row: 0, col: i, value: v[i] });
    }
    Ok(v)
}

/// Build an f32 CPU tensor of shape `shape` from row-major data.
pub(crate) fn f32_tensor(data: &[f32], shape: &[i64]) -> Result<Tensor> {
    let expected: i64 = shape.iter().product();
    if expected as usize != data.len() {
        return Err(Error::Shape(format!("{} values cannot fill a tensor of shape {shape:?}", data.len())));
    }
    Tensor::f_from_slice(data).and_then(|t| t.f_reshape(shape)).map_err(tch_error)
}
