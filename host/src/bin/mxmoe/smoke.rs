//! `mxmoe smoke`: a quick end-to-end check on small problems.
//!
//! Two calls of the LoRA-fused expert linear in the shapes of a gated MLP (SPEC §3.5): an "up"
//! projection (token-ordered `x [T, K]`, grouped output) and a "down" projection (grouped
//! `x [T·k, K]`, scattered output combined by the gates). Each is run by the CPU reference
//! ([`mxmoe::reference`], [`mxmoe::reference::Rounding::Bf16`]) and, when a device is present, by
//! every GPU path ([`Strategy::ALL`]); forward output and all gradients are compared. The weights
//! also go through an MXFP4 quantize → dequantize round trip ([`mxmoe::mxfp4`]).
//!
//! Then the whole gated MoE MLP block of SPEC §6 ([`mxmoe::moe::MoeBlock`], the DeepSeek-V4-style
//! tiny block: gate/up projection → SwiGLU with the clamp limit → gated down projection, LoRA on
//! both projections) against the CPU block reference ([`mxmoe::reference::moe`]) on the bf16,
//! MXFP4 fused (Strategy B) and MXFP4 selective (Strategy A) paths; the router is
//! [`mxmoe::moe::route_softmax_topk`].
//!
//! Tolerance per tensor (as `tests/tests/gpu_linear.rs` and `tests/tests/gpu_moe.rs`):
//! `|gpu − ref| ≤ atol + rtol·|ref|` with `rtol = 1e-2` (about two bf16 ulps: outputs are rounded
//! once, and f32 sums in another order can cross one rounding boundary, the rounded XA/YB
//! intermediates one more) and `atol = 4e-3·max|ref|` (cancellation in long sums).

use anyhow::Context as _;
use mxmoe::Runtime;
use mxmoe::mxfp4::{dequantize_f32, quantize_mxfp4_bf16};
use mxmoe::op::RowOrder;
use mxmoe::shared::bf16::bf16_bits_to_f32;

use crate::env::{NoGpu, commit, open_gpu, utc_now};
use crate::problem::{DeviceProblem, HostProblem, Outputs, Seeds, Shape, timed};
use crate::rng::normal_bf16_bits;
use crate::routing_gen::{RoutingKind, active_experts};
use crate::strategy::{HostWeights, Strategy};

/// Relative tolerance (see the module documentation).
const RTOL: f32 = 1e-2;
/// Absolute tolerance as a fraction of the reference tensor's largest magnitude.
const ATOL_FRAC: f32 = 4e-3;

/// Options of `mxmoe smoke`.
#[derive(Debug, clap::Args)]
pub struct SmokeArgs {
    /// Seed of the random problems (weights, routing, activations, LoRA, output gradient).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CUDA device ordinal (an error if it does not exist). Default: device 0, or the CPU
    /// reference alone when there is no GPU.
    #[arg(long, value_name = "N")]
    pub device: Option<usize>,
}

/// A named smoke case.
struct Case {
    name: &'static str,
    shape: Shape,
}

/// The two calls of a small gated MLP (hidden 512, expert width 256, 8 experts, top-2, rank 16).
fn cases() -> [Case; 2] {
    let base = Shape {
        experts: 8,
        k: 512,
        n: 256,
        tokens: 64,
        top_k: 2,
        rank: 16,
        scaling: 0.5,
        input: RowOrder::Scattered,
        output: RowOrder::Grouped,
        gates: false,
    };
    [
        Case {
            name: "up",
            shape: base,
        },
        Case {
            name: "down",
            shape: Shape {
                k: 256,
                n: 512,
                input: RowOrder::Grouped,
                output: RowOrder::Scattered,
                gates: true,
                ..base
            },
        },
    ]
}

/// How one GPU tensor compares with the reference.
struct Comparison {
    case: &'static str,
    path: &'static str,
    tensor: &'static str,
    elements: usize,
    max_ref: f32,
    max_abs: f32,
    /// Largest `|gpu − ref| / |ref|` over elements with `|ref| ≥ atol` (smaller references are
    /// judged by `atol` alone, so their ratios say nothing).
    max_rel: f32,
    atol: f32,
    /// Largest `|gpu − ref| / (atol + rtol·|ref|)`: the tensor passes when this is ≤ 1.
    worst: f32,
    note: Option<String>,
}

impl Comparison {
    fn passed(&self) -> bool {
        self.note.is_none() && self.worst <= 1.0
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn compare(
    case: &'static str,
    path: &'static str,
    tensor: &'static str,
    got: &[f32],
    want: &[f32],
) -> Comparison {
    let max_ref = max_abs(want);
    let atol = ATOL_FRAC * max_ref + 1e-6;
    let mut c = Comparison {
        case,
        path,
        tensor,
        elements: want.len(),
        max_ref,
        max_abs: 0.0,
        max_rel: 0.0,
        atol,
        worst: 0.0,
        note: None,
    };
    if got.len() != want.len() {
        c.note = Some(format!(
            "GPU gave {} elements, the reference {}",
            got.len(),
            want.len()
        ));
        return c;
    }
    for (&g, &w) in got.iter().zip(want) {
        let d = (g - w).abs();
        if !d.is_finite() {
            c.note = Some(format!(
                "non-finite GPU value {g} where the reference has {w}"
            ));
            c.worst = f32::INFINITY;
            continue;
        }
        c.max_abs = c.max_abs.max(d);
        if w.abs() >= atol {
            c.max_rel = c.max_rel.max(d / w.abs());
        }
        c.worst = c.worst.max(d / (atol + RTOL * w.abs()));
    }
    c
}

/// One MXFP4 round trip of a case's weights.
struct RoundTrip {
    case: &'static str,
    elements: usize,
    bf16_bytes: usize,
    mx_bytes: usize,
    max_abs: f32,
    rel_rms: f64,
    /// Elements whose error exceeds the FLOOR-mode bound `2·2^(b−127)` of their block.
    over_bound: usize,
    quantize_ms: f64,
    dequantize_ms: f64,
}

/// Quantizes `w_bits [E, N, K]` to MXFP4 and back, and checks every element against the FLOOR
/// bound: with scale `d = 2^(b−127)` the block maximum lies in `[4d, 8d)`, codes are at most `1·d`
/// apart below `4d` and `2d` apart above, and values in `(6d, 8d)` saturate to `6d`, so
/// `|w − ŵ| ≤ 2d` for every element.
fn round_trip(case: &'static str, w_bits: &[u16], shape: &Shape) -> anyhow::Result<RoundTrip> {
    let (e, n, k) = (shape.experts, shape.n, shape.k);
    let (mx, quantize_ms) = timed(|| quantize_mxfp4_bf16(w_bits, e, n, k));
    let mx = mx.context("the MXFP4 quantizer rejected the weights")?;
    let (deq, dequantize_ms) = timed(|| dequantize_f32(&mx));
    let scales = mx.scales();
    let (mut max_abs, mut err2, mut ref2, mut over_bound) = (0f32, 0f64, 0f64, 0usize);
    for (i, (&b, &q)) in w_bits.iter().zip(&deq).enumerate() {
        let w = bf16_bits_to_f32(b);
        let d = (w - q).abs();
        max_abs = max_abs.max(d);
        err2 += f64::from(d) * f64::from(d);
        ref2 += f64::from(w) * f64::from(w);
        let scale = 2f64.powi(i32::from(scales[i / 32]) - 127);
        // NaN errors count as over the bound.
        let within = f64::from(d) <= 2.0 * scale;
        if !within {
            over_bound += 1;
        }
    }
    Ok(RoundTrip {
        case,
        elements: w_bits.len(),
        bf16_bytes: w_bits.len() * 2,
        mx_bytes: mx.packed().len() + mx.scales().len(),
        max_abs,
        rel_rms: (err2 / ref2.max(f64::MIN_POSITIVE)).sqrt(),
        over_bound,
        quantize_ms,
        dequantize_ms,
    })
}

/// Timings of one case and path.
struct Timing {
    case: &'static str,
    path: &'static str,
    cpu_fwd_ms: f64,
    cpu_bwd_ms: f64,
    gpu_fwd_ms: Option<f64>,
    gpu_bwd_ms: Option<f64>,
}

/// Reference results per distinct reference weights (two paths with the same effective weights
/// share one reference run).
struct ReferenceCache {
    entries: Vec<(Vec<f32>, Outputs, f64, f64)>,
}

impl ReferenceCache {
    fn get(&mut self, problem: &HostProblem, w: Vec<f32>) -> anyhow::Result<(&Outputs, f64, f64)> {
        let index = match self.entries.iter().position(|(cached, ..)| *cached == w) {
            Some(i) => i,
            None => {
                let (out, fwd_ms, bwd_ms) = problem.reference(&w)?;
                self.entries.push((w, out, fwd_ms, bwd_ms));
                self.entries.len() - 1
            }
        };
        let (_, out, fwd_ms, bwd_ms) = &self.entries[index];
        Ok((out, *fwd_ms, *bwd_ms))
    }
}

/// Runs the smoke test; `Ok(false)` means a comparison failed.
pub fn run(args: &SmokeArgs) -> anyhow::Result<bool> {
    let gpu = open_gpu(args.device)?;
    if let Ok(g) = &gpu {
        // A checking run: an output element a kernel leaves unwritten reads back as NaN.
        g.set_poison_outputs(true);
    }
    println!("# mxmoe smoke");
    println!();
    println!("seed {}, commit {}, {}", args.seed, commit(), utc_now());
    match &gpu {
        Ok(g) => println!("device {}: {}", g.ordinal(), g.limits().name),
        Err(reason) => println!("{reason}: running the CPU reference only"),
    }
    println!();

    let mut comparisons = Vec::new();
    let mut trips = Vec::new();
    let mut timings = Vec::new();
    let mut summaries = Vec::new();
    for (index, case) in cases().into_iter().enumerate() {
        let s = case.shape;
        let seed = args.seed.wrapping_mul(16).wrapping_add(index as u64 * 4);
        let seeds = Seeds {
            routing: seed + 1,
            lora: seed + 2,
            x: seed + 3,
            dy: seed + 4,
        };
        let problem = HostProblem::draw(s, RoutingKind::Dense, seeds)?;
        // W_store = randn(E, N, K)/√K in bf16 (SPEC §8's scaling keeps outputs O(1)).
        let w_bits = normal_bf16_bits(s.experts * s.n * s.k, 1.0 / (s.k as f32).sqrt(), seed, 0);
        trips.push(round_trip(case.name, &w_bits, &s)?);
        let weights = HostWeights::new(w_bits, s.experts, s.n, s.k);
        let mut cache = ReferenceCache {
            entries: Vec::new(),
        };

        let Ok(gpu) = &gpu else {
            let w = Strategy::Bf16.reference_weights(&weights)?;
            let (reference, fwd_ms, bwd_ms) = cache.get(&problem, w)?;
            summaries.push((
                case.name,
                active_experts(&problem.ids, s.experts),
                reference.clone(),
            ));
            timings.push(Timing {
                case: case.name,
                path: "cpu reference",
                cpu_fwd_ms: fwd_ms,
                cpu_bwd_ms: bwd_ms,
                gpu_fwd_ms: None,
                gpu_bwd_ms: None,
            });
            continue;
        };
        for &strategy in Strategy::ALL {
            let w = strategy.reference_weights(&weights)?;
            let (reference, cpu_fwd_ms, cpu_bwd_ms) = cache.get(&problem, w)?;
            let (got, gpu_fwd_ms, gpu_bwd_ms) = run_gpu(gpu, strategy, &problem, &weights)
                .with_context(|| {
                    format!(
                        "the {} path failed on the {} case",
                        strategy.label(),
                        case.name
                    )
                })?;
            for ((tensor, want), (_, have)) in reference.tensors().into_iter().zip(got.tensors()) {
                comparisons.push(compare(case.name, strategy.label(), tensor, have, want));
            }
            if reference.tensors().len() != got.tensors().len() {
                let mut c = compare(case.name, strategy.label(), "(gradients)", &[], &[]);
                c.note =
                    Some("the GPU returned a different set of gradients than the reference".into());
                comparisons.push(c);
            }
            timings.push(Timing {
                case: case.name,
                path: strategy.label(),
                cpu_fwd_ms,
                cpu_bwd_ms,
                gpu_fwd_ms: Some(gpu_fwd_ms),
                gpu_bwd_ms: Some(gpu_bwd_ms),
            });
        }
    }

    let moe = moe_block(args.seed, &gpu)?;
    comparisons.extend(moe.comparisons);
    timings.extend(moe.timings);

    print_cases();
    print_moe_case();
    let trips_ok = print_round_trips(&trips);
    let parity_ok = if gpu.is_ok() {
        print_comparisons(&comparisons)
    } else {
        print_summaries(&summaries);
        print_moe_summary(&moe.reference);
        true
    };
    print_timings(&timings);
    let ok = trips_ok && parity_ok;
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

/// Uploads, runs forward and backward once (synchronized wall clock each), downloads.
fn run_gpu(
    gpu: &Runtime,
    strategy: Strategy,
    problem: &HostProblem,
    weights: &HostWeights,
) -> anyhow::Result<(Outputs, f64, f64)> {
    let device = DeviceProblem::upload(gpu, strategy, problem, weights)?;
    let start = std::time::Instant::now();
    let mut fwd_ms = 0.0;
    let (fwd, grads) = device.forward_backward(gpu, || {
        gpu.synchronize()
            .context("the forward pass did not complete")?;
        fwd_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(())
    })?;
    gpu.synchronize()
        .context("the backward pass did not complete")?;
    let bwd_ms = start.elapsed().as_secs_f64() * 1e3 - fwd_ms;
    Ok((device.download(gpu, &fwd, &grads)?, fwd_ms, bwd_ms))
}

fn print_cases() {
    println!("## Problems");
    println!();
    println!("| case | E | K | N | T | top_k | r | s | x | out | gates |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|");
    for c in cases() {
        let s = c.shape;
        let order = RowOrder::name;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            s.experts,
            s.k,
            s.n,
            s.tokens,
            s.top_k,
            s.rank,
            s.scaling,
            order(s.input),
            order(s.output),
            if s.gates { "yes" } else { "no" }
        );
    }
    println!();
    println!(
        "Data: W_store = randn/√K, x = randn, A, B = 0.01·randn, routing = top-k of softmax(randn(T, E)), dy = randn (bf16)."
    );
    println!();
}

fn print_round_trips(trips: &[RoundTrip]) -> bool {
    println!("## MXFP4 round trip (quantize → dequantize, torchao FLOOR)");
    println!();
    println!(
        "| case | elements | bf16 bytes | MXFP4 bytes | max abs err | rel RMS err | over 2·scale bound | quantize ms | dequantize ms | status |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut ok = true;
    for t in trips {
        let pass = t.over_bound == 0;
        ok &= pass;
        println!(
            "| {} | {} | {} | {} | {:.3e} | {:.3e} | {} | {:.2} | {:.2} | {} |",
            t.case,
            t.elements,
            t.bf16_bytes,
            t.mx_bytes,
            t.max_abs,
            t.rel_rms,
            t.over_bound,
            t.quantize_ms,
            t.dequantize_ms,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    println!();
    ok
}

fn print_comparisons(comparisons: &[Comparison]) -> bool {
    println!(
        "## GPU vs CPU reference (tolerance atol + rtol·|ref|, atol = {ATOL_FRAC:e}·max|ref|, rtol = {RTOL:e})"
    );
    println!();
    println!(
        "| case | path | tensor | elements | max abs ref | max abs err | max rel err | atol | err / tol | status |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---|");
    let mut ok = true;
    for c in comparisons {
        ok &= c.passed();
        let status = match &c.note {
            Some(note) => format!("FAIL ({note})"),
            None if c.passed() => "PASS".into(),
            None => "FAIL".into(),
        };
        println!(
            "| {} | {} | {} | {} | {:.3e} | {:.3e} | {:.3e} | {:.2e} | {:.3} | {status} |",
            c.case, c.path, c.tensor, c.elements, c.max_ref, c.max_abs, c.max_rel, c.atol, c.worst
        );
    }
    println!();
    ok
}

fn print_summaries(summaries: &[(&'static str, usize, Outputs)]) {
    println!("## CPU reference results (no GPU to compare with)");
    println!();
    println!("| case | active experts | tensor | elements | max abs | RMS |");
    println!("|---|---:|---|---:|---:|---:|");
    for (case, active, outputs) in summaries {
        for (tensor, values) in outputs.tensors() {
            let rms = (values
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / values.len().max(1) as f64)
                .sqrt();
            println!(
                "| {case} | {active} | {tensor} | {} | {:.4e} | {:.4e} |",
                values.len(),
                max_abs(values),
                rms
            );
        }
    }
    println!();
}

fn print_timings(timings: &[Timing]) {
    println!(
        "## Timings (wall clock; GPU: one synchronized call each, after upload; CPU backward recomputes the forward)"
    );
    println!();
    println!("| case | path | CPU ref fwd ms | CPU ref bwd ms | GPU fwd ms | GPU bwd ms |");
    println!("|---|---|---:|---:|---:|---:|");
    let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |ms| format!("{ms:.3}"));
    for t in timings {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {} |",
            t.case,
            t.path,
            t.cpu_fwd_ms,
            t.cpu_bwd_ms,
            opt(t.gpu_fwd_ms),
            opt(t.gpu_bwd_ms)
        );
    }
    println!();
}

/// The tiny gated MoE MLP block of SPEC §6 (DeepSeek-V4 style).
mod moe_shape {
    /// Experts `E`.
    pub const EXPERTS: usize = 8;
    /// Hidden size `H`.
    pub const HIDDEN: usize = 512;
    /// Expert intermediate size `I`.
    pub const INTER: usize = 256;
    /// Experts per token.
    pub const TOP_K: usize = 2;
    /// Tokens `T`.
    pub const TOKENS: usize = 16;
    /// LoRA rank of both projections.
    pub const RANK: usize = 16;
    /// LoRA scaling of both projections.
    pub const SCALING: f32 = 0.5;
    /// DeepSeek-V4's clamp limit (rarely reached by these ~N(0, 1) activations; the GPU tests
    /// exercise tighter limits).
    pub const LIMIT: f32 = 10.0;
}

/// The MoE block's part of the smoke run.
struct MoeSmoke {
    comparisons: Vec<Comparison>,
    timings: Vec<Timing>,
    /// The bf16-weight reference results `(tensor, values)`, for the CPU-only summary.
    reference: Vec<(&'static str, Vec<f32>)>,
}

/// Host data of the block, every value bf16 (kept as f32).
struct MoeData {
    ids: Vec<i64>,
    gates: Vec<f32>,
    x: Vec<f32>,
    a_up: Vec<f32>,
    b_up: Vec<f32>,
    a_down: Vec<f32>,
    b_down: Vec<f32>,
    dy: Vec<f32>,
    gate_up: HostWeights,
    down: HostWeights,
}

fn widen_bits(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16_bits_to_f32(b)).collect()
}

/// Draws the block: router logits `randn(T, E)` → softmax → top-k → renormalise → bf16;
/// `gate_up = randn(E, 2I, H)/√H`, `down = randn(E, H, I)/√I`, LoRA `A, B = 0.05·randn`,
/// `x = randn(T, H)`, `dy = randn(T, H)`.
fn draw_moe(seed: u64) -> anyhow::Result<MoeData> {
    use moe_shape::*;
    let seed = seed.wrapping_mul(16).wrapping_add(100);
    let logits = RoutingKind::Dense.logits(TOKENS, EXPERTS, seed);
    let (ids, gates) = mxmoe::moe::route_softmax_topk(&logits, TOKENS, EXPERTS, TOP_K, true)
        .context("the router rejected the logits")?;
    let er = EXPERTS * RANK;
    let normal = |len: usize, scale: f32, stream: u32| {
        widen_bits(&normal_bf16_bits(len, scale, seed, stream))
    };
    Ok(MoeData {
        ids,
        gates,
        x: normal(TOKENS * HIDDEN, 1.0, 0),
        a_up: normal(er * HIDDEN, 0.05, 1),
        b_up: normal(2 * INTER * er, 0.05, 2),
        a_down: normal(er * INTER, 0.05, 3),
        b_down: normal(HIDDEN * er, 0.05, 4),
        dy: normal(TOKENS * HIDDEN, 1.0, 5),
        gate_up: HostWeights::new(
            normal_bf16_bits(
                EXPERTS * 2 * INTER * HIDDEN,
                1.0 / (HIDDEN as f32).sqrt(),
                seed,
                6,
            ),
            EXPERTS,
            2 * INTER,
            HIDDEN,
        ),
        down: HostWeights::new(
            normal_bf16_bits(
                EXPERTS * HIDDEN * INTER,
                1.0 / (INTER as f32).sqrt(),
                seed,
                7,
            ),
            EXPERTS,
            HIDDEN,
            INTER,
        ),
    })
}

/// `(tensor, values)` of the block's results, in a fixed order.
type MoeTensors = Vec<(&'static str, Vec<f32>)>;

/// Runs the CPU block reference ([`Rounding::Bf16`]) on dense weights; returns the results and
/// the forward and backward wall-clock milliseconds (the backward recomputes the forward).
fn moe_reference(
    d: &MoeData,
    w_gu: &[f32],
    w_dn: &[f32],
) -> anyhow::Result<(MoeTensors, f64, f64)> {
    use moe_shape::*;
    use mxmoe::reference::Rounding;
    use mxmoe::reference::moe::{
        Activation, GateUpLayout, MoeProblem, RefLora, moe_backward, moe_forward,
    };
    let routing = mxmoe::reference::flatten_sort_count(&d.ids, TOKENS, TOP_K, EXPERTS)
        .context("the CPU reference rejected the routing")?;
    let p = MoeProblem {
        x: &d.x,
        num_experts: EXPERTS,
        hidden: HIDDEN,
        intermediate: INTER,
        gate_up: w_gu,
        down: w_dn,
        lora_gate_up: Some(RefLora {
            a: &d.a_up,
            b: &d.b_up,
            rank: RANK,
            scaling: SCALING,
        }),
        lora_down: Some(RefLora {
            a: &d.a_down,
            b: &d.b_down,
            rank: RANK,
            scaling: SCALING,
        }),
        gates: &d.gates,
        activation: Activation::SwiGlu { limit: Some(LIMIT) },
        layout: GateUpLayout::Split,
        gate_up_bias: None,
        down_bias: None,
    };
    let (fwd, fwd_ms) = timed(|| moe_forward(&p, &routing, Rounding::Bf16));
    let fwd = fwd.context("the CPU block reference forward failed")?;
    let (grads, bwd_ms) = timed(|| moe_backward(&p, &routing, &d.dy, Rounding::Bf16));
    let grads = grads.context("the CPU block reference backward failed")?;
    let (up, dn) = match (grads.gate_up, grads.down) {
        (Some(up), Some(dn)) => (up, dn),
        _ => anyhow::bail!("the CPU block reference returned no LoRA gradients"),
    };
    let tensors = vec![
        ("y", fwd.y),
        ("dx", grads.dx),
        ("dA gate_up", up.da),
        ("dB gate_up", up.db),
        ("dA down", dn.da),
        ("dB down", dn.db),
        ("d_gates", grads.d_gates),
    ];
    Ok((tensors, fwd_ms, bwd_ms))
}

/// Uploads the block for `strategy`, runs forward and backward once (synchronized wall clock
/// each), downloads.
fn moe_gpu(
    gpu: &Runtime,
    strategy: Strategy,
    d: &MoeData,
) -> anyhow::Result<(MoeTensors, f64, f64)> {
    use moe_shape::*;
    use mxmoe::moe::{MoeBlock, MoeGrads, backward};
    use mxmoe::op::{Bf16Matrix, LoraWeights};
    let w_gu = strategy.upload(gpu, &d.gate_up)?;
    let w_dn = strategy.upload(gpu, &d.down)?;
    let routing = mxmoe::routing::DeviceRouting::from_host_ids(gpu, &d.ids, TOKENS, TOP_K, EXPERTS)
        .context("could not route the expert ids on the device")?;
    let matrix = |v: &[f32], rows: usize, cols: usize, what: &str| {
        Bf16Matrix::from_f32(gpu, v, rows, cols).with_context(|| format!("could not upload {what}"))
    };
    let x = matrix(&d.x, TOKENS, HIDDEN, "x")?;
    let gates = matrix(&d.gates, TOKENS, TOP_K, "the gates")?;
    let dy = matrix(&d.dy, TOKENS, HIDDEN, "dy")?;
    let er = EXPERTS * RANK;
    let lora_up = LoraWeights {
        a: matrix(&d.a_up, er, HIDDEN, "the gate_up LoRA A")?,
        b: matrix(&d.b_up, 2 * INTER, er, "the gate_up LoRA B")?,
        rank: RANK,
        scaling: SCALING,
    };
    let lora_down = LoraWeights {
        a: matrix(&d.a_down, er, INTER, "the down LoRA A")?,
        b: matrix(&d.b_down, HIDDEN, er, "the down LoRA B")?,
        rank: RANK,
        scaling: SCALING,
    };
    let block = MoeBlock {
        lora_gate_up: Some(&lora_up),
        lora_down: Some(&lora_down),
        activation: mxmoe::activation::Activation::SwiGlu { limit: Some(LIMIT) },
        strategy: strategy.op_strategy(),
        ..MoeBlock::new(w_gu.as_expert_weights(), w_dn.as_expert_weights())
    };
    gpu.synchronize().context("the uploads did not complete")?;
    let start = std::time::Instant::now();
    let (y, saved) = block
        .forward(gpu, &x, &routing, &gates)
        .context("the MoE block forward failed")?;
    gpu.synchronize()
        .context("the MoE block forward did not complete")?;
    let fwd_ms = start.elapsed().as_secs_f64() * 1e3;
    let MoeGrads {
        dx,
        gate_up,
        down,
        d_gates,
    } = backward(gpu, &saved, &dy).context("the MoE block backward failed")?;
    gpu.synchronize()
        .context("the MoE block backward did not complete")?;
    let bwd_ms = start.elapsed().as_secs_f64() * 1e3 - fwd_ms;
    let (up, dn) = match (gate_up, down) {
        (Some(up), Some(dn)) => (up, dn),
        _ => anyhow::bail!("the MoE block returned no LoRA gradients"),
    };
    let get = |m: &Bf16Matrix, what: &str| {
        m.to_f32(gpu)
            .with_context(|| format!("could not download {what}"))
    };
    let tensors = vec![
        ("y", get(&y, "y")?),
        ("dx", get(&dx, "dx")?),
        ("dA gate_up", get(&up.da, "the gate_up dA")?),
        ("dB gate_up", get(&up.db, "the gate_up dB")?),
        ("dA down", get(&dn.da, "the down dA")?),
        ("dB down", get(&dn.db, "the down dB")?),
        ("d_gates", get(&d_gates, "d_gates")?),
    ];
    Ok((tensors, fwd_ms, bwd_ms))
}

/// The paths the MoE block runs on: bf16, MXFP4 fused (Strategy B), MXFP4 selective
/// (Strategy A).
const MOE_PATHS: [Strategy; 3] = [Strategy::Bf16, Strategy::Mxfp4B, Strategy::Mxfp4A];

/// Runs the tiny MoE block: the CPU block reference always, every GPU path when there is a
/// device.
fn moe_block(seed: u64, gpu: &Result<Runtime, NoGpu>) -> anyhow::Result<MoeSmoke> {
    const CASE: &str = "moe block";
    let d = draw_moe(seed)?;
    let dense = (
        Strategy::Bf16.reference_weights(&d.gate_up)?,
        Strategy::Bf16.reference_weights(&d.down)?,
    );
    let (reference, cpu_fwd_ms, cpu_bwd_ms) = moe_reference(&d, &dense.0, &dense.1)?;
    let mut smoke = MoeSmoke {
        comparisons: Vec::new(),
        timings: Vec::new(),
        reference: Vec::new(),
    };
    let Ok(gpu) = gpu else {
        smoke.timings.push(Timing {
            case: CASE,
            path: "cpu reference",
            cpu_fwd_ms,
            cpu_bwd_ms,
            gpu_fwd_ms: None,
            gpu_bwd_ms: None,
        });
        smoke.reference = reference;
        return Ok(smoke);
    };
    // The MXFP4 paths multiply by the dequantized weights: one more reference, shared by both.
    let mx = (
        Strategy::Mxfp4B.reference_weights(&d.gate_up)?,
        Strategy::Mxfp4B.reference_weights(&d.down)?,
    );
    let mx_reference = moe_reference(&d, &mx.0, &mx.1)?;
    for strategy in MOE_PATHS {
        let label = strategy.label();
        let (want, cpu_fwd_ms, cpu_bwd_ms) = match strategy {
            Strategy::Bf16 => (&reference, cpu_fwd_ms, cpu_bwd_ms),
            _ => (&mx_reference.0, mx_reference.1, mx_reference.2),
        };
        let (got, gpu_fwd_ms, gpu_bwd_ms) = moe_gpu(gpu, strategy, &d)
            .with_context(|| format!("the {label} path failed on the MoE block"))?;
        for ((tensor, w), (_, g)) in want.iter().zip(&got) {
            smoke.comparisons.push(compare(CASE, label, tensor, g, w));
        }
        smoke.timings.push(Timing {
            case: CASE,
            path: label,
            cpu_fwd_ms,
            cpu_bwd_ms,
            gpu_fwd_ms: Some(gpu_fwd_ms),
            gpu_bwd_ms: Some(gpu_bwd_ms),
        });
    }
    smoke.reference = reference;
    Ok(smoke)
}

fn print_moe_case() {
    use moe_shape::*;
    println!("## MoE block (SPEC §6, DeepSeek-V4-style tiny block)");
    println!();
    println!("| E | H | I | T | top_k | r (both projections) | s | clamp limit |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {EXPERTS} | {HIDDEN} | {INTER} | {TOKENS} | {TOP_K} | {RANK} | {SCALING} | {LIMIT} |"
    );
    println!();
    println!(
        "y = down(silu(min(g, lim))·clamp(u, ±lim)) with [g | u] = gate_up(x); gate_up = randn/√H, down = randn/√I, A, B = 0.05·randn, x = randn, router softmax → top-k → renormalise → bf16 of randn(T, E) logits, dy = randn (bf16)."
    );
    println!();
}

fn print_moe_summary(reference: &[(&'static str, Vec<f32>)]) {
    println!("## CPU MoE block reference results (no GPU to compare with)");
    println!();
    println!("| tensor | elements | max abs | RMS |");
    println!("|---|---:|---:|---:|");
    for (tensor, values) in reference {
        let rms = (values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / values.len().max(1) as f64)
            .sqrt();
        println!(
            "| {tensor} | {} | {:.4e} | {:.4e} |",
            values.len(),
            max_abs(values),
            rms
        );
    }
    println!();
}
