//! The MXFP4 quantizer: a bit-exact port of torchao v0.17.0
//! `MXTensor.to_mx(w, torch.float4_e2m1fn_x2, block_size=32)` in its default FLOOR scale mode
//! (SPEC §1.4).
//!
//! Per block of 32 consecutive elements along K:
//! 1. `amax = max |x_i|` (exact; NaN if any element is NaN);
//! 2. scale byte `b = clamp(floor_exponent(amax) − 2, −127, 128) + 127`, read from the f32
//!    exponent field (so 0 and subnormal amax give `b = 0`, Inf gives 253), and 255 for NaN;
//! 3. divisor `d = max(2^(b−127), 2^−126)` built from bits (`b = 255` gives +Inf);
//! 4. each `x_i / d` is encoded to E2M1 by [`f32_to_e2m1`] (round to nearest, ties to the even
//!    code, saturate at 6, keep the sign) and pairs are packed with even k in the low nibble.
//!
//! FLOOR clips: after scaling the block maximum lies in `[4, 8)`, so values in `(5, 8)` saturate
//! to 6. That is the reference behaviour and is kept on purpose.

use kernels_gpu::shared::bf16::bf16_bits_to_f32;
use kernels_gpu::shared::mxfp4::{E8M0_BIAS, E8M0_NAN, MX_BLOCK, MX_BLOCK_BYTES, pack_pair};

use super::{MxError, MxShape, MxWeights};

/// Exponent of the largest power of two in E2M1 (4.0 = 2^2): torchao's `F4_E2M1_MAX_POW2`.
const E2M1_MAX_POW2: i32 = 2;

/// Encodes one f32 to an E2M1 code: a scalar port of torchao's
/// `_f32_to_floatx_unpacked(x, ebits=2, mbits=1)`.
///
/// On the magnitude `m` (the sign bit is OR-ed back as bit 3, so `−0.1 → 8`, `−0.0 → 8`):
/// `m ≥ 6` (including +Inf) → 7 (6.0); `m < 1` → nearest multiple of 0.5, ties to the even code
/// (an f32 add of 2^22 rounds it); otherwise the f32 mantissa is rounded to one bit, ties to
/// even. Thresholds: `≤0.25 → 0`, `(0.25, 0.75) → 0.5`, `[0.75, 1.25] → 1`, `(1.25, 1.75) → 1.5`,
/// `[1.75, 2.5] → 2`, `(2.5, 3.5) → 3`, `[3.5, 5] → 4`, `> 5 → 6`.
///
/// A NaN input takes torchao's "normal" path on its bit pattern and yields a payload-dependent
/// code (2, 3 or 4 plus its sign), exactly as torchao does; its block's scale is NaN anyway.
#[inline]
pub const fn f32_to_e2m1(y: f32) -> u8 {
    // 2^22 as f32: torchao's `denorm_mask_float` (exponent field 149 = 127 − 1 + (23 − 1) + 1).
    const DENORM_MASK_INT: u32 = 149 << 23;
    // Rebias the f32 exponent (127) to E2M1's (1) and add half an E2M1 ulp minus one.
    const VAL_TO_ADD: i32 = ((1 - 127) << 23) + ((1 << 21) - 1);

    let bits = y.to_bits();
    let sign = bits & 0x8000_0000;
    let magnitude = f32::from_bits(bits ^ sign);
    let code = if magnitude >= 6.0 {
        // Saturate (no Inf in E2M1).
        7
    } else if magnitude < 1.0 {
        // Subnormal range: the float add rounds to a multiple of 0.5 (ties to even), and the
        // low mantissa bits are then the code 0, 1 or 2.
        let rounded = (magnitude + f32::from_bits(DENORM_MASK_INT)).to_bits();
        rounded.wrapping_sub(DENORM_MASK_INT) as u8
    } else {
        // Normal range (and NaN, whose comparisons above are false): round to one mantissa bit.
        let m = magnitude.to_bits() as i32;
        let mant_odd = (m >> 22) & 1;
        (m.wrapping_add(VAL_TO_ADD).wrapping_add(mant_odd) >> 22) as u8
    };
    code | (sign >> 28) as u8
}

/// The FLOOR-mode E8M0 scale byte of a block whose largest magnitude is `amax`:
/// `clamp(e − 2, −127, 128) + 127` with `e = exponent_field(amax) − 127`, or 255 if `amax` is
/// NaN. Zero and f32-subnormal `amax` give 0; `+Inf` gives 253.
#[inline]
pub const fn e8m0_floor_scale(amax: f32) -> u8 {
    if amax.is_nan() {
        return E8M0_NAN;
    }
    let e = ((amax.to_bits() >> 23) & 0xFF) as i32 - E8M0_BIAS;
    let mut u = e - E2M1_MAX_POW2;
    if u < -E8M0_BIAS {
        u = -E8M0_BIAS;
    }
    if u > E8M0_BIAS + 1 {
        u = E8M0_BIAS + 1;
    }
    (u + E8M0_BIAS) as u8
}

/// The divisor the quantizer applies for scale byte `b`: the f32 with bits `b << 23`, raised to
/// at least 2^−126. So `b = 0` divides by 2^−126 although it *dequantizes* with 2^−127
/// (torchao's workaround for subnormals; SPEC §1.4 NOTE), and `b = 255` divides by +Inf.
#[inline]
pub const fn e8m0_quant_divisor(b: u8) -> f32 {
    let d = f32::from_bits((b as u32) << 23);
    if d < f32::MIN_POSITIVE {
        f32::MIN_POSITIVE
    } else {
        d
    }
}

/// Quantizes one 32-element block: returns its scale byte and its 16 packed bytes.
pub fn quantize_block(block: &[f32; MX_BLOCK]) -> (u8, [u8; MX_BLOCK_BYTES]) {
    // amax as torch.amax(abs(x)) computes it: exact, NaN-propagating.
    let mut amax = 0.0f32;
    for &x in block {
        let a = x.abs();
        if a.is_nan() {
            amax = f32::NAN;
            break;
        }
        if a > amax {
            amax = a;
        }
    }
    let scale = e8m0_floor_scale(amax);
    let d = e8m0_quant_divisor(scale);
    let mut packed = [0u8; MX_BLOCK_BYTES];
    for (byte, pair) in packed.iter_mut().zip(block.chunks_exact(2)) {
        *byte = pack_pair(f32_to_e2m1(pair[0] / d), f32_to_e2m1(pair[1] / d));
    }
    (scale, packed)
}

/// Quantizes an f32 weight `[experts, n, k]` (row-major) to MXFP4, bit-identical to torchao
/// v0.17.0 FLOOR mode on an f32 tensor.
///
/// Errors: dimensions as in [`MxShape::new`]; `values.len() != experts · n · k` →
/// [`MxError::Length`].
pub fn quantize_mxfp4(
    values: &[f32],
    experts: usize,
    n: usize,
    k: usize,
) -> Result<MxWeights, MxError> {
    quantize_with(values, experts, n, k, |x| x)
}

/// Quantizes a bf16 weight `[experts, n, k]` given as raw bf16 bits, bit-identical to torchao
/// v0.17.0 FLOOR mode on a bf16 tensor. (Widening bf16 to f32 is exact and the block maximum of
/// bf16 values is itself a bf16 value, so this is the f32 algorithm on the widened values.)
///
/// Errors as for [`quantize_mxfp4`].
pub fn quantize_mxfp4_bf16(
    bits: &[u16],
    experts: usize,
    n: usize,
    k: usize,
) -> Result<MxWeights, MxError> {
    quantize_with(bits, experts, n, k, bf16_bits_to_f32)
}

/// Shared body of the quantizers: checks the shape and length, then walks the blocks.
fn quantize_with<T: Copy>(
    values: &[T],
    experts: usize,
    n: usize,
    k: usize,
    widen: impl Fn(T) -> f32,
) -> Result<MxWeights, MxError> {
    let shape = MxShape::new(experts, n, k)?;
    if values.len() != shape.numel() {
        return Err(MxError::Length {
            tensor: "values",
            expected: shape.numel(),
            actual: values.len(),
        });
    }
    let mut packed = Vec::with_capacity(shape.packed_len());
    let mut scales = Vec::with_capacity(shape.scales_len());
    let mut block = [0.0f32; MX_BLOCK];
    // K is a multiple of 32, so consecutive 32-element chunks are exactly the blocks in
    // [E, N, K/32] order.
    for chunk in values.chunks_exact(MX_BLOCK) {
        for (dst, &src) in block.iter_mut().zip(chunk) {
            *dst = widen(src);
        }
        let (scale, bytes) = quantize_block(&block);
        scales.push(scale);
        packed.extend_from_slice(&bytes);
    }
    MxWeights::from_shape(shape, packed, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mxfp4::container::test_support::{XorShift, load_golden};
    use crate::mxfp4::dequantize_bf16;
    use kernels_gpu::shared::bf16::f32_to_bf16_bits;
    use kernels_gpu::shared::mxfp4::{E2M1_VALUES, unpack_pair};

    /// Independent oracle: the nearest E2M1 magnitude, ties to the even code, sign kept.
    fn nearest_code(y: f32) -> u8 {
        let sign = if y.is_sign_negative() { 8 } else { 0 };
        let m = f64::from(y.abs());
        if m >= 6.0 {
            // Everything above the largest code is nearest to it (and f64 distances to the codes
            // would no longer be distinct for huge inputs).
            return 7 | sign;
        }
        let mut best = 0u8;
        let mut best_dist = f64::INFINITY;
        for code in 0..8u8 {
            let dist = (m - f64::from(E2M1_VALUES[code as usize])).abs();
            if dist < best_dist || (dist == best_dist && code % 2 == 0) {
                best = code;
                best_dist = dist;
            }
        }
        best | sign
    }

    #[test]
    fn e2m1_encode_matches_spec_threshold_table() {
        // (input, code): interval ends exactly and just inside.
        let table: &[(f32, u8)] = &[
            (0.0, 0),
            (0.25, 0),
            (0.2500001, 1),
            (0.5, 1),
            (0.7499999, 1),
            (0.75, 2),
            (1.0, 2),
            (1.25, 2),
            (1.2500001, 3),
            (1.5, 3),
            (1.7499999, 3),
            (1.75, 4),
            (2.0, 4),
            (2.5, 4),
            (2.5000002, 5),
            (3.0, 5),
            (3.4999998, 5),
            (3.5, 6),
            (4.0, 6),
            (5.0, 6),
            (5.0000005, 7),
            (6.0, 7),
            (7.9, 7),
            (1e30, 7),
            (f32::MAX, 7),
            (f32::INFINITY, 7),
            (f32::from_bits(1), 0),
        ];
        for &(y, code) in table {
            assert_eq!(f32_to_e2m1(y), code, "+{y}");
            assert_eq!(f32_to_e2m1(-y), code | 8, "-{y}");
        }
    }

    #[test]
    fn e2m1_encode_ties_go_to_even_code() {
        // Exactly halfway between two codes: the even code wins.
        for (tie, code) in [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
        ] {
            assert_eq!(f32_to_e2m1(tie), code, "{tie}");
            assert_eq!(code % 2, 0);
        }
    }

    #[test]
    fn e2m1_encode_keeps_the_sign_of_values_rounding_to_zero() {
        assert_eq!(f32_to_e2m1(-0.1), 8);
        assert_eq!(f32_to_e2m1(-0.0), 8);
        assert_eq!(f32_to_e2m1(0.0), 0);
        assert_eq!(f32_to_e2m1(-0.25), 8);
        assert_eq!(f32_to_e2m1(f32::NEG_INFINITY), 15);
    }

    #[test]
    fn e2m1_encode_inverts_the_codebook() {
        for code in 0..16u8 {
            assert_eq!(f32_to_e2m1(E2M1_VALUES[code as usize]), code);
        }
    }

    #[test]
    fn e2m1_encode_nan_gives_torchao_garbage_without_panicking() {
        // Positive quiet NaN 0x7FC0_0000 follows the normal path: (bits − 126·2^23 + 2^21 − 1 +
        // 1) >> 22 = 0x103, truncated to a byte = 3. CUDA's canonical 0x7FFF_FFFF gives 4.
        assert_eq!(f32_to_e2m1(f32::from_bits(0x7FC0_0000)), 3);
        assert_eq!(f32_to_e2m1(f32::from_bits(0x7FFF_FFFF)), 4);
        assert_eq!(f32_to_e2m1(f32::from_bits(0xFFC0_0000)), 3 | 8);
    }

    #[test]
    fn e2m1_encode_matches_nearest_even_oracle_on_a_dense_sweep() {
        // Every multiple of 1/64 in [0, 8] and its two f32 neighbours.
        for j in 0..=512u32 {
            let y = j as f32 / 64.0;
            for v in [y, y.next_up(), y.next_down()] {
                if v >= 0.0 {
                    assert_eq!(f32_to_e2m1(v), nearest_code(v), "{v:e}");
                    assert_eq!(f32_to_e2m1(-v), nearest_code(-v), "-{v:e}");
                }
            }
        }
        // A strided sweep over all finite f32 bit patterns, both signs.
        for bits in (0..0x7F80_0000u32).step_by(4093) {
            for b in [bits, bits | 0x8000_0000] {
                let v = f32::from_bits(b);
                assert_eq!(f32_to_e2m1(v), nearest_code(v), "{v:e} ({b:#010x})");
            }
        }
    }

    #[test]
    fn floor_scale_follows_the_exponent_field() {
        let table: &[(f32, u8)] = &[
            (0.0, 0),
            (f32::from_bits(1), 0),           // smallest subnormal
            (f32::from_bits(0x007F_FFFF), 0), // largest subnormal
            (f32::MIN_POSITIVE, 0),           // 2^-126: e = -126, u = -128 → clamped
            (2f32.powi(-125), 0),             // u = -127
            (2f32.powi(-124), 1),
            (1.0, 125),
            (4.0, 127),
            (7.999, 127),
            (8.0, 128),
            (6.0 * 2f32.powi(100), 227),
            (f32::MAX, 252),
            (f32::INFINITY, 253),
            (f32::NAN, 255),
        ];
        for &(amax, b) in table {
            assert_eq!(e8m0_floor_scale(amax), b, "{amax:e}");
        }
    }

    #[test]
    fn quant_divisor_is_raised_to_min_normal() {
        assert_eq!(e8m0_quant_divisor(0), f32::MIN_POSITIVE);
        assert_eq!(e8m0_quant_divisor(1), f32::MIN_POSITIVE);
        assert_eq!(e8m0_quant_divisor(127), 1.0);
        assert_eq!(e8m0_quant_divisor(254), 2f32.powi(127));
        assert_eq!(e8m0_quant_divisor(255), f32::INFINITY);
    }

    fn codes(packed: &[u8; MX_BLOCK_BYTES]) -> Vec<u8> {
        packed
            .iter()
            .flat_map(|&b| {
                let (lo, hi) = unpack_pair(b);
                [lo, hi]
            })
            .collect()
    }

    #[test]
    fn zero_and_negative_zero_blocks() {
        let (b, p) = quantize_block(&[0.0; MX_BLOCK]);
        assert_eq!((b, p), (0, [0; MX_BLOCK_BYTES]));
        let (b, p) = quantize_block(&[-0.0; MX_BLOCK]);
        assert_eq!((b, p), (0, [0x88; MX_BLOCK_BYTES]));
        let mut mixed = [0.0f32; MX_BLOCK];
        mixed[1] = -0.0;
        let (b, p) = quantize_block(&mixed);
        assert_eq!((b, p[0]), (0, 0x80));
    }

    #[test]
    fn subnormal_and_tiny_amax_blocks_use_scale_zero() {
        // Subnormal amax: scale byte 0, divisor 2^-126, so 2^-130 → 0.0625 → code 0.
        let (b, p) = quantize_block(&[2f32.powi(-130); MX_BLOCK]);
        assert_eq!((b, p), (0, [0; MX_BLOCK_BYTES]));
        // Normal amax 3·2^-126 also clamps to byte 0 and divides by 2^-126 → 3.0 (code 5);
        // it dequantizes with 2^-127 to half the input (SPEC §1.4 NOTE).
        let mut block = [0.0f32; MX_BLOCK];
        block[0] = 3.0 * f32::MIN_POSITIVE;
        block[1] = -f32::MIN_POSITIVE;
        let (b, p) = quantize_block(&block);
        assert_eq!(b, 0);
        assert_eq!(&codes(&p)[..3], &[5, 10, 0]);
    }

    #[test]
    fn inf_block_has_scale_253_and_saturates() {
        let mut block = [1.0f32; MX_BLOCK];
        block[3] = f32::INFINITY;
        block[4] = f32::NEG_INFINITY;
        block[5] = -1.0;
        block[6] = f32::MAX;
        let (b, p) = quantize_block(&block);
        assert_eq!(b, 253);
        let c = codes(&p);
        // 1/2^126 → 0; ±Inf → ±6; f32::MAX / 2^126 ≈ 4 → 4.0 (code 6).
        assert_eq!(&c[..7], &[0, 0, 0, 7, 15, 8, 6]);
    }

    #[test]
    fn nan_block_has_scale_255() {
        let mut block = [1.0f32; MX_BLOCK];
        block[7] = f32::NAN;
        block[8] = f32::INFINITY;
        block[9] = -2.0;
        let (b, p) = quantize_block(&block);
        assert_eq!(b, 255);
        // Finite values divided by +Inf are ±0; the NaN and Inf codes are torchao's garbage.
        let c = codes(&p);
        assert!(c[..7].iter().all(|&x| x == 0));
        assert_eq!(c[9], 8);
    }

    #[test]
    fn floor_mode_saturates_the_largest_values() {
        // amax 7.9 → scale 2^0; 7.9, 5.5 → 6; 5.0 → 4 (tie to even); -5.01 → -6.
        let mut block = [0.0f32; MX_BLOCK];
        block[..5].copy_from_slice(&[7.9, 5.5, 5.0, -5.01, 0.3]);
        let (b, p) = quantize_block(&block);
        assert_eq!(b, 127);
        assert_eq!(&codes(&p)[..5], &[7, 7, 6, 15, 1]);
    }

    #[test]
    fn exact_ties_in_a_scaled_block() {
        // Scale 2^3 (amax 32 → e = 5, b = 130): inputs 8·t hit every tie exactly.
        let ties = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.0];
        let mut block = [0.0f32; MX_BLOCK];
        for (i, t) in ties.iter().enumerate() {
            block[i] = 8.0 * t;
            block[8 + i] = -8.0 * t;
        }
        block[31] = 32.0;
        let (b, p) = quantize_block(&block);
        assert_eq!(b, 130);
        let c = codes(&p);
        assert_eq!(&c[..8], &[0, 2, 2, 4, 4, 6, 6, 6]);
        assert_eq!(&c[8..16], &[8, 10, 10, 12, 12, 14, 14, 14]);
    }

    #[test]
    fn quantize_rejects_bad_dimensions_and_lengths() {
        assert!(matches!(
            quantize_mxfp4(&[0.0; 64], 1, 1, 48),
            Err(MxError::Divisibility { .. })
        ));
        assert!(matches!(
            quantize_mxfp4(&[], 0, 1, 32),
            Err(MxError::Shape { .. })
        ));
        assert_eq!(
            quantize_mxfp4(&[0.0; 63], 1, 2, 32),
            Err(MxError::Length {
                tensor: "values",
                expected: 64,
                actual: 63
            })
        );
        assert!(matches!(
            quantize_mxfp4_bf16(&[0; 64], 1, 0, 64),
            Err(MxError::Divisibility { .. })
        ));
        assert!(matches!(
            quantize_mxfp4_bf16(&[], usize::MAX, 2, 32),
            Err(MxError::Overflow { .. })
        ));
    }

    #[test]
    fn quantize_matches_torchao_golden_bit_for_bit() {
        let g = load_golden();
        let [e, n, k] = g.shape;
        let w = quantize_mxfp4_bf16(&g.input_bf16, e, n, k).expect("golden shape is valid");
        let mismatch = |ours: &[u8], theirs: &[u8], per_row: usize| {
            ours.iter().zip(theirs).position(|(a, b)| a != b).map(|i| {
                let (row, col) = (i / per_row, i % per_row);
                format!(
                    "first mismatch at [e={}, n={}, {col}]: ours {:#04x}, torchao {:#04x}",
                    row / n,
                    row % n,
                    ours[i],
                    theirs[i]
                )
            })
        };
        assert_eq!(w.scales().len(), g.scales.len());
        assert_eq!(w.packed().len(), g.packed.len());
        if let Some(m) = mismatch(w.scales(), &g.scales, k / 32) {
            panic!("scales differ from torchao: {m}");
        }
        if let Some(m) = mismatch(w.packed(), &g.packed, k / 2) {
            panic!("packed differs from torchao: {m}");
        }
        // The f32 path on the widened input is the same computation.
        let widened: Vec<f32> = g.input_bf16.iter().map(|&b| bf16_bits_to_f32(b)).collect();
        assert_eq!(quantize_mxfp4(&widened, e, n, k).expect("valid"), w);
    }

    #[test]
    fn quantize_dequantize_requantize_is_a_fixed_point() {
        let (e, n, k) = (3, 17, 96);
        let mut rng = XorShift::new(0x5EED);
        let mut values = Vec::with_capacity(e * n * k);
        for _ in 0..e * n {
            // One magnitude per row, across most of the normal range.
            let row_scale = 2f32.powi(rng.below(200) as i32 - 100);
            for _ in 0..k {
                let v = match rng.below(16) {
                    0 => 0.0,
                    1 => -0.0,
                    _ => (rng.unit_f32() * 2.0 - 1.0) * 8.0 * row_scale,
                };
                values.push(f32_to_bf16_bits(v));
            }
        }
        let w = quantize_mxfp4_bf16(&values, e, n, k).expect("valid");
        let deq = dequantize_bf16(&w);
        let again = quantize_mxfp4_bf16(&deq, e, n, k).expect("valid");
        assert_eq!(again.scales(), w.scales());
        assert_eq!(again.packed(), w.packed());
        // And the dequantized values are themselves a fixed point of the whole round trip.
        assert_eq!(dequantize_bf16(&again), deq);
    }
}
