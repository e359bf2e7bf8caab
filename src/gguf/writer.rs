//! GGUF writer. Writes to a file that has no name until it is complete (Linux: `O_TMPFILE` in
//! the target's directory; elsewhere a locked temporary file next to it), fsyncs it and links it
//! into place, so readers never see a half-written file, a failed or interrupted write leaves the
//! old file untouched, and on Linux not even `kill -9` leaves a temporary file behind.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{
    align_up, tensor_nbytes, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_DIMS,
};
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

/// Set to a non-empty value to make every writer use the named-temporary-file fallback (tests).
pub const NO_TMPFILE_ENV: &str = "DIFFULEX_EDGE_NO_TMPFILE";

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
                "metadata {key:?}: array of {t:?} holds a {:?}",
                bad.value_type()
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
        Some((_, v)) => {
            return Err(Error::InvalidArgument(format!("{ALIGNMENT_KEY} must be a power-of-two u32, got {v:?}")))
        }
    };
    let mut names = std::collections::HashSet::new();
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut total = 0u64;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::InvalidArgument(format!("duplicate tensor name {:?}", t.name)));
        }
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
            return Err(Error::Shape(format!(
                "tensor {:?}: {} dims, GGUF allows 1..={MAX_DIMS}",
                t.name,
                t.dims.len()
            )));
        }
        let n = tensor_nbytes(t.ggml_type, &t.dims).map_err(|e| Error::Shape(format!("tensor {:?}: {e}", t.name)))?;
        total = total
            .checked_add(n)
            .and_then(|v| align_up(v, alignment))
            .ok_or_else(|| Error::Shape(format!("tensor {:?}: the data section overflows 64 bits", t.name)))?;
        sizes.push(n);
    }
    Ok((alignment, sizes))
}

/// Header, metadata, tensor infos and the padding up to the data section.
fn write_header<W: Write>(
    w: &mut W,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    sizes: &[u64],
    alignment: u64,
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

/// Where everything of a GGUF file goes, decided before any tensor is encoded: the header
/// bytes (up to the start of the data section), each tensor's byte offset within the data section
/// and its size, and the length of the whole file. The file a [`StreamWriter`] writes is exactly
/// `header`, then each tensor's bytes at `data_offsets[i]` (relative to the end of the header), the
/// gaps zero-filled; so a writer may place tensors in any order and resume after an interruption.
#[derive(Debug, Clone)]
pub struct Layout {
    pub header: Vec<u8>,
    pub data_offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    pub file_len: u64,
}

/// The [`Layout`] of a file with `metadata` and `tensors` (validated as [`StreamWriter::create`] does).
pub fn layout(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Layout> {
    let (alignment, sizes) = validate(metadata, tensors)?;
    let mut header = Vec::new();
    write_header(&mut header, metadata, tensors, &sizes, alignment).expect("writing to a Vec cannot fail");
    let mut data_offsets = Vec::with_capacity(sizes.len());
    let mut offset = 0u64;
    for n in &sizes {
        data_offsets.push(offset);
        offset = align_up(offset + n, alignment).expect("sizes were validated");
    }
    let file_len = header.len() as u64 + offset;
    Ok(Layout { header, data_offsets, sizes, file_len })
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
/// one encoded tensor. Everything goes to an [`AtomicFile`] that [`finish`] fsyncs and links into
/// place; dropping the writer unfinished (an error, an interrupt) leaves the target untouched and
/// no temporary file.
///
/// [`finish`]: StreamWriter::finish
pub struct StreamWriter<W: Write = BufWriter<AtomicFile>> {
    w: Option<W>,
    target: Option<PathBuf>, // for file-backed writers, named in errors
    names: Vec<String>,
    sizes: Vec<u64>,
    alignment: u64,
    next: usize,
}

impl StreamWriter {
    /// Validate the metadata and tensor specs, create the unnamed file and write the header.
    pub fn create(path: &Path, metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Self> {
        let (alignment, sizes) = validate(metadata, tensors)?;
        let f = AtomicFile::create(path)?;
        let mut sw = StreamWriter {
            w: Some(BufWriter::with_capacity(1 << 22, f)),
            target: Some(path.to_path_buf()),
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            sizes,
            alignment,
            next: 0,
        };
        // on error `sw` is dropped here, which discards the unnamed file
        let w = sw.w.as_mut().expect("just set");
        write_header(w, metadata, tensors, &sw.sizes, alignment).map_err(|e| sw.err(e))?;
        Ok(sw)
    }

    /// Flush, fsync and link the file into place at the target path.
    pub fn finish(mut self) -> Result<()> {
        self.check_complete()?;
        let w = self.w.take().expect("writer present until finish");
        let f = w.into_inner().map_err(|e| self.err(e.into_error()))?;
        f.commit()
    }
}

impl StreamWriter<Vec<u8>> {
    /// An in-memory writer (tests, small files).
    pub fn in_memory(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<Self> {
        let (alignment, sizes) = validate(metadata, tensors)?;
        let mut w = Vec::new();
        write_header(&mut w, metadata, tensors, &sizes, alignment).expect("writing to a Vec cannot fail");
        Ok(StreamWriter {
            w: Some(w),
            target: None,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            sizes,
            alignment,
            next: 0,
        })
    }

    pub fn into_bytes(mut self) -> Result<Vec<u8>> {
        self.check_complete()?;
        Ok(self.w.take().expect("present"))
    }
}

impl<W: Write> StreamWriter<W> {
    fn err(&self, e: std::io::Error) -> Error {
        match &self.target {
            Some(target) => io_err(target, e),
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
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: all {} announced tensors are already written",
                self.names.len()
            )));
        };
        if expected != name {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?} written out of order: the header announced {expected:?} next"
            )));
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
                "{} of {} tensors written; {n:?} and later ones are missing",
                self.next,
                self.names.len()
            ))),
            None => Ok(()),
        }
    }
}

/// Specs of in-memory tensors, with every data length checked before anything is written.
fn specs(tensors: &[TensorData<'_>]) -> Result<Vec<TensorSpec>> {
    tensors
        .iter()
        .map(|t| {
            if let Ok(n) = tensor_nbytes(t.ggml_type, &t.dims) {
                if n != t.data.len() as u64 {
                    return Err(Error::Shape(format!(
                        "tensor {:?}: dims {:?} of type {} need {n} bytes, got {}",
                        t.name,
                        t.dims,
                        t.ggml_type,
                        t.data.len()
                    )));
                }
            } // (invalid dims/types are reported by `validate`)
            Ok(TensorSpec { name: t.name.clone(), dims: t.dims.clone(), ggml_type: t.ggml_type })
        })
        .collect()
}

/// Write a GGUF v3 file atomically (unnamed file + fsync + link into place).
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

// ---------------------------------------------------------------------------------------------
// Crash-safe file creation.
//
// On Linux the file is opened with O_TMPFILE in the target's directory: an inode without a name,
// which the kernel frees if the process dies at any point (kill -9 included). Once complete and
// fsynced it gets its name with linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW): straight onto the
// target if that does not exist yet, else under a temporary name that is then renamed over the
// target (link cannot replace a file; rename can, atomically). Only between that link and rename,
// two syscalls with no data written in between, does a named temporary file exist.
//
// Where O_TMPFILE is unavailable (other systems, file systems that answer EOPNOTSUPP/EISDIR/
// EINVAL, no /proc, or DIFFULEX_EDGE_NO_TMPFILE set) the file is a named temporary next to the
// target, removed on error or drop. Every temporary name is `.{target name}.tmp-{pid}-{n}` and
// its writer holds an exclusive flock on it, so any later writer to the same target removes the
// ones whose process is gone (Python's `diffulex_edge._io.atomic_write` uses the same scheme).
// ---------------------------------------------------------------------------------------------

/// Where the bytes of an [`AtomicFile`] live until [`AtomicFile::commit`].
enum Pending {
    /// An unnamed `O_TMPFILE` inode in the target's directory.
    #[cfg(target_os = "linux")]
    Anonymous,
    /// A named temporary file next to the target.
    Named(PathBuf),
    /// The target is an open descriptor of this process (`/proc/self/fd/N`, which Python's
    /// `atomic_write` hands to writers): written in place; its owner makes the write atomic.
    InPlace,
}

/// A file that appears at its target path complete or not at all: write it, then [`commit`];
/// dropping it uncommitted leaves the target as it was and no temporary file.
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    file: Option<File>,
    pending: Pending,
    target: PathBuf,
}

static TEMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `.{name}.tmp-{pid}-{n}`, unique within this process.
fn temp_name(name: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.tmp-{}-{n}", std::process::id())
}

fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn is_proc_fd(target: &Path) -> bool {
    cfg!(target_os = "linux")
        && (target.starts_with("/proc/self/fd") || target.starts_with(format!("/proc/{}/fd", std::process::id())))
}

impl AtomicFile {
    /// Open the (unnamed or temporary) file that will become `target`.
    pub fn create(target: &Path) -> Result<Self> {
        Self::create_with(target, std::env::var_os(NO_TMPFILE_ENV).is_none_or(|v| v.is_empty()))
    }

    fn create_with(target: &Path, allow_anonymous: bool) -> Result<Self> {
        let owned = target.to_path_buf();
        if is_proc_fd(target) {
            let file = fs::OpenOptions::new().write(true).truncate(true).open(target).map_err(|e| io_err(target, e))?;
            return Ok(AtomicFile { file: Some(file), pending: Pending::InPlace, target: owned });
        }
        let name = match target.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => return Err(Error::InvalidArgument(format!("cannot write {}: not a file name", target.display()))),
        };
        let dir = parent_dir(target);
        remove_stale_temps(&dir, &name);
        #[cfg(target_os = "linux")]
        if allow_anonymous {
            if let Some(file) = open_anonymous(&dir).map_err(|e| io_err(target, e))? {
                return Ok(AtomicFile { file: Some(file), pending: Pending::Anonymous, target: owned });
            }
        }
        let (file, tmp) = create_named_temp(&dir, &name).map_err(|e| io_err(target, e))?;
        Ok(AtomicFile { file: Some(file), pending: Pending::Named(tmp), target: owned })
    }

    /// Fsync the data, give the file its name (replacing any old file atomically) and fsync the
    /// directory. On error the target is left as it was.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("present until commit");
        file.sync_all().map_err(|e| io_err(&self.target, e))?;
        match std::mem::replace(&mut self.pending, Pending::InPlace) {
            Pending::InPlace => return Ok(()),
            #[cfg(target_os = "linux")]
            Pending::Anonymous => link_anonymous(&file, &self.target).map_err(|e| io_err(&self.target, e))?,
            Pending::Named(tmp) => {
                drop(file);
                if let Err(e) = fs::rename(&tmp, &self.target) {
                    let _ = fs::remove_file(&tmp);
                    return Err(io_err(&self.target, e));
                }
            }
        }
        sync_dir(&parent_dir(&self.target)).map_err(|e| io_err(&self.target, e))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("present until commit").write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("present until commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if let Pending::Named(tmp) = &self.pending {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// An `O_TMPFILE` file in `dir` (mode 0o666 less the umask, as a new file gets), or None where
/// the kernel, the file system or a missing /proc rule it out.
#[cfg(target_os = "linux")]
fn open_anonymous(dir: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new().write(true).mode(0o666).custom_flags(libc::O_TMPFILE).open(dir) {
        // linkat needs the descriptor's /proc link to name the file later
        Ok(f) if fs::metadata(proc_fd_path(&f)).is_ok() => {
            let _ = f.lock(); // covers the temporary name it may get in `link_anonymous`
            Ok(Some(f))
        }
        Ok(_) => Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(target_os = "linux")]
fn proc_fd_path(f: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(target_os = "linux")]
fn linkat_follow(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let s = CString::new(src.as_os_str().as_bytes())?;
    let d = CString::new(dst.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe { libc::linkat(libc::AT_FDCWD, s.as_ptr(), libc::AT_FDCWD, d.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn link_anonymous(file: &File, target: &Path) -> std::io::Result<()> {
    let src = proc_fd_path(file);
    match linkat_follow(&src, target) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => return r,
    }
    let name = target.file_name().expect("checked in create").to_string_lossy().into_owned();
    let dir = parent_dir(target);
    loop {
        let tmp = dir.join(temp_name(&name));
        match linkat_follow(&src, &tmp) {
            Ok(()) => {
                return fs::rename(&tmp, target).inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A new, exclusively locked temporary file next to the target (the fallback path).
fn create_named_temp(dir: &Path, name: &str) -> std::io::Result<(File, PathBuf)> {
    loop {
        let tmp = dir.join(temp_name(name));
        match fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => {
                let _ = f.lock(); // advisory: tells other writers this file's process is alive
                return Ok((f, tmp));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The pid in a temporary name's tail `{pid}-{n}` (or the older `{pid}`).
fn temp_owner(tail: &str) -> Option<u32> {
    let (pid, n) = tail.split_once('-').unwrap_or((tail, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(pid) && digits(n) {
        pid.parse().ok()
    } else {
        None
    }
}

/// Whether the process that named a temporary file is certainly gone.
#[cfg(target_os = "linux")]
fn owner_gone(pid: u32, _path: &Path) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Without a portable liveness check: only files untouched for ten minutes count as abandoned.
#[cfg(not(target_os = "linux"))]
fn owner_gone(_pid: u32, path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > std::time::Duration::from_secs(600))
}

/// Remove temporary files of `name` left in `dir` by processes that died (kill -9, power loss on
/// the fallback path). A file whose writer still holds its lock (say, a process in another pid
/// namespace) is kept. Best effort: errors are ignored.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(temp_owner) else { continue };
        let path = e.path();
        if pid == std::process::id() || !owner_gone(pid, &path) {
            continue;
        }
        if File::open(&path).is_ok_and(|f| f.try_lock().is_ok()) {
            let _ = fs::remove_file(&path);
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    match File::open(dir).and_then(|d| d.sync_all()) {
        // some file systems cannot fsync a directory; the rename itself has happened
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        r => r,
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod atomic_tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("diffulex-atomic-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[cfg(target_os = "linux")]
    fn umask() -> u32 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).expect("Umask line (Linux >= 4.7)");
        u32::from_str_radix(line[6..].trim(), 8).unwrap()
    }

    fn write_all(target: &Path, bytes: &[u8], anonymous: bool) -> AtomicFile {
        let mut f = AtomicFile::create_with(target, anonymous).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn both_paths_commit_replace_and_leave_nothing_on_drop() {
        for anonymous in [true, false] {
            let dir = scratch(if anonymous { "anon" } else { "named" });
            let target = dir.join("m.gguf");
            // uncommitted: no file at all, not even a temporary one
            drop(write_all(&target, b"partial", anonymous));
            assert_eq!(names(&dir), Vec::<String>::new());
            // new file
            write_all(&target, b"first", anonymous).commit().unwrap();
            assert_eq!(fs::read(&target).unwrap(), b"first");
            // replaced atomically; a dropped write leaves the old bytes
            drop(write_all(&target, b"second, unfinished", anonymous));
            assert_eq!(fs::read(&target).unwrap(), b"first");
            write_all(&target, b"second", anonymous).commit().unwrap();
            assert_eq!(fs::read(&target).unwrap(), b"second");
            assert_eq!(names(&dir), vec!["m.gguf".to_string()]);
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o666 & !umask(), "a committed file gets the mode of a new file");
            }
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn anonymous_file_has_no_name_while_written() {
        let dir = scratch("noname");
        let target = dir.join("m.gguf");
        let f = write_all(&target, &[7u8; 4096], true);
        assert!(matches!(f.pending, Pending::Anonymous), "O_TMPFILE works on the test file system");
        assert_eq!(names(&dir), Vec::<String>::new());
        f.commit().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_target() {
        let dir = scratch("err");
        let target = dir.join("missing-dir").join("m.gguf");
        for anonymous in [true, false] {
            let e = AtomicFile::create_with(&target, anonymous).err().expect("no such directory");
            assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(&*target.to_string_lossy())), "{e}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = scratch("stale");
        let target = dir.join("m.gguf");
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let stale = [format!(".m.gguf.tmp-{dead}-0"), format!(".m.gguf.tmp-{dead}")];
        let keep = [
            ".m.gguf.tmp-1-0".to_string(),   // pid 1 is alive
            format!(".other.tmp-{dead}-0"),  // another target's
            format!(".m.gguf.tmp-{dead}-x"), // not our naming scheme
            format!(".m.gguf.tmp-{dead}-1"), // its (foreign) writer still holds the lock
        ];
        for n in stale.iter().chain(&keep) {
            fs::write(dir.join(n), b"x").unwrap();
        }
        let held = File::open(dir.join(&keep[3])).unwrap();
        held.lock().unwrap();
        for anonymous in [true, false] {
            write_all(&target, b"new", anonymous).commit().unwrap();
        }
        let mut expect: Vec<String> = keep.to_vec();
        expect.push("m.gguf".into());
        expect.sort();
        assert_eq!(names(&dir), expect);
        drop(held);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn proc_fd_targets_are_written_in_place() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = scratch("procfd");
        let outer =
            fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(&dir).unwrap();
        let via = proc_fd_path(&outer);
        write_all(&via, b"inner", true).commit().unwrap();
        assert_eq!(fs::read(&via).unwrap(), b"inner");
        assert_eq!(names(&dir), Vec::<String>::new());
        fs::remove_dir_all(&dir).unwrap();
    }
}
