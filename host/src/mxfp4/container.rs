//! The MXFP4 weight container and its validation (SPEC §1.3, §1.6).
//!
//! A weight `W_store[E, N, K]` (block axis K, the contraction axis) is held as two byte buffers:
//! `packed [E, N, K/2]` (two E2M1 codes per byte, even k in the low nibble) and
//! `scales [E, N, K/32]` (one E8M0 byte per 32 consecutive k). [`validate_mx`] checks what a
//! caller declares about such a pair (dtype, shape, strides, device) and derives the
//! [`MxShape`]; [`MxWeights`] is the validated, host-resident container built on it.
//!
//! Unlike the reference (which only asserts `block_size == 32` and a `uint8` packed tensor, and
//! silently reinterprets any scale dtype as bytes), every rule of SPEC §1.6 is enforced and
//! reported as a typed [`MxError`].

use kernels_gpu::shared::mxfp4::{E8M0_NAN, MX_BLOCK, MX_BLOCK_BYTES};

use super::MxError;
use crate::tensor::{DType, DeviceLoc, TensorMeta};

/// Which axis the 32-element scale blocks run along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MxLayout {
    /// Blocks along K, the contraction axis: `packed [E, N, K/2]`, `scales [E, N, K/32]`
    /// (the reference's `FWD`, and the only layout: the dX kernel reads the same buffers).
    #[default]
    Fwd,
}

impl MxLayout {
    /// Every layout.
    pub const ALL: [MxLayout; 1] = [MxLayout::Fwd];

    /// `fwd`.
    pub const fn name(self) -> &'static str {
        match self {
            MxLayout::Fwd => "fwd",
        }
    }
}

impl core::fmt::Display for MxLayout {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for MxLayout {
    type Err = MxError;
    /// Parses [`MxLayout::name`]. Errors: [`MxError::Layout`] naming the accepted names.
    fn from_str(s: &str) -> Result<Self, MxError> {
        MxLayout::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                let names: Vec<String> = MxLayout::ALL
                    .iter()
                    .map(|l| format!("{:?}", l.name()))
                    .collect();
                MxError::Layout(format!(
                    "unknown MX layout {s:?} (expected {})",
                    names.join(" or ")
                ))
            })
    }
}

/// Validated dimensions of an MXFP4 weight `[experts, n, k]` (SPEC §1.3).
///
/// Invariants (checked by [`MxShape::new`]): `experts ≥ 1`, `n ≥ 1`, `k ≥ 32`, `k % 32 == 0`,
/// and `experts · n · k` fits in `usize`, so every count derived below is exact and cannot
/// overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MxShape {
    experts: usize,
    n: usize,
    k: usize,
}

impl MxShape {
    /// Checks and builds a shape. Errors, in this order: `k == 0`, `n == 0` or `k % 32 != 0`
    /// → [`MxError::Divisibility`]; `experts == 0` → [`MxError::Shape`]; an element count
    /// `experts · n · k` that overflows `usize` → [`MxError::Overflow`].
    pub fn new(experts: usize, n: usize, k: usize) -> Result<Self, MxError> {
        if k == 0 {
            return Err(MxError::Divisibility {
                what: "K must be positive, got K = 0".into(),
            });
        }
        if n == 0 {
            return Err(MxError::Divisibility {
                what: "N must be positive, got N = 0".into(),
            });
        }
        if !k.is_multiple_of(MX_BLOCK) {
            return Err(MxError::Divisibility {
                what: format!("K = {k} is not a multiple of the MX block size {MX_BLOCK}"),
            });
        }
        if experts == 0 {
            return Err(MxError::Shape {
                tensor: "packed",
                expected: vec![1, n, k / 2],
                actual: vec![0, n, k / 2],
            });
        }
        if experts
            .checked_mul(n)
            .and_then(|en| en.checked_mul(k))
            .is_none()
        {
            return Err(MxError::Overflow {
                tensor: "weights",
                shape: vec![experts, n, k],
            });
        }
        Ok(MxShape { experts, n, k })
    }

    /// Number of experts `E` (or `E_a` for a compact selection).
    #[inline]
    pub const fn experts(&self) -> usize {
        self.experts
    }

    /// Output dimension `N` (rows of each expert's stored weight).
    #[inline]
    pub const fn n(&self) -> usize {
        self.n
    }

    /// Contraction dimension `K` (the block axis).
    #[inline]
    pub const fn k(&self) -> usize {
        self.k
    }

    /// Scale blocks per row: `K / 32`.
    #[inline]
    pub const fn blocks_per_row(&self) -> usize {
        self.k / MX_BLOCK
    }

    /// Logical elements `E · N · K` of the dequantized weight.
    #[inline]
    pub const fn numel(&self) -> usize {
        self.experts * self.n * self.k
    }

    /// Length in bytes of `packed`: `E · N · K/2`.
    #[inline]
    pub const fn packed_len(&self) -> usize {
        self.experts * self.expert_packed_len()
    }

    /// Length in bytes of `scales`: `E · N · K/32`.
    #[inline]
    pub const fn scales_len(&self) -> usize {
        self.experts * self.expert_scales_len()
    }

    /// Bytes of one expert's packed codes: `N · K/2`.
    #[inline]
    pub const fn expert_packed_len(&self) -> usize {
        self.n * (self.k / 2)
    }

    /// Bytes of one expert's scales: `N · K/32`.
    #[inline]
    pub const fn expert_scales_len(&self) -> usize {
        self.n * self.blocks_per_row()
    }

    /// Shape of `packed`: `[E, N, K/2]`.
    #[inline]
    pub const fn packed_shape(&self) -> [usize; 3] {
        [self.experts, self.n, self.k / 2]
    }

    /// Shape of `scales`: `[E, N, K/32]`.
    #[inline]
    pub const fn scales_shape(&self) -> [usize; 3] {
        [self.experts, self.n, self.blocks_per_row()]
    }

    /// Logical shape of the weight: `[E, N, K]`.
    #[inline]
    pub const fn logical_shape(&self) -> [usize; 3] {
        [self.experts, self.n, self.k]
    }

    /// Total bytes of both buffers: `E · (N·K/2 + N·K/32)`.
    #[inline]
    pub const fn bytes(&self) -> usize {
        self.packed_len() + self.scales_len()
    }

    /// The same `N`, `K` with a different expert count (for a selection of experts).
    fn with_experts(&self, experts: usize) -> Result<Self, MxError> {
        MxShape::new(experts, self.n, self.k)
    }
}

/// Validates declared `packed`/`scales` tensors against SPEC §1.6 and returns their shape.
///
/// `K` is derived as `2 · packed.shape[2]`, `N` as `packed.shape[1]`, `E_a` as
/// `packed.shape[0]`. Checks run in this order, and the first failure is returned:
///
/// 1. `block_size == 32`, else [`MxError::UnsupportedBlockSize`] (16 is reserved for NVFP4).
/// 2. `layout` is [`MxLayout::Fwd`] and the scales are not swizzled, else [`MxError::Layout`].
///    (These describe how everything else is interpreted, so they come before any shape check: a
///    swizzled scale tensor has a padded shape that would otherwise be misreported.)
/// 3. `packed` dtype is [`DType::U8`]; then `scales` dtype is [`DType::U8`] or [`DType::E8M0`];
///    else [`MxError::DType`]. Bytes of other types are never reinterpreted.
/// 4. `packed` rank 3, then `scales` rank 3, else [`MxError::Rank`].
/// 5. `K > 0`, `N > 0`, `K % 32 == 0` (in that order), else [`MxError::Divisibility`].
/// 6. `E_a ≥ 1`, then `scales.shape == [E_a, N, K/32]` (which includes the same leading dim),
///    else [`MxError::Shape`]; an element count that overflows `usize` gives
///    [`MxError::Overflow`].
/// 7. Both on the same device, else [`MxError::Device`].
/// 8. `packed`, then `scales`: one stride per dimension and innermost stride 1 (the kernels
///    read K byte-contiguously), else [`MxError::Layout`]. The stride of a size-1 innermost
///    dimension (scales with `K = 32`) is never used and is not checked, as in PyTorch's
///    `is_contiguous`. Outer strides are free (a strided expert or row view is accepted).
pub fn validate_mx(
    packed: &TensorMeta,
    scales: &TensorMeta,
    block_size: usize,
    layout: MxLayout,
    scales_swizzled: bool,
) -> Result<MxShape, MxError> {
    // 1. Block size.
    if block_size != MX_BLOCK {
        return Err(MxError::UnsupportedBlockSize(block_size));
    }

    // 2. Declared layout.
    match layout {
        MxLayout::Fwd => {}
    }
    if scales_swizzled {
        return Err(MxError::Layout(
            "swizzled (blocked) scales are not supported; pass scales as plain [E, N, K/32]".into(),
        ));
    }

    // 3. Element types.
    if packed.dtype != DType::U8 {
        return Err(MxError::DType {
            tensor: "packed",
            expected: "u8",
            actual: packed.dtype.to_string(),
        });
    }
    if !matches!(scales.dtype, DType::U8 | DType::E8M0) {
        return Err(MxError::DType {
            tensor: "scales",
            expected: "u8 or e8m0",
            actual: scales.dtype.to_string(),
        });
    }

    // 4. Ranks.
    for (tensor, meta) in [("packed", packed), ("scales", scales)] {
        if meta.rank() != 3 {
            return Err(MxError::Rank {
                tensor,
                expected: 3,
                actual: meta.rank(),
            });
        }
    }

    // 5. and 6. Dimensions, then agreement of the two shapes.
    let [experts, n, half_k] = [packed.shape[0], packed.shape[1], packed.shape[2]];
    let k = half_k.checked_mul(2).ok_or_else(|| MxError::Overflow {
        tensor: "packed",
        shape: packed.shape.clone(),
    })?;
    let shape = MxShape::new(experts, n, k)?;
    let expected_scales = shape.scales_shape();
    if scales.shape[..] != expected_scales[..] {
        return Err(MxError::Shape {
            tensor: "scales",
            expected: expected_scales.to_vec(),
            actual: scales.shape.clone(),
        });
    }

    // 7. Device.
    if packed.device != scales.device {
        return Err(MxError::Device {
            packed: packed.device.to_string(),
            scales: scales.device.to_string(),
        });
    }

    // 8. Memory layout of the block axis.
    check_innermost_stride("packed", packed)?;
    check_innermost_stride("scales", scales)?;

    Ok(shape)
}

/// Rule 8 of [`validate_mx`] for one tensor (rank already checked to be 3).
fn check_innermost_stride(tensor: &'static str, meta: &TensorMeta) -> Result<(), MxError> {
    if meta.strides.len() != meta.shape.len() {
        return Err(MxError::Layout(format!(
            "{tensor}: {} strides declared for a rank-{} tensor",
            meta.strides.len(),
            meta.shape.len()
        )));
    }
    match (meta.shape.last(), meta.strides.last()) {
        (Some(&extent), Some(&stride)) if extent != 1 && stride != 1 => Err(MxError::Layout(
            format!("{tensor}: innermost (K) stride is {stride} elements, must be 1"),
        )),
        _ => Ok(()),
    }
}

/// A validated, host-resident MXFP4 weight `[E, N, K]`: `packed [E, N, K/2]` and
/// `scales [E, N, K/32]`, both contiguous (SPEC §1.3).
///
/// Every constructor checks the shape rules of [`validate_mx`] and the buffer lengths, so the
/// accessors never fail on a well-formed value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MxWeights {
    shape: MxShape,
    packed: Vec<u8>,
    scales: Vec<u8>,
}

impl MxWeights {
    /// Builds a container from contiguous host buffers and their declared shapes.
    ///
    /// The shapes are validated by [`validate_mx`] as contiguous CPU tensors of `u8` with block
    /// size 32 and layout [`MxLayout::Fwd`]; then each buffer's length must equal its shape's
    /// element count, else [`MxError::Length`].
    pub fn new(
        packed: Vec<u8>,
        packed_shape: &[usize],
        scales: Vec<u8>,
        scales_shape: &[usize],
    ) -> Result<Self, MxError> {
        let packed_meta = TensorMeta::contiguous(DType::U8, packed_shape, DeviceLoc::Cpu);
        let scales_meta = TensorMeta::contiguous(DType::U8, scales_shape, DeviceLoc::Cpu);
        let shape = validate_mx(&packed_meta, &scales_meta, MX_BLOCK, MxLayout::Fwd, false)?;
        Self::from_shape(shape, packed, scales)
    }

    /// Builds a container from an already validated shape and contiguous buffers; only the
    /// buffer lengths are checked ([`MxError::Length`], `packed` first).
    pub fn from_shape(shape: MxShape, packed: Vec<u8>, scales: Vec<u8>) -> Result<Self, MxError> {
        if packed.len() != shape.packed_len() {
            return Err(MxError::Length {
                tensor: "packed",
                expected: shape.packed_len(),
                actual: packed.len(),
            });
        }
        if scales.len() != shape.scales_len() {
            return Err(MxError::Length {
                tensor: "scales",
                expected: shape.scales_len(),
                actual: scales.len(),
            });
        }
        Ok(MxWeights {
            shape,
            packed,
            scales,
        })
    }

    /// The validated dimensions.
    #[inline]
    pub fn shape(&self) -> MxShape {
        self.shape
    }

    /// All packed codes, `[E, N, K/2]` row-major.
    #[inline]
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// All scale bytes, `[E, N, K/32]` row-major.
    #[inline]
    pub fn scales(&self) -> &[u8] {
        &self.scales
    }

    /// One expert's `(packed [N, K/2], scales [N, K/32])`, or [`MxError::ExpertIndex`] if
    /// `expert ≥ E`.
    pub fn expert(&self, expert: usize) -> Result<(&[u8], &[u8]), MxError> {
        if expert >= self.shape.experts {
            return Err(MxError::ExpertIndex {
                index: expert,
                experts: self.shape.experts,
            });
        }
        let p = self.shape.expert_packed_len();
        let s = self.shape.expert_scales_len();
        Ok((
            &self.packed[expert * p..(expert + 1) * p],
            &self.scales[expert * s..(expert + 1) * s],
        ))
    }

    /// Gathers the listed experts, in the given order, into a new compact container
    /// (`qdata[active]`, `scale[active]` in the reference). Duplicates are copied as given.
    ///
    /// Errors: an empty list → [`MxError::Shape`] (a container holds at least one expert); an
    /// index `≥ E` → [`MxError::ExpertIndex`].
    pub fn select(&self, experts: &[usize]) -> Result<MxWeights, MxError> {
        let shape = self.shape.with_experts(experts.len())?;
        let mut packed = Vec::with_capacity(shape.packed_len());
        let mut scales = Vec::with_capacity(shape.scales_len());
        for &e in experts {
            let (p, s) = self.expert(e)?;
            packed.extend_from_slice(p);
            scales.extend_from_slice(s);
        }
        Ok(MxWeights {
            shape,
            packed,
            scales,
        })
    }

    /// Whether any block has the NaN scale byte (255); such blocks dequantize to NaN.
    pub fn has_nan_scales(&self) -> bool {
        self.scales.contains(&E8M0_NAN)
    }

    /// The first block (in `[expert, row, block]` order) whose scale byte is 255 (E8M0 NaN), as
    /// `(expert, row, block)`.
    pub fn first_nan_scale(&self) -> Option<(usize, usize, usize)> {
        let at = self.scales.iter().position(|&b| b == E8M0_NAN)?;
        let per_row = self.shape.blocks_per_row();
        let per_expert = self.shape.expert_scales_len();
        Some((at / per_expert, (at % per_expert) / per_row, at % per_row))
    }

    /// Rejects NaN scales: [`MxError::NanScale`] naming the first block with scale byte 255.
    ///
    /// What the other extreme bytes do, for callers deciding what to accept: byte 0 is 2^-127 (a
    /// bf16 subnormal, kept). Bytes 253 and 254 are the finite scales 2^126 and 2^127, but the
    /// product code × scale exceeds the largest bf16 (and f32) value, about 3.4e38, and becomes
    /// ±Inf for codes of magnitude 4 and 6 under byte 253 and of magnitude 2 and more under byte
    /// 254 (smaller codes stay finite), in the kernels and the CPU dequantizer alike. Those bytes
    /// are accepted: torchao's quantizer writes them for blocks holding huge or infinite values.
    pub fn check_no_nan_scales(&self) -> Result<(), MxError> {
        match self.first_nan_scale() {
            Some((expert, row, block)) => Err(MxError::NanScale { expert, row, block }),
            None => Ok(()),
        }
    }

    /// Takes the container apart: `(shape, packed, scales)`.
    pub fn into_parts(self) -> (MxShape, Vec<u8>, Vec<u8>) {
        (self.shape, self.packed, self.scales)
    }
}

// A packed block is exactly half a scale block's elements; the dequantizer and quantizer walk
// `packed` in `MX_BLOCK_BYTES` chunks aligned with `scales`.
const _: () = assert!(MX_BLOCK_BYTES * 2 == MX_BLOCK);

/// Helpers shared by the unit tests of the `mxfp4` modules: the torchao golden file and a small
/// deterministic PRNG.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};

    /// File name of the torchao golden data.
    pub(crate) const GOLDEN_FILE: &str = "mxfp4_golden_torchao.safetensors";

    /// The golden tensors of `shared/golden/README.md`.
    pub(crate) struct Golden {
        /// `[E, N, K]` of `input_bf16`.
        pub(crate) shape: [usize; 3],
        /// `input_bf16`, bf16 bits.
        pub(crate) input_bf16: Vec<u16>,
        /// `packed` `[E, N, K/2]`.
        pub(crate) packed: Vec<u8>,
        /// `scales` `[E, N, K/32]`.
        pub(crate) scales: Vec<u8>,
        /// `dequantized_bf16`, bf16 bits.
        pub(crate) dequantized_bf16: Vec<u16>,
    }

    /// Finds the golden file: `$MXMOE_GOLDEN` (a file, or a folder holding it) if set, else the
    /// vendored copy in `tests/data/golden/`, else `shared/golden/` or `../shared/golden/`, each
    /// searched above `CARGO_MANIFEST_DIR`. Panics with a clear message if it is missing.
    pub(crate) fn golden_path() -> PathBuf {
        if let Some(env) = std::env::var_os("MXMOE_GOLDEN") {
            let p = PathBuf::from(env);
            let p = if p.is_dir() { p.join(GOLDEN_FILE) } else { p };
            assert!(
                p.is_file(),
                "MXMOE_GOLDEN is set but {} is not a file (it must name {GOLDEN_FILE} or its folder)",
                p.display()
            );
            return p;
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in manifest.ancestors() {
            for rel in ["tests/data/golden", "shared/golden", "../shared/golden"] {
                let candidate = dir.join(rel).join(GOLDEN_FILE);
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        panic!(
            "golden file {GOLDEN_FILE} not found: looked for tests/data/golden/, shared/golden/ and ../shared/golden/ \
             in every folder above {}; set MXMOE_GOLDEN to its path",
            manifest.display()
        );
    }

    fn le_u16(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    /// Loads and sanity-checks the golden tensors.
    pub(crate) fn load_golden() -> Golden {
        use safetensors::{Dtype, SafeTensors};
        let path = golden_path();
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("golden file {} is not safetensors: {e}", path.display()));
        let get = |name: &str, dtype: Dtype| {
            let t = st
                .tensor(name)
                .unwrap_or_else(|e| panic!("golden file lacks tensor {name}: {e}"));
            assert_eq!(t.dtype(), dtype, "golden tensor {name} dtype");
            (t.shape().to_vec(), t.data().to_vec())
        };
        let (in_shape, input) = get("input_bf16", Dtype::BF16);
        let (p_shape, packed) = get("packed", Dtype::U8);
        let (s_shape, scales) = get("scales", Dtype::U8);
        let (d_shape, deq) = get("dequantized_bf16", Dtype::BF16);
        assert_eq!(in_shape.len(), 3, "golden input rank");
        let shape = [in_shape[0], in_shape[1], in_shape[2]];
        assert_eq!(
            p_shape,
            vec![shape[0], shape[1], shape[2] / 2],
            "golden packed shape"
        );
        assert_eq!(
            s_shape,
            vec![shape[0], shape[1], shape[2] / 32],
            "golden scales shape"
        );
        assert_eq!(d_shape, in_shape, "golden dequantized shape");
        Golden {
            shape,
            input_bf16: le_u16(&input),
            packed,
            scales,
            dequantized_bf16: le_u16(&deq),
        }
    }

    pub(crate) use crate::test_rng::XorShift;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dtype: DType, shape: &[usize]) -> TensorMeta {
        TensorMeta::contiguous(dtype, shape, DeviceLoc::Cuda(0))
    }

    /// A valid pair for `E = 2, N = 3, K = 64`.
    fn good() -> (TensorMeta, TensorMeta) {
        (meta(DType::U8, &[2, 3, 32]), meta(DType::E8M0, &[2, 3, 2]))
    }

    fn check(p: &TensorMeta, s: &TensorMeta) -> Result<MxShape, MxError> {
        validate_mx(p, s, 32, MxLayout::Fwd, false)
    }

    #[test]
    fn validate_accepts_the_spec_layout_and_derives_the_shape() {
        let (p, s) = good();
        let shape = check(&p, &s).expect("valid");
        assert_eq!((shape.experts(), shape.n(), shape.k()), (2, 3, 64));
        // Plain u8 scales are accepted too.
        let s_u8 = meta(DType::U8, &[2, 3, 2]);
        assert_eq!(check(&p, &s_u8), Ok(shape));
    }

    #[test]
    fn shape_helpers_count_bytes() {
        let s = MxShape::new(4, 1024, 2048).expect("valid");
        assert_eq!(s.packed_shape(), [4, 1024, 1024]);
        assert_eq!(s.scales_shape(), [4, 1024, 64]);
        assert_eq!(s.logical_shape(), [4, 1024, 2048]);
        assert_eq!(s.packed_len(), 4 * 1024 * 1024);
        assert_eq!(s.scales_len(), 4 * 1024 * 64);
        assert_eq!(s.numel(), 4 * 1024 * 2048);
        assert_eq!(s.blocks_per_row(), 64);
        assert_eq!(
            s.bytes(),
            4 * kernels_gpu::shared::mxfp4::expert_bytes(1024, 2048)
        );
    }

    #[test]
    fn validate_rejects_block_sizes_other_than_32() {
        let (p, s) = good();
        for bs in [0, 16, 64] {
            assert_eq!(
                validate_mx(&p, &s, bs, MxLayout::Fwd, false),
                Err(MxError::UnsupportedBlockSize(bs))
            );
        }
    }

    #[test]
    fn validate_rejects_non_byte_dtypes() {
        let (p, s) = good();
        for dt in [DType::E8M0, DType::BF16, DType::F32, DType::I32] {
            let bad = TensorMeta {
                dtype: dt,
                ..p.clone()
            };
            assert!(
                matches!(
                    check(&bad, &s),
                    Err(MxError::DType {
                        tensor: "packed",
                        ..
                    })
                ),
                "packed {dt}"
            );
        }
        for dt in [DType::BF16, DType::F16, DType::F32, DType::I32, DType::I64] {
            let bad = TensorMeta {
                dtype: dt,
                ..s.clone()
            };
            let err = check(&p, &bad);
            assert!(
                matches!(
                    err,
                    Err(MxError::DType {
                        tensor: "scales",
                        ..
                    })
                ),
                "scales {dt}"
            );
        }
    }

    #[test]
    fn validate_rejects_wrong_rank() {
        let (p, s) = good();
        let flat = meta(DType::U8, &[6, 32]);
        assert_eq!(
            check(&flat, &s),
            Err(MxError::Rank {
                tensor: "packed",
                expected: 3,
                actual: 2
            })
        );
        let deep = meta(DType::U8, &[2, 3, 2, 1]);
        assert_eq!(
            check(&p, &deep),
            Err(MxError::Rank {
                tensor: "scales",
                expected: 3,
                actual: 4
            })
        );
    }

    #[test]
    fn validate_rejects_bad_k_and_n() {
        let s = meta(DType::U8, &[2, 3, 0]);
        // K = 0.
        let p = meta(DType::U8, &[2, 3, 0]);
        assert!(matches!(check(&p, &s), Err(MxError::Divisibility { .. })));
        // N = 0.
        let p = meta(DType::U8, &[2, 0, 16]);
        assert!(matches!(check(&p, &s), Err(MxError::Divisibility { .. })));
        // K = 48: even but not a multiple of 32.
        let p = meta(DType::U8, &[2, 3, 24]);
        let s = meta(DType::U8, &[2, 3, 1]);
        assert!(matches!(check(&p, &s), Err(MxError::Divisibility { .. })));
        // K = 16.
        let p = meta(DType::U8, &[2, 3, 8]);
        assert!(matches!(check(&p, &s), Err(MxError::Divisibility { .. })));
    }

    #[test]
    fn validate_rejects_disagreeing_shapes() {
        let (p, _) = good();
        // No experts.
        let p0 = meta(DType::U8, &[0, 3, 32]);
        let s0 = meta(DType::U8, &[0, 3, 2]);
        assert!(matches!(
            check(&p0, &s0),
            Err(MxError::Shape {
                tensor: "packed",
                ..
            })
        ));
        // Wrong scale count per row, wrong N, wrong leading dim.
        for bad in [[2, 3, 1], [2, 3, 4], [2, 4, 2], [1, 3, 2], [3, 3, 2]] {
            let s = meta(DType::U8, &bad);
            assert_eq!(
                check(&p, &s),
                Err(MxError::Shape {
                    tensor: "scales",
                    expected: vec![2, 3, 2],
                    actual: bad.to_vec()
                })
            );
        }
    }

    #[test]
    fn validate_rejects_overflowing_shapes() {
        let p = meta(DType::U8, &[usize::MAX, 2, 16]);
        let s = meta(DType::U8, &[usize::MAX, 2, 1]);
        assert!(matches!(check(&p, &s), Err(MxError::Overflow { .. })));
        let p = meta(DType::U8, &[1, 1, usize::MAX / 2 + 1]);
        assert!(matches!(
            check(&p, &s),
            Err(MxError::Overflow {
                tensor: "packed",
                ..
            })
        ));
    }

    #[test]
    fn validate_rejects_mixed_devices() {
        let (p, s) = good();
        for (dp, ds) in [
            (DeviceLoc::Cpu, DeviceLoc::Cuda(0)),
            (DeviceLoc::Cuda(0), DeviceLoc::Cuda(1)),
        ] {
            let p = TensorMeta {
                device: dp,
                ..p.clone()
            };
            let s = TensorMeta {
                device: ds,
                ..s.clone()
            };
            assert_eq!(
                check(&p, &s),
                Err(MxError::Device {
                    packed: dp.to_string(),
                    scales: ds.to_string()
                })
            );
        }
    }

    #[test]
    fn validate_rejects_non_unit_innermost_stride() {
        let (p, s) = good();
        let mut bad_p = p.clone();
        bad_p.strides = vec![192, 64, 2];
        assert!(matches!(check(&bad_p, &s), Err(MxError::Layout(m)) if m.starts_with("packed")));
        let mut bad_s = s.clone();
        bad_s.strides = vec![3, 1, 3]; // a transposed view
        assert!(matches!(check(&p, &bad_s), Err(MxError::Layout(m)) if m.starts_with("scales")));
        let mut short = s.clone();
        short.strides.pop();
        assert!(matches!(check(&p, &short), Err(MxError::Layout(_))));
    }

    #[test]
    fn validate_accepts_strided_outer_dims_and_unit_innermost_extent() {
        // A view of every other expert of a larger buffer keeps K contiguous: accepted.
        let (mut p, mut s) = good();
        p.strides = vec![2 * 96, 32, 1];
        s.strides = vec![2 * 6, 2, 1];
        assert!(check(&p, &s).is_ok());
        // K = 32: scales' innermost extent is 1, its stride is never used.
        let p = meta(DType::U8, &[2, 3, 16]);
        let mut s = meta(DType::U8, &[2, 3, 1]);
        s.strides = vec![3, 1, 7];
        assert!(check(&p, &s).is_ok());
    }

    #[test]
    fn validate_rejects_swizzled_scales() {
        let (p, s) = good();
        assert!(matches!(
            validate_mx(&p, &s, 32, MxLayout::Fwd, true),
            Err(MxError::Layout(_))
        ));
    }

    #[test]
    fn validate_reports_failures_in_documented_order() {
        // Start with a pair that breaks every rule and fix one rule at a time.
        let mut p = TensorMeta {
            dtype: DType::F32,
            shape: vec![3, 24],
            strides: vec![24, 2],
            device: DeviceLoc::Cpu,
        };
        let mut s = TensorMeta {
            dtype: DType::BF16,
            shape: vec![5],
            strides: vec![2],
            device: DeviceLoc::Cuda(0),
        };
        let run = |p: &TensorMeta, s: &TensorMeta, bs: usize, swz: bool| {
            validate_mx(p, s, bs, MxLayout::Fwd, swz)
        };
        assert!(matches!(
            run(&p, &s, 16, true),
            Err(MxError::UnsupportedBlockSize(16))
        ));
        assert!(matches!(run(&p, &s, 32, true), Err(MxError::Layout(_))));
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::DType {
                tensor: "packed",
                ..
            })
        ));
        p.dtype = DType::U8;
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::DType {
                tensor: "scales",
                ..
            })
        ));
        s.dtype = DType::E8M0;
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::Rank {
                tensor: "packed",
                ..
            })
        ));
        p.shape = vec![0, 3, 24];
        p.strides = vec![72, 24, 2];
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::Rank {
                tensor: "scales",
                ..
            })
        ));
        s.shape = vec![5, 1, 1];
        s.strides = vec![1, 1, 2];
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::Divisibility { .. })
        ));
        p.shape = vec![0, 3, 32];
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::Shape {
                tensor: "packed",
                ..
            })
        ));
        p.shape = vec![2, 3, 32];
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::Shape {
                tensor: "scales",
                ..
            })
        ));
        s.shape = vec![2, 3, 2];
        assert!(matches!(
            run(&p, &s, 32, false),
            Err(MxError::Device { .. })
        ));
        s.device = DeviceLoc::Cpu;
        assert!(
            matches!(run(&p, &s, 32, false), Err(MxError::Layout(m)) if m.starts_with("packed"))
        );
        p.strides = vec![96, 32, 1];
        assert!(
            matches!(run(&p, &s, 32, false), Err(MxError::Layout(m)) if m.starts_with("scales"))
        );
        s.strides = vec![6, 2, 1];
        assert!(run(&p, &s, 32, false).is_ok());
    }

    /// `E = 3, N = 2, K = 64` with recognisable bytes: packed byte = `e·100 + i`, scale = `e·10 + i`.
    fn sample() -> MxWeights {
        let packed: Vec<u8> = (0..3)
            .flat_map(|e| (0..64).map(move |i| (e * 100 + i) as u8))
            .collect();
        let scales: Vec<u8> = (0..3)
            .flat_map(|e| (0..4).map(move |i| (e * 10 + i) as u8))
            .collect();
        MxWeights::new(packed, &[3, 2, 32], scales, &[3, 2, 2]).expect("valid")
    }

    #[test]
    fn weights_new_checks_shapes_and_lengths() {
        let w = sample();
        assert_eq!(w.shape(), MxShape::new(3, 2, 64).expect("valid"));
        assert!(matches!(
            MxWeights::new(vec![0; 191], &[3, 2, 32], vec![0; 12], &[3, 2, 2]),
            Err(MxError::Length {
                tensor: "packed",
                expected: 192,
                actual: 191
            })
        ));
        assert!(matches!(
            MxWeights::new(vec![0; 192], &[3, 2, 32], vec![0; 13], &[3, 2, 2]),
            Err(MxError::Length {
                tensor: "scales",
                expected: 12,
                actual: 13
            })
        ));
        assert!(matches!(
            MxWeights::new(vec![0; 192], &[3, 2, 32], vec![0; 12], &[3, 2, 3]),
            Err(MxError::Shape { .. })
        ));
        assert!(matches!(
            MxWeights::new(vec![0; 192], &[3, 64], vec![0; 12], &[3, 2, 2]),
            Err(MxError::Rank { .. })
        ));
        let (shape, packed, scales) = w.into_parts();
        assert_eq!(
            (shape.packed_len(), packed.len(), scales.len()),
            (192, 192, 12)
        );
    }

    #[test]
    fn weights_expert_slices_the_leading_axis() {
        let w = sample();
        let (p, s) = w.expert(1).expect("in range");
        assert_eq!(p.len(), 64);
        assert_eq!((p[0], p[63]), (100, 163));
        assert_eq!(s, &[10, 11, 12, 13]);
        assert_eq!(
            w.expert(3),
            Err(MxError::ExpertIndex {
                index: 3,
                experts: 3
            })
        );
    }

    #[test]
    fn weights_select_gathers_in_order() {
        let w = sample();
        let sel = w.select(&[2, 0, 2]).expect("valid");
        assert_eq!(sel.shape(), MxShape::new(3, 2, 64).expect("valid"));
        assert_eq!(
            sel.expert(0).expect("in range"),
            w.expert(2).expect("in range")
        );
        assert_eq!(
            sel.expert(1).expect("in range"),
            w.expert(0).expect("in range")
        );
        assert_eq!(
            sel.expert(2).expect("in range"),
            w.expert(2).expect("in range")
        );
        let one = w.select(&[1]).expect("valid");
        assert_eq!(one.shape().experts(), 1);
        assert_eq!(one.scales(), &[10, 11, 12, 13]);
        assert_eq!(
            w.select(&[0, 5]),
            Err(MxError::ExpertIndex {
                index: 5,
                experts: 3
            })
        );
        assert!(matches!(w.select(&[]), Err(MxError::Shape { .. })));
    }

    #[test]
    fn weights_detect_nan_scales() {
        let w = sample();
        assert!(!w.has_nan_scales());
        let (shape, packed, mut scales) = w.into_parts();
        scales[5] = E8M0_NAN;
        let w = MxWeights::from_shape(shape, packed, scales).expect("valid");
        assert!(w.has_nan_scales());
        let per_expert = w.shape().expert_scales_len();
        let per_row = w.shape().blocks_per_row();
        let want = (5 / per_expert, (5 % per_expert) / per_row, 5 % per_row);
        assert_eq!(w.first_nan_scale(), Some(want));
        assert_eq!(
            w.check_no_nan_scales(),
            Err(MxError::NanScale {
                expert: want.0,
                row: want.1,
                block: want.2
            })
        );
        assert!(sample().check_no_nan_scales().is_ok());
    }

    #[test]
    fn golden_file_is_found() {
        let p = test_support::golden_path();
        assert!(p.is_file(), "{}", p.display());
    }
}
