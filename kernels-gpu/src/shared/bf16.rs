//! bf16 rounding, bit-identical to the hardware's `cvt.rn.bf16.f32` (round to nearest even,
//! NaN → canonical quiet NaN `0x7FC0`). The CPU reference rounds through these functions at the
//! same points where the kernels convert.

/// Rounds an f32 to the nearest bf16 (ties to even) and returns its bits.
#[inline]
pub const fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return 0x7FC0 | ((bits >> 16) as u16 & 0x8000);
    }
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7FFF + lsb);
    (rounded >> 16) as u16
}

/// Widens bf16 bits to f32 (exact).
#[inline]
pub const fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Rounds an f32 through bf16 and back.
#[inline]
pub const fn round_bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(-2.5), 0xC020);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80); // rounds up to Inf
        assert_eq!(f32_to_bf16_bits(f32::NAN) & 0x7FC0, 0x7FC0);
        assert_eq!(round_bf16(3.0), 3.0);
    }
}
