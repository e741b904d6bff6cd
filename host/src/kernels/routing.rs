//! Host side of the routing kernels (`kernels-gpu/src/kernels/routing.rs`).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::auto::AutoInputs;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::{AutoGateParams, MAX_EXPERTS, ROUTE_CHUNK, RouteParams};

use super::{check_len, spec};
use crate::device::{Gpu, alloc_filled, alloc_output};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Device ids of the routed slots, as the router produced them.
#[derive(Clone, Copy, Debug)]
pub enum DeviceIds<'a> {
    /// i32 ids `[T·k]`.
    I32(&'a CudaSlice<i32>),
    /// i64 ids `[T·k]`.
    I64(&'a CudaSlice<i64>),
}

impl DeviceIds<'_> {
    /// Ids in the buffer.
    pub(crate) fn len(&self) -> usize {
        match self {
            DeviceIds::I32(s) => s.len(),
            DeviceIds::I64(s) => s.len(),
        }
    }
}

/// The routing kernels' outputs.
pub(crate) struct RouteBuffers {
    /// u32 `[slots]` bucket per grouped row (E for dropped).
    pub(crate) sorted_expert: CudaSlice<u32>,
    /// u32 `[slots]` flat slot per grouped row.
    pub(crate) ssi: CudaSlice<u32>,
    /// u32 `[E]` inclusive row ends.
    pub(crate) offsets: CudaSlice<u32>,
    /// u32 `[1]`: 1 if an id was outside `[-1, E)`.
    pub(crate) error: CudaSlice<u32>,
}

/// The routing kernels' expert count: 1 to `MAX_EXPERTS`.
fn check_experts(num_experts: usize) -> Result<()> {
    if num_experts == 0 || num_experts > MAX_EXPERTS as usize {
        return Err(Error::InvalidArgument {
            what: "num_experts",
            detail: format!("must be in 1..={MAX_EXPERTS}, got {num_experts}"),
        });
    }
    Ok(())
}

/// Sorts `slots` routed slots into expert-contiguous order on the GPU (stable; dropped slots
/// last). Ids outside `[-1, E)` set the error word and are treated as dropped.
pub(crate) fn route(
    gpu: &Gpu,
    ids: DeviceIds<'_>,
    slots: usize,
    num_experts: usize,
) -> Result<RouteBuffers> {
    check_experts(num_experts)?;
    if ids.len() < slots {
        return Err(Error::Shape {
            tensor: "expert ids",
            expected: format!("{slots} elements (tokens · top_k)"),
            actual: format!("{} elements", ids.len()),
        });
    }
    if slots >= u32::MAX as usize {
        return Err(Error::InvalidArgument {
            what: "tokens · top_k",
            detail: format!("{slots} routed slots exceed the 32-bit row index"),
        });
    }
    let mut sorted_expert = alloc_filled::<u32>(gpu, slots.max(1), 0xFF)?;
    let mut ssi = alloc_filled::<u32>(gpu, slots.max(1), 0xFF)?;
    let mut offsets = alloc_filled::<u32>(gpu, num_experts, 0xFF)?;
    let mut error = alloc_filled::<u32>(gpu, 1, 0)?;
    let chunks = (slots as u32).div_ceil(ROUTE_CHUNK).max(1);
    let mut counts = alloc_filled::<u32>(gpu, chunks as usize * (num_experts + 1), 0xFF)?;
    let (ids_addr, ids_i64) = match ids {
        DeviceIds::I32(s) => (addr(gpu, s), 0),
        DeviceIds::I64(s) => (addr(gpu, s), 1),
    };
    let params = RouteParams {
        ids_addr,
        counts_addr: addr_mut(gpu, &mut counts),
        sorted_expert_addr: addr_mut(gpu, &mut sorted_expert),
        ssi_addr: addr_mut(gpu, &mut ssi),
        offsets_addr: addr_mut(gpu, &mut offsets),
        error_addr: addr_mut(gpu, &mut error),
        slots: slots as u32,
        num_experts: num_experts as u32,
        ids_i64,
        _pad: 0,
    };
    let hist_bytes = 4 * (num_experts + 1);
    let count = spec(names::ROUTE_COUNT, 256, hist_bytes);
    let scan = spec(names::ROUTE_SCAN, 1024, 4 * 1024);
    let scatter = spec(names::ROUTE_SCATTER, 32, hist_bytes);
    // SAFETY: `ids` holds `slots` ids of the declared width; `counts` holds chunks·(E+1) words;
    // the outputs hold `slots`, `slots`, `E` and 1 words; grids and shared memory follow the
    // kernels' contracts (one chunk per block, one block for the scan).
    unsafe {
        gpu.launch(&count, (chunks, 1, 1), params)?;
        gpu.launch(&scan, (1, 1, 1), params)?;
        gpu.launch(&scatter, (chunks, 1, 1), params)?;
    }
    Ok(RouteBuffers {
        sorted_expert,
        ssi,
        offsets,
        error,
    })
}

/// What [`auto_gate`] wrote.
pub(crate) struct AutoGate {
    /// u32 `[E]`: the row ends Strategy B's kernels read — the routing's when the rule picks B,
    /// all zero (every expert empty) when it picks A.
    pub(crate) gated: CudaSlice<u32>,
    /// u32 `[1 + E]`: 1 for Strategy A, 0 for B; then the routing's row ends.
    pub(crate) report: CudaSlice<u32>,
}

/// Queues `Strategy::Auto`'s decision on the device (`shared::auto::auto_picks_a` over the
/// active experts of `offsets`, u32 `[experts]` inclusive row ends, and `inputs`).
pub(crate) fn auto_gate(
    gpu: &Gpu,
    offsets: &CudaSlice<u32>,
    experts: usize,
    inputs: &AutoInputs,
) -> Result<AutoGate> {
    check_experts(experts)?;
    check_len("expert offsets", offsets, experts)?;
    let mut gated = alloc_output::<u32>(gpu, experts)?;
    let mut report = alloc_output::<u32>(gpu, experts + 1)?;
    let params = AutoGateParams {
        offsets_addr: addr(gpu, offsets),
        gated_addr: addr_mut(gpu, &mut gated),
        report_addr: addr_mut(gpu, &mut report),
        rows: inputs.rows,
        n: inputs.n,
        transient_per_expert: inputs.transient_per_expert,
        free_bytes: inputs.free_bytes,
        experts: experts as u32,
        sm_count: inputs.sm_count.min(u32::MAX as u64) as u32,
        nvfp4: inputs.nvfp4 as u32,
        _pad: 0,
    };
    // SAFETY: `offsets` holds at least `experts` words (checked), `gated` `experts` and
    // `report` `experts + 1` (allocated here); one block of one warp, as the kernel requires.
    unsafe { gpu.launch(&spec(names::AUTO_GATE, 32, 0), (1, 1, 1), params)? };
    Ok(AutoGate { gated, report })
}
