//! One function per GPU kernel: the only place that calls [`Gpu::launch`](crate::device::Gpu).
//!
//! Each function validates its inputs (typed errors, never a device fault), allocates its
//! outputs, fills the kernel's parameter struct and launches with a `// SAFETY:` note answering
//! the launch contract documented on the kernel's entry point in `kernels-gpu/src/kernels/`.
//!
//! Visibility is part of the contract. Public are only the wrappers that check everything the
//! kernel reads and writes from their own arguments: [`probes`] (they allocate their buffers)
//! and [`dequant`] (lengths and expert ids checked with overflow-checked arithmetic). The
//! wrappers whose soundness rests on where their inputs came from — routing arrays the routing
//! kernels produced ([`gemm::RoutingView`]), expert maps checked on the host
//! ([`eltwise::ExpertMap`]), shapes the op layer validated — are `pub(crate)`, so no safe public
//! function launches a kernel on unchecked buffers. (`crate::layering` checks this split.)

pub mod dequant;
pub(crate) mod eltwise;
pub(crate) mod gemm;
pub(crate) mod moe;
pub mod probes;
pub(crate) mod routing;

use cudarc::driver::CudaSlice;

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::launch::LaunchSpec;

/// Ampere (sm_80) is the minimum for every mxmoe kernel: the portable module is built for
/// sm_80; the Hopper module (with the `wgmma` rows) is loaded only on 9.0 (`device::select`).
pub const MIN_CC: (i32, i32) = (8, 0);

/// The launch spec of one of the module's kernels: `threads` per block, `dynamic_smem_bytes` of
/// dynamic shared memory, compute capability [`MIN_CC`].
fn spec(name: &'static str, threads: u32, dynamic_smem_bytes: usize) -> LaunchSpec {
    LaunchSpec {
        name,
        threads,
        dynamic_smem_bytes,
        min_cc: MIN_CC,
    }
}

/// Blocks of a 1-D grid-stride launch over `items` (one per thread): enough to cover them, at
/// least one and at most `blocks_per_sm` per SM (the kernels' loops cover the rest).
fn grid_stride_blocks(gpu: &Gpu, items: u64, threads: u32, blocks_per_sm: u64) -> u32 {
    let max = gpu.limits().sm_count.max(1) as u64 * blocks_per_sm;
    items.div_ceil(u64::from(threads)).clamp(1, max) as u32
}

/// Checks that a device address is 16-byte aligned (the kernels' vector accesses need it;
/// cudarc allocations are 256-byte aligned, so this fails only for unusual buffers).
pub(crate) fn check_aligned(tensor: &'static str, address: u64) -> Result<()> {
    if !address.is_multiple_of(16) {
        return Err(Error::InvalidArgument {
            what: tensor,
            detail: format!("device address {address:#x} is not 16-byte aligned"),
        });
    }
    Ok(())
}

/// Checks that a device buffer holds at least `needed` elements.
pub(crate) fn check_len<T>(tensor: &'static str, buf: &CudaSlice<T>, needed: usize) -> Result<()> {
    check_count(tensor, buf.len(), needed)
}

/// [`check_len`] on an element count already read from the buffer.
fn check_count(tensor: &'static str, have: usize, needed: usize) -> Result<()> {
    if have < needed {
        return Err(Error::Shape {
            tensor,
            expected: format!("at least {needed} elements"),
            actual: format!("{have} elements"),
        });
    }
    Ok(())
}

/// Checks that every expert id is `< num_experts` (the kernels index the experts' blocks with
/// them unchecked). Errors: [`Error::InvalidArgument`] `what`, naming the first id out of range.
fn check_expert_ids(what: &'static str, ids: &[u32], num_experts: usize) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&e| e as usize >= num_experts) {
        return Err(Error::InvalidArgument {
            what,
            detail: format!("expert {bad} is out of range for {num_experts} experts"),
        });
    }
    Ok(())
}
