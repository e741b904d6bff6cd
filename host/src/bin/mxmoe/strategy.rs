//! The ways the CLI can run the expert linear on the GPU ("strategies" in the benchmark, "paths"
//! in the smoke test), in one place.
//!
//! Each strategy says how to put the frozen weights on the device, which [`op::Strategy`] the op
//! layer runs, what dense weights its kernels effectively multiply by (the CPU reference's
//! input), and how many weight bytes it moves. Everything else (routing, LoRA, forward,
//! backward, timing, comparison) is shared, so adding a strategy is one new variant plus one
//! arm in each `match` below, and it then appears in both `mxmoe smoke` and `mxmoe bench`.

use std::sync::OnceLock;

use anyhow::Context as _;
use mxmoe::device::Gpu;
use mxmoe::mxfp4::{MxShape, MxWeights, dequantize_f32, quantize_mxfp4_bf16};
use mxmoe::nvfp4::{NvShape, NvWeights, dequantize_nvfp4_f32, quantize_nvfp4_bf16};
use mxmoe::op::{self, DenseExperts, ExpertWeights, MxExperts, NvExperts};
use mxmoe::shared::bf16::bf16_bits_to_f32;

/// A weights kind and execution strategy of the expert linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Dense bf16 expert weights resident on the device (the benchmark's baseline).
    Bf16,
    /// MXFP4 weights, Strategy A (SPEC §4.1): dequantize the active experts to a compact bf16
    /// buffer, then the bf16 kernels.
    Mxfp4A,
    /// MXFP4 weights, Strategy B (SPEC §4.2): decode inside the tensor-core K-loop.
    Mxfp4B,
    /// MXFP4 weights, the library's per-call choice between A and B (`op::Strategy::Auto`;
    /// reads the expert offsets back to the host once per routing).
    Mxfp4Auto,
    /// NVFP4 weights (two-level: an E4M3 scale per 16 values and an f32 scale per expert, as
    /// ModelOpt exports them), Strategy A: dequantize the active experts, then the bf16 kernels.
    Nvfp4A,
    /// NVFP4 weights (two-level), Strategy B: decode inside the tensor-core K-loop (the E4M3
    /// block scale folded with the tensor scale into one f32 factor per 16 values).
    Nvfp4B,
    /// NVFP4 weights (two-level), the library's per-call choice between A and B.
    Nvfp4Auto,
}

/// The bf16 checkpoint `W_store [E, N, K]` of one problem, with its MXFP4 and NVFP4
/// quantizations made on first use and then shared by every strategy of that format.
pub struct HostWeights {
    /// Experts `E`.
    pub experts: usize,
    /// Output dimension `N`.
    pub n: usize,
    /// Reduction dimension `K`.
    pub k: usize,
    /// bf16 bits, `[E, N, K]` row-major.
    pub bits: Vec<u16>,
    mx: OnceLock<MxWeights>,
    nv: OnceLock<NvWeights>,
}

impl HostWeights {
    /// Wraps bf16 bits `[experts, n, k]`.
    pub fn new(bits: Vec<u16>, experts: usize, n: usize, k: usize) -> Self {
        Self {
            experts,
            n,
            k,
            bits,
            mx: OnceLock::new(),
            nv: OnceLock::new(),
        }
    }

    /// The weights widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.bits.iter().map(|&b| bf16_bits_to_f32(b)).collect()
    }

    /// The MXFP4 quantization (torchao FLOOR, SPEC §1.4), computed once, experts in parallel.
    pub fn mx(&self) -> anyhow::Result<&MxWeights> {
        if let Some(mx) = self.mx.get() {
            return Ok(mx);
        }
        let shape = MxShape::new(self.experts, self.n, self.k)
            .context("the weights cannot be MXFP4-quantized")?;
        let parts = per_expert_groups(&self.bits, self.experts, self.n, self.k, |chunk, e| {
            quantize_mxfp4_bf16(chunk, e, self.n, self.k)
                .context("the MXFP4 quantizer rejected the weights")
        })?;
        let (mut packed, mut scales) = (
            Vec::with_capacity(shape.packed_len()),
            Vec::with_capacity(shape.scales_len()),
        );
        for part in parts {
            let (_, p, s) = part.into_parts();
            packed.extend_from_slice(&p);
            scales.extend_from_slice(&s);
        }
        let mx = MxWeights::from_shape(shape, packed, scales)
            .context("the concatenated MXFP4 parts do not form the full tensor")?;
        Ok(self.mx.get_or_init(|| mx))
    }

    /// The two-level NVFP4 quantization (torchao's `NVFP4Tensor` with a per-tensor scale, one
    /// tensor per expert), computed once, experts in parallel.
    pub fn nv(&self) -> anyhow::Result<&NvWeights> {
        if let Some(nv) = self.nv.get() {
            return Ok(nv);
        }
        let shape = NvShape::new(self.experts, self.n, self.k)
            .context("the weights cannot be NVFP4-quantized")?;
        let parts = per_expert_groups(&self.bits, self.experts, self.n, self.k, |chunk, e| {
            quantize_nvfp4_bf16(chunk, e, self.n, self.k, true)
                .context("the NVFP4 quantizer rejected the weights")
        })?;
        let (mut packed, mut scales, mut tensor_scales) = (Vec::new(), Vec::new(), Vec::new());
        for part in parts {
            let (_, p, s, t) = part.into_parts();
            packed.extend_from_slice(&p);
            scales.extend_from_slice(&s);
            tensor_scales.extend_from_slice(t.as_deref().unwrap_or_default());
        }
        let nv = NvWeights::from_parts(shape, packed, scales, Some(tensor_scales))
            .context("the concatenated NVFP4 parts do not form the full tensor")?;
        Ok(self.nv.get_or_init(|| nv))
    }
}

/// `quantize(chunk, experts in it)` over groups of whole experts on every core, the parts in
/// expert order. Blocks never cross an expert, so the parts concatenate to the result of one
/// call over the whole tensor.
fn per_expert_groups<T: Send>(
    bits: &[u16],
    experts: usize,
    n: usize,
    k: usize,
    quantize: impl Fn(&[u16], usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(experts);
    let expert_len = (n * k).max(1);
    let per_thread = experts.div_ceil(threads.max(1)).max(1);
    let quantize = &quantize;
    let parts: Vec<anyhow::Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bits
            .chunks(per_thread * expert_len)
            .map(|chunk| scope.spawn(move || quantize(chunk, chunk.len() / expert_len)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a quantizer thread panicked")))
            })
            .collect()
    });
    parts.into_iter().collect()
}

/// A strategy's weights on the device.
pub enum DeviceWeights {
    /// Dense bf16 `W_store [E, N, K]`.
    Bf16(DenseExperts),
    /// MXFP4 `packed [E, N, K/2]` and `scales [E, N, K/32]`.
    Mxfp4(MxExperts),
    /// NVFP4 `packed [E, N, K/2]`, E4M3 `scales [E, N, K/16]` and per-expert tensor scales.
    Nvfp4(NvExperts),
}

impl DeviceWeights {
    /// The weights as the op layer takes them.
    pub fn as_expert_weights(&self) -> ExpertWeights<'_> {
        match self {
            DeviceWeights::Bf16(w) => ExpertWeights::Bf16(w),
            DeviceWeights::Mxfp4(w) => ExpertWeights::Mxfp4(w),
            DeviceWeights::Nvfp4(w) => ExpertWeights::Nvfp4(w),
        }
    }
}

impl Strategy {
    /// Every strategy, in table order.
    pub const ALL: &'static [Strategy] = &[
        Strategy::Bf16,
        Strategy::Mxfp4A,
        Strategy::Mxfp4B,
        Strategy::Mxfp4Auto,
        Strategy::Nvfp4A,
        Strategy::Nvfp4B,
        Strategy::Nvfp4Auto,
    ];

    /// Short name for tables and JSON (the same as the command-line value).
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Bf16 => "bf16",
            Strategy::Mxfp4A => "mxfp4-a",
            Strategy::Mxfp4B => "mxfp4-b",
            Strategy::Mxfp4Auto => "mxfp4-auto",
            Strategy::Nvfp4A => "nvfp4-a",
            Strategy::Nvfp4B => "nvfp4-b",
            Strategy::Nvfp4Auto => "nvfp4-auto",
        }
    }

    /// The op layer's strategy (ignored by the op layer for bf16 weights).
    pub fn op_strategy(self) -> op::Strategy {
        match self {
            Strategy::Bf16 | Strategy::Mxfp4B | Strategy::Nvfp4B => op::Strategy::Fused,
            Strategy::Mxfp4A | Strategy::Nvfp4A => op::Strategy::SelectiveDequant,
            Strategy::Mxfp4Auto | Strategy::Nvfp4Auto => op::Strategy::Auto,
        }
    }

    /// Bytes of stored weights per expert: `N·K·2` for bf16, `N·K/2 + N·K/32` (packed codes plus
    /// E8M0 scales) for MXFP4, `N·K/2 + N·K/16 + 4` (codes, E4M3 scales, the f32 tensor scale)
    /// for NVFP4.
    pub fn stored_bytes_per_expert(self, n: usize, k: usize) -> usize {
        match self {
            Strategy::Bf16 => n * k * 2,
            Strategy::Mxfp4A | Strategy::Mxfp4B | Strategy::Mxfp4Auto => n * k / 2 + n * k / 32,
            Strategy::Nvfp4A | Strategy::Nvfp4B | Strategy::Nvfp4Auto => n * k / 2 + n * k / 16 + 4,
        }
    }

    /// Weight bytes one forward + backward must move with `active` experts hit: the stored
    /// weights read twice (forward and dX) for bf16 and B; for A the MXFP4 bytes read once by
    /// the dequantization, the compact bf16 copy written once and read twice (NVFP4's A the
    /// same). Auto is counted as B (which one ran is decided per call on the device side).
    pub fn weight_traffic_bytes(self, n: usize, k: usize, active: usize) -> usize {
        let stored = active * self.stored_bytes_per_expert(n, k);
        match self {
            Strategy::Bf16
            | Strategy::Mxfp4B
            | Strategy::Mxfp4Auto
            | Strategy::Nvfp4B
            | Strategy::Nvfp4Auto => 2 * stored,
            Strategy::Mxfp4A | Strategy::Nvfp4A => stored + 3 * active * n * k * 2,
        }
    }

    /// REF's "HBM bytes" weight term (SPEC §8): `E_a·K·N·2` for bf16 and A (either format), the
    /// stored MXFP4 bytes for B (and Auto).
    pub fn spec_weight_bytes(self, n: usize, k: usize, active: usize) -> usize {
        match self {
            Strategy::Bf16 | Strategy::Mxfp4A | Strategy::Nvfp4A => active * n * k * 2,
            Strategy::Mxfp4B | Strategy::Mxfp4Auto | Strategy::Nvfp4B | Strategy::Nvfp4Auto => {
                active * self.stored_bytes_per_expert(n, k)
            }
        }
    }

    /// The dense weights `[E, N, K]` this strategy's kernels effectively multiply by: the bf16
    /// values themselves, or the dequantized MXFP4 or NVFP4 quantization of them.
    pub fn reference_weights(self, w: &HostWeights) -> anyhow::Result<Vec<f32>> {
        match self {
            Strategy::Bf16 => Ok(w.to_f32()),
            Strategy::Mxfp4A | Strategy::Mxfp4B | Strategy::Mxfp4Auto => {
                Ok(dequantize_f32(w.mx()?))
            }
            Strategy::Nvfp4A | Strategy::Nvfp4B | Strategy::Nvfp4Auto => {
                Ok(dequantize_nvfp4_f32(w.nv()?))
            }
        }
    }

    /// Puts the weights on the device in this strategy's format.
    pub fn upload(self, gpu: &Gpu, w: &HostWeights) -> anyhow::Result<DeviceWeights> {
        let (e, n, k) = (w.experts, w.n, w.k);
        match self {
            Strategy::Bf16 => {
                let d = DenseExperts::from_bits(gpu, &w.bits, e, n, k).with_context(|| {
                    format!("could not upload the bf16 expert weights [{e}, {n}, {k}]")
                })?;
                Ok(DeviceWeights::Bf16(d))
            }
            Strategy::Mxfp4A | Strategy::Mxfp4B | Strategy::Mxfp4Auto => {
                let d = MxExperts::upload(gpu, w.mx()?).with_context(|| {
                    format!("could not upload the MXFP4 expert weights [{e}, {n}, {k}]")
                })?;
                Ok(DeviceWeights::Mxfp4(d))
            }
            Strategy::Nvfp4A | Strategy::Nvfp4B | Strategy::Nvfp4Auto => {
                let d = NvExperts::upload(gpu, w.nv()?).with_context(|| {
                    format!("could not upload the NVFP4 expert weights [{e}, {n}, {k}]")
                })?;
                Ok(DeviceWeights::Nvfp4(d))
            }
        }
    }
}
