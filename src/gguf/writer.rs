//! GGUF writer. Writes to a temporary file next to the target, fsyncs and renames it into place,
//! so readers never see a half-written file and a failed write leaves the old file untouched.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{align_up, tensor_nbytes, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_DIMS};
use crate::error::{Error, Result};

/// A tensor to write: its GGUF dims (`dims[0]` = row length), ggml type id and encoded bytes.
pub struct TensorData<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: &'a [u8],
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::InvalidArgument(format!("cannot write {}: {e}", path.display()))
}

fn put_string<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&[*x as u8]),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => put_string(w, s),
        Value::Array(t, items) => {
            w.write_all(&(*t as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| put_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

fn check_value(key: &str, v: &Value) -> Result<()> {
    if let Value::Array(t, items) = v {
        if let Some(bad) = items.iter().find(|i| i.value_type() != *t) {
            return Err(Error::InvalidArgument(format!(
                "metadata {key:?}: array of {t:?} holds a {:?}", bad.value_type()
            )));
        }
        items.iter().try_for_each(|i| check_value(key, i))?;
    }
    Ok(())
}

/// Validate everything before the first byte is written.
fn validate(metadata: &[(String, Value)], tensors: &[TensorData<'_>]) -> Result<u64> {
    let mut keys = std::collections::HashSet::new();
    for (k, v) in metadata {
        if !keys.insert(k.as_str()) {
            return Err(Error::InvalidArgument(format!("duplicate metadata key {k:?}")));
        }
        check_value(k, v)?;
    }
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as u64,
        Some((_, v)) => return Err(Error::InvalidArgument(format!("{ALIGNMENT_KEY} must be a power-of-two u32, got {v:?}"))),
    };
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::InvalidArgument(format!("duplicate tensor name {:?}", t.name)));
        }
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
            return Err(Error::Shape(format!("tensor {:?}: {} dims, GGUF allows 1..={MAX_DIMS}", t.name, t.dims.len())));
        }
        let n = tensor_nbytes(t.ggml_type, &t.dims).map_err(|e| Error::Shape(format!("tensor {:?}: {e}", t.name)))?;
        if n != t.data.len() as u64 {
            return Err(Error::Shape(format!(
                "tensor {:?}: dims {:?} of type {} need {n} bytes, got {}", t.name, t.dims, t.ggml_type, t.data.len()
            )));
        }
    }
    Ok(alignment)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn write_body<W: Write>(w: &mut W, metadata: &[(String, Value)], tensors: &[TensorData<'_>], alignment: u64) -> std::io::Result<()> {
    w.write_all(&GGUF_MAGIC)?;
    w.write_all(&GGUF_VERSION.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())?;
    let mut pos = 24u64;
    let mut counter = Counter(0);
    for (k, v) in metadata {
        put_string(&mut counter, k)?;
        counter.write_all(&(v.value_type() as u32).to_le_bytes())?;
        put_value(&mut counter, v)?;
        put_string(w, k)?;
        w.write_all(&(v.value_type() as u32).to_le_bytes())?;
        put_value(w, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut counter, &t.name)?;
        counter.0 += 4 + 8 * t.dims.len() as u64 + 4 + 8;
        put_string(w, &t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            w.write_all(&d.to_le_bytes())?;
        }
        w.write_all(&t.ggml_type.to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        offset = align_up(offset + t.data.len() as u64, alignment).expect("sizes were validated");
    }
    pos += counter.0;
    let zeros = vec![0u8; alignment as usize];
    let pad = align_up(pos, alignment).expect("small") - pos;
    w.write_all(&zeros[..pad as usize])?;
    for t in tensors {
        w.write_all(t.data)?;
        let len = t.data.len() as u64;
        let pad = align_up(len, alignment).expect("validated") - len;
        w.write_all(&zeros[..pad as usize])?;
    }
    Ok(())
}

/// Counts bytes instead of writing them (to find where the data section starts).
struct Counter(u64);
impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write a GGUF v3 file atomically (temp file + fsync + rename).
pub fn write_file(path: &Path, metadata: &[(String, Value)], tensors: &[TensorData<'_>]) -> Result<()> {
    let alignment = validate(metadata, tensors)?;
    let tmp = temp_path(path);
    let result = (|| {
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, f);
        write_body(&mut w, metadata, tensors, alignment).map_err(|e| io_err(&tmp, e))?;
        let f = w.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serialize to memory (tests, small files).
pub fn write_bytes(metadata: &[(String, Value)], tensors: &[TensorData<'_>]) -> Result<Vec<u8>> {
    let alignment = validate(metadata, tensors)?;
    let mut out = Vec::new();
    write_body(&mut out, metadata, tensors, alignment).expect("writing to a Vec cannot fail");
    Ok(out)
}

/// Value type of an array's elements, for callers building `Value::Array`s.
pub fn array_of(t: ValueType, items: Vec<Value>) -> Value {
    Value::Array(t, items)
}
