//! A deliberately naive CPU reference for the ScatterMoE-LoRA expert linear: the oracle of the GPU
//! parity tests.
//!
//! Everything here is written for obviousness, not speed: plain nested loops over the definitions
//! in SPEC §2 (routing) and §3 (the LoRA-fused expert linear, forward and backward), with every
//! dot product accumulated in `f64`. Two numeric modes are offered ([`Rounding`]):
//!
//! - [`Rounding::Bf16`] rounds to bf16 (through [`crate::shared::bf16::round_bf16`]) exactly at
//!   the points where the kernels convert to the activation dtype, so its results are what an
//!   ideal kernel with an exact accumulator would store. Real kernels accumulate in `f32`, so a
//!   parity test still needs a tolerance of about one bf16 ulp on values whose unrounded sums land
//!   near a rounding boundary.
//! - [`Rounding::Exact`] rounds nowhere and keeps `f64` end to end internally; it is the mode the
//!   finite-difference gradient checks use.
//!
//! Modules: [`routing`] (`flatten_sort_count`, active experts) and
//! [`linear`] (the expert linear's forward and backward).

pub mod linear;
pub mod moe;
pub mod routing;

pub use linear::{LinearProblem, RefForward, RefGrads, RowOrder, linear_backward, linear_forward};
pub use routing::{DROPPED, Routing, active_experts, flatten_sort_count};

/// Where the reference rounds intermediate and final values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Round to bf16 (nearest-even) at the kernels' conversion points (SPEC §3.2, §3.3, §10); every
    /// input is first rounded to bf16 too, as uploading it to the device in the activation dtype
    /// would.
    Bf16,
    /// No rounding at all: inputs are used as given and all arithmetic is `f64`. Only the final
    /// conversion of the public results to `f32` rounds.
    Exact,
}

impl Rounding {
    /// Applies this mode's rounding to one value (bf16 via `f32`, or the identity).
    ///
    /// The `f64 → f32 → bf16` path can double-round in theory; the kernels hold `f32` values at
    /// these points, so going through `f32` is the faithful choice.
    #[inline]
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Rounding::Bf16 => f64::from(crate::shared::bf16::round_bf16(v as f32)),
            Rounding::Exact => v,
        }
    }
}

#[cfg(test)]
pub(crate) use crate::test_rng::XorShift;
