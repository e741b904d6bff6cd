//! NVFP4 experts on the GPU (issue #17): the dequantization kernel is bit-identical to the host's
//! dequantizer (itself bit-exact with torchao, `mxmoe::nvfp4`), and the expert linear and the
//! gpt-oss block over NVFP4 weights — Strategy A (kept and recomputed buffer), Strategy B (the
//! codes decoded inside the tensor-core K-loop, both kernel families) and `Auto` — are bitwise
//! equal to the bf16 path run on the dequantized weights — forward, dX, dA, dB, d_gates — with
//! single-level and two-level scales (per expert, and per gate/up half). `Fused` over a K that
//! is not a multiple of 32 is a typed error, and `Auto` takes Strategy A there.

use mxmoe::kernels::dequant::dequant_nvfp4_bf16;
use mxmoe::moe::{MoeBlock, backward as moe_backward};
use mxmoe::nvfp4::{
    NvShape, NvWeights, dequantize_nvfp4_bf16, dequantize_nvfp4_f32, quantize_nvfp4,
};
use mxmoe::op::{
    Bf16Matrix, DenseExperts, DequantBuffer, ExpertLinear, ExpertWeights, NvExperts, RowOrder,
    Strategy,
};
use mxmoe::routing::DeviceRouting;
use mxmoe::shared::bf16::f32_to_bf16_bits;
use mxmoe_tests::linear_case::{Base, Case, GpuResult, draw, out_rows, run_gpu_with};
use mxmoe_tests::{Rng, assert_invalid_argument, gpu};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bitwise(a: &GpuResult, b: &GpuResult, tag: &str) {
    assert_eq!(bits(&a.out), bits(&b.out), "out {tag}");
    assert_eq!(bits(&a.dx), bits(&b.dx), "dx {tag}");
    for (x, y, name) in [
        (&a.da, &b.da, "dA"),
        (&a.db, &b.db, "dB"),
        (&a.d_gates, &b.d_gates, "d_gates"),
    ] {
        assert_eq!(
            x.as_deref().map(bits),
            y.as_deref().map(bits),
            "{name} {tag}"
        );
    }
}

/// `w` re-grouped into `groups` tensor-scale groups per expert with distinct scales (each group's
/// rows scaled by its own power-of-two-free factor), so a kernel that reads the wrong group's
/// scale changes the values.
fn regrouped(w: &NvWeights, groups: usize) -> NvWeights {
    let s = w.shape();
    let scales: Vec<f32> = (0..s.experts() * groups)
        .map(|i| 0.0371 * (1.0 + 0.37 * i as f32))
        .collect();
    let (shape, packed, block_scales, _) = w.clone().into_parts();
    NvWeights::from_grouped_parts(shape, packed, block_scales, Some(scales), groups).unwrap()
}

#[test]
fn dequant_kernel_matches_the_host_dequantizer_bitwise() {
    let Some(gpu) = gpu() else { return };
    let (e, n, k) = (5, 24, 96);
    let values = Rng::new(3).normal_bf16(e * n * k, 2.0);
    let single = quantize_nvfp4(&values, e, n, k, false).unwrap();
    let two_level = quantize_nvfp4(&values, e, n, k, true).unwrap();
    for (w, tag) in [
        (single.clone(), "single"),
        (two_level, "two-level"),
        (regrouped(&single, 3), "three groups"),
    ] {
        let host = dequantize_nvfp4_bf16(&w);
        let dev = NvExperts::upload(gpu, &w).unwrap();
        // Out of order, with a repeat: each output block is its own expert's.
        let ids = [4u32, 0, 2, 2];
        let out = dequant_nvfp4_bf16(
            gpu,
            dev.packed(),
            dev.scales(),
            dev.tensor_scales(),
            dev.groups(),
            e,
            n,
            k,
            &ids,
        )
        .unwrap();
        let got: Vec<u16> = mxmoe::device::download(gpu, &out).unwrap();
        for (s, &x) in ids.iter().enumerate() {
            let x = x as usize;
            assert_eq!(
                &got[s * n * k..][..n * k],
                &host[x * n * k..][..n * k],
                "{tag}: expert {x} (slot {s})"
            );
        }
    }
}

#[test]
fn dequant_rejects_bad_arguments_before_any_launch() {
    let Some(gpu) = gpu() else { return };
    let w = quantize_nvfp4(&vec![0.5; 2 * 4 * 32], 2, 4, 32, true).unwrap();
    let dev = NvExperts::upload(gpu, &w).unwrap();
    let run = |groups: usize, k: usize, ids: &[u32]| {
        dequant_nvfp4_bf16(
            gpu,
            dev.packed(),
            dev.scales(),
            dev.tensor_scales(),
            groups,
            2,
            4,
            k,
            ids,
        )
    };
    assert_invalid_argument(run(3, 32, &[0]), "tensor-scale groups");
    assert_invalid_argument(run(1, 24, &[0]), "dequant shape");
    assert_invalid_argument(run(1, 32, &[2]), "experts");
    // A shape that needs more bytes than the buffers hold.
    assert!(run(1, 64, &[0]).is_err());
}

/// Runs the case with NVFP4 weights (Strategy A kept or recomputed, Strategy B, `Auto`) and with
/// dense bf16 weights holding their dequantized values; all must agree bit for bit. `two_level`
/// adds per-tensor scales (`groups` per expert when above 1).
fn check(c: Case, groups: usize, two_level: bool) {
    let Some(gpu) = gpu() else { return };
    let d = draw(&c);
    let quantized = quantize_nvfp4(&d.w, c.e, c.n, c.k, two_level).unwrap();
    let nv = if groups > 1 {
        regrouped(&quantized, groups)
    } else {
        quantized
    };
    let deq = dequantize_nvfp4_f32(&nv);
    let dy = Rng::new(c.seed ^ 0x4E).normal_bf16(out_rows(&c) * c.n, 1.0);
    let dense = run_gpu_with(gpu, &c, &d, &dy, Base::Dense(&deq));
    for (strategy, buffer) in [
        (Strategy::Auto, DequantBuffer::Keep),
        (Strategy::SelectiveDequant, DequantBuffer::Keep),
        (Strategy::SelectiveDequant, DequantBuffer::Recompute),
        (Strategy::Fused, DequantBuffer::Keep),
    ] {
        let got = run_gpu_with(gpu, &c, &d, &dy, Base::Nv(&nv, strategy, buffer));
        assert_bitwise(&got, &dense, &format!("{strategy:?} {buffer:?} {c:?}"));
    }
}

#[test]
fn linear_over_nvfp4_equals_the_bf16_path_on_its_values() {
    check(Case::new(8, 128, 256, 16, 2, 8, 0), 1, true);
    check(Case::new(8, 128, 256, 16, 2, 8, 1), 1, false);
    check(
        Case {
            input: RowOrder::Grouped,
            output: RowOrder::Scattered,
            gates: true,
            bias: true,
            dropped_permille: 100,
            ..Case::new(8, 128, 256, 16, 2, 8, 7)
        },
        2,
        true,
    );
    // Many rows per expert (the tall tiles of both directions), K = 96 (a 64-deep stage
    // half past K), N = 160 (a partial 128-column block), four tensor-scale groups, so a group
    // boundary falls inside a dX stage's reduction rows and inside a forward block's columns.
    check(
        Case {
            output: RowOrder::Scattered,
            gates: true,
            ..Case::new(4, 96, 160, 300, 2, 16, 8)
        },
        4,
        true,
    );
    // Few active experts among many: the compact buffer's ids are not the experts' ids.
    check(
        Case {
            active: 5,
            ..Case::new(24, 96, 64, 20, 2, 4, 9)
        },
        1,
        true,
    );
}

#[test]
fn fused_needs_k_a_multiple_of_32_and_auto_then_takes_a() {
    let Some(gpu) = gpu() else { return };
    // K = 48: valid NVFP4 (K % 16 == 0), but the fused stages take 32-k runs of packed bytes.
    let c = Case::new(4, 48, 32, 8, 2, 0, 5);
    let d = draw(&c);
    let nv = quantize_nvfp4(&d.w, c.e, c.n, c.k, false).unwrap();
    let dev = NvExperts::upload(gpu, &nv).unwrap();
    let routing = DeviceRouting::from_host_ids(gpu, &d.ids, c.t, c.top_k, c.e).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &d.x, d.x_rows, c.k).unwrap();
    let layer = ExpertLinear::new(ExpertWeights::Nvfp4(&dev), None, c.input, c.output)
        .with_strategy(Strategy::Fused);
    assert_invalid_argument(
        layer.forward(gpu, &x, &routing, None).map(|_| ()),
        "strategy",
    );
    let (fwd, _) = layer
        .with_strategy(Strategy::Auto)
        .forward(gpu, &x, &routing, None)
        .unwrap();
    assert_eq!(fwd.strategy, Strategy::SelectiveDequant);
}

#[test]
fn gpt_oss_block_over_nvfp4_equals_the_bf16_block_on_its_values() {
    let Some(gpu) = gpu() else { return };
    let (e, h, i, t, top_k) = (8, 64, 96, 24, 4);
    let mut rng = Rng::new(21);
    let logits: Vec<f32> = (0..t * e).map(|_| rng.normal()).collect();
    let (ids, gates) = mxmoe::moe::route_softmax_topk(&logits, t, e, top_k, true).unwrap();
    let gu_vals = rng.normal_bf16(e * 2 * i * h, 1.0 / (h as f32).sqrt());
    let dn_vals = rng.normal_bf16(e * h * i, 1.0 / (i as f32).sqrt());
    // gate_up with two tensor-scale groups (rows [0, I) and [I, 2I)), as a stacked ModelOpt
    // gate_proj + up_proj would have; down with one.
    let gu_nv = regrouped(&quantize_nvfp4(&gu_vals, e, 2 * i, h, true).unwrap(), 2);
    let dn_nv = quantize_nvfp4(&dn_vals, e, h, i, true).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &rng.normal_bf16(t * h, 1.0), t, h).unwrap();
    let g = Bf16Matrix::from_f32(gpu, &gates, t, top_k).unwrap();
    let dy = Bf16Matrix::from_f32(gpu, &rng.normal_bf16(t * h, 1.0), t, h).unwrap();
    let b_gu = Bf16Matrix::from_f32(gpu, &rng.normal_bf16(e * 2 * i, 0.5), e, 2 * i).unwrap();
    let b_dn = Bf16Matrix::from_f32(gpu, &rng.normal_bf16(e * h, 0.5), e, h).unwrap();
    let routing = DeviceRouting::from_host_ids(gpu, &ids, t, top_k, e).unwrap();
    let dense = |w: &NvWeights| {
        let (s, bits): (NvShape, Vec<u16>) = (w.shape(), dequantize_nvfp4_bf16(w));
        DenseExperts::from_bits(gpu, &bits, s.experts(), s.n(), s.k()).unwrap()
    };
    let (gu_dense, dn_dense) = (dense(&gu_nv), dense(&dn_nv));
    let (gu_dev, dn_dev) = (
        NvExperts::upload(gpu, &gu_nv).unwrap(),
        NvExperts::upload(gpu, &dn_nv).unwrap(),
    );
    let run = |gu: ExpertWeights<'_>, dn: ExpertWeights<'_>| {
        let block = MoeBlock::gpt_oss(gu, dn, &b_gu, &b_dn);
        let (y, saved) = block.forward(gpu, &x, &routing, &g).unwrap();
        let grads = moe_backward(gpu, &saved, &dy).unwrap();
        let f = |m: &Bf16Matrix| bits(&m.to_f32(gpu).unwrap());
        (f(&y), f(&grads.dx), f(&grads.d_gates))
    };
    let want = run(
        ExpertWeights::Bf16(&gu_dense),
        ExpertWeights::Bf16(&dn_dense),
    );
    for strategy in [Strategy::Auto, Strategy::SelectiveDequant, Strategy::Fused] {
        let block = MoeBlock {
            strategy,
            ..MoeBlock::gpt_oss(
                ExpertWeights::Nvfp4(&gu_dev),
                ExpertWeights::Nvfp4(&dn_dev),
                &b_gu,
                &b_dn,
            )
        };
        let (y, saved) = block.forward(gpu, &x, &routing, &g).unwrap();
        let grads = moe_backward(gpu, &saved, &dy).unwrap();
        let f = |m: &Bf16Matrix| bits(&m.to_f32(gpu).unwrap());
        let got = (f(&y), f(&grads.dx), f(&grads.d_gates));
        assert!(got == want, "{strategy:?}");
    }
    // The values are the quantized ones, not the inputs: the bf16 block on the unquantized
    // weights differs.
    let raw: Vec<u16> = gu_vals.iter().map(|&v| f32_to_bf16_bits(v)).collect();
    let gu_raw = DenseExperts::from_bits(gpu, &raw, e, 2 * i, h).unwrap();
    assert_ne!(
        run(ExpertWeights::Bf16(&gu_raw), ExpertWeights::Bf16(&dn_dense)).0,
        want.0
    );
}
