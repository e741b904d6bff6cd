//! Reference of the whole gated MoE MLP block (SPEC §6): the gate/up projection, the SwiGLU
//! activation with DeepSeek-V4's optional clamp limit, and the gated down projection, forward
//! and backward, built on [`super::linear_forward`] / [`super::linear_backward`].
//!
//! # The block
//!
//! With routing `(T tokens, top_k)`, `x [T, H]`, `gate_up [E, 2I, H]` and `down [E, H, I]`
//! (checkpoint layouts), optional LoRA on each projection and gates `[T, top_k]`:
//!
//! 1. `gu = up(x)`: the expert linear with token-ordered input (`fan_out = top_k`) and grouped
//!    output, `[L_valid, 2I]`;
//! 2. `h = swiglu(gu)`, `[L_valid, I]`: per grouped row and column `i`, with `gate = gu[:, i]`
//!    (the *first* half is the gate) and `up = gu[:, I + i]`, `g = min(gate, lim)` and
//!    `u = clamp(up, −lim, lim)` when a limit is set (identities otherwise), `h = silu(g)·u`;
//! 3. `y = down(h)`: the expert linear with grouped input, scattered output and the gates,
//!    `[T, H]`.
//!
//! Backward (`dy [T, H]`): the down projection's backward gives `dh [L_valid, I]` (its input
//! gradient), the down LoRA gradients and `d_gates`; the activation's derivative gives
//! `d_gu [L_valid, 2I]`:
//! `d_gate = dh·u·σ(g)·(1 + g·(1 − σ(g)))` where `gate ≤ lim` (else 0),
//! `d_up = dh·silu(g)` where `−lim ≤ up ≤ lim` (else 0) — the boundary passes the gradient, as
//! `torch.clamp`'s backward does; the up projection's backward with `d_gu` as its (grouped)
//! output gradient gives `dx [T, H]` and the gate/up LoRA gradients. The frozen base weights get
//! no gradient.
//!
//! # Rounding points ([`Rounding::Bf16`])
//!
//! Those of the two linears (see [`super::linear`]) plus the activation's, which are where the
//! GPU block stores bf16 tensors:
//! - `gu` is rounded (it is the up projection's bf16 output);
//! - `h` is rounded once, computed (here in `f64`, on the device in `f32`) from the rounded `gu`;
//! - `y`, `dh`, `d_gates` and the LoRA gradients are rounded by the linears;
//! - `d_gu` is rounded once, computed from the rounded `gu` and `dh`;
//! - `dx` is the up projection's rounded slot sum of rounded per-slot rows.
//!
//! In [`Rounding::Exact`] mode nothing is rounded to bf16; the intermediate tensors pass between
//! the stages as `f32` (the linears' public results), which the finite-difference check's
//! tolerance absorbs.

use crate::error::{Error, Result};

use super::Rounding;
use super::linear::{LinearProblem, linear_backward, linear_forward};
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
    /// Dequantized gate/up weights `[E, 2I, H]` (rows `[0, I)` of each expert produce the gate).
    pub gate_up: &'a [f32],
    /// Dequantized down weights `[E, H, I]`.
    pub down: &'a [f32],
    /// LoRA of the gate/up projection (`K = H`, `N = 2I`).
    pub lora_gate_up: Option<RefLora<'a>>,
    /// LoRA of the down projection (`K = I`, `N = H`).
    pub lora_down: Option<RefLora<'a>>,
    /// Routing weights `[T, top_k]`.
    pub gates: &'a [f32],
    /// DeepSeek-V4's clamp limit (finite, positive), or `None`.
    pub limit: Option<f32>,
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
    let h = activation(&gu, p.intermediate, p.limit, rounding);
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
    let d_gu = activation_grad(&fwd.gu, &dh, p.intermediate, p.limit, rounding);
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

/// `h = rnd(swiglu(gate, up))` over grouped rows of `gu [rows, 2I]`.
fn activation(gu: &[f32], width: usize, limit: Option<f32>, rounding: Rounding) -> Vec<f32> {
    let limit = limit.map(f64::from);
    let mut h = Vec::with_capacity(gu.len() / 2);
    for row in gu.chunks_exact(2 * width) {
        let (gate, up) = row.split_at(width);
        h.extend(
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| rounding.apply(swiglu(f64::from(g), f64::from(u), limit)) as f32),
        );
    }
    h
}

/// `d_gu = rnd(swiglu_grad(gate, up, dh))` over grouped rows (`[rows, 2I]`, gate half first).
fn activation_grad(
    gu: &[f32],
    dh: &[f32],
    width: usize,
    limit: Option<f32>,
    rounding: Rounding,
) -> Vec<f32> {
    let limit = limit.map(f64::from);
    let mut d_gu = vec![0f32; gu.len()];
    for ((row, d_row), dh_row) in gu
        .chunks_exact(2 * width)
        .zip(d_gu.chunks_exact_mut(2 * width))
        .zip(dh.chunks_exact(width))
    {
        for i in 0..width {
            let (d_gate, d_up) = swiglu_grad(
                f64::from(row[i]),
                f64::from(row[width + i]),
                f64::from(dh_row[i]),
                limit,
            );
            d_row[i] = rounding.apply(d_gate) as f32;
            d_row[width + i] = rounding.apply(d_up) as f32;
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
    if let Some(lim) = p.limit
        && !(lim.is_finite() && lim > 0.0)
    {
        return Err(Error::InvalidArgument {
            what: "limit",
            detail: format!("must be finite and positive, got {lim}"),
        });
    }
    let (e, h, i) = (p.num_experts, p.hidden, p.intermediate);
    expect_len("x", p.x.len(), &[routing.tokens, h])?;
    expect_len("gate_up", p.gate_up.len(), &[e, 2 * i, h])?;
    expect_len("down", p.down.len(), &[e, h, i])?;
    expect_len("gates", p.gates.len(), &[routing.tokens, routing.top_k])?;
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
        limit: Option<f32>,
    }

    /// Owned tensors of a [`Case`]. Trainable values are multiples of 2^-10 below 4 in
    /// magnitude, so every finite-difference step `±2^-5`, `±2^-6` is exact in `f32`.
    #[derive(Debug, Clone)]
    struct Data {
        case: Case,
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
                    let id = rng.below(e as u64) as i64;
                    if !chosen.contains(&id) {
                        chosen.push(id);
                    }
                }
                ids.extend(chosen);
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
            Data {
                case,
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
                limit: c.limit,
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
            let masks = match self.case.limit {
                Some(lim) => {
                    let w = self.case.inter;
                    f.gu.chunks_exact(2 * w)
                        .flat_map(|row| {
                            row[..w]
                                .iter()
                                .map(move |&g| g > lim)
                                .chain(row[w..].iter().map(move |&u| u.abs() > lim))
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
            limit: None,
        }
    }

    #[test]
    fn block_gradients_match_finite_differences() {
        let cases = [
            base_case(),
            // A clamp limit that cuts a good share of the gates and ups.
            Case {
                seed: 2,
                limit: Some(0.75),
                ..base_case()
            },
            // top_k = 1, an empty expert, no LoRA on the gate/up projection.
            Case {
                seed: 3,
                tokens: 3,
                top_k: 1,
                experts: 4,
                rank_up: 0,
                limit: Some(1.5),
                ..base_case()
            },
        ];
        for c in cases {
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
            if c.limit.is_some() {
                let f = d.forward();
                let clamped = f.gu.iter().filter(|v| v.abs() > c.limit.unwrap()).count();
                assert!(
                    clamped > 0 && clamped < f.gu.len(),
                    "the limit must clamp some but not all elements ({c:?})"
                );
            }
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
        for limit in [None, Some(1.0)] {
            let d = Data::new(Case {
                seed: 9,
                limit,
                ..base_case()
            });
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
                assert!(representable(v), "{name} is not bf16 ({limit:?})");
            }
            // h is the rounded activation of the rounded gu; d_gu the rounded gradient.
            let w = d.case.inter;
            let lim = limit.map(f64::from);
            for (row, gu_row) in f.gu.chunks_exact(2 * w).enumerate() {
                for i in 0..w {
                    let (gate, up) = (f64::from(gu_row[i]), f64::from(gu_row[w + i]));
                    assert_eq!(f.h[row * w + i], round_bf16(swiglu(gate, up, lim) as f32));
                    let (dg, du) = swiglu_grad(gate, up, f64::from(g.dh[row * w + i]), lim);
                    assert_eq!(g.d_gu[row * 2 * w + i], round_bf16(dg as f32));
                    assert_eq!(g.d_gu[row * 2 * w + w + i], round_bf16(du as f32));
                }
            }
            // And the whole block stays close to the exact one.
            let (fe, ge) = moe_forward_backward(&p, &d.routing, &d.dy, Rounding::Exact).unwrap();
            let close = |name: &str, a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(1e-3f32, |m, &v| m.max(v.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 5e-2 * scale,
                        "{name}: {x} vs {y} ({limit:?})"
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
                    limit: Some(lim),
                    ..base
                }),
                "limit",
            );
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
            moe_backward(&base, &d.routing, &d.dy[1..], Rounding::Bf16),
            "dy",
        );
        let mut broken = d.routing.clone();
        broken.expert_offsets[0] += 1;
        assert!(moe_forward(&base, &broken, Rounding::Exact).is_err());
    }
}
