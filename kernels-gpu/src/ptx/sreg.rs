//! Special registers (PTX ISA §10, "Special Registers"), PTX 1.0+, all SM targets. Each read is
//! side-effect free, so these are safe functions.

use core::arch::asm;

macro_rules! sreg {
    ($(#[$doc:meta])* $name:ident, $reg:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name() -> u32 {
            let r: u32;
            // SAFETY: reading a special register has no preconditions and no side effects.
            unsafe { asm!(concat!("mov.u32 {r}, ", $reg, ";"), r = out(reg32) r, options(pure, nomem, nostack)) };
            r
        }
    };
}

sreg!(
    /// `%tid.x`: thread index within the block, `0 ..= 1023` (CUDA `threadIdx.x`).
    tid_x, "%tid.x"
);
sreg!(
    /// `%ctaid.x`: block index along x, `0 .. 2^31` (CUDA `blockIdx.x`).
    ctaid_x, "%ctaid.x"
);
sreg!(
    /// `%nctaid.x`: number of blocks along x (CUDA `gridDim.x`).
    nctaid_x, "%nctaid.x"
);
sreg!(
    /// `%ntid.x`: threads per block along x (CUDA `blockDim.x`).
    ntid_x, "%ntid.x"
);
sreg!(
    /// `%laneid`: lane within the warp, `0 ..= 31`.
    laneid, "%laneid"
);

/// Warp index within a 1-D block, `tid_x / 32`, `0 ..= 31`.
#[inline(always)]
pub fn warp_id() -> u32 {
    tid_x() >> 5
}
