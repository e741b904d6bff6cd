//! Exported kernel entry-point names. The host looks functions up only through these constants,
//! and `cargo xtask ptx-report` checks that each one is an `.entry` of the built PTX.

/// Probe: special registers (`%tid`, `%ctaid`, `%laneid`, warp id) written per thread.
pub const PROBE_SREG: &str = "mxmoe_probe_sreg";
/// Probe: `cp.async` 16-byte copies (with zero-fill) global → shared → global.
pub const PROBE_CP_ASYNC: &str = "mxmoe_probe_cp_async";
/// Probe: one m16n8k16 bf16 MMA whose fragments come from `ldmatrix` in all layouts.
pub const PROBE_MMA: &str = "mxmoe_probe_mma";
/// Probe: f32 → bf16x2 conversion and bf16x2 multiply.
pub const PROBE_CVT: &str = "mxmoe_probe_cvt";
/// MXFP4 → bf16 dequantization of a list of experts.
pub const DEQUANT_MXFP4: &str = "mxmoe_dequant_mxfp4_bf16";

/// Every entry point the host may look up.
pub const ALL: &[&str] = &[PROBE_SREG, PROBE_CP_ASYNC, PROBE_MMA, PROBE_CVT, DEQUANT_MXFP4];
