//! Reference forward and backward of the LoRA-fused expert linear (SPEC §3), on the routing of
//! [`super::routing`], with the gates of SPEC §2.3.
//!
//! # Row addressing (SPEC §2.2)
//!
//! Every computation iterates grouped rows `p ∈ [0, L_valid)` with expert
//! `e = sorted_expert_idxs[p]` and slot `slot = sorted_scattered_idxs[p]`:
//!
//! - input row: [`RowOrder::Grouped`] → `x[p]` (`x` is `[L_valid, K]`, `fan_out` must be 1);
//!   [`RowOrder::Scattered`] → `x[slot / fan_out]` (`x` is `[T·top_k / fan_out, K]`; `fan_out =
//!   top_k` for token-ordered input `[T, K]`, `1` for slot-ordered input `[T·top_k, K]`);
//! - output row: [`RowOrder::Grouped`] → `out[p]` (`out` is `[L_valid, N]`);
//!   [`RowOrder::Scattered`] → `out[slot]` (`out` is `[T·top_k, N]`; rows of dropped slots stay 0).
//!
//! # Numerics (SPEC §3.2, §3.3, §10 grouped-Gram)
//!
//! With `rnd` = the [`Rounding`] mode's rounding, `s` = the LoRA scaling, `A_e` = rows
//! `e·r … e·r+r−1` of `A [E·r, K]`, `B_e` = columns `e·r … e·r+r−1` of `B [N, E·r]`, and `W_e` the
//! expert's `[N, K]` checkpoint matrix (`W_store[e][n][k]`), every sum accumulated in `f64`:
//!
//! Forward, per grouped row `p` with input row `x_p`:
//! - `XA[p] = rnd(x_p · A_eᵀ)` (`[r]`, the kernels' rounded `xa`, which dB reads) and its low
//!   part `XA_lo[p] = rnd(x_p · A_eᵀ − XA[p])`: the forward epilogue reads XA as these two bf16
//!   terms (about 16 mantissa bits), because a once-rounded XA puts an error along `B_e`'s columns
//!   into every output row, which the next layer's LoRA gradients then see undamped (SPEC §3.2's
//!   REF rounds XA once; mxmoe is more precise here);
//! - `out_p = rnd(x_p · W_eᵀ + s · ((XA[p] + XA_lo[p]) · B_eᵀ) + b[e])` (`[N]`), where `b [E, N]`
//!   is the optional frozen per-expert bias (zero without one), added before the single output
//!   rounding;
//! - with gates (`[T, top_k]`, scattered output only): `y[t] = rnd(Σ_j gates[t, j] · out[t·top_k + j])`,
//!   so the bias is scaled by the gate like the rest of the row (gpt-oss's down projection).
//!
//! Backward, with `dy` the gradient of `y` (`[T, N]`) when gates are given, else the gradient of
//! `out` in `out`'s own layout:
//! - `dY_g[p] = rnd(dy[slot / top_k] · gates[slot])` with gates, else the `dy` row of `out_p`;
//! - `YB[p] = rnd(dY_g[p] · B_e)` (`[r]`);
//! - per-row input gradient `dX_p = rnd(dY_g[p] · W_e + s · (YB[p] · A_e))` (`[K]`); grouped input:
//!   `dx[p] = dX_p`; scattered input: `dx[i] = rnd(Σ_{p : slot/fan_out = i} dX_p)` (the sum of the
//!   already rounded per-row values, like REF's `view(T, k, K).sum(1)`), zero for rows no valid
//!   slot reads;
//! - `dA_e = rnd(s · Σ_{p∈e} YB[p]ᵀ ⊗ x_p)` (`[r, K]`), `dB_e = rnd(s · Σ_{p∈e} dY_g[p]ᵀ ⊗ XA[p])`
//!   (`[N, r]`); experts that own no rows get exact (positive) zeros;
//! - `d_gates[t, j] = rnd(⟨out[t·top_k + j], dy[t]⟩)` with the (rounded) forward `out`, bias
//!   included; zero for a dropped slot (whose row, bias included, is absent).
//!
//! The bias is frozen: it gets no gradient, and it changes no gradient but `d_gates`.
//!
//! In [`Rounding::Bf16`] mode every input (`x`, `w`, bias, LoRA weights, gates, `dy`) is rounded to bf16
//! before use, as the upload in the activation dtype would; the scaling stays `f32`.

use crate::error::{Error, Result};

use super::Rounding;
use crate::routing::{Routing, RowOrder};

/// One expert-linear problem: inputs, weights, LoRA factors and layout flags. All tensors are
/// row-major `f32` slices; in [`Rounding::Bf16`] mode they are rounded to bf16 before use.
#[derive(Debug, Clone, Copy)]
pub struct LinearProblem<'a> {
    /// Input activations, `[x_rows, k]`; see the module documentation for which row is read.
    pub x: &'a [f32],
    /// Rows of `x`: `L_valid` for grouped input, `T·top_k / fan_out` for scattered input.
    pub x_rows: usize,
    /// Dequantized expert weights in checkpoint layout `[num_experts, n, k]`
    /// (`W_store[e][n][k]`; the kernels' logical `W_e` is its transpose).
    pub w: &'a [f32],
    /// Number of experts `E`; must equal the routing's.
    pub num_experts: usize,
    /// Output dimension `N`.
    pub n: usize,
    /// Reduction (input) dimension `K`.
    pub k: usize,
    /// LoRA A, expert-major `[num_experts · rank, k]` (empty when `rank == 0`).
    pub lora_a: &'a [f32],
    /// LoRA B, expert-major `[n, num_experts · rank]` (empty when `rank == 0`).
    pub lora_b: &'a [f32],
    /// LoRA rank `r`; 0 means no LoRA.
    pub rank: usize,
    /// LoRA scaling `s`.
    pub scaling: f32,
    /// Slots per input row for scattered input: `top_k` for `[T, K]` input, 1 for `[T·top_k, K]`;
    /// must be 1 for grouped input.
    pub fan_out: usize,
    /// Row order of `x` (`grouped_in`).
    pub input_order: RowOrder,
    /// Row order of `out` (`grouped_out`).
    pub output_order: RowOrder,
    /// Routing weights `[T, top_k]`; only with [`RowOrder::Scattered`] output (SPEC §2.3).
    pub gates: Option<&'a [f32]>,
    /// Frozen per-expert bias `[num_experts, n]`, added to every grouped row of its expert before
    /// the output rounding (and before the gates); `None` for no bias.
    pub bias: Option<&'a [f32]>,
}

/// The reference forward's results.
#[derive(Debug, Clone, PartialEq)]
pub struct RefForward {
    /// Per-slot output `[out_rows, n]`: grouped row `p` at row `p` (grouped output, `out_rows =
    /// L_valid`) or at row `sorted_scattered_idxs[p]` (scattered output, `out_rows = T·top_k`,
    /// dropped slots zero).
    pub out: Vec<f32>,
    /// Rows of `out`.
    pub out_rows: usize,
    /// Gate-reduced output `[T, n]`, present exactly when gates were given.
    pub y: Option<Vec<f32>>,
    /// `XA = x_p · A_eᵀ`, `[L_valid, rank]` in grouped order, rounded like the kernels' `xa`.
    pub xa: Vec<f32>,
}

/// The reference backward's results (no weight or bias gradient: `W` and the bias are frozen).
#[derive(Debug, Clone, PartialEq)]
pub struct RefGrads {
    /// Gradient of `x`, same shape and layout as `x` (`[x_rows, k]`).
    pub dx: Vec<f32>,
    /// Gradient of LoRA A, `[num_experts · rank, k]`.
    pub da: Vec<f32>,
    /// Gradient of LoRA B, `[n, num_experts · rank]`.
    pub db: Vec<f32>,
    /// Gradient of the gates, `[T, top_k]`, present exactly when gates were given.
    pub d_gates: Option<Vec<f32>>,
}

/// Runs the reference forward (see the module documentation for the exact formulas).
///
/// Errors: [`Error::Shape`] / [`Error::InvalidArgument`] for an inconsistent routing, a slice
/// whose length does not match its declared shape, `fan_out != 1` with grouped input, or gates
/// with grouped output.
pub fn linear_forward(
    p: &LinearProblem<'_>,
    routing: &Routing,
    rounding: Rounding,
) -> Result<RefForward> {
    let (geo, fwd) = forward64(p, routing, rounding)?;
    Ok(RefForward {
        out: narrow(&fwd.out),
        out_rows: geo.out_rows,
        y: fwd.y.as_deref().map(narrow),
        xa: narrow(&fwd.xa),
    })
}

/// Runs the reference backward for the output gradient `dy`.
///
/// `dy` is the gradient of `y` (`[T, n]`) when `p.gates` is given, otherwise the gradient of
/// `out` in `out`'s layout (`[L_valid, n]` for grouped output, `[T·top_k, n]` for scattered output,
/// where rows of dropped slots are ignored). The forward is recomputed internally (for `XA` and,
/// with gates, the saved per-slot output). Errors as [`linear_forward`], plus [`Error::Shape`]
/// for a `dy` of the wrong length.
pub fn linear_backward(
    p: &LinearProblem<'_>,
    routing: &Routing,
    dy: &[f32],
    rounding: Rounding,
) -> Result<RefGrads> {
    let g = backward64(p, routing, dy, rounding)?;
    Ok(RefGrads {
        dx: narrow(&g.dx),
        da: narrow(&g.da),
        db: narrow(&g.db),
        d_gates: g.d_gates.as_deref().map(narrow),
    })
}

/// Validated sizes of one problem.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// Grouped rows `L_valid`.
    rows: usize,
    /// Slots `T·top_k`.
    slots: usize,
    /// Tokens `T`.
    tokens: usize,
    /// `top_k`.
    top_k: usize,
    /// Rows of `out`.
    out_rows: usize,
}

/// The problem's inputs widened to `f64` (bf16-rounded first in [`Rounding::Bf16`] mode).
struct Inputs {
    x: Vec<f64>,
    w: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    gates: Option<Vec<f64>>,
    /// `[E, N]`.
    bias: Option<Vec<f64>>,
    s: f64,
}

impl Inputs {
    fn new(p: &LinearProblem<'_>, rounding: Rounding) -> Self {
        Inputs {
            x: widen(p.x, rounding),
            w: widen(p.w, rounding),
            a: widen(p.lora_a, rounding),
            b: widen(p.lora_b, rounding),
            gates: p.gates.map(|g| widen(g, rounding)),
            bias: p.bias.map(|b| widen(b, rounding)),
            s: f64::from(p.scaling),
        }
    }
}

/// Forward results in `f64`.
struct Forward64 {
    /// `out` in the requested layout.
    out: Vec<f64>,
    /// The same values in slot order, `[T·top_k, N]` (REF's `output_expanded`).
    slot_out: Vec<f64>,
    /// Gate-reduced output `[T, N]`.
    y: Option<Vec<f64>>,
    /// `[L_valid, r]`.
    xa: Vec<f64>,
}

/// Backward results in `f64`.
struct Grads64 {
    dx: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
    d_gates: Option<Vec<f64>>,
}

fn widen(v: &[f32], rounding: Rounding) -> Vec<f64> {
    v.iter().map(|&x| rounding.apply(f64::from(x))).collect()
}

fn narrow(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Product of `dims`, or an error naming `tensor` if it overflows.
fn numel(tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::InvalidArgument {
            what: tensor,
            detail: format!("element count of shape {dims:?} overflows usize"),
        })
}

/// Checks that `actual` is the element count of shape `dims`.
fn expect_len(tensor: &'static str, actual: usize, dims: &[usize]) -> Result<()> {
    let expected = numel(tensor, dims)?;
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            tensor,
            expected: format!("{expected} elements ({dims:?})"),
            actual: format!("{actual} elements"),
        })
    }
}

/// Validates `p` against `routing` and returns the sizes.
fn check(p: &LinearProblem<'_>, routing: &Routing) -> Result<Geometry> {
    routing.validate()?;
    if p.num_experts != routing.num_experts() {
        return Err(Error::InvalidArgument {
            what: "num_experts",
            detail: format!(
                "the problem has {} experts, the routing {}",
                p.num_experts,
                routing.num_experts()
            ),
        });
    }
    let rows = routing.num_rows();
    let slots = routing.num_slots();
    match p.input_order {
        RowOrder::Grouped => {
            if p.fan_out != 1 {
                return Err(Error::InvalidArgument {
                    what: "fan_out",
                    detail: format!("must be 1 for grouped input, got {}", p.fan_out),
                });
            }
            if p.x_rows != rows {
                return Err(Error::Shape {
                    tensor: "x_rows",
                    expected: format!("L_valid = {rows} for grouped input"),
                    actual: p.x_rows.to_string(),
                });
            }
        }
        RowOrder::Scattered => {
            if p.fan_out == 0 || p.x_rows.checked_mul(p.fan_out) != Some(slots) {
                return Err(Error::Shape {
                    tensor: "x_rows",
                    expected: format!(
                        "x_rows · fan_out = T·top_k = {slots} for scattered input (fan_out ≥ 1)"
                    ),
                    actual: format!("{} · {}", p.x_rows, p.fan_out),
                });
            }
        }
    }
    let er = numel("lora rows", &[p.num_experts, p.rank])?;
    expect_len("x", p.x.len(), &[p.x_rows, p.k])?;
    expect_len("w", p.w.len(), &[p.num_experts, p.n, p.k])?;
    expect_len("lora_a", p.lora_a.len(), &[er, p.k])?;
    expect_len("lora_b", p.lora_b.len(), &[p.n, er])?;
    if let Some(bias) = p.bias {
        expect_len("bias", bias.len(), &[p.num_experts, p.n])?;
    }
    if let Some(gates) = p.gates {
        if p.output_order != RowOrder::Scattered {
            return Err(Error::InvalidArgument {
                what: "gates",
                detail: "gates need scattered (slot-ordered) output (SPEC §2.3)".into(),
            });
        }
        expect_len("gates", gates.len(), &[routing.tokens, routing.top_k])?;
    }
    // Output sizes must not overflow either.
    numel("out", &[slots.max(rows), p.n])?;
    numel("y", &[routing.tokens, p.n])?;
    Ok(Geometry {
        rows,
        slots,
        tokens: routing.tokens,
        top_k: routing.top_k,
        out_rows: match p.output_order {
            RowOrder::Grouped => rows,
            RowOrder::Scattered => slots,
        },
    })
}

/// The `x` row that grouped row `row` reads.
fn input_row(p: &LinearProblem<'_>, routing: &Routing, row: usize) -> usize {
    match p.input_order {
        RowOrder::Grouped => row,
        RowOrder::Scattered => routing.sorted_scattered_idxs[row] as usize / p.fan_out,
    }
}

/// The `f64` forward behind [`linear_forward`].
fn forward64(
    p: &LinearProblem<'_>,
    routing: &Routing,
    rounding: Rounding,
) -> Result<(Geometry, Forward64)> {
    let geo = check(p, routing)?;
    let inp = Inputs::new(p, rounding);
    let (n, k, r) = (p.n, p.k, p.rank);
    let er = p.num_experts * r;

    let mut xa = vec![0.0f64; geo.rows * r];
    // XA as the forward epilogue reads it: the rounded value plus its rounded remainder.
    let mut xa_two_term = vec![0.0f64; r];
    let mut grouped_out = vec![0.0f64; geo.rows * n];
    for row in 0..geo.rows {
        let e = routing.sorted_expert_idxs[row] as usize;
        let x_row = &inp.x[input_row(p, routing, row) * k..][..k];
        for i in 0..r {
            let a_row = &inp.a[(e * r + i) * k..][..k];
            let mut acc = 0.0f64;
            for kk in 0..k {
                acc += x_row[kk] * a_row[kk];
            }
            let hi = rounding.apply(acc);
            xa[row * r + i] = hi;
            xa_two_term[i] = hi + rounding.apply(acc - hi);
        }
        for nn in 0..n {
            let w_row = &inp.w[(e * n + nn) * k..][..k];
            let mut acc = 0.0f64;
            for kk in 0..k {
                acc += x_row[kk] * w_row[kk];
            }
            let b_row = &inp.b[nn * er + e * r..][..r];
            let lora: f64 = xa_two_term.iter().zip(b_row).map(|(a, b)| a * b).sum();
            let bias = inp.bias.as_ref().map_or(0.0, |b| b[e * n + nn]);
            grouped_out[row * n + nn] = rounding.apply(acc + inp.s * lora + bias);
        }
    }

    let mut slot_out = vec![0.0f64; geo.slots * n];
    for row in 0..geo.rows {
        let slot = routing.sorted_scattered_idxs[row] as usize;
        slot_out[slot * n..][..n].copy_from_slice(&grouped_out[row * n..][..n]);
    }

    let y = inp.gates.as_ref().map(|gates| {
        let mut y = vec![0.0f64; geo.tokens * n];
        for t in 0..geo.tokens {
            for nn in 0..n {
                let mut acc = 0.0f64;
                for j in 0..geo.top_k {
                    let slot = t * geo.top_k + j;
                    acc += gates[slot] * slot_out[slot * n + nn];
                }
                y[t * n + nn] = rounding.apply(acc);
            }
        }
        y
    });

    let out = match p.output_order {
        RowOrder::Grouped => grouped_out,
        RowOrder::Scattered => slot_out.clone(),
    };
    Ok((
        geo,
        Forward64 {
            out,
            slot_out,
            y,
            xa,
        },
    ))
}

/// The `f64` backward behind [`linear_backward`].
fn backward64(
    p: &LinearProblem<'_>,
    routing: &Routing,
    dy: &[f32],
    rounding: Rounding,
) -> Result<Grads64> {
    let (geo, fwd) = forward64(p, routing, rounding)?;
    let (n, k, r) = (p.n, p.k, p.rank);
    let er = p.num_experts * r;
    match p.gates {
        Some(_) => expect_len("dy", dy.len(), &[geo.tokens, n])?,
        None => expect_len("dy", dy.len(), &[geo.out_rows, n])?,
    }
    let inp = Inputs::new(p, rounding);
    let dy = widen(dy, rounding);

    // Grouped output gradient dY_g [L_valid, N].
    let mut dyg = vec![0.0f64; geo.rows * n];
    for row in 0..geo.rows {
        let slot = routing.sorted_scattered_idxs[row] as usize;
        for nn in 0..n {
            dyg[row * n + nn] = match &inp.gates {
                Some(gates) => rounding.apply(dy[(slot / geo.top_k) * n + nn] * gates[slot]),
                None => match p.output_order {
                    RowOrder::Grouped => dy[row * n + nn],
                    RowOrder::Scattered => dy[slot * n + nn],
                },
            };
        }
    }

    // YB = rnd(dY_g · B_e) [L_valid, r].
    let mut yb = vec![0.0f64; geo.rows * r];
    for row in 0..geo.rows {
        let e = routing.sorted_expert_idxs[row] as usize;
        for i in 0..r {
            let mut acc = 0.0f64;
            for nn in 0..n {
                acc += dyg[row * n + nn] * inp.b[nn * er + e * r + i];
            }
            yb[row * r + i] = rounding.apply(acc);
        }
    }

    // Per-row input gradient dX_p = rnd(dY_g · W_e + s · YB · A_e) [L_valid, K].
    let mut dx_rows = vec![0.0f64; geo.rows * k];
    for row in 0..geo.rows {
        let e = routing.sorted_expert_idxs[row] as usize;
        for kk in 0..k {
            let mut base = 0.0f64;
            for nn in 0..n {
                base += dyg[row * n + nn] * inp.w[(e * n + nn) * k + kk];
            }
            let mut lora = 0.0f64;
            for i in 0..r {
                lora += yb[row * r + i] * inp.a[(e * r + i) * k + kk];
            }
            dx_rows[row * k + kk] = rounding.apply(base + inp.s * lora);
        }
    }
    let dx = match p.input_order {
        RowOrder::Grouped => dx_rows,
        RowOrder::Scattered => {
            let mut sums = vec![0.0f64; p.x_rows * k];
            for row in 0..geo.rows {
                let xr = input_row(p, routing, row);
                for kk in 0..k {
                    sums[xr * k + kk] += dx_rows[row * k + kk];
                }
            }
            sums.into_iter().map(|v| rounding.apply(v)).collect()
        }
    };

    // dA_e = rnd(s · Σ YBᵀ ⊗ x), dB_e = rnd(s · Σ dY_gᵀ ⊗ XA); empty experts stay exactly 0.
    let mut da = vec![0.0f64; er * k];
    let mut db = vec![0.0f64; n * er];
    for e in 0..p.num_experts {
        let rows = routing.expert_rows(e);
        if rows.is_empty() {
            continue;
        }
        for i in 0..r {
            for kk in 0..k {
                let mut acc = 0.0f64;
                for row in rows.clone() {
                    acc += yb[row * r + i] * inp.x[input_row(p, routing, row) * k + kk];
                }
                da[(e * r + i) * k + kk] = rounding.apply(inp.s * acc);
            }
            for nn in 0..n {
                let mut acc = 0.0f64;
                for row in rows.clone() {
                    acc += dyg[row * n + nn] * fwd.xa[row * r + i];
                }
                db[nn * er + e * r + i] = rounding.apply(inp.s * acc);
            }
        }
    }

    // d_gates[t, j] = rnd(⟨out[t·k + j], dy[t]⟩) with the saved (rounded) per-slot output, whose
    // rows include the bias.
    let d_gates = p.gates.map(|_| {
        let mut dg = vec![0.0f64; geo.slots];
        for t in 0..geo.tokens {
            for j in 0..geo.top_k {
                let slot = t * geo.top_k + j;
                let mut acc = 0.0f64;
                for nn in 0..n {
                    acc += fwd.slot_out[slot * n + nn] * dy[t * n + nn];
                }
                dg[slot] = rounding.apply(acc);
            }
        }
        dg
    });

    Ok(Grads64 {
        dx,
        da,
        db,
        d_gates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::XorShift;
    use crate::reference::routing::flatten_sort_count;
    use crate::routing::DROPPED;
    use crate::shared::bf16::round_bf16;
    use crate::test_rng::{assert_invalid_argument, assert_shape_error};

    /// One test configuration.
    #[derive(Debug, Clone, Copy)]
    struct Case {
        seed: u64,
        tokens: usize,
        top_k: usize,
        num_experts: usize,
        /// Ids are drawn from `[0, used_experts)`, so experts above stay empty.
        used_experts: usize,
        n: usize,
        k: usize,
        rank: usize,
        scaling: f32,
        input_order: RowOrder,
        /// Ignored for grouped input (always 1).
        fan_out_is_top_k: bool,
        output_order: RowOrder,
        gates: bool,
        /// Probability (in 1/8) that a slot is dropped.
        drop_eighths: u64,
        /// A per-expert bias `[E, N]`.
        bias: bool,
    }

    /// Owned tensors for a [`Case`].
    #[derive(Debug, Clone)]
    struct Data {
        routing: Routing,
        x: Vec<f32>,
        x_rows: usize,
        fan_out: usize,
        w: Vec<f32>,
        a: Vec<f32>,
        b: Vec<f32>,
        gates: Option<Vec<f32>>,
        dy: Vec<f32>,
        bias: Option<Vec<f32>>,
        case: Case,
    }

    impl Data {
        fn new(c: Case) -> Self {
            let mut rng = XorShift::new(c.seed);
            let mut ids = Vec::with_capacity(c.tokens * c.top_k);
            for _ in 0..c.tokens {
                // top_k distinct experts per token, like a top-k.
                let mut pool: Vec<i64> = (0..c.used_experts as i64).collect();
                for j in 0..c.top_k {
                    let pick = j + rng.below((pool.len() - j) as u64) as usize;
                    pool.swap(j, pick);
                    let dropped = rng.below(8) < c.drop_eighths;
                    ids.push(if dropped { DROPPED } else { pool[j] });
                }
            }
            let routing = flatten_sort_count(&ids, c.tokens, c.top_k, c.num_experts).unwrap();
            let slots = c.tokens * c.top_k;
            let (x_rows, fan_out) = match c.input_order {
                RowOrder::Grouped => (routing.num_rows(), 1),
                RowOrder::Scattered if c.fan_out_is_top_k => (c.tokens, c.top_k),
                RowOrder::Scattered => (slots, 1),
            };
            let out_rows = match c.output_order {
                RowOrder::Grouped => routing.num_rows(),
                RowOrder::Scattered => slots,
            };
            let er = c.num_experts * c.rank;
            let x = rng.vec(x_rows * c.k, 1.0);
            let w = rng.vec(c.num_experts * c.n * c.k, 1.0 / (c.k as f32).sqrt());
            let a = rng.vec(er * c.k, 0.5);
            let b = rng.vec(c.n * er, 0.5);
            let gates = c.gates.then(|| rng.vec(slots, 1.0));
            let dy_rows = if c.gates { c.tokens } else { out_rows };
            let dy = rng.vec(dy_rows * c.n, 1.0);
            // Drawn last, so the other tensors of a case do not depend on it.
            let bias = c.bias.then(|| rng.vec(c.num_experts * c.n, 2.0));
            Data {
                routing,
                x,
                x_rows,
                fan_out,
                w,
                a,
                b,
                gates,
                dy,
                bias,
                case: c,
            }
        }

        fn problem(&self) -> LinearProblem<'_> {
            LinearProblem {
                x: &self.x,
                x_rows: self.x_rows,
                w: &self.w,
                num_experts: self.case.num_experts,
                n: self.case.n,
                k: self.case.k,
                lora_a: &self.a,
                lora_b: &self.b,
                rank: self.case.rank,
                scaling: self.case.scaling,
                fan_out: self.fan_out,
                input_order: self.case.input_order,
                output_order: self.case.output_order,
                gates: self.gates.as_deref(),
                bias: self.bias.as_deref(),
            }
        }

        /// `L = Σ y·dy` (with gates) or `Σ out·dy`, all in `f64`, no rounding.
        fn loss(&self) -> f64 {
            let (_, f) = forward64(&self.problem(), &self.routing, Rounding::Exact).unwrap();
            let target = f.y.as_ref().unwrap_or(&f.out);
            assert_eq!(target.len(), self.dy.len());
            target
                .iter()
                .zip(&self.dy)
                .map(|(&v, &d)| v * f64::from(d))
                .sum()
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Param {
        X,
        A,
        B,
        Gates,
    }

    fn param_mut(d: &mut Data, which: Param) -> &mut Vec<f32> {
        match which {
            Param::X => &mut d.x,
            Param::A => &mut d.a,
            Param::B => &mut d.b,
            Param::Gates => d.gates.as_mut().unwrap(),
        }
    }

    /// Central difference of the loss w.r.t. one element. The loss is linear in each single
    /// parameter, so the quotient is exact up to `f64` rounding for any step; the denominator
    /// uses the actually stored `f32` values.
    fn central_difference(d: &Data, which: Param, idx: usize) -> f64 {
        let h = 0.25f32;
        let mut plus = d.clone();
        let v = &mut param_mut(&mut plus, which)[idx];
        *v += h;
        let hi = *v;
        let mut minus = d.clone();
        let v = &mut param_mut(&mut minus, which)[idx];
        *v -= h;
        let lo = *v;
        (plus.loss() - minus.loss()) / (f64::from(hi) - f64::from(lo))
    }

    fn assert_matches_fd(d: &Data, which: Param, analytic: &[f32]) {
        let len = param_mut(&mut d.clone(), which).len();
        assert_eq!(analytic.len(), len, "{which:?} length");
        let gmax = analytic
            .iter()
            .fold(0.0f64, |m, &g| m.max(f64::from(g).abs()));
        for (idx, &g) in analytic.iter().enumerate() {
            let fd = central_difference(d, which, idx);
            let g = f64::from(g);
            let tol = 1e-6 * g.abs().max(1e-2 * gmax).max(1e-12);
            assert!(
                (fd - g).abs() <= tol,
                "{which:?}[{idx}]: analytic {g}, finite difference {fd} ({:?})",
                d.case
            );
        }
    }

    fn base_case() -> Case {
        Case {
            seed: 1,
            tokens: 4,
            top_k: 2,
            num_experts: 3,
            used_experts: 3,
            n: 5,
            k: 8,
            rank: 2,
            scaling: 0.75,
            input_order: RowOrder::Scattered,
            fan_out_is_top_k: true,
            output_order: RowOrder::Grouped,
            gates: false,
            drop_eighths: 0,
            bias: false,
        }
    }

    /// The configurations exercised by the finite-difference and rounding tests.
    fn cases() -> Vec<Case> {
        let b = base_case();
        vec![
            // gate_up: token-ordered input, grouped output, no gates.
            b,
            // down: grouped input, scattered output, gates.
            Case {
                seed: 2,
                input_order: RowOrder::Grouped,
                output_order: RowOrder::Scattered,
                gates: true,
                ..b
            },
            // Both scattered, with gates, one empty expert.
            Case {
                seed: 3,
                num_experts: 4,
                output_order: RowOrder::Scattered,
                gates: true,
                ..b
            },
            // Both scattered, no gates, dropped slots.
            Case {
                seed: 4,
                output_order: RowOrder::Scattered,
                drop_eighths: 3,
                ..b
            },
            // Both grouped, no LoRA.
            Case {
                seed: 5,
                input_order: RowOrder::Grouped,
                rank: 0,
                ..b
            },
            // Slot-ordered input (fan-out 1), gates, dropped slots, negative scaling.
            Case {
                seed: 6,
                fan_out_is_top_k: false,
                output_order: RowOrder::Scattered,
                gates: true,
                drop_eighths: 2,
                scaling: -1.5,
                ..b
            },
            // top_k = E, grouped input with dropped slots, grouped output.
            Case {
                seed: 7,
                top_k: 3,
                input_order: RowOrder::Grouped,
                drop_eighths: 2,
                ..b
            },
            // gpt-oss's gate_up: token-ordered input, grouped output, a bias.
            Case {
                seed: 8,
                bias: true,
                ..b
            },
            // gpt-oss's down: grouped input, scattered output, gates, a bias (in d_gates), an
            // empty expert and dropped slots.
            Case {
                seed: 9,
                num_experts: 4,
                input_order: RowOrder::Grouped,
                output_order: RowOrder::Scattered,
                gates: true,
                drop_eighths: 2,
                bias: true,
                ..b
            },
        ]
    }

    #[test]
    fn gradients_match_central_differences() {
        for c in cases() {
            let d = Data::new(c);
            let p = d.problem();
            let g = linear_backward(&p, &d.routing, &d.dy, Rounding::Exact).unwrap();
            assert_matches_fd(&d, Param::X, &g.dx);
            assert_matches_fd(&d, Param::A, &g.da);
            assert_matches_fd(&d, Param::B, &g.db);
            match (&d.gates, &g.d_gates) {
                (Some(_), Some(dg)) => assert_matches_fd(&d, Param::Gates, dg),
                (None, None) => {}
                _ => panic!("d_gates must be present exactly when gates are ({c:?})"),
            }
        }
    }

    #[test]
    fn bf16_results_are_bf16_and_close_to_exact() {
        let representable = |v: &[f32]| v.iter().all(|&x| round_bf16(x).to_bits() == x.to_bits());
        for c in cases() {
            let d = Data::new(c);
            let p = d.problem();
            let f = linear_forward(&p, &d.routing, Rounding::Bf16).unwrap();
            let g = linear_backward(&p, &d.routing, &d.dy, Rounding::Bf16).unwrap();
            for (name, v) in [
                ("out", &f.out),
                ("xa", &f.xa),
                ("dx", &g.dx),
                ("da", &g.da),
                ("db", &g.db),
            ] {
                assert!(representable(v), "{name} not bf16 ({c:?})");
            }
            for v in [&f.y, &g.d_gates].into_iter().flatten() {
                assert!(representable(v), "y/d_gates not bf16 ({c:?})");
            }

            let fe = linear_forward(&p, &d.routing, Rounding::Exact).unwrap();
            let ge = linear_backward(&p, &d.routing, &d.dy, Rounding::Exact).unwrap();
            let close = |name: &str, a: &[f32], b: &[f32]| {
                assert_eq!(a.len(), b.len(), "{name}");
                let scale = b.iter().fold(1e-3f32, |m, &v| m.max(v.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 3e-2 * scale, "{name}: {x} vs {y} ({c:?})");
                }
            };
            close("out", &f.out, &fe.out);
            close("dx", &g.dx, &ge.dx);
            close("da", &g.da, &ge.da);
            close("db", &g.db, &ge.db);
            if let (Some(a), Some(b)) = (&f.y, &fe.y) {
                close("y", a, b);
            }
            if let (Some(a), Some(b)) = (&g.d_gates, &ge.d_gates) {
                close("d_gates", a, b);
            }
        }
    }

    #[test]
    fn empty_experts_and_dropped_slots_are_exact_zeros() {
        for bias in [false, true] {
            let c = Case {
                seed: 11,
                num_experts: 4,
                used_experts: 3,
                output_order: RowOrder::Scattered,
                gates: true,
                drop_eighths: 3,
                scaling: -0.5,
                bias,
                ..base_case()
            };
            let d = Data::new(c);
            let p = d.problem();
            assert!(
                d.routing.num_rows() < d.routing.num_slots(),
                "seed must drop a slot"
            );
            let valid: Vec<bool> = {
                let mut v = vec![false; d.routing.num_slots()];
                for &slot in &d.routing.sorted_scattered_idxs {
                    v[slot as usize] = true;
                }
                v
            };
            // The empty expert's bias and the dropped slots' gates reach nothing.
            let mut moved = d.clone();
            if let Some(b) = moved.bias.as_mut() {
                b[3 * c.n..][..c.n].iter_mut().for_each(|v| *v += 1.0);
            }
            for (slot, &ok) in valid.iter().enumerate() {
                if !ok {
                    moved.gates.as_mut().unwrap()[slot] += 1.0;
                }
            }
            for rounding in [Rounding::Bf16, Rounding::Exact] {
                let f = linear_forward(&p, &d.routing, rounding).unwrap();
                let g = linear_backward(&p, &d.routing, &d.dy, rounding).unwrap();
                let (n, k, r, er) = (c.n, c.k, c.rank, c.num_experts * c.rank);
                for i in 0..r {
                    let row = &g.da[(3 * r + i) * k..][..k];
                    assert!(row.iter().all(|v| v.to_bits() == 0), "dA of empty expert");
                    for nn in 0..n {
                        assert_eq!(g.db[nn * er + 3 * r + i].to_bits(), 0, "dB of empty expert");
                    }
                }
                let dg = g.d_gates.as_ref().unwrap();
                for (slot, &ok) in valid.iter().enumerate() {
                    if !ok {
                        assert!(f.out[slot * n..][..n].iter().all(|&v| v == 0.0));
                        assert_eq!(dg[slot], 0.0);
                    }
                }
                let fm = linear_forward(&moved.problem(), &d.routing, rounding).unwrap();
                assert_eq!(fm.y, f.y, "bias {bias}");
            }
        }
    }

    #[test]
    fn bias_is_added_before_the_single_output_rounding() {
        // x·w = 1 + 2^-8 (a bf16 tie that rounds to 1) and b = 2^-8: the sum 1 + 2^-7 is bf16.
        // Rounding before adding would give 1 (or the unrounded 1 + 2^-8).
        let x = [1.0, 2f32.powi(-8)];
        let bias = [2f32.powi(-8)];
        let routing = flatten_sort_count(&[0], 1, 1, 1).unwrap();
        let p = LinearProblem {
            bias: Some(&bias),
            ..scalar_problem(&x, &[1.0, 1.0], &[], &[], 2, 0, 1)
        };
        let bf = linear_forward(&p, &routing, Rounding::Bf16).unwrap();
        assert_eq!(bf.out, [1.0 + 2f32.powi(-7)]);
        let ex = linear_forward(&p, &routing, Rounding::Exact).unwrap();
        assert_eq!(ex.out, [1.0 + 2.0 * 2f32.powi(-8)]);
    }

    #[test]
    fn gate_gradient_includes_the_bias() {
        // Zero weights and no LoRA: every valid slot's row is its expert's bias, so
        // y[t] = Σ_j gates[t, j] · b[e(t, j)] and d_gates[t, j] = ⟨dy[t], b[e(t, j)]⟩.
        let mut d = Data::new(Case {
            seed: 12,
            num_experts: 4,
            input_order: RowOrder::Grouped,
            output_order: RowOrder::Scattered,
            gates: true,
            drop_eighths: 2,
            rank: 0,
            bias: true,
            ..base_case()
        });
        d.w.iter_mut().for_each(|v| *v = 0.0);
        let g = linear_backward(&d.problem(), &d.routing, &d.dy, Rounding::Exact).unwrap();
        let (n, top_k) = (d.case.n, d.case.top_k);
        let bias = d.bias.as_ref().unwrap();
        let mut expert_of = vec![None; d.routing.num_slots()];
        for (row, &slot) in d.routing.sorted_scattered_idxs.iter().enumerate() {
            expert_of[slot as usize] = Some(d.routing.sorted_expert_idxs[row] as usize);
        }
        assert!(
            expert_of.iter().any(Option::is_none),
            "seed must drop a slot"
        );
        let dg = g.d_gates.unwrap();
        for (slot, e) in expert_of.iter().enumerate() {
            let expected = e.map_or(0.0, |e| {
                (0..n)
                    .map(|nn| {
                        f64::from(d.dy[(slot / top_k) * n + nn]) * f64::from(bias[e * n + nn])
                    })
                    .sum::<f64>()
            });
            assert_eq!(dg[slot], expected as f32, "slot {slot}");
        }
    }

    #[test]
    fn scattered_output_places_grouped_rows_at_their_slots() {
        let grouped = Data::new(Case {
            seed: 21,
            drop_eighths: 2,
            ..base_case()
        });
        let mut scattered = grouped.clone();
        scattered.case.output_order = RowOrder::Scattered;
        let n = grouped.case.n;
        let slots = grouped.routing.num_slots();
        // The same output gradient, placed at the slots.
        scattered.dy = vec![0.0; slots * n];
        for (row, &slot) in grouped.routing.sorted_scattered_idxs.iter().enumerate() {
            let slot = slot as usize;
            scattered.dy[slot * n..][..n].copy_from_slice(&grouped.dy[row * n..][..n]);
        }
        for rounding in [Rounding::Bf16, Rounding::Exact] {
            let fg = linear_forward(&grouped.problem(), &grouped.routing, rounding).unwrap();
            let fs = linear_forward(&scattered.problem(), &scattered.routing, rounding).unwrap();
            assert_eq!(fg.out_rows, grouped.routing.num_rows());
            assert_eq!(fs.out_rows, slots);
            assert_eq!(fg.xa, fs.xa);
            for (row, &slot) in grouped.routing.sorted_scattered_idxs.iter().enumerate() {
                let slot = slot as usize;
                assert_eq!(fg.out[row * n..][..n], fs.out[slot * n..][..n]);
            }
            let gg = linear_backward(&grouped.problem(), &grouped.routing, &grouped.dy, rounding);
            let gs = linear_backward(
                &scattered.problem(),
                &scattered.routing,
                &scattered.dy,
                rounding,
            );
            assert_eq!(gg.unwrap(), gs.unwrap());
        }
    }

    /// A one-expert, one-element problem for the hand-computed rounding checks.
    fn scalar_problem<'a>(
        x: &'a [f32],
        w: &'a [f32],
        a: &'a [f32],
        b: &'a [f32],
        k: usize,
        rank: usize,
        fan_out: usize,
    ) -> LinearProblem<'a> {
        LinearProblem {
            x,
            x_rows: 1,
            w,
            num_experts: 1,
            n: 1,
            k,
            lora_a: a,
            lora_b: b,
            rank,
            scaling: 1.0,
            fan_out,
            input_order: RowOrder::Scattered,
            output_order: RowOrder::Scattered,
            gates: None,
            bias: None,
        }
    }

    #[test]
    fn xa_enters_the_output_in_two_terms_and_db_in_one() {
        // xa = 1 + 2^-9: its bf16 rounding is 1 (what dB reads), its low part 2^-9. With
        // W·x = 2^-8, out = 2^-8 + s·xa·B = 1 + 2^-8 + 2^-9, which rounds up to 1 + 2^-7; the
        // once-rounded xa would give the tie 1 + 2^-8, which rounds (to even) down to 1.
        let x = [1.0, 2f32.powi(-9)];
        let routing = flatten_sort_count(&[0], 1, 1, 1).unwrap();
        let w = [2f32.powi(-8), 0.0];
        let p = scalar_problem(&x, &w, &[1.0, 1.0], &[1.0], 2, 1, 1);
        let bf = linear_forward(&p, &routing, Rounding::Bf16).unwrap();
        assert_eq!(bf.xa, [1.0]);
        assert_eq!(bf.out, [1.0 + 2f32.powi(-7)]);
        let ex = linear_forward(&p, &routing, Rounding::Exact).unwrap();
        assert_eq!(ex.xa, [1.0 + 2f32.powi(-9)]);
        assert_eq!(ex.out, [1.0 + 2f32.powi(-8) + 2f32.powi(-9)]);
    }

    #[test]
    fn dx_sums_the_rounded_slot_rows() {
        // One token, top_k = 2, both slots on expert 0, K = N = 1, no LoRA.
        // Slot rows: 1·w = 1.0078125 (exact) and 1.0234375·w = 1.0314331… → 1.03125.
        // Rounded-then-summed: rnd(2.0390625) = 2.03125 (tie to even);
        // summed-then-rounded would give rnd(2.0392456…) = 2.046875.
        let w = [1.0078125f32];
        let dy = [1.0f32, 1.0234375];
        let routing = flatten_sort_count(&[0, 0], 1, 2, 1).unwrap();
        let p = scalar_problem(&[0.5], &w, &[], &[], 1, 0, 2);
        let bf = linear_backward(&p, &routing, &dy, Rounding::Bf16).unwrap();
        assert_eq!(bf.dx, [2.03125]);
        assert_eq!(round_bf16(w[0] * dy[0] + w[0] * dy[1]), 2.046875);
        let ex = linear_backward(&p, &routing, &dy, Rounding::Exact).unwrap();
        assert_eq!(ex.dx, [1.0078125 * 2.0234375]);
        assert!(bf.da.is_empty() && bf.db.is_empty() && bf.d_gates.is_none());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let d = Data::new(Case {
            gates: true,
            output_order: RowOrder::Scattered,
            ..base_case()
        });
        let base = d.problem();
        let fwd = |p: &LinearProblem<'_>| linear_forward(p, &d.routing, Rounding::Bf16);
        assert!(fwd(&base).is_ok());

        let short_x = &d.x[1..];
        assert_shape_error(fwd(&LinearProblem { x: short_x, ..base }), "x");
        assert_shape_error(
            fwd(&LinearProblem {
                lora_b: &d.b[1..],
                ..base
            }),
            "lora_b",
        );
        let err = fwd(&LinearProblem {
            num_experts: 2,
            ..base
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert_invalid_argument(
            fwd(&LinearProblem {
                output_order: RowOrder::Grouped,
                ..base
            }),
            "gates",
        );
        assert_invalid_argument(
            fwd(&LinearProblem {
                input_order: RowOrder::Grouped,
                ..base
            }),
            "fan_out",
        );
        assert_shape_error(fwd(&LinearProblem { fan_out: 0, ..base }), "x_rows");
        assert_shape_error(
            fwd(&LinearProblem {
                gates: Some(&d.gates.as_ref().unwrap()[1..]),
                ..base
            }),
            "gates",
        );

        assert_shape_error(
            linear_backward(&base, &d.routing, &d.dy[1..], Rounding::Bf16),
            "dy",
        );
        let bias = vec![0.0; d.case.num_experts * d.case.n - 1];
        assert_shape_error(
            fwd(&LinearProblem {
                bias: Some(&bias),
                ..base
            }),
            "bias",
        );

        let mut broken = d.routing.clone();
        broken.expert_offsets[0] += 1;
        assert!(linear_forward(&base, &broken, Rounding::Exact).is_err());
    }
}
