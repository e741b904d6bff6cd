//! Global-memory access with explicit widths. Plain Rust pointer reads and writes: LLVM emits
//! `ld.global`/`st.global` (`.v4` for the 16-byte aligned vector type).

use crate::ptx::sreg::{ctaid_x, nctaid_x, ntid_x, tid_x};

/// A 16-byte aligned vector of four words; reads and writes of it become `.v4.u32` accesses.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct U32x4(pub [u32; 4]);

/// Loads 16 bytes from `addr`.
///
/// # Safety
/// `addr` is a 16-byte aligned global address with 16 readable bytes.
#[inline(always)]
pub unsafe fn load_16(addr: u64) -> [u32; 4] {
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe { (*(addr as *const U32x4)).0 }
}

/// Stores 16 bytes to `addr`.
///
/// # Safety
/// `addr` is a 16-byte aligned global address with 16 writable bytes.
#[inline(always)]
pub unsafe fn store_16(addr: u64, v: [u32; 4]) {
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe { *(addr as *mut U32x4) = U32x4(v) };
}

/// Loads a `T` from `addr`.
///
/// # Safety
/// `addr` is a valid, aligned global address of a `T`.
#[inline(always)]
pub unsafe fn load<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller guarantees validity and alignment.
    unsafe { *(addr as *const T) }
}

/// Stores a `T` to `addr`.
///
/// # Safety
/// `addr` is a valid, aligned, writable global address of a `T`.
#[inline(always)]
pub unsafe fn store<T: Copy>(addr: u64, v: T) {
    // SAFETY: the caller guarantees validity and alignment.
    unsafe { *(addr as *mut T) = v };
}

/// The global thread index and the grid stride of a 1-D launch, for grid-stride loops over
/// global arrays.
#[inline(always)]
pub fn grid_stride() -> (u64, u64) {
    let nt = ntid_x() as u64;
    (
        ctaid_x() as u64 * nt + tid_x() as u64,
        nctaid_x() as u64 * nt,
    )
}
