//! Planning a call: which tile configuration each grouped GEMM runs with (through the
//! runtime's [`Tuner`](crate::tune::Tuner): forced, cached, timed or the default rule) and
//! which strategy `Auto` picks for MXFP4 and NVFP4 weights.

use kernels_gpu::shared::auto::{self, AutoInputs};
use kernels_gpu::shared::names;
use kernels_gpu::shared::tiles::{BLayout, GEMM_CONFIGS, rank_pad};

use super::{ExpertWeights, Strategy};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::routing::DeviceRouting;
use crate::runtime::Runtime;
use crate::tune::{
    PruneReport, TuneKey, TuneMode, bucket_rows, config_name, default_config, prune,
};

/// What the tuner keys one grouped GEMM by.
#[derive(Clone, Copy, Debug)]
pub(super) struct GemmShape {
    /// The weight layout.
    pub(super) layout: BLayout,
    /// The LoRA rank (0: none).
    pub(super) rank: usize,
    /// Experts.
    pub(super) experts: usize,
    /// The reduction length.
    pub(super) k_red: usize,
    /// The output width.
    pub(super) n_out: usize,
    /// Routed rows.
    pub(super) rows: usize,
}

/// The candidates (`tiles::GEMM_CONFIGS` rows that survive pruning on this device), the prune
/// report and the tuning key of one grouped GEMM.
fn gemm_plan(gpu: &Runtime, g: &GemmShape) -> (Vec<usize>, PruneReport, TuneKey) {
    let kernel = match g.layout {
        BLayout::NkBf16 => "gemm_nk",
        BLayout::KnBf16 => "gemm_kn",
        BLayout::NkMxfp4 => "gemm_nk_mx",
        BLayout::KnMxfp4 => "gemm_kn_mx",
        BLayout::NkNvfp4 => "gemm_nk_nv",
        BLayout::KnNvfp4 => "gemm_kn_nv",
        BLayout::Strided => "gemm_strided",
    };
    // (`Strided` is never a grouped GEMM's weight layout; its registers are looked up as `nk`'s.)
    let names = names::gemm_names(g.layout).unwrap_or(&names::GEMM_NK);
    let r_pad = if g.rank > 0 {
        rank_pad(g.rank as u32)
    } else {
        0
    };
    let (candidates, report) = prune(gpu.limits(), g.layout, r_pad, |i| {
        gpu.function_resources(names[i])
            .ok()
            .map(|r| r.registers.max(0) as u32)
    });
    let key = TuneKey {
        kernel,
        cc: gpu.limits().compute_capability,
        experts: g.experts,
        k: g.k_red,
        n: g.n_out,
        rank: g.rank,
        rows_bucket: bucket_rows(g.rows),
    };
    (candidates, report, key)
}

/// Runs one grouped GEMM through the tuner: prunes `tiles::GEMM_CONFIGS` for this device and
/// layout, then launches the tuner's forced configuration, or the cached, timed (in `Tune` mode)
/// or default one. Returns the row of `GEMM_CONFIGS` that ran.
pub(super) fn tuned_gemm(
    gpu: &Runtime,
    shape: &GemmShape,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<usize> {
    let (candidates, report, key) = gemm_plan(gpu, shape);
    if candidates.is_empty() {
        return Err(Error::NoValidConfig {
            key: key.to_string_key(),
            detail: format!("{report:?}"),
        });
    }
    if let Some(i) = forced_among(gpu.tuner().forced(), &candidates, &key, report)? {
        launch(i)?;
        return Ok(i);
    }
    let fallback = default_config(shape.layout, shape.rows, shape.experts, &candidates);
    let chosen = gpu.tuner().choose(&key, &candidates, fallback, |i| {
        time_median(gpu, || launch(i))
    })?;
    launch(chosen)?;
    Ok(chosen)
}

/// Whether [`tuned_gemm`] would launch this GEMM without timing candidates first (a forced,
/// cached or default configuration, or a single candidate). `Auto`'s on-device decision runs
/// Strategy B's GEMM before the answer is known, on routing that may have every expert emptied,
/// so it must not be timed: it only goes ahead when this holds.
pub(super) fn gemm_config_settled(gpu: &Runtime, g: &GemmShape) -> bool {
    let tuner = gpu.tuner();
    // The usual case answers without pruning, which `tuned_gemm` does again right after.
    if tuner.forced().is_some() || tuner.mode() == TuneMode::Default {
        return true;
    }
    let (candidates, _, key) = gemm_plan(gpu, g);
    candidates.len() <= 1 || tuner.cached(&key).is_some_and(|i| candidates.contains(&i))
}

/// The forced configuration, checked against the candidates that survived pruning: `None` when
/// nothing is forced, an error naming the row and the prune report when it was pruned (a forced
/// row never silently gives way to another).
fn forced_among(
    forced: Option<usize>,
    candidates: &[usize],
    key: &TuneKey,
    report: PruneReport,
) -> Result<Option<usize>> {
    match forced {
        Some(i) if !candidates.contains(&i) => Err(Error::InvalidArgument {
            what: "forced tile configuration",
            detail: format!(
                "{} (row {i} of GEMM_CONFIGS) cannot run {} on this device: pruned ({report:?})",
                GEMM_CONFIGS
                    .get(i)
                    .map_or_else(|| "no such row".into(), config_name),
                key.to_string_key()
            ),
        }),
        other => Ok(other),
    }
}

/// Median of three CUDA-event timings of `f` (after one warm-up run), in milliseconds.
fn time_median(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    f()?;
    let mut times = Vec::with_capacity(3);
    for _ in 0..3 {
        let start = gpu
            .stream()
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(Error::driver("recording a timing event"))?;
        f()?;
        let end = gpu
            .stream()
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(Error::driver("recording a timing event"))?;
        end.synchronize()
            .map_err(Error::driver("waiting for a timing event"))?;
        times.push(
            start
                .elapsed_ms(&end)
                .map_err(Error::driver("reading a timing event"))?,
        );
    }
    times.sort_by(f32::total_cmp);
    Ok(times[1])
}

/// Fewest routed rows per active expert at which [`auto_strategy`] picks Strategy A (small grids).
pub const AUTO_A_MIN_ROWS: usize = auto::AUTO_A_MIN_ROWS as usize;
/// Routed rows per active expert from which [`auto_strategy_nvfp4`] picks Strategy A.
pub const AUTO_NV_A_ROWS: usize = auto::AUTO_NV_A_ROWS as usize;

/// `Auto`'s rule, measured on the H100 (`docs/BENCHMARKS.md`, "Choosing A or B"): Strategy A
/// (selective dequantization) once the active experts average at least 2048 routed rows each,
/// or 256 when the fused GEMM's grid is small (at most four waves of 128×128 output tiles over
/// the device's SMs: B's decode is then not hidden behind other blocks); Strategy B (fused)
/// otherwise — always where the weight stream dominates (few rows per expert). With the `wgmma`
/// kernels B costs ~16 % over the bf16 GEMMs at many rows per expert, so A's fixed
/// dequantization (which runs at a few hundred GB/s) pays off only at large T: on a gpt-oss-20b
/// layer (32 active experts, 512 rows each, N = 5760: a 5760-block grid) B is 26 % faster, while
/// the sparse SPEC shapes (8 experts, N = 1024: 128–512 blocks) favour A from 256 rows. A also
/// needs its transient `active·N·K` bf16 buffer (`transient_per_expert = N·K·2` bytes per active
/// expert) to fit in half the free device memory. `n` is the projection's output width (`N` of
/// `W_store`). The rule is `kernels_gpu::shared::auto::auto_picks_a`, the function the device's
/// gate kernel runs.
pub fn auto_strategy(
    active: usize,
    rows: usize,
    n: usize,
    sm_count: usize,
    transient_per_expert: usize,
    free_bytes: usize,
) -> Strategy {
    pick(
        active as u64,
        &AutoInputs {
            nvfp4: false,
            rows: rows as u64,
            n: n as u64,
            sm_count: sm_count as u64,
            transient_per_expert: transient_per_expert as u64,
            free_bytes: free_bytes as u64,
        },
    )
}

/// `Auto`'s rule for NVFP4 weights, measured on the H100 (`docs/BENCHMARKS.md`, bundle ee85389):
/// the fused NVFP4 decode costs an f32 product per value (MXFP4's is an exact bf16 product per
/// two), so Strategy A pays off from fewer rows than for MXFP4 — from [`AUTO_NV_A_ROWS`] routed
/// rows per active expert on any grid (dense E = 128, T = 4096, 256 rows each: A 1.50 ms vs B
/// 1.84 ms; balanced T = 4096, ~129 rows each: B 2.39 vs A 2.35, within 2 %; T = 256: B 1.4–1.6×
/// faster), when A's transient `active·N·K` bf16 buffer fits in half the free device memory.
/// Strategy B otherwise. The gpt-oss shapes (512 rows per expert) are not measured for NVFP4.
pub fn auto_strategy_nvfp4(
    active: usize,
    rows: usize,
    transient_per_expert: usize,
    free_bytes: usize,
) -> Strategy {
    pick(
        active as u64,
        &AutoInputs {
            nvfp4: true,
            rows: rows as u64,
            n: 0,
            sm_count: 0,
            transient_per_expert: transient_per_expert as u64,
            free_bytes: free_bytes as u64,
        },
    )
}

/// [`auto::auto_picks_a`] as a [`Strategy`].
pub(super) fn pick(active: u64, inputs: &AutoInputs) -> Strategy {
    if auto::auto_picks_a(active, inputs) {
        Strategy::SelectiveDequant
    } else {
        Strategy::Fused
    }
}

/// How a call's path is settled before its kernels run.
pub(super) enum Resolution {
    /// Known on the host.
    Known(Strategy),
    /// `Auto` on a routing whose offsets are not on the host yet: the device decides
    /// (`kernels::routing::auto_gate`) while the host queues Strategy B's forward on the gated
    /// row ends, and reads the answer back while those kernels run.
    OnDevice(AutoInputs),
}

/// The path a call takes: `Fused` for bf16 weights, the requested strategy for MXFP4 and NVFP4
/// weights, and for `Auto` the [`auto_strategy`] rule (NVFP4: [`auto_strategy_nvfp4`]) on the
/// active experts and the free device memory. With fewer than [`AUTO_A_MIN_ROWS`] routed rows no
/// expert can reach A's threshold, so `Auto` takes B without looking at the routing. Otherwise
/// the rule needs the expert offsets: when a call on this routing has read them already, the
/// host decides. Otherwise, when the last call on this problem picked B (or none ran yet) and
/// `speculate()` says Strategy B's forward may run before the answer is known (its GEMM
/// configuration needs no timing), the device does ([`Resolution::OnDevice`]); else the offsets
/// are read back here (one synchronisation, which Strategy A needs anyway). NVFP4 weights whose K is not
/// a multiple of 32 have no fused kernels (their stages take 32-k runs of packed bytes): `Auto`
/// takes A for them and `Fused` is an error.
pub(super) fn resolve_strategy(
    gpu: &Runtime,
    weights: ExpertWeights<'_>,
    requested: Strategy,
    routing: &DeviceRouting,
    speculate: impl FnOnce() -> bool,
) -> Result<Resolution> {
    let l = routing.rows();
    let (nvfp4, n, k) = match (weights, requested) {
        (ExpertWeights::Bf16(_), _) | (ExpertWeights::Mxfp4(_), Strategy::Fused) => {
            return Ok(Resolution::Known(Strategy::Fused));
        }
        (ExpertWeights::Mxfp4(_), Strategy::SelectiveDequant) => {
            return Ok(Resolution::Known(Strategy::SelectiveDequant));
        }
        (ExpertWeights::Mxfp4(_), Strategy::Auto) if l < AUTO_A_MIN_ROWS => {
            return Ok(Resolution::Known(Strategy::Fused));
        }
        (ExpertWeights::Mxfp4(w), Strategy::Auto) => (false, w.shape().n(), w.shape().k()),
        (ExpertWeights::Nvfp4(w), Strategy::Fused) if !w.shape().k().is_multiple_of(32) => {
            return Err(Error::InvalidArgument {
                what: "strategy",
                detail: format!(
                    "the fused NVFP4 kernels need K % 32 == 0 (K is {}); use \"selective\" or \"auto\"",
                    w.shape().k()
                ),
            });
        }
        (ExpertWeights::Nvfp4(_), Strategy::Fused) => {
            return Ok(Resolution::Known(Strategy::Fused));
        }
        (ExpertWeights::Nvfp4(_), Strategy::SelectiveDequant) => {
            return Ok(Resolution::Known(Strategy::SelectiveDequant));
        }
        (ExpertWeights::Nvfp4(w), Strategy::Auto) if !w.shape().k().is_multiple_of(32) => {
            return Ok(Resolution::Known(Strategy::SelectiveDequant));
        }
        (ExpertWeights::Nvfp4(_), Strategy::Auto) if l < AUTO_A_MIN_ROWS => {
            return Ok(Resolution::Known(Strategy::Fused));
        }
        (ExpertWeights::Nvfp4(w), Strategy::Auto) => (true, w.shape().n(), w.shape().k()),
    };
    let (free, _) = gpu.mem_info()?;
    let inputs = AutoInputs {
        nvfp4,
        rows: l as u64,
        n: n as u64,
        sm_count: u64::from(gpu.limits().sm_count),
        transient_per_expert: (n as u64).saturating_mul(k as u64).saturating_mul(2),
        free_bytes: free as u64,
    };
    let key = history_key(&inputs, routing.num_experts());
    let offsets = match routing.cached_host_offsets() {
        Some(o) => o,
        None if !gpu.auto_history().last_picked_a(key) && speculate() => {
            return Ok(Resolution::OnDevice(inputs));
        }
        None => routing.host_offsets(gpu)?,
    };
    let strategy = pick(
        super::strategy_a::active_ids(&offsets).count() as u64,
        &inputs,
    );
    gpu.auto_history()
        .record(key, strategy == Strategy::SelectiveDequant);
    Ok(Resolution::Known(strategy))
}

/// The key of `Auto`'s history (`runtime::AutoHistory`): format, experts, N, K (through the
/// transient bytes per expert) and routed rows.
pub(super) fn history_key(inputs: &AutoInputs, experts: usize) -> [u64; 5] {
    [
        u64::from(inputs.nvfp4),
        experts as u64,
        inputs.n,
        inputs.transient_per_expert,
        inputs.rows,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_configuration_that_was_pruned_is_an_error_naming_it() {
        let key = TuneKey {
            kernel: "gemm_nk_mx",
            cc: (9, 0),
            experts: 8,
            k: 256,
            n: 128,
            rank: 128,
            rows_bucket: 64,
        };
        let report = PruneReport {
            shared_memory: 1,
            ..PruneReport::default()
        };
        assert_eq!(forced_among(None, &[0, 2], &key, report).unwrap(), None);
        assert_eq!(
            forced_among(Some(2), &[0, 2], &key, report).unwrap(),
            Some(2)
        );
        let err = forced_among(Some(1), &[0, 2], &key, report).unwrap_err();
        let Error::InvalidArgument { what, detail } = &err else {
            panic!("expected InvalidArgument, got {err:?}");
        };
        assert_eq!(*what, "forced tile configuration");
        assert!(
            detail.contains(&config_name(&GEMM_CONFIGS[1]))
                && detail.contains("row 1")
                && detail.contains("gemm_nk_mx/sm90/e8/k256/n128/r128/m64")
                && detail.contains("shared_memory: 1"),
            "{detail}"
        );
    }

    #[test]
    fn auto_prefers_fused_for_few_rows_per_expert_and_selective_for_many() {
        let gib = 1usize << 30;
        use Strategy::{Fused, SelectiveDequant};
        // (active experts, routed rows, N, free bytes, expected) on an H100 (132 SMs); the
        // transient buffer of the active experts is `active · 4 MiB`. The SPEC shapes have N = 1024.
        let cases = [
            // Balanced E=256, T=256, top-8: 2048 rows over ~229 experts.
            (229, 2048, 1024, 70 * gib, Fused),
            // Balanced T=4096: ~129 rows per expert.
            (254, 32768, 1024, 70 * gib, Fused),
            // Sparse T=256: 8 experts share 2048 rows (256 each; 128 blocks): A measured 0.36 ms
            // vs B 0.47 ms.
            (8, 2048, 1024, 70 * gib, SelectiveDequant),
            // Sparse T=1024: 1024 rows each (512 blocks): A 0.77 vs B 0.94 ms.
            (8, 8192, 1024, 70 * gib, SelectiveDequant),
            // Sparse: 8 experts share 32768 rows.
            (8, 32768, 1024, 70 * gib, SelectiveDequant),
            // Balanced T=16384: 512 rows per expert; B measured 6.03 ms vs A 6.51 ms.
            (256, 131072, 1024, 70 * gib, Fused),
            // gpt-oss-20b gate_up, T=4096: 32 experts × 512 rows, N = 5760 (5760 blocks): B
            // 7.27 ms vs A 9.85 ms for the layer's forward + backward.
            (32, 16384, 5760, 70 * gib, Fused),
            // Balanced T=65536: 2048 rows per expert.
            (256, 524288, 1024, 70 * gib, SelectiveDequant),
            // ... unless the transient buffer would not fit.
            (256, 524288, 1024, gib, Fused),
        ];
        for (active, rows, n, free, want) in cases {
            assert_eq!(
                auto_strategy(active, rows, n, 132, 1 << 22, free),
                want,
                "{active} active experts, {rows} rows, N = {n}, {free} bytes free"
            );
        }
    }

    #[test]
    fn nvfp4_auto_takes_a_from_its_row_threshold_when_the_buffer_fits() {
        let gib = 1usize << 30;
        use Strategy::{Fused, SelectiveDequant};
        // (active experts, routed rows, free bytes, expected); transient `active · 4 MiB`.
        let cases = [
            // Dense E=128, T=4096: 256 rows each; A 1.50 ms vs B 1.84 ms (H100, ee85389).
            (128, 32768, 70 * gib, SelectiveDequant),
            // Balanced T=4096: ~129 rows each; B 2.39 vs A 2.35 ms.
            (254, 32768, 70 * gib, Fused),
            // Dense and balanced T=256: B 1.4-1.6x faster.
            (128, 2048, 70 * gib, Fused),
            (229, 2048, 70 * gib, Fused),
            // Many rows, but the buffer would not fit.
            (128, 32768, gib / 4, Fused),
        ];
        for (active, rows, free, want) in cases {
            assert_eq!(
                auto_strategy_nvfp4(active, rows, 1 << 22, free),
                want,
                "{active} active experts, {rows} rows, {free} bytes free"
            );
        }
        // `resolve_strategy`'s shortcut (B below AUTO_A_MIN_ROWS routed rows, no read-back) is
        // the rule's own answer there (also a const assert on the thresholds).
        for rows in [1, 100, AUTO_A_MIN_ROWS - 1] {
            assert_eq!(auto_strategy_nvfp4(1, rows, 0, usize::MAX), Fused);
        }
    }

    /// `resolve_strategy` takes B without reading the routing back below `AUTO_A_MIN_ROWS` routed
    /// rows: the rule itself must never pick A there, whatever the active count, width or memory.
    #[test]
    fn auto_never_picks_a_below_its_row_floor() {
        for rows in [1, 7, 64, 200, AUTO_A_MIN_ROWS - 1] {
            for active in [1, 2, rows.div_ceil(2), rows] {
                for n in [128, 1024, 5760] {
                    assert_eq!(
                        auto_strategy(active, rows, n, 132, 0, usize::MAX),
                        Strategy::Fused,
                        "{active} active, {rows} rows, N = {n}"
                    );
                }
            }
        }
        assert_eq!(
            auto_strategy(1, AUTO_A_MIN_ROWS, 128, 132, 0, usize::MAX),
            Strategy::SelectiveDequant,
            "the floor is tight: one expert with AUTO_A_MIN_ROWS rows on a small grid takes A"
        );
    }
}
