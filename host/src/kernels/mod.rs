//! One safe function per GPU kernel: the only place that calls [`Gpu::launch`].
//!
//! Each function validates its inputs (typed errors, never a device fault), allocates its
//! outputs, fills the kernel's parameter struct and launches with a `// SAFETY:` note answering
//! the launch contract documented on the kernel's entry point in `kernels-gpu/src/kernels/`.

pub mod dequant;
pub mod eltwise;
pub mod gemm;
pub mod moe;
pub mod probes;
pub mod routing;

use cudarc::driver::CudaSlice;

use crate::device::Gpu;
use crate::error::{Error, Result};

/// Hopper (sm_90) is the minimum for every mxmoe kernel (the module is built for sm_90).
pub const MIN_CC: (i32, i32) = (9, 0);

/// Checks that a device buffer holds at least `needed` elements.
pub(crate) fn check_len<T>(tensor: &'static str, buf: &CudaSlice<T>, needed: usize) -> Result<()> {
    if buf.len() < needed {
        return Err(Error::Shape {
            tensor,
            expected: format!("at least {needed} elements"),
            actual: format!("{} elements", buf.len()),
        });
    }
    Ok(())
}

/// Uploads a host slice.
pub fn upload<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, data: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream()
        .clone_htod(data)
        .map_err(Error::driver("copying to the device"))
}

/// Downloads a device buffer (synchronizes the stream).
pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    gpu: &Gpu,
    buf: &CudaSlice<T>,
) -> Result<Vec<T>> {
    gpu.stream()
        .clone_dtoh(buf)
        .map_err(Error::driver("copying from the device"))
}

/// Allocates `len` elements and fills every byte with `byte` (outputs are poisoned so that an
/// element a kernel fails to write is caught by the tests: 0xFF is NaN in bf16 and f32).
pub fn alloc_poisoned<T: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    len: usize,
    byte: u8,
) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is fully initialised by the memset below, ordered before any later
    // use on the same stream.
    let mut buf = unsafe { gpu.stream().alloc::<T>(len) }
        .map_err(Error::driver("allocating device memory"))?;
    fill_bytes(gpu, &mut buf, byte)?;
    Ok(buf)
}

/// Sets every byte of `buf` to `byte`, in stream order.
pub fn fill_bytes<T>(gpu: &Gpu, buf: &mut CudaSlice<T>, byte: u8) -> Result<()> {
    use cudarc::driver::DevicePtrMut;
    let bytes = buf.num_bytes();
    if bytes == 0 {
        return Ok(());
    }
    let (ptr, _sync) = buf.device_ptr_mut(gpu.stream());
    // SAFETY: `ptr` addresses `bytes` bytes of a live allocation owned by `buf`, and the memset
    // is ordered on the stream that owns it.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, gpu.stream().cu_stream()) }
        .map_err(Error::driver("filling device memory"))
}
