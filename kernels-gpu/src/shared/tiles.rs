//! Tile configurations and shared-memory plans of the grouped-GEMM kernels.
//!
//! Vocabulary: an *mma tile* is one `m16n8k16` instruction; a *warp tile* is what one warp owns
//! (`bm/warps_m × bn/warps_n`); a *block tile* is `bm × bn`; a *stage* is one `bk` slice of both
//! operands in shared memory. The kernels carve their dynamic shared memory with [`SmemPlan`],
//! and the host launches with `SmemPlan::total_bytes`, so the two can never disagree.

/// How a kernel's B operand (the per-expert weight) is stored and staged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BLayout {
    /// bf16 `[n][k]`, k contiguous (forward on `W_store[e]`): staged with 16-byte `cp.async`,
    /// fragments by `ldmatrix`.
    NkBf16,
    /// bf16 `[k][n]`, n contiguous (dX on `W_store[e]`, reduction over its rows): staged with
    /// `cp.async`, fragments by `ldmatrix.trans`.
    KnBf16,
    /// A small strided bf16 matrix (LoRA A or B of one expert) gathered element by element into
    /// `[n][k]` (no alignment requirement; used for the rank-sized products).
    Strided,
    /// MXFP4 `W_store[e]` with K the reduction (forward): packed bytes `[n][bk/2]` and a 4-byte
    /// scale word per row per stage; each byte is one bf16x2 register of a B fragment, decoded in
    /// registers through a 256-entry table.
    NkMxfp4,
    /// MXFP4 `W_store[e]` with N the reduction (dX): raw bytes `[bk][bn/2]` and an 8-byte scale
    /// window per reduction row per stage, decoded into a bf16 `[bk][bn]` tile read by `ldmatrix.trans`.
    KnMxfp4,
    /// NVFP4 `W_store[e]` with K the reduction (forward): packed bytes `[n][bk/2]` as
    /// [`BLayout::NkMxfp4`], and a [`nv_scale_slot_bytes`] slot per row holding the aligned words
    /// of the stage's E4M3 block-scale bytes (one per 16 k); the per-tensor scale of each row is
    /// read once per block into registers. Decoded in registers.
    NkNvfp4,
    /// NVFP4 `W_store[e]` with N the reduction (dX): raw bytes `[bk][bn/2]` as
    /// [`BLayout::KnMxfp4`], and a [`kn_nv_window_bytes`] window per reduction row (its f32
    /// tensor scale, then the aligned words of its E4M3 bytes), decoded into a bf16 `[bk][bn]`
    /// tile read by `ldmatrix.trans`.
    KnNvfp4,
}

impl BLayout {
    /// The layout whose `as u8` value is `tag` (kernels carry the layout as a const `u8`);
    /// anything unknown reads as `KnNvfp4`, the last variant.
    pub const fn from_tag(tag: u8) -> Self {
        match tag {
            t if t == BLayout::NkBf16 as u8 => BLayout::NkBf16,
            t if t == BLayout::KnBf16 as u8 => BLayout::KnBf16,
            t if t == BLayout::Strided as u8 => BLayout::Strided,
            t if t == BLayout::NkMxfp4 as u8 => BLayout::NkMxfp4,
            t if t == BLayout::KnMxfp4 as u8 => BLayout::KnMxfp4,
            t if t == BLayout::NkNvfp4 as u8 => BLayout::NkNvfp4,
            _ => BLayout::KnNvfp4,
        }
    }

    /// Whether the operand is MXFP4.
    pub const fn is_mx(self) -> bool {
        matches!(self, BLayout::NkMxfp4 | BLayout::KnMxfp4)
    }

    /// Whether the operand is NVFP4.
    pub const fn is_nv(self) -> bool {
        matches!(self, BLayout::NkNvfp4 | BLayout::KnNvfp4)
    }

    /// Whether the operand is 4-bit (MXFP4 or NVFP4): packed codes decoded in the kernel, whose
    /// stages are one or two 32-k blocks deep (`bk` 32 or 64).
    pub const fn is_fp4(self) -> bool {
        self.is_mx() || self.is_nv()
    }

    /// Whether the weights' K is the reduction (the forward layouts, `[n][k]`), whose epilogue
    /// reads the LoRA left factor's low part.
    pub const fn is_forward(self) -> bool {
        matches!(self, BLayout::NkBf16 | BLayout::NkMxfp4 | BLayout::NkNvfp4)
    }

    /// Whether dX decodes this layout into a shared bf16 tile (`KnMxfp4`, `KnNvfp4`).
    pub const fn has_decoded_tile(self) -> bool {
        matches!(self, BLayout::KnMxfp4 | BLayout::KnNvfp4)
    }
}

/// A compile-time tile configuration of the grouped GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    /// Rows of the block tile (routed rows).
    pub bm: u32,
    /// Columns of the block tile (output features).
    pub bn: u32,
    /// Reduction slice per stage.
    pub bk: u32,
    /// Warps along M.
    pub warps_m: u32,
    /// Warps along N.
    pub warps_n: u32,
    /// Pipeline stages.
    pub stages: u32,
    /// Hopper warpgroup MMA (`wgmma`, see `tile::wg`): the weight tile is the register-sourced A
    /// operand (`bn/64` warpgroups, 64 weight columns each) and the `bm` routed rows are the
    /// shared-memory B operand, so the product is computed transposed. Requires
    /// `warps_m == 1`, `warps_n == 8`, `bn == 128`, `bm ∈ {16, 32, 64, 128}`.
    pub wgmma: bool,
}

/// Threads of the producer warpgroup of a `wgmma` block (warps 0–3; the MMA warpgroups follow).
pub const WG_PRODUCER_THREADS: u32 = 128;

/// Why a configuration is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileError {
    /// The warp tile is not a whole number of m16 × n16 MMA pairs.
    WarpTile,
    /// `bk` is not a multiple of 32 (one scale block) or exceeds 64.
    Bk,
    /// Fewer than two stages, or more than four (eight for `wgmma`).
    Stages,
    /// The loaders need the stage to split evenly over the block's threads.
    LoaderSplit,
    /// A `wgmma` configuration outside its supported shapes.
    Wgmma,
}

impl TileConfig {
    /// Warps per block.
    pub const fn warps(&self) -> u32 {
        self.warps_m * self.warps_n
    }

    /// Threads per block: the MMA warps, plus one producer warpgroup for `wgmma`.
    pub const fn threads(&self) -> u32 {
        32 * self.warps() + if self.wgmma { WG_PRODUCER_THREADS } else { 0 }
    }

    /// Threads that stage operand tiles (all of them, or the producer warpgroup for `wgmma`).
    pub const fn loader_threads(&self) -> u32 {
        if self.wgmma {
            WG_PRODUCER_THREADS
        } else {
            self.threads()
        }
    }

    /// Rows of one warp tile.
    pub const fn warp_m(&self) -> u32 {
        self.bm / self.warps_m
    }

    /// Columns of one warp tile.
    pub const fn warp_n(&self) -> u32 {
        self.bn / self.warps_n
    }

    /// m16 MMA tiles per warp along M.
    pub const fn mma_m(&self) -> u32 {
        self.warp_m() / 16
    }

    /// n8 MMA tiles per warp along N.
    pub const fn mma_n(&self) -> u32 {
        self.warp_n() / 8
    }

    /// Checks the configuration; the kernels assert this at compile time and the host filters
    /// candidates with it.
    pub const fn validate(&self) -> Result<(), TileError> {
        if self.warps_m == 0
            || self.warps_n == 0
            || !self.bm.is_multiple_of(16 * self.warps_m)
            || !self.bn.is_multiple_of(16 * self.warps_n)
        {
            return Err(TileError::WarpTile);
        }
        if !self.bk.is_multiple_of(32) || self.bk == 0 || self.bk > 64 {
            return Err(TileError::Bk);
        }
        // The `wgmma` pipeline is handed over by mbarriers and may run deeper.
        let max_stages = if self.wgmma { 8 } else { 4 };
        if self.stages < 2 || self.stages > max_stages {
            return Err(TileError::Stages);
        }
        if self.wgmma
            && (self.warps_m != 1
                || self.warps_n != 8
                || self.bn != 128
                || !matches!(self.bm, 16 | 32 | 64 | 128 | 256))
        {
            return Err(TileError::Wgmma);
        }
        // Each thread moves whole 16-byte chunks of both bf16 operand tiles.
        let chunks_a = self.bm * self.bk / 8;
        let chunks_b = self.bn * self.bk / 8;
        let t = self.loader_threads();
        if !chunks_a.is_multiple_of(t) && !t.is_multiple_of(chunks_a) {
            return Err(TileError::LoaderSplit);
        }
        if !chunks_b.is_multiple_of(t) && !t.is_multiple_of(chunks_b) {
            return Err(TileError::LoaderSplit);
        }
        Ok(())
    }

    /// Warpgroups per block (`wgmma` configurations).
    pub const fn warpgroups(&self) -> u32 {
        self.warps() / 4
    }
}

/// Rounds the LoRA rank up to the MMA granularity: `r_pad = 16·⌈max(r,1)/16⌉`. XA/YB buffers
/// are `[L, r_pad]` with zero pad columns.
pub const fn rank_pad(r: u32) -> u32 {
    let r = if r == 0 { 1 } else { r };
    r.div_ceil(16) * 16
}

/// Largest LoRA rank the fused epilogues support.
pub const MAX_RANK: u32 = 128;

/// Bytes of the forward MXFP4 layout's per-row scale slot: the aligned 4-byte words holding the
/// `bk/32` scale bytes of one stage (they may start at any byte of a word).
pub const fn mx_scale_slot_bytes(bk: u32) -> u32 {
    4 * (3 + bk / 32).div_ceil(4)
}

/// Bytes of the forward NVFP4 layout's per-row scale slot: the aligned 4-byte words holding the
/// `bk/16` E4M3 bytes of one stage (they may start at any byte of a word).
pub const fn nv_scale_slot_bytes(bk: u32) -> u32 {
    4 * (3 + bk / 16).div_ceil(4)
}

/// Bytes of the dX NVFP4 layout's per-reduction-row window: the row's f32 tensor scale (4
/// bytes), then the aligned words holding its `bn/16` E4M3 bytes.
pub const fn kn_nv_window_bytes(bn: u32) -> u32 {
    4 + 4 * (3 + bn / 16).div_ceil(4)
}

/// Byte offsets of the regions of a grouped-GEMM block's dynamic shared memory.
///
/// Main loop: `stages × (A tile + B tile)`. Epilogue (after the main loop, reusing the same
/// bytes): the LoRA left factor `[bm][r_pad]` and right factor (`[bn][r_pad]` or `[r_pad][bn]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmemPlan {
    /// Bytes of one A stage (`bm × bk` bf16).
    pub a_stage_bytes: u32,
    /// Bytes of one B stage.
    pub b_stage_bytes: u32,
    /// Offset of the first B stage (A stages come first).
    pub b_offset: u32,
    /// Offset of the epilogue's left LoRA factor: a region of its own, filled by `cp.async`
    /// while the main loop runs.
    pub lora_left_offset: u32,
    /// Offset of the left factor's low part (`GemmParams::lora_left_lo_addr`), right after the
    /// left factor; reserved for the forward layouts (`NkBf16`, `NkMxfp4`, `NkNvfp4`) only, whose epilogue
    /// reads XA as two bf16 terms (0 for the others).
    pub lora_left_lo_offset: u32,
    /// Offset of the epilogue's right LoRA factor (right after the left factor and, for the
    /// forward layouts, its low part).
    pub lora_right_offset: u32,
    /// Bytes of the `wgmma` output tile, a swizzled bf16 `[bm][bn]` at [`Self::out_offset`]
    /// (`mma.sync` configurations store from registers: 0).
    pub epilogue_bytes: u32,
    /// Offset of the `wgmma` output tile: 0 (over the drained stages), or for a persistent
    /// configuration the LoRA factors' region (the producer is already filling the stages of
    /// the next tile; the factors are read before the tile is written), which is then at least
    /// `epilogue_bytes` long.
    pub out_offset: u32,
    /// Offset of the per-tile-row index arrays (`bm` input rows, then `bm` output rows, u32);
    /// a persistent configuration has two such buffers, tile `i` using buffer `i % 2`.
    pub rows_offset: u32,
    /// Offset of the scale bytes inside one B stage (MXFP4 and NVFP4 layouts).
    pub b_scales_in_stage: u32,
    /// Offset of the decoded bf16 `[bk][bn]` tile (`KnMxfp4`, `KnNvfp4`; 0 otherwise).
    pub decoded_offset: u32,
    /// Offset of the `wgmma` pipeline's mbarriers, 8 bytes each: `stages` "full", `stages`
    /// "empty", then "LoRA ready" and "epilogue done" (0 for `mma.sync` configurations).
    pub barriers_offset: u32,
    /// Total bytes to request at launch.
    pub total_bytes: u32,
}

/// Rows per block tile from which a `wgmma` kernel is persistent ([`persistent_kernel`]): the
/// 128-row tiles run one block per SM, so nothing else hides their prologue and epilogue;
/// smaller tiles share an SM with other blocks.
pub const PERSISTENT_FROM_ROWS: u32 = 128;

/// Whether the kernel of configuration `c` is persistent (every weight layout alike): it
/// launches at most one block per SM, and each block walks the tiles `ctaid, ctaid + nctaid, …`,
/// its producer staging the next tile while the consumers run the epilogue (so the output tile
/// has a region of its own, shared with the LoRA factors, and the row indices two buffers). A
/// `wgmma` configuration of [`PERSISTENT_FROM_ROWS`] rows or more. (The forward MXFP4 layout,
/// whose consumers keep two register fragment sets in flight, joined last: under the tile loop
/// ptxas keeps a few of its values in local memory, reloaded once per tile at 128 rows and one
/// word per k-tile at 256, `xtask/src/ptx_report.rs`'s `ALLOWED_STACK`.)
pub const fn persistent_kernel(c: &TileConfig) -> bool {
    c.wgmma && c.bm >= PERSISTENT_FROM_ROWS
}

/// Alignment of every tile a `wgmma` descriptor names in the 128-byte swizzle mode (the
/// activation and weight stages, the decoded dX tiles): the hardware swizzles address bits 4–6
/// by bits 7–9 of the shared address, the software layout (`swizzled_offset`) by the row inside
/// the tile, and the two agree only on 1024-byte boundaries (the dynamic shared memory starts at
/// shared address 0: no static shared memory in these kernels).
pub const WGMMA_SWIZZLE_ALIGN: u32 = 1024;

/// The TMA copies that fill one weight stage of a `wgmma` kernel
/// ([`GemmParams::b_tmap_addr`](super::params::GemmParams::b_tmap_addr)): `copies` boxes of
/// `inner × outer` map elements (`elem_bytes` each; innermost first), stored one after the other
/// from the stage's start — exactly the stage layout the `cp.async` producer writes, which
/// `tests::tma_boxes_write_the_cp_async_stage_layouts` checks element by element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaBox {
    /// Map elements along the contiguous dimension of one box.
    pub inner: u32,
    /// Rows of one box.
    pub outer: u32,
    /// 2: bf16 weights; 1: packed 4-bit codes (a map element is a byte, two values).
    pub elem_bytes: u32,
    /// The 128-byte swizzle (the `wgmma` descriptors' layout), else plain row-major boxes.
    pub swizzle_128: bool,
    /// Boxes per stage.
    pub copies: u32,
    /// Whether the boxes of a stage follow each other along the contiguous dimension (the `[k][n]`
    /// layouts' two 64-column panels) rather than along the rows (the `[n][k]` layouts).
    pub along_inner: bool,
}

impl TmaBox {
    /// Bytes of one box.
    pub const fn box_bytes(&self) -> u32 {
        self.inner * self.outer * self.elem_bytes
    }

    /// Bytes one stage's copies complete on its mbarrier.
    pub const fn stage_bytes(&self) -> u32 {
        self.copies * self.box_bytes()
    }

    /// Weight values per map element along the contiguous dimension (1 for bf16, 2 for packed
    /// codes).
    pub const fn values_per_elem(&self) -> u32 {
        if self.elem_bytes == 2 { 1 } else { 2 }
    }

    /// Map coordinates (innermost first) of copy `h` of the stage for k-tile `kt` (`bk` deep)
    /// of expert `e`, output columns from `n0`. The map's dimensions are, innermost first, the
    /// weight tensor's contiguous one, the other, and the expert: `(k, n, e)` for `[n][k]`
    /// layouts, `(n, k, e)` for `[k][n]` layouts (values divided by [`Self::values_per_elem`]
    /// along the contiguous one).
    pub const fn coords(&self, bk: u32, kt: u32, n0: u32, e: u32, h: u32) -> (i32, i32, i32) {
        if self.along_inner {
            (
                (n0 / self.values_per_elem() + h * self.inner) as i32,
                (kt * bk) as i32,
                e as i32,
            )
        } else {
            (
                (kt * bk / self.values_per_elem()) as i32,
                (n0 + h * self.outer) as i32,
                e as i32,
            )
        }
    }
}

/// The TMA boxes of weight layout `b` in a `wgmma` configuration with `bn` output columns and
/// `bk`-deep k-tiles, or `None` where the weights have no such path (`mma.sync` rows, the strided
/// layout, other tile sizes):
/// - bf16 (`NkBf16`, `KnBf16`): two 64 × 64 boxes in the 128-byte swizzle, the forward's
///   `[bn][64]` stage as two 64-row halves, dX's `[64][bn]` stage as its two MN-major panels
///   (`wgmma_mn_offset`). One map serves both: the same `[E, N, K]` tensor and box.
/// - packed codes, forward (`NkMxfp4`, `NkNvfp4`): one `bk/2`-byte × `bn`-row box, row-major.
/// - packed codes, dX (`KnMxfp4`, `KnNvfp4`): one `bn/2`-byte × `bk`-row box, row-major.
pub const fn tma_weight_box(c: &TileConfig, b: BLayout) -> Option<TmaBox> {
    if c.wgmma {
        wgmma_tma_box(c.bn, c.bk, b)
    } else {
        None
    }
}

/// [`tma_weight_box`] of a `wgmma` kernel with `bn` output columns and `bk`-deep k-tiles (what
/// the kernel computes from its constants).
pub const fn wgmma_tma_box(bn: u32, bk: u32, b: BLayout) -> Option<TmaBox> {
    if bk != 64 || bn != 128 {
        return None;
    }
    match b {
        BLayout::NkBf16 | BLayout::KnBf16 => Some(TmaBox {
            inner: 64,
            outer: 64,
            elem_bytes: 2,
            swizzle_128: true,
            copies: 2,
            along_inner: matches!(b, BLayout::KnBf16),
        }),
        BLayout::NkMxfp4 | BLayout::NkNvfp4 => Some(TmaBox {
            inner: bk / 2,
            outer: bn,
            elem_bytes: 1,
            swizzle_128: false,
            copies: 1,
            along_inner: false,
        }),
        BLayout::KnMxfp4 | BLayout::KnNvfp4 => Some(TmaBox {
            inner: bn / 2,
            outer: bk,
            elem_bytes: 1,
            swizzle_128: false,
            copies: 1,
            along_inner: true,
        }),
        BLayout::Strided => None,
    }
}

/// Shared-memory plan for config `c`, B layout `b` and padded LoRA rank `r_pad` (0 = no LoRA
/// epilogue).
pub const fn smem_plan(c: &TileConfig, b: BLayout, r_pad: u32) -> SmemPlan {
    let a_stage_bytes = c.bm * c.bk * 2;
    let (b_stage_bytes, b_scales_in_stage) = match b {
        BLayout::NkBf16 | BLayout::KnBf16 | BLayout::Strided => (c.bn * c.bk * 2, 0),
        // Scale bytes arrive by 4-byte `cp.async` from the aligned word holding the first needed
        // byte: 4 bytes per row for the forward (1 needed), 8 per reduction row for dX (4 needed,
        // possibly straddling two words).
        BLayout::NkMxfp4 => {
            let packed = c.bn * c.bk / 2;
            (
                (packed + mx_scale_slot_bytes(c.bk) * c.bn).div_ceil(128) * 128,
                packed,
            )
        }
        BLayout::KnMxfp4 => {
            let packed = c.bk * c.bn / 2;
            ((packed + 8 * c.bk).div_ceil(128) * 128, packed)
        }
        BLayout::NkNvfp4 => {
            let packed = c.bn * c.bk / 2;
            (
                (packed + nv_scale_slot_bytes(c.bk) * c.bn).div_ceil(128) * 128,
                packed,
            )
        }
        BLayout::KnNvfp4 => {
            let packed = c.bk * c.bn / 2;
            (
                (packed + kn_nv_window_bytes(c.bn) * c.bk).div_ceil(128) * 128,
                packed,
            )
        }
    };
    let main = c.stages * (a_stage_bytes + b_stage_bytes);
    let left = c.bm * r_pad * 2;
    // The forward layouts' left factor (XA) comes in two bf16 terms (high and low part).
    let left_lo = if b.is_forward() { left } else { 0 };
    let right = c.bn * r_pad * 2;
    // The LoRA factors have a region of their own (copied while the main loop runs); the
    // `wgmma` output tile reuses the stages, or in a persistent kernel the factors' region.
    let epilogue_bytes = if c.wgmma { c.bm * c.bn * 2 } else { 0 };
    let persistent = persistent_kernel(c);
    let reused = if main > epilogue_bytes || persistent {
        main
    } else {
        epilogue_bytes
    };
    let mut next = reused.div_ceil(128) * 128;
    let decoded_offset = if b.has_decoded_tile() {
        // A `wgmma` reads the decoded tile by a swizzled descriptor, whose swizzle pattern
        // repeats on 1024-byte boundaries of the shared address.
        let decoded = if c.wgmma {
            next.div_ceil(WGMMA_SWIZZLE_ALIGN) * WGMMA_SWIZZLE_ALIGN
        } else {
            next
        };
        // `wgmma` consumers alternate two decoded tiles (one warpgroup may decode the next
        // stage while the other still reads this one).
        next = decoded + c.bk * c.bn * 2 * if c.wgmma { 2 } else { 1 };
        decoded
    } else {
        0
    };
    let lora_left_offset = next;
    let lora_bytes = left + left_lo + right;
    let epilogue_region = if persistent && epilogue_bytes > lora_bytes {
        epilogue_bytes
    } else {
        lora_bytes
    };
    next = (next + epilogue_region).div_ceil(128) * 128;
    let rows_offset = next;
    let rows_end = rows_offset + 8 * c.bm * if persistent { 2 } else { 1 };
    let barriers_offset = if c.wgmma { rows_end.div_ceil(8) * 8 } else { 0 };
    SmemPlan {
        a_stage_bytes,
        b_stage_bytes,
        b_offset: c.stages * a_stage_bytes,
        lora_left_offset,
        lora_left_lo_offset: if left_lo > 0 {
            lora_left_offset + left
        } else {
            0
        },
        lora_right_offset: lora_left_offset + left + left_lo,
        epilogue_bytes,
        out_offset: if persistent { lora_left_offset } else { 0 },
        rows_offset,
        b_scales_in_stage,
        decoded_offset,
        barriers_offset,
        total_bytes: if c.wgmma {
            barriers_offset + 16 * c.stages + 16
        } else {
            rows_end
        },
    }
}

/// The 16-byte-chunk XOR swizzle used by every staged tile: chunk `c` of row `row` (rows of
/// `chunks_per_row` chunks) lives at chunk `c ^ f(row)`, which makes the 8 rows an `ldmatrix`
/// (or `.trans`) reads at one logical chunk hit 8 distinct 16-byte bank groups.
#[inline(always)]
pub const fn swizzle_chunk(row: u32, chunk: u32, chunks_per_row: u32) -> u32 {
    let f = match chunks_per_row {
        0 | 1 => 0,
        2 => (row / 4) % 2,
        4 => (row / 2) % 4,
        _ => row % 8,
    };
    chunk ^ f
}

/// A `wgmma` shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format") for a K-major
/// bf16 tile with 64-element (128-byte) rows in the 128-byte swizzle mode — exactly the layout
/// of [`swizzled_offset`] with `row_elems = 64` (chunk ^= row % 8) on a 1024-byte aligned tile.
/// Fields: bits 0–13 start address >> 4, 16–29 leading byte offset >> 4 (unused by swizzled
/// K-major layouts; 1 by convention), 32–45 stride byte offset >> 4 (1024: the next 8 rows),
/// base offset 0, bits 62–63 layout type 1 (128-byte swizzle). K-step `ks` (16 elements) starts
/// `32·ks` bytes into the rows, i.e. the start field plus `2·ks`.
#[inline(always)]
pub const fn wgmma_desc_sw128(addr: u32) -> u64 {
    (((addr & 0x3_FFFF) >> 4) as u64) | (1u64 << 16) | ((1024u64 >> 4) << 32) | (1u64 << 62)
}

/// A `wgmma` descriptor for an **MN-major** bf16 operand (read with `imm-trans-a = 1`) in the
/// 128-byte swizzle mode: the layout of [`wgmma_mn_offset`], 64 MN elements (128 bytes) per
/// reduction row, rows 128 bytes apart, on a 1024-byte aligned panel. In the PTX ISA's
/// canonical form `((8, 8, m), (8, k)) : ((1, 8, LBO), (64, SBO))` (elements) the stride byte
/// offset is the step between groups of 8 reduction rows (1024 bytes) and the leading byte
/// offset the step between 64-element MN panels. An m64 A operand spans one panel, so that
/// field is never used; it is 1024 too, which makes the descriptor the same whichever of the two
/// fields the hardware takes for which. K-step `ks` (16 rows) starts `2048·ks` bytes further,
/// i.e. the start field plus `128·ks`.
#[inline(always)]
pub const fn wgmma_desc_sw128_mn(addr: u32) -> u64 {
    (((addr & 0x3_FFFF) >> 4) as u64)
        | ((1024u64 >> 4) << 16)
        | ((1024u64 >> 4) << 32)
        | (1u64 << 62)
}

/// Byte offset of element (reduction row `row`, MN column `col`) in an MN-major `wgmma` operand
/// tile of `rows` reduction rows: 64-column panels `[rows][64]` one after another, each in the
/// 128-byte swizzle of [`swizzled_offset`] with 64-element rows, so panel `c` is what
/// [`wgmma_desc_sw128_mn`] names at `c · rows · 128` bytes. With `rows` a multiple of 8 every
/// panel starts on a 1024-byte boundary of a 1024-byte aligned tile.
#[inline(always)]
pub const fn wgmma_mn_offset(row: u32, col: u32, rows: u32) -> u32 {
    (col / 64) * rows * 128 + swizzled_offset(row, col % 64, 64)
}

/// Byte offset of element `(row, col)` (bf16) in a swizzled tile with `row_elems` per row.
#[inline(always)]
pub const fn swizzled_offset(row: u32, col: u32, row_elems: u32) -> u32 {
    let chunks = row_elems / 8;
    let chunk = swizzle_chunk(row, col / 8, chunks);
    row * row_elems * 2 + chunk * 16 + (col % 8) * 2
}

/// The table of compiled grouped-GEMM configurations, the one place they are listed.
///
/// `gemm_configs!(callback)` expands to `callback! { rows }`, each row
/// `suffix => { bm: _, bn: _, bk: _, warps_m: _, warps_n: _, stages: _, wgmma: _ }` (integer and
/// `bool` literals, in this field order). Every list the table implies is generated from these
/// rows by a callback: [`GEMM_CONFIGS`] and [`GEMM_CONFIG_NAMES`] here, the entry-point names
/// and `names::ALL` in `names.rs`, and the entry points in `kernels/gemm.rs`, whose const
/// generics are the row's literals (so an entry's stage count is its row's). The suffix names
/// the row (entries `mxmoe_gemm_{nk,kn,nk_mx,kn_mx}_<suffix>`, the tuner's cache); a `const`
/// assert below fails the build unless it spells the row's numbers ([`suffix_spells`]).
macro_rules! gemm_configs {
    ($callback:ident) => {
        $callback! {
            // Many rows per expert.
            m128n128k32w2x4s3 => { bm: 128, bn: 128, bk: 32, warps_m: 2, warps_n: 4, stages: 3, wgmma: false },
            // Fewer rows per expert.
            m64n128k32w2x2s3 => { bm: 64, bn: 128, bk: 32, warps_m: 2, warps_n: 2, stages: 3, wgmma: false },
            // Few rows per expert: weight-stream bound, narrow M.
            m32n128k32w1x4s4 => { bm: 32, bn: 128, bk: 32, warps_m: 1, warps_n: 4, stages: 4, wgmma: false },
            // Many rows per expert, deeper pipeline.
            m128n128k32w2x4s4 => { bm: 128, bn: 128, bk: 32, warps_m: 2, warps_n: 4, stages: 4, wgmma: false },
            // Fewer rows per expert, deeper pipeline.
            m64n128k32w2x2s4 => { bm: 64, bn: 128, bk: 32, warps_m: 2, warps_n: 2, stages: 4, wgmma: false },
            // About one MMA tile of rows per expert (balanced routing at small T).
            m16n128k32w1x4s4 => { bm: 16, bn: 128, bk: 32, warps_m: 1, warps_n: 4, stages: 4, wgmma: false },
            // 64 rows in one warp row: each warp decodes its MXFP4 columns once for four m16 tiles.
            m64n128k32w1x4s4 => { bm: 64, bn: 128, bk: 32, warps_m: 1, warps_n: 4, stages: 4, wgmma: false },
            // 64-deep K stages (half the barriers per byte streamed).
            m16n128k64w1x4s4 => { bm: 16, bn: 128, bk: 64, warps_m: 1, warps_n: 4, stages: 4, wgmma: false },
            m32n128k64w1x4s3 => { bm: 32, bn: 128, bk: 64, warps_m: 1, warps_n: 4, stages: 3, wgmma: false },
            m64n128k64w2x2s3 => { bm: 64, bn: 128, bk: 64, warps_m: 2, warps_n: 2, stages: 3, wgmma: false },
            // Hopper `wgmma` (two warpgroups × 64 weight columns; the routed rows are the MMA's N).
            m16n128k64wg2s4 => { bm: 16, bn: 128, bk: 64, warps_m: 1, warps_n: 8, stages: 4, wgmma: true },
            m32n128k64wg2s4 => { bm: 32, bn: 128, bk: 64, warps_m: 1, warps_n: 8, stages: 4, wgmma: true },
            m64n128k64wg2s4 => { bm: 64, bn: 128, bk: 64, warps_m: 1, warps_n: 8, stages: 4, wgmma: true },
            m128n128k64wg2s4 => { bm: 128, bn: 128, bk: 64, warps_m: 1, warps_n: 8, stages: 4, wgmma: true },
            m256n128k64wg2s3 => { bm: 256, bn: 128, bk: 64, warps_m: 1, warps_n: 8, stages: 3, wgmma: true },
        }
    };
}
pub(crate) use gemm_configs;

/// `gemm_configs!` callback: the table as [`TileConfig`] values and suffixes, row by row.
macro_rules! define_gemm_configs {
    ($($suffix:ident => {
        bm: $bm:literal, bn: $bn:literal, bk: $bk:literal, warps_m: $wm:literal,
        warps_n: $wn:literal, stages: $st:literal, wgmma: $wg:literal $(,)?
    }),* $(,)?) => {
        /// Grouped-GEMM configurations compiled into the PTX, the rows of `gemm_configs!`:
        /// `names::GEMM_NK[i]` (and the other layouts) are built with `GEMM_CONFIGS[i]`.
        pub const GEMM_CONFIGS: &[TileConfig] = &[$(TileConfig {
            bm: $bm,
            bn: $bn,
            bk: $bk,
            warps_m: $wm,
            warps_n: $wn,
            stages: $st,
            wgmma: $wg,
        }),*];

        /// The name of each row of [`GEMM_CONFIGS`] (the suffix of its entry points, e.g.
        /// `m64n128k32w2x2s4`), in table order.
        pub const GEMM_CONFIG_NAMES: [&str; GEMM_CONFIG_COUNT] = [$(stringify!($suffix)),*];
    };
}
gemm_configs!(define_gemm_configs);

/// Rows of [`GEMM_CONFIGS`].
pub const GEMM_CONFIG_COUNT: usize = GEMM_CONFIGS.len();

// Every row is valid, its suffix spells its numbers (so `m64…s4` cannot name a 3-stage row), and
// no two rows share a name (hence no two rows are equal: the name encodes every field).
const _: () = {
    let mut i = 0;
    while i < GEMM_CONFIG_COUNT {
        assert!(
            GEMM_CONFIGS[i].validate().is_ok(),
            "invalid gemm_configs! row"
        );
        assert!(
            suffix_spells(GEMM_CONFIG_NAMES[i], &GEMM_CONFIGS[i]),
            "a gemm_configs! suffix does not spell its row's numbers"
        );
        let mut j = 0;
        while j < i {
            assert!(
                !bytes_eq(
                    GEMM_CONFIG_NAMES[i].as_bytes(),
                    GEMM_CONFIG_NAMES[j].as_bytes()
                ),
                "two gemm_configs! rows share a suffix"
            );
            j += 1;
        }
        i += 1;
    }
};

/// The row of [`GEMM_CONFIGS`] equal to `c`, if any.
pub const fn gemm_config_index(c: &TileConfig) -> Option<usize> {
    let mut i = 0;
    while i < GEMM_CONFIG_COUNT {
        let r = &GEMM_CONFIGS[i];
        if r.bm == c.bm
            && r.bn == c.bn
            && r.bk == c.bk
            && r.warps_m == c.warps_m
            && r.warps_n == c.warps_n
            && r.stages == c.stages
            && r.wgmma == c.wgmma
        {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether `suffix` is the name of `c`: `m{bm}n{bn}k{bk}w{warps_m}x{warps_n}s{stages}`, or
/// `m{bm}n{bn}k{bk}wg{warpgroups}s{stages}` for a `wgmma` configuration (decimal, no padding).
pub const fn suffix_spells(suffix: &str, c: &TileConfig) -> bool {
    let s = suffix.as_bytes();
    let mut at = 0;
    let mut ok = true;
    (ok, at) = expect_field(s, at, ok, b"m", c.bm);
    (ok, at) = expect_field(s, at, ok, b"n", c.bn);
    (ok, at) = expect_field(s, at, ok, b"k", c.bk);
    if c.wgmma {
        (ok, at) = expect_field(s, at, ok, b"wg", c.warpgroups());
    } else {
        (ok, at) = expect_field(s, at, ok, b"w", c.warps_m);
        (ok, at) = expect_field(s, at, ok, b"x", c.warps_n);
    }
    (ok, at) = expect_field(s, at, ok, b"s", c.stages);
    ok && at == s.len()
}

/// Matches `tag` then the decimal digits of `value` in `s` from byte `at`; returns whether
/// everything so far matched and the position after the field.
const fn expect_field(s: &[u8], at: usize, ok: bool, tag: &[u8], value: u32) -> (bool, usize) {
    if !ok {
        return (false, at);
    }
    let mut at = at;
    let mut i = 0;
    while i < tag.len() {
        if at >= s.len() || s[at] != tag[i] {
            return (false, at);
        }
        at += 1;
        i += 1;
    }
    // The most significant power of ten in `value` (1 for 0).
    let mut pow = 1;
    while value / pow >= 10 {
        pow *= 10;
    }
    while pow > 0 {
        if at >= s.len() || s[at] != b'0' + ((value / pow) % 10) as u8 {
            return (false, at);
        }
        at += 1;
        pow /= 10;
    }
    (true, at)
}

/// Byte-wise equality (`==` on slices is not `const`).
pub(crate) const fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Configuration of the rank-sized products (XA = x·Aᵀ, YB = dY·B): `bn` is the padded rank.
pub const fn lora_down_config(r_pad: u32) -> TileConfig {
    TileConfig {
        bm: 64,
        bn: r_pad,
        bk: 64,
        warps_m: 4,
        warps_n: 1,
        stages: 3,
        wgmma: false,
    }
}

/// Padded ranks with compiled LoRA-product and Gram kernels (`names::LORA_DOWN[i]`,
/// `names::GRAM[i]`).
pub const RANK_PADS: [u32; 4] = [16, 32, 64, 128];

/// Index into [`RANK_PADS`] for a padded rank.
pub const fn rank_pad_index(r_pad: u32) -> Option<usize> {
    match r_pad {
        16 => Some(0),
        32 => Some(1),
        64 => Some(2),
        128 => Some(3),
        _ => None,
    }
}

/// The Gram kernel's tile: `bw` wide columns per block, `bk` rows per stage, `warps` along the
/// wide axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GramConfig {
    /// Wide columns per block.
    pub bw: u32,
    /// Rows per stage.
    pub bk: u32,
    /// Warps per block (all along the wide axis).
    pub warps: u32,
    /// Pipeline stages.
    pub stages: u32,
}

/// The compiled Gram configuration.
pub const GRAM_CONFIG: GramConfig = GramConfig {
    bw: 128,
    bk: 32,
    warps: 4,
    stages: 3,
};

/// Dynamic shared memory of the Gram kernel for padded rank `r_pad`.
pub const fn gram_smem_bytes(c: &GramConfig, r_pad: u32) -> u32 {
    c.stages * (c.bk * c.bw * 2 + c.bk * r_pad * 2)
}

/// Byte offset of the narrow-operand stages in the Gram kernel's shared memory.
pub const fn gram_narrow_offset(c: &GramConfig) -> u32 {
    c.stages * c.bk * c.bw * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_configs_are_valid_and_fit_hopper() {
        for c in GEMM_CONFIGS {
            assert_eq!(c.validate(), Ok(()), "{c:?}");
            for b in crate::shared::names::GEMM_WEIGHT_LAYOUTS {
                for r in [0, 16, 64, 128] {
                    let p = smem_plan(c, b, r);
                    // Every row fits up to rank 16 (the 128-row rows at every rank); from rank
                    // 64 the 256-row row's LoRA factors and output tile may take too much (the
                    // tuner prunes it there).
                    assert!(
                        p.total_bytes <= 227 * 1024 || (c.bm == 256 && r >= 64),
                        "{c:?} {b:?} r={r}: {p:?}"
                    );
                    assert!(
                        p.b_offset.is_multiple_of(128) && p.lora_right_offset.is_multiple_of(16)
                    );
                    assert!(
                        p.decoded_offset.is_multiple_of(128) && p.rows_offset.is_multiple_of(128)
                    );
                    // Regions are disjoint: the decoded tile sits past the reused main/epilogue bytes.
                    let reused =
                        if p.epilogue_bytes > c.stages * (p.a_stage_bytes + p.b_stage_bytes) {
                            p.epilogue_bytes
                        } else {
                            c.stages * (p.a_stage_bytes + p.b_stage_bytes)
                        };
                    assert!(p.rows_offset >= reused);
                    if b.has_decoded_tile() {
                        let tiles = if c.wgmma { 2 } else { 1 };
                        assert!(
                            p.decoded_offset >= reused
                                && p.rows_offset >= p.decoded_offset + tiles * c.bk * c.bn * 2
                        );
                    }
                    if c.wgmma {
                        let row_buffers = if persistent_kernel(c) { 2 } else { 1 };
                        assert!(
                            p.barriers_offset >= p.rows_offset + 8 * c.bm * row_buffers
                                && p.barriers_offset.is_multiple_of(8)
                                && p.total_bytes == p.barriers_offset + 16 * c.stages + 16
                        );
                    }
                    if persistent_kernel(c) {
                        // The output tile shares the LoRA factors' region, past the stages.
                        assert_eq!(p.out_offset, p.lora_left_offset);
                        assert!(p.out_offset >= c.stages * (p.a_stage_bytes + p.b_stage_bytes));
                        assert!(p.rows_offset >= p.out_offset + p.epilogue_bytes);
                        assert!(p.out_offset.is_multiple_of(128));
                    } else {
                        assert_eq!(p.out_offset, 0);
                    }
                    if b.is_fp4() {
                        assert!(c.bk == 32 || c.bk == 64);
                        // The scale bytes (and, for dX over NVFP4, the 4-byte tensor scales)
                        // fit between the packed bytes and the end of the stage.
                        let packed = c.bn * c.bk / 2;
                        let scales = match b {
                            BLayout::NkMxfp4 => mx_scale_slot_bytes(c.bk) * c.bn,
                            BLayout::KnMxfp4 => 8 * c.bk,
                            BLayout::NkNvfp4 => nv_scale_slot_bytes(c.bk) * c.bn,
                            _ => kn_nv_window_bytes(c.bn) * c.bk,
                        };
                        assert!(
                            p.b_scales_in_stage == packed
                                && packed + scales <= p.b_stage_bytes
                                && p.b_stage_bytes.is_multiple_of(128)
                        );
                    }
                }
            }
        }
        for r in [16, 32, 64, 128] {
            assert_eq!(lora_down_config(r).validate(), Ok(()), "r_pad {r}");
        }
    }

    #[test]
    fn suffixes_spell_exactly_their_rows_numbers() {
        for (i, c) in GEMM_CONFIGS.iter().enumerate() {
            assert!(suffix_spells(GEMM_CONFIG_NAMES[i], c), "{c:?}");
            assert_eq!(gemm_config_index(c), Some(i));
        }
        let c = GEMM_CONFIGS[0]; // m128n128k32w2x4s3
        assert!(suffix_spells("m128n128k32w2x4s3", &c));
        for wrong in [
            "m128n128k32w2x4s4",
            "m128n128k32w2x4s",
            "m128n128k32w2x4s30",
            "m128n128k32w2x4s3x",
            "m128n128k32wg2s3",
            "m0128n128k32w2x4s3",
            "",
        ] {
            assert!(!suffix_spells(wrong, &c), "{wrong}");
        }
        let wg = TileConfig {
            bm: 64,
            bn: 128,
            bk: 64,
            warps_m: 1,
            warps_n: 8,
            stages: 4,
            wgmma: true,
        };
        assert!(suffix_spells("m64n128k64wg2s4", &wg));
        assert!(!suffix_spells("m64n128k64w1x8s4", &wg));
        assert_eq!(gemm_config_index(&TileConfig { stages: 5, ..wg }), None);
    }

    #[test]
    fn swizzle_spreads_ldmatrix_rows_over_all_bank_groups() {
        for chunks in [2u32, 4, 8, 16] {
            for c in 0..chunks {
                for base in (0..32).step_by(8) {
                    let mut groups = [false; 8];
                    for r in base..base + 8 {
                        let phys = swizzle_chunk(r, c, chunks);
                        assert!(phys < chunks);
                        let byte = r * chunks * 16 + phys * 16;
                        groups[((byte / 16) % 8) as usize] = true;
                    }
                    assert!(groups.iter().all(|&g| g), "chunks/row {chunks}, chunk {c}");
                }
            }
        }
    }

    #[test]
    fn wgmma_descriptor_matches_the_128_byte_swizzle() {
        // The hardware's 128-byte swizzle XORs address bits 4–6 with bits 7–9 inside each
        // 1024-byte atom; `swizzled_offset` with 64-element rows must be that permutation.
        for row in 0..32u32 {
            for col in (0..64u32).step_by(8) {
                let plain = row * 128 + col * 2;
                let hw = plain ^ (((plain >> 7) & 7) << 4);
                assert_eq!(swizzled_offset(row, col, 64), hw, "row {row} col {col}");
            }
        }
        let d = wgmma_desc_sw128(0x1_2400);
        assert_eq!(d & 0x3FFF, 0x1240);
        assert_eq!((d >> 16) & 0x3FFF, 1);
        assert_eq!((d >> 32) & 0x3FFF, 64);
        assert_eq!(d >> 62, 1);
        assert_eq!((d >> 46) & 0xFFFF, 0);
    }

    /// The shared-memory address a `wgmma` reads for element (m, k) of a bf16 operand named by
    /// `desc`, after the PTX ISA's canonical layouts for the 128-byte swizzle ("Shared Memory
    /// Matrix Layout": K-major `((8, m), (8, 2k)) : ((64, SBO), (1, 8))`, MN-major
    /// `((8, 8, m), (8, k)) : ((1, 8, LBO), (64, SBO))`, in elements), then the swizzle, which
    /// XORs address bits 4–6 with bits 7–9. `swap` reads LBO for SBO and back.
    fn wgmma_reads(desc: u64, mn_major: bool, swap: bool, m: u32, k: u32) -> u32 {
        assert_eq!(desc >> 62, 1, "128-byte swizzle");
        let start = ((desc & 0x3FFF) << 4) as u32;
        let (mut lbo, mut sbo) = (
            (((desc >> 16) & 0x3FFF) << 4) as u32,
            (((desc >> 32) & 0x3FFF) << 4) as u32,
        );
        if swap {
            core::mem::swap(&mut lbo, &mut sbo);
        }
        let plain = if mn_major {
            start + 2 * (m % 64) + (m / 64) * lbo + 128 * (k % 8) + (k / 8) * sbo
        } else {
            assert!(k < 64);
            start + 128 * (m % 8) + (m / 8) * sbo + 2 * k
        };
        plain ^ (((plain >> 7) & 7) << 4)
    }

    #[test]
    fn wgmma_operands_read_the_staged_tiles() {
        let base = 0x2_0000; // a 1024-byte aligned stage
        // Every m64 × k16 A operand of a k-tile of 64, for both warpgroups (c): the forward
        // weights `[128 n][64 k]` (K-major, `swizzled_offset`; the same layout the activation B
        // operand has run with since the first `wgmma` kernel), and the dX weights or decoded
        // tile `[64 k][128 n]` as two MN-major panels (`wgmma_mn_offset`).
        for c in 0..2u32 {
            for ks in 0..4u32 {
                let k_major = wgmma_desc_sw128(base + 8192 * c) + 2 * ks as u64;
                let mn_major = wgmma_desc_sw128_mn(base + 8192 * c) + 128 * ks as u64;
                for m in 0..64u32 {
                    for kk in 0..16u32 {
                        let (n, k) = (64 * c + m, 16 * ks + kk);
                        assert_eq!(
                            wgmma_reads(k_major, false, false, m, kk),
                            base + swizzled_offset(n, k, 64),
                            "K-major c {c} ks {ks} m {m} k {kk}"
                        );
                        for swap in [false, true] {
                            assert_eq!(
                                wgmma_reads(mn_major, true, swap, m, kk),
                                base + wgmma_mn_offset(k, n, 64),
                                "MN-major c {c} ks {ks} m {m} k {kk} swap {swap}"
                            );
                        }
                    }
                }
            }
        }
        // Each panel is the 64-element-row swizzled tile, the panels back to back.
        for row in 0..64u32 {
            for col in 0..128u32 {
                let want = (col / 64) * 8192 + swizzled_offset(row, col % 64, 64);
                assert_eq!(wgmma_mn_offset(row, col, 64), want);
            }
        }
        let d = wgmma_desc_sw128_mn(0x1_2400);
        assert_eq!(d & 0x3FFF, 0x1240);
        assert_eq!((d >> 16) & 0x3FFF, 64);
        assert_eq!((d >> 32) & 0x3FFF, 64);
        assert_eq!(d >> 62, 1);
    }

    #[test]
    fn every_tile_a_wgmma_descriptor_names_is_1024_byte_aligned() {
        for c in GEMM_CONFIGS.iter().filter(|c| c.wgmma) {
            for b in crate::shared::names::GEMM_WEIGHT_LAYOUTS {
                for r_pad in [0, 16, 32, 64, 128] {
                    let plan = smem_plan(c, b, r_pad);
                    for slot in 0..c.stages {
                        // Activation stages (B operand), and the bf16 weight stages (A operand:
                        // K-major forward, MN-major panels for dX, each panel 64·BK·2 bytes).
                        assert_eq!(
                            (slot * plan.a_stage_bytes) % WGMMA_SWIZZLE_ALIGN,
                            0,
                            "{c:?} {b:?}"
                        );
                        if matches!(b, BLayout::NkBf16 | BLayout::KnBf16) {
                            let stage = plan.b_offset + slot * plan.b_stage_bytes;
                            assert_eq!(stage % WGMMA_SWIZZLE_ALIGN, 0, "{c:?} {b:?}");
                            assert_eq!((64 * c.bk * 2) % WGMMA_SWIZZLE_ALIGN, 0);
                        }
                    }
                    if b.has_decoded_tile() {
                        for tile in 0..2 {
                            let at = plan.decoded_offset + tile * c.bk * c.bn * 2;
                            assert_eq!(at % WGMMA_SWIZZLE_ALIGN, 0, "{c:?} {b:?} r {r_pad}");
                            assert_eq!(wgmma_mn_offset(0, 64, c.bk) % WGMMA_SWIZZLE_ALIGN, 0);
                        }
                    }
                }
            }
        }
    }

    /// Where TMA puts element `(r, i)` of a box (`inner` map elements per row): row-major, and in
    /// the 128-byte swizzle 16-byte chunk `c` of row `r` at chunk `c ^ (r % 8)` (CUDA Driver API,
    /// `CU_TENSOR_MAP_SWIZZLE_128B`, on a 1024-byte aligned destination).
    fn tma_box_offset(t: &TmaBox, r: u32, i: u32) -> u32 {
        let row_bytes = t.inner * t.elem_bytes;
        let b = i * t.elem_bytes;
        if t.swizzle_128 {
            assert_eq!(row_bytes, 128);
            r * row_bytes + ((b / 16) ^ (r % 8)) * 16 + b % 16
        } else {
            r * row_bytes + b
        }
    }

    #[test]
    fn tma_boxes_write_the_cp_async_stage_layouts() {
        let mut seen = 0;
        for c in GEMM_CONFIGS.iter() {
            for b in crate::shared::names::GEMM_WEIGHT_LAYOUTS {
                let Some(t) = tma_weight_box(c, b) else {
                    assert!(
                        !c.wgmma,
                        "{c:?} {b:?}: every wgmma row has a TMA weight path"
                    );
                    continue;
                };
                seen += 1;
                let plan = smem_plan(c, b, 16);
                // The copies fill the stage's weight bytes exactly (the scale bytes follow).
                let weight_bytes = if b.is_fp4() {
                    c.bn * c.bk / 2
                } else {
                    c.bn * c.bk * 2
                };
                assert_eq!(t.stage_bytes(), weight_bytes, "{c:?} {b:?}");
                let align = if t.swizzle_128 {
                    WGMMA_SWIZZLE_ALIGN
                } else {
                    128
                };
                for slot in 0..c.stages {
                    let at = plan.b_offset + slot * plan.b_stage_bytes;
                    assert_eq!(at % align, 0, "{c:?} {b:?} slot {slot}");
                }
                assert_eq!(t.box_bytes() % align, 0);
                let mut covered = vec![false; weight_bytes as usize];
                for h in 0..t.copies {
                    let (c0, c1, _) = t.coords(c.bk, 0, 0, 0, h);
                    for r in 0..t.outer {
                        for i in 0..t.inner {
                            // Map element (c0 + i, c1 + r): contiguous index, row.
                            let (d0, d1) = (c0 as u32 + i, c1 as u32 + r);
                            let tma = h * t.box_bytes() + tma_box_offset(&t, r, i);
                            // The producer's `cp.async` layout of the same weight element.
                            let want = match b {
                                BLayout::NkBf16 => swizzled_offset(d1, d0, c.bk),
                                BLayout::KnBf16 => wgmma_mn_offset(d1, d0, c.bk),
                                BLayout::NkMxfp4 | BLayout::NkNvfp4 => d1 * (c.bk / 2) + d0,
                                _ => d1 * (c.bn / 2) + d0,
                            };
                            assert_eq!(tma, want, "{c:?} {b:?} copy {h} ({r}, {i})");
                            for byte in 0..t.elem_bytes {
                                let k = (tma + byte) as usize;
                                assert!(!covered[k], "{c:?} {b:?}: byte {k} written twice");
                                covered[k] = true;
                            }
                        }
                    }
                }
                assert!(covered.iter().all(|&x| x), "{c:?} {b:?}");
                // Later k-tiles, column tiles and experts shift the coordinates only.
                let (kt, n0, e) = (3, 256, 5);
                for h in 0..t.copies {
                    let got = t.coords(c.bk, kt, n0, e, h);
                    let want = match b {
                        BLayout::NkBf16 => (3 * 64, 256 + 64 * h as i32, 5),
                        BLayout::KnBf16 => (256 + 64 * h as i32, 3 * 64, 5),
                        BLayout::NkMxfp4 | BLayout::NkNvfp4 => (3 * 32, 256, 5),
                        _ => (128, 3 * 64, 5),
                    };
                    assert_eq!(got, want, "{c:?} {b:?} copy {h}");
                }
            }
        }
        assert_eq!(seen, 6 * GEMM_CONFIGS.iter().filter(|c| c.wgmma).count());
    }

    #[test]
    fn layout_tags_round_trip() {
        for b in [
            BLayout::NkBf16,
            BLayout::KnBf16,
            BLayout::Strided,
            BLayout::NkMxfp4,
            BLayout::KnMxfp4,
            BLayout::NkNvfp4,
            BLayout::KnNvfp4,
        ] {
            assert_eq!(BLayout::from_tag(b as u8), b);
        }
        assert_eq!(nv_scale_slot_bytes(32), 8);
        assert_eq!(nv_scale_slot_bytes(64), 8);
        assert_eq!(kn_nv_window_bytes(128), 16);
    }

    #[test]
    fn rank_pad_rounds_to_sixteen() {
        assert_eq!(rank_pad(0), 16);
        assert_eq!(rank_pad(1), 16);
        assert_eq!(rank_pad(16), 16);
        assert_eq!(rank_pad(17), 32);
        assert_eq!(rank_pad(64), 64);
    }
}
