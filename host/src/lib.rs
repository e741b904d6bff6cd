//! mxmoe: fused ScatterMoE-LoRA over MXFP4 expert weights.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod activation;
pub mod buffers;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod external;
pub mod gpt_oss;
pub mod kernels;
pub mod launch;
pub mod moe;
pub mod mxfp4;
pub mod nvfp4;
pub mod op;
pub mod reference;
pub mod routing;
pub mod run_file;
pub mod runtime;
pub mod tensor;
pub mod tune;

pub use error::{Error, Result};
pub use kernels_gpu::shared;
pub use runtime::Runtime;

#[cfg(test)]
mod layering;
#[cfg(test)]
mod test_rng;
