//! The gated activations of the MoE MLP, per element, in `f32`: the arithmetic the activation
//! kernels (`kernels/moe.rs`) run, compiled for the host too so host tests compare it with the
//! `f64` reference (`mxmoe::reference::moe`).
//!
//! One formula covers both activations of SPEC §6 and `GPT_OSS.md` §1:
//!
//! - `g = min(gate, L)`, `u = clamp(up, −L, L)` when clamping (identities otherwise);
//! - forward: `h = (u + c)·g·σ(α·g)`;
//! - backward: `d_gate = dh·(u + c)·(σ(αg) + α·g·σ(αg)·(1 − σ(αg)))` where the gate passes the
//!   `min`, `d_up = dh·g·σ(αg)` where the up passes the clamp.
//!
//! SwiGLU (DeepSeek-V4's clamp optional) is `α = 1`, `c = 0`, the clamp boundary passing the
//! gradient (`gate ≤ L`, `−L ≤ up ≤ L`); gpt-oss is `α = 1.702`, `c = 1`, `L = 7` and, as current
//! torch, a strict boundary (`gate < L`, `−L < up < L`: zero gradient at exactly `±L`).
//!
//! `σ(x)` is evaluated as `1 / (1 + e)` (x ≥ 0) or `e / (1 + e)` (x < 0) with
//! `e = 2^(−|x|·log2 e)` in `(0, 1]`, so nothing overflows; on the device `2^y` lowers to PTX
//! `ex2.approx.f32` (relative error about 2^-22, far below a bf16 ulp).

use super::params::GluParams;

/// The logistic function `σ(x) = 1 / (1 + e^−x)`, overflow-free (see the module docs).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = core::intrinsics::exp2f32(-x.abs() * core::f32::consts::LOG2_E);
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// The clamped gate and up of one element: `(min(gate, L), clamp(up, −L, L))`, or the inputs
/// unchanged without a clamp.
#[inline(always)]
pub fn clamped(gate: f32, up: f32, p: &GluParams) -> (f32, f32) {
    if p.clamp != 0 {
        (gate.min(p.limit), up.max(-p.limit).min(p.limit))
    } else {
        (gate, up)
    }
}

/// Forward of one element: `h = (u + c)·g·σ(α·g)` (see the module docs).
#[inline(always)]
pub fn glu(gate: f32, up: f32, p: &GluParams) -> f32 {
    let (g, u) = clamped(gate, up, p);
    (u + p.up_offset) * g * sigmoid(p.alpha * g)
}

/// Backward of one element: `(d_gate, d_up)` for the output gradient `dh`, clamp masks included
/// (strict or inclusive at exactly `±L` as `p.strict` says).
#[inline(always)]
pub fn glu_grad(gate: f32, up: f32, dh: f32, p: &GluParams) -> (f32, f32) {
    let (g, u) = clamped(gate, up, p);
    let s = sigmoid(p.alpha * g);
    let (gate_passes, up_passes) = if p.clamp == 0 {
        (true, true)
    } else if p.strict != 0 {
        (gate < p.limit, up > -p.limit && up < p.limit)
    } else {
        (gate <= p.limit, up >= -p.limit && up <= p.limit)
    };
    let d_gate = if gate_passes {
        dh * (u + p.up_offset) * (s + p.alpha * g * s * (1.0 - s))
    } else {
        0.0
    };
    let d_up = if up_passes { dh * g * s } else { 0.0 };
    (d_gate, d_up)
}

/// Column offsets, inside one row of `gu [rows, 2·width]`, of the 8 gates and the 8 ups of the
/// 8-unit vector that starts at unit `unit` (a multiple of 8): `(first gate column, first up
/// column)` for the split layout (two 16-byte vectors `width` apart), or the start of the 16
/// interleaved columns `2·unit .. 2·unit + 16` (gate `i` at `2i`, up at `2i + 1`) for both.
#[inline(always)]
pub const fn unit_columns(unit: u64, width: u64, interleaved: bool) -> (u64, u64) {
    if interleaved {
        (2 * unit, 2 * unit + 8)
    } else {
        (unit, width + unit)
    }
}

/// Splits the 16 values of two loaded 8-element vectors into 8 gates and 8 ups: the vectors
/// themselves for the split layout, de-interleaved (even columns gates, odd ups) otherwise.
#[inline(always)]
pub fn split_units(first: [f32; 8], second: [f32; 8], interleaved: bool) -> ([f32; 8], [f32; 8]) {
    if !interleaved {
        return (first, second);
    }
    let mut gate = [0f32; 8];
    let mut up = [0f32; 8];
    let mut i = 0;
    while i < 4 {
        gate[i] = first[2 * i];
        up[i] = first[2 * i + 1];
        gate[4 + i] = second[2 * i];
        up[4 + i] = second[2 * i + 1];
        i += 1;
    }
    (gate, up)
}

/// The inverse of [`split_units`]: the two 8-element vectors that hold 8 gate and 8 up values
/// (gradients) in the layout's columns.
#[inline(always)]
pub fn join_units(gate: [f32; 8], up: [f32; 8], interleaved: bool) -> ([f32; 8], [f32; 8]) {
    if !interleaved {
        return (gate, up);
    }
    let mut first = [0f32; 8];
    let mut second = [0f32; 8];
    let mut i = 0;
    while i < 4 {
        first[2 * i] = gate[i];
        first[2 * i + 1] = up[i];
        second[2 * i] = gate[4 + i];
        second[2 * i + 1] = up[4 + i];
        i += 1;
    }
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(clamp: bool, strict: bool, alpha: f32, up_offset: f32) -> GluParams {
        GluParams {
            clamp: clamp as u32,
            limit: 7.0,
            alpha,
            up_offset,
            strict: strict as u32,
            ..GluParams::default()
        }
    }

    #[test]
    fn sigmoid_is_accurate_and_saturates_without_overflow() {
        for x in [-20.0f32, -1.5, -0.25, 0.0, 0.3, 2.0, 17.0, 100.0] {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - want).abs() <= 1e-6 * want, "σ({x})");
        }
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn gpt_oss_values_and_the_strict_boundary() {
        let p = params(true, true, 1.702, 1.0);
        // Inside the clamp: (u + 1)·g·σ(α g).
        let want = (0.5f64 + 1.0) * 2.0 / (1.0 + (-1.702f64 * 2.0).exp());
        assert!((glu(2.0, 0.5, &p) as f64 - want).abs() < 1e-6);
        // The gate is clamped above only, the up both ways; +1 uses the clamped up.
        assert_eq!(glu(9.0, 0.5, &p), glu(7.0, 0.5, &p));
        assert_eq!(glu(1.0, -9.0, &p), glu(1.0, -7.0, &p));
        assert_ne!(glu(-9.0, 0.5, &p), glu(-7.0, 0.5, &p));
        // Exactly ±L: strict gives zero gradients, inclusive passes them.
        let (dg, du) = glu_grad(7.0, 7.0, 1.0, &p);
        assert_eq!((dg, du), (0.0, 0.0));
        assert_eq!(glu_grad(1.0, -7.0, 1.0, &p).1, 0.0);
        let q = params(true, false, 1.702, 1.0);
        let (dg, du) = glu_grad(7.0, 7.0, 1.0, &q);
        assert!(dg != 0.0 && du != 0.0);
        assert!(glu_grad(1.0, -7.0, 1.0, &q).1 != 0.0);
        // Beyond the limit both rules cut.
        assert_eq!(glu_grad(7.5, 7.5, 1.0, &q), (0.0, 0.0));
    }

    #[test]
    fn swiglu_is_the_special_case() {
        let p = params(false, false, 1.0, 0.0);
        for (g, u) in [(0.7f32, -1.3f32), (-2.0, 0.25), (12.0, 3.0)] {
            let s = 1.0 / (1.0 + (-(g as f64)).exp());
            let want = g as f64 * s * u as f64;
            assert!((glu(g, u, &p) as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
            let (dg, du) = glu_grad(g, u, 0.5, &p);
            let want_dg = 0.5 * u as f64 * s * (1.0 + g as f64 * (1.0 - s));
            assert!((dg as f64 - want_dg).abs() < 1e-5 * want_dg.abs().max(1.0));
            assert!((du as f64 - 0.5 * g as f64 * s).abs() < 1e-5);
        }
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let p = params(true, true, 1.702, 1.0);
        for (g, u) in [(0.3f32, 0.8f32), (-1.7, -2.5), (4.0, 6.5), (-8.0, 3.0)] {
            let (dg, du) = glu_grad(g, u, 1.0, &p);
            let f = |a: f32, b: f32| glu(a, b, &p) as f64;
            let h = 1e-2f32;
            let fd_g = (f(g + h, u) - f(g - h, u)) / (2.0 * h as f64);
            let fd_u = (f(g, u + h) - f(g, u - h)) / (2.0 * h as f64);
            assert!(
                (dg as f64 - fd_g).abs() < 2e-3 * fd_g.abs().max(1.0),
                "d_gate at {g}"
            );
            assert!(
                (du as f64 - fd_u).abs() < 2e-3 * fd_u.abs().max(1.0),
                "d_up at {u}"
            );
        }
    }

    #[test]
    fn interleaved_units_round_trip() {
        let a: [f32; 8] = core::array::from_fn(|i| i as f32);
        let b: [f32; 8] = core::array::from_fn(|i| 8.0 + i as f32);
        let (g, u) = split_units(a, b, true);
        assert_eq!(g, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]);
        assert_eq!(u, [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]);
        assert_eq!(join_units(g, u, true), (a, b));
        assert_eq!(split_units(a, b, false), (a, b));
        assert_eq!(unit_columns(16, 96, true), (32, 40));
        assert_eq!(unit_columns(16, 96, false), (16, 112));
    }
}
