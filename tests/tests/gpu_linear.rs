//! GPU parity of the bf16 expert linear (forward, dX, dA, dB, d_gates) against the CPU
//! reference, on fresh random inputs, at SPEC §7 shapes and ragged cases; plus determinism.

use mxmoe::op::RowOrder;
use mxmoe_tests::linear_case::{
    Base, Case, check_case, draw, out_rows, ragged_tokens, rank_sweep, run_gpu,
    spec_representative, spec_small, spec_small_gated,
};
use mxmoe_tests::{Rng, gpu};

/// Checks the case against the CPU reference, each element against its own bf16 bound, and
/// (with a rank) the LoRA term on its own ([`check_case`]).
fn check(c: Case) {
    let Some(gpu) = gpu() else { return };
    let d = draw(&c);
    let mut rng = Rng::new(c.seed ^ 0xD1);
    let dy = rng.normal_bf16(out_rows(&c) * c.n, 1.0);
    check_case(gpu, &c, &d, &d.w, &dy, Base::Dense(&d.w));
}

/// Every LoRA rank class ([`rank_sweep`]) in forward and dX.
#[test]
fn lora_rank_sweep() {
    for c in rank_sweep(300) {
        check(c);
    }
}

#[test]
fn spec_small_shape_scattered_in_grouped_out() {
    check(spec_small());
}

#[test]
fn spec_small_shape_grouped_in_scattered_out_with_gates() {
    check(spec_small_gated());
}

#[test]
fn frozen_bias_in_both_output_orders() {
    // Grouped output; scattered output with gates (the bias is in each slot's row, so the gates
    // scale it and `d_gates` sees it) and dropped slots (which get no bias).
    check(Case {
        bias: true,
        ..spec_small()
    });
    check(Case {
        bias: true,
        dropped_permille: 150,
        ..spec_small_gated()
    });
}

#[test]
fn spec_representative_shape() {
    check(spec_representative());
}

#[test]
fn representative_shape_with_gates() {
    check(Case {
        input: RowOrder::Grouped,
        output: RowOrder::Scattered,
        gates: true,
        ..Case::new(32, 1024, 2048, 64, 4, 16, 3)
    });
}

/// The gated dY (`scale_slots`) over more 8-element row vectors than its grid has threads (a
/// full SM of threads per SM: 270 336 on 132 SMs, 303 104 on 148) at a width whose vectors per
/// row (N = 360: 45) do not divide the grid stride: each thread steps its row position across
/// rows (`shared::walk::RowWalk`), which the smaller shapes never do. 8192 slot rows, 368 640
/// vectors.
#[test]
fn gated_rows_past_the_row_kernels_grid() {
    check(Case {
        output: RowOrder::Scattered,
        gates: true,
        ..Case::new(8, 224, 360, 2048, 4, 8, 61)
    });
}

#[test]
fn ragged_token_counts_and_ranks() {
    let cases = [
        (1, 1, 8),
        (1, 4, 16),
        (37, 3, 0),
        (37, 2, 64),
        (129, 4, 8),
        (300, 1, 16),
    ];
    for c in ragged_tokens(100, &cases) {
        check(c);
    }
}

#[test]
fn ragged_small_dims() {
    check(Case::new(4, 32, 48, 23, 2, 16, 11));
    check(Case {
        output: RowOrder::Scattered,
        ..Case::new(5, 32, 48, 9, 3, 1, 12)
    });
    check(Case {
        input: RowOrder::Grouped,
        output: RowOrder::Grouped,
        ..Case::new(3, 40, 24, 17, 2, 8, 13)
    });
}

#[test]
fn empty_experts_and_all_tokens_on_one_expert() {
    // 16 experts but only 3 receive tokens.
    check(Case {
        active: 3,
        ..Case::new(16, 64, 64, 40, 2, 8, 21)
    });
    // Every token on expert 0.
    check(Case {
        active: 1,
        ..Case::new(8, 64, 64, 50, 1, 16, 22)
    });
    // k = E.
    check(Case::new(4, 64, 32, 20, 4, 8, 23));
}

#[test]
fn dropped_slots_give_zero_rows_and_no_gradient() {
    check(Case {
        dropped_permille: 200,
        ..Case::new(8, 64, 64, 40, 2, 8, 31)
    });
    check(Case {
        dropped_permille: 300,
        output: RowOrder::Scattered,
        input: RowOrder::Grouped,
        gates: true,
        ..Case::new(8, 64, 64, 40, 2, 8, 32)
    });
}

#[test]
fn many_rows_per_expert_use_the_large_tile() {
    check(Case::new(4, 256, 384, 512, 2, 16, 41));
}

#[test]
fn repeat_runs_are_bitwise_equal() {
    let Some(gpu) = gpu() else { return };
    let c = Case {
        gates: true,
        input: RowOrder::Grouped,
        output: RowOrder::Scattered,
        ..Case::new(16, 256, 128, 200, 4, 16, 51)
    };
    let d = draw(&c);
    let dy = Rng::new(52).normal_bf16(out_rows(&c) * c.n, 1.0);
    let a = run_gpu(gpu, &c, &d, &dy);
    let b = run_gpu(gpu, &c, &d, &dy);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.out), bits(&b.out));
    assert_eq!(bits(&a.dx), bits(&b.dx));
    assert_eq!(bits(a.da.as_ref().unwrap()), bits(b.da.as_ref().unwrap()));
    assert_eq!(bits(a.db.as_ref().unwrap()), bits(b.db.as_ref().unwrap()));
    assert_eq!(
        bits(a.d_gates.as_ref().unwrap()),
        bits(b.d_gates.as_ref().unwrap())
    );
}
