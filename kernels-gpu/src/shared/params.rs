//! `#[repr(C)]` kernel parameter structs, passed by value to the entry points. Device addresses
//! are `u64`; sizes that can exceed 2^31 are `u64`. The `const` blocks pin sizes and offsets so a
//! layout drift fails both builds.

use core::mem::{offset_of, size_of};

/// Parameters of the probe kernels: one input and one output buffer plus a count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeParams {
    /// Input buffer address.
    pub in_addr: u64,
    /// Output buffer address.
    pub out_addr: u64,
    /// Meaning depends on the probe (elements or bytes valid in the input).
    pub count: u32,
    /// Padding to 8-byte alignment; must be 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<ProbeParams>() == 24);
    assert!(offset_of!(ProbeParams, count) == 16);
};

/// Parameters of the dequantization of selected experts, [`crate::shared::names::DEQUANT_MXFP4`]
/// and [`crate::shared::names::DEQUANT_NVFP4`] (Strategy A).
///
/// Output `out[s, n, k]` (bf16, `[num_selected, n, k]` row-major) = dequantized
/// `W_store[experts[s], n, k]` from `packed [E, n, k/2]` and the block scales: MXFP4 `[E, n, k/32]`
/// E8M0 bytes, or NVFP4 `[E, n, k/16]` E4M3 bytes with, when `tensor_scales_addr != 0`, f32
/// `tensor_scales [E, groups]` (group `g` covers rows `[g·n/groups, (g+1)·n/groups)`):
/// `bf16(e2m1(code) · (tensor_scale · e4m3(scale)))`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DequantParams {
    /// `u8 [E, n, k/2]`.
    pub packed_addr: u64,
    /// `u8 [E, n, k/block]` (E8M0 for MXFP4, E4M3 for NVFP4).
    pub scales_addr: u64,
    /// NVFP4: `f32 [E, groups]`, or 0 for none (factor = the E4M3 value); MXFP4: 0.
    pub tensor_scales_addr: u64,
    /// `u32 [num_selected]`: the experts to dequantize, each `< num_experts`.
    pub experts_addr: u64,
    /// `bf16 [num_selected, n, k]`.
    pub out_addr: u64,
    /// Output features per expert.
    pub n: u64,
    /// Reduction dimension (multiple of the format's block).
    pub k: u64,
    /// Entries in `experts`.
    pub num_selected: u32,
    /// Experts in `packed`/`scales` (bounds every entry of `experts`).
    pub num_experts: u32,
    /// NVFP4: tensor-scale groups per expert (≥ 1, dividing `n`); MXFP4: 1.
    pub groups: u32,
    /// Padding; must be 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<DequantParams>() == 72);
    assert!(offset_of!(DequantParams, n) == 40);
    assert!(offset_of!(DequantParams, num_selected) == 56);
};

/// Rows of `ids` each routing block handles (one counting block, one scattering warp).
pub const ROUTE_CHUNK: u32 = 1024;
/// Most experts the routing kernels accept (the histogram lives in shared memory).
pub const MAX_EXPERTS: u32 = 8192;

/// Parameters of the three routing kernels (count, scan, scatter); see
/// `kernels-gpu/src/kernels/routing.rs`.
///
/// Buckets are the experts `0..E` plus bucket `E` for dropped slots (id −1), which sort last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteParams {
    /// Expert ids `[T·k]`, i32 or i64 (see `ids_i64`).
    pub ids_addr: u64,
    /// u32 `[chunks, E+1]`: per-chunk bucket counts, then absolute per-chunk bucket bases.
    pub counts_addr: u64,
    /// u32 `[T·k]`: bucket of each grouped row (E for dropped rows).
    pub sorted_expert_addr: u64,
    /// u32 `[T·k]`: flat slot index `t·k + j` of each grouped row.
    pub ssi_addr: u64,
    /// u32 `[E]`: inclusive end of each expert's rows.
    pub offsets_addr: u64,
    /// u32 `[1]`: set to 1 when an id is outside `[-1, E)` (such ids are treated as dropped).
    pub error_addr: u64,
    /// Number of slots `T·k`.
    pub slots: u32,
    /// Number of experts `E`.
    pub num_experts: u32,
    /// 1 if `ids` are i64, 0 if i32.
    pub ids_i64: u32,
    /// Padding; must be 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<RouteParams>() == 64);
    assert!(offset_of!(RouteParams, slots) == 48);
};

/// Parameters of the grouped GEMM over expert-aligned row tiles (forward, dX, and the
/// rank-sized LoRA products). For grouped row `p` of expert `e` (rows are expert-contiguous):
///
/// `out[row_out(p), n] = Σ_k A[row_in(p), k] · B_e(n, k)  +  s · Σ_j left[p, j] · right_e(n, j)`
///
/// with `row_in(p) = p` if `a_fan_out == 0` else `ssi[p] / a_fan_out`, `row_out(p) = p` if
/// `out_scattered == 0` else `ssi[p]`, `B_e(n, k) = b[e·b_stride_e + n·b_stride_n + k·b_stride_k]`,
/// `right_e(n, j) = lr[e·lr_stride_e + n·lr_stride_n + j·lr_stride_r]` (j < rank), plus the
/// optional bias `bias[e·n_out + n]` (`bias_addr != 0`). Rows of the dropped bucket (`e = E`) are
/// written as zeros. All strides are in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GemmParams {
    /// u32 `[rows]` flat slot of each grouped row.
    pub ssi_addr: u64,
    /// u32 `[num_experts]` inclusive row ends.
    pub offsets_addr: u64,
    /// bf16 activations (x or dY).
    pub a_addr: u64,
    /// Elements between consecutive rows of A.
    pub a_stride: u64,
    /// bf16 per-expert matrix, or packed codes `[E, N, K/2]` (MXFP4 and NVFP4 layouts).
    pub b_addr: u64,
    /// Block-scale bytes: MXFP4 E8M0 `[E, N, K/32]` or NVFP4 E4M3 `[E, N, K/16]` (0 for the bf16
    /// layouts). For the 4-bit layouts the container's `K` is `k_red` (forward) or `n_out` (dX)
    /// and `N` the other; the b strides are unused.
    pub scales_addr: u64,
    /// Elements between experts of B.
    pub b_stride_e: u64,
    /// Elements between output columns of B.
    pub b_stride_n: u64,
    /// Elements between reduction indices of B.
    pub b_stride_k: u64,
    /// bf16 output.
    pub out_addr: u64,
    /// Elements between output rows.
    pub out_stride: u64,
    /// bf16 `[rows, r_pad]` LoRA left factor in grouped order (XA or YB); unused if rank 0.
    pub lora_left_addr: u64,
    /// bf16 LoRA right factor (B for the forward, A for dX).
    pub lora_right_addr: u64,
    /// Elements between experts of the right factor.
    pub lr_stride_e: u64,
    /// Elements between output columns of the right factor.
    pub lr_stride_n: u64,
    /// Elements between rank indices of the right factor.
    pub lr_stride_r: u64,
    /// bf16 `[E, n_out]` frozen per-expert bias added to every row of expert `e` before the
    /// output is rounded (`out[row_out(p), n] += bias[e·n_out + n]`); 0: none. Never added to
    /// the dropped bucket's rows.
    pub bias_addr: u64,
    /// bf16 `[rows, r_pad]` low part of the LoRA left factor (`left − round(left)`, rounded),
    /// read by the epilogue of the forward layouts (`NkBf16`, `NkMxfp4`) as a second term with
    /// the same right factor, so XA enters the output with about 16 mantissa bits; 0: none.
    pub lora_left_lo_addr: u64,
    /// bf16 output's low part: with `out_lo_addr != 0` the kernel also stores
    /// `round(acc − round(acc))` at the same offsets (the rank-sized products' two-term XA; only
    /// the `mma.sync` body, which those products use, writes it); 0: none.
    pub out_lo_addr: u64,
    /// Routed rows `L` (including dropped rows, which sort last).
    pub rows: u32,
    /// Reduction length (multiple of 8).
    pub k_red: u32,
    /// Output columns (multiple of 8).
    pub n_out: u32,
    /// Experts `E` (bucket `E` holds dropped rows).
    pub num_experts: u32,
    /// 0: A rows are grouped; f ≥ 1: A row is `ssi[p] / f`.
    pub a_fan_out: u32,
    /// 0: output row `p`; 1: output row `ssi[p]`.
    pub out_scattered: u32,
    /// LoRA rank (0: no LoRA term).
    pub rank: u32,
    /// Padded rank (multiple of 16, ≥ rank); columns of `lora_left`.
    pub r_pad: u32,
    /// LoRA scaling `s`.
    pub scaling: f32,
    /// Valid rows of `B_e` along n (`n_out` for weights; the rank for the LoRA products, whose
    /// output is padded to `r_pad` zero columns).
    pub b_rows: u32,
    /// NVFP4 layouts: f32 per-tensor scales `[E, N / ts_rows_per_group]` (container rows `n`
    /// of expert `e` use `tensor_scales[e·(N / ts_rows_per_group) + n / ts_rows_per_group]`),
    /// or 0 for none (the block factor is the E4M3 value alone). 0 for the other layouts.
    pub tensor_scales_addr: u64,
    /// NVFP4 layouts with tensor scales: container rows per tensor scale (≥ 1, dividing N).
    pub ts_rows_per_group: u32,
    /// Padding; must be 0.
    pub _pad: u32,
    /// Global address of a 128-byte tensor map (`CUtensorMap`, 64-byte aligned) of the weight
    /// operand, read by the `wgmma` kernels' producer, which then moves each weight tile with one
    /// TMA copy per box instead of per-thread `cp.async` chunks; 0: no map (`cp.async`; the
    /// `mma.sync` kernels never read it). The map is 3-dimensional, innermost first, over the
    /// weight tensor `[E][rows][row bytes]` with zeros outside it:
    /// - `NkBf16` / `KnBf16` (one map for both: the same `[E, N, K]` tensor): dims
    ///   `(K, N, E)` bf16, box `(64, 64, 1)`, 128-byte swizzle;
    /// - `NkMxfp4` / `NkNvfp4`: packed bytes, dims `(k_red / 2, n_out, E)`, box `(32, 128, 1)`;
    /// - `KnMxfp4` / `KnNvfp4`: packed bytes, dims `(n_out / 2, k_red, E)`, box `(64, 64, 1)`.
    pub b_tmap_addr: u64,
    /// Global address of a 128-byte tensor map of the activation operand (`a_addr`) when its
    /// rows are grouped (`a_fan_out == 0`), or 0. With a map the `wgmma` kernels' producer
    /// copies each k-tile's `[BM][64]` activation stage with one TMA copy from the tile's first
    /// row instead of eight `cp.async` chunks per row and thread; the rows past the tile's last
    /// then hold the tensor's next rows (zeros past its end) instead of zeros, and their output
    /// columns are never stored. The map is 3-dimensional, innermost first: dims `(k_red, rows,
    /// 1)` bf16 with row stride `2·a_stride` bytes, box `(64, BM, 1)`, 128-byte swizzle.
    /// Gathered rows keep `cp.async` (a copy per row would run one lane at a time: TMA takes
    /// its coordinates from uniform registers). The `mma.sync` kernels never read it.
    pub a_tmap_addr: u64,
}

const _: () = {
    assert!(size_of::<GemmParams>() == 224);
    assert!(offset_of!(GemmParams, a_tmap_addr) == 216);
    assert!(offset_of!(GemmParams, b_tmap_addr) == 208);
    assert!(offset_of!(GemmParams, tensor_scales_addr) == 192);
    assert!(offset_of!(GemmParams, bias_addr) == 128);
    assert!(offset_of!(GemmParams, lora_left_lo_addr) == 136);
    assert!(offset_of!(GemmParams, rows) == 152);
    assert!(offset_of!(GemmParams, scaling) == 184);
};

/// Parameters of the grouped Gram kernel (dA, dB): for each expert `e` and wide column `w`,
///
/// `out[e·out_stride_e + w·out_stride_w + j·out_stride_r] = round(s · Σ_{p ∈ e} wide[row(p), w] · narrow[p, j])`
///
/// for `j < rank`, with `row(p) = p` if `wide_fan_out == 0` else `ssi[p] / wide_fan_out`.
/// Experts without rows get zeros. No atomics: one block owns each output tile.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GramParams {
    /// u32 `[rows]` flat slot of each grouped row.
    pub ssi_addr: u64,
    /// u32 `[num_experts]` inclusive row ends.
    pub offsets_addr: u64,
    /// bf16 wide operand (x or dY).
    pub wide_addr: u64,
    /// Elements between rows of the wide operand.
    pub wide_stride: u64,
    /// bf16 `[rows, r_pad]` narrow operand in grouped order (YB or XA).
    pub narrow_addr: u64,
    /// bf16 output (dA or dB).
    pub out_addr: u64,
    /// Elements between experts of the output.
    pub out_stride_e: u64,
    /// Elements between wide columns of the output.
    pub out_stride_w: u64,
    /// Elements between rank indices of the output.
    pub out_stride_r: u64,
    /// Width of the wide operand (multiple of 8).
    pub width: u32,
    /// Experts `E`.
    pub num_experts: u32,
    /// 0: wide rows are grouped; f ≥ 1: wide row is `ssi[p] / f`.
    pub wide_fan_out: u32,
    /// LoRA rank.
    pub rank: u32,
    /// Padded rank.
    pub r_pad: u32,
    /// LoRA scaling `s`.
    pub scaling: f32,
}

const _: () = {
    assert!(size_of::<GramParams>() == 96);
    assert!(offset_of!(GramParams, width) == 72);
};

/// Parameters of the element-wise kernels (gates combine, gate gradient, gated dY, slot sum).
/// Meanings per kernel are documented on each entry point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EltwiseParams {
    /// First input.
    pub in0_addr: u64,
    /// Second input.
    pub in1_addr: u64,
    /// Output.
    pub out_addr: u64,
    /// Tokens `T`.
    pub tokens: u64,
    /// Row width.
    pub width: u32,
    /// Slots per token `k`.
    pub top_k: u32,
}

const _: () = {
    assert!(size_of::<EltwiseParams>() == 40);
};

/// Parameters of the expert-block remap kernel (Strategy A's LoRA gather and gradient scatter).
///
/// A matrix whose rows (`axis = 0`, e.g. `A [E·r, K]`) or columns (`axis = 1`, e.g.
/// `B [N, E·r]`) come in blocks of `block` per expert is copied between its full form (E
/// blocks) and its compact form (one block per entry of `map`, u32 expert ids). `scatter = 0`:
/// `compact = full[map]`; `scatter = 1`: `full[map] = compact` (other blocks untouched).
/// `rows`/`cols` are the compact matrix's; the full matrix has `full_cols` columns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemapParams {
    /// bf16 full matrix.
    pub full_addr: u64,
    /// bf16 compact matrix.
    pub compact_addr: u64,
    /// u32 `[compact blocks]` expert id of each compact block.
    pub map_addr: u64,
    /// Rows of the compact matrix.
    pub rows: u64,
    /// Columns of the compact matrix.
    pub cols: u64,
    /// Columns of the full matrix.
    pub full_cols: u64,
    /// Rows or columns per expert block.
    pub block: u32,
    /// 0: rows are blocked; 1: columns are blocked.
    pub axis: u32,
    /// 0: gather into the compact matrix; 1: scatter into the full matrix.
    pub scatter: u32,
    /// Padding; must be 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<RemapParams>() == 64);
};

/// Parameters of the gated-activation kernels of the MoE MLP (SPEC §6, `GPT_OSS.md` §1):
/// [`crate::shared::names::GLU_FWD`] and [`crate::shared::names::GLU_BWD`].
///
/// Row `p` of `gu [rows, 2·width]` holds, for unit `i < width`, the gate and the up either in
/// columns `i` and `width + i` (`interleaved == 0`, mxmoe's SwiGLU block) or in `2i` and `2i + 1`
/// (`interleaved == 1`, gpt-oss's checkpoint order). The per-element math is
/// [`crate::shared::glu`]: `h = (u + up_offset)·g·σ(alpha·g)` with the optional clamp at
/// `limit` (gradient cut strictly or inclusively at `±limit` as `strict` says). f32 math, one
/// bf16 rounding per output.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GluParams {
    /// bf16 `[rows, 2·width]`: the gate/up projection's grouped output (both kernels read it).
    pub gu_addr: u64,
    /// bf16 `[rows, width]`: the forward's output `h`, or the backward's input `dh`.
    pub h_addr: u64,
    /// bf16 `[rows, 2·width]`: the backward's output `d_gu` (unused by the forward; 0 there).
    pub d_gu_addr: u64,
    /// Rows (`L = T·k`).
    pub rows: u64,
    /// The expert intermediate size `I` (a multiple of 8).
    pub width: u32,
    /// 1: clamp with `limit`; 0: no clamp.
    pub clamp: u32,
    /// The clamp limit (finite, positive) when `clamp == 1`.
    pub limit: f32,
    /// The sigmoid's slope `α` (1 for SwiGLU; finite, positive).
    pub alpha: f32,
    /// Added to the clamped up before it multiplies (0 for SwiGLU, 1 for gpt-oss).
    pub up_offset: f32,
    /// 1: gate and up interleaved (`2i`, `2i + 1`); 0: split halves (`i`, `width + i`).
    pub interleaved: u32,
    /// 1: zero gradient at exactly `±limit` (current torch); 0: the boundary passes it.
    pub strict: u32,
    /// Padding; must be 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<GluParams>() == 64);
    assert!(offset_of!(GluParams, rows) == 24);
    assert!(offset_of!(GluParams, width) == 32);
    assert!(offset_of!(GluParams, limit) == 40);
    assert!(offset_of!(GluParams, interleaved) == 52);
};

/// Parameters of [`crate::shared::names::AUTO_GATE`]: `Strategy::Auto` decided on the device,
/// right after routing (one warp).
///
/// The kernel counts the active experts of `offsets`, applies
/// [`crate::shared::auto::auto_picks_a`] to them and `inputs`, and writes
/// - `report[0]` = 1 when the rule picks Strategy A, 0 for B; `report[1 + e]` = `offsets[e]`
///   (the host reads the decision and the routing back together, in one copy);
/// - `gated[e]` = `offsets[e]` for B, 0 for A: Strategy B's kernels, launched on `gated`
///   before the host has the answer, see every expert empty and do nothing when A was chosen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AutoGateParams {
    /// u32 `[experts]`: the routing's inclusive row ends.
    pub offsets_addr: u64,
    /// u32 `[experts]`: the row ends Strategy B's kernels read.
    pub gated_addr: u64,
    /// u32 `[1 + experts]`: the decision, then a copy of the row ends.
    pub report_addr: u64,
    /// [`crate::shared::auto::AutoInputs::rows`].
    pub rows: u64,
    /// [`crate::shared::auto::AutoInputs::n`].
    pub n: u64,
    /// [`crate::shared::auto::AutoInputs::transient_per_expert`].
    pub transient_per_expert: u64,
    /// [`crate::shared::auto::AutoInputs::free_bytes`].
    pub free_bytes: u64,
    /// Experts `E` (the length of `offsets` and `gated`).
    pub experts: u32,
    /// [`crate::shared::auto::AutoInputs::sm_count`].
    pub sm_count: u32,
    /// 1: NVFP4's rule; 0: MXFP4's.
    pub nvfp4: u32,
    /// Padding; must be 0.
    pub _pad: u32,
}

impl AutoGateParams {
    /// The rule's inputs besides the active experts.
    pub const fn inputs(&self) -> crate::shared::auto::AutoInputs {
        crate::shared::auto::AutoInputs {
            nvfp4: self.nvfp4 != 0,
            rows: self.rows,
            n: self.n,
            sm_count: self.sm_count as u64,
            transient_per_expert: self.transient_per_expert,
            free_bytes: self.free_bytes,
        }
    }
}

const _: () = {
    assert!(size_of::<AutoGateParams>() == 72);
    assert!(offset_of!(AutoGateParams, experts) == 56);
};
