//! Probe kernels: each exercises one family of `ptx/` wrappers so the host can check fragment
//! layouts and addressing against a CPU computation before they hide inside a fused kernel.

use crate::ptx::barrier::bar_sync_0;
use crate::ptx::cp_async::{
    cp_async_cg_shared_global_16, cp_async_commit_group, cp_async_wait_group,
};
use crate::ptx::cvt::{cvt_rn_bf16x2_f32, mul_rn_bf16x2};
use crate::ptx::ldmatrix::{
    ldmatrix_x2_m8n8_shared_b16, ldmatrix_x2_trans_m8n8_shared_b16, ldmatrix_x4_m8n8_shared_b16,
    ldmatrix_x4_trans_m8n8_shared_b16,
};
use crate::ptx::mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32;
use crate::ptx::smem::{SharedAddr, dynamic_smem, ld_shared_u32, ld_shared_v4_u32, st_shared_u32};
use crate::ptx::sreg::{ctaid_x, laneid, ntid_x, tid_x, warp_id};
use crate::shared::params::ProbeParams;
use crate::tile::gmem::{load, store, store_16};

/// Writes `[tid.x, ctaid.x, laneid, warp id]` as four u32 per global thread, for
/// `count` threads.
///
/// # Safety
/// Launch contract: 1-D grid and block; `out_addr` holds `4·count` u32; no shared memory.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_probe_sreg(p: ProbeParams) {
    let g = ctaid_x() * ntid_x() + tid_x();
    if g < p.count {
        let base = p.out_addr + 16 * g as u64;
        // SAFETY: `g < count` and the output holds 4·count u32 (launch contract).
        unsafe { store_16(base, [tid_x(), ctaid_x(), laneid(), warp_id()]) };
    }
}

/// One warp copies 512 bytes global → shared with 16-byte `cp.async` (the first `count` bytes
/// from `in`, the rest zero-filled by a short `src_size`), then shared → `out`.
///
/// # Safety
/// Launch contract: 1 block of 32 threads; 512 bytes of dynamic shared memory; `in_addr` holds
/// `count ≤ 512` bytes, 16-byte aligned; `out_addr` holds 512 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_probe_cp_async(p: ProbeParams) {
    let lane = laneid();
    let smem = dynamic_smem();
    let off = 16 * lane;
    let valid = p.count.saturating_sub(off).min(16);
    // SAFETY: smem has 512 bytes (launch contract), `off < 512` and 16-aligned; the source is
    // read only for `valid` bytes, which lie inside `in`.
    unsafe {
        cp_async_cg_shared_global_16(smem.offset(off), p.in_addr + off as u64, valid);
        cp_async_commit_group();
        cp_async_wait_group::<0>();
        bar_sync_0();
        let v = ld_shared_v4_u32(smem.offset(off));
        store_16(p.out_addr + off as u64, v);
    }
}

/// Row-major 8×8-tile addressing helpers for the MMA probe: byte address of element `(row, col)`
/// of a b16 matrix with `row_bytes` per row.
#[inline(always)]
fn at(base: SharedAddr, row: u32, col: u32, row_bytes: u32) -> SharedAddr {
    base.offset(row * row_bytes + 2 * col)
}

/// One m16n8k16 bf16 MMA computed twice from the same inputs, with fragments loaded by all four
/// ldmatrix forms:
/// - `D0 = A·B` with A from `[16][16]` row-major (`ldmatrix.x4`) and B from `[N=8][K=16]`
///   (`ldmatrix.x2`);
/// - `D1 = A·B` with A from its transpose `[K][M]` (`ldmatrix.x4.trans`) and B from `[K][N]`
///   (`ldmatrix.x2.trans`).
///
/// Input: A `[16][16]` bf16 row-major, then B `[16][8]` bf16 row-major (`[K][N]`), 384 values.
/// Output: D0 then D1, each `[16][8]` f32 row-major.
///
/// # Safety
/// Launch contract: 1 block of 32 threads; 2048 bytes of dynamic shared memory; `in_addr` holds
/// 384 bf16 (4-byte aligned); `out_addr` holds 256 f32.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_probe_mma(p: ProbeParams) {
    let lane = laneid();
    let smem = dynamic_smem();
    // Layout: A_mk [16][16] @0, A_km [16][16] @512, B_kn [16][8] @1024, B_nk [8][16] @1280.
    let a_mk = smem;
    let a_km = smem.offset(512);
    let b_kn = smem.offset(1024);
    let b_nk = smem.offset(1280);
    // Stage the inputs element pairs by thread, writing both layouts of each operand.
    let mut i = lane;
    while i < 128 {
        // A pair (row m, cols 2c, 2c+1).
        let m = i / 8;
        let c = 2 * (i % 8);
        // SAFETY: `in` holds 384 bf16; pair indices stay below 256 for A.
        let w: u32 = unsafe { load(p.in_addr + 4 * i as u64) };
        // SAFETY: all shared offsets stay inside the 2048-byte region.
        unsafe {
            st_shared_u32(at(a_mk, m, c, 32), w);
            st_shared_u16(at(a_km, c, m, 32), w & 0xFFFF);
            st_shared_u16(at(a_km, c + 1, m, 32), w >> 16);
        }
        i += 32;
    }
    let mut i = lane;
    while i < 64 {
        // B pair (row k, cols 2c, 2c+1) of [K][N].
        let k = i / 4;
        let c = 2 * (i % 4);
        // SAFETY: B starts at bf16 index 256; pair index < 64 stays inside.
        let w: u32 = unsafe { load(p.in_addr + 512 + 4 * i as u64) };
        // SAFETY: shared offsets inside the region.
        unsafe {
            st_shared_u32(at(b_kn, k, c, 16), w);
            st_shared_u16(at(b_nk, c, k, 32), w & 0xFFFF);
            st_shared_u16(at(b_nk, c + 1, k, 32), w >> 16);
        }
        i += 32;
    }
    // SAFETY: all 32 threads of the single block reach the barrier.
    unsafe { bar_sync_0() };

    let r8 = lane % 8;
    let hi8 = (lane / 8) % 2;
    let hi16 = lane / 16;
    // SAFETY: whole warp converged; every lane's row address is 16-byte aligned in the region.
    let (a0, b0, a1, b1) = unsafe {
        (
            ldmatrix_x4_m8n8_shared_b16(at(a_mk, r8 + 8 * hi8, 8 * hi16, 32)),
            ldmatrix_x2_m8n8_shared_b16(at(b_nk, r8, 8 * hi8, 32)),
            ldmatrix_x4_trans_m8n8_shared_b16(at(a_km, r8 + 8 * hi16, 8 * hi8, 32)),
            ldmatrix_x2_trans_m8n8_shared_b16(at(b_kn, r8 + 8 * hi8, 0, 16)),
        )
    };
    let d0 = mma_m16n8k16_row_col_f32_bf16_bf16_f32(a0, b0, [0.0; 4]);
    let d1 = mma_m16n8k16_row_col_f32_bf16_bf16_f32(a1, b1, [0.0; 4]);
    let g = lane / 4;
    let t = lane % 4;
    for (which, d) in [d0, d1].iter().enumerate() {
        let base = p.out_addr + 512 * which as u64;
        let e = |row: u32, col: u32| base + 4 * (row * 8 + col) as u64;
        // SAFETY: rows < 16, cols < 8: inside the 256-f32 output.
        unsafe {
            store(e(g, 2 * t), d[0]);
            store(e(g, 2 * t + 1), d[1]);
            store(e(g + 8, 2 * t), d[2]);
            store(e(g + 8, 2 * t + 1), d[3]);
        }
    }
    // Keep the u32 shared load wrapper exercised by this probe as well.
    // SAFETY: offset 0 is inside the region.
    let first = unsafe { ld_shared_u32(a_mk) };
    if lane == 0 && first == 0xFFFF_FFFF {
        // Unreachable for finite inputs; prevents the load from being optimized away.
        // SAFETY: `out` holds 256 f32.
        unsafe { store(p.out_addr, f32::NAN) };
    }
}

/// Stores the low 16 bits of `v` (the probe's transposed staging writes single elements).
///
/// # Safety
/// `a` is 2-byte aligned inside the block's shared memory.
#[inline(always)]
unsafe fn st_shared_u16(a: SharedAddr, v: u32) {
    // SAFETY: forwarded precondition.
    unsafe { crate::ptx::smem::st_shared_u16(a, v as u16) };
}

/// For `i < count`: `out[2i] = cvt.rn.bf16x2(in[2i], in[2i+1])` (in[2i] in the low half) and
/// `out[2i+1] = mul.rn.bf16x2(out[2i], out[2i])`.
///
/// # Safety
/// Launch contract: 1-D grid and block; `in_addr` holds `2·count` f32, `out_addr` `2·count` u32.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mxmoe_probe_cvt(p: ProbeParams) {
    let i = ctaid_x() * ntid_x() + tid_x();
    if i < p.count {
        let base = 8 * i as u64;
        // SAFETY: `i < count`, buffers sized by the launch contract.
        unsafe {
            let lo: f32 = load(p.in_addr + base);
            let hi: f32 = load(p.in_addr + base + 4);
            let packed = cvt_rn_bf16x2_f32(lo, hi);
            store(p.out_addr + base, packed);
            store(p.out_addr + base + 4, mul_rn_bf16x2(packed, packed));
        }
    }
}
