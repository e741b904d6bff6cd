//! Warpgroup-level asynchronous tensor-core MMA (PTX ISA §9.7.15 "Asynchronous Warpgroup Level
//! Matrix Multiply-Accumulate Instructions"), PTX 8.0+, **sm_90a** only, and the proxy fence that
//! makes generic-proxy shared-memory writes (`cp.async`, `st.shared`) visible to them.
//! CuTe: `SM90_64xNx16_F32BF16BF16_RS` and `_SS`.
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

/// Whether a `wgmma_*!` accumulator list names each of the `n / 8` groups once, in order.
const fn groups_in_order(groups: &[usize], n: usize) -> bool {
    if groups.len() != n / 8 {
        return false;
    }
    let mut i = 0;
    while i < groups.len() {
        if groups[i] != i {
            return false;
        }
        i += 1;
    }
    true
}

/// Defines `wgmma_m64n<N>k16_f32_bf16_rs` for one N: `acc` holds `N/8` groups of four f32
/// accumulators, listed as `[0 1 … N/8-1]`. The asm template is one literal built by `concat!`
/// (`{}` per accumulator register, in `acc` order, then the A registers, the B descriptor and the
/// scale-d flag), so every N emits the same instruction text up to its shape and register count.
macro_rules! wgmma_rs {
    ($name:ident, $n:literal, [$j0:literal $($j:literal)*]) => {
        #[doc = concat!(
            "`wgmma.mma_async.sync.aligned.m64n", stringify!($n), "k16.f32.bf16.bf16` with A from \
            registers: `acc += A·B` for a 64×16 bf16 A (this warp's 16 rows as an \
            `mma.m16n8k16` A fragment: warp `w % 4` of the warpgroup owns rows `16·(w % 4)..+16`) \
            and a 16×", stringify!($n), " bf16 B in shared memory named by `desc_b` (K-major, see \
            `shared::tiles::wgmma_desc_sw128`). `acc[j]` holds this lane's D entries of columns \
            `8j..8j+8` in the `mma.m16n8` C layout (rows g, g+8; columns 2t, 2t+1). \
            `accumulate != 0` adds to `acc` (scale-d true), 0 overwrites it; A and B are not \
            negated, B is not transposed. Pass `accumulate` from a register defined before \
            [`wgmma_fence`]: ptxas serializes wgmma groups whose inputs are defined inside the \
            group, and a literal would be materialized right at the instruction.\n\n\
            # Safety\n\
            All threads of the warpgroup, converged, between [`wgmma_fence`] and \
            [`wgmma_commit_group`]; `desc_b` names ", stringify!($n), "×16 bf16 of visible shared \
            memory that stays unchanged until the wait. The asynchronous read of `a` and `acc` is \
            the caller's protocol (module docs)."
        )]
        #[inline(always)]
        pub unsafe fn $name(
            acc: &mut [[f32; 4]; $n / 8],
            a: [u32; 4],
            desc_b: u64,
            accumulate: u32,
        ) {
            // Every accumulator group is listed once, in order: `[0 1 … N/8-1]`.
            const { assert!(groups_in_order(&[$j0 $(, $j)*], $n)) };
            // SAFETY: the caller guarantees convergence, the descriptor and the wait protocol.
            unsafe {
                asm!(
                    concat!(
                        "{{ .reg .pred p; setp.ne.b32 p, {acc_flag}, 0; ",
                        "wgmma.mma_async.sync.aligned.m64n", stringify!($n), "k16.f32.bf16.bf16 ",
                        "{{{}, {}, {}, {}",
                        $(wgmma_acc_group!($j),)*
                        "}}, {{{a0}, {a1}, {a2}, {a3}}}, {desc}, p, 1, 1, 0; }}"
                    ),
                    inout(reg32) acc[$j0][0],
                    inout(reg32) acc[$j0][1],
                    inout(reg32) acc[$j0][2],
                    inout(reg32) acc[$j0][3],
                    $(
                        inout(reg32) acc[$j][0],
                        inout(reg32) acc[$j][1],
                        inout(reg32) acc[$j][2],
                        inout(reg32) acc[$j][3],
                    )*
                    a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                    desc = in(reg64) desc_b,
                    acc_flag = in(reg32) accumulate,
                    options(nostack)
                )
            };
        }
    };
}

/// Defines `wgmma_m64n<N>k16_f32_bf16_ss` for one N: as `wgmma_rs!`, with A in shared memory
/// too, named by a descriptor, K-major (`TRANS_A = 0`, `shared::tiles::wgmma_desc_sw128`) or
/// MN-major (`TRANS_A = 1`, `shared::tiles::wgmma_desc_sw128_mn`). No register operand but the
/// accumulators, so ptxas can keep a group in flight while the next stage is prepared.
macro_rules! wgmma_ss {
    ($name:ident, $n:literal, [$j0:literal $($j:literal)*]) => {
        #[doc = concat!(
            "`wgmma.mma_async.sync.aligned.m64n", stringify!($n), "k16.f32.bf16.bf16` with both \
            operands in shared memory: `acc += A·B` for the 64×16 bf16 A named by `desc_a` \
            (K-major for `TRANS_A = 0`, MN-major — `imm-trans-a` — for 1) and the 16×",
            stringify!($n), " bf16 B named by `desc_b` (K-major). `acc` as for the register-A \
            form (warp `w % 4` of the warpgroup holds D rows `16·(w % 4)..+16`); `accumulate` \
            likewise from a register defined before [`wgmma_fence`].\n\n\
            # Safety\n\
            All threads of the warpgroup, converged, between [`wgmma_fence`] and \
            [`wgmma_commit_group`]; both descriptors name visible shared memory (made visible to \
            the async proxy by `fence.proxy.async` after generic writes) that stays unchanged \
            until the wait."
        )]
        #[inline(always)]
        pub unsafe fn $name<const TRANS_A: u32>(
            acc: &mut [[f32; 4]; $n / 8],
            desc_a: u64,
            desc_b: u64,
            accumulate: u32,
        ) {
            const { assert!(groups_in_order(&[$j0 $(, $j)*], $n) && TRANS_A <= 1) };
            // SAFETY: the caller guarantees convergence, the descriptors and the wait protocol.
            unsafe {
                asm!(
                    concat!(
                        "{{ .reg .pred p; setp.ne.b32 p, {acc_flag}, 0; ",
                        "wgmma.mma_async.sync.aligned.m64n", stringify!($n), "k16.f32.bf16.bf16 ",
                        "{{{}, {}, {}, {}",
                        $(wgmma_acc_group!($j),)*
                        "}}, {desc_a}, {desc_b}, p, 1, 1, {trans_a}, 0; }}"
                    ),
                    inout(reg32) acc[$j0][0],
                    inout(reg32) acc[$j0][1],
                    inout(reg32) acc[$j0][2],
                    inout(reg32) acc[$j0][3],
                    $(
                        inout(reg32) acc[$j][0],
                        inout(reg32) acc[$j][1],
                        inout(reg32) acc[$j][2],
                        inout(reg32) acc[$j][3],
                    )*
                    desc_a = in(reg64) desc_a,
                    desc_b = in(reg64) desc_b,
                    acc_flag = in(reg32) accumulate,
                    trans_a = const TRANS_A,
                    options(nostack)
                )
            };
        }
    };
}

/// The template text of accumulator group `j > 0` (four more registers).
macro_rules! wgmma_acc_group {
    ($j:literal) => {
        ", {}, {}, {}, {}"
    };
}

wgmma_rs!(wgmma_m64n16k16_f32_bf16_rs, 16, [0 1]);
wgmma_rs!(wgmma_m64n32k16_f32_bf16_rs, 32, [0 1 2 3]);
wgmma_rs!(wgmma_m64n64k16_f32_bf16_rs, 64, [0 1 2 3 4 5 6 7]);
wgmma_rs!(wgmma_m64n128k16_f32_bf16_rs, 128, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15]);
wgmma_rs!(wgmma_m64n256k16_f32_bf16_rs, 256, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31]);

wgmma_ss!(wgmma_m64n16k16_f32_bf16_ss, 16, [0 1]);
wgmma_ss!(wgmma_m64n32k16_f32_bf16_ss, 32, [0 1 2 3]);
wgmma_ss!(wgmma_m64n64k16_f32_bf16_ss, 64, [0 1 2 3 4 5 6 7]);
wgmma_ss!(wgmma_m64n128k16_f32_bf16_ss, 128, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15]);
wgmma_ss!(wgmma_m64n256k16_f32_bf16_ss, 256, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31]);
