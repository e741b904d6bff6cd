//! NVFP4 expert weights on the host (issue #17): the container, its validation, a quantizer
//! bit-exact with torchao 0.18.0's `NVFP4Tensor.to_nvfp4` (single-level and two-level scaling)
//! and the dequantizer of `NVFP4Tensor.dequantize`, checked against a golden file torchao made
//! (`tests/data/golden/nvfp4_golden_torchao.safetensors`, generator beside it).
//!
//! # Format
//!
//! The E2M1 codes of MXFP4 (two per byte, even `k` in the low nibble: `packed [E, N, K/2]`), but
//! one **E4M3** block scale per **16** values (`scales [E, N, K/16]`, the `float8_e4m3fn` byte)
//! and optionally one **f32 tensor scale** per expert (`tensor_scales [E]`, ModelOpt's
//! `weight_scale_2`, torchao's `per_tensor_scale`). A value is
//! `code · (tensor_scale · e4m3(scale))`, the product of the two scales taken in f32 first, as
//! torchao's `get_hp_scales` does; without tensor scales the factor is the E4M3 value alone.
//!
//! # Quantization (torchao `nvfp4_quantize`, all f32)
//!
//! Per block of 16: `amax = max |x|`, `block = amax / 6`.
//! - single-level: `s = e4m3(clamp(block, 2^-6, 448))`, `x' = x · (1 / f32(s))`;
//! - two-level, with the expert's tensor scale `t = amax(|W_e|) / (448 · 6)`
//!   (`per_tensor_amax_to_scale`): `s = e4m3(clamp(block / t, 2^-6, 448))`,
//!   `x' = x · ((1 / t) / f32(s))`;
//!
//! then `code = e2m1(clamp(x', −6, 6))` with the round-to-nearest-even E2M1 conversion the MXFP4
//! quantizer uses ([`crate::mxfp4::f32_to_e2m1`]) and `e4m3` the round-to-nearest-even
//! conversion of a value in `[2^-6, 448]` ([`f32_to_e4m3`]).
//!
//! # Checkpoint layouts (read by `crate::checkpoint::read_nv_experts`; checked in the projects'
//! sources)
//!
//! Per linear (a MoE expert's projection is one linear per expert):
//! - **ModelOpt** (nvidia-modelopt 0.47.0, `torch/quantization/qtensor/nvfp4_tensor.py`):
//!   `weight` u8 `[N, K/2]` (packed `(q[..., 1::2] << 4) | q[..., 0::2]`: even k in the low nibble,
//!   as here), `weight_scale` E4M3 `[N, K/16]`, `weight_scale_2` f32 (scalar) with
//!   `value = code · weight_scale · weight_scale_2` — this container's `tensor_scales`.
//! - **compressed-tensors** (0.20.1): `weight_packed` u8, `weight_scale` E4M3,
//!   `weight_global_scale` f32 = **1 / `weight_scale_2`** (`entrypoints/convert/converters/
//!   modelopt_nvfp4.py`: "1 / weight_scale_2 -> weight_global_scale";
//!   `quantization/lifecycle/forward_helpers.py` divides the block scale by it).
//!
//! Unlike torchao, the quantizer refuses non-finite inputs (torchao would write NaN scales) and,
//! two-level, an expert whose values are all zero (its tensor scale would be 0 and every block
//! scale NaN): typed [`NvError`]s.

pub use crate::error::NvError;
use crate::error::Result;
use crate::mxfp4::f32_to_e2m1;
use crate::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};
use crate::shared::mxfp4::e2m1_to_f32;

use crate::shared::nvfp4::block_factor;
pub use crate::shared::nvfp4::{E4M3_MAX, E4M3_MIN_NORMAL, NV_BLOCK, e4m3_to_f32};
/// The largest E2M1 magnitude.
const E2M1_MAX: f32 = 6.0;

/// The shape `[E, N, K]` of NVFP4 expert weights (`K % 16 == 0`, sizes checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvShape {
    experts: usize,
    n: usize,
    k: usize,
}

impl NvShape {
    /// Checks the dimensions: all positive, `K` a multiple of 16, `E·N·K` representable.
    pub fn new(experts: usize, n: usize, k: usize) -> Result<Self, NvError> {
        let dims = [experts, n, k];
        if dims.contains(&0) {
            return Err(NvError::ZeroDim { dims });
        }
        if !k.is_multiple_of(NV_BLOCK) {
            return Err(NvError::KNotMultipleOfBlock { k });
        }
        if experts
            .checked_mul(n)
            .and_then(|v| v.checked_mul(k))
            .is_none()
        {
            return Err(NvError::TooLarge { dims });
        }
        Ok(Self { experts, n, k })
    }

    /// Experts `E`.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Rows `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduction length `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Values `E·N·K`.
    pub fn values(&self) -> usize {
        self.experts * self.n * self.k
    }

    /// Block scales per row, `K/16`.
    pub fn blocks_per_row(&self) -> usize {
        self.k / NV_BLOCK
    }
}

/// NVFP4 expert weights: `packed [E, N, K/2]`, E4M3 `scales [E, N, K/16]` and optional f32
/// tensor scales `[E, G]`: group `g` of an expert covers its rows `[g·N/G, (g+1)·N/G)` (G = 1:
/// one per expert, torchao's and a single linear's; G = 2: the gate and up halves of a stacked
/// `gate_up` whose halves come from two linears with their own `weight_scale_2`). Built only
/// through [`NvWeights::from_parts`] / [`NvWeights::from_grouped_parts`] (or the quantizer), so
/// every instance is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct NvWeights {
    shape: NvShape,
    packed: Vec<u8>,
    scales: Vec<u8>,
    tensor_scales: Option<Vec<f32>>,
    groups: usize,
}

impl NvWeights {
    /// [`NvWeights::from_grouped_parts`] with one tensor scale per expert.
    pub fn from_parts(
        shape: NvShape,
        packed: Vec<u8>,
        scales: Vec<u8>,
        tensor_scales: Option<Vec<f32>>,
    ) -> Result<Self, NvError> {
        Self::from_grouped_parts(shape, packed, scales, tensor_scales, 1)
    }

    /// Validates and wraps the parts: lengths, block scale bytes (no NaN, no sign bit), tensor
    /// scales (`E·groups` of them, finite, positive) and `groups` (positive, dividing N).
    pub fn from_grouped_parts(
        shape: NvShape,
        packed: Vec<u8>,
        scales: Vec<u8>,
        tensor_scales: Option<Vec<f32>>,
        groups: usize,
    ) -> Result<Self, NvError> {
        let len = |tensor, expected: usize, actual: usize| {
            if expected == actual {
                Ok(())
            } else {
                Err(NvError::Length {
                    tensor,
                    expected,
                    actual,
                })
            }
        };
        if groups == 0 || !shape.n.is_multiple_of(groups) {
            return Err(NvError::ScaleGroups { groups, n: shape.n });
        }
        len("packed", shape.values() / 2, packed.len())?;
        len("scales", shape.values() / NV_BLOCK, scales.len())?;
        if let Some(t) = &tensor_scales {
            len("tensor_scales", shape.experts * groups, t.len())?;
            if let Some((index, &value)) = t
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0))
            {
                return Err(NvError::BadTensorScale {
                    expert: index / groups,
                    index,
                    value,
                });
            }
        }
        if let Some(at) = scales
            .iter()
            .position(|&b| b & 0x80 != 0 || b & 0x7F == 0x7F)
        {
            let per_row = shape.blocks_per_row();
            let per_expert = shape.n * per_row;
            return Err(NvError::BadBlockScale {
                expert: at / per_expert,
                row: (at % per_expert) / per_row,
                block: at % per_row,
                byte: scales[at],
            });
        }
        Ok(Self {
            shape,
            packed,
            scales,
            tensor_scales,
            groups,
        })
    }

    /// The shape.
    pub fn shape(&self) -> NvShape {
        self.shape
    }

    /// `packed [E, N, K/2]`.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// E4M3 block scale bytes `[E, N, K/16]`.
    pub fn scales(&self) -> &[u8] {
        &self.scales
    }

    /// The f32 tensor scales `[E, groups]`, if any.
    pub fn tensor_scales(&self) -> Option<&[f32]> {
        self.tensor_scales.as_deref()
    }

    /// Tensor-scale groups per expert (1 unless built from grouped parts).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Takes the weights apart: `(shape, packed, scales, tensor_scales)` (see
    /// [`NvWeights::groups`] for the tensor scales' grouping).
    pub fn into_parts(self) -> (NvShape, Vec<u8>, Vec<u8>, Option<Vec<f32>>) {
        (self.shape, self.packed, self.scales, self.tensor_scales)
    }

    /// The f32 factor of block `b` (flat block index): `tensor_scale · e4m3(scale)` with the
    /// tensor scale of the block's expert and row group, in f32.
    fn block_factor(&self, b: usize) -> f32 {
        let tensor_scale = match &self.tensor_scales {
            Some(t) => {
                let row = b / self.shape.blocks_per_row(); // flat row e·N + n
                let rows_per_group = self.shape.n / self.groups;
                t[(row / self.shape.n) * self.groups + (row % self.shape.n) / rows_per_group]
            }
            None => 1.0,
        };
        block_factor(self.scales[b], tensor_scale)
    }
}

/// The E4M3 byte of a non-negative finite `x ≤ 448` (the clamped block scales), rounded to
/// nearest with ties to even, as torch's `to(torch.float8_e4m3fn)`: normal values keep 3
/// mantissa bits; below 2^-6 the subnormal grid of 2^-9.
pub fn f32_to_e4m3(x: f32) -> u8 {
    debug_assert!(x.is_finite() && (0.0..=E4M3_MAX).contains(&x));
    if x < E4M3_MIN_NORMAL {
        // Subnormal: the nearest multiple of 2^-9, ties to even (the code is the multiple).
        return (x * 512.0).round_ties_even() as u8;
    }
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127; // −6 ..= 8
    let man = bits & 0x007F_FFFF;
    // Round the 23-bit mantissa to 3 bits, ties to even; a carry moves to the next exponent.
    let shift = 20;
    let kept = man >> shift;
    let rest = man & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let round_up = rest > half || (rest == half && kept & 1 == 1);
    let (mut e, mut m) = (exp + 7, kept + round_up as u32);
    if m == 8 {
        m = 0;
        e += 1;
    }
    ((e as u32) << 3 | m) as u8
}

/// torchao's per-tensor scale of values whose largest magnitude is `amax`:
/// `amax / (448 · 6)` in f32 (`per_tensor_amax_to_scale`).
pub fn tensor_scale_of_amax(amax: f32) -> f32 {
    amax / (E4M3_MAX * E2M1_MAX)
}

/// Quantizes `[experts, n, k]` f32 values to NVFP4, bit-exact with torchao 0.18.0
/// `NVFP4Tensor.to_nvfp4` per expert: single-level (`two_level == false`, no tensor scales) or
/// two-level with each expert's tensor scale `amax(|W_e|) / 2688` (see the module docs).
///
/// Errors: the shape rules of [`NvShape::new`], a `values` length other than `E·N·K`, a
/// non-finite value, and (two-level) an all-zero expert.
pub fn quantize_nvfp4(
    values: &[f32],
    experts: usize,
    n: usize,
    k: usize,
    two_level: bool,
) -> Result<NvWeights, NvError> {
    let shape = NvShape::new(experts, n, k)?;
    if values.len() != shape.values() {
        return Err(NvError::Length {
            tensor: "values",
            expected: shape.values(),
            actual: values.len(),
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(NvError::NonFiniteInput {
            index,
            value: values[index],
        });
    }
    let per_expert = n * k;
    let mut packed = vec![0u8; shape.values() / 2];
    let mut scales = vec![0u8; shape.values() / NV_BLOCK];
    let mut tensor_scales = two_level.then(|| Vec::with_capacity(experts));
    for e in 0..experts {
        let w = &values[e * per_expert..][..per_expert];
        let t = if two_level {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 {
                return Err(NvError::ZeroExpert { expert: e });
            }
            let t = tensor_scale_of_amax(amax);
            if let Some(ts) = tensor_scales.as_mut() {
                ts.push(t);
            }
            Some(t)
        } else {
            None
        };
        for (b, block) in w.chunks_exact(NV_BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let block_scale = amax / E2M1_MAX;
            let (byte, recip) = match t {
                None => {
                    let byte = f32_to_e4m3(block_scale.clamp(E4M3_MIN_NORMAL, E4M3_MAX));
                    (byte, 1.0 / e4m3_to_f32(byte))
                }
                Some(t) => {
                    let byte = f32_to_e4m3((block_scale / t).clamp(E4M3_MIN_NORMAL, E4M3_MAX));
                    (byte, (1.0 / t) / e4m3_to_f32(byte))
                }
            };
            let gb = e * per_expert / NV_BLOCK + b;
            scales[gb] = byte;
            for (i, pair) in block.chunks_exact(2).enumerate() {
                let code = |x: f32| f32_to_e2m1((x * recip).clamp(-E2M1_MAX, E2M1_MAX));
                packed[gb * NV_BLOCK / 2 + i] = code(pair[0]) | code(pair[1]) << 4;
            }
        }
    }
    NvWeights::from_parts(shape, packed, scales, tensor_scales)
}

/// [`quantize_nvfp4`] on bf16 bits (widened exactly, as torchao's `.float()`).
pub fn quantize_nvfp4_bf16(
    bits: &[u16],
    experts: usize,
    n: usize,
    k: usize,
    two_level: bool,
) -> Result<NvWeights, NvError> {
    let values: Vec<f32> = bits.iter().map(|&b| bf16_bits_to_f32(b)).collect();
    quantize_nvfp4(&values, experts, n, k, two_level)
}

/// Dequantizes to f32 `[E, N, K]`: `e2m1(code) · (tensor_scale · e4m3(scale))`, torchao's
/// `dequantize(torch.float32)`.
pub fn dequantize_nvfp4_f32(w: &NvWeights) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.shape.values());
    for (b, bytes) in w.packed.chunks_exact(NV_BLOCK / 2).enumerate() {
        let factor = w.block_factor(b);
        for &byte in bytes {
            out.push(e2m1_to_f32(byte & 0x0F) * factor);
            out.push(e2m1_to_f32(byte >> 4) * factor);
        }
    }
    out
}

/// Dequantizes to bf16 bits `[E, N, K]`: the f32 values of [`dequantize_nvfp4_f32`] rounded to
/// nearest even, torchao's `dequantize(torch.bfloat16)`.
pub fn dequantize_nvfp4_bf16(w: &NvWeights) -> Vec<u16> {
    dequantize_nvfp4_f32(w)
        .into_iter()
        .map(f32_to_bf16_bits)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchao's golden file (see `tests/data/golden/gen_nvfp4_golden.py`).
    struct Golden {
        shape: [usize; 3],
        input: Vec<u16>,
        tensors: std::collections::HashMap<String, Vec<u8>>,
    }

    fn golden() -> Golden {
        use safetensors::SafeTensors;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/golden/nvfp4_golden_torchao.safetensors");
        let bytes = std::fs::read(&path).expect("the NVFP4 golden file");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut tensors = std::collections::HashMap::new();
        let mut shape = [0; 3];
        for (name, t) in st.tensors() {
            if name == "input_bf16" {
                shape = [t.shape()[0], t.shape()[1], t.shape()[2]];
            }
            tensors.insert(name.to_string(), t.data().to_vec());
        }
        let input = tensors["input_bf16"]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Golden {
            shape,
            input,
            tensors,
        }
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn u16s(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn quantizer_and_dequantizer_match_torchao_bit_for_bit() {
        let g = golden();
        let [e, n, k] = g.shape;
        for (two_level, tag) in [(false, "single"), (true, "two_level")] {
            let w = quantize_nvfp4_bf16(&g.input, e, n, k, two_level).unwrap();
            assert_eq!(
                w.packed(),
                &g.tensors[&format!("{tag}_packed")][..],
                "{tag} codes"
            );
            assert_eq!(
                w.scales(),
                &g.tensors[&format!("{tag}_scales")][..],
                "{tag} scales"
            );
            if two_level {
                let want = f32s(&g.tensors["two_level_tensor_scales"]);
                let got = w.tensor_scales().unwrap();
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            } else {
                assert!(w.tensor_scales().is_none());
            }
            let deq_f32 = dequantize_nvfp4_f32(&w);
            let deq_bf16 = dequantize_nvfp4_bf16(&w);
            for x in 0..e {
                let want = f32s(&g.tensors[&format!("dequant_f32_{tag}_{x}")]);
                let got = &deq_f32[x * n * k..][..n * k];
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{tag} f32 dequant of expert {x}"
                );
                let want = u16s(&g.tensors[&format!("dequant_bf16_{tag}_{x}")]);
                assert_eq!(
                    &deq_bf16[x * n * k..][..n * k],
                    &want[..],
                    "{tag} bf16 of {x}"
                );
            }
        }
    }

    #[test]
    fn the_golden_input_exercises_the_edge_blocks() {
        let g = golden();
        let scales = &g.tensors["single_scales"];
        // Block 0 of rows 0 (zeros) and 1 (tiny) clamp at 2^-6, row 2 (huge) at 448.
        let per_row = g.shape[2] / NV_BLOCK;
        assert_eq!(e4m3_to_f32(scales[0]), E4M3_MIN_NORMAL);
        assert_eq!(e4m3_to_f32(scales[per_row]), E4M3_MIN_NORMAL);
        assert_eq!(e4m3_to_f32(scales[2 * per_row]), E4M3_MAX);
        assert_eq!(
            e4m3_to_f32(scales[3 * per_row]),
            1.0,
            "the ties block has scale 1"
        );
    }

    #[test]
    fn e4m3_conversions_round_trip_and_round_to_even() {
        for b in 0u8..=0x7E {
            let v = e4m3_to_f32(b);
            assert!(v.is_finite() && v >= 0.0);
            assert_eq!(f32_to_e4m3(v), b, "byte {b:#04x} = {v}");
            assert_eq!(e4m3_to_f32(b | 0x80), -v);
        }
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        // Ties: 1 + 1/16 lies between 1 and 1.125 → even (1); 1 + 3/16 → 1.25 (even mantissa 2).
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875)), 1.25);
        // A carry into the next binade: 1.9375 rounds up to 2.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.9375)), 2.0);
        // Subnormals: 2^-9 steps, ties to even.
        assert_eq!(f32_to_e4m3(1.5 / 512.0), 2);
        assert_eq!(f32_to_e4m3(2.5 / 512.0), 2);
    }

    #[test]
    fn every_validation_rule_is_a_typed_error() {
        assert!(matches!(
            NvShape::new(0, 4, 16),
            Err(NvError::ZeroDim { .. })
        ));
        assert_eq!(
            NvShape::new(1, 4, 24),
            Err(NvError::KNotMultipleOfBlock { k: 24 })
        );
        assert!(matches!(
            NvShape::new(usize::MAX, 2, 16),
            Err(NvError::TooLarge { .. })
        ));
        let three_rows = NvShape::new(1, 3, 16).unwrap();
        assert_eq!(
            NvWeights::from_grouped_parts(three_rows, vec![0; 24], vec![0x38; 3], None, 2),
            Err(NvError::ScaleGroups { groups: 2, n: 3 })
        );
        let shape = NvShape::new(2, 2, 32).unwrap();
        let ok = |scales: Vec<u8>, t: Option<Vec<f32>>| {
            NvWeights::from_parts(shape, vec![0; 64], scales, t)
        };
        assert!(ok(vec![0x38; 8], Some(vec![1.0, 0.5])).is_ok());
        assert!(matches!(
            NvWeights::from_parts(shape, vec![0; 63], vec![0x38; 8], None),
            Err(NvError::Length {
                tensor: "packed",
                ..
            })
        ));
        assert!(matches!(
            ok(vec![0x38; 7], None),
            Err(NvError::Length {
                tensor: "scales",
                ..
            })
        ));
        assert!(matches!(
            ok(vec![0x38; 8], Some(vec![1.0])),
            Err(NvError::Length {
                tensor: "tensor_scales",
                ..
            })
        ));
        let mut nan = vec![0x38; 8];
        nan[5] = 0x7F;
        assert_eq!(
            ok(nan, None),
            Err(NvError::BadBlockScale {
                expert: 1,
                row: 0,
                block: 1,
                byte: 0x7F
            })
        );
        let mut negative = vec![0x38; 8];
        negative[2] = 0xB8;
        let err = ok(negative, None).unwrap_err();
        assert!(matches!(
            err,
            NvError::BadBlockScale {
                expert: 0,
                row: 1,
                block: 0,
                ..
            }
        ));
        assert!(err.to_string().contains("negative"));
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                ok(vec![0x38; 8], Some(vec![1.0, bad])),
                Err(NvError::BadTensorScale { expert: 1, .. })
            ));
        }
        let mut values = vec![1.0f32; 64];
        values[9] = f32::NAN;
        assert!(matches!(
            quantize_nvfp4(&values, 2, 2, 16, false),
            Err(NvError::NonFiniteInput { index: 9, .. })
        ));
        let mut values = vec![0.0f32; 64];
        values[40] = 1.0;
        assert!(quantize_nvfp4(&values, 2, 2, 16, false).is_ok());
        assert_eq!(
            quantize_nvfp4(&values, 2, 2, 16, true),
            Err(NvError::ZeroExpert { expert: 0 })
        );
        assert!(matches!(
            quantize_nvfp4(&values[..10], 2, 2, 16, true),
            Err(NvError::Length {
                tensor: "values",
                ..
            })
        ));
    }

    #[test]
    fn dequantized_values_are_close_to_the_input() {
        // A quantization round trip loses at most half an E2M1 step of each block's scale.
        let mut rng = crate::test_rng::XorShift::new(7);
        let (e, n, k) = (2, 8, 64);
        let values = rng.vec(e * n * k, 3.0);
        for two_level in [false, true] {
            let w = quantize_nvfp4(&values, e, n, k, two_level).unwrap();
            let deq = dequantize_nvfp4_f32(&w);
            for (block, (x, y)) in values.chunks(16).zip(deq.chunks(16)).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in x.iter().zip(y) {
                    assert!(
                        (a - b).abs() <= amax / 6.0 * 1.0 * 1.07,
                        "block {block}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn grouped_tensor_scales_apply_to_their_rows() {
        // One expert, rows 0–1 in group 0 (scale 2), rows 2–3 in group 1 (scale 3); every code 1.0.
        let shape = NvShape::new(1, 4, 16).unwrap();
        let w = NvWeights::from_grouped_parts(
            shape,
            vec![0x22; 32],
            vec![0x38; 4],
            Some(vec![2.0, 3.0]),
            2,
        )
        .unwrap();
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        let deq = dequantize_nvfp4_f32(&w);
        assert!(deq[..32].iter().all(|&v| v == 2.0));
        assert!(deq[32..].iter().all(|&v| v == 3.0));
        assert_eq!(w.groups(), 2);
    }
}
