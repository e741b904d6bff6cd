//! The library's one error type.
//!
//! Every fallible public function returns [`Result`]. Variants carry the context a person needs
//! to act (the tensor, the expected and actual values, the kernel). Library code never prints
//! and never panics on bad input.
//!
//! This module depends on no other module of the crate; [`MxError`] and [`NvError`] (the MXFP4
//! and NVFP4 containers' rules) live here for that reason and are re-exported as
//! `crate::mxfp4::MxError` and `crate::nvfp4::NvError`.

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

/// What is wrong with NVFP4 weights or a quantizer input (`crate::nvfp4`). Every rule has its
/// own variant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NvError {
    /// A dimension is zero.
    #[error("NVFP4 shape {dims:?} has a zero dimension")]
    ZeroDim {
        /// Experts, N, K as given.
        dims: [usize; 3],
    },
    /// `K` is not a multiple of the block size 16.
    #[error("NVFP4 K = {k} is not a multiple of the block size 16")]
    KNotMultipleOfBlock {
        /// The K given.
        k: usize,
    },
    /// The element count overflows `usize`.
    #[error("NVFP4 shape {dims:?} overflows")]
    TooLarge {
        /// Experts, N, K as given.
        dims: [usize; 3],
    },
    /// The rows of an expert cannot be split into the given number of tensor-scale groups.
    #[error("NVFP4 tensor scales: {groups} groups do not divide the {n} rows of an expert")]
    ScaleGroups {
        /// Groups per expert.
        groups: usize,
        /// Rows per expert.
        n: usize,
    },
    /// A buffer has the wrong length.
    #[error("NVFP4 {tensor}: expected {expected} elements, got {actual}")]
    Length {
        /// `packed`, `scales`, `tensor_scales` or `values`.
        tensor: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// A block scale byte is NaN (`0x7F`, `0xFF`) or negative (sign bit set).
    #[error(
        "NVFP4 block scale byte {byte:#04x} at expert {expert}, row {row}, block {block} is {} \
         (block scales are finite and non-negative E4M3)",
        if .byte & 0x7F == 0x7F { "NaN" } else { "negative" }
    )]
    BadBlockScale {
        /// Expert.
        expert: usize,
        /// Row (n).
        row: usize,
        /// Block along K.
        block: usize,
        /// The byte.
        byte: u8,
    },
    /// A tensor scale is not finite or not positive.
    #[error(
        "NVFP4 tensor scale {index} (expert {expert}) is {value} (it must be finite and positive)"
    )]
    BadTensorScale {
        /// Expert.
        expert: usize,
        /// Index into the tensor scales (`expert · groups + group`).
        index: usize,
        /// The value.
        value: f32,
    },
    /// A quantizer input is not finite.
    #[error("NVFP4 quantizer input {index} is {value} (inputs must be finite)")]
    NonFiniteInput {
        /// Flat index into `[E, N, K]`.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Two-level quantization of an expert whose values are all zero (tensor scale 0).
    #[error(
        "expert {expert} is all zeros: its two-level tensor scale would be 0 (quantize it \
         single-level)"
    )]
    ZeroExpert {
        /// Expert.
        expert: usize,
    },
}

/// Library result type.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in mxmoe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The MXFP4 container or quantizer rejected its input.
    #[error(transparent)]
    Mx(#[from] MxError),

    /// The NVFP4 container or quantizer rejected its input.
    #[error(transparent)]
    Nv(#[from] NvError),

    /// No CUDA driver library could be loaded on this machine.
    #[error("no CUDA driver found (libcuda could not be loaded)")]
    NoDriver,

    /// The driver loaded but reports no device (or not the requested ordinal).
    #[error("no CUDA device {ordinal} (the driver reports {count} device(s))")]
    NoDevice {
        /// The requested device ordinal.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver error during {op}: {source}")]
    Driver {
        /// What mxmoe was doing.
        op: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },

    /// The device is too old for a kernel.
    #[error(
        "kernel {kernel} needs compute capability {need_major}.{need_minor}, the device has {have_major}.{have_minor}"
    )]
    Unsupported {
        /// Kernel name.
        kernel: &'static str,
        /// Required major version.
        need_major: i32,
        /// Required minor version.
        need_minor: i32,
        /// Device major version.
        have_major: i32,
        /// Device minor version.
        have_minor: i32,
    },

    /// The GPU cannot run mxmoe's kernels (compute capability below 8.0), or not the PTX module
    /// `MXMOE_MODULE` asks for (`hopper` needs compute capability 9.0).
    #[error("{gpu} (compute capability {}.{}): {detail}", capability.0, capability.1)]
    UnsupportedGpu {
        /// The device's name.
        gpu: String,
        /// Its compute capability `(major, minor)`.
        capability: (i32, i32),
        /// What it lacks, and what would work.
        detail: String,
    },

    /// A launch would need more shared memory than the device allows per block.
    #[error(
        "kernel {kernel} needs {needed} bytes of shared memory per block, the device allows {limit}"
    )]
    SharedMemory {
        /// Kernel name.
        kernel: &'static str,
        /// Bytes needed.
        needed: usize,
        /// The device's opt-in per-block limit.
        limit: usize,
    },

    /// A tensor has the wrong shape or length.
    #[error("{tensor}: expected {expected}, got {actual}")]
    Shape {
        /// Which tensor (or argument).
        tensor: &'static str,
        /// What was expected.
        expected: String,
        /// What was given.
        actual: String,
    },

    /// No compiled tile configuration can launch for this problem on this device.
    #[error("no tile configuration can run {key} on this device ({detail})")]
    NoValidConfig {
        /// The tuning key.
        key: String,
        /// Why the candidates were dropped.
        detail: String,
    },

    /// A size computed from the input (a file's shapes, a command-line count) does not fit in
    /// the memory that would hold it; nothing was allocated.
    #[error(
        "{what} needs {} ({needed_bytes} bytes), but {memory} has only {} available",
        human_bytes(*needed_bytes),
        human_bytes(u128::from(*available_bytes))
    )]
    OutOfMemory {
        /// What would be allocated, with its shape.
        what: String,
        /// Bytes it needs.
        needed_bytes: u128,
        /// Bytes available in `memory`.
        available_bytes: u64,
        /// Which memory: `"host memory (MemAvailable)"` or `"device N"`.
        memory: String,
    },

    /// A size computed from the input overflows the integer that must hold it.
    #[error("{what}: the size overflows ({detail})")]
    SizeOverflow {
        /// What was being sized.
        what: String,
        /// The factors that overflowed.
        detail: String,
    },

    /// A checkpoint (safetensors file) is malformed or lacks what was asked for.
    #[error("{kind}: {detail}")]
    Checkpoint {
        /// What is wrong.
        kind: CheckpointErrorKind,
        /// The tensor or header entry concerned, escaped.
        detail: String,
    },

    /// An argument is outside its valid range.
    #[error("{what}: {detail}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why it is invalid.
        detail: String,
    },
}

/// Bytes as a short human size (`"2.0 TiB"`), for error messages.
pub(crate) fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Error {
    /// Wraps a driver error with the operation that failed.
    pub fn driver(op: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        let op = op.into();
        move |source| Error::Driver { op, source }
    }
}

/// Parses one of a public enum's names (the `FromStr` impls of [`crate::routing::RowOrder`],
/// [`crate::op::Strategy`], …): the value whose name is `s`, else [`Error::InvalidArgument`]
/// naming `what` and listing every name, e.g. `row order: expected "grouped" or "scattered",
/// got "rows"`.
pub(crate) fn parse_name<T: Copy>(
    what: &'static str,
    s: &str,
    names: &[(&'static str, T)],
) -> Result<T> {
    if let Some(&(_, v)) = names.iter().find(|(n, _)| *n == s) {
        return Ok(v);
    }
    let quoted: Vec<String> = names.iter().map(|(n, _)| format!("{n:?}")).collect();
    let list = match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(Error::InvalidArgument {
        what,
        detail: format!("expected {list}, got {s:?}"),
    })
}

/// What is wrong with a checkpoint: the kind of every [`Error::Checkpoint`] that
/// `crate::checkpoint` returns, so callers can tell the cases apart without matching text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CheckpointErrorKind {
    /// The file as a whole (not safetensors, bad header JSON, stray bytes).
    Format,
    /// The file ends before its header or a tensor's data does.
    Truncated,
    /// A tensor that is not in the file.
    Missing,
    /// A tensor with the wrong (or an unknown) dtype.
    Dtype,
    /// A tensor with the wrong rank or shape.
    Shape,
    /// Tensor names: duplicates, collisions, ambiguous layouts.
    Name,
    /// MXFP4 weights holding the NaN scale byte 255.
    NanScale,
    /// A metadata entry that is missing, unknown or malformed (e.g. `scaling`, `mode`).
    Metadata,
    /// A tensor whose values break a rule of the file format (e.g. an expert id out of range).
    Value,
    /// A sharded checkpoint's shard: missing or unreadable, or named by the index with a path
    /// outside the checkpoint folder.
    Shard,
}

impl CheckpointErrorKind {
    /// The kind as messages spell it (`"tensor shape"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Format => "safetensors file",
            Self::Truncated => "truncated safetensors file",
            Self::Missing => "missing tensor",
            Self::Dtype => "tensor dtype",
            Self::Shape => "tensor shape",
            Self::Name => "tensor name",
            Self::NanScale => "MXFP4 NaN scale",
            Self::Metadata => "metadata",
            Self::Value => "tensor value",
            Self::Shard => "checkpoint shard",
        }
    }
}

impl std::fmt::Display for CheckpointErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
