//! Host side of the grouped GEMM, the rank-sized LoRA products and the Gram kernels
//! (`kernels-gpu/src/tile/{gemm,gram}.rs`). Every function checks that each buffer covers the
//! largest element its strides address before launching; the contents of the routing arrays
//! cannot be checked without a read-back, so they come only as a [`RoutingView`] (built from the
//! routing kernels' outputs), and this module is crate-internal.

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::{GemmParams, GramParams};
use kernels_gpu::shared::tiles::{
    BLayout, GEMM_CONFIGS, GRAM_CONFIG, MAX_RANK, TmaBox, gram_smem_bytes, lora_down_config,
    persistent_kernel, rank_pad_index, smem_plan, tma_weight_box,
};

use super::routing::RouteBuffers;
use super::{check_len, spec};
use crate::device::{Gpu, MapElem, TileMap};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// The routing arrays every grouped kernel reads. The kernels index activations and outputs
/// through them without bounds checks, so a view is built only from arrays the routing kernels
/// produced ([`RoutingView::of_route`]) or from a compact subset of their offsets computed on
/// the host ([`RoutingView::compact`]); the fields are private.
///
/// Invariants: `ssi` holds `rows` flat slots, each `< rows`; `offsets` holds `num_experts`
/// non-decreasing inclusive row ends, each `≤ rows`.
#[derive(Clone, Copy)]
pub(crate) struct RoutingView<'a> {
    /// u32 `[rows]` flat slot per grouped row.
    ssi: &'a CudaSlice<u32>,
    /// u32 `[num_experts]` inclusive row ends.
    offsets: &'a CudaSlice<u32>,
    /// Routed rows `L = T·k` (dropped rows sort last).
    rows: usize,
    /// Experts `E`.
    num_experts: usize,
}

impl<'a> RoutingView<'a> {
    /// The view of the routing kernels' outputs for `rows` slots and `num_experts` experts
    /// (the arguments `route` was called with).
    pub(crate) fn of_route(bufs: &'a RouteBuffers, rows: usize, num_experts: usize) -> Self {
        Self {
            ssi: &bufs.ssi,
            offsets: &bufs.offsets,
            rows,
            num_experts,
        }
    }

    /// `full`'s rows seen through the inclusive row ends `offsets` of `count` of its experts, in
    /// order (Strategy A's compact problem). `offsets` must be taken from `full`'s own offsets
    /// (a subsequence, so still non-decreasing and `≤ rows`); its length is checked here.
    pub(crate) fn compact(
        full: RoutingView<'a>,
        offsets: &'a CudaSlice<u32>,
        count: usize,
    ) -> Result<Self> {
        if count > full.num_experts {
            return Err(Error::InvalidArgument {
                what: "compact routing",
                detail: format!("{count} experts of {}", full.num_experts),
            });
        }
        check_len("compact expert offsets", offsets, count)?;
        Ok(Self {
            ssi: full.ssi,
            offsets,
            rows: full.rows,
            num_experts: count,
        })
    }

    /// `full` with the inclusive row ends `offsets` of all its experts instead of its own:
    /// `Strategy::Auto`'s gated row ends, either `full`'s own or all zero (every expert empty),
    /// so the view never reaches past `full`'s rows. Its length is checked here.
    pub(crate) fn gated(full: RoutingView<'a>, offsets: &'a CudaSlice<u32>) -> Result<Self> {
        check_len("gated expert offsets", offsets, full.num_experts)?;
        Ok(Self { offsets, ..full })
    }

    /// Experts.
    pub(crate) fn num_experts(&self) -> usize {
        self.num_experts
    }
}

/// How a kernel finds the activation row of grouped row `p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMap {
    /// Row `p` (already grouped, `[L, ·]`).
    Grouped,
    /// Row `ssi[p] / fan_out` (`fan_out = k`: token order `[T, ·]`; 1: slot order `[T·k, ·]`).
    Scattered {
        /// Slots per source row.
        fan_out: u32,
    },
}

impl RowMap {
    fn fan(self) -> u32 {
        match self {
            RowMap::Grouped => 0,
            RowMap::Scattered { fan_out } => fan_out,
        }
    }

    /// Rows the source must have for `rows` grouped rows.
    pub fn source_rows(self, rows: usize) -> usize {
        match self {
            RowMap::Grouped => rows,
            RowMap::Scattered { fan_out } => rows.div_ceil(fan_out.max(1) as usize),
        }
    }

    /// Checks that `buf`, rows of `stride` elements addressed through this map, holds the
    /// `width` leading elements of every source row that `rows` grouped rows read.
    fn check_source(
        self,
        tensor: &'static str,
        buf: &CudaSlice<u16>,
        rows: usize,
        stride: usize,
        width: usize,
    ) -> Result<()> {
        check_len(
            tensor,
            buf,
            self.source_rows(rows).saturating_sub(1) * stride + width,
        )
    }
}

/// A strided bf16 matrix per expert: element `(e, n, k)` at `e·stride_e + n·stride_n + k·stride_k`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    /// The buffer.
    pub buf: &'a CudaSlice<u16>,
    /// Elements between experts.
    pub stride_e: usize,
    /// Elements between n indices.
    pub stride_n: usize,
    /// Elements between k indices.
    pub stride_k: usize,
}

impl Strided<'_> {
    fn check(&self, tensor: &'static str, experts: usize, n: usize, k: usize) -> Result<()> {
        if experts == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        let last =
            (experts - 1) * self.stride_e + (n - 1) * self.stride_n + (k - 1) * self.stride_k;
        check_len(tensor, self.buf, last + 1)
    }
}

/// MXFP4 expert weights on the device: `packed [E, n, k/2]`, `scales [E, n, k/32]`.
#[derive(Clone, Copy)]
pub struct MxOperand<'a> {
    /// Packed codes.
    pub packed: &'a CudaSlice<u8>,
    /// E8M0 scale bytes.
    pub scales: &'a CudaSlice<u8>,
    /// The container's N (rows of `W_store[e]`).
    pub n: usize,
    /// The container's K (multiple of 32).
    pub k: usize,
}

/// NVFP4 expert weights on the device: `packed [E, n, k/2]`, E4M3 `scales [E, n, k/16]` and,
/// when given, f32 `tensor_scales [E, groups]` (group `g` covers container rows
/// `[g·n/groups, (g+1)·n/groups)`).
#[derive(Clone, Copy)]
pub struct NvOperand<'a> {
    /// Packed codes.
    pub packed: &'a CudaSlice<u8>,
    /// E4M3 block-scale bytes.
    pub scales: &'a CudaSlice<u8>,
    /// Per-tensor scales (`None`: the block factor is the E4M3 value).
    pub tensor_scales: Option<&'a CudaSlice<f32>>,
    /// Tensor scales per expert (≥ 1, dividing `n`; 1 without tensor scales).
    pub groups: usize,
    /// The container's N (rows of `W_store[e]`).
    pub n: usize,
    /// The container's K (a multiple of 32 for the fused kernels, whose stages take 16-byte
    /// runs of packed bytes).
    pub k: usize,
}

/// The B operand of a grouped GEMM.
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    /// bf16 `[n][k]` with k contiguous (`stride_k == 1`).
    Nk(Strided<'a>),
    /// bf16 `[k][n]` with n contiguous (`stride_n == 1`).
    Kn(Strided<'a>),
    /// MXFP4 `W_store[e]` with its K as the reduction (forward): `n_out = n`, `k_red = k`.
    NkMx(MxOperand<'a>),
    /// MXFP4 `W_store[e]` with its N as the reduction (dX): `k_red = n`, `n_out = k`.
    KnMx(MxOperand<'a>),
    /// NVFP4 `W_store[e]` with its K as the reduction (forward): `n_out = n`, `k_red = k`.
    NkNv(NvOperand<'a>),
    /// NVFP4 `W_store[e]` with its N as the reduction (dX): `k_red = n`, `n_out = k`.
    KnNv(NvOperand<'a>),
}

impl BOperand<'_> {
    /// The kernel layout this operand uses.
    pub fn layout(&self) -> BLayout {
        match self {
            BOperand::Nk(_) => BLayout::NkBf16,
            BOperand::Kn(_) => BLayout::KnBf16,
            BOperand::NkMx(_) => BLayout::NkMxfp4,
            BOperand::KnMx(_) => BLayout::KnMxfp4,
            BOperand::NkNv(_) => BLayout::NkNvfp4,
            BOperand::KnNv(_) => BLayout::KnNvfp4,
        }
    }
}

/// Checks a 4-bit container `[*, n, k]` (`what`: "MXFP4 weights" or "NVFP4 weights") against
/// the GEMM: `(n, k) = (n_out, k_red)` with K as the reduction (`forward`), `(k_red, n_out)`
/// for dX, and `k % 32 == 0` (the fused stages take 32-k runs of packed bytes).
fn check_container(
    what: &'static str,
    (n, k): (usize, usize),
    n_out: usize,
    k_red: usize,
    forward: bool,
) -> Result<()> {
    let (want_n, want_k) = if forward {
        (n_out, k_red)
    } else {
        (k_red, n_out)
    };
    if n != want_n || k != want_k || !k.is_multiple_of(32) {
        return Err(Error::InvalidArgument {
            what,
            detail: format!(
                "container [*, {n}, {k}] does not match the GEMM (n {want_n}, k {want_k}, k % 32 == 0)"
            ),
        });
    }
    Ok(())
}

impl NvOperand<'_> {
    fn check(&self, experts: usize, n_out: usize, k_red: usize, forward: bool) -> Result<()> {
        check_container("NVFP4 weights", (self.n, self.k), n_out, k_red, forward)?;
        if self.groups == 0 || !self.n.is_multiple_of(self.groups) {
            return Err(Error::InvalidArgument {
                what: "NVFP4 weights",
                detail: format!(
                    "{} tensor scales per expert do not divide its {} rows",
                    self.groups, self.n
                ),
            });
        }
        check_len("packed", self.packed, experts * self.n * self.k / 2)?;
        check_len("scales", self.scales, experts * self.n * self.k / 16)?;
        match self.tensor_scales {
            Some(t) => check_len("tensor scales", t, experts * self.groups),
            None => Ok(()),
        }
    }
}

impl MxOperand<'_> {
    fn check(&self, experts: usize, n_out: usize, k_red: usize, forward: bool) -> Result<()> {
        check_container("MXFP4 weights", (self.n, self.k), n_out, k_red, forward)?;
        check_len("packed", self.packed, experts * self.n * self.k / 2)?;
        check_len("scales", self.scales, experts * self.n * self.k / 32)
    }
}

/// The fused LoRA epilogue: `out += s · (left + left_lo)[p, :] · right_e(n, :)`.
#[derive(Clone, Copy)]
pub struct LoraEpilogue<'a> {
    /// bf16 `[rows, r_pad]` grouped (XA or YB).
    pub left: &'a CudaSlice<u16>,
    /// The left factor's low part (bf16 `[rows, r_pad]`, `round(v − left)` of the unrounded
    /// `v`), forward layouts only (`[n][k]` weights): XA then enters with about 16 mantissa bits.
    pub left_lo: Option<&'a CudaSlice<u16>>,
    /// Right factor, `(e, n, j)` strides.
    pub right: Strided<'a>,
    /// Rank.
    pub rank: usize,
    /// Scaling `s`.
    pub scaling: f32,
}

/// Everything a grouped GEMM launch needs.
pub struct GemmArgs<'a> {
    /// Routing.
    pub routing: RoutingView<'a>,
    /// Activations (x or dY), bf16 rows of `a_stride` elements.
    pub a: &'a CudaSlice<u16>,
    /// Elements per activation row.
    pub a_stride: usize,
    /// Activation row addressing.
    pub a_map: RowMap,
    /// Per-expert weights.
    pub b: BOperand<'a>,
    /// Reduction length (multiple of 8).
    pub k_red: usize,
    /// Output columns (multiple of 8).
    pub n_out: usize,
    /// Output buffer (`rows × out_stride`).
    pub out: &'a mut CudaSlice<u16>,
    /// Elements per output row.
    pub out_stride: usize,
    /// Output row `ssi[p]` (true) or `p` (false).
    pub out_scattered: bool,
    /// Optional LoRA epilogue.
    pub lora: Option<LoraEpilogue<'a>>,
    /// Optional frozen bf16 bias `[E, n_out]`, added to every row of its expert before the
    /// output is rounded.
    pub bias: Option<&'a CudaSlice<u16>>,
    /// Index into `tiles::GEMM_CONFIGS`.
    pub config: usize,
}

fn padded_rank(rank: usize) -> Result<(u32, usize)> {
    if rank > MAX_RANK as usize {
        return Err(Error::InvalidArgument {
            what: "LoRA rank",
            detail: format!("at most {MAX_RANK} is supported, got {rank}"),
        });
    }
    let r_pad = kernels_gpu::shared::tiles::rank_pad(rank as u32);
    let idx = rank_pad_index(r_pad).ok_or_else(|| Error::InvalidArgument {
        what: "LoRA rank",
        detail: format!("no kernel for padded rank {r_pad}"),
    })?;
    Ok((r_pad, idx))
}

fn check_common(routing: &RoutingView<'_>) -> Result<()> {
    check_len("sorted_scattered_idxs", routing.ssi, routing.rows)?;
    check_len("expert_offsets", routing.offsets, routing.num_experts)
}

/// Launches the grouped GEMM (forward or dX).
pub(crate) fn grouped_gemm(gpu: &Gpu, args: GemmArgs<'_>) -> Result<()> {
    let r = &args.routing;
    check_common(r)?;
    if args.k_red == 0
        || !args.k_red.is_multiple_of(8)
        || args.n_out == 0
        || !args.n_out.is_multiple_of(8)
    {
        return Err(Error::InvalidArgument {
            what: "GEMM shape",
            detail: format!(
                "reduction {} and output width {} must be positive multiples of 8",
                args.k_red, args.n_out
            ),
        });
    }
    let cfg = GEMM_CONFIGS
        .get(args.config)
        .ok_or_else(|| Error::InvalidArgument {
            what: "tile config",
            detail: format!("no config {}", args.config),
        })?;
    args.a_map
        .check_source("activations", args.a, r.rows, args.a_stride, args.k_red)?;
    check_len(
        "output",
        args.out,
        r.rows.saturating_sub(1) * args.out_stride + args.n_out,
    )?;
    let none = Strided {
        buf: args.a,
        stride_e: 0,
        stride_n: 0,
        stride_k: 0,
    };
    let layout = args.b.layout();
    let forward = layout.is_forward();
    // The bf16 operands' strided view, or (4-bit) the packed codes, block scales and NVFP4's
    // tensor scales with the container rows each covers.
    let (b, b_addr, scales_addr, (tensor_scales_addr, ts_rows_per_group)) = match args.b {
        BOperand::Nk(s) | BOperand::Kn(s) => {
            if forward && s.stride_k != 1 {
                return Err(Error::InvalidArgument {
                    what: "weights",
                    detail: "the [n][k] operand needs k contiguous".into(),
                });
            }
            if !forward && s.stride_n != 1 {
                return Err(Error::InvalidArgument {
                    what: "weights",
                    detail: "the [k][n] operand needs n contiguous".into(),
                });
            }
            s.check("weights", r.num_experts, args.n_out, args.k_red)?;
            (s, addr(gpu, s.buf), 0, (0, 0))
        }
        BOperand::NkMx(m) | BOperand::KnMx(m) => {
            m.check(r.num_experts, args.n_out, args.k_red, forward)?;
            (none, addr(gpu, m.packed), addr(gpu, m.scales), (0, 0))
        }
        BOperand::NkNv(v) | BOperand::KnNv(v) => {
            v.check(r.num_experts, args.n_out, args.k_red, forward)?;
            // Checked above: groups ≥ 1 divides n.
            let tensor_scales = match v.tensor_scales {
                Some(t) => {
                    let rows =
                        u32::try_from(v.n / v.groups).map_err(|_| Error::InvalidArgument {
                            what: "NVFP4 weights",
                            detail: format!("{} rows per tensor scale exceed u32", v.n / v.groups),
                        })?;
                    (addr(gpu, t), rows)
                }
                None => (0, 1),
            };
            (
                none,
                addr(gpu, v.packed),
                addr(gpu, v.scales),
                tensor_scales,
            )
        }
    };
    let name = names::gemm_names(layout).ok_or_else(|| Error::InvalidArgument {
        what: "weights",
        detail: format!("{layout:?} is not a grouped-GEMM weight layout"),
    })?[args.config];
    let (rank, r_pad, left, right, scaling) = match &args.lora {
        Some(l) if l.rank > 0 => {
            let (r_pad, _) = padded_rank(l.rank)?;
            check_len("LoRA left factor", l.left, r.rows * r_pad as usize)?;
            l.right
                .check("LoRA right factor", r.num_experts, args.n_out, l.rank)?;
            (l.rank as u32, r_pad, addr(gpu, l.left), l.right, l.scaling)
        }
        _ => (0, 16, 0, none, 0.0),
    };
    let left_lo = match args
        .lora
        .as_ref()
        .and_then(|l| l.left_lo.filter(|_| l.rank > 0))
    {
        Some(lo) => {
            if !forward {
                return Err(Error::InvalidArgument {
                    what: "LoRA left factor",
                    detail: "a low part is read only by the forward ([n][k]) layouts".into(),
                });
            }
            check_len("LoRA left factor (low part)", lo, r.rows * r_pad as usize)?;
            addr(gpu, lo)
        }
        None => 0,
    };
    let bias_addr = match args.bias {
        Some(bias) => {
            check_len("bias", bias, r.num_experts * args.n_out)?;
            addr(gpu, bias)
        }
        None => 0,
    };
    if r.rows == 0 {
        return Ok(());
    }
    let plan = smem_plan(cfg, layout, if rank > 0 { r_pad } else { 0 });
    // The `wgmma` kernels' weight tiles by TMA where the tensor allows a map (else `cp.async`).
    let b_tmap_addr = match tma_weight_box(cfg, layout) {
        Some(t) if gpu.tma() => {
            let strides = (b.stride_e, b.stride_n, b.stride_k);
            let map = weight_map(
                &t,
                layout,
                b_addr,
                strides,
                r.num_experts,
                args.n_out,
                args.k_red,
            );
            if map.encodable() {
                gpu.tensor_map(&map)?
            } else {
                0
            }
        }
        _ => 0,
    };
    // Grouped activation rows by TMA as well (one box of the tile's rows per k-tile), where the
    // tensor allows a map and every row index fits the copy's signed coordinate.
    let a_tmap_addr = match (tma_weight_box(cfg, layout), args.a_map) {
        (Some(_), RowMap::Grouped) if gpu.tma_activations() => {
            let map = activation_map(addr(gpu, args.a), args.a_stride, r.rows, args.k_red, cfg.bm);
            if map.encodable() && map.dims[1] <= i32::MAX as u64 {
                gpu.tensor_map(&map)?
            } else {
                0
            }
        }
        _ => 0,
    };
    let params = GemmParams {
        ssi_addr: addr(gpu, r.ssi),
        offsets_addr: addr(gpu, r.offsets),
        a_addr: addr(gpu, args.a),
        a_stride: args.a_stride as u64,
        b_addr,
        scales_addr,
        b_stride_e: b.stride_e as u64,
        b_stride_n: b.stride_n as u64,
        b_stride_k: b.stride_k as u64,
        out_addr: addr_mut(gpu, args.out),
        out_stride: args.out_stride as u64,
        lora_left_addr: left,
        lora_right_addr: if rank > 0 { addr(gpu, right.buf) } else { 0 },
        lr_stride_e: right.stride_e as u64,
        lr_stride_n: right.stride_n as u64,
        lr_stride_r: right.stride_k as u64,
        bias_addr,
        lora_left_lo_addr: left_lo,
        out_lo_addr: 0,
        rows: r.rows as u32,
        k_red: args.k_red as u32,
        n_out: args.n_out as u32,
        num_experts: r.num_experts as u32,
        a_fan_out: args.a_map.fan(),
        out_scattered: args.out_scattered as u32,
        rank,
        r_pad,
        scaling,
        b_rows: args.n_out as u32,
        tensor_scales_addr,
        ts_rows_per_group,
        _pad: 0,
        b_tmap_addr,
        a_tmap_addr,
    };
    let n_tiles = args.n_out.div_ceil(cfg.bn as usize);
    let m_tiles = r.rows.div_ceil(cfg.bm as usize) + r.num_experts + 1;
    // A persistent kernel walks its tiles with one block per SM at most (each block takes tiles
    // ctaid, ctaid + nctaid, …; blocks past the last tile exit).
    let blocks = if persistent_kernel(cfg) {
        (n_tiles * m_tiles).min(gpu.limits().sm_count.max(1) as usize)
    } else {
        n_tiles * m_tiles
    };
    let spec = spec(name, cfg.threads(), plan.total_bytes as usize);
    // SAFETY: every buffer was checked to cover the largest element its strides address (the
    // bias its `[E, n_out]`; 4-bit weights their packed codes, block scales and, for NVFP4,
    // `E·groups` tensor scales with `ts_rows_per_group = n / groups`, and a container K that is a
    // multiple of 32); the grid is n_tiles·(row tiles + E + 1) as the contract asks;
    // k_red and n_out are multiples of 8; r_pad is a multiple of 16 ≥ rank and the left factor
    // (and its low part, given only for the forward layouts whose plan reserves it) is
    // [rows, r_pad]; a weight tensor map, when given, is the encoded map of exactly the checked
    // weight tensor (`weight_map`: its sizes and strides, zeros outside), an activation map
    // (`activation_map`) that of the checked grouped activation rows (`rows` of them, below
    // 2^31), both copied before the launch on this stream.
    unsafe { gpu.launch(&spec, (blocks as u32, 1, 1), params) }
}

/// The tensor map of a `wgmma` kernel's weight operand ([`GemmParams::b_tmap_addr`]): box `t`
/// over the weight tensor at `b_addr`, innermost dimension first — `(K, N, E)` for bf16 weights
/// `[E, N, K]` with `K` contiguous (the forward's reduction, dX's output; element strides
/// `(e, n, k)` of the operand's view),
/// `(k_red / 2, n_out, E)` bytes for the forward's packed codes `[E, n_out, k_red / 2]`, and
/// `(n_out / 2, k_red, E)` bytes for dX's `[E, k_red, n_out / 2]`.
fn weight_map(
    t: &TmaBox,
    layout: BLayout,
    b_addr: u64,
    (stride_e, stride_n, stride_k): (usize, usize, usize),
    experts: usize,
    n_out: usize,
    k_red: usize,
) -> TileMap {
    let (e, n, k) = (experts as u64, n_out as u64, k_red as u64);
    let (elem, dims, strides) = match layout {
        // Forward: k contiguous (checked), rows n.
        BLayout::NkBf16 => (
            MapElem::Bf16,
            [k, n, e],
            [2 * stride_n as u64, 2 * stride_e as u64],
        ),
        // dX: n (the tensor's K) contiguous (checked), rows along the reduction.
        BLayout::KnBf16 => (
            MapElem::Bf16,
            [n, k, e],
            [2 * stride_k as u64, 2 * stride_e as u64],
        ),
        BLayout::NkMxfp4 | BLayout::NkNvfp4 => (MapElem::U8, [k / 2, n, e], [k / 2, n * (k / 2)]),
        _ => (MapElem::U8, [n / 2, k, e], [n / 2, k * (n / 2)]),
    };
    TileMap {
        addr: b_addr,
        elem,
        dims,
        strides,
        boxes: [t.inner, t.outer, 1],
        swizzle_128: t.swizzle_128,
    }
}

/// The tensor map of a `wgmma` kernel's activation operand ([`GemmParams::a_tmap_addr`]): the
/// bf16 rows at `a_addr` (`a_stride` elements apart, `rows` of them, the first `k_red` elements
/// of each read), one `64 × box_rows` box per copy (a tile's rows) in the 128-byte swizzle of
/// the activation stages.
fn activation_map(
    a_addr: u64,
    a_stride: usize,
    rows: usize,
    k_red: usize,
    box_rows: u32,
) -> TileMap {
    let row_bytes = 2 * a_stride as u64;
    TileMap {
        addr: a_addr,
        elem: MapElem::Bf16,
        dims: [k_red as u64, rows as u64, 1],
        strides: [row_bytes, row_bytes.saturating_mul(rows as u64)],
        boxes: [64, box_rows, 1],
        swizzle_128: true,
    }
}

/// `left[p, j] = round(Σ_d act[row(p), d] · m_e(j, d))` for `j < rank`, zero for
/// `rank ≤ j < r_pad`: XA (`m = A_e`) or YB (`m = B_eᵀ`). Output bf16 `[rows, r_pad]`, grouped;
/// with `out_lo`, also the rounded remainders `round(v − left)` (same shape): the low part of a
/// two-term XA.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_down(
    gpu: &Gpu,
    routing: RoutingView<'_>,
    act: &CudaSlice<u16>,
    act_stride: usize,
    act_map: RowMap,
    width: usize,
    m: Strided<'_>,
    rank: usize,
    out: &mut CudaSlice<u16>,
    out_lo: Option<&mut CudaSlice<u16>>,
) -> Result<()> {
    check_common(&routing)?;
    let (r_pad, idx) = padded_rank(rank)?;
    if width == 0 || !width.is_multiple_of(8) {
        return Err(Error::InvalidArgument {
            what: "LoRA product width",
            detail: format!("{width} is not a positive multiple of 8"),
        });
    }
    act_map.check_source("activations", act, routing.rows, act_stride, width)?;
    m.check("LoRA factor", routing.num_experts, rank, width)?;
    check_len("LoRA product output", out, routing.rows * r_pad as usize)?;
    let out_lo_addr = match out_lo {
        Some(lo) => {
            check_len(
                "LoRA product output (low part)",
                lo,
                routing.rows * r_pad as usize,
            )?;
            addr_mut(gpu, lo)
        }
        None => 0,
    };
    if routing.rows == 0 {
        return Ok(());
    }
    let cfg = lora_down_config(r_pad);
    // Stage the factor with cp.async when its rows are contiguous along the reduction (XA from
    // A) or along the rank with 16-byte aligned blocks (YB from B, rank % 8 == 0); otherwise
    // gather it element by element.
    let (layout, name) = if m.stride_k == 1 {
        (BLayout::NkBf16, names::LORA_DOWN_NK[idx])
    } else if m.stride_n == 1
        && rank.is_multiple_of(8)
        && m.stride_e.is_multiple_of(8)
        && m.stride_k.is_multiple_of(8)
    {
        (BLayout::KnBf16, names::LORA_DOWN_KN[idx])
    } else {
        (BLayout::Strided, names::LORA_DOWN[idx])
    };
    let plan = smem_plan(&cfg, layout, 0);
    let params = GemmParams {
        ssi_addr: addr(gpu, routing.ssi),
        offsets_addr: addr(gpu, routing.offsets),
        a_addr: addr(gpu, act),
        a_stride: act_stride as u64,
        b_addr: addr(gpu, m.buf),
        b_stride_e: m.stride_e as u64,
        b_stride_n: m.stride_n as u64,
        b_stride_k: m.stride_k as u64,
        out_addr: addr_mut(gpu, out),
        out_lo_addr,
        out_stride: r_pad as u64,
        rows: routing.rows as u32,
        k_red: width as u32,
        n_out: r_pad,
        num_experts: routing.num_experts as u32,
        a_fan_out: act_map.fan(),
        out_scattered: 0,
        rank: 0,
        r_pad,
        b_rows: rank as u32,
        ..GemmParams::default()
    };
    let blocks = routing.rows.div_ceil(cfg.bm as usize) + routing.num_experts + 1;
    let spec = spec(name, cfg.threads(), plan.total_bytes as usize);
    // SAFETY: buffers checked against the strides and row counts above (the low-part output,
    // when given, like the output; a distinct `&mut`, so no overlap); one n tile (bn = r_pad);
    // grid = row tiles + E + 1; width % 8 == 0.
    unsafe { gpu.launch(&spec, (blocks as u32, 1, 1), params) }
}

/// `out_e(w, j) = round(s · Σ_{p ∈ e} wide[row(p), w] · narrow[p, j])` for every expert
/// (zeros for experts without rows), `j < rank`, `w < width`, stored at
/// `e·out.stride_e + w·out.stride_n + j·out.stride_k`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gram(
    gpu: &Gpu,
    routing: RoutingView<'_>,
    wide: &CudaSlice<u16>,
    wide_stride: usize,
    wide_map: RowMap,
    width: usize,
    narrow: &CudaSlice<u16>,
    rank: usize,
    scaling: f32,
    out: &mut CudaSlice<u16>,
    out_strides: (usize, usize, usize),
) -> Result<()> {
    check_common(&routing)?;
    if routing.num_experts == 0 {
        // No expert owns a row: the gradient is all zeros.
        return crate::device::fill_bytes(gpu, out, 0);
    }
    let (r_pad, idx) = padded_rank(rank)?;
    if width == 0 || !width.is_multiple_of(8) || rank == 0 {
        return Err(Error::InvalidArgument {
            what: "Gram shape",
            detail: format!(
                "width {width} must be a positive multiple of 8 and rank {rank} positive"
            ),
        });
    }
    wide_map.check_source("wide operand", wide, routing.rows, wide_stride, width)?;
    check_len("narrow operand", narrow, routing.rows * r_pad as usize)?;
    let (se, sw, sr) = out_strides;
    check_len(
        "gradient",
        out,
        (routing.num_experts - 1) * se + (width - 1) * sw + (rank - 1) * sr + 1,
    )?;
    let cfg = GRAM_CONFIG;
    let params = GramParams {
        ssi_addr: addr(gpu, routing.ssi),
        offsets_addr: addr(gpu, routing.offsets),
        wide_addr: addr(gpu, wide),
        wide_stride: wide_stride as u64,
        narrow_addr: addr(gpu, narrow),
        out_addr: addr_mut(gpu, out),
        out_stride_e: se as u64,
        out_stride_w: sw as u64,
        out_stride_r: sr as u64,
        width: width as u32,
        num_experts: routing.num_experts as u32,
        wide_fan_out: wide_map.fan(),
        rank: rank as u32,
        r_pad,
        scaling,
    };
    let blocks = routing.num_experts * width.div_ceil(cfg.bw as usize);
    let spec = spec(
        names::GRAM[idx],
        32 * cfg.warps,
        gram_smem_bytes(&cfg, r_pad) as usize,
    );
    // SAFETY: buffers checked above against rows, widths and output strides; grid is
    // E·⌈width/bw⌉; the narrow operand is [rows, r_pad].
    unsafe { gpu.launch(&spec, (blocks as u32, 1, 1), params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address a tensor map reads for map element `(d0, d1, d2)`.
    fn map_address(m: &TileMap, d: [u64; 3]) -> u64 {
        let elem = if m.elem == MapElem::Bf16 { 2 } else { 1 };
        assert!(
            (0..3).all(|i| d[i] < m.dims[i]),
            "{d:?} outside {:?}",
            m.dims
        );
        m.addr + d[0] * elem + d[1] * m.strides[0] + d[2] * m.strides[1]
    }

    /// Each layout's map reads, for the box element the kernel's coordinates name, the byte the
    /// `cp.async` producer copies for that weight element (its source formulas in `tile::wg`),
    /// and every bf16 layout on a padded view (row stride > K) still gets an encodable map.
    #[test]
    fn weight_maps_address_what_the_cp_async_producer_reads() {
        let (e, n_out, k_red) = (5usize, 384usize, 320usize);
        let base = 1u64 << 24;
        for layout in names::GEMM_WEIGHT_LAYOUTS {
            let cfg = GEMM_CONFIGS.iter().find(|c| c.wgmma).expect("a wgmma row");
            let t = tma_weight_box(cfg, layout).expect("every wgmma layout has TMA boxes");
            // bf16 views: [E][N][K] with K padded to 328 (forward: rows n; dX: rows along the
            // reduction, which is the tensor's N).
            let (rows, cols) = if layout.is_forward() {
                (n_out, k_red)
            } else {
                (k_red, n_out)
            };
            let pitch = cols + 8;
            let strides = if layout.is_forward() {
                (rows * pitch, pitch, 1)
            } else {
                (rows * pitch, 1, pitch)
            };
            let m = weight_map(&t, layout, base, strides, e, n_out, k_red);
            assert!(m.encodable(), "{layout:?} {m:?}");
            let (ex, kt, n0) = (3u32, 2u32, 128u32);
            for h in 0..t.copies {
                let (c0, c1, c2) = t.coords(cfg.bk, kt, n0, ex, h);
                for (r, i) in [(0, 0), (1, 7), (t.outer - 1, t.inner - 1)] {
                    let d = [(c0 as u32 + i) as u64, (c1 as u32 + r) as u64, c2 as u64];
                    // The weight element in the producer's terms: output column n, reduction k.
                    let want = match layout {
                        BLayout::NkBf16 => {
                            let (n, k) = (d[1], d[0]);
                            base + 2 * (d[2] * strides.0 as u64 + n * pitch as u64 + k)
                        }
                        BLayout::KnBf16 => {
                            let (n, k) = (d[0], d[1]);
                            base + 2 * (d[2] * strides.0 as u64 + k * pitch as u64 + n)
                        }
                        BLayout::NkMxfp4 | BLayout::NkNvfp4 => {
                            let half_k = k_red as u64 / 2;
                            base + d[2] * n_out as u64 * half_k + d[1] * half_k + d[0]
                        }
                        _ => {
                            let half_n = n_out as u64 / 2;
                            base + d[2] * k_red as u64 * half_n + d[1] * half_n + d[0]
                        }
                    };
                    assert_eq!(map_address(&m, d), want, "{layout:?} copy {h} ({r}, {i})");
                }
            }
            // The last k-tile and column tile stay inside the map's dimensions.
            assert!(m.dims[0] >= 1 && m.dims[2] == e as u64);
        }
    }
}
