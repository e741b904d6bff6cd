//! Entry points of the grouped GEMM (one per `tiles::GEMM_CONFIGS` row and B layout), the
//! rank-sized LoRA products and the Gram kernels. Each is a one-line instantiation of the bodies
//! in `tile/`; the launch contracts are documented on `tile::gemm::gemm` and `tile::gram::gram`.

use crate::shared::params::{GemmParams, GramParams};
use crate::shared::tiles::BLayout;
use crate::tile::gemm::gemm;
use crate::tile::gram::gram;
use crate::tile::wg::gemm_wg;

macro_rules! gemm_entry {
    ($name:ident, $bm:literal, $bn:literal, $bk:literal, $wm:literal, $wn:literal, $st:literal, $layout:expr) => {
        /// Grouped GEMM instantiation; see `tile::gemm::gemm` for the contract.
        ///
        /// # Safety
        /// The launch contract of `tile::gemm::gemm` for this configuration.
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: GemmParams) {
            const MI: usize = ($bm / $wm / 16) as usize;
            const NI: usize = ($bn / $wn / 8) as usize;
            // SAFETY: forwarded launch contract.
            unsafe { gemm::<$bm, $bn, $bk, $wm, $wn, $st, MI, NI, { $layout as u8 }>(&p) }
        }
    };
}

gemm_entry!(
    mxmoe_gemm_nk_m128n128k32w2x4s3,
    128,
    128,
    32,
    2,
    4,
    3,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m64n128k32w2x2s3,
    64,
    128,
    32,
    2,
    2,
    3,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m32n128k32w1x4s4,
    32,
    128,
    32,
    1,
    4,
    4,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m128n128k32w2x4s4,
    128,
    128,
    32,
    2,
    4,
    4,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m64n128k32w2x2s4,
    64,
    128,
    32,
    2,
    2,
    4,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m16n128k32w1x4s4,
    16,
    128,
    32,
    1,
    4,
    4,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m64n128k32w1x4s4,
    64,
    128,
    32,
    1,
    4,
    4,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m16n128k64w1x4s4,
    16,
    128,
    64,
    1,
    4,
    4,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m32n128k64w1x4s3,
    32,
    128,
    64,
    1,
    4,
    3,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_nk_m64n128k64w2x2s3,
    64,
    128,
    64,
    2,
    2,
    3,
    BLayout::NkBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m128n128k32w2x4s3,
    128,
    128,
    32,
    2,
    4,
    3,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m64n128k32w2x2s3,
    64,
    128,
    32,
    2,
    2,
    3,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m32n128k32w1x4s4,
    32,
    128,
    32,
    1,
    4,
    4,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m128n128k32w2x4s4,
    128,
    128,
    32,
    2,
    4,
    4,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m64n128k32w2x2s4,
    64,
    128,
    32,
    2,
    2,
    4,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m16n128k32w1x4s4,
    16,
    128,
    32,
    1,
    4,
    4,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m64n128k32w1x4s4,
    64,
    128,
    32,
    1,
    4,
    4,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m16n128k64w1x4s4,
    16,
    128,
    64,
    1,
    4,
    4,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m32n128k64w1x4s3,
    32,
    128,
    64,
    1,
    4,
    3,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_kn_m64n128k64w2x2s3,
    64,
    128,
    64,
    2,
    2,
    3,
    BLayout::KnBf16
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m128n128k32w2x4s3,
    128,
    128,
    32,
    2,
    4,
    3,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m64n128k32w2x2s3,
    64,
    128,
    32,
    2,
    2,
    3,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m32n128k32w1x4s4,
    32,
    128,
    32,
    1,
    4,
    4,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m128n128k32w2x4s4,
    128,
    128,
    32,
    2,
    4,
    4,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m64n128k32w2x2s4,
    64,
    128,
    32,
    2,
    2,
    4,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m16n128k32w1x4s4,
    16,
    128,
    32,
    1,
    4,
    4,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m64n128k32w1x4s4,
    64,
    128,
    32,
    1,
    4,
    4,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m16n128k64w1x4s4,
    16,
    128,
    64,
    1,
    4,
    4,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m32n128k64w1x4s3,
    32,
    128,
    64,
    1,
    4,
    3,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_nk_mx_m64n128k64w2x2s3,
    64,
    128,
    64,
    2,
    2,
    3,
    BLayout::NkMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m128n128k32w2x4s3,
    128,
    128,
    32,
    2,
    4,
    3,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m64n128k32w2x2s3,
    64,
    128,
    32,
    2,
    2,
    3,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m32n128k32w1x4s4,
    32,
    128,
    32,
    1,
    4,
    4,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m128n128k32w2x4s4,
    128,
    128,
    32,
    2,
    4,
    4,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m64n128k32w2x2s4,
    64,
    128,
    32,
    2,
    2,
    4,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m16n128k32w1x4s4,
    16,
    128,
    32,
    1,
    4,
    4,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m64n128k32w1x4s4,
    64,
    128,
    32,
    1,
    4,
    4,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m16n128k64w1x4s4,
    16,
    128,
    64,
    1,
    4,
    4,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m32n128k64w1x4s3,
    32,
    128,
    64,
    1,
    4,
    3,
    BLayout::KnMxfp4
);
gemm_entry!(
    mxmoe_gemm_kn_mx_m64n128k64w2x2s3,
    64,
    128,
    64,
    2,
    2,
    3,
    BLayout::KnMxfp4
);
macro_rules! gemm_wg_entry {
    ($name:ident, $bm:literal, $layout:expr) => {
        /// Grouped GEMM on `wgmma` (`m{bm}n128k64wg2s4`); see `tile::wg::gemm_wg`.
        ///
        /// # Safety
        /// The launch contract of `tile::wg::gemm_wg` for this configuration.
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: GemmParams) {
            // SAFETY: forwarded launch contract.
            unsafe { gemm_wg::<$bm, 64, 4, { $bm / 8 }, { $layout as u8 }>(&p) }
        }
    };
}

gemm_wg_entry!(mxmoe_gemm_nk_m16n128k64wg2s4, 16, BLayout::NkBf16);
gemm_wg_entry!(mxmoe_gemm_nk_m32n128k64wg2s4, 32, BLayout::NkBf16);
gemm_wg_entry!(mxmoe_gemm_nk_m64n128k64wg2s4, 64, BLayout::NkBf16);
gemm_wg_entry!(mxmoe_gemm_nk_m128n128k64wg2s4, 128, BLayout::NkBf16);
gemm_wg_entry!(mxmoe_gemm_kn_m16n128k64wg2s4, 16, BLayout::KnBf16);
gemm_wg_entry!(mxmoe_gemm_kn_m32n128k64wg2s4, 32, BLayout::KnBf16);
gemm_wg_entry!(mxmoe_gemm_kn_m64n128k64wg2s4, 64, BLayout::KnBf16);
gemm_wg_entry!(mxmoe_gemm_kn_m128n128k64wg2s4, 128, BLayout::KnBf16);
gemm_wg_entry!(mxmoe_gemm_nk_mx_m16n128k64wg2s4, 16, BLayout::NkMxfp4);
gemm_wg_entry!(mxmoe_gemm_nk_mx_m32n128k64wg2s4, 32, BLayout::NkMxfp4);
gemm_wg_entry!(mxmoe_gemm_nk_mx_m64n128k64wg2s4, 64, BLayout::NkMxfp4);
gemm_wg_entry!(mxmoe_gemm_nk_mx_m128n128k64wg2s4, 128, BLayout::NkMxfp4);
gemm_wg_entry!(mxmoe_gemm_kn_mx_m16n128k64wg2s4, 16, BLayout::KnMxfp4);
gemm_wg_entry!(mxmoe_gemm_kn_mx_m32n128k64wg2s4, 32, BLayout::KnMxfp4);
gemm_wg_entry!(mxmoe_gemm_kn_mx_m64n128k64wg2s4, 64, BLayout::KnMxfp4);
gemm_wg_entry!(mxmoe_gemm_kn_mx_m128n128k64wg2s4, 128, BLayout::KnMxfp4);

// The rank-sized products use `tiles::lora_down_config(r_pad)`: bm 64, bn r_pad, bk 64, 4×1 warps.
gemm_entry!(mxmoe_lora_down_r16, 64, 16, 64, 4, 1, 3, BLayout::Strided);
gemm_entry!(mxmoe_lora_down_r32, 64, 32, 64, 4, 1, 3, BLayout::Strided);
gemm_entry!(mxmoe_lora_down_r64, 64, 64, 64, 4, 1, 3, BLayout::Strided);
gemm_entry!(mxmoe_lora_down_r128, 64, 128, 64, 4, 1, 3, BLayout::Strided);
gemm_entry!(mxmoe_lora_down_nk_r16, 64, 16, 64, 4, 1, 3, BLayout::NkBf16);
gemm_entry!(mxmoe_lora_down_nk_r32, 64, 32, 64, 4, 1, 3, BLayout::NkBf16);
gemm_entry!(mxmoe_lora_down_nk_r64, 64, 64, 64, 4, 1, 3, BLayout::NkBf16);
gemm_entry!(
    mxmoe_lora_down_nk_r128,
    64,
    128,
    64,
    4,
    1,
    3,
    BLayout::NkBf16
);
gemm_entry!(mxmoe_lora_down_kn_r16, 64, 16, 64, 4, 1, 3, BLayout::KnBf16);
gemm_entry!(mxmoe_lora_down_kn_r32, 64, 32, 64, 4, 1, 3, BLayout::KnBf16);
gemm_entry!(mxmoe_lora_down_kn_r64, 64, 64, 64, 4, 1, 3, BLayout::KnBf16);
gemm_entry!(
    mxmoe_lora_down_kn_r128,
    64,
    128,
    64,
    4,
    1,
    3,
    BLayout::KnBf16
);

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
