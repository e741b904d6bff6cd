//! `mxmoe._native`: the Python extension module behind the `mxmoe` package.
//!
//! CPU functions (MXFP4 quantize / dequantize, the safetensors reader, `run_file` on the CPU
//! reference) take and return `bytes`.
//! GPU functions take tensors as descriptors `(data_ptr, shape, strides, dtype, device)` (built
//! by `mxmoe.autograd` from torch tensors; `device` is the CUDA ordinal, `-1` for host memory),
//! run on a [`PyGpu`] opened on the caller's stream, and hand their results to torch without a
//! copy: each output buffer is exported as a DLPack capsule (`torch.from_dlpack`) whose deleter
//! frees mxmoe's buffer, stream-ordered, when torch drops the tensor. Every mxmoe error is raised as `MxmoeError` (or
//! `NoDeviceError` when there is no driver or device) with the library's own message.
//!
//! Saved state between forward and backward lives in [`LinearState`] / [`MoeState`]: the
//! library's `Saved` / `MoeSaved` records own (share) what backward reads, including the tensors
//! borrowed from torch (wrapped in borrowed device buffers, never freed by mxmoe).

use std::sync::Mutex;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use mxmoe::activation::{Activation, GateUpLayout};
use mxmoe::checkpoint::{Checkpoint, read_nv_experts};
use mxmoe::device::Gpu;
use mxmoe::external::{borrow_lora, check_device_tensor};
use mxmoe::moe::{self, MoeBlock, MoeSaved};
use mxmoe::mxfp4::{
    MxShape, MxWeights, dequantize_bf16, dequantize_f32, quantize_mxfp4, quantize_mxfp4_bf16,
};
use mxmoe::nvfp4::{
    NvError, NvShape, NvWeights, dequantize_nvfp4_bf16, dequantize_nvfp4_f32, quantize_nvfp4,
    quantize_nvfp4_bf16,
};
use mxmoe::op::{
    self, Bf16Matrix, DenseExperts, ExpertLinear, ExpertWeights, LoraWeights, MxExperts, NvExperts,
    RowOrder, Saved, Strategy,
};
use mxmoe::routing::{DeviceIds, DeviceRouting};
use mxmoe::tensor::{DType, DeviceLoc, TensorMeta};
use mxmoe::{Error, Runtime};

create_exception!(
    _native,
    MxmoeError,
    PyRuntimeError,
    "An error reported by the mxmoe library (the message is the library's)."
);
create_exception!(
    _native,
    NoDeviceError,
    MxmoeError,
    "No CUDA driver, or no such CUDA device."
);

fn to_py(e: Error) -> PyErr {
    match e {
        Error::NoDriver | Error::NoDevice { .. } => NoDeviceError::new_err(e.to_string()),
        e => MxmoeError::new_err(e.to_string()),
    }
}

fn invalid(what: &'static str, detail: impl Into<String>) -> PyErr {
    to_py(Error::InvalidArgument {
        what,
        detail: detail.into(),
    })
}

type PyRes<T> = PyResult<T>;

// ----------------------------------------------------------------------------------------------
// CPU: quantizer, dequantizer, safetensors reader.

/// Little-endian input values as the quantizers take them.
enum Floats {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

/// Reads `data` as little-endian `f32` or `bf16` values (`dtype`), refusing a partial value.
fn le_floats(data: &[u8], dtype: &str) -> PyRes<Floats> {
    let width = match dtype {
        "f32" => 4,
        "bf16" => 2,
        other => {
            return Err(invalid(
                "dtype",
                format!("expected \"f32\" or \"bf16\", got {other:?}"),
            ));
        }
    };
    if !data.len().is_multiple_of(width) {
        return Err(invalid(
            "values",
            format!("{} bytes is not a whole number of {dtype}", data.len()),
        ));
    }
    Ok(if width == 4 {
        Floats::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    } else {
        Floats::Bf16(
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )
    })
}

/// Quantizes `[experts, n, k]` values (little-endian `f32` or `bf16` bytes) to MXFP4, bit-exact
/// with torchao 0.17.0 FLOOR mode. Returns `(packed [E, N, K/2], scales [E, N, K/32])` as bytes.
#[pyfunction]
#[pyo3(signature = (data, experts, n, k, dtype = "f32"))]
fn quantize_mxfp4_bytes<'py>(
    py: Python<'py>,
    data: &[u8],
    experts: usize,
    n: usize,
    k: usize,
    dtype: &str,
) -> PyRes<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let w = match le_floats(data, dtype)? {
        Floats::F32(v) => quantize_mxfp4(&v, experts, n, k),
        Floats::Bf16(v) => quantize_mxfp4_bf16(&v, experts, n, k),
    }
    .map_err(|e| to_py(e.into()))?;
    Ok((PyBytes::new(py, w.packed()), PyBytes::new(py, w.scales())))
}

/// `(packed, scales, tensor_scales)` of NVFP4 weights as Python bytes.
type NvBytes<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Option<Bound<'py, PyBytes>>,
);

/// The little-endian bytes of a dequantization in `dtype` (`"bf16"` or `"f32"`); only the
/// requested one runs.
fn dequantized_bytes(
    dtype: &str,
    as_bf16: impl FnOnce() -> Vec<u16>,
    as_f32: impl FnOnce() -> Vec<f32>,
) -> PyRes<Vec<u8>> {
    match dtype {
        "bf16" => Ok(as_bf16().into_iter().flat_map(u16::to_le_bytes).collect()),
        "f32" => Ok(as_f32().into_iter().flat_map(f32::to_le_bytes).collect()),
        other => Err(invalid(
            "dtype",
            format!("expected \"bf16\" or \"f32\", got {other:?}"),
        )),
    }
}

/// An NVFP4 error as the package's exception.
fn nv_err(e: NvError) -> PyErr {
    MxmoeError::new_err(e.to_string())
}

/// Quantizes `[experts, n, k]` values (little-endian `f32` or `bf16` bytes) to NVFP4, bit-exact
/// with torchao 0.18.0 `NVFP4Tensor.to_nvfp4` per expert; `two_level` adds each expert's
/// per-tensor scale (`amax / 2688`). Returns `(packed [E, N, K/2], scales [E, N, K/16]` E4M3
/// bytes, `tensor_scales [E]` little-endian f32 bytes or `None`).
#[pyfunction]
#[pyo3(signature = (data, experts, n, k, dtype = "f32", *, two_level = false))]
fn quantize_nvfp4_bytes<'py>(
    py: Python<'py>,
    data: &[u8],
    experts: usize,
    n: usize,
    k: usize,
    dtype: &str,
    two_level: bool,
) -> PyRes<NvBytes<'py>> {
    let w = match le_floats(data, dtype)? {
        Floats::F32(v) => quantize_nvfp4(&v, experts, n, k, two_level),
        Floats::Bf16(v) => quantize_nvfp4_bf16(&v, experts, n, k, two_level),
    }
    .map_err(nv_err)?;
    let tensor_scales = w.tensor_scales().map(|t| {
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        PyBytes::new(py, &bytes)
    });
    Ok((
        PyBytes::new(py, w.packed()),
        PyBytes::new(py, w.scales()),
        tensor_scales,
    ))
}

/// Dequantizes NVFP4 bytes `(packed [E, N, K/2], scales [E, N, K/16]` E4M3, optional
/// `tensor_scales [E]` little-endian f32) to `[E, N, K]` little-endian `bf16` (default) or `f32`
/// bytes, bit-exact with torchao's `NVFP4Tensor.dequantize`. Raises `MxmoeError` for invalid
/// parts (lengths, NaN or negative block scales, non-finite or non-positive tensor scales).
#[pyfunction]
#[pyo3(signature = (packed, scales, experts, n, k, tensor_scales = None, dtype = "bf16"))]
#[allow(clippy::too_many_arguments)]
fn dequantize_nvfp4_bytes<'py>(
    py: Python<'py>,
    packed: &[u8],
    scales: &[u8],
    experts: usize,
    n: usize,
    k: usize,
    tensor_scales: Option<&[u8]>,
    dtype: &str,
) -> PyRes<Bound<'py, PyBytes>> {
    let tensor_scales = match tensor_scales.map(|t| le_floats(t, "f32")).transpose()? {
        Some(Floats::F32(v)) => Some(v),
        _ => None,
    };
    let shape = NvShape::new(experts, n, k).map_err(nv_err)?;
    let w = NvWeights::from_parts(shape, packed.to_vec(), scales.to_vec(), tensor_scales)
        .map_err(nv_err)?;
    let bytes = dequantized_bytes(
        dtype,
        || dequantize_nvfp4_bf16(&w),
        || dequantize_nvfp4_f32(&w),
    )?;
    Ok(PyBytes::new(py, &bytes))
}

/// Dequantizes MXFP4 bytes `(packed [E, N, K/2], scales [E, N, K/32])` to `[E, N, K]`
/// little-endian `bf16` (default) or `f32` bytes, bit-exact with torchao. A scale byte 255
/// (E8M0 NaN) is an error naming expert, row and block unless `allow_nan_scales` (torchao's
/// behaviour: the block dequantizes to NaN).
#[pyfunction]
#[pyo3(signature = (packed, scales, experts, n, k, dtype = "bf16", *, allow_nan_scales = false))]
#[allow(clippy::too_many_arguments)]
fn dequantize_mxfp4_bytes<'py>(
    py: Python<'py>,
    packed: &[u8],
    scales: &[u8],
    experts: usize,
    n: usize,
    k: usize,
    dtype: &str,
    allow_nan_scales: bool,
) -> PyRes<Bound<'py, PyBytes>> {
    let shape = MxShape::new(experts, n, k).map_err(|e| to_py(e.into()))?;
    let w = MxWeights::from_shape(shape, packed.to_vec(), scales.to_vec())
        .map_err(|e| to_py(e.into()))?;
    if !allow_nan_scales {
        // The library's message says NaN scales need an explicit opt-in; name the Python one.
        w.check_no_nan_scales().map_err(|e| {
            MxmoeError::new_err(format!(
                "{}; pass allow_nan_scales=True to keep torchao's behaviour (NaN blocks)",
                Error::from(e)
            ))
        })?;
    }
    let bytes = dequantized_bytes(dtype, || dequantize_bf16(&w), || dequantize_f32(&w))?;
    Ok(PyBytes::new(py, &bytes))
}

/// Reads a safetensors file's bytes with mxmoe's reader: `{name: (dtype, shape, data)}` where
/// `dtype` is the safetensors name (`"BF16"`, `"U8"`, …) and `data` the raw little-endian bytes.
#[pyfunction]
fn read_safetensors<'py>(py: Python<'py>, data: &[u8]) -> PyRes<Bound<'py, PyDict>> {
    let ck = Checkpoint::parse(data).map_err(to_py)?;
    let out = PyDict::new(py);
    for name in ck.names() {
        let v = ck.view(name).map_err(to_py)?;
        let dtype = format!("{:?}", v.dtype());
        out.set_item(
            name,
            (dtype, v.shape().to_vec(), PyBytes::new(py, v.data())),
        )?;
    }
    Ok(out)
}

/// The parts of stacked NVFP4 experts read from a checkpoint: `(packed, scales, tensor_scales,
/// (E, N, K), groups, layout)`.
type NvCheckpointParts<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    (usize, usize, usize),
    usize,
    &'static str,
);

/// Reads NVFP4 experts stored one linear per expert and projection — `{prefix}.{e}.{proj}` with
/// ModelOpt's (`weight`, `weight_scale`, `weight_scale_2`) or compressed-tensors' (`weight_packed`,
/// `weight_scale`, `weight_global_scale`) names — from a safetensors file's bytes, through the
/// library's reader (`mxmoe::checkpoint::read_nv_experts`), and stacks each expert's projections
/// along N. Returns `(packed [E, N, K/2], scales [E, N, K/16]` E4M3 bytes, `tensor_scales [E, G]`
/// little-endian f32 bytes (one group per projection), `(E, N, K)`, `G`, the layout's name
/// (`"modelopt"` or `"compressed-tensors"`)). Raises `MxmoeError` naming the tensor for a
/// missing tensor, a wrong dtype or shape, mixed layouts, or invalid values.
#[pyfunction]
fn read_nvfp4_experts<'py>(
    py: Python<'py>,
    data: &[u8],
    prefix: &str,
    experts: usize,
    projections: Vec<String>,
    k: usize,
) -> PyRes<NvCheckpointParts<'py>> {
    let ck = Checkpoint::parse(data).map_err(to_py)?;
    let names: Vec<&str> = projections.iter().map(String::as_str).collect();
    let (w, layout) = read_nv_experts(&ck, prefix, experts, &names, k).map_err(to_py)?;
    let shape = w.shape();
    let tensor_scales: Vec<u8> = w
        .tensor_scales()
        .unwrap_or_default()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    Ok((
        PyBytes::new(py, w.packed()),
        PyBytes::new(py, w.scales()),
        PyBytes::new(py, &tensor_scales),
        (shape.experts(), shape.n(), shape.k()),
        w.groups(),
        layout.name(),
    ))
}

/// Runs one operator call described by the bytes of a safetensors file, in the format of
/// `mxmoe run` (`mxmoe::run_file::FORMAT_HELP`; projection or block mode), through the library's
/// `run_file` module, the very code the CLI runs.
///
/// The file is checked first (the same typed errors as the CLI). Then the backend: `cpu=True`
/// runs the CPU reference (bf16 rounding at the kernels' points; needs no GPU); `device=N` opens
/// that device (`NoDeviceError` if it does not exist); with neither, device 0 is used when there
/// is one, else the CPU reference, and `fallback` says why. The GIL is released while the call
/// runs.
///
/// Returns a dict: `data` (the output file's bytes), `tensors` (`{name: ("BF16", shape,
/// bytes)}`), `metadata` (the output file's, `mxmoe.*` keys included), `problem` (one line),
/// `backend` (`gpu` | `cpu-reference`), `device`, `strategy` (the path that ran), `fallback`
/// (why the CPU reference ran without `cpu=True`, else `None`) and `warnings` (messages, e.g.
/// tensors the call did not read).
#[pyfunction]
#[pyo3(signature = (data, *, cpu = false, device = None, strategy = "auto", weight = "w",
                    allow_nan_scales = false))]
#[allow(clippy::too_many_arguments)]
fn run_file<'py>(
    py: Python<'py>,
    data: &[u8],
    cpu: bool,
    device: Option<usize>,
    strategy: &str,
    weight: &str,
    allow_nan_scales: bool,
) -> PyRes<Bound<'py, PyDict>> {
    use mxmoe::run_file::{Backend, Problem, RunOptions};
    let options = RunOptions {
        strategy: parse_arg("strategy", strategy)?,
        allow_nan_scales,
        weight: weight.to_string(),
    };
    let problem = py
        .allow_threads(|| Problem::parse(data, &options))
        .map_err(to_py)?;
    // The backend, as the CLI chooses it: a named device must exist; otherwise no driver or no
    // device falls back to the CPU reference, and says so.
    let (runtime, fallback) = if cpu {
        (None, None)
    } else {
        match device {
            Some(n) => (Some(Runtime::open(n).map_err(to_py)?), None),
            None if !mxmoe::device::driver_present() => {
                (None, Some("no CUDA driver found".to_string()))
            }
            None if mxmoe::device::device_count().map_err(to_py)? == 0 => {
                (None, Some("no CUDA device found".to_string()))
            }
            None => (Some(Runtime::open(0).map_err(to_py)?), None),
        }
    };
    let backend = match &runtime {
        Some(rt) => Backend::Gpu(rt),
        None => Backend::CpuReference,
    };
    let output = py.allow_threads(|| problem.run(backend)).map_err(to_py)?;
    let bytes = output.to_bytes().map_err(to_py)?;
    let result = PyDict::new(py);
    result.set_item("data", PyBytes::new(py, &bytes))?;
    let tensors = PyDict::new(py);
    for t in &output.tensors {
        let raw: Vec<u8> = t
            .values
            .iter()
            .flat_map(|&v| mxmoe::shared::bf16::f32_to_bf16_bits(v).to_le_bytes())
            .collect();
        tensors.set_item(t.name, ("BF16", t.shape.clone(), PyBytes::new(py, &raw)))?;
    }
    result.set_item("tensors", tensors)?;
    let metadata = PyDict::new(py);
    for (k, v) in &output.metadata {
        metadata.set_item(k, v)?;
    }
    result.set_item("metadata", metadata)?;
    result.set_item("problem", &output.problem)?;
    result.set_item("backend", output.ran.backend_name())?;
    result.set_item("device", output.ran.device())?;
    result.set_item("strategy", output.ran.strategy())?;
    result.set_item("fallback", fallback)?;
    let warnings: Vec<String> = output.warnings.iter().map(ToString::to_string).collect();
    result.set_item("warnings", warnings)?;
    Ok(result)
}

/// Whether libcuda can be loaded.
#[pyfunction]
fn driver_present() -> bool {
    mxmoe::device::driver_present()
}

/// Number of CUDA devices (raises `NoDeviceError` without a driver).
#[pyfunction]
fn device_count() -> PyRes<usize> {
    mxmoe::device::device_count().map_err(to_py)
}

// ----------------------------------------------------------------------------------------------
// Tensor descriptors.

/// A tensor as the caller declares it: device address and metadata.
struct Desc {
    ptr: u64,
    meta: TensorMeta,
}

/// Parses one of the library's enum names (`FromStr`), reporting a bad name against `what`.
fn parse_arg<T: std::str::FromStr<Err = Error>>(what: &'static str, name: &str) -> PyRes<T> {
    name.parse().map_err(|e| match e {
        Error::InvalidArgument { detail, .. } => invalid(what, detail),
        e => to_py(e),
    })
}

impl<'py> FromPyObject<'py> for Desc {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyRes<Self> {
        let (ptr, shape, strides, dtype, device): (u64, Vec<usize>, Vec<i64>, String, i64) =
            ob.extract()?;
        let strides = strides
            .iter()
            .map(|&s| usize::try_from(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid("strides", format!("negative strides {strides:?}")))?;
        let device = if device < 0 {
            DeviceLoc::Cpu
        } else {
            DeviceLoc::Cuda(device as usize)
        };
        Ok(Desc {
            ptr,
            meta: TensorMeta {
                dtype: parse_arg("dtype", &dtype)?,
                shape,
                strides,
                device,
            },
        })
    }
}

/// Shape of a contiguous bf16 device tensor of rank `rank`.
fn bf16_shape(tensor: &'static str, d: &Desc, rank: usize, gpu: &Gpu) -> PyRes<Vec<usize>> {
    let shape = check_device_tensor(tensor, &d.meta, DType::BF16, gpu.ordinal()).map_err(to_py)?;
    if shape.len() != rank {
        return Err(to_py(Error::Shape {
            tensor,
            expected: format!("rank {rank}"),
            actual: format!("{shape:?}"),
        }));
    }
    Ok(shape)
}

/// A borrowed `[rows, cols]` bf16 matrix.
fn borrow_matrix(tensor: &'static str, d: &Desc, gpu: &Gpu) -> PyRes<Bf16Matrix> {
    let s = bf16_shape(tensor, d, 2, gpu)?;
    // SAFETY: the Python layer passes the data pointer of a live, contiguous torch tensor of this
    // shape on this device and keeps it alive (ctx.save_for_backward or the call's frame).
    unsafe { gpu.borrow_bf16_matrix(d.ptr, s[0], s[1]) }.map_err(to_py)
}

/// DLPack (v0.8 ABI, the legacy `"dltensor"` capsule torch accepts): just the structs mxmoe
/// needs to export a bf16 matrix.
mod dlpack {
    use std::ffi::c_void;

    /// `DLDevice`.
    #[repr(C)]
    pub struct Device {
        pub device_type: i32,
        pub device_id: i32,
    }

    /// `DLDataType`.
    #[repr(C)]
    pub struct DataType {
        pub code: u8,
        pub bits: u8,
        pub lanes: u16,
    }

    /// `DLTensor`.
    #[repr(C)]
    pub struct Tensor {
        pub data: *mut c_void,
        pub device: Device,
        pub ndim: i32,
        pub dtype: DataType,
        pub shape: *mut i64,
        pub strides: *mut i64,
        pub byte_offset: u64,
    }

    /// `DLManagedTensor`.
    #[repr(C)]
    pub struct ManagedTensor {
        pub dl_tensor: Tensor,
        pub manager_ctx: *mut c_void,
        pub deleter: Option<unsafe extern "C" fn(*mut ManagedTensor)>,
    }

    /// `kDLCUDA`.
    pub const CUDA: i32 = 2;
    /// `kDLBfloat`.
    pub const BFLOAT: u8 = 4;
    /// The capsule name torch looks for (renamed to `used_dltensor` once consumed).
    pub const CAPSULE_NAME: &std::ffi::CStr = c"dltensor";
}

/// What a DLPack capsule owns: mxmoe's matrix (a handle on its device buffer) and the shape
/// array the tensor points to.
struct Exported {
    _data: Bf16Matrix,
    shape: [i64; 2],
}

/// The DLPack deleter: frees the buffer (cudarc frees it stream-ordered on the stream that
/// produced it, torch's) and the descriptor.
unsafe extern "C" fn dl_deleter(t: *mut dlpack::ManagedTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` and its `manager_ctx` were created by `Box::into_raw` in `export` and are
    // released exactly once, here (DLPack calls the deleter once).
    unsafe {
        let managed = Box::from_raw(t);
        drop(Box::from_raw(managed.manager_ctx as *mut Exported));
    }
}

/// The capsule destructor: if torch never consumed the capsule (its name is still
/// `"dltensor"`), the tensor is ours to delete; a consumed capsule belongs to torch.
unsafe extern "C" fn capsule_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by CPython with the capsule being destroyed; the name check tells whether
    // the pointer is still ours.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, dlpack::CAPSULE_NAME.as_ptr()) == 1 {
            let t = pyo3::ffi::PyCapsule_GetPointer(capsule, dlpack::CAPSULE_NAME.as_ptr())
                as *mut dlpack::ManagedTensor;
            if let Some(del) = (*t).deleter {
                del(t);
            }
        }
    }
}

/// Exports `m` (a `[rows, cols]` bf16 matrix mxmoe allocated on `gpu`) as a DLPack capsule for
/// `torch.from_dlpack`: no copy; torch's tensor keeps mxmoe's buffer until it is dropped.
fn export(py: Python<'_>, gpu: &Gpu, m: Bf16Matrix) -> PyRes<PyObject> {
    use cudarc::driver::DevicePtr;
    let (rows, cols) = (m.rows(), m.cols());
    let ptr = {
        let (p, _sync) = m.data().device_ptr(gpu.stream());
        p
    };
    let holder = Box::into_raw(Box::new(Exported {
        _data: m,
        shape: [rows as i64, cols as i64],
    }));
    let managed = Box::into_raw(Box::new(dlpack::ManagedTensor {
        dl_tensor: dlpack::Tensor {
            data: ptr as *mut std::ffi::c_void,
            device: dlpack::Device {
                device_type: dlpack::CUDA,
                device_id: gpu.ordinal() as i32,
            },
            ndim: 2,
            dtype: dlpack::DataType {
                code: dlpack::BFLOAT,
                bits: 16,
                lanes: 1,
            },
            // SAFETY: `holder` is a live box; its shape array lives as long as the tensor.
            shape: unsafe { (*holder).shape.as_mut_ptr() },
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: holder as *mut std::ffi::c_void,
        deleter: Some(dl_deleter),
    }));
    // SAFETY: `managed` is a valid pointer owned by the capsule from here on; the destructor
    // releases it unless torch consumed (and renamed) the capsule.
    let capsule = unsafe {
        pyo3::ffi::PyCapsule_New(
            managed as *mut std::ffi::c_void,
            dlpack::CAPSULE_NAME.as_ptr(),
            Some(capsule_destructor),
        )
    };
    if capsule.is_null() {
        // SAFETY: the capsule was not created, so nothing else owns `managed`.
        unsafe { dl_deleter(managed) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `PyCapsule_New` returned a new (owned) reference.
    Ok(unsafe { PyObject::from_owned_ptr(py, capsule) })
}

/// Frozen expert weights: `("mxfp4", packed, scales)`, `("nvfp4", packed, scales,
/// tensor_scales)` (`tensor_scales` f32 `[E]` / `[E, G]` or `None`) or `("bf16", w)`.
enum WeightsArg {
    Mx(Desc, Desc),
    Nv(Desc, Desc, Option<Desc>),
    Dense(Desc),
}

/// The accepted forms of expert weights, for messages.
const WEIGHT_KINDS: &str = "(\"mxfp4\", packed, scales), (\"nvfp4\", packed, scales, tensor_scales) \
                            or (\"bf16\", w)";

impl<'py> FromPyObject<'py> for WeightsArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyRes<Self> {
        let kind: String = ob.get_item(0)?.extract()?;
        match kind.as_str() {
            "mxfp4" => {
                let (_, p, s): (String, Desc, Desc) = ob.extract()?;
                Ok(WeightsArg::Mx(p, s))
            }
            "nvfp4" => {
                let (_, p, s, t): (String, Desc, Desc, Option<Desc>) = ob.extract()?;
                Ok(WeightsArg::Nv(p, s, t))
            }
            "bf16" => {
                let (_, w): (String, Desc) = ob.extract()?;
                Ok(WeightsArg::Dense(w))
            }
            other => Err(invalid(
                "expert weights",
                format!("expected {WEIGHT_KINDS}, got kind {other:?}"),
            )),
        }
    }
}

/// Borrowed expert weights.
enum OwnedWeights {
    Mx(MxExperts),
    Nv(NvExperts),
    Dense(DenseExperts),
}

impl OwnedWeights {
    fn borrow(arg: &WeightsArg, gpu: &Gpu) -> PyRes<Self> {
        Ok(match arg {
            WeightsArg::Mx(p, s) => {
                // SAFETY: live torch tensors whose metadata is validated before wrapping.
                OwnedWeights::Mx(
                    unsafe { gpu.borrow_mx_experts(p.ptr, &p.meta, s.ptr, &s.meta) }
                        .map_err(to_py)?,
                )
            }
            WeightsArg::Nv(p, s, t) => {
                let t = t.as_ref().map(|t| (t.ptr, &t.meta));
                // SAFETY: live torch tensors whose metadata is validated before wrapping.
                OwnedWeights::Nv(
                    unsafe { gpu.borrow_nv_experts(p.ptr, &p.meta, s.ptr, &s.meta, t) }
                        .map_err(to_py)?,
                )
            }
            WeightsArg::Dense(w) => {
                let s = bf16_shape("expert weights", w, 3, gpu)?;
                // SAFETY: a live contiguous bf16 torch tensor of this shape.
                OwnedWeights::Dense(
                    unsafe { gpu.borrow_dense_experts(w.ptr, s[0], s[1], s[2]) }.map_err(to_py)?,
                )
            }
        })
    }

    fn get(&self) -> ExpertWeights<'_> {
        match self {
            OwnedWeights::Mx(w) => ExpertWeights::Mxfp4(w),
            OwnedWeights::Nv(w) => ExpertWeights::Nvfp4(w),
            OwnedWeights::Dense(w) => ExpertWeights::Bf16(w),
        }
    }

    fn experts(&self) -> usize {
        match self {
            OwnedWeights::Mx(w) => w.shape().experts(),
            OwnedWeights::Nv(w) => w.shape().experts(),
            OwnedWeights::Dense(w) => w.shape().0,
        }
    }
}

/// LoRA factors: `(A [E·r, K], B [N, E·r], rank, scaling)`.
type LoraArg = (Desc, Desc, usize, f32);

fn borrow_lora_arg(arg: &LoraArg, gpu: &Gpu) -> PyRes<LoraWeights> {
    let (a, b, rank, scaling) = arg;
    let sa = bf16_shape("lora_A", a, 2, gpu)?;
    let sb = bf16_shape("lora_B", b, 2, gpu)?;
    // SAFETY: live contiguous bf16 torch tensors of these shapes.
    unsafe {
        borrow_lora(
            gpu,
            a.ptr,
            (sa[0], sa[1]),
            b.ptr,
            (sb[0], sb[1]),
            *rank,
            *scaling,
        )
    }
    .map_err(to_py)
}

/// Routes `ids [T, k]` (i64 or i32, on the device) over `experts` experts.
fn route(ids: &Desc, experts: usize, gpu: &Gpu) -> PyRes<DeviceRouting> {
    let dtype = ids.meta.dtype;
    if dtype != DType::I64 && dtype != DType::I32 {
        return Err(invalid(
            "expert ids",
            format!("expected dtype i64 or i32, got {dtype}"),
        ));
    }
    let shape =
        check_device_tensor("expert ids", &ids.meta, dtype, gpu.ordinal()).map_err(to_py)?;
    if shape.len() != 2 {
        return Err(to_py(Error::Shape {
            tensor: "expert ids",
            expected: "[T, top_k]".into(),
            actual: format!("{shape:?}"),
        }));
    }
    let (t, k) = (shape[0], shape[1]);
    if t * k == 0 {
        return DeviceRouting::from_host_ids(gpu, &[], t, k, experts).map_err(to_py);
    }
    match dtype {
        DType::I64 => {
            // SAFETY: a live contiguous id tensor of `t·k` elements; only read by the routing
            // kernels, queued on this stream before the tensor can be released.
            let s = unsafe { gpu.borrow_slice::<i64>(ids.ptr, t * k) };
            DeviceRouting::from_device_ids(gpu, DeviceIds::I64(&s), t, k, experts)
        }
        _ => {
            // SAFETY: as above, for i32 ids.
            let s = unsafe { gpu.borrow_slice::<i32>(ids.ptr, t * k) };
            DeviceRouting::from_device_ids(gpu, DeviceIds::I32(&s), t, k, experts)
        }
    }
    .map_err(to_py)
}

// ----------------------------------------------------------------------------------------------
// The device.

/// A CUDA device opened on the caller's stream (`torch.cuda.current_stream().cuda_stream`), in
/// the device's primary context (the one PyTorch uses). Launches are ordered on that stream; no
/// synchronisation is added.
#[pyclass(name = "Gpu", frozen, module = "mxmoe._native")]
struct PyGpu {
    gpu: Runtime,
    stream: usize,
}

#[pymethods]
impl PyGpu {
    /// Opens device `ordinal` on stream `stream` (a `CUstream` as an integer; 0 = legacy
    /// default stream). The stream must outlive this object and every state made with it.
    #[new]
    fn new(ordinal: usize, stream: usize) -> PyRes<Self> {
        // SAFETY: the Python layer passes a torch stream of this device, which torch keeps
        // alive (streams from torch's pool are never destroyed).
        let gpu = unsafe { Runtime::open_on_stream(ordinal, stream) }.map_err(to_py)?;
        Ok(Self { gpu, stream })
    }

    /// The same device and module on another stream (cheap).
    fn on_stream(&self, stream: usize) -> Self {
        // SAFETY: as for `new`.
        let gpu = unsafe { self.gpu.on_stream(stream) };
        Self { gpu, stream }
    }

    /// Device ordinal.
    #[getter]
    fn ordinal(&self) -> usize {
        self.gpu.ordinal()
    }

    /// The stream handle.
    #[getter]
    fn stream(&self) -> usize {
        self.stream
    }

    /// Device name.
    #[getter]
    fn name(&self) -> String {
        self.gpu.limits().name.clone()
    }

    /// The PTX module loaded and why, e.g. `"hopper (sm_90a; chosen for compute capability
    /// 9.0)"` (`MXMOE_MODULE=portable` forces the portable `sm_80` module).
    #[getter]
    fn module(&self) -> String {
        self.gpu.module_selection().to_string()
    }

    /// Waits for all work on the stream.
    fn synchronize(&self) -> PyRes<()> {
        self.gpu.synchronize().map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "mxmoe.Gpu(ordinal={}, name={:?}, stream={:#x})",
            self.gpu.ordinal(),
            self.gpu.limits().name,
            self.stream
        )
    }
}

// ----------------------------------------------------------------------------------------------
// The expert linear.

/// A linear's saved record (it owns what backward reads) and which gradients to return.
struct LinearHeld {
    saved: Saved,
    has_gates: bool,
    has_lora: bool,
}

/// The state one expert-linear forward leaves for its backward (consumed by the backward).
#[pyclass(frozen, module = "mxmoe._native")]
struct LinearState {
    inner: Mutex<Option<LinearHeld>>,
    strategy: Strategy,
}

#[pymethods]
impl LinearState {
    /// The path the forward ran: `"fused"` or `"selective"`.
    #[getter]
    fn strategy(&self) -> &'static str {
        self.strategy.name()
    }

    /// Frees the saved intermediates now (idempotent).
    fn release(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Forward of the LoRA-fused expert linear. Returns the output (`[T, N]` with gates, else
/// `[T·k, N]`) as a DLPack capsule and the state for [`linear_backward`] when `keep_state`.
#[pyfunction]
#[pyo3(signature = (gpu, x, ids, weights, *, lora = None, gates = None,
                    input_order = "scattered", output_order = "scattered",
                    strategy = "auto", keep_state = true))]
#[allow(clippy::too_many_arguments)]
fn linear_forward(
    py: Python<'_>,
    gpu: &PyGpu,
    x: Desc,
    ids: Desc,
    weights: WeightsArg,
    lora: Option<LoraArg>,
    gates: Option<Desc>,
    input_order: &str,
    output_order: &str,
    strategy: &str,
    keep_state: bool,
) -> PyRes<(PyObject, Option<LinearState>)> {
    let g = &gpu.gpu;
    let input_order: RowOrder = parse_arg("input_order", input_order)?;
    let output_order: RowOrder = parse_arg("output_order", output_order)?;
    let strategy: Strategy = parse_arg("strategy", strategy)?;
    let weights = OwnedWeights::borrow(&weights, g)?;
    let x = borrow_matrix("x", &x, g)?;
    let routing = route(&ids, weights.experts(), g)?;
    let gates = gates
        .as_ref()
        .map(|d| borrow_matrix("gates", d, g))
        .transpose()?;
    let lora = lora.as_ref().map(|l| borrow_lora_arg(l, g)).transpose()?;
    let layer = ExpertLinear::new(weights.get(), lora.as_ref(), input_order, output_order)
        .with_strategy(strategy);
    let (fwd, saved) = layer
        .forward(g, &x, &routing, gates.as_ref())
        .map_err(to_py)?;
    let out = export(py, g, fwd.out)?;
    if !keep_state {
        return Ok((out, None));
    }
    Ok((
        out,
        Some(LinearState {
            strategy: fwd.strategy,
            inner: Mutex::new(Some(LinearHeld {
                has_gates: gates.is_some(),
                has_lora: lora.is_some(),
                saved,
            })),
        }),
    ))
}

/// Takes a forward's saved record out of its state (a second backward gets an error).
fn take_state<T>(inner: &Mutex<Option<T>>) -> PyRes<T> {
    inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| {
            invalid(
                "saved state",
                "already used by a backward pass or released (retain_graph is not supported)",
            )
        })
}

/// Backward of the expert linear: returns DLPack capsules `(dx, da, db, d_gates)` — `dx` has the
/// shape of `x`; `da`/`db` (shapes of LoRA A/B) and `d_gates` (shape of gates) are `None` when the
/// forward had no LoRA / no gates. Consumes the state.
#[pyfunction]
#[pyo3(signature = (gpu, state, dy))]
#[allow(clippy::type_complexity)]
fn linear_backward(
    py: Python<'_>,
    gpu: &PyGpu,
    state: &LinearState,
    dy: Desc,
) -> PyRes<(
    PyObject,
    Option<PyObject>,
    Option<PyObject>,
    Option<PyObject>,
)> {
    let g = &gpu.gpu;
    let held = take_state(&state.inner)?;
    let dy = borrow_matrix("dy", &dy, g)?;
    let grads = op::backward(g, &held.saved, &dy).map_err(to_py)?;
    let (has_lora, has_gates) = (held.has_lora, held.has_gates);
    // The record (with its handles on the borrowed inputs) is released here; mxmoe's own buffers
    // that are not exported are freed stream-ordered after the kernels that used them.
    drop(held);
    let opt = |m: Option<Bf16Matrix>, keep: bool| -> PyRes<Option<PyObject>> {
        m.filter(|_| keep).map(|m| export(py, g, m)).transpose()
    };
    Ok((
        export(py, g, grads.dx)?,
        opt(grads.da, has_lora)?,
        opt(grads.db, has_lora)?,
        opt(grads.d_gates, has_gates)?,
    ))
}

// ----------------------------------------------------------------------------------------------
// The MoE block.

/// The state one MoE-block forward leaves for its backward (consumed by the backward).
#[pyclass(frozen, module = "mxmoe._native")]
struct MoeState {
    inner: Mutex<Option<MoeSaved>>,
    strategies: (Strategy, Strategy),
}

#[pymethods]
impl MoeState {
    /// The paths the forward ran for `(gate_up, down)`.
    #[getter]
    fn strategies(&self) -> (&'static str, &'static str) {
        (self.strategies.0.name(), self.strategies.1.name())
    }

    /// Frees the saved intermediates now (idempotent).
    fn release(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// The block's activation from the Python arguments: `"swiglu"` (split gate/up halves, the
/// optional clamp `limit`) or `"gpt_oss"` (interleaved gate/up, `alpha` default 1.702, `limit`
/// default 7.0, `clamp_boundary` `"strict"` or `"inclusive"`).
fn block_activation(
    activation: &str,
    alpha: Option<f32>,
    limit: Option<f32>,
    clamp_boundary: &str,
) -> PyRes<(Activation, GateUpLayout)> {
    match activation {
        "swiglu" => {
            if alpha.is_some() {
                return Err(invalid(
                    "alpha",
                    "only the gpt_oss activation takes it (SwiGLU's slope is 1)",
                ));
            }
            Ok((Activation::SwiGlu { limit }, GateUpLayout::Split))
        }
        "gpt_oss" => Ok((
            Activation::GptOss {
                alpha: alpha.unwrap_or(1.702),
                limit: limit.unwrap_or(7.0),
                boundary: parse_arg("clamp_boundary", clamp_boundary)?,
            },
            GateUpLayout::Interleaved,
        )),
        other => Err(invalid(
            "activation",
            format!("expected \"swiglu\" or \"gpt_oss\", got {other:?}"),
        )),
    }
}

/// Forward of the gated MoE MLP block (SwiGLU, or gpt-oss's block with its biases): returns
/// `y [T, H]` as a DLPack capsule and the state for [`moe_backward`] when `keep_state`.
#[pyfunction]
#[pyo3(signature = (gpu, x, ids, gates, gate_up, down, *, lora_gate_up = None,
                    lora_down = None, limit = None, strategy = "auto", keep_state = true,
                    activation = "swiglu", alpha = None, clamp_boundary = "strict",
                    gate_up_bias = None, down_bias = None))]
#[allow(clippy::too_many_arguments)]
fn moe_forward(
    py: Python<'_>,
    gpu: &PyGpu,
    x: Desc,
    ids: Desc,
    gates: Desc,
    gate_up: WeightsArg,
    down: WeightsArg,
    lora_gate_up: Option<LoraArg>,
    lora_down: Option<LoraArg>,
    limit: Option<f32>,
    strategy: &str,
    keep_state: bool,
    activation: &str,
    alpha: Option<f32>,
    clamp_boundary: &str,
    gate_up_bias: Option<Desc>,
    down_bias: Option<Desc>,
) -> PyRes<(PyObject, Option<MoeState>)> {
    let g = &gpu.gpu;
    let strategy: Strategy = parse_arg("strategy", strategy)?;
    let (activation, layout) = block_activation(activation, alpha, limit, clamp_boundary)?;
    let gate_up_bias = gate_up_bias
        .as_ref()
        .map(|b| borrow_matrix("gate_up_bias", b, g))
        .transpose()?;
    let down_bias = down_bias
        .as_ref()
        .map(|b| borrow_matrix("down_bias", b, g))
        .transpose()?;
    let gate_up = OwnedWeights::borrow(&gate_up, g)?;
    let down = OwnedWeights::borrow(&down, g)?;
    let x = borrow_matrix("x", &x, g)?;
    let routing = route(&ids, gate_up.experts(), g)?;
    let gates = borrow_matrix("gates", &gates, g)?;
    let lora_gate_up = lora_gate_up
        .as_ref()
        .map(|l| borrow_lora_arg(l, g))
        .transpose()?;
    let lora_down = lora_down
        .as_ref()
        .map(|l| borrow_lora_arg(l, g))
        .transpose()?;
    let block = MoeBlock {
        gate_up: gate_up.get(),
        down: down.get(),
        lora_gate_up: lora_gate_up.as_ref(),
        lora_down: lora_down.as_ref(),
        activation,
        layout,
        gate_up_bias: gate_up_bias.as_ref(),
        down_bias: down_bias.as_ref(),
        strategy,
    };
    let (y, saved) = block.forward(g, &x, &routing, &gates).map_err(to_py)?;
    let out = export(py, g, y)?;
    if !keep_state {
        return Ok((out, None));
    }
    Ok((
        out,
        Some(MoeState {
            strategies: saved.strategies(),
            inner: Mutex::new(Some(saved)),
        }),
    ))
}

/// Backward of the MoE block: returns DLPack capsules `(dx [T, H], d_gates [T, k],
/// gate_up_da, gate_up_db, down_da, down_db)`, the LoRA ones `None` for a projection without LoRA.
/// Consumes the state.
#[pyfunction]
#[pyo3(signature = (gpu, state, dy))]
#[allow(clippy::type_complexity)]
fn moe_backward(
    py: Python<'_>,
    gpu: &PyGpu,
    state: &MoeState,
    dy: Desc,
) -> PyRes<(
    PyObject,
    PyObject,
    Option<PyObject>,
    Option<PyObject>,
    Option<PyObject>,
    Option<PyObject>,
)> {
    let g = &gpu.gpu;
    let held = take_state(&state.inner)?;
    let dy = borrow_matrix("dy", &dy, g)?;
    let grads = moe::backward(g, &held, &dy).map_err(to_py)?;
    drop(held);
    let (gu_da, gu_db) = match grads.gate_up {
        Some(l) => (Some(export(py, g, l.da)?), Some(export(py, g, l.db)?)),
        None => (None, None),
    };
    let (dn_da, dn_db) = match grads.down {
        Some(l) => (Some(export(py, g, l.da)?), Some(export(py, g, l.db)?)),
        None => (None, None),
    };
    Ok((
        export(py, g, grads.dx)?,
        export(py, g, grads.d_gates)?,
        gu_da,
        gu_db,
        dn_da,
        dn_db,
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyRes<()> {
    let py = m.py();
    m.add("MxmoeError", py.get_type::<MxmoeError>())?;
    m.add("NoDeviceError", py.get_type::<NoDeviceError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(quantize_mxfp4_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_mxfp4_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_nvfp4_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_nvfp4_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(read_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(read_nvfp4_experts, m)?)?;
    m.add_function(wrap_pyfunction!(run_file, m)?)?;
    m.add_function(wrap_pyfunction!(driver_present, m)?)?;
    m.add_function(wrap_pyfunction!(device_count, m)?)?;
    m.add_function(wrap_pyfunction!(linear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(linear_backward, m)?)?;
    m.add_function(wrap_pyfunction!(moe_forward, m)?)?;
    m.add_function(wrap_pyfunction!(moe_backward, m)?)?;
    m.add_class::<PyGpu>()?;
    m.add_class::<LinearState>()?;
    m.add_class::<MoeState>()?;
    Ok(())
}
