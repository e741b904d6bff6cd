//! MMA fragments from swizzled shared-memory tiles (layout: `shared::tiles::swizzled_offset`).
//!
//! Each loader computes this lane's `ldmatrix` row address for one 16×16 block and returns the
//! four registers; see `ptx::ldmatrix` and `ptx::mma` for the fragment layouts.

use crate::ptx::ldmatrix::{ldmatrix_x4_m8n8_shared_b16, ldmatrix_x4_trans_m8n8_shared_b16};
use crate::ptx::smem::SharedAddr;
use crate::ptx::sreg::laneid;
use crate::shared::tiles::swizzled_offset;

/// A fragment (`a[0..4]` of `mma.m16n8k16`) of rows `m0..m0+16`, columns `k0..k0+16` of a
/// `[rows][row_elems]` tile stored row-major with k contiguous (`ldmatrix.x4`).
///
/// # Safety
/// Whole warp converged; the 16×16 block lies inside the tile.
#[inline(always)]
pub unsafe fn a_mk(tile: SharedAddr, m0: u32, k0: u32, row_elems: u32) -> [u32; 4] {
    let l = laneid();
    let row = m0 + (l % 8) + 8 * ((l / 8) % 2);
    let col = k0 + 8 * (l / 16);
    // SAFETY: forwarded precondition.
    unsafe { ldmatrix_x4_m8n8_shared_b16(tile.offset(swizzled_offset(row, col, row_elems))) }
}

/// A fragment of rows (m) `m0..m0+16`, reduction `k0..k0+16` of a tile stored `[k][m]`
/// (`ldmatrix.x4.trans`).
///
/// # Safety
/// Whole warp converged; the block lies inside the tile.
#[inline(always)]
pub unsafe fn a_km(tile: SharedAddr, m0: u32, k0: u32, row_elems: u32) -> [u32; 4] {
    let l = laneid();
    let row = k0 + (l % 8) + 8 * (l / 16);
    let col = m0 + 8 * ((l / 8) % 2);
    // SAFETY: forwarded precondition.
    unsafe { ldmatrix_x4_trans_m8n8_shared_b16(tile.offset(swizzled_offset(row, col, row_elems))) }
}

/// B fragments of two n8 blocks (`n0..n0+8` → `[0..2]`, `n0+8..n0+16` → `[2..4]`), reduction
/// `k0..k0+16`, from a tile stored `[n][k]` (`ldmatrix.x4`).
///
/// # Safety
/// Whole warp converged; the block lies inside the tile.
#[inline(always)]
pub unsafe fn b_nk(tile: SharedAddr, n0: u32, k0: u32, row_elems: u32) -> [u32; 4] {
    let l = laneid();
    let row = n0 + (l % 8) + 8 * (l / 16);
    let col = k0 + 8 * ((l / 8) % 2);
    // SAFETY: forwarded precondition.
    unsafe { ldmatrix_x4_m8n8_shared_b16(tile.offset(swizzled_offset(row, col, row_elems))) }
}

/// As [`b_nk`] from a tile stored `[k][n]` (`ldmatrix.x4.trans`).
///
/// # Safety
/// Whole warp converged; the block lies inside the tile.
#[inline(always)]
pub unsafe fn b_kn(tile: SharedAddr, n0: u32, k0: u32, row_elems: u32) -> [u32; 4] {
    let l = laneid();
    let row = k0 + (l % 8) + 8 * ((l / 8) % 2);
    let col = n0 + 8 * (l / 16);
    // SAFETY: forwarded precondition.
    unsafe { ldmatrix_x4_trans_m8n8_shared_b16(tile.offset(swizzled_offset(row, col, row_elems))) }
}
