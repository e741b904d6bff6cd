//! Framework-neutral tensor metadata: element type, shape, strides and device of a tensor that
//! comes from elsewhere (PyTorch, a safetensors file, a device allocation).
//!
//! These types carry no data. They exist so that validation code (for example
//! [`crate::mxfp4::validate_mx`]) can check what a caller *declares* about a buffer before any
//! kernel touches it. Strides are counted in elements, as PyTorch reports them.

use core::fmt;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// Unsigned 8-bit integer (also the storage type of packed FP4 codes).
    U8,
    /// OCP MX E8M0 scale byte (`torch.float8_e8m0fnu`): `2^(b − 127)`, 255 = NaN.
    E8M0,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
}

impl DType {
    /// Bytes per element.
    #[inline]
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::U8 | DType::E8M0 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    /// Lower-case name, as used in messages: `"u8"`, `"e8m0"`, `"bf16"`, `"f16"`, `"f32"`,
    /// `"i32"`, `"i64"`.
    #[inline]
    pub const fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::E8M0 => "e8m0",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl DType {
    /// Every element type, in declaration order.
    pub const ALL: [DType; 7] = [
        DType::U8,
        DType::E8M0,
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::I32,
        DType::I64,
    ];
}

impl core::str::FromStr for DType {
    type Err = crate::error::Error;
    /// Parses [`DType::name`]. Errors: [`crate::Error::InvalidArgument`] listing the names.
    fn from_str(s: &str) -> crate::error::Result<Self> {
        crate::error::parse_name("dtype", s, &DType::ALL.map(|v| (v.name(), v)))
    }
}

/// Where a tensor's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceLoc {
    /// Host memory.
    Cpu,
    /// Memory of the CUDA device with this ordinal.
    Cuda(usize),
}

impl fmt::Display for DeviceLoc {
    /// Formats as PyTorch does: `cpu`, `cuda:0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceLoc::Cpu => f.write_str("cpu"),
            DeviceLoc::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// What a caller declares about a tensor: element type, shape, strides (in elements) and device.
///
/// The fields are public because the value is plain data handed over by another framework;
/// nothing here is trusted until a validator has checked it. `strides` should have one entry
/// per dimension; validators treat a length mismatch as a layout error.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: DType,
    /// Extent of each dimension, outermost first.
    pub shape: Vec<usize>,
    /// Step between consecutive indices of each dimension, in elements.
    pub strides: Vec<usize>,
    /// Where the memory lives.
    pub device: DeviceLoc,
}

impl TensorMeta {
    /// Metadata of a row-major contiguous tensor: `strides[i] = shape[i+1] · … · shape[rank−1]`.
    ///
    /// Stride products that overflow `usize` saturate (such a tensor cannot exist in memory,
    /// and validators reject its element count anyway).
    pub fn contiguous(dtype: DType, shape: impl Into<Vec<usize>>, device: DeviceLoc) -> Self {
        let shape = shape.into();
        let mut strides = vec![0; shape.len()];
        let mut step = 1usize;
        for (stride, &extent) in strides.iter_mut().zip(&shape).rev() {
            *stride = step;
            step = step.saturating_mul(extent);
        }
        TensorMeta {
            dtype,
            shape,
            strides,
            device,
        }
    }

    /// Number of dimensions.
    #[inline]
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements (the product of the shape; 1 for rank 0), or `None` if it overflows
    /// `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &extent| acc.checked_mul(extent))
    }

    /// Number of elements, saturating at `usize::MAX` on overflow (see [`Self::checked_numel`]).
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }

    /// Size in bytes of the elements (`numel · dtype size`), or `None` if it overflows `usize`.
    pub fn checked_size_bytes(&self) -> Option<usize> {
        self.checked_numel()?.checked_mul(self.dtype.size_bytes())
    }

    /// Whether the tensor is row-major contiguous, with PyTorch's rules: strides of size-1
    /// dimensions are ignored (they are never used to step), and a tensor with no elements is
    /// contiguous. A `strides` vector whose length differs from the rank is not contiguous.
    pub fn is_contiguous(&self) -> bool {
        if self.strides.len() != self.shape.len() {
            return false;
        }
        if self.shape.contains(&0) {
            return true;
        }
        let mut expected = 1usize;
        for (&extent, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if extent == 1 {
                continue;
            }
            if stride != expected {
                return false;
            }
            expected = expected.saturating_mul(extent);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_sizes_and_names() {
        let all = [
            (DType::U8, 1, "u8"),
            (DType::E8M0, 1, "e8m0"),
            (DType::BF16, 2, "bf16"),
            (DType::F16, 2, "f16"),
            (DType::F32, 4, "f32"),
            (DType::I32, 4, "i32"),
            (DType::I64, 8, "i64"),
        ];
        for (dtype, size, name) in all {
            assert_eq!(dtype.size_bytes(), size);
            assert_eq!(dtype.to_string(), name);
            assert_eq!(name.parse::<DType>().unwrap(), dtype);
        }
    }

    #[test]
    fn device_display_matches_pytorch_spelling() {
        assert_eq!(DeviceLoc::Cpu.to_string(), "cpu");
        assert_eq!(DeviceLoc::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn contiguous_strides_are_row_major() {
        let m = TensorMeta::contiguous(DType::BF16, [4, 64, 256], DeviceLoc::Cuda(0));
        assert_eq!(m.strides, vec![64 * 256, 256, 1]);
        assert_eq!(m.rank(), 3);
        assert_eq!(m.numel(), 4 * 64 * 256);
        assert_eq!(m.checked_size_bytes(), Some(2 * 4 * 64 * 256));
        assert!(m.is_contiguous());

        let scalar = TensorMeta::contiguous(DType::F32, Vec::new(), DeviceLoc::Cpu);
        assert_eq!(scalar.numel(), 1);
        assert!(scalar.is_contiguous());
    }

    #[test]
    fn is_contiguous_follows_pytorch_rules() {
        // A transposed view is not contiguous.
        let mut t = TensorMeta::contiguous(DType::F32, [3, 5], DeviceLoc::Cpu);
        t.strides = vec![1, 3];
        assert!(!t.is_contiguous());
        // Strides of size-1 dimensions do not matter.
        let mut u = TensorMeta::contiguous(DType::F32, [3, 1, 5], DeviceLoc::Cpu);
        u.strides = vec![5, 999, 1];
        assert!(u.is_contiguous());
        // An empty tensor is contiguous whatever its strides.
        let mut e = TensorMeta::contiguous(DType::F32, [0, 5], DeviceLoc::Cpu);
        e.strides = vec![7, 7];
        assert!(e.is_contiguous());
        // Malformed strides are never contiguous.
        let mut bad = TensorMeta::contiguous(DType::F32, [3, 5], DeviceLoc::Cpu);
        bad.strides.pop();
        assert!(!bad.is_contiguous());
    }

    #[test]
    fn numel_overflow_is_reported_not_panicking() {
        let m = TensorMeta::contiguous(DType::U8, [usize::MAX, 2], DeviceLoc::Cpu);
        assert_eq!(m.checked_numel(), None);
        assert_eq!(m.numel(), usize::MAX);
        assert_eq!(m.checked_size_bytes(), None);
    }
}
