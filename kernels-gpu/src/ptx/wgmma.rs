//! Warpgroup-level asynchronous tensor-core MMA (PTX ISA §9.7.15 "Asynchronous Warpgroup Level
//! Matrix Multiply-Accumulate Instructions"), PTX 8.0+, **sm_90a** only, and the proxy fence that
//! makes generic-proxy shared-memory writes (`cp.async`, `st.shared`) visible to them.
//! CuTe: `SM90_64xNx16_F32BF16BF16_RS`.
//!
//! A warpgroup is four consecutive warps (warp ids 4w..4w+3); all 128 threads execute every
//! instruction here converged. Protocol per batch: write the A fragments, [`wgmma_fence`], issue
//! one or more `wgmma_*`, [`wgmma_commit_group`], and [`wgmma_wait_group`] before the
//! accumulators or the A registers are touched by anything else, or before the shared memory the
//! B descriptors name is overwritten.

use core::arch::asm;

/// `fence.proxy.async.shared::cta`: orders this thread's earlier generic-proxy shared-memory
/// writes (including completed `cp.async` copies) before later async-proxy reads (`wgmma`
/// operands) once a barrier publishes them. PTX 8.0+, SM 9.0+.
///
/// # Safety
/// None beyond being device code; marked unsafe as a memory-ordering primitive.
#[inline(always)]
pub unsafe fn fence_proxy_async_shared_cta() {
    // SAFETY: a fence; the default asm memory effects keep accesses from moving across it.
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// `wgmma.fence.sync.aligned`: orders earlier register writes (A fragments, accumulators) before
/// the following `wgmma.mma_async`. PTX 8.0+, sm_90a.
///
/// # Safety
/// All threads of the warpgroup, converged.
#[inline(always)]
pub unsafe fn wgmma_fence() {
    // SAFETY: the caller guarantees warpgroup convergence.
    unsafe { asm!("wgmma.fence.sync.aligned;", options(nostack)) };
}

/// `wgmma.commit_group.sync.aligned`: closes the batch of `wgmma.mma_async` issued since the last
/// commit into one wgmma-group. PTX 8.0+, sm_90a.
///
/// # Safety
/// All threads of the warpgroup, converged.
#[inline(always)]
pub unsafe fn wgmma_commit_group() {
    // SAFETY: the caller guarantees warpgroup convergence.
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack)) };
}

/// `wgmma.wait_group.sync.aligned N`: waits until at most `N` wgmma-groups are pending; then
/// their accumulators and A registers may be read or reused and their shared operands
/// overwritten. PTX 8.0+, sm_90a.
///
/// # Safety
/// All threads of the warpgroup, converged.
#[inline(always)]
pub unsafe fn wgmma_wait_group<const N: u32>() {
    // SAFETY: the caller guarantees warpgroup convergence.
    unsafe { asm!("wgmma.wait_group.sync.aligned {n};", n = const N, options(nostack)) };
}

/// `wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16` with A from registers:
/// `acc += A·B` for a 64×16 bf16 A (this warp's 16 rows as an `mma.m16n8k16` A fragment: warp
/// `w % 4` of the warpgroup owns rows `16·(w % 4)..+16`) and a 16×16 bf16 B in shared memory named by
/// `desc_b` (K-major, see `shared::tiles::wgmma_desc_sw128`). `acc[j]` holds this lane's D
/// entries of columns `8j..8j+8` in the `mma.m16n8` C layout (rows g, g+8; columns 2t, 2t+1).
/// `accumulate != 0` adds to `acc` (scale-d true), 0 overwrites it; A and B are not negated, B
/// is not transposed. Pass `accumulate` from a register defined before [`wgmma_fence`]: ptxas
/// serializes wgmma groups whose inputs are defined inside the group, and a literal would be
/// materialized right at the instruction.
///
/// # Safety
/// All threads of the warpgroup, converged, between [`wgmma_fence`] and [`wgmma_commit_group`];
/// `desc_b` names 16×16 bf16 of visible shared memory that stays unchanged until the
/// wait. The asynchronous read of `a` and `acc` is the caller's protocol (module docs).
#[inline(always)]
pub unsafe fn wgmma_m64n16k16_f32_bf16_rs(
    acc: &mut [[f32; 4]; 2],
    a: [u32; 4],
    desc_b: u64,
    accumulate: u32,
) {
    // SAFETY: the caller guarantees convergence, the descriptor and the wait protocol.
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.b32 p, {acc_flag}, 0; wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {{{d0}, {d1}, {d2}, {d3}, {d4}, {d5}, {d6}, {d7}}}, {{{a0}, {a1}, {a2}, {a3}}}, {desc}, p, 1, 1, 0; }}",
            d0 = inout(reg32) acc[0][0],
            d1 = inout(reg32) acc[0][1],
            d2 = inout(reg32) acc[0][2],
            d3 = inout(reg32) acc[0][3],
            d4 = inout(reg32) acc[1][0],
            d5 = inout(reg32) acc[1][1],
            d6 = inout(reg32) acc[1][2],
            d7 = inout(reg32) acc[1][3],
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            desc = in(reg64) desc_b,
            acc_flag = in(reg32) accumulate,
            options(nostack))
    };
}

/// `wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16` with A from registers:
/// `acc += A·B` for a 64×16 bf16 A (this warp's 16 rows as an `mma.m16n8k16` A fragment: warp
/// `w % 4` of the warpgroup owns rows `16·(w % 4)..+16`) and a 16×32 bf16 B in shared memory named by
/// `desc_b` (K-major, see `shared::tiles::wgmma_desc_sw128`). `acc[j]` holds this lane's D
/// entries of columns `8j..8j+8` in the `mma.m16n8` C layout (rows g, g+8; columns 2t, 2t+1).
/// `accumulate != 0` adds to `acc` (scale-d true), 0 overwrites it; A and B are not negated, B
/// is not transposed. Pass `accumulate` from a register defined before [`wgmma_fence`]: ptxas
/// serializes wgmma groups whose inputs are defined inside the group, and a literal would be
/// materialized right at the instruction.
///
/// # Safety
/// All threads of the warpgroup, converged, between [`wgmma_fence`] and [`wgmma_commit_group`];
/// `desc_b` names 32×16 bf16 of visible shared memory that stays unchanged until the
/// wait. The asynchronous read of `a` and `acc` is the caller's protocol (module docs).
#[inline(always)]
pub unsafe fn wgmma_m64n32k16_f32_bf16_rs(
    acc: &mut [[f32; 4]; 4],
    a: [u32; 4],
    desc_b: u64,
    accumulate: u32,
) {
    // SAFETY: the caller guarantees convergence, the descriptor and the wait protocol.
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.b32 p, {acc_flag}, 0; wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {{{d0}, {d1}, {d2}, {d3}, {d4}, {d5}, {d6}, {d7}, {d8}, {d9}, {d10}, {d11}, {d12}, {d13}, {d14}, {d15}}}, {{{a0}, {a1}, {a2}, {a3}}}, {desc}, p, 1, 1, 0; }}",
            d0 = inout(reg32) acc[0][0],
            d1 = inout(reg32) acc[0][1],
            d2 = inout(reg32) acc[0][2],
            d3 = inout(reg32) acc[0][3],
            d4 = inout(reg32) acc[1][0],
            d5 = inout(reg32) acc[1][1],
            d6 = inout(reg32) acc[1][2],
            d7 = inout(reg32) acc[1][3],
            d8 = inout(reg32) acc[2][0],
            d9 = inout(reg32) acc[2][1],
            d10 = inout(reg32) acc[2][2],
            d11 = inout(reg32) acc[2][3],
            d12 = inout(reg32) acc[3][0],
            d13 = inout(reg32) acc[3][1],
            d14 = inout(reg32) acc[3][2],
            d15 = inout(reg32) acc[3][3],
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            desc = in(reg64) desc_b,
            acc_flag = in(reg32) accumulate,
            options(nostack))
    };
}

/// `wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16` with A from registers:
/// `acc += A·B` for a 64×16 bf16 A (this warp's 16 rows as an `mma.m16n8k16` A fragment: warp
/// `w % 4` of the warpgroup owns rows `16·(w % 4)..+16`) and a 16×64 bf16 B in shared memory named by
/// `desc_b` (K-major, see `shared::tiles::wgmma_desc_sw128`). `acc[j]` holds this lane's D
/// entries of columns `8j..8j+8` in the `mma.m16n8` C layout (rows g, g+8; columns 2t, 2t+1).
/// `accumulate != 0` adds to `acc` (scale-d true), 0 overwrites it; A and B are not negated, B
/// is not transposed. Pass `accumulate` from a register defined before [`wgmma_fence`]: ptxas
/// serializes wgmma groups whose inputs are defined inside the group, and a literal would be
/// materialized right at the instruction.
///
/// # Safety
/// All threads of the warpgroup, converged, between [`wgmma_fence`] and [`wgmma_commit_group`];
/// `desc_b` names 64×16 bf16 of visible shared memory that stays unchanged until the
/// wait. The asynchronous read of `a` and `acc` is the caller's protocol (module docs).
#[inline(always)]
pub unsafe fn wgmma_m64n64k16_f32_bf16_rs(
    acc: &mut [[f32; 4]; 8],
    a: [u32; 4],
    desc_b: u64,
    accumulate: u32,
) {
    // SAFETY: the caller guarantees convergence, the descriptor and the wait protocol.
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.b32 p, {acc_flag}, 0; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {{{d0}, {d1}, {d2}, {d3}, {d4}, {d5}, {d6}, {d7}, {d8}, {d9}, {d10}, {d11}, {d12}, {d13}, {d14}, {d15}, {d16}, {d17}, {d18}, {d19}, {d20}, {d21}, {d22}, {d23}, {d24}, {d25}, {d26}, {d27}, {d28}, {d29}, {d30}, {d31}}}, {{{a0}, {a1}, {a2}, {a3}}}, {desc}, p, 1, 1, 0; }}",
            d0 = inout(reg32) acc[0][0],
            d1 = inout(reg32) acc[0][1],
            d2 = inout(reg32) acc[0][2],
            d3 = inout(reg32) acc[0][3],
            d4 = inout(reg32) acc[1][0],
            d5 = inout(reg32) acc[1][1],
            d6 = inout(reg32) acc[1][2],
            d7 = inout(reg32) acc[1][3],
            d8 = inout(reg32) acc[2][0],
            d9 = inout(reg32) acc[2][1],
            d10 = inout(reg32) acc[2][2],
            d11 = inout(reg32) acc[2][3],
            d12 = inout(reg32) acc[3][0],
            d13 = inout(reg32) acc[3][1],
            d14 = inout(reg32) acc[3][2],
            d15 = inout(reg32) acc[3][3],
            d16 = inout(reg32) acc[4][0],
            d17 = inout(reg32) acc[4][1],
            d18 = inout(reg32) acc[4][2],
            d19 = inout(reg32) acc[4][3],
            d20 = inout(reg32) acc[5][0],
            d21 = inout(reg32) acc[5][1],
            d22 = inout(reg32) acc[5][2],
            d23 = inout(reg32) acc[5][3],
            d24 = inout(reg32) acc[6][0],
            d25 = inout(reg32) acc[6][1],
            d26 = inout(reg32) acc[6][2],
            d27 = inout(reg32) acc[6][3],
            d28 = inout(reg32) acc[7][0],
            d29 = inout(reg32) acc[7][1],
            d30 = inout(reg32) acc[7][2],
            d31 = inout(reg32) acc[7][3],
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            desc = in(reg64) desc_b,
            acc_flag = in(reg32) accumulate,
            options(nostack))
    };
}

/// `wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16` with A from registers:
/// `acc += A·B` for a 64×16 bf16 A (this warp's 16 rows as an `mma.m16n8k16` A fragment: warp
/// `w % 4` of the warpgroup owns rows `16·(w % 4)..+16`) and a 16×128 bf16 B in shared memory named by
/// `desc_b` (K-major, see `shared::tiles::wgmma_desc_sw128`). `acc[j]` holds this lane's D
/// entries of columns `8j..8j+8` in the `mma.m16n8` C layout (rows g, g+8; columns 2t, 2t+1).
/// `accumulate != 0` adds to `acc` (scale-d true), 0 overwrites it; A and B are not negated, B
/// is not transposed. Pass `accumulate` from a register defined before [`wgmma_fence`]: ptxas
/// serializes wgmma groups whose inputs are defined inside the group, and a literal would be
/// materialized right at the instruction.
///
/// # Safety
/// All threads of the warpgroup, converged, between [`wgmma_fence`] and [`wgmma_commit_group`];
/// `desc_b` names 128×16 bf16 of visible shared memory that stays unchanged until the
/// wait. The asynchronous read of `a` and `acc` is the caller's protocol (module docs).
#[inline(always)]
pub unsafe fn wgmma_m64n128k16_f32_bf16_rs(
    acc: &mut [[f32; 4]; 16],
    a: [u32; 4],
    desc_b: u64,
    accumulate: u32,
) {
    // SAFETY: the caller guarantees convergence, the descriptor and the wait protocol.
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.b32 p, {acc_flag}, 0; wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {{{d0}, {d1}, {d2}, {d3}, {d4}, {d5}, {d6}, {d7}, {d8}, {d9}, {d10}, {d11}, {d12}, {d13}, {d14}, {d15}, {d16}, {d17}, {d18}, {d19}, {d20}, {d21}, {d22}, {d23}, {d24}, {d25}, {d26}, {d27}, {d28}, {d29}, {d30}, {d31}, {d32}, {d33}, {d34}, {d35}, {d36}, {d37}, {d38}, {d39}, {d40}, {d41}, {d42}, {d43}, {d44}, {d45}, {d46}, {d47}, {d48}, {d49}, {d50}, {d51}, {d52}, {d53}, {d54}, {d55}, {d56}, {d57}, {d58}, {d59}, {d60}, {d61}, {d62}, {d63}}}, {{{a0}, {a1}, {a2}, {a3}}}, {desc}, p, 1, 1, 0; }}",
            d0 = inout(reg32) acc[0][0],
            d1 = inout(reg32) acc[0][1],
            d2 = inout(reg32) acc[0][2],
            d3 = inout(reg32) acc[0][3],
            d4 = inout(reg32) acc[1][0],
            d5 = inout(reg32) acc[1][1],
            d6 = inout(reg32) acc[1][2],
            d7 = inout(reg32) acc[1][3],
            d8 = inout(reg32) acc[2][0],
            d9 = inout(reg32) acc[2][1],
            d10 = inout(reg32) acc[2][2],
            d11 = inout(reg32) acc[2][3],
            d12 = inout(reg32) acc[3][0],
            d13 = inout(reg32) acc[3][1],
            d14 = inout(reg32) acc[3][2],
            d15 = inout(reg32) acc[3][3],
            d16 = inout(reg32) acc[4][0],
            d17 = inout(reg32) acc[4][1],
            d18 = inout(reg32) acc[4][2],
            d19 = inout(reg32) acc[4][3],
            d20 = inout(reg32) acc[5][0],
            d21 = inout(reg32) acc[5][1],
            d22 = inout(reg32) acc[5][2],
            d23 = inout(reg32) acc[5][3],
            d24 = inout(reg32) acc[6][0],
            d25 = inout(reg32) acc[6][1],
            d26 = inout(reg32) acc[6][2],
            d27 = inout(reg32) acc[6][3],
            d28 = inout(reg32) acc[7][0],
            d29 = inout(reg32) acc[7][1],
            d30 = inout(reg32) acc[7][2],
            d31 = inout(reg32) acc[7][3],
            d32 = inout(reg32) acc[8][0],
            d33 = inout(reg32) acc[8][1],
            d34 = inout(reg32) acc[8][2],
            d35 = inout(reg32) acc[8][3],
            d36 = inout(reg32) acc[9][0],
            d37 = inout(reg32) acc[9][1],
            d38 = inout(reg32) acc[9][2],
            d39 = inout(reg32) acc[9][3],
            d40 = inout(reg32) acc[10][0],
            d41 = inout(reg32) acc[10][1],
            d42 = inout(reg32) acc[10][2],
            d43 = inout(reg32) acc[10][3],
            d44 = inout(reg32) acc[11][0],
            d45 = inout(reg32) acc[11][1],
            d46 = inout(reg32) acc[11][2],
            d47 = inout(reg32) acc[11][3],
            d48 = inout(reg32) acc[12][0],
            d49 = inout(reg32) acc[12][1],
            d50 = inout(reg32) acc[12][2],
            d51 = inout(reg32) acc[12][3],
            d52 = inout(reg32) acc[13][0],
            d53 = inout(reg32) acc[13][1],
            d54 = inout(reg32) acc[13][2],
            d55 = inout(reg32) acc[13][3],
            d56 = inout(reg32) acc[14][0],
            d57 = inout(reg32) acc[14][1],
            d58 = inout(reg32) acc[14][2],
            d59 = inout(reg32) acc[14][3],
            d60 = inout(reg32) acc[15][0],
            d61 = inout(reg32) acc[15][1],
            d62 = inout(reg32) acc[15][2],
            d63 = inout(reg32) acc[15][3],
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            desc = in(reg64) desc_b,
            acc_flag = in(reg32) accumulate,
            options(nostack))
    };
}
