//! Conversions and packed bf16 arithmetic.

use core::arch::asm;

/// `cvt.rn.bf16x2.f32 d, hi, lo;` (PTX ISA §9.7.9.21 "cvt", PTX 7.0+, SM 8.0+): rounds two f32
/// to bf16 (nearest even) and packs them, `lo` in bits 0..16. CUDA C: `__floats2bfloat162_rn(lo, hi)`.
#[inline(always)]
pub fn cvt_rn_bf16x2_f32(lo: f32, hi: f32) -> u32 {
    let d: u32;
    // SAFETY: register-only conversion with no preconditions.
    unsafe {
        asm!("cvt.rn.bf16x2.f32 {d}, {hi}, {lo};", d = out(reg32) d, hi = in(reg32) hi, lo = in(reg32) lo, options(pure, nomem, nostack))
    };
    d
}

/// `mul.rn.bf16x2 d, a, b;` (PTX ISA §9.7.4.5 "Half Precision Floating Point Instructions: mul",
/// PTX 7.8+, SM 9.0+): lane-wise bf16 product, rounded to nearest even, subnormals kept.
/// CUDA C: `__hmul2` on `__nv_bfloat162`.
///
/// Below SM 9.0 (the portable `sm_80` module) it is `fma.rn.bf16x2 d, a, b, -0.0` (PTX 7.0+,
/// SM 8.0+), which is how CUDA's `__hmul2` is written for those targets: one rounding of the
/// exact product, and adding `-0.0` keeps the sign of a zero product, so the bits are the same.
#[inline(always)]
pub fn mul_rn_bf16x2(a: u32, b: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only arithmetic with no preconditions.
    #[cfg(target_feature = "sm_90")]
    unsafe {
        asm!("mul.rn.bf16x2 {d}, {a}, {b};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack))
    };
    // SAFETY: register-only arithmetic with no preconditions.
    #[cfg(not(target_feature = "sm_90"))]
    unsafe {
        asm!("fma.rn.bf16x2 {d}, {a}, {b}, {z};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b,
            z = in(reg32) 0x8000_8000u32, options(pure, nomem, nostack))
    };
    d
}

/// `prmt.b32 d, a, 0, sel;` (PTX ISA §9.7.8.7 "prmt", PTX 2.0+, all SM targets): byte permute
/// of `a` and zero; with `sel = 0x4440 | i` the result is byte `i` of `a` (0 ≤ i < 4) zero
/// extended — one instruction where a variable shift and a mask take two. CUDA C: `__byte_perm`.
#[inline(always)]
pub fn prmt_b32(a: u32, sel: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only permutation with no preconditions.
    unsafe {
        asm!("prmt.b32 {d}, {a}, 0, {s};", d = out(reg32) d, a = in(reg32) a, s = in(reg32) sel, options(pure, nomem, nostack))
    };
    d
}
