//! MXFP4 and NVFP4 → bf16 dequantization on the GPU (`kernels-gpu/src/kernels/dequant.rs`).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::mxfp4::MX_BLOCK;
use kernels_gpu::shared::names;
use kernels_gpu::shared::nvfp4::NV_BLOCK;
use kernels_gpu::shared::params::DequantParams;

use super::{check_expert_ids, check_len, grid_stride_blocks, spec};
use crate::device::{Gpu, alloc_poisoned, upload};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Threads per block of the dequant kernel.
const THREADS: u32 = 256;

/// `count·n·k`, overflow-checked: a product that wraps could pass a length check it should
/// fail.
fn expert_elems(format: &str, count: usize, n: usize, k: usize) -> Result<usize> {
    count
        .checked_mul(n)
        .and_then(|v| v.checked_mul(k))
        .ok_or_else(|| Error::SizeOverflow {
            what: format!("{format} experts [{count}, {n}, {k}]"),
            detail: "the element count does not fit in usize".into(),
        })
}

/// What both dequant wrappers launch on: the new output `[experts.len(), n, k]` and, unless no
/// expert is listed, the uploaded ids and the grid size.
struct Selected {
    out: CudaSlice<u16>,
    launch: Option<(CudaSlice<u32>, u32)>,
}

/// The checks and set-up both dequant wrappers share: the shape (`n > 0`, `k` a positive
/// multiple of the format's `block`), the packed (`E·n·k/2` bytes) and scale (`E·n·k/block`
/// bytes) lengths and the expert ids; then the output (poisoned) and the ids on the device. The
/// kernels decode one scale block per thread per grid-stride step.
fn select_for_dequant(
    gpu: &Gpu,
    (format, block): (&str, usize),
    (packed, scales): (&CudaSlice<u8>, &CudaSlice<u8>),
    num_experts: usize,
    (n, k): (usize, usize),
    experts: &[u32],
) -> Result<Selected> {
    if n == 0 || k == 0 || !k.is_multiple_of(block) {
        return Err(Error::InvalidArgument {
            what: "dequant shape",
            detail: format!(
                "need n > 0 and k a positive multiple of {block}, got n = {n}, k = {k}"
            ),
        });
    }
    let full = expert_elems(format, num_experts, n, k)?;
    check_len("packed", packed, full / 2)?;
    check_len("scales", scales, full / block)?;
    check_expert_ids("experts", experts, num_experts)?;
    let out = alloc_poisoned::<u16>(gpu, expert_elems(format, experts.len(), n, k)?, 0xFF)?;
    if experts.is_empty() {
        return Ok(Selected { out, launch: None });
    }
    let ids = upload(gpu, experts)?;
    // ≤ the output's element count, which fits (checked above).
    let items = (experts.len() * n * (k / block)) as u64;
    let blocks = grid_stride_blocks(gpu, items, THREADS, 16);
    Ok(Selected {
        out,
        launch: Some((ids, blocks)),
    })
}

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
    let Selected { mut out, launch } = select_for_dequant(
        gpu,
        ("MXFP4", MX_BLOCK),
        (packed, scales),
        num_experts,
        (n, k),
        experts,
    )?;
    let Some((ids, blocks)) = launch else {
        return Ok(out);
    };
    let spec = spec(names::DEQUANT_MXFP4, THREADS, 0);
    let params = DequantParams {
        packed_addr: addr(gpu, packed),
        scales_addr: addr(gpu, scales),
        tensor_scales_addr: 0,
        experts_addr: addr(gpu, &ids),
        out_addr: addr_mut(gpu, &mut out),
        n: n as u64,
        k: k as u64,
        num_selected: experts.len() as u32,
        num_experts: num_experts as u32,
        groups: 1,
        _pad: 0,
    };
    // SAFETY: lengths of packed/scales were checked above, every id is < num_experts, `out`
    // holds experts.len()·n·k bf16, k % 32 == 0, and cudarc allocations are 256-byte aligned.
    unsafe { gpu.launch(&spec, (blocks, 1, 1), params)? };
    Ok(out)
}

/// Dequantizes the experts listed in `experts` from device-resident NVFP4 buffers (`packed
/// [num_experts, n, k/2]`, E4M3 `scales [num_experts, n, k/16]`, optional f32 `tensor_scales
/// [num_experts, groups]`) into a new bf16 buffer `[experts.len(), n, k]`:
/// `bf16(e2m1(code) · (tensor_scale · e4m3(scale)))`, bit-identical to the host's
/// `mxmoe::nvfp4::dequantize_nvfp4_bf16` and torchao's `NVFP4Tensor.dequantize(bf16)`.
///
/// The scale bytes are not read back: NaN or negative E4M3 bytes (which `NvWeights` refuses)
/// give NaN or negated outputs, never a fault.
///
/// Errors: `k` not a positive multiple of 16, `n == 0`, `groups` zero or not dividing `n`, a
/// buffer shorter than the shape implies, an expert id out of range, a size that overflows.
#[allow(clippy::too_many_arguments)]
pub fn dequant_nvfp4_bf16(
    gpu: &Gpu,
    packed: &CudaSlice<u8>,
    scales: &CudaSlice<u8>,
    tensor_scales: Option<&CudaSlice<f32>>,
    groups: usize,
    num_experts: usize,
    n: usize,
    k: usize,
    experts: &[u32],
) -> Result<CudaSlice<u16>> {
    if groups == 0 || !n.is_multiple_of(groups) || groups > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            what: "tensor-scale groups",
            detail: format!("{groups} groups do not divide the {n} rows of an expert"),
        });
    }
    let tensor_scales_addr = match tensor_scales {
        Some(t) => {
            let count = num_experts
                .checked_mul(groups)
                .ok_or_else(|| Error::SizeOverflow {
                    what: format!("NVFP4 tensor scales [{num_experts}, {groups}]"),
                    detail: "the element count does not fit in usize".into(),
                })?;
            check_len("tensor_scales", t, count)?;
            addr(gpu, t)
        }
        None => 0,
    };
    let Selected { mut out, launch } = select_for_dequant(
        gpu,
        ("NVFP4", NV_BLOCK),
        (packed, scales),
        num_experts,
        (n, k),
        experts,
    )?;
    let Some((ids, blocks)) = launch else {
        return Ok(out);
    };
    let spec = spec(names::DEQUANT_NVFP4, THREADS, 0);
    let params = DequantParams {
        packed_addr: addr(gpu, packed),
        scales_addr: addr(gpu, scales),
        tensor_scales_addr,
        experts_addr: addr(gpu, &ids),
        out_addr: addr_mut(gpu, &mut out),
        n: n as u64,
        k: k as u64,
        num_selected: experts.len() as u32,
        num_experts: num_experts as u32,
        groups: groups as u32,
        _pad: 0,
    };
    // SAFETY: the lengths of packed/scales/tensor_scales were checked against the shape and
    // `groups` (≥ 1, dividing n), every id is < num_experts, `out` holds experts.len()·n·k bf16,
    // k % 16 == 0, and cudarc allocations are 256-byte aligned.
    unsafe { gpu.launch(&spec, (blocks, 1, 1), params)? };
    Ok(out)
}
