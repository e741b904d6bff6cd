//! The gated activation of the MoE MLP (SPEC §6, `GPT_OSS.md` §1) and its gradient over the
//! grouped gate/up projection output: SwiGLU with DeepSeek-V4's optional clamp, or gpt-oss's
//! clamped α-sigmoid GLU with its `+1`, gate/up in split halves or interleaved. The per-element
//! math is [`crate::shared::glu`] (shared with the host tests); this file moves the data.
//!
//! Both kernels see `gu [rows, 2·width]` (bf16, grouped rows) and are element-wise across
//! `(row, unit)`. Each thread owns 8 consecutive units of one row: it loads their 8 gates and 8
//! ups as two 16-byte vectors (split: `width` columns apart; interleaved: 16 adjacent columns),
//! and moves `h`/`dh` as one 16-byte vector. The arithmetic is f32 and every output element is
//! rounded to bf16 once (`cvt.rn`). Indices and offsets are 64-bit; grid-stride loops, so any
//! 1-D grid covers any size.

use crate::shared::glu::{glu, glu_grad, join_units, split_units, unit_columns};
use crate::shared::params::GluParams;
use crate::tile::gmem::{grid_stride, load_bf16x8, store_bf16x8};

/// bf16 elements per 16-byte vector.
const VEC: u64 = 8;

/// Where vector `v` lives: `(first gu column of its gates, first gu column of its ups, offset
/// of its first element in h/dh)`, the gu columns as element offsets of the whole `gu` (and
/// `d_gu`) buffer.
///
/// Vector `v` covers row `v / (width/8)`, units `8·(v % (width/8)) + [0, 8)`.
#[inline(always)]
fn vector_offsets(p: &GluParams, v: u64) -> (u64, u64, u64) {
    let w = p.width as u64;
    // At least 1, so the division below has no zero-divisor panic path (`width ≥ 8` by contract;
    // a smaller width gives no vectors at all).
    let per_row = (w / VEC).max(1);
    let (row, unit) = (v / per_row, (v % per_row) * VEC);
    let (gate_col, up_col) = unit_columns(unit, w, p.interleaved != 0);
    // gu, d_gu: [rows, 2·width] row-major; h, dh: [rows, width] row-major.
    (row * 2 * w + gate_col, row * 2 * w + up_col, row * w + unit)
}

/// The grid-stride loop of both kernels: for every vector `v < rows·width/8`, binds the element
/// offsets of [`vector_offsets`] (`first`, `second`: the two 16-byte vectors of `gu` that hold
/// the 8 units) and the units' gates and ups loaded from `gu`, then runs the body. A macro, not
/// a closure, so each kernel compiles exactly as if written out.
///
/// Safety: the kernels' common launch contract (`width` a positive multiple of 8, `gu_addr`
/// 16-byte aligned with `rows·2·width` bf16) makes the loads valid.
macro_rules! for_each_vector {
    ($p:ident, |$first:ident, $second:ident, $h_idx:ident, $gate:ident, $up:ident| $body:block) => {{
        let (mut v, stride) = grid_stride();
        let vectors = $p.rows * ($p.width as u64 / VEC);
        while v < vectors {
            let ($first, $second, $h_idx) = vector_offsets(&$p, v);
            // SAFETY: `v < rows·width/8`, so both vectors lie inside their row of `gu` (split:
            // columns `unit..unit+8` and `width+unit..`; interleaved: `2·unit..2·unit+16`, with
            // `unit + 8 ≤ width`); 16-byte alignment follows from an aligned base,
            // `width % 8 == 0` and column offsets that are multiples of 8.
            let ($gate, $up) = unsafe {
                split_units(
                    load_bf16x8($p.gu_addr + 2 * $first),
                    load_bf16x8($p.gu_addr + 2 * $second),
                    $p.interleaved != 0,
                )
            };
            $body
            v += stride;
        }
    }};
}

/// Forward: `h` (bf16 `[rows, width]`, [`glu`] per unit) from `gu` (bf16 `[rows, 2·width]`).
///
/// # Safety
/// Launch contract: 1-D grid and 1-D blocks of any size; `width` is a positive multiple of 8;
/// `gu_addr` and `h_addr` are 16-byte aligned and hold `rows·2·width` and `rows·width` bf16
/// (`h` writable); `alpha` finite and positive; with `clamp == 1`, `limit` finite and positive.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_glu_fwd_bf16(p: GluParams) {
    for_each_vector!(p, |_first, _second, h_idx, gate, up| {
        let mut h = [0f32; 8];
        let mut i = 0;
        while i < 8 {
            h[i] = glu(gate[i], up[i], &p);
            i += 1;
        }
        // SAFETY: the vector lies inside its row of `h`, 16-byte aligned as in `gu`.
        unsafe { store_bf16x8(p.h_addr + 2 * h_idx, h) };
    });
}

/// Backward: `d_gu` (bf16 `[rows, 2·width]`, gate and up gradients in the layout's columns,
/// [`glu_grad`] per unit) from `gu` (bf16 `[rows, 2·width]`) and `dh` (bf16 `[rows, width]`,
/// passed in `h_addr`).
///
/// # Safety
/// Launch contract: 1-D grid and 1-D blocks of any size; `width` is a positive multiple of 8;
/// `gu_addr`, `h_addr` and `d_gu_addr` are 16-byte aligned and hold `rows·2·width`,
/// `rows·width` and `rows·2·width` bf16 (`d_gu` writable, not overlapping the inputs); `alpha`
/// finite and positive; with `clamp == 1`, `limit` finite and positive.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_glu_bwd_bf16(p: GluParams) {
    for_each_vector!(p, |first, second, h_idx, gate, up| {
        // SAFETY: as in the forward: the vector lies inside its row of `dh`, aligned.
        let dh = unsafe { load_bf16x8(p.h_addr + 2 * h_idx) };
        let (mut d_gate, mut d_up) = ([0f32; 8], [0f32; 8]);
        let mut i = 0;
        while i < 8 {
            (d_gate[i], d_up[i]) = glu_grad(gate[i], up[i], dh[i], &p);
            i += 1;
        }
        let (d_first, d_second) = join_units(d_gate, d_up, p.interleaved != 0);
        // SAFETY: `d_gu` has `gu`'s shape and alignment (contract), so the same element
        // offsets are inside it and 16-byte aligned.
        unsafe {
            store_bf16x8(p.d_gu_addr + 2 * first, d_first);
            store_bf16x8(p.d_gu_addr + 2 * second, d_second);
        }
    });
}
