//! The grouped GEMM over expert-aligned row tiles: a `STAGES`-deep `cp.async` pipeline feeding
//! `ldmatrix` + `mma.sync.m16n8k16` (bf16 in, f32 accumulate), an optional fused LoRA epilogue,
//! and bf16 stores to grouped or scattered rows. Contract: `shared::params::GemmParams`.
//!
//! Block `b` owns output columns `n_blk·BN ..` and the rows of schedule tile `m_blk`
//! (`b = m_blk·n_tiles + n_blk`, so the n tiles of one row tile run side by side and share its
//! activations in L2, and consecutive row tiles of one expert share its weights).

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::cp_async::{
    cp_async_ca_shared_global_4, cp_async_cg_shared_global_16, cp_async_commit_group,
    cp_async_wait_group,
};
use crate::ptx::cvt::cvt_rn_bf16x2_f32;
use crate::ptx::cvt::{mul_rn_bf16x2, prmt_b32};
use crate::ptx::mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32 as mma;
use crate::ptx::smem::{
    SharedAddr, dynamic_smem, ld_shared_u8, ld_shared_u32, ld_shared_v4_u32, st_shared_u16,
    st_shared_u32, st_shared_v4_u32,
};
use crate::ptx::sreg::{ctaid_x, laneid, tid_x, warp_id};
use crate::ptx::warp::vote_sync_all;
use crate::shared::bf16::bf16_bits_to_f32;
use crate::shared::mxfp4::{
    SINGLE_STEP_MAX, ScaleFold, place_byte_scaled_down, scale_fold, scale_single,
};
use crate::shared::nvfp4::{NvFold, e4m3_to_f32_placed, nv_fold, nv_scale_pair};
use crate::shared::params::GemmParams;
use crate::shared::tiles::{
    BLayout, SmemPlan, TileConfig, kn_nv_window_bytes, mx_scale_slot_bytes, nv_scale_slot_bytes,
    smem_plan, swizzled_offset, wgmma_mn_offset,
};
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

/// Copies a `rows × cpr` grid of 16-byte chunks into shared memory with `cp.async`, this thread
/// taking chunks `tid, tid + threads, …`: for chunk `(row, ch)` the body gives
/// `(dst, ok, src)`, and the chunk is copied from `src` when `ok`, else zero-filled (0 bytes
/// from `fallback`). A macro, not a closure, so every caller compiles exactly as if written out.
///
/// Safety (the caller's `unsafe` block): for every chunk, `dst` is a 16-byte aligned shared
/// address inside its tile and, when `ok`, `src` a 16-byte aligned global address with 16
/// readable bytes.
macro_rules! copy_chunks {
    (
        $rows:expr, $cpr:expr, $tid:expr, $threads:expr, $fallback:expr,
        |$row:ident, $ch:ident| $chunk:block
    ) => {{
        let cpr = $cpr;
        let mut c = $tid;
        while c < $rows * cpr {
            let $row = c / cpr;
            let $ch = c % cpr;
            let (dst, ok, src) = $chunk;
            $crate::ptx::cp_async::cp_async_cg_shared_global_16(
                dst,
                if ok { src } else { $fallback },
                if ok { 16 } else { 0 },
            );
            c += $threads;
        }
    }};
}
pub(crate) use copy_chunks;

/// Stages the 4-byte-aligned scale word(s) holding global scale byte `g` into `dst` with
/// `cp.async` (4 bytes each, `words` of them), clipped to the `total`-byte scale buffer; the
/// reader finds byte `g` at `dst + (g % 4)`. Nothing is read when `valid` is false.
///
/// # Safety
/// `dst` is a 4-byte aligned shared address with `4·words` bytes; `scales_addr` is the 4-byte
/// aligned scale buffer of `total` bytes.
#[inline(always)]
pub(crate) unsafe fn stage_scale_words(
    dst: SharedAddr,
    scales_addr: u64,
    g: u64,
    total: u64,
    words: u32,
    valid: bool,
) {
    let aligned = g & !3;
    let mut w = 0;
    while w < words {
        let at = aligned + 4 * w as u64;
        let size = if valid && at < total {
            (total - at).min(4) as u32
        } else {
            0
        };
        // SAFETY: `size` bytes from `at` lie inside the buffer; the destination word is inside
        // the slot.
        unsafe {
            cp_async_ca_shared_global_4(
                dst.offset(4 * w),
                if size > 0 {
                    scales_addr + at
                } else {
                    scales_addr
                },
                size,
            )
        };
        w += 1;
    }
}

/// Stages the scale word(s) of weight row `n0 + n` of a forward 4-bit k-tile starting at
/// reduction index `k_base` into row `n`'s slot of stage `b_tile`: the aligned word(s) holding
/// scale bytes `(e, n0 + n, k_base/BLOCK ..+ BK/BLOCK)` of the `total`-byte scales (`blocks_k =
/// k_red/BLOCK` per weight row): E8M0 bytes in an [`mx_scale_slot_bytes`] slot (`BLOCK = 32`,
/// MXFP4) or E4M3 bytes in an [`nv_scale_slot_bytes`] slot (`BLOCK = 16`, NVFP4; the row's tensor
/// scale is not staged: the forward reads it once per block, `nv_row_tensor_scale`).
///
/// # Safety
/// `n < BN` of a forward MXFP4 (`BLOCK = 32`) or NVFP4 (`BLOCK = 16`) stage of the plan; the
/// scale buffer holds `total` bytes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn stage_scales_nk_row<const BK: u32, const BLOCK: u32>(
    p: &GemmParams,
    plan: &SmemPlan,
    b_tile: SharedAddr,
    e: u64,
    n0: u32,
    n: u32,
    k_base: u32,
    blocks_k: u64,
    total: u64,
) {
    let slot = if BLOCK == 16 {
        nv_scale_slot_bytes(BK)
    } else {
        mx_scale_slot_bytes(BK)
    };
    let ok = n0 + n < p.n_out && k_base < p.k_red;
    let g = (e * p.n_out as u64 + (n0 + n) as u64) * blocks_k + (k_base / BLOCK) as u64;
    // SAFETY: a `slot`-byte slot per row inside the stage; the scale buffer holds `total` bytes.
    unsafe {
        stage_scale_words(
            b_tile.offset(plan.b_scales_in_stage + slot * n),
            p.scales_addr,
            g,
            total,
            slot / 4,
            ok,
        )
    };
}

/// Stages the 8-byte scale window of reduction row `k_base + r` of a dX MXFP4 k-tile into row
/// `r`'s slot of stage `b_tile`: the aligned words holding bytes `(e, k_base + r, n0/32 ..+
/// BN/32)` of the `total`-byte scales (`blocks_k` per container row).
///
/// # Safety
/// `r < BK` of a dX MXFP4 stage of the plan; the scale buffer holds `total` bytes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn stage_scales_kn_mx_row(
    p: &GemmParams,
    plan: &SmemPlan,
    b_tile: SharedAddr,
    e: u64,
    n0: u32,
    r: u32,
    k_base: u32,
    blocks_k: u64,
    total: u64,
) {
    let ok = k_base + r < p.k_red;
    let g = (e * p.k_red as u64 + (k_base + r) as u64) * blocks_k + (n0 / 32) as u64;
    // SAFETY: an 8-byte slot per row inside the stage; the buffer holds `total` bytes.
    unsafe {
        stage_scale_words(
            b_tile.offset(plan.b_scales_in_stage + 8 * r),
            p.scales_addr,
            g,
            total,
            2,
            ok,
        )
    };
}

/// Stages the [`kn_nv_window_bytes`] window of reduction row `k_base + r` of a dX NVFP4 k-tile
/// into row `r`'s window of stage `b_tile`: the container row's f32 tensor scale (when the
/// weights have them; 4 bytes, zero past K), then the aligned words holding its E4M3 bytes
/// `(e, k_base + r, n0/16 ..+ BN/16)` of the `total`-byte scales (`blocks16 = n_out/16` per
/// container row).
///
/// # Safety
/// `r < BK` of a dX NVFP4 stage of the plan; the scale buffer holds `total` bytes and the
/// tensor scales (when `tensor_scales_addr != 0`) `E·k_red/ts_rows_per_group` f32.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn stage_scales_kn_nv_row<const BN: u32>(
    p: &GemmParams,
    plan: &SmemPlan,
    b_tile: SharedAddr,
    e: u64,
    n0: u32,
    r: u32,
    k_base: u32,
    blocks16: u64,
    total: u64,
) {
    let window = kn_nv_window_bytes(BN);
    let row = k_base + r;
    let ok = row < p.k_red;
    let dst = b_tile.offset(plan.b_scales_in_stage + window * r);
    if p.tensor_scales_addr != 0 {
        let rpg = p.ts_rows_per_group.max(1);
        let groups = (p.k_red / rpg) as u64;
        let src = p.tensor_scales_addr + 4 * (e * groups + (row / rpg) as u64);
        // SAFETY: the window's first word; read only for a row inside the container
        // (`row / rpg < groups`).
        unsafe {
            cp_async_ca_shared_global_4(
                dst,
                if ok { src } else { p.tensor_scales_addr },
                if ok { 4 } else { 0 },
            )
        };
    }
    let g = (e * p.k_red as u64 + row as u64) * blocks16 + (n0 / 16) as u64;
    // SAFETY: the window's scale words lie inside the stage; the buffer holds `total` bytes.
    unsafe { stage_scale_words(dst.offset(4), p.scales_addr, g, total, window / 4 - 1, ok) };
}

/// The tensor scale of container row `row` of expert `e` (`GemmParams::tensor_scales_addr`),
/// or 1.0 without tensor scales or past the container's `rows`.
///
/// # Safety
/// `e < num_experts`; the tensor scales (when given) hold `E·rows/ts_rows_per_group` f32.
#[inline(always)]
pub(crate) unsafe fn nv_row_tensor_scale(p: &GemmParams, e: u64, row: u32, rows: u32) -> f32 {
    if p.tensor_scales_addr == 0 || row >= rows {
        return 1.0;
    }
    let rpg = p.ts_rows_per_group.max(1);
    let groups = (rows / rpg) as u64;
    // SAFETY: `row / rpg < groups` for `row < rows` (contract: rpg divides rows).
    unsafe { load::<f32>(p.tensor_scales_addr + 4 * (e * groups + (row / rpg) as u64)) }
}

/// Stages k-slice `kt` of both operands into pipeline stage `stage`, all as `cp.async` except
/// the strided layout's element gather (stored directly). The activation tile is swizzled
/// (`tiles::swizzled_offset`): read by `ldmatrix`, and with 64-element rows it is also the
/// `wgmma` 128-byte swizzle layout (`tiles::wgmma_desc_sw128`).
///
/// `tid` is this thread's index among the `threads` loader threads.
///
/// # Safety
/// Called by every loader thread; `rows_in` holds the block's `BM` input rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn load_stage<const BM: u32, const BN: u32, const BK: u32, const LAYOUT: u8>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    rows_in: SharedAddr,
    stage: u32,
    kt: u32,
    e: u64,
    n0: u32,
    tid: u32,
    threads: u32,
) {
    let k_base = kt * BK;
    // A: [BM][BK], 16-byte chunks gathered by row.
    let a_tile = smem.offset(stage * plan.a_stage_bytes);
    let cpr = BK / 8;
    // SAFETY: `row < BM` entries of the index array; the destination chunk is inside the stage;
    // the source is read only when valid (row < rows of A, kc + 8 ≤ k_red because
    // k_red % 8 == 0).
    unsafe {
        copy_chunks!(BM, cpr, tid, threads, p.a_addr, |row, ch| {
            let r = ld_shared_u32(rows_in.offset(4 * row));
            let kc = k_base + 8 * ch;
            let ok = r != NO_ROW && kc < p.k_red;
            let src = p.a_addr + 2 * (r as u64 * p.a_stride + kc as u64);
            (a_tile.offset(swizzled_offset(row, 8 * ch, BK)), ok, src)
        })
    };
    let b_tile = smem.offset(plan.b_offset + stage * plan.b_stage_bytes);
    let b_expert = p.b_addr + 2 * e * p.b_stride_e;
    if LAYOUT == BLayout::NkBf16 as u8 {
        // B: [BN][BK] rows n, k contiguous.
        // SAFETY: as for A.
        unsafe {
            copy_chunks!(BN, cpr, tid, threads, p.b_addr, |n, ch| {
                let kc = k_base + 8 * ch;
                let ok = n0 + n < p.b_rows && kc < p.k_red;
                let src = b_expert + 2 * ((n0 + n) as u64 * p.b_stride_n + kc as u64);
                (b_tile.offset(swizzled_offset(n, 8 * ch, BK)), ok, src)
            })
        };
    } else if LAYOUT == BLayout::KnBf16 as u8 {
        // B: [BK][BN] rows k, n contiguous.
        // SAFETY: as for A (b_rows % 8 == 0).
        unsafe {
            copy_chunks!(BK, BN / 8, tid, threads, p.b_addr, |kr, ch| {
                let kk = k_base + kr;
                let nc = n0 + 8 * ch;
                let ok = kk < p.k_red && nc < p.b_rows;
                let src = b_expert + 2 * (kk as u64 * p.b_stride_k + nc as u64);
                (b_tile.offset(swizzled_offset(kr, 8 * ch, BN)), ok, src)
            })
        };
    } else if LAYOUT == BLayout::Strided as u8 {
        // Strided: element gather into [BN][BK].
        let mut c = tid;
        while c < BN * BK {
            let n = c / BK;
            let d = c % BK;
            let kk = k_base + d;
            let ok = n0 + n < p.b_rows && kk < p.k_red;
            let v: u16 = if ok {
                // SAFETY: valid element of B_e by the strides of the contract.
                unsafe {
                    load(b_expert + 2 * ((n0 + n) as u64 * p.b_stride_n + kk as u64 * p.b_stride_k))
                }
            } else {
                0
            };
            // SAFETY: inside the stage.
            unsafe { st_shared_u16(b_tile.offset(swizzled_offset(n, d, BK)), v) };
            c += threads;
        }
    } else if LAYOUT == BLayout::NkMxfp4 as u8 || LAYOUT == BLayout::NkNvfp4 as u8 {
        // Forward over MXFP4 or NVFP4: container N = n_out rows, K = k_red; packed rows of K/2
        // bytes (the same packed layout for both formats).
        let half_k = p.k_red as u64 / 2;
        let packed_e = p.b_addr + e * p.n_out as u64 * half_k;
        // Packed: [BN][BK/2] bytes, one 16-byte chunk per 32 k per row.
        // SAFETY: destination inside the stage; source read only when valid (K % 32 == 0, so a
        // chunk is whole); packed rows are 16-byte aligned because K/2 % 16 == 0.
        unsafe {
            copy_chunks!(BN, BK / 32, tid, threads, p.b_addr, |n, ch| {
                let ok = n0 + n < p.n_out && k_base + 32 * ch < p.k_red;
                let src =
                    packed_e + (n0 + n) as u64 * half_k + (k_base / 2) as u64 + 16 * ch as u64;
                (b_tile.offset(n * (BK / 2) + 16 * ch), ok, src)
            })
        };
        // Scales: the aligned word(s) holding the stage's scale bytes of each row (E8M0 bytes
        // (e, n0 + n, kt·BK/32 ..+ BK/32), or E4M3 bytes (e, n0 + n, kt·BK/16 ..+ BK/16)).
        let nv = LAYOUT == BLayout::NkNvfp4 as u8;
        let blocks_k = p.k_red as u64 / if nv { 16 } else { 32 };
        let total = p.num_experts as u64 * p.n_out as u64 * blocks_k;
        let mut n = tid;
        while n < BN {
            // SAFETY: row `n < BN` of the stage.
            unsafe {
                if nv {
                    stage_scales_nk_row::<BK, 16>(
                        p, plan, b_tile, e, n0, n, k_base, blocks_k, total,
                    )
                } else {
                    stage_scales_nk_row::<BK, 32>(
                        p, plan, b_tile, e, n0, n, k_base, blocks_k, total,
                    )
                }
            };
            n += threads;
        }
    } else {
        // dX over MXFP4 or NVFP4: reduction over the container's N = k_red rows, output over
        // its K = n_out; raw rows of BN/2 bytes (the k range n0..n0+BN) per reduction index.
        let half_k = p.n_out as u64 / 2;
        let packed_e = p.b_addr + e * p.k_red as u64 * half_k;
        // SAFETY: as for the forward layout (BN/32 16-byte chunks per raw row).
        unsafe {
            copy_chunks!(BK, BN / 32, tid, threads, p.b_addr, |r, ch| {
                let ok = k_base + r < p.k_red && n0 + 32 * ch < p.n_out;
                let src =
                    packed_e + (k_base + r) as u64 * half_k + (n0 / 2) as u64 + 16 * ch as u64;
                (b_tile.offset(r * (BN / 2) + 16 * ch), ok, src)
            })
        };
        // Scales: the window holding bytes (e, kt·BK + r, n0/32 ..+ BN/32) (MXFP4: 8 bytes) or
        // the tensor scale and bytes (e, kt·BK + r, n0/16 ..+ BN/16) (NVFP4) per row.
        let nv = LAYOUT == BLayout::KnNvfp4 as u8;
        let blocks_k = p.n_out as u64 / if nv { 16 } else { 32 };
        let total = p.num_experts as u64 * p.k_red as u64 * blocks_k;
        let mut r = tid;
        while r < BK {
            // SAFETY: row `r < BK` of the stage.
            unsafe {
                if nv {
                    stage_scales_kn_nv_row::<BN>(p, plan, b_tile, e, n0, r, k_base, blocks_k, total)
                } else {
                    stage_scales_kn_mx_row(p, plan, b_tile, e, n0, r, k_base, blocks_k, total)
                }
            };
            r += threads;
        }
    }
}

/// How a grouped GEMM stages the expert's LoRA right factor `(n0 + n, j)`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoraRight {
    /// Contiguous along the rank, 16-byte aligned runs: `cp.async` into `[BN][r_pad]`.
    Nk,
    /// Contiguous along n, 16-byte aligned runs: `cp.async` into `[r_pad][BN]` (read by
    /// `ldmatrix.trans`).
    Kn,
    /// Anything else: element gathers into `[BN][r_pad]` after the main loop.
    Gather,
}

/// The block-uniform staging mode of the LoRA right factor (`GemmParams` strides in elements).
#[inline(always)]
pub(crate) fn lora_right_layout(p: &GemmParams) -> LoraRight {
    let aligned = p.lora_right_addr % 16 == 0 && p.lr_stride_e % 8 == 0;
    if aligned && p.lr_stride_r == 1 && p.lr_stride_n % 8 == 0 {
        LoraRight::Nk
    } else if aligned && p.lr_stride_n == 1 && p.lr_stride_r % 8 == 0 {
        LoraRight::Kn
    } else {
        LoraRight::Gather
    }
}

/// `cp.async` copies of the LoRA factors into their own epilogue region, issued before the main
/// loop: the tile's rows of the `[rows, r_pad]` left factor as `[BM][r_pad]` (zero rows past
/// the tile) and, in the `Nk`/`Kn` modes, the expert's right factor (zero past the rank and past
/// `n_out`), all swizzled like the gathered layout. `tid` is this thread's index among the
/// `threads` copying threads.
///
/// # Safety
/// All `threads` copying threads; the regions are not in use until the block barrier after the
/// main loop, and the copies are waited for before it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn stage_lora_async<const BM: u32, const BN: u32>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    tile: &crate::tile::schedule::Tile,
    e: u64,
    n0: u32,
    mode: LoraRight,
    tid: u32,
    threads: u32,
) {
    let r_pad = p.r_pad;
    let left = smem.offset(plan.lora_left_offset);
    let right = smem.offset(plan.lora_right_offset);
    let cpr = r_pad / 8;
    // The left factor, and (forward layouts) its low part into its own region.
    let mut part = 0;
    while part < 1 + left_lo_used(p, plan) as u32 {
        let (region, base) = if part == 0 {
            (left, p.lora_left_addr)
        } else {
            (smem.offset(plan.lora_left_lo_offset), p.lora_left_lo_addr)
        };
        // SAFETY: row `pr < rows` of the 16-byte aligned `[rows, r_pad]` factor (either part,
        // same shape and alignment by the contract) when `ok`; the destination chunk lies in
        // the part's region.
        unsafe {
            copy_chunks!(BM, cpr, tid, threads, base, |row, ch| {
                let pr = tile.begin + row;
                let ok = pr < tile.end;
                let dst = region.offset(swizzled_offset(row, 8 * ch, r_pad));
                let src = base + 2 * (pr as u64 * r_pad as u64 + 8 * ch as u64);
                (dst, ok, src)
            })
        };
        part += 1;
    }
    let right_e = p.lora_right_addr + 2 * e * p.lr_stride_e;
    if mode == LoraRight::Nk {
        let mut c = tid;
        while c < BN * cpr {
            let n = c / cpr;
            let j0 = 8 * (c % cpr);
            let bytes = if n0 + n < p.n_out && j0 < p.rank {
                2 * (p.rank - j0).min(8)
            } else {
                0
            };
            // SAFETY: `bytes` bytes of row n0 + n from rank index j0 lie inside the factor
            // (16-byte aligned by the mode's checks); the chunk lies in the right region.
            unsafe {
                cp_async_cg_shared_global_16(
                    right.offset(swizzled_offset(n, j0, r_pad)),
                    if bytes > 0 {
                        right_e + 2 * ((n0 + n) as u64 * p.lr_stride_n + j0 as u64)
                    } else {
                        p.lora_right_addr
                    },
                    bytes,
                )
            };
            c += threads;
        }
    } else if mode == LoraRight::Kn {
        let mut c = tid;
        while c < r_pad * (BN / 8) {
            let j = c / (BN / 8);
            let nc = 8 * (c % (BN / 8));
            let ok = j < p.rank && n0 + nc < p.n_out;
            // SAFETY: rank index j < rank and columns n0 + nc .. + 8 ≤ n_out of the factor when
            // `ok` (n_out % 8 == 0, 16-byte aligned by the mode's checks); inside the region.
            unsafe {
                cp_async_cg_shared_global_16(
                    right.offset(swizzled_offset(j, nc, BN)),
                    if ok {
                        right_e + 2 * (j as u64 * p.lr_stride_r + (n0 + nc) as u64)
                    } else {
                        p.lora_right_addr
                    },
                    if ok { 16 } else { 0 },
                )
            };
            c += threads;
        }
    }
}

/// Whether the epilogue reads the left factor's low part: given by the caller
/// (`lora_left_lo_addr != 0`) and reserved by the plan (the forward layouts).
#[inline(always)]
pub(crate) fn left_lo_used(p: &GemmParams, plan: &SmemPlan) -> bool {
    p.lora_left_lo_addr != 0 && plan.lora_left_lo_offset != 0
}

/// Writes the block's row indices: `rows_in[i]` = the activation row and `rows_out[i]` = the
/// output row of tile row `i` (`NO_ROW` past the tile). The caller publishes them with a barrier.
/// `tid` is this thread's index among the `threads` writing threads.
///
/// # Safety
/// `rows_in` and `rows_out` each hold `BM` u32 in shared memory; the tile's rows are `< rows`.
#[inline(always)]
pub(crate) unsafe fn stage_row_indices<const BM: u32>(
    p: &GemmParams,
    tile: &crate::tile::schedule::Tile,
    rows_in: SharedAddr,
    rows_out: SharedAddr,
    tid: u32,
    threads: u32,
) {
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
        i += threads;
    }
}

/// The grouped GEMM body; see the module docs and `GemmParams`.
///
/// # Safety
/// Launch contract: `ceil(n_out/BN) · (ceil(rows/BM) + num_experts + 1)` blocks (extra blocks
/// exit), `32·WM·WN` threads, `smem_plan(cfg, LAYOUT, r_pad).total_bytes` of dynamic shared
/// memory; every address and stride in `p` valid for the rows, columns and experts it names;
/// `k_red % 8 == 0`, `n_out % 8 == 0`; `r_pad` a multiple of 16 ≥ rank. 4-bit layouts: the
/// container's K (`k_red` forward, `n_out` dX) a multiple of 32; NVFP4 with tensor scales:
/// `ts_rows_per_group ≥ 1` dividing the container's N and `tensor_scales_addr` holding
/// `E·N/ts_rows_per_group` f32.
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
    let cfg = const {
        let c = TileConfig {
            bm: BM,
            bn: BN,
            bk: BK,
            warps_m: WM,
            warps_n: WN,
            stages: STAGES,
            wgmma: false,
        };
        assert!(c.validate().is_ok());
        assert!(c.mma_m() as usize == MI && c.mma_n() as usize == NI && NI % 2 == 0);
        // 4-bit stages: one or two 32-k blocks per stage.
        assert!(!BLayout::from_tag(LAYOUT).is_fp4() || BK == 32 || BK == 64);
        c
    };
    let layout = BLayout::from_tag(LAYOUT);
    let plan = smem_plan(&cfg, layout, if p.rank > 0 { p.r_pad } else { 0 });
    let threads = 32 * WM * WN;
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
    // SAFETY: every thread; the two index arrays are the plan's.
    unsafe { stage_row_indices::<BM>(p, &tile, rows_in, rows_out, tid, threads) };
    // SAFETY: all threads reach it (no divergent exit above after the uniform one).
    unsafe { bar_sync_0() };

    let warp = warp_id();
    let warp_m0 = (warp / WN) * (BM / WM);
    let warp_n0 = (warp % WN) * (BN / WN);
    let n0 = n_blk * BN;
    let e = tile.bucket as u64;
    let dropped = tile.bucket >= p.num_experts;
    let mut acc = [[[0f32; 4]; NI]; MI];

    let lora_right = lora_right_layout(p);
    if !dropped {
        // Forward over NVFP4: the tensor scale of each weight row this lane decodes (row
        // `warp_n0 + 8·ni + lane/4` of the block tile), read once.
        let mut ts_rows = [1f32; NI];
        if LAYOUT == BLayout::NkNvfp4 as u8 {
            for (ni, ts) in ts_rows.iter_mut().enumerate() {
                let row = n0 + warp_n0 + 8 * ni as u32 + laneid() / 4;
                // SAFETY: `e < num_experts` (not dropped); rows past N read nothing.
                *ts = unsafe { nv_row_tensor_scale(p, e, row, p.n_out) };
            }
        }
        if p.rank > 0 {
            // SAFETY: all threads; the LoRA region is the plan's own, and the copies join the
            // first stage's group, all waited for before the epilogue's barrier.
            unsafe {
                stage_lora_async::<BM, BN>(p, &plan, smem, &tile, e, n0, lora_right, tid, threads)
            };
        }
        let ktiles = p.k_red.div_ceil(BK);
        let mut s = 0;
        while s + 1 < STAGES {
            if s < ktiles {
                // SAFETY: all threads; stage `s` is free.
                unsafe {
                    load_stage::<BM, BN, BK, LAYOUT>(
                        p, &plan, smem, rows_in, s, s, e, n0, tid, threads,
                    )
                };
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
                unsafe {
                    load_stage::<BM, BN, BK, LAYOUT>(
                        p,
                        &plan,
                        smem,
                        rows_in,
                        next % STAGES,
                        next,
                        e,
                        n0,
                        tid,
                        threads,
                    )
                };
            }
            // SAFETY: no preconditions.
            unsafe { cp_async_commit_group() };
            let stage = kt % STAGES;
            let a_tile = smem.offset(stage * plan.a_stage_bytes);
            let b_tile = smem.offset(plan.b_offset + stage * plan.b_stage_bytes);
            if LAYOUT == BLayout::NkNvfp4 as u8 {
                let blocks16 = p.k_red / 16;
                let g0 = nk_nv_stage_g0::<BK>(p, e, n0, kt, blocks16);
                // 16-k blocks of this stage inside K.
                let valid16 = (p.k_red - kt * BK).div_ceil(16).min(BK / 16);
                // SAFETY: warp converged (uniform branch); the stage is in place.
                unsafe {
                    mma_stage_nk_nv::<BK, MI, NI>(
                        a_tile,
                        b_tile,
                        plan.b_scales_in_stage,
                        g0,
                        blocks16,
                        valid16,
                        warp_m0,
                        warp_n0,
                        &ts_rows,
                        &mut acc,
                    )
                };
            } else if LAYOUT == BLayout::NkMxfp4 as u8 {
                let blocks_k = p.k_red / 32;
                // Low two bits of the global scale index of row 0 of this tile.
                let g0 = nk_mx_stage_g0::<BK>(p, e, n0, kt, blocks_k);
                // 32-k blocks of this stage inside K (the last stage of a K that is not a
                // multiple of BK has fewer; the others' scale bytes belong to another row).
                let valid_blocks = (p.k_red - kt * BK).div_ceil(32).min(BK / 32);
                // SAFETY: warp converged (uniform branch); the stage is in place.
                unsafe {
                    mma_stage_nk_mx::<BK, MI, NI>(
                        a_tile,
                        b_tile,
                        plan.b_scales_in_stage,
                        g0,
                        blocks_k,
                        valid_blocks,
                        warp_m0,
                        warp_n0,
                        &mut acc,
                    )
                };
            } else {
                let b_tile = if LAYOUT == BLayout::KnNvfp4 as u8 {
                    let decoded = smem.offset(plan.decoded_offset);
                    // SAFETY: as for MXFP4 below.
                    unsafe {
                        let blocks16 = p.n_out / 16;
                        let g0 = kn_nv_stage_g0::<BK>(p, e, n0, kt, blocks16);
                        decode_stage_kn_nv::<BN, BK, false>(
                            b_tile,
                            decoded,
                            plan.b_scales_in_stage,
                            g0,
                            blocks16,
                            p.tensor_scales_addr != 0,
                            0,
                            BN / 16,
                            tid,
                            threads,
                        );
                        bar_sync_0();
                    }
                    decoded
                } else if LAYOUT == BLayout::KnMxfp4 as u8 {
                    let decoded = smem.offset(plan.decoded_offset);
                    // SAFETY: all threads: decode the raw stage (visible since the barrier above;
                    // the decoded tile was last read before that barrier), then make it visible.
                    unsafe {
                        let blocks_k = p.n_out / 32;
                        let g0 = kn_mx_stage_g0::<BK>(p, e, n0, kt, blocks_k);
                        decode_stage_kn_mx::<BN, BK, false>(
                            b_tile,
                            decoded,
                            plan.b_scales_in_stage,
                            g0,
                            blocks_k,
                            0,
                            BN / 16,
                            tid,
                            threads,
                            false,
                        );
                        bar_sync_0();
                    }
                    decoded
                } else {
                    b_tile
                };
                let kn =
                    LAYOUT == BLayout::KnBf16 as u8 || BLayout::from_tag(LAYOUT).has_decoded_tile();
                // SAFETY: warp converged; stage tiles in place.
                unsafe {
                    mma_stage_bf16::<BN, BK, MI, NI>(a_tile, b_tile, kn, warp_m0, warp_n0, &mut acc)
                };
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
            unsafe {
                lora_epilogue::<BM, BN, MI, NI>(
                    p, &plan, smem, &tile, e, n0, warp_m0, warp_n0, threads, lora_right, &mut acc,
                )
            };
        }
    }

    // Store: lane holds rows g, g+8 and columns 2t, 2t+1 of each 16×8 accumulator tile.
    // Every array index below is a loop variable of a fully unrolled constant-trip loop or a
    // literal, so the accumulators stay in registers.
    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    if p.bias_addr != 0 && !dropped {
        // The bias of this lane's column pair of each n8 block, added to every row.
        for ni in 0..NI {
            let col = n0 + warp_n0 + 8 * ni as u32 + 2 * t;
            // SAFETY: a bias is `[E, n_out]` bf16 (contract) and `e < E` (not dropped).
            let (b0, b1) = unsafe { (bias_at(p, e, col), bias_at(p, e, col + 1)) };
            for acc_m in acc.iter_mut() {
                acc_m[ni][0] += b0;
                acc_m[ni][1] += b1;
                acc_m[ni][2] += b0;
                acc_m[ni][3] += b1;
            }
        }
    }
    for (mi, acc_m) in acc.iter().enumerate() {
        let r0 = warp_m0 + 16 * mi as u32 + g;
        // SAFETY: `r0 + 8 < BM`.
        let (o0, o1) = unsafe {
            (
                ld_shared_u32(rows_out.offset(4 * r0)),
                ld_shared_u32(rows_out.offset(4 * (r0 + 8))),
            )
        };
        for (ni, a) in acc_m.iter().enumerate() {
            let col = n0 + warp_n0 + 8 * ni as u32 + 2 * t;
            if col < p.n_out {
                // SAFETY: `o0`/`o1` are valid output rows when not NO_ROW and `col + 1 < n_out`
                // (n_out is even).
                unsafe {
                    if o0 != NO_ROW {
                        let at = 2 * (o0 as u64 * p.out_stride + col as u64);
                        store_hi_lo(p, at, a[0], a[1]);
                    }
                    if o1 != NO_ROW {
                        let at = 2 * (o1 as u64 * p.out_stride + col as u64);
                        store_hi_lo(p, at, a[2], a[3]);
                    }
                }
            }
        }
    }
}

/// Stores the pair `(v0, v1)` rounded to bf16 at byte offset `at` of the output and, with
/// `out_lo_addr != 0`, the rounded remainders `v − round(v)` at the same offset of the low-part
/// output (so `hi + lo` carries about 16 mantissa bits of `v`).
///
/// # Safety
/// `at` (and `at + 4`) lies inside the output and, when given, the low-part output; 4-byte
/// aligned.
#[inline(always)]
unsafe fn store_hi_lo(p: &GemmParams, at: u64, v0: f32, v1: f32) {
    let hi = cvt_rn_bf16x2_f32(v0, v1);
    // SAFETY: the caller's contract.
    unsafe { store(p.out_addr + at, hi) };
    if p.out_lo_addr != 0 {
        let (h0, h1) = (
            bf16_bits_to_f32(hi as u16),
            bf16_bits_to_f32((hi >> 16) as u16),
        );
        // SAFETY: the caller's contract.
        unsafe { store(p.out_lo_addr + at, cvt_rn_bf16x2_f32(v0 - h0, v1 - h1)) };
    }
}

/// The frozen bias `bias[e·n_out + col]` as f32, or 0 for a column past `n_out` (an N tail).
///
/// # Safety
/// `p.bias_addr` holds `[E, n_out]` bf16 and `e < E`.
#[inline(always)]
pub(crate) unsafe fn bias_at(p: &GemmParams, e: u64, col: u32) -> f32 {
    if col < p.n_out {
        // SAFETY: `e < E` and `col < n_out`, inside the `[E, n_out]` bias (caller's contract).
        bf16_bits_to_f32(unsafe {
            load::<u16>(p.bias_addr + 2 * (e * p.n_out as u64 + col as u64))
        })
    } else {
        0.0
    }
}

/// Stages the LoRA factors of a block's epilogue (the caller publishes them with a barrier):
/// `left` = the tile's rows of the `[rows, r_pad]` factor as `[BM][r_pad]` at
/// `plan.lora_left_offset`, `right` = the expert's right factor `(n0 + n, j)` as `[BN][r_pad]` at
/// `plan.lora_right_offset` (both swizzled, zero padded). `tid_x() < threads` take part.
///
/// # Safety
/// All `threads` staging threads (thread ids `0..threads`); the two regions are not in use.
#[inline(always)]
pub(crate) unsafe fn stage_lora_factors<const BM: u32, const BN: u32>(
    p: &GemmParams,
    plan: &SmemPlan,
    smem: SharedAddr,
    tile: &crate::tile::schedule::Tile,
    e: u64,
    n0: u32,
    threads: u32,
) {
    let tid = tid_x();
    let r_pad = p.r_pad;
    let right = smem.offset(plan.lora_right_offset);
    let words = r_pad / 2;
    let lo = left_lo_used(p, plan);
    let mut part = 0;
    while part < 1 + lo as u32 {
        let (left, src) = if part == 0 {
            (smem.offset(plan.lora_left_offset), p.lora_left_addr)
        } else {
            (smem.offset(plan.lora_left_lo_offset), p.lora_left_lo_addr)
        };
        let mut c = tid;
        while c < BM * words {
            let row = c / words;
            let w = c % words;
            let pr = tile.begin + row;
            let v: u32 = if pr < tile.end {
                // SAFETY: row `pr < rows` of the `[rows, r_pad]` factor (either part).
                unsafe { load(src + 2 * (pr as u64 * r_pad as u64 + 2 * w as u64)) }
            } else {
                0
            };
            // SAFETY: inside the part's left region.
            unsafe { st_shared_u32(left.offset(swizzled_offset(row, 2 * w, r_pad)), v) };
            c += threads;
        }
        part += 1;
    }
    let right_e = p.lora_right_addr + 2 * e * p.lr_stride_e;
    let mut c = tid;
    while c < BN * r_pad {
        let n = c / r_pad;
        let j = c % r_pad;
        let v: u16 = if j < p.rank && n0 + n < p.n_out {
            // SAFETY: a valid element of the expert's right factor by the contract's strides.
            unsafe {
                load(right_e + 2 * ((n0 + n) as u64 * p.lr_stride_n + j as u64 * p.lr_stride_r))
            }
        } else {
            0
        };
        // SAFETY: inside the right region.
        unsafe { st_shared_u16(right.offset(swizzled_offset(n, j, r_pad)), v) };
        c += threads;
    }
}

/// `acc += s · (left_tile · right_eᵀ)` where `left` is the tile's rows of the `[rows, r_pad]`
/// LoRA factor and `right_e(n, j)` the expert's right factor, both in shared memory: copied by
/// [`stage_lora_async`] before the main loop, or (right factors without 16-byte runs) gathered
/// here.
///
/// # Safety
/// All threads of the block, after the main loop's copies are waited for and a barrier.
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
    lora_right: LoraRight,
    acc: &mut [[[f32; 4]; NI]; MI],
) {
    let r_pad = p.r_pad;
    let left = smem.offset(plan.lora_left_offset);
    let left_lo = smem.offset(plan.lora_left_lo_offset);
    let lo = left_lo_used(p, plan);
    let right = smem.offset(plan.lora_right_offset);
    if lora_right == LoraRight::Gather {
        // SAFETY: forwarded (all threads stage), then publish.
        unsafe {
            stage_lora_factors::<BM, BN>(p, plan, smem, tile, e, n0, threads);
            bar_sync_0();
        }
    }
    for mi in 0..MI {
        for nj in 0..NI / 2 {
            let mut t0 = [0f32; 4];
            let mut t1 = [0f32; 4];
            let mut kk = 0;
            while kk < r_pad {
                // SAFETY: warp converged; blocks inside the regions.
                let (a, b) = unsafe {
                    (
                        a_mk(left, warp_m0 + 16 * mi as u32, kk, r_pad),
                        if lora_right == LoraRight::Kn {
                            b_kn(right, warp_n0 + 16 * nj as u32, kk, BN)
                        } else {
                            b_nk(right, warp_n0 + 16 * nj as u32, kk, r_pad)
                        },
                    )
                };
                t0 = mma(a, [b[0], b[1]], t0);
                t1 = mma(a, [b[2], b[3]], t1);
                if lo {
                    // The low part of the left factor: the same right fragment, accumulated in
                    // f32 with the high part.
                    // SAFETY: as above, in the low part's region.
                    let a = unsafe { a_mk(left_lo, warp_m0 + 16 * mi as u32, kk, r_pad) };
                    t0 = mma(a, [b[0], b[1]], t0);
                    t1 = mma(a, [b[2], b[3]], t1);
                }
                kk += 16;
            }
            axpy4(&mut acc[mi][2 * nj], p.scaling, t0);
            axpy4(&mut acc[mi][2 * nj + 1], p.scaling, t1);
        }
    }
}

/// `acc += s · t` for one accumulator fragment (explicit indices keep it in registers).
#[inline(always)]
pub(crate) fn axpy4(acc: &mut [f32; 4], s: f32, t: [f32; 4]) {
    acc[0] += s * t[0];
    acc[1] += s * t[1];
    acc[2] += s * t[2];
    acc[3] += s * t[3];
}

/// One stage of MMAs with both operands as bf16 tiles: A `[BM][BK]`, B `[BN][BK]` (`kn == false`)
/// or `[BK][BN]` (`kn == true`).
///
/// # Safety
/// Warp converged; tiles in place and visible.
#[inline(always)]
unsafe fn mma_stage_bf16<const BN: u32, const BK: u32, const MI: usize, const NI: usize>(
    a_tile: SharedAddr,
    b_tile: SharedAddr,
    kn: bool,
    warp_m0: u32,
    warp_n0: u32,
    acc: &mut [[[f32; 4]; NI]; MI],
) {
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
            let b = unsafe {
                if kn {
                    b_kn(b_tile, nb, kk, BN)
                } else {
                    b_nk(b_tile, nb, kk, BK)
                }
            };
            for mi in 0..MI {
                acc[mi][2 * nj] = mma(a_fr[mi], [b[0], b[1]], acc[mi][2 * nj]);
                acc[mi][2 * nj + 1] = mma(a_fr[mi], [b[2], b[3]], acc[mi][2 * nj + 1]);
            }
        }
        kk += 16;
    }
}

/// The low bits of the global scale index of weight row `n0` of forward MXFP4 k-tile `kt` at
/// its first 32-k block (`blocks_k = k_red/32` scales per weight row; wrapping u32 arithmetic
/// keeps them exact).
#[inline(always)]
pub(crate) fn nk_mx_stage_g0<const BK: u32>(
    p: &GemmParams,
    e: u64,
    n0: u32,
    kt: u32,
    blocks_k: u32,
) -> u32 {
    ((e as u32).wrapping_mul(p.n_out).wrapping_add(n0))
        .wrapping_mul(blocks_k)
        .wrapping_add(kt * (BK / 32))
}

/// The low bits of the global scale index of reduction row `kt·BK` of dX MXFP4 k-tile `kt` at
/// output column `n0` (`blocks_k = n_out/32` scales per container row; wrapping u32 arithmetic
/// keeps them exact).
#[inline(always)]
pub(crate) fn kn_mx_stage_g0<const BK: u32>(
    p: &GemmParams,
    e: u64,
    n0: u32,
    kt: u32,
    blocks_k: u32,
) -> u32 {
    ((e as u32).wrapping_mul(p.k_red).wrapping_add(kt * BK))
        .wrapping_mul(blocks_k)
        .wrapping_add(n0 / 32)
}

/// The low bits of the global E4M3 index of weight row `n0` of forward NVFP4 k-tile `kt` at its
/// first 16-k block (`blocks16 = k_red/16` per weight row; wrapping u32 arithmetic keeps them
/// exact).
#[inline(always)]
pub(crate) fn nk_nv_stage_g0<const BK: u32>(
    p: &GemmParams,
    e: u64,
    n0: u32,
    kt: u32,
    blocks16: u32,
) -> u32 {
    ((e as u32).wrapping_mul(p.n_out).wrapping_add(n0))
        .wrapping_mul(blocks16)
        .wrapping_add(kt * (BK / 16))
}

/// The low bits of the global E4M3 index of reduction row `kt·BK` of dX NVFP4 k-tile `kt` at
/// output column `n0` (`blocks16 = n_out/16` per container row).
#[inline(always)]
pub(crate) fn kn_nv_stage_g0<const BK: u32>(
    p: &GemmParams,
    e: u64,
    n0: u32,
    kt: u32,
    blocks16: u32,
) -> u32 {
    ((e as u32).wrapping_mul(p.k_red).wrapping_add(kt * BK))
        .wrapping_mul(blocks16)
        .wrapping_add(n0 / 16)
}

/// The [`NvFold`] of an NVFP4 block: E4M3 byte `sc` times the row's tensor scale `ts` (the
/// block factor of `shared::nvfp4::block_factor`, the same f32 product).
#[inline(always)]
pub(crate) fn nv_block_fold(sc: u32, ts: f32) -> NvFold {
    nv_fold(ts * e4m3_to_f32_placed(sc as u8))
}

/// Decodes packed byte `byte_idx` (0..4) of `word` of an NVFP4 block into one bf16x2 register
/// (even k in the low half): the codes placed as for MXFP4 (`e2m1 · 2^-126`, exact), widened to
/// f32, multiplied by the block's fold (`shared::nvfp4::nv_scale_pair`) and rounded once by
/// `cvt.rn` — bit for bit the dequantizer's `bf16(e2m1 · f)`.
#[inline(always)]
pub(crate) fn decode_byte_nv(word: u32, byte_idx: u32, fold: NvFold) -> u32 {
    let (lo, hi) = nv_scale_pair(
        place_byte_scaled_down(prmt_b32(word, 0x4440 | byte_idx)),
        fold,
    );
    cvt_rn_bf16x2_f32(lo, hi)
}

/// One stage of MMAs with B decoded from NVFP4 bytes straight into fragments (forward): the
/// MXFP4 path's fragment mapping ([`mma_stage_nk_mx`]), with one E4M3 byte per 16-k half (a
/// whole NVFP4 block) read from the row's [`nv_scale_slot_bytes`] slot at `(g0 +
/// row·blocks16) % 4 + block`, times the row's tensor scale `ts[ni]`.
///
/// # Safety
/// Warp converged; the stage is in place and visible.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn mma_stage_nk_nv<const BK: u32, const MI: usize, const NI: usize>(
    a_tile: SharedAddr,
    b_tile: SharedAddr,
    scales_in_stage: u32,
    g0: u32,
    blocks16: u32,
    valid16: u32,
    warp_m0: u32,
    warp_n0: u32,
    ts: &[f32; NI],
    acc: &mut [[[f32; 4]; NI]; MI],
) {
    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    let slot = nv_scale_slot_bytes(BK);
    for q in 0..BK / 32 {
        let mut a_fr = [[[0u32; 4]; MI]; 2];
        for (h, a_h) in a_fr.iter_mut().enumerate() {
            for (mi, a) in a_h.iter_mut().enumerate() {
                // SAFETY: warp converged; inside the stage.
                *a = unsafe { a_mk(a_tile, warp_m0 + 16 * mi as u32, 32 * q + 16 * h as u32, BK) };
            }
        }
        for ni in 0..NI {
            let row = warp_n0 + 8 * ni as u32 + g;
            let first = g0.wrapping_add(row.wrapping_mul(blocks16)) & 3;
            // SAFETY: `row < BN`: its packed bytes are inside the stage.
            let w = unsafe { ld_shared_v4_u32(b_tile.offset(row * (BK / 2) + 16 * q)) };
            for h in 0..2u32 {
                let block = 2 * q + h;
                // SAFETY: the row's slot holds `first + BK/16` bytes.
                let sc = unsafe {
                    ld_shared_u8(b_tile.offset(scales_in_stage + slot * row + first + block))
                };
                // A block past K has zero codes but its slot byte belongs to another row: use
                // 1.0 so a NaN there cannot leak into the sum.
                let fold = if block < valid16 {
                    nv_block_fold(sc, ts[ni])
                } else {
                    nv_fold(1.0)
                };
                let b = [
                    decode_byte_nv(w[2 * h as usize], t, fold),
                    decode_byte_nv(w[2 * h as usize + 1], t, fold),
                ];
                for mi in 0..MI {
                    acc[mi][ni] = mma(a_fr[h as usize][mi], b, acc[mi][ni]);
                }
            }
        }
    }
}

/// Stores the 16 decoded bf16 values of item `c` of reduction row `r` (`lo`: columns 16c..16c+8,
/// `hi`: the next 8) into the decoded tile as two 16-byte chunks ([`decoded_offset`]).
///
/// # Safety
/// `decoded` is the decoded tile (`BK` rows of `BN` columns), `r < BK` and `16c + 16 ≤ BN`.
#[inline(always)]
unsafe fn store_decoded_item<const BN: u32, const BK: u32, const MN_PANELS: bool>(
    decoded: SharedAddr,
    r: u32,
    c: u32,
    lo: [u32; 4],
    hi: [u32; 4],
) {
    // SAFETY: both chunks lie inside the tile (the caller's bounds).
    unsafe {
        st_shared_v4_u32(
            decoded.offset(decoded_offset::<BN, BK, MN_PANELS>(r, 16 * c)),
            lo,
        );
        st_shared_v4_u32(
            decoded.offset(decoded_offset::<BN, BK, MN_PANELS>(r, 16 * c + 8)),
            hi,
        );
    }
}

/// Byte offset of decoded element (reduction row `r`, column `col`) in a dX decoded tile
/// `[BK][BN]`: one swizzled tile read by `ldmatrix.trans` (the `mma.sync` kernel), or with
/// `MN_PANELS` the 64-column panels a `wgmma` MN-major descriptor names
/// (`tiles::wgmma_mn_offset`, the `wgmma` kernel).
#[inline(always)]
pub(crate) const fn decoded_offset<const BN: u32, const BK: u32, const MN_PANELS: bool>(
    r: u32,
    col: u32,
) -> u32 {
    if MN_PANELS {
        wgmma_mn_offset(r, col, BK)
    } else {
        swizzled_offset(r, col, BN)
    }
}

/// Decodes a raw dX NVFP4 stage (`[BK][BN/2]` packed bytes and a [`kn_nv_window_bytes`] window
/// per row: its tensor scale, then its E4M3 words with the first needed byte at `(g0 +
/// r·blocks16) % 4`) into the bf16 tile `[BK][BN]` ([`decoded_offset`]). Each
/// item is 8 packed bytes: one NVFP4 block (16 consecutive k of one reduction row). Without
/// tensor scales (`has_ts` false) the factor is the E4M3 value.
///
/// Only the items (16-column groups) `c_first .. c_first + c_count` of every row are decoded;
/// `tid` is this thread's index among the `threads` decoding threads.
///
/// # Safety
/// All `threads` decoding threads; the raw stage is visible and those columns of the decoded
/// tile are not being read.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn decode_stage_kn_nv<const BN: u32, const BK: u32, const MN_PANELS: bool>(
    raw: SharedAddr,
    decoded: SharedAddr,
    scales_in_stage: u32,
    g0: u32,
    blocks16: u32,
    has_ts: bool,
    c_first: u32,
    c_count: u32,
    tid: u32,
    threads: u32,
) {
    let window = kn_nv_window_bytes(BN);
    let mut i = tid;
    while i < BK * c_count {
        let r = i / c_count;
        let c = c_first + i % c_count;
        // SAFETY: inside the raw stage: row r has BN/2 bytes, item c covers bytes 8c..8c+8; row
        // r's window (tensor scale, then E4M3 words) follows the packed bytes.
        let (w0, w1, sc, ts) = unsafe {
            let base = raw.offset(r * (BN / 2) + 8 * c);
            let win = raw.offset(scales_in_stage + window * r);
            let first = g0.wrapping_add(r.wrapping_mul(blocks16)) & 3;
            (
                ld_shared_u32(base),
                ld_shared_u32(base.offset(4)),
                ld_shared_u8(win.offset(4 + first + c)),
                if has_ts {
                    f32::from_bits(ld_shared_u32(win))
                } else {
                    1.0
                },
            )
        };
        let fold = nv_block_fold(sc, ts);
        let lo = [
            decode_byte_nv(w0, 0, fold),
            decode_byte_nv(w0, 1, fold),
            decode_byte_nv(w0, 2, fold),
            decode_byte_nv(w0, 3, fold),
        ];
        let hi = [
            decode_byte_nv(w1, 0, fold),
            decode_byte_nv(w1, 1, fold),
            decode_byte_nv(w1, 2, fold),
            decode_byte_nv(w1, 3, fold),
        ];
        // SAFETY: item c of row r: columns 16c..16c+16 of the decoded tile.
        unsafe { store_decoded_item::<BN, BK, MN_PANELS>(decoded, r, c, lo, hi) };
        i += threads;
    }
}

/// Decodes packed byte `byte_idx` (0..4) of `word` into one B fragment register (even k in the
/// low half), scaled: the codes are placed into bf16 bit fields (`e2m1 · 2^-126`, a few logic
/// operations) and multiplied by the folded scale (`shared::mxfp4::scale_fold`: one product for
/// scale bytes ≤ 128, two above). Every product is exact, so the result equals the bf16
/// dequantization bit for bit (NaN for a NaN scale).
#[inline(always)]
pub(crate) fn decode_byte(word: u32, byte_idx: u32, scale: ScaleFold) -> u32 {
    let placed = place_byte_scaled_down(prmt_b32(word, 0x4440 | byte_idx));
    let v = mul_rn_bf16x2(placed, scale.first);
    if scale.two_step {
        mul_rn_bf16x2(v, scale.second)
    } else {
        v
    }
}

/// [`decode_byte`] for a scale byte `b ≤ SINGLE_STEP_MAX` whose multiplier `m` is
/// `scale_single(b)`: one product, bit-equal to [`decode_byte`] with `scale_fold(b)`.
#[inline(always)]
fn decode_byte_single(word: u32, byte_idx: u32, m: u32) -> u32 {
    mul_rn_bf16x2(place_byte_scaled_down(prmt_b32(word, 0x4440 | byte_idx)), m)
}

/// The MMAs of one n8 block over one 32-k block (its two 16-k halves): B fragment registers
/// decoded by `dec` from the row's packed words `w` (words 2h and 2h + 1 for half h).
#[inline(always)]
fn mma_block_n8<const MI: usize, const NI: usize>(
    a_fr: &[[[u32; 4]; MI]; 2],
    w: &[u32; 4],
    ni: usize,
    acc: &mut [[[f32; 4]; NI]; MI],
    dec: impl Fn(u32) -> u32,
) {
    for h in 0..2 {
        let b = [dec(w[2 * h]), dec(w[2 * h + 1])];
        for mi in 0..MI {
            acc[mi][ni] = mma(a_fr[h][mi], b, acc[mi][ni]);
        }
    }
}

/// One stage of MMAs with B decoded from MXFP4 bytes straight into fragments (forward).
///
/// Stage layout: packed `[BN][BK/2]` bytes, then a scale slot per row
/// (`mx_scale_slot_bytes(BK)`) at `scales_in_stage` holding the row's scale bytes from offset
/// `(g0 + row·blocks_k) % 4` (one per 32-k block). For the n8 block of rows `nb..nb+8`, lane (g = lane/4,
/// t = lane%4) needs the pairs `k = 2t` (byte t) and `k = 2t+8` (byte 4+t) of each 16-k half:
/// bytes `t`, `4+t`, `8+t`, `12+t` of row `nb+g`, i.e. byte t of each word of that row.
///
/// # Safety
/// Warp converged; the stage is in place and visible.
#[inline(always)]
unsafe fn mma_stage_nk_mx<const BK: u32, const MI: usize, const NI: usize>(
    a_tile: SharedAddr,
    b_tile: SharedAddr,
    scales_in_stage: u32,
    g0: u32,
    blocks_k: u32,
    valid_blocks: u32,
    warp_m0: u32,
    warp_n0: u32,
    acc: &mut [[[f32; 4]; NI]; MI],
) {
    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    let slot = mx_scale_slot_bytes(BK);
    // One 32-k block (16 packed bytes per row, one scale) at a time, in k order.
    for q in 0..BK / 32 {
        let mut a_fr = [[[0u32; 4]; MI]; 2];
        for (h, a_h) in a_fr.iter_mut().enumerate() {
            for (mi, a) in a_h.iter_mut().enumerate() {
                // SAFETY: warp converged; inside the stage.
                *a = unsafe { a_mk(a_tile, warp_m0 + 16 * mi as u32, 32 * q + 16 * h as u32, BK) };
            }
        }
        // The packed words and scale bytes of this 32-k block for every n8 block first, so that
        // one warp vote can pick the single-product decode for all of them.
        let mut w = [[0u32; 4]; NI];
        let mut sc = [0u32; NI];
        let mut most = 0u32;
        for ni in 0..NI {
            let row = warp_n0 + 8 * ni as u32 + g;
            let byte = (g0.wrapping_add(row.wrapping_mul(blocks_k)) & 3) + q;
            // SAFETY: `row < BN`: its packed bytes and its scale slot are inside the stage.
            unsafe {
                w[ni] = ld_shared_v4_u32(b_tile.offset(row * (BK / 2) + 16 * q));
                sc[ni] = ld_shared_u8(b_tile.offset(scales_in_stage + slot * row + byte)) as u32;
            }
            most = if sc[ni] > most { sc[ni] } else { most };
        }
        // SAFETY: warp converged.
        if unsafe { vote_sync_all(most <= SINGLE_STEP_MAX) } {
            // Every byte is at most 128: one product each, and a block past K (zero codes) stays
            // zero whatever its borrowed slot byte is.
            for ni in 0..NI {
                let m = scale_single(sc[ni]);
                mma_block_n8(&a_fr, &w[ni], ni, acc, |x| decode_byte_single(x, t, m));
            }
        } else {
            for ni in 0..NI {
                // A block past K has zero codes but its slot byte belongs to another row: use
                // 1.0 so a NaN there cannot leak into the sum.
                let s2 = scale_fold(if q < valid_blocks { sc[ni] as u8 } else { 127 });
                mma_block_n8(&a_fr, &w[ni], ni, acc, |x| decode_byte(x, t, s2));
            }
        }
    }
}

/// Decodes a raw dX stage (`[BK][BN/2]` packed bytes, an 8-byte scale window per row whose
/// first needed byte sits at `(g0 + r·blocks_k) % 4`) into the bf16
/// tile `[BK][BN]` ([`decoded_offset`]). Each item is 8 packed bytes: 16
/// consecutive k of one reduction row, inside one scale block.
///
/// Only the items (16-column groups) `c_first .. c_first + c_count` of every row are decoded;
/// `tid` is this thread's index among the `threads` decoding threads.
///
/// With `one_product` (a constant at every call site) a warp whose items all have a scale
/// byte `≤ SINGLE_STEP_MAX` (one vote per item) decodes them with one product per register
/// ([`decode_byte_single`]); otherwise, and always without it, with the [`scale_fold`] pair.
/// Both give the same bits.
///
/// # Safety
/// All `threads` decoding threads, whole warps (`threads` and `BK·c_count` multiples of 32, so
/// the lanes of a warp run the same iterations, converged); the raw stage is visible and those
/// columns of the decoded tile are not being read.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn decode_stage_kn_mx<const BN: u32, const BK: u32, const MN_PANELS: bool>(
    raw: SharedAddr,
    decoded: SharedAddr,
    scales_in_stage: u32,
    g0: u32,
    blocks_k: u32,
    c_first: u32,
    c_count: u32,
    tid: u32,
    threads: u32,
    one_product: bool,
) {
    let mut i = tid;
    while i < BK * c_count {
        let r = i / c_count;
        let c = c_first + i % c_count;
        // SAFETY: inside the raw stage: row r has BN/2 bytes, item c covers bytes 8c..8c+8; the
        // scale byte of (r, block c/2) follows the packed bytes.
        let (w0, w1, sc) = unsafe {
            let base = raw.offset(r * (BN / 2) + 8 * c);
            let first = g0.wrapping_add(r.wrapping_mul(blocks_k)) & 3;
            (
                ld_shared_u32(base),
                ld_shared_u32(base.offset(4)),
                ld_shared_u8(raw.offset(scales_in_stage + 8 * r + first + c / 2)),
            )
        };
        // The item's two words, byte by byte, through `dec`.
        let item = |dec: &dyn Fn(u32, u32) -> u32| {
            (
                [dec(w0, 0), dec(w0, 1), dec(w0, 2), dec(w0, 3)],
                [dec(w1, 0), dec(w1, 1), dec(w1, 2), dec(w1, 3)],
            )
        };
        // SAFETY: warp converged (contract); evaluated only with `one_product`.
        let (lo, hi) = if one_product && unsafe { vote_sync_all(sc as u32 <= SINGLE_STEP_MAX) } {
            let m = scale_single(sc as u32);
            item(&|w, b| decode_byte_single(w, b, m))
        } else {
            let s2 = scale_fold(sc as u8);
            item(&|w, b| decode_byte(w, b, s2))
        };
        // SAFETY: item c of row r: columns 16c..16c+16 of the decoded tile.
        unsafe { store_decoded_item::<BN, BK, MN_PANELS>(decoded, r, c, lo, hi) };
        i += threads;
    }
}
