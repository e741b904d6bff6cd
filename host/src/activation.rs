//! The gated activation of the MoE MLP block as a value: which activation ([`Activation`]:
//! SwiGLU with DeepSeek-V4's optional clamp, or gpt-oss's clamped α-sigmoid GLU with its `+1`),
//! what its clamp gradient does at exactly the limit ([`ClampBoundary`]) and where the gate and
//! up columns sit in the gate/up projection's output ([`GateUpLayout`]).
//!
//! The GPU block ([`crate::moe`]) turns these into the activation kernels' parameters
//! ([`Activation::glu_params`]; the kernels' per-element `f32` math is
//! `kernels_gpu::shared::glu`), and the CPU reference ([`crate::reference::moe`]) evaluates them
//! in `f64` (`Activation::value`, `Activation::grad`).

use std::fmt;
use std::str::FromStr;

use kernels_gpu::shared::params::GluParams;

use crate::error::{Error, Result, parse_name};

/// What the gradient of a clamp does at exactly the limit (GPT_OSS.md §1: the rule changed
/// between torch versions, and `±7.0` is exactly reachable in bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClampBoundary {
    /// The gradient passes only strictly inside: `v < L` for `min(v, L)`, `−L < v < L` for
    /// `clamp(v, −L, L)`; zero at exactly `±L` (torch 2.15, after torch issue #184574).
    Strict,
    /// The gradient also passes at exactly `±L`: `v ≤ L`, `−L ≤ v ≤ L` (torch from PR #7049
    /// until the strict rule; mxmoe's SwiGLU clamp).
    Inclusive,
}

impl ClampBoundary {
    /// Whether the gradient passes `min(v, limit)` at `v`.
    pub fn passes_min(self, v: f64, limit: f64) -> bool {
        match self {
            ClampBoundary::Strict => v < limit,
            ClampBoundary::Inclusive => v <= limit,
        }
    }

    /// Whether the gradient passes `clamp(v, −limit, limit)` at `v`.
    pub fn passes_clamp(self, v: f64, limit: f64) -> bool {
        self.passes_min(v, limit) && self.passes_min(-v, limit)
    }
}

/// The block's gated activation `h = act(gate, up)` (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu(min(gate, lim)) · clamp(up, −lim, lim)`, with DeepSeek-V4's clamp limit (finite,
    /// positive) or none; the clamp boundary passes the gradient ([`ClampBoundary::Inclusive`]).
    SwiGlu {
        /// The clamp limit, or `None` for plain SwiGLU.
        limit: Option<f32>,
    },
    /// gpt-oss: `(clamp(up, −L, L) + 1) · g · σ(α·g)` with `g = min(gate, L)`.
    GptOss {
        /// `α` (`config.swiglu_alpha`, 1.702), finite and positive.
        alpha: f32,
        /// `L` (`config.swiglu_limit`, 7.0), finite and positive.
        limit: f32,
        /// The clamps' gradient at exactly `±L`.
        boundary: ClampBoundary,
    },
}

impl ClampBoundary {
    /// Both rules, in declaration order.
    pub const ALL: [ClampBoundary; 2] = [ClampBoundary::Strict, ClampBoundary::Inclusive];

    /// `strict` or `inclusive` (the Python package's and the run file's spelling).
    pub const fn name(self) -> &'static str {
        match self {
            ClampBoundary::Strict => "strict",
            ClampBoundary::Inclusive => "inclusive",
        }
    }
}

impl fmt::Display for ClampBoundary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ClampBoundary {
    type Err = Error;
    /// Parses [`ClampBoundary::name`]. Errors: [`Error::InvalidArgument`] listing the names.
    fn from_str(s: &str) -> Result<Self> {
        parse_name(
            "clamp boundary",
            s,
            &ClampBoundary::ALL.map(|v| (v.name(), v)),
        )
    }
}

impl Activation {
    /// gpt-oss's constants (α = 1.702, L = 7.0) with current torch's strict clamp boundary.
    pub const GPT_OSS: Activation = Activation::GptOss {
        alpha: 1.702,
        limit: 7.0,
        boundary: ClampBoundary::Strict,
    };

    /// The clamp limit, if there is one.
    pub fn limit(self) -> Option<f32> {
        match self {
            Activation::SwiGlu { limit } => limit,
            Activation::GptOss { limit, .. } => Some(limit),
        }
    }

    /// Checks the parameters: limits and `α` finite and positive.
    ///
    /// Errors: [`Error::InvalidArgument`] naming `limit` or `alpha`.
    pub fn check(self) -> Result<()> {
        let positive = |what: &'static str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidArgument {
                    what,
                    detail: format!("must be finite and positive, got {v}"),
                })
            }
        };
        match self {
            Activation::SwiGlu { limit: None } => Ok(()),
            Activation::SwiGlu { limit: Some(lim) } => positive("limit", lim),
            Activation::GptOss { alpha, limit, .. } => {
                positive("alpha", alpha)?;
                positive("limit", limit)
            }
        }
    }

    /// The activation kernels' parameters for this activation and `layout` (addresses, rows and
    /// width left 0 for the launcher to fill): `α`, the `+c` of the up, the clamp and its
    /// boundary, the layout flag. Call [`Activation::check`] first.
    pub fn glu_params(self, layout: GateUpLayout) -> GluParams {
        let (clamp, limit, alpha, up_offset, strict) = match self {
            Activation::SwiGlu { limit: None } => (0, 0.0, 1.0, 0.0, 0),
            Activation::SwiGlu { limit: Some(l) } => (1, l, 1.0, 0.0, 0),
            Activation::GptOss {
                alpha,
                limit,
                boundary,
            } => (
                1,
                limit,
                alpha,
                1.0,
                (boundary == ClampBoundary::Strict) as u32,
            ),
        };
        GluParams {
            clamp,
            limit,
            alpha,
            up_offset,
            interleaved: (layout == GateUpLayout::Interleaved) as u32,
            strict,
            ..GluParams::default()
        }
    }
}

/// Where the gate and the up of unit `i` sit in a gate/up row of `2I` columns (and in the rows of
/// `gate_up`, its bias and its LoRA B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateUpLayout {
    /// Gate `i` in column `i`, up `i` in column `I + i` (mxmoe's SwiGLU block).
    Split,
    /// Gate `i` in column `2i`, up `i` in column `2i + 1` (gpt-oss's checkpoint).
    Interleaved,
}

impl GateUpLayout {
    /// `(gate column, up column)` of unit `i` in a row of `2·width` columns.
    pub fn columns(self, i: usize, width: usize) -> (usize, usize) {
        match self {
            GateUpLayout::Split => (i, width + i),
            GateUpLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameters_encode_each_activation() {
        let p = Activation::GPT_OSS.glu_params(GateUpLayout::Interleaved);
        assert_eq!(
            (
                p.clamp,
                p.limit,
                p.alpha,
                p.up_offset,
                p.interleaved,
                p.strict
            ),
            (1, 7.0, 1.702, 1.0, 1, 1)
        );
        let q = Activation::GptOss {
            alpha: 2.0,
            limit: 3.0,
            boundary: ClampBoundary::Inclusive,
        }
        .glu_params(GateUpLayout::Split);
        assert_eq!(
            (q.limit, q.alpha, q.interleaved, q.strict),
            (3.0, 2.0, 0, 0)
        );
        let s = Activation::SwiGlu { limit: Some(10.0) }.glu_params(GateUpLayout::Split);
        assert_eq!(
            (s.clamp, s.limit, s.alpha, s.up_offset, s.strict),
            (1, 10.0, 1.0, 0.0, 0)
        );
        assert_eq!(
            Activation::SwiGlu { limit: None }
                .glu_params(GateUpLayout::Split)
                .clamp,
            0
        );
    }

    #[test]
    fn parameters_are_checked_and_names_parse() {
        assert!(Activation::GPT_OSS.check().is_ok());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let a = Activation::GptOss {
                alpha: bad,
                limit: 7.0,
                boundary: ClampBoundary::Strict,
            };
            assert!(matches!(
                a.check(),
                Err(Error::InvalidArgument { what: "alpha", .. })
            ));
            let l = Activation::SwiGlu { limit: Some(bad) };
            assert!(matches!(
                l.check(),
                Err(Error::InvalidArgument { what: "limit", .. })
            ));
        }
        for b in ClampBoundary::ALL {
            assert_eq!(b.to_string().parse::<ClampBoundary>().unwrap(), b);
        }
        assert!("exclusive".parse::<ClampBoundary>().is_err());
    }
}
