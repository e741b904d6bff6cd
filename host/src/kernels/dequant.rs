//! MXFP4 and NVFP4 → bf16 dequantization on the GPU (`kernels-gpu/src/kernels/dequant.rs`).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::mxfp4::MX_BLOCK;
use kernels_gpu::shared::names;
use kernels_gpu::shared::nvfp4::{NV_BLOCK, NV_CHUNK, NV_CHUNKS_PER_LANE};
use kernels_gpu::shared::params::DequantParams;

use super::{check_expert_ids, check_len, grid_stride_blocks, spec};
use crate::device::{Gpu, alloc_output, upload};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Threads per block of the dequant kernels.
const THREADS: u32 = 256;
// Both kernels give each warp of a block its own run of chunks (launch contract: the block a
// multiple of 32 threads).
const _: () = assert!(THREADS.is_multiple_of(32));

/// Values either kernel decodes per thread and grid-stride step: 4 chunks of 8 values
/// (`MX_CHUNKS_PER_LANE · MX_CHUNK` in `kernels-gpu/src/kernels/dequant.rs`, and
/// `shared::nvfp4::{NV_CHUNKS_PER_LANE, NV_CHUNK}`; only the grid size depends on it, every
/// value is covered whatever the grid).
const VALUES_PER_THREAD: usize = 32;
const _: () = assert!(VALUES_PER_THREAD as u64 == NV_CHUNKS_PER_LANE * NV_CHUNK);

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

/// A dequant kernel and the block its scales cover.
struct Format {
    name: &'static str,
    block: usize,
    kernel: &'static str,
}

/// The one checked launch path of both dequant kernels. Checks the shape (`n > 0`, `k` a
/// positive multiple of the format's block), the `groups` of the tensor scales (≥ 1, dividing
/// `n`), the lengths of packed (`E·n·k/2` bytes), scales (`E·n·k/block` bytes) and tensor scales
/// (`E·groups` f32) and the expert ids; then decodes the selected experts into a new output
/// `[experts.len(), n, k]` (poisoned in tests), [`VALUES_PER_THREAD`] values per thread per
/// grid-stride step (the grid covers them with one thread each, up to 16 blocks per SM).
#[allow(clippy::too_many_arguments)]
fn dequant_selected(
    gpu: &Gpu,
    format: Format,
    (packed, scales): (&CudaSlice<u8>, &CudaSlice<u8>),
    (tensor_scales, groups): (Option<&CudaSlice<f32>>, usize),
    num_experts: usize,
    (n, k): (usize, usize),
    experts: &[u32],
) -> Result<CudaSlice<u16>> {
    let block = format.block;
    if n == 0 || k == 0 || !k.is_multiple_of(block) {
        return Err(Error::InvalidArgument {
            what: "dequant shape",
            detail: format!(
                "need n > 0 and k a positive multiple of {block}, got n = {n}, k = {k}"
            ),
        });
    }
    if groups == 0 || !n.is_multiple_of(groups) || groups > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            what: "tensor-scale groups",
            detail: format!("{groups} groups do not divide the {n} rows of an expert"),
        });
    }
    let full = expert_elems(format.name, num_experts, n, k)?;
    check_len("packed", packed, full / 2)?;
    check_len("scales", scales, full / block)?;
    let tensor_scales_addr = match tensor_scales {
        Some(t) => {
            let count = num_experts
                .checked_mul(groups)
                .ok_or_else(|| Error::SizeOverflow {
                    what: format!("{} tensor scales [{num_experts}, {groups}]", format.name),
                    detail: "the element count does not fit in usize".into(),
                })?;
            check_len("tensor_scales", t, count)?;
            addr(gpu, t)
        }
        None => 0,
    };
    check_expert_ids("experts", experts, num_experts)?;
    let mut out = alloc_output::<u16>(gpu, expert_elems(format.name, experts.len(), n, k)?)?;
    if experts.is_empty() {
        return Ok(out);
    }
    let ids = upload(gpu, experts)?;
    // The output's element count fits (checked above).
    let items = (experts.len() * n * k).div_ceil(VALUES_PER_THREAD) as u64;
    let blocks = grid_stride_blocks(gpu, items, THREADS, 16);
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
    // k is a multiple of the kernel's block, the block is whole warps (THREADS), and cudarc
    // allocations are 256-byte aligned.
    unsafe { gpu.launch(&spec(format.kernel, THREADS, 0), (blocks, 1, 1), params)? };
    Ok(out)
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
    let format = Format {
        name: "MXFP4",
        block: MX_BLOCK,
        kernel: names::DEQUANT_MXFP4,
    };
    dequant_selected(
        gpu,
        format,
        (packed, scales),
        (None, 1),
        num_experts,
        (n, k),
        experts,
    )
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
    let format = Format {
        name: "NVFP4",
        block: NV_BLOCK,
        kernel: names::DEQUANT_NVFP4,
    };
    dequant_selected(
        gpu,
        format,
        (packed, scales),
        (tensor_scales, groups),
        num_experts,
        (n, k),
        experts,
    )
}
