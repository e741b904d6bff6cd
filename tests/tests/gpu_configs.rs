//! Every compiled tile configuration computes bit-identical results (they accumulate each output
//! in the same k order), so tuning changes speed only. Each row is forced through the device's
//! tuner in turn, and every run asserts that the forced row is the one its forward and dX GEMMs
//! launched ([`run_gpu_with`] checks the reported configurations). One test per binary, because
//! the forced row is device-wide.

use mxmoe::mxfp4::{MxWeights, quantize_mxfp4};
use mxmoe::op::{RowOrder, Strategy};
use mxmoe::shared::tiles::GEMM_CONFIGS;
use mxmoe_tests::linear_case::{Base, Case, draw, out_rows, run_gpu_with};
use mxmoe_tests::{Rng, gpu};

/// Bits of each tensor, with every NaN mapped to one pattern (NaN payloads are not contractual).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect()
}

fn check_all_configs(c: &Case, mx: &MxWeights, dense: &[f32], d: &mxmoe_tests::linear_case::Data) {
    let gpu = gpu().expect("checked by the caller");
    let dy = Rng::new(c.seed ^ 0x51).normal_bf16(out_rows(c) * c.n, 1.0);
    let mut first: [Option<[Vec<u32>; 4]>; 2] = [None, None];
    for (i, config) in GEMM_CONFIGS.iter().enumerate() {
        gpu.tuner().force(Some(i));
        for (slot, base) in [Base::Dense(dense), Base::Mx(mx, Strategy::Fused)]
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
                    if slot == 0 { "bf16" } else { "mxfp4" }
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
    // With a bias: both kernel families add it in their own epilogues.
    let c = Case {
        output: RowOrder::Scattered,
        bias: true,
        ..Case::new(8, 256, 128, 150, 2, 16, 61)
    };
    let d = draw(&c);
    let mx = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    check_all_configs(&c, &mx, &d.w, &d);

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
    check_all_configs(&c, &mx, &deq, &d);
}
