//! The audited hardware surface: every `asm!` in mxmoe lives in this module.
//!
//! Each wrapper is `#[inline(always)]`, emits one PTX instruction (or one fixed, documented
//! sequence) and carries a doc comment with the PTX ISA section, the minimum PTX version and SM
//! target, the CUDA C equivalent, and a `# Safety` paragraph. Names follow the PTX mnemonic with
//! dots as underscores, dropping `.sync.aligned`.
//!
//! | wrapper | instruction |
//! |---|---|
//! | [`sreg::tid_x`], [`sreg::ctaid_x`], [`sreg::nctaid_x`], [`sreg::laneid`] | `mov.u32 %r, %tid.x` … |
//! | [`barrier::bar_sync_0`] | `bar.sync 0` |
//! | [`smem::SharedAddr::from_generic`] | `cvta.to.shared.u64` |
//! | [`smem::ld_shared_u32`], [`smem::st_shared_u32`], [`smem::ld_shared_v4_u32`], [`smem::st_shared_v4_u32`], [`smem::ld_shared_u8`], [`smem::st_shared_u16`] | `ld.shared` / `st.shared` |
//! | [`cp_async::cp_async_cg_shared_global_16`], [`cp_async::cp_async_ca_shared_global_4`] | `cp.async.{cg,ca}.shared.global [d], [s], {16,4}, src_size` |
//! | [`cp_async::cp_async_commit_group`] | `cp.async.commit_group` |
//! | [`cp_async::cp_async_wait_group`] | `cp.async.wait_group N` |
//! | [`ldmatrix::ldmatrix_x4_m8n8_shared_b16`], [`ldmatrix::ldmatrix_x4_trans_m8n8_shared_b16`], [`ldmatrix::ldmatrix_x2_m8n8_shared_b16`], [`ldmatrix::ldmatrix_x2_trans_m8n8_shared_b16`] | `ldmatrix.sync.aligned.m8n8.x{2,4}{.trans}.shared.b16` |
//! | [`ldmatrix::stmatrix_x4_trans_m8n8_shared_b16`] | `stmatrix.sync.aligned.m8n8.x4.trans.shared.b16` |
//! | [`mma::mma_m16n8k16_row_col_f32_bf16_bf16_f32`] | `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` |
//! | [`cvt::cvt_rn_bf16x2_f32`] | `cvt.rn.bf16x2.f32` |
//! | [`cvt::mul_rn_bf16x2`] | `mul.rn.bf16x2` (sm_90a); `fma.rn.bf16x2 d, a, b, -0.0` below SM 9.0 |
//! | [`cvt::prmt_b32`] | `prmt.b32` (byte extraction) |
//! | [`warp::shfl_sync_up_b32`], [`warp::shfl_sync_idx_b32`], [`warp::shfl_sync_bfly_b32`] | `shfl.sync.{up,idx,bfly}.b32` |
//! | [`warp::vote_sync_ballot_b32`], [`warp::match_any_sync_b32`], [`warp::lanemask_lt`] | `vote.sync.ballot.b32`, `match.any.sync.b32`, `%lanemask_lt` |
//! | [`warp::atom_shared_add_u32`], [`warp::bar_warp_sync`] | `atom.shared.add.u32`, `bar.warp.sync` |
//! | [`wgmma::wgmma_m64n128k16_f32_bf16_rs`] (and n16, n32, n64) | `wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16` (A in registers, sm_90a) |
//! | [`wgmma::wgmma_m64n128k16_f32_bf16_ss`] (and n16, n32, n64) | the same with A in shared memory (descriptor, `imm-trans-a`) |
//! | [`wgmma::wgmma_fence`], [`wgmma::wgmma_commit_group`], [`wgmma::wgmma_wait_group`] | `wgmma.{fence,commit_group,wait_group}.sync.aligned` |
//! | [`wgmma::fence_proxy_async_shared_cta`] | `fence.proxy.async.shared::cta` |
//! | [`mbarrier::mbarrier_init`], [`mbarrier::mbarrier_arrive`], [`mbarrier::mbarrier_try_wait_parity`] | `mbarrier.{init,arrive,try_wait.parity}.shared::cta.b64` |
//! | [`mbarrier::cp_async_mbarrier_arrive_noinc`] | `cp.async.mbarrier.arrive.noinc.shared::cta.b64` |
//! | [`mbarrier::bar_sync_named`] | `bar.sync id, count` |
//! | [`regs::setmaxnreg_dec`], [`regs::setmaxnreg_inc`] | `setmaxnreg.{dec,inc}.sync.aligned.u32 N` (sm_90a) |
//! | [`tma::cp_async_bulk_tensor_3d_g2s`] | `cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes` (sm_90a) |
//! | [`tma::mbarrier_expect_tx`] | `mbarrier.expect_tx.relaxed.cta.shared::cta.b64` |
//! | [`tma::fence_proxy_tensormap_acquire_sys`] | `fence.proxy.tensormap::generic.acquire.sys [m], 128` (PTX 8.3: the `sm_90a` module's version) |
//! | [`regs::declare_launch_bounds`] | the PTX comment `// mxmoe.launch_bounds T B` (the builder turns it into `.maxntid T, 1, 1` / `.minnctapersm B`) |
//!
//! The Hopper-only wrappers (`wgmma`, `mbarrier`, `tma`, `stmatrix`) exist only in the `sm_90a` build
//! (`cfg(target_feature = "sm_90a")`, which rustc sets from `-C target-cpu=sm_90a`); the portable
//! `sm_80` module is built without them, so it cannot contain an instruction its targets lack.
//!
//! Convergence: `mma.sync.aligned`, `ldmatrix.sync.aligned` and `bar.sync` must be reached by the
//! whole warp (block; `wgmma.*`: the whole warpgroup) under uniform control flow. Callers keep branches around them warp-uniform.

pub mod barrier;
pub mod cp_async;
pub mod cvt;
pub mod ldmatrix;
#[cfg(target_feature = "sm_90a")]
pub mod mbarrier;
pub mod mma;
#[cfg(target_feature = "sm_90a")]
pub mod regs;
pub mod smem;
pub mod sreg;
#[cfg(target_feature = "sm_90a")]
pub mod tma;
pub mod warp;
#[cfg(target_feature = "sm_90a")]
pub mod wgmma;
