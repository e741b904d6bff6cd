//! Host side of the gated-MLP activation kernels (`kernels-gpu/src/kernels/moe.rs`): SwiGLU
//! with DeepSeek-V4's optional clamp limit, forward and backward (SPEC §6).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::SwigluParams;

use super::{check_len, grid_stride_blocks, spec};
use crate::device::{Gpu, alloc_poisoned};
use crate::error::{Error, Result};
use crate::launch::{addr, addr_mut};

/// Threads per block.
const THREADS: u32 = 256;
/// bf16 elements each thread moves per step (one 16-byte vector).
const VEC: usize = 8;

/// Checks the activation's shape and limit: `width` (the expert intermediate size `I`) a
/// positive multiple of 8 (the kernels move 8-element vectors) and, when given, a finite positive
/// limit. Returns the `(clamp, limit)` pair of the parameter struct.
fn check_args(rows: usize, width: usize, limit: Option<f32>) -> Result<(u32, f32)> {
    if width == 0 || !width.is_multiple_of(VEC) {
        return Err(Error::InvalidArgument {
            what: "SwiGLU width",
            detail: format!(
                "the intermediate size I = {width} must be a positive multiple of {VEC}"
            ),
        });
    }
    if rows.checked_mul(2 * width).is_none() {
        return Err(Error::InvalidArgument {
            what: "SwiGLU rows",
            detail: format!("{rows} rows of {} elements overflow", 2 * width),
        });
    }
    match limit {
        None => Ok((0, 0.0)),
        Some(lim) if lim.is_finite() && lim > 0.0 => Ok((1, lim)),
        Some(lim) => Err(Error::InvalidArgument {
            what: "SwiGLU limit",
            detail: format!("must be finite and positive, got {lim}"),
        }),
    }
}

/// Checks that a device address is 16-byte aligned (the kernels' vector accesses need it;
/// cudarc allocations are 256-byte aligned, so this fails only for unusual buffers).
fn check_aligned(tensor: &'static str, address: u64) -> Result<()> {
    if !address.is_multiple_of(16) {
        return Err(Error::InvalidArgument {
            what: tensor,
            detail: format!("device address {address:#x} is not 16-byte aligned"),
        });
    }
    Ok(())
}

/// Forward activation: `h [rows, width] = silu(g)·u` with `g = min(gate, lim)`,
/// `u = clamp(up, −lim, lim)` (no clamp without a limit), where `gate` and `up` are the first and
/// second halves of each row of `gu [rows, 2·width]` (bf16). f32 math, `h` rounded to bf16 once.
///
/// Errors: `width` not a positive multiple of 8, a non-finite or non-positive limit, a `gu`
/// shorter than `rows·2·width`.
pub(crate) fn swiglu_fwd(
    gpu: &Gpu,
    gu: &CudaSlice<u16>,
    rows: usize,
    width: usize,
    limit: Option<f32>,
) -> Result<CudaSlice<u16>> {
    swiglu(gpu, gu, None, rows, width, limit)
}

/// Backward activation: `d_gu [rows, 2·width]` (bf16; gate gradients in the first half of each
/// row, up gradients in the second) from the forward's input `gu` and the output gradient
/// `dh [rows, width]`. `d_gate = dh·u·σ(g)·(1 + g·(1 − σ(g)))`, zero where `gate > lim`;
/// `d_up = dh·silu(g)`, zero where `|up| > lim` (the boundary passes the gradient, as
/// `torch.clamp`'s backward does). f32 math, each element rounded to bf16 once.
///
/// Errors as [`swiglu_fwd`], plus a `dh` shorter than `rows·width`.
pub(crate) fn swiglu_bwd(
    gpu: &Gpu,
    gu: &CudaSlice<u16>,
    dh: &CudaSlice<u16>,
    rows: usize,
    width: usize,
    limit: Option<f32>,
) -> Result<CudaSlice<u16>> {
    swiglu(gpu, gu, Some(dh), rows, width, limit)
}

/// Both directions: the forward without `dh` (output `h [rows, width]`), the backward with it
/// (output `d_gu [rows, 2·width]`).
fn swiglu(
    gpu: &Gpu,
    gu: &CudaSlice<u16>,
    dh: Option<&CudaSlice<u16>>,
    rows: usize,
    width: usize,
    limit: Option<f32>,
) -> Result<CudaSlice<u16>> {
    let (clamp, limit) = check_args(rows, width, limit)?;
    check_len("gu", gu, rows * 2 * width)?;
    if let Some(dh) = dh {
        check_len("dh", dh, rows * width)?;
    }
    let (name, out_elems) = match dh {
        None => (names::SWIGLU_FWD, rows * width),
        Some(_) => (names::SWIGLU_BWD, rows * 2 * width),
    };
    let mut out = alloc_poisoned::<u16>(gpu, out_elems.max(1), 0xFF)?;
    if rows == 0 {
        return Ok(out);
    }
    let out_addr = addr_mut(gpu, &mut out);
    // The forward writes `h` through `h_addr`; the backward reads `dh` there and writes `d_gu`.
    let (h_addr, d_gu_addr) = match dh {
        None => (out_addr, 0),
        Some(dh) => (addr(gpu, dh), out_addr),
    };
    let params = SwigluParams {
        gu_addr: addr(gpu, gu),
        h_addr,
        d_gu_addr,
        rows: rows as u64,
        width: width as u32,
        clamp,
        limit,
        _pad: 0,
    };
    check_aligned("gu", params.gu_addr)?;
    check_aligned(if dh.is_some() { "dh" } else { "h" }, params.h_addr)?;
    if dh.is_some() {
        check_aligned("d_gu", params.d_gu_addr)?;
    }
    let grid = grid_stride_blocks(gpu, (rows * width / VEC) as u64, THREADS, 32);
    // SAFETY: the contracts of `mxmoe_swiglu_fwd_bf16` and `mxmoe_swiglu_bwd_bf16`: 1-D grid and
    // blocks; `width` is a positive multiple of 8 and the limit finite and positive when
    // clamping (`check_args`); `gu` holds `rows·2·width` bf16 and `dh` (backward) `rows·width`
    // (`check_len`); the output was just allocated with `rows·width` (`h`) or `rows·2·width`
    // (`d_gu`) elements, so it overlaps no input; every address is 16-byte aligned (checked
    // above); the buffers outlive the launch in stream order (they are freed on the same stream).
    unsafe { gpu.launch(&spec(name, THREADS, 0), (grid, 1, 1), params)? };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_validated() {
        assert_eq!(check_args(4, 8, None).unwrap(), (0, 0.0));
        assert_eq!(check_args(0, 256, Some(10.0)).unwrap(), (1, 10.0));
        for width in [0, 4, 12] {
            assert!(matches!(
                check_args(4, width, None),
                Err(Error::InvalidArgument {
                    what: "SwiGLU width",
                    ..
                })
            ));
        }
        for lim in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                check_args(4, 8, Some(lim)),
                Err(Error::InvalidArgument {
                    what: "SwiGLU limit",
                    ..
                })
            ));
        }
        assert!(matches!(
            check_args(usize::MAX / 2, 8, None),
            Err(Error::InvalidArgument {
                what: "SwiGLU rows",
                ..
            })
        ));
        assert!(check_aligned("x", 256).is_ok());
        assert!(check_aligned("x", 258).is_err());
    }
}
