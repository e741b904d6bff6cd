//! Element-wise kernels around the expert GEMMs (SPEC §2.3, §3.3): gate combination and its
//! gradient, the gated per-slot output gradient, and the sum over a token's slots. All sums are
//! f32, each result is rounded to bf16 once; offsets are 64-bit; grid-stride loops.
//!
//! The three row kernels (gates combined, gated dY, slot sum) move 8 consecutive elements of one
//! row per step as 16-byte vectors (`width` a multiple of 8, 16-byte aligned buffers), and step
//! their (row, column) position without a division: an element per thread with a 64-bit
//! `i / width` made them issue-bound (gpt-oss-20b, H100: the gated dY 148 µs for 94 MB).

use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::sreg::{ctaid_x, laneid, nctaid_x, ntid_x, tid_x};
use crate::ptx::warp::shfl_sync_bfly_b32;
use crate::shared::bf16::bf16_bits_to_f32;
use crate::shared::params::EltwiseParams;
use crate::shared::walk::RowWalk;
use crate::tile::gmem::{grid_stride, load, load_bf16x8, store, store_bf16x8};

/// bf16 elements per 16-byte vector.
const VEC: u64 = 8;

/// Loads the bf16 at element `i` of `base` as f32.
///
/// # Safety
/// `base + 2i` is a valid bf16.
#[inline(always)]
unsafe fn ld_bf16(base: u64, i: u64) -> f32 {
    // SAFETY: forwarded.
    bf16_bits_to_f32(unsafe { load::<u16>(base + 2 * i) })
}

/// Stores `v` rounded to bf16 at element `i` of `base`.
///
/// # Safety
/// `base + 2i` is a valid, writable bf16.
#[inline(always)]
unsafe fn st_bf16(base: u64, i: u64, v: f32) {
    // SAFETY: forwarded.
    unsafe { store::<u16>(base + 2 * i, cvt_rn_bf16x2_f32(v, 0.0) as u16) };
}

/// The grid-stride loop over the 8-element vectors of the row-major `[rows, width]` bf16 output
/// `out`: binds `w = width`, `k = top_k` (usable in `rows`), then for each vector its `row` and
/// first column `n`, and stores the 8 values (`[f32; 8]`) rounded to bf16 there. The position
/// steps by the grid stride ([`RowWalk`]), so no division runs per vector. A macro, not a
/// closure, so each kernel compiles exactly as if written out.
///
/// Safety: the caller's launch contract makes `out` hold `rows·width` writable bf16, 16-byte
/// aligned, with `width` a positive multiple of 8.
macro_rules! store_row_vectors {
    ($p:ident, |$w:ident, $k:ident| rows: $rows:expr, |$row:ident, $n:ident| $value:expr) => {{
        let $w = $p.width as u64;
        let $k = $p.top_k as u64;
        let vectors = $rows * ($w / VEC);
        let (mut v, stride) = grid_stride();
        let mut at = RowWalk::new(v, stride, $w / VEC);
        while v < vectors {
            let ($row, $n) = (at.row, at.col * VEC);
            let value: [f32; 8] = $value;
            // SAFETY: `v < rows·width/8`: the vector lies inside row `row` of `out`, at an
            // element offset that is a multiple of 8 (16-byte aligned).
            unsafe { store_bf16x8($p.out_addr + 2 * ($row * $w + $n), value) };
            v += stride;
            at.advance();
        }
    }};
}

/// `row / k` for a slot row and `k ≥ 1`: 32-bit division when the row fits (always, below 2^32
/// slots), else 64-bit.
#[inline(always)]
fn token_of(slot: u64, k: u64) -> u64 {
    if slot <= u32::MAX as u64 {
        (slot as u32 / k.max(1) as u32) as u64
    } else {
        slot / k.max(1)
    }
}

/// `y[t, n] = Σ_j gates[t, j] · out[t·k + j, n]`: `in0 = out [T·k, width]`,
/// `in1 = gates [T, k]`, `out = y [T, width]` (bf16).
///
/// # Safety
/// Launch contract: 1-D grid and block; `width` a positive multiple of 8; `in0` and `out`
/// 16-byte aligned; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_combine_gates(p: EltwiseParams) {
    store_row_vectors!(p, |w, k| rows: p.tokens, |t, n| {
        let mut acc = [0f32; 8];
        let mut j = 0;
        while j < k {
            // SAFETY: `t·k + j < T·k`, `n + 8 ≤ width` at a multiple of 8.
            let (g, o) = unsafe {
                (ld_bf16(p.in1_addr, t * k + j), load_bf16x8(p.in0_addr + 2 * ((t * k + j) * w + n)))
            };
            let mut i = 0;
            while i < 8 {
                acc[i] += g * o[i];
                i += 1;
            }
            j += 1;
        }
        acc
    });
}

/// `d_gates[i] = Σ_n out[i, n] · dy[i / k, n]`: `in0 = out [T·k, width]`, `in1 = dy [T, width]`,
/// `out = d_gates [T·k]`. One warp per slot.
///
/// # Safety
/// Launch contract: 1-D grid, blocks of a multiple of 32 threads; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_gate_grad(p: EltwiseParams) {
    let lane = laneid() as u64;
    let warps_per_block = (ntid_x() / 32) as u64;
    let mut slot = ctaid_x() as u64 * warps_per_block + (tid_x() / 32) as u64;
    let slot_stride = nctaid_x() as u64 * warps_per_block;
    let w = p.width as u64;
    let k = p.top_k as u64;
    while slot < p.tokens * k {
        let t = slot / k;
        let mut acc = 0f32;
        let mut n = lane;
        while n < w {
            // SAFETY: `slot < T·k`, `t < T`, `n < width`.
            acc += unsafe { ld_bf16(p.in0_addr, slot * w + n) * ld_bf16(p.in1_addr, t * w + n) };
            n += 32;
        }
        let mut m = 16;
        while m > 0 {
            // SAFETY: warp-uniform loop (`slot` is per warp).
            acc += f32::from_bits(unsafe { shfl_sync_bfly_b32(acc.to_bits(), m) });
            m /= 2;
        }
        if lane == 0 {
            // SAFETY: `slot < T·k`.
            unsafe { st_bf16(p.out_addr, slot, acc) };
        }
        slot += slot_stride;
    }
}

/// `dys[i, n] = dy[i / k, n] · gates[i]`: `in0 = dy [T, width]`, `in1 = gates [T·k]`,
/// `out = dys [T·k, width]`.
///
/// # Safety
/// Launch contract: 1-D grid and block; `width` a positive multiple of 8; `in0` and `out`
/// 16-byte aligned; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_scale_slots(p: EltwiseParams) {
    store_row_vectors!(p, |w, k| rows: p.tokens * k, |slot, n| {
        // SAFETY: `slot < T·k`, so `slot / k < T`; `n + 8 ≤ width` at a multiple of 8.
        let (d, g) = unsafe {
            (load_bf16x8(p.in0_addr + 2 * (token_of(slot, k) * w + n)), ld_bf16(p.in1_addr, slot))
        };
        let mut out = [0f32; 8];
        let mut i = 0;
        while i < 8 {
            out[i] = d[i] * g;
            i += 1;
        }
        out
    });
}

/// `dx[t, n] = Σ_j dxs[t·k + j, n]`: `in0 = dxs [T·k, width]`, `out = dx [T, width]`.
///
/// # Safety
/// Launch contract: 1-D grid and block; `width` a positive multiple of 8; `in0` and `out`
/// 16-byte aligned; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_sum_slots(p: EltwiseParams) {
    store_row_vectors!(p, |w, k| rows: p.tokens, |t, n| {
        let mut acc = [0f32; 8];
        let mut j = 0;
        while j < k {
            // SAFETY: `t·k + j < T·k`, `n + 8 ≤ width` at a multiple of 8.
            let x = unsafe { load_bf16x8(p.in0_addr + 2 * ((t * k + j) * w + n)) };
            let mut i = 0;
            while i < 8 {
                acc[i] += x[i];
                i += 1;
            }
            j += 1;
        }
        acc
    });
}

/// Expert-block gather/scatter between a full and a compact LoRA matrix; see
/// `shared::params::RemapParams`.
///
/// # Safety
/// Launch contract: 1-D grid and block; the compact matrix holds `rows·cols` bf16; every map
/// entry addresses a block inside the full matrix (`full_cols` columns).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_remap_blocks(p: crate::shared::params::RemapParams) {
    let (mut i, stride) = grid_stride();
    let b = p.block as u64;
    while i < p.rows * p.cols {
        let (r, c) = (i / p.cols, i % p.cols);
        let (fr, fc) = if p.axis == 0 {
            // SAFETY: `r / b` < number of compact blocks (the map's length).
            let e: u32 = unsafe { load(p.map_addr + 4 * (r / b)) };
            (e as u64 * b + r % b, c)
        } else {
            // SAFETY: as above for columns.
            let e: u32 = unsafe { load(p.map_addr + 4 * (c / b)) };
            (r, e as u64 * b + c % b)
        };
        let full = p.full_addr + 2 * (fr * p.full_cols + fc);
        let compact = p.compact_addr + 2 * i;
        // SAFETY: both elements are inside their matrices by the contract.
        unsafe {
            if p.scatter == 0 {
                store::<u16>(compact, load::<u16>(full));
            } else {
                store::<u16>(full, load::<u16>(compact));
            }
        }
        i += stride;
    }
}
