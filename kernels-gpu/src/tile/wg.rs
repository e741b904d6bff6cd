//! The grouped GEMM on Hopper warpgroup MMA (`wgmma`, sm_90a), computed transposed:
//! `outᵀ[n, m] = Σ_k W_e[n, k] · act[m, k]` per block tile of 128 weight columns × `BM` routed
//! rows. Contract and grid: exactly those of `tile::gemm::gemm` (same `GemmParams`, same
//! expert-aligned row tiles, same B layouts), with 256 threads and `smem_plan` of the `wgmma`
//! configuration.
//!
//! Why transposed: `wgmma` takes its A operand from registers and its B operand from shared
//! memory. The weights are A — two warpgroups × 64 columns, each warp 16 of them — so a decoded
//! MXFP4 byte is exactly one bf16x2 A-fragment register (no shared-memory round trip in the
//! forward), and the routed rows are the MMA's N (16 to 128), which suits experts with few rows.
//! The activations are staged by `cp.async` in the no-swizzle K-major layout a descriptor names
//! (`tiles::interleaved_offset`).
//!
//! Warp specialisation: warpgroup 0 produces, warpgroups 1 and 2 consume. The producer stages
//! k-tile `kt` into slot `kt % STAGES` with `cp.async` (after the slot's "empty" mbarrier says
//! both consumers retired the wgmma group that read it) and hands it over with
//! `cp.async.mbarrier.arrive.noinc` on the slot's "full" mbarrier, so no block-wide barrier
//! stops the main loop. A consumer waits "full", fences the copies into the async proxy, builds
//! its A fragments for the tile's `BK/16` k-steps (`ldmatrix` for bf16 weights, register decode
//! for the forward MXFP4 layout, a decoded shared tile read by `ldmatrix.trans` for dX over
//! MXFP4), issues one wgmma group, and once the previous group has retired (`wait_group 1`)
//! arrives on that group's "empty" barrier.
//!
//! Epilogue: the LoRA term with `mma.sync` (the `wgmma` accumulator layout per warp is the
//! `m16n8` C layout), then the tile is rounded to bf16 through a shared `[BM][128]` tile and
//! written row by row in 16-byte chunks.

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::cp_async::{cp_async_commit_group, cp_async_wait_group};
use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::mbarrier::{
    bar_sync_named, cp_async_mbarrier_arrive_noinc, mbarrier_arrive, mbarrier_init,
    mbarrier_wait_parity,
};
use crate::ptx::mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32 as mma;
use crate::ptx::smem::{
    SharedAddr, dynamic_smem, ld_shared_u8, ld_shared_u32, ld_shared_v4_u32, st_shared_u16,
    st_shared_u32,
};
use crate::ptx::sreg::{ctaid_x, laneid, tid_x, warp_id};
use crate::ptx::wgmma::{
    fence_proxy_async_shared_cta, wgmma_commit_group, wgmma_fence, wgmma_m64n16k16_f32_bf16_rs,
    wgmma_m64n32k16_f32_bf16_rs, wgmma_m64n64k16_f32_bf16_rs, wgmma_m64n128k16_f32_bf16_rs,
    wgmma_wait_group,
};
use crate::shared::mxfp4::scale_fold;
use crate::shared::params::GemmParams;
use crate::shared::tiles::{
    BLayout, SmemPlan, TileConfig, WG_PRODUCER_THREADS, mx_scale_slot_bytes, smem_plan,
    swizzled_offset, wgmma_desc,
};
use crate::tile::frag::{a_km, a_mk, b_nk};
use crate::tile::gemm::{
    NO_ROW, axpy4, decode_byte, decode_stage_kn_mx, load_stage, stage_lora_factors,
};
use crate::tile::gmem::{load, store};
use crate::tile::schedule::find_tile;

/// Weight columns per block: two warpgroups of 64.
const BN: u32 = 128;
/// Threads per block: the producer warpgroup and two consumer warpgroups.
const THREADS: u32 = WG_PRODUCER_THREADS + CONSUMER_THREADS;
/// Threads of the two consumer (MMA) warpgroups.
const CONSUMER_THREADS: u32 = 256;

/// A `wgmma` accumulator of `8·N` routed rows (`N` n8 blocks) and its `m64n(8N)k16` instruction.
pub trait WgAcc {
    /// `self += A·B` (`accumulate != 0`) for this warp's A fragment `a` and the B tile named by
    /// `desc_b`.
    ///
    /// # Safety
    /// As `ptx::wgmma::wgmma_m64n128k16_f32_bf16_rs`.
    unsafe fn mma_async(&mut self, a: [u32; 4], desc_b: u64, accumulate: u32);
}

macro_rules! wg_acc {
    ($nj:literal, $f:ident) => {
        impl WgAcc for [[f32; 4]; $nj] {
            #[inline(always)]
            unsafe fn mma_async(&mut self, a: [u32; 4], desc_b: u64, accumulate: u32) {
                // SAFETY: forwarded.
                unsafe { $f(self, a, desc_b, accumulate) }
            }
        }
    };
}
wg_acc!(2, wgmma_m64n16k16_f32_bf16_rs);
wg_acc!(4, wgmma_m64n32k16_f32_bf16_rs);
wg_acc!(8, wgmma_m64n64k16_f32_bf16_rs);
wg_acc!(16, wgmma_m64n128k16_f32_bf16_rs);

/// This warp's A fragments (16 weight columns `warp_n0..+16` × k-steps of 16) for one stage of
/// the forward MXFP4 layout: packed `[BN][BK/2]` bytes and a scale slot per column (see
/// `tile::gemm::mma_stage_nk_mx`). Lane (g, t) decodes byte t of each word of columns g and g+8.
///
/// # Safety
/// Warp converged; the stage is in place and visible.
#[inline(always)]
unsafe fn frags_nk_mx<const BK: u32>(
    b_tile: SharedAddr,
    scales_in_stage: u32,
    g0: u32,
    blocks_k: u32,
    valid_blocks: u32,
    warp_n0: u32,
    frags: &mut [[u32; 4]; 4],
) {
    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    let slot = mx_scale_slot_bytes(BK);
    let lo = warp_n0 + g;
    let hi = lo + 8;
    let first_lo = g0.wrapping_add(lo.wrapping_mul(blocks_k)) & 3;
    let first_hi = g0.wrapping_add(hi.wrapping_mul(blocks_k)) & 3;
    for q in 0..(BK / 32) as usize {
        // SAFETY: columns `lo`, `hi` < BN: their packed bytes and scale slots are in the stage.
        let (w_lo, w_hi, s_lo, s_hi) = unsafe {
            (
                ld_shared_v4_u32(b_tile.offset(lo * (BK / 2) + 16 * q as u32)),
                ld_shared_v4_u32(b_tile.offset(hi * (BK / 2) + 16 * q as u32)),
                ld_shared_u8(b_tile.offset(scales_in_stage + slot * lo + first_lo + q as u32)),
                ld_shared_u8(b_tile.offset(scales_in_stage + slot * hi + first_hi + q as u32)),
            )
        };
        // A block past K has zero codes but its slot byte belongs to another column: use 1.0.
        let valid = (q as u32) < valid_blocks;
        let f_lo = scale_fold(if valid { s_lo as u8 } else { 127 });
        let f_hi = scale_fold(if valid { s_hi as u8 } else { 127 });
        for h in 0..2 {
            frags[2 * q + h] = [
                decode_byte(w_lo[2 * h], t, f_lo),
                decode_byte(w_hi[2 * h], t, f_hi),
                decode_byte(w_lo[2 * h + 1], t, f_lo),
                decode_byte(w_hi[2 * h + 1], t, f_hi),
            ];
        }
    }
}

/// The pipeline's mbarriers: `full(s)` completes when the producer's copies of slot `s` landed
/// (128 arrivals), `empty(s)` when both consumer warpgroups retired the group that read it (256).
#[derive(Clone, Copy)]
struct Barriers {
    base: SharedAddr,
    stages: u32,
}

impl Barriers {
    fn full(self, slot: u32) -> SharedAddr {
        self.base.offset(8 * slot)
    }

    fn empty(self, slot: u32) -> SharedAddr {
        self.base.offset(8 * (self.stages + slot))
    }
}

/// The producer warpgroup's loop: stage every k-tile into its slot once the slot is free.
///
/// # Safety
/// All 128 producer threads, block-uniform arguments; barriers initialized and published.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn produce<const BM: u32, const BK: u32, const STAGES: u32, const LAYOUT: u8>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    rows_in: SharedAddr,
    ktiles: u32,
    e: u64,
    n0: u32,
    bars: Barriers,
) {
    let tid = tid_x();
    let mut kt = 0;
    while kt < ktiles {
        let slot = kt % STAGES;
        // SAFETY: the slot's previous use (k-tile kt − STAGES) is retired by both consumers
        // once that use's "empty" phase completes; the copies then hand it over.
        unsafe {
            if kt >= STAGES {
                mbarrier_wait_parity(bars.empty(slot), (kt / STAGES - 1) & 1);
            }
            load_stage::<BM, BN, BK, LAYOUT, true>(
                p,
                plan,
                smem,
                rows_in,
                slot,
                kt,
                e,
                n0,
                tid,
                WG_PRODUCER_THREADS,
            );
            cp_async_mbarrier_arrive_noinc(bars.full(slot));
        }
        kt += 1;
    }
    // SAFETY: no preconditions; every copy has landed before the block reuses the stages.
    unsafe {
        cp_async_commit_group();
        cp_async_wait_group::<0>();
    }
}

/// One k-tile of a consumer warpgroup: wait for slot `kt % STAGES`, build this warp's A
/// fragments into `frags`, issue the tile's wgmma group, retire the previous group and free its
/// slot. On return at most this group is pending.
///
/// # Safety
/// All 256 consumer threads, converged per warpgroup; `frags` was last read by a retired group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume<const BK: u32, const STAGES: u32, const NJ: usize, const LAYOUT: u8>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    kt: u32,
    e: u64,
    n0: u32,
    warp_n0: u32,
    bars: Barriers,
    frags: &mut [[u32; 4]; 4],
    acc: &mut [[f32; 4]; NJ],
    accumulate: u32,
) where
    [[f32; 4]; NJ]: WgAcc,
{
    let slot = kt % STAGES;
    // SAFETY: the producer completes this phase after its copies land; the acquire makes them
    // visible, and the proxy fence extends that to this thread's wgmma reads.
    unsafe {
        mbarrier_wait_parity(bars.full(slot), (kt / STAGES) & 1);
        fence_proxy_async_shared_cta();
    }
    let a_tile = smem.offset(slot * plan.a_stage_bytes);
    let b_tile = smem.offset(plan.b_offset + slot * plan.b_stage_bytes);
    if LAYOUT == BLayout::NkMxfp4 as u8 {
        let blocks_k = p.k_red / 32;
        let g0 = ((e as u32).wrapping_mul(p.n_out).wrapping_add(n0))
            .wrapping_mul(blocks_k)
            .wrapping_add(kt * (BK / 32));
        let valid_blocks = (p.k_red - kt * BK).div_ceil(32).min(BK / 32);
        // SAFETY: warp converged; the stage is in place.
        unsafe {
            frags_nk_mx::<BK>(
                b_tile,
                plan.b_scales_in_stage,
                g0,
                blocks_k,
                valid_blocks,
                warp_n0,
                frags,
            )
        };
    } else if LAYOUT == BLayout::KnMxfp4 as u8 {
        // Two decoded tiles alternate: a warpgroup decoding tile kt + 1 has passed barrier kt,
        // which the other reaches only after its reads of tile kt − 1.
        let decoded = smem.offset(plan.decoded_offset + (kt % 2) * BK * BN * 2);
        // SAFETY: all consumer threads decode the raw stage, then the named barrier publishes
        // the decoded tile to both consumer warpgroups.
        unsafe {
            let blocks_k = p.n_out / 32;
            let g0 = ((e as u32).wrapping_mul(p.k_red).wrapping_add(kt * BK))
                .wrapping_mul(blocks_k)
                .wrapping_add(n0 / 32);
            decode_stage_kn_mx::<BN, BK>(
                b_tile,
                decoded,
                plan.b_scales_in_stage,
                g0,
                blocks_k,
                tid_x() - WG_PRODUCER_THREADS,
                CONSUMER_THREADS,
            );
            bar_sync_named::<1, CONSUMER_THREADS>();
        }
        for ks in 0..(BK / 16) as usize {
            // SAFETY: warp converged; the block lies inside the decoded tile.
            frags[ks] = unsafe { a_km(decoded, warp_n0, 16 * ks as u32, BN) };
        }
    } else if LAYOUT == BLayout::KnBf16 as u8 {
        for ks in 0..(BK / 16) as usize {
            // SAFETY: warp converged; the block lies inside the `[BK][BN]` stage.
            frags[ks] = unsafe { a_km(b_tile, warp_n0, 16 * ks as u32, BN) };
        }
    } else {
        for ks in 0..(BK / 16) as usize {
            // SAFETY: warp converged; the block lies inside the `[BN][BK]` stage.
            frags[ks] = unsafe { a_mk(b_tile, warp_n0, 16 * ks as u32, BK) };
        }
    }
    // k-step ks starts two core matrices (256 bytes) further along K. The descriptors are
    // computed before the fence: ptxas serializes wgmma groups whose inputs are defined inside
    // the group.
    let mut descs = [0u64; 4];
    for (ks, d) in descs.iter_mut().enumerate() {
        *d = wgmma_desc(a_tile.raw() + 256 * ks as u32, 128, 16 * BK);
    }
    // SAFETY: warpgroup converged; the activation slot stays until this group's "empty"
    // arrival (two iterations later).
    unsafe {
        wgmma_fence();
        for ks in 0..(BK / 16) as usize {
            acc.mma_async(frags[ks], descs[ks], accumulate);
        }
        wgmma_commit_group();
        wgmma_wait_group::<1>();
        if kt > 0 {
            mbarrier_arrive(bars.empty((kt - 1) % STAGES));
        }
    }
}

/// The `wgmma` grouped GEMM body; see the module docs.
///
/// # Safety
/// Launch contract of `tile::gemm::gemm` for the configuration
/// `{bm: BM, bn: 128, bk: BK, warps 1×8, stages: STAGES, wgmma}` (384 threads), on sm_90a.
#[inline(always)]
pub unsafe fn gemm_wg<
    const BM: u32,
    const BK: u32,
    const STAGES: u32,
    const NJ: usize,
    const LAYOUT: u8,
>(
    p: &GemmParams,
) where
    [[f32; 4]; NJ]: WgAcc,
{
    const {
        let c = TileConfig {
            bm: BM,
            bn: BN,
            bk: BK,
            warps_m: 1,
            warps_n: 8,
            stages: STAGES,
            wgmma: true,
        };
        assert!(c.validate().is_ok() && c.threads() == THREADS);
        assert!(NJ as u32 == BM / 8 && NJ % 2 == 0 && (BK == 32 || BK == 64) && STAGES >= 2);
    };
    let cfg = TileConfig {
        bm: BM,
        bn: BN,
        bk: BK,
        warps_m: 1,
        warps_n: 8,
        stages: STAGES,
        wgmma: true,
    };
    let layout = if LAYOUT == BLayout::NkBf16 as u8 {
        BLayout::NkBf16
    } else if LAYOUT == BLayout::KnBf16 as u8 {
        BLayout::KnBf16
    } else if LAYOUT == BLayout::NkMxfp4 as u8 {
        BLayout::NkMxfp4
    } else {
        BLayout::KnMxfp4
    };
    let plan = smem_plan(&cfg, layout, if p.rank > 0 { p.r_pad } else { 0 });
    let tid = tid_x();
    let n_tiles = p.n_out.div_ceil(BN);
    let n_blk = ctaid_x() % n_tiles;
    let m_blk = ctaid_x() / n_tiles;
    // SAFETY: every warp runs the search converged with the same block-uniform `m_blk`.
    let Some(tile) = (unsafe { find_tile(p.offsets_addr, p.num_experts, p.rows, BM, m_blk) })
    else {
        return; // block-uniform exit before any barrier
    };
    let smem = dynamic_smem();
    let rows_in = smem.offset(plan.rows_offset);
    let rows_out = rows_in.offset(4 * BM);
    let bars = Barriers {
        base: smem.offset(plan.barriers_offset),
        stages: STAGES,
    };
    let mut i = tid;
    while i < BM {
        let row = tile.begin + i;
        let (ri, ro) = if row < tile.end {
            // SAFETY: `row < rows`, the length of `ssi`.
            let slot: u32 = unsafe { load(p.ssi_addr + 4 * row as u64) };
            (
                if p.a_fan_out == 0 {
                    row
                } else {
                    slot / p.a_fan_out
                },
                if p.out_scattered == 0 { row } else { slot },
            )
        } else {
            (NO_ROW, NO_ROW)
        };
        // SAFETY: `i < BM` entries of each index array.
        unsafe {
            st_shared_u32(rows_in.offset(4 * i), ri);
            st_shared_u32(rows_out.offset(4 * i), ro);
        }
        i += THREADS;
    }
    if tid == 0 {
        let mut s = 0;
        while s < STAGES {
            // SAFETY: the barrier words lie in the plan's barrier region, unused until the block
            // barrier below publishes them.
            unsafe {
                mbarrier_init(bars.full(s), WG_PRODUCER_THREADS);
                mbarrier_init(bars.empty(s), CONSUMER_THREADS);
            }
            s += 1;
        }
    }
    // SAFETY: all threads reach it.
    unsafe { bar_sync_0() };

    let warp = warp_id();
    let producer = warp < WG_PRODUCER_THREADS / 32;
    // This consumer warp's weight columns inside the block tile (producers: unused).
    let warp_n0 = 16 * warp.wrapping_sub(WG_PRODUCER_THREADS / 32);
    let n0 = n_blk * BN;
    let e = tile.bucket as u64;
    let dropped = tile.bucket >= p.num_experts;
    let mut acc = [[0f32; 4]; NJ];

    if !dropped {
        let ktiles = p.k_red.div_ceil(BK);
        if producer {
            // SAFETY: the whole producer warpgroup, uniform arguments.
            unsafe {
                produce::<BM, BK, STAGES, LAYOUT>(p, &plan, smem, rows_in, ktiles, e, n0, bars)
            };
        } else {
            // Always nonzero, but opaque to LLVM, so the flag lives in a register defined once
            // before the loop rather than a constant materialized inside each wgmma group.
            let accumulate = laneid() | 1;
            // Two fragment sets, alternating, so the registers a pending wgmma group reads are
            // never rewritten before `wait_group 1` retires it.
            let mut frags_even = [[0u32; 4]; 4];
            let mut frags_odd = [[0u32; 4]; 4];
            let mut kt = 0;
            while kt < ktiles {
                // SAFETY: all consumer threads, uniform loop.
                unsafe {
                    consume::<BK, STAGES, NJ, LAYOUT>(
                        p,
                        &plan,
                        smem,
                        kt,
                        e,
                        n0,
                        warp_n0,
                        bars,
                        &mut frags_even,
                        &mut acc,
                        accumulate,
                    )
                };
                if kt + 1 < ktiles {
                    // SAFETY: as above.
                    unsafe {
                        consume::<BK, STAGES, NJ, LAYOUT>(
                            p,
                            &plan,
                            smem,
                            kt + 1,
                            e,
                            n0,
                            warp_n0,
                            bars,
                            &mut frags_odd,
                            &mut acc,
                            accumulate,
                        )
                    };
                }
                kt += 2;
            }
            // SAFETY: warpgroup converged; retire the last group before the accumulators are
            // read.
            unsafe { wgmma_wait_group::<0>() };
        }
        // SAFETY: all threads (producers after their last copy landed, consumers after their
        // last group retired): the stages may be reused.
        unsafe { bar_sync_0() };

        if p.rank > 0 {
            // SAFETY: all threads, uniform branch; regions from the plan.
            unsafe {
                stage_lora_factors::<BM, BN>(p, &plan, smem, &tile, e, n0, THREADS);
            }
            if !producer {
                let left = smem;
                let right = smem.offset(plan.lora_right_offset);
                // outᵀ[n, m] += s · Σ_j right[n, j] · left[m, j]: A = right (this warp's 16
                // columns), B = left (16 rows per pair of n8 blocks).
                for nj in 0..NJ / 2 {
                    let mut t0 = [0f32; 4];
                    let mut t1 = [0f32; 4];
                    let mut kk = 0;
                    while kk < p.r_pad {
                        // SAFETY: warp converged; blocks inside the regions.
                        let (a, b) = unsafe {
                            (
                                a_mk(right, warp_n0, kk, p.r_pad),
                                b_nk(left, 16 * nj as u32, kk, p.r_pad),
                            )
                        };
                        t0 = mma(a, [b[0], b[1]], t0);
                        t1 = mma(a, [b[2], b[3]], t1);
                        kk += 16;
                    }
                    axpy4(&mut acc[2 * nj], p.scaling, t0);
                    axpy4(&mut acc[2 * nj + 1], p.scaling, t1);
                }
            }
        }
    }

    // Round into the shared `[BM][BN]` output tile: lane (g, t) of a consumer warp holds columns
    // warp_n0 + g (entries 0, 1) and + g + 8 (entries 2, 3) of rows 8j + 2t and 8j + 2t + 1.
    let out_tile = smem.offset(plan.out_stage_offset);
    if !producer {
        let lane = laneid();
        let g = lane / 4;
        let t = lane % 4;
        for (j, a) in acc.iter().enumerate() {
            let r = 8 * j as u32 + 2 * t;
            let c = warp_n0 + g;
            // SAFETY: rows < BM, columns < BN: inside the output tile (disjoint from the LoRA
            // factors; the main loop's stages are drained).
            unsafe {
                st_shared_u16(out_tile.offset(swizzled_offset(r, c, BN)), bf16(a[0]));
                st_shared_u16(out_tile.offset(swizzled_offset(r + 1, c, BN)), bf16(a[1]));
                st_shared_u16(out_tile.offset(swizzled_offset(r, c + 8, BN)), bf16(a[2]));
                st_shared_u16(
                    out_tile.offset(swizzled_offset(r + 1, c + 8, BN)),
                    bf16(a[3]),
                );
            }
        }
    }
    // SAFETY: all threads.
    unsafe { bar_sync_0() };
    let mut c = tid;
    while c < BM * (BN / 8) {
        let row = c / (BN / 8);
        let ch = c % (BN / 8);
        let col = n0 + 8 * ch;
        // SAFETY: `row < BM` entries of the index array; the chunk is inside the output tile.
        let (o, v) = unsafe {
            (
                ld_shared_u32(rows_out.offset(4 * row)),
                ld_shared_v4_u32(out_tile.offset(swizzled_offset(row, 8 * ch, BN))),
            )
        };
        if o != NO_ROW && col < p.n_out {
            let at = p.out_addr + 2 * (o as u64 * p.out_stride + col as u64);
            // SAFETY: `o` is a valid output row and `col + 8 ≤ n_out` (n_out % 8 == 0); the
            // output is 4-byte aligned (even stride and columns), as for the mma.sync kernel.
            unsafe {
                store(at, v[0]);
                store(at + 4, v[1]);
                store(at + 8, v[2]);
                store(at + 12, v[3]);
            }
        }
        c += THREADS;
    }
}

/// bf16 bits of `x`, rounded to nearest even.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    cvt_rn_bf16x2_f32(x, 0.0) as u16
}
