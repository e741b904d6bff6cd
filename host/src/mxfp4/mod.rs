//! The MXFP4 weight format on the host: the validated container ([`MxWeights`]), the bit-exact
//! torchao FLOOR quantizer, and the CPU dequantizer (SPEC §1).

mod container;
mod dequant;
mod quantize;

pub use container::*;
pub use dequant::*;
pub use quantize::*;

// The container's error type lives with the crate's errors (so `error` depends on nothing).
pub use crate::error::MxError;
