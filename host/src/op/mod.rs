//! The LoRA-fused expert linear (`ScatterMoELoRA`, SPEC §3) as an autograd-style pair:
//! [`ExpertLinear::forward`] returns the output and a [`Saved`] record, and [`backward`] turns
//! that record and the output gradient into [`Grads`].
//!
//! For grouped row `p` of expert `e`: `y_p = x_p·W_eᵀ + s·round_bf16(x_p·A_eᵀ)·B_eᵀ` with
//! `W_store[e]` of shape `[N, K]`, `A [E·r, K]`, `B [N, E·r]` (expert-major LoRA). The frozen base
//! gets no gradient; `x`, `A`, `B` and (when given) the gates do.
//!
//! Launch sequence. Forward: XA (rank-sized product) → grouped GEMM with the LoRA epilogue →
//! gate combination (down projection only). Backward: gate gradient and gated per-slot dY
//! (gates only) → YB → dX GEMM with the LoRA epilogue → slot sum (token-ordered input with
//! `k > 1`) → dA and dB by the Gram kernel (deterministic, no atomics). No host synchronisation.
//!
//! Layout of this module: the API (this file: weights, strategies, [`ExpertLinear`], [`Saved`],
//! [`Grads`], [`backward`]); `core` (the launch sequences on resolved weights); `strategy_a`
//! (selective dequantization of MXFP4 weights); `plan` (tile configurations through the
//! runtime's tuner, the `Auto` rule). The device tensors live in [`crate::buffers`] and
//! [`RowOrder`] in [`crate::routing`]; both are re-exported here.

mod core;
mod plan;
mod strategy_a;

use std::fmt;
use std::str::FromStr;

use cudarc::driver::CudaSlice;

pub use crate::buffers::{Bf16Matrix, DenseExperts, LoraWeights, MxExperts, NvExperts};
use crate::device::download_async;
use crate::error::{Error, Result, parse_name};
use crate::kernels::gemm::RoutingView;
use crate::kernels::gemm::RowMap;
use crate::kernels::routing::auto_gate;
use crate::routing::DeviceRouting;
pub use crate::routing::RowOrder;
use crate::runtime::Runtime;
use core::{
    ForwardParts, Resolved, backward_core, combine, forward_core, forward_gemm, forward_shape,
};
use kernels_gpu::shared::auto::AutoInputs;
use plan::Resolution;
pub use plan::{AUTO_NV_A_ROWS, auto_strategy, auto_strategy_nvfp4};
use strategy_a::Compact;
pub use strategy_a::active_experts;

/// The frozen base weights of an expert linear: dense bf16, MXFP4 or NVFP4 (the 4-bit formats
/// decoded inside the tensor-core K-loop by Strategy B, or dequantized by Strategy A).
#[derive(Clone, Copy)]
pub enum ExpertWeights<'a> {
    /// Dense bf16 experts.
    Bf16(&'a DenseExperts),
    /// MXFP4 experts, decoded in the kernels.
    Mxfp4(&'a MxExperts),
    /// NVFP4 experts, decoded in the kernels (an E4M3 block scale per 16 values folded with the
    /// tensor scale into one f32 factor). Strategy B needs K % 32 == 0 (a typed error
    /// otherwise; `Auto` then takes Strategy A).
    Nvfp4(&'a NvExperts),
}

/// How MXFP4 and NVFP4 weights are multiplied (ignored for bf16 weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Pick per call from the rows per active expert, the grid and the free memory
    /// (`kernels_gpu::shared::auto::auto_picks_a`). Below 256 routed rows that is B at once. Above,
    /// on a routing whose offsets no call has read yet, the device decides right after routing
    /// while the host queues Strategy B's forward on row ends the decision gates (all experts
    /// empty when it picks A); the host reads the answer, with the offsets, while those kernels
    /// run, so B costs no pipeline stall. The offsets are read back first instead when the last
    /// call on the same problem picked A (A needs them on the host; the runtime keeps each
    /// problem's last answer) or when B's tile configuration still has to be timed
    /// (`MXMOE_TUNE=1`).
    #[default]
    Auto,
    /// Strategy A: dequantize only the active experts into a compact bf16 buffer
    /// (`E_a·N·K` elements) and run the bf16 kernels on it.
    SelectiveDequant,
    /// Strategy B: decode the MXFP4 tiles inside the tensor-core K-loop; no bf16 copy, no host
    /// synchronisation.
    Fused,
}

/// Whether Strategy A keeps its compact bf16 buffer from forward to backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DequantBuffer {
    /// Keep it in [`Saved`] (fastest; holds `E_a·N·K` bf16 until backward).
    #[default]
    Keep,
    /// Free it after forward and dequantize again in backward (less memory between passes).
    Recompute,
}

impl Strategy {
    /// Every strategy, in declaration order.
    pub const ALL: [Strategy; 3] = [Strategy::Auto, Strategy::SelectiveDequant, Strategy::Fused];

    /// The name the CLI and the Python package use: `auto`, `selective`, `fused`.
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::SelectiveDequant => "selective",
            Strategy::Fused => "fused",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = Error;
    /// Parses [`Strategy::name`]. Errors: [`Error::InvalidArgument`] listing the names.
    fn from_str(s: &str) -> Result<Self> {
        parse_name("strategy", s, &Strategy::ALL.map(|v| (v.name(), v)))
    }
}

impl DequantBuffer {
    /// Every policy, in declaration order.
    pub const ALL: [DequantBuffer; 2] = [DequantBuffer::Keep, DequantBuffer::Recompute];

    /// `keep` or `recompute`.
    pub const fn name(self) -> &'static str {
        match self {
            DequantBuffer::Keep => "keep",
            DequantBuffer::Recompute => "recompute",
        }
    }
}

impl fmt::Display for DequantBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DequantBuffer {
    type Err = Error;
    /// Parses [`DequantBuffer::name`]. Errors: [`Error::InvalidArgument`] listing the names.
    fn from_str(s: &str) -> Result<Self> {
        parse_name(
            "dequant buffer",
            s,
            &DequantBuffer::ALL.map(|v| (v.name(), v)),
        )
    }
}

/// One LoRA-fused expert projection: the frozen weights, the optional LoRA, where input and
/// output rows live, and (for MXFP4 and NVFP4 weights) the strategy.
#[derive(Clone, Copy)]
pub struct ExpertLinear<'a> {
    /// Frozen base weights.
    pub weights: ExpertWeights<'a>,
    /// LoRA factors (`None`: rank 0, no LoRA term).
    pub lora: Option<&'a LoraWeights>,
    /// `Scattered`: `x` is in token order (`[T, K]`, each row feeding its k slots) or slot order
    /// (`[T·k, K]`); `Grouped`: `x` is `[L, K]` in the routing's grouped order.
    pub input_order: RowOrder,
    /// `Scattered`: output row per slot `t·k + j`; `Grouped`: output row per grouped row.
    pub output_order: RowOrder,
    /// Strategy for MXFP4 and NVFP4 weights.
    pub strategy: Strategy,
    /// Strategy A's buffer policy.
    pub dequant_buffer: DequantBuffer,
    /// Optional frozen bf16 bias `[E, N]`: `b[e]` is added to each output row of expert `e`
    /// before the output is rounded (and before gates combine the slots). It gets no gradient;
    /// with gates, `d_gates` sees it (it is part of each slot's output).
    pub bias: Option<&'a Bf16Matrix>,
}

impl<'a> ExpertLinear<'a> {
    /// A projection with the default strategy (`Auto`) and buffer policy (`Keep`).
    pub fn new(
        weights: ExpertWeights<'a>,
        lora: Option<&'a LoraWeights>,
        input_order: RowOrder,
        output_order: RowOrder,
    ) -> Self {
        Self {
            weights,
            lora,
            input_order,
            output_order,
            strategy: Strategy::Auto,
            dequant_buffer: DequantBuffer::Keep,
            bias: None,
        }
    }

    /// The same projection with another strategy.
    pub fn with_strategy(self, strategy: Strategy) -> Self {
        Self { strategy, ..self }
    }

    /// The same projection with a frozen bias `[E, N]` (or none).
    pub fn with_bias(self, bias: Option<&'a Bf16Matrix>) -> Self {
        Self { bias, ..self }
    }
}

/// The forward result.
pub struct Forward {
    /// `[T, N]` when gates were given (the gate-weighted sum over slots), otherwise `[L, N]` in
    /// the output order (dropped slots give zero rows).
    pub out: Bf16Matrix,
    /// The path that ran: `Fused` or `SelectiveDequant` for MXFP4 and NVFP4 weights, `Fused` for bf16.
    pub strategy: Strategy,
    /// The tile configuration the grouped GEMM ran with (a row of `shared::tiles::GEMM_CONFIGS`).
    pub gemm_config: usize,
}

/// What backward needs, and nothing else (SPEC §3.4): the inputs (shared handles of the
/// caller's `x`, routing, gates, weights and LoRA — reference-counted, never copied), the
/// forward's XA (`[L, r_pad]`, kept instead of recomputed), with gates the unreduced per-slot
/// output, and for Strategy A its compact state. It borrows nothing, so it can outlive the
/// caller's handles.
pub struct Saved {
    weights: OwnedWeights,
    lora: Option<LoraWeights>,
    output_order: RowOrder,
    x: Bf16Matrix,
    routing: DeviceRouting,
    gates: Option<Bf16Matrix>,
    x_map: RowMap,
    xa: Option<CudaSlice<u16>>,
    expanded: Option<Bf16Matrix>,
    compact: Option<Compact>,
}

/// The base weights as [`Saved`] keeps them (shared handles).
enum OwnedWeights {
    Bf16(DenseExperts),
    Mxfp4(MxExperts),
    Nvfp4(NvExperts),
}

impl OwnedWeights {
    fn of(w: ExpertWeights<'_>) -> Self {
        match w {
            ExpertWeights::Bf16(d) => OwnedWeights::Bf16(d.clone()),
            ExpertWeights::Mxfp4(m) => OwnedWeights::Mxfp4(m.clone()),
            ExpertWeights::Nvfp4(m) => OwnedWeights::Nvfp4(m.clone()),
        }
    }

    fn get(&self) -> ExpertWeights<'_> {
        match self {
            OwnedWeights::Bf16(d) => ExpertWeights::Bf16(d),
            OwnedWeights::Mxfp4(m) => ExpertWeights::Mxfp4(m),
            OwnedWeights::Nvfp4(m) => ExpertWeights::Nvfp4(m),
        }
    }
}

impl Saved {
    /// The forward's input `x`.
    pub fn input(&self) -> &Bf16Matrix {
        &self.x
    }
}

/// Gradients. The frozen base gets none.
pub struct Grads {
    /// Gradient of `x`, same shape as `x`.
    pub dx: Bf16Matrix,
    /// Gradient of `A`, `[E·r, K]` (`None` without LoRA; zero rows for experts without tokens).
    pub da: Option<Bf16Matrix>,
    /// Gradient of `B`, `[N, E·r]` (`None` without LoRA; zero columns for experts without tokens).
    pub db: Option<Bf16Matrix>,
    /// Gradient of the gates, `[T, k]` (`None` without gates).
    pub d_gates: Option<Bf16Matrix>,
    /// The tile configuration the dX GEMM ran with (a row of `shared::tiles::GEMM_CONFIGS`).
    pub gemm_config: usize,
}

impl<'a> ExpertLinear<'a> {
    /// The shape rule every backend enforces, checked once before a backend is chosen: the
    /// output features `N` and the reduction `K` of an expert projection must be positive
    /// multiples of 8 (the GEMM kernels move 16-byte rows of bf16; MXFP4 weights further need
    /// `K % 32 == 0`, checked by their container). [`ExpertLinear`]'s forward calls it, and
    /// callers that may run the CPU reference instead (the `mxmoe run` CLI) call it first, so a
    /// shape the GPU refuses is refused on the CPU with the same error.
    ///
    /// Errors: [`Error::InvalidArgument`] (`what` = `"expert weights"`) naming both values.
    pub fn check_dims(n: usize, k: usize) -> Result<()> {
        if k == 0 || n == 0 || !k.is_multiple_of(8) || !n.is_multiple_of(8) {
            return Err(Error::InvalidArgument {
                what: "expert weights",
                detail: format!("K = {k} and N = {n} must be positive multiples of 8"),
            });
        }
        Ok(())
    }

    fn validate(
        &self,
        x: &Bf16Matrix,
        routing: &DeviceRouting,
        gates: Option<&Bf16Matrix>,
    ) -> Result<RowMap> {
        let (e, n, k) = self.weights.shape();
        if e != routing.num_experts() {
            return Err(Error::Shape {
                tensor: "expert weights",
                expected: format!("{} experts (the routing's)", routing.num_experts()),
                actual: format!("{e} experts"),
            });
        }
        Self::check_dims(n, k)?;
        if x.cols() != k {
            return Err(Error::Shape {
                tensor: "x",
                expected: format!("{k} columns (K)"),
                actual: format!("{} columns", x.cols()),
            });
        }
        let (t, top_k, l) = (routing.tokens(), routing.top_k(), routing.rows());
        let map = match self.input_order {
            RowOrder::Grouped if x.rows() == l => RowMap::Grouped,
            RowOrder::Scattered if x.rows() == t => RowMap::Scattered {
                fan_out: top_k as u32,
            },
            RowOrder::Scattered if x.rows() == l => RowMap::Scattered { fan_out: 1 },
            _ => {
                return Err(Error::Shape {
                    tensor: "x",
                    expected: match self.input_order {
                        RowOrder::Grouped => format!("{l} rows (T·k, grouped)"),
                        RowOrder::Scattered => format!("{t} rows (T) or {l} rows (T·k)"),
                    },
                    actual: format!("{} rows", x.rows()),
                });
            }
        };
        if let Some(lora) = self.lora {
            let r = lora.rank;
            if r == 0 || r > kernels_gpu::shared::tiles::MAX_RANK as usize {
                return Err(Error::InvalidArgument {
                    what: "LoRA rank",
                    detail: format!(
                        "must be in 1..={} (use no LoRA for rank 0), got {r}",
                        kernels_gpu::shared::tiles::MAX_RANK
                    ),
                });
            }
            if lora.a.rows() != e * r || lora.a.cols() != k {
                return Err(Error::Shape {
                    tensor: "lora_A",
                    expected: format!("[{}, {k}] (E·r, K)", e * r),
                    actual: format!("[{}, {}]", lora.a.rows(), lora.a.cols()),
                });
            }
            if lora.b.rows() != n || lora.b.cols() != e * r {
                return Err(Error::Shape {
                    tensor: "lora_B",
                    expected: format!("[{n}, {}] (N, E·r)", e * r),
                    actual: format!("[{}, {}]", lora.b.rows(), lora.b.cols()),
                });
            }
            if !lora.scaling.is_finite() {
                return Err(Error::InvalidArgument {
                    what: "LoRA scaling",
                    detail: format!("must be finite, got {}", lora.scaling),
                });
            }
        }
        if let Some(b) = self.bias
            && (b.rows(), b.cols()) != (e, n)
        {
            return Err(Error::Shape {
                tensor: "bias",
                expected: format!("[{e}, {n}] (E, N)"),
                actual: format!("[{}, {}]", b.rows(), b.cols()),
            });
        }
        if let Some(g) = gates {
            if self.output_order != RowOrder::Scattered {
                return Err(Error::InvalidArgument {
                    what: "gates",
                    detail: "gates need scattered (slot-ordered) output".into(),
                });
            }
            if g.rows() != t || g.cols() != top_k {
                return Err(Error::Shape {
                    tensor: "gates",
                    expected: format!("[{t}, {top_k}]"),
                    actual: format!("[{}, {}]", g.rows(), g.cols()),
                });
            }
        }
        Ok(map)
    }

    /// Whether Strategy B's forward GEMM would run without timing tile configurations first
    /// (`plan::gemm_config_settled`).
    fn forward_gemm_settled(&self, gpu: &Runtime, routing: &DeviceRouting) -> bool {
        let shape = forward_shape(
            self.weights,
            self.lora,
            routing.num_experts(),
            routing.rows(),
        );
        plan::gemm_config_settled(gpu, &shape)
    }

    /// `Auto` decided on the device: queues the decision (`kernels::routing::auto_gate`) and
    /// its copy to the host, then Strategy B's XA and GEMM on the gated row ends (the routing's
    /// own when the rule picks B, all zero when it picks A, so B's kernels then find no rows),
    /// and only then waits for the copy — while those kernels run. The routing's offsets come
    /// back with the decision and are kept on it (Strategy A and later projections need them).
    /// Returns the finished forward when the rule picked B, `None` when it picked A (B's outputs
    /// are dropped unread; the caller runs A).
    fn forward_gated(
        &self,
        gpu: &Runtime,
        x: &Bf16Matrix,
        x_map: RowMap,
        routing: &DeviceRouting,
        gates: Option<&Bf16Matrix>,
        inputs: &AutoInputs,
    ) -> Result<Option<(Forward, Saved)>> {
        let gate = auto_gate(gpu, routing.expert_offsets(), routing.num_experts(), inputs)?;
        let pending = download_async(gpu, &gate.report)?;
        let resolved = Resolved {
            weights: self.weights,
            lora: self.lora,
            bias: self.bias.map(Bf16Matrix::data),
            routing: RoutingView::gated(routing.view(), &gate.gated)?,
        };
        let gemm = forward_gemm(gpu, &resolved, x, x_map, self.output_order, routing)?;
        let report = pending.wait()?;
        let Some((&picked_a, offsets)) = report.split_first() else {
            return Err(Error::InvalidArgument {
                what: "auto gate",
                detail: "the decision's read-back is empty".into(),
            });
        };
        routing.remember_host_offsets(offsets.into());
        gpu.auto_history().record(
            plan::history_key(inputs, routing.num_experts()),
            picked_a != 0,
        );
        if picked_a != 0 {
            return Ok(None);
        }
        let parts = combine(gpu, gemm, gates, routing)?;
        Ok(Some(self.finish(
            parts,
            Strategy::Fused,
            None,
            (x, x_map, routing, gates),
        )))
    }

    /// The forward's result and what backward needs, from the forward kernels' `parts`, the
    /// path that ran, Strategy A's compact state and the call's inputs.
    fn finish(
        &self,
        parts: ForwardParts,
        strategy: Strategy,
        compact: Option<Compact>,
        (x, x_map, routing, gates): (&Bf16Matrix, RowMap, &DeviceRouting, Option<&Bf16Matrix>),
    ) -> (Forward, Saved) {
        let ForwardParts {
            out,
            xa,
            expanded,
            gemm_config,
        } = parts;
        (
            Forward {
                out,
                strategy,
                gemm_config,
            },
            Saved {
                weights: OwnedWeights::of(self.weights),
                lora: self.lora.cloned(),
                output_order: self.output_order,
                x: x.clone(),
                routing: routing.clone(),
                gates: gates.cloned(),
                x_map,
                xa,
                expanded,
                compact,
            },
        )
    }

    /// Forward pass. `gates [T, k]` (down projection) combine the per-slot outputs into `[T, N]`.
    ///
    /// The returned [`Saved`] owns what backward reads: it shares `x`, the routing, the gates,
    /// the weights and the LoRA factors with the caller (reference-counted handles, no copies)
    /// and holds the forward's intermediates.
    pub fn forward(
        &self,
        gpu: &Runtime,
        x: &Bf16Matrix,
        routing: &DeviceRouting,
        gates: Option<&Bf16Matrix>,
    ) -> Result<(Forward, Saved)> {
        let x_map = self.validate(x, routing, gates)?;
        let resolution = plan::resolve_strategy(gpu, self.weights, self.strategy, routing, || {
            self.forward_gemm_settled(gpu, routing)
        })?;
        let strategy = match resolution {
            Resolution::Known(s) => s,
            Resolution::OnDevice(inputs) => {
                match self.forward_gated(gpu, x, x_map, routing, gates, &inputs)? {
                    Some(done) => return Ok(done),
                    None => Strategy::SelectiveDequant,
                }
            }
        };
        let compact = match (self.weights, strategy) {
            (ExpertWeights::Mxfp4(_) | ExpertWeights::Nvfp4(_), Strategy::SelectiveDequant) => {
                Some(Compact::build(
                    gpu,
                    self.weights,
                    self.lora,
                    self.bias,
                    routing,
                )?)
            }
            _ => None,
        };
        let resolved = match &compact {
            Some(c) => c.resolve(
                c.weights
                    .as_ref()
                    .expect("a fresh compact state holds its weights"),
                self.lora,
                self.bias,
                routing,
            )?,
            None => Resolved {
                weights: self.weights,
                lora: self.lora,
                bias: self.bias.map(Bf16Matrix::data),
                routing: routing.view(),
            },
        };
        let parts = forward_core(gpu, &resolved, x, x_map, self.output_order, gates, routing)?;
        let mut compact = compact;
        if self.dequant_buffer == DequantBuffer::Recompute
            && let Some(c) = compact.as_mut()
        {
            c.weights = None;
        }
        Ok(self.finish(parts, strategy, compact, (x, x_map, routing, gates)))
    }
}

/// Backward pass: `dy` has the shape of [`Forward::out`].
pub fn backward(gpu: &Runtime, saved: &Saved, dy: &Bf16Matrix) -> Result<Grads> {
    let routing = &saved.routing;
    let weights = saved.weights.get();
    let (e, n, _) = weights.shape();
    let expected_rows = if saved.gates.is_some() {
        routing.tokens()
    } else {
        routing.rows()
    };
    if dy.rows() != expected_rows || dy.cols() != n {
        return Err(Error::Shape {
            tensor: "dy",
            expected: format!("[{expected_rows}, {n}]"),
            actual: format!("[{}, {}]", dy.rows(), dy.cols()),
        });
    }
    let Some(c) = &saved.compact else {
        let resolved = Resolved {
            weights,
            lora: saved.lora.as_ref(),
            bias: None,
            routing: routing.view(),
        };
        return backward_core(gpu, saved, &resolved, dy);
    };
    // Strategy A: the compact weights (kept or dequantized again), compact LoRA and offsets.
    let recomputed;
    let compact_weights = match &c.weights {
        Some(d) => d,
        None => {
            recomputed = strategy_a::dequant_active(gpu, weights, c.active.ids())?;
            &recomputed
        }
    };
    // The backward reads no bias (the dX GEMM has none).
    let resolved = c.resolve(compact_weights, saved.lora.as_ref(), None, routing)?;
    let mut grads = backward_core(gpu, saved, &resolved, dy)?;
    // Scatter the compact LoRA gradients back to full size (zeros for inactive experts).
    c.scatter_grads(gpu, saved.lora.as_ref(), (e, n), &mut grads)?;
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_parse_the_names_they_display() {
        for s in Strategy::ALL {
            assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
        }
        for b in DequantBuffer::ALL {
            assert_eq!(b.to_string().parse::<DequantBuffer>().unwrap(), b);
        }
        assert_eq!(Strategy::SelectiveDequant.to_string(), "selective");
        let err = "greedy".parse::<Strategy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"strategy: expected "auto", "selective" or "fused", got "greedy""#
        );
    }
}
