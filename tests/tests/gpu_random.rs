//! Randomized parity of the expert linear (forward, dX, dA, dB, d_gates) against the CPU
//! reference.
//!
//! A seeded generator draws problems over the whole input space the kernels accept: experts
//! `E` 1–64 (a few up to 256), `K` a multiple of 32 in 32–1024 (a few up to 4096; bf16 problems
//! sometimes take any multiple of 8), `N` a multiple of 8 in 8–512, tokens 1–300 (a few up to
//! 2048), top-k 1–min(8, E), LoRA rank in {0, 1, 7, 8, 16, 32, 64, 128}, the routing (uniform, a
//! subset of experts active, skewed, one-hot onto a single expert, every expert per token,
//! dropped slots), both row orders of input and output, gates (scattered output only) and the
//! base weights (bf16, MXFP4 fused, MXFP4 selective with the buffer kept or recomputed in
//! backward, two-level NVFP4 fused). For MXFP4 the reference weights are
//! `dequantize_f32(quantize_mxfp4(w))`, for NVFP4 `dequantize_nvfp4_f32(quantize_nvfp4(w))`.
//! Every problem runs forward and
//! backward on the GPU and is checked with [`compare`] (each element against its own bf16 bound,
//! plus a relative L2 bound) and, with a LoRA rank, run again without its LoRA factors so that
//! [`compare_lora_term`] checks the LoRA term on its own.
//!
//! Cost is bounded per problem (weights `E·N·K`, LoRA factors, and reference work `T·k·N·K`), and
//! the host work (drawing, quantizing, the reference) runs on all cores while the GPU runs one
//! problem at a time; 500 problems take well under a minute on a 16-core host in release.
//!
//! Reproducing a failure: the failing problems are listed with their per-case seed and full
//! description. `MXMOE_RANDOM_CASE_SEED=<seed>` reruns exactly one of them;
//! `MXMOE_RANDOM_SEED` (master seed, default [`DEFAULT_SEED`]) and `MXMOE_RANDOM_CASES` (default
//! 500) choose the whole set. A failure worth keeping becomes an entry of [`fixed_problems`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};

use mxmoe::Runtime;
use mxmoe::mxfp4::{MxWeights, dequantize_f32, quantize_mxfp4};
use mxmoe::nvfp4::{NvWeights, dequantize_nvfp4_f32, quantize_nvfp4};
use mxmoe::op::{DequantBuffer, RowOrder, Strategy};
use mxmoe::reference::Rounding;
use mxmoe_tests::linear_case::{
    Base, Case, Data, GpuResult, compare, compare_lora_term, draw, out_rows, reference_run,
    run_gpu_with,
};
use mxmoe_tests::{Rng, gpu};

/// Master seed when `MXMOE_RANDOM_SEED` is not set.
const DEFAULT_SEED: u64 = 0x6D78_6D6F_6552_4E44;
/// Problems when `MXMOE_RANDOM_CASES` is not set.
const DEFAULT_CASES: usize = 500;
/// Bound on the base weights `E·N·K` of one problem (drawn, quantized and uploaded per problem).
const MAX_WEIGHT_ELEMS: usize = 1 << 23;
/// Bound on each LoRA factor (`E·r·K` and `N·E·r`).
const MAX_LORA_ELEMS: usize = 1 << 22;
/// Bound on the reference's work `T·k·N·K` (each multiply-add runs about four times, in f64).
const MAX_MACS: usize = 1 << 26;
/// LoRA ranks drawn from.
const RANKS: [usize; 8] = [0, 1, 7, 8, 16, 32, 64, 128];

/// The base weights of a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BaseKind {
    /// Dense bf16 experts.
    Bf16,
    /// MXFP4 experts, Strategy B (decoded inside the GEMM K-loop).
    MxFused,
    /// MXFP4 experts, Strategy A (selective dequantization), buffer kept for backward.
    MxSelective,
    /// MXFP4 experts, Strategy A, buffer dequantized again in backward.
    MxSelectiveRecompute,
    /// Two-level NVFP4 experts (an f32 tensor scale per expert), Strategy B.
    NvFused,
}

/// Every base kind, in a fixed order.
const ALL_BASES: [BaseKind; 5] = [
    BaseKind::Bf16,
    BaseKind::MxFused,
    BaseKind::MxSelective,
    BaseKind::MxSelectiveRecompute,
    BaseKind::NvFused,
];

/// How the expert ids of a problem are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routing {
    /// [`draw`]'s ids: distinct uniform experts per token among the first `case.active` (all
    /// when 0), with `case.dropped_permille` of the slots dropped.
    Drawn,
    /// Distinct experts per token from a heavily skewed distribution (expert `⌊pool·u³⌋`,
    /// rotated by a random offset) over the same pool, with the same drops.
    Skewed,
    /// Every token on this one expert (`top_k = 1`), with the same drops.
    OneHot {
        /// The expert every token goes to.
        expert: usize,
    },
}

/// One generated problem: shape and flags, routing, base weights. `Debug` prints everything
/// needed to rebuild it.
#[derive(Clone, Copy, Debug)]
struct Problem {
    /// Shape, seed and flags (the seed draws the data).
    case: Case,
    /// How the ids are drawn.
    routing: Routing,
    /// Base weights.
    base: BaseKind,
}

/// Uniform in `1..=hi` where `hi` is picked from `limits`: small values come up often, large
/// ones still regularly.
fn spread(g: &mut Rng, limits: &[u64]) -> usize {
    let hi = limits[g.below(limits.len() as u64) as usize];
    1 + g.below(hi) as usize
}

/// Draws the problem of per-case seed `seed` (a pure function of the seed).
fn generate(seed: u64) -> Problem {
    let mut g = Rng::new(seed);
    let base = match g.below(12) {
        0..=3 => BaseKind::Bf16,
        4..=6 => BaseKind::MxFused,
        7..=8 => BaseKind::MxSelective,
        9 => BaseKind::MxSelectiveRecompute,
        _ => BaseKind::NvFused,
    };
    let mut e = if g.below(20) == 0 {
        65 + g.below(192) as usize
    } else {
        spread(&mut g, &[1, 2, 4, 8, 16, 32, 64])
    };
    let k = if base == BaseKind::Bf16 && g.below(5) == 0 {
        8 * spread(&mut g, &[4, 16, 128])
    } else if g.below(20) == 0 {
        32 * (32 + spread(&mut g, &[96]))
    } else {
        32 * spread(&mut g, &[2, 8, 32])
    };
    let n = 8 * spread(&mut g, &[2, 8, 64]);
    e = e.min((MAX_WEIGHT_ELEMS / (n * k)).max(1));
    let mut t = if g.below(20) == 0 {
        300 + spread(&mut g, &[1748])
    } else {
        spread(&mut g, &[4, 32, 300])
    };

    let mut active = 0;
    let mut routing = Routing::Drawn;
    let mode = g.below(100);
    if (20..40).contains(&mode) || ((60..70).contains(&mode) && e > 1) {
        active = 1 + g.below(e as u64) as usize;
    }
    if (60..80).contains(&mode) {
        routing = Routing::Skewed;
    } else if (80..90).contains(&mode) {
        routing = Routing::OneHot {
            expert: g.below(e as u64) as usize,
        };
    }
    let pool = if active == 0 { e } else { active };
    let top_k = match routing {
        Routing::OneHot { .. } => 1,
        // Every expert for every token, when that is a legal top-k.
        _ if mode >= 90 && e <= 8 => e,
        _ => 1 + g.below(pool.min(8) as u64) as usize,
    };
    let dropped_permille = match g.below(50) {
        0 => 1000,
        1..=9 => 1 + g.below(999),
        _ => 0,
    };
    let mut r = RANKS[g.below(RANKS.len() as u64) as usize];
    while r > 0 && (e * r * k > MAX_LORA_ELEMS || n * e * r > MAX_LORA_ELEMS) {
        r = RANKS[RANKS.iter().position(|&x| x == r).expect("a listed rank") - 1];
    }
    t = t.min((MAX_MACS / (top_k * n * k)).max(1));
    let input = if g.below(2) == 0 {
        RowOrder::Scattered
    } else {
        RowOrder::Grouped
    };
    let output = if g.below(2) == 0 {
        RowOrder::Scattered
    } else {
        RowOrder::Grouped
    };
    let gates = output == RowOrder::Scattered && g.below(2) == 0;
    let case = Case {
        input,
        output,
        gates,
        dropped_permille,
        active,
        ..Case::new(e, k, n, t, top_k, r, g.next_u64())
    };
    Problem {
        case,
        routing,
        base,
    }
}

/// Replaces drawn ids per the problem's routing (drops follow `case.dropped_permille`).
fn routed_ids(p: &Problem, drawn: Vec<i64>) -> Vec<i64> {
    let c = &p.case;
    let mut rng = Rng::new(c.seed ^ 0x05EE_D1D5);
    let pool = if c.active == 0 { c.e } else { c.active };
    let maybe_drop = |rng: &mut Rng, id: usize| {
        if c.dropped_permille > 0 && rng.below(1000) < c.dropped_permille {
            -1
        } else {
            id as i64
        }
    };
    match p.routing {
        Routing::Drawn => drawn,
        Routing::OneHot { expert } => (0..c.t * c.top_k)
            .map(|_| maybe_drop(&mut rng, expert))
            .collect(),
        Routing::Skewed => {
            let offset = rng.below(pool as u64) as usize;
            let mut ids = Vec::with_capacity(c.t * c.top_k);
            for _ in 0..c.t {
                let mut chosen: Vec<usize> = Vec::with_capacity(c.top_k);
                while chosen.len() < c.top_k {
                    let u = rng.uniform();
                    let e = (((u * u * u) * pool as f32) as usize).min(pool - 1);
                    let e = (e + offset) % pool;
                    if !chosen.contains(&e) {
                        chosen.push(e);
                    }
                }
                ids.extend(chosen.into_iter().map(|e| maybe_drop(&mut rng, e)));
            }
            ids
        }
    }
}

/// Host data of a problem, ready for the GPU and the reference.
struct Prepared {
    /// The drawn data, ids replaced per the routing.
    data: Data,
    /// The quantized weights of an MXFP4 problem.
    mx: Option<MxWeights>,
    /// The quantized weights of an NVFP4 problem.
    nv: Option<NvWeights>,
    /// The reference weights of a 4-bit problem (the dequantized `mx` or `nv`); `data.w` for
    /// bf16.
    dequantized: Option<Vec<f32>>,
    /// Output gradient, shaped like the forward output.
    dy: Vec<f32>,
}

impl Prepared {
    /// The weights the reference uses.
    fn w_ref(&self) -> &[f32] {
        self.dequantized.as_deref().unwrap_or(&self.data.w)
    }
}

/// Draws a problem's data (deterministic in the problem).
fn prepare(p: &Problem) -> Prepared {
    let c = &p.case;
    let mut data = draw(c);
    data.ids = routed_ids(p, std::mem::take(&mut data.ids));
    let (mx, nv, dequantized) = match p.base {
        BaseKind::Bf16 => (None, None, None),
        BaseKind::NvFused => {
            let nv = quantize_nvfp4(&data.w, c.e, c.n, c.k, true)
                .expect("the generator keeps K % 32 == 0 for NVFP4");
            let deq = dequantize_nvfp4_f32(&nv);
            (None, Some(nv), Some(deq))
        }
        _ => {
            let mx = quantize_mxfp4(&data.w, c.e, c.n, c.k)
                .expect("the generator keeps K % 32 == 0 for MXFP4");
            let deq = dequantize_f32(&mx);
            (Some(mx), None, Some(deq))
        }
    };
    let dy = Rng::new(c.seed ^ 0xD7).normal_bf16(out_rows(c) * c.n, 1.0);
    Prepared {
        data,
        mx,
        nv,
        dequantized,
        dy,
    }
}

/// Runs a prepared problem on the GPU (forward and backward), and with a LoRA rank once more
/// without the LoRA factors.
fn run(gpu: &Runtime, p: &Problem, prep: &Prepared) -> (GpuResult, Option<GpuResult>) {
    let base = match (p.base, &prep.mx, &prep.nv) {
        (BaseKind::Bf16, _, _) => Base::Dense(&prep.data.w),
        (BaseKind::MxFused, Some(mx), _) => Base::Mx(mx, Strategy::Fused),
        (BaseKind::MxSelective, Some(mx), _) => Base::Mx(mx, Strategy::SelectiveDequant),
        (BaseKind::MxSelectiveRecompute, Some(mx), _) => Base::MxRecompute(mx),
        (BaseKind::NvFused, _, Some(nv)) => Base::Nv(nv, Strategy::Fused, DequantBuffer::Keep),
        _ => unreachable!("4-bit problems are prepared with their container"),
    };
    let got = run_gpu_with(gpu, &p.case, &prep.data, &prep.dy, base);
    let without = (p.case.r > 0).then(|| {
        let c = Case { r: 0, ..p.case };
        run_gpu_with(gpu, &c, &prep.data, &prep.dy, base)
    });
    (got, without)
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// Runs `f`, turning a panic into its message.
fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| panic_message(&*e))
}

/// `f(0..len)` on up to `workers` threads, results in index order.
fn par_map<R: Send>(len: usize, workers: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.clamp(1, len.max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= len {
                            break mine;
                        }
                        mine.push((i, f(i)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("workers catch their panics"))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Host threads for drawing and checking.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(32)
}

/// Runs and checks every `(label, problem)`; returns one line per failure, naming the label (how
/// to rerun it) and the whole problem. Host work runs in parallel batches; the GPU runs the
/// problems of a batch one at a time.
fn run_all(gpu: &Runtime, problems: &[(String, Problem)]) -> Vec<String> {
    let workers = workers();
    let mut failures = Vec::new();
    for (b, batch) in problems.chunks(workers).enumerate() {
        let prepared = par_map(batch.len(), workers, |i| catch(|| prepare(&batch[i].1)));
        let results: Vec<Result<(GpuResult, Option<GpuResult>), String>> = batch
            .iter()
            .zip(&prepared)
            .map(|((_, p), prep)| match prep {
                Ok(prep) => catch(|| run(gpu, p, prep)),
                Err(e) => Err(format!("drawing the data: {e}")),
            })
            .collect();
        let checks = par_map(batch.len(), workers, |i| {
            let (prep, got) = (
                prepared[i].as_ref().map_err(Clone::clone)?,
                results[i].as_ref().map_err(|e| format!("GPU run: {e}"))?,
            );
            let c = &batch[i].1.case;
            catch(|| {
                let (got, without) = got;
                let bounds = compare(c, &prep.data, prep.w_ref(), &prep.dy, got);
                if let Some(without) = without {
                    compare_lora_term(c, &prep.data, &prep.dy, got, without, &bounds);
                }
            })
        });
        for (i, check) in checks.into_iter().enumerate() {
            if let Err(e) = check {
                let (label, p) = &batch[i];
                failures.push(format!(
                    "case {} ({label}): {p:?}\n    {e}",
                    b * workers + i
                ));
            }
        }
    }
    failures
}

/// A `u64` environment variable (decimal or `0x` hex).
fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => v.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: not a number ({e})")))
}

/// The problems of this run: one (from `MXMOE_RANDOM_CASE_SEED`) or the seeded set.
fn selected_problems() -> (String, Vec<(u64, Problem)>) {
    if let Some(seed) = env_u64("MXMOE_RANDOM_CASE_SEED") {
        return (
            format!("MXMOE_RANDOM_CASE_SEED={seed:#x}"),
            vec![(seed, generate(seed))],
        );
    }
    let master = env_u64("MXMOE_RANDOM_SEED").unwrap_or(DEFAULT_SEED);
    let count = env_u64("MXMOE_RANDOM_CASES").map_or(DEFAULT_CASES, |n| n as usize);
    let mut m = Rng::new(master);
    let problems = (0..count)
        .map(|_| {
            let seed = m.next_u64();
            (seed, generate(seed))
        })
        .collect();
    (
        format!("MXMOE_RANDOM_SEED={master:#x} MXMOE_RANDOM_CASES={count}"),
        problems,
    )
}

/// Prints what the set covers (counts per base and routing kind, largest dimensions).
fn print_coverage(problems: &[(u64, Problem)]) {
    let count = |f: &dyn Fn(&Problem) -> bool| problems.iter().filter(|(_, p)| f(p)).count();
    let max =
        |f: &dyn Fn(&Case) -> usize| problems.iter().map(|(_, p)| f(&p.case)).max().unwrap_or(0);
    let weights: usize = problems
        .iter()
        .map(|(_, p)| p.case.e * p.case.n * p.case.k)
        .sum();
    let macs: usize = problems
        .iter()
        .map(|(_, p)| p.case.t * p.case.top_k * p.case.n * p.case.k)
        .sum();
    println!(
        "{} problems: bf16 {}, MXFP4 fused {}, selective {}, selective+recompute {}, NVFP4 fused {}; skewed {}, one-hot {}, subset-active {}, with drops {}, all dropped {}, gates {}, grouped in {}, grouped out {}, LoRA {}; max E {}, K {}, N {}, T {}; weights Σ E·N·K = {:.2e}, reference work Σ T·k·N·K = {:.2e}",
        problems.len(),
        count(&|p| p.base == BaseKind::Bf16),
        count(&|p| p.base == BaseKind::MxFused),
        count(&|p| p.base == BaseKind::MxSelective),
        count(&|p| p.base == BaseKind::MxSelectiveRecompute),
        count(&|p| p.base == BaseKind::NvFused),
        count(&|p| p.routing == Routing::Skewed),
        count(&|p| matches!(p.routing, Routing::OneHot { .. })),
        count(&|p| p.case.active > 0),
        count(&|p| p.case.dropped_permille > 0),
        count(&|p| p.case.dropped_permille >= 1000),
        count(&|p| p.case.gates),
        count(&|p| p.case.input == RowOrder::Grouped),
        count(&|p| p.case.output == RowOrder::Grouped),
        count(&|p| p.case.r > 0),
        max(&|c| c.e),
        max(&|c| c.k),
        max(&|c| c.n),
        max(&|c| c.t),
        weights as f64,
        macs as f64,
    );
}

/// Hand-picked edge problems kept as fixed regressions (each is run with every base).
fn fixed_problems() -> Vec<Problem> {
    let cases = [
        // The smallest problem: one expert, one token, one slot, rank 1.
        Case::new(1, 32, 8, 1, 1, 1, 0xF1),
        // Every slot dropped: zero outputs, zero gradients, no active expert (grouped input,
        // gated scattered output).
        Case {
            dropped_permille: 1000,
            input: RowOrder::Grouped,
            output: RowOrder::Scattered,
            gates: true,
            ..Case::new(4, 64, 32, 16, 2, 8, 0xF2)
        },
        // The smallest legal K and N for MXFP4.
        Case::new(3, 32, 8, 37, 2, 16, 0xF3),
    ];
    cases
        .iter()
        .flat_map(|&case| {
            ALL_BASES.map(|base| Problem {
                case,
                routing: Routing::Drawn,
                base,
            })
        })
        .collect()
}

#[test]
fn randomized_problems_match_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let (selection, problems) = selected_problems();
    print_coverage(&problems);
    let start = std::time::Instant::now();
    let labelled: Vec<(String, Problem)> = problems
        .iter()
        .map(|&(seed, p)| (format!("MXMOE_RANDOM_CASE_SEED={seed:#x}"), p))
        .collect();
    let failures = run_all(gpu, &labelled);
    println!(
        "{} problems checked in {:.1} s ({selection})",
        problems.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} random problems failed ({selection}):\n{}",
        failures.len(),
        problems.len(),
        failures.join("\n")
    );
}

#[test]
fn fixed_regressions_match_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let problems: Vec<(String, Problem)> = fixed_problems()
        .into_iter()
        .enumerate()
        .map(|(i, p)| (format!("fixed_problems()[{i}]"), p))
        .collect();
    let failures = run_all(gpu, &problems);
    assert!(
        failures.is_empty(),
        "{} fixed regressions failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Host-only: the generator is a pure function of the seed and every problem is one the API
/// accepts (K, N multiples of 8, K % 32 for MXFP4, top-k within the expert pool, gates only with
/// scattered output, the cost bounds), and the default set covers every kind of problem.
#[test]
fn generator_is_reproducible_within_bounds_and_covers_every_kind() {
    let (_, problems) = selected_problems();
    print_coverage(&problems);
    let mut seen_bases = std::collections::BTreeSet::new();
    let (
        mut skewed,
        mut one_hot,
        mut all_dropped,
        mut every_expert,
        mut big_e,
        mut big_k,
        mut big_t,
    ) = (0, 0, 0, 0, 0, 0, 0);
    for &(seed, p) in &problems {
        assert_eq!(
            format!("{p:?}"),
            format!("{:?}", generate(seed)),
            "seed {seed:#x} is not reproducible"
        );
        let c = &p.case;
        assert!(
            c.e >= 1 && c.k % 8 == 0 && c.n % 8 == 0 && c.t >= 1 && c.top_k >= 1,
            "{p:?}"
        );
        assert!(
            p.base == BaseKind::Bf16 || c.k % 32 == 0,
            "MXFP4 needs K % 32 == 0: {p:?}"
        );
        let pool = if c.active == 0 { c.e } else { c.active };
        assert!(c.top_k <= pool && c.top_k <= 8, "{p:?}");
        assert!(
            RANKS.contains(&c.r) && (!c.gates || c.output == RowOrder::Scattered),
            "{p:?}"
        );
        assert!(c.e * c.n * c.k <= MAX_WEIGHT_ELEMS.max(c.n * c.k), "{p:?}");
        assert!(c.t == 1 || c.t * c.top_k * c.n * c.k <= MAX_MACS, "{p:?}");
        if let Routing::OneHot { expert } = p.routing {
            assert!(expert < c.e && c.top_k == 1, "{p:?}");
            one_hot += 1;
        }
        skewed += usize::from(p.routing == Routing::Skewed);
        all_dropped += usize::from(c.dropped_permille >= 1000);
        every_expert += usize::from(c.top_k == c.e && c.e > 1);
        big_e += usize::from(c.e > 64);
        big_k += usize::from(c.k > 1024);
        big_t += usize::from(c.t > 300);
        seen_bases.insert(format!("{:?}", p.base));
    }
    if problems.len() >= DEFAULT_CASES {
        assert_eq!(seen_bases.len(), ALL_BASES.len());
        for (what, n) in [
            ("skewed", skewed),
            ("one-hot", one_hot),
            ("all dropped", all_dropped),
            ("every expert", every_expert),
            ("E > 64", big_e),
            ("K > 1024", big_k),
            ("T > 300", big_t),
        ] {
            assert!(n > 0, "no {what} problem among {}", problems.len());
        }
    }
    // The drawn ids respect the routing: distinct experts per token, inside the pool, one expert
    // for one-hot problems (checked on the cheap problems only).
    for &(_, p) in problems
        .iter()
        .filter(|(_, p)| p.case.e * p.case.n * p.case.k <= 1 << 14)
        .take(40)
    {
        let c = &p.case;
        let prep = prepare(&p);
        let pool = if c.active == 0 { c.e } else { c.active } as i64;
        assert_eq!(prep.data.ids.len(), c.t * c.top_k);
        for token in prep.data.ids.chunks(c.top_k) {
            let valid: Vec<i64> = token.iter().copied().filter(|&i| i >= 0).collect();
            assert!(
                valid.iter().all(|&i| i < pool),
                "{p:?}: ids {token:?} outside the pool"
            );
            let mut distinct = valid.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                valid.len(),
                "{p:?}: repeated expert in {token:?}"
            );
            if let Routing::OneHot { expert } = p.routing {
                assert!(valid.iter().all(|&i| i == expert as i64), "{p:?}");
            }
        }
    }
}

/// The CPU reference laid out as the GPU returns it (`T·k` rows for grouped input and output,
/// dropped rows last and zero), for the problem's case or another one (`c`) on the same data.
fn reference_as_gpu_result(c: &Case, data: &Data, prep: &Prepared) -> GpuResult {
    let r = reference_run(c, data, prep.w_ref(), &prep.dy, Rounding::Bf16);
    let (da, db) = if c.r > 0 {
        (Some(r.da), Some(r.db))
    } else {
        (None, None)
    };
    GpuResult {
        out: r.out,
        dx: r.dx,
        da,
        db,
        d_gates: r.d_gates,
        configs: [0, 0],
        // The reference has no strategy; nothing compares this field.
        strategy: mxmoe::op::Strategy::Fused,
    }
}

/// Host-only: the fixed problems and the cheapest random ones, checked with [`compare`] against
/// the reference itself laid out like a GPU result, pass: the plumbing (ids per routing kind, row
/// orders, all-dropped routing, MXFP4 reference weights, the parallel map) is sound before any
/// GPU time is spent. `MXMOE_RANDOM_HARNESS_ALL=1` takes every random problem instead (it then
/// also measures the host side of the GPU test).
#[test]
fn problems_are_accepted_by_the_reference_harness() {
    let (_, random) = selected_problems();
    let all = std::env::var("MXMOE_RANDOM_HARNESS_ALL").is_ok_and(|v| v == "1");
    let mut problems: Vec<Problem> = fixed_problems();
    problems.extend(
        random
            .iter()
            .map(|&(_, p)| p)
            .filter(|p| {
                all || (p.case.t * p.case.top_k * p.case.n * p.case.k <= 1 << 16
                    && p.case.e * p.case.n * p.case.k <= 1 << 16)
            })
            .take(if all { usize::MAX } else { 40 }),
    );
    let start = std::time::Instant::now();
    let checks = par_map(problems.len(), workers(), |i| {
        let p = &problems[i];
        catch(|| {
            let prep = prepare(p);
            let c = &p.case;
            let as_gpu = reference_as_gpu_result(c, &prep.data, &prep);
            let bounds = compare(c, &prep.data, prep.w_ref(), &prep.dy, &as_gpu);
            if c.r > 0 {
                let without = reference_as_gpu_result(&Case { r: 0, ..*c }, &prep.data, &prep);
                compare_lora_term(c, &prep.data, &prep.dy, &as_gpu, &without, &bounds);
                // The check can fail: a LoRA scaling 2 % too large must not pass it (where
                // the tensors have enough live elements for the statistic).
                let live = as_gpu.out.iter().filter(|v| **v != 0.0).count();
                if live < 512 {
                    return false;
                }
                let off = Data {
                    s: prep.data.s * 1.02,
                    ..prep.data.clone()
                };
                let wrong = reference_as_gpu_result(c, &off, &prep);
                let caught =
                    catch(|| compare_lora_term(c, &prep.data, &prep.dy, &wrong, &without, &bounds));
                assert!(
                    caught.is_err(),
                    "a 2 % LoRA scaling error passed the LoRA check"
                );
                return true;
            }
            if p.case.dropped_permille >= 1000 {
                assert!(
                    as_gpu.out.iter().chain(&as_gpu.dx).all(|&v| v == 0.0),
                    "all dropped must give zeros"
                );
            }
            false
        })
        .map_err(|e| format!("{p:?}: {e}"))
    });
    let mutants_caught = checks.iter().filter(|c| matches!(c, Ok(true))).count();
    assert!(
        mutants_caught > 0,
        "no problem was large enough to show that the LoRA check catches a 2 % scaling error"
    );
    let failures: Vec<String> = checks.into_iter().filter_map(Result::err).collect();
    println!(
        "{} problems through the reference harness in {:.1} s on {} threads",
        problems.len(),
        start.elapsed().as_secs_f64(),
        workers()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
