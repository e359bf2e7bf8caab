//! The GGUF v3 container: metadata key/values of every GGUF value type (arrays included), tensor
//! infos and aligned tensor data. No tensor math here; the block formats are in `formats`.
//!
//! File layout (ggml docs/gguf.md, read for reference): magic `GGUF`, u32 version, u64 tensor
//! count, u64 metadata count, the metadata (`string key, u32 type, value`), the tensor infos
//! (`string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset`), padding to
//! `general.alignment` (default 32), then the tensor data, each tensor starting at an aligned
//! offset relative to the start of the data section. Little-endian throughout; strings are a u64
//! byte length followed by UTF-8 bytes without a terminator.

pub mod reader;
pub mod writer;

use crate::error::{Error, Result};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// `GGML_MAX_DIMS`: llama.cpp refuses tensors with more dimensions.
pub const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays (the format allows them; no real file nests deeply).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// GGUF metadata value types (`gguf_type` in gguf.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_u32(v: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type can take on disk (bounds array counts).
    pub fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
}

/// `(block size, bytes per block)` of every ggml type id a GGUF file may name (`GGML_QUANT_SIZES`
/// in gguf-py), including types this build cannot quantize, so any file's layout can be checked.
pub fn ggml_type_size(id: u32) -> Option<(u64, u64)> {
    Some(match id {
        0 => (1, 4),
        1 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 40),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        16 => (256, 66),
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        20 => (32, 18),
        21 => (256, 110),
        22 => (256, 82),
        23 => (256, 136),
        24 => (1, 1),
        25 => (1, 2),
        26 => (1, 4),
        27 => (1, 8),
        28 => (1, 8),
        29 => (256, 56),
        30 => (1, 2),
        34 => (256, 54),
        35 => (256, 66),
        39 => (32, 17),
        40 => (64, 36),
        41 => (128, 18),
        _ => return None,
    })
}

/// Bytes of a tensor with GGUF dims (`dims[0]` is the row length) of ggml type `id`.
pub fn tensor_nbytes(id: u32, dims: &[u64]) -> Result<u64> {
    let (block, size) = ggml_type_size(id).ok_or_else(|| Error::Unsupported(format!("unknown ggml type id {id}")))?;
    let row = *dims.first().unwrap_or(&1);
    if !row.is_multiple_of(block) {
        return Err(Error::Shape(format!(
            "row length {row} is not a multiple of the block size {block} of ggml type {id}"
        )));
    }
    let rows = dims.iter().skip(1).try_fold(1u64, |a, d| a.checked_mul(*d));
    rows.and_then(|r| r.checked_mul(row / block))
        .and_then(|b| b.checked_mul(size))
        .ok_or_else(|| Error::Shape(format!("tensor dims {dims:?} overflow 64 bits")))
}

/// One tensor's entry in the tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the fastest-varying (row length); numpy's shape is the reverse.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Relative to the start of the data section.
    pub offset: u64,
    pub nbytes: u64,
}

/// A parsed GGUF header: everything but the tensor bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub file_size: u64,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

pub(crate) fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

#[cfg(test)]
mod tests;
