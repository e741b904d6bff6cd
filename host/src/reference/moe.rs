//! Reference of the whole gated MoE MLP block (SPEC §6): the gate/up projection, a gated
//! activation ([`Activation`]: SwiGLU with DeepSeek-V4's optional clamp limit, or gpt-oss's
//! clamped α-sigmoid GLU with its `+1`), and the gated down projection, forward and backward,
//! built on [`super::linear_forward`] / [`super::linear_backward`].
//!
//! # The block
//!
//! With routing `(T tokens, top_k)`, `x [T, H]`, `gate_up [E, 2I, H]` and `down [E, H, I]`
//! (checkpoint layouts), optional frozen biases `b_gu [E, 2I]` and `b_d [E, H]`, optional LoRA on
//! each projection and gates `[T, top_k]`:
//!
//! 1. `gu = up(x)`: the expert linear with token-ordered input (`fan_out = top_k`) and grouped
//!    output, `[L_valid, 2I]`, `b_gu` of the row's expert included (before the rounding);
//! 2. `h = act(gate, up)`, `[L_valid, I]`: per grouped row and unit `i`, `gate` and `up` are
//!    columns `i` and `I + i` of `gu` ([`GateUpLayout::Split`]: the first half is the gate) or
//!    columns `2i` and `2i + 1` ([`GateUpLayout::Interleaved`]: gpt-oss's checkpoint order, which
//!    the rows of `gate_up`, `b_gu` and the LoRA B keep: nothing is permuted);
//!    - [`Activation::SwiGlu`]: `g = min(gate, lim)` and `u = clamp(up, −lim, lim)` when a limit
//!      is set (identities otherwise), `h = silu(g)·u`;
//!    - [`Activation::GptOss`]: `g = min(gate, L)`, `u = clamp(up, −L, L)` (no lower bound on the
//!      gate; the `+1` uses the clamped up), `h = (u + 1)·g·σ(α·g)`;
//! 3. `y = down(h)`: the expert linear with grouped input, scattered output and the gates,
//!    `[T, H]`: `y_t = Σ_j w[t, j]·o_{t,j}` with `o = h·W_dᵀ + s·XA·Bᵀ + b_d[e]`, so the down
//!    bias is scaled by the routing weight.
//!
//! Backward (`dy [T, H]`): the down projection's backward gives `dh [L_valid, I]` (its input
//! gradient), the down LoRA gradients and `d_gates[t, j] = ⟨dy_t, o_{t,j}⟩` (`b_d` included); the
//! activation's derivative gives `d_gu [L_valid, 2I]` (in the layout's columns):
//! - SwiGLU: `d_gate = dh·u·σ(g)·(1 + g·(1 − σ(g)))` where `gate ≤ lim` (else 0),
//!   `d_up = dh·silu(g)` where `−lim ≤ up ≤ lim` (else 0) — the boundary passes the gradient
//!   ([`ClampBoundary::Inclusive`]);
//! - gpt-oss: `d_gate = dh·(u + 1)·(σ(αg) + α·g·σ(αg)·(1 − σ(αg)))` where the gate passes `min`,
//!   `d_up = dh·g·σ(αg)` where the up passes the clamp; at exactly `±L` the [`ClampBoundary`]
//!   decides (`Strict`: `gate < L`, `−L < up < L`, current torch; `Inclusive`: `≤`, older
//!   torch).
//!
//! The up projection's backward with `d_gu` as its (grouped) output gradient gives `dx [T, H]`
//! and the gate/up LoRA gradients. The frozen base weights and biases get no gradient.
//!
//! # Rounding points ([`Rounding::Bf16`])
//!
//! Those of the two linears (see [`super::linear`]) plus the activation's, which are where the
//! GPU block stores bf16 tensors (the same for both activations and layouts):
//! - `gu` is rounded once, bias included (it is the up projection's bf16 output);
//! - `h` is rounded once, computed (here in `f64`, on the device in `f32`) from the rounded `gu`;
//! - the down projection's per-slot rows `o` are rounded once, bias included, then `y` (their
//!   gated sum); `dh`, `d_gates` (from the rounded `o`) and the LoRA gradients are rounded by the
//!   linears;
//! - `d_gu` is rounded once, computed from the rounded `gu` and `dh`;
//! - `dx` is the up projection's rounded slot sum of rounded per-slot rows.
//!
//! The biases and the other inputs are rounded to bf16 on entry, as the upload would.
//!
//! In [`Rounding::Exact`] mode nothing is rounded to bf16; the intermediate tensors pass between
//! the stages as `f32` (the linears' public results), which the finite-difference check's
//! tolerance absorbs.

use crate::error::{Error, Result};

use super::Rounding;
use super::linear::{LinearProblem, linear_backward, linear_forward};
pub use crate::activation::{Activation, ClampBoundary, GateUpLayout};
use crate::routing::{Routing, RowOrder};

/// LoRA factors of one projection, expert-major (SPEC §3.1): `a [E·r, K]`, `b [N, E·r]`.
#[derive(Debug, Clone, Copy)]
pub struct RefLora<'a> {
    /// `A`, `[E·rank, K]`.
    pub a: &'a [f32],
    /// `B`, `[N, E·rank]`.
    pub b: &'a [f32],
    /// Rank `r`.
    pub rank: usize,
    /// Scaling `s`.
    pub scaling: f32,
}

/// The reference math of [`Activation`] (in `f64`), beside the type in [`crate::activation`].
impl Activation {
    /// `h` of one element, in `f64`.
    pub fn value(self, gate: f64, up: f64) -> f64 {
        match self {
            Activation::SwiGlu { limit } => swiglu(gate, up, limit.map(f64::from)),
            Activation::GptOss { alpha, limit, .. } => {
                gpt_oss_glu(gate, up, f64::from(alpha), f64::from(limit))
            }
        }
    }

    /// `(d_gate, d_up)` of one element for the output gradient `dh`, clamp masks included.
    pub fn grad(self, gate: f64, up: f64, dh: f64) -> (f64, f64) {
        match self {
            Activation::SwiGlu { limit } => swiglu_grad(gate, up, dh, limit.map(f64::from)),
            Activation::GptOss {
                alpha,
                limit,
                boundary,
            } => gpt_oss_glu_grad(gate, up, dh, f64::from(alpha), f64::from(limit), boundary),
        }
    }
}

/// One gated-MLP block problem. All tensors are row-major `f32` slices; in
/// [`Rounding::Bf16`] mode they are rounded to bf16 before use (as the upload would).
#[derive(Debug, Clone, Copy)]
pub struct MoeProblem<'a> {
    /// Token activations `[T, H]` (`T` = the routing's tokens).
    pub x: &'a [f32],
    /// Experts `E`.
    pub num_experts: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Expert intermediate size `I`.
    pub intermediate: usize,
    /// Dequantized gate/up weights `[E, 2I, H]`, rows in [`MoeProblem::layout`]'s order.
    pub gate_up: &'a [f32],
    /// Dequantized down weights `[E, H, I]`.
    pub down: &'a [f32],
    /// LoRA of the gate/up projection (`K = H`, `N = 2I`; the rows of B in the layout's order).
    pub lora_gate_up: Option<RefLora<'a>>,
    /// LoRA of the down projection (`K = I`, `N = H`).
    pub lora_down: Option<RefLora<'a>>,
    /// Routing weights `[T, top_k]`.
    pub gates: &'a [f32],
    /// The activation (and its clamp).
    pub activation: Activation,
    /// Where the gate and up columns sit in the gate/up projection's output.
    pub layout: GateUpLayout,
    /// Frozen gate/up bias `[E, 2I]` (in the layout's order), added before the activation.
    pub gate_up_bias: Option<&'a [f32]>,
    /// Frozen down bias `[E, H]`, added to each slot's row before the gates multiply it.
    pub down_bias: Option<&'a [f32]>,
}

/// The reference forward's results.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeRefForward {
    /// Block output `[T, H]`.
    pub y: Vec<f32>,
    /// Gate/up projection output `[L_valid, 2I]`, grouped rows.
    pub gu: Vec<f32>,
    /// Activation `[L_valid, I]`, grouped rows.
    pub h: Vec<f32>,
}

/// LoRA gradients of one projection.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLoraGrads {
    /// `dA`, `[E·r, K]`.
    pub da: Vec<f32>,
    /// `dB`, `[N, E·r]`.
    pub db: Vec<f32>,
}

/// The reference backward's results (the frozen base weights get none).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeRefGrads {
    /// Gradient of `x`, `[T, H]`.
    pub dx: Vec<f32>,
    /// Gate/up LoRA gradients (present exactly when that projection has LoRA).
    pub gate_up: Option<RefLoraGrads>,
    /// Down LoRA gradients (present exactly when that projection has LoRA).
    pub down: Option<RefLoraGrads>,
    /// Gradient of the gates, `[T, top_k]`.
    pub d_gates: Vec<f32>,
    /// Gradient of the activation output `h`, `[L_valid, I]`.
    pub dh: Vec<f32>,
    /// Gradient of the gate/up output `gu`, `[L_valid, 2I]`.
    pub d_gu: Vec<f32>,
}

/// gpt-oss's activation of one element: `(clamp(up, −L, L) + 1) · g · σ(α·g)` with
/// `g = min(gate, L)`, in `f64`.
pub fn gpt_oss_glu(gate: f64, up: f64, alpha: f64, limit: f64) -> f64 {
    let (g, u) = (gate.min(limit), up.clamp(-limit, limit));
    (u + 1.0) * g * sigmoid(alpha * g)
}

/// gpt-oss's activation gradient for one element: `(d_gate, d_up)` for the output gradient `dh`,
/// with the clamp masks of `boundary` (see the module documentation).
pub fn gpt_oss_glu_grad(
    gate: f64,
    up: f64,
    dh: f64,
    alpha: f64,
    limit: f64,
    boundary: ClampBoundary,
) -> (f64, f64) {
    let (g, u) = (gate.min(limit), up.clamp(-limit, limit));
    let s = sigmoid(alpha * g);
    let d_gate = if boundary.passes_min(gate, limit) {
        dh * (u + 1.0) * (s + alpha * g * s * (1.0 - s))
    } else {
        0.0
    };
    let d_up = if boundary.passes_clamp(up, limit) {
        dh * g * s
    } else {
        0.0
    };
    (d_gate, d_up)
}

/// The activation of one element: `silu(min(gate, lim)) · clamp(up, −lim, lim)` (no clamp
/// without a limit), in `f64`.
pub fn swiglu(gate: f64, up: f64, limit: Option<f64>) -> f64 {
    let (g, u) = clamp_pair(gate, up, limit);
    g * sigmoid(g) * u
}

/// The activation's gradient for one element: `(d_gate, d_up)` for the output gradient `dh`
/// (see the module documentation for the formulas and the clamp masks).
pub fn swiglu_grad(gate: f64, up: f64, dh: f64, limit: Option<f64>) -> (f64, f64) {
    let (g, u) = clamp_pair(gate, up, limit);
    let s = sigmoid(g);
    let (gate_passes, up_passes) = match limit {
        Some(lim) => (gate <= lim, (-lim..=lim).contains(&up)),
        None => (true, true),
    };
    let d_gate = if gate_passes {
        dh * u * s * (1.0 + g * (1.0 - s))
    } else {
        0.0
    };
    let d_up = if up_passes { dh * g * s } else { 0.0 };
    (d_gate, d_up)
}

/// `(min(gate, lim), clamp(up, −lim, lim))`, or the inputs without a limit.
fn clamp_pair(gate: f64, up: f64, limit: Option<f64>) -> (f64, f64) {
    match limit {
        Some(lim) => (gate.min(lim), up.clamp(-lim, lim)),
        None => (gate, up),
    }
}

/// The logistic function, overflow-free.
fn sigmoid(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// Runs the block forward (see the module documentation).
///
/// Errors: [`Error::Shape`] for a tensor whose length does not match its shape,
/// [`Error::InvalidArgument`] for a zero dimension, an invalid limit or an inconsistent routing
/// (as reported by the linears).
pub fn moe_forward(
    p: &MoeProblem<'_>,
    routing: &Routing,
    rounding: Rounding,
) -> Result<MoeRefForward> {
    check(p, routing)?;
    let up = linear_forward(&up_problem(p, routing), routing, rounding)?;
    let gu = up.out;
    let h = activation(&gu, p, rounding);
    let down = linear_forward(&down_problem(p, routing, &h), routing, rounding)?;
    let y = down.y.ok_or_else(|| Error::InvalidArgument {
        what: "down projection",
        detail: "the gated linear returned no gate-reduced output".into(),
    })?;
    Ok(MoeRefForward { y, gu, h })
}

/// Runs the block backward for `dy [T, H]` (the forward is recomputed internally).
///
/// Errors as [`moe_forward`], plus [`Error::Shape`] for a `dy` of the wrong length.
pub fn moe_backward(
    p: &MoeProblem<'_>,
    routing: &Routing,
    dy: &[f32],
    rounding: Rounding,
) -> Result<MoeRefGrads> {
    moe_forward_backward(p, routing, dy, rounding).map(|(_, grads)| grads)
}

/// Runs the forward and the backward for `dy [T, H]`, sharing one forward.
///
/// Errors as [`moe_backward`].
pub fn moe_forward_backward(
    p: &MoeProblem<'_>,
    routing: &Routing,
    dy: &[f32],
    rounding: Rounding,
) -> Result<(MoeRefForward, MoeRefGrads)> {
    let fwd = moe_forward(p, routing, rounding)?;
    let down = linear_backward(&down_problem(p, routing, &fwd.h), routing, dy, rounding)?;
    let dh = down.dx;
    let d_gu = activation_grad(&fwd.gu, &dh, p, rounding);
    let up = linear_backward(&up_problem(p, routing), routing, &d_gu, rounding)?;
    let d_gates = down.d_gates.ok_or_else(|| Error::InvalidArgument {
        what: "down projection",
        detail: "the gated linear returned no gate gradient".into(),
    })?;
    let grads = MoeRefGrads {
        dx: up.dx,
        gate_up: p.lora_gate_up.map(|_| RefLoraGrads {
            da: up.da,
            db: up.db,
        }),
        down: p.lora_down.map(|_| RefLoraGrads {
            da: down.da,
            db: down.db,
        }),
        d_gates,
        dh,
        d_gu,
    };
    Ok((fwd, grads))
}

/// `h = rnd(act(gate, up))` over grouped rows of `gu [rows, 2I]`.
fn activation(gu: &[f32], p: &MoeProblem<'_>, rounding: Rounding) -> Vec<f32> {
    let width = p.intermediate;
    let mut h = Vec::with_capacity(gu.len() / 2);
    for row in gu.chunks_exact(2 * width) {
        for i in 0..width {
            let (gate, up) = p.layout.columns(i, width);
            let v = p.activation.value(f64::from(row[gate]), f64::from(row[up]));
            h.push(rounding.apply(v) as f32);
        }
    }
    h
}

/// `d_gu = rnd(act'(gate, up)·dh)` over grouped rows (`[rows, 2I]`, in the layout's columns).
fn activation_grad(gu: &[f32], dh: &[f32], p: &MoeProblem<'_>, rounding: Rounding) -> Vec<f32> {
    let width = p.intermediate;
    let mut d_gu = vec![0f32; gu.len()];
    for ((row, d_row), dh_row) in gu
        .chunks_exact(2 * width)
        .zip(d_gu.chunks_exact_mut(2 * width))
        .zip(dh.chunks_exact(width))
    {
        for (i, &dh) in dh_row.iter().enumerate() {
            let (gate, up) = p.layout.columns(i, width);
            let (d_gate, d_up) =
                p.activation
                    .grad(f64::from(row[gate]), f64::from(row[up]), f64::from(dh));
            d_row[gate] = rounding.apply(d_gate) as f32;
            d_row[up] = rounding.apply(d_up) as f32;
        }
    }
    d_gu
}

/// The gate/up projection: token-ordered `x [T, H]` (each row feeding its `top_k` slots),
/// grouped output `[L_valid, 2I]`, no gates.
fn up_problem<'a>(p: &MoeProblem<'a>, routing: &Routing) -> LinearProblem<'a> {
    let (lora_a, lora_b, rank, scaling) = lora_parts(p.lora_gate_up);
    LinearProblem {
        x: p.x,
        x_rows: routing.tokens,
        w: p.gate_up,
        num_experts: p.num_experts,
        n: 2 * p.intermediate,
        k: p.hidden,
        lora_a,
        lora_b,
        rank,
        scaling,
        fan_out: routing.top_k,
        input_order: RowOrder::Scattered,
        output_order: RowOrder::Grouped,
        gates: None,
        bias: p.gate_up_bias,
    }
}

/// The down projection: grouped `h [L_valid, I]`, scattered output combined by the gates.
fn down_problem<'a>(p: &MoeProblem<'a>, routing: &Routing, h: &'a [f32]) -> LinearProblem<'a> {
    let (lora_a, lora_b, rank, scaling) = lora_parts(p.lora_down);
    LinearProblem {
        x: h,
        x_rows: routing.num_rows(),
        w: p.down,
        num_experts: p.num_experts,
        n: p.hidden,
        k: p.intermediate,
        lora_a,
        lora_b,
        rank,
        scaling,
        fan_out: 1,
        input_order: RowOrder::Grouped,
        output_order: RowOrder::Scattered,
        gates: Some(p.gates),
        bias: p.down_bias,
    }
}

/// `(A, B, rank, scaling)`, or empty factors of rank 0 without LoRA.
fn lora_parts<'a>(lora: Option<RefLora<'a>>) -> (&'a [f32], &'a [f32], usize, f32) {
    match lora {
        Some(l) => (l.a, l.b, l.rank, l.scaling),
        None => (&[], &[], 0, 0.0),
    }
}

/// Checks that `actual` is the element count of shape `dims` (or errors naming `tensor`).
fn expect_len(tensor: &'static str, actual: usize, dims: &[usize]) -> Result<()> {
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::InvalidArgument {
            what: tensor,
            detail: format!("element count of shape {dims:?} overflows usize"),
        })?;
    if actual != expected {
        return Err(Error::Shape {
            tensor,
            expected: format!("{expected} elements ({dims:?})"),
            actual: format!("{actual} elements"),
        });
    }
    Ok(())
}

/// Block-level checks (the linears check the rest, including the routing).
fn check(p: &MoeProblem<'_>, routing: &Routing) -> Result<()> {
    if p.num_experts == 0 || p.hidden == 0 || p.intermediate == 0 {
        return Err(Error::InvalidArgument {
            what: "MoE block",
            detail: format!(
                "E = {}, H = {}, I = {} must all be positive",
                p.num_experts, p.hidden, p.intermediate
            ),
        });
    }
    p.activation.check()?;
    let (e, h, i) = (p.num_experts, p.hidden, p.intermediate);
    expect_len("x", p.x.len(), &[routing.tokens, h])?;
    expect_len("gate_up", p.gate_up.len(), &[e, 2 * i, h])?;
    expect_len("down", p.down.len(), &[e, h, i])?;
    expect_len("gates", p.gates.len(), &[routing.tokens, routing.top_k])?;
    if let Some(b) = p.gate_up_bias {
        expect_len("gate_up bias", b.len(), &[e, 2 * i])?;
    }
    if let Some(b) = p.down_bias {
        expect_len("down bias", b.len(), &[e, h])?;
    }
    if let Some(l) = p.lora_gate_up {
        expect_len("gate_up LoRA A", l.a.len(), &[e * l.rank, h])?;
        expect_len("gate_up LoRA B", l.b.len(), &[2 * i, e * l.rank])?;
    }
    if let Some(l) = p.lora_down {
        expect_len("down LoRA A", l.a.len(), &[e * l.rank, i])?;
        expect_len("down LoRA B", l.b.len(), &[h, e * l.rank])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::XorShift;
    use crate::reference::routing::flatten_sort_count;
    use crate::shared::bf16::round_bf16;
    use crate::test_rng::{assert_invalid_argument, assert_shape_error};

    /// A tiny block configuration.
    #[derive(Debug, Clone, Copy)]
    struct Case {
        seed: u64,
        tokens: usize,
        top_k: usize,
        experts: usize,
        hidden: usize,
        inter: usize,
        rank_up: usize,
        rank_down: usize,
        activation: Activation,
        layout: GateUpLayout,
        /// Both biases.
        bias: bool,
        /// Ids are drawn from `[0, experts − empty_experts)`, so the last experts stay empty.
        empty_experts: usize,
        /// Every `drop_every`-th slot (`slot % drop_every == 1`) is dropped; 0 drops none.
        drop_every: usize,
    }

    /// Owned tensors of a [`Case`]. Trainable values are multiples of 2^-10 below 4 in
    /// magnitude, so every finite-difference step `±2^-5`, `±2^-6` is exact in `f32`.
    #[derive(Debug, Clone)]
    struct Data {
        case: Case,
        /// Expert ids `[T, top_k]` (dropped slots [`crate::routing::DROPPED`]).
        ids: Vec<i64>,
        routing: Routing,
        x: Vec<f32>,
        gate_up: Vec<f32>,
        down: Vec<f32>,
        a_up: Vec<f32>,
        b_up: Vec<f32>,
        a_down: Vec<f32>,
        b_down: Vec<f32>,
        gates: Vec<f32>,
        dy: Vec<f32>,
        bias_gu: Vec<f32>,
        bias_down: Vec<f32>,
    }

    fn grid(v: f32) -> f32 {
        (v * 1024.0).round() / 1024.0
    }

    impl Data {
        fn new(case: Case) -> Self {
            let mut rng = XorShift::new(case.seed);
            let (t, k, e, h, i) = (
                case.tokens,
                case.top_k,
                case.experts,
                case.hidden,
                case.inter,
            );
            let mut ids = Vec::with_capacity(t * k);
            for _ in 0..t {
                let mut chosen: Vec<i64> = Vec::new();
                while chosen.len() < k {
                    let id = rng.below((e - case.empty_experts) as u64) as i64;
                    if !chosen.contains(&id) {
                        chosen.push(id);
                    }
                }
                ids.extend(chosen);
            }
            if case.drop_every > 0 {
                for (slot, id) in ids.iter_mut().enumerate() {
                    if slot % case.drop_every == 1 {
                        *id = crate::routing::DROPPED;
                    }
                }
            }
            let routing = flatten_sort_count(&ids, t, k, e).unwrap();
            let mut vec = |len: usize, scale: f32| -> Vec<f32> {
                rng.vec(len, scale).into_iter().map(grid).collect()
            };
            let x = vec(t * h, 1.5);
            let gate_up = vec(e * 2 * i * h, 1.0);
            let down = vec(e * h * i, 1.0);
            let a_up = vec(e * case.rank_up * h, 0.5);
            let b_up = vec(2 * i * e * case.rank_up, 0.5);
            let a_down = vec(e * case.rank_down * i, 0.5);
            let b_down = vec(h * e * case.rank_down, 0.5);
            let gates = vec(t * k, 1.0);
            let dy = vec(t * h, 1.0);
            // Drawn last, so the other tensors of a case do not depend on them.
            let bias_gu = vec(e * 2 * i, 1.0);
            let bias_down = vec(e * h, 1.0);
            Data {
                case,
                ids,
                routing,
                x,
                gate_up,
                down,
                a_up,
                b_up,
                a_down,
                b_down,
                gates,
                dy,
                bias_gu,
                bias_down,
            }
        }

        fn problem(&self) -> MoeProblem<'_> {
            let c = self.case;
            MoeProblem {
                x: &self.x,
                num_experts: c.experts,
                hidden: c.hidden,
                intermediate: c.inter,
                gate_up: &self.gate_up,
                down: &self.down,
                lora_gate_up: (c.rank_up > 0).then_some(RefLora {
                    a: &self.a_up,
                    b: &self.b_up,
                    rank: c.rank_up,
                    scaling: 0.75,
                }),
                lora_down: (c.rank_down > 0).then_some(RefLora {
                    a: &self.a_down,
                    b: &self.b_down,
                    rank: c.rank_down,
                    scaling: -1.25,
                }),
                gates: &self.gates,
                activation: c.activation,
                layout: c.layout,
                gate_up_bias: c.bias.then_some(self.bias_gu.as_slice()),
                down_bias: c.bias.then_some(self.bias_down.as_slice()),
            }
        }

        fn forward(&self) -> MoeRefForward {
            moe_forward(&self.problem(), &self.routing, Rounding::Exact).unwrap()
        }

        /// `Σ y·dy` in `f64`, and the clamp masks of the forward's `gu`.
        fn loss_and_masks(&self) -> (f64, Vec<bool>) {
            let f = self.forward();
            let loss =
                f.y.iter()
                    .zip(&self.dy)
                    .map(|(&y, &d)| f64::from(y) * f64::from(d))
                    .sum();
            let masks = match self.case.activation.limit() {
                Some(lim) => {
                    let (w, layout) = (self.case.inter, self.case.layout);
                    f.gu.chunks_exact(2 * w)
                        .flat_map(|row| {
                            (0..w).flat_map(move |i| {
                                let (g, u) = layout.columns(i, w);
                                [row[g] > lim, row[u].abs() > lim]
                            })
                        })
                        .collect()
                }
                None => Vec::new(),
            };
            (loss, masks)
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Param {
        X,
        AUp,
        BUp,
        ADown,
        BDown,
        Gates,
    }

    fn param_mut(d: &mut Data, which: Param) -> &mut Vec<f32> {
        match which {
            Param::X => &mut d.x,
            Param::AUp => &mut d.a_up,
            Param::BUp => &mut d.b_up,
            Param::ADown => &mut d.a_down,
            Param::BDown => &mut d.b_down,
            Param::Gates => &mut d.gates,
        }
    }

    /// Richardson-extrapolated central difference `(4·D(h/2) − D(h)) / 3` with `h = 2^-5`
    /// (truncation error O(h^4)), or `None` when a perturbation moves some `gu` element across
    /// a clamp boundary (the loss has a kink there, so no difference quotient applies).
    fn richardson(d: &Data, which: Param, idx: usize) -> Option<f64> {
        let (_, masks) = d.loss_and_masks();
        let quotient = |step: f32| -> Option<f64> {
            let mut losses = [0f64; 2];
            for (slot, sign) in [1f32, -1.0].into_iter().enumerate() {
                let mut moved = d.clone();
                param_mut(&mut moved, which)[idx] += sign * step;
                let (loss, m) = moved.loss_and_masks();
                if m != masks {
                    return None;
                }
                losses[slot] = loss;
            }
            Some((losses[0] - losses[1]) / (2.0 * f64::from(step)))
        };
        let coarse = quotient(2f32.powi(-5))?;
        let fine = quotient(2f32.powi(-6))?;
        Some((4.0 * fine - coarse) / 3.0)
    }

    /// Checks every element of `analytic` against [`richardson`]; returns how many were checked.
    fn assert_matches_fd(d: &Data, which: Param, analytic: &[f32]) -> usize {
        let len = param_mut(&mut d.clone(), which).len();
        assert_eq!(analytic.len(), len, "{which:?} length");
        let gmax = analytic
            .iter()
            .fold(0f64, |m, &g| m.max(f64::from(g).abs()));
        let mut checked = 0;
        for (idx, &g) in analytic.iter().enumerate() {
            let Some(fd) = richardson(d, which, idx) else {
                continue;
            };
            checked += 1;
            let g = f64::from(g);
            let tol = 2e-4 * gmax + 1e-3 * g.abs() + 1e-9;
            assert!(
                (fd - g).abs() <= tol,
                "{which:?}[{idx}]: analytic {g}, finite difference {fd} ({:?})",
                d.case
            );
        }
        checked
    }

    fn base_case() -> Case {
        Case {
            seed: 1,
            tokens: 4,
            top_k: 2,
            experts: 3,
            hidden: 8,
            inter: 4,
            rank_up: 2,
            rank_down: 3,
            activation: Activation::SwiGlu { limit: None },
            layout: GateUpLayout::Split,
            bias: false,
            empty_experts: 0,
            drop_every: 0,
        }
    }

    #[test]
    fn block_gradients_match_finite_differences() {
        let cases = [
            base_case(),
            // A clamp limit that cuts a good share of the gates and ups.
            Case {
                seed: 2,
                activation: Activation::SwiGlu { limit: Some(0.75) },
                ..base_case()
            },
            // top_k = 1, an empty expert, no LoRA on the gate/up projection.
            Case {
                seed: 3,
                tokens: 3,
                top_k: 1,
                experts: 4,
                rank_up: 0,
                activation: Activation::SwiGlu { limit: Some(1.5) },
                ..base_case()
            },
        ];
        for c in cases {
            assert_block_gradients_match_fd(c);
        }
    }

    /// gpt-oss's activation (α = 1.702, a limit low enough to clamp a share of `gu`) in both
    /// layouts and boundary rules, with both biases, LoRA on both projections, empty experts and
    /// dropped slots; the finite differences skip elements whose step crosses a clamp limit.
    #[test]
    fn gpt_oss_block_gradients_match_finite_differences() {
        let gpt_oss = |limit, boundary| Activation::GptOss {
            alpha: 1.702,
            limit,
            boundary,
        };
        let cases = [
            Case {
                seed: 31,
                activation: gpt_oss(1.5, ClampBoundary::Strict),
                layout: GateUpLayout::Interleaved,
                bias: true,
                ..base_case()
            },
            // Inclusive boundary, split layout, top_k = 3, an empty expert, dropped slots.
            Case {
                seed: 32,
                tokens: 5,
                top_k: 3,
                experts: 5,
                empty_experts: 1,
                drop_every: 4,
                activation: gpt_oss(1.25, ClampBoundary::Inclusive),
                bias: true,
                ..base_case()
            },
            // No biases, no gate/up LoRA, interleaved.
            Case {
                seed: 33,
                rank_up: 0,
                activation: gpt_oss(2.0, ClampBoundary::Strict),
                layout: GateUpLayout::Interleaved,
                ..base_case()
            },
        ];
        for c in cases {
            assert_block_gradients_match_fd(c);
        }
    }

    /// Checks every gradient of a [`Case`] against finite differences in [`Rounding::Exact`],
    /// and that a clamp limit clamps some but not all of `gu`.
    fn assert_block_gradients_match_fd(c: Case) {
        let d = Data::new(c);
        let p = d.problem();
        let g = moe_backward(&p, &d.routing, &d.dy, Rounding::Exact).unwrap();
        let mut total = 0;
        let mut checked = assert_matches_fd(&d, Param::X, &g.dx);
        total += g.dx.len();
        match (&g.gate_up, c.rank_up) {
            (Some(l), r) if r > 0 => {
                checked += assert_matches_fd(&d, Param::AUp, &l.da);
                checked += assert_matches_fd(&d, Param::BUp, &l.db);
                total += l.da.len() + l.db.len();
            }
            (None, 0) => {}
            _ => panic!("gate_up LoRA gradients must be present exactly with LoRA ({c:?})"),
        }
        let l = g.down.as_ref().expect("down LoRA gradients");
        // The loss is linear in the down projection's LoRA factors and in the gates: no kink
        // can skip them.
        assert_eq!(assert_matches_fd(&d, Param::ADown, &l.da), l.da.len());
        assert_eq!(assert_matches_fd(&d, Param::BDown, &l.db), l.db.len());
        assert_eq!(
            assert_matches_fd(&d, Param::Gates, &g.d_gates),
            g.d_gates.len()
        );
        assert!(
            2 * checked >= total,
            "too many elements skipped at clamp kinks: {checked} of {total} checked ({c:?})"
        );
        if let Some(lim) = c.activation.limit() {
            let f = d.forward();
            let clamped = f.gu.iter().filter(|v| v.abs() > lim).count();
            assert!(
                clamped > 0 && clamped < f.gu.len(),
                "the limit must clamp some but not all elements ({c:?})"
            );
        }
    }

    #[test]
    fn swiglu_matches_its_definition_and_derivative() {
        for &(gate, up) in &[
            (0.3, -1.2),
            (-2.5, 0.7),
            (4.0, 2.0),
            (-40.0, 1.0),
            (40.0, -1.0),
            (0.0, 3.0),
        ] {
            let silu = gate / (1.0 + f64::exp(-gate));
            assert!(
                (swiglu(gate, up, None) - silu * up).abs() <= 1e-12 * (1.0 + (silu * up).abs())
            );
            let h = 1e-6;
            let dg = (swiglu(gate + h, up, None) - swiglu(gate - h, up, None)) / (2.0 * h);
            let du = (swiglu(gate, up + h, None) - swiglu(gate, up - h, None)) / (2.0 * h);
            let (ag, au) = swiglu_grad(gate, up, 0.5, None);
            assert!(
                (ag - 0.5 * dg).abs() <= 1e-7,
                "d_gate at {gate}: {ag} vs {}",
                0.5 * dg
            );
            assert!(
                (au - 0.5 * du).abs() <= 1e-7,
                "d_up at {gate}: {au} vs {}",
                0.5 * du
            );
        }
        // Saturation is finite: no overflow in σ.
        assert!(swiglu(-1000.0, 1.0, None).abs() < 1e-300);
        assert_eq!(swiglu(1000.0, 1.0, None), 1000.0);
    }

    #[test]
    fn clamp_limit_masks_gradients_and_passes_the_boundary() {
        let lim = Some(2.0);
        // gate above the limit: value uses lim, gate gradient zero.
        assert_eq!(swiglu(3.0, 1.0, lim), swiglu(2.0, 1.0, None));
        let (dg, du) = swiglu_grad(3.0, 1.0, 1.0, lim);
        assert_eq!(dg, 0.0);
        assert_eq!(du, swiglu(2.0, 1.0, None));
        // up outside [−lim, lim] on either side: clamped value, up gradient zero.
        assert_eq!(swiglu(1.0, -5.0, lim), swiglu(1.0, -2.0, None));
        assert_eq!(swiglu_grad(1.0, -5.0, 1.0, lim).1, 0.0);
        assert_eq!(swiglu_grad(1.0, 5.0, 1.0, lim).1, 0.0);
        // Exactly at the limit the gradient passes (torch.clamp's backward).
        assert_eq!(
            swiglu_grad(2.0, 1.0, 1.0, lim),
            swiglu_grad(2.0, 1.0, 1.0, None)
        );
        assert_eq!(
            swiglu_grad(1.0, 2.0, 1.0, lim),
            swiglu_grad(1.0, 2.0, 1.0, None)
        );
        assert_eq!(
            swiglu_grad(1.0, -2.0, 1.0, lim),
            swiglu_grad(1.0, -2.0, 1.0, None)
        );
        // A negative gate below −lim is not clamped (min only bounds it from above).
        assert_eq!(swiglu(-3.0, 1.0, lim), swiglu(-3.0, 1.0, None));
        assert_eq!(
            swiglu_grad(-3.0, 1.0, 1.0, lim),
            swiglu_grad(-3.0, 1.0, 1.0, None)
        );
    }

    #[test]
    fn bf16_mode_rounds_at_the_documented_points() {
        let representable = |v: &[f32]| v.iter().all(|&x| round_bf16(x).to_bits() == x.to_bits());
        let gpt_oss_low = Activation::GptOss {
            alpha: 1.702,
            limit: 1.0,
            boundary: ClampBoundary::Strict,
        };
        for (activation, layout, bias) in [
            (
                Activation::SwiGlu { limit: None },
                GateUpLayout::Split,
                false,
            ),
            (
                Activation::SwiGlu { limit: Some(1.0) },
                GateUpLayout::Split,
                false,
            ),
            (gpt_oss_low, GateUpLayout::Interleaved, true),
            (Activation::GPT_OSS, GateUpLayout::Interleaved, true),
        ] {
            let d = Data::new(Case {
                seed: 9,
                activation,
                layout,
                bias,
                ..base_case()
            });
            let label = (activation, layout, bias);
            let p = d.problem();
            let (f, g) = moe_forward_backward(&p, &d.routing, &d.dy, Rounding::Bf16).unwrap();
            for (name, v) in [
                ("y", &f.y),
                ("gu", &f.gu),
                ("h", &f.h),
                ("dx", &g.dx),
                ("d_gates", &g.d_gates),
                ("dh", &g.dh),
                ("d_gu", &g.d_gu),
            ] {
                assert!(representable(v), "{name} is not bf16 ({label:?})");
            }
            // h is the rounded activation of the rounded gu; d_gu the rounded gradient.
            let w = d.case.inter;
            for (row, gu_row) in f.gu.chunks_exact(2 * w).enumerate() {
                for i in 0..w {
                    let (gc, uc) = layout.columns(i, w);
                    let (gate, up) = (f64::from(gu_row[gc]), f64::from(gu_row[uc]));
                    let h = activation.value(gate, up);
                    assert_eq!(f.h[row * w + i], round_bf16(h as f32));
                    let (dg, du) = activation.grad(gate, up, f64::from(g.dh[row * w + i]));
                    assert_eq!(g.d_gu[row * 2 * w + gc], round_bf16(dg as f32));
                    assert_eq!(g.d_gu[row * 2 * w + uc], round_bf16(du as f32));
                }
            }
            // And the whole block stays close to the exact one.
            let (fe, ge) = moe_forward_backward(&p, &d.routing, &d.dy, Rounding::Exact).unwrap();
            let close = |name: &str, a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(1e-3f32, |m, &v| m.max(v.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 5e-2 * scale,
                        "{name}: {x} vs {y} ({label:?})"
                    );
                }
            };
            close("y", &f.y, &fe.y);
            close("dx", &g.dx, &ge.dx);
            close("d_gates", &g.d_gates, &ge.d_gates);
            let (lu, lue) = (g.gate_up.as_ref().unwrap(), ge.gate_up.as_ref().unwrap());
            close("dA up", &lu.da, &lue.da);
            close("dB up", &lu.db, &lue.db);
        }
    }

    #[test]
    fn gpt_oss_glu_matches_its_definition_and_derivative() {
        let (alpha, lim) = (1.702, 7.0);
        for &(gate, up) in &[
            (0.3, -1.2),
            (-2.5, 0.7),
            (4.0, 2.0),
            (-40.0, 1.0),
            (6.5, -6.5),
            (0.0, 3.0),
            (-1.0, -1.0),
        ] {
            // GPT_OSS.md §1: glu = gate·σ(α·gate), h = (up + 1)·glu (no clamp acts here).
            let glu = gate / (1.0 + f64::exp(-alpha * gate));
            let want = (up + 1.0) * glu;
            let h = gpt_oss_glu(gate, up, alpha, lim);
            assert!(
                (h - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{gate}, {up}"
            );
            let act = Activation::GptOss {
                alpha: alpha as f32,
                limit: lim as f32,
                boundary: ClampBoundary::Strict,
            };
            assert_eq!(
                act.value(gate, up),
                gpt_oss_glu(gate, up, 1.702f32.into(), lim)
            );
            let step = 1e-6;
            let f = |g: f64, u: f64| gpt_oss_glu(g, u, alpha, lim);
            let dg = (f(gate + step, up) - f(gate - step, up)) / (2.0 * step);
            let du = (f(gate, up + step) - f(gate, up - step)) / (2.0 * step);
            for boundary in [ClampBoundary::Strict, ClampBoundary::Inclusive] {
                let (ag, au) = gpt_oss_glu_grad(gate, up, 0.5, alpha, lim, boundary);
                assert!(
                    (ag - 0.5 * dg).abs() <= 1e-7,
                    "d_gate at {gate}: {ag} vs {dg}/2"
                );
                assert!(
                    (au - 0.5 * du).abs() <= 1e-7,
                    "d_up at {up}: {au} vs {du}/2"
                );
            }
        }
        // Saturation is finite; a large negative gate is not clamped.
        assert!(gpt_oss_glu(-1000.0, 1.0, alpha, lim).abs() < 1e-300);
        assert_eq!(Activation::GPT_OSS.limit(), Some(7.0));
    }

    #[test]
    fn gpt_oss_clamp_masks_follow_the_boundary_rule() {
        let (alpha, lim) = (1.702, 7.0);
        // The unclamped derivatives (GPT_OSS.md §1) at (g, u).
        let d_gate = |g: f64, u: f64| {
            let s = sigmoid(alpha * g);
            (u + 1.0) * (s + alpha * g * s * (1.0 - s))
        };
        let d_up = |g: f64| g * sigmoid(alpha * g);
        let grad = |g, u, b| gpt_oss_glu_grad(g, u, 1.0, alpha, lim, b);
        use ClampBoundary::{Inclusive, Strict};
        // Exactly at the limits: Strict stops the gradient, Inclusive passes it.
        assert_eq!(grad(7.0, 0.5, Strict).0, 0.0);
        assert_eq!(grad(7.0, 0.5, Inclusive).0, d_gate(7.0, 0.5));
        for up in [7.0, -7.0] {
            assert_eq!(grad(0.5, up, Strict).1, 0.0, "up {up}");
            assert_eq!(grad(0.5, up, Inclusive).1, d_up(0.5), "up {up}");
            // The other input's gradient uses the clamped up (the +1 included) either way.
            assert_eq!(grad(0.5, up, Strict).0, d_gate(0.5, up));
        }
        // Beyond the limits both rules stop it, and the value uses the clamped input.
        for b in [Strict, Inclusive] {
            assert_eq!(grad(7.5, 0.5, b).0, 0.0);
            assert_eq!(grad(0.5, 9.0, b).1, 0.0);
            assert_eq!(grad(0.5, -9.0, b).1, 0.0);
            // The other input's gradient uses the clamped value.
            assert_eq!(grad(7.5, 0.5, b).1, d_up(7.0));
            assert_eq!(grad(0.5, 9.0, b).0, d_gate(0.5, 7.0));
            // No lower clamp on the gate.
            assert_eq!(grad(-7.0, 0.5, b).0, d_gate(-7.0, 0.5));
            assert_eq!(grad(-30.0, 0.5, b).0, d_gate(-30.0, 0.5));
        }
        assert_eq!(
            gpt_oss_glu(9.0, 0.5, alpha, lim),
            gpt_oss_glu(7.0, 0.5, alpha, lim)
        );
        assert_eq!(
            gpt_oss_glu(0.5, -9.0, alpha, lim),
            gpt_oss_glu(0.5, -7.0, alpha, lim)
        );
        assert_eq!(
            gpt_oss_glu(-9.0, 0.5, alpha, lim),
            (1.5) * -9.0 * sigmoid(-9.0 * alpha)
        );
        // Just inside, both rules pass.
        let inside = 7.0 - 1e-9;
        assert_eq!(grad(inside, 0.5, Strict), grad(inside, 0.5, Inclusive));
        assert_eq!(grad(0.5, -inside, Strict), grad(0.5, -inside, Inclusive));
    }

    /// `gu` exactly at ±7.0 (a zero gate/up weight, no gate/up LoRA, so `gu` is the bias, exact in
    /// bf16): the block's `d_gu` is zero there under [`ClampBoundary::Strict`] and the unclamped
    /// derivative under [`ClampBoundary::Inclusive`]; everything else agrees.
    #[test]
    fn exact_limits_in_gu_are_masked_by_the_boundary_rule() {
        let base = Case {
            seed: 51,
            rank_up: 0,
            activation: Activation::GPT_OSS,
            layout: GateUpLayout::Interleaved,
            bias: true,
            ..base_case()
        };
        let mut d = Data::new(base);
        let (e, w) = (base.experts, base.inter);
        d.gate_up.iter_mut().for_each(|v| *v = 0.0);
        // Units (gate, up): gate at L; up at L; up at −L; gate at −L (no lower clamp).
        let units = [(7.0, 0.5), (0.5, 7.0), (0.5, -7.0), (-7.0, 0.25)];
        for ex in 0..e {
            for (i, &(g, u)) in units.iter().enumerate() {
                d.bias_gu[ex * 2 * w + 2 * i] = g;
                d.bias_gu[ex * 2 * w + 2 * i + 1] = u;
            }
        }
        // Columns where the rules differ: gate of unit 0, ups of units 1 and 2.
        let boundary_cols = [0, 3, 5];
        let alpha = 1.702f32 as f64;
        for rounding in [Rounding::Exact, Rounding::Bf16] {
            let run = |boundary| {
                let mut moved = d.clone();
                moved.case.activation = Activation::GptOss {
                    alpha: 1.702,
                    limit: 7.0,
                    boundary,
                };
                moe_forward_backward(&moved.problem(), &d.routing, &d.dy, rounding).unwrap()
            };
            let (fs, gs) = run(ClampBoundary::Strict);
            let (fi, gi) = run(ClampBoundary::Inclusive);
            assert_eq!(fs, fi, "the forward does not depend on the rule");
            assert_eq!(gs.dh, gi.dh);
            assert_eq!(gs.d_gates, gi.d_gates);
            for (row, gu_row) in fs.gu.chunks_exact(2 * w).enumerate() {
                for (i, &(g, u)) in units.iter().enumerate() {
                    assert_eq!((gu_row[2 * i], gu_row[2 * i + 1]), (g, u), "gu is the bias");
                }
                let dh = &gs.dh[row * w..][..w];
                // The unclamped derivative (the clamped inputs equal the raw ones here).
                let full = |col: usize| -> f32 {
                    let i = col / 2;
                    let (g, u) = (f64::from(units[i].0), f64::from(units[i].1));
                    let s = sigmoid(alpha * g);
                    let v = if col.is_multiple_of(2) {
                        f64::from(dh[i]) * (u + 1.0) * (s + alpha * g * s * (1.0 - s))
                    } else {
                        f64::from(dh[i]) * g * s
                    };
                    rounding.apply(v) as f32
                };
                for col in 0..2 * w {
                    let (s, inc) = (gs.d_gu[row * 2 * w + col], gi.d_gu[row * 2 * w + col]);
                    if boundary_cols.contains(&col) {
                        assert_eq!(s, 0.0, "Strict, row {row} col {col} ({rounding:?})");
                        assert_eq!(inc, full(col), "Inclusive, row {row} col {col}");
                        assert_ne!(inc, 0.0);
                    } else {
                        assert_eq!(s, inc, "row {row} col {col} ({rounding:?})");
                        assert_eq!(s, full(col), "row {row} col {col} ({rounding:?})");
                    }
                }
            }
            assert_ne!(gs.d_gu, gi.d_gu);
        }
    }

    /// Rows `2i` (gate) and `2i + 1` (up) of every expert's `[2I, …]` block moved to rows `i`
    /// and `I + i`: the split layout of the same weights.
    fn interleaved_to_split(v: &[f32], experts: usize, width: usize, row_len: usize) -> Vec<f32> {
        let mut out = vec![0f32; v.len()];
        for e in 0..experts {
            for i in 0..width {
                for (from, to) in [(2 * i, i), (2 * i + 1, width + i)] {
                    let src = &v[(e * 2 * width + from) * row_len..][..row_len];
                    out[(e * 2 * width + to) * row_len..][..row_len].copy_from_slice(src);
                }
            }
        }
        out
    }

    /// The interleaved layout is the split layout after permuting the rows of `gate_up`, its bias
    /// and its LoRA B (and the columns of `gu`, `d_gu` and `dB`): every result is bit-identical,
    /// in both rounding modes and for both activations.
    #[test]
    fn interleaved_layout_equals_split_after_permuting_rows() {
        for activation in [Activation::GPT_OSS, Activation::SwiGlu { limit: Some(1.0) }] {
            let inter = Data::new(Case {
                seed: 61,
                experts: 4,
                empty_experts: 1,
                drop_every: 3,
                activation,
                layout: GateUpLayout::Interleaved,
                bias: true,
                ..base_case()
            });
            let c = inter.case;
            let (e, w, h, er) = (c.experts, c.inter, c.hidden, c.experts * c.rank_up);
            let mut split = inter.clone();
            split.case.layout = GateUpLayout::Split;
            split.gate_up = interleaved_to_split(&inter.gate_up, e, w, h);
            split.bias_gu = interleaved_to_split(&inter.bias_gu, e, w, 1);
            // B [2I, E·r] has one block of 2I rows.
            split.b_up = interleaved_to_split(&inter.b_up, 1, w, er);
            for rounding in [Rounding::Exact, Rounding::Bf16] {
                let (fi, gi) =
                    moe_forward_backward(&inter.problem(), &inter.routing, &inter.dy, rounding)
                        .unwrap();
                let (fs, gs) =
                    moe_forward_backward(&split.problem(), &split.routing, &split.dy, rounding)
                        .unwrap();
                let rows = inter.routing.num_rows();
                assert_eq!(fi.y, fs.y, "{activation:?} {rounding:?}");
                assert_eq!(fi.h, fs.h);
                assert_eq!(interleaved_to_split(&fi.gu, rows, w, 1), fs.gu);
                assert_eq!(gi.dx, gs.dx);
                assert_eq!(gi.d_gates, gs.d_gates);
                assert_eq!(gi.dh, gs.dh);
                assert_eq!(gi.down, gs.down);
                assert_eq!(interleaved_to_split(&gi.d_gu, rows, w, 1), gs.d_gu);
                let (li, ls) = (gi.gate_up.unwrap(), gs.gate_up.unwrap());
                assert_eq!(li.da, ls.da);
                assert_eq!(interleaved_to_split(&li.db, 1, w, er), ls.db);
            }
        }
    }

    /// gpt-oss's block written from scratch over GPT_OSS.md §1, one token and one slot at a time
    /// (its own index arithmetic, no layout or activation helper): `(y [T, H], the per-slot
    /// rows o [T·top_k, H])` in `f64`.
    fn gpt_oss_from_scratch(d: &Data, alpha: f64, lim: f64) -> (Vec<f64>, Vec<f64>) {
        let c = d.case;
        let (t_count, k, hid, int) = (c.tokens, c.top_k, c.hidden, c.inter);
        let f = |v: f32| f64::from(v);
        let (ru, rd) = (c.rank_up, c.rank_down);
        let mut y = vec![0f64; t_count * hid];
        let mut o_all = vec![0f64; t_count * k * hid];
        for t in 0..t_count {
            let x = &d.x[t * hid..][..hid];
            for j in 0..k {
                let Ok(e) = usize::try_from(d.ids[t * k + j]) else {
                    continue; // a dropped slot contributes nothing, bias included
                };
                // z = x·W_gu[e] + s·(x·A_e)·B_e + b_gu[e], 2I values in checkpoint order.
                let xa: Vec<f64> = (0..ru)
                    .map(|q| {
                        (0..hid)
                            .map(|m| f(x[m]) * f(d.a_up[(e * ru + q) * hid + m]))
                            .sum()
                    })
                    .collect();
                let z: Vec<f64> = (0..2 * int)
                    .map(|n| {
                        let base: f64 = (0..hid)
                            .map(|m| f(x[m]) * f(d.gate_up[(e * 2 * int + n) * hid + m]))
                            .sum();
                        let lora: f64 = (0..ru)
                            .map(|q| xa[q] * f(d.b_up[n * c.experts * ru + e * ru + q]))
                            .sum();
                        base + 0.75 * lora + f(d.bias_gu[e * 2 * int + n])
                    })
                    .collect();
                let hv: Vec<f64> = (0..int)
                    .map(|i| {
                        let g = z[2 * i].min(lim);
                        let u = z[2 * i + 1].clamp(-lim, lim);
                        (u + 1.0) * g / (1.0 + (-alpha * g).exp())
                    })
                    .collect();
                let ha: Vec<f64> = (0..rd)
                    .map(|q| {
                        (0..int)
                            .map(|i| hv[i] * f(d.a_down[(e * rd + q) * int + i]))
                            .sum()
                    })
                    .collect();
                let w = f(d.gates[t * k + j]);
                for n in 0..hid {
                    let base: f64 = (0..int)
                        .map(|i| hv[i] * f(d.down[(e * hid + n) * int + i]))
                        .sum();
                    let lora: f64 = (0..rd)
                        .map(|q| ha[q] * f(d.b_down[n * c.experts * rd + e * rd + q]))
                        .sum();
                    let o = base - 1.25 * lora + f(d.bias_down[e * hid + n]);
                    o_all[(t * k + j) * hid + n] = o;
                    y[t * hid + n] += w * o;
                }
            }
        }
        (y, o_all)
    }

    #[test]
    fn gpt_oss_block_matches_a_from_scratch_loop() {
        let d = Data::new(Case {
            seed: 71,
            tokens: 6,
            experts: 4,
            empty_experts: 1,
            drop_every: 5,
            hidden: 16,
            activation: Activation::GptOss {
                alpha: 1.702,
                limit: 2.0,
                boundary: ClampBoundary::Strict,
            },
            layout: GateUpLayout::Interleaved,
            bias: true,
            ..base_case()
        });
        let (y, o) = gpt_oss_from_scratch(&d, 1.702f32.into(), 2.0);
        let (f, g) =
            moe_forward_backward(&d.problem(), &d.routing, &d.dy, Rounding::Exact).unwrap();
        // Some gates and ups clamp, so the test sees the clamps and the +1 of the clamped up.
        let clamped = f.gu.iter().filter(|v| v.abs() > 2.0).count();
        assert!(clamped > 0 && clamped < f.gu.len() / 2, "{clamped}");
        // The reference passes gu and h between its stages as f32: a few f32 ulps of the
        // magnitudes.
        let ymax = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (idx, (&a, &b)) in f.y.iter().zip(&y).enumerate() {
            assert!(
                (f64::from(a) - b).abs() <= 1e-5 * ymax,
                "y[{idx}]: {a} vs {b}"
            );
        }
        // d_gates[t, j] = ⟨dy_t, o_{t,j}⟩ with o including the down bias; 0 for dropped slots.
        let (k, hid) = (d.case.top_k, d.case.hidden);
        for (slot, &dg) in g.d_gates.iter().enumerate() {
            let want: f64 = (0..hid)
                .map(|n| f64::from(d.dy[(slot / k) * hid + n]) * o[slot * hid + n])
                .sum();
            assert!(
                (f64::from(dg) - want).abs() <= 1e-5 * ymax,
                "d_gates[{slot}]"
            );
        }
    }

    /// With zero down weights and no down LoRA every valid slot's row is its expert's down bias:
    /// `y_t = Σ_j w[t, j]·b_d[e]` and `d_gates[t, j] = ⟨dy_t, b_d[e]⟩`, exactly.
    #[test]
    fn gate_gradient_includes_the_down_bias() {
        let mut d = Data::new(Case {
            seed: 81,
            experts: 4,
            drop_every: 3,
            rank_down: 0,
            activation: Activation::GPT_OSS,
            layout: GateUpLayout::Interleaved,
            bias: true,
            ..base_case()
        });
        d.down.iter_mut().for_each(|v| *v = 0.0);
        let (k, hid) = (d.case.top_k, d.case.hidden);
        let (f, g) =
            moe_forward_backward(&d.problem(), &d.routing, &d.dy, Rounding::Exact).unwrap();
        assert!(d.ids.contains(&crate::routing::DROPPED));
        for (slot, &id) in d.ids.iter().enumerate() {
            let want: f64 = match usize::try_from(id) {
                Ok(e) => (0..hid)
                    .map(|n| {
                        f64::from(d.dy[(slot / k) * hid + n]) * f64::from(d.bias_down[e * hid + n])
                    })
                    .sum(),
                Err(_) => 0.0,
            };
            assert_eq!(g.d_gates[slot], want as f32, "slot {slot}");
        }
        for t in 0..d.case.tokens {
            for n in 0..hid {
                let want: f64 = (0..k)
                    .filter_map(|j| {
                        let e = usize::try_from(d.ids[t * k + j]).ok()?;
                        Some(f64::from(d.gates[t * k + j]) * f64::from(d.bias_down[e * hid + n]))
                    })
                    .sum();
                let got = f64::from(f.y[t * hid + n]);
                assert!(
                    (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "y[{t}, {n}]"
                );
            }
        }
        // Without the bias the gate gradient is zero.
        let g0 = moe_backward(
            &MoeProblem {
                down_bias: None,
                ..d.problem()
            },
            &d.routing,
            &d.dy,
            Rounding::Exact,
        )
        .unwrap();
        assert!(g0.d_gates.iter().all(|&v| v == 0.0));
    }

    /// Experts that receive no token get exact-zero LoRA gradients and their biases reach
    /// nothing; dropped slots (with biases) contribute nothing to `y`, get a zero gate gradient,
    /// and a token whose every slot is dropped gets zero `y` and `dx` rows.
    #[test]
    fn gpt_oss_empty_experts_and_dropped_slots() {
        for (top_k, drop_every) in [(2, 3), (1, 2)] {
            let c = Case {
                seed: 91,
                tokens: 6,
                top_k,
                experts: 5,
                empty_experts: 2,
                drop_every,
                activation: Activation::GPT_OSS,
                layout: GateUpLayout::Interleaved,
                bias: true,
                ..base_case()
            };
            let d = Data::new(c);
            let (e, h, w) = (c.experts, c.hidden, c.inter);
            let dropped: Vec<usize> = (0..d.ids.len())
                .filter(|&s| d.ids[s] == crate::routing::DROPPED)
                .collect();
            assert!(!dropped.is_empty());
            // The empty experts' biases and the dropped slots' gates changed: no effect.
            let mut moved = d.clone();
            for ex in e - c.empty_experts..e {
                moved.bias_gu[ex * 2 * w..][..2 * w]
                    .iter_mut()
                    .for_each(|v| *v += 3.0);
                moved.bias_down[ex * h..][..h]
                    .iter_mut()
                    .for_each(|v| *v += 3.0);
            }
            for &s in &dropped {
                moved.gates[s] += 1.0;
            }
            for rounding in [Rounding::Exact, Rounding::Bf16] {
                let (f, g) =
                    moe_forward_backward(&d.problem(), &d.routing, &d.dy, rounding).unwrap();
                let (fm, gm) =
                    moe_forward_backward(&moved.problem(), &d.routing, &d.dy, rounding).unwrap();
                assert_eq!(f, fm, "({top_k}, {drop_every}) {rounding:?}");
                assert_eq!(g.dx, gm.dx);
                for &s in &dropped {
                    assert_eq!(g.d_gates[s].to_bits(), 0, "dropped slot {s}");
                }
                for (name, l, k_dim) in [
                    ("gate_up", g.gate_up.as_ref().unwrap(), h),
                    ("down", g.down.as_ref().unwrap(), w),
                ] {
                    let (r, n_dim) = match name {
                        "gate_up" => (c.rank_up, 2 * w),
                        _ => (c.rank_down, h),
                    };
                    for ex in e - c.empty_experts..e {
                        let da = &l.da[ex * r * k_dim..][..r * k_dim];
                        assert!(da.iter().all(|v| v.to_bits() == 0), "{name} dA of {ex}");
                        for n in 0..n_dim {
                            let db = &l.db[n * e * r + ex * r..][..r];
                            assert!(db.iter().all(|v| v.to_bits() == 0), "{name} dB of {ex}");
                        }
                    }
                }
                for t in 0..c.tokens {
                    if (0..top_k).all(|j| dropped.contains(&(t * top_k + j))) {
                        assert!(f.y[t * h..][..h].iter().all(|v| v.to_bits() == 0));
                        assert!(g.dx[t * h..][..h].iter().all(|v| v.to_bits() == 0));
                    }
                }
            }
        }
    }

    #[test]
    fn no_lora_gives_no_lora_gradients() {
        let d = Data::new(Case {
            rank_up: 0,
            rank_down: 0,
            ..base_case()
        });
        let g = moe_backward(&d.problem(), &d.routing, &d.dy, Rounding::Bf16).unwrap();
        assert!(g.gate_up.is_none() && g.down.is_none());
        assert_eq!(g.dx.len(), d.x.len());
        assert_eq!(g.d_gates.len(), d.gates.len());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let d = Data::new(base_case());
        let base = d.problem();
        let fwd = |p: &MoeProblem<'_>| moe_forward(p, &d.routing, Rounding::Bf16);
        assert!(fwd(&base).is_ok());
        assert_shape_error(
            fwd(&MoeProblem {
                x: &d.x[1..],
                ..base
            }),
            "x",
        );
        assert_shape_error(
            fwd(&MoeProblem {
                intermediate: 3,
                ..base
            }),
            "gate_up",
        );
        assert_shape_error(
            fwd(&MoeProblem {
                down: &d.down[1..],
                ..base
            }),
            "down",
        );
        assert_shape_error(
            fwd(&MoeProblem {
                gates: &d.gates[1..],
                ..base
            }),
            "gates",
        );
        assert_invalid_argument(fwd(&MoeProblem { hidden: 0, ..base }), "MoE block");
        for lim in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert_invalid_argument(
                fwd(&MoeProblem {
                    activation: Activation::SwiGlu { limit: Some(lim) },
                    ..base
                }),
                "limit",
            );
            let gpt_oss = |alpha, limit| MoeProblem {
                activation: Activation::GptOss {
                    alpha,
                    limit,
                    boundary: ClampBoundary::Strict,
                },
                ..base
            };
            assert_invalid_argument(fwd(&gpt_oss(1.702, lim)), "limit");
            assert_invalid_argument(fwd(&gpt_oss(lim, 7.0)), "alpha");
        }
        let short = RefLora {
            b: &d.b_down[1..],
            ..base.lora_down.unwrap()
        };
        assert_shape_error(
            fwd(&MoeProblem {
                lora_down: Some(short),
                ..base
            }),
            "down LoRA B",
        );
        assert_shape_error(
            fwd(&MoeProblem {
                gate_up_bias: Some(&d.bias_gu[1..]),
                ..base
            }),
            "gate_up bias",
        );
        assert_shape_error(
            fwd(&MoeProblem {
                down_bias: Some(&d.bias_down[1..]),
                ..base
            }),
            "down bias",
        );
        assert_shape_error(
            moe_backward(&base, &d.routing, &d.dy[1..], Rounding::Bf16),
            "dy",
        );
        let mut broken = d.routing.clone();
        broken.expert_offsets[0] += 1;
        assert!(moe_forward(&base, &broken, Rounding::Exact).is_err());
    }
}
