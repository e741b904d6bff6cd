//! The grouped GEMM over expert-aligned row tiles: a `STAGES`-deep `cp.async` pipeline feeding
//! `ldmatrix` + `mma.sync.m16n8k16` (bf16 in, f32 accumulate), an optional fused LoRA epilogue,
//! and bf16 stores to grouped or scattered rows. Contract: `shared::params::GemmParams`.
//!
//! Block `b` owns output columns `n_blk·BN ..` and the rows of schedule tile `m_blk`
//! (`b = m_blk·n_tiles + n_blk`, so the n tiles of one row tile run side by side and share its
//! activations in L2, and consecutive row tiles of one expert share its weights).

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::cp_async::{cp_async_cg_shared_global_16, cp_async_commit_group, cp_async_wait_group};
use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32 as mma;
use crate::ptx::smem::{SharedAddr, dynamic_smem, ld_shared_u32, st_shared_u16, st_shared_u32};
use crate::ptx::sreg::{ctaid_x, laneid, tid_x, warp_id};
use crate::shared::params::GemmParams;
use crate::shared::tiles::{BLayout, SmemPlan, TileConfig, smem_plan, swizzled_offset};
use crate::tile::frag::{a_mk, b_kn, b_nk};
use crate::tile::gmem::{load, store};
use crate::tile::schedule::find_tile;

/// Marks a tile row without a source/destination row.
pub const NO_ROW: u32 = u32::MAX;

/// `cp.async.wait_group` for "all but the newest `stages − 2` groups", with the immediate
/// chosen at compile time.
///
/// # Safety
/// As `cp_async_wait_group`.
#[inline(always)]
pub unsafe fn wait_for_stage<const STAGES: u32>() {
    // SAFETY: forwarded.
    unsafe {
        match STAGES {
            2 => cp_async_wait_group::<0>(),
            3 => cp_async_wait_group::<1>(),
            _ => cp_async_wait_group::<2>(),
        }
    }
}

/// Stages k-slice `kt` of both operands into pipeline stage `stage`.
///
/// # Safety
/// Called by every thread of the block; `rows_in` holds the block's `BM` input rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_stage<const BM: u32, const BN: u32, const BK: u32, const LAYOUT: u8>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    rows_in: SharedAddr,
    stage: u32,
    kt: u32,
    e: u64,
    n0: u32,
    threads: u32,
) {
    let tid = tid_x();
    let k_base = kt * BK;
    // A: [BM][BK], 16-byte chunks gathered by row.
    let a_tile = smem.offset(stage * plan.a_stage_bytes);
    let cpr = BK / 8;
    let mut c = tid;
    while c < BM * cpr {
        let row = c / cpr;
        let ch = c % cpr;
        // SAFETY: `row < BM`, the index array has BM entries.
        let r = unsafe { ld_shared_u32(rows_in.offset(4 * row)) };
        let kc = k_base + 8 * ch;
        let ok = r != NO_ROW && kc < p.k_red;
        let src = p.a_addr + 2 * (r as u64 * p.a_stride + kc as u64);
        // SAFETY: the destination chunk is inside the stage; the source is read only when valid
        // (row < rows of A, kc + 8 ≤ k_red because k_red % 8 == 0).
        unsafe { cp_async_cg_shared_global_16(a_tile.offset(swizzled_offset(row, 8 * ch, BK)), if ok { src } else { p.a_addr }, if ok { 16 } else { 0 }) };
        c += threads;
    }
    let b_tile = smem.offset(plan.b_offset + stage * plan.b_stage_bytes);
    let b_expert = p.b_addr + 2 * e * p.b_stride_e;
    if LAYOUT == BLayout::NkBf16 as u8 {
        // B: [BN][BK] rows n, k contiguous.
        let mut c = tid;
        while c < BN * cpr {
            let n = c / cpr;
            let ch = c % cpr;
            let kc = k_base + 8 * ch;
            let ok = n0 + n < p.b_rows && kc < p.k_red;
            let src = b_expert + 2 * ((n0 + n) as u64 * p.b_stride_n + kc as u64);
            // SAFETY: as for A.
            unsafe { cp_async_cg_shared_global_16(b_tile.offset(swizzled_offset(n, 8 * ch, BK)), if ok { src } else { p.b_addr }, if ok { 16 } else { 0 }) };
            c += threads;
        }
    } else if LAYOUT == BLayout::KnBf16 as u8 {
        // B: [BK][BN] rows k, n contiguous.
        let cprb = BN / 8;
        let mut c = tid;
        while c < BK * cprb {
            let kr = c / cprb;
            let ch = c % cprb;
            let kk = k_base + kr;
            let nc = n0 + 8 * ch;
            let ok = kk < p.k_red && nc < p.b_rows;
            let src = b_expert + 2 * (kk as u64 * p.b_stride_k + nc as u64);
            // SAFETY: as for A (b_rows % 8 == 0).
            unsafe { cp_async_cg_shared_global_16(b_tile.offset(swizzled_offset(kr, 8 * ch, BN)), if ok { src } else { p.b_addr }, if ok { 16 } else { 0 }) };
            c += threads;
        }
    } else {
        // Strided: element gather into [BN][BK].
        let mut c = tid;
        while c < BN * BK {
            let n = c / BK;
            let d = c % BK;
            let kk = k_base + d;
            let ok = n0 + n < p.b_rows && kk < p.k_red;
            let v: u16 = if ok {
                // SAFETY: valid element of B_e by the strides of the contract.
                unsafe { load(b_expert + 2 * ((n0 + n) as u64 * p.b_stride_n + kk as u64 * p.b_stride_k)) }
            } else {
                0
            };
            // SAFETY: inside the stage.
            unsafe { st_shared_u16(b_tile.offset(swizzled_offset(n, d, BK)), v) };
            c += threads;
        }
    }
}

/// The grouped GEMM body; see the module docs and `GemmParams`.
///
/// # Safety
/// Launch contract: `ceil(n_out/BN) · (ceil(rows/BM) + num_experts + 1)` blocks (extra blocks
/// exit), `32·WM·WN` threads, `smem_plan(cfg, LAYOUT, r_pad).total_bytes` of dynamic shared
/// memory; every address and stride in `p` valid for the rows, columns and experts it names;
/// `k_red % 8 == 0`, `n_out % 8 == 0`; `r_pad` a multiple of 16 ≥ rank.
#[inline(always)]
pub unsafe fn gemm<
    const BM: u32,
    const BN: u32,
    const BK: u32,
    const WM: u32,
    const WN: u32,
    const STAGES: u32,
    const MI: usize,
    const NI: usize,
    const LAYOUT: u8,
>(
    p: &GemmParams,
) {
    const {
        let c = TileConfig { bm: BM, bn: BN, bk: BK, warps_m: WM, warps_n: WN, stages: STAGES };
        assert!(c.validate().is_ok());
        assert!(c.mma_m() as usize == MI && c.mma_n() as usize == NI && NI % 2 == 0);
    };
    let cfg = TileConfig { bm: BM, bn: BN, bk: BK, warps_m: WM, warps_n: WN, stages: STAGES };
    let layout = if LAYOUT == BLayout::NkBf16 as u8 {
        BLayout::NkBf16
    } else if LAYOUT == BLayout::KnBf16 as u8 {
        BLayout::KnBf16
    } else {
        BLayout::Strided
    };
    let plan = smem_plan(&cfg, layout, if p.rank > 0 { p.r_pad } else { 0 });
    let threads = 32 * WM * WN;
    let tid = tid_x();
    let n_tiles = p.n_out.div_ceil(BN);
    let n_blk = ctaid_x() % n_tiles;
    let m_blk = ctaid_x() / n_tiles;
    // SAFETY: every warp runs the search converged with the same block-uniform `m_blk`.
    let Some(tile) = (unsafe { find_tile(p.offsets_addr, p.num_experts, p.rows, BM, m_blk) }) else {
        return; // block-uniform exit before any barrier
    };
    let smem = dynamic_smem();
    let rows_in = smem.offset(plan.rows_offset);
    let rows_out = rows_in.offset(4 * BM);
    let mut i = tid;
    while i < BM {
        let row = tile.begin + i;
        let (ri, ro) = if row < tile.end {
            // SAFETY: `row < rows`, the length of `ssi`.
            let slot: u32 = unsafe { load(p.ssi_addr + 4 * row as u64) };
            (if p.a_fan_out == 0 { row } else { slot / p.a_fan_out }, if p.out_scattered == 0 { row } else { slot })
        } else {
            (NO_ROW, NO_ROW)
        };
        // SAFETY: `i < BM` entries of each index array.
        unsafe {
            st_shared_u32(rows_in.offset(4 * i), ri);
            st_shared_u32(rows_out.offset(4 * i), ro);
        }
        i += threads;
    }
    // SAFETY: all threads reach it (no divergent exit above after the uniform one).
    unsafe { bar_sync_0() };

    let warp = warp_id();
    let warp_m0 = (warp / WN) * (BM / WM);
    let warp_n0 = (warp % WN) * (BN / WN);
    let n0 = n_blk * BN;
    let e = tile.bucket as u64;
    let dropped = tile.bucket >= p.num_experts;
    let mut acc = [[[0f32; 4]; NI]; MI];

    if !dropped {
        let ktiles = p.k_red.div_ceil(BK);
        let mut s = 0;
        while s + 1 < STAGES {
            if s < ktiles {
                // SAFETY: all threads; stage `s` is free.
                unsafe { load_stage::<BM, BN, BK, LAYOUT>(p, &plan, smem, rows_in, s, s, e, n0, threads) };
            }
            // SAFETY: no preconditions.
            unsafe { cp_async_commit_group() };
            s += 1;
        }
        let mut kt = 0;
        while kt < ktiles {
            // SAFETY: uniform loop; every thread waits for its own copies, then the barrier makes
            // everyone's copies of stage `kt` visible and frees the stage read in iteration kt−1.
            unsafe {
                wait_for_stage::<STAGES>();
                bar_sync_0();
            }
            let next = kt + STAGES - 1;
            if next < ktiles {
                // SAFETY: the stage `next % STAGES` was last read in iteration kt−1 (barrier above).
                unsafe { load_stage::<BM, BN, BK, LAYOUT>(p, &plan, smem, rows_in, next % STAGES, next, e, n0, threads) };
            }
            // SAFETY: no preconditions.
            unsafe { cp_async_commit_group() };
            let stage = kt % STAGES;
            let a_tile = smem.offset(stage * plan.a_stage_bytes);
            let b_tile = smem.offset(plan.b_offset + stage * plan.b_stage_bytes);
            let mut kk = 0;
            while kk < BK {
                let mut a_fr = [[0u32; 4]; MI];
                for (mi, a) in a_fr.iter_mut().enumerate() {
                    // SAFETY: warp converged; the block lies inside the stage.
                    *a = unsafe { a_mk(a_tile, warp_m0 + 16 * mi as u32, kk, BK) };
                }
                for nj in 0..NI / 2 {
                    let nb = warp_n0 + 16 * nj as u32;
                    // SAFETY: warp converged; inside the stage.
                    let b = unsafe { if LAYOUT == BLayout::KnBf16 as u8 { b_kn(b_tile, nb, kk, BN) } else { b_nk(b_tile, nb, kk, BK) } };
                    for mi in 0..MI {
                        acc[mi][2 * nj] = mma(a_fr[mi], [b[0], b[1]], acc[mi][2 * nj]);
                        acc[mi][2 * nj + 1] = mma(a_fr[mi], [b[2], b[3]], acc[mi][2 * nj + 1]);
                    }
                }
                kk += 16;
            }
            kt += 1;
        }
        // SAFETY: drain the (empty) trailing groups before shared memory is reused.
        unsafe {
            cp_async_wait_group::<0>();
            bar_sync_0();
        }

        if p.rank > 0 {
            // SAFETY: all threads, uniform branch; regions from the plan.
            unsafe { lora_epilogue::<BM, BN, MI, NI>(p, &plan, smem, &tile, e, n0, warp_m0, warp_n0, threads, &mut acc) };
        }
    }

    // Store: lane holds rows g, g+8 and columns 2t, 2t+1 of each 16×8 accumulator tile.
    // Every array index below is a loop variable of a fully unrolled constant-trip loop or a
    // literal, so the accumulators stay in registers.
    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    for (mi, acc_m) in acc.iter().enumerate() {
        let r0 = warp_m0 + 16 * mi as u32 + g;
        // SAFETY: `r0 + 8 < BM`.
        let (o0, o1) = unsafe { (ld_shared_u32(rows_out.offset(4 * r0)), ld_shared_u32(rows_out.offset(4 * (r0 + 8)))) };
        for (ni, a) in acc_m.iter().enumerate() {
            let col = n0 + warp_n0 + 8 * ni as u32 + 2 * t;
            if col < p.n_out {
                // SAFETY: `o0`/`o1` are valid output rows when not NO_ROW and `col + 1 < n_out`
                // (n_out is even).
                unsafe {
                    if o0 != NO_ROW {
                        store(p.out_addr + 2 * (o0 as u64 * p.out_stride + col as u64), cvt_rn_bf16x2_f32(a[0], a[1]));
                    }
                    if o1 != NO_ROW {
                        store(p.out_addr + 2 * (o1 as u64 * p.out_stride + col as u64), cvt_rn_bf16x2_f32(a[2], a[3]));
                    }
                }
            }
        }
    }
}

/// `acc += s · (left_tile · right_eᵀ)` where `left` is the tile's rows of the `[rows, r_pad]`
/// LoRA factor and `right_e(n, j)` the expert's right factor, both staged in shared memory.
///
/// # Safety
/// All threads of the block, after the main loop's shared memory is drained.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lora_epilogue<const BM: u32, const BN: u32, const MI: usize, const NI: usize>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    tile: &crate::tile::schedule::Tile,
    e: u64,
    n0: u32,
    warp_m0: u32,
    warp_n0: u32,
    threads: u32,
    acc: &mut [[[f32; 4]; NI]; MI],
) {
    let tid = tid_x();
    let r_pad = p.r_pad;
    let left = smem;
    let right = smem.offset(plan.lora_right_offset);
    let words = r_pad / 2;
    let mut c = tid;
    while c < BM * words {
        let row = c / words;
        let w = c % words;
        let pr = tile.begin + row;
        let v: u32 = if pr < tile.end {
            // SAFETY: row `pr < rows` of the `[rows, r_pad]` factor.
            unsafe { load(p.lora_left_addr + 2 * (pr as u64 * r_pad as u64 + 2 * w as u64)) }
        } else {
            0
        };
        // SAFETY: inside the left region.
        unsafe { st_shared_u32(left.offset(swizzled_offset(row, 2 * w, r_pad)), v) };
        c += threads;
    }
    let right_e = p.lora_right_addr + 2 * e * p.lr_stride_e;
    let mut c = tid;
    while c < BN * r_pad {
        let n = c / r_pad;
        let j = c % r_pad;
        let v: u16 = if j < p.rank && n0 + n < p.n_out {
            // SAFETY: a valid element of the expert's right factor by the contract's strides.
            unsafe { load(right_e + 2 * ((n0 + n) as u64 * p.lr_stride_n + j as u64 * p.lr_stride_r)) }
        } else {
            0
        };
        // SAFETY: inside the right region.
        unsafe { st_shared_u16(right.offset(swizzled_offset(n, j, r_pad)), v) };
        c += threads;
    }
    // SAFETY: all threads.
    unsafe { bar_sync_0() };
    for mi in 0..MI {
        for nj in 0..NI / 2 {
            let mut t0 = [0f32; 4];
            let mut t1 = [0f32; 4];
            let mut kk = 0;
            while kk < r_pad {
                // SAFETY: warp converged; blocks inside the regions.
                let (a, b) = unsafe { (a_mk(left, warp_m0 + 16 * mi as u32, kk, r_pad), b_nk(right, warp_n0 + 16 * nj as u32, kk, r_pad)) };
                t0 = mma(a, [b[0], b[1]], t0);
                t1 = mma(a, [b[2], b[3]], t1);
                kk += 16;
            }
            axpy4(&mut acc[mi][2 * nj], p.scaling, t0);
            axpy4(&mut acc[mi][2 * nj + 1], p.scaling, t1);
        }
    }
}

/// `acc += s · t` for one accumulator fragment (explicit indices keep it in registers).
#[inline(always)]
fn axpy4(acc: &mut [f32; 4], s: f32, t: [f32; 4]) {
    acc[0] += s * t[0];
    acc[1] += s * t[1];
    acc[2] += s * t[2];
    acc[3] += s * t[3];
}
