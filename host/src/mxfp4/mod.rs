//! The MXFP4 weight format on the host: the validated container ([`MxWeights`]), the bit-exact
//! torchao FLOOR quantizer, and the CPU dequantizer (SPEC §1).

mod container;
mod dequant;
mod quantize;

pub use container::*;
pub use dequant::*;
pub use quantize::*;

/// Why an MXFP4 container or quantizer input was rejected (SPEC §1.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MxError {
    /// Only 32-element blocks are supported (16 is reserved for a future NVFP4 mode).
    #[error("unsupported MX block size {0} (only 32 is supported)")]
    UnsupportedBlockSize(usize),
    /// A tensor has the wrong element type; bytes of other types are never reinterpreted.
    #[error("{tensor}: expected dtype {expected}, got {actual}")]
    DType {
        /// Which tensor.
        tensor: &'static str,
        /// Accepted dtype(s).
        expected: &'static str,
        /// The dtype given.
        actual: String,
    },
    /// A tensor has the wrong rank.
    #[error("{tensor}: expected rank {expected}, got rank {actual}")]
    Rank {
        /// Which tensor.
        tensor: &'static str,
        /// Expected rank.
        expected: usize,
        /// Given rank.
        actual: usize,
    },
    /// A dimension violates a divisibility or positivity rule (`K % 32 == 0`, `K > 0`, `N > 0`).
    #[error("{what}")]
    Divisibility {
        /// The rule that failed, with the numbers.
        what: String,
    },
    /// Tensor shapes do not agree with each other.
    #[error("{tensor}: expected shape {expected:?}, got {actual:?}")]
    Shape {
        /// Which tensor.
        tensor: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Given shape.
        actual: Vec<usize>,
    },
    /// The tensors live on different devices.
    #[error("packed and scales live on different devices ({packed} vs {scales})")]
    Device {
        /// Device of `packed`.
        packed: String,
        /// Device of `scales`.
        scales: String,
    },
    /// Unsupported memory layout (non-contiguous K, swizzled scales, a layout other than `Fwd`).
    #[error("unsupported layout: {0}")]
    Layout(String),
    /// A buffer's length does not match its declared shape.
    #[error("{tensor}: buffer holds {actual} elements, shape needs {expected}")]
    Length {
        /// Which tensor.
        tensor: &'static str,
        /// Elements the shape needs.
        expected: usize,
        /// Elements present.
        actual: usize,
    },
    /// An expert index is outside `0..experts`.
    #[error("expert index {index} out of range for {experts} expert(s)")]
    ExpertIndex {
        /// The index given.
        index: usize,
        /// Experts in the container.
        experts: usize,
    },
    /// A scale block holds the E8M0 NaN byte (255), which would make all 32 weights of the
    /// block NaN and carry NaN into every output and gradient that reads them. Rejected unless
    /// the caller opts in to torchao's propagate behaviour.
    #[error(
        "scale byte 255 (E8M0 NaN) at expert {expert}, row {row}, block {block} (weights k = {} to {}); NaN scales are rejected unless explicitly allowed",
        block * 32,
        block * 32 + 31
    )]
    NanScale {
        /// Expert index.
        expert: usize,
        /// Row (`n`) within the expert.
        row: usize,
        /// Scale block along K (`k / 32`).
        block: usize,
    },
    /// A shape's element count does not fit in `usize` (no such tensor can exist in memory).
    #[error("{tensor}: shape {shape:?} has more elements than fit in usize")]
    Overflow {
        /// Which tensor.
        tensor: &'static str,
        /// The shape given.
        shape: Vec<usize>,
    },
}
