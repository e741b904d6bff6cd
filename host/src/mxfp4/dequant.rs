//! The CPU MXFP4 dequantizer: the Strategy-A reference, bit-identical to torchao v0.17.0
//! `MXTensor.dequantize(torch.bfloat16)` (SPEC §1.5).
//!
//! Each element is `e2m1(code) · 2^(b − 127)`, decoded through the shared
//! [`kernels_gpu::shared::mxfp4`] functions the kernels use. The product of a codebook value and
//! a power of two is exact in f32 and in bf16, so the f32 and bf16 outputs agree bit for bit:
//! scale byte 0 means 2^−127, byte 255 gives NaN (bf16 `0x7FC0`), and products beyond the f32
//! range (`b = 254` with a code of magnitude ≥ 2) are ±Inf, as in torchao. Output is `[E, N, K]`
//! row-major (the stored orientation, not the kernels' transposed `[E, K, N]` view).

use kernels_gpu::shared::mxfp4::{MX_BLOCK_BYTES, dequant_bf16_bits, dequant_f32, unpack_pair};

use super::{MxError, MxWeights};

/// Dequantizes every expert to bf16 bits, `[E, N, K]` row-major.
pub fn dequantize_bf16(w: &MxWeights) -> Vec<u16> {
    let mut out = Vec::with_capacity(w.shape().numel());
    decode_into(w.packed(), w.scales(), &mut out, dequant_bf16_bits);
    out
}

/// Dequantizes every expert to f32, `[E, N, K]` row-major (each value exactly the bf16 one).
pub fn dequantize_f32(w: &MxWeights) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.shape().numel());
    decode_into(w.packed(), w.scales(), &mut out, dequant_f32);
    out
}

/// Dequantizes the listed experts, in the given order, to bf16 bits, `[experts.len(), N, K]`:
/// the same as dequantizing `w.select(experts)` without the intermediate copy. An empty list
/// gives an empty vector; an index `≥ E` gives [`MxError::ExpertIndex`].
pub fn dequantize_experts_bf16(w: &MxWeights, experts: &[usize]) -> Result<Vec<u16>, MxError> {
    decode_experts(w, experts, dequant_bf16_bits)
}

/// Dequantizes the listed experts, in the given order, to f32, `[experts.len(), N, K]`
/// (see [`dequantize_experts_bf16`]).
pub fn dequantize_experts_f32(w: &MxWeights, experts: &[usize]) -> Result<Vec<f32>, MxError> {
    decode_experts(w, experts, dequant_f32)
}

/// Shared body of the expert-list dequantizers: checks every index before allocating.
fn decode_experts<T>(
    w: &MxWeights,
    experts: &[usize],
    decode: fn(u8, u8) -> T,
) -> Result<Vec<T>, MxError> {
    let per_expert = w.shape().n() * w.shape().k();
    let mut slices = Vec::with_capacity(experts.len());
    for &e in experts {
        slices.push(w.expert(e)?);
    }
    let mut out = Vec::with_capacity(per_expert.saturating_mul(experts.len()));
    for (packed, scales) in slices {
        decode_into(packed, scales, &mut out, decode);
    }
    Ok(out)
}

/// Appends the decoded elements of contiguous `packed`/`scales` buffers to `out`.
///
/// Because `K % 32 == 0`, the buffers are a sequence of whole blocks in the same order: each
/// 16-byte chunk of `packed` is the block of the scale byte at the same position.
fn decode_into<T>(packed: &[u8], scales: &[u8], out: &mut Vec<T>, decode: fn(u8, u8) -> T) {
    for (block, &scale) in packed.chunks_exact(MX_BLOCK_BYTES).zip(scales) {
        for &byte in block {
            let (even, odd) = unpack_pair(byte);
            out.push(decode(even, scale));
            out.push(decode(odd, scale));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mxfp4::container::test_support::load_golden;
    use kernels_gpu::shared::mxfp4::pack_pair;

    /// One expert, one row, K = 64: codes `0..16` repeated, scale bytes as given.
    fn one_row(scales: [u8; 2]) -> MxWeights {
        let packed: Vec<u8> = (0..32u8)
            .map(|i| pack_pair((2 * i) % 16, (2 * i + 1) % 16))
            .collect();
        MxWeights::new(packed, &[1, 1, 32], scales.to_vec(), &[1, 1, 2]).expect("valid")
    }

    #[test]
    fn dequant_orders_nibbles_low_first_and_applies_block_scales() {
        let w = one_row([127, 129]);
        let f = dequantize_f32(&w);
        assert_eq!(f.len(), 64);
        // Block 0 (scale 1): the codebook in nibble order.
        assert_eq!(&f[..4], &[0.0, 0.5, 1.0, 1.5]);
        assert_eq!(f[15], -6.0);
        assert_eq!(f[8].to_bits(), (-0.0f32).to_bits());
        // Block 1 (scale 4).
        assert_eq!(&f[32..36], &[0.0, 2.0, 4.0, 6.0]);
        assert_eq!(f[39], 24.0);
        let b = dequantize_bf16(&w);
        for (x, y) in f.iter().zip(&b) {
            assert_eq!(x.to_bits(), u32::from(*y) << 16);
        }
    }

    #[test]
    fn dequant_scale_corner_cases() {
        // Byte 0 is 2^-127 (bf16 subnormals), byte 254 overflows to ±Inf for |code| ≥ 2.
        let w = one_row([0, 254]);
        let b = dequantize_bf16(&w);
        assert_eq!(b[1], 0x0020); // 0.5 · 2^-127 = 2^-128
        assert_eq!(b[2], 0x0040); // 2^-127
        assert_eq!(b[15], 0x8140); // -6 · 2^-127 = -1.5 · 2^-125
        assert_eq!(b[32 + 3], 0x7F40); // 1.5 · 2^127
        assert_eq!(b[32 + 4], 0x7F80); // 2 · 2^127 = +Inf
        assert_eq!(b[32 + 15], 0xFF80); // -Inf
        // Byte 255 is NaN for every code, zero included.
        let w = one_row([255, 127]);
        let b = dequantize_bf16(&w);
        assert!(b[..32].iter().all(|&x| x == 0x7FC0));
        assert!(dequantize_f32(&w)[..32].iter().all(|x| x.is_nan()));
        assert!(w.has_nan_scales());
    }

    #[test]
    fn dequant_selected_experts_matches_select() {
        let packed: Vec<u8> = (0..3 * 2 * 32).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<u8> = (0..12).map(|i| 120 + i as u8).collect();
        let w = MxWeights::new(packed, &[3, 2, 32], scales, &[3, 2, 2]).expect("valid");
        let list = [2, 0, 2];
        let sel = w.select(&list).expect("valid");
        assert_eq!(
            dequantize_experts_bf16(&w, &list),
            Ok(dequantize_bf16(&sel))
        );
        let f = dequantize_experts_f32(&w, &list).expect("valid");
        let g = dequantize_f32(&sel);
        assert!(f.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(f.len(), 3 * 2 * 64);
        assert_eq!(dequantize_experts_bf16(&w, &[]), Ok(Vec::new()));
        assert_eq!(
            dequantize_experts_f32(&w, &[1, 3]),
            Err(MxError::ExpertIndex {
                index: 3,
                experts: 3
            })
        );
    }

    #[test]
    fn dequant_matches_torchao_golden_bit_for_bit() {
        let g = load_golden();
        let [e, n, k] = g.shape;
        let w = MxWeights::new(g.packed, &[e, n, k / 2], g.scales, &[e, n, k / 32])
            .expect("golden container is valid");
        let ours = dequantize_bf16(&w);
        assert_eq!(ours.len(), g.dequantized_bf16.len());
        let is_nan = |b: u16| b & 0x7F80 == 0x7F80 && b & 0x007F != 0;
        let nan_count = g.dequantized_bf16.iter().filter(|&&b| is_nan(b)).count();
        assert_eq!(nan_count, 0, "the golden file has no NaN blocks");
        for (i, (&a, &b)) in ours.iter().zip(&g.dequantized_bf16).enumerate() {
            // NaNs compare by class (payloads differ between implementations), all else by bits.
            let same = a == b || (is_nan(a) && is_nan(b));
            assert!(
                same,
                "dequantized [e={}, n={}, k={}]: ours {a:#06x}, torchao {b:#06x}",
                i / (n * k),
                i / k % n,
                i % k
            );
        }
        // The f32 path carries exactly the same values.
        let f = dequantize_f32(&w);
        for (x, &b) in f.iter().zip(&g.dequantized_bf16) {
            assert_eq!(x.to_bits(), u32::from(b) << 16);
        }
    }
}
