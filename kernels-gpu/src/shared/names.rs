//! Exported kernel entry-point names. The host looks functions up only through these constants,
//! and `cargo xtask ptx-report` checks that the built PTX has exactly [`ALL`] (Hopper module) or
//! [`ALL_PORTABLE`] (portable module) as its entries.
//! The grouped-GEMM names are generated from the one table, `tiles::gemm_configs!`.

use crate::shared::tiles::{BLayout, GEMM_CONFIG_COUNT, GEMM_CONFIGS, bytes_eq, gemm_configs};

/// Probe: special registers (`%tid`, `%ctaid`, `%laneid`, warp id) written per thread.
pub const PROBE_SREG: &str = "mxmoe_probe_sreg";
/// Probe: `cp.async` 16-byte copies (with zero-fill) global → shared → global.
pub const PROBE_CP_ASYNC: &str = "mxmoe_probe_cp_async";
/// Probe: one m16n8k16 bf16 MMA whose fragments come from `ldmatrix` in all layouts.
pub const PROBE_MMA: &str = "mxmoe_probe_mma";
/// Probe: f32 → bf16x2 conversion and bf16x2 multiply.
pub const PROBE_CVT: &str = "mxmoe_probe_cvt";
/// MXFP4 → bf16 dequantization of a list of experts.
pub const DEQUANT_MXFP4: &str = "mxmoe_dequant_mxfp4_bf16";
/// NVFP4 → bf16 dequantization of a list of experts.
pub const DEQUANT_NVFP4: &str = "mxmoe_dequant_nvfp4_bf16";
/// Routing, step 1: per-chunk bucket histogram.
pub const ROUTE_COUNT: &str = "mxmoe_route_count";
/// Routing, step 2: bucket bases and expert offsets.
pub const ROUTE_SCAN: &str = "mxmoe_route_scan";
/// Routing, step 3: stable scatter into grouped order.
pub const ROUTE_SCATTER: &str = "mxmoe_route_scatter";
/// Gates: `y[t] = Σ_j gate[t,j] · out[t·k+j]`.
pub const COMBINE_GATES: &str = "mxmoe_combine_gates";
/// Gate gradient: `d_gate[t,j] = ⟨out[t·k+j], dy[t]⟩`.
pub const GATE_GRAD: &str = "mxmoe_gate_grad";
/// Gated output gradient per slot: `dys[i] = dy[i/k] · gate[i]`.
pub const SCALE_SLOTS: &str = "mxmoe_scale_slots";
/// Slot sum: `dx[t] = Σ_j dxs[t·k+j]`.
pub const SUM_SLOTS: &str = "mxmoe_sum_slots";
/// Expert-block gather/scatter of LoRA matrices (Strategy A).
pub const REMAP_BLOCKS: &str = "mxmoe_remap_blocks";
/// `Strategy::Auto` decided on the device: the decision, the routing's row ends for the host,
/// and the row ends Strategy B's kernels read (`shared::params::AutoGateParams`).
pub const AUTO_GATE: &str = "mxmoe_auto_gate";

/// The entry-point name of the grouped GEMM for B layout `nk`, `kn`, `nk_mx`, `kn_mx`, `nk_nv` or
/// `kn_nv` and the
/// `tiles::gemm_configs!` row `suffix`: `mxmoe_gemm_<layout>_<suffix>`. The names below and the
/// entry points in `kernels/gemm.rs` are both spelled by this macro.
macro_rules! gemm_entry_name {
    ($layout:ident, $suffix:ident) => {
        concat!("mxmoe_gemm_", stringify!($layout), "_", stringify!($suffix))
    };
}
pub(crate) use gemm_entry_name;

/// `tiles::gemm_configs!` callback: the grouped-GEMM names per layout, one per table row, and
/// [`ALL`] (which lists them between the element-wise and the rank-sized kernels).
macro_rules! define_gemm_names {
    ($($suffix:ident => { $($field:ident: $value:literal),* $(,)? }),* $(,)?) => {
        /// Grouped GEMM with B stored `[n][k]` (forward), one per `tiles::GEMM_CONFIGS` row.
        pub const GEMM_NK: [&str; GEMM_CONFIG_COUNT] =
            [$(self::gemm_entry_name!(nk, $suffix)),*];
        /// Grouped GEMM with B stored `[k][n]` (dX), one per `tiles::GEMM_CONFIGS` row.
        pub const GEMM_KN: [&str; GEMM_CONFIG_COUNT] =
            [$(self::gemm_entry_name!(kn, $suffix)),*];
        /// Grouped GEMM over MXFP4 weights, K reduction (forward), one per
        /// `tiles::GEMM_CONFIGS` row.
        pub const GEMM_NK_MX: [&str; GEMM_CONFIG_COUNT] =
            [$(self::gemm_entry_name!(nk_mx, $suffix)),*];
        /// Grouped GEMM over MXFP4 weights, N reduction (dX), one per `tiles::GEMM_CONFIGS` row.
        pub const GEMM_KN_MX: [&str; GEMM_CONFIG_COUNT] =
            [$(self::gemm_entry_name!(kn_mx, $suffix)),*];
        /// Forward grouped GEMM over NVFP4 weights, per row of `tiles::GEMM_CONFIGS`.
        pub const GEMM_NK_NV: [&str; GEMM_CONFIG_COUNT] =
            [$(self::gemm_entry_name!(nk_nv, $suffix)),*];
        /// dX grouped GEMM over NVFP4 weights, per row of `tiles::GEMM_CONFIGS`.
        pub const GEMM_KN_NV: [&str; GEMM_CONFIG_COUNT] =
            [$(self::gemm_entry_name!(kn_nv, $suffix)),*];

        /// Every entry point of the module.
        pub const ALL: &[&str] = &[
            PROBE_SREG,
            PROBE_CP_ASYNC,
            PROBE_MMA,
            PROBE_CVT,
            DEQUANT_MXFP4,
            DEQUANT_NVFP4,
            ROUTE_COUNT,
            ROUTE_SCAN,
            ROUTE_SCATTER,
            COMBINE_GATES,
            GATE_GRAD,
            SCALE_SLOTS,
            SUM_SLOTS,
            REMAP_BLOCKS,
            AUTO_GATE,
            $(self::gemm_entry_name!(nk, $suffix),)*
            $(self::gemm_entry_name!(kn, $suffix),)*
            $(self::gemm_entry_name!(nk_mx, $suffix),)*
            $(self::gemm_entry_name!(kn_mx, $suffix),)*
            $(self::gemm_entry_name!(nk_nv, $suffix),)*
            $(self::gemm_entry_name!(kn_nv, $suffix),)*
            LORA_DOWN[0],
            LORA_DOWN[1],
            LORA_DOWN[2],
            LORA_DOWN[3],
            LORA_DOWN_NK[0],
            LORA_DOWN_NK[1],
            LORA_DOWN_NK[2],
            LORA_DOWN_NK[3],
            LORA_DOWN_KN[0],
            LORA_DOWN_KN[1],
            LORA_DOWN_KN[2],
            LORA_DOWN_KN[3],
            GRAM[0],
            GRAM[1],
            GRAM[2],
            GRAM[3],
            GLU_FWD,
            GLU_BWD,
        ];
    };
}
gemm_configs!(define_gemm_names);

/// The weight layouts of the grouped GEMM, each with one entry point per `tiles::gemm_configs!`
/// row ([`gemm_names`]), in the order [`ALL`] lists them.
pub const GEMM_WEIGHT_LAYOUTS: [BLayout; 6] = [
    BLayout::NkBf16,
    BLayout::KnBf16,
    BLayout::NkMxfp4,
    BLayout::KnMxfp4,
    BLayout::NkNvfp4,
    BLayout::KnNvfp4,
];

/// Grouped-GEMM entry points per `tiles::gemm_configs!` row: one per weight layout.
pub const GEMM_LAYOUTS: usize = GEMM_WEIGHT_LAYOUTS.len();

/// The grouped-GEMM entry names of weight layout `layout`, one per row of
/// `tiles::GEMM_CONFIGS`; `None` for `BLayout::Strided`, which only the rank-sized products use.
pub const fn gemm_names(layout: BLayout) -> Option<&'static [&'static str; GEMM_CONFIG_COUNT]> {
    match layout {
        BLayout::NkBf16 => Some(&GEMM_NK),
        BLayout::KnBf16 => Some(&GEMM_KN),
        BLayout::NkMxfp4 => Some(&GEMM_NK_MX),
        BLayout::KnMxfp4 => Some(&GEMM_KN_MX),
        BLayout::NkNvfp4 => Some(&GEMM_NK_NV),
        BLayout::KnNvfp4 => Some(&GEMM_KN_NV),
        BLayout::Strided => None,
    }
}

/// Rows of `tiles::GEMM_CONFIGS` built on `wgmma` (Hopper module only).
const WGMMA_ROWS: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < GEMM_CONFIG_COUNT {
        if GEMM_CONFIGS[i].wgmma {
            n += 1;
        }
        i += 1;
    }
    n
};

/// Whether `name` is the entry point of a `wgmma` row (in any weight layout).
const fn is_wgmma_entry(name: &str) -> bool {
    let mut i = 0;
    while i < GEMM_CONFIG_COUNT {
        if GEMM_CONFIGS[i].wgmma {
            let mut l = 0;
            while l < GEMM_LAYOUTS {
                if let Some(names) = gemm_names(GEMM_WEIGHT_LAYOUTS[l])
                    && bytes_eq(name.as_bytes(), names[i].as_bytes())
                {
                    return true;
                }
                l += 1;
            }
        }
        i += 1;
    }
    false
}

/// [`ALL`] without the `wgmma` rows' entries, in the same order.
const fn portable_entries() -> [&'static str; ALL.len() - GEMM_LAYOUTS * WGMMA_ROWS] {
    let mut out = [""; ALL.len() - GEMM_LAYOUTS * WGMMA_ROWS];
    let mut j = 0;
    let mut i = 0;
    while i < ALL.len() {
        if !is_wgmma_entry(ALL[i]) {
            out[j] = ALL[i];
            j += 1;
        }
        i += 1;
    }
    assert!(
        j == out.len(),
        "every wgmma row has GEMM_LAYOUTS entries in ALL"
    );
    out
}

const ALL_PORTABLE_ARRAY: [&str; ALL.len() - GEMM_LAYOUTS * WGMMA_ROWS] = portable_entries();

/// Every entry point of the portable (`sm_80`) module: [`ALL`] without the `wgmma` rows
/// (`shared::module::PtxModule::Portable`). `cargo xtask ptx-report` checks that module's
/// `.entry` set against this list.
pub const ALL_PORTABLE: &[&str] = &ALL_PORTABLE_ARRAY;

/// Rank-sized LoRA products (XA, YB), one per `tiles::RANK_PADS` entry.
pub const LORA_DOWN: [&str; 4] = [
    "mxmoe_lora_down_r16",
    "mxmoe_lora_down_r32",
    "mxmoe_lora_down_r64",
    "mxmoe_lora_down_r128",
];
/// Rank-sized LoRA products whose factor rows are contiguous along the reduction (XA from `A`),
/// staged with `cp.async`; one per `tiles::RANK_PADS` entry.
pub const LORA_DOWN_NK: [&str; 4] = [
    "mxmoe_lora_down_nk_r16",
    "mxmoe_lora_down_nk_r32",
    "mxmoe_lora_down_nk_r64",
    "mxmoe_lora_down_nk_r128",
];
/// Rank-sized LoRA products whose factor is contiguous along the rank (YB from `B`, rank a
/// multiple of 8), staged with `cp.async`; one per `tiles::RANK_PADS` entry.
pub const LORA_DOWN_KN: [&str; 4] = [
    "mxmoe_lora_down_kn_r16",
    "mxmoe_lora_down_kn_r32",
    "mxmoe_lora_down_kn_r64",
    "mxmoe_lora_down_kn_r128",
];
/// Grouped Gram (dA, dB), one per `tiles::RANK_PADS` entry.
pub const GRAM: [&str; 4] = [
    "mxmoe_gram_r16",
    "mxmoe_gram_r32",
    "mxmoe_gram_r64",
    "mxmoe_gram_r128",
];

/// Gated-MLP activation (SwiGLU or gpt-oss's, `shared::glu`): `h [L, I]` from the grouped
/// gate/up output (SPEC §6).
pub const GLU_FWD: &str = "mxmoe_glu_fwd_bf16";
/// Gradient of the gated-MLP activation: `d_gu [L, 2I]` from `gu` and `dh`.
pub const GLU_BWD: &str = "mxmoe_glu_bwd_bf16";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::tiles::{GEMM_CONFIG_NAMES, RANK_PADS};

    #[test]
    fn gemm_names_encode_their_configs() {
        assert_eq!(GEMM_CONFIG_NAMES.len(), GEMM_CONFIGS.len());
        for (i, c) in GEMM_CONFIGS.iter().enumerate() {
            let tag = if c.wgmma {
                format!(
                    "m{}n{}k{}wg{}s{}",
                    c.bm,
                    c.bn,
                    c.bk,
                    c.warpgroups(),
                    c.stages
                )
            } else {
                format!(
                    "m{}n{}k{}w{}x{}s{}",
                    c.bm, c.bn, c.bk, c.warps_m, c.warps_n, c.stages
                )
            };
            assert_eq!(GEMM_CONFIG_NAMES[i], tag);
            assert_eq!(GEMM_NK[i], format!("mxmoe_gemm_nk_{tag}"));
            assert_eq!(GEMM_KN[i], format!("mxmoe_gemm_kn_{tag}"));
            assert_eq!(GEMM_NK_MX[i], format!("mxmoe_gemm_nk_mx_{tag}"));
            assert_eq!(GEMM_KN_MX[i], format!("mxmoe_gemm_kn_mx_{tag}"));
            assert_eq!(GEMM_NK_NV[i], format!("mxmoe_gemm_nk_nv_{tag}"));
            assert_eq!(GEMM_KN_NV[i], format!("mxmoe_gemm_kn_nv_{tag}"));
        }
        for (i, r) in RANK_PADS.iter().enumerate() {
            assert_eq!(LORA_DOWN[i], format!("mxmoe_lora_down_r{r}"));
            assert_eq!(LORA_DOWN_NK[i], format!("mxmoe_lora_down_nk_r{r}"));
            assert_eq!(LORA_DOWN_KN[i], format!("mxmoe_lora_down_kn_r{r}"));
            assert_eq!(GRAM[i], format!("mxmoe_gram_r{r}"));
        }
    }

    #[test]
    fn all_lists_every_gemm_entry_once_per_row_and_layout() {
        assert_eq!(
            ALL.len(),
            15 + GEMM_LAYOUTS * GEMM_CONFIGS.len() + 4 * RANK_PADS.len() + 2
        );
        for layout in GEMM_WEIGHT_LAYOUTS {
            for name in gemm_names(layout).unwrap() {
                assert!(ALL.contains(name), "{name} missing from ALL");
            }
        }
        assert!(gemm_names(BLayout::Strided).is_none());
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(!ALL[i + 1..].contains(a), "{a} listed twice");
        }
    }
}
