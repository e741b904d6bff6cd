//! Shared-memory addressing (PTX ISA §9.7.9.20 "cvta", §9.7.9.8 "ld", §9.7.9.10 "st").
//!
//! [`SharedAddr`] is a 32-bit address in the shared window. Only [`SharedAddr::from_generic`]
//! constructs one, so every ldmatrix/cp.async operand provably came from a shared pointer.

use core::arch::asm;

/// An address in the `.shared` state space (CUDA `__cvta_generic_to_shared`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct SharedAddr(u32);

impl SharedAddr {
    /// `cvta.to.shared.u64` then truncation to 32 bits (the shared window is below 4 GiB).
    /// PTX 2.0+, SM 2.0+.
    ///
    /// # Safety
    /// `p` must point into this block's shared memory (static or dynamic).
    #[inline(always)]
    pub unsafe fn from_generic<T>(p: *const T) -> Self {
        let r: u64;
        // SAFETY: register-only conversion; the caller guarantees `p` is a shared pointer.
        unsafe {
            asm!("cvta.to.shared.u64 {r}, {p};", r = out(reg64) r, p = in(reg64) p as u64, options(pure, nomem, nostack))
        };
        Self(r as u32)
    }

    /// The address `bytes` further on.
    #[inline(always)]
    pub const fn offset(self, bytes: u32) -> Self {
        Self(self.0.wrapping_add(bytes))
    }

    /// The raw 32-bit value.
    #[inline(always)]
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// `ld.shared.u32`.
///
/// # Safety
/// `a` is 4-byte aligned and inside the block's shared memory.
#[inline(always)]
pub unsafe fn ld_shared_u32(a: SharedAddr) -> u32 {
    let v: u32;
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("ld.shared.u32 {v}, [{a}];", v = out(reg32) v, a = in(reg32) a.0, options(nostack, readonly))
    };
    v
}

/// `ld.shared.u8` (zero-extended).
///
/// # Safety
/// `a` is inside the block's shared memory.
#[inline(always)]
pub unsafe fn ld_shared_u8(a: SharedAddr) -> u32 {
    let v: u32;
    // SAFETY: the caller guarantees bounds.
    unsafe {
        asm!("ld.shared.u8 {v}, [{a}];", v = out(reg32) v, a = in(reg32) a.0, options(nostack, readonly))
    };
    v
}

/// `st.shared.u32`.
///
/// # Safety
/// `a` is 4-byte aligned and inside the block's shared memory.
#[inline(always)]
pub unsafe fn st_shared_u32(a: SharedAddr, v: u32) {
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("st.shared.u32 [{a}], {v};", a = in(reg32) a.0, v = in(reg32) v, options(nostack))
    };
}

/// `st.shared.u16`.
///
/// # Safety
/// `a` is 2-byte aligned and inside the block's shared memory.
#[inline(always)]
pub unsafe fn st_shared_u16(a: SharedAddr, v: u16) {
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("st.shared.u16 [{a}], {v};", a = in(reg32) a.0, v = in(reg16) v, options(nostack))
    };
}

/// `ld.shared.v4.u32` (16 bytes).
///
/// # Safety
/// `a` is 16-byte aligned and inside the block's shared memory.
#[inline(always)]
pub unsafe fn ld_shared_v4_u32(a: SharedAddr) -> [u32; 4] {
    let (x, y, z, w): (u32, u32, u32, u32);
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("ld.shared.v4.u32 {{{x}, {y}, {z}, {w}}}, [{a}];",
            x = out(reg32) x, y = out(reg32) y, z = out(reg32) z, w = out(reg32) w,
            a = in(reg32) a.0, options(nostack, readonly))
    };
    [x, y, z, w]
}

/// `st.shared.v4.u32` (16 bytes).
///
/// # Safety
/// `a` is 16-byte aligned and inside the block's shared memory.
#[inline(always)]
pub unsafe fn st_shared_v4_u32(a: SharedAddr, v: [u32; 4]) {
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("st.shared.v4.u32 [{a}], {{{x}, {y}, {z}, {w}}};",
            a = in(reg32) a.0, x = in(reg32) v[0], y = in(reg32) v[1], z = in(reg32) v[2], w = in(reg32) v[3],
            options(nostack))
    };
}

/// The block's dynamic shared memory (sized at launch), as a generic pointer
/// (CUDA `extern __shared__ char smem[]`). Rust: `core::intrinsics::gpu::gpu_launch_sized_workgroup_mem`.
#[inline(always)]
pub fn dynamic_smem_ptr() -> *mut u8 {
    core::intrinsics::gpu::gpu_launch_sized_workgroup_mem::<SmemAlign>() as *mut u8
}

/// Declares the dynamic shared-memory symbol with 128-byte alignment, enough for 16-byte
/// `cp.async`/`ldmatrix` rows and for 128-byte swizzle patterns.
#[repr(C, align(128))]
struct SmemAlign([u8; 128]);

/// The block's dynamic shared memory as a [`SharedAddr`] (offset 0 of the launch-sized region).
#[inline(always)]
pub fn dynamic_smem() -> SharedAddr {
    // SAFETY: the pointer comes from the dynamic shared-memory intrinsic, so it is a shared
    // pointer as `from_generic` requires.
    unsafe { SharedAddr::from_generic(dynamic_smem_ptr()) }
}
