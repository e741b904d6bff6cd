//! Host side of the element-wise kernels (`kernels-gpu/src/kernels/eltwise.rs`): gates, gate
//! gradient, gated dY, slot sum, and the LoRA block remap over a host-checked [`ExpertMap`].
//! Crate-internal: the callers (the op layer) have validated the shapes.

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::{EltwiseParams, RemapParams};

use super::{MIN_CC, check_len};
use crate::device::{Gpu, alloc_poisoned, upload};
use crate::error::{Error, Result};
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
pub(crate) fn combine_gates(
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
pub(crate) fn gate_grad(
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
pub(crate) fn scale_slots(
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
pub(crate) fn sum_slots(
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

/// A list of experts that the remap kernel may index with: every entry is checked on the host to
/// be `< num_experts` before it is uploaded, so a block the kernel addresses through the map
/// always lies inside the full matrix. Only [`ExpertMap::new`] builds one.
pub(crate) struct ExpertMap {
    /// u32 `[len]` on the device (one `0` when the list is empty, so the buffer is valid).
    dev: CudaSlice<u32>,
    /// The same entries on the host.
    ids: Vec<u32>,
    num_experts: usize,
}

impl ExpertMap {
    /// Checks every id against `num_experts` and uploads the list.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the first id out of range.
    pub(crate) fn new(gpu: &Gpu, ids: &[u32], num_experts: usize) -> Result<Self> {
        if let Some(bad) = ids.iter().find(|&&e| e as usize >= num_experts) {
            return Err(Error::InvalidArgument {
                what: "expert map",
                detail: format!("expert {bad} is out of range for {num_experts} experts"),
            });
        }
        let dev = upload(gpu, if ids.is_empty() { &[0u32][..] } else { ids })?;
        Ok(Self {
            dev,
            ids: ids.to_vec(),
            num_experts,
        })
    }

    /// The entries.
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Entries.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The experts the entries index (`E` of the full matrices).
    pub(crate) fn num_experts(&self) -> usize {
        self.num_experts
    }
}

/// `compact = full[map]`: copies the blocks of the experts in `map` (`block` rows per expert if
/// `rows_blocked`, else `block` columns) from a full matrix `[full_rows, full_cols]` into a
/// compact one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_blocks(
    gpu: &Gpu,
    full: &CudaSlice<u16>,
    full_rows: usize,
    full_cols: usize,
    compact: &mut CudaSlice<u16>,
    map: &ExpertMap,
    block: usize,
    rows_blocked: bool,
) -> Result<()> {
    let (full_addr, compact_addr) = (addr(gpu, full), addr_mut(gpu, compact));
    let lens = (full.len(), compact.len());
    remap(
        gpu,
        (full_addr, compact_addr),
        lens,
        (full_rows, full_cols),
        map,
        block,
        rows_blocked,
        false,
    )
}

/// `full[map] = compact`: the inverse of [`gather_blocks`] (other blocks untouched).
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_blocks(
    gpu: &Gpu,
    full: &mut CudaSlice<u16>,
    full_rows: usize,
    full_cols: usize,
    compact: &CudaSlice<u16>,
    map: &ExpertMap,
    block: usize,
    rows_blocked: bool,
) -> Result<()> {
    let (full_addr, compact_addr) = (addr_mut(gpu, full), addr(gpu, compact));
    let lens = (full.len(), compact.len());
    remap(
        gpu,
        (full_addr, compact_addr),
        lens,
        (full_rows, full_cols),
        map,
        block,
        rows_blocked,
        true,
    )
}

/// The remap launch behind [`gather_blocks`] and [`scatter_blocks`]: `(full, compact)` device
/// addresses and element counts.
#[allow(clippy::too_many_arguments)]
fn remap(
    gpu: &Gpu,
    (full_addr, compact_addr): (u64, u64),
    (full_len, compact_len): (usize, usize),
    (full_rows, full_cols): (usize, usize),
    map: &ExpertMap,
    block: usize,
    rows_blocked: bool,
    scatter: bool,
) -> Result<()> {
    let num_experts = map.num_experts;
    let map_len = map.len();
    let blocked_full = if rows_blocked { full_rows } else { full_cols };
    if Some(blocked_full) != num_experts.checked_mul(block) {
        return Err(Error::Shape {
            tensor: "LoRA matrix",
            expected: format!("{} blocked rows/columns", num_experts.saturating_mul(block)),
            actual: format!("{blocked_full}"),
        });
    }
    let full_elems = full_rows
        .checked_mul(full_cols)
        .ok_or_else(|| Error::Shape {
            tensor: "full matrix",
            expected: "a shape whose element count fits in usize".into(),
            actual: format!("[{full_rows}, {full_cols}]"),
        })?;
    check_count("full matrix", full_len, full_elems)?;
    check_count("expert map", map.dev.len(), map_len)?;
    // The map's entries are < num_experts, so map_len·block ≤ blocked_full (≤ the full matrix).
    let (rows, cols) = if rows_blocked {
        (map_len * block, full_cols)
    } else {
        (full_rows, map_len * block)
    };
    check_count("compact matrix", compact_len, rows * cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let params = RemapParams {
        full_addr,
        compact_addr,
        map_addr: addr(gpu, &map.dev),
        rows: rows as u64,
        cols: cols as u64,
        full_cols: full_cols as u64,
        block: block as u32,
        axis: if rows_blocked { 0 } else { 1 },
        scatter: scatter as u32,
        _pad: 0,
    };
    let spec = LaunchSpec {
        name: names::REMAP_BLOCKS,
        threads: THREADS,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    // SAFETY: the compact matrix holds rows·cols elements and the full matrix
    // full_rows·full_cols (checked above); every map entry is < num_experts (an `ExpertMap`
    // invariant, checked on the host by `ExpertMap::new`) and the full matrix has
    // num_experts·block blocked rows/columns, so every block the kernel copies lies in both.
    unsafe { gpu.launch(&spec, (grid(gpu, (rows * cols) as u64), 1, 1), params) }
}

/// `check_len` on an element count already read from the buffer.
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
