//! Running on another library's memory (PyTorch, through the Python bindings).
//!
//! The device's primary context and a borrowed stream come from [`Gpu::open_on_stream`]; this
//! module wraps device allocations the caller owns (a tensor's storage) in mxmoe's tensor types
//! without ever freeing them: each is built on a borrowed [`DeviceBuffer`](crate::device::DeviceBuffer)
//! ([`Gpu::borrow_slice`]), which hands the memory back with cudarc's `CudaSlice::leak` when the
//! last handle sharing it drops. Metadata is validated before anything is wrapped.
//!
//! Layering: above the tensor types (`crate::buffers`) and the device core; nothing below
//! depends on it.

use crate::buffers::{Bf16Matrix, DenseExperts, LoraWeights, MxExperts, check_mx_device_meta};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::{DType, DeviceLoc, TensorMeta};

impl Gpu {
    /// A row-major bf16 matrix `[rows, cols]` at `ptr`, borrowed (see [`Gpu::borrow_slice`]).
    ///
    /// # Safety
    ///
    /// As for [`Gpu::borrow_slice`] with `rows·cols` elements.
    pub unsafe fn borrow_bf16_matrix(
        &self,
        ptr: u64,
        rows: usize,
        cols: usize,
    ) -> Result<Bf16Matrix> {
        let len = crate::buffers::element_count("matrix", &[rows, cols])?;
        // SAFETY: forwarded to the caller. A borrowed buffer is never freed, also when the
        // wrapping below fails.
        let buf = unsafe { self.borrow_slice::<u16>(ptr, len) };
        Bf16Matrix::from_buffer(buf, rows, cols)
    }

    /// Dense bf16 experts `[experts, n, k]` at `ptr`, borrowed.
    ///
    /// # Safety
    ///
    /// As for [`Gpu::borrow_slice`] with `experts·n·k` elements.
    pub unsafe fn borrow_dense_experts(
        &self,
        ptr: u64,
        experts: usize,
        n: usize,
        k: usize,
    ) -> Result<DenseExperts> {
        let len = crate::buffers::element_count("expert weights", &[experts, n, k])?;
        // SAFETY: forwarded to the caller (never freed, as above).
        let buf = unsafe { self.borrow_slice::<u16>(ptr, len) };
        DenseExperts::from_buffer(buf, experts, n, k)
    }

    /// MXFP4 experts (`packed [E, N, K/2]`, `scales [E, N, K/32]`, both u8 or e8m0 scales) at
    /// device addresses `packed_ptr` and `scales_ptr`, borrowed. The metadata is validated by
    /// the same check as [`MxExperts::from_device`] ([`check_mx_device_meta`]) before anything
    /// is wrapped.
    ///
    /// # Safety
    ///
    /// Both addresses must hold the bytes their metadata describe, as for [`Gpu::borrow_slice`].
    pub unsafe fn borrow_mx_experts(
        &self,
        packed_ptr: u64,
        packed_meta: &TensorMeta,
        scales_ptr: u64,
        scales_meta: &TensorMeta,
    ) -> Result<MxExperts> {
        let shape = check_mx_device_meta(packed_meta, scales_meta, self.ordinal())?;
        // SAFETY: forwarded to the caller; lengths from the validated shape.
        let packed = unsafe { self.borrow_slice::<u8>(packed_ptr, shape.packed_len()) };
        // SAFETY: as above.
        let scales = unsafe { self.borrow_slice::<u8>(scales_ptr, shape.scales_len()) };
        MxExperts::from_buffers(packed, packed_meta, scales, scales_meta)
    }
}

/// Checks that `meta` describes a row-major contiguous tensor of `dtype` on CUDA device
/// `ordinal` and returns its shape. Errors: [`Error::InvalidArgument`] naming `tensor`.
pub fn check_device_tensor(
    tensor: &'static str,
    meta: &TensorMeta,
    dtype: DType,
    ordinal: usize,
) -> Result<Vec<usize>> {
    if meta.dtype != dtype {
        return Err(Error::InvalidArgument {
            what: tensor,
            detail: format!("expected dtype {dtype}, got {}", meta.dtype),
        });
    }
    if meta.device != DeviceLoc::Cuda(ordinal) {
        return Err(Error::InvalidArgument {
            what: tensor,
            detail: format!(
                "expected a tensor on {}, got one on {}",
                DeviceLoc::Cuda(ordinal),
                meta.device
            ),
        });
    }
    if meta.strides.len() != meta.shape.len() || !meta.is_contiguous() {
        return Err(Error::InvalidArgument {
            what: tensor,
            detail: format!(
                "must be contiguous (shape {:?}, strides {:?})",
                meta.shape, meta.strides
            ),
        });
    }
    Ok(meta.shape.clone())
}

/// Borrowed LoRA factors: `A [E·r, K]` at `a_ptr` and `B [N, E·r]` at `b_ptr`.
///
/// # Safety
///
/// As for [`Gpu::borrow_slice`] for both matrices.
pub unsafe fn borrow_lora(
    gpu: &Gpu,
    a_ptr: u64,
    a_shape: (usize, usize),
    b_ptr: u64,
    b_shape: (usize, usize),
    rank: usize,
    scaling: f32,
) -> Result<LoraWeights> {
    // SAFETY: forwarded to the caller.
    let a = unsafe { gpu.borrow_bf16_matrix(a_ptr, a_shape.0, a_shape.1)? };
    // SAFETY: forwarded to the caller.
    let b = unsafe { gpu.borrow_bf16_matrix(b_ptr, b_shape.0, b_shape.1)? };
    Ok(LoraWeights {
        a,
        b,
        rank,
        scaling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_tensors_must_be_contiguous_of_the_dtype_on_the_device() {
        let meta = TensorMeta::contiguous(DType::BF16, [4, 8], DeviceLoc::Cuda(0));
        assert_eq!(
            check_device_tensor("x", &meta, DType::BF16, 0).unwrap(),
            vec![4, 8]
        );
        let msg = |r: Result<Vec<usize>>| r.unwrap_err().to_string();
        assert_eq!(
            msg(check_device_tensor("x", &meta, DType::F32, 0)),
            "x: expected dtype f32, got bf16"
        );
        assert_eq!(
            msg(check_device_tensor("x", &meta, DType::BF16, 1)),
            "x: expected a tensor on cuda:1, got one on cuda:0"
        );
        let mut t = meta.clone();
        t.strides = vec![1, 4];
        assert_eq!(
            msg(check_device_tensor("x", &t, DType::BF16, 0)),
            "x: must be contiguous (shape [4, 8], strides [1, 4])"
        );
    }
}
