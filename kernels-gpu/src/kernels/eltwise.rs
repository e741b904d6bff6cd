//! Element-wise kernels around the expert GEMMs (SPEC §2.3, §3.3): gate combination and its
//! gradient, the gated per-slot output gradient, and the sum over a token's slots. All sums are
//! f32, each result is rounded to bf16 once; offsets are 64-bit; grid-stride loops.

use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::sreg::{ctaid_x, laneid, nctaid_x, ntid_x, tid_x};
use crate::ptx::warp::shfl_sync_bfly_b32;
use crate::shared::bf16::bf16_bits_to_f32;
use crate::shared::params::EltwiseParams;
use crate::tile::gmem::{load, store};

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

/// Global thread index and grid stride.
#[inline(always)]
fn grid_stride() -> (u64, u64) {
    let nt = ntid_x() as u64;
    (
        ctaid_x() as u64 * nt + tid_x() as u64,
        nctaid_x() as u64 * nt,
    )
}

/// `y[t, n] = Σ_j gates[t, j] · out[t·k + j, n]`: `in0 = out [T·k, width]`,
/// `in1 = gates [T, k]`, `out = y [T, width]` (bf16).
///
/// # Safety
/// Launch contract: 1-D grid and block; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_combine_gates(p: EltwiseParams) {
    let (mut i, stride) = grid_stride();
    let w = p.width as u64;
    let k = p.top_k as u64;
    while i < p.tokens * w {
        let (t, n) = (i / w, i % w);
        let mut acc = 0f32;
        let mut j = 0;
        while j < k {
            // SAFETY: `t·k + j < T·k`, `n < width`.
            acc += unsafe {
                ld_bf16(p.in1_addr, t * k + j) * ld_bf16(p.in0_addr, (t * k + j) * w + n)
            };
            j += 1;
        }
        // SAFETY: `i < T·width`.
        unsafe { st_bf16(p.out_addr, i, acc) };
        i += stride;
    }
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
/// Launch contract: 1-D grid and block; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_scale_slots(p: EltwiseParams) {
    let (mut i, stride) = grid_stride();
    let w = p.width as u64;
    let k = p.top_k as u64;
    while i < p.tokens * k * w {
        let (slot, n) = (i / w, i % w);
        // SAFETY: `slot < T·k`, `n < width`.
        unsafe {
            st_bf16(
                p.out_addr,
                i,
                ld_bf16(p.in0_addr, (slot / k) * w + n) * ld_bf16(p.in1_addr, slot),
            )
        };
        i += stride;
    }
}

/// `dx[t, n] = Σ_j dxs[t·k + j, n]`: `in0 = dxs [T·k, width]`, `out = dx [T, width]`.
///
/// # Safety
/// Launch contract: 1-D grid and block; buffers sized as listed.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_sum_slots(p: EltwiseParams) {
    let (mut i, stride) = grid_stride();
    let w = p.width as u64;
    let k = p.top_k as u64;
    while i < p.tokens * w {
        let (t, n) = (i / w, i % w);
        let mut acc = 0f32;
        let mut j = 0;
        while j < k {
            // SAFETY: `t·k + j < T·k`, `n < width`.
            acc += unsafe { ld_bf16(p.in0_addr, (t * k + j) * w + n) };
            j += 1;
        }
        // SAFETY: `i < T·width`.
        unsafe { st_bf16(p.out_addr, i, acc) };
        i += stride;
    }
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
