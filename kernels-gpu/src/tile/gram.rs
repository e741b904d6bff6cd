//! The grouped Gram product behind dA and dB (SPEC §10): for expert `e`, a `BW`-wide column slice
//! `w0..w0+BW` of `Σ_{p ∈ e} wide[row(p), :]ᵀ ⊗ narrow[p, :]`, reduced over the expert's rows in
//! `BK`-row stages. One block owns each output tile, so the result is deterministic (no atomics),
//! and experts without rows write zeros. Contract: `shared::params::GramParams`.

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::cp_async::{
    cp_async_cg_shared_global_16, cp_async_commit_group, cp_async_wait_group,
};
use crate::ptx::mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32 as mma;
use crate::ptx::smem::{SharedAddr, dynamic_smem};
use crate::ptx::sreg::{ctaid_x, laneid, tid_x, warp_id};
use crate::shared::bf16::f32_to_bf16_bits;
use crate::shared::params::GramParams;
use crate::shared::tiles::{GramConfig, gram_narrow_offset, swizzled_offset};
use crate::tile::frag::{a_km, b_kn};
use crate::tile::gemm::{copy_chunks, wait_for_stage};
use crate::tile::gmem::{load, store};

/// Stages rows `p0 .. p0+BK` (clipped at `end`) of both operands.
///
/// # Safety
/// All threads of the block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_stage<const BW: u32, const BK: u32, const RP: u32>(
    p: &GramParams,
    smem: SharedAddr,
    narrow_base: SharedAddr,
    stage: u32,
    p0: u32,
    end: u32,
    w0: u32,
    threads: u32,
) {
    let tid = tid_x();
    let wide_tile = smem.offset(stage * BK * BW * 2);
    let cpr = BW / 8;
    let mut c = tid;
    while c < BK * cpr {
        let r = c / cpr;
        let ch = c % cpr;
        let row = p0 + r;
        let wc = w0 + 8 * ch;
        let ok = row < end && wc < p.width;
        let src = if ok {
            // SAFETY: `row < rows`, inside `ssi`.
            let src_row = if p.wide_fan_out == 0 {
                row
            } else {
                (unsafe { load::<u32>(p.ssi_addr + 4 * row as u64) }) / p.wide_fan_out
            };
            p.wide_addr + 2 * (src_row as u64 * p.wide_stride + wc as u64)
        } else {
            p.wide_addr
        };
        // SAFETY: destination inside the stage; source read only when valid (width % 8 == 0).
        unsafe {
            cp_async_cg_shared_global_16(
                wide_tile.offset(swizzled_offset(r, 8 * ch, BW)),
                src,
                if ok { 16 } else { 0 },
            )
        };
        c += threads;
    }
    let narrow_tile = narrow_base.offset(stage * BK * RP * 2);
    // SAFETY: as above; the narrow operand is `[rows, RP]`.
    unsafe {
        copy_chunks!(BK, RP / 8, tid, threads, p.narrow_addr, |r, ch| {
            let row = p0 + r;
            let ok = row < end;
            let src = p.narrow_addr + 2 * (row as u64 * RP as u64 + 8 * ch as u64);
            (narrow_tile.offset(swizzled_offset(r, 8 * ch, RP)), ok, src)
        })
    };
}

/// The Gram body.
///
/// # Safety
/// Launch contract: `E · ceil(width/BW)` blocks, `32·WARPS` threads,
/// `gram_smem_bytes(cfg, RP)` bytes of dynamic shared memory; `r_pad == RP`; addresses and
/// strides valid for the experts, rows and columns they name; `width % 8 == 0`.
#[inline(always)]
pub unsafe fn gram<
    const BW: u32,
    const BK: u32,
    const WARPS: u32,
    const STAGES: u32,
    const RP: u32,
    const MI: usize,
    const NI: usize,
>(
    p: &GramParams,
) {
    const {
        assert!(BW % (16 * WARPS) == 0 && (BW / WARPS / 16) as usize == MI);
        assert!(RP % 16 == 0 && (RP / 8) as usize == NI);
        assert!(BK % 16 == 0);
    };
    let cfg = GramConfig {
        bw: BW,
        bk: BK,
        warps: WARPS,
        stages: STAGES,
    };
    let w_tiles = p.width.div_ceil(BW);
    let e = ctaid_x() / w_tiles;
    let w0 = (ctaid_x() % w_tiles) * BW;
    if e >= p.num_experts {
        return;
    }
    // SAFETY: `e < num_experts`.
    let (begin, end) = unsafe {
        (
            if e == 0 {
                0
            } else {
                load::<u32>(p.offsets_addr + 4 * (e as u64 - 1))
            },
            load::<u32>(p.offsets_addr + 4 * e as u64),
        )
    };
    let smem = dynamic_smem();
    let narrow = smem.offset(gram_narrow_offset(&cfg));
    let warp_m0 = warp_id() * (BW / WARPS);
    let mut acc = [[[0f32; 4]; NI]; MI];
    let steps = (end - begin).div_ceil(BK);
    let mut s = 0;
    while s + 1 < STAGES {
        if s < steps {
            // SAFETY: all threads; stage `s` free.
            unsafe {
                load_stage::<BW, BK, RP>(p, smem, narrow, s, begin + s * BK, end, w0, 32 * WARPS)
            };
        }
        // SAFETY: no preconditions.
        unsafe { cp_async_commit_group() };
        s += 1;
    }
    let mut it = 0;
    while it < steps {
        // SAFETY: uniform loop; see the GEMM pipeline.
        unsafe {
            wait_for_stage::<STAGES>();
            bar_sync_0();
        }
        let next = it + STAGES - 1;
        if next < steps {
            // SAFETY: the stage was last read in iteration it−1.
            unsafe {
                load_stage::<BW, BK, RP>(
                    p,
                    smem,
                    narrow,
                    next % STAGES,
                    begin + next * BK,
                    end,
                    w0,
                    32 * WARPS,
                )
            };
        }
        // SAFETY: no preconditions.
        unsafe { cp_async_commit_group() };
        let stage = it % STAGES;
        let wide_tile = smem.offset(stage * BK * BW * 2);
        let narrow_tile = narrow.offset(stage * BK * RP * 2);
        let mut kk = 0;
        while kk < BK {
            let mut a_fr = [[0u32; 4]; MI];
            for (mi, a) in a_fr.iter_mut().enumerate() {
                // SAFETY: warp converged; inside the stage.
                *a = unsafe { a_km(wide_tile, warp_m0 + 16 * mi as u32, kk, BW) };
            }
            for nj in 0..NI / 2 {
                // SAFETY: warp converged; inside the stage.
                let b = unsafe { b_kn(narrow_tile, 16 * nj as u32, kk, RP) };
                for mi in 0..MI {
                    acc[mi][2 * nj] = mma(a_fr[mi], [b[0], b[1]], acc[mi][2 * nj]);
                    acc[mi][2 * nj + 1] = mma(a_fr[mi], [b[2], b[3]], acc[mi][2 * nj + 1]);
                }
            }
            kk += 16;
        }
        it += 1;
    }
    // SAFETY: drain trailing (empty) groups.
    unsafe { cp_async_wait_group::<0>() };

    let lane = laneid();
    let g = lane / 4;
    let t = lane % 4;
    let out_e = p.out_addr + 2 * e as u64 * p.out_stride_e;
    let put = |w: u32, j: u32, v: f32| {
        if w < p.width && j < p.rank {
            // SAFETY: `w < width`, `j < rank`: a valid output element.
            unsafe {
                store(
                    out_e + 2 * (w as u64 * p.out_stride_w + j as u64 * p.out_stride_r),
                    f32_to_bf16_bits(p.scaling * v),
                )
            };
        }
    };
    for (mi, acc_m) in acc.iter().enumerate() {
        let w = w0 + warp_m0 + 16 * mi as u32 + g;
        for (ni, a) in acc_m.iter().enumerate() {
            let j = 8 * ni as u32 + 2 * t;
            put(w, j, a[0]);
            put(w, j + 1, a[1]);
            put(w + 8, j, a[2]);
            put(w + 8, j + 1, a[3]);
        }
    }
}
