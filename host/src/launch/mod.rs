//! The one checked launch path.
//!
//! Every kernel launch goes through [`Gpu::launch`]: it validates the proposed launch against the
//! kernel's [`LaunchSpec`] and the live device (compute capability, block size, dynamic shared
//! memory, grid limits) before any `unsafe`, raises the function's dynamic shared-memory limit
//! when needed, and passes the kernel's single `#[repr(C)]` parameter struct by value.

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use kernels_gpu::shared::params;

use crate::device::Gpu;
use crate::error::{Error, Result};

/// A kernel's launch contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Exported entry-point name (`kernels_gpu::shared::names`).
    pub name: &'static str,
    /// Threads per block (1-D blocks).
    pub threads: u32,
    /// Dynamic shared memory per block, bytes (from `kernels_gpu::shared` plans).
    pub dynamic_smem_bytes: usize,
    /// Minimum compute capability.
    pub min_cc: (i32, i32),
}

/// A kernel parameter struct from `kernels_gpu::shared::params`.
///
/// # Safety
/// Implementors must be `#[repr(C)]` plain-old-data whose layout is exactly the kernel's
/// by-value parameter, with every field a fixed-width integer.
pub unsafe trait KernelParams: Copy + 'static {}

// SAFETY: each of these is a `#[repr(C)]` struct of u64/u32 fields whose size and offsets are
// pinned by const asserts in `kernels_gpu::shared::params`; the kernels take it by value.
unsafe impl KernelParams for params::ProbeParams {}
// SAFETY: as above.
unsafe impl KernelParams for params::DequantParams {}
// SAFETY: as above.
unsafe impl KernelParams for params::RouteParams {}
// SAFETY: as above (u64/u32/f32 fields; `f32` is plain 4-byte data).
unsafe impl KernelParams for params::GemmParams {}
// SAFETY: as above.
unsafe impl KernelParams for params::GramParams {}
// SAFETY: as above.
unsafe impl KernelParams for params::EltwiseParams {}
// SAFETY: as above.
unsafe impl KernelParams for params::RemapParams {}
// SAFETY: as above (u64/u32/f32 fields; `f32` is plain 4-byte data).
unsafe impl KernelParams for params::GluParams {}
// SAFETY: as above.
unsafe impl KernelParams for params::AutoGateParams {}

/// The by-value argument handed to cudarc.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct ByValue<P>(P);

// SAFETY: `P: KernelParams` is `#[repr(C)]` POD matching the kernel's parameter layout, so its
// bytes can be copied into the kernel's parameter buffer as they are.
unsafe impl<P: KernelParams> DeviceRepr for ByValue<P> {}

/// The device address of a buffer, for a parameter struct. The caller keeps the buffer alive
/// until the work that uses the address has completed on the stream (all mxmoe work is on one
/// stream, and cudarc frees buffers in stream order).
pub fn addr<T, S: DevicePtr<T>>(gpu: &Gpu, buf: &S) -> u64 {
    let (ptr, _sync) = buf.device_ptr(gpu.stream());
    ptr
}

/// Like [`addr`], for a buffer the kernel writes.
pub fn addr_mut<T, S: DevicePtrMut<T>>(gpu: &Gpu, buf: &mut S) -> u64 {
    let (ptr, _sync) = buf.device_ptr_mut(gpu.stream());
    ptr
}

impl Gpu {
    /// Launches `spec.name` on `grid` blocks with `params`.
    ///
    /// # Safety
    /// Every device address in `params` must point to a live allocation large enough for what
    /// the kernel's documented launch contract reads and writes, and the other fields must
    /// satisfy that contract (index ranges, sizes). The checks here cover only what the device
    /// and the spec can tell.
    pub(crate) unsafe fn launch<P: KernelParams>(
        &self,
        spec: &LaunchSpec,
        grid: (u32, u32, u32),
        params: P,
    ) -> Result<()> {
        let limits = self.limits();
        let cc = limits.compute_capability;
        if cc < spec.min_cc {
            return Err(Error::Unsupported {
                kernel: spec.name,
                need_major: spec.min_cc.0,
                need_minor: spec.min_cc.1,
                have_major: cc.0,
                have_minor: cc.1,
            });
        }
        if spec.dynamic_smem_bytes > limits.max_smem_per_block_optin {
            return Err(Error::SharedMemory {
                kernel: spec.name,
                needed: spec.dynamic_smem_bytes,
                limit: limits.max_smem_per_block_optin,
            });
        }
        if spec.threads == 0 || spec.threads > 1024 || !spec.threads.is_multiple_of(32) {
            return Err(Error::InvalidArgument {
                what: "block size",
                detail: format!(
                    "kernel {} launched with {} threads",
                    spec.name, spec.threads
                ),
            });
        }
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65_535 || grid.2 > 65_535 {
            return Err(Error::InvalidArgument {
                what: "grid",
                detail: format!("kernel {} launched with grid {grid:?}", spec.name),
            });
        }
        let f = self.launchable(spec.name, spec.dynamic_smem_bytes)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (spec.threads, 1, 1),
            shared_mem_bytes: spec.dynamic_smem_bytes as u32,
        };
        let arg = ByValue(params);
        let mut builder = self.stream().launch_builder(&f);
        builder.arg(&arg);
        // SAFETY: the argument list is exactly the kernel's one by-value parameter struct
        // (`KernelParams`); the caller guarantees the contract of its addresses and sizes; the
        // block, grid and shared-memory sizes were checked against the device above.
        unsafe { builder.launch(cfg) }
            .map_err(Error::driver(format!("launching {}", spec.name)))?;
        Ok(())
    }
}
