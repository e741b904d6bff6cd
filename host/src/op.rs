//! The LoRA-fused expert linear (`ScatterMoELoRA`, SPEC §3) as an autograd-style pair:
//! [`ExpertLinear::forward`] returns the output and a [`Saved`] record, and [`backward`] turns
//! that record and the output gradient into [`Grads`].
//!
//! For grouped row `p` of expert `e`: `y_p = x_p·W_eᵀ + s·round_bf16(x_p·A_eᵀ)·B_eᵀ` with
//! `W_store[e]` of shape `[N, K]`, `A [E·r, K]`, `B [N, E·r]` (expert-major LoRA). The frozen base
//! gets no gradient; `x`, `A`, `B` and (when given) the gates do.
//!
//! Launch sequence. Forward: XA (rank-sized product) → grouped GEMM with the LoRA epilogue →
//! gate combination (down projection only). Backward: gate gradient and gated per-slot dY
//! (gates only) → YB → dX GEMM with the LoRA epilogue → slot sum (token-ordered input with
//! `k > 1`) → dA and dB by the Gram kernel (deterministic, no atomics). No host synchronisation.

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::tiles::{BLayout, rank_pad};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::kernels::eltwise::Remap;
use crate::kernels::gemm::RoutingView;
use crate::kernels::gemm::{
    BOperand, GemmArgs, LoraEpilogue, MxOperand, RowMap, Strided, gram, grouped_gemm, lora_down,
};
use crate::kernels::{alloc_poisoned, download, eltwise, upload};
use crate::mxfp4::MxError;
use crate::mxfp4::{MxLayout, MxShape, MxWeights, validate_mx};
pub use crate::reference::RowOrder;
use crate::routing::DeviceRouting;
use crate::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};
use crate::shared::mxfp4::MX_BLOCK;
use crate::tensor::{DeviceLoc, TensorMeta};
use crate::tune::{PruneReport, TuneKey, bucket_rows, config_name, default_config, prune};
use kernels_gpu::shared::tiles::GEMM_CONFIGS;

/// `dims` multiplied, or a typed error naming `tensor` when the product overflows `usize`.
fn element_count(tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape {
            tensor,
            expected: "a shape whose element count fits in usize".into(),
            actual: format!("{dims:?}"),
        })
}

/// A row-major bf16 matrix on the device.
pub struct Bf16Matrix {
    data: CudaSlice<u16>,
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
            alloc_poisoned(gpu, 1, 0)?
        } else {
            upload(gpu, bits)?
        };
        Ok(Self { data, rows, cols })
    }

    /// Wraps a device buffer holding at least `rows·cols` bf16.
    pub fn from_device(data: CudaSlice<u16>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() < element_count("matrix", &[rows, cols])? {
            return Err(Error::Shape {
                tensor: "matrix",
                expected: format!("[{rows}, {cols}]"),
                actual: format!("{} elements", data.len()),
            });
        }
        Ok(Self { data, rows, cols })
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

    /// Gives up the matrix and returns its device buffer (e.g. to hand borrowed memory back
    /// without freeing it, see [`crate::device::Borrowed`]).
    pub fn into_data(self) -> CudaSlice<u16> {
        self.data
    }

    /// Downloads as f32 (synchronizes).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = download(gpu, &self.data)?
            .into_iter()
            .map(bf16_bits_to_f32)
            .collect();
        v.truncate(self.rows * self.cols);
        Ok(v)
    }
}

/// Dense bf16 expert weights in the checkpoint layout `W_store [E, N, K]` (K contiguous).
pub struct DenseExperts {
    data: CudaSlice<u16>,
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
        if experts == 0 || n == 0 || k == 0 {
            return Err(Error::InvalidArgument {
                what: "expert weights",
                detail: format!("shape [{experts}, {n}, {k}] has a zero dimension"),
            });
        }
        if bits.len() != experts * n * k {
            return Err(Error::Shape {
                tensor: "expert weights",
                expected: format!("[{experts}, {n}, {k}]"),
                actual: format!("{} elements", bits.len()),
            });
        }
        Ok(Self {
            data: upload(gpu, bits)?,
            experts,
            n,
            k,
        })
    }

    /// Wraps device-resident weights `[experts, n, k]`.
    pub fn from_device(data: CudaSlice<u16>, experts: usize, n: usize, k: usize) -> Result<Self> {
        if experts == 0 || n == 0 || k == 0 {
            return Err(Error::InvalidArgument {
                what: "expert weights",
                detail: format!("shape [{experts}, {n}, {k}] has a zero dimension"),
            });
        }
        if data.len() < element_count("expert weights", &[experts, n, k])? {
            return Err(Error::Shape {
                tensor: "expert weights",
                expected: format!("[{experts}, {n}, {k}]"),
                actual: format!("{} elements", data.len()),
            });
        }
        Ok(Self {
            data,
            experts,
            n,
            k,
        })
    }

    /// `(E, N, K)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.experts, self.n, self.k)
    }

    /// Gives up the weights and returns their device buffer (see [`Bf16Matrix::into_data`]).
    pub fn into_data(self) -> CudaSlice<u16> {
        self.data
    }
}

/// MXFP4 expert weights resident on the device (`packed [E, N, K/2]`, `scales [E, N, K/32]`),
/// validated by [`crate::mxfp4::validate_mx`]. The fused kernels read these bytes directly; no
/// bf16 copy of any expert is ever made.
pub struct MxExperts {
    packed: CudaSlice<u8>,
    scales: CudaSlice<u8>,
    shape: MxShape,
}

impl MxExperts {
    /// Uploads a validated host container.
    pub fn upload(gpu: &Gpu, w: &MxWeights) -> Result<Self> {
        Ok(Self {
            packed: upload(gpu, w.packed())?,
            scales: upload(gpu, w.scales())?,
            shape: w.shape(),
        })
    }

    /// Wraps device buffers after validating their metadata (SPEC §1.6) and lengths.
    pub fn from_device(
        packed: CudaSlice<u8>,
        packed_meta: &TensorMeta,
        scales: CudaSlice<u8>,
        scales_meta: &TensorMeta,
    ) -> Result<Self> {
        let shape = validate_mx(packed_meta, scales_meta, MX_BLOCK, MxLayout::Fwd, false)?;
        // The kernels read `[E, N, K/2]` and `[E, N, K/32]` densely: outer strides must be the
        // contiguous ones too, and the metadata must name the device the buffers live on.
        for (meta, tensor) in [(packed_meta, "packed"), (scales_meta, "scales")] {
            if !meta.is_contiguous() {
                return Err(MxError::Layout(format!(
                    "{tensor} must be contiguous (strides {:?})",
                    meta.strides
                ))
                .into());
            }
        }
        let here = DeviceLoc::Cuda(packed.context().ordinal());
        if packed_meta.device != here || scales.context().ordinal() != packed.context().ordinal() {
            return Err(MxError::Device {
                packed: packed_meta.device.to_string(),
                scales: here.to_string(),
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
            packed,
            scales,
            shape,
        })
    }

    /// The container's shape.
    pub fn shape(&self) -> MxShape {
        self.shape
    }

    /// Gives up the weights and returns their device buffers `(packed, scales)` (see
    /// [`Bf16Matrix::into_data`]).
    pub fn into_buffers(self) -> (CudaSlice<u8>, CudaSlice<u8>) {
        (self.packed, self.scales)
    }

    fn operand(&self) -> MxOperand<'_> {
        MxOperand {
            packed: &self.packed,
            scales: &self.scales,
            n: self.shape.n(),
            k: self.shape.k(),
        }
    }
}

/// The frozen base weights of an expert linear: dense bf16 or MXFP4 (Strategy B, dequantized
/// inside the tensor-core K-loop).
#[derive(Clone, Copy)]
pub enum ExpertWeights<'a> {
    /// Dense bf16 experts.
    Bf16(&'a DenseExperts),
    /// MXFP4 experts, decoded in the kernels.
    Mxfp4(&'a MxExperts),
}

impl ExpertWeights<'_> {
    fn shape(&self) -> (usize, usize, usize) {
        match self {
            ExpertWeights::Bf16(w) => w.shape(),
            ExpertWeights::Mxfp4(w) => (w.shape.experts(), w.shape.n(), w.shape.k()),
        }
    }

    /// The forward GEMM's B operand (`W_store[e]` with K as the reduction).
    fn forward_operand(&self) -> BOperand<'_> {
        match self {
            ExpertWeights::Bf16(w) => BOperand::Nk(Strided {
                buf: &w.data,
                stride_e: w.n * w.k,
                stride_n: w.k,
                stride_k: 1,
            }),
            ExpertWeights::Mxfp4(w) => BOperand::NkMx(w.operand()),
        }
    }

    /// The dX GEMM's B operand (`W_store[e]` with N as the reduction, K as the output).
    fn dx_operand(&self) -> BOperand<'_> {
        match self {
            ExpertWeights::Bf16(w) => BOperand::Kn(Strided {
                buf: &w.data,
                stride_e: w.n * w.k,
                stride_n: 1,
                stride_k: w.k,
            }),
            ExpertWeights::Mxfp4(w) => BOperand::KnMx(w.operand()),
        }
    }
}

/// LoRA factors in the expert-major layout: `A [E·r, K]`, `B [N, E·r]`, scaling `s`.
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

/// How MXFP4 weights are multiplied (ignored for bf16 weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Pick per call from the active-expert fraction and rows per active expert (reads the
    /// expert offsets back to the host: one small synchronisation).
    #[default]
    Auto,
    /// Strategy A: dequantize only the active experts into a compact bf16 buffer
    /// (`E_a·N·K` elements) and run the bf16 kernels on it.
    SelectiveDequant,
    /// Strategy B: decode the MXFP4 tiles inside the tensor-core K-loop; no bf16 copy, no host
    /// synchronisation.
    Fused,
}

/// Whether Strategy A keeps its compact bf16 buffer from forward to backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DequantBuffer {
    /// Keep it in [`Saved`] (fastest; holds `E_a·N·K` bf16 until backward).
    #[default]
    Keep,
    /// Free it after forward and dequantize again in backward (less memory between passes).
    Recompute,
}

/// One LoRA-fused expert projection: the frozen weights, the optional LoRA, where input and
/// output rows live, and (for MXFP4 weights) the strategy.
#[derive(Clone, Copy)]
pub struct ExpertLinear<'a> {
    /// Frozen base weights.
    pub weights: ExpertWeights<'a>,
    /// LoRA factors (`None`: rank 0, no LoRA term).
    pub lora: Option<&'a LoraWeights>,
    /// `Scattered`: `x` is in token order (`[T, K]`, each row feeding its k slots) or slot order
    /// (`[T·k, K]`); `Grouped`: `x` is `[L, K]` in the routing's grouped order.
    pub input_order: RowOrder,
    /// `Scattered`: output row per slot `t·k + j`; `Grouped`: output row per grouped row.
    pub output_order: RowOrder,
    /// Strategy for MXFP4 weights.
    pub strategy: Strategy,
    /// Strategy A's buffer policy.
    pub dequant_buffer: DequantBuffer,
}

impl<'a> ExpertLinear<'a> {
    /// A projection with the default strategy (`Auto`) and buffer policy (`Keep`).
    pub fn new(
        weights: ExpertWeights<'a>,
        lora: Option<&'a LoraWeights>,
        input_order: RowOrder,
        output_order: RowOrder,
    ) -> Self {
        Self {
            weights,
            lora,
            input_order,
            output_order,
            strategy: Strategy::Auto,
            dequant_buffer: DequantBuffer::Keep,
        }
    }

    /// The same projection with another strategy.
    pub fn with_strategy(self, strategy: Strategy) -> Self {
        Self { strategy, ..self }
    }
}

/// The forward result.
pub struct Forward {
    /// `[T, N]` when gates were given (the gate-weighted sum over slots), otherwise `[L, N]` in
    /// the output order (dropped slots give zero rows).
    pub out: Bf16Matrix,
    /// The path that ran: `Fused` or `SelectiveDequant` for MXFP4 weights, `Fused` for bf16.
    pub strategy: Strategy,
    /// The tile configuration the grouped GEMM ran with (a row of `shared::tiles::GEMM_CONFIGS`).
    pub gemm_config: usize,
}

/// Strategy A's compact state: the active experts, their offsets, the gathered LoRA and
/// (with [`DequantBuffer::Keep`]) the dequantized weights.
struct Compact {
    active: CudaSlice<u32>,
    active_count: usize,
    offsets: CudaSlice<u32>,
    lora: Option<LoraWeights>,
    weights: Option<DenseExperts>,
}

/// What backward needs, and nothing else (SPEC §3.4): the borrowed inputs, the forward's XA
/// (`[L, r_pad]`, kept instead of recomputed), with gates the unreduced per-slot output, and
/// for Strategy A its compact state.
pub struct Saved<'a> {
    layer: ExpertLinear<'a>,
    x: Input<'a>,
    routing: &'a DeviceRouting,
    gates: Option<&'a Bf16Matrix>,
    x_map: RowMap,
    xa: Option<CudaSlice<u16>>,
    expanded: Option<Bf16Matrix>,
    compact: Option<Compact>,
}

/// The forward's input as [`Saved`] keeps it: borrowed from the caller, or owned when the caller
/// hands it over ([`ExpertLinear::forward_owned`]).
enum Input<'a> {
    Borrowed(&'a Bf16Matrix),
    Owned(Bf16Matrix),
}

impl Input<'_> {
    fn get(&self) -> &Bf16Matrix {
        match self {
            Input::Borrowed(x) => x,
            Input::Owned(x) => x,
        }
    }
}

impl Saved<'_> {
    /// The forward's input `x`.
    pub fn input(&self) -> &Bf16Matrix {
        self.x.get()
    }
}

/// Gradients. The frozen base gets none.
pub struct Grads {
    /// Gradient of `x`, same shape as `x`.
    pub dx: Bf16Matrix,
    /// Gradient of `A`, `[E·r, K]` (`None` without LoRA; zero rows for experts without tokens).
    pub da: Option<Bf16Matrix>,
    /// Gradient of `B`, `[N, E·r]` (`None` without LoRA; zero columns for experts without tokens).
    pub db: Option<Bf16Matrix>,
    /// Gradient of the gates, `[T, k]` (`None` without gates).
    pub d_gates: Option<Bf16Matrix>,
    /// The tile configuration the dX GEMM ran with (a row of `shared::tiles::GEMM_CONFIGS`).
    pub gemm_config: usize,
}

/// Runs one grouped GEMM through the tuner: prunes `tiles::GEMM_CONFIGS` for this device and
/// layout, then launches the tuner's forced configuration, or the cached, timed (in `Tune` mode)
/// or default one. Returns the row of `GEMM_CONFIGS` that ran.
#[allow(clippy::too_many_arguments)]
fn tuned_gemm(
    gpu: &Gpu,
    layout: BLayout,
    rank: usize,
    experts: usize,
    k_red: usize,
    n_out: usize,
    rows: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<usize> {
    let (kernel, names): (&'static str, &[&'static str]) = match layout {
        BLayout::NkBf16 => ("gemm_nk", &names::GEMM_NK),
        BLayout::KnBf16 => ("gemm_kn", &names::GEMM_KN),
        BLayout::NkMxfp4 => ("gemm_nk_mx", &names::GEMM_NK_MX),
        BLayout::KnMxfp4 => ("gemm_kn_mx", &names::GEMM_KN_MX),
        BLayout::Strided => ("gemm_strided", &names::GEMM_NK),
    };
    let r_pad = if rank > 0 { rank_pad(rank as u32) } else { 0 };
    let (candidates, report) = prune(gpu.limits(), layout, r_pad, |i| {
        gpu.function_resources(names[i])
            .ok()
            .map(|r| r.registers.max(0) as u32)
    });
    let key = TuneKey {
        kernel,
        cc: gpu.limits().compute_capability,
        experts,
        k: k_red,
        n: n_out,
        rank,
        rows_bucket: bucket_rows(rows),
    };
    if candidates.is_empty() {
        return Err(Error::NoValidConfig {
            key: key.to_string_key(),
            detail: format!("{report:?}"),
        });
    }
    if let Some(i) = forced_among(gpu.tuner().forced(), &candidates, &key, report)? {
        launch(i)?;
        return Ok(i);
    }
    let fallback = default_config(layout, rows, experts, &candidates);
    let chosen = gpu.tuner().choose(&key, &candidates, fallback, |i| {
        time_median(gpu, || launch(i))
    })?;
    launch(chosen)?;
    Ok(chosen)
}

/// The forced configuration, checked against the candidates that survived pruning: `None` when
/// nothing is forced, an error naming the row and the prune report when it was pruned (a forced
/// row never silently gives way to another).
fn forced_among(
    forced: Option<usize>,
    candidates: &[usize],
    key: &TuneKey,
    report: PruneReport,
) -> Result<Option<usize>> {
    match forced {
        Some(i) if !candidates.contains(&i) => Err(Error::InvalidArgument {
            what: "forced tile configuration",
            detail: format!(
                "{} (row {i} of GEMM_CONFIGS) cannot run {} on this device: pruned ({report:?})",
                GEMM_CONFIGS
                    .get(i)
                    .map_or_else(|| "no such row".into(), config_name),
                key.to_string_key()
            ),
        }),
        other => Ok(other),
    }
}

/// Median of three CUDA-event timings of `f` (after one warm-up run), in milliseconds.
fn time_median(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    f()?;
    let mut times = Vec::with_capacity(3);
    for _ in 0..3 {
        let start = gpu
            .stream()
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(Error::driver("recording a timing event"))?;
        f()?;
        let end = gpu
            .stream()
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(Error::driver("recording a timing event"))?;
        end.synchronize()
            .map_err(Error::driver("waiting for a timing event"))?;
        times.push(
            start
                .elapsed_ms(&end)
                .map_err(Error::driver("reading a timing event"))?,
        );
    }
    times.sort_by(f32::total_cmp);
    Ok(times[1])
}

/// `Auto`'s rule, measured on the H100 (`docs/BENCHMARKS.md`, "Choosing A or B"): Strategy A
/// (selective dequantization) once the active experts average at least 2048 routed rows each,
/// or 256 when at most 32 experts are active (then the dequantization is small and B's grid too
/// small to hide its decode); Strategy B (fused) otherwise — always where the weight stream
/// dominates (few rows per expert). With the `wgmma` kernels B costs ~16 % over the bf16 GEMMs
/// at many rows per expert, so A's fixed dequantization pays off only at large T. A also needs its transient `E_a·N·K` bf16 buffer to fit in
/// half the free device memory.
pub fn auto_strategy(
    active: usize,
    rows: usize,
    transient_bytes: usize,
    free_bytes: usize,
) -> Strategy {
    let rows_per_active = rows / active.max(1);
    let amortised = rows_per_active >= 2048 || (active <= 32 && rows_per_active >= 256);
    if amortised && transient_bytes <= free_bytes / 2 {
        Strategy::SelectiveDequant
    } else {
        Strategy::Fused
    }
}

/// What the kernels see for one call: weights, LoRA and routing, possibly compact.
struct Resolved<'s> {
    weights: ExpertWeights<'s>,
    lora: Option<&'s LoraWeights>,
    routing: RoutingView<'s>,
}

impl<'a> ExpertLinear<'a> {
    /// The shape rule every backend enforces, checked once before a backend is chosen: the
    /// output features `N` and the reduction `K` of an expert projection must be positive
    /// multiples of 8 (the GEMM kernels move 16-byte rows of bf16; MXFP4 weights further need
    /// `K % 32 == 0`, checked by their container). [`ExpertLinear`]'s forward calls it, and
    /// callers that may run the CPU reference instead (the `mxmoe run` CLI) call it first, so a
    /// shape the GPU refuses is refused on the CPU with the same error.
    ///
    /// Errors: [`Error::InvalidArgument`] (`what` = `"expert weights"`) naming both values.
    pub fn check_dims(n: usize, k: usize) -> Result<()> {
        if k == 0 || n == 0 || !k.is_multiple_of(8) || !n.is_multiple_of(8) {
            return Err(Error::InvalidArgument {
                what: "expert weights",
                detail: format!("K = {k} and N = {n} must be positive multiples of 8"),
            });
        }
        Ok(())
    }

    fn validate(
        &self,
        x: &Bf16Matrix,
        routing: &DeviceRouting,
        gates: Option<&Bf16Matrix>,
    ) -> Result<RowMap> {
        let (e, n, k) = self.weights.shape();
        if e != routing.num_experts() {
            return Err(Error::Shape {
                tensor: "expert weights",
                expected: format!("{} experts (the routing's)", routing.num_experts()),
                actual: format!("{e} experts"),
            });
        }
        Self::check_dims(n, k)?;
        if x.cols != k {
            return Err(Error::Shape {
                tensor: "x",
                expected: format!("{k} columns (K)"),
                actual: format!("{} columns", x.cols),
            });
        }
        let (t, top_k, l) = (routing.tokens(), routing.top_k(), routing.rows());
        let map = match self.input_order {
            RowOrder::Grouped if x.rows == l => RowMap::Grouped,
            RowOrder::Scattered if x.rows == t => RowMap::Scattered {
                fan_out: top_k as u32,
            },
            RowOrder::Scattered if x.rows == l => RowMap::Scattered { fan_out: 1 },
            _ => {
                return Err(Error::Shape {
                    tensor: "x",
                    expected: match self.input_order {
                        RowOrder::Grouped => format!("{l} rows (T·k, grouped)"),
                        RowOrder::Scattered => format!("{t} rows (T) or {l} rows (T·k)"),
                    },
                    actual: format!("{} rows", x.rows),
                });
            }
        };
        if let Some(lora) = self.lora {
            let r = lora.rank;
            if r == 0 || r > kernels_gpu::shared::tiles::MAX_RANK as usize {
                return Err(Error::InvalidArgument {
                    what: "LoRA rank",
                    detail: format!(
                        "must be in 1..={} (use no LoRA for rank 0), got {r}",
                        kernels_gpu::shared::tiles::MAX_RANK
                    ),
                });
            }
            if lora.a.rows != e * r || lora.a.cols != k {
                return Err(Error::Shape {
                    tensor: "lora_A",
                    expected: format!("[{}, {k}] (E·r, K)", e * r),
                    actual: format!("[{}, {}]", lora.a.rows, lora.a.cols),
                });
            }
            if lora.b.rows != n || lora.b.cols != e * r {
                return Err(Error::Shape {
                    tensor: "lora_B",
                    expected: format!("[{n}, {}] (N, E·r)", e * r),
                    actual: format!("[{}, {}]", lora.b.rows, lora.b.cols),
                });
            }
            if !lora.scaling.is_finite() {
                return Err(Error::InvalidArgument {
                    what: "LoRA scaling",
                    detail: format!("must be finite, got {}", lora.scaling),
                });
            }
        }
        if let Some(g) = gates {
            if self.output_order != RowOrder::Scattered {
                return Err(Error::InvalidArgument {
                    what: "gates",
                    detail: "gates need scattered (slot-ordered) output".into(),
                });
            }
            if g.rows != t || g.cols != top_k {
                return Err(Error::Shape {
                    tensor: "gates",
                    expected: format!("[{t}, {top_k}]"),
                    actual: format!("[{}, {}]", g.rows, g.cols),
                });
            }
        }
        Ok(map)
    }

    /// Forward pass. `gates [T, k]` (down projection) combine the per-slot outputs into `[T, N]`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &'a Bf16Matrix,
        routing: &'a DeviceRouting,
        gates: Option<&'a Bf16Matrix>,
    ) -> Result<(Forward, Saved<'a>)> {
        self.forward_input(gpu, Input::Borrowed(x), routing, gates)
    }

    /// As [`forward`](Self::forward), taking ownership of `x` so that [`Saved`] keeps it (for an
    /// input the caller produced and does not keep, such as the MoE block's activation).
    pub fn forward_owned(
        &self,
        gpu: &Gpu,
        x: Bf16Matrix,
        routing: &'a DeviceRouting,
        gates: Option<&'a Bf16Matrix>,
    ) -> Result<(Forward, Saved<'a>)> {
        self.forward_input(gpu, Input::Owned(x), routing, gates)
    }

    fn forward_input(
        &self,
        gpu: &Gpu,
        input: Input<'a>,
        routing: &'a DeviceRouting,
        gates: Option<&'a Bf16Matrix>,
    ) -> Result<(Forward, Saved<'a>)> {
        let x = input.get();
        let x_map = self.validate(x, routing, gates)?;
        let l = routing.rows();
        let strategy = match (self.weights, self.strategy) {
            (ExpertWeights::Bf16(_), _) | (ExpertWeights::Mxfp4(_), Strategy::Fused) => {
                Strategy::Fused
            }
            (ExpertWeights::Mxfp4(_), Strategy::SelectiveDequant) => Strategy::SelectiveDequant,
            (ExpertWeights::Mxfp4(w), Strategy::Auto) => {
                let active = active_experts(gpu, routing)?.len();
                let transient = active * w.shape.n() * w.shape.k() * 2;
                let (free, _) = gpu.mem_info()?;
                auto_strategy(active, l, transient, free)
            }
        };
        let compact = match (self.weights, strategy) {
            (ExpertWeights::Mxfp4(w), Strategy::SelectiveDequant) => {
                Some(self.build_compact(gpu, w, routing)?)
            }
            _ => None,
        };
        let resolved = match &compact {
            Some(c) => Resolved {
                weights: ExpertWeights::Bf16(
                    c.weights
                        .as_ref()
                        .expect("a fresh compact state holds its weights"),
                ),
                lora: c.lora.as_ref().or(self.lora),
                routing: RoutingView {
                    ssi: routing.sorted_scattered_idxs(),
                    offsets: &c.offsets,
                    rows: l,
                    num_experts: c.active_count,
                },
            },
            None => Resolved {
                weights: self.weights,
                lora: self.lora,
                routing: routing.view(),
            },
        };
        let ForwardParts {
            out,
            xa,
            expanded,
            gemm_config,
        } = forward_core(gpu, &resolved, x, x_map, self.output_order, gates, routing)?;
        let mut compact = compact;
        if self.dequant_buffer == DequantBuffer::Recompute
            && let Some(c) = compact.as_mut()
        {
            c.weights = None;
        }
        Ok((
            Forward {
                out,
                strategy,
                gemm_config,
            },
            Saved {
                layer: *self,
                x: input,
                routing,
                gates,
                x_map,
                xa,
                expanded,
                compact,
            },
        ))
    }

    /// Strategy A's setup: active experts (one read-back of the offsets), compact offsets,
    /// dequantized active experts, and — unless every expert is active — the gathered LoRA.
    fn build_compact(&self, gpu: &Gpu, w: &MxExperts, routing: &DeviceRouting) -> Result<Compact> {
        let offsets = download(gpu, routing.expert_offsets())?;
        let active = active_from_offsets(&offsets);
        let all = active.len() == offsets.len();
        let compact_offsets: Vec<u32> = active.iter().map(|&e| offsets[e as usize]).collect();
        let active_dev = upload(
            gpu,
            if active.is_empty() {
                &[0u32][..]
            } else {
                &active
            },
        )?;
        let offsets_dev = if all {
            download_clone(gpu, routing.expert_offsets())?
        } else {
            upload(
                gpu,
                if compact_offsets.is_empty() {
                    &[0u32][..]
                } else {
                    &compact_offsets
                },
            )?
        };
        let weights = dequant_active(gpu, w, &active)?;
        let lora = match self.lora {
            Some(lora) if !all => Some(gather_lora(
                gpu,
                lora,
                &active_dev,
                active.len(),
                w.shape.experts(),
            )?),
            _ => None,
        };
        Ok(Compact {
            active: active_dev,
            active_count: active.len(),
            offsets: offsets_dev,
            lora,
            weights: Some(weights),
        })
    }
}

/// Sorted experts that own at least one row, from the inclusive offsets.
fn active_from_offsets(offsets: &[u32]) -> Vec<u32> {
    let mut prev = 0;
    let mut active = Vec::new();
    for (e, &end) in offsets.iter().enumerate() {
        if end > prev {
            active.push(e as u32);
        }
        prev = end;
    }
    active
}

/// The active experts of a routing (reads the offsets back: one synchronisation).
pub fn active_experts(gpu: &Gpu, routing: &DeviceRouting) -> Result<Vec<u32>> {
    Ok(active_from_offsets(&download(
        gpu,
        routing.expert_offsets(),
    )?))
}

fn download_clone(gpu: &Gpu, buf: &CudaSlice<u32>) -> Result<CudaSlice<u32>> {
    gpu.stream()
        .clone_dtod(buf)
        .map_err(Error::driver("copying device memory"))
}

/// Dequantizes the listed experts into a compact `[len, N, K]` bf16 buffer (at least one
/// expert's worth is allocated so an empty list still yields a valid buffer).
fn dequant_active(gpu: &Gpu, w: &MxExperts, active: &[u32]) -> Result<DenseExperts> {
    let (n, k) = (w.shape.n(), w.shape.k());
    let ids: &[u32] = if active.is_empty() { &[0] } else { active };
    let data = crate::kernels::dequant::dequant_mxfp4_bf16(
        gpu,
        &w.packed,
        &w.scales,
        w.shape.experts(),
        n,
        k,
        ids,
    )?;
    Ok(DenseExperts {
        data,
        experts: ids.len(),
        n,
        k,
    })
}

/// Gathers the active experts' LoRA rows of `A` and columns of `B`.
fn gather_lora(
    gpu: &Gpu,
    lora: &LoraWeights,
    active: &CudaSlice<u32>,
    count: usize,
    experts: usize,
) -> Result<LoraWeights> {
    let r = lora.rank;
    let (k, n) = (lora.a.cols, lora.b.rows);
    let blocks = count.max(1);
    let mut a = alloc_poisoned::<u16>(gpu, blocks * r * k, 0xFF)?;
    let mut b = alloc_poisoned::<u16>(gpu, n * blocks * r, 0xFF)?;
    // The full matrices are only read by a gather; the remap kernel takes them mutably because
    // the same launch path scatters.
    let mut full_a = download_clone_u16(gpu, &lora.a.data)?;
    let mut full_b = download_clone_u16(gpu, &lora.b.data)?;
    eltwise::remap_blocks(
        gpu,
        &mut full_a,
        experts * r,
        k,
        &mut a,
        active,
        count,
        experts,
        r,
        true,
        Remap::Gather,
    )?;
    eltwise::remap_blocks(
        gpu,
        &mut full_b,
        n,
        experts * r,
        &mut b,
        active,
        count,
        experts,
        r,
        false,
        Remap::Gather,
    )?;
    Ok(LoraWeights {
        a: Bf16Matrix {
            data: a,
            rows: count * r,
            cols: k,
        },
        b: Bf16Matrix {
            data: b,
            rows: n,
            cols: count * r,
        },
        rank: r,
        scaling: lora.scaling,
    })
}

fn download_clone_u16(gpu: &Gpu, buf: &CudaSlice<u16>) -> Result<CudaSlice<u16>> {
    gpu.stream()
        .clone_dtod(buf)
        .map_err(Error::driver("copying device memory"))
}

/// What [`forward_core`] produces.
struct ForwardParts {
    /// The output (`y` with gates).
    out: Bf16Matrix,
    /// XA, kept for backward (with LoRA).
    xa: Option<CudaSlice<u16>>,
    /// The per-slot output before the gate combination (with gates).
    expanded: Option<Bf16Matrix>,
    /// The tile configuration the GEMM ran with.
    gemm_config: usize,
}

/// The forward kernels on resolved weights: XA, the grouped GEMM with the LoRA epilogue, and the
/// gate combination.
#[allow(clippy::too_many_arguments)]
fn forward_core(
    gpu: &Gpu,
    r: &Resolved<'_>,
    x: &Bf16Matrix,
    x_map: RowMap,
    output_order: RowOrder,
    gates: Option<&Bf16Matrix>,
    routing: &DeviceRouting,
) -> Result<ForwardParts> {
    let (_, n, k) = r.weights.shape();
    let l = routing.rows();
    let xa = match r.lora {
        Some(lora) => {
            let r_pad = rank_pad(lora.rank as u32) as usize;
            let mut xa = alloc_poisoned::<u16>(gpu, (l * r_pad).max(1), 0xFF)?;
            // XA[p, j] = x_p · A_e[j, :]: A_e(j, d) = A[(e·r + j)·K + d].
            let m = Strided {
                buf: &lora.a.data,
                stride_e: lora.rank * k,
                stride_n: k,
                stride_k: 1,
            };
            lora_down(gpu, r.routing, &x.data, k, x_map, k, m, lora.rank, &mut xa)?;
            Some(xa)
        }
        None => None,
    };
    let experts = r.routing.num_experts;
    let mut out = alloc_poisoned::<u16>(gpu, (l * n).max(1), 0xFF)?;
    let lora_epi = match (r.lora, &xa) {
        (Some(lora), Some(xa)) => Some(LoraEpilogue {
            left: xa,
            // right_e(n, j) = B[n, e·r + j].
            right: Strided {
                buf: &lora.b.data,
                stride_e: lora.rank,
                stride_n: experts * lora.rank,
                stride_k: 1,
            },
            rank: lora.rank,
            scaling: lora.scaling,
        }),
        _ => None,
    };
    let rank = r.lora.map_or(0, |l| l.rank);
    let b = r.weights.forward_operand();
    let gemm_config = tuned_gemm(gpu, b.layout(), rank, experts, k, n, l, |config| {
        grouped_gemm(
            gpu,
            GemmArgs {
                routing: r.routing,
                a: &x.data,
                a_stride: k,
                a_map: x_map,
                b,
                k_red: k,
                n_out: n,
                out: &mut out,
                out_stride: n,
                out_scattered: output_order == RowOrder::Scattered,
                lora: lora_epi,
                config,
            },
        )
    })?;
    let out = Bf16Matrix {
        data: out,
        rows: l,
        cols: n,
    };
    let (out, expanded) = match gates {
        Some(g) => {
            let y = eltwise::combine_gates(
                gpu,
                &out.data,
                &g.data,
                routing.tokens(),
                routing.top_k(),
                n,
            )?;
            (
                Bf16Matrix {
                    data: y,
                    rows: routing.tokens(),
                    cols: n,
                },
                Some(out),
            )
        }
        None => (out, None),
    };
    Ok(ForwardParts {
        out,
        xa,
        expanded,
        gemm_config,
    })
}

/// Backward pass: `dy` has the shape of [`Forward::out`].
pub fn backward(gpu: &Gpu, saved: &Saved<'_>, dy: &Bf16Matrix) -> Result<Grads> {
    let layer = &saved.layer;
    let routing = saved.routing;
    let (e, n, _) = layer.weights.shape();
    let expected_rows = if saved.gates.is_some() {
        routing.tokens()
    } else {
        routing.rows()
    };
    if dy.rows != expected_rows || dy.cols != n {
        return Err(Error::Shape {
            tensor: "dy",
            expected: format!("[{expected_rows}, {n}]"),
            actual: format!("[{}, {}]", dy.rows, dy.cols),
        });
    }
    let Some(c) = &saved.compact else {
        let resolved = Resolved {
            weights: layer.weights,
            lora: layer.lora,
            routing: routing.view(),
        };
        return backward_core(gpu, saved, &resolved, dy);
    };
    // Strategy A: the compact weights (kept or dequantized again), compact LoRA and offsets.
    let ExpertWeights::Mxfp4(w) = layer.weights else {
        return Err(Error::InvalidArgument {
            what: "saved state",
            detail: "Strategy A state without MXFP4 weights".into(),
        });
    };
    let recomputed;
    let weights = match &c.weights {
        Some(d) => d,
        None => {
            let active = download(gpu, &c.active)?;
            recomputed = dequant_active(gpu, w, &active[..c.active_count])?;
            &recomputed
        }
    };
    let resolved = Resolved {
        weights: ExpertWeights::Bf16(weights),
        lora: c.lora.as_ref().or(layer.lora),
        routing: RoutingView {
            ssi: routing.sorted_scattered_idxs(),
            offsets: &c.offsets,
            rows: routing.rows(),
            num_experts: c.active_count,
        },
    };
    let mut grads = backward_core(gpu, saved, &resolved, dy)?;
    // Scatter the compact LoRA gradients back to full size (zeros for inactive experts).
    if let (Some(lora), Some(_)) = (layer.lora, &c.lora) {
        let r = lora.rank;
        let k = lora.a.cols;
        if let Some(da) = grads.da.as_mut() {
            let mut full = alloc_poisoned::<u16>(gpu, e * r * k, 0)?;
            eltwise::remap_blocks(
                gpu,
                &mut full,
                e * r,
                k,
                &mut da.data,
                &c.active,
                c.active_count,
                e,
                r,
                true,
                Remap::Scatter,
            )?;
            *da = Bf16Matrix {
                data: full,
                rows: e * r,
                cols: k,
            };
        }
        if let Some(db) = grads.db.as_mut() {
            let mut full = alloc_poisoned::<u16>(gpu, n * e * r, 0)?;
            eltwise::remap_blocks(
                gpu,
                &mut full,
                n,
                e * r,
                &mut db.data,
                &c.active,
                c.active_count,
                e,
                r,
                false,
                Remap::Scatter,
            )?;
            *db = Bf16Matrix {
                data: full,
                rows: n,
                cols: e * r,
            };
        }
    }
    Ok(grads)
}

/// The backward kernels on resolved weights.
fn backward_core(gpu: &Gpu, saved: &Saved<'_>, r: &Resolved<'_>, dy: &Bf16Matrix) -> Result<Grads> {
    let layer = &saved.layer;
    let routing = saved.routing;
    let (e, n, k) = r.weights.shape();
    let (t, top_k, l) = (routing.tokens(), routing.top_k(), routing.rows());
    let view = r.routing;
    // The per-slot output gradient and how grouped row p finds its row.
    let (d_gates, gated_dy) = match (saved.gates, &saved.expanded) {
        (Some(g), Some(expanded)) => {
            let dg = eltwise::gate_grad(gpu, &expanded.data, &dy.data, t, top_k, n)?;
            let dys = eltwise::scale_slots(gpu, &dy.data, &g.data, t, top_k, n)?;
            (
                Some(Bf16Matrix {
                    data: dg,
                    rows: t,
                    cols: top_k,
                }),
                Some(dys),
            )
        }
        _ => (None, None),
    };
    let (dy_buf, dy_map) = match (&gated_dy, layer.output_order) {
        (Some(d), _) => (d, RowMap::Scattered { fan_out: 1 }),
        (None, RowOrder::Scattered) => (&dy.data, RowMap::Scattered { fan_out: 1 }),
        (None, RowOrder::Grouped) => (&dy.data, RowMap::Grouped),
    };
    let yb = match r.lora {
        Some(lora) => {
            let r_pad = rank_pad(lora.rank as u32) as usize;
            let mut yb = alloc_poisoned::<u16>(gpu, (l * r_pad).max(1), 0xFF)?;
            // YB[p, j] = Σ_n dY[p, n] · B[n, e·r + j]: m_e(j, n) with stride_n(j) = 1, stride_k(n) = E·r.
            let m = Strided {
                buf: &lora.b.data,
                stride_e: lora.rank,
                stride_n: 1,
                stride_k: e * lora.rank,
            };
            lora_down(gpu, view, dy_buf, n, dy_map, n, m, lora.rank, &mut yb)?;
            Some(yb)
        }
        None => None,
    };
    // dX per grouped row, written to the input's row positions.
    let (dx_rows, dx_scattered) = match saved.x_map {
        RowMap::Grouped => (l, false),
        RowMap::Scattered { .. } => (l, true),
    };
    let mut dxs = alloc_poisoned::<u16>(gpu, (dx_rows * k).max(1), 0xFF)?;
    let lora_epi = match (r.lora, &yb) {
        (Some(lora), Some(yb)) => Some(LoraEpilogue {
            left: yb,
            // right_e(kk, j) = A[(e·r + j)·K + kk].
            right: Strided {
                buf: &lora.a.data,
                stride_e: lora.rank * k,
                stride_n: 1,
                stride_k: k,
            },
            rank: lora.rank,
            scaling: lora.scaling,
        }),
        _ => None,
    };
    let rank = r.lora.map_or(0, |l| l.rank);
    let b = r.weights.dx_operand();
    let gemm_config = tuned_gemm(gpu, b.layout(), rank, e, n, k, l, |config| {
        grouped_gemm(
            gpu,
            GemmArgs {
                routing: view,
                a: dy_buf,
                a_stride: n,
                a_map: dy_map,
                // dX = dY · W_e: reduction over n (rows of W_store[e]), output over k (contiguous).
                b,
                k_red: n,
                n_out: k,
                out: &mut dxs,
                out_stride: k,
                out_scattered: dx_scattered,
                lora: lora_epi,
                config,
            },
        )
    })?;
    let dx = match saved.x_map {
        RowMap::Scattered { fan_out } if fan_out > 1 => Bf16Matrix {
            data: eltwise::sum_slots(gpu, &dxs, t, top_k, k)?,
            rows: t,
            cols: k,
        },
        _ => Bf16Matrix {
            data: dxs,
            rows: dx_rows,
            cols: k,
        },
    };
    let (da, db) = match (r.lora, &yb, &saved.xa) {
        (Some(lora), Some(yb), Some(xa)) => {
            let r = lora.rank;
            let mut da = alloc_poisoned::<u16>(gpu, e * r * k, 0xFF)?;
            // dA_e[j, kk] = s · Σ_p YB[p, j] · x[row(p), kk]  → A layout (e·r + j)·K + kk.
            gram(
                gpu,
                view,
                &saved.x.get().data,
                k,
                saved.x_map,
                k,
                yb,
                r,
                lora.scaling,
                &mut da,
                (r * k, 1, k),
            )?;
            let mut db = alloc_poisoned::<u16>(gpu, n * e * r, 0xFF)?;
            // dB_e[nn, j] = s · Σ_p dY[p, nn] · XA[p, j]  → B layout nn·E·r + e·r + j.
            gram(
                gpu,
                view,
                dy_buf,
                n,
                dy_map,
                n,
                xa,
                r,
                lora.scaling,
                &mut db,
                (r, e * r, 1),
            )?;
            (
                Some(Bf16Matrix {
                    data: da,
                    rows: e * r,
                    cols: k,
                }),
                Some(Bf16Matrix {
                    data: db,
                    rows: n,
                    cols: e * r,
                }),
            )
        }
        _ => (None, None),
    };
    Ok(Grads {
        dx,
        da,
        db,
        d_gates,
        gemm_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_configuration_that_was_pruned_is_an_error_naming_it() {
        let key = TuneKey {
            kernel: "gemm_nk_mx",
            cc: (9, 0),
            experts: 8,
            k: 256,
            n: 128,
            rank: 128,
            rows_bucket: 64,
        };
        let report = PruneReport {
            shared_memory: 1,
            ..PruneReport::default()
        };
        assert_eq!(forced_among(None, &[0, 2], &key, report).unwrap(), None);
        assert_eq!(
            forced_among(Some(2), &[0, 2], &key, report).unwrap(),
            Some(2)
        );
        let err = forced_among(Some(1), &[0, 2], &key, report).unwrap_err();
        let Error::InvalidArgument { what, detail } = &err else {
            panic!("expected InvalidArgument, got {err:?}");
        };
        assert_eq!(*what, "forced tile configuration");
        assert!(
            detail.contains(&config_name(&GEMM_CONFIGS[1]))
                && detail.contains("row 1")
                && detail.contains("gemm_nk_mx/sm90/e8/k256/n128/r128/m64")
                && detail.contains("shared_memory: 1"),
            "{detail}"
        );
    }

    #[test]
    fn auto_prefers_fused_for_few_rows_per_expert_and_selective_for_many() {
        let gib = 1usize << 30;
        // Balanced E=256, T=256, top-8: 2048 rows over ~229 experts.
        assert_eq!(
            auto_strategy(229, 2048, 229 << 22, 70 * gib),
            Strategy::Fused
        );
        // Balanced T=4096: ~129 rows per expert.
        assert_eq!(
            auto_strategy(254, 32768, 254 << 22, 70 * gib),
            Strategy::Fused
        );
        // Sparse T=256: 8 experts share 2048 rows (256 each): A measured 0.36 ms vs B 0.47 ms.
        assert_eq!(
            auto_strategy(8, 2048, 8 << 22, 70 * gib),
            Strategy::SelectiveDequant
        );
        // Sparse: 8 experts share 32768 rows.
        assert_eq!(
            auto_strategy(8, 32768, 8 << 22, 70 * gib),
            Strategy::SelectiveDequant
        );
        // Balanced T=16384: 512 rows per expert; B measured 6.03 ms vs A 6.51 ms.
        assert_eq!(
            auto_strategy(256, 131072, 256 << 22, 70 * gib),
            Strategy::Fused
        );
        // Balanced T=65536: 2048 rows per expert.
        assert_eq!(
            auto_strategy(256, 524288, 256 << 22, 70 * gib),
            Strategy::SelectiveDequant
        );
        // ... unless the transient buffer would not fit.
        assert_eq!(auto_strategy(256, 524288, 256 << 22, gib), Strategy::Fused);
    }

    #[test]
    fn active_experts_come_from_nonempty_offset_ranges() {
        assert_eq!(active_from_offsets(&[0, 3, 3, 7, 7]), vec![1, 3]);
        assert_eq!(active_from_offsets(&[2]), vec![0]);
        assert!(active_from_offsets(&[0, 0]).is_empty());
    }
}
