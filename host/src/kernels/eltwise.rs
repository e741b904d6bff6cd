//! Host side of the element-wise kernels (`kernels-gpu/src/kernels/eltwise.rs`).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::EltwiseParams;

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
    let spec = LaunchSpec { name, threads: THREADS, dynamic_smem_bytes: 0, min_cc: MIN_CC };
    // SAFETY: each caller checked the buffer lengths its kernel's contract lists.
    unsafe { gpu.launch(&spec, (grid(gpu, items), 1, 1), params) }
}

/// `y[t] = Σ_j gates[t, j] · out[t·k + j]` (bf16 `[T, width]`).
pub fn combine_gates(gpu: &Gpu, out: &CudaSlice<u16>, gates: &CudaSlice<u16>, tokens: usize, top_k: usize, width: usize) -> Result<CudaSlice<u16>> {
    check_len("out", out, tokens * top_k * width)?;
    check_len("gates", gates, tokens * top_k)?;
    let mut y = alloc_poisoned::<u16>(gpu, (tokens * width).max(1), 0xFF)?;
    let params = EltwiseParams { in0_addr: addr(gpu, out), in1_addr: addr(gpu, gates), out_addr: addr_mut(gpu, &mut y), tokens: tokens as u64, width: width as u32, top_k: top_k as u32 };
    run(gpu, names::COMBINE_GATES, (tokens * width) as u64, params)?;
    Ok(y)
}

/// `d_gates[t·k + j] = ⟨out[t·k + j], dy[t]⟩` (bf16 `[T·k]`).
pub fn gate_grad(gpu: &Gpu, out: &CudaSlice<u16>, dy: &CudaSlice<u16>, tokens: usize, top_k: usize, width: usize) -> Result<CudaSlice<u16>> {
    check_len("out", out, tokens * top_k * width)?;
    check_len("dy", dy, tokens * width)?;
    let mut dg = alloc_poisoned::<u16>(gpu, (tokens * top_k).max(1), 0xFF)?;
    let params = EltwiseParams { in0_addr: addr(gpu, out), in1_addr: addr(gpu, dy), out_addr: addr_mut(gpu, &mut dg), tokens: tokens as u64, width: width as u32, top_k: top_k as u32 };
    // One warp per slot: slots·32 threads.
    run(gpu, names::GATE_GRAD, (tokens * top_k * 32) as u64, params)?;
    Ok(dg)
}

/// `dys[t·k + j] = dy[t] · gates[t, j]` (bf16 `[T·k, width]`).
pub fn scale_slots(gpu: &Gpu, dy: &CudaSlice<u16>, gates: &CudaSlice<u16>, tokens: usize, top_k: usize, width: usize) -> Result<CudaSlice<u16>> {
    check_len("dy", dy, tokens * width)?;
    check_len("gates", gates, tokens * top_k)?;
    let mut dys = alloc_poisoned::<u16>(gpu, (tokens * top_k * width).max(1), 0xFF)?;
    let params = EltwiseParams { in0_addr: addr(gpu, dy), in1_addr: addr(gpu, gates), out_addr: addr_mut(gpu, &mut dys), tokens: tokens as u64, width: width as u32, top_k: top_k as u32 };
    run(gpu, names::SCALE_SLOTS, (tokens * top_k * width) as u64, params)?;
    Ok(dys)
}

/// `dx[t] = Σ_j dxs[t·k + j]` (bf16 `[T, width]`).
pub fn sum_slots(gpu: &Gpu, dxs: &CudaSlice<u16>, tokens: usize, top_k: usize, width: usize) -> Result<CudaSlice<u16>> {
    check_len("dx slots", dxs, tokens * top_k * width)?;
    let mut dx = alloc_poisoned::<u16>(gpu, (tokens * width).max(1), 0xFF)?;
    let params = EltwiseParams { in0_addr: addr(gpu, dxs), in1_addr: 0, out_addr: addr_mut(gpu, &mut dx), tokens: tokens as u64, width: width as u32, top_k: top_k as u32 };
    run(gpu, names::SUM_SLOTS, (tokens * width) as u64, params)?;
    Ok(dx)
}
