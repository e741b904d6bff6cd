//! NVFP4 block-scale decoding, shared by the host's dequantizer (`mxmoe::nvfp4`) and the kernels
//! that will decode NVFP4 tiles (issue #17).
//!
//! NVFP4 keeps MXFP4's E2M1 codes and nibble order ([`super::mxfp4`]) but scales every
//! [`NV_BLOCK`] values along K by an E4M3 (`float8_e4m3fn`) byte and, optionally, an f32 tensor
//! scale. A value is `e2m1(code) · f` with the block factor `f = tensor_scale · e4m3(byte)` taken
//! in f32 first ([`block_factor`], torchao's `get_hp_scales`), and a bf16 dequantization rounds
//! that f32 product once. Unlike an E8M0 scale, `f` is not a power of two, so the product is not
//! exact: a decode that is to match the bf16 path on the dequantized weights bit for bit must
//! form the same f32 product and round it the same way.

/// Values per block scale.
pub const NV_BLOCK: usize = 16;
/// The largest E4M3 (`float8_e4m3fn`) value.
pub const E4M3_MAX: f32 = 448.0;
/// The smallest normal E4M3 value, 2^-6.
pub const E4M3_MIN_NORMAL: f32 = 0.015625;

/// The value of an E4M3 (`float8_e4m3fn`) byte: sign, 4 exponent bits (bias 7), 3 mantissa bits,
/// subnormals below 2^-6, `0x7F`/`0xFF` NaN, no infinities. Exact in f32.
#[inline]
pub const fn e4m3_to_f32(b: u8) -> f32 {
    let exp = ((b >> 3) & 0x0F) as u32;
    let man = (b & 0x07) as u32;
    if exp == 0x0F && man == 0x07 {
        return f32::NAN;
    }
    let sign = ((b as u32) >> 7) << 31;
    let magnitude = if exp == 0 {
        // man/8 · 2^-6 = man · 2^-9: exact as an integer times a power of two.
        man as f32 * (1.0 / 512.0)
    } else {
        // (1 + man/8) · 2^(exp − 7): the f32 bit pattern directly.
        f32::from_bits(((exp + 120) << 23) | (man << 20))
    };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// The f32 factor of a block: `tensor_scale · e4m3(byte)` (pass 1.0 without a tensor scale,
/// which leaves the E4M3 value unchanged).
#[inline]
pub const fn block_factor(byte: u8, tensor_scale: f32) -> f32 {
    tensor_scale * e4m3_to_f32(byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_every_byte_as_the_format_defines() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            let (s, e, m) = ((b >> 7) as i32, ((b >> 3) & 0xF) as i32, (b & 7) as f64);
            if e == 15 && m == 7.0 {
                assert!(v.is_nan(), "{b:#04x}");
                continue;
            }
            let mag = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(v as f64, want, "{b:#04x}");
            assert_eq!(v.is_sign_negative(), s == 1, "{b:#04x} sign");
        }
        assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
        assert_eq!(e4m3_to_f32(0x08), E4M3_MIN_NORMAL);
        assert_eq!(block_factor(0x38, 1.0), 1.0);
        assert_eq!(block_factor(0x40, 0.25), 0.5);
    }
}
