//! Entry points of the grouped GEMM (one per `tiles::gemm_configs!` row and B layout, generated
//! from that table), the rank-sized LoRA products and the Gram kernels. Each is a one-line
//! instantiation of the bodies in `tile/`; the launch contracts are documented on
//! `tile::gemm::gemm`, `tile::wg::gemm_wg` and `tile::gram::gram`.

use crate::shared::names;
use crate::shared::params::{GemmParams, GramParams};
use crate::shared::tiles::{BLayout, gemm_configs};
use crate::tile::gemm::gemm;
use crate::tile::gram::gram;
#[cfg(target_feature = "sm_90a")]
use crate::tile::wg::gemm_wg;

/// An `mma.sync` grouped-GEMM entry point `$name` (exported as `$name`, or as `$symbol` after
/// `export`) instantiating `tile::gemm::gemm` with the given tile numbers and B layout.
macro_rules! gemm_entry {
    (
        export $symbol:expr => $name:ident,
        $bm:tt, $bn:tt, $bk:tt, $wm:tt, $wn:tt, $st:tt, $layout:expr
    ) => {
        /// Grouped GEMM instantiation; see `tile::gemm::gemm` for the contract.
        ///
        /// # Safety
        /// The launch contract of `tile::gemm::gemm` for this configuration.
        #[unsafe(export_name = $symbol)]
        pub unsafe extern "ptx-kernel" fn $name(p: GemmParams) {
            const MI: usize = ($bm / $wm / 16) as usize;
            const NI: usize = ($bn / $wn / 8) as usize;
            // SAFETY: forwarded launch contract.
            unsafe { gemm::<$bm, $bn, $bk, $wm, $wn, $st, MI, NI, { $layout as u8 }>(&p) }
        }
    };
    ($name:ident, $bm:tt, $bn:tt, $bk:tt, $wm:tt, $wn:tt, $st:tt, $layout:expr) => {
        gemm_entry!(export stringify!($name) => $name, $bm, $bn, $bk, $wm, $wn, $st, $layout);
    };
}

/// `tiles::gemm_configs!` callback: one module per table row, named by its suffix, holding the
/// row's six entry points (`nk`, `kn`, `nk_mx`, `kn_mx`, `nk_nv`, `kn_nv`, exported as
/// `names::gemm_entry_name!(<layout>, <suffix>)`, the names the host launches). Their const
/// generics are the row's own literals: no entry can be built with other numbers than the host
/// plans its shared memory with.
macro_rules! gemm_table_entries {
    ($($suffix:ident => {
        bm: $bm:tt, bn: $bn:tt, bk: $bk:tt, warps_m: $wm:tt,
        warps_n: $wn:tt, stages: $st:tt, wgmma: $wg:tt $(,)?
    }),* $(,)?) => {
        $(
            /// Entry points of the `tiles::gemm_configs!` row of this name.
            pub mod $suffix {
                // A `wgmma` row's module is empty in the portable (non-`sm_90a`) build.
                #[cfg_attr(not(target_feature = "sm_90a"), allow(unused_imports))]
                use super::*;

                gemm_row_entry!(nk, NkBf16, $suffix, $wg, $bm, $bn, $bk, $wm, $wn, $st);
                gemm_row_entry!(kn, KnBf16, $suffix, $wg, $bm, $bn, $bk, $wm, $wn, $st);
                gemm_row_entry!(nk_mx, NkMxfp4, $suffix, $wg, $bm, $bn, $bk, $wm, $wn, $st);
                gemm_row_entry!(kn_mx, KnMxfp4, $suffix, $wg, $bm, $bn, $bk, $wm, $wn, $st);
                gemm_row_entry!(nk_nv, NkNvfp4, $suffix, $wg, $bm, $bn, $bk, $wm, $wn, $st);
                gemm_row_entry!(kn_nv, KnNvfp4, $suffix, $wg, $bm, $bn, $bk, $wm, $wn, $st);
            }
        )*
    };
}

/// One entry point of a table row: layout, `BLayout` variant, row suffix, `wgmma` flag, then
/// `bm, bn, bk, warps_m, warps_n, stages`. `mma.sync` rows instantiate `tile::gemm::gemm`,
/// `wgmma` rows `tile::wg::gemm_wg`. (The `stage-mismatch-*` mutants of `cargo xtask mutants`
/// add an arm here that builds one row's entry with another stage count.)
macro_rules! gemm_row_entry {
    (
        $layout:ident, $variant:ident, $suffix:ident, false,
        $bm:tt, $bn:tt, $bk:tt, $wm:tt, $wn:tt, $st:tt
    ) => {
        gemm_entry!(
            export names::gemm_entry_name!($layout, $suffix) => $layout,
            $bm, $bn, $bk, $wm, $wn, $st, BLayout::$variant
        );
    };
    (
        $layout:ident, $variant:ident, $suffix:ident, true,
        $bm:tt, $bn:tt, $bk:tt, $wm:tt, $wn:tt, $st:tt
    ) => {
        /// Grouped GEMM on `wgmma`; see `tile::wg::gemm_wg` for the contract.
        ///
        /// # Safety
        /// The launch contract of `tile::wg::gemm_wg` for this configuration.
        ///
        /// Built for `sm_90a` only: the portable module has no `wgmma` rows
        /// (`shared::module::PtxModule::has_config`).
        #[cfg(target_feature = "sm_90a")]
        #[unsafe(export_name = names::gemm_entry_name!($layout, $suffix))]
        pub unsafe extern "ptx-kernel" fn $layout(p: GemmParams) {
            // The body's fixed shape (128 weight columns, 1 × 8 MMA warps) is the row's.
            const { assert!($bn == 128 && $wm == 1 && $wn == 8) };
            // SAFETY: forwarded launch contract.
            unsafe { gemm_wg::<$bm, $bk, $st, { $bm / 8 }, { BLayout::$variant as u8 }>(&p) }
        }
    };
}

gemm_configs!(gemm_table_entries);

/// The rank-sized products for one B layout, one per padded rank, built with
/// `tiles::lora_down_config(r_pad)`: bm 64, bn r_pad, bk 64, 4×1 warps, 3 stages.
macro_rules! lora_down_entries {
    ($layout:expr => $($name:ident: $rp:tt),* $(,)?) => {
        $(gemm_entry!($name, 64, $rp, 64, 4, 1, 3, $layout);)*
    };
}

lora_down_entries! { BLayout::Strided =>
    mxmoe_lora_down_r16: 16,
    mxmoe_lora_down_r32: 32,
    mxmoe_lora_down_r64: 64,
    mxmoe_lora_down_r128: 128,
}
lora_down_entries! { BLayout::NkBf16 =>
    mxmoe_lora_down_nk_r16: 16,
    mxmoe_lora_down_nk_r32: 32,
    mxmoe_lora_down_nk_r64: 64,
    mxmoe_lora_down_nk_r128: 128,
}
lora_down_entries! { BLayout::KnBf16 =>
    mxmoe_lora_down_kn_r16: 16,
    mxmoe_lora_down_kn_r32: 32,
    mxmoe_lora_down_kn_r64: 64,
    mxmoe_lora_down_kn_r128: 128,
}

macro_rules! gram_entry {
    ($name:ident, $rp:literal) => {
        /// Grouped Gram instantiation (`tiles::GRAM_CONFIG`); see `tile::gram::gram`.
        ///
        /// # Safety
        /// The launch contract of `tile::gram::gram` for this padded rank.
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: GramParams) {
            // SAFETY: forwarded launch contract.
            unsafe { gram::<128, 32, 4, 3, $rp, 2, { $rp / 8 }>(&p) }
        }
    };
}

gram_entry!(mxmoe_gram_r16, 16);
gram_entry!(mxmoe_gram_r32, 32);
gram_entry!(mxmoe_gram_r64, 64);
gram_entry!(mxmoe_gram_r128, 128);
