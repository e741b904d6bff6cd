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
use kernels_gpu::shared::tiles::{GEMM_CONFIGS, rank_pad};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::kernels::gemm::{BOperand, GemmArgs, LoraEpilogue, MxOperand, RowMap, Strided, gram, grouped_gemm, lora_down};
use crate::mxfp4::{MxLayout, MxShape, MxWeights, validate_mx};
use crate::shared::mxfp4::MX_BLOCK;
use crate::tensor::TensorMeta;
use crate::kernels::{alloc_poisoned, download, eltwise, upload};
pub use crate::reference::RowOrder;
use crate::routing::DeviceRouting;
use crate::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};

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
            return Err(Error::Shape { tensor: "matrix", expected: format!("[{rows}, {cols}] ({} elements)", rows * cols), actual: format!("{} elements", bits.len()) });
        }
        let data = if bits.is_empty() { alloc_poisoned(gpu, 1, 0)? } else { upload(gpu, bits)? };
        Ok(Self { data, rows, cols })
    }

    /// Wraps a device buffer holding at least `rows·cols` bf16.
    pub fn from_device(data: CudaSlice<u16>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() < rows * cols {
            return Err(Error::Shape { tensor: "matrix", expected: format!("[{rows}, {cols}]"), actual: format!("{} elements", data.len()) });
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

    /// Downloads as f32 (synchronizes).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = download(gpu, &self.data)?.into_iter().map(bf16_bits_to_f32).collect();
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
            return Err(Error::InvalidArgument { what: "expert weights", detail: format!("shape [{experts}, {n}, {k}] has a zero dimension") });
        }
        if bits.len() != experts * n * k {
            return Err(Error::Shape { tensor: "expert weights", expected: format!("[{experts}, {n}, {k}]"), actual: format!("{} elements", bits.len()) });
        }
        Ok(Self { data: upload(gpu, bits)?, experts, n, k })
    }

    /// Wraps device-resident weights `[experts, n, k]`.
    pub fn from_device(data: CudaSlice<u16>, experts: usize, n: usize, k: usize) -> Result<Self> {
        if data.len() < experts * n * k {
            return Err(Error::Shape { tensor: "expert weights", expected: format!("[{experts}, {n}, {k}]"), actual: format!("{} elements", data.len()) });
        }
        Ok(Self { data, experts, n, k })
    }

    /// `(E, N, K)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.experts, self.n, self.k)
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
        Ok(Self { packed: upload(gpu, w.packed())?, scales: upload(gpu, w.scales())?, shape: w.shape() })
    }

    /// Wraps device buffers after validating their metadata (SPEC §1.6) and lengths.
    pub fn from_device(packed: CudaSlice<u8>, packed_meta: &TensorMeta, scales: CudaSlice<u8>, scales_meta: &TensorMeta) -> Result<Self> {
        let shape = validate_mx(packed_meta, scales_meta, MX_BLOCK, MxLayout::Fwd, false)?;
        if packed.len() < shape.packed_len() || scales.len() < shape.scales_len() {
            return Err(Error::Shape {
                tensor: "MXFP4 buffers",
                expected: format!("{} packed and {} scale bytes", shape.packed_len(), shape.scales_len()),
                actual: format!("{} and {}", packed.len(), scales.len()),
            });
        }
        Ok(Self { packed, scales, shape })
    }

    /// The container's shape.
    pub fn shape(&self) -> MxShape {
        self.shape
    }

    fn operand(&self) -> MxOperand<'_> {
        MxOperand { packed: &self.packed, scales: &self.scales, n: self.shape.n(), k: self.shape.k() }
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
            ExpertWeights::Bf16(w) => BOperand::Nk(Strided { buf: &w.data, stride_e: w.n * w.k, stride_n: w.k, stride_k: 1 }),
            ExpertWeights::Mxfp4(w) => BOperand::NkMx(w.operand()),
        }
    }

    /// The dX GEMM's B operand (`W_store[e]` with N as the reduction, K as the output).
    fn dx_operand(&self) -> BOperand<'_> {
        match self {
            ExpertWeights::Bf16(w) => BOperand::Kn(Strided { buf: &w.data, stride_e: w.n * w.k, stride_n: 1, stride_k: w.k }),
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

/// One LoRA-fused expert projection: the frozen weights, the optional LoRA, and where input
/// and output rows live.
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
}

/// The forward result.
pub struct Forward {
    /// `[T, N]` when gates were given (the gate-weighted sum over slots), otherwise `[L, N]` in
    /// the output order (dropped slots give zero rows).
    pub out: Bf16Matrix,
}

/// What backward needs, and nothing else (SPEC §3.4): the borrowed inputs, the forward's XA
/// (`[L, r_pad]`, kept instead of recomputed) and, with gates, the unreduced per-slot output.
pub struct Saved<'a> {
    layer: ExpertLinear<'a>,
    x: &'a Bf16Matrix,
    routing: &'a DeviceRouting,
    gates: Option<&'a Bf16Matrix>,
    x_map: RowMap,
    xa: Option<CudaSlice<u16>>,
    expanded: Option<Bf16Matrix>,
    config: usize,
}

/// Gradients. The frozen base gets none.
pub struct Grads {
    /// Gradient of `x`, same shape as `x`.
    pub dx: Bf16Matrix,
    /// Gradient of `A`, `[E·r, K]` (`None` without LoRA).
    pub da: Option<Bf16Matrix>,
    /// Gradient of `B`, `[N, E·r]` (`None` without LoRA).
    pub db: Option<Bf16Matrix>,
    /// Gradient of the gates, `[T, k]` (`None` without gates).
    pub d_gates: Option<Bf16Matrix>,
}

/// Picks a tile configuration from the average rows per expert.
fn pick_config(rows: usize, experts: usize) -> usize {
    let per_expert = rows / experts.max(1);
    if per_expert >= 96 {
        0
    } else if per_expert >= 40 {
        1
    } else {
        2
    }
}

impl<'a> ExpertLinear<'a> {
    fn validate(&self, x: &Bf16Matrix, routing: &DeviceRouting, gates: Option<&Bf16Matrix>) -> Result<RowMap> {
        let (e, n, k) = self.weights.shape();
        if e != routing.num_experts() {
            return Err(Error::Shape { tensor: "expert weights", expected: format!("{} experts (the routing's)", routing.num_experts()), actual: format!("{e} experts") });
        }
        if k % 8 != 0 || n % 8 != 0 {
            return Err(Error::InvalidArgument { what: "expert weights", detail: format!("K = {k} and N = {n} must be multiples of 8") });
        }
        if x.cols != k {
            return Err(Error::Shape { tensor: "x", expected: format!("{k} columns (K)"), actual: format!("{} columns", x.cols) });
        }
        let (t, top_k, l) = (routing.tokens(), routing.top_k(), routing.rows());
        let map = match self.input_order {
            RowOrder::Grouped if x.rows == l => RowMap::Grouped,
            RowOrder::Scattered if x.rows == t => RowMap::Scattered { fan_out: top_k as u32 },
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
                return Err(Error::InvalidArgument { what: "LoRA rank", detail: format!("must be in 1..={} (use no LoRA for rank 0), got {r}", kernels_gpu::shared::tiles::MAX_RANK) });
            }
            if lora.a.rows != e * r || lora.a.cols != k {
                return Err(Error::Shape { tensor: "lora_A", expected: format!("[{}, {k}] (E·r, K)", e * r), actual: format!("[{}, {}]", lora.a.rows, lora.a.cols) });
            }
            if lora.b.rows != n || lora.b.cols != e * r {
                return Err(Error::Shape { tensor: "lora_B", expected: format!("[{n}, {}] (N, E·r)", e * r), actual: format!("[{}, {}]", lora.b.rows, lora.b.cols) });
            }
            if !lora.scaling.is_finite() {
                return Err(Error::InvalidArgument { what: "LoRA scaling", detail: format!("must be finite, got {}", lora.scaling) });
            }
        }
        if let Some(g) = gates {
            if self.output_order != RowOrder::Scattered {
                return Err(Error::InvalidArgument { what: "gates", detail: "gates need scattered (slot-ordered) output".into() });
            }
            if g.rows != t || g.cols != top_k {
                return Err(Error::Shape { tensor: "gates", expected: format!("[{t}, {top_k}]"), actual: format!("[{}, {}]", g.rows, g.cols) });
            }
        }
        Ok(map)
    }

    /// Forward pass. `gates [T, k]` (down projection) combine the per-slot outputs into `[T, N]`.
    pub fn forward(&self, gpu: &Gpu, x: &'a Bf16Matrix, routing: &'a DeviceRouting, gates: Option<&'a Bf16Matrix>) -> Result<(Forward, Saved<'a>)> {
        let x_map = self.validate(x, routing, gates)?;
        let (e, n, k) = self.weights.shape();
        let l = routing.rows();
        let view = routing.view();
        let config = pick_config(l, e);
        let xa = match self.lora {
            Some(lora) => {
                let r_pad = rank_pad(lora.rank as u32) as usize;
                let mut xa = alloc_poisoned::<u16>(gpu, (l * r_pad).max(1), 0xFF)?;
                // XA[p, j] = x_p · A_e[j, :]: A_e(j, d) = A[(e·r + j)·K + d].
                let m = Strided { buf: &lora.a.data, stride_e: lora.rank * k, stride_n: k, stride_k: 1 };
                lora_down(gpu, view, &x.data, k, x_map, k, m, lora.rank, &mut xa)?;
                Some(xa)
            }
            None => None,
        };
        let mut out = alloc_poisoned::<u16>(gpu, (l * n).max(1), 0xFF)?;
        let lora_epi = match (self.lora, &xa) {
            (Some(lora), Some(xa)) => Some(LoraEpilogue {
                left: xa,
                // right_e(n, j) = B[n, e·r + j].
                right: Strided { buf: &lora.b.data, stride_e: lora.rank, stride_n: e * lora.rank, stride_k: 1 },
                rank: lora.rank,
                scaling: lora.scaling,
            }),
            _ => None,
        };
        grouped_gemm(
            gpu,
            GemmArgs {
                routing: view,
                a: &x.data,
                a_stride: k,
                a_map: x_map,
                b: self.weights.forward_operand(),
                k_red: k,
                n_out: n,
                out: &mut out,
                out_stride: n,
                out_scattered: self.output_order == RowOrder::Scattered,
                lora: lora_epi,
                config,
            },
        )?;
        let out = Bf16Matrix { data: out, rows: l, cols: n };
        let (result, expanded) = match gates {
            Some(g) => {
                let y = eltwise::combine_gates(gpu, &out.data, &g.data, routing.tokens(), routing.top_k(), n)?;
                (Bf16Matrix { data: y, rows: routing.tokens(), cols: n }, Some(out))
            }
            None => (out, None),
        };
        Ok((Forward { out: result }, Saved { layer: *self, x, routing, gates, x_map, xa, expanded, config }))
    }
}

/// Backward pass: `dy` has the shape of [`Forward::out`].
pub fn backward(gpu: &Gpu, saved: &Saved<'_>, dy: &Bf16Matrix) -> Result<Grads> {
    let layer = &saved.layer;
    let routing = saved.routing;
    let (e, n, k) = layer.weights.shape();
    let (t, top_k, l) = (routing.tokens(), routing.top_k(), routing.rows());
    let view = routing.view();
    let expected_rows = if saved.gates.is_some() { t } else { l };
    if dy.rows != expected_rows || dy.cols != n {
        return Err(Error::Shape { tensor: "dy", expected: format!("[{expected_rows}, {n}]"), actual: format!("[{}, {}]", dy.rows, dy.cols) });
    }
    // The per-slot output gradient and how grouped row p finds its row.
    let (d_gates, gated_dy) = match (saved.gates, &saved.expanded) {
        (Some(g), Some(expanded)) => {
            let dg = eltwise::gate_grad(gpu, &expanded.data, &dy.data, t, top_k, n)?;
            let dys = eltwise::scale_slots(gpu, &dy.data, &g.data, t, top_k, n)?;
            (Some(Bf16Matrix { data: dg, rows: t, cols: top_k }), Some(dys))
        }
        _ => (None, None),
    };
    let (dy_buf, dy_map) = match (&gated_dy, layer.output_order) {
        (Some(d), _) => (d, RowMap::Scattered { fan_out: 1 }),
        (None, RowOrder::Scattered) => (&dy.data, RowMap::Scattered { fan_out: 1 }),
        (None, RowOrder::Grouped) => (&dy.data, RowMap::Grouped),
    };
    let yb = match layer.lora {
        Some(lora) => {
            let r_pad = rank_pad(lora.rank as u32) as usize;
            let mut yb = alloc_poisoned::<u16>(gpu, (l * r_pad).max(1), 0xFF)?;
            // YB[p, j] = Σ_n dY[p, n] · B[n, e·r + j]: m_e(j, n) with stride_n(j) = 1, stride_k(n) = E·r.
            let m = Strided { buf: &lora.b.data, stride_e: lora.rank, stride_n: 1, stride_k: e * lora.rank };
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
    let lora_epi = match (layer.lora, &yb) {
        (Some(lora), Some(yb)) => Some(LoraEpilogue {
            left: yb,
            // right_e(kk, j) = A[(e·r + j)·K + kk].
            right: Strided { buf: &lora.a.data, stride_e: lora.rank * k, stride_n: 1, stride_k: k },
            rank: lora.rank,
            scaling: lora.scaling,
        }),
        _ => None,
    };
    grouped_gemm(
        gpu,
        GemmArgs {
            routing: view,
            a: dy_buf,
            a_stride: n,
            a_map: dy_map,
            // dX = dY · W_e: reduction over n (rows of W_store[e]), output over k (contiguous).
            b: layer.weights.dx_operand(),
            k_red: n,
            n_out: k,
            out: &mut dxs,
            out_stride: k,
            out_scattered: dx_scattered,
            lora: lora_epi,
            config: saved.config.min(GEMM_CONFIGS.len() - 1),
        },
    )?;
    let dx = match saved.x_map {
        RowMap::Scattered { fan_out } if fan_out > 1 => Bf16Matrix { data: eltwise::sum_slots(gpu, &dxs, t, top_k, k)?, rows: t, cols: k },
        _ => Bf16Matrix { data: dxs, rows: dx_rows, cols: k },
    };
    let (da, db) = match (layer.lora, &yb, &saved.xa) {
        (Some(lora), Some(yb), Some(xa)) => {
            let r = lora.rank;
            let mut da = alloc_poisoned::<u16>(gpu, e * r * k, 0xFF)?;
            // dA_e[j, kk] = s · Σ_p YB[p, j] · x[row(p), kk]  → A layout (e·r + j)·K + kk.
            gram(gpu, view, &saved.x.data, k, saved.x_map, k, yb, r, lora.scaling, &mut da, (r * k, 1, k))?;
            let mut db = alloc_poisoned::<u16>(gpu, n * e * r, 0xFF)?;
            // dB_e[nn, j] = s · Σ_p dY[p, nn] · XA[p, j]  → B layout nn·E·r + e·r + j.
            gram(gpu, view, dy_buf, n, dy_map, n, xa, r, lora.scaling, &mut db, (r, e * r, 1))?;
            (Some(Bf16Matrix { data: da, rows: e * r, cols: k }), Some(Bf16Matrix { data: db, rows: n, cols: e * r }))
        }
        _ => (None, None),
    };
    Ok(Grads { dx, da, db, d_gates })
}
