//! The grouped GEMM on Hopper warpgroup MMA (`wgmma`, sm_90a), computed transposed:
//! `outᵀ[n, m] = Σ_k W_e[n, k] · act[m, k]` per block tile of 128 weight columns × `BM` routed
//! rows. Contract and grid: exactly those of `tile::gemm::gemm` (same `GemmParams`, same
//! expert-aligned row tiles, same B layouts), with 256 threads and `smem_plan` of the `wgmma`
//! configuration.
//!
//! Why transposed: `wgmma` takes its A operand from registers or shared memory and its B
//! operand from shared memory. The weights are A — two warpgroups × 64 columns, each warp 16 of
//! them — so a decoded MXFP4 byte is exactly one bf16x2 A-fragment register (no shared-memory
//! round trip in the forward), and the routed rows are the MMA's N (16 to 256), which suits
//! experts with few rows and lets one decoded 4-bit tile feed 256 of them. The activations are
//! staged by `cp.async` in the 128-byte swizzled K-major layout a descriptor names
//! (`tiles::wgmma_desc_sw128`; 64-element rows, so `BK == 64`).
//!
//! Where A comes from: register fragments decoded from the stage for the forward MXFP4 and
//! NVFP4 layouts; otherwise shared memory, by descriptor — the forward bf16 stage (K-major, like
//! the activations), and for dX the bf16 stage or the tile decoded from MXFP4/NVFP4, both stored
//! as two MN-major 64-column panels (`tiles::wgmma_mn_offset`, read with `imm-trans-a`).
//!
//! Warp specialisation: warpgroup 0 produces, warpgroups 1 and 2 consume. The producer stages
//! k-tile `kt` into slot `kt % STAGES` with `cp.async` (after the slot's "empty" mbarrier says
//! both consumers retired the wgmma group that read it) and hands it over with
//! `cp.async.mbarrier.arrive.noinc` on the slot's "full" mbarrier, so no block-wide barrier
//! stops the main loop. A consumer waits "full", fences the copies into the async proxy, builds
//! its A operand for the tile's `BK/16` k-steps (fragments, or for dX over 4-bit weights its
//! panel of the decoded tile), issues one wgmma group, and arrives on a group's "empty" barrier
//! once the group has retired: the previous group (`wait_group 1`, one group in flight while
//! the next k-tile is prepared) except for the forward NVFP4 layout, whose f32 decode into the
//! next fragments makes ptxas serialize every wgmma (C7513, gated by `cargo xtask ptx-report`)
//! unless the group retires first (`wait_group 0`).
//!
//! Epilogue: the LoRA term with `mma.sync` (the `wgmma` accumulator layout per warp is the
//! `m16n8` C layout), then the tile is rounded to bf16 through a shared `[BM][128]` tile and
//! written row by row in 16-byte chunks.

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::cp_async::{
    cp_async_cg_shared_global_16, cp_async_commit_group, cp_async_wait_group,
};
use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::ldmatrix::stmatrix_x4_trans_m8n8_shared_b16;
use crate::ptx::mbarrier::{
    bar_sync_named, cp_async_mbarrier_arrive_noinc, mbarrier_arrive, mbarrier_init,
    mbarrier_wait_parity,
};
use crate::ptx::mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32 as mma;
use crate::ptx::regs::{declare_launch_bounds, pin_f32x4, setmaxnreg_dec, setmaxnreg_inc};
use crate::ptx::smem::{SharedAddr, dynamic_smem, ld_shared_u8, ld_shared_u32, ld_shared_v4_u32};
use crate::ptx::sreg::{ctaid_x, laneid, nctaid_x, tid_x, warp_id};
use crate::ptx::tma::{
    cp_async_bulk_tensor_3d_g2s, fence_proxy_tensormap_acquire_sys, mbarrier_expect_tx,
};
use crate::ptx::wgmma::{
    fence_proxy_async_shared_cta, wgmma_commit_group, wgmma_fence, wgmma_m64n16k16_f32_bf16_rs,
    wgmma_m64n16k16_f32_bf16_ss, wgmma_m64n32k16_f32_bf16_rs, wgmma_m64n32k16_f32_bf16_ss,
    wgmma_m64n64k16_f32_bf16_rs, wgmma_m64n64k16_f32_bf16_ss, wgmma_m64n128k16_f32_bf16_rs,
    wgmma_m64n128k16_f32_bf16_ss, wgmma_m64n256k16_f32_bf16_rs, wgmma_m64n256k16_f32_bf16_ss,
    wgmma_wait_group,
};
use crate::shared::mxfp4::scale_fold;
use crate::shared::nvfp4::nv_fold;
use crate::shared::params::GemmParams;
use crate::shared::tiles::{
    BLayout, SmemPlan, TileConfig, TmaBox, WG_PRODUCER_THREADS, mx_scale_slot_bytes,
    nv_scale_slot_bytes, persistent_kernel, smem_plan, swizzled_offset, wgmma_desc_sw128,
    wgmma_desc_sw128_mn, wgmma_mn_offset, wgmma_tma_box,
};
use crate::tile::frag::{a_km, a_mk, b_nk};
use crate::tile::gemm::{
    LoraRight, NO_ROW, axpy4, bias_at, decode_byte, decode_byte_nv, decode_stage_kn_mx,
    decode_stage_kn_nv, kn_mx_stage_g0, kn_nv_stage_g0, left_lo_used, lora_right_layout,
    nk_mx_stage_g0, nk_nv_stage_g0, nv_block_fold, nv_row_tensor_scale, stage_lora_async,
    stage_lora_factors, stage_row_indices, stage_scales_kn_mx_row, stage_scales_kn_nv_row,
    stage_scales_nk_row,
};
use crate::tile::gmem::{store, store_16};
use crate::tile::schedule::{Tile, find_tile};

/// Weight columns per block: two warpgroups of 64.
const BN: u32 = 128;
/// Threads per block: the producer warpgroup and two consumer warpgroups.
const THREADS: u32 = WG_PRODUCER_THREADS + CONSUMER_THREADS;
/// Threads of the two consumer (MMA) warpgroups.
const CONSUMER_THREADS: u32 = 256;
/// Rows per block tile from which the kernel moves registers from the producer warpgroup to the
/// consumers (`setmaxnreg`, launch bounds of one block per SM). Only the 128- and 256-row tiles
/// run near or past the even split's limit (154–158 of 168 registers at 128 rows; 128
/// accumulators per thread at 256, which need the consumers' 208); the smaller tiles keep their
/// lower register count, so that several blocks share an SM.
const REALLOCATE_FROM_ROWS: u32 = 128;
/// Per-thread registers of the producer warpgroup after `setmaxnreg.dec`: its copy plans (a
/// gathered stream of eight 64-bit sources, a strided one) and the tile loop's state fit in 88
/// without spills, not in 80, and 88 leaves the consumers 208 (ptxas 13.0; `cargo xtask
/// ptx-report` gates spills).
const PRODUCER_REGS: u32 = 88;
/// Per-thread registers of each consumer warpgroup after `setmaxnreg.inc`: what the producer's
/// decrease frees, from the 168 each thread has at entry with `.maxntid 384` and one block per
/// SM (65536 / 384, rounded down to a multiple of 8).
const CONSUMER_REGS: u32 = {
    let entry = 65536 / THREADS / 8 * 8;
    let pool = entry * THREADS - PRODUCER_REGS * WG_PRODUCER_THREADS;
    pool / CONSUMER_THREADS / 8 * 8
};
/// Most rows of a block tile whose dX decode takes the one-product MXFP4 path
/// (`decode_stage_kn_mx`'s `one_product`): the 16- and 32-row tiles of small T, which are
/// issue-bound on the decode (H100: balanced T = 256 B 0.610–0.612 → 0.602–0.605 ms). On the
/// larger tiles the vote and the second loop body cost more than they save (T = 4096 and 16384
/// B +0.5–1.7 %, `docs/PERF.md`).
const ONE_PRODUCT_DX_MAX_ROWS: u32 = 32;
/// Named barrier of the consumers' output tile (256 threads). Ids 1 and 2 are the consumer
/// warpgroups' decode barriers (`consume_kn_mx`).
const OUT_TILE_BAR: u32 = 4;
/// Named barrier of the producer warpgroup (128 threads): its row indices of a tile, staged by
/// all of its threads, before any of them plans its copies from them.
const PRODUCER_BAR: u32 = 5;

/// A `wgmma` accumulator of `8·N` routed rows (`N` n8 blocks) and its `m64n(8N)k16` instruction.
pub trait WgAcc {
    /// `self += A·B` (`accumulate != 0`) for this warp's A fragment `a` and the B tile named by
    /// `desc_b`.
    ///
    /// # Safety
    /// As `ptx::wgmma::wgmma_m64n128k16_f32_bf16_rs`.
    unsafe fn mma_async(&mut self, a: [u32; 4], desc_b: u64, accumulate: u32);

    /// `self += A·B` with A in shared memory too: K-major (`TRANS_A = 0`) or MN-major (1) at
    /// `desc_a`.
    ///
    /// # Safety
    /// As `ptx::wgmma::wgmma_m64n128k16_f32_bf16_ss`.
    unsafe fn mma_async_ss<const TRANS_A: u32>(
        &mut self,
        desc_a: u64,
        desc_b: u64,
        accumulate: u32,
    );
}

macro_rules! wg_acc {
    ($nj:literal, $rs:ident, $ss:ident) => {
        impl WgAcc for [[f32; 4]; $nj] {
            #[inline(always)]
            unsafe fn mma_async(&mut self, a: [u32; 4], desc_b: u64, accumulate: u32) {
                // SAFETY: forwarded.
                unsafe { $rs(self, a, desc_b, accumulate) }
            }

            #[inline(always)]
            unsafe fn mma_async_ss<const TRANS_A: u32>(
                &mut self,
                desc_a: u64,
                desc_b: u64,
                accumulate: u32,
            ) {
                // SAFETY: forwarded.
                unsafe { $ss::<TRANS_A>(self, desc_a, desc_b, accumulate) }
            }
        }
    };
}
wg_acc!(2, wgmma_m64n16k16_f32_bf16_rs, wgmma_m64n16k16_f32_bf16_ss);
wg_acc!(4, wgmma_m64n32k16_f32_bf16_rs, wgmma_m64n32k16_f32_bf16_ss);
wg_acc!(8, wgmma_m64n64k16_f32_bf16_rs, wgmma_m64n64k16_f32_bf16_ss);
wg_acc!(
    16,
    wgmma_m64n128k16_f32_bf16_rs,
    wgmma_m64n128k16_f32_bf16_ss
);
wg_acc!(
    32,
    wgmma_m64n256k16_f32_bf16_rs,
    wgmma_m64n256k16_f32_bf16_ss
);

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

/// This warp's A fragments for one stage of the forward NVFP4 layout: the packed bytes as in
/// [`frags_nk_mx`], one E4M3 byte per column and 16-k half (a whole NVFP4 block) from the
/// column's `nv_scale_slot_bytes` slot at `(g0 + col·blocks16) % 4 + block`, times the column's
/// tensor scale (`ts_lo`, `ts_hi`).
///
/// # Safety
/// Warp converged; the stage is in place and visible.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn frags_nk_nv<const BK: u32>(
    b_tile: SharedAddr,
    scales_in_stage: u32,
    g0: u32,
    blocks16: u32,
    valid16: u32,
    warp_n0: u32,
    (ts_lo, ts_hi): (f32, f32),
    frags: &mut [[u32; 4]; 4],
) {
    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    let slot = nv_scale_slot_bytes(BK);
    let lo = warp_n0 + g;
    let hi = lo + 8;
    let first_lo = g0.wrapping_add(lo.wrapping_mul(blocks16)) & 3;
    let first_hi = g0.wrapping_add(hi.wrapping_mul(blocks16)) & 3;
    for q in 0..(BK / 32) as usize {
        // SAFETY: columns `lo`, `hi` < BN: their packed bytes are in the stage.
        let (w_lo, w_hi) = unsafe {
            (
                ld_shared_v4_u32(b_tile.offset(lo * (BK / 2) + 16 * q as u32)),
                ld_shared_v4_u32(b_tile.offset(hi * (BK / 2) + 16 * q as u32)),
            )
        };
        for h in 0..2 {
            let block = (2 * q + h) as u32;
            // SAFETY: each column's slot holds `first + BK/16` bytes.
            let (s_lo, s_hi) = unsafe {
                (
                    ld_shared_u8(b_tile.offset(scales_in_stage + slot * lo + first_lo + block)),
                    ld_shared_u8(b_tile.offset(scales_in_stage + slot * hi + first_hi + block)),
                )
            };
            // A block past K has zero codes but its slot byte belongs to another column: 1.0.
            let (f_lo, f_hi) = if block < valid16 {
                (nv_block_fold(s_lo, ts_lo), nv_block_fold(s_hi, ts_hi))
            } else {
                (nv_fold(1.0), nv_fold(1.0))
            };
            frags[2 * q + h] = [
                decode_byte_nv(w_lo[2 * h], t, f_lo),
                decode_byte_nv(w_hi[2 * h], t, f_hi),
                decode_byte_nv(w_lo[2 * h + 1], t, f_lo),
                decode_byte_nv(w_hi[2 * h + 1], t, f_hi),
            ];
        }
    }
}

/// The pipeline's mbarriers: `full(s)` completes when the producer's copies of slot `s` landed
/// (128 arrivals), `empty(s)` when both consumer warpgroups retired the group that read it (256);
/// once per tile, `lora_ready` when the producer's LoRA factors and row indices are in place
/// (128) and `epi_done` when the consumers finished the tile's epilogue (256).
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

    fn lora_ready(self) -> SharedAddr {
        self.base.offset(16 * self.stages)
    }

    fn epi_done(self) -> SharedAddr {
        self.base.offset(16 * self.stages + 8)
    }
}

/// At most this many 16-byte chunks of one operand tile per producer thread per k-tile.
const MAX_CHUNKS: usize = 8;

/// One producer thread's share of an operand tile, planned once per call of [`produce`]: chunk
/// `i` is copied from `src(i) + kt·step` to `dst0 + slot·stage_bytes + i·dst_step` in k-tile
/// `kt`, when bit `i` of `ok` is set and its reduction index `kt·BK + kpos0 + i·kpos_step` is
/// inside K. Every chunk keeps its place in the tile across k-tiles, so the k-loop adds instead
/// of recomputing addresses. `src(i)` is `src[i]` for a gathered stream (the routed activation
/// rows) and `src[0] + i·chunk_step` for a strided one (the weight tiles); the reduction offsets
/// are an arithmetic sequence in every layout. (Few registers: the producer runs with few.)
struct Stream {
    src: [u64; MAX_CHUNKS],
    chunk_step: u64,
    /// Bit `i`: chunk `i` has a source (a routed row, a weight column inside N).
    ok: u32,
    kpos0: u32,
    kpos_step: u32,
    n: usize,
    step: u64,
    dst0: u32,
    dst_step: u32,
    stage_bytes: u32,
    /// Paired chunks (a gathered stream of more than [`MAX_CHUNKS`] chunks per thread): each
    /// source also feeds the next 16 bytes of its row (8 reduction indices on), stored at
    /// `dst1 + slot·stage_bytes + i·dst_step`; 0 when unpaired.
    dst1: u32,
}

impl Stream {
    fn empty(step: u64, dst0: u32, dst_step: u32, stage_bytes: u32) -> Self {
        Stream {
            src: [0; MAX_CHUNKS],
            chunk_step: 0,
            ok: 0,
            kpos0: 0,
            kpos_step: 0,
            n: 0,
            step,
            dst0,
            dst_step,
            stage_bytes,
            dst1: 0,
        }
    }

    /// Copies this thread's chunks of k-tile `kt` into `slot` (`GATHERED`: the stream's sources
    /// are row indices, else strided).
    ///
    /// # Safety
    /// Every planned source lies inside its buffer for each k-tile it is valid in; the slot is
    /// free.
    #[inline(always)]
    unsafe fn issue<const BK: u32, const GATHERED: bool>(
        &self,
        smem: SharedAddr,
        slot: u32,
        kt: u32,
        k_red: u32,
        fallback: u64,
    ) {
        let off = kt as u64 * self.step;
        let base = smem.offset(self.dst0 + slot * self.stage_bytes);
        for i in 0..MAX_CHUNKS {
            if i < self.n {
                let ok = (self.ok >> i) & 1 != 0;
                let kpos = kt * BK + self.kpos0 + i as u32 * self.kpos_step;
                let go = ok && kpos < k_red;
                let src = off
                    + if GATHERED {
                        self.src[i]
                    } else {
                        self.src[0] + i as u64 * self.chunk_step
                    };
                // SAFETY: the destination chunk lies inside the slot; the source is read only
                // when `go` (the plan's contract).
                unsafe {
                    cp_async_cg_shared_global_16(
                        base.offset(i as u32 * self.dst_step),
                        if go { src } else { fallback },
                        if go { 16 } else { 0 },
                    )
                };
                if self.dst1 != 0 {
                    let go = ok && kpos + 8 < k_red;
                    // SAFETY: as above, for the row's next chunk (its own place in the slot).
                    unsafe {
                        cp_async_cg_shared_global_16(
                            smem.offset(
                                self.dst1 + slot * self.stage_bytes + i as u32 * self.dst_step,
                            ),
                            if go { src + 16 } else { fallback },
                            if go { 16 } else { 0 },
                        )
                    };
                }
            }
        }
    }
}

/// The TMA boxes of this kernel's weight stage (`tiles::wgmma_tma_box`; every `wgmma` layout
/// has them).
const fn tma_box<const BK: u32, const LAYOUT: u8>() -> TmaBox {
    match wgmma_tma_box(BN, BK, BLayout::from_tag(LAYOUT)) {
        Some(t) => t,
        None => panic!("a wgmma layout without a TMA weight box"),
    }
}

/// The producer warpgroup's loop: plan this thread's chunks of both operand tiles once, then
/// stage every k-tile into its slot as soon as the slot is free. Same tiles as
/// `tile::gemm::load_stage`, with the per-chunk address arithmetic hoisted out of the k-loop
/// (one warp cannot otherwise issue a tile's copies as fast as two warpgroups consume it).
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
    kt_range: (u32, u32),
    pipe0: u32,
    e: u64,
    n0: u32,
    bars: Barriers,
) {
    let tid = tid_x();
    // Activations: [BM][64] swizzled, chunk (row, ch) with ch = tid % 8 and rows tid/8 + 16i;
    // the swizzle depends on row % 8 only, so consecutive chunks are 16 rows = 2048 bytes apart.
    // More than `MAX_CHUNKS` chunks per thread (256 rows): chunk pairs (xc, xc + 1) with
    // xc = 2·(tid % 4) of rows tid/4 + 32i, one 64-bit source per pair.
    let pair = const { BM * BK / 8 / WG_PRODUCER_THREADS > MAX_CHUNKS as u32 };
    let (row0, xc, row_step) = if pair {
        (tid / 4, 2 * (tid % 4), 32)
    } else {
        (tid / 8, tid % 8, 16)
    };
    let mut x = Stream::empty(
        2 * BK as u64,
        swizzled_offset(row0, 8 * xc, BK),
        row_step * BK * 2,
        plan.a_stage_bytes,
    );
    // BM ≥ 16: every thread owns at least one chunk.
    x.n = (BM * BK / 8 / WG_PRODUCER_THREADS / if pair { 2 } else { 1 }) as usize;
    x.kpos0 = 8 * xc;
    if pair {
        // Never 0: a 16-byte chunk offset, and the pair's two chunks are distinct.
        x.dst1 = swizzled_offset(row0, 8 * (xc + 1), BK);
    }
    const { assert!(BM * BK / 8 / WG_PRODUCER_THREADS <= 2 * MAX_CHUNKS as u32) };
    // Grouped activation rows by TMA (`GemmParams::a_tmap_addr`): the whole `[BM][64]` stage
    // in one box per k-tile from the tile's first row, issued by thread 0, which keeps that
    // row's index in `x.src[0]` (the producer has few registers). Gathered rows stay with
    // `cp.async`: a TMA copy takes its coordinates from uniform registers, so per-row copies
    // issued by every lane run one lane at a time (`ELECT` loop, ~10 instructions per row).
    let act_tma = p.a_tmap_addr != 0;
    if act_tma {
        // SAFETY: entry 0 of the index array (a tile that reaches `produce` has a row).
        x.src[0] = unsafe { ld_shared_u32(rows_in) } as u64;
    } else {
        for i in 0..MAX_CHUNKS {
            if i < x.n {
                let row = row0 + row_step * i as u32;
                // SAFETY: `row < BM` entries of the index array.
                let r = unsafe { ld_shared_u32(rows_in.offset(4 * row)) };
                x.ok |= ((r != NO_ROW) as u32) << i;
                x.src[i] = p.a_addr + 2 * (r as u64 * p.a_stride + 8 * xc as u64);
            }
        }
    }
    let ch = tid % 8;
    let b_expert = p.b_addr + 2 * e * p.b_stride_e;
    let w = if LAYOUT == BLayout::NkBf16 as u8 {
        // [BN][64] swizzled: rows n = tid/8 + 16i, chunk tid % 8.
        let mut w = Stream::empty(
            2 * BK as u64,
            plan.b_offset + swizzled_offset(tid / 8, 8 * ch, BK),
            16 * BK * 2,
            plan.b_stage_bytes,
        );
        w.n = (BN * BK / 8 / WG_PRODUCER_THREADS) as usize;
        w.kpos0 = 8 * ch;
        for i in 0..MAX_CHUNKS {
            if i < w.n {
                let n = tid / 8 + 16 * i as u32;
                w.ok |= ((n0 + n < p.b_rows) as u32) << i;
            }
        }
        w.src[0] = b_expert + 2 * ((n0 + tid / 8) as u64 * p.b_stride_n + 8 * ch as u64);
        w.chunk_step = 2 * 16 * p.b_stride_n;
        w
    } else if LAYOUT == BLayout::KnBf16 as u8 {
        // [64][BN] as two MN-major panels [64][64] (`wgmma_mn_offset`, the A operand of
        // warpgroup `n / 64`): rows kr = tid/16 + 8i, chunk tid % 16 (swizzle by kr % 8, fixed;
        // 8 rows = 1024 bytes between a thread's chunks).
        let cn = tid % 16;
        let mut w = Stream::empty(
            2 * BK as u64 * p.b_stride_k,
            plan.b_offset + wgmma_mn_offset(tid / 16, 8 * cn, BK),
            8 * 64 * 2,
            plan.b_stage_bytes,
        );
        w.n = (BK * BN / 8 / WG_PRODUCER_THREADS) as usize;
        (w.kpos0, w.kpos_step) = (tid / 16, 8);
        // Every chunk of this thread covers the same 8 columns.
        w.ok = if n0 + 8 * cn < p.b_rows {
            (1 << w.n) - 1
        } else {
            0
        };
        w.src[0] = b_expert + 2 * ((tid / 16) as u64 * p.b_stride_k + (n0 + 8 * cn) as u64);
        w.chunk_step = 2 * 8 * p.b_stride_k;
        w
    } else if LAYOUT == BLayout::NkMxfp4 as u8 || LAYOUT == BLayout::NkNvfp4 as u8 {
        // Packed [BN][BK/2] (MXFP4 and NVFP4 alike): rows n = tid/2 + 64i, 16-byte chunk
        // tid % 2 (32 k).
        let half_k = p.k_red as u64 / 2;
        let packed_e = p.b_addr + e * p.n_out as u64 * half_k;
        let cb = tid % 2;
        let mut w = Stream::empty(
            BK as u64 / 2,
            plan.b_offset + (tid / 2) * (BK / 2) + 16 * cb,
            64 * (BK / 2),
            plan.b_stage_bytes,
        );
        w.n = (BN * BK / 32 / WG_PRODUCER_THREADS) as usize;
        w.kpos0 = 32 * cb;
        for i in 0..MAX_CHUNKS {
            if i < w.n {
                let n = tid / 2 + 64 * i as u32;
                w.ok |= ((n0 + n < p.n_out) as u32) << i;
            }
        }
        w.src[0] = packed_e + (n0 + tid / 2) as u64 * half_k + 16 * cb as u64;
        w.chunk_step = 64 * half_k;
        w
    } else {
        // dX over MXFP4 or NVFP4, raw [BK][BN/2]: rows r = tid/4 + 32i, 16-byte chunk tid % 4.
        let half_k = p.n_out as u64 / 2;
        let packed_e = p.b_addr + e * p.k_red as u64 * half_k;
        let cb = tid % 4;
        let mut w = Stream::empty(
            BK as u64 * half_k,
            plan.b_offset + (tid / 4) * (BN / 2) + 16 * cb,
            32 * (BN / 2),
            plan.b_stage_bytes,
        );
        w.n = (BK * BN / 32 / WG_PRODUCER_THREADS) as usize;
        (w.kpos0, w.kpos_step) = (tid / 4, 32);
        // Every chunk of this thread covers the same 32 columns.
        w.ok = if n0 + 32 * cb < p.n_out {
            (1 << w.n) - 1
        } else {
            0
        };
        w.src[0] = packed_e + (tid / 4) as u64 * half_k + (n0 / 2 + 16 * cb) as u64;
        w.chunk_step = 32 * half_k;
        w
    };
    // The k-tiles `kt_range.0 .. kt_range.1` of the tile (a persistent kernel's producer stages
    // a tile in two calls, its LoRA factors between them).
    let mut kt = kt_range.0;
    while kt < kt_range.1 {
        // The block's pipeline position: k-tiles of earlier tiles included (`pipe0`).
        let g = pipe0 + kt;
        let slot = g % STAGES;
        // SAFETY: the slot's previous use (pipeline position g − STAGES) is retired by both
        // consumers once that use's "empty" phase completes; the planned sources are valid
        // whenever their chunk is (rows from the routing, columns and k inside the weights);
        // the TMA copies read through maps of exactly those tensors (zeros outside) into the
        // slot's 1024-byte aligned stages.
        unsafe {
            if g >= STAGES {
                mbarrier_wait_parity(bars.empty(slot), (g / STAGES - 1) & 1);
            }
            let t = const { tma_box::<BK, LAYOUT>() };
            if tid == 0 && (act_tma || p.b_tmap_addr != 0) {
                // The TMA copies' bytes join the slot's "full" phase before this thread's own
                // arrival (below), so the phase cannot complete without them.
                let act_bytes = if act_tma { BM * BK * 2 } else { 0 };
                let w_bytes = if p.b_tmap_addr != 0 {
                    t.stage_bytes()
                } else {
                    0
                };
                mbarrier_expect_tx(bars.full(slot), act_bytes + w_bytes);
            }
            if act_tma {
                // The stage is 1024-byte aligned: the copy's 128-byte swizzle is the
                // descriptors' layout. Rows past the tile's last are the tensor's next rows (or
                // zeros past its end): their output columns are never stored.
                if tid == 0 {
                    cp_async_bulk_tensor_3d_g2s(
                        smem.offset(slot * plan.a_stage_bytes),
                        p.a_tmap_addr,
                        ((kt * BK) as i32, x.src[0] as i32, 0),
                        bars.full(slot),
                    );
                }
            } else {
                x.issue::<BK, true>(smem, slot, kt, p.k_red, p.a_addr);
            }
            let b_tile = smem.offset(plan.b_offset + slot * plan.b_stage_bytes);
            if p.b_tmap_addr == 0 {
                w.issue::<BK, false>(smem, slot, kt, p.k_red, p.b_addr);
            } else if tid == 0 {
                let mut h = 0;
                while h < t.copies {
                    cp_async_bulk_tensor_3d_g2s(
                        b_tile.offset(h * t.box_bytes()),
                        p.b_tmap_addr,
                        t.coords(BK, kt, n0, e as u32, h),
                        bars.full(slot),
                    );
                    h += 1;
                }
            }
            if LAYOUT == BLayout::NkMxfp4 as u8 {
                // One scale word slot per weight row (thread tid: row tid).
                let blocks_k = p.k_red as u64 / 32;
                let total = p.num_experts as u64 * p.n_out as u64 * blocks_k;
                stage_scales_nk_row::<BK, 32>(
                    p,
                    plan,
                    b_tile,
                    e,
                    n0,
                    tid,
                    kt * BK,
                    blocks_k,
                    total,
                );
            } else if LAYOUT == BLayout::KnMxfp4 as u8 {
                // An 8-byte window per reduction row (threads 0..BK).
                let blocks_k = p.n_out as u64 / 32;
                let total = p.num_experts as u64 * p.k_red as u64 * blocks_k;
                if tid < BK {
                    stage_scales_kn_mx_row(p, plan, b_tile, e, n0, tid, kt * BK, blocks_k, total);
                }
            } else if LAYOUT == BLayout::NkNvfp4 as u8 {
                // One E4M3 slot per weight row (thread tid: row tid).
                let blocks16 = p.k_red as u64 / 16;
                let total = p.num_experts as u64 * p.n_out as u64 * blocks16;
                stage_scales_nk_row::<BK, 16>(
                    p,
                    plan,
                    b_tile,
                    e,
                    n0,
                    tid,
                    kt * BK,
                    blocks16,
                    total,
                );
            } else if LAYOUT == BLayout::KnNvfp4 as u8 {
                // A tensor-scale-and-E4M3 window per reduction row (threads 0..BK).
                let blocks16 = p.n_out as u64 / 16;
                let total = p.num_experts as u64 * p.k_red as u64 * blocks16;
                if tid < BK {
                    stage_scales_kn_nv_row::<BN>(
                        p,
                        plan,
                        b_tile,
                        e,
                        n0,
                        tid,
                        kt * BK,
                        blocks16,
                        total,
                    );
                }
            }
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

/// Issues and commits one wgmma group: `acc += A·B` over the k-tile's `BK/16` k-steps, with
/// this warp's A fragments `frags` and B the activation stage `a_tile`. k-step ks starts 32
/// bytes further into the swizzled rows: the descriptor's address field (bytes >> 4, below 2^14
/// for any shared address) grows by 2, so every descriptor is the first plus a constant.
///
/// # Safety
/// Warpgroup converged; the stage stays in place until the group has retired.
#[inline(always)]
unsafe fn issue_group<const BK: u32, const NJ: usize>(
    acc: &mut [[f32; 4]; NJ],
    frags: &[[u32; 4]; 4],
    a_tile: SharedAddr,
    accumulate: u32,
) where
    [[f32; 4]; NJ]: WgAcc,
{
    let desc0 = wgmma_desc_sw128(a_tile.raw());
    // SAFETY: forwarded.
    unsafe {
        wgmma_fence();
        for ks in 0..(BK / 16) as usize {
            acc.mma_async(frags[ks], desc0 + 2 * ks as u64, accumulate);
        }
        wgmma_commit_group();
    }
}

/// Issues and commits one wgmma group with both operands in shared memory: `acc += A·B` over
/// the k-tile's `BK/16` k-steps, A named by `desc_a` (k-step `ks` at `desc_a + a_step·ks`: 2 for
/// a K-major tile, 32 bytes further into the rows; 128 for an MN-major one, 16 rows further),
/// B the activation stage `a_tile` as in [`issue_group`].
///
/// # Safety
/// Warpgroup converged; both tiles are visible to the async proxy and stay in place until the
/// group has retired.
#[inline(always)]
unsafe fn issue_group_ss<const BK: u32, const NJ: usize, const TRANS_A: u32>(
    acc: &mut [[f32; 4]; NJ],
    desc_a: u64,
    a_step: u64,
    a_tile: SharedAddr,
    accumulate: u32,
) where
    [[f32; 4]; NJ]: WgAcc,
{
    let desc_b = wgmma_desc_sw128(a_tile.raw());
    // SAFETY: forwarded.
    unsafe {
        wgmma_fence();
        for ks in 0..(BK / 16) as u64 {
            acc.mma_async_ss::<TRANS_A>(desc_a + a_step * ks, desc_b + 2 * ks, accumulate);
        }
        wgmma_commit_group();
    }
}

/// One k-tile of a consumer warpgroup for the forward layouts and bf16 dX (dX over MXFP4 or
/// NVFP4 runs [`consume_kn_mx`] instead): wait for slot `kt % STAGES`, build this warp's A fragments into
/// `frags` (the 4-bit layouts; the bf16 weights are read from the stage by the wgmma), issue the
/// tile's wgmma group, retire the previous group (the current one too for the forward NVFP4
/// layout, see below) and free its slot.
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
    pipe0: u32,
    e: u64,
    n0: u32,
    warp_n0: u32,
    bars: Barriers,
    ts: (f32, f32),
    frags: &mut [[u32; 4]; 4],
    acc: &mut [[f32; 4]; NJ],
    accumulate: u32,
) where
    [[f32; 4]; NJ]: WgAcc,
{
    let g = pipe0 + kt;
    let slot = g % STAGES;
    // SAFETY: the producer completes this phase after its copies land; the acquire makes them
    // visible, and the proxy fence extends that to this thread's wgmma reads.
    unsafe {
        mbarrier_wait_parity(bars.full(slot), (g / STAGES) & 1);
        fence_proxy_async_shared_cta();
    }
    let a_tile = smem.offset(slot * plan.a_stage_bytes);
    let b_tile = smem.offset(plan.b_offset + slot * plan.b_stage_bytes);
    if LAYOUT == BLayout::NkNvfp4 as u8 {
        let blocks16 = p.k_red / 16;
        let g0 = nk_nv_stage_g0::<BK>(p, e, n0, kt, blocks16);
        let valid16 = (p.k_red - kt * BK).div_ceil(16).min(BK / 16);
        // SAFETY: warp converged; the stage is in place.
        unsafe {
            frags_nk_nv::<BK>(
                b_tile,
                plan.b_scales_in_stage,
                g0,
                blocks16,
                valid16,
                warp_n0,
                ts,
                frags,
            )
        };
    } else if LAYOUT == BLayout::NkMxfp4 as u8 {
        let blocks_k = p.k_red / 32;
        let g0 = nk_mx_stage_g0::<BK>(p, e, n0, kt, blocks_k);
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
    }
    // This warpgroup's 64 weight columns of the stage, for the bf16 layouts (A from shared
    // memory): rows `64·wg..` of the K-major `[BN][BK]` forward stage, or MN-major panel `wg` of
    // the dX stage (`wgmma_mn_offset`).
    let wg = warp_n0 / 64;
    // SAFETY: warpgroup converged; the weight and activation slots stay until this group's
    // "empty" arrival (the next k-tile, or this one for `wait_group 0`).
    unsafe {
        if LAYOUT == BLayout::NkBf16 as u8 {
            let desc_a = wgmma_desc_sw128(b_tile.offset(wg * 64 * BK * 2).raw());
            issue_group_ss::<BK, NJ, 0>(acc, desc_a, 2, a_tile, accumulate);
        } else if LAYOUT == BLayout::KnBf16 as u8 {
            let desc_a = wgmma_desc_sw128_mn(b_tile.offset(wgmma_mn_offset(0, 64 * wg, BK)).raw());
            issue_group_ss::<BK, NJ, 1>(acc, desc_a, 128, a_tile, accumulate);
        } else {
            issue_group::<BK, NJ>(acc, frags, a_tile, accumulate);
        }
        // A group stays in flight while the next k-tile is waited for and its fragments built,
        // except for the forward NVFP4 layout: with its decode (f32 products,
        // `cvt.rn.bf16x2`) into the next register fragments ptxas 13.0 serializes every wgmma
        // (C7513) whatever the fold — a constant one included — so that layout retires its
        // group first. The MXFP4 decode (integer placement, one bf16x2 product) does not, and
        // the bf16 layouts have no register fragments.
        if LAYOUT != BLayout::NkNvfp4 as u8 {
            wgmma_wait_group::<1>();
            if kt > 0 {
                mbarrier_arrive(bars.empty((g - 1) % STAGES));
            }
        } else {
            wgmma_wait_group::<0>();
            mbarrier_arrive(bars.empty(slot));
        }
    }
}

/// The consumer loop of dX over MXFP4 (or NVFP4 with `NV`: `decode_stage_kn_nv`),
/// software-pipelined: each warpgroup decodes its 64 columns of k-tile `kt` into its MN-major
/// panel of decoded tile `kt % 2` (`wgmma_mn_offset`) while the wgmma group of `kt − 1` runs,
/// then issues group `kt` with A read from that panel by descriptor and retires group `kt − 1`
/// (`wait_group 1`). No register fragments: nothing ptxas must keep unchanged while a group is
/// in flight, so no serialization (C7513).
///
/// # Safety
/// All 256 consumer threads, converged per warpgroup; barriers initialized and published.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume_kn_mx<const BK: u32, const STAGES: u32, const NJ: usize, const NV: bool>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    ktiles: u32,
    pipe0: u32,
    e: u64,
    n0: u32,
    warp_n0: u32,
    bars: Barriers,
    acc: &mut [[f32; 4]; NJ],
    accumulate: u32,
) where
    [[f32; 4]; NJ]: WgAcc,
{
    let wg = warp_n0 / 64;
    let wg_tid = tid_x() % 128;
    let blocks_k = p.n_out / if NV { 16 } else { 32 };
    let decoded = |kt: u32| smem.offset(plan.decoded_offset + (kt % 2) * BK * BN * 2);
    // Waits for k-tile kt, decodes this warpgroup's 64 columns of it and publishes them to the
    // warpgroup's wgmma (proxy fence, then named barrier 1 + wg).
    let decode = |kt: u32| {
        let g = pipe0 + kt;
        let slot = g % STAGES;
        let g0 = if NV {
            kn_nv_stage_g0::<BK>(p, e, n0, kt, blocks_k)
        } else {
            kn_mx_stage_g0::<BK>(p, e, n0, kt, blocks_k)
        };
        // SAFETY: the producer completes "full" after its copies land (acquire), the proxy
        // fence extends that to this thread's wgmma reads of the activation slot; panel `wg` of
        // decoded tile kt % 2 was last read by group kt − 2 of this warpgroup, retired by the
        // `wait_group 1` after group kt − 1 was issued. The second proxy fence orders this
        // thread's decoded stores before the wgmma reads the barrier releases.
        unsafe {
            mbarrier_wait_parity(bars.full(slot), (g / STAGES) & 1);
            fence_proxy_async_shared_cta();
            let raw = smem.offset(plan.b_offset + slot * plan.b_stage_bytes);
            if NV {
                decode_stage_kn_nv::<BN, BK, true>(
                    raw,
                    decoded(kt),
                    plan.b_scales_in_stage,
                    g0,
                    blocks_k,
                    p.tensor_scales_addr != 0,
                    4 * wg,
                    4,
                    wg_tid,
                    128,
                );
            } else {
                decode_stage_kn_mx::<BN, BK, true>(
                    raw,
                    decoded(kt),
                    plan.b_scales_in_stage,
                    g0,
                    blocks_k,
                    4 * wg,
                    4,
                    wg_tid,
                    128,
                    NJ as u32 * 8 <= ONE_PRODUCT_DX_MAX_ROWS,
                );
            }
            fence_proxy_async_shared_cta();
            if wg == 0 {
                bar_sync_named::<1, 128>();
            } else {
                bar_sync_named::<2, 128>();
            }
        }
    };
    // Issues the wgmma group of decoded k-tile kt: A is this warpgroup's MN-major panel.
    let issue = |kt: u32, acc: &mut [[f32; 4]; NJ]| {
        let panel = decoded(kt).offset(wgmma_mn_offset(0, 64 * wg, BK));
        let a_tile = smem.offset(((pipe0 + kt) % STAGES) * plan.a_stage_bytes);
        // SAFETY: warpgroup converged; the panel and the activation slot stay until this
        // group retires (the panel is rewritten two k-tiles later, the slot freed one later).
        unsafe {
            issue_group_ss::<BK, NJ, 1>(
                acc,
                wgmma_desc_sw128_mn(panel.raw()),
                128,
                a_tile,
                accumulate,
            )
        };
    };
    decode(0);
    issue(0, acc);
    let mut kt = 1;
    while kt < ktiles {
        decode(kt);
        issue(kt, acc);
        // SAFETY: warpgroup converged: retire group kt − 1 and free its slot.
        unsafe {
            wgmma_wait_group::<1>();
            mbarrier_arrive(bars.empty((pipe0 + kt - 1) % STAGES));
        }
        kt += 1;
    }
}

/// One tile's main loop on the consumer side: every k-tile's wgmma group into `acc`, the last
/// group retired and its slot freed (the pipeline goes on into the block's next tile).
///
/// # Safety
/// All 256 consumer threads, converged per warpgroup; barriers initialized and published; `e`
/// is an expert of the call (`e < num_experts`: not the dropped-row bucket).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn main_loop<const BK: u32, const STAGES: u32, const NJ: usize, const LAYOUT: u8>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    ktiles: u32,
    pipe: u32,
    e: u64,
    n0: u32,
    warp_n0: u32,
    bars: Barriers,
    acc: &mut [[f32; 4]; NJ],
) where
    [[f32; 4]; NJ]: WgAcc,
{
    // Always nonzero, but opaque to LLVM, so the flag lives in a register defined once
    // before the loop rather than a constant materialized inside each wgmma group.
    let accumulate = laneid() | 1;
    // Two fragment sets, alternating, so the registers a pending wgmma group reads are
    // never rewritten before `wait_group 1` retires it.
    let mut frags_even = [[0u32; 4]; 4];
    let mut frags_odd = [[0u32; 4]; 4];
    let mut kt = 0;
    if LAYOUT == BLayout::KnMxfp4 as u8 {
        // SAFETY: all consumer threads.
        unsafe {
            consume_kn_mx::<BK, STAGES, NJ, false>(
                p, plan, smem, ktiles, pipe, e, n0, warp_n0, bars, acc, accumulate,
            )
        };
        kt = ktiles;
    } else if LAYOUT == BLayout::KnNvfp4 as u8 {
        // SAFETY: all consumer threads.
        unsafe {
            consume_kn_mx::<BK, STAGES, NJ, true>(
                p, plan, smem, ktiles, pipe, e, n0, warp_n0, bars, acc, accumulate,
            )
        };
        kt = ktiles;
    }
    // Forward over NVFP4: the tensor scales of this lane's two weight columns.
    let ts = if LAYOUT == BLayout::NkNvfp4 as u8 {
        let col = n0 + warp_n0 + laneid() / 4;
        // SAFETY: `e < num_experts` (not dropped); columns past N read nothing.
        unsafe {
            (
                nv_row_tensor_scale(p, e, col, p.n_out),
                nv_row_tensor_scale(p, e, col + 8, p.n_out),
            )
        }
    } else {
        (1.0, 1.0)
    };
    while kt < ktiles {
        // SAFETY: all consumer threads, uniform loop.
        unsafe {
            consume::<BK, STAGES, NJ, LAYOUT>(
                p,
                plan,
                smem,
                kt,
                pipe,
                e,
                n0,
                warp_n0,
                bars,
                ts,
                &mut frags_even,
                acc,
                accumulate,
            )
        };
        if kt + 1 < ktiles {
            // SAFETY: as above.
            unsafe {
                consume::<BK, STAGES, NJ, LAYOUT>(
                    p,
                    plan,
                    smem,
                    kt + 1,
                    pipe,
                    e,
                    n0,
                    warp_n0,
                    bars,
                    ts,
                    &mut frags_odd,
                    acc,
                    accumulate,
                )
            };
        }
        kt += 2;
    }
    // SAFETY: warpgroup converged; retire the last group before the accumulators are
    // read, and (except where every k-tile already did) free its slot: the pipeline goes on
    // into the block's next tile.
    unsafe {
        wgmma_wait_group::<0>();
        if LAYOUT != BLayout::NkNvfp4 as u8 && ktiles > 0 {
            mbarrier_arrive(bars.empty((pipe + ktiles - 1) % STAGES));
        }
    }
}

/// The staged LoRA factors of a tile (the plan's regions): the left factor `[BM][r_pad]` (XA
/// or YB) with, for the forward layouts, its low part, and this block's right factor,
/// `[BN][r_pad]` or (`right_kn`) `[r_pad][BN]`.
struct LoraTiles {
    left: SharedAddr,
    left_lo: Option<SharedAddr>,
    right: SharedAddr,
    right_kn: bool,
}

/// The LoRA epilogue, `acc += s · left · rightᵀ` over the padded rank `r_pad`: outᵀ[n, m] +=
/// s · Σ_j right[n, j] · left[m, j] with `mma.sync` (A = right, this warp's 16 columns; B = left,
/// 16 rows per pair of n8 blocks), the left factor's low part accumulated in f32 with its high
/// part. `HOISTED`: `r_pad` is 16 or 32, the right factor's fragments of every rank step are
/// loaded once for all row blocks (8 registers), and callers pass `r_pad` as a literal, so the
/// inlined copy folds the factors' swizzle and the rank loop into constants (the generic loop
/// spends most of its ~750 instructions per tile and warp on them); else they are loaded per
/// row block.
///
/// # Safety
/// Whole warp converged; the factors are staged with `r_pad` (a multiple of 16; 16 or 32 when
/// `HOISTED`) columns of rank in the plan's swizzled layouts.
#[inline(always)]
unsafe fn lora_epilogue<const NJ: usize, const HOISTED: bool>(
    f: &LoraTiles,
    r_pad: u32,
    warp_n0: u32,
    scaling: f32,
    acc: &mut [[f32; 4]; NJ],
) {
    let right = |kk: u32| {
        // SAFETY: warp converged; the block lies inside the right factor's region.
        unsafe {
            if f.right_kn {
                a_km(f.right, warp_n0, kk, BN)
            } else {
                a_mk(f.right, warp_n0, kk, r_pad)
            }
        }
    };
    let mut hoisted = [[0u32; 4]; 2];
    if HOISTED {
        hoisted[0] = right(0);
        if r_pad > 16 {
            hoisted[1] = right(16);
        }
    }
    for nj in 0..NJ / 2 {
        let mut t0 = [0f32; 4];
        let mut t1 = [0f32; 4];
        let mut kk = 0;
        while kk < r_pad {
            let a = if HOISTED {
                hoisted[(kk / 16) as usize % 2]
            } else {
                right(kk)
            };
            // SAFETY: warp converged; the block lies inside the left factor's region.
            let b = unsafe { b_nk(f.left, 16 * nj as u32, kk, r_pad) };
            t0 = mma(a, [b[0], b[1]], t0);
            t1 = mma(a, [b[2], b[3]], t1);
            if let Some(lo) = f.left_lo {
                // SAFETY: as above, in the low part's region.
                let b = unsafe { b_nk(lo, 16 * nj as u32, kk, r_pad) };
                t0 = mma(a, [b[0], b[1]], t0);
                t1 = mma(a, [b[2], b[3]], t1);
            }
            kk += 16;
        }
        axpy4(&mut acc[2 * nj], scaling, t0);
        axpy4(&mut acc[2 * nj + 1], scaling, t1);
        if NJ > 16 {
            // SAFETY: no instruction. Done here, not where the tile is rounded: else every
            // block's `t0`, `t1` stay live across the loop, which the 256-row tile's registers
            // cannot hold.
            unsafe {
                pin_f32x4(&mut acc[2 * nj]);
                pin_f32x4(&mut acc[2 * nj + 1]);
            }
        }
    }
}

/// The `wgmma` grouped GEMM body; see the module docs. A persistent kernel
/// (`tiles::persistent_kernel`) walks the tiles `ctaid, ctaid + nctaid, …` with one pipeline
/// (its k-tile counter runs on across tiles), double-buffered row indices and, per tile, a
/// "LoRA ready" and an "epilogue done" mbarrier phase between producer and consumers.
///
/// # Safety
/// Launch contract of `tile::gemm::gemm` for the configuration
/// `{bm: BM, bn: 128, bk: BK, warps 1×8, stages: STAGES, wgmma}` (384 threads), on sm_90a; a
/// persistent kernel may be launched with fewer blocks than that contract's grid (any number
/// from 1: every tile is still taken by exactly one block). A nonzero `b_tmap_addr` is the
/// global address of the weight tensor's map as `GemmParams::b_tmap_addr` describes it
/// (`tiles::wgmma_tma_box` of this layout; 64-byte aligned, written before the launch), over
/// the same tensor `b_addr` names; a nonzero `a_tmap_addr` likewise the map of the activation
/// tensor `a_addr` names, whose rows are grouped (`a_fan_out == 0`; `GemmParams::a_tmap_addr`).
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
    let cfg = const {
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
        // 64-element activation rows: the 128-byte swizzle atom.
        assert!(NJ as u32 == BM / 8 && NJ % 2 == 0 && BK == 64 && STAGES >= 2);
        c
    };
    let layout = BLayout::from_tag(LAYOUT);
    let plan = smem_plan(&cfg, layout, if p.rank > 0 { p.r_pad } else { 0 });
    let reallocate = const { BM >= REALLOCATE_FROM_ROWS };
    if reallocate {
        // The block size ptxas compiles for: it fixes the register count at entry, which the
        // producer/consumer reallocation below needs.
        // SAFETY: `THREADS` is this kernel's launch size (`TileConfig::threads`).
        unsafe { declare_launch_bounds::<THREADS, 1>() };
    }
    let tid = tid_x();
    let n_tiles = p.n_out.div_ceil(BN);
    let persistent = persistent_kernel(&cfg);
    // This block's tiles: `ctaid`, then (persistent) every `nctaid`-th, up to the first past the
    // last tile (`find_tile` gives None; every later index is past it too).
    let first = ctaid_x();
    // SAFETY: every warp runs the search converged with the same block-uniform tile index.
    let Some(tile0) =
        (unsafe { find_tile(p.offsets_addr, p.num_experts, p.rows, BM, first / n_tiles) })
    else {
        return; // block-uniform exit before any barrier
    };
    let next = |t: u32| -> Option<(u32, Tile)> {
        if !persistent {
            return None;
        }
        let t = t.checked_add(nctaid_x())?;
        // SAFETY: as above (every thread of the block walks the same sequence).
        unsafe { find_tile(p.offsets_addr, p.num_experts, p.rows, BM, t / n_tiles) }
            .map(|tile| (t, tile))
    };
    let smem = dynamic_smem();
    // Row-index buffer of the block's `i`-th tile: `BM` input rows, then `BM` output rows.
    let rows_of =
        |i: u32| smem.offset(plan.rows_offset + if persistent { (i % 2) * 8 * BM } else { 0 });
    let bars = Barriers {
        base: smem.offset(plan.barriers_offset),
        stages: STAGES,
    };
    // SAFETY: every thread; the two index arrays are the plan's.
    unsafe {
        stage_row_indices::<BM>(
            p,
            &tile0,
            rows_of(0),
            rows_of(0).offset(4 * BM),
            tid,
            THREADS,
        )
    };
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
        // SAFETY: as above.
        unsafe {
            mbarrier_init(bars.lora_ready(), WG_PRODUCER_THREADS);
            mbarrier_init(bars.epi_done(), CONSUMER_THREADS);
        }
    }
    // SAFETY: all threads reach it.
    unsafe { bar_sync_0() };

    let warp = warp_id();
    let producer = warp < WG_PRODUCER_THREADS / 32;
    // This consumer warp's weight columns inside the block tile (producers: unused).
    let warp_n0 = 16 * warp.wrapping_sub(WG_PRODUCER_THREADS / 32);
    let lora_right = lora_right_layout(p);
    let ktiles = p.k_red.div_ceil(BK);

    if producer {
        // The producer warpgroup, per tile: the row indices (from the second tile on; the
        // block staged the first), the operand stages and the LoRA factors, then an arrival on
        // "LoRA ready", which publishes the factors and the row indices to the consumers. It
        // needs few registers (the copy plans) and on the large tiles gives the rest to the
        // consumers; it takes no part in the epilogue, so no code runs under its register
        // budget with the accumulators live.
        if reallocate {
            // SAFETY: the whole producer warpgroup, converged.
            unsafe { setmaxnreg_dec::<PRODUCER_REGS>() };
        }
        if p.b_tmap_addr != 0 && tid == 0 {
            // The weight tiles come by TMA (`produce`), from a tensor map the host copied to
            // global memory: acquire it for the tensor-map proxy before the first copy.
            // SAFETY: a nonzero `b_tmap_addr` is a 64-byte aligned 128-byte map (contract).
            unsafe { fence_proxy_tensormap_acquire_sys(p.b_tmap_addr) };
        }
        if p.a_tmap_addr != 0 && tid == 0 {
            // SAFETY: as above, for `a_tmap_addr`.
            unsafe { fence_proxy_tensormap_acquire_sys(p.a_tmap_addr) };
        }
        let (mut t, mut tile, mut i, mut pipe) = (first, tile0, 0u32, 0u32);
        loop {
            let rows_in = rows_of(i);
            if i > 0 {
                // SAFETY: the producer warpgroup; buffer i % 2 was last read by the store loop
                // of tile i − 2, over before that tile's "epilogue done", which this warpgroup
                // waited for during tile i − 1.
                unsafe {
                    stage_row_indices::<BM>(
                        p,
                        &tile,
                        rows_in,
                        rows_in.offset(4 * BM),
                        tid,
                        WG_PRODUCER_THREADS,
                    );
                    bar_sync_named::<PRODUCER_BAR, WG_PRODUCER_THREADS>();
                }
            }
            let n0 = (t % n_tiles) * BN;
            let e = tile.bucket as u64;
            let dropped = tile.bucket >= p.num_experts;
            // The LoRA region (and, persistent, the output tile over it) is free once the
            // consumers finished the previous tile's epilogue.
            let wait_previous_epilogue = || {
                if i > 0 {
                    // SAFETY: the phase of tile i − 1 (one arrival per consumer thread and tile).
                    unsafe { mbarrier_wait_parity(bars.epi_done(), (i - 1) & 1) };
                }
            };
            let stage_lora = || {
                if p.rank > 0 {
                    // SAFETY: the producer warpgroup; the region is free (above).
                    unsafe {
                        stage_lora_async::<BM, BN>(
                            p,
                            &plan,
                            smem,
                            &tile,
                            e,
                            n0,
                            lora_right,
                            tid,
                            WG_PRODUCER_THREADS,
                        )
                    };
                }
            };
            if dropped {
                wait_previous_epilogue();
            } else {
                // The first tile's factors go in before its main loop (landing with its first
                // stage); a later tile's once the previous epilogue is over, after this tile's
                // first stages, which the producer fills while that epilogue runs.
                if i == 0 {
                    stage_lora();
                }
                // The first k-tiles (as many as there are stages: they fill while the previous
                // tile's epilogue runs), then, from the second tile on, the LoRA factors once
                // that epilogue is over, then the rest.
                let split = if i == 0 { ktiles } else { STAGES.min(ktiles) };
                // SAFETY: the whole producer warpgroup, uniform arguments.
                unsafe {
                    produce::<BM, BK, STAGES, LAYOUT>(
                        p,
                        &plan,
                        smem,
                        rows_in,
                        (0, split),
                        pipe,
                        e,
                        n0,
                        bars,
                    )
                };
                if i > 0 {
                    wait_previous_epilogue();
                    stage_lora();
                    // SAFETY: as above.
                    unsafe {
                        produce::<BM, BK, STAGES, LAYOUT>(
                            p,
                            &plan,
                            smem,
                            rows_in,
                            (split, ktiles),
                            pipe,
                            e,
                            n0,
                            bars,
                        )
                    };
                }
                if p.rank > 0 && lora_right == LoraRight::Gather {
                    // SAFETY: as above; element gathers after the main loop's copies.
                    unsafe {
                        stage_lora_factors::<BM, BN>(
                            p,
                            &plan,
                            smem,
                            &tile,
                            e,
                            n0,
                            WG_PRODUCER_THREADS,
                        )
                    };
                }
                pipe += ktiles;
            }
            // SAFETY: every copy of this thread has landed (`produce` ends with
            // `cp.async.wait_group 0`); the arrival releases them and the row indices.
            unsafe { mbarrier_arrive(bars.lora_ready()) };
            match next(t) {
                Some((t_next, tile_next)) => {
                    (t, tile) = (t_next, tile_next);
                    i += 1;
                }
                None => return,
            }
        }
    }

    if reallocate {
        // SAFETY: both consumer warpgroups, converged; the producer's decrease supplies the
        // pool (`CONSUMER_REGS`).
        unsafe { setmaxnreg_inc::<CONSUMER_REGS>() };
    }
    // Little state lives across the consumers' k-loop (their registers hold the accumulators
    // and fragments): the tile index is recomputed from `i`.
    let (mut bucket, mut i, mut pipe) = (tile0.bucket, 0u32, 0u32);
    loop {
        let t = first + i * nctaid_x();
        let n0 = (t % n_tiles) * BN;
        let e = bucket as u64;
        let dropped = bucket >= p.num_experts;
        let mut acc = [[0f32; 4]; NJ];
        if !dropped {
            // SAFETY: all consumer threads.
            unsafe {
                main_loop::<BK, STAGES, NJ, LAYOUT>(
                    p, &plan, smem, ktiles, pipe, e, n0, warp_n0, bars, &mut acc,
                )
            };
            pipe += ktiles;
        }
        // SAFETY: the producer arrives once per tile, after this tile's LoRA factors and row
        // indices are in place (phase i).
        unsafe { mbarrier_wait_parity(bars.lora_ready(), i & 1) };
        let rows_out = rows_of(i).offset(4 * BM);

        if !dropped {
            if p.rank > 0 {
                let lora = LoraTiles {
                    left: smem.offset(plan.lora_left_offset),
                    left_lo: left_lo_used(p, &plan).then(|| smem.offset(plan.lora_left_lo_offset)),
                    right: smem.offset(plan.lora_right_offset),
                    right_kn: lora_right == LoraRight::Kn,
                };
                // Ranks 16 and 32 (padded) get their own inlined copy up to 128 rows, with the
                // rank as a constant (`lora_epilogue`). Larger ranks, and the 256-row tile, keep
                // the rank loop: unrolled, their fragments do not fit the registers (ptxas
                // spills).
                // SAFETY: both consumer warpgroups, converged; the factors are in place ("LoRA
                // ready" above).
                unsafe {
                    match p.r_pad {
                        16 if NJ <= 16 => {
                            lora_epilogue::<NJ, true>(&lora, 16, warp_n0, p.scaling, &mut acc)
                        }
                        32 if NJ <= 16 => {
                            lora_epilogue::<NJ, true>(&lora, 32, warp_n0, p.scaling, &mut acc)
                        }
                        r_pad => {
                            lora_epilogue::<NJ, false>(&lora, r_pad, warp_n0, p.scaling, &mut acc)
                        }
                    }
                }
            }
            if p.bias_addr != 0 {
                // Lane (g, t) holds columns warp_n0 + g (entries 0, 1) and warp_n0 + g + 8 (entries
                // 2, 3) of every row pair: one bias value each, added to every row.
                let c0 = n0 + warp_n0 + laneid() / 4;
                // SAFETY: a bias is `[E, n_out]` bf16 (contract) and `e < E` (not dropped).
                let (b0, b1) = unsafe { (bias_at(p, e, c0), bias_at(p, e, c0 + 8)) };
                for a in acc.iter_mut() {
                    a[0] += b0;
                    a[1] += b0;
                    a[2] += b1;
                    a[3] += b1;
                }
            }
        }

        // Round into the shared `[BM][BN]` output tile. Lane (g, t) of a consumer warp holds, per
        // n8 block j of rows, columns warp_n0 + g (entries 0, 1) and warp_n0 + g + 8 (entries 2, 3)
        // of rows 8j + 2t, +1: two 8×8 matrices (columns × rows) in the `mma` C layout, which
        // `stmatrix.trans` writes transposed — four matrices (blocks j, j + 1) per instruction,
        // each destination row one 16-byte chunk of the swizzled tile.
        let out_tile = smem.offset(plan.out_offset);
        // SAFETY: both consumer warpgroups: every group has retired and every LoRA factor was read
        // before the tile overwrites the drained stages (or, persistent, the factors' region).
        unsafe { bar_sync_named::<OUT_TILE_BAR, CONSUMER_THREADS>() };
        {
            let lane = laneid();
            let m = lane / 8; // the matrix this lane addresses
            let row_in_m = lane % 8;
            for jj in 0..NJ / 2 {
                let j = 2 * jj;
                let v = [
                    cvt_rn_bf16x2_f32(acc[j][0], acc[j][1]),
                    cvt_rn_bf16x2_f32(acc[j][2], acc[j][3]),
                    cvt_rn_bf16x2_f32(acc[j + 1][0], acc[j + 1][1]),
                    cvt_rn_bf16x2_f32(acc[j + 1][2], acc[j + 1][3]),
                ];
                let r = 8 * (j as u32 + m / 2) + row_in_m;
                let c = warp_n0 + 8 * (m % 2);
                // SAFETY: warp converged; row r < BM and the chunk at column c < BN lie inside the
                // output tile (the plan's `out_offset`, free: see the barrier above).
                unsafe {
                    stmatrix_x4_trans_m8n8_shared_b16(out_tile.offset(swizzled_offset(r, c, BN)), v)
                };
            }
        }
        // SAFETY: both consumer warpgroups (the producer takes no part in the epilogue).
        unsafe { bar_sync_named::<OUT_TILE_BAR, CONSUMER_THREADS>() };
        // One 16-byte store per chunk when every output row start is 16-byte aligned.
        let wide = (p.out_addr | 2 * p.out_stride) % 16 == 0;
        let mut c = tid - WG_PRODUCER_THREADS;
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
                // output is 4-byte aligned (even stride and columns), as for the mma.sync kernel,
                // and 16-byte aligned when `wide` says so.
                unsafe {
                    if wide {
                        store_16(at, v);
                    } else {
                        store(at, v[0]);
                        store(at + 4, v[1]);
                        store(at + 8, v[2]);
                        store(at + 12, v[3]);
                    }
                }
            }
            c += CONSUMER_THREADS;
        }
        if persistent {
            // SAFETY: both consumer warpgroups: every chunk of the tile is read before the next
            // tile's epilogue writes the region again, and before the producer restages it.
            unsafe {
                bar_sync_named::<OUT_TILE_BAR, CONSUMER_THREADS>();
                mbarrier_arrive(bars.epi_done());
            }
        }
        match next(t) {
            Some((_, tile_next)) => {
                bucket = tile_next.bucket;
                i += 1;
            }
            None => return,
        }
    }
}
