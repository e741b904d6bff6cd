//! The Tensor Memory Accelerator (PTX ISA §9.7.9.25.5 "Tensor copy instructions",
//! `cp.async.bulk.tensor`), PTX 8.0+, **sm_90a** build only, with the mbarrier transaction count
//! that tracks its bytes (§9.7.13.15.11 "mbarrier.expect_tx") and the proxy fence that makes a
//! tensor map written through the generic proxy (the host's copy) usable by it (§9.7.13.4
//! "membar/fence", `fence.proxy.tensormap::generic`, PTX 8.3+). CuTe: `SM90_TMA_LOAD_3D`,
//! `ClusterTransactionBarrier::expect_transaction`.
//!
//! A tensor map (`CUtensorMap`, 128 bytes, 64-byte aligned, built on the host by
//! `cuTensorMapEncodeTiled`) describes a global tensor, the box one copy moves and the shared
//! layout it writes (plain row-major boxes, or the 128-byte swizzle of the `wgmma` descriptors).
//! Elements of a box outside the tensor are written as zeros. mxmoe keeps its maps in global
//! memory; one thread issues a copy, and the bytes it writes count against the transaction count
//! of the named mbarrier's current phase, which completes only when its arrivals and its bytes
//! are all in.

use core::arch::asm;

use super::smem::SharedAddr;

/// `mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [bar], bytes;`: the current phase of `bar`
/// also waits for `bytes` more transaction bytes (from `cp.async.bulk` copies naming it). No
/// arrival. PTX 8.0+, SM 9.0+.
///
/// # Safety
/// `bar` is an initialized mbarrier whose current phase cannot complete before this (the
/// calling thread still owes it an arrival), and the copies that complete the bytes are issued.
#[inline(always)]
pub unsafe fn mbarrier_expect_tx(bar: SharedAddr, bytes: u32) {
    // SAFETY: the caller guarantees the barrier and its phase.
    unsafe {
        asm!("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [{b}], {n};",
            b = in(reg32) bar.raw(), n = in(reg32) bytes, options(nostack))
    };
}

/// `cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [dst],
/// [tmap, {c0, c1, c2}], [bar];`: copies the box of the tensor map at global address `tmap`
/// whose first element has coordinates `(c0, c1, c2)` (innermost first, in elements) to shared
/// memory at `dst`, then completes the box's bytes on `bar`. A CTA outside a cluster is a
/// cluster of one, so its own shared addresses are valid `shared::cluster` addresses.
/// PTX 8.0+, SM 9.0+.
///
/// # Safety
/// `tmap` is the global address of a valid 3-dimensional tensor map (fenced:
/// [`fence_proxy_tensormap_acquire_sys`]) whose tensor stays allocated until the copy completes;
/// `dst` is aligned as its layout needs (128 bytes; 1024 for the 128-byte swizzle, so the
/// pattern starts at the box) and the box's bytes fit there; `bar` is an initialized mbarrier
/// whose current phase expects these bytes ([`mbarrier_expect_tx`]).
#[inline(always)]
pub unsafe fn cp_async_bulk_tensor_3d_g2s(
    dst: SharedAddr,
    tmap: u64,
    c: (i32, i32, i32),
    bar: SharedAddr,
) {
    // SAFETY: the caller guarantees the map, the destination and the barrier.
    unsafe {
        asm!("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{d}], [{m}, {{{c0}, {c1}, {c2}}}], [{b}];",
            d = in(reg32) dst.raw(), m = in(reg64) tmap, c0 = in(reg32) c.0, c1 = in(reg32) c.1,
            c2 = in(reg32) c.2, b = in(reg32) bar.raw(), options(nostack))
    };
}

/// `fence.proxy.tensormap::generic.acquire.sys [tmap], 128;`: the host wrote the tensor map at
/// global address `tmap` through the generic proxy (a copy before the launch); this makes that
/// write visible to this thread's later tensor-map reads (the copies above). The CUDA
/// Programming Guide's pattern for a map in global memory written by the host (system scope).
/// PTX 8.3+, SM 9.0+.
///
/// # Safety
/// `tmap` is the 64-byte aligned global address of a 128-byte tensor map.
#[inline(always)]
pub unsafe fn fence_proxy_tensormap_acquire_sys(tmap: u64) {
    // SAFETY: a fence on readable memory (the caller's contract).
    unsafe {
        asm!("fence.proxy.tensormap::generic.acquire.sys [{m}], 128;",
            m = in(reg64) tmap, options(nostack))
    };
}
