//! One function per GPU kernel: the only place that calls [`Gpu::launch`](crate::device::Gpu).
//!
//! Each function validates its inputs (typed errors, never a device fault), allocates its
//! outputs, fills the kernel's parameter struct and launches with a `// SAFETY:` note answering
//! the launch contract documented on the kernel's entry point in `kernels-gpu/src/kernels/`.
//!
//! Visibility is part of the contract. Public are only the wrappers that check everything the
//! kernel reads and writes from their own arguments: [`probes`] (they allocate their buffers)
//! and [`dequant`] (lengths and expert ids checked with overflow-checked arithmetic). The
//! wrappers whose soundness rests on where their inputs came from — routing arrays the routing
//! kernels produced ([`gemm::RoutingView`]), expert maps checked on the host
//! ([`eltwise::ExpertMap`]), shapes the op layer validated — are `pub(crate)`, so no safe public
//! function launches a kernel on unchecked buffers. (`crate::layering` checks this split.)

pub mod dequant;
pub(crate) mod eltwise;
pub(crate) mod gemm;
pub(crate) mod moe;
pub mod probes;
pub(crate) mod routing;

use cudarc::driver::CudaSlice;

use crate::error::{Error, Result};

/// Hopper (sm_90) is the minimum for every mxmoe kernel (the module is built for sm_90).
pub const MIN_CC: (i32, i32) = (9, 0);

/// Checks that a device buffer holds at least `needed` elements.
pub(crate) fn check_len<T>(tensor: &'static str, buf: &CudaSlice<T>, needed: usize) -> Result<()> {
    if buf.len() < needed {
        return Err(Error::Shape {
            tensor,
            expected: format!("at least {needed} elements"),
            actual: format!("{} elements", buf.len()),
        });
    }
    Ok(())
}
