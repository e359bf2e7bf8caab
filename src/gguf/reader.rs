//! GGUF reader. Validates every length, count and offset against the bytes actually left in the
//! file before using (or allocating for) it, so a truncated or corrupt file is a `Corrupt` error,
//! never a panic or a huge allocation.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::{
    align_up, tensor_nbytes, GgufHeader, TensorInfo, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC,
    MAX_ARRAY_DEPTH, MAX_DIMS,
};
use crate::error::{Error, Result};

/// Element-count bound of a tensor (its dims with zeros counted as 1): 2^60 8-byte items is the
/// most a numpy shape can describe.
pub const MAX_ELEMENTS: u64 = 1 << 60;

fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

/// A byte source that knows how much is left.
struct Src<R: Read> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Src<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        if self.remaining() < N as u64 {
            return Err(corrupt(format!(
                "truncated file: {what} at byte {} needs {N} bytes, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| corrupt(format!("read error at byte {}: {e}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A count of items each at least `min_size` bytes long, checked against what is left.
    fn count(&mut self, what: &str, min_size: u64) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n.checked_mul(min_size).is_none_or(|need| need > self.remaining()) {
            return Err(corrupt(format!(
                "{what} {n} at byte {at} cannot fit in the {} bytes left in the file",
                self.remaining()
            )));
        }
        usize::try_from(n).map_err(|_| corrupt(format!("{what} {n} too large")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let n = self.count(&format!("length of {what}"), 1)?;
        let mut buf = vec![0u8; n];
        self.r.read_exact(&mut buf).map_err(|e| corrupt(format!("read error at byte {}: {e}", self.pos)))?;
        self.pos += n as u64;
        String::from_utf8(buf).map_err(|_| corrupt(format!("{what} at byte {at} is not valid UTF-8")))
    }

    fn value(&mut self, t: ValueType, key: &str, depth: usize) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.bytes::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.bytes::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.bytes(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.bytes(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.bytes(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.bytes(key)?)),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.bytes(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.bytes(key)?)),
            ValueType::Bool => match self.bytes::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(corrupt(format!("metadata {key:?}: bool byte {b} is neither 0 nor 1"))),
            },
            ValueType::String => Value::String(self.string(&format!("metadata {key:?} string"))?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(corrupt(format!("metadata {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let et = self.value_type(key)?;
                let n = self.count(&format!("metadata {key:?} array length"), et.min_size())?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(et, items)
            }
        })
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType> {
        let at = self.pos;
        let t = self.u32(key)?;
        ValueType::from_u32(t).ok_or_else(|| corrupt(format!("metadata {key:?}: unknown value type {t} at byte {at}")))
    }
}

/// Parse the header (metadata and tensor infos) of a GGUF stream of `len` bytes.
pub fn read_header<R: Read>(r: R, len: u64) -> Result<GgufHeader> {
    let mut s = Src { r, pos: 0, len };
    let magic = s.bytes::<4>("magic")?;
    if magic != GGUF_MAGIC {
        return Err(corrupt(format!("not a GGUF file: magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = s.u32("version")?;
    if version != 2 && version != 3 {
        return Err(corrupt(format!(
            "unsupported GGUF version {version} (this reader handles 2 and 3, little-endian)"
        )));
    }
    // minimum on-disk sizes: a tensor info is name len + n_dims + type + offset; a kv is key len + type + 1
    let n_tensors = s.count("tensor count", 24)?;
    let n_kv = s.count("metadata count", 13)?;
    let mut metadata = Vec::with_capacity(n_kv);
    let mut keys = HashSet::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = s.string(&format!("metadata key {i}"))?;
        let t = s.value_type(&key)?;
        let v = s.value(t, &key, 0)?;
        if !keys.insert(key.clone()) {
            return Err(corrupt(format!("duplicate metadata key {key:?}")));
        }
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as u64,
        Some((_, v)) => return Err(corrupt(format!("{ALIGNMENT_KEY} must be a power-of-two u32, got {v:?}"))),
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = s.string(&format!("tensor {i} name"))?;
        let nd = s.u32(&format!("tensor {name:?} n_dims"))? as usize;
        if nd > MAX_DIMS {
            return Err(corrupt(format!("tensor {name:?} has {nd} dims, at most {MAX_DIMS} allowed")));
        }
        let mut dims = Vec::with_capacity(nd);
        for _ in 0..nd {
            dims.push(s.u64(&format!("tensor {name:?} dims"))?);
        }
        let ggml_type = s.u32(&format!("tensor {name:?} type"))?;
        let offset = s.u64(&format!("tensor {name:?} offset"))?;
        let nbytes = tensor_nbytes(ggml_type, &dims).map_err(|e| corrupt(format!("tensor {name:?}: {e}")))?;
        // numpy refuses a shape whose dims (zeros skipped) times the item size pass i64::MAX, even
        // when a zero dim makes the tensor empty (0 bytes long, so the size check passes): bound
        // the element count so that 8-byte items still fit
        if dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d.max(1))).is_none_or(|n| n >= MAX_ELEMENTS) {
            return Err(corrupt(format!("tensor {name:?}: dims {dims:?} multiply to 2^60 elements or more")));
        }
        if offset % alignment != 0 {
            return Err(corrupt(format!(
                "tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(corrupt(format!("duplicate tensor name {name:?}")));
        }
        tensors.push(TensorInfo { name, dims, ggml_type, offset, nbytes });
    }
    let data_offset = align_up(s.pos, alignment).ok_or_else(|| corrupt("data offset overflows"))?;
    let data_len = len.saturating_sub(data_offset);
    if !tensors.is_empty() && data_offset > len {
        return Err(corrupt(format!("truncated file: data section starts at byte {data_offset}, file has {len}")));
    }
    for t in &tensors {
        if t.offset.checked_add(t.nbytes).is_none_or(|end| end > data_len) {
            return Err(corrupt(format!(
                "tensor {:?}: bytes {}..{}+{} lie outside the {data_len}-byte data section (truncated file?)",
                t.name, t.offset, t.offset, t.nbytes
            )));
        }
    }
    // overlapping tensors mean a corrupt table
    let mut spans: Vec<(u64, u64, &str)> =
        tensors.iter().map(|t| (t.offset, t.offset + t.nbytes, t.name.as_str())).collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(corrupt(format!("tensors {:?} and {:?} overlap in the data section", w[0].2, w[1].2)));
        }
    }
    Ok(GgufHeader { version, alignment, metadata, tensors, data_offset, file_size: len })
}

/// Parse the header of the GGUF file at `path`.
pub fn read_file(path: &Path) -> Result<GgufHeader> {
    let f = File::open(path).map_err(|e| Error::InvalidArgument(format!("cannot open {}: {e}", path.display())))?;
    let len = f.metadata().map_err(|e| Error::InvalidArgument(format!("cannot stat {}: {e}", path.display())))?.len();
    read_header(BufReader::with_capacity(1 << 20, f), len).map_err(|e| match e {
        Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Parse a header from an in-memory file image.
pub fn read_bytes(b: &[u8]) -> Result<GgufHeader> {
    read_header(b, b.len() as u64)
}

/// The encoded bytes of tensor `t` inside `file`, the in-memory image `header` was parsed from.
/// Checked again here (not trusted from the header) so that a header paired with the wrong or a
/// shorter image is a `Corrupt` error rather than an out-of-bounds slice.
pub fn tensor_data<'a>(header: &GgufHeader, t: &TensorInfo, file: &'a [u8]) -> Result<&'a [u8]> {
    let start = header.data_offset.checked_add(t.offset);
    let end = start.and_then(|s| s.checked_add(t.nbytes));
    match (start, end) {
        (Some(s), Some(e)) if e <= file.len() as u64 => Ok(&file[s as usize..e as usize]),
        _ => Err(corrupt(format!(
            "tensor {:?}: bytes {}+{}..+{} lie outside the {}-byte file",
            t.name,
            header.data_offset,
            t.offset,
            t.nbytes,
            file.len()
        ))),
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;
    use crate::gguf::writer::{write_bytes, TensorData};

    #[test]
    fn zero_dim_with_overflowing_element_count_is_corrupt() {
        // found by fuzzing the Python loader: 0 bytes (so in bounds) but no array can have this shape
        let bytes = write_bytes(
            &[],
            &[TensorData { name: "t".into(), dims: vec![1 << 62, 1 << 62, 0], ggml_type: 0, data: &[] }],
        )
        .unwrap();
        match read_bytes(&bytes) {
            Err(Error::Corrupt(m)) => assert!(m.contains("\"t\"") && m.contains("2^60"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // found later by the same fuzzer: fewer than 2^63 elements but more than 2^63 bytes as f64
        let bytes =
            write_bytes(&[], &[TensorData { name: "u".into(), dims: vec![1 << 61, 2, 0], ggml_type: 0, data: &[] }])
                .unwrap();
        match read_bytes(&bytes) {
            Err(Error::Corrupt(m)) => assert!(m.contains("\"u\""), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // a zero dim alongside dims that fit is still a valid empty tensor
        let ok = write_bytes(
            &[],
            &[TensorData { name: "e".into(), dims: vec![1 << 20, 1 << 20, 0], ggml_type: 0, data: &[] }],
        )
        .unwrap();
        assert_eq!(read_bytes(&ok).unwrap().tensors[0].nbytes, 0);
    }

    #[test]
    fn tensor_data_checks_the_image_it_is_given() {
        let d = [7u8; 8];
        let bytes =
            write_bytes(&[], &[TensorData { name: "x".into(), dims: vec![2], ggml_type: 0, data: &d }]).unwrap();
        let h = read_bytes(&bytes).unwrap();
        assert_eq!(tensor_data(&h, &h.tensors[0], &bytes).unwrap(), &d);
        let short = &bytes[..h.data_offset as usize + 7]; // one byte short of the tensor's 8
        assert!(matches!(tensor_data(&h, &h.tensors[0], short), Err(Error::Corrupt(_))));
    }
}
