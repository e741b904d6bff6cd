//! The deliberate defects of `cargo xtask mutants` (issue #13: a test that can't fail is a
//! defect). Each is a set of exact source replacements in `kernels-gpu/src`, applied to a scratch
//! copy only; every `old` snippet must occur exactly once in its file when the edits before it
//! have been applied (a unit test checks this against the current sources, so a refactor that
//! silently disarms a mutant fails `cargo xtask test`).
//!
//! A defect in a GEMM body goes into both families (`tile/gemm.rs`, `mma.sync`, and `tile/wg.rs`,
//! `wgmma`): the default tile rule picks either. Helpers that both families share
//! (`stage_row_indices`, `axpy4`, `decode_stage_kn_mx`, `decode_stage_kn_nv`, `nv_block_fold`,
//! `nv_row_tensor_scale`) are mutated once.
//!
//! Keep the table in ARCHITECTURE.md ("Testing", mutation run) in step with this list.

/// One exact replacement: `old` must occur exactly once in `file` (relative to the workspace
/// root) and becomes `new`.
#[derive(Debug)]
pub struct Edit {
    /// The file, relative to the workspace root.
    pub file: &'static str,
    /// The exact text to replace (whitespace included).
    pub old: &'static str,
    /// Its replacement.
    pub new: &'static str,
}

/// One deliberate defect.
#[derive(Debug)]
pub struct Mutant {
    /// Short id (lower-case letters, digits and `-`), used as the file name of its PTX.
    pub id: &'static str,
    /// The suite expected to catch it (the one that did in its latest run): `run-mutants.sh`
    /// runs it first, so a caught mutant costs one suite.
    pub suite: &'static str,
    /// One line: what is broken.
    pub description: &'static str,
    /// The replacements, applied in order.
    pub edits: &'static [Edit],
}

const GEMM: &str = "kernels-gpu/src/tile/gemm.rs";
const WG: &str = "kernels-gpu/src/tile/wg.rs";
const ENTRIES: &str = "kernels-gpu/src/kernels/gemm.rs";
const MXFP4: &str = "kernels-gpu/src/shared/mxfp4.rs";
const ROUTING: &str = "kernels-gpu/src/kernels/routing.rs";
const ELTWISE: &str = "kernels-gpu/src/kernels/eltwise.rs";
const GRAM: &str = "kernels-gpu/src/tile/gram.rs";
const GLU: &str = "kernels-gpu/src/shared/glu.rs";
const WALK: &str = "kernels-gpu/src/shared/walk.rs";

/// Every mutant, in the order the runner tries them.
pub const MUTANTS: &[Mutant] = &[
    Mutant {
        id: "lora-skip-fwd",
        suite: "gpu_linear",
        description: "LoRA epilogue skipped in the forward GEMM ([n][k] weight layouts: bf16, MXFP4, NVFP4), both families",
        edits: &[
            Edit {
                file: GEMM,
                old: "        if p.rank > 0 {
            // SAFETY: all threads, uniform branch; regions from the plan.",
                new: "        if p.rank > 0 && !BLayout::from_tag(LAYOUT).is_forward() {
            // SAFETY: all threads, uniform branch; regions from the plan.",
            },
            Edit {
                file: WG,
                old: "            if p.rank > 0 {
                let lora = LoraTiles {",
                new: "            if p.rank > 0 && !BLayout::from_tag(LAYOUT).is_forward() {
                let lora = LoraTiles {",
            },
        ],
    },
    Mutant {
        id: "lora-skip-dx",
        suite: "gpu_linear",
        description: "LoRA epilogue skipped in the dX GEMM ([k][n] weight layouts: bf16, MXFP4, NVFP4), both families",
        edits: &[
            Edit {
                file: GEMM,
                old: "        if p.rank > 0 {
            // SAFETY: all threads, uniform branch; regions from the plan.",
                new: "        if p.rank > 0 && !(LAYOUT == BLayout::KnBf16 as u8 || BLayout::from_tag(LAYOUT).has_decoded_tile()) {
            // SAFETY: all threads, uniform branch; regions from the plan.",
            },
            Edit {
                file: WG,
                old: "            if p.rank > 0 {
                let lora = LoraTiles {",
                new: "            if p.rank > 0 && !(LAYOUT == BLayout::KnBf16 as u8 || BLayout::from_tag(LAYOUT).has_decoded_tile()) {
                let lora = LoraTiles {",
            },
        ],
    },
    Mutant {
        id: "lora-scale-2pct",
        suite: "gpu_linear",
        description: "LoRA term scaled by 1.02·s instead of s in the GEMM epilogue (shared axpy4), forward and dX, both families",
        edits: &[Edit {
            file: GEMM,
            old: "    acc[0] += s * t[0];",
            new: "    let s = s * 1.02;
    acc[0] += s * t[0];",
        }],
    },
    Mutant {
        id: "nibble-swap",
        suite: "gpu_mxfp4",
        description: "MXFP4 nibble order swapped (odd k read from the low nibble) in every device decode: fused K-loop of both families and the dequant kernel",
        edits: &[
            Edit {
                file: MXFP4,
                old: "    (b.wrapping_mul(0x0004_0040) & 0x01C0_01C0) | (b.wrapping_mul(0x0100_1000) & 0x8000_8000)",
                new: "    let b = ((b & 0x0F) << 4) | ((b >> 4) & 0x0F);
    (b.wrapping_mul(0x0004_0040) & 0x01C0_01C0) | (b.wrapping_mul(0x0100_1000) & 0x8000_8000)",
            },
            Edit {
                file: MXFP4,
                old: "(byte & 0x0F, byte >> 4)",
                new: "(byte >> 4, byte & 0x0F)",
            },
        ],
    },
    Mutant {
        id: "e8m0-one-scale-off",
        suite: "gpu_mxfp4",
        description: "one E8M0 scale off by one: the tensor's first scale byte (expert 0, row 0, block 0) decodes as 2^(b-126) in the fused decode (forward of both families, dX), edited where the byte is read so the one-product and two-product paths both see it",
        edits: &[
            Edit {
                file: GEMM,
                old: "sc[ni] = ld_shared_u8(b_tile.offset(scales_in_stage + slot * row + byte)) as u32;",
                new: "sc[ni] = ld_shared_u8(b_tile.offset(scales_in_stage + slot * row + byte)) as u32 + (g0.wrapping_add(row.wrapping_mul(blocks_k)).wrapping_add(q) == 0) as u32;",
            },
            Edit {
                file: GEMM,
                old: "ld_shared_u8(raw.offset(scales_in_stage + 8 * r + first + c / 2)),",
                new: "ld_shared_u8(raw.offset(scales_in_stage + 8 * r + first + c / 2)).wrapping_add((g0.wrapping_add(r.wrapping_mul(blocks_k)).wrapping_add(c / 2) == 0) as u32),",
            },
            Edit {
                file: WG,
                old: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * lo + first_lo + q as u32)),",
                new: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * lo + first_lo + q as u32)).wrapping_add((g0.wrapping_add(lo.wrapping_mul(blocks_k)).wrapping_add(q as u32) == 0) as u32),",
            },
        ],
    },
    Mutant {
        id: "mx-two-step-one-product",
        suite: "gpu_mxfp4",
        description: "the two-product MXFP4 decode drops its second product: scale bytes above 128 decode 2^(b-127) times too small (the wgmma forward, dX of both families, and an mma.sync forward warp with such a byte)",
        edits: &[Edit {
            file: GEMM,
            old: "    if scale.two_step {\n        mul_rn_bf16x2(v, scale.second)\n    } else {\n        v\n    }",
            new: "    v",
        }],
    },
    Mutant {
        id: "mx-one-product-always",
        suite: "gpu_mxfp4",
        description: "the mma.sync forward MXFP4 decode takes the one-product path without the warp vote, also for scale bytes above 128: such blocks get a garbage multiplier",
        edits: &[Edit {
            file: GEMM,
            old: "if unsafe { vote_sync_all(most <= SINGLE_STEP_MAX) } {",
            new: "if unsafe { vote_sync_all(most <= SINGLE_STEP_MAX || most > SINGLE_STEP_MAX) } {",
        }],
    },
    Mutant {
        id: "mx-dx-one-product-always",
        suite: "gpu_mxfp4",
        description: "the dX MXFP4 decode of the 16- and 32-row wgmma tiles takes the one-product path without the warp vote, also for scale bytes above 128: such items get a garbage multiplier",
        edits: &[Edit {
            file: GEMM,
            old: "if one_product && unsafe { vote_sync_all(sc as u32 <= SINGLE_STEP_MAX) } {",
            new: "if one_product && unsafe { vote_sync_all(sc as u32 <= SINGLE_STEP_MAX || sc as u32 > SINGLE_STEP_MAX) } {",
        }],
    },
    Mutant {
        id: "nv-tensor-scale-ignored",
        suite: "gpu_nvfp4",
        description: "the NVFP4 decode drops the per-tensor scale (block factor = the E4M3 value alone): forward of both families, dX and the dequantization kernel (shared block fold)",
        edits: &[Edit {
            file: GEMM,
            old: "nv_fold(ts * e4m3_to_f32_placed(sc as u8))",
            new: "nv_fold({ let _ = ts; e4m3_to_f32_placed(sc as u8) })",
        }],
    },
    Mutant {
        id: "nv-tensor-scale-group-zero",
        suite: "gpu_nvfp4",
        description: "the fused NVFP4 kernels read every row's tensor scale from its expert's first group (forward registers and dX staging)",
        edits: &[
            Edit {
                file: GEMM,
                old: "unsafe { load::<f32>(p.tensor_scales_addr + 4 * (e * groups + (row / rpg) as u64)) }",
                new: "unsafe { load::<f32>(p.tensor_scales_addr + 4 * (e * groups + (row / rpg / rpg.max(row + 1)) as u64)) }",
            },
            Edit {
                file: GEMM,
                old: "let src = p.tensor_scales_addr + 4 * (e * groups + (row / rpg) as u64);",
                new: "let src = p.tensor_scales_addr + 4 * (e * groups + (row / rpg / rpg.max(row + 1)) as u64);",
            },
        ],
    },
    Mutant {
        id: "nv-scale-blocks-swapped",
        suite: "gpu_nvfp4",
        description: "the fused NVFP4 decode reads the E4M3 byte of the neighbouring 16-k block (pairs swapped): forward of both families and dX",
        edits: &[
            Edit {
                file: GEMM,
                old: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * row + first + block))",
                new: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * row + first + (block ^ 1)))",
            },
            Edit {
                file: GEMM,
                old: "ld_shared_u8(win.offset(4 + first + c)),",
                new: "ld_shared_u8(win.offset(4 + first + (c ^ 1))),",
            },
            Edit {
                file: WG,
                old: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * lo + first_lo + block)),",
                new: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * lo + first_lo + (block ^ 1))),",
            },
            Edit {
                file: WG,
                old: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * hi + first_hi + block)),",
                new: "ld_shared_u8(b_tile.offset(scales_in_stage + slot * hi + first_hi + (block ^ 1))),",
            },
        ],
    },
    Mutant {
        id: "dx-panel-swapped-wg",
        suite: "gpu_linear",
        description: "dX in the wgmma family reads the other warpgroup's MN-major weight panel (bf16 stage and decoded MXFP4/NVFP4 tile)",
        edits: &[
            Edit {
                file: WG,
                old: "let desc_a = wgmma_desc_sw128_mn(b_tile.offset(wgmma_mn_offset(0, 64 * wg, BK)).raw());",
                new: "let desc_a = wgmma_desc_sw128_mn(b_tile.offset(wgmma_mn_offset(0, 64 * (wg ^ 1), BK)).raw());",
            },
            Edit {
                file: WG,
                old: "let panel = decoded(kt).offset(wgmma_mn_offset(0, 64 * wg, BK));",
                new: "let panel = decoded(kt).offset(wgmma_mn_offset(0, 64 * (wg ^ 1), BK));",
            },
        ],
    },
    Mutant {
        id: "tma-odd-ktile-stale",
        suite: "gpu_linear",
        description: "the wgmma producer's TMA copies of an odd k-tile read the even k-tile before it (weight tiles of every layout; the cp.async path is intact)",
        edits: &[Edit {
            file: WG,
            old: "t.coords(BK, kt, n0, e as u32, h)",
            new: "t.coords(BK, kt & !1, n0, e as u32, h)",
        }],
    },
    Mutant {
        id: "tma-rows-shifted",
        suite: "gpu_configs",
        description: "the wgmma producer's TMA copy of grouped activation rows starts one row late (every row of the stage holds the next row's values; the cp.async path is intact)",
        edits: &[Edit {
            file: WG,
            old: "((kt * BK) as i32, x.src[0] as i32, 0),",
            new: "((kt * BK) as i32, x.src[0] as i32 + 1, 0),",
        }],
    },
    Mutant {
        id: "wide-pair-chunk-repeated",
        suite: "gpu_mxfp4",
        description: "the 256-row wgmma row's producer copies each activation chunk pair's first 16 bytes twice (the second chunk of every pair holds the first's 8 values)",
        edits: &[Edit {
            file: WG,
            old: "if go { src + 16 } else { fallback }",
            new: "if go { src } else { fallback }",
        }],
    },
    Mutant {
        id: "last-ktile-dropped",
        suite: "gpu_linear",
        description: "the K loop stops one k-tile early whenever there are two or more, both families (also the LoRA down products)",
        edits: &[
            Edit {
                file: GEMM,
                old: "let ktiles = p.k_red.div_ceil(BK);",
                new: "let ktiles = p.k_red.div_ceil(BK).max(2) - 1;",
            },
            Edit {
                file: WG,
                old: "let ktiles = p.k_red.div_ceil(BK);",
                new: "let ktiles = p.k_red.div_ceil(BK).max(2) - 1;",
            },
        ],
    },
    Mutant {
        id: "tail-row-unwritten",
        suite: "gpu_linear",
        description: "the last row of a partial row tile (an expert's tail) is not stored, both families (shared row-index staging)",
        edits: &[Edit {
            file: GEMM,
            old: "if p.out_scattered == 0 { row } else { slot },",
            new: "if row + 1 == tile.end && tile.end - tile.begin < BM { NO_ROW } else if p.out_scattered == 0 { row } else { slot },",
        }],
    },
    Mutant {
        id: "routing-reversed",
        suite: "gpu_linear",
        description: "routing scatter writes each expert's rows in reverse slot order (grouped order reversed within every expert)",
        edits: &[Edit {
            file: ROUTING,
            old: "                store(p.sorted_expert_addr + 4 * pos as u64, bk);
                store(p.ssi_addr + 4 * pos as u64, i);",
            new: "                let lo = if bk == 0 { 0 } else { load::<u32>(p.offsets_addr + 4 * (bk as u64 - 1)) };
                let hi = if bk < p.num_experts { load::<u32>(p.offsets_addr + 4 * bk as u64) } else { p.slots };
                let pos = lo + hi - 1 - pos;
                store(p.sorted_expert_addr + 4 * pos as u64, bk);
                store(p.ssi_addr + 4 * pos as u64, i);",
        }],
    },
    Mutant {
        id: "auto-gate-empties-b",
        suite: "gpu_mxfp4",
        description: "the Auto gate kernel empties every expert's rows for Strategy B too (B's speculative kernels then compute nothing)",
        edits: &[Edit {
            file: ROUTING,
            old: "store::<u32>(p.gated_addr + 4 * e as u64, if a { 0 } else { end });",
            new: "store::<u32>(p.gated_addr + 4 * e as u64, if a { 0 } else { end & 0 });",
        }],
    },
    Mutant {
        id: "auto-gate-half-warp-count",
        suite: "gpu_mxfp4",
        description: "the Auto gate kernel sums its active-expert count over half warps only (each lane sees 16 lanes' experts)",
        edits: &[Edit {
            file: ROUTING,
            old: "    let mut mask = 16;\n",
            new: "    let mut mask = 8;\n",
        }],
    },
    Mutant {
        id: "gated-dy-without-gate",
        suite: "gpu_linear",
        description: "the gated per-slot output gradient drops its gate (dY[t] instead of dY[t]·g): dX, dA, dB of a gated call",
        edits: &[Edit {
            file: ELTWISE,
            old: "out[i] = d[i] * g;",
            new: "out[i] = { let _ = g; d[i] };",
        }],
    },
    Mutant {
        id: "row-walk-carry-dropped",
        suite: "gpu_linear",
        description: "the row kernels' grid-stride walk (gates combined, gated dY, slot sum) drops the carry into the next row when its column wraps: those vectors go to the row before",
        edits: &[Edit {
            file: WALK,
            old: "            self.col -= self.per_row;\n            self.row += 1;",
            new: "            self.col -= self.per_row;",
        }],
    },
    Mutant {
        id: "d-gates-half-sum",
        suite: "gpu_linear",
        description: "d_gates reduction skips the first butterfly step: each gate gradient sums only half its warp's partial dot products",
        edits: &[Edit {
            file: ELTWISE,
            old: "let mut m = 16;",
            new: "let mut m = 8;",
        }],
    },
    Mutant {
        id: "dadb-transposed",
        suite: "gpu_linear",
        description: "Gram kernel stores its tile transposed (element (w, j) at (j, w), in bounds): dA and dB",
        edits: &[
            Edit {
                file: GRAM,
                old: "if w < p.width && j < p.rank {",
                new: "if j < p.width && w < p.rank {",
            },
            Edit {
                file: GRAM,
                old: "out_e + 2 * (w as u64 * p.out_stride_w + j as u64 * p.out_stride_r),",
                new: "out_e + 2 * (j as u64 * p.out_stride_w + w as u64 * p.out_stride_r),",
            },
        ],
    },
    Mutant {
        id: "bias-pair-swapped",
        suite: "gpu_linear",
        description: "the GEMM epilogue's frozen bias reads column n^1 (each even/odd pair swapped), both families (shared bias load)",
        edits: &[Edit {
            file: GEMM,
            old: "load::<u16>(p.bias_addr + 2 * (e * p.n_out as u64 + col as u64))",
            new: "load::<u16>(p.bias_addr + 2 * (e * p.n_out as u64 + (col ^ 1) as u64))",
        }],
    },
    Mutant {
        id: "bias-skipped-wg",
        suite: "gpu_linear",
        description: "the wgmma family adds no frozen bias (the mma.sync family still does)",
        edits: &[Edit {
            file: WG,
            old: "            if p.bias_addr != 0 {
                // Lane (g, t) holds columns warp_n0 + g",
            new: "            if p.bias_addr != 0 && p.rows == u32::MAX {
                // Lane (g, t) holds columns warp_n0 + g",
        }],
    },
    Mutant {
        id: "glu-boundary-inclusive",
        suite: "gpu_moe",
        description: "the strict clamp boundary passes the gradient at exactly ±L (the inclusive rule): gpt-oss's activation backward",
        edits: &[Edit {
            file: GLU,
            old: "(gate < p.limit, up > -p.limit && up < p.limit)",
            new: "(gate <= p.limit, up >= -p.limit && up <= p.limit)",
        }],
    },
    Mutant {
        id: "glu-interleave-swapped",
        suite: "gpu_moe",
        description: "interleaved gate/up read swapped for the first four units of each vector (gate from column 2i + 1, up from 2i)",
        edits: &[Edit {
            file: GLU,
            old: "        gate[i] = first[2 * i];
        up[i] = first[2 * i + 1];",
            new: "        gate[i] = first[2 * i + 1];
        up[i] = first[2 * i];",
        }],
    },
    Mutant {
        id: "stage-mismatch-mma",
        suite: "gpu_configs",
        description: "kernel mxmoe_gemm_nk_m128n128k32w2x4s3 (GEMM_CONFIGS[0], mma.sync) built with 4 stages while the host plans 3",
        edits: &[Edit {
            file: ENTRIES,
            old: "    (
        $layout:ident, $variant:ident, $suffix:ident, false,",
            new: "    (nk, NkBf16, m128n128k32w2x4s3, false, $bm:tt, $bn:tt, $bk:tt, $wm:tt, $wn:tt, 3) => {
        gemm_row_entry!(nk, NkBf16, m128n128k32w2x4s3, false, $bm, $bn, $bk, $wm, $wn, 4);
    };
    (
        $layout:ident, $variant:ident, $suffix:ident, false,",
        }],
    },
    Mutant {
        id: "stage-mismatch-wg",
        suite: "gpu_configs",
        description: "kernel mxmoe_gemm_nk_m64n128k64wg2s4 (GEMM_CONFIGS[12], wgmma) built with 5 stages while the host plans 4",
        edits: &[Edit {
            file: ENTRIES,
            old: "    (
        $layout:ident, $variant:ident, $suffix:ident, true,",
            new: "    (nk, NkBf16, m64n128k64wg2s4, true, $bm:tt, $bn:tt, $bk:tt, $wm:tt, $wn:tt, 4) => {
        gemm_row_entry!(nk, NkBf16, m64n128k64wg2s4, true, $bm, $bn, $bk, $wm, $wn, 5);
    };
    (
        $layout:ident, $variant:ident, $suffix:ident, true,",
        }],
    },
];
