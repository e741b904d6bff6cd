//! GPU parity of the gated MoE MLP block (SPEC §6: gate/up projection → SwiGLU with the optional
//! DeepSeek-V4 clamp → gated down projection; and gpt-oss's block of `GPT_OSS.md` §1:
//! interleaved gate/up, frozen biases, `(clamp(u) + 1)·g·σ(α g)`) against the CPU block
//! reference (`mxmoe::reference::moe`, bf16 rounding points), forward and backward, with LoRA on
//! both projections and `s ≠ 0`, for bf16 weights, MXFP4 Strategy B (fused) and MXFP4 Strategy A
//! (selective dequant).
//!
//! The gpt-oss cases draw biases `0.5·randn` (large enough that a missing or misplaced bias
//! fails every tensor's tolerance) and use the clamp limit of the SwiGLU cases (2.5, so a few
//! percent of the ~N(0, 1) gates and ups are clamped; the model's 7 would clamp none of them).
//! The boundary cases zero every fourth token's `x`, so those rows of `gu` are exactly the
//! bias, and set a tenth of the bias entries to exactly `±L`: the clamp's gradient at exactly
//! the limit is then exercised under both rules.
//!
//! Data (SPEC §6's integration test, scaled as §8): `gate_up = randn(E, 2I, H)/√H`,
//! `down = randn(E, H, I)/√I` (bf16, then MXFP4-quantized for the MXFP4 paths, whose reference
//! runs on the dequantized values), LoRA `A, B = 0.05·randn`, `s = 0.5`, `x = randn(T, H)`, the
//! router `softmax → top-k → renormalise → bf16` of `randn(T, E)` logits
//! ([`mxmoe::moe::route_softmax_topk`]), `dy = randn(T, H)`.
//!
//! The large block (`T = 2048`, `L = 12288`) runs entirely on the GPU, but its output gradient is
//! non-zero only on a spread-out subset of tokens: every gradient then equals the gradient of
//! the sub-problem made of those tokens alone (a zero `dy` row gives zero `dh`, `d_gu`, `dx`
//! rows and no contribution to any LoRA gradient or gate gradient), so the naive CPU reference
//! only has to run the subset. The GPU still computes every row, and the comparison covers the
//! whole `dx` and `d_gates` (zeros off the subset) and the full LoRA gradients.

use mxmoe::Runtime;
use mxmoe::moe::{MoeBlock, MoeGrads, backward, route_softmax_topk};
use mxmoe::mxfp4::{MxShape, MxWeights, dequantize_f32, quantize_mxfp4_bf16};
use mxmoe::op::{Bf16Matrix, DenseExperts, ExpertWeights, LoraWeights, MxExperts, Strategy};
use mxmoe::reference::moe::{
    Activation, ClampBoundary, GateUpLayout, MoeProblem, RefLora, moe_forward_backward,
};
use mxmoe::reference::{DROPPED, Rounding, flatten_sort_count};
use mxmoe::routing::DeviceRouting;
use mxmoe::shared::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};
use mxmoe_tests::{Rng, assert_close, assert_invalid_argument, assert_shape_error, gpu};

/// Relative tolerance: about two bf16 ulps. Every tensor is rounded once from an f32 sum whose
/// order differs from the reference's exact sum, so a value can land one ulp away; the rounded
/// intermediates (`gu`, `h`, `dh`, `d_gu`, XA, YB) can each move by one more ulp, which the
/// next stage sees as a relative perturbation of the same size.
const RTOL: f32 = 1e-2;
/// Absolute tolerance as a fraction of the reference tensor's largest magnitude: the one-ulp
/// differences above enter long sums (up to `2I·top_k` terms for `dx`, rows per expert for the
/// LoRA gradients) whose results can cancel far below their terms.
const ATOL_FRAC: f32 = 4e-3;
/// The clamp limit of the clamped cases. DeepSeek-V4 uses 10 on real activations; these
/// activations are ~N(0, 1), so 2.5 clamps a few percent of the gate and up values (exercising
/// the masks) while few values sit exactly at the limit, where a one-ulp difference in `gu`
/// between the GPU and the reference could flip a mask.
const LIMIT: f32 = 2.5;

/// Shape and options of one block case.
#[derive(Clone, Copy, Debug)]
struct Block {
    /// Experts `E`.
    e: usize,
    /// Hidden size `H`.
    h: usize,
    /// Intermediate size `I`.
    i: usize,
    /// Experts per token.
    top_k: usize,
    /// Tokens `T`.
    t: usize,
    /// LoRA rank of both projections.
    r: usize,
    /// Clamp limit.
    limit: Option<f32>,
    /// Seed of every random input.
    seed: u64,
    /// Every `stride`-th token carries a non-zero output gradient (1: all tokens).
    stride: usize,
    /// Per mille of slots dropped (expert id −1).
    dropped_permille: u64,
    /// gpt-oss's block (interleaved gate/up, biases, its activation with this clamp boundary and
    /// the case's limit), or `None` for SwiGLU (split halves, no biases).
    gpt_oss: Option<ClampBoundary>,
    /// Boundary data: every fourth token's `x` is zero and a tenth of the gate/up bias entries
    /// are exactly `±limit` (gpt-oss cases only).
    at_limit: bool,
}

impl Block {
    /// The block's activation and gate/up layout.
    fn activation(&self) -> (Activation, GateUpLayout) {
        match self.gpt_oss {
            None => (
                Activation::SwiGlu { limit: self.limit },
                GateUpLayout::Split,
            ),
            Some(boundary) => (
                Activation::GptOss {
                    alpha: 1.702,
                    limit: self.limit.expect("gpt-oss cases set a limit"),
                    boundary,
                },
                GateUpLayout::Interleaved,
            ),
        }
    }
}

/// gpt-oss's block on the tiny shape, with the SwiGLU cases' limit and `boundary`.
fn tiny_gpt_oss(boundary: ClampBoundary, seed: u64) -> Block {
    Block {
        gpt_oss: Some(boundary),
        ..tiny(Some(LIMIT), seed)
    }
}

/// SPEC §6's DeepSeek-V4-style tiny block.
fn tiny(limit: Option<f32>, seed: u64) -> Block {
    Block {
        e: 8,
        h: 512,
        i: 256,
        top_k: 2,
        t: 16,
        r: 16,
        limit,
        seed,
        stride: 1,
        dropped_permille: 0,
        gpt_oss: None,
        at_limit: false,
    }
}

/// The large block: 64 experts, H = 2048, I = 1024, top-6 of 2048 tokens; the output gradient is
/// non-zero on every 128th token (16 tokens, 96 routed rows), which keeps the naive `f64` CPU
/// reference at about 2·10^9 multiply-adds (roughly 12 s in a release build, 45 s in a debug
/// build, per reference run). No clamp limit here: with ~10^5 `gu` elements feeding the checked
/// gradients, a few sit exactly at any limit, and a one-ulp GPU/reference difference there
/// flips a mask (a whole-term difference in a LoRA gradient summed over few rows).
fn large(seed: u64) -> Block {
    Block {
        e: 64,
        h: 2048,
        i: 1024,
        top_k: 6,
        t: 2048,
        r: 16,
        limit: None,
        seed,
        stride: 128,
        dropped_permille: 0,
        gpt_oss: None,
        at_limit: false,
    }
}

/// gpt-oss-20b's expert layer (E = 32, H = I = 2880, top-4: K = 2880 is 45 stages of 64 or 90 of
/// 32 — mxmoe's stages are never 128 deep, so no K tail — and down's N = 2880 leaves a 64-wide
/// tail in the 128-wide tiles) with
/// random weights in the checkpoint's interleaved layout, biases, LoRA r = 16 and 256 tokens, the
/// output gradient on every 32nd token (8 tokens, 32 routed rows for the naive reference, about
/// 2.5·10^9 multiply-adds). The model's own α and L = 7 (nothing is clamped at this scale, so no
/// value sits at the limit; the tiny cases cover the clamp and its boundary).
fn gpt_oss_20b_layer(seed: u64) -> Block {
    Block {
        e: 32,
        h: 2880,
        i: 2880,
        top_k: 4,
        t: 256,
        r: 16,
        limit: Some(7.0),
        seed,
        stride: 32,
        dropped_permille: 0,
        gpt_oss: Some(ClampBoundary::Strict),
        at_limit: false,
    }
}

/// LoRA scaling of both projections.
const SCALING: f32 = 0.5;

/// How the GPU runs the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// bf16 expert weights.
    Bf16,
    /// MXFP4 weights, Strategy B (decoded inside the K-loop).
    MxFused,
    /// MXFP4 weights, Strategy A (selective dequant to a compact bf16 buffer).
    MxSelective,
}

impl Path {
    fn strategy(self) -> Strategy {
        match self {
            Path::Bf16 | Path::MxFused => Strategy::Fused,
            Path::MxSelective => Strategy::SelectiveDequant,
        }
    }
}

/// Host inputs of a block case (every value already bf16).
struct Data {
    ids: Vec<i64>,
    gates: Vec<f32>,
    x: Vec<f32>,
    /// `[E, 2I, H]` bf16 bits.
    gate_up: Vec<u16>,
    /// `[E, H, I]` bf16 bits.
    down: Vec<u16>,
    a_up: Vec<f32>,
    b_up: Vec<f32>,
    a_down: Vec<f32>,
    b_down: Vec<f32>,
    dy: Vec<f32>,
    /// Tokens whose `dy` row is non-zero, ascending.
    checked: Vec<usize>,
    /// gpt-oss cases: the gate/up bias `[E, 2I]` and the down bias `[E, H]`.
    biases: Option<(Vec<f32>, Vec<f32>)>,
}

/// `experts·per_expert` values `scale·N(0, 1)` as bf16 bits: one generator per expert, experts
/// drawn in parallel (the large block has 4·10^8 weights).
fn normal_bits(experts: usize, per_expert: usize, scale: f32, seed: u64) -> Vec<u16> {
    let mut out = vec![0u16; experts * per_expert];
    std::thread::scope(|s| {
        for (e, chunk) in out.chunks_mut(per_expert).enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed.wrapping_mul(0x1_0000_0001).wrapping_add(e as u64));
                for v in chunk {
                    *v = f32_to_bf16_bits(scale * rng.normal());
                }
            });
        }
    });
    out
}

fn widen(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16_bits_to_f32(b)).collect()
}

fn draw(b: &Block) -> Data {
    let mut rng = Rng::new(b.seed);
    let logits: Vec<f32> = (0..b.t * b.e).map(|_| rng.normal()).collect();
    let (mut ids, gates) = route_softmax_topk(&logits, b.t, b.e, b.top_k, true).unwrap();
    for id in &mut ids {
        if b.dropped_permille > 0 && rng.below(1000) < b.dropped_permille {
            *id = DROPPED;
        }
    }
    let mut x = rng.normal_bf16(b.t * b.h, 1.0);
    if b.at_limit {
        for row in x.chunks_exact_mut(b.h).step_by(4) {
            row.fill(0.0);
        }
    }
    let er = b.e * b.r;
    let a_up = rng.normal_bf16(er * b.h, 0.05);
    let b_up = rng.normal_bf16(2 * b.i * er, 0.05);
    let a_down = rng.normal_bf16(er * b.i, 0.05);
    let b_down = rng.normal_bf16(b.h * er, 0.05);
    let checked: Vec<usize> = (0..b.t).step_by(b.stride).collect();
    let mut dy = rng.normal_bf16(b.t * b.h, 1.0);
    for (t, row) in dy.chunks_exact_mut(b.h).enumerate() {
        if t % b.stride != 0 {
            row.fill(0.0);
        }
    }
    let gate_up = normal_bits(b.e, 2 * b.i * b.h, 1.0 / (b.h as f32).sqrt(), b.seed ^ 0x6A);
    let down = normal_bits(b.e, b.h * b.i, 1.0 / (b.i as f32).sqrt(), b.seed ^ 0xD0);
    let biases = b.gpt_oss.map(|_| {
        let mut gu = rng.normal_bf16(b.e * 2 * b.i, 0.5);
        if b.at_limit {
            let lim = b.limit.expect("gpt-oss cases set a limit");
            for (j, v) in gu.iter_mut().enumerate().filter(|(j, _)| j % 10 == 3) {
                *v = if j % 20 == 3 { lim } else { -lim };
            }
        }
        (gu, rng.normal_bf16(b.e * b.h, 0.5))
    });
    Data {
        ids,
        gates,
        x,
        gate_up,
        down,
        a_up,
        b_up,
        a_down,
        b_down,
        dy,
        checked,
        biases,
    }
}

/// MXFP4 quantization of bf16 bits `[E, N, K]` and its dequantized f32 values, experts in
/// parallel (blocks never cross an expert, so this equals one call over the whole tensor).
fn quantize(bits: &[u16], e: usize, n: usize, k: usize) -> (MxWeights, Vec<f32>) {
    let parts: Vec<(Vec<u8>, Vec<u8>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = bits
            .chunks(n * k)
            .map(|chunk| {
                s.spawn(move || {
                    let mx = quantize_mxfp4_bf16(chunk, 1, n, k).unwrap();
                    let deq = dequantize_f32(&mx);
                    let (_, packed, scales) = mx.into_parts();
                    (packed, scales, deq)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut packed, mut scales, mut deq) = (Vec::new(), Vec::new(), Vec::new());
    for (p, sc, d) in parts {
        packed.extend(p);
        scales.extend(sc);
        deq.extend(d);
    }
    (
        MxWeights::from_shape(MxShape::new(e, n, k).unwrap(), packed, scales).unwrap(),
        deq,
    )
}

/// The block's results as f32, in the GPU's layouts.
#[derive(Debug, PartialEq)]
struct Results {
    y: Vec<f32>,
    dx: Vec<f32>,
    da_up: Vec<f32>,
    db_up: Vec<f32>,
    da_down: Vec<f32>,
    db_down: Vec<f32>,
    d_gates: Vec<f32>,
}

/// Runs forward and backward on the GPU.
fn run_gpu(
    gpu: &Runtime,
    b: &Block,
    d: &Data,
    path: Path,
    mx: Option<&(MxWeights, MxWeights)>,
) -> Results {
    let routing = DeviceRouting::from_host_ids(gpu, &d.ids, b.t, b.top_k, b.e).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &d.x, b.t, b.h).unwrap();
    let gates = Bf16Matrix::from_f32(gpu, &d.gates, b.t, b.top_k).unwrap();
    let er = b.e * b.r;
    let lora = |a: &[f32], a_cols: usize, bm: &[f32], b_rows: usize| LoraWeights {
        a: Bf16Matrix::from_f32(gpu, a, er, a_cols).unwrap(),
        b: Bf16Matrix::from_f32(gpu, bm, b_rows, er).unwrap(),
        rank: b.r,
        scaling: SCALING,
    };
    let lora_up = lora(&d.a_up, b.h, &d.b_up, 2 * b.i);
    let lora_down = lora(&d.a_down, b.i, &d.b_down, b.h);
    let (dense_gu, dense_dn, mx_gu, mx_dn);
    let (w_gu, w_dn) = match (path, mx) {
        (Path::Bf16, _) => {
            dense_gu = DenseExperts::from_bits(gpu, &d.gate_up, b.e, 2 * b.i, b.h).unwrap();
            dense_dn = DenseExperts::from_bits(gpu, &d.down, b.e, b.h, b.i).unwrap();
            (
                ExpertWeights::Bf16(&dense_gu),
                ExpertWeights::Bf16(&dense_dn),
            )
        }
        (Path::MxFused | Path::MxSelective, Some((gu, dn))) => {
            mx_gu = MxExperts::upload(gpu, gu).unwrap();
            mx_dn = MxExperts::upload(gpu, dn).unwrap();
            (ExpertWeights::Mxfp4(&mx_gu), ExpertWeights::Mxfp4(&mx_dn))
        }
        (_, None) => panic!("the MXFP4 paths need quantized weights"),
    };
    let biases = d.biases.as_ref().map(|(gu, dn)| {
        (
            Bf16Matrix::from_f32(gpu, gu, b.e, 2 * b.i).unwrap(),
            Bf16Matrix::from_f32(gpu, dn, b.e, b.h).unwrap(),
        )
    });
    let (activation, layout) = b.activation();
    let block = MoeBlock {
        lora_gate_up: Some(&lora_up),
        lora_down: Some(&lora_down),
        activation,
        layout,
        gate_up_bias: biases.as_ref().map(|(gu, _)| gu),
        down_bias: biases.as_ref().map(|(_, dn)| dn),
        strategy: path.strategy(),
        ..MoeBlock::new(w_gu, w_dn)
    };
    let (y, saved) = block.forward(gpu, &x, &routing, &gates).unwrap();
    assert_eq!((y.rows(), y.cols()), (b.t, b.h));
    assert_eq!(
        saved.strategies(),
        (path.strategy(), path.strategy()),
        "the paths that ran ({path:?})"
    );
    let dy = Bf16Matrix::from_f32(gpu, &d.dy, b.t, b.h).unwrap();
    let MoeGrads {
        dx,
        gate_up,
        down,
        d_gates,
    } = backward(gpu, &saved, &dy).unwrap();
    let (up, dn) = (
        gate_up.expect("gate_up LoRA gradients"),
        down.expect("down LoRA gradients"),
    );
    let get = |m: &Bf16Matrix| m.to_f32(gpu).unwrap();
    Results {
        y: get(&y),
        dx: get(&dx),
        da_up: get(&up.da),
        db_up: get(&up.db),
        da_down: get(&dn.da),
        db_down: get(&dn.db),
        d_gates: get(&d_gates),
    }
}

/// The CPU block reference on the checked tokens (all of them for `stride == 1`), laid out like
/// [`Results`]: `y` only on the checked rows, `dx` and `d_gates` with zero rows elsewhere.
fn reference(b: &Block, d: &Data, w_gu: &[f32], w_dn: &[f32]) -> (Results, Vec<usize>) {
    let rows = |v: &[f32], width: usize| -> Vec<f32> {
        d.checked
            .iter()
            .flat_map(|&t| v[t * width..][..width].iter().copied())
            .collect()
    };
    let ts = d.checked.len();
    let ids: Vec<i64> = d
        .checked
        .iter()
        .flat_map(|&t| d.ids[t * b.top_k..][..b.top_k].iter().copied())
        .collect();
    let routing = flatten_sort_count(&ids, ts, b.top_k, b.e).unwrap();
    let (x, gates, dy) = (rows(&d.x, b.h), rows(&d.gates, b.top_k), rows(&d.dy, b.h));
    let p = MoeProblem {
        x: &x,
        num_experts: b.e,
        hidden: b.h,
        intermediate: b.i,
        gate_up: w_gu,
        down: w_dn,
        lora_gate_up: Some(RefLora {
            a: &d.a_up,
            b: &d.b_up,
            rank: b.r,
            scaling: SCALING,
        }),
        lora_down: Some(RefLora {
            a: &d.a_down,
            b: &d.b_down,
            rank: b.r,
            scaling: SCALING,
        }),
        gates: &gates,
        activation: b.activation().0,
        layout: b.activation().1,
        gate_up_bias: d.biases.as_ref().map(|(gu, _)| gu.as_slice()),
        down_bias: d.biases.as_ref().map(|(_, dn)| dn.as_slice()),
    };
    let (f, g) = moe_forward_backward(&p, &routing, &dy, Rounding::Bf16).unwrap();
    let scatter = |v: &[f32], width: usize| -> Vec<f32> {
        let mut full = vec![0f32; b.t * width];
        for (j, &t) in d.checked.iter().enumerate() {
            full[t * width..][..width].copy_from_slice(&v[j * width..][..width]);
        }
        full
    };
    let (up, dn) = (g.gate_up.unwrap(), g.down.unwrap());
    let results = Results {
        y: f.y,
        dx: scatter(&g.dx, b.h),
        da_up: up.da,
        db_up: up.db,
        da_down: dn.da,
        db_down: dn.db,
        d_gates: scatter(&g.d_gates, b.top_k),
    };
    (results, d.checked.clone())
}

/// Compares every tensor (`y` on the checked rows), naming the worst element on failure.
fn compare(b: &Block, path: Path, got: &Results, want: &Results, checked: &[usize]) {
    let tag = format!("{path:?} {b:?}");
    let y: Vec<f32> = checked
        .iter()
        .flat_map(|&t| got.y[t * b.h..][..b.h].iter().copied())
        .collect();
    for (name, g, w) in [
        ("y", &y, &want.y),
        ("dx", &got.dx, &want.dx),
        ("dA gate_up", &got.da_up, &want.da_up),
        ("dB gate_up", &got.db_up, &want.db_up),
        ("dA down", &got.da_down, &want.da_down),
        ("dB down", &got.db_down, &want.db_down),
        ("d_gates", &got.d_gates, &want.d_gates),
    ] {
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max > 0.0, "{name}: the reference is all zeros ({tag})");
        assert_close(&format!("{name} {tag}"), g, w, ATOL_FRAC * max, RTOL);
    }
}

/// Runs the block on every path in `paths` and compares each with the block reference on the
/// weights it effectively multiplies by (the bf16 values, or their MXFP4 dequantization).
fn check(b: Block, paths: &[Path]) {
    let Some(gpu) = gpu() else { return };
    let d = draw(&b);
    let needs_mx = paths.iter().any(|&p| p != Path::Bf16);
    let mx = needs_mx.then(|| {
        let (gu, gu_deq) = quantize(&d.gate_up, b.e, 2 * b.i, b.h);
        let (dn, dn_deq) = quantize(&d.down, b.e, b.h, b.i);
        ((gu, dn), (gu_deq, dn_deq))
    });
    let mut bf16_reference = None;
    let mut mx_reference = None;
    for &path in paths {
        let got = run_gpu(gpu, &b, &d, path, mx.as_ref().map(|(w, _)| w));
        let (want, checked) = match path {
            Path::Bf16 => bf16_reference
                .get_or_insert_with(|| reference(&b, &d, &widen(&d.gate_up), &widen(&d.down))),
            Path::MxFused | Path::MxSelective => {
                let (_, (gu_deq, dn_deq)) = mx.as_ref().expect("quantized above");
                mx_reference.get_or_insert_with(|| reference(&b, &d, gu_deq, dn_deq))
            }
        };
        compare(&b, path, &got, want, checked);
    }
}

/// One parity test per row, `name: block, [paths];` ([`check`] on every path).
macro_rules! parity_tests {
    ($($name:ident: $block:expr, [$($path:ident),+];)+) => {
        $(
            #[test]
            fn $name() {
                check($block, &[$(Path::$path),+]);
            }
        )+
    };
}

parity_tests! {
    tiny_block_bf16_matches_reference: tiny(None, 42), [Bf16];
    tiny_block_bf16_with_clamp_limit_matches_reference: tiny(Some(LIMIT), 43), [Bf16];
    tiny_block_mxfp4_fused_matches_reference: tiny(None, 44), [MxFused];
    tiny_block_mxfp4_fused_with_clamp_limit_matches_reference: tiny(Some(LIMIT), 45), [MxFused];
    tiny_block_mxfp4_selective_matches_reference: tiny(None, 46), [MxSelective];
    tiny_block_mxfp4_selective_with_clamp_limit_matches_reference:
        tiny(Some(LIMIT), 47), [MxSelective];
    tiny_block_with_dropped_slots_matches_reference:
        Block { dropped_permille: 200, ..tiny(Some(LIMIT), 48) }, [Bf16, MxFused];
    large_block_bf16_matches_reference: large(50), [Bf16];
    large_block_mxfp4_fused_and_selective_match_reference:
        large(51), [MxFused, MxSelective];
    tiny_gpt_oss_block_matches_reference_on_every_path:
        tiny_gpt_oss(ClampBoundary::Strict, 80), [Bf16, MxFused, MxSelective];
    tiny_gpt_oss_block_with_dropped_slots_matches_reference:
        Block { dropped_permille: 200, ..tiny_gpt_oss(ClampBoundary::Strict, 81) },
        [Bf16, MxFused, MxSelective];
    gpt_oss_strict_boundary_at_exactly_the_limit_matches_reference:
        Block { at_limit: true, ..tiny_gpt_oss(ClampBoundary::Strict, 82) },
        [Bf16, MxFused, MxSelective];
    gpt_oss_inclusive_boundary_at_exactly_the_limit_matches_reference:
        Block { at_limit: true, ..tiny_gpt_oss(ClampBoundary::Inclusive, 83) }, [Bf16, MxFused];
    gpt_oss_20b_layer_shape_matches_reference:
        gpt_oss_20b_layer(86), [MxFused, MxSelective];
    gpt_oss_block_with_k_and_n_tails_matches_reference:
        Block { h: 192, i: 160, e: 8, top_k: 4, t: 24, ..tiny_gpt_oss(ClampBoundary::Strict, 84) },
        [Bf16, MxFused, MxSelective];
}

#[test]
fn the_boundary_rule_and_the_biases_change_the_results() {
    // With gate/up values exactly at ±L, the strict and inclusive rules give different
    // gradients; without the biases, different outputs. The parity tests above see each rule
    // and the biases only through the reference, so this pins that both are real inputs.
    let Some(gpu) = gpu() else { return };
    let strict = Block {
        at_limit: true,
        ..tiny_gpt_oss(ClampBoundary::Strict, 85)
    };
    let inclusive = Block {
        gpt_oss: Some(ClampBoundary::Inclusive),
        ..strict
    };
    let d = draw(&strict);
    let a = run_gpu(gpu, &strict, &d, Path::Bf16, None);
    let b = run_gpu(gpu, &inclusive, &d, Path::Bf16, None);
    assert_eq!(a.y, b.y, "the rule changes only gradients");
    assert_ne!(a.dx, b.dx, "exact ±L values must see the boundary rule");
    let no_bias = Data {
        biases: d
            .biases
            .as_ref()
            .map(|(gu, dn)| (vec![0.0; gu.len()], vec![0.0; dn.len()])),
        ..draw(&strict)
    };
    let c = run_gpu(gpu, &strict, &no_bias, Path::Bf16, None);
    assert_ne!(a.y, c.y);
}

#[test]
fn repeat_runs_are_bitwise_equal() {
    let Some(gpu) = gpu() else { return };
    let b = tiny(Some(LIMIT), 60);
    let d = draw(&b);
    let (gu, _) = quantize(&d.gate_up, b.e, 2 * b.i, b.h);
    let (dn, _) = quantize(&d.down, b.e, b.h, b.i);
    let mx = (gu, dn);
    for path in [Path::Bf16, Path::MxFused, Path::MxSelective] {
        let first = run_gpu(gpu, &b, &d, path, Some(&mx));
        let second = run_gpu(gpu, &b, &d, path, Some(&mx));
        let bits = |r: &Results| {
            [
                &r.y, &r.dx, &r.da_up, &r.db_up, &r.da_down, &r.db_down, &r.d_gates,
            ]
            .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(bits(&first), bits(&second), "{path:?}");
    }
}

#[test]
fn clamp_limit_changes_the_output_where_it_cuts() {
    // With a tiny limit nearly every element is clamped, so the results must differ from the
    // unclamped block; a kernel ignoring the limit would pass the parity tests only if the
    // reference ignored it too.
    let Some(gpu) = gpu() else { return };
    let b = tiny(None, 61);
    let tight = Block {
        limit: Some(0.25),
        ..b
    };
    let d = draw(&b);
    let free = run_gpu(gpu, &b, &d, Path::Bf16, None);
    let clamped = run_gpu(gpu, &tight, &d, Path::Bf16, None);
    assert_ne!(free.y, clamped.y);
    assert_ne!(free.dx, clamped.dx);
    // The forward must match the reference. The gradients are not compared here: with a limit
    // this tight, many gate/up values sit within one bf16 ulp of it, and the clamp's gradient
    // mask flips on a one-ulp difference between the GPU's and the reference's `gu` (a property
    // of the clamp, not an error); the limit-2.5 parity tests cover the gradients.
    let (want, checked) = reference(&tight, &d, &widen(&d.gate_up), &widen(&d.down));
    let y: Vec<f32> = checked
        .iter()
        .flat_map(|&t| clamped.y[t * tight.h..][..tight.h].iter().copied())
        .collect();
    let max = want.y.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_close("y (tight clamp)", &y, &want.y, ATOL_FRAC * max, RTOL);
}

#[test]
fn bad_shapes_are_typed_errors_before_any_launch() {
    let Some(gpu) = gpu() else { return };
    let b = Block {
        e: 4,
        h: 64,
        // 2I ≠ H, so a bias of the other projection's shape is a shape error.
        i: 40,
        top_k: 2,
        t: 8,
        r: 4,
        limit: None,
        seed: 70,
        stride: 1,
        dropped_permille: 0,
        gpt_oss: None,
        at_limit: false,
    };
    let d = draw(&b);
    let routing = DeviceRouting::from_host_ids(gpu, &d.ids, b.t, b.top_k, b.e).unwrap();
    let x = Bf16Matrix::from_f32(gpu, &d.x, b.t, b.h).unwrap();
    let gates = Bf16Matrix::from_f32(gpu, &d.gates, b.t, b.top_k).unwrap();
    let gu = DenseExperts::from_bits(gpu, &d.gate_up, b.e, 2 * b.i, b.h).unwrap();
    let dn = DenseExperts::from_bits(gpu, &d.down, b.e, b.h, b.i).unwrap();
    // down_proj stored as [E, I, H] (transposed) instead of [E, H, I].
    let dn_t = DenseExperts::from_bits(gpu, &d.down, b.e, b.i, b.h).unwrap();
    let ok = MoeBlock::new(ExpertWeights::Bf16(&gu), ExpertWeights::Bf16(&dn));
    assert!(ok.forward(gpu, &x, &routing, &gates).is_ok());
    assert_shape_error(
        MoeBlock {
            down: ExpertWeights::Bf16(&dn_t),
            ..ok
        }
        .forward(gpu, &x, &routing, &gates),
        "down_proj",
    );
    let x_bad = Bf16Matrix::from_f32(gpu, &d.x, b.t * 2, b.h / 2).unwrap();
    assert_shape_error(ok.forward(gpu, &x_bad, &routing, &gates), "x");
    let gates_bad = Bf16Matrix::from_f32(gpu, &d.gates, b.top_k, b.t).unwrap();
    assert_shape_error(ok.forward(gpu, &x, &routing, &gates_bad), "gates");
    for lim in [0.0, f32::NAN, f32::INFINITY] {
        let clamped = MoeBlock {
            activation: Activation::SwiGlu { limit: Some(lim) },
            ..ok
        };
        assert_invalid_argument(clamped.forward(gpu, &x, &routing, &gates), "limit");
        let alpha = MoeBlock {
            activation: Activation::GptOss {
                alpha: lim,
                limit: 7.0,
                boundary: ClampBoundary::Strict,
            },
            ..ok
        };
        assert_invalid_argument(alpha.forward(gpu, &x, &routing, &gates), "alpha");
    }
    // Biases of the wrong shapes: [E, H] as the gate/up bias, [E, 2I] as the down bias.
    let bias_h = Bf16Matrix::from_f32(gpu, &vec![0.0; b.e * b.h], b.e, b.h).unwrap();
    let bias_2i = Bf16Matrix::from_f32(gpu, &vec![0.0; b.e * 2 * b.i], b.e, 2 * b.i).unwrap();
    let result = MoeBlock::gpt_oss(ok.gate_up, ok.down, &bias_2i, &bias_h)
        .forward(gpu, &x, &routing, &gates);
    assert!(result.is_ok(), "the right bias shapes run");
    let result =
        MoeBlock::gpt_oss(ok.gate_up, ok.down, &bias_h, &bias_h).forward(gpu, &x, &routing, &gates);
    assert_shape_error(result, "gate_up bias");
    let result = MoeBlock::gpt_oss(ok.gate_up, ok.down, &bias_2i, &bias_2i)
        .forward(gpu, &x, &routing, &gates);
    assert_shape_error(result, "down bias");
    // LoRA of the down projection given to the gate/up projection.
    let lora_down = LoraWeights {
        a: Bf16Matrix::from_f32(gpu, &d.a_down, b.e * b.r, b.i).unwrap(),
        b: Bf16Matrix::from_f32(gpu, &d.b_down, b.h, b.e * b.r).unwrap(),
        rank: b.r,
        scaling: SCALING,
    };
    let misplaced = MoeBlock {
        lora_gate_up: Some(&lora_down),
        ..ok
    };
    let result = misplaced.forward(gpu, &x, &routing, &gates);
    assert_shape_error(result, "gate_up LoRA A");
    // A dy of the wrong shape.
    let (_, saved) = ok.forward(gpu, &x, &routing, &gates).unwrap();
    let dy_bad = Bf16Matrix::from_f32(gpu, &d.dy, b.h, b.t).unwrap();
    assert_shape_error(backward(gpu, &saved, &dy_bad), "dy");
    // The routing must have as many experts as the weights.
    let routing_more = DeviceRouting::from_host_ids(gpu, &d.ids, b.t, b.top_k, b.e + 1).unwrap();
    let result = ok.forward(gpu, &x, &routing_more, &gates);
    assert_shape_error(result, "gate_up_proj");
}
