//! Device building blocks over `ptx/`: global-memory access, the expert-aligned tile schedule,
//! MMA fragments from swizzled shared tiles, and the grouped GEMM (`mma.sync` and Hopper `wgmma`)
//! and Gram bodies.

pub mod frag;
pub mod gemm;
pub mod gmem;
pub mod gram;
pub mod schedule;
/// The `wgmma` family: Hopper only (`sm_90a`); absent from the portable module.
#[cfg(target_feature = "sm_90a")]
pub mod wg;
