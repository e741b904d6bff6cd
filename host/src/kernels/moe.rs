//! Host side of the gated-MLP activation kernels (`kernels-gpu/src/kernels/moe.rs`): SwiGLU
//! with DeepSeek-V4's optional clamp limit or gpt-oss's activation, split or interleaved
//! gate/up columns, forward and backward (SPEC §6, `GPT_OSS.md` §1).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::GluParams;

use super::{check_aligned, check_len, grid_stride_blocks, spec};
use crate::activation::{Activation, GateUpLayout};
use crate::device::{Gpu, alloc_output};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Threads per block.
const THREADS: u32 = 256;
/// bf16 elements each thread moves per step (one 16-byte vector).
const VEC: usize = 8;

/// Checks the activation's shape and parameters: `width` (the expert intermediate size `I`) a
/// positive multiple of 8 (the kernels move 8-unit vectors), `rows·2·width` representable, and
/// the activation's `α` and limit ([`Activation::check`]). Returns the kernels' parameters
/// (addresses, rows and width still to fill).
fn check_args(
    rows: usize,
    width: usize,
    activation: Activation,
    layout: GateUpLayout,
) -> Result<GluParams> {
    if width == 0 || !width.is_multiple_of(VEC) {
        return Err(Error::InvalidArgument {
            what: "activation width",
            detail: format!(
                "the intermediate size I = {width} must be a positive multiple of {VEC}"
            ),
        });
    }
    if rows.checked_mul(2 * width).is_none() {
        return Err(Error::InvalidArgument {
            what: "activation rows",
            detail: format!("{rows} rows of {} elements overflow", 2 * width),
        });
    }
    activation.check()?;
    Ok(activation.glu_params(layout))
}

/// Forward activation: `h [rows, width]` from `gu [rows, 2·width]` (bf16), per unit
/// `h = act(gate, up)` with the gate and up columns of `layout` (see [`crate::activation`] and
/// `kernels_gpu::shared::glu`). f32 math, `h` rounded to bf16 once.
///
/// Errors: `width` not a positive multiple of 8, bad activation parameters, a `gu` shorter than
/// `rows·2·width`.
pub(crate) fn glu_fwd(
    gpu: &Gpu,
    gu: &CudaSlice<u16>,
    rows: usize,
    width: usize,
    act: (Activation, GateUpLayout),
) -> Result<CudaSlice<u16>> {
    glu(gpu, gu, None, rows, width, act)
}

/// Backward activation: `d_gu [rows, 2·width]` (bf16; gate and up gradients in `layout`'s
/// columns) from the forward's input `gu` and the output gradient `dh [rows, width]`, the clamp
/// masks at exactly `±L` as the activation's boundary says. f32 math, each element rounded to
/// bf16 once.
///
/// Errors as [`glu_fwd`], plus a `dh` shorter than `rows·width`.
pub(crate) fn glu_bwd(
    gpu: &Gpu,
    gu: &CudaSlice<u16>,
    dh: &CudaSlice<u16>,
    rows: usize,
    width: usize,
    act: (Activation, GateUpLayout),
) -> Result<CudaSlice<u16>> {
    glu(gpu, gu, Some(dh), rows, width, act)
}

/// Both directions: the forward without `dh` (output `h [rows, width]`), the backward with it
/// (output `d_gu [rows, 2·width]`).
fn glu(
    gpu: &Gpu,
    gu: &CudaSlice<u16>,
    dh: Option<&CudaSlice<u16>>,
    rows: usize,
    width: usize,
    (activation, layout): (Activation, GateUpLayout),
) -> Result<CudaSlice<u16>> {
    let shape = check_args(rows, width, activation, layout)?;
    check_len("gu", gu, rows * 2 * width)?;
    if let Some(dh) = dh {
        check_len("dh", dh, rows * width)?;
    }
    let (name, out_elems) = match dh {
        None => (names::GLU_FWD, rows * width),
        Some(_) => (names::GLU_BWD, rows * 2 * width),
    };
    let mut out = alloc_output::<u16>(gpu, out_elems.max(1))?;
    if rows == 0 {
        return Ok(out);
    }
    let out_addr = addr_mut(gpu, &mut out);
    // The forward writes `h` through `h_addr`; the backward reads `dh` there and writes `d_gu`.
    let (h_addr, d_gu_addr) = match dh {
        None => (out_addr, 0),
        Some(dh) => (addr(gpu, dh), out_addr),
    };
    let params = GluParams {
        gu_addr: addr(gpu, gu),
        h_addr,
        d_gu_addr,
        rows: rows as u64,
        width: width as u32,
        ..shape
    };
    check_aligned("gu", params.gu_addr)?;
    check_aligned(if dh.is_some() { "dh" } else { "h" }, params.h_addr)?;
    if dh.is_some() {
        check_aligned("d_gu", params.d_gu_addr)?;
    }
    let grid = grid_stride_blocks(gpu, (rows * width / VEC) as u64, THREADS, 32);
    // SAFETY: the contracts of `mxmoe_glu_fwd_bf16` and `mxmoe_glu_bwd_bf16`: 1-D grid and
    // blocks; `width` is a positive multiple of 8, `alpha` finite and positive and the limit
    // finite and positive when clamping (`check_args`); `gu` holds `rows·2·width` bf16 and `dh`
    // (backward) `rows·width` (`check_len`); the output was just allocated with `rows·width`
    // (`h`) or `rows·2·width` (`d_gu`) elements, so it overlaps no input; every address is
    // 16-byte aligned (checked above); the buffers outlive the launch in stream order (they are
    // freed on the same stream).
    unsafe { gpu.launch(&spec(name, THREADS, 0), (grid, 1, 1), params)? };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::ClampBoundary;

    #[test]
    fn arguments_are_validated() {
        let swiglu = |limit| Activation::SwiGlu { limit };
        let split = GateUpLayout::Split;
        assert_eq!(check_args(4, 8, swiglu(None), split).unwrap().clamp, 0);
        let p = check_args(0, 256, swiglu(Some(10.0)), split).unwrap();
        assert_eq!((p.clamp, p.limit), (1, 10.0));
        for width in [0, 4, 12] {
            assert!(matches!(
                check_args(4, width, swiglu(None), split),
                Err(Error::InvalidArgument {
                    what: "activation width",
                    ..
                })
            ));
        }
        for lim in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                check_args(4, 8, swiglu(Some(lim)), split),
                Err(Error::InvalidArgument { what: "limit", .. })
            ));
            let bad_alpha = Activation::GptOss {
                alpha: lim,
                limit: 7.0,
                boundary: ClampBoundary::Strict,
            };
            assert!(matches!(
                check_args(4, 8, bad_alpha, GateUpLayout::Interleaved),
                Err(Error::InvalidArgument { what: "alpha", .. })
            ));
        }
        assert!(matches!(
            check_args(usize::MAX / 2, 8, swiglu(None), split),
            Err(Error::InvalidArgument {
                what: "activation rows",
                ..
            })
        ));
        assert!(check_aligned("x", 256).is_ok());
        assert!(check_aligned("x", 258).is_err());
    }
}
