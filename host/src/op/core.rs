//! The launch sequences of the expert linear on resolved weights (the kernels see either the
//! caller's weights or Strategy A's compact ones): [`forward_core`] (XA, the grouped GEMM with
//! the LoRA epilogue, the gate combination) and [`backward_core`] (gate gradient and gated dY,
//! YB, the dX GEMM with the LoRA epilogue, the slot sum, dA and dB by the Gram kernel), and the
//! GEMM operands of the weights.

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::tiles::rank_pad;

use super::plan::{GemmShape, tuned_gemm};
use super::{ExpertWeights, Grads, Saved};
use crate::buffers::{Bf16Matrix, LoraWeights, MxExperts, NvExperts};
use crate::device::alloc_output;
use crate::error::Result;
use crate::kernels::eltwise;
use crate::kernels::gemm::{
    BOperand, GemmArgs, LoraEpilogue, MxOperand, NvOperand, RoutingView, RowMap, Strided, gram,
    grouped_gemm, lora_down,
};
use crate::routing::{DeviceRouting, RowOrder};
use crate::runtime::Runtime;

/// What the kernels see for one call: weights, LoRA and routing, possibly compact.
pub(super) struct Resolved<'s> {
    pub(super) weights: ExpertWeights<'s>,
    pub(super) lora: Option<&'s LoraWeights>,
    /// The bias `[E, N]` of the forward GEMM (E of the resolved, possibly compact, weights).
    pub(super) bias: Option<&'s CudaSlice<u16>>,
    pub(super) routing: RoutingView<'s>,
}

impl ExpertWeights<'_> {
    /// `(E, N, K)`.
    pub(super) fn shape(&self) -> (usize, usize, usize) {
        match self {
            ExpertWeights::Bf16(w) => w.shape(),
            ExpertWeights::Mxfp4(w) => {
                let s = w.shape();
                (s.experts(), s.n(), s.k())
            }
            ExpertWeights::Nvfp4(w) => {
                let s = w.shape();
                (s.experts(), s.n(), s.k())
            }
        }
    }

    /// The forward GEMM's B operand (`W_store[e]` with K as the reduction).
    fn forward_operand(&self) -> BOperand<'_> {
        match self {
            ExpertWeights::Bf16(w) => {
                let (_, n, k) = w.shape();
                BOperand::Nk(Strided {
                    buf: w.data(),
                    stride_e: n * k,
                    stride_n: k,
                    stride_k: 1,
                })
            }
            ExpertWeights::Mxfp4(w) => BOperand::NkMx(mx_operand(w)),
            ExpertWeights::Nvfp4(w) => BOperand::NkNv(nv_operand(w)),
        }
    }

    /// The dX GEMM's B operand (`W_store[e]` with N as the reduction, K as the output).
    fn dx_operand(&self) -> BOperand<'_> {
        match self {
            ExpertWeights::Bf16(w) => {
                let (_, n, k) = w.shape();
                BOperand::Kn(Strided {
                    buf: w.data(),
                    stride_e: n * k,
                    stride_n: 1,
                    stride_k: k,
                })
            }
            ExpertWeights::Mxfp4(w) => BOperand::KnMx(mx_operand(w)),
            ExpertWeights::Nvfp4(w) => BOperand::KnNv(nv_operand(w)),
        }
    }
}

/// MXFP4 weights as the GEMM's operand.
fn mx_operand(w: &MxExperts) -> MxOperand<'_> {
    MxOperand {
        packed: w.packed(),
        scales: w.scales(),
        n: w.shape().n(),
        k: w.shape().k(),
    }
}

/// NVFP4 weights as the GEMM's operand.
fn nv_operand(w: &NvExperts) -> NvOperand<'_> {
    NvOperand {
        packed: w.packed(),
        scales: w.scales(),
        tensor_scales: w.tensor_scales(),
        groups: w.groups(),
        n: w.shape().n(),
        k: w.shape().k(),
    }
}

/// The rank-sized product XA (`m = A_e`) or YB (`m = B_eᵀ`) of [`lora_down`] into a new bf16
/// `[rows, r_pad]` buffer; the activations are rows of `width` elements addressed through
/// `act_map`. With `two_term`, also its low part `round(v − round(v))` (same shape): the
/// two-term XA the forward epilogue reads (about 16 mantissa bits; the Gram's dB reads the high
/// part).
fn lora_product(
    gpu: &Runtime,
    routing: RoutingView<'_>,
    rows: usize,
    (act, act_map, width): (&CudaSlice<u16>, RowMap, usize),
    m: Strided<'_>,
    rank: usize,
    two_term: bool,
) -> Result<(CudaSlice<u16>, Option<CudaSlice<u16>>)> {
    let r_pad = rank_pad(rank as u32) as usize;
    let mut out = alloc_output::<u16>(gpu, (rows * r_pad).max(1))?;
    let mut lo = if two_term {
        Some(alloc_output::<u16>(gpu, (rows * r_pad).max(1))?)
    } else {
        None
    };
    lora_down(
        gpu,
        routing,
        act,
        width,
        act_map,
        width,
        m,
        rank,
        &mut out,
        lo.as_mut(),
    )?;
    Ok((out, lo))
}

/// What [`forward_core`] produces.
pub(super) struct ForwardParts {
    /// The output (`y` with gates).
    pub(super) out: Bf16Matrix,
    /// XA, kept for backward (with LoRA).
    pub(super) xa: Option<CudaSlice<u16>>,
    /// The per-slot output before the gate combination (with gates).
    pub(super) expanded: Option<Bf16Matrix>,
    /// The tile configuration the GEMM ran with.
    pub(super) gemm_config: usize,
}

/// The forward kernels on resolved weights: XA, the grouped GEMM with the LoRA epilogue
/// ([`forward_gemm`]), and the gate combination ([`combine`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_core(
    gpu: &Runtime,
    r: &Resolved<'_>,
    x: &Bf16Matrix,
    x_map: RowMap,
    output_order: RowOrder,
    gates: Option<&Bf16Matrix>,
    routing: &DeviceRouting,
) -> Result<ForwardParts> {
    let g = forward_gemm(gpu, r, x, x_map, output_order, routing)?;
    combine(gpu, g, gates, routing)
}

/// What [`forward_gemm`] produces.
pub(super) struct GemmParts {
    /// The grouped GEMM's output, per routed row.
    out: Bf16Matrix,
    /// XA (high part), kept for backward (with LoRA).
    xa: Option<CudaSlice<u16>>,
    /// The tile configuration the GEMM ran with.
    gemm_config: usize,
}

/// The tuner's key of the forward GEMM of `weights` (LoRA `lora`) over `experts` experts and
/// `rows` routed rows: one place, so that `Auto`'s `plan::gemm_config_settled` asks about the
/// GEMM [`forward_gemm`] then runs.
pub(super) fn forward_shape(
    weights: ExpertWeights<'_>,
    lora: Option<&LoraWeights>,
    experts: usize,
    rows: usize,
) -> GemmShape {
    let (_, n, k) = weights.shape();
    GemmShape {
        layout: weights.forward_operand().layout(),
        rank: lora.map_or(0, |l| l.rank),
        experts,
        k_red: k,
        n_out: n,
        rows,
    }
}

/// XA and the grouped GEMM with the LoRA epilogue, on resolved weights and routing.
pub(super) fn forward_gemm(
    gpu: &Runtime,
    r: &Resolved<'_>,
    x: &Bf16Matrix,
    x_map: RowMap,
    output_order: RowOrder,
    routing: &DeviceRouting,
) -> Result<GemmParts> {
    let (_, n, k) = r.weights.shape();
    let l = routing.rows();
    let xa = match r.lora {
        Some(lora) => {
            // XA[p, j] = x_p · A_e[j, :]: A_e(j, d) = A[(e·r + j)·K + d].
            let m = Strided {
                buf: lora.a.data(),
                stride_e: lora.rank * k,
                stride_n: k,
                stride_k: 1,
            };
            Some(lora_product(
                gpu,
                r.routing,
                l,
                (x.data(), x_map, k),
                m,
                lora.rank,
                true,
            )?)
        }
        None => None,
    };
    let experts = r.routing.num_experts();
    let mut out = alloc_output::<u16>(gpu, (l * n).max(1))?;
    let lora_epi = match (r.lora, &xa) {
        (Some(lora), Some((xa, xa_lo))) => Some(LoraEpilogue {
            left: xa,
            left_lo: xa_lo.as_ref(),
            // right_e(n, j) = B[n, e·r + j].
            right: Strided {
                buf: lora.b.data(),
                stride_e: lora.rank,
                stride_n: experts * lora.rank,
                stride_k: 1,
            },
            rank: lora.rank,
            scaling: lora.scaling,
        }),
        _ => None,
    };
    let b = r.weights.forward_operand();
    let shape = forward_shape(r.weights, r.lora, experts, l);
    let gemm_config = tuned_gemm(gpu, &shape, |config| {
        grouped_gemm(
            gpu,
            GemmArgs {
                routing: r.routing,
                a: x.data(),
                a_stride: k,
                a_map: x_map,
                b,
                k_red: k,
                n_out: n,
                out: &mut out,
                out_stride: n,
                out_scattered: output_order == RowOrder::Scattered,
                lora: lora_epi,
                bias: r.bias,
                config,
            },
        )
    })?;
    Ok(GemmParts {
        out: Bf16Matrix::from_output(out, l, n),
        // Backward's dB reads the high part; the low part is freed here.
        xa: xa.map(|(hi, _)| hi),
        gemm_config,
    })
}

/// The gate combination of a forward GEMM's output (the down projection), or the output as is.
pub(super) fn combine(
    gpu: &Runtime,
    g: GemmParts,
    gates: Option<&Bf16Matrix>,
    routing: &DeviceRouting,
) -> Result<ForwardParts> {
    let GemmParts {
        out,
        xa,
        gemm_config,
    } = g;
    let n = out.cols();
    let (out, expanded) = match gates {
        Some(g) => {
            let y = eltwise::combine_gates(
                gpu,
                out.data(),
                g.data(),
                routing.tokens(),
                routing.top_k(),
                n,
            )?;
            (Bf16Matrix::from_output(y, routing.tokens(), n), Some(out))
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

/// The backward kernels on resolved weights.
pub(super) fn backward_core(
    gpu: &Runtime,
    saved: &Saved,
    r: &Resolved<'_>,
    dy: &Bf16Matrix,
) -> Result<Grads> {
    let routing = &saved.routing;
    let (e, n, k) = r.weights.shape();
    let (t, top_k, l) = (routing.tokens(), routing.top_k(), routing.rows());
    let view = r.routing;
    // The per-slot output gradient and how grouped row p finds its row.
    let (d_gates, gated_dy) = match (saved.gates.as_ref(), &saved.expanded) {
        (Some(g), Some(expanded)) => {
            let dg = eltwise::gate_grad(gpu, expanded.data(), dy.data(), t, top_k, n)?;
            let dys = eltwise::scale_slots(gpu, dy.data(), g.data(), t, top_k, n)?;
            (Some(Bf16Matrix::from_output(dg, t, top_k)), Some(dys))
        }
        _ => (None, None),
    };
    let (dy_buf, dy_map) = match (&gated_dy, saved.output_order) {
        (Some(d), _) => (d, RowMap::Scattered { fan_out: 1 }),
        (None, RowOrder::Scattered) => (dy.data(), RowMap::Scattered { fan_out: 1 }),
        (None, RowOrder::Grouped) => (dy.data(), RowMap::Grouped),
    };
    let yb = match r.lora {
        Some(lora) => {
            // YB[p, j] = Σ_n dY[p, n] · B[n, e·r + j]: m_e(j, n) with stride_n(j) = 1, stride_k(n) = E·r.
            let m = Strided {
                buf: lora.b.data(),
                stride_e: lora.rank,
                stride_n: 1,
                stride_k: e * lora.rank,
            };
            let (yb, _) = lora_product(gpu, view, l, (dy_buf, dy_map, n), m, lora.rank, false)?;
            Some(yb)
        }
        None => None,
    };
    // dX per grouped row, written to the input's row positions.
    let (dx_rows, dx_scattered) = match saved.x_map {
        RowMap::Grouped => (l, false),
        RowMap::Scattered { .. } => (l, true),
    };
    let mut dxs = alloc_output::<u16>(gpu, (dx_rows * k).max(1))?;
    let lora_epi = match (r.lora, &yb) {
        (Some(lora), Some(yb)) => Some(LoraEpilogue {
            left: yb,
            left_lo: None,
            // right_e(kk, j) = A[(e·r + j)·K + kk].
            right: Strided {
                buf: lora.a.data(),
                stride_e: lora.rank * k,
                stride_n: 1,
                stride_k: k,
            },
            rank: lora.rank,
            scaling: lora.scaling,
        }),
        _ => None,
    };
    let b = r.weights.dx_operand();
    let shape = GemmShape {
        layout: b.layout(),
        rank: r.lora.map_or(0, |l| l.rank),
        experts: e,
        k_red: n,
        n_out: k,
        rows: l,
    };
    let gemm_config = tuned_gemm(gpu, &shape, |config| {
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
                bias: None,
                config,
            },
        )
    })?;
    let dx = match saved.x_map {
        RowMap::Scattered { fan_out } if fan_out > 1 => {
            Bf16Matrix::from_output(eltwise::sum_slots(gpu, &dxs, t, top_k, k)?, t, k)
        }
        _ => Bf16Matrix::from_output(dxs, dx_rows, k),
    };
    let (da, db) = match (r.lora, &yb, &saved.xa) {
        (Some(lora), Some(yb), Some(xa)) => {
            let r = lora.rank;
            let mut da = alloc_output::<u16>(gpu, e * r * k)?;
            // dA_e[j, kk] = s · Σ_p YB[p, j] · x[row(p), kk]  → A layout (e·r + j)·K + kk.
            gram(
                gpu,
                view,
                saved.x.data(),
                k,
                saved.x_map,
                k,
                yb,
                r,
                lora.scaling,
                &mut da,
                (r * k, 1, k),
            )?;
            let mut db = alloc_output::<u16>(gpu, n * e * r)?;
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
                Some(Bf16Matrix::from_output(da, e * r, k)),
                Some(Bf16Matrix::from_output(db, n, e * r)),
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
