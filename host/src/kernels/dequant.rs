//! MXFP4 → bf16 dequantization on the GPU (`kernels-gpu/src/kernels/dequant.rs`).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::mxfp4::MX_BLOCK;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::DequantParams;

use super::{check_expert_ids, check_len, grid_stride_blocks, spec};
use crate::device::{Gpu, alloc_poisoned, upload};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Threads per block of the dequant kernel.
const THREADS: u32 = 256;

/// Dequantizes the experts listed in `experts` from device-resident MXFP4 buffers
/// (`packed [num_experts, n, k/2]`, `scales [num_experts, n, k/32]`) into a new bf16 buffer
/// `[experts.len(), n, k]` (bf16 bits), bit-identical to torchao's `dequantize(bf16)`.
pub fn dequant_mxfp4_bf16(
    gpu: &Gpu,
    packed: &CudaSlice<u8>,
    scales: &CudaSlice<u8>,
    num_experts: usize,
    n: usize,
    k: usize,
    experts: &[u32],
) -> Result<CudaSlice<u16>> {
    if n == 0 || k == 0 || !k.is_multiple_of(MX_BLOCK) {
        return Err(Error::InvalidArgument {
            what: "dequant shape",
            detail: format!("need n > 0 and k a positive multiple of 32, got n = {n}, k = {k}"),
        });
    }
    // Overflow-checked: a product that wraps could pass a length check it should fail.
    let elems = |count: usize| -> Result<usize> {
        count
            .checked_mul(n)
            .and_then(|v| v.checked_mul(k))
            .ok_or_else(|| Error::SizeOverflow {
                what: format!("MXFP4 experts [{count}, {n}, {k}]"),
                detail: "the element count does not fit in usize".into(),
            })
    };
    let full = elems(num_experts)?;
    check_len("packed", packed, full / 2)?;
    check_len("scales", scales, full / MX_BLOCK)?;
    check_expert_ids("experts", experts, num_experts)?;
    let mut out = alloc_poisoned::<u16>(gpu, elems(experts.len())?, 0xFF)?;
    if experts.is_empty() {
        return Ok(out);
    }
    let ids = upload(gpu, experts)?;
    // ≤ the output's element count, which fits (checked above).
    let items = (experts.len() * n * (k / MX_BLOCK)) as u64;
    let blocks = grid_stride_blocks(gpu, items, THREADS, 16);
    let spec = spec(names::DEQUANT_MXFP4, THREADS, 0);
    let params = DequantParams {
        packed_addr: addr(gpu, packed),
        scales_addr: addr(gpu, scales),
        experts_addr: addr(gpu, &ids),
        out_addr: addr_mut(gpu, &mut out),
        n: n as u64,
        k: k as u64,
        num_selected: experts.len() as u32,
        num_experts: num_experts as u32,
    };
    // SAFETY: lengths of packed/scales were checked above, every id is < num_experts, `out`
    // holds experts.len()·n·k bf16, k % 32 == 0, and cudarc allocations are 256-byte aligned.
    unsafe { gpu.launch(&spec, (blocks, 1, 1), params)? };
    Ok(out)
}
