//! Device tensors: [`Bf16Matrix`], [`DenseExperts`], [`MxExperts`] and [`LoraWeights`].
//!
//! Each is a cheap handle: the device memory sits behind an [`Arc`], so `clone` shares it (no
//! copy) and the memory lives until the last handle drops. That is how a forward's saved state
//! ([`crate::op::Saved`]) owns its inputs without copying them. Memory borrowed from another
//! framework ([`crate::external`]) is a borrowed [`DeviceBuffer`], handed back instead of freed
//! when the last handle drops.
//!
//! This module depends only on the device core (`crate::device`), the MXFP4 container rules and
//! the tensor metadata; kernels and ops build on it.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::device::{DeviceBuffer, Gpu, alloc_filled, download, upload};
use crate::error::{Error, Result};
use crate::mxfp4::{MxError, MxLayout, MxShape, MxWeights, validate_mx};
use crate::nvfp4::{NV_BLOCK, NvError, NvShape, NvWeights};
use crate::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};
use crate::shared::mxfp4::MX_BLOCK;
use crate::tensor::{DeviceLoc, TensorMeta};

/// `dims` multiplied, or a typed error naming `tensor` when the product overflows `usize`.
pub(crate) fn element_count(tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape {
            tensor,
            expected: "a shape whose element count fits in usize".into(),
            actual: format!("{dims:?}"),
        })
}

/// A row-major bf16 matrix on the device. `Clone` shares the buffer (see the module docs).
#[derive(Clone)]
pub struct Bf16Matrix {
    data: Arc<DeviceBuffer<u16>>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Bf16Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Matrix[{}, {}]", self.rows, self.cols)
    }
}

impl Bf16Matrix {
    /// Uploads f32 values, rounding each to bf16 (nearest even).
    pub fn from_f32(gpu: &Gpu, values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let bits: Vec<u16> = values.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        Self::from_bits(gpu, &bits, rows, cols)
    }

    /// Uploads bf16 bit patterns.
    pub fn from_bits(gpu: &Gpu, bits: &[u16], rows: usize, cols: usize) -> Result<Self> {
        if bits.len() != rows * cols {
            return Err(Error::Shape {
                tensor: "matrix",
                expected: format!("[{rows}, {cols}] ({} elements)", rows * cols),
                actual: format!("{} elements", bits.len()),
            });
        }
        let data = if bits.is_empty() {
            alloc_filled(gpu, 1, 0)?
        } else {
            upload(gpu, bits)?
        };
        Ok(Self::from_output(data, rows, cols))
    }

    /// Wraps a device buffer holding at least `rows·cols` bf16 (mxmoe owns it from now on).
    pub fn from_device(data: CudaSlice<u16>, rows: usize, cols: usize) -> Result<Self> {
        Self::from_buffer(DeviceBuffer::owned(data), rows, cols)
    }

    /// Wraps an owned or borrowed buffer holding at least `rows·cols` bf16.
    pub fn from_buffer(data: DeviceBuffer<u16>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() < element_count("matrix", &[rows, cols])? {
            return Err(Error::Shape {
                tensor: "matrix",
                expected: format!("[{rows}, {cols}]"),
                actual: format!("{} elements", data.len()),
            });
        }
        Ok(Self {
            data: Arc::new(data),
            rows,
            cols,
        })
    }

    /// Wraps a kernel's output, allocated by the caller with at least `rows·cols` elements.
    pub(crate) fn from_output(data: CudaSlice<u16>, rows: usize, cols: usize) -> Self {
        Self {
            data: Arc::new(DeviceBuffer::owned(data)),
            rows,
            cols,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The device buffer.
    pub fn data(&self) -> &CudaSlice<u16> {
        &self.data
    }

    /// Downloads as f32 (synchronizes).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = download(gpu, self.data())?
            .into_iter()
            .map(bf16_bits_to_f32)
            .collect();
        v.truncate(self.rows * self.cols);
        Ok(v)
    }
}

/// Dense bf16 expert weights in the checkpoint layout `W_store [E, N, K]` (K contiguous).
/// `Clone` shares the buffer.
#[derive(Clone)]
pub struct DenseExperts {
    data: Arc<DeviceBuffer<u16>>,
    experts: usize,
    n: usize,
    k: usize,
}

impl DenseExperts {
    /// Uploads f32 values (rounded to bf16) of shape `[experts, n, k]`.
    pub fn from_f32(gpu: &Gpu, values: &[f32], experts: usize, n: usize, k: usize) -> Result<Self> {
        let bits: Vec<u16> = values.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        Self::from_bits(gpu, &bits, experts, n, k)
    }

    /// Uploads bf16 bits of shape `[experts, n, k]`.
    pub fn from_bits(gpu: &Gpu, bits: &[u16], experts: usize, n: usize, k: usize) -> Result<Self> {
        check_expert_dims(experts, n, k)?;
        if bits.len() != experts * n * k {
            return Err(Error::Shape {
                tensor: "expert weights",
                expected: format!("[{experts}, {n}, {k}]"),
                actual: format!("{} elements", bits.len()),
            });
        }
        Ok(Self::from_output(upload(gpu, bits)?, experts, n, k))
    }

    /// Wraps device-resident weights `[experts, n, k]` (mxmoe owns the buffer from now on).
    pub fn from_device(data: CudaSlice<u16>, experts: usize, n: usize, k: usize) -> Result<Self> {
        Self::from_buffer(DeviceBuffer::owned(data), experts, n, k)
    }

    /// Wraps an owned or borrowed buffer holding `[experts, n, k]` bf16.
    pub fn from_buffer(
        data: DeviceBuffer<u16>,
        experts: usize,
        n: usize,
        k: usize,
    ) -> Result<Self> {
        check_expert_dims(experts, n, k)?;
        if data.len() < element_count("expert weights", &[experts, n, k])? {
            return Err(Error::Shape {
                tensor: "expert weights",
                expected: format!("[{experts}, {n}, {k}]"),
                actual: format!("{} elements", data.len()),
            });
        }
        Ok(Self {
            data: Arc::new(data),
            experts,
            n,
            k,
        })
    }

    /// Wraps a kernel's output of `experts·n·k` elements (at least).
    pub(crate) fn from_output(data: CudaSlice<u16>, experts: usize, n: usize, k: usize) -> Self {
        Self {
            data: Arc::new(DeviceBuffer::owned(data)),
            experts,
            n,
            k,
        }
    }

    /// `(E, N, K)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.experts, self.n, self.k)
    }

    /// The device buffer.
    pub fn data(&self) -> &CudaSlice<u16> {
        &self.data
    }
}

/// Rejects a zero dimension of dense expert weights.
fn check_expert_dims(experts: usize, n: usize, k: usize) -> Result<()> {
    if experts == 0 || n == 0 || k == 0 {
        return Err(Error::InvalidArgument {
            what: "expert weights",
            detail: format!("shape [{experts}, {n}, {k}] has a zero dimension"),
        });
    }
    Ok(())
}

/// MXFP4 expert weights resident on the device (`packed [E, N, K/2]`, `scales [E, N, K/32]`),
/// validated by [`crate::mxfp4::validate_mx`]. The fused kernels read these bytes directly; no
/// bf16 copy of any expert is ever made. `Clone` shares the buffers.
#[derive(Clone)]
pub struct MxExperts {
    packed: Arc<DeviceBuffer<u8>>,
    scales: Arc<DeviceBuffer<u8>>,
    shape: MxShape,
}

/// The one check of MXFP4 device metadata, used by [`MxExperts::from_device`] and
/// [`crate::external`]'s borrowing alike: the SPEC §1.6 rules ([`validate_mx`], block 32,
/// `Fwd`), dense (contiguous) buffers — the kernels read `[E, N, K/2]` and `[E, N, K/32]`
/// without outer strides — and metadata naming CUDA device `ordinal`. Returns the shape.
pub fn check_mx_device_meta(
    packed_meta: &TensorMeta,
    scales_meta: &TensorMeta,
    ordinal: usize,
) -> Result<MxShape> {
    let shape = validate_mx(packed_meta, scales_meta, MX_BLOCK, MxLayout::Fwd, false)?;
    for (meta, tensor) in [(packed_meta, "packed"), (scales_meta, "scales")] {
        if !meta.is_contiguous() {
            return Err(MxError::Layout(format!(
                "{tensor} must be contiguous (strides {:?})",
                meta.strides
            ))
            .into());
        }
    }
    // `validate_mx` checked that both metadata name the same device.
    let here = DeviceLoc::Cuda(ordinal);
    if packed_meta.device != here {
        return Err(MxError::Device {
            packed: packed_meta.device.to_string(),
            scales: here.to_string(),
        }
        .into());
    }
    Ok(shape)
}

impl MxExperts {
    /// Uploads a validated host container.
    pub fn upload(gpu: &Gpu, w: &MxWeights) -> Result<Self> {
        Ok(Self {
            packed: Arc::new(DeviceBuffer::owned(upload(gpu, w.packed())?)),
            scales: Arc::new(DeviceBuffer::owned(upload(gpu, w.scales())?)),
            shape: w.shape(),
        })
    }

    /// Wraps device buffers (mxmoe owns them from now on) after validating their metadata
    /// ([`check_mx_device_meta`]) and lengths.
    pub fn from_device(
        packed: CudaSlice<u8>,
        packed_meta: &TensorMeta,
        scales: CudaSlice<u8>,
        scales_meta: &TensorMeta,
    ) -> Result<Self> {
        Self::from_buffers(
            DeviceBuffer::owned(packed),
            packed_meta,
            DeviceBuffer::owned(scales),
            scales_meta,
        )
    }

    /// As [`from_device`](Self::from_device) for owned or borrowed buffers.
    pub fn from_buffers(
        packed: DeviceBuffer<u8>,
        packed_meta: &TensorMeta,
        scales: DeviceBuffer<u8>,
        scales_meta: &TensorMeta,
    ) -> Result<Self> {
        let ordinal = packed.context().ordinal();
        let shape = check_mx_device_meta(packed_meta, scales_meta, ordinal)?;
        if scales.context().ordinal() != ordinal {
            return Err(MxError::Device {
                packed: DeviceLoc::Cuda(ordinal).to_string(),
                scales: DeviceLoc::Cuda(scales.context().ordinal()).to_string(),
            }
            .into());
        }
        if packed.len() < shape.packed_len() || scales.len() < shape.scales_len() {
            return Err(Error::Shape {
                tensor: "MXFP4 buffers",
                expected: format!(
                    "{} packed and {} scale bytes",
                    shape.packed_len(),
                    shape.scales_len()
                ),
                actual: format!("{} and {}", packed.len(), scales.len()),
            });
        }
        Ok(Self {
            packed: Arc::new(packed),
            scales: Arc::new(scales),
            shape,
        })
    }

    /// The container's shape.
    pub fn shape(&self) -> MxShape {
        self.shape
    }

    /// The packed E2M1 codes, `[E, N, K/2]`.
    pub fn packed(&self) -> &CudaSlice<u8> {
        &self.packed
    }

    /// The E8M0 scale bytes, `[E, N, K/32]`.
    pub fn scales(&self) -> &CudaSlice<u8> {
        &self.scales
    }
}

/// NVFP4 expert weights resident on the device (`packed [E, N, K/2]`, E4M3 `scales
/// [E, N, K/16]`, optional f32 tensor scales `[E, groups]`), uploaded from a validated
/// [`NvWeights`] (issue #17: Strategy A dequantizes the active experts; the fused kernels are
/// still to come). `Clone` shares the buffers.
#[derive(Clone)]
pub struct NvExperts {
    packed: Arc<DeviceBuffer<u8>>,
    scales: Arc<DeviceBuffer<u8>>,
    tensor_scales: Option<Arc<DeviceBuffer<f32>>>,
    shape: NvShape,
    groups: usize,
}

impl NvExperts {
    /// Uploads a validated host container.
    pub fn upload(gpu: &Gpu, w: &NvWeights) -> Result<Self> {
        Ok(Self {
            packed: Arc::new(DeviceBuffer::owned(upload(gpu, w.packed())?)),
            scales: Arc::new(DeviceBuffer::owned(upload(gpu, w.scales())?)),
            tensor_scales: match w.tensor_scales() {
                Some(t) => Some(Arc::new(DeviceBuffer::owned(upload(gpu, t)?))),
                None => None,
            },
            shape: w.shape(),
            groups: w.groups(),
        })
    }

    /// Wraps owned or borrowed device buffers of NVFP4 weights of `shape` with `groups` tensor
    /// scales per expert (when given). Checks that `groups` divides N and that each buffer holds
    /// at least the elements the shape implies; the values are not read (a borrowed buffer's
    /// metadata is validated by [`crate::external::check_nv_device_meta`]).
    pub fn from_buffers(
        packed: DeviceBuffer<u8>,
        scales: DeviceBuffer<u8>,
        tensor_scales: Option<DeviceBuffer<f32>>,
        shape: NvShape,
        groups: usize,
    ) -> Result<Self> {
        if groups == 0 || !shape.n().is_multiple_of(groups) {
            return Err(NvError::ScaleGroups {
                groups,
                n: shape.n(),
            }
            .into());
        }
        let short = |tensor, expected: usize, actual: usize| -> Result<()> {
            if actual < expected {
                return Err(NvError::Length {
                    tensor,
                    expected,
                    actual,
                }
                .into());
            }
            Ok(())
        };
        short("packed", shape.values() / 2, packed.len())?;
        short("scales", shape.values() / NV_BLOCK, scales.len())?;
        if let Some(t) = &tensor_scales {
            short("tensor_scales", shape.experts() * groups, t.len())?;
        }
        Ok(Self {
            packed: Arc::new(packed),
            scales: Arc::new(scales),
            tensor_scales: tensor_scales.map(Arc::new),
            shape,
            groups,
        })
    }

    /// The container's shape.
    pub fn shape(&self) -> NvShape {
        self.shape
    }

    /// The packed E2M1 codes, `[E, N, K/2]`.
    pub fn packed(&self) -> &CudaSlice<u8> {
        &self.packed
    }

    /// The E4M3 block scale bytes, `[E, N, K/16]`.
    pub fn scales(&self) -> &CudaSlice<u8> {
        &self.scales
    }

    /// The f32 tensor scales `[E, groups]`, if any.
    pub fn tensor_scales(&self) -> Option<&CudaSlice<f32>> {
        self.tensor_scales.as_deref().map(|b| &**b)
    }

    /// Tensor-scale groups per expert.
    pub fn groups(&self) -> usize {
        self.groups
    }
}

/// LoRA factors in the expert-major layout: `A [E·r, K]`, `B [N, E·r]`, scaling `s`. `Clone`
/// shares the buffers.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// `A`, `[E·r, K]`.
    pub a: Bf16Matrix,
    /// `B`, `[N, E·r]`.
    pub b: Bf16Matrix,
    /// Rank `r`.
    pub rank: usize,
    /// Scaling `s` (peft's `lora_alpha / r`).
    pub scaling: f32,
}
