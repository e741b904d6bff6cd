//! MXFP4 (OCP microscaling FP4) element and scale decoding.
//!
//! - Elements are FP4 E2M1 codes (`sign | exp(2) | mantissa(1)`, bias 1, no Inf/NaN).
//! - Every [`MX_BLOCK`] consecutive elements along K share one E8M0 scale byte `b`, worth
//!   `2^(b - 127)`; `b = 255` is NaN.
//! - Two codes share a byte: even k in the **low** nibble, odd k in the high nibble (torchao's
//!   `pack_uint4`).
//!
//! A dequantized value is `e2m1(code) · 2^(b − 127)`. The product of a codebook value (at most two
//! significant bits) and a power of two is exact in f32 and in bf16 over the whole normal and
//! subnormal range, so every decode path in mxmoe agrees bit for bit.

/// Elements per scale block.
pub const MX_BLOCK: usize = 32;
/// Bytes of packed codes per scale block.
pub const MX_BLOCK_BYTES: usize = MX_BLOCK / 2;
/// The E8M0 byte that encodes NaN.
pub const E8M0_NAN: u8 = 0xFF;
/// The E8M0 exponent bias.
pub const E8M0_BIAS: i32 = 127;

/// Decoded values of the 16 E2M1 codes, indexed by the raw nibble.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// bf16 bit patterns of the 16 E2M1 codes (exact: every value has at most two significant bits).
pub const E2M1_BF16_BITS: [u16; 16] = {
    let mut t = [0u16; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = e2m1_to_bf16_bits(i as u8);
        i += 1;
    }
    t
};

/// Decodes an E2M1 code (the low 4 bits of `code`) to f32, by bit construction.
#[inline]
pub const fn e2m1_to_f32(code: u8) -> f32 {
    f32::from_bits(e2m1_to_f32_bits(code))
}

/// f32 bit pattern of an E2M1 code (the low 4 bits of `code`).
///
/// Exponent field `e` (2 bits) and mantissa `m` (1 bit): `e = 0` is the subnormal `m · 0.5`;
/// otherwise the value is `2^(e − 1) · (1 + m/2)`, i.e. f32 exponent `e − 1 + 127`.
#[inline]
pub const fn e2m1_to_f32_bits(code: u8) -> u32 {
    let sign = ((code as u32 >> 3) & 1) << 31;
    let e = (code as u32 >> 1) & 3;
    let m = code as u32 & 1;
    let mag = if e == 0 {
        // 0 or 0.5 (= 2^-1, f32 exponent 126).
        if m == 0 { 0 } else { 126 << 23 }
    } else {
        ((e + 126) << 23) | (m << 22)
    };
    sign | mag
}

/// bf16 bit pattern of an E2M1 code: the top half of its exact f32 pattern.
#[inline]
pub const fn e2m1_to_bf16_bits(code: u8) -> u16 {
    (e2m1_to_f32_bits(code) >> 16) as u16
}

/// Decodes an E8M0 scale byte to f32 by bit construction: `b ≥ 1` → exponent field `b`;
/// `b = 0` → 2^-127 (the f32 subnormal `0x0040_0000`); `b = 255` → NaN.
#[inline]
pub const fn e8m0_to_f32(b: u8) -> f32 {
    f32::from_bits(e8m0_to_f32_bits(b))
}

/// f32 bit pattern of an E8M0 scale byte (see [`e8m0_to_f32`]).
#[inline]
pub const fn e8m0_to_f32_bits(b: u8) -> u32 {
    match b {
        0 => 0x0040_0000,
        E8M0_NAN => 0x7FC0_0000,
        _ => (b as u32) << 23,
    }
}

/// bf16 bit pattern of an E8M0 scale byte: 2^-127 is the bf16 subnormal `0x0040`, NaN is the
/// canonical quiet NaN `0x7FC0`. Always exact.
#[inline]
pub const fn e8m0_to_bf16_bits(b: u8) -> u16 {
    (e8m0_to_f32_bits(b) >> 16) as u16
}

/// Splits a packed byte into its two codes: `(even k, odd k)` = `(low nibble, high nibble)`.
#[inline]
pub const fn unpack_pair(byte: u8) -> (u8, u8) {
    (byte & 0x0F, byte >> 4)
}

/// Packs two codes into a byte: `even` in the low nibble, `odd` in the high nibble.
#[inline]
pub const fn pack_pair(even: u8, odd: u8) -> u8 {
    (even & 0x0F) | (odd << 4)
}

/// Dequantizes one element to f32: `e2m1(code) · 2^(b − 127)`, exact (NaN for `b = 255`,
/// ±Inf when `6 · 2^127` overflows, as torchao's bf16 dequantization gives).
#[inline]
pub const fn dequant_f32(code: u8, scale: u8) -> f32 {
    e2m1_to_f32(code) * e8m0_to_f32(scale)
}

/// Dequantizes one element to bf16 bits. The f32 product is exact and representable in bf16
/// (at most two significant bits), so truncating the f32 bits is exact; NaN stays NaN.
#[inline]
pub const fn dequant_bf16_bits(code: u8, scale: u8) -> u16 {
    let v = dequant_f32(code, scale);
    if v.is_nan() {
        0x7FC0
    } else {
        (v.to_bits() >> 16) as u16
    }
}

/// The two bf16 values of a packed byte as one `bf16x2` word, unscaled: even k in the low half
/// (the element an MMA fragment register holds first), odd k in the high half.
#[inline]
pub const fn byte_to_bf16x2(byte: u8) -> u32 {
    let (even, odd) = unpack_pair(byte);
    (e2m1_to_bf16_bits(even) as u32) | ((e2m1_to_bf16_bits(odd) as u32) << 16)
}

/// The two codes of the low byte of `x` placed straight into bf16 bit fields, scaled by 2^-126:
/// a code `s|e|m` becomes the bf16 pattern `s << 15 | e << 7 | m << 6` (exponent field `e`,
/// top mantissa bit `m`), whose value is exactly `e2m1(code) · 2^-126` for every code (`e = 0`
/// lands on the bf16 subnormal `m · 2^-127`). Even k (low nibble) in the low half. No table:
/// two multiplies copy the byte to two places at once (`b·(2^6 + 2^18)` puts the low code's
/// `e|m` at bits 6–8 and the high code's at 22–24; `b·(2^12 + 2^24)` puts the signs at bits 15
/// and 31; the copies never overlap, so no carries) and two masks keep those fields — five
/// instructions with the byte extraction, against nine for shift-and-mask per field. The
/// kernels then multiply by [`TWO_POW_126_BF16X2`] (exact) and by the scale. Only the low 8
/// bits of `x` are read.
#[inline]
pub const fn byte_to_bf16x2_scaled_down(x: u32) -> u32 {
    place_byte_scaled_down(x & 0xFF)
}

/// [`byte_to_bf16x2_scaled_down`] of a byte `b < 256` that is already zero extended (the
/// kernels extract it with one `prmt`): four instructions.
#[inline]
pub const fn place_byte_scaled_down(b: u32) -> u32 {
    (b.wrapping_mul(0x0004_0040) & 0x01C0_01C0) | (b.wrapping_mul(0x0100_1000) & 0x8000_8000)
}

/// `2^126` in both halves of a bf16x2 word (exponent field 253).
pub const TWO_POW_126_BF16X2: u32 = 0x7E80_7E80;

/// The multipliers that turn [`byte_to_bf16x2_scaled_down`] words into scaled values for E8M0
/// byte `b`: for `b ≤ 128` one product by `2^(b − 1)` (= 2^126 · 2^(b − 127), still a normal
/// bf16); above, two products, by 2^126 and then by the scale (`2^(b − 1)` would overflow).
/// Every product is exact, so both routes give the bf16 dequantization bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleFold {
    /// First multiplier (bf16x2, both halves equal).
    pub first: u32,
    /// Second multiplier, used only when `two_step`.
    pub second: u32,
    /// Whether the second product is needed.
    pub two_step: bool,
}

/// [`ScaleFold`] of an E8M0 byte.
#[inline]
pub const fn scale_fold(b: u8) -> ScaleFold {
    if b <= 128 {
        let s = (b as u32 + 126) << 7;
        ScaleFold {
            first: s | (s << 16),
            second: 0,
            two_step: false,
        }
    } else {
        let s = e8m0_to_bf16_bits(b) as u32;
        ScaleFold {
            first: TWO_POW_126_BF16X2,
            second: s | (s << 16),
            two_step: true,
        }
    }
}

/// The largest E8M0 byte whose [`scale_fold`] is a single product (`2^(b − 1)` is still a
/// normal bf16 up to `b = 128`).
pub const SINGLE_STEP_MAX: u32 = 128;

/// The multiplier of [`scale_fold`] for an E8M0 byte `b ≤ SINGLE_STEP_MAX` (where it is one
/// product): `2^(b − 1)` in both bf16 halves, i.e. `(b + 126)` in both exponent fields — one
/// multiply-add. The `mma.sync` forward and the dX decode of the 16- and 32-row `wgmma` tiles
/// take this path when every lane of a warp has such a byte (a warp vote), so the common case
/// pays neither the second product nor the byte tests of [`scale_fold`]; other bytes give
/// garbage here (callers must not use it for them).
#[inline]
pub const fn scale_single(b: u32) -> u32 {
    b.wrapping_mul(0x0080_0080).wrapping_add(126 * 0x0080_0080)
}

/// Bytes of one expert's packed codes plus scales: `N·K/2 + N·K/32`.
#[inline]
pub const fn expert_bytes(n: usize, k: usize) -> usize {
    n * k / 2 + n * k / MX_BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_single_is_the_one_product_fold() {
        for b in 0..=SINGLE_STEP_MAX {
            let f = scale_fold(b as u8);
            assert!(!f.two_step, "byte {b}");
            assert_eq!(scale_single(b), f.first, "byte {b}");
        }
        assert!(scale_fold(SINGLE_STEP_MAX as u8 + 1).two_step);
        // Every code times the single multiplier equals the bf16 dequantization of the code
        // times 2^(b − 127), for the smallest, a middle and the largest single-step byte.
        for b in [0u32, 1, 100, 127, SINGLE_STEP_MAX] {
            for byte in 0..=255u8 {
                let placed = byte_to_bf16x2_scaled_down(byte as u32);
                let m = scale_single(b);
                for half in 0..2 {
                    let x = f32::from_bits(((placed >> (16 * half)) & 0xFFFF) << 16);
                    let s = f32::from_bits(((m >> (16 * half)) & 0xFFFF) << 16);
                    let code = if half == 0 { byte & 0xF } else { byte >> 4 };
                    let want = E2M1_VALUES[code as usize] * 2f32.powi(b as i32 - 127);
                    assert_eq!(x * s, want, "byte {byte:#x} half {half} scale {b}");
                }
            }
        }
    }

    #[test]
    fn e2m1_decode_matches_spec_table() {
        let spec = [
            0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
            -6.0,
        ];
        for code in 0..16u8 {
            let v = e2m1_to_f32(code);
            assert_eq!(v.to_bits(), spec[code as usize].to_bits(), "code {code}");
            assert_eq!(v.to_bits(), E2M1_VALUES[code as usize].to_bits());
            assert_eq!(
                f32::from_bits((E2M1_BF16_BITS[code as usize] as u32) << 16).to_bits(),
                v.to_bits()
            );
        }
        // Only the low nibble matters.
        assert_eq!(e2m1_to_f32(0xF7).to_bits(), 6.0f32.to_bits());
    }

    #[test]
    fn e8m0_decode_is_exact_power_of_two() {
        for b in 1..=254u8 {
            assert_eq!(e8m0_to_f32(b), 2f32.powi(b as i32 - 127), "byte {b}");
            assert_eq!(
                ((e8m0_to_bf16_bits(b) as u32) << 16),
                e8m0_to_f32(b).to_bits()
            );
        }
        assert_eq!(e8m0_to_f32(0), 2f64.powi(-127) as f32);
        assert_eq!(e8m0_to_f32(0).to_bits(), 0x0040_0000);
        assert_eq!(e8m0_to_bf16_bits(0), 0x0040);
        assert!(e8m0_to_f32(255).is_nan());
        assert_eq!(e8m0_to_bf16_bits(255), 0x7FC0);
        assert_eq!(e8m0_to_f32(127), 1.0);
    }

    #[test]
    fn nibble_order_is_even_low_odd_high() {
        assert_eq!(unpack_pair(0x21), (0x1, 0x2));
        assert_eq!(pack_pair(0x1, 0x2), 0x21);
        assert_eq!(pack_pair(0xF, 0x8), 0x8F);
        for b in 0..=255u8 {
            let (lo, hi) = unpack_pair(b);
            assert_eq!(pack_pair(lo, hi), b);
            let w = byte_to_bf16x2(b);
            assert_eq!(w & 0xFFFF, E2M1_BF16_BITS[lo as usize] as u32);
            assert_eq!(w >> 16, E2M1_BF16_BITS[hi as usize] as u32);
        }
    }

    #[test]
    fn dequant_all_codes_and_scales_matches_f64_product() {
        for code in 0..16u8 {
            for b in 0..=255u8 {
                let v = dequant_f32(code, b);
                let bits = dequant_bf16_bits(code, b);
                if b == 255 {
                    assert!(v.is_nan());
                    assert_eq!(bits, 0x7FC0);
                    continue;
                }
                let exact = E2M1_VALUES[code as usize] as f64 * 2f64.powi(b as i32 - 127);
                let expect = exact as f32; // exact or ±Inf on overflow
                assert_eq!(v.to_bits(), expect.to_bits(), "code {code} byte {b}");
                // bf16 keeps it exactly.
                assert_eq!(((bits as u32) << 16), v.to_bits(), "code {code} byte {b}");
            }
        }
    }

    #[test]
    fn scaled_down_placement_times_two_pow_126_is_the_codebook() {
        let two126 = 2f64.powi(126);
        assert_eq!(TWO_POW_126_BF16X2 & 0xFFFF, (two126 as f32).to_bits() >> 16);
        for b in 0..=255u32 {
            let w = byte_to_bf16x2_scaled_down(b | 0xAB00); // high garbage bits are ignored
            let (lo, hi) = unpack_pair(b as u8);
            for (half, code) in [(w & 0xFFFF, lo), (w >> 16, hi)] {
                let v = f32::from_bits(half << 16) as f64 * two126;
                let want = E2M1_VALUES[code as usize] as f64;
                assert_eq!(
                    v.to_bits(),
                    want.to_bits(),
                    "byte {b:#04x}: half {half:#06x}"
                );
            }
        }
    }

    /// bf16 × bf16 rounded to nearest even, as `mul.rn.bf16` does (the f32 product of two bf16
    /// values is exact, so rounding it once to bf16 is the correctly rounded result).
    fn mul_bf16(a: u16, b: u16) -> u16 {
        let p = f32::from_bits((a as u32) << 16) * f32::from_bits((b as u32) << 16);
        crate::shared::bf16::f32_to_bf16_bits(p)
    }

    #[test]
    fn folded_scales_decode_every_code_and_scale_exactly() {
        for b in 0..=255u8 {
            let f = scale_fold(b);
            for byte in 0..=255u32 {
                let placed = byte_to_bf16x2_scaled_down(byte);
                let (lo, hi) = unpack_pair(byte as u8);
                for (shift, code) in [(0, lo), (16, hi)] {
                    let mut v = mul_bf16((placed >> shift) as u16, (f.first >> shift) as u16);
                    if f.two_step {
                        v = mul_bf16(v, (f.second >> shift) as u16);
                    }
                    let want = dequant_bf16_bits(code, b);
                    let same = v == want || (b == 255 && (v & 0x7F80) == 0x7F80 && (v & 0x7F) != 0);
                    assert!(same, "code {code} scale {b}: {v:#06x} vs {want:#06x}");
                }
            }
        }
    }

    #[test]
    fn expert_bytes_counts_codes_and_scales() {
        assert_eq!(expert_bytes(1024, 2048), 1024 * 1024 + 1024 * 64);
    }
}
