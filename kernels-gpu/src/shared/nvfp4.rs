//! NVFP4 block-scale decoding, shared by the host's dequantizer (`mxmoe::nvfp4`), the
//! dequantization kernel (Strategy A) and the fused K-loop decode of the grouped GEMMs
//! (Strategy B, `tile::gemm` and `tile::wg`).
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

/// `2^126` as an f32.
pub const TWO_POW_126_F32: f32 = f32::from_bits(253 << 23);
/// `2^120` as an f32.
const TWO_POW_120_F32: f32 = f32::from_bits(247 << 23);

/// [`e4m3_to_f32`] without branches on the exponent: the byte's exponent and mantissa fields
/// placed at the top of an f32's (`(b & 0x7F) << 20`) are the E4M3 magnitude times 2^-120 for
/// normal and subnormal bytes alike (an E4M3 subnormal lands on an f32 subnormal), so one exact
/// product by 2^120 gives the value; `0x7F`/`0xFF` are NaN. Equal to [`e4m3_to_f32`] for every
/// byte (host test below); the kernels' decode uses it (a few instructions per 16 values).
#[inline(always)]
pub const fn e4m3_to_f32_placed(b: u8) -> f32 {
    let b = b as u32;
    if b & 0x7F == 0x7F {
        return f32::NAN;
    }
    let placed = f32::from_bits(((b & 0x7F) << 20) | ((b & 0x80) << 24));
    placed * TWO_POW_120_F32
}

/// The f32 multipliers that turn placed E2M1 codes into one NVFP4 block's decoded values.
///
/// The kernels place a byte's two codes into bf16 bit fields scaled by 2^-126
/// (`mxfp4::place_byte_scaled_down`; widened to f32 exactly by a shift). A value is then
/// `bf16(rn_f32(x · 2^126 · f))` for the block factor `f` ([`block_factor`]): for `|f| < 4`
/// the product by `f · 2^126` (finite and exact) has the same real value as `e2m1 · f`, so its
/// one f32 rounding is the dequantizer's; otherwise two products, by 2^126 (exact) and then by
/// `f`. NaN factors take the second route and stay NaN. Either way the bf16 result equals
/// `bf16(e2m1(code) · f)` rounded as `dequantize` does, bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NvFold {
    /// First multiplier.
    pub first: f32,
    /// Second multiplier, used only when `two_step`.
    pub second: f32,
    /// Whether the second product is needed.
    pub two_step: bool,
}

/// [`NvFold`] of a block factor `f`.
#[inline(always)]
pub const fn nv_fold(f: f32) -> NvFold {
    if f.abs() < 4.0 {
        NvFold {
            first: f * TWO_POW_126_F32,
            second: 1.0,
            two_step: false,
        }
    } else {
        NvFold {
            first: TWO_POW_126_F32,
            second: f,
            two_step: true,
        }
    }
}

/// The two placed values of a bf16x2 word (`mxfp4::place_byte_scaled_down`), widened to f32
/// (even k first), times `fold`: the f32 values whose bf16 rounding is the decoded pair.
#[inline(always)]
pub const fn nv_scale_pair(placed: u32, fold: NvFold) -> (f32, f32) {
    let lo = f32::from_bits(placed << 16) * fold.first;
    let hi = f32::from_bits(placed & 0xFFFF_0000) * fold.first;
    if fold.two_step {
        (lo * fold.second, hi * fold.second)
    } else {
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::bf16::f32_to_bf16_bits;
    use crate::shared::mxfp4::{e2m1_to_f32, place_byte_scaled_down};

    #[test]
    fn placed_e4m3_decode_equals_the_definition_for_every_byte() {
        for b in 0u8..=255 {
            let (want, got) = (e4m3_to_f32(b), e4m3_to_f32_placed(b));
            if want.is_nan() {
                assert!(got.is_nan(), "{b:#04x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{b:#04x}");
            }
        }
    }

    #[test]
    fn folded_decode_equals_the_dequantizer_bit_for_bit() {
        // Tensor scales: 1 (none), typical small ones, odd mantissas (inexact products), large
        // (two-step route), subnormal, and the boundary at |f| = 4.
        let tensor_scales = [
            1.0f32,
            1.0 / 2688.0,
            3.7e-5,
            0.123_456_79,
            1.000_000_1,
            3.999_999_8,
            97.3,
            1.0e30,
            1.0e-40,
        ];
        for ts in tensor_scales {
            for sb in 0u8..=255 {
                let f = block_factor(sb, ts);
                let fold = nv_fold(f);
                for byte in 0u32..=255 {
                    let (lo, hi) = nv_scale_pair(place_byte_scaled_down(byte), fold);
                    for (code, got) in [(byte & 0xF, lo), (byte >> 4, hi)] {
                        let want = f32_to_bf16_bits(e2m1_to_f32(code as u8) * f);
                        let got = f32_to_bf16_bits(got);
                        if want & 0x7FFF > 0x7F80 {
                            assert!(
                                got & 0x7FFF > 0x7F80,
                                "ts {ts} scale {sb:#04x} byte {byte:#04x}"
                            );
                        } else {
                            assert_eq!(got, want, "ts {ts} scale {sb:#04x} byte {byte:#04x}");
                        }
                    }
                }
            }
        }
    }

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
