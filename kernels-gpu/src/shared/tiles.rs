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
}

impl BLayout {
    /// Whether the operand is MXFP4.
    pub const fn is_mx(self) -> bool {
        matches!(self, BLayout::NkMxfp4 | BLayout::KnMxfp4)
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
}

/// Why a configuration is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileError {
    /// The warp tile is not a whole number of m16 × n16 MMA pairs.
    WarpTile,
    /// `bk` is not a multiple of 32 (one scale block) or exceeds 64.
    Bk,
    /// Fewer than two stages, or more than four.
    Stages,
    /// The loaders need the stage to split evenly over the block's threads.
    LoaderSplit,
}

impl TileConfig {
    /// Warps per block.
    pub const fn warps(&self) -> u32 {
        self.warps_m * self.warps_n
    }

    /// Threads per block.
    pub const fn threads(&self) -> u32 {
        32 * self.warps()
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
        if self.stages < 2 || self.stages > 4 {
            return Err(TileError::Stages);
        }
        // Each thread moves whole 16-byte chunks of both bf16 operand tiles.
        let chunks_a = self.bm * self.bk / 8;
        let chunks_b = self.bn * self.bk / 8;
        if !chunks_a.is_multiple_of(self.threads()) && !self.threads().is_multiple_of(chunks_a) {
            return Err(TileError::LoaderSplit);
        }
        if !chunks_b.is_multiple_of(self.threads()) && !self.threads().is_multiple_of(chunks_b) {
            return Err(TileError::LoaderSplit);
        }
        Ok(())
    }

    /// Short name used in entry-point names, e.g. `m128n128k32w2x4s3`.
    pub const fn tag(&self) -> (u32, u32, u32, u32, u32, u32) {
        (
            self.bm,
            self.bn,
            self.bk,
            self.warps_m,
            self.warps_n,
            self.stages,
        )
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
    /// Offset of the epilogue's right LoRA factor (the left one starts at 0).
    pub lora_right_offset: u32,
    /// Bytes of the epilogue's two LoRA factors.
    pub epilogue_bytes: u32,
    /// Offset of the per-tile-row index arrays (`bm` input rows, then `bm` output rows, u32).
    pub rows_offset: u32,
    /// Offset of the scale bytes inside one B stage (MXFP4 layouts).
    pub b_scales_in_stage: u32,
    /// Offset of the decoded bf16 `[bk][bn]` tile (`KnMxfp4`; 0 otherwise).
    pub decoded_offset: u32,
    /// Total bytes to request at launch.
    pub total_bytes: u32,
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
    };
    let main = c.stages * (a_stage_bytes + b_stage_bytes);
    let left = c.bm * r_pad * 2;
    let right = c.bn * r_pad * 2;
    let epilogue_bytes = left + right;
    let reused = if main > epilogue_bytes {
        main
    } else {
        epilogue_bytes
    };
    let mut next = reused.div_ceil(128) * 128;
    let decoded_offset = match b {
        BLayout::KnMxfp4 => {
            let decoded = next;
            next = decoded + c.bk * c.bn * 2;
            decoded
        }
        _ => 0,
    };
    let rows_offset = next;
    SmemPlan {
        a_stage_bytes,
        b_stage_bytes,
        b_offset: c.stages * a_stage_bytes,
        lora_right_offset: left,
        epilogue_bytes,
        rows_offset,
        b_scales_in_stage,
        decoded_offset,
        total_bytes: rows_offset + 8 * c.bm,
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

/// Byte offset of element `(row, col)` (bf16) in a swizzled tile with `row_elems` per row.
#[inline(always)]
pub const fn swizzled_offset(row: u32, col: u32, row_elems: u32) -> u32 {
    let chunks = row_elems / 8;
    let chunk = swizzle_chunk(row, col / 8, chunks);
    row * row_elems * 2 + chunk * 16 + (col % 8) * 2
}

/// Grouped-GEMM configurations compiled into the PTX (`names::GEMM_NK[i]` and
/// `names::GEMM_KN[i]` are built with `GEMM_CONFIGS[i]`).
pub const GEMM_CONFIGS: &[TileConfig] = &[
    // Many rows per expert.
    TileConfig {
        bm: 128,
        bn: 128,
        bk: 32,
        warps_m: 2,
        warps_n: 4,
        stages: 3,
    },
    // Fewer rows per expert.
    TileConfig {
        bm: 64,
        bn: 128,
        bk: 32,
        warps_m: 2,
        warps_n: 2,
        stages: 3,
    },
    // Few rows per expert: weight-stream bound, narrow M.
    TileConfig {
        bm: 32,
        bn: 128,
        bk: 32,
        warps_m: 1,
        warps_n: 4,
        stages: 4,
    },
    // Many rows per expert, deeper pipeline.
    TileConfig {
        bm: 128,
        bn: 128,
        bk: 32,
        warps_m: 2,
        warps_n: 4,
        stages: 4,
    },
    // Fewer rows per expert, deeper pipeline.
    TileConfig {
        bm: 64,
        bn: 128,
        bk: 32,
        warps_m: 2,
        warps_n: 2,
        stages: 4,
    },
    // About one MMA tile of rows per expert (balanced routing at small T).
    TileConfig {
        bm: 16,
        bn: 128,
        bk: 32,
        warps_m: 1,
        warps_n: 4,
        stages: 4,
    },
    // 64 rows in one warp row: each warp decodes its MXFP4 columns once for four m16 tiles.
    TileConfig {
        bm: 64,
        bn: 128,
        bk: 32,
        warps_m: 1,
        warps_n: 4,
        stages: 4,
    },
    // 64-deep K stages (half the barriers per byte streamed).
    TileConfig {
        bm: 16,
        bn: 128,
        bk: 64,
        warps_m: 1,
        warps_n: 4,
        stages: 4,
    },
    TileConfig {
        bm: 32,
        bn: 128,
        bk: 64,
        warps_m: 1,
        warps_n: 4,
        stages: 3,
    },
    TileConfig {
        bm: 64,
        bn: 128,
        bk: 64,
        warps_m: 2,
        warps_n: 2,
        stages: 3,
    },
];

/// Configuration of the rank-sized products (XA = x·Aᵀ, YB = dY·B): `bn` is the padded rank.
pub const fn lora_down_config(r_pad: u32) -> TileConfig {
    TileConfig {
        bm: 64,
        bn: r_pad,
        bk: 64,
        warps_m: 4,
        warps_n: 1,
        stages: 3,
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
            for b in [
                BLayout::NkBf16,
                BLayout::KnBf16,
                BLayout::NkMxfp4,
                BLayout::KnMxfp4,
            ] {
                for r in [0, 16, 64, 128] {
                    let p = smem_plan(c, b, r);
                    assert!(p.total_bytes <= 227 * 1024, "{c:?} {b:?} r={r}: {p:?}");
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
                    if b == BLayout::KnMxfp4 {
                        assert!(
                            p.decoded_offset >= reused
                                && p.rows_offset >= p.decoded_offset + c.bk * c.bn * 2
                        );
                    }
                    if b.is_mx() {
                        assert!(c.bk == 32 || c.bk == 64);
                    }
                }
            }
        }
        for r in [16, 32, 64, 128] {
            assert_eq!(lora_down_config(r).validate(), Ok(()), "r_pad {r}");
        }
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
    fn rank_pad_rounds_to_sixteen() {
        assert_eq!(rank_pad(0), 16);
        assert_eq!(rank_pad(1), 16);
        assert_eq!(rank_pad(16), 16);
        assert_eq!(rank_pad(17), 32);
        assert_eq!(rank_pad(64), 64);
    }
}
