//! mxmoe: fused ScatterMoE-LoRA over MXFP4 expert weights.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod device;
pub mod error;
pub mod mxfp4;
pub mod reference;
pub mod tensor;

pub use error::{Error, Result};
pub use kernels_gpu::shared;
pub mod checkpoint;
pub mod kernels;
pub mod launch;
pub mod moe;
pub mod op;
pub mod routing;
pub mod tune;

#[cfg(test)]
mod test_rng;
