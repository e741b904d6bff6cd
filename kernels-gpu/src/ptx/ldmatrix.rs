//! Warp-cooperative shared-memory matrix loads (PTX ISA §9.7.14.5.15 "ldmatrix"), PTX 6.5+,
//! SM 7.5+. CuTe: `SM75_U32x4_LDSM_N`, `SM75_U16x8_LDSM_T`; CUDA C: none (inline asm).
//!
//! Each 8×8 b16 matrix is addressed by 8 lanes, one 16-byte row each: for `.x4`, lanes `8i..8i+7`
//! give the rows of matrix `i`; for `.x2`, lanes 0..15 (the others' addresses are ignored but
//! must still be valid shared addresses). In the result, lane `l` holds row `l/4`, elements
//! `2·(l%4)` and `2·(l%4)+1` of each matrix (one u32 per matrix, the lower column in the low
//! half). `.trans` delivers the transpose: lane `l` holds column `l/4`, rows `2·(l%4)`, `+1`.

use core::arch::asm;

use super::smem::SharedAddr;

/// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`.
///
/// # Safety
/// Whole warp, converged; `row` is this lane's 16-byte aligned row address in shared memory.
#[inline(always)]
pub unsafe fn ldmatrix_x4_m8n8_shared_b16(row: SharedAddr) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: the caller guarantees convergence and addresses; default memory effects keep
    // earlier shared stores before this load.
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];",
            a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
            p = in(reg32) row.raw(), options(nostack, readonly))
    };
    [a, b, c, d]
}

/// `ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16`.
///
/// # Safety
/// As [`ldmatrix_x4_m8n8_shared_b16`].
#[inline(always)]
pub unsafe fn ldmatrix_x4_trans_m8n8_shared_b16(row: SharedAddr) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: as above.
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];",
            a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
            p = in(reg32) row.raw(), options(nostack, readonly))
    };
    [a, b, c, d]
}

/// `ldmatrix.sync.aligned.m8n8.x2.shared.b16`.
///
/// # Safety
/// As [`ldmatrix_x4_m8n8_shared_b16`] (lanes 0..15 supply the rows).
#[inline(always)]
pub unsafe fn ldmatrix_x2_m8n8_shared_b16(row: SharedAddr) -> [u32; 2] {
    let (a, b): (u32, u32);
    // SAFETY: as above.
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {{{a}, {b}}}, [{p}];",
            a = out(reg32) a, b = out(reg32) b, p = in(reg32) row.raw(), options(nostack, readonly))
    };
    [a, b]
}

/// `ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16`.
///
/// # Safety
/// As [`ldmatrix_x2_m8n8_shared_b16`].
#[inline(always)]
pub unsafe fn ldmatrix_x2_trans_m8n8_shared_b16(row: SharedAddr) -> [u32; 2] {
    let (a, b): (u32, u32);
    // SAFETY: as above.
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {{{a}, {b}}}, [{p}];",
            a = out(reg32) a, b = out(reg32) b, p = in(reg32) row.raw(), options(nostack, readonly))
    };
    [a, b]
}

/// `stmatrix.sync.aligned.m8n8.x4.trans.shared.b16` (PTX ISA §9.7.14.5.16 "stmatrix", PTX 7.8+,
/// SM 9.0+): the store counterpart of [`ldmatrix_x4_trans_m8n8_shared_b16`]. Lane `l` supplies
/// element pair (row `l/4`, columns `2·(l%4)`, `+1`) of matrix `i` in `v[i]` — the `mma` C
/// fragment layout — and lanes `8i..8i+7` give the 16-byte destination rows of matrix `i`;
/// `.trans` writes column `c` of matrix `i` to destination row `c`.
///
/// # Safety
/// Whole warp, converged; `row` is this lane's 16-byte aligned destination row in shared
/// memory, not read or written by others until a barrier.
#[cfg(target_feature = "sm_90a")]
#[inline(always)]
pub unsafe fn stmatrix_x4_trans_m8n8_shared_b16(row: SharedAddr, v: [u32; 4]) {
    // SAFETY: the caller guarantees convergence and addresses.
    unsafe {
        asm!("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [{p}], {{{a}, {b}, {c}, {d}}};",
            p = in(reg32) row.raw(),
            a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
            options(nostack))
    };
}
