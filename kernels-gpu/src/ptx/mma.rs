//! Warp-level tensor-core MMA (PTX ISA §9.7.14.5.14 "mma"), PTX 7.0+, SM 8.0+.
//! CuTe: `SM80_16x8x16_F32BF16BF16F32_TN`.

use core::arch::asm;

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: `d = a·b + c` for a 16×16 bf16 A
/// (row-major fragment), a 16×8 bf16 B (column-major fragment) and 16×8 f32 C/D.
///
/// Fragments (g = lane/4, t = lane%4; each u32 holds two bf16, lower column/row in the low half):
/// - `a[0]` = A[g][2t..2t+2], `a[1]` = A[g+8][2t..], `a[2]` = A[g][2t+8..], `a[3]` = A[g+8][2t+8..];
/// - `b[0]` = B[2t..2t+2][g], `b[1]` = B[2t+8..2t+10][g];
/// - `c[0..2]` = C[g][2t..2t+2], `c[2..4]` = C[g+8][2t..2t+2].
///
/// Register-only, so it is safe to call; the whole warp must execute it converged (callers keep
/// it under warp-uniform control flow).
#[inline(always)]
pub fn mma_m16n8k16_row_col_f32_bf16_bf16_f32(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let (d0, d1, d2, d3): (f32, f32, f32, f32);
    // SAFETY: register-only instruction; convergence is the caller's documented obligation and
    // cannot cause memory unsafety.
    unsafe {
        asm!("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{c0}, {c1}, {c2}, {c3}}};",
            d0 = out(reg32) d0, d1 = out(reg32) d1, d2 = out(reg32) d2, d3 = out(reg32) d3,
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            b0 = in(reg32) b[0], b1 = in(reg32) b[1],
            c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
            options(pure, nomem, nostack))
    };
    [d0, d1, d2, d3]
}
