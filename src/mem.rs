//! Large output buffers. A fresh multi-megabyte allocation is mapped lazily, and on first touch
//! every 4 KiB page faults; quantizing a 4096x14336 matrix spent more time in those faults than in
//! the arithmetic. Asking for transparent huge pages before the first write (Linux, THP in
//! `madvise` mode) turns thousands of faults into dozens. Purely a performance hint.

/// A zero-initialised `Vec` of `n` elements, backed by huge pages where the OS allows it.
pub(crate) fn zeroed_vec<T: Copy + Default>(n: usize) -> Vec<T> {
    let v = vec![T::default(); n];
    advise_huge(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

/// An empty `Vec` with room for `n` elements (not initialised, not touched: the pages are mapped
/// by whichever thread first writes them), backed by huge pages where the OS allows it.
pub(crate) fn uninit_vec<T>(n: usize) -> Vec<T> {
    let v = Vec::with_capacity(n);
    advise_huge(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < 4 * HUGE {
        return;
    }
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE does not change contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_addr: usize, _len: usize) {}
