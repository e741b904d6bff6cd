//! Shared-memory barriers (PTX ISA §9.7.13.15 "mbarrier"), PTX 7.0+ (`try_wait.parity`: PTX 7.8+,
//! SM 9.0+), the `cp.async` completion hook (§9.7.9.25.3 "cp.async.mbarrier.arrive") and named
//! block barriers (§9.7.13.4 "bar"). They let producer warps hand pipeline stages to consumer
//! warpgroups without stopping the whole block. CuTe: `ClusterBarrier`, `cpasync_barrier_arrive_noinc`.
//!
//! An mbarrier is an 8-byte object in shared memory with an expected arrival count; a phase
//! completes when that many arrivals have landed, and phases alternate parity 0, 1, 0, …

use core::arch::asm;

use super::smem::SharedAddr;

/// `mbarrier.init.shared::cta.b64 [bar], count;`
///
/// # Safety
/// `bar` is 8-byte aligned shared memory not in use as a barrier by any thread; the
/// initialization is published (block barrier) before anyone else touches it.
#[inline(always)]
pub unsafe fn mbarrier_init(bar: SharedAddr, count: u32) {
    // SAFETY: the caller guarantees alignment and exclusivity.
    unsafe {
        asm!("mbarrier.init.shared::cta.b64 [{b}], {c};", b = in(reg32) bar.raw(), c = in(reg32) count, options(nostack))
    };
}

/// `mbarrier.arrive.shared::cta.b64 _, [bar];`: one arrival (release semantics: this thread's
/// earlier memory accesses happen before the phase completes).
///
/// # Safety
/// `bar` is an initialized mbarrier whose current phase still expects this arrival.
#[inline(always)]
pub unsafe fn mbarrier_arrive(bar: SharedAddr) {
    // SAFETY: the caller guarantees the barrier and its count.
    unsafe {
        asm!("{{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [{b}]; }}", b = in(reg32) bar.raw(), options(nostack))
    };
}

/// `cp.async.mbarrier.arrive.noinc.shared::cta.b64 [bar];`: an arrival that lands once every
/// `cp.async` this thread issued before it has completed (counted in the barrier's expected
/// arrivals: `.noinc`).
///
/// # Safety
/// As [`mbarrier_arrive`].
#[inline(always)]
pub unsafe fn cp_async_mbarrier_arrive_noinc(bar: SharedAddr) {
    // SAFETY: the caller guarantees the barrier and its count.
    unsafe {
        asm!("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [{b}];", b = in(reg32) bar.raw(), options(nostack))
    };
}

/// `mbarrier.try_wait.parity.shared::cta.b64`: true once the phase with parity `parity` has
/// completed (acquire semantics: the arrivals' earlier accesses are visible afterwards). Callers
/// spin on it; the instruction itself suspends the thread for a bounded time.
///
/// # Safety
/// `bar` is an initialized mbarrier.
#[inline(always)]
pub unsafe fn mbarrier_try_wait_parity(bar: SharedAddr, parity: u32) -> bool {
    let done: u32;
    // SAFETY: the caller guarantees the barrier.
    unsafe {
        asm!("{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{b}], {ph}; selp.u32 {d}, 1, 0, p; }}",
            d = out(reg32) done, b = in(reg32) bar.raw(), ph = in(reg32) parity, options(nostack))
    };
    done != 0
}

/// Spins on [`mbarrier_try_wait_parity`] until the phase of parity `parity` completes.
///
/// # Safety
/// As [`mbarrier_try_wait_parity`]; the phase must eventually complete.
#[inline(always)]
pub unsafe fn mbarrier_wait_parity(bar: SharedAddr, parity: u32) {
    // SAFETY: forwarded.
    while !unsafe { mbarrier_try_wait_parity(bar, parity) } {}
}

/// `bar.sync id, count;`: a named barrier among `count` threads (a multiple of 32, whole warps).
///
/// # Safety
/// Exactly `count` threads (whole warps) reach barrier `id` each time; `id` ≠ 0 when only part
/// of the block takes part.
#[inline(always)]
pub unsafe fn bar_sync_named<const ID: u32, const COUNT: u32>() {
    // SAFETY: the caller guarantees the participants.
    unsafe { asm!("bar.sync {i}, {c};", i = const ID, c = const COUNT, options(nostack)) };
}
