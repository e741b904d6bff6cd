//! The PTX modules built from the one kernel source, and which grouped-GEMM rows each contains.
//!
//! - [`PtxModule::Hopper`] (`sm_90a`): every entry of [`names::ALL`], the `wgmma` rows included;
//!   it loads on compute capability 9.0 only (H100, H200), because `sm_90a` code is tied to that
//!   architecture.
//! - [`PtxModule::Portable`] (`sm_80`): everything but the `wgmma` rows ([`names::ALL_PORTABLE`]);
//!   the driver JIT-compiles its PTX for any later architecture (sm_80, 86, 89, 90, 100, 120).
//!
//! The device build gates the Hopper-only code with `cfg(target_feature = "sm_90a")`, which rustc
//! sets from `-C target-cpu=sm_90a`; the host never picks a row its module lacks
//! ([`PtxModule::has_config`]).

use crate::shared::names;
use crate::shared::tiles::TileConfig;

/// One of the PTX modules built from `kernels-gpu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PtxModule {
    /// `sm_90a`: all rows, `wgmma` included; compute capability 9.0 only.
    Hopper,
    /// `sm_80`: the `mma.sync` rows and every other kernel; any GPU from compute capability 8.0.
    Portable,
}

impl PtxModule {
    /// Every module, the Hopper one first.
    pub const ALL: [PtxModule; 2] = [PtxModule::Hopper, PtxModule::Portable];

    /// The `-C target-cpu` / `.target` of the module.
    pub const fn arch(self) -> &'static str {
        match self {
            PtxModule::Hopper => "sm_90a",
            PtxModule::Portable => "sm_80",
        }
    }

    /// The module's short name (`MXMOE_MODULE=hopper|portable`, `mxmoe info`).
    pub const fn name(self) -> &'static str {
        match self {
            PtxModule::Hopper => "hopper",
            PtxModule::Portable => "portable",
        }
    }

    /// The module named `name` (see [`PtxModule::name`]).
    pub fn from_name(name: &str) -> Option<PtxModule> {
        PtxModule::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The module built for `arch`, if any.
    pub fn from_arch(arch: &str) -> Option<PtxModule> {
        PtxModule::ALL.into_iter().find(|m| m.arch() == arch)
    }

    /// Whether the module has the entry points of grouped-GEMM configuration `c`: every module
    /// has the `mma.sync` rows, only the Hopper module the `wgmma` ones.
    pub const fn has_config(self, c: &TileConfig) -> bool {
        !c.wgmma || matches!(self, PtxModule::Hopper)
    }

    /// Every entry point of the module, in [`names::ALL`]'s order.
    pub const fn entries(self) -> &'static [&'static str] {
        match self {
            PtxModule::Hopper => names::ALL,
            PtxModule::Portable => names::ALL_PORTABLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::tiles::{GEMM_CONFIGS, RANK_PADS};

    #[test]
    fn names_and_archs_round_trip() {
        for m in PtxModule::ALL {
            assert_eq!(PtxModule::from_name(m.name()), Some(m));
            assert_eq!(PtxModule::from_arch(m.arch()), Some(m));
        }
        assert_eq!(PtxModule::from_name("Hopper"), None);
        assert_eq!(PtxModule::from_arch("sm_90"), None);
    }

    #[test]
    fn the_portable_module_lacks_exactly_the_wgmma_rows() {
        let wgmma_rows = GEMM_CONFIGS.iter().filter(|c| c.wgmma).count();
        assert!(wgmma_rows > 0 && wgmma_rows < GEMM_CONFIGS.len());
        assert_eq!(
            names::ALL_PORTABLE.len(),
            names::ALL.len() - names::GEMM_LAYOUTS * wgmma_rows
        );
        for (i, c) in GEMM_CONFIGS.iter().enumerate() {
            assert!(PtxModule::Hopper.has_config(c));
            assert_eq!(PtxModule::Portable.has_config(c), !c.wgmma);
            for layout in [
                names::GEMM_NK,
                names::GEMM_KN,
                names::GEMM_NK_MX,
                names::GEMM_KN_MX,
                names::GEMM_NK_NV,
                names::GEMM_KN_NV,
            ] {
                assert!(PtxModule::Hopper.entries().contains(&layout[i]));
                assert_eq!(
                    PtxModule::Portable.entries().contains(&layout[i]),
                    !c.wgmma,
                    "{}",
                    layout[i]
                );
            }
        }
        // Everything that is not a grouped-GEMM row is in both, in the same order.
        let non_gemm: Vec<&str> = names::ALL
            .iter()
            .copied()
            .filter(|n| !n.starts_with("mxmoe_gemm_"))
            .collect();
        let portable_non_gemm: Vec<&str> = names::ALL_PORTABLE
            .iter()
            .copied()
            .filter(|n| !n.starts_with("mxmoe_gemm_"))
            .collect();
        assert_eq!(non_gemm, portable_non_gemm);
        // 15: probes, dequant (MXFP4, NVFP4), routing, element-wise, remap, the `Auto` gate;
        // then the LoRA products and Gram kernels; then the two activation kernels.
        assert_eq!(non_gemm.len(), 15 + 4 * RANK_PADS.len() + 2);
    }
}
