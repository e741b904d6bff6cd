//! The activation of the gated MoE MLP (SPEC §6) and its gradient: SwiGLU over the grouped
//! gate/up projection output, with DeepSeek-V4's optional clamp limit.
//!
//! Both kernels see `gu [rows, 2·width]` (bf16, grouped rows; the gate is the first half of each
//! row, the up half the second) and are element-wise across `(row, column)`. Each thread owns one
//! 8-column vector of one row and moves it with 16-byte loads and stores; the arithmetic is f32
//! and every output element is rounded to bf16 once (`cvt.rn`). Indices and offsets are 64-bit;
//! grid-stride loops, so any 1-D grid covers any size.
//!
//! Per element, with `lim` the clamp limit when one is set:
//! - `g = min(gate, lim)`, `u = clamp(up, −lim, lim)` (identities without a limit);
//! - forward: `h = silu(g)·u` with `silu(g) = g·σ(g)`;
//! - backward: `d_gate = dh·u·σ(g)·(1 + g·(1 − σ(g)))` where `gate ≤ lim`, else 0;
//!   `d_up = dh·silu(g)` where `−lim ≤ up ≤ lim`, else 0 (the boundary passes the gradient, as
//!   `torch.clamp`'s backward does).
//!
//! `σ(x)` is evaluated as `1 / (1 + e)` (x ≥ 0) or `e / (1 + e)` (x < 0) with `e = 2^(−|x|·log2 e)`
//! in `(0, 1]`, so nothing overflows; `2^y` is LLVM's `exp2` (lowered to PTX `ex2.approx.f32`,
//! relative error about 2^-22, far below a bf16 ulp).

use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::shared::bf16::bf16_bits_to_f32;
use crate::shared::params::SwigluParams;
use crate::tile::gmem::{grid_stride, load_16, store_16};

/// bf16 elements per 16-byte vector.
const VEC: u64 = 8;

/// Widens 8 packed bf16 (element `2i` in the low half of word `i`) to f32.
#[inline(always)]
fn unpack8(v: [u32; 4]) -> [f32; 8] {
    let mut out = [0f32; 8];
    let mut i = 0;
    while i < 4 {
        out[2 * i] = bf16_bits_to_f32(v[i] as u16);
        out[2 * i + 1] = bf16_bits_to_f32((v[i] >> 16) as u16);
        i += 1;
    }
    out
}

/// Rounds 8 f32 to bf16 (nearest even) and packs them as [`unpack8`] reads them.
#[inline(always)]
fn pack8(v: [f32; 8]) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = cvt_rn_bf16x2_f32(v[2 * i], v[2 * i + 1]);
        i += 1;
    }
    out
}

/// The logistic function `σ(x) = 1 / (1 + e^−x)`, overflow-free (see the module docs).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = core::intrinsics::exp2f32(-x.abs() * core::f32::consts::LOG2_E);
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// The clamped gate and up values of one element (see the module docs).
#[inline(always)]
fn clamped(gate: f32, up: f32, p: &SwigluParams) -> (f32, f32) {
    if p.clamp != 0 {
        (gate.min(p.limit), up.max(-p.limit).min(p.limit))
    } else {
        (gate, up)
    }
}

/// Element offsets of vector `v`'s first element: `(in gu and d_gu, in h and dh)`.
///
/// Vector `v` covers row `v / (width/8)`, columns `8·(v % (width/8)) + [0, 8)`.
#[inline(always)]
fn vector_offsets(p: &SwigluParams, v: u64) -> (u64, u64) {
    let w = p.width as u64;
    // At least 1, so the division below has no zero-divisor panic path (`width ≥ 8` by contract;
    // a smaller width gives no vectors at all).
    let per_row = (w / VEC).max(1);
    let (row, col) = (v / per_row, (v % per_row) * VEC);
    // gu, d_gu: [rows, 2·width] row-major; h, dh: [rows, width] row-major.
    (row * 2 * w + col, row * w + col)
}

/// The grid-stride loop of both kernels: for every vector `v < rows·width/8`, binds the element
/// offsets of [`vector_offsets`] and the vector's gate and up halves loaded from `gu`, then runs
/// the body. A macro, not a closure, so each kernel compiles exactly as if written out.
///
/// Safety: the kernels' common launch contract (`width` a positive multiple of 8, `gu_addr`
/// 16-byte aligned with `rows·2·width` bf16) makes the loads valid.
macro_rules! for_each_vector {
    ($p:ident, |$gu_idx:ident, $h_idx:ident, $gate:ident, $up:ident| $body:block) => {{
        let (mut v, stride) = grid_stride();
        let vectors = $p.rows * ($p.width as u64 / VEC);
        while v < vectors {
            let ($gu_idx, $h_idx) = vector_offsets(&$p, v);
            let w = $p.width as u64;
            // SAFETY: `v < rows·width/8`, so the vector lies inside its row of `gu` (both halves,
            // the up half `width` columns after the gate); 16-byte alignment follows from an
            // aligned base, `width % 8 == 0` and column offsets that are multiples of 8.
            let ($gate, $up) = unsafe {
                (
                    unpack8(load_16($p.gu_addr + 2 * $gu_idx)),
                    unpack8(load_16($p.gu_addr + 2 * ($gu_idx + w))),
                )
            };
            $body
            v += stride;
        }
    }};
}

/// Forward: `h = silu(g)·u` (bf16 `[rows, width]`) from `gu` (bf16 `[rows, 2·width]`).
///
/// # Safety
/// Launch contract: 1-D grid and 1-D blocks of any size; `width` is a positive multiple of 8;
/// `gu_addr` and `h_addr` are 16-byte aligned and hold `rows·2·width` and `rows·width` bf16
/// (`h` writable); with `clamp == 1`, `limit` is finite and positive.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_swiglu_fwd_bf16(p: SwigluParams) {
    for_each_vector!(p, |_gu_idx, h_idx, gate, up| {
        let mut h = [0f32; 8];
        let mut i = 0;
        while i < 8 {
            let (g, u) = clamped(gate[i], up[i], &p);
            h[i] = g * sigmoid(g) * u;
            i += 1;
        }
        // SAFETY: the vector lies inside its row of `h`, 16-byte aligned as in `gu`.
        unsafe { store_16(p.h_addr + 2 * h_idx, pack8(h)) };
    });
}

/// Backward: `d_gu` (bf16 `[rows, 2·width]`: `d_gate` then `d_up` per row) from `gu` (bf16
/// `[rows, 2·width]`) and `dh` (bf16 `[rows, width]`, passed in `h_addr`).
///
/// # Safety
/// Launch contract: 1-D grid and 1-D blocks of any size; `width` is a positive multiple of 8;
/// `gu_addr`, `h_addr` and `d_gu_addr` are 16-byte aligned and hold `rows·2·width`,
/// `rows·width` and `rows·2·width` bf16 (`d_gu` writable, not overlapping the inputs); with
/// `clamp == 1`, `limit` is finite and positive.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_swiglu_bwd_bf16(p: SwigluParams) {
    for_each_vector!(p, |gu_idx, h_idx, gate, up| {
        // SAFETY: as in the forward: the vector lies inside its row of `dh`, aligned.
        let dh = unpack8(unsafe { load_16(p.h_addr + 2 * h_idx) });
        let (mut d_gate, mut d_up) = ([0f32; 8], [0f32; 8]);
        let mut i = 0;
        while i < 8 {
            let (g, u) = clamped(gate[i], up[i], &p);
            let s = sigmoid(g);
            let silu = g * s;
            let gate_passes = p.clamp == 0 || gate[i] <= p.limit;
            let up_passes = p.clamp == 0 || (up[i] >= -p.limit && up[i] <= p.limit);
            d_gate[i] = if gate_passes {
                dh[i] * u * (s * (1.0 + g * (1.0 - s)))
            } else {
                0.0
            };
            d_up[i] = if up_passes { dh[i] * silu } else { 0.0 };
            i += 1;
        }
        // SAFETY: `d_gu` has `gu`'s shape and alignment (contract), so the same element
        // offsets are inside it and 16-byte aligned.
        unsafe {
            store_16(p.d_gu_addr + 2 * gu_idx, pack8(d_gate));
            store_16(p.d_gu_addr + 2 * (gu_idx + p.width as u64), pack8(d_up));
        }
    });
}
