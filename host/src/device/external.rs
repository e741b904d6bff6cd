//! Running on another library's stream and memory (PyTorch, through the Python bindings).
//!
//! [`Gpu::open_on_stream`] opens the device's primary context (the one PyTorch uses) and orders
//! every mxmoe launch and copy on a stream the caller owns, so mxmoe work interleaves with the
//! caller's without any added synchronisation. [`Borrowed`] wraps a device allocation the caller
//! owns (a tensor's storage) in mxmoe's types without ever freeing it: when the guard drops, the
//! buffers are handed back with cudarc's `CudaSlice::leak` instead of `cuMemFree`.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::Mutex;

use cudarc::driver::{CudaContext, CudaSlice, DeviceRepr};

use super::{Gpu, device_count, read_limits};
use crate::error::{Error, Result};
use crate::mxfp4::{MxLayout, validate_mx};
use crate::op::{Bf16Matrix, DenseExperts, LoraWeights, MxExperts};
use crate::shared::mxfp4::MX_BLOCK;
use crate::tensor::{DType, DeviceLoc, TensorMeta};
use crate::tune::{TuneMode, Tuner, default_cache_path};

impl Gpu {
    /// Opens device `ordinal` (its primary context, shared with the CUDA runtime and so with
    /// PyTorch) with every launch and copy ordered on the caller's stream `cu_stream` (a
    /// `CUstream` handle as an integer, e.g. `torch.cuda.current_stream().cuda_stream`; `0` is
    /// the legacy default stream). Loads the PTX module.
    ///
    /// The context's cudarc event tracking is disabled: all mxmoe work of this `Gpu` runs on the
    /// one stream, and ordering against the caller's other streams is the caller's business.
    ///
    /// # Safety
    ///
    /// `cu_stream` must be a valid stream of device `ordinal`'s primary context (or 0), and the
    /// caller must keep it alive for as long as this `Gpu`, or any buffer allocated through it,
    /// exists.
    pub unsafe fn open_on_stream(ordinal: usize, cu_stream: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("opening the CUDA context"))?;
        // SAFETY: this `Gpu` uses only the one stream (the caller orders it against others), so
        // cudarc's per-buffer events are not needed.
        unsafe { ctx.disable_event_tracking() };
        // SAFETY: the caller guarantees the stream is valid in this (primary) context and
        // outlives everything that retains the wrapper.
        let stream = unsafe { ctx.wrap_borrowed_stream(cu_stream as _) };
        let limits = read_limits(&ctx)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(super::PTX))
            .map_err(Error::driver("loading the mxmoe PTX module"))?;
        let tuner = Tuner::from_env(&limits.name)?;
        Ok(Self {
            ctx,
            stream,
            module,
            limits,
            functions: Mutex::new(HashMap::new()),
            tuner,
        })
    }

    /// The same device and loaded module with launches ordered on another borrowed stream
    /// (cheap: nothing is loaded again; the tuner reads its cache afresh).
    ///
    /// # Safety
    ///
    /// As for [`Gpu::open_on_stream`]: `cu_stream` must be a valid stream of this context and
    /// outlive the returned `Gpu` and everything allocated through it.
    pub unsafe fn on_stream(&self, cu_stream: usize) -> Self {
        // SAFETY: forwarded to the caller.
        let stream = unsafe { self.ctx.wrap_borrowed_stream(cu_stream as _) };
        Self {
            ctx: self.ctx.clone(),
            stream,
            module: self.module.clone(),
            limits: self.limits.clone(),
            functions: Mutex::new(HashMap::new()),
            tuner: Tuner::new(
                &self.limits.name,
                TuneMode::from_env(),
                default_cache_path(),
            )
            .with_forced(self.tuner.forced()),
        }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Wraps `len` elements at device address `ptr` as a [`Borrowed`] buffer on this `Gpu`'s
    /// stream; it is never freed by mxmoe.
    ///
    /// # Safety
    ///
    /// `ptr` must address at least `len` valid, suitably aligned `T` in this context, kept alive
    /// (and not reused) by its owner for as long as the guard exists and work queued on it runs.
    pub unsafe fn borrow_slice<T: DeviceRepr>(
        &self,
        ptr: u64,
        len: usize,
    ) -> Borrowed<CudaSlice<T>> {
        // SAFETY: forwarded to the caller; the slice goes straight into the guard, which never
        // frees it.
        let slice = unsafe { self.stream.upgrade_device_ptr::<T>(ptr, len) };
        Borrowed::new(slice)
    }

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
    ) -> Result<Borrowed<Bf16Matrix>> {
        let len = checked_len("matrix", &[rows, cols])?;
        // SAFETY: forwarded to the caller.
        let slice = unsafe { self.borrow_slice::<u16>(ptr, len) };
        // `from_device` only fails when the buffer is shorter than `rows·cols`; it is exactly
        // that long, so the slice (which must never be freed) cannot be dropped on an error path.
        Ok(Borrowed::new(Bf16Matrix::from_device(
            slice.into_inner(),
            rows,
            cols,
        )?))
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
    ) -> Result<Borrowed<DenseExperts>> {
        if experts == 0 || n == 0 || k == 0 {
            return Err(Error::InvalidArgument {
                what: "expert weights",
                detail: format!("shape [{experts}, {n}, {k}] has a zero dimension"),
            });
        }
        let len = checked_len("expert weights", &[experts, n, k])?;
        // SAFETY: forwarded to the caller.
        let slice = unsafe { self.borrow_slice::<u16>(ptr, len) };
        // Cannot fail: the dimensions are positive and the length is exact (checked above).
        Ok(Borrowed::new(DenseExperts::from_device(
            slice.into_inner(),
            experts,
            n,
            k,
        )?))
    }

    /// MXFP4 experts (`packed [E, N, K/2]`, `scales [E, N, K/32]`, both u8 or e8m0 scales) at
    /// device addresses `packed_ptr` and `scales_ptr`, borrowed. The metadata is validated
    /// (SPEC §1.6, contiguity, this device) before anything is wrapped, with the same errors as
    /// [`MxExperts::from_device`].
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
    ) -> Result<Borrowed<MxExperts>> {
        // The checks of `MxExperts::from_device`, run first so that it cannot fail after taking
        // the (never to be freed) buffers.
        let shape = validate_mx(packed_meta, scales_meta, MX_BLOCK, MxLayout::Fwd, false)?;
        for (meta, tensor) in [(packed_meta, "packed"), (scales_meta, "scales")] {
            if !meta.is_contiguous() {
                return Err(crate::mxfp4::MxError::Layout(format!(
                    "{tensor} must be contiguous (strides {:?})",
                    meta.strides
                ))
                .into());
            }
        }
        let here = DeviceLoc::Cuda(self.ordinal());
        if packed_meta.device != here || scales_meta.device != here {
            return Err(crate::mxfp4::MxError::Device {
                packed: packed_meta.device.to_string(),
                scales: scales_meta.device.to_string(),
            }
            .into());
        }
        // SAFETY: forwarded to the caller; lengths from the validated shape.
        let packed = unsafe { self.borrow_slice::<u8>(packed_ptr, shape.packed_len()) };
        // SAFETY: as above.
        let scales = unsafe { self.borrow_slice::<u8>(scales_ptr, shape.scales_len()) };
        Ok(Borrowed::new(MxExperts::from_device(
            packed.into_inner(),
            packed_meta,
            scales.into_inner(),
            scales_meta,
        )?))
    }
}

/// `dims` multiplied, or a typed error when the product overflows.
fn checked_len(tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape {
            tensor,
            expected: "a shape whose element count fits in usize".into(),
            actual: format!("{dims:?}"),
        })
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

/// Device buffers that can be given up without freeing them.
pub trait IntoDeviceBuffers {
    /// Hands every buffer back to its owner (cudarc's `leak`: the memory is not freed).
    fn release(self);
}

impl<T> IntoDeviceBuffers for CudaSlice<T> {
    fn release(self) {
        let _ = self.leak();
    }
}

impl IntoDeviceBuffers for Bf16Matrix {
    fn release(self) {
        self.into_data().release();
    }
}

impl IntoDeviceBuffers for DenseExperts {
    fn release(self) {
        self.into_data().release();
    }
}

impl IntoDeviceBuffers for MxExperts {
    fn release(self) {
        let (packed, scales) = self.into_buffers();
        packed.release();
        scales.release();
    }
}

impl IntoDeviceBuffers for LoraWeights {
    fn release(self) {
        self.a.release();
        self.b.release();
    }
}

/// A value whose device memory belongs to someone else: it derefs to the mxmoe type, and when
/// dropped its buffers are released with [`IntoDeviceBuffers::release`], never freed.
pub struct Borrowed<T: IntoDeviceBuffers> {
    inner: ManuallyDrop<T>,
}

impl<T: IntoDeviceBuffers> Borrowed<T> {
    /// Wraps a value whose buffers the caller does not own.
    pub fn new(inner: T) -> Self {
        Self {
            inner: ManuallyDrop::new(inner),
        }
    }

    /// Takes the value out of the guard; the caller becomes responsible for never freeing it
    /// (crate-internal: only used to move a buffer into a type that is itself guarded next).
    fn into_inner(self) -> T {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: `me` is never used again and its destructor does not run, so the value is
        // moved out exactly once.
        unsafe { ManuallyDrop::take(&mut me.inner) }
    }
}

impl<T: IntoDeviceBuffers> Deref for Borrowed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: IntoDeviceBuffers> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: IntoDeviceBuffers> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `inner` is not used afterwards.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        inner.release();
    }
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
) -> Result<Borrowed<LoraWeights>> {
    // SAFETY: forwarded to the caller.
    let a = unsafe { gpu.borrow_bf16_matrix(a_ptr, a_shape.0, a_shape.1)? };
    // SAFETY: forwarded to the caller.
    let b = unsafe { gpu.borrow_bf16_matrix(b_ptr, b_shape.0, b_shape.1)? };
    Ok(Borrowed::new(LoraWeights {
        a: a.into_inner(),
        b: b.into_inner(),
        rank,
        scaling,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_on_stream_reports_a_missing_driver_or_device_as_a_typed_error() {
        // SAFETY: stream 0 (the legacy default stream) is valid in every context.
        match unsafe { Gpu::open_on_stream(usize::MAX, 0) } {
            Err(Error::NoDriver) | Err(Error::NoDevice { .. }) => {}
            other => panic!("expected NoDriver or NoDevice, got {other:?}"),
        }
    }

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
