//! Pure code compiled for both the host and the device.
//!
//! Architecture invariant: nothing here uses `unsafe`, `asm!` or `cfg(target_arch)`; everything
//! is plain `core` arithmetic, mostly `const fn`, so host tests exercise the kernels' own code.
#![forbid(unsafe_code)]

pub mod auto;
pub mod bf16;
pub mod glu;
pub mod module;
pub mod mxfp4;
pub mod names;
pub mod nvfp4;
pub mod params;
pub mod tiles;
pub mod walk;
