//! The device core: driver discovery, context and stream, the embedded PTX modules and the choice
//! between them ([`select`]), the SASS embedded next to them and when it is loaded instead
//! ([`sass_choice`], [`ModuleCode`]), device limits, and device memory ([`DeviceBuffer`],
//! copies, poisoned allocations).
//!
//! [`Gpu::open`] (a new stream) and [`Gpu::open_on_stream`] (a stream another framework owns)
//! are the ways to get a device; both go through one builder. A machine without a CUDA driver or without a
//! device is a normal outcome ([`Error::NoDriver`], [`Error::NoDevice`]), never a panic: the
//! driver library is probed with `is_culib_present` before cudarc touches it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

mod memory;
mod pool;
mod ptx_source;
mod sass;
mod select;
mod tensor_map;
pub use kernels_gpu::shared::module::PtxModule;
pub(crate) use memory::download_async;
pub use memory::{DeviceBuffer, alloc_filled, alloc_output, download, fill_bytes, upload};
pub use pool::PoolWatch;
pub use ptx_source::{EXPECT_FINGERPRINT_ENV, PTX_OVERRIDE_ENV, fingerprint};
pub use sass::{JitReason, ModuleCode, SassArch, cubin_arch, embedded_cubin, sass_choice};
pub use select::{MODULE_ENV, ModuleSelection, SelectionReason, check_module, select_module};
pub use tensor_map::TMA_ENV;
pub(crate) use tensor_map::{MapElem, TileMap};

use crate::error::{Error, Result};

/// The Hopper PTX module (`sm_90a`, with the `wgmma` rows) built from `kernels-gpu` by
/// `host/build.rs` (see `xtask/ptx-builder`); loaded on compute capability 9.0 (as its SASS
/// [`CUBIN`] when embedded).
pub const PTX: &str = include_str!(env!("MXMOE_PTX_PATH"));

/// The portable PTX module (`sm_80`, without the `wgmma` rows), built from the same source;
/// loaded on every other GPU from compute capability 8.0 (as its SASS [`CUBIN_PORTABLE`] on 8.x
/// when embedded, else JIT-compiled by the driver), or on 9.0 with `MXMOE_MODULE=portable`.
pub const PTX_PORTABLE: &str = include_str!(env!("MXMOE_PTX_PORTABLE_PATH"));

/// SASS of [`PTX`]: the cubin `ptxas` assembled from exactly that text at build time, for
/// [`CUBIN_ARCH`]; empty when the build had no `ptxas` (or `MXMOE_SASS=0`). Loaded instead of the
/// PTX on compute capability 9.0 ([`sass_choice`]).
pub const CUBIN: &[u8] = include_bytes!(env!("MXMOE_CUBIN_PATH"));

/// The architecture [`CUBIN`] was assembled for (`sm_90a`), empty without SASS.
pub const CUBIN_ARCH: &str = env!("MXMOE_CUBIN_ARCH");

/// SASS of [`PTX_PORTABLE`], assembled for [`CUBIN_PORTABLE_ARCH`] (`sm_80`), which runs on every
/// compute capability 8.x device; empty without SASS. Later devices JIT-compile the PTX.
pub const CUBIN_PORTABLE: &[u8] = include_bytes!(env!("MXMOE_CUBIN_PORTABLE_PATH"));

/// The architecture [`CUBIN_PORTABLE`] was assembled for (`sm_80`), empty without SASS.
pub const CUBIN_PORTABLE_ARCH: &str = env!("MXMOE_CUBIN_PORTABLE_ARCH");

/// The embedded text of `module`.
pub fn embedded_ptx(module: PtxModule) -> &'static str {
    match module {
        PtxModule::Hopper => PTX,
        PtxModule::Portable => PTX_PORTABLE,
    }
}

/// What the device allows; read once when the device is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Opt-in maximum dynamic + static shared memory per block, bytes.
    pub max_smem_per_block_optin: usize,
    /// Shared memory per multiprocessor, bytes.
    pub max_smem_per_sm: usize,
    /// 32-bit registers per multiprocessor.
    pub regs_per_sm: u32,
    /// L2 cache bytes.
    pub l2_bytes: usize,
    /// Total device memory, bytes.
    pub total_mem_bytes: usize,
    /// The PTX module loaded for this device: which grouped-GEMM rows exist
    /// ([`PtxModule::has_config`]; `tune::prune` drops the others).
    pub module: PtxModule,
}

/// Per-function resource use as the driver reports it after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionResources {
    /// Registers per thread.
    pub registers: i32,
    /// Static shared memory, bytes.
    pub static_smem_bytes: i32,
    /// Local memory (stack/spill) per thread, bytes.
    pub local_bytes: i32,
    /// Maximum threads per block for this function.
    pub max_threads: i32,
}

/// An opened device: context, a stream all mxmoe work is ordered on, the loaded module.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    limits: DeviceLimits,
    selection: ModuleSelection,
    ptx: &'static ptx_source::ModuleText,
    /// Whether the module's SASS or its PTX text was loaded.
    code: ModuleCode,
    /// Kernels looked up so far, shared by every `Gpu` of this loaded module ([`Gpu::on_stream`]).
    functions: Arc<Mutex<HashMap<&'static str, Loaded>>>,
    /// Whether [`alloc_output`] poisons (see [`Gpu::set_poison_outputs`]).
    poison_outputs: AtomicBool,
    /// Whether the `wgmma` kernels get TMA tensor maps for their weight tiles
    /// ([`Gpu::set_tma`]).
    tma: AtomicBool,
    /// Whether they get one for their activation rows ([`Gpu::set_tma_activations`]).
    tma_activations: AtomicBool,
    /// The tensor maps built so far, per `Gpu` (their copies are ordered on its stream).
    tensor_maps: tensor_map::TensorMaps,
    /// Page-locked buffers for [`memory::download_async`] and the side stream its copies run
    /// on (per `Gpu`: each copy is ordered after the work queued so far on its stream).
    staging: memory::Staging,
}

/// A kernel looked up once, with the dynamic shared memory its attribute already allows.
struct Loaded {
    function: CudaFunction,
    /// The `MAX_DYNAMIC_SHARED_SIZE_BYTES` attribute set so far (48 KiB needs none).
    smem_allowed: usize,
}

/// Dynamic shared memory a kernel may use without raising its attribute.
const DEFAULT_DYNAMIC_SMEM: usize = 48 * 1024;

/// Where a [`Gpu`]'s stream comes from.
enum StreamSource {
    /// A new stream of the context, owned by the `Gpu`.
    New,
    /// A `CUstream` handle (as an integer) owned by the caller.
    Borrowed(usize),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("limits", &self.limits)
            .field("selection", &self.selection)
            .field("code", &self.code)
            .finish_non_exhaustive()
    }
}

/// Whether libcuda can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library and reports whether it
    // succeeded; it has no other preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices, or the reason there are none.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let n = CudaContext::device_count().map_err(Error::driver("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

impl Gpu {
    /// Opens device `ordinal` (its primary context), creates a stream and loads the PTX module
    /// its compute capability selects (9.0: Hopper, else from 8.0: portable; below 8.0
    /// [`Error::UnsupportedGpu`]), or the one `MXMOE_MODULE=portable|hopper` asks for
    /// ([`select_module`]): its embedded SASS where that runs on the device, else its PTX text
    /// ([`Gpu::module_code`]).
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: a new stream has no precondition.
        unsafe { Self::build(ordinal, StreamSource::New, None) }
    }

    /// Opens device `ordinal` like [`open`](Self::open) but with `module`, whatever
    /// `MXMOE_MODULE` says ([`Error::UnsupportedGpu`] if the device cannot load it). Two `Gpu`s
    /// of one device may hold different modules (the cross-module tests do).
    pub fn open_with_module(ordinal: usize, module: PtxModule) -> Result<Self> {
        // SAFETY: a new stream has no precondition.
        unsafe { Self::build(ordinal, StreamSource::New, Some(module)) }
    }

    /// Opens device `ordinal` (its primary context, shared with the CUDA runtime and so with
    /// PyTorch) with every launch and copy ordered on the caller's stream `cu_stream` (a
    /// `CUstream` handle as an integer, e.g. `torch.cuda.current_stream().cuda_stream`; `0` is
    /// the legacy default stream). Loads the PTX module.
    ///
    /// The context's cudarc event tracking is disabled: all mxmoe work of this `Gpu` runs on the
    /// one stream (but for `Auto`'s small read-back of its decision, which a side stream of
    /// mxmoe's own copies after an event recorded on this one), and ordering against the
    /// caller's other streams is the caller's business.
    ///
    /// # Safety
    ///
    /// `cu_stream` must be a valid stream of device `ordinal`'s primary context (or 0), and the
    /// caller must keep it alive for as long as this `Gpu`, or any buffer allocated through it,
    /// exists.
    pub unsafe fn open_on_stream(ordinal: usize, cu_stream: usize) -> Result<Self> {
        // SAFETY: forwarded to the caller.
        unsafe { Self::build(ordinal, StreamSource::Borrowed(cu_stream), None) }
    }

    /// The one builder behind [`open`](Self::open) and [`open_on_stream`](Self::open_on_stream):
    /// device check, primary context, stream, limits, module selection (`module`, else
    /// [`select_module`] with `MXMOE_MODULE`), PTX module (the selected embedded text, or with
    /// the `ptx-override` feature the file `MXMOE_PTX_OVERRIDE` names), loaded as SASS or PTX
    /// ([`load_code`]).
    ///
    /// # Safety
    ///
    /// For [`StreamSource::Borrowed`], as for [`Gpu::open_on_stream`]; none for
    /// [`StreamSource::New`].
    unsafe fn build(
        ordinal: usize,
        source: StreamSource,
        module: Option<PtxModule>,
    ) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("creating the CUDA context"))?;
        let stream = match source {
            StreamSource::New => ctx
                .new_stream()
                .map_err(Error::driver("creating a stream"))?,
            StreamSource::Borrowed(cu_stream) => {
                // SAFETY: this `Gpu` uses only the one stream (the caller orders it against
                // others), so cudarc's per-buffer events are not needed.
                unsafe { ctx.disable_event_tracking() };
                // SAFETY: the caller guarantees the stream is valid in this (primary) context
                // and outlives everything that retains the wrapper.
                unsafe { ctx.wrap_borrowed_stream(cu_stream as _) }
            }
        };
        let (name, capability) = read_identity(&ctx)?;
        let selection = match module {
            Some(m) => check_module(&name, capability, m, SelectionReason::Caller)?,
            None => {
                let env = std::env::var(MODULE_ENV).ok();
                select_module(&name, capability, env.as_deref())?
            }
        };
        let (tma, tma_activations) =
            tensor_map::tma_from_env(std::env::var(TMA_ENV).ok().as_deref())?;
        let limits = read_limits(&ctx, name, capability, selection.module)?;
        let ptx = ptx_source::module_text(selection.module)?;
        let (module, code) = load_code(&ctx, ptx, selection.module, capability)?;
        Ok(Self {
            ctx,
            stream,
            module,
            limits,
            selection,
            ptx,
            code,
            functions: Arc::new(Mutex::new(HashMap::new())),
            poison_outputs: AtomicBool::new(cfg!(debug_assertions)),
            tma: AtomicBool::new(tma),
            tma_activations: AtomicBool::new(tma_activations),
            tensor_maps: Default::default(),
            staging: Default::default(),
        })
    }

    /// The same device and loaded module with launches ordered on another borrowed stream
    /// (cheap: nothing is loaded again).
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
            selection: self.selection,
            ptx: self.ptx,
            code: self.code.clone(),
            functions: self.functions.clone(),
            poison_outputs: AtomicBool::new(self.poison_outputs()),
            tma: AtomicBool::new(self.tma()),
            tma_activations: AtomicBool::new(self.tma_activations()),
            tensor_maps: Default::default(),
            staging: Default::default(),
        }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Opens the first device.
    pub fn open_default() -> Result<Self> {
        Self::open(0)
    }

    /// [`fingerprint`] of the PTX text this device loaded: the selected module's embedded text
    /// ([`PTX`] or [`PTX_PORTABLE`]), or, in builds with the `ptx-override` feature, the file
    /// named by `MXMOE_PTX_OVERRIDE`. Where the module's SASS was loaded instead
    /// ([`ModuleCode::Sass`]), it is the fingerprint of the embedded text that SASS was assembled
    /// from at build time (an override is never replaced by SASS).
    pub fn ptx_fingerprint(&self) -> u64 {
        self.ptx.fingerprint()
    }

    /// Whether this device runs its module's embedded SASS or the JIT-compiled PTX text, and why
    /// (`mxmoe info` prints it under the module line).
    pub fn module_code(&self) -> &ModuleCode {
        &self.code
    }

    /// The PTX module this device loaded.
    pub fn module(&self) -> PtxModule {
        self.selection.module
    }

    /// The loaded module and why it was chosen (its `Display` is what `mxmoe info` prints).
    pub fn module_selection(&self) -> ModuleSelection {
        self.selection
    }

    /// The override file the module text came from (`ptx-override` builds), if any.
    pub fn ptx_override_path(&self) -> Option<&std::path::Path> {
        self.ptx.path.as_deref()
    }

    /// The device's limits.
    pub fn limits(&self) -> &DeviceLimits {
        &self.limits
    }

    /// The page-locked buffers of [`download_async`].
    pub(crate) fn staging(&self) -> &memory::Staging {
        &self.staging
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every mxmoe launch and copy is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Free and total device memory, bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(Error::driver("cuMemGetInfo"))
    }

    /// Checks, before allocating, that `bytes` (computed with checked arithmetic; `None` when the
    /// computation overflowed) fit in the device's free memory: [`Error::SizeOverflow`] for
    /// `None`, [`Error::OutOfMemory`] naming `what` and both sizes otherwise. The device-side
    /// twin of `reference::check_host_memory`.
    pub fn check_free_memory(&self, what: impl Into<String>, bytes: Option<u128>) -> Result<()> {
        let Some(needed_bytes) = bytes else {
            return Err(Error::SizeOverflow {
                what: what.into(),
                detail: "the byte count does not fit in 128 bits".into(),
            });
        };
        let (free, _) = self.mem_info()?;
        if needed_bytes > free as u128 {
            return Err(Error::OutOfMemory {
                what: what.into(),
                needed_bytes,
                available_bytes: free as u64,
                memory: format!("CUDA device {} (free memory)", self.ordinal()),
            });
        }
        Ok(())
    }

    /// Waits for all work on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::driver("synchronizing the stream"))
    }

    /// Whether output allocations are poisoned ([`alloc_output`]): on in debug builds, off in
    /// release builds unless [`set_poison_outputs`](Self::set_poison_outputs) turned it on.
    pub fn poison_outputs(&self) -> bool {
        self.poison_outputs.load(Ordering::Relaxed)
    }

    /// Turns the poisoning of output allocations on or off. The test harness turns it on, so
    /// that an element a kernel fails to write reads back as NaN; it costs one memset per output.
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison_outputs.store(on, Ordering::Relaxed);
    }

    /// Whether the `wgmma` kernels (Hopper module) move their weight tiles with the Tensor Memory
    /// Accelerator (one copy per box, [`GemmParams::b_tmap_addr`]) where the weight tensor allows
    /// a tensor map, rather than with `cp.async` chunks: on unless `MXMOE_TMA=0` ([`TMA_ENV`],
    /// read when the `Gpu` was opened) or [`set_tma`](Self::set_tma) turned it off. The results
    /// are the same bits either way (the tests compare them).
    ///
    /// [`GemmParams::b_tmap_addr`]: kernels_gpu::shared::params::GemmParams::b_tmap_addr
    pub fn tma(&self) -> bool {
        self.tma.load(Ordering::Relaxed)
    }

    /// Turns both TMA paths on or off: the weight tiles' (see [`tma`](Self::tma)) and the
    /// activation rows' ([`tma_activations`](Self::tma_activations)).
    pub fn set_tma(&self, on: bool) {
        self.tma.store(on, Ordering::Relaxed);
        self.tma_activations.store(on, Ordering::Relaxed);
    }

    /// Whether the `wgmma` kernels copy grouped activation rows with the Tensor Memory
    /// Accelerator (one copy per tile and k-tile, [`GemmParams::a_tmap_addr`]) where the
    /// activation tensor allows a map, rather than with `cp.async` chunks (gathered rows always
    /// take `cp.async`): on unless `MXMOE_TMA`
    /// is `0` or `weights` ([`TMA_ENV`]) or [`set_tma_activations`](Self::set_tma_activations)
    /// or [`set_tma`](Self::set_tma) turned it off. The results are the same bits either way.
    ///
    /// [`GemmParams::a_tmap_addr`]: kernels_gpu::shared::params::GemmParams::a_tmap_addr
    pub fn tma_activations(&self) -> bool {
        self.tma_activations.load(Ordering::Relaxed)
    }

    /// Turns the TMA activation path alone on or off (see
    /// [`tma_activations`](Self::tma_activations)).
    pub fn set_tma_activations(&self, on: bool) {
        self.tma_activations.store(on, Ordering::Relaxed);
    }

    /// Looks a kernel up by its exported name (a `kernels_gpu::shared::names` constant), once per
    /// loaded module.
    pub(crate) fn function(&self, name: &'static str) -> Result<CudaFunction> {
        self.launchable(name, 0)
    }

    /// [`function`](Self::function), with the kernel's dynamic shared-memory attribute raised to
    /// at least `dynamic_smem` bytes. The lookup and the attribute are resolved once per kernel
    /// (and again only for a larger size), not per launch.
    pub(crate) fn launchable(
        &self,
        name: &'static str,
        dynamic_smem: usize,
    ) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = match cache.entry(name) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let module = self.selection.module;
                if !module.entries().contains(&name) {
                    return Err(Error::InvalidArgument {
                        what: "kernel",
                        detail: format!(
                            "{name} is not in the {} module ({}) loaded for {}",
                            module.name(),
                            module.arch(),
                            self.limits.name
                        ),
                    });
                }
                let function = self
                    .module
                    .load_function(name)
                    .map_err(Error::driver(format!("looking up kernel {name}")))?;
                v.insert(Loaded {
                    function,
                    smem_allowed: DEFAULT_DYNAMIC_SMEM,
                })
            }
        };
        if dynamic_smem > loaded.smem_allowed {
            let bytes = i32::try_from(dynamic_smem).map_err(|_| Error::InvalidArgument {
                what: "shared memory",
                detail: format!("{dynamic_smem} bytes for {name}"),
            })?;
            loaded
                .function
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(Error::driver(format!(
                    "raising the shared-memory limit of {name}"
                )))?;
            loaded.smem_allowed = dynamic_smem;
        }
        Ok(loaded.function.clone())
    }

    /// Registers, static shared memory and local memory of a kernel, as the driver sees them.
    pub fn function_resources(&self, name: &'static str) -> Result<FunctionResources> {
        use cudarc::driver::sys::CUfunction_attribute as F;
        let f = self.function(name)?;
        let get = |a| {
            f.get_attribute(a)
                .map_err(Error::driver(format!("reading attributes of {name}")))
        };
        Ok(FunctionResources {
            registers: get(F::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
            static_smem_bytes: get(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
            local_bytes: get(F::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
            max_threads: get(F::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
        })
    }
}

/// Loads `module`'s code for a device of `capability`: the embedded cubin when [`sass_choice`]
/// allows it (`ptx` is the embedded text, a cubin is embedded and runs on the device), else, or
/// when the driver rejects the cubin, the PTX text `ptx` (JIT-compiled). Only a PTX failure is an
/// error.
fn load_code(
    ctx: &Arc<CudaContext>,
    ptx: &ptx_source::ModuleText,
    module: PtxModule,
    capability: (i32, i32),
) -> Result<(Arc<CudaModule>, ModuleCode)> {
    let reason = match sass_choice(cubin_arch(module), ptx.path.is_some(), capability) {
        Ok(arch) => {
            // cudarc's `from_binary` takes an owned buffer; the copy also gives the image the
            // allocator's alignment, where `include_bytes!` data is only byte-aligned.
            let image = cudarc::nvrtc::Ptx::from_binary(embedded_cubin(module).to_vec());
            match ctx.load_module(image) {
                Ok(loaded) => return Ok((loaded, ModuleCode::Sass { arch })),
                Err(e) => JitReason::SassRejected {
                    sass: arch,
                    error: e.to_string(),
                },
            }
        }
        Err(reason) => reason,
    };
    let loaded = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx.text))
        .map_err(Error::driver(ptx.load_op(module)))?;
    Ok((loaded, ModuleCode::Ptx { reason }))
}

/// The device's name and compute capability, which decide the module.
fn read_identity(ctx: &Arc<CudaContext>) -> Result<(String, (i32, i32))> {
    Ok((
        ctx.name()
            .map_err(Error::driver("reading the device name"))?,
        ctx.compute_capability()
            .map_err(Error::driver("reading the compute capability"))?,
    ))
}

fn read_limits(
    ctx: &Arc<CudaContext>,
    name: String,
    compute_capability: (i32, i32),
    module: PtxModule,
) -> Result<DeviceLimits> {
    let attr = |a: Attr| {
        ctx.attribute(a)
            .map_err(Error::driver("reading device attributes"))
    };
    Ok(DeviceLimits {
        name,
        compute_capability,
        sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        max_smem_per_block_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize,
        max_smem_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?
            as usize,
        regs_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)? as u32,
        l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
        total_mem_bytes: ctx
            .total_mem()
            .map_err(Error::driver("reading the memory size"))?,
        module,
    })
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
        match Gpu::open_with_module(usize::MAX, PtxModule::Portable) {
            Err(Error::NoDriver) | Err(Error::NoDevice { .. }) => {}
            other => panic!("expected NoDriver or NoDevice, got {other:?}"),
        }
    }

    #[test]
    fn both_modules_are_embedded_with_their_entries() {
        for m in PtxModule::ALL {
            let text = embedded_ptx(m);
            assert!(
                text.lines()
                    .any(|l| l.trim_start() == format!(".target {}", m.arch())),
                "{m:?}"
            );
            let entries = text
                .lines()
                .filter(|l| l.trim_start().starts_with(".visible .entry "))
                .count();
            assert_eq!(entries, m.entries().len(), "{m:?}");
        }
        assert!(PTX.contains("wgmma.mma_async"));
        assert!(!PTX_PORTABLE.contains("wgmma"));
    }
}
