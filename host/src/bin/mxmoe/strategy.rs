//! The ways the CLI can run the expert linear on the GPU ("strategies" in the benchmark, "paths"
//! in the smoke test), in one place.
//!
//! Each strategy says how to put the frozen weights on the device, what dense weights its
//! kernels effectively multiply by (the CPU reference's input), and how many weight bytes one
//! expert costs to read. Everything else (routing, LoRA, forward, backward, timing, comparison)
//! is shared, so adding a strategy (SPEC §4: the MXFP4 selective-dequant "A" or fused "B") is one
//! new variant plus one arm in each `match` below, and it then appears in both `mxmoe smoke` and
//! `mxmoe bench`.

use anyhow::Context as _;
use mxmoe::device::Gpu;
use mxmoe::op::{DenseExperts, ExpertWeights};
use mxmoe::shared::bf16::bf16_bits_to_f32;

/// A weights kind / execution strategy of the expert linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Dense bf16 expert weights resident on the device (the benchmark's baseline).
    Bf16,
}

/// A strategy's weights on the device.
pub enum DeviceWeights {
    /// Dense bf16 `W_store [E, N, K]`.
    Bf16(DenseExperts),
}

impl DeviceWeights {
    /// The weights as the op layer takes them.
    pub fn as_expert_weights(&self) -> ExpertWeights<'_> {
        match self {
            DeviceWeights::Bf16(w) => ExpertWeights::Bf16(w),
        }
    }
}

impl Strategy {
    /// Every strategy, in table order.
    pub const ALL: &'static [Strategy] = &[Strategy::Bf16];

    /// Short name for tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Bf16 => "bf16",
        }
    }

    /// Bytes of frozen weights one expert reads per pass (forward or dX): `N·K·2` for bf16,
    /// `N·K/2 + N·K/32` (packed codes plus E8M0 scales) for an MXFP4 strategy.
    pub fn weight_bytes_per_expert(self, n: usize, k: usize) -> usize {
        match self {
            Strategy::Bf16 => n * k * 2,
        }
    }

    /// The dense weights `[E, N, K]` this strategy's kernels effectively multiply by, given the
    /// bf16 checkpoint `w_bits`: the widened bf16 values themselves, or for an MXFP4 strategy
    /// the dequantized quantization of them.
    pub fn reference_weights(self, w_bits: &[u16], _experts: usize, _n: usize, _k: usize) -> anyhow::Result<Vec<f32>> {
        match self {
            Strategy::Bf16 => Ok(w_bits.iter().map(|&b| bf16_bits_to_f32(b)).collect()),
        }
    }

    /// Puts the bf16 checkpoint `w_bits [E, N, K]` on the device in this strategy's format.
    pub fn upload(self, gpu: &Gpu, w_bits: &[u16], experts: usize, n: usize, k: usize) -> anyhow::Result<DeviceWeights> {
        match self {
            Strategy::Bf16 => {
                let w = DenseExperts::from_bits(gpu, w_bits, experts, n, k).with_context(|| format!("could not upload the bf16 expert weights [{experts}, {n}, {k}]"))?;
                Ok(DeviceWeights::Bf16(w))
            }
        }
    }
}
