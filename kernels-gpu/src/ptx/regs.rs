//! Per-warpgroup register reallocation (PTX ISA §9.7.19 "setmaxnreg"), PTX 8.0+, **sm_90a**,
//! and the launch-bounds declaration it depends on.
//!
//! A warp-specialised kernel moves registers from its producer warpgroup to its consumer
//! warpgroups: the producer lowers its per-thread maximum ([`setmaxnreg_dec`]), the consumers
//! raise theirs ([`setmaxnreg_inc`], which waits until the CTA's pool holds enough). ptxas
//! honours the pair only when it knows the register count at entry, i.e. when the entry carries
//! `.maxntid` (and `.minnctapersm`) or `.maxnreg`; without them it ignores every `setmaxnreg`
//! (ptxas C7508, a `cargo xtask ptx-report` failure). rustc emits no such directive for
//! `extern "ptx-kernel"` functions, so an entry declares its bounds with
//! [`declare_launch_bounds`], a PTX comment that the PTX builder
//! (`mxmoe_ptx_builder::apply_launch_bounds`) turns into the directives.

use core::arch::asm;

/// `setmaxnreg.dec.sync.aligned.u32 N`: lowers this warp's per-thread register maximum to `N`,
/// returning the rest to the CTA's pool.
///
/// # Safety
/// All warps of the warpgroup execute it converged; `N` is a multiple of 8 in 24..=256, not above
/// the current maximum; the code after it needs at most `N` registers (ptxas compiles it so, and
/// spills otherwise, which the PTX gate rejects).
#[inline(always)]
pub unsafe fn setmaxnreg_dec<const N: u32>() {
    const { assert!(N >= 24 && N <= 256 && N % 8 == 0) };
    // SAFETY: the caller guarantees the warpgroup-converged execution.
    unsafe { asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// `setmaxnreg.inc.sync.aligned.u32 N`: raises this warp's per-thread register maximum to `N`,
/// waiting until the CTA's pool can supply the registers (new registers hold undefined values;
/// ptxas allocates them only to values defined afterwards).
///
/// # Safety
/// As [`setmaxnreg_dec`], with `N` not below the current maximum; the warpgroups that lower
/// theirs must release enough for every raise, or the raising warps wait forever.
#[inline(always)]
pub unsafe fn setmaxnreg_inc<const N: u32>() {
    const { assert!(N >= 24 && N <= 256 && N % 8 == 0) };
    // SAFETY: the caller guarantees the warpgroup-converged execution and the pool's balance.
    unsafe { asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// Emits the PTX comment `// mxmoe.launch_bounds <MAXNTID> <MINBLOCKS>` into the entry that
/// executes it. The PTX builder replaces the markers of an entry (all equal) by `.maxntid
/// MAXNTID, 1, 1` and `.minnctapersm MINBLOCKS` on that entry, which gives ptxas the register
/// count at entry that `setmaxnreg` needs (65536 / (MAXNTID · MINBLOCKS), rounded down to a
/// multiple of 8). The kernel must be launched with at most `MAXNTID` threads (the driver rejects
/// a larger block).
///
/// # Safety
/// None at run time (a comment); marked unsafe because a wrong bound changes how ptxas compiles
/// the entry.
#[inline(always)]
pub unsafe fn declare_launch_bounds<const MAXNTID: u32, const MINBLOCKS: u32>() {
    const { assert!(MAXNTID >= 32 && MAXNTID <= 1024 && MAXNTID % 32 == 0 && MINBLOCKS >= 1) };
    // SAFETY: emits no instruction.
    unsafe {
        asm!(
            "// mxmoe.launch_bounds {t} {b}",
            t = const MAXNTID,
            b = const MINBLOCKS,
            options(nomem, nostack, preserves_flags)
        )
    };
}

/// An empty `asm` block that takes the four values in registers and gives them back: the values
/// are computed before it and, since the block is not `pure`, it keeps its place among the
/// other non-`pure` blocks. It stops LLVM from sinking a computation (e.g. `acc += s·t`) past
/// a long unrolled loop, which would keep its inputs (`t`) live across that loop.
///
/// # Safety
/// None (no instruction); `unsafe` as every `asm!`.
#[inline(always)]
pub unsafe fn pin_f32x4(v: &mut [f32; 4]) {
    // SAFETY: an empty template; only register operands.
    unsafe {
        asm!(
            "// pin {0} {1} {2} {3}",
            inout(reg32) v[0],
            inout(reg32) v[1],
            inout(reg32) v[2],
            inout(reg32) v[3],
            options(nostack, nomem, preserves_flags)
        )
    };
}
