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

use crate::buffers::{
    Bf16Matrix, DenseExperts, LoraWeights, MxExperts, NvExperts, check_mx_device_meta,
};
use crate::device::Gpu;
use crate::error::{Error, NvError, Result};
use crate::nvfp4::{NV_BLOCK, NvShape};
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

    /// NVFP4 experts (`packed [E, N, K/2]` u8, E4M3 `scales [E, N, K/16]` as u8, optional f32
    /// `tensor_scales [E]` or `[E, G]`) at device addresses `packed_ptr`, `scales_ptr` and
    /// `tensor_scales`' address, borrowed. The metadata is validated by
    /// [`check_nv_device_meta`] before anything is wrapped; the values are not read (block scale
    /// bytes and tensor scales are the caller's to check, as [`crate::nvfp4::NvWeights`] does
    /// on the host).
    ///
    /// # Safety
    ///
    /// Every address must hold the bytes its metadata describe, as for [`Gpu::borrow_slice`].
    pub unsafe fn borrow_nv_experts(
        &self,
        packed_ptr: u64,
        packed_meta: &TensorMeta,
        scales_ptr: u64,
        scales_meta: &TensorMeta,
        tensor_scales: Option<(u64, &TensorMeta)>,
    ) -> Result<NvExperts> {
        let (shape, groups) = check_nv_device_meta(
            packed_meta,
            scales_meta,
            tensor_scales.map(|(_, m)| m),
            self.ordinal(),
        )?;
        // SAFETY: forwarded to the caller; lengths from the validated shape.
        let packed = unsafe { self.borrow_slice::<u8>(packed_ptr, shape.values() / 2) };
        // SAFETY: as above.
        let scales = unsafe { self.borrow_slice::<u8>(scales_ptr, shape.values() / NV_BLOCK) };
        let tensor_scales = tensor_scales.map(|(ptr, _)| {
            // SAFETY: as above; `E·G` values, the validated shape of the tensor scales.
            unsafe { self.borrow_slice::<f32>(ptr, shape.experts() * groups) }
        });
        NvExperts::from_buffers(packed, scales, tensor_scales, shape, groups)
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

/// The one check of NVFP4 device metadata, used by [`Gpu::borrow_nv_experts`]: `packed`
/// `[E, N, K/2]` u8, `scales [E, N, K/16]` u8 (the E4M3 bytes) and, when given,
/// `tensor_scales` f32 `[E]` (one per expert) or `[E, G]` (G groups of rows per expert, G
/// dividing N), each contiguous on CUDA device `ordinal`. Returns the shape and the groups (1
/// without tensor scales).
///
/// Errors: [`Error::InvalidArgument`] for a dtype, device or layout ([`check_device_tensor`]),
/// [`Error::Shape`] for a rank or a scales shape that disagrees with `packed`, and the
/// [`NvError`] of [`NvShape::new`] (zero dimension, K not a multiple of 16) or
/// [`NvError::ScaleGroups`].
pub fn check_nv_device_meta(
    packed_meta: &TensorMeta,
    scales_meta: &TensorMeta,
    tensor_scales_meta: Option<&TensorMeta>,
    ordinal: usize,
) -> Result<(NvShape, usize)> {
    let packed = check_device_tensor("NVFP4 packed", packed_meta, DType::U8, ordinal)?;
    let scales = check_device_tensor("NVFP4 scales", scales_meta, DType::U8, ordinal)?;
    let &[e, n, half] = packed.as_slice() else {
        return Err(Error::Shape {
            tensor: "NVFP4 packed",
            expected: "[E, N, K/2]".into(),
            actual: format!("{packed:?}"),
        });
    };
    let k = half
        .checked_mul(2)
        .ok_or(NvError::TooLarge { dims: [e, n, half] })?;
    let shape = NvShape::new(e, n, k)?;
    let want_scales = [e, n, shape.blocks_per_row()];
    if scales != want_scales {
        return Err(Error::Shape {
            tensor: "NVFP4 scales",
            expected: format!("{want_scales:?} ([E, N, K/16] for packed {packed:?})"),
            actual: format!("{scales:?}"),
        });
    }
    let Some(meta) = tensor_scales_meta else {
        return Ok((shape, 1));
    };
    let ts = check_device_tensor("NVFP4 tensor_scales", meta, DType::F32, ordinal)?;
    let groups = match *ts.as_slice() {
        [te] if te == e => 1,
        [te, g] if te == e => g,
        _ => {
            return Err(Error::Shape {
                tensor: "NVFP4 tensor_scales",
                expected: format!("[{e}] or [{e}, G] (E = {e} experts)"),
                actual: format!("{ts:?}"),
            });
        }
    };
    if groups == 0 || !n.is_multiple_of(groups) {
        return Err(NvError::ScaleGroups { groups, n }.into());
    }
    Ok((shape, groups))
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

    #[test]
    fn nv_device_meta_is_checked_before_wrapping() {
        let meta = |dtype, shape: &[usize]| {
            TensorMeta::contiguous(dtype, shape.to_vec(), DeviceLoc::Cuda(0))
        };
        let packed = meta(DType::U8, &[2, 4, 16]);
        let scales = meta(DType::U8, &[2, 4, 2]);
        let check = |p: &TensorMeta, s: &TensorMeta, t: Option<&TensorMeta>| {
            check_nv_device_meta(p, s, t, 0).map_err(|e| e.to_string())
        };
        let (shape, groups) = check(&packed, &scales, None).unwrap();
        assert_eq!(
            (shape.experts(), shape.n(), shape.k(), groups),
            (2, 4, 32, 1)
        );
        let ts = meta(DType::F32, &[2]);
        assert_eq!(check(&packed, &scales, Some(&ts)).unwrap().1, 1);
        let ts2 = meta(DType::F32, &[2, 2]);
        assert_eq!(check(&packed, &scales, Some(&ts2)).unwrap().1, 2);

        assert_eq!(
            check(&packed, &meta(DType::E8M0, &[2, 4, 2]), None).unwrap_err(),
            "NVFP4 scales: expected dtype u8, got e8m0"
        );
        assert_eq!(
            check(&packed, &meta(DType::U8, &[2, 4, 1]), None).unwrap_err(),
            "NVFP4 scales: expected [2, 4, 2] ([E, N, K/16] for packed \
             [2, 4, 16]), got [2, 4, 1]"
        );
        assert_eq!(
            check(
                &meta(DType::U8, &[2, 4, 4]),
                &meta(DType::U8, &[2, 4, 0]),
                None
            )
            .unwrap_err(),
            "NVFP4 K = 8 is not a multiple of the block size 16"
        );
        assert_eq!(
            check(&meta(DType::U8, &[8, 16]), &scales, None).unwrap_err(),
            "NVFP4 packed: expected [E, N, K/2], got [8, 16]"
        );
        assert_eq!(
            check(&packed, &scales, Some(&meta(DType::BF16, &[2]))).unwrap_err(),
            "NVFP4 tensor_scales: expected dtype f32, got bf16"
        );
        assert_eq!(
            check(&packed, &scales, Some(&meta(DType::F32, &[3]))).unwrap_err(),
            "NVFP4 tensor_scales: expected [2] or [2, G] (E = 2 experts), \
             got [3]"
        );
        assert_eq!(
            check(&packed, &scales, Some(&meta(DType::F32, &[2, 3]))).unwrap_err(),
            "NVFP4 tensor scales: 3 groups do not divide the 4 rows of an expert"
        );
        let on_cpu = TensorMeta::contiguous(DType::U8, [2, 4, 16], DeviceLoc::Cpu);
        assert_eq!(
            check(&on_cpu, &scales, None).unwrap_err(),
            "NVFP4 packed: expected a tensor on cuda:0, got one on cpu"
        );
    }
}
