//! Kernel entry points: thin `extern "ptx-kernel"` functions that read their coordinates and
//! parameter struct and call bodies built from `tile/`. Names come from `shared::names`.

mod dequant;
mod eltwise;
mod gemm;
mod moe;
mod probes;
mod routing;
