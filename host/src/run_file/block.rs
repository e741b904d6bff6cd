//! Block mode: the gated MoE MLP block ([`MoeBlock`]) read from a file, on the device or the CPU
//! reference: SwiGLU (split gate/up halves, optional clamp limit) or gpt-oss's block (interleaved
//! gate/up rows, its clamped α-sigmoid GLU), either with optional frozen biases.

use crate::Runtime;
use crate::checkpoint::{Checkpoint, CheckpointErrorKind, StoredWeights, escape};
use crate::error::Result;
use crate::moe::{self, MoeBlock};
use crate::op::Bf16Matrix;
use crate::reference::moe::{
    Activation, ClampBoundary, GateUpLayout, MoeProblem, moe_forward, moe_forward_backward,
};
use crate::reference::{sum_bytes, tensor_bytes};

use super::{
    DeviceWeights, Lora, OutputTensor, ROUNDING, Routed, RunStrategy, file_error, load_ids,
    load_lora, metadata_f32, output, upload_lora,
};

/// The tensors besides the weights that block mode reads.
pub(super) const INPUTS: &[&str] = &[
    "expert_ids",
    "x",
    "gates",
    "dy",
    "gate_up_lora_a",
    "gate_up_lora_b",
    "down_lora_a",
    "down_lora_b",
    "gate_up_bias",
    "down_bias",
];

/// Metadata `activation`: SwiGLU (the default).
const SWIGLU: &str = "swiglu";
/// Metadata `activation`: gpt-oss's block.
const GPT_OSS: &str = "gpt_oss";
/// gpt-oss's defaults (`config.swiglu_alpha`, `config.swiglu_limit`).
const GPT_OSS_ALPHA: f32 = 1.702;
const GPT_OSS_LIMIT: f32 = 7.0;

/// The validated inputs of one MoE block call.
pub(super) struct Block {
    pub(super) gate_up: StoredWeights,
    pub(super) down: StoredWeights,
    experts: usize,
    pub(super) hidden: usize,
    pub(super) inter: usize,
    routed: Routed,
    x: Vec<f32>,
    gates: Vec<f32>,
    lora_gate_up: Option<Lora>,
    lora_down: Option<Lora>,
    activation: Activation,
    layout: GateUpLayout,
    /// `[E, 2I]`, in the layout's order.
    gate_up_bias: Option<Vec<f32>>,
    /// `[E, H]`.
    down_bias: Option<Vec<f32>>,
    dy: Option<Vec<f32>>,
}

/// A metadata error about the block's activation keys.
fn metadata_error(detail: String) -> crate::error::Error {
    file_error(CheckpointErrorKind::Metadata, detail)
}

/// A metadata value that must be finite and positive (`None` when absent; `what` names it in
/// the message).
fn positive(ck: &Checkpoint<'_>, key: &str, what: &str) -> Result<Option<f32>> {
    let v = metadata_f32(ck, key)?;
    if let Some(v) = v
        && v <= 0.0
    {
        return Err(metadata_error(format!(
            "`{key}` is {v}; {what} must be positive"
        )));
    }
    Ok(v)
}

/// The activation and gate/up layout from metadata `activation`, `limit`, `alpha` and
/// `clamp_boundary` (see [`super::FORMAT_HELP`]).
fn load_activation(ck: &Checkpoint<'_>) -> Result<(Activation, GateUpLayout)> {
    let limit = positive(ck, "limit", "the clamp limit")?;
    match ck.metadata_value("activation") {
        None | Some(SWIGLU) => {
            for key in ["alpha", "clamp_boundary"] {
                if ck.metadata_value(key).is_some() {
                    return Err(metadata_error(format!(
                        "`{key}` applies to activation = {GPT_OSS} only (the file's activation is {SWIGLU})"
                    )));
                }
            }
            Ok((Activation::SwiGlu { limit }, GateUpLayout::Split))
        }
        Some(GPT_OSS) => {
            let alpha = positive(ck, "alpha", "the sigmoid's alpha")?.unwrap_or(GPT_OSS_ALPHA);
            let boundary = match ck.metadata_value("clamp_boundary") {
                None => ClampBoundary::Strict,
                Some(name) => name.parse().map_err(|_| {
                    metadata_error(format!(
                        "`clamp_boundary` is `{}`, expected `{}` or `{}`",
                        escape(name),
                        ClampBoundary::Strict,
                        ClampBoundary::Inclusive
                    ))
                })?,
            };
            let activation = Activation::GptOss {
                alpha,
                limit: limit.unwrap_or(GPT_OSS_LIMIT),
                boundary,
            };
            Ok((activation, GateUpLayout::Interleaved))
        }
        Some(other) => Err(metadata_error(format!(
            "`activation` is `{}`, expected `{SWIGLU}` or `{GPT_OSS}`",
            escape(other)
        ))),
    }
}

/// The optional frozen bias `name` of shape `[experts, n]` (`dims` names the dimensions).
fn load_bias(
    ck: &Checkpoint<'_>,
    name: &str,
    experts: usize,
    n: usize,
    dims: &str,
) -> Result<Option<Vec<f32>>> {
    if !ck.contains(name) {
        return Ok(None);
    }
    let b = ck.read_float(name)?;
    b.expect_shape(&[Some(experts), Some(n)], dims)?;
    Ok(Some(b.data))
}

impl Block {
    /// Reads and checks everything the call needs (see [`super::FORMAT_HELP`]).
    pub(super) fn load(ck: &Checkpoint<'_>) -> Result<Self> {
        let gate_up = ck.read_expert_weights("gate_up_proj")?;
        let down = ck.read_expert_weights("down_proj")?;
        let (experts, two_i, hidden) = gate_up.dims();
        if !two_i.is_multiple_of(2) {
            return Err(file_error(
                CheckpointErrorKind::Shape,
                format!(
                    "`gate_up_proj` has {two_i} rows per expert; it needs 2*I (an even number)"
                ),
            ));
        }
        let inter = two_i / 2;
        if down.dims() != (experts, hidden, inter) {
            let (a, b, c) = down.dims();
            return Err(file_error(
                CheckpointErrorKind::Shape,
                format!(
                    "`down_proj` is [{a}, {b}, {c}], expected [{experts}, {hidden}, {inter}] ([E, H, I] for gate_up_proj [{experts}, {two_i}, {hidden}])"
                ),
            ));
        }
        let routed = load_ids(ck, experts)?;
        let (tokens, top_k) = (routed.tokens, routed.top_k);
        let x = ck.read_float("x")?;
        x.expect_shape(&[Some(tokens), Some(hidden)], "(T, H)")?;
        let gates = ck.read_float("gates")?;
        gates.expect_shape(&[Some(tokens), Some(top_k)], "(T, k)")?;
        let lora_gate_up = load_lora(
            ck,
            ["gate_up_lora_a", "gate_up_lora_b"],
            &["gate_up_scaling", "scaling"],
            experts,
            hidden,
            two_i,
        )?;
        let lora_down = load_lora(
            ck,
            ["down_lora_a", "down_lora_b"],
            &["down_scaling", "scaling"],
            experts,
            inter,
            hidden,
        )?;
        let (activation, layout) = load_activation(ck)?;
        let gate_up_bias = load_bias(ck, "gate_up_bias", experts, two_i, "(E, 2I)")?;
        let down_bias = load_bias(ck, "down_bias", experts, hidden, "(E, H)")?;
        let dy = if ck.contains("dy") {
            let d = ck.read_float("dy")?;
            d.expect_shape(&[Some(tokens), Some(hidden)], "(T, H): the output's shape")?;
            Some(d.data)
        } else {
            None
        };
        Ok(Self {
            gate_up,
            down,
            experts,
            hidden,
            inter,
            routed,
            x: x.data,
            gates: gates.data,
            lora_gate_up,
            lora_down,
            activation,
            layout,
            gate_up_bias,
            down_bias,
            dy,
        })
    }

    fn outputs(
        &self,
        out: Vec<f32>,
        d_x: Option<Vec<f32>>,
        d_gate_up: Option<(Vec<f32>, Vec<f32>)>,
        d_down: Option<(Vec<f32>, Vec<f32>)>,
        d_gates: Option<Vec<f32>>,
    ) -> Vec<OutputTensor> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, top_k) = (self.routed.tokens, self.routed.top_k);
        let mut v = vec![output("out", vec![t, h], out)];
        if let Some(d) = d_x {
            v.push(output("d_x", vec![t, h], d));
        }
        if let Some(d) = d_gates {
            v.push(output("d_gates", vec![t, top_k], d));
        }
        if let (Some((da, db)), Some(l)) = (d_gate_up, &self.lora_gate_up) {
            v.push(output("d_gate_up_lora_a", vec![e * l.rank, h], da));
            v.push(output("d_gate_up_lora_b", vec![2 * i, e * l.rank], db));
        }
        if let (Some((da, db)), Some(l)) = (d_down, &self.lora_down) {
            v.push(output("d_down_lora_a", vec![e * l.rank, i], da));
            v.push(output("d_down_lora_b", vec![h, e * l.rank], db));
        }
        v
    }

    /// Elements of the biases present (`E·2I` and `E·H`).
    fn bias_elems(&self) -> Option<usize> {
        let len = |b: &Option<Vec<f32>>| b.as_ref().map_or(0, Vec::len);
        len(&self.gate_up_bias).checked_add(len(&self.down_bias))
    }

    /// As `Projection::host_bytes`, for the block (both projections and the activation between).
    pub(super) fn host_bytes(&self, cpu: bool) -> Option<u128> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, s) = (self.routed.tokens, self.routed.slots());
        let rank = |l: &Option<Lora>| l.as_ref().map_or(0, |l| l.rank);
        let loras = sum_bytes(&[
            tensor_bytes(&[e, rank(&self.lora_gate_up), h + 2 * i], 1),
            tensor_bytes(&[e, rank(&self.lora_down), i + h], 1),
        ]);
        let outputs = sum_bytes(&[
            tensor_bytes(&[t, h], 2), // out, d_x
            tensor_bytes(&[s], 1),
            loras,
        ]);
        let written = outputs.and_then(|o| o.checked_mul(4 + 2 + 2));
        if !cpu {
            return written;
        }
        let weights = tensor_bytes(&[e, 3 * i, h], 1);
        sum_bytes(&[
            written,
            weights.and_then(|w| w.checked_mul(4 + 8)), // f32, then f64
            sum_bytes(&[tensor_bytes(&[t, h], 2), loras]).and_then(|b| b.checked_mul(8)),
            // Per projection, forward and backward: outputs, gradients and their copies.
            tensor_bytes(&[s, 2 * i + i + h], 8 * 4),
            // The biases' bf16-rounded f64 copies, one per linear pass (two live at most).
            self.bias_elems().and_then(|n| tensor_bytes(&[n], 8 * 2)),
        ])
    }

    /// As `Projection::device_bytes`, for the block.
    pub(super) fn device_bytes(&self, strategy: RunStrategy) -> Option<u128> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, s) = (self.routed.tokens, self.routed.slots());
        let rank = |l: &Option<Lora>| l.as_ref().map_or(0, |l| l.rank);
        sum_bytes(&[
            super::device_weight_bytes(&self.gate_up, strategy),
            super::device_weight_bytes(&self.down, strategy),
            tensor_bytes(&[t, h], 2 * 3),
            tensor_bytes(&[s, 2 * i + i + h + h], 2 * 3),
            tensor_bytes(&[e, rank(&self.lora_gate_up), h + 2 * i], 2 * 3),
            tensor_bytes(&[e, rank(&self.lora_down), i + h], 2 * 3),
            tensor_bytes(&[s], 16),
            self.bias_elems().and_then(|n| tensor_bytes(&[n], 2)),
        ])
    }

    pub(super) fn size_label(&self) -> String {
        format!(
            "out [{}, {}] from T = {}, k = {}, gate_up [{}, {}, {}], down [{}, {}, {}]",
            self.routed.tokens,
            self.hidden,
            self.routed.tokens,
            self.routed.top_k,
            self.experts,
            2 * self.inter,
            self.hidden,
            self.experts,
            self.hidden,
            self.inter
        )
    }

    /// The CPU reference ([`super::ROUNDING`]).
    pub(super) fn cpu(&self) -> Result<Vec<OutputTensor>> {
        let routing = self.routed.reference(self.experts)?;
        let (gu, dn) = (self.gate_up.to_f32(), self.down.to_f32());
        let p = MoeProblem {
            x: &self.x,
            num_experts: self.experts,
            hidden: self.hidden,
            intermediate: self.inter,
            gate_up: &gu,
            down: &dn,
            lora_gate_up: self.lora_gate_up.as_ref().map(Lora::reference),
            lora_down: self.lora_down.as_ref().map(Lora::reference),
            gates: &self.gates,
            activation: self.activation,
            layout: self.layout,
            gate_up_bias: self.gate_up_bias.as_deref(),
            down_bias: self.down_bias.as_deref(),
        };
        let Some(dy) = &self.dy else {
            let fwd = moe_forward(&p, &routing, ROUNDING)?;
            return Ok(self.outputs(fwd.y, None, None, None, None));
        };
        let (fwd, g) = moe_forward_backward(&p, &routing, dy, ROUNDING)?;
        Ok(self.outputs(
            fwd.y,
            Some(g.dx),
            g.gate_up.map(|l| (l.da, l.db)),
            g.down.map(|l| (l.da, l.db)),
            Some(g.d_gates),
        ))
    }

    /// [`crate::moe`] on the device; returns the outputs and the paths that ran.
    pub(super) fn gpu(
        &self,
        rt: &Runtime,
        strategy: RunStrategy,
    ) -> Result<(Vec<OutputTensor>, String)> {
        let (e, h, i) = (self.experts, self.hidden, self.inter);
        let (t, top_k) = (self.routed.tokens, self.routed.top_k);
        let gate_up = DeviceWeights::upload(rt, &self.gate_up, strategy)?;
        let down = DeviceWeights::upload(rt, &self.down, strategy)?;
        let routing = self.routed.device(rt, e)?;
        let x = Bf16Matrix::from_f32(rt, &self.x, t, h)?;
        let gates = Bf16Matrix::from_f32(rt, &self.gates, t, top_k)?;
        let lora_gate_up = upload_lora(rt, self.lora_gate_up.as_ref(), e, h, 2 * i)?;
        let lora_down = upload_lora(rt, self.lora_down.as_ref(), e, i, h)?;
        let bias = |b: &Option<Vec<f32>>, n: usize| {
            b.as_ref()
                .map(|b| Bf16Matrix::from_f32(rt, b, e, n))
                .transpose()
        };
        let (gate_up_bias, down_bias) =
            (bias(&self.gate_up_bias, 2 * i)?, bias(&self.down_bias, h)?);
        let block = MoeBlock {
            lora_gate_up: lora_gate_up.as_ref(),
            lora_down: lora_down.as_ref(),
            strategy: strategy.op(),
            activation: self.activation,
            layout: self.layout,
            gate_up_bias: gate_up_bias.as_ref(),
            down_bias: down_bias.as_ref(),
            ..MoeBlock::new(gate_up.as_op(), down.as_op())
        };
        let (y, saved) = block.forward(rt, &x, &routing, &gates)?;
        let (s_up, s_down) = saved.strategies();
        let ran = format!("gate_up {}, down {}", gate_up.ran(s_up), down.ran(s_down));
        let out = y.to_f32(rt)?;
        let Some(dy) = &self.dy else {
            return Ok((self.outputs(out, None, None, None, None), ran));
        };
        let dy = Bf16Matrix::from_f32(rt, dy, t, h)?;
        let g = moe::backward(rt, &saved, &dy)?;
        let pair = |l: &Option<moe::LoraGrads>| -> Result<Option<(Vec<f32>, Vec<f32>)>> {
            l.as_ref()
                .map(|l| Ok((l.da.to_f32(rt)?, l.db.to_f32(rt)?)))
                .transpose()
        };
        let mut d_gates = g.d_gates.to_f32(rt)?;
        for slot in self.routed.dropped() {
            d_gates[slot] = 0.0;
        }
        Ok((
            self.outputs(
                out,
                Some(g.dx.to_f32(rt)?),
                pair(&g.gate_up)?,
                pair(&g.down)?,
                Some(d_gates),
            ),
            ran,
        ))
    }

    /// The activation's part of [`Self::describe`]: `, limit L` for SwiGLU with a clamp, the
    /// gpt-oss parameters, and the biases present.
    fn describe_activation(&self) -> String {
        let mut s = match self.activation {
            Activation::SwiGlu { limit } => limit.map_or(String::new(), |l| format!(", limit {l}")),
            Activation::GptOss {
                alpha,
                limit,
                boundary,
            } => format!(
                ", gpt-oss activation (alpha {alpha}, limit {limit}, {boundary} clamp boundary, interleaved gate/up rows)"
            ),
        };
        match (&self.gate_up_bias, &self.down_bias) {
            (None, None) => {}
            (Some(_), None) => s.push_str(", gate_up bias"),
            (None, Some(_)) => s.push_str(", down bias"),
            (Some(_), Some(_)) => s.push_str(", gate_up and down biases"),
        }
        s
    }

    /// Output metadata of the resolved activation (defaults filled in) for `activation =
    /// gpt_oss`; none for SwiGLU, whose output metadata is the input's.
    pub(super) fn metadata(&self) -> Vec<(&'static str, String)> {
        match self.activation {
            Activation::SwiGlu { .. } => Vec::new(),
            Activation::GptOss {
                alpha,
                limit,
                boundary,
            } => vec![
                (super::META_ACTIVATION, GPT_OSS.to_string()),
                (super::META_ALPHA, alpha.to_string()),
                (super::META_LIMIT, limit.to_string()),
                (super::META_CLAMP_BOUNDARY, boundary.to_string()),
            ],
        }
    }

    pub(super) fn describe(&self) -> String {
        let rank = |l: &Option<Lora>| l.as_ref().map_or(0, |l| l.rank);
        format!(
            "one MoE block: gate_up {}, down {}, T = {}, k = {}, LoRA ranks {}/{}{}{}",
            self.gate_up.describe(),
            self.down.describe(),
            self.routed.tokens,
            self.routed.top_k,
            rank(&self.lora_gate_up),
            rank(&self.lora_down),
            self.describe_activation(),
            if self.dy.is_some() {
                ""
            } else {
                ", forward only (no dy)"
            },
        )
    }
}
