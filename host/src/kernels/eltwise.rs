//! Host side of the element-wise kernels (`kernels-gpu/src/kernels/eltwise.rs`): gates, gate
//! gradient, gated dY, slot sum, and the LoRA block remap over a host-checked [`ExpertMap`].
//! Crate-internal: the callers (the op layer) have validated the shapes.

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::{EltwiseParams, RemapParams};

use super::{check_aligned, check_count, check_expert_ids, check_len, grid_stride_blocks, spec};
use crate::device::{Gpu, alloc_output, upload};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

const THREADS: u32 = 256;
/// Blocks per SM of a row kernel's grid at most: a full SM of threads (8 × 256), each on one
/// 8-element vector; past that each thread steps on through the rows. (With four vectors per
/// thread at every size, the 16-row shapes ran on too few blocks: +2–3 % at T = 256.)
const ROW_BLOCKS_PER_SM: u64 = 8;

fn grid(gpu: &Gpu, items: u64) -> u32 {
    grid_stride_blocks(gpu, items, THREADS, 32)
}

/// How a kernel walks its output, and so how many threads it is launched with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// This many threads (one per item, or a warp per item), scalar accesses.
    Threads(usize),
    /// 8-element row vectors of `in0` and the output, a thread per output vector up to
    /// [`ROW_BLOCKS_PER_SM`] blocks per SM: `width` must be a positive multiple of 8 and both
    /// buffers 16-byte aligned.
    RowVectors,
}

/// One element-wise launch: checks each input against the element count listed with it (and,
/// for [`Walk::RowVectors`], the width and the alignment the vectors need), allocates the bf16
/// output (`out_elems`, at least one element) and launches `name` as `walk` says for `tokens`
/// tokens of `top_k` slots, rows of `width` elements.
///
/// Errors: a short input, or for row vectors a width that is not a positive multiple of 8 or
/// a buffer that is not 16-byte aligned ([`Error::InvalidArgument`]), before any launch.
///
/// # Safety
///
/// `inputs` are the kernel's `in0` and, when it reads one, `in1`, each listed with the element
/// count `name`'s launch contract requires; `out_elems` is the count the kernel writes; `walk`
/// is the kernel's.
unsafe fn run(
    gpu: &Gpu,
    name: &'static str,
    inputs: &[(&'static str, &CudaSlice<u16>, usize)],
    (tokens, top_k, width): (usize, usize, usize),
    out_elems: usize,
    walk: Walk,
) -> Result<CudaSlice<u16>> {
    for &(tensor, buf, needed) in inputs {
        check_len(tensor, buf, needed)?;
    }
    if walk == Walk::RowVectors && (width == 0 || !width.is_multiple_of(8)) {
        return Err(Error::InvalidArgument {
            what: "row width",
            detail: format!(
                "{name} moves 8-element vectors: width {width} must be a positive multiple of 8"
            ),
        });
    }
    let in0_addr = inputs.first().map_or(0, |&(_, buf, _)| addr(gpu, buf));
    if let (Walk::RowVectors, Some(&(tensor, _, _))) = (walk, inputs.first()) {
        check_aligned(tensor, in0_addr)?;
    }
    let mut out = alloc_output::<u16>(gpu, out_elems.max(1))?;
    let params = EltwiseParams {
        in0_addr,
        in1_addr: inputs.get(1).map_or(0, |&(_, buf, _)| addr(gpu, buf)),
        out_addr: addr_mut(gpu, &mut out),
        tokens: tokens as u64,
        width: width as u32,
        top_k: top_k as u32,
    };
    if walk == Walk::RowVectors {
        check_aligned("output", params.out_addr)?;
    }
    let spec = spec(name, THREADS, 0);
    let blocks = match walk {
        Walk::Threads(threads) => grid(gpu, threads as u64),
        Walk::RowVectors => {
            grid_stride_blocks(gpu, (out_elems / 8) as u64, THREADS, ROW_BLOCKS_PER_SM)
        }
    };
    // SAFETY: the inputs hold what the kernel's contract lists (checked above, with the counts
    // the caller vouches for) and the output was just allocated with the count it writes.
    unsafe { gpu.launch(&spec, (blocks, 1, 1), params)? };
    Ok(out)
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
    let inputs = [
        ("out", out, tokens * top_k * width),
        ("gates", gates, tokens * top_k),
    ];
    let elems = tokens * width;
    let dims = (tokens, top_k, width);
    // SAFETY: the combine kernel reads `out [T·k, width]` and `gates [T·k]` and writes
    // `y [T, width]`, a thread per 8-element output vector (up to a full SM of threads).
    unsafe {
        run(
            gpu,
            names::COMBINE_GATES,
            &inputs,
            dims,
            elems,
            Walk::RowVectors,
        )
    }
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
    let inputs = [
        ("out", out, tokens * top_k * width),
        ("dy", dy, tokens * width),
    ];
    let dims = (tokens, top_k, width);
    let slots = tokens * top_k;
    // SAFETY: the gate-gradient kernel reads `out [T·k, width]` and `dy [T, width]` and writes
    // `d_gates [T·k]`, one warp per slot: slots·32 threads.
    unsafe {
        run(
            gpu,
            names::GATE_GRAD,
            &inputs,
            dims,
            slots,
            Walk::Threads(slots * 32),
        )
    }
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
    let inputs = [("dy", dy, tokens * width), ("gates", gates, tokens * top_k)];
    let elems = tokens * top_k * width;
    let dims = (tokens, top_k, width);
    // SAFETY: the scaling kernel reads `dy [T, width]` and `gates [T·k]` and writes
    // `dys [T·k, width]`, a thread per 8-element output vector (up to a full SM of threads).
    unsafe {
        run(
            gpu,
            names::SCALE_SLOTS,
            &inputs,
            dims,
            elems,
            Walk::RowVectors,
        )
    }
}

/// `dx[t] = Σ_j dxs[t·k + j]` (bf16 `[T, width]`).
pub(crate) fn sum_slots(
    gpu: &Gpu,
    dxs: &CudaSlice<u16>,
    tokens: usize,
    top_k: usize,
    width: usize,
) -> Result<CudaSlice<u16>> {
    let inputs = [("dx slots", dxs, tokens * top_k * width)];
    let elems = tokens * width;
    let dims = (tokens, top_k, width);
    // SAFETY: the slot-sum kernel reads `dxs [T·k, width]` (no second input) and writes
    // `dx [T, width]`, a thread per 8-element output vector (up to a full SM of threads).
    unsafe {
        run(
            gpu,
            names::SUM_SLOTS,
            &inputs,
            dims,
            elems,
            Walk::RowVectors,
        )
    }
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
        check_expert_ids("expert map", ids, num_experts)?;
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
    let full = (addr(gpu, full), full.len());
    let compact = (addr_mut(gpu, compact), compact.len());
    remap(
        gpu,
        full,
        compact,
        (full_rows, full_cols, block, rows_blocked),
        map,
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
    let full = (addr_mut(gpu, full), full.len());
    let compact = (addr(gpu, compact), compact.len());
    remap(
        gpu,
        full,
        compact,
        (full_rows, full_cols, block, rows_blocked),
        map,
        true,
    )
}

/// The remap launch behind [`gather_blocks`] and [`scatter_blocks`]: the full and the compact
/// matrix as (device address, element count), the full matrix's shape and blocking.
fn remap(
    gpu: &Gpu,
    (full_addr, full_len): (u64, usize),
    (compact_addr, compact_len): (u64, usize),
    (full_rows, full_cols, block, rows_blocked): (usize, usize, usize, bool),
    map: &ExpertMap,
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
    let spec = spec(names::REMAP_BLOCKS, THREADS, 0);
    // SAFETY: the compact matrix holds rows·cols elements and the full matrix
    // full_rows·full_cols (checked above); every map entry is < num_experts (an `ExpertMap`
    // invariant, checked on the host by `ExpertMap::new`) and the full matrix has
    // num_experts·block blocked rows/columns, so every block the kernel copies lies in both.
    unsafe { gpu.launch(&spec, (grid(gpu, (rows * cols) as u64), 1, 1), params) }
}
