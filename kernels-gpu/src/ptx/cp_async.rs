//! Asynchronous global → shared copies (PTX ISA §9.7.9.25 "cp.async"), PTX 7.0+, SM 8.0+.
//! CuTe: `SM80_CP_ASYNC_CACHEGLOBAL_ZFILL`; CUDA C: `__pipeline_memcpy_async` with zero fill.

use core::arch::asm;

use super::smem::SharedAddr;

/// `cp.async.cg.shared.global [dst], [src], 16, src_size;` copies `src_size` (0 ..= 16) bytes and
/// zero-fills the rest of the 16-byte destination. With `src_size = 0` nothing is read, so a
/// masked-off lane may pass any address: tails are predicated, never branched around.
///
/// # Safety
/// `dst` is 16-byte aligned in shared memory; when `src_size > 0`, `src` is a 16-byte aligned
/// global address with `src_size` readable bytes.
#[inline(always)]
pub unsafe fn cp_async_cg_shared_global_16(dst: SharedAddr, src: u64, src_size: u32) {
    // SAFETY: the caller guarantees alignment and bounds; default memory effects keep the
    // compiler from reordering shared accesses across the copy.
    unsafe {
        asm!("cp.async.cg.shared.global [{d}], [{s}], 16, {n};",
            d = in(reg32) dst.raw(), s = in(reg64) src, n = in(reg32) src_size, options(nostack))
    };
}

/// `cp.async.ca.shared.global [dst], [src], 4, src_size;` copies `src_size` (0 ..= 4) bytes and
/// zero-fills the rest of the 4-byte destination (cached in L1; `.cg` allows only 16 bytes).
///
/// # Safety
/// `dst` is 4-byte aligned in shared memory; when `src_size > 0`, `src` is a 4-byte aligned
/// global address with `src_size` readable bytes.
#[inline(always)]
pub unsafe fn cp_async_ca_shared_global_4(dst: SharedAddr, src: u64, src_size: u32) {
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("cp.async.ca.shared.global [{d}], [{s}], 4, {n};",
            d = in(reg32) dst.raw(), s = in(reg64) src, n = in(reg32) src_size, options(nostack))
    };
}

/// `cp.async.commit_group`: closes the group of copies issued so far by this thread.
///
/// # Safety
/// None beyond the copies' own preconditions; unsafe because it orders memory effects.
#[inline(always)]
pub unsafe fn cp_async_commit_group() {
    // SAFETY: no operands.
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}

/// `cp.async.wait_group N`: waits until at most `N` of this thread's committed groups are
/// pending. Other threads' copies need a barrier after this before they are visible.
///
/// # Safety
/// None beyond ordering; unsafe because it orders memory effects.
#[inline(always)]
pub unsafe fn cp_async_wait_group<const N: u32>() {
    // SAFETY: `N` is an immediate.
    unsafe { asm!("cp.async.wait_group {n};", n = const N, options(nostack)) };
}
