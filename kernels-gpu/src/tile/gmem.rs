//! Global-memory access with explicit widths. Plain Rust pointer reads and writes: LLVM emits
//! `ld.global`/`st.global` (`.v4` for the 16-byte aligned vector type).

use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::sreg::{ctaid_x, nctaid_x, ntid_x, tid_x};
use crate::shared::bf16::bf16_bits_to_f32;

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

/// Loads 8 bf16 from `addr` (one 16-byte access) widened to f32: element `2i` from the low half
/// of word `i`, element `2i + 1` from its high half.
///
/// # Safety
/// As [`load_16`].
#[inline(always)]
pub unsafe fn load_bf16x8(addr: u64) -> [f32; 8] {
    // SAFETY: forwarded.
    let v = unsafe { load_16(addr) };
    let mut out = [0f32; 8];
    let mut i = 0;
    while i < 4 {
        out[2 * i] = bf16_bits_to_f32(v[i] as u16);
        out[2 * i + 1] = bf16_bits_to_f32((v[i] >> 16) as u16);
        i += 1;
    }
    out
}

/// Rounds 8 f32 to bf16 (nearest even, `cvt.rn`) and stores them at `addr` (one 16-byte access)
/// as [`load_bf16x8`] reads them.
///
/// # Safety
/// As [`store_16`].
#[inline(always)]
pub unsafe fn store_bf16x8(addr: u64, v: [f32; 8]) {
    let mut w = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        w[i] = cvt_rn_bf16x2_f32(v[2 * i], v[2 * i + 1]);
        i += 1;
    }
    // SAFETY: forwarded.
    unsafe { store_16(addr, w) };
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
