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

/// A tensor announced in the header before its bytes are written: GGUF dims and ggml type id.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
}

/// Validate everything before the first byte is written; returns the alignment and each tensor's
/// byte size (from its dims and type).
fn validate(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<(u64, Vec<u64>)> {
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
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut total = 0u64;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::InvalidArgument(format!("duplicate tensor name {:?}", t.name)));
        }
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
            return Err(Error::Shape(format!("tensor {:?}: {} dims, GGUF allows 1..={MAX_DIMS}", t.name, t.dims.len())));
        }
        let n = tensor_nbytes(t.ggml_type, &t.dims).map_err(|e| Error::Shape(format!("tensor {:?}: {e}", t.name)))?;
        total = total.checked_add(n).and_then(|v| align_up(v, alignment))
            .ok_or_else(|| Error::Shape(format!("tensor {:?}: the data section overflows 64 bits", t.name)))?;
        sizes.push(n);
    }
    Ok((alignment, sizes))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Header, metadata, tensor infos and the padding up to the data section.
fn write_header<W: Write>(
    w: &mut W, metadata: &[(String, Value)], tensors: &[TensorSpec], sizes: &[u64], alignment: u64,
) -> std::io::Result<()> {
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
    for (t, n) in tensors.iter().zip(sizes) {
        put_string(&mut counter, &t.name)?;
        counter.0 += 4 + 8 * t.dims.len() as u64 + 4 + 8;
        put_string(w, &t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            w.write_all(&d.to_le_bytes())?;
        }
        w.write_all(&t.ggml_type.to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        offset = align_up(offset + n, alignment).expect("sizes were validated");
    }
    pos += counter.0;
    let pad = align_up(pos, alignment).expect("small") - pos;
    write_zeros(w, pad)
}

fn write_zeros<W: Write>(w: &mut W, n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 256] = [0; 256];
    let mut left = n;
    while left > 0 {
        let k = left.min(ZEROS.len() as u64);
        w.write_all(&ZEROS[..k as usize])?;
        left -= k;
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

/// A GGUF v3 file written tensor by tensor: the header (with every tensor's type and shape) goes
/// out first, then each tensor's bytes in the announced order, so a caller never holds more than
/// one encoded tensor. Everything goes to a temporary file next to the target that [`finish`]
/// fsyncs and renames into place; dropping the writer unfinished (an error, an interrupt) deletes
/// the temporary file and leaves the target untouched.
///
/// [`finish`]: StreamWriter::finish
pub struct StreamWriter<W: Write = BufWriter<File>> {
    w: Option<W>,
    paths: Option<(PathBuf, PathBuf)>, // (temporary, target) for file-backed writers
    names: Vec<String>,
    sizes: Vec<u64>,
    alignment: u64,
    next: usize,
}

impl StreamWriter {
    /// Validate the metadata and tensor specs, create the temporary file and write the header.
    pub fn create(path: &Path, metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Self> {
        let (alignment, sizes) = validate(metadata, tensors)?;
        let tmp = temp_path(path);
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut sw = StreamWriter {
            w: Some(BufWriter::with_capacity(1 << 22, f)),
            paths: Some((tmp, path.to_path_buf())),
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            sizes,
            alignment,
            next: 0,
        };
        // on error `sw` is dropped here, which removes the temporary file
        let w = sw.w.as_mut().expect("just set");
        write_header(w, metadata, tensors, &sw.sizes, alignment).map_err(|e| sw.err(e))?;
        Ok(sw)
    }

    /// Flush, fsync and rename the temporary file onto the target path.
    pub fn finish(mut self) -> Result<()> {
        self.check_complete()?;
        let w = self.w.take().expect("writer present until finish");
        let (tmp, target) = self.paths.clone().expect("file-backed");
        let result = (|| {
            let f = w.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
            fs::rename(&tmp, &target).map_err(|e| io_err(&target, e))
        })();
        if result.is_ok() {
            self.paths = None; // nothing left to clean up
        }
        result
    }
}

impl StreamWriter<Vec<u8>> {
    /// An in-memory writer (tests, small files).
    pub fn in_memory(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Self> {
        let (alignment, sizes) = validate(metadata, tensors)?;
        let mut w = Vec::new();
        write_header(&mut w, metadata, tensors, &sizes, alignment).expect("writing to a Vec cannot fail");
        Ok(StreamWriter { w: Some(w), paths: None, names: tensors.iter().map(|t| t.name.clone()).collect(), sizes, alignment, next: 0 })
    }

    pub fn into_bytes(mut self) -> Result<Vec<u8>> {
        self.check_complete()?;
        Ok(self.w.take().expect("present"))
    }
}

impl<W: Write> StreamWriter<W> {
    fn err(&self, e: std::io::Error) -> Error {
        match &self.paths {
            Some((tmp, _)) => io_err(tmp, e),
            None => Error::InvalidArgument(format!("write failed: {e}")),
        }
    }

    /// The name of the tensor whose bytes are expected next (None when all are written).
    pub fn next_tensor(&self) -> Option<&str> {
        self.names.get(self.next).map(String::as_str)
    }

    /// Write the bytes of the next tensor, which must be `name` with the announced size.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(expected) = self.names.get(self.next) else {
            return Err(Error::InvalidArgument(format!("tensor {name:?}: all {} announced tensors are already written", self.names.len())));
        };
        if expected != name {
            return Err(Error::InvalidArgument(format!("tensor {name:?} written out of order: the header announced {expected:?} next")));
        }
        let n = self.sizes[self.next];
        if data.len() as u64 != n {
            return Err(Error::Shape(format!("tensor {name:?}: the header announced {n} bytes, got {}", data.len())));
        }
        let pad = align_up(n, self.alignment).expect("validated") - n;
        let r = {
            let w = self.w.as_mut().expect("writer present until finish");
            w.write_all(data).and_then(|_| write_zeros(w, pad))
        };
        r.map_err(|e| self.err(e))?;
        self.next += 1;
        Ok(())
    }

    fn check_complete(&self) -> Result<()> {
        match self.next_tensor() {
            Some(n) => Err(Error::InvalidArgument(format!(
                "{} of {} tensors written; {n:?} and later ones are missing", self.next, self.names.len()
            ))),
            None => Ok(()),
        }
    }
}

impl<W: Write> Drop for StreamWriter<W> {
    fn drop(&mut self) {
        if let Some((tmp, _)) = self.paths.take() {
            drop(self.w.take());
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Specs of in-memory tensors, with every data length checked before anything is written.
fn specs(tensors: &[TensorData<'_>]) -> Result<Vec<TensorSpec>> {
    tensors.iter().map(|t| {
        if let Ok(n) = tensor_nbytes(t.ggml_type, &t.dims) {
            if n != t.data.len() as u64 {
                return Err(Error::Shape(format!(
                    "tensor {:?}: dims {:?} of type {} need {n} bytes, got {}", t.name, t.dims, t.ggml_type, t.data.len()
                )));
            }
        } // (invalid dims/types are reported by `validate`)
        Ok(TensorSpec { name: t.name.clone(), dims: t.dims.clone(), ggml_type: t.ggml_type })
    }).collect()
}

/// Write a GGUF v3 file atomically (temp file + fsync + rename).
pub fn write_file(path: &Path, metadata: &[(String, Value)], tensors: &[TensorData<'_>]) -> Result<()> {
    let mut w = StreamWriter::create(path, metadata, &specs(tensors)?)?;
    for t in tensors {
        w.write_tensor(&t.name, t.data)?;
    }
    w.finish()
}

/// Serialize to memory (tests, small files).
pub fn write_bytes(metadata: &[(String, Value)], tensors: &[TensorData<'_>]) -> Result<Vec<u8>> {
    let mut w = StreamWriter::in_memory(metadata, &specs(tensors)?)?;
    for t in tensors {
        w.write_tensor(&t.name, t.data)?;
    }
    w.into_bytes()
}

/// Value type of an array's elements, for callers building `Value::Array`s.
pub fn array_of(t: ValueType, items: Vec<Value>) -> Value {
    Value::Array(t, items)
}
