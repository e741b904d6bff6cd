//! Strategy A (selective dequantization): bitwise equal to the bf16 path on the fully
//! dequantized weights — forward, dX, dA, dB, d_gates — at SPEC §7 shapes, with 10 of 256
//! experts active, with every expert active (no gather), with the buffer recomputed in backward,
//! when every slot is dropped, and with a frozen bias gathered for spread-out active experts.

use mxmoe::mxfp4::{MxWeights, dequantize_f32, quantize_mxfp4};
use mxmoe::op::{RowOrder, Strategy};
use mxmoe_tests::linear_case::{
    Base, Case, Data, GpuResult, draw, out_rows, run_gpu_with, spec_representative, spec_small,
    spec_small_gated,
};
use mxmoe_tests::{Rng, gpu};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bitwise(a: &GpuResult, b: &GpuResult) {
    assert_eq!(bits(&a.out), bits(&b.out), "out");
    assert_eq!(bits(&a.dx), bits(&b.dx), "dx");
    assert_eq!(a.da.as_deref().map(bits), b.da.as_deref().map(bits), "dA");
    assert_eq!(a.db.as_deref().map(bits), b.db.as_deref().map(bits), "dB");
    assert_eq!(
        a.d_gates.as_deref().map(bits),
        b.d_gates.as_deref().map(bits),
        "d_gates"
    );
}

fn check(c: Case) {
    check_data(c, draw(&c));
}

fn check_data(c: Case, d: Data) {
    let Some(gpu) = gpu() else { return };
    let mx: MxWeights = quantize_mxfp4(&d.w, c.e, c.n, c.k).unwrap();
    let deq = dequantize_f32(&mx);
    let dy = Rng::new(c.seed ^ 0xA5).normal_bf16(out_rows(&c) * c.n, 1.0);
    let dense = run_gpu_with(gpu, &c, &d, &dy, Base::Dense(&deq));
    let a = run_gpu_with(gpu, &c, &d, &dy, Base::Mx(&mx, Strategy::SelectiveDequant));
    assert_bitwise(&a, &dense);
    let recomputed = run_gpu_with(gpu, &c, &d, &dy, Base::MxRecompute(&mx));
    assert_bitwise(&recomputed, &dense);
    if let Some(da) = &a.da {
        // Inactive experts get exactly zero gradient rows.
        let active: std::collections::BTreeSet<i64> =
            d.ids.iter().copied().filter(|&i| i >= 0).collect();
        for e in 0..c.e {
            if !active.contains(&(e as i64)) {
                let rows = &da[e * c.r * c.k..(e + 1) * c.r * c.k];
                assert!(
                    rows.iter().all(|&v| v == 0.0),
                    "expert {e} is inactive but has a nonzero dA"
                );
            }
        }
    }
}

#[test]
fn spec_shapes_are_bitwise_equal_to_the_dense_path() {
    check(spec_small());
    check(spec_small_gated());
    check(spec_representative());
}

#[test]
fn ten_of_256_experts_active() {
    check(Case {
        active: 10,
        ..Case::new(256, 256, 128, 300, 4, 16, 3)
    });
}

#[test]
fn every_expert_active_skips_the_gather() {
    check(Case::new(4, 128, 64, 200, 2, 8, 4));
}

#[test]
fn dropped_slots_and_zero_rank() {
    check(Case {
        active: 5,
        dropped_permille: 250,
        ..Case::new(12, 64, 64, 50, 2, 8, 5)
    });
    check(Case {
        active: 3,
        ..Case::new(12, 64, 64, 50, 2, 0, 6)
    });
}

#[test]
fn the_bias_rows_of_spread_out_active_experts_are_gathered() {
    // Six active experts spread over 24 (ids 1, 5, 9, …), so compact and full expert indices
    // differ: a bias read with the compact index would add another expert's row. Scattered
    // output with gates, so `d_gates` sees the bias too.
    let c = Case {
        active: 6,
        bias: true,
        input: RowOrder::Grouped,
        output: RowOrder::Scattered,
        gates: true,
        ..Case::new(24, 128, 64, 20, 2, 8, 91)
    };
    let mut d = draw(&c);
    for id in d.ids.iter_mut().filter(|i| **i >= 0) {
        *id = *id * 4 + 1;
    }
    check_data(c, d);
}
