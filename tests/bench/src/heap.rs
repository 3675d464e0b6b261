//! The benchmark's own heap, from glibc's allocator statistics: what a structure costs is the
//! growth of the bytes in use while it is built (garbage freed in between is not counted).
//! Reading them costs nothing while the timed parts run, unlike a counting global allocator.

/// Bytes allocated and not yet freed, over every arena and the large blocks glibc maps apart.
#[must_use]
pub fn in_use() -> u64 {
    // SAFETY: mallinfo2 takes no argument, has no precondition and returns a plain struct; it
    // reads the allocator's counters under the allocator's own locks.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// What `build` keeps allocated (the value it returns included), and that value.
pub fn kept_by<T>(build: impl FnOnce() -> T) -> (u64, T) {
    let before = in_use();
    let value = build();
    (in_use().saturating_sub(before), value)
}
