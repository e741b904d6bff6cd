//! The library's one error type.
//!
//! Every fallible public function returns [`Result`]. Variants carry the context a person needs
//! to act (the tensor, the expected and actual values, the kernel). Library code never prints
//! and never panics on bad input.

use crate::mxfp4::MxError;

/// Library result type.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in mxmoe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The MXFP4 container or quantizer rejected its input.
    #[error(transparent)]
    Mx(#[from] MxError),

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
