//! Block barriers (PTX ISA §9.7.13.4 "Parallel Synchronization and Communication Instructions:
//! bar"), PTX 1.0+, all SM targets.

use core::arch::asm;

/// `bar.sync 0`: waits until every thread of the block arrives, and orders their shared- and
/// global-memory accesses (CUDA `__syncthreads()`).
///
/// # Safety
/// Every thread of the block must reach this barrier (no divergent early exit around it), or
/// the block deadlocks.
#[inline(always)]
pub unsafe fn bar_sync_0() {
    // SAFETY: the caller guarantees block-uniform control flow; the default asm memory effects
    // keep the compiler from moving memory accesses across the barrier.
    unsafe { asm!("bar.sync 0;", options(nostack)) };
}
