//! `#[repr(C)]` kernel parameter structs, passed by value to the entry points. Device addresses
//! are `u64`; sizes that can exceed 2^31 are `u64`. The `const` blocks pin sizes and offsets so a
//! layout drift fails both builds.

use core::mem::{offset_of, size_of};

/// Parameters of the probe kernels: one input and one output buffer plus a count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeParams {
    /// Input buffer address.
    pub in_addr: u64,
    /// Output buffer address.
    pub out_addr: u64,
    /// Meaning depends on the probe (elements or bytes valid in the input).
    pub count: u32,
    /// Padding to 8-byte alignment; must be 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<ProbeParams>() == 24);
    assert!(offset_of!(ProbeParams, count) == 16);
};

/// Parameters of [`crate::shared::names::DEQUANT_MXFP4`].
///
/// Output `out[s, n, k]` (bf16, `[num_selected, n, k]` row-major) = dequantized
/// `W_store[experts[s], n, k]` from `packed [E, n, k/2]` and `scales [E, n, k/32]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DequantParams {
    /// `u8 [E, n, k/2]`.
    pub packed_addr: u64,
    /// `u8 [E, n, k/32]`.
    pub scales_addr: u64,
    /// `u32 [num_selected]`: the experts to dequantize, each `< num_experts`.
    pub experts_addr: u64,
    /// `bf16 [num_selected, n, k]`.
    pub out_addr: u64,
    /// Output features per expert.
    pub n: u64,
    /// Reduction dimension (multiple of 32).
    pub k: u64,
    /// Entries in `experts`.
    pub num_selected: u32,
    /// Experts in `packed`/`scales` (bounds every entry of `experts`).
    pub num_experts: u32,
}

const _: () = {
    assert!(size_of::<DequantParams>() == 56);
    assert!(offset_of!(DequantParams, n) == 32);
    assert!(offset_of!(DequantParams, num_selected) == 48);
};
