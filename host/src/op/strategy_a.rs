//! Strategy A (`SelectiveDequant`) for MXFP4 weights: dequantize only the active experts into a
//! compact bf16 buffer, gather their LoRA blocks, run the bf16 kernels on the compact problem,
//! and scatter dA/dB back to full size.

use cudarc::driver::CudaSlice;

use super::core::Resolved;
use super::{ExpertWeights, Grads};
use crate::buffers::{Bf16Matrix, DenseExperts, LoraWeights};
use crate::device::{Gpu, alloc_filled, alloc_output, upload};
use crate::error::{Error, Result};
use crate::kernels::eltwise::{self, ExpertMap};
use crate::kernels::gemm::RoutingView;
use crate::routing::DeviceRouting;

/// Strategy A's compact state: the active experts, their offsets, the gathered LoRA and
/// (with [`DequantBuffer::Keep`](super::DequantBuffer::Keep)) the dequantized weights.
pub(super) struct Compact {
    /// The active experts (host-checked, `< E`), on the host and the device.
    pub(super) active: ExpertMap,
    /// u32 `[active]` inclusive row ends of the active experts (the routing's own offsets when
    /// every expert is active).
    pub(super) offsets: CudaSlice<u32>,
    /// The active experts' LoRA blocks (`None` when every expert is active: the full LoRA).
    pub(super) lora: Option<LoraWeights>,
    /// The dequantized active experts (`None` after forward with `DequantBuffer::Recompute`).
    pub(super) weights: Option<DenseExperts>,
    /// The active experts' bias rows `[active, N]` (`None` without a bias or when every expert
    /// is active: the full bias).
    pub(super) bias: Option<CudaSlice<u16>>,
}

impl Compact {
    /// Strategy A's setup: active experts (one read-back of the offsets), compact offsets,
    /// dequantized active experts, and — unless every expert is active — the gathered LoRA.
    pub(super) fn build(
        gpu: &Gpu,
        w: ExpertWeights<'_>,
        lora: Option<&LoraWeights>,
        bias: Option<&Bf16Matrix>,
        routing: &DeviceRouting,
    ) -> Result<Self> {
        let offsets = routing.host_offsets(gpu)?;
        let active = active_from_offsets(&offsets);
        let all = active.len() == offsets.len();
        let compact_offsets: Vec<u32> = active.iter().map(|&e| offsets[e as usize]).collect();
        let active_map = ExpertMap::new(gpu, &active, w.shape().0)?;
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
        let lora = match lora {
            Some(lora) if !all => Some(gather_lora(gpu, lora, &active_map)?),
            _ => None,
        };
        let bias = match bias {
            Some(b) if !all => {
                let mut out = alloc_output::<u16>(gpu, active.len().max(1) * b.cols())?;
                eltwise::gather_blocks(
                    gpu,
                    b.data(),
                    b.rows(),
                    b.cols(),
                    &mut out,
                    &active_map,
                    1,
                    true,
                )?;
                Some(out)
            }
            _ => None,
        };
        Ok(Compact {
            active: active_map,
            offsets: offsets_dev,
            lora,
            weights: Some(weights),
            bias,
        })
    }

    /// What the kernels see: the compact weights (`weights`, kept or dequantized again), the
    /// compact LoRA and bias (or the full ones) and the routing with the compact offsets.
    pub(super) fn resolve<'s>(
        &'s self,
        weights: &'s DenseExperts,
        lora: Option<&'s LoraWeights>,
        bias: Option<&'s Bf16Matrix>,
        routing: &'s DeviceRouting,
    ) -> Result<Resolved<'s>> {
        Ok(Resolved {
            weights: ExpertWeights::Bf16(weights),
            lora: self.lora.as_ref().or(lora),
            bias: match bias {
                Some(full) => Some(self.bias.as_ref().unwrap_or(full.data())),
                None => None,
            },
            routing: RoutingView::compact(routing.view(), &self.offsets, self.active.len())?,
        })
    }

    /// Scatters the compact LoRA gradients of `grads` back to full size, `dA [E·r, K]` and
    /// `dB [N, E·r]` (zeros for inactive experts). Nothing to do without a gathered LoRA.
    pub(super) fn scatter_grads(
        &self,
        gpu: &Gpu,
        full_lora: Option<&LoraWeights>,
        (e, n): (usize, usize),
        grads: &mut Grads,
    ) -> Result<()> {
        let (Some(lora), Some(_)) = (full_lora, &self.lora) else {
            return Ok(());
        };
        let r = lora.rank;
        let k = lora.a.cols();
        if let Some(da) = grads.da.as_mut() {
            let mut full = alloc_filled::<u16>(gpu, e * r * k, 0)?;
            eltwise::scatter_blocks(gpu, &mut full, e * r, k, da.data(), &self.active, r, true)?;
            *da = Bf16Matrix::from_output(full, e * r, k);
        }
        if let Some(db) = grads.db.as_mut() {
            let mut full = alloc_filled::<u16>(gpu, n * e * r, 0)?;
            eltwise::scatter_blocks(gpu, &mut full, n, e * r, db.data(), &self.active, r, false)?;
            *db = Bf16Matrix::from_output(full, n, e * r);
        }
        Ok(())
    }
}

/// Sorted experts that own at least one row, from the inclusive offsets (expert `e`'s rows are
/// `offsets[e - 1]..offsets[e]`). `Auto`'s host rule counts them; the gate kernel counts the
/// same ranges on the device.
pub(super) fn active_ids(offsets: &[u32]) -> impl Iterator<Item = u32> + '_ {
    offsets
        .iter()
        .enumerate()
        .filter(|&(e, &end)| end > if e == 0 { 0 } else { offsets[e - 1] })
        .map(|(e, _)| e as u32)
}

fn active_from_offsets(offsets: &[u32]) -> Vec<u32> {
    active_ids(offsets).collect()
}

/// The active experts of a routing (the offsets read back once per routing:
/// [`DeviceRouting::host_offsets`]).
pub fn active_experts(gpu: &Gpu, routing: &DeviceRouting) -> Result<Vec<u32>> {
    Ok(active_from_offsets(&routing.host_offsets(gpu)?))
}

fn download_clone(gpu: &Gpu, buf: &CudaSlice<u32>) -> Result<CudaSlice<u32>> {
    gpu.stream()
        .clone_dtod(buf)
        .map_err(Error::driver("copying device memory"))
}

/// Dequantizes the listed experts (MXFP4 or NVFP4 weights) into a compact `[len, N, K]` bf16
/// buffer (at least one expert's worth is allocated so an empty list still yields a valid
/// buffer). Errors: [`Error::InvalidArgument`] for bf16 weights (nothing to dequantize).
pub(super) fn dequant_active(
    gpu: &Gpu,
    w: ExpertWeights<'_>,
    active: &[u32],
) -> Result<DenseExperts> {
    let (experts, n, k) = w.shape();
    let ids: &[u32] = if active.is_empty() { &[0] } else { active };
    let data = match w {
        ExpertWeights::Mxfp4(m) => crate::kernels::dequant::dequant_mxfp4_bf16(
            gpu,
            m.packed(),
            m.scales(),
            experts,
            n,
            k,
            ids,
        )?,
        ExpertWeights::Nvfp4(v) => crate::kernels::dequant::dequant_nvfp4_bf16(
            gpu,
            v.packed(),
            v.scales(),
            v.tensor_scales(),
            v.groups(),
            experts,
            n,
            k,
            ids,
        )?,
        ExpertWeights::Bf16(_) => {
            return Err(Error::InvalidArgument {
                what: "Strategy A",
                detail: "bf16 weights have nothing to dequantize".into(),
            });
        }
    };
    Ok(DenseExperts::from_output(data, ids.len(), n, k))
}

/// Gathers the active experts' LoRA rows of `A` and columns of `B`.
fn gather_lora(gpu: &Gpu, lora: &LoraWeights, active: &ExpertMap) -> Result<LoraWeights> {
    let r = lora.rank;
    let experts = active.num_experts();
    let count = active.len();
    let (k, n) = (lora.a.cols(), lora.b.rows());
    let blocks = count.max(1);
    let mut a = alloc_output::<u16>(gpu, blocks * r * k)?;
    let mut b = alloc_output::<u16>(gpu, n * blocks * r)?;
    eltwise::gather_blocks(gpu, lora.a.data(), experts * r, k, &mut a, active, r, true)?;
    eltwise::gather_blocks(gpu, lora.b.data(), n, experts * r, &mut b, active, r, false)?;
    Ok(LoraWeights {
        a: Bf16Matrix::from_output(a, count * r, k),
        b: Bf16Matrix::from_output(b, n, count * r),
        rank: r,
        scaling: lora.scaling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_experts_come_from_nonempty_offset_ranges() {
        assert_eq!(active_from_offsets(&[0, 3, 3, 7, 7]), vec![1, 3]);
        assert_eq!(active_from_offsets(&[2]), vec![0]);
        assert!(active_from_offsets(&[0, 0]).is_empty());
        assert!(active_from_offsets(&[]).is_empty());
        assert_eq!(active_ids(&[0, 3, 3, 7, 7]).count(), 2);
    }
}
