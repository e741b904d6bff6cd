//! The gated MoE MLP block (SPEC §6, and gpt-oss's block of `GPT_OSS.md` §1) on the GPU: two
//! LoRA-fused expert linears ([`crate::op::ExpertLinear`]) around a gated activation
//! ([`Activation`]), forward and backward, plus the router's CPU helper [`route_softmax_topk`].
//!
//! # Flow
//!
//! With `x [T, H]`, a [`DeviceRouting`] of `T` tokens and `top_k` slots (`L = T·top_k` rows) and
//! the gates `[T, top_k]`:
//!
//! 1. `gu = gate_up(x) + b_gu[e]`: token-ordered input, grouped output, `[L, 2I]` (bf16; the
//!    optional frozen bias is added in the GEMM's epilogue before the rounding);
//! 2. `h = act(gate, up)`, `[L, I]` (bf16), with each unit's gate and up in the columns of the
//!    block's [`GateUpLayout`] (split halves, or interleaved as in gpt-oss's checkpoint) and the
//!    activation SwiGLU (DeepSeek-V4's clamp optional) or gpt-oss's
//!    `(clamp(u, −L, L) + 1)·g·σ(α·g)`, `g = min(gate, L)`: the `mxmoe_glu_fwd_bf16` kernel,
//!    f32 math;
//! 3. `y = Σ_j gate_j·(down(h) + b_d[e])`: grouped input, scattered per-slot rows (the optional
//!    frozen down bias added in the epilogue, so the gates scale it), combined by the gates,
//!    `[T, H]`.
//!
//! Backward (`dy [T, H]`): the down projection's backward gives `dh [L, I]`, the down LoRA
//! gradients and `d_gates = ⟨dy, o + b_d⟩` (from the stored per-slot rows, bias included);
//! `mxmoe_glu_bwd_bf16` turns `gu` and `dh` into `d_gu [L, 2I]` (zero where the clamp cut; at
//! exactly `±L` as the activation's [`crate::activation::ClampBoundary`] says); the up
//! projection's backward gives `dx [T, H]` and the gate/up LoRA gradients. The frozen base
//! weights (bf16 or MXFP4) and biases get no gradient. No host synchronisation unless a
//! projection runs Strategy A or `Auto`.
//!
//! # What is kept between the passes
//!
//! [`MoeSaved`] holds the up projection's [`Saved`] state (sharing the caller's `x`, routing and
//! weights through reference-counted handles), `gu` (read by the activation's backward) and the
//! down projection's [`Saved`] state, which keeps `h`. It borrows nothing. Nothing is recomputed
//! in [`backward`].
//!
//! # Numerics
//!
//! Every tensor passed between kernels is bf16: `gu`, `h`, `y`, `dh`, `d_gu`, `dx` and the
//! gradients are each rounded once from f32 (the rounding points of
//! [`crate::reference::moe`], which mirrors this flow on the CPU).

use crate::activation::{Activation, GateUpLayout};
use crate::error::{Error, Result};
use crate::kernels::moe::{glu_bwd, glu_fwd};
use crate::op::{
    self, Bf16Matrix, ExpertLinear, ExpertWeights, LoraWeights, RowOrder, Saved, Strategy,
};
use crate::routing::DeviceRouting;
use crate::runtime::Runtime;
use crate::shared::bf16::round_bf16;

/// One gated MoE MLP block: frozen expert weights in checkpoint layouts and optional frozen
/// biases, optional LoRA on each projection, the activation and its gate/up layout, and the
/// MXFP4 strategy of both projections.
#[derive(Clone, Copy)]
pub struct MoeBlock<'a> {
    /// `gate_up_proj [E, 2I, H]`: each expert's rows hold the gates and ups in
    /// [`MoeBlock::layout`]'s order (split: rows `[0, I)` gates, `[I, 2I)` ups; interleaved:
    /// row `2i` gate `i`, `2i + 1` up `i`).
    pub gate_up: ExpertWeights<'a>,
    /// `down_proj [E, H, I]`.
    pub down: ExpertWeights<'a>,
    /// LoRA of the gate/up projection (`A [E·r, H]`, `B [2I, E·r]`, B's rows in the layout's
    /// order).
    pub lora_gate_up: Option<&'a LoraWeights>,
    /// LoRA of the down projection (`A [E·r, I]`, `B [H, E·r]`).
    pub lora_down: Option<&'a LoraWeights>,
    /// The gated activation (SwiGLU with an optional clamp limit, or gpt-oss's).
    pub activation: Activation,
    /// Where each unit's gate and up sit in a gate/up row.
    pub layout: GateUpLayout,
    /// Frozen gate/up bias `[E, 2I]` (in the layout's order), added before the activation.
    pub gate_up_bias: Option<&'a Bf16Matrix>,
    /// Frozen down bias `[E, H]`, added to each slot's row before the gates scale it.
    pub down_bias: Option<&'a Bf16Matrix>,
    /// How MXFP4 and NVFP4 weights are multiplied (both projections; ignored for bf16 weights).
    pub strategy: Strategy,
}

/// What [`backward`] needs: both projections' saved states (the down one keeps `h`), `gu`, the
/// routing and the activation. Owns (shares) everything it reads; borrows nothing.
pub struct MoeSaved {
    activation: (Activation, GateUpLayout),
    hidden: usize,
    routing: DeviceRouting,
    up: Saved,
    down: Saved,
    gu: Bf16Matrix,
    strategies: (Strategy, Strategy),
}

/// The LoRA gradients of one projection.
pub struct LoraGrads {
    /// Gradient of `A`, `[E·r, K]` (zero rows for experts without tokens).
    pub da: Bf16Matrix,
    /// Gradient of `B`, `[N, E·r]` (zero columns for experts without tokens).
    pub db: Bf16Matrix,
}

/// The block's gradients. The frozen base weights get none.
pub struct MoeGrads {
    /// Gradient of `x`, `[T, H]`.
    pub dx: Bf16Matrix,
    /// Gradients of the gate/up LoRA (`None` without it).
    pub gate_up: Option<LoraGrads>,
    /// Gradients of the down LoRA (`None` without it).
    pub down: Option<LoraGrads>,
    /// Gradient of the gates, `[T, top_k]`.
    pub d_gates: Bf16Matrix,
}

/// `(E, N, K)` of expert weights in checkpoint layout `[E, N, K]`.
fn weights_shape(w: &ExpertWeights<'_>) -> (usize, usize, usize) {
    match w {
        ExpertWeights::Bf16(d) => d.shape(),
        ExpertWeights::Mxfp4(m) => {
            let s = m.shape();
            (s.experts(), s.n(), s.k())
        }
        ExpertWeights::Nvfp4(m) => {
            let s = m.shape();
            (s.experts(), s.n(), s.k())
        }
    }
}

/// Checks one projection's LoRA factors against `E`, `K` and `N`.
fn check_lora(
    lora: Option<&LoraWeights>,
    names: [&'static str; 2],
    e: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let Some(l) = lora else { return Ok(()) };
    let er = e * l.rank;
    if (l.a.rows(), l.a.cols()) != (er, k) {
        return Err(Error::Shape {
            tensor: names[0],
            expected: format!("[{er}, {k}] (E·r, K)"),
            actual: format!("[{}, {}]", l.a.rows(), l.a.cols()),
        });
    }
    if (l.b.rows(), l.b.cols()) != (n, er) {
        return Err(Error::Shape {
            tensor: names[1],
            expected: format!("[{n}, {er}] (N, E·r)"),
            actual: format!("[{}, {}]", l.b.rows(), l.b.cols()),
        });
    }
    Ok(())
}

impl<'a> MoeBlock<'a> {
    /// A SwiGLU block (split gate/up halves) without LoRA, biases or clamp limit, with
    /// [`Strategy::Auto`].
    pub fn new(gate_up: ExpertWeights<'a>, down: ExpertWeights<'a>) -> Self {
        Self {
            gate_up,
            down,
            lora_gate_up: None,
            lora_down: None,
            activation: Activation::SwiGlu { limit: None },
            layout: GateUpLayout::Split,
            gate_up_bias: None,
            down_bias: None,
            strategy: Strategy::Auto,
        }
    }

    /// gpt-oss's block (`GPT_OSS.md` §1): interleaved gate/up rows, [`Activation::GPT_OSS`]
    /// (α = 1.702, L = 7, strict clamp boundary; set [`MoeBlock::activation`] for a config's
    /// own values), the frozen biases `gate_up_bias [E, 2I]` and `down_bias [E, H]`, no LoRA,
    /// [`Strategy::Auto`].
    pub fn gpt_oss(
        gate_up: ExpertWeights<'a>,
        down: ExpertWeights<'a>,
        gate_up_bias: &'a Bf16Matrix,
        down_bias: &'a Bf16Matrix,
    ) -> Self {
        Self {
            activation: Activation::GPT_OSS,
            layout: GateUpLayout::Interleaved,
            gate_up_bias: Some(gate_up_bias),
            down_bias: Some(down_bias),
            ..Self::new(gate_up, down)
        }
    }

    /// `(H, I)` after checking every block-level shape (the linears check the rest).
    fn validate(
        &self,
        x: &Bf16Matrix,
        routing: &DeviceRouting,
        gates: &Bf16Matrix,
    ) -> Result<(usize, usize)> {
        let (e, n_gu, h) = weights_shape(&self.gate_up);
        let (e_dn, n_dn, k_dn) = weights_shape(&self.down);
        if !n_gu.is_multiple_of(2) {
            return Err(Error::InvalidArgument {
                what: "gate_up_proj",
                detail: format!("its {n_gu} rows per expert must be 2·I (even)"),
            });
        }
        let i = n_gu / 2;
        if (e_dn, n_dn, k_dn) != (e, h, i) {
            return Err(Error::Shape {
                tensor: "down_proj",
                expected: format!(
                    "[{e}, {h}, {i}] ([E, H, I] for gate_up_proj [{e}, {n_gu}, {h}])"
                ),
                actual: format!("[{e_dn}, {n_dn}, {k_dn}]"),
            });
        }
        if i == 0 || !i.is_multiple_of(8) {
            return Err(Error::InvalidArgument {
                what: "gate_up_proj",
                detail: format!("the intermediate size I = {i} must be a positive multiple of 8"),
            });
        }
        if e != routing.num_experts() {
            return Err(Error::Shape {
                tensor: "gate_up_proj",
                expected: format!("{} experts (the routing's)", routing.num_experts()),
                actual: format!("{e} experts"),
            });
        }
        let (t, top_k) = (routing.tokens(), routing.top_k());
        if (x.rows(), x.cols()) != (t, h) {
            return Err(Error::Shape {
                tensor: "x",
                expected: format!("[{t}, {h}] (T, H)"),
                actual: format!("[{}, {}]", x.rows(), x.cols()),
            });
        }
        if (gates.rows(), gates.cols()) != (t, top_k) {
            return Err(Error::Shape {
                tensor: "gates",
                expected: format!("[{t}, {top_k}] (T, top_k)"),
                actual: format!("[{}, {}]", gates.rows(), gates.cols()),
            });
        }
        self.activation.check()?;
        for (bias, name, n) in [
            (self.gate_up_bias, "gate_up bias", 2 * i),
            (self.down_bias, "down bias", h),
        ] {
            if let Some(b) = bias
                && (b.rows(), b.cols()) != (e, n)
            {
                return Err(Error::Shape {
                    tensor: name,
                    expected: format!("[{e}, {n}] (E, {})", if n == h { "H" } else { "2I" }),
                    actual: format!("[{}, {}]", b.rows(), b.cols()),
                });
            }
        }
        check_lora(
            self.lora_gate_up,
            ["gate_up LoRA A", "gate_up LoRA B"],
            e,
            h,
            2 * i,
        )?;
        check_lora(self.lora_down, ["down LoRA A", "down LoRA B"], e, i, h)?;
        Ok((h, i))
    }

    /// The gate/up projection: token-ordered input, grouped output.
    fn up_layer(&self) -> ExpertLinear<'a> {
        ExpertLinear::new(
            self.gate_up,
            self.lora_gate_up,
            RowOrder::Scattered,
            RowOrder::Grouped,
        )
        .with_strategy(self.strategy)
        .with_bias(self.gate_up_bias)
    }

    /// The down projection: grouped input, scattered output (combined by the gates).
    fn down_layer(&self) -> ExpertLinear<'a> {
        ExpertLinear::new(
            self.down,
            self.lora_down,
            RowOrder::Grouped,
            RowOrder::Scattered,
        )
        .with_strategy(self.strategy)
        .with_bias(self.down_bias)
    }

    /// Forward pass: `y [T, H]` and the state [`backward`] needs.
    ///
    /// Errors: [`Error::Shape`] / [`Error::InvalidArgument`] for inconsistent weights, LoRA,
    /// `x`, gates or limit (checked before any launch), and whatever the projections report.
    pub fn forward(
        &self,
        gpu: &Runtime,
        x: &Bf16Matrix,
        routing: &DeviceRouting,
        gates: &Bf16Matrix,
    ) -> Result<(Bf16Matrix, MoeSaved)> {
        let (hidden, i) = self.validate(x, routing, gates)?;
        let l = routing.rows();
        let (up, up_saved) = self.up_layer().forward(gpu, x, routing, None)?;
        let gu = up.out;
        let act = (self.activation, self.layout);
        let h = Bf16Matrix::from_device(glu_fwd(gpu, gu.data(), l, i, act)?, l, i)?;
        // The down projection's saved state keeps `h`.
        let (down, down_saved) = self.down_layer().forward(gpu, &h, routing, Some(gates))?;
        let (y, down_strategy) = (down.out, down.strategy);
        Ok((
            y,
            MoeSaved {
                activation: act,
                hidden,
                routing: routing.clone(),
                up: up_saved,
                down: down_saved,
                gu,
                strategies: (up.strategy, down_strategy),
            },
        ))
    }
}

impl MoeSaved {
    /// The gate/up projection's output `gu [L, 2I]` (grouped rows, the layout's columns, bias
    /// included).
    pub fn gu(&self) -> &Bf16Matrix {
        &self.gu
    }

    /// The activation `h [L, I]` (grouped rows), the down projection's input.
    pub fn h(&self) -> &Bf16Matrix {
        self.down.input()
    }

    /// The paths the forward ran for `(gate_up, down)`: `Fused` or `SelectiveDequant`.
    pub fn strategies(&self) -> (Strategy, Strategy) {
        self.strategies
    }
}

/// Both LoRA gradients of a projection, or `None` without LoRA.
fn lora_grads(da: Option<Bf16Matrix>, db: Option<Bf16Matrix>) -> Option<LoraGrads> {
    match (da, db) {
        (Some(da), Some(db)) => Some(LoraGrads { da, db }),
        _ => None,
    }
}

/// Backward pass for `dy [T, H]`.
///
/// Errors: [`Error::Shape`] for a `dy` of the wrong shape, and whatever the kernels report.
pub fn backward(gpu: &Runtime, saved: &MoeSaved, dy: &Bf16Matrix) -> Result<MoeGrads> {
    let routing = &saved.routing;
    let (t, l) = (routing.tokens(), routing.rows());
    let (h, i) = (saved.hidden, saved.h().cols());
    if (dy.rows(), dy.cols()) != (t, h) {
        return Err(Error::Shape {
            tensor: "dy",
            expected: format!("[{t}, {h}] (T, H)"),
            actual: format!("[{}, {}]", dy.rows(), dy.cols()),
        });
    }
    // Down projection.
    let down = op::backward(gpu, &saved.down, dy)?;
    let d_gates = down.d_gates.ok_or_else(|| Error::InvalidArgument {
        what: "down projection",
        detail: "the gated projection returned no gate gradient".into(),
    })?;
    // Activation: d_gu [L, 2I] from gu and dh = the down projection's input gradient [L, I].
    let d_gu = Bf16Matrix::from_device(
        glu_bwd(gpu, saved.gu.data(), down.dx.data(), l, i, saved.activation)?,
        l,
        2 * i,
    )?;
    // Gate/up projection, with d_gu as its grouped output gradient.
    let up = op::backward(gpu, &saved.up, &d_gu)?;
    Ok(MoeGrads {
        dx: up.dx,
        gate_up: lora_grads(up.da, up.db),
        down: lora_grads(down.da, down.db),
        d_gates,
    })
}

/// The softmax → top-k router of Qwen/OLMoE/Mixtral (SPEC §2.5), on the CPU.
///
/// For each token (row of `logits [tokens, experts]`): f32 softmax (max-subtracted), the
/// `top_k` largest probabilities in descending order (ties to the lower expert index), and —
/// with `renormalize` (`norm_topk_prob`, the default) — each divided by their f32 sum. Returns
/// `(ids [tokens, top_k], weights [tokens, top_k])` with the weights rounded to bf16 (the
/// activation dtype), ready for [`DeviceRouting::from_host_ids`] and
/// [`Bf16Matrix::from_f32`].
///
/// Errors: [`Error::InvalidArgument`] for `top_k` outside `1..=experts` or a non-finite logit;
/// [`Error::Shape`] when `logits.len() != tokens·experts`.
pub fn route_softmax_topk(
    logits: &[f32],
    tokens: usize,
    experts: usize,
    top_k: usize,
    renormalize: bool,
) -> Result<(Vec<i64>, Vec<f32>)> {
    if top_k == 0 || top_k > experts {
        return Err(Error::InvalidArgument {
            what: "top_k",
            detail: format!("must be in 1..={experts} (the expert count), got {top_k}"),
        });
    }
    if tokens.checked_mul(experts) != Some(logits.len()) {
        return Err(Error::Shape {
            tensor: "router logits",
            expected: format!("[{tokens}, {experts}]"),
            actual: format!("{} elements", logits.len()),
        });
    }
    let mut ids = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for (t, row) in logits.chunks_exact(experts).enumerate() {
        if let Some(e) = row.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument {
                what: "router logits",
                detail: format!("token {t}, expert {e} is {}", row[e]),
            });
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let probs: Vec<f32> = exps.iter().map(|&v| v / sum).collect();
        order.clear();
        order.extend(0..experts);
        // A stable sort by descending probability keeps the lower index first among ties.
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let chosen = &order[..top_k];
        let norm: f32 = if renormalize {
            chosen.iter().map(|&e| probs[e]).sum()
        } else {
            1.0
        };
        for &e in chosen {
            ids.push(e as i64);
            weights.push(round_bf16(probs[e] / norm));
        }
    }
    Ok((ids, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_picks_the_largest_probabilities_in_order() {
        let logits = [
            0.1, 3.0, -1.0, 2.0, 2.0, 0.0, /* token 1 */ 5.0, 0.0, 0.0, 0.0, 0.0, 5.0,
        ];
        let (ids, w) = route_softmax_topk(&logits, 2, 6, 3, true).unwrap();
        // Ties go to the lower index (experts 3 and 4; 0 and 5).
        assert_eq!(ids, [1, 3, 4, 0, 5, 1]);
        for row in w.chunks_exact(3) {
            let sum: f32 = row.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-2,
                "renormalised weights sum to {sum}"
            );
            assert!(row.iter().all(|&v| round_bf16(v) == v), "weights are bf16");
        }
        assert_eq!(w[1], w[2]);
        // Without renormalisation the weights are the softmax probabilities themselves.
        let (ids2, w2) = route_softmax_topk(&logits, 2, 6, 3, false).unwrap();
        assert_eq!(ids2, ids);
        let row0 = &logits[..6];
        let z: f64 = row0.iter().map(|&v| f64::from(v).exp()).sum();
        let p1 = (3f64.exp() / z) as f32;
        assert_eq!(w2[0], round_bf16(p1));
        assert!(w2[0] < w[0]);
    }

    #[test]
    fn router_matches_a_float64_softmax_on_random_logits() {
        let mut state = 0x1234_5678u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0
        };
        let (t, e, k) = (50, 16, 4);
        let logits: Vec<f32> = (0..t * e).map(|_| next()).collect();
        let (ids, w) = route_softmax_topk(&logits, t, e, k, true).unwrap();
        for tok in 0..t {
            let row = &logits[tok * e..][..e];
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let chosen: Vec<i64> = idx[..k].iter().map(|&i| i as i64).collect();
            assert_eq!(&ids[tok * k..][..k], &chosen[..], "token {tok}");
            let z: f64 = idx[..k].iter().map(|&i| f64::from(row[i]).exp()).sum();
            for (j, &i) in idx[..k].iter().enumerate() {
                let want = f64::from(row[i]).exp() / z;
                let got = f64::from(w[tok * k + j]);
                assert!(
                    (got - want).abs() <= 4e-3 * want,
                    "token {tok} slot {j}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn router_rejects_bad_input() {
        assert!(matches!(
            route_softmax_topk(&[0.0; 4], 1, 4, 0, true),
            Err(Error::InvalidArgument { what: "top_k", .. })
        ));
        assert!(matches!(
            route_softmax_topk(&[0.0; 4], 1, 4, 5, true),
            Err(Error::InvalidArgument { what: "top_k", .. })
        ));
        assert!(matches!(
            route_softmax_topk(&[0.0; 5], 1, 4, 2, true),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            route_softmax_topk(&[0.0, f32::NAN, 0.0, 0.0], 1, 4, 2, true),
            Err(Error::InvalidArgument {
                what: "router logits",
                ..
            })
        ));
        assert!(matches!(
            route_softmax_topk(&[0.0, f32::INFINITY, 0.0, 0.0], 1, 4, 2, true),
            Err(Error::InvalidArgument { .. })
        ));
        let (ids, w) = route_softmax_topk(&[], 0, 4, 2, true).unwrap();
        assert!(ids.is_empty() && w.is_empty());
    }
}
