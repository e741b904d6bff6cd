//! Warp-level data exchange and votes (PTX ISA §9.7.9.6 "shfl.sync", §9.7.13.x "vote.sync",
//! "match.sync"), and shared-memory atomics (§9.7.13.5 "atom").

use core::arch::asm;

use super::smem::SharedAddr;

/// `shfl.sync.up.b32 d, v, delta, 0, 0xffffffff`: lane `l` receives lane `l − delta`'s `v`
/// (lanes below `delta` keep their own). PTX 6.0+, SM 7.0+. CUDA C: `__shfl_up_sync`.
///
/// # Safety
/// The whole warp executes it converged (full mask).
#[inline(always)]
pub unsafe fn shfl_sync_up_b32(v: u32, delta: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only; the caller guarantees convergence.
    unsafe {
        asm!("shfl.sync.up.b32 {d}, {v}, {s}, 0, -1;", d = out(reg32) d, v = in(reg32) v, s = in(reg32) delta, options(nomem, nostack))
    };
    d
}

/// `shfl.sync.idx.b32 d, v, src, 0x1f, 0xffffffff`: every lane receives lane `src`'s `v`.
/// PTX 6.0+, SM 7.0+. CUDA C: `__shfl_sync`.
///
/// # Safety
/// The whole warp executes it converged (full mask).
#[inline(always)]
pub unsafe fn shfl_sync_idx_b32(v: u32, src: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only; the caller guarantees convergence.
    unsafe {
        asm!("shfl.sync.idx.b32 {d}, {v}, {s}, 31, -1;", d = out(reg32) d, v = in(reg32) v, s = in(reg32) src, options(nomem, nostack))
    };
    d
}

/// `shfl.sync.bfly.b32 d, v, mask, 0x1f, 0xffffffff`: lane `l` receives lane `l ^ mask`'s `v`.
/// PTX 6.0+, SM 7.0+. CUDA C: `__shfl_xor_sync`.
///
/// # Safety
/// The whole warp executes it converged (full mask).
#[inline(always)]
pub unsafe fn shfl_sync_bfly_b32(v: u32, mask: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only; the caller guarantees convergence.
    unsafe {
        asm!("shfl.sync.bfly.b32 {d}, {v}, {s}, 31, -1;", d = out(reg32) d, v = in(reg32) v, s = in(reg32) mask, options(nomem, nostack))
    };
    d
}

/// `vote.sync.ballot.b32 d, p, 0xffffffff`: bit `l` set iff lane `l`'s predicate is true.
/// PTX 6.0+, SM 7.0+. CUDA C: `__ballot_sync`.
///
/// # Safety
/// The whole warp executes it converged (full mask).
#[inline(always)]
pub unsafe fn vote_sync_ballot_b32(pred: bool) -> u32 {
    let d: u32;
    // SAFETY: register-only; the caller guarantees convergence.
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.u32 p, {v}, 0; vote.sync.ballot.b32 {d}, p, -1; }}",
            d = out(reg32) d, v = in(reg32) pred as u32, options(nomem, nostack))
    };
    d
}

/// `vote.sync.all.pred d, p, 0xffffffff`: whether `pred` holds in every lane of the warp (the
/// result is warp-uniform, so a branch on it never diverges). PTX 6.0+. CUDA C: `__all_sync`.
///
/// # Safety
/// The whole warp executes it converged (full mask).
#[inline(always)]
pub unsafe fn vote_sync_all(pred: bool) -> bool {
    let d: u32;
    // SAFETY: register-only; the caller guarantees convergence.
    unsafe {
        asm!("{{ .reg .pred p, q; setp.ne.u32 p, {v}, 0; vote.sync.all.pred q, p, -1; selp.u32 {d}, 1, 0, q; }}",
            d = out(reg32) d, v = in(reg32) pred as u32, options(nomem, nostack))
    };
    d != 0
}

/// `match.any.sync.b32 d, v, 0xffffffff`: the mask of lanes whose `v` equals this lane's.
/// PTX 6.0+, SM 7.0+. CUDA C: `__match_any_sync`.
///
/// # Safety
/// The whole warp executes it converged (full mask).
#[inline(always)]
pub unsafe fn match_any_sync_b32(v: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only; the caller guarantees convergence.
    unsafe {
        asm!("match.any.sync.b32 {d}, {v}, -1;", d = out(reg32) d, v = in(reg32) v, options(nomem, nostack))
    };
    d
}

/// `%lanemask_lt`: bits of the lanes below this one. PTX 2.0+, SM 2.0+.
#[inline(always)]
pub fn lanemask_lt() -> u32 {
    let d: u32;
    // SAFETY: reading a special register has no preconditions.
    unsafe { asm!("mov.u32 {d}, %lanemask_lt;", d = out(reg32) d, options(pure, nomem, nostack)) };
    d
}

/// `atom.shared.add.u32 d, [a], v`: adds `v` to the shared word at `a`, returns the old value.
/// PTX 1.2+, SM 1.2+. CUDA C: `atomicAdd` on shared memory.
///
/// # Safety
/// `a` is 4-byte aligned inside the block's shared memory.
#[inline(always)]
pub unsafe fn atom_shared_add_u32(a: SharedAddr, v: u32) -> u32 {
    let d: u32;
    // SAFETY: the caller guarantees alignment and bounds.
    unsafe {
        asm!("atom.shared.add.u32 {d}, [{a}], {v};", d = out(reg32) d, a = in(reg32) a.raw(), v = in(reg32) v, options(nostack))
    };
    d
}

/// `bar.warp.sync 0xffffffff`: orders this warp's memory accesses (CUDA `__syncwarp()`).
/// PTX 6.0+, SM 7.0+.
///
/// # Safety
/// The whole warp reaches it.
#[inline(always)]
pub unsafe fn bar_warp_sync() {
    // SAFETY: the caller guarantees the whole warp arrives.
    unsafe { asm!("bar.warp.sync -1;", options(nostack)) };
}
