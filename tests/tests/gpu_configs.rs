//! Every compiled tile configuration computes bit-identical results (they accumulate each output
//! in the same k order), so tuning changes speed only. One test per binary, because it sets the
//! process-wide `MXMOE_GEMM_CONFIG` override.

use mxmoe::mxfp4::quantize_mxfp4;
use mxmoe::op::{RowOrder, Strategy};
use mxmoe::shared::tiles::GEMM_CONFIGS;
use mxmoe_tests::linear_case::{Base, Case, draw, out_rows, run_gpu_with};
use mxmoe_tests::{Rng, gpu};

#[test]
fn every_tile_configuration_gives_identical_bits() {
    let Some(gpu) = gpu() else { return };
    let c = Case {
        output: RowOrder::Scattered,
        ..Case::new(8, 256, 128, 150, 2, 16, 61)
    };
    let d = draw(&c);
    let mx = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    let dy = Rng::new(62).normal_bf16(out_rows(&c) * c.n, 1.0);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut first: [Option<[Vec<u32>; 4]>; 2] = [None, None];
    for i in 0..GEMM_CONFIGS.len() {
        // SAFETY: this binary holds only this test, so no other thread reads the environment.
        unsafe { std::env::set_var("MXMOE_GEMM_CONFIG", i.to_string()) };
        for base in [Base::Dense(&d.w), Base::Mx(&mx, Strategy::Fused)] {
            let r = run_gpu_with(gpu, &c, &d, &dy, base);
            let got = [
                bits(&r.out),
                bits(&r.dx),
                bits(r.da.as_ref().unwrap()),
                bits(r.db.as_ref().unwrap()),
            ];
            let slot = usize::from(matches!(base, Base::Mx(..)));
            match &first[slot] {
                None => first[slot] = Some(got),
                Some(f) => assert!(
                    f == &got,
                    "config {i} differs from config 0 ({})",
                    if slot == 0 { "bf16" } else { "mxfp4" }
                ),
            }
        }
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var("MXMOE_GEMM_CONFIG") };
}
