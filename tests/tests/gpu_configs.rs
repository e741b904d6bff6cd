//! Every compiled tile configuration computes bit-identical results (they accumulate each output
//! in the same k order), so tuning changes speed only. Each row is forced through the device's
//! tuner in turn, and every run asserts that the forced row is the one its forward and dX GEMMs
//! launched ([`run_gpu_with`] checks the reported configurations). The tests that force rows do
//! so on the binary's shared device one at a time (the forced row is device-wide: [`forcing`]);
//! rows absent from the loaded
//! module (the `wgmma` rows under the portable module, `MXMOE_MODULE=portable`) are skipped.
//!
//! On a compute capability 9.0 device, a second test opens the device twice, once per PTX module
//! (`Gpu::open_with_module`, each with its own tuner), and checks that every row both modules
//! have, and each module's default choice, gives the same bits under both (not under
//! `MXMOE_PTX_OVERRIDE`, which replaces one module: the mutation run).

use std::sync::{Mutex, MutexGuard};

use mxmoe::Runtime;
use mxmoe::device::{Gpu, PtxModule};
use mxmoe::mxfp4::{MxWeights, quantize_mxfp4};
use mxmoe::nvfp4::{NvWeights, quantize_nvfp4};
use mxmoe::op::{DequantBuffer, RowOrder, Strategy};
use mxmoe::shared::tiles::{GEMM_CONFIG_NAMES, GEMM_CONFIGS, persistent_kernel};
use mxmoe_tests::linear_case::{Base, Case, draw, out_rows, run_gpu_with};
use mxmoe_tests::{Rng, gpu, test_runtime};

/// The forced row is device-wide ([`Runtime::tuner`] of the binary's shared device), and the test
/// harness runs tests in parallel: each test that forces rows on the shared device holds this
/// lock for as long as it does (a panic poisons it; the next holder takes it anyway).
static FORCING: Mutex<()> = Mutex::new(());

fn forcing() -> MutexGuard<'static, ()> {
    FORCING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bits of each tensor, with every NaN mapped to one pattern (NaN payloads are not contractual).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect()
}

fn check_all_configs(
    c: &Case,
    mx: &MxWeights,
    nv: &NvWeights,
    dense: &[f32],
    d: &mxmoe_tests::linear_case::Data,
) {
    let gpu = gpu().expect("checked by the caller");
    let dy = Rng::new(c.seed ^ 0x51).normal_bf16(out_rows(c) * c.n, 1.0);
    let mut first: [Option<[Vec<u32>; 4]>; 3] = [None, None, None];
    let module = gpu.module();
    for (i, config) in GEMM_CONFIGS.iter().enumerate() {
        if !module.has_config(config) {
            println!("row {i} skipped: not in the {} module", module.name());
            continue;
        }
        gpu.tuner().force(Some(i));
        for (slot, base) in [
            Base::Dense(dense),
            Base::Mx(mx, Strategy::Fused),
            Base::Nv(nv, Strategy::Fused, DequantBuffer::Keep),
        ]
        .into_iter()
        .enumerate()
        {
            let r = run_gpu_with(gpu, c, d, &dy, base);
            assert_eq!(r.configs, [i, i], "row {i} was forced");
            let got = [
                bits(&r.out),
                bits(&r.dx),
                bits(r.da.as_ref().unwrap()),
                bits(r.db.as_ref().unwrap()),
            ];
            match &first[slot] {
                None => first[slot] = Some(got),
                Some(f) => assert!(
                    f == &got,
                    "config {i} ({:?}) differs from config 0 ({}) for {c:?}",
                    config,
                    ["bf16", "mxfp4", "nvfp4"][slot]
                ),
            }
        }
    }
    gpu.tuner().force(None);
}

#[test]
fn every_tile_configuration_gives_identical_bits() {
    // The binary forces its own rows; an outer MXMOE_GEMM_CONFIG would only be overridden.
    if gpu().is_none() {
        return;
    }
    let _forcing = forcing();
    // With a bias: both kernel families add it in their own epilogues.
    let c = Case {
        output: RowOrder::Scattered,
        bias: true,
        ..Case::new(8, 256, 128, 150, 2, 16, 61)
    };
    let d = draw(&c);
    let mx = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    let nv = quantize_nvfp4(&d.w, c.e, c.n, c.k, true).unwrap();
    check_all_configs(&c, &mx, &nv, &d.w, &d);

    // K = 96 is not a multiple of the 64-deep stages: their last stage holds one real scale block
    // and one byte of the next row's scales. Make that byte NaN (row 1's first block of expert
    // 0): row 0's outputs must stay finite in every configuration, exactly as with 32-deep stages.
    let c = Case {
        active: 1,
        ..Case::new(2, 96, 40, 30, 1, 8, 62)
    };
    let d = draw(&c);
    let (shape, packed, mut scales) = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap().into_parts();
    scales[3] = 255;
    let mx = MxWeights::from_shape(shape, packed, scales).unwrap();
    let deq = mxmoe::mxfp4::dequantize_f32(&mx);
    let nv = quantize_nvfp4(&d.w, c.e, c.n, c.k, false).unwrap();
    check_all_configs(&c, &mx, &nv, &deq, &d);
}

/// The persistent `wgmma` kernels (`persistent_kernel`: 128- and 256-row tiles, every layout)
/// launch one block per SM and walk several tiles each, their pipeline running on across tiles.
/// On a problem with more than three times as many 128-row tiles as the device has SMs (and
/// about twice as many 256-row tiles) — dropped slots (a dropped-rows tile among the experts'
/// tiles), LoRA, a bias, scattered output — the 128- and 256-row rows give the bits of the
/// 64-row `wgmma` row (not persistent) for bf16, MXFP4 and NVFP4 weights, forward and backward.
/// (The per-row test above has fewer tiles than SMs: one tile per block.)
#[test]
fn persistent_rows_walk_several_tiles_per_block() {
    let Some(gpu) = gpu() else {
        return;
    };
    let _forcing = forcing();
    let index = |name: &str| {
        GEMM_CONFIG_NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no row {name}"))
    };
    let reference = index("m64n128k64wg2s4");
    let persistent_rows = [index("m128n128k64wg2s4"), index("m256n128k64wg2s3")];
    let persistent = persistent_rows[0];
    if !gpu.module().has_config(&GEMM_CONFIGS[persistent]) {
        println!(
            "skipped: the {} module has no wgmma rows",
            gpu.module().name()
        );
        return;
    }
    for &row in &persistent_rows {
        assert!(persistent_kernel(&GEMM_CONFIGS[row]));
    }
    assert!(!persistent_kernel(&GEMM_CONFIGS[reference]));
    // N = 1024: 8 column tiles; T·k routed rows in 128-row tiles: over 3·SMs tiles in all.
    let sms = gpu.limits().sm_count as usize;
    let t = 3 * sms * 128 / 8 / 2 + 300;
    let c = Case {
        output: RowOrder::Scattered,
        bias: true,
        dropped_permille: 40,
        ..Case::new(8, 192, 1024, t, 2, 16, 63)
    };
    let w = Weights::draw(&c);
    let (d, dy) = (&w.data, &w.dy);
    for (name, base) in w.bases() {
        let want = run_bits(gpu, &c, d, dy, base, Some(reference));
        for &row in &persistent_rows {
            let got = run_bits(gpu, &c, d, dy, base, Some(row));
            for (what, (g, w)) in ["out", "dx", "da", "db"].iter().zip(got.iter().zip(&want)) {
                assert!(
                    g == w,
                    "{name} {what}: the persistent row {} differs from the 64-row row",
                    GEMM_CONFIG_NAMES[row]
                );
            }
        }
    }
    gpu.tuner().force(None);
}

/// The `wgmma` kernels take their weight tiles and their grouped activation rows by TMA where
/// the tensors allow a map (the default, which every other test runs unless `MXMOE_TMA` says
/// otherwise), the weight tiles alone ([`Gpu::set_tma_activations`] off), or neither: the
/// producer's `cp.async` chunks ([`Gpu::set_tma`] off, and any tensor that allows no map). All
/// three give the same bits, for every `wgmma` row and bf16, MXFP4 and NVFP4 weights, forward
/// and backward. K = 160 and N = 200 leave partial k-tiles and column tiles in both directions
/// (the maps' zero fill against `cp.async`'s); grouped input gives the activation copies tiles
/// that end inside the tensor (an expert's tail: the next expert's rows come along, unstored)
/// and past it; token-ordered input (fan-out 2) keeps `cp.async` for the gathered rows.
#[test]
fn tma_and_cp_async_tiles_give_identical_bits() {
    let Some(gpu) = gpu() else {
        return;
    };
    let _forcing = forcing();
    let rows: Vec<usize> = (0..GEMM_CONFIGS.len())
        .filter(|&i| GEMM_CONFIGS[i].wgmma && gpu.module().has_config(&GEMM_CONFIGS[i]))
        .collect();
    if rows.is_empty() {
        println!(
            "skipped: the {} module has no wgmma rows",
            gpu.module().name()
        );
        return;
    }
    // Token-ordered input (gathered activation rows: `cp.async`) and grouped input (one TMA box
    // of the tile's rows per k-tile).
    let scattered = Case {
        output: RowOrder::Scattered,
        bias: true,
        ..Case::new(4, 160, 200, 300, 2, 16, 64)
    };
    let grouped = Case {
        input: RowOrder::Grouped,
        seed: 65,
        ..scattered
    };
    let (was, was_rows) = (gpu.tma(), gpu.tma_activations());
    for c in [scattered, grouped] {
        let w = Weights::draw(&c);
        let (d, dy) = (&w.data, &w.dy);
        for &row in &rows {
            for (name, base) in w.bases() {
                gpu.set_tma(true);
                let both = run_bits(gpu, &c, d, dy, base, Some(row));
                gpu.set_tma_activations(false);
                let weights_only = run_bits(gpu, &c, d, dy, base, Some(row));
                gpu.set_tma(false);
                let without = run_bits(gpu, &c, d, dy, base, Some(row));
                gpu.set_tma(was);
                gpu.set_tma_activations(was_rows);
                for (mode, bits) in [("weights and rows", &both), ("weights", &weights_only)] {
                    for (what, (g, w)) in ["out", "dx", "da", "db"]
                        .iter()
                        .zip(bits.iter().zip(&without))
                    {
                        assert!(
                            g == w,
                            "row {row} ({}) {name} {what}, input {:?}: TMA ({mode}) and cp.async \
                         tiles differ",
                            GEMM_CONFIG_NAMES[row],
                            c.input
                        );
                    }
                }
            }
        }
    }
    gpu.tuner().force(None);
}

/// A case's data, its weights quantized to MXFP4 and NVFP4 (with tensor scales) and an output
/// gradient: what the bit-comparison tests run on each weight format.
struct Weights {
    data: mxmoe_tests::linear_case::Data,
    mx: MxWeights,
    nv: NvWeights,
    dy: Vec<f32>,
}

impl Weights {
    fn draw(c: &Case) -> Self {
        let data = draw(c);
        let mx = quantize_mxfp4(&data.w, c.e, c.n, c.k).unwrap();
        let nv = quantize_nvfp4(&data.w, c.e, c.n, c.k, true).unwrap();
        let dy = Rng::new(c.seed ^ 0x51).normal_bf16(out_rows(c) * c.n, 1.0);
        Weights { data, mx, nv, dy }
    }

    /// bf16, MXFP4 (Strategy B) and NVFP4 (Strategy B) runs of the same weights.
    fn bases(&self) -> [(&'static str, Base<'_>); 3] {
        [
            ("bf16", Base::Dense(&self.data.w)),
            ("mxfp4", Base::Mx(&self.mx, Strategy::Fused)),
            (
                "nvfp4",
                Base::Nv(&self.nv, Strategy::Fused, DequantBuffer::Keep),
            ),
        ]
    }
}

/// The four result tensors of one run, as bits.
fn run_bits(
    rt: &Runtime,
    c: &Case,
    d: &mxmoe_tests::linear_case::Data,
    dy: &[f32],
    base: Base<'_>,
    forced: Option<usize>,
) -> [Vec<u32>; 4] {
    rt.tuner().force(forced);
    let r = run_gpu_with(rt, c, d, dy, base);
    if let Some(i) = forced {
        assert_eq!(r.configs, [i, i], "row {i} was forced");
    }
    [
        bits(&r.out),
        bits(&r.dx),
        bits(r.da.as_ref().unwrap()),
        bits(r.db.as_ref().unwrap()),
    ]
}

#[test]
fn rows_in_both_modules_give_identical_bits_across_modules() {
    let Some(shared) = gpu() else {
        return;
    };
    // A mutation run loads one module through `MXMOE_PTX_OVERRIDE` (a Hopper mutant cannot be
    // the portable module), so this comparison of the two embedded modules does not apply there;
    // the per-row test above runs on the override.
    if std::env::var_os("MXMOE_PTX_OVERRIDE").is_some_and(|v| !v.is_empty()) {
        println!("skipped: MXMOE_PTX_OVERRIDE replaces one module, and this test compares both");
        return;
    }
    let cc = shared.limits().compute_capability;
    if cc != (9, 0) {
        println!(
            "skipped: both modules load only on compute capability 9.0 (this device: {}.{})",
            cc.0, cc.1
        );
        return;
    }
    let open = |m| test_runtime(Gpu::open_with_module(0, m).expect("opening device 0 again"));
    let hopper = open(PtxModule::Hopper);
    let portable = open(PtxModule::Portable);
    assert_eq!(
        (hopper.module(), portable.module()),
        (PtxModule::Hopper, PtxModule::Portable)
    );
    let c = Case {
        output: RowOrder::Scattered,
        bias: true,
        ..Case::new(8, 256, 128, 150, 2, 16, 63)
    };
    let w = Weights::draw(&c);
    let (d, dy) = (&w.data, &w.dy);
    let both: Vec<Option<usize>> = std::iter::once(None)
        .chain(
            (0..GEMM_CONFIGS.len())
                .filter(|&i| PtxModule::Portable.has_config(&GEMM_CONFIGS[i]))
                .map(Some),
        )
        .collect();
    for forced in both {
        for (what, base) in w.bases() {
            let h = run_bits(&hopper, &c, d, dy, base, forced);
            let p = run_bits(&portable, &c, d, dy, base, forced);
            assert!(
                h == p,
                "{what}, row {forced:?} (None: each module's default): the portable module's \
                 bits differ from the Hopper module's"
            );
        }
    }
}
