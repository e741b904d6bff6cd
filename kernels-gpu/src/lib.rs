//! mxmoe's device code.
//!
//! The crate is compiled twice:
//! - for `nvptx64-nvidia-cuda` by `xtask/ptx-builder` into the PTX module the host embeds;
//! - for the host as an ordinary dependency, where only [`shared`] exists, so host tests and the
//!   host's shared-memory accounting run the very functions the kernels call.
//!
//! Layers (each calls only the one below it):
//! - `shared/`: pure arithmetic (MXFP4 decode, bf16 rounding, tile and shared-memory plans, kernel
//!   parameter layouts, entry-point names). No unsafe, no asm, no target cfg.
//! - `ptx/` (device only): the audited inline-PTX wrappers. Nothing else writes `asm!`.
//! - `tile/` (device only): fragments, stage loaders and warp-level MMA built from `ptx/`.
//! - `kernels/` (device only): thin `extern "ptx-kernel"` entry points.
#![cfg_attr(not(test), no_std)]
// `core::intrinsics::exp2f32` in `shared::glu` (the activations' sigmoid), on every target.
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(
        abi_ptx,
        stdarch_nvptx,
        asm_experimental_arch,
        gpu_intrinsics,
        gpu_launch_sized_workgroup_mem
    )
)]

pub mod shared;

#[cfg(target_arch = "nvptx64")]
mod ptx;

#[cfg(target_arch = "nvptx64")]
mod tile;

#[cfg(target_arch = "nvptx64")]
mod kernels;

/// Device panics cannot unwind or print: trap, which the host sees as a launch failure.
/// Kernels are written so that no panic path is reachable (masked or unchecked accesses).
#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` has no preconditions; it aborts the kernel.
    unsafe { core::arch::nvptx::trap() }
}
