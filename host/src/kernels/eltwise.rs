//! Host side of the element-wise kernels (`kernels-gpu/src/kernels/eltwise.rs`).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::{EltwiseParams, RemapParams};

use super::{MIN_CC, alloc_poisoned, check_len};
use crate::device::Gpu;
use crate::error::Result;
use crate::launch::{LaunchSpec, addr, addr_mut};

const THREADS: u32 = 256;

fn grid(gpu: &Gpu, items: u64) -> u32 {
    let max = gpu.limits().sm_count.max(1) as u64 * 32;
    items.div_ceil(THREADS as u64).clamp(1, max) as u32
}

fn run(gpu: &Gpu, name: &'static str, items: u64, params: EltwiseParams) -> Result<()> {
    let spec = LaunchSpec {
        name,
        threads: THREADS,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    // SAFETY: each caller checked the buffer lengths its kernel's contract lists.
    unsafe { gpu.launch(&spec, (grid(gpu, items), 1, 1), params) }
}

/// `y[t] = Σ_j gates[t, j] · out[t·k + j]` (bf16 `[T, width]`).
pub fn combine_gates(
    gpu: &Gpu,
    out: &CudaSlice<u16>,
    gates: &CudaSlice<u16>,
    tokens: usize,
    top_k: usize,
    width: usize,
) -> Result<CudaSlice<u16>> {
    check_len("out", out, tokens * top_k * width)?;
    check_len("gates", gates, tokens * top_k)?;
    let mut y = alloc_poisoned::<u16>(gpu, (tokens * width).max(1), 0xFF)?;
    let params = EltwiseParams {
        in0_addr: addr(gpu, out),
        in1_addr: addr(gpu, gates),
        out_addr: addr_mut(gpu, &mut y),
        tokens: tokens as u64,
        width: width as u32,
        top_k: top_k as u32,
    };
    run(gpu, names::COMBINE_GATES, (tokens * width) as u64, params)?;
    Ok(y)
}

/// `d_gates[t·k + j] = ⟨out[t·k + j], dy[t]⟩` (bf16 `[T·k]`).
pub fn gate_grad(
    gpu: &Gpu,
    out: &CudaSlice<u16>,
    dy: &CudaSlice<u16>,
    tokens: usize,
    top_k: usize,
    width: usize,
) -> Result<CudaSlice<u16>> {
    check_len("out", out, tokens * top_k * width)?;
    check_len("dy", dy, tokens * width)?;
    let mut dg = alloc_poisoned::<u16>(gpu, (tokens * top_k).max(1), 0xFF)?;
    let params = EltwiseParams {
        in0_addr: addr(gpu, out),
        in1_addr: addr(gpu, dy),
        out_addr: addr_mut(gpu, &mut dg),
        tokens: tokens as u64,
        width: width as u32,
        top_k: top_k as u32,
    };
    // One warp per slot: slots·32 threads.
    run(gpu, names::GATE_GRAD, (tokens * top_k * 32) as u64, params)?;
    Ok(dg)
}

/// `dys[t·k + j] = dy[t] · gates[t, j]` (bf16 `[T·k, width]`).
pub fn scale_slots(
    gpu: &Gpu,
    dy: &CudaSlice<u16>,
    gates: &CudaSlice<u16>,
    tokens: usize,
    top_k: usize,
    width: usize,
) -> Result<CudaSlice<u16>> {
    check_len("dy", dy, tokens * width)?;
    check_len("gates", gates, tokens * top_k)?;
    let mut dys = alloc_poisoned::<u16>(gpu, (tokens * top_k * width).max(1), 0xFF)?;
    let params = EltwiseParams {
        in0_addr: addr(gpu, dy),
        in1_addr: addr(gpu, gates),
        out_addr: addr_mut(gpu, &mut dys),
        tokens: tokens as u64,
        width: width as u32,
        top_k: top_k as u32,
    };
    run(
        gpu,
        names::SCALE_SLOTS,
        (tokens * top_k * width) as u64,
        params,
    )?;
    Ok(dys)
}

/// `dx[t] = Σ_j dxs[t·k + j]` (bf16 `[T, width]`).
pub fn sum_slots(
    gpu: &Gpu,
    dxs: &CudaSlice<u16>,
    tokens: usize,
    top_k: usize,
    width: usize,
) -> Result<CudaSlice<u16>> {
    check_len("dx slots", dxs, tokens * top_k * width)?;
    let mut dx = alloc_poisoned::<u16>(gpu, (tokens * width).max(1), 0xFF)?;
    let params = EltwiseParams {
        in0_addr: addr(gpu, dxs),
        in1_addr: 0,
        out_addr: addr_mut(gpu, &mut dx),
        tokens: tokens as u64,
        width: width as u32,
        top_k: top_k as u32,
    };
    run(gpu, names::SUM_SLOTS, (tokens * width) as u64, params)?;
    Ok(dx)
}

/// Which way [`remap_blocks`] copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remap {
    /// `compact = full[map]`.
    Gather,
    /// `full[map] = compact` (other blocks untouched).
    Scatter,
}

/// Copies expert blocks (`block` rows if `rows_blocked`, else `block` columns per expert)
/// between a full matrix `[full_rows, full_cols]` and a compact one holding the blocks of the
/// experts in `map` (a device u32 list, each `< num_experts`).
#[allow(clippy::too_many_arguments)]
pub fn remap_blocks(
    gpu: &Gpu,
    full: &mut CudaSlice<u16>,
    full_rows: usize,
    full_cols: usize,
    compact: &mut CudaSlice<u16>,
    map: &CudaSlice<u32>,
    map_len: usize,
    num_experts: usize,
    block: usize,
    rows_blocked: bool,
    dir: Remap,
) -> Result<()> {
    let blocked_full = if rows_blocked { full_rows } else { full_cols };
    if blocked_full != num_experts * block {
        return Err(crate::error::Error::Shape {
            tensor: "LoRA matrix",
            expected: format!("{} blocked rows/columns", num_experts * block),
            actual: format!("{blocked_full}"),
        });
    }
    check_len("full matrix", full, full_rows * full_cols)?;
    check_len("expert map", map, map_len)?;
    let (rows, cols) = if rows_blocked {
        (map_len * block, full_cols)
    } else {
        (full_rows, map_len * block)
    };
    check_len("compact matrix", compact, rows * cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let params = RemapParams {
        full_addr: addr_mut(gpu, full),
        compact_addr: addr_mut(gpu, compact),
        map_addr: addr(gpu, map),
        rows: rows as u64,
        cols: cols as u64,
        full_cols: full_cols as u64,
        block: block as u32,
        axis: if rows_blocked { 0 } else { 1 },
        scatter: (dir == Remap::Scatter) as u32,
        _pad: 0,
    };
    let spec = LaunchSpec {
        name: names::REMAP_BLOCKS,
        threads: THREADS,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    // SAFETY: the compact matrix holds rows·cols elements, the full matrix full_rows·full_cols,
    // and the caller's map entries are < num_experts (so every block lies in the full matrix).
    unsafe { gpu.launch(&spec, (grid(gpu, (rows * cols) as u64), 1, 1), params) }
}
