//! Host side of the gated-MLP activation kernels (`kernels-gpu/src/kernels/moe.rs`): SwiGLU
//! with DeepSeek-V4's optional clamp limit, forward and backward (SPEC §6).

use cudarc::driver::CudaSlice;
use kernels_gpu::shared::names;
use kernels_gpu::shared::params::SwigluParams;

use super::{MIN_CC, check_len};
use crate::device::{Gpu, alloc_poisoned};
use crate::error::{Error, Result};
use crate::launch::{LaunchSpec, addr, addr_mut};

/// Threads per block.
const THREADS: u32 = 256;
/// bf16 elements each thread moves per step (one 16-byte vector).
const VEC: usize = 8;

/// A 1-D grid covering `vectors` one-per-thread, capped at 32 blocks per SM (grid-stride loops
/// cover the rest).
fn grid(gpu: &Gpu, vectors: usize) -> u32 {
    let max = gpu.limits().sm_count.max(1) as u64 * 32;
    (vectors as u64).div_ceil(u64::from(THREADS)).clamp(1, max) as u32
}

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
    let (clamp, limit) = check_args(rows, width, limit)?;
    check_len("gu", gu, rows * 2 * width)?;
    let mut h = alloc_poisoned::<u16>(gpu, (rows * width).max(1), 0xFF)?;
    if rows == 0 {
        return Ok(h);
    }
    let params = SwigluParams {
        gu_addr: addr(gpu, gu),
        h_addr: addr_mut(gpu, &mut h),
        d_gu_addr: 0,
        rows: rows as u64,
        width: width as u32,
        clamp,
        limit,
        _pad: 0,
    };
    check_aligned("gu", params.gu_addr)?;
    check_aligned("h", params.h_addr)?;
    let spec = LaunchSpec {
        name: names::SWIGLU_FWD,
        threads: THREADS,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    // SAFETY: the contract of `mxmoe_swiglu_fwd_bf16`: 1-D grid and blocks; `width` is a positive
    // multiple of 8 and the limit finite and positive when clamping (`check_args`); `gu` holds
    // `rows·2·width` bf16 (`check_len`) and `h` was just allocated with `rows·width`; both
    // addresses are 16-byte aligned (checked above); the buffers outlive the launch in stream
    // order (they are freed on the same stream).
    unsafe { gpu.launch(&spec, (grid(gpu, rows * width / VEC), 1, 1), params)? };
    Ok(h)
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
    let (clamp, limit) = check_args(rows, width, limit)?;
    check_len("gu", gu, rows * 2 * width)?;
    check_len("dh", dh, rows * width)?;
    let mut d_gu = alloc_poisoned::<u16>(gpu, (rows * 2 * width).max(1), 0xFF)?;
    if rows == 0 {
        return Ok(d_gu);
    }
    let params = SwigluParams {
        gu_addr: addr(gpu, gu),
        h_addr: addr(gpu, dh),
        d_gu_addr: addr_mut(gpu, &mut d_gu),
        rows: rows as u64,
        width: width as u32,
        clamp,
        limit,
        _pad: 0,
    };
    check_aligned("gu", params.gu_addr)?;
    check_aligned("dh", params.h_addr)?;
    check_aligned("d_gu", params.d_gu_addr)?;
    let spec = LaunchSpec {
        name: names::SWIGLU_BWD,
        threads: THREADS,
        dynamic_smem_bytes: 0,
        min_cc: MIN_CC,
    };
    // SAFETY: the contract of `mxmoe_swiglu_bwd_bf16`: 1-D grid and blocks; `width` and the
    // limit as checked by `check_args`; `gu` holds `rows·2·width` and `dh` `rows·width` bf16
    // (`check_len`); `d_gu` was just allocated with `rows·2·width`, so it overlaps neither input;
    // all three addresses are 16-byte aligned (checked above); the buffers outlive the launch in
    // stream order.
    unsafe { gpu.launch(&spec, (grid(gpu, rows * width / VEC), 1, 1), params)? };
    Ok(d_gu)
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
