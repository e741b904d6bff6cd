//! `mxmoe bench`: SPEC §8's single-projection benchmark (REF `bench_mxfp4.py`) for every
//! [`Strategy`].
//!
//! Problem: `K = 2048`, `N = 1024`, `top_k = 8`, `r = 16`, `s = 0.5`; `x [T, K]` in token order,
//! scattered output `[T·k, N]`, no gates (REF: `grouped_in = grouped_out = false`). Weights
//! `W_store = randn(E, N, K)/√K` in bf16 (seed 0), LoRA `0.01·randn` (seed 2), routing seed 1,
//! `x` seed 3. REF's loss is `out.sum()`, i.e. an all-ones output gradient; we use a fixed random
//! `dy` (seed 4) instead, because a constant gradient can hide row-ordering bugs and our rules
//! forbid constant test data. The kernels do the same work either way.
//!
//! Per iteration (timed): forward + backward. The device routing is built once per
//! configuration, outside the timed window; inputs and LoRA leaves are uploaded once. Each
//! iteration is bracketed by its own pair of CUDA events on the op stream; the events are read
//! after the loop, and the median, minimum and maximum are reported. See `docs/BENCHMARKS.md`
//! for the FLOP and byte accounting.

use std::path::PathBuf;

use anyhow::Context as _;
use cudarc::driver::sys::CUevent_flags;
use mxmoe::Runtime;
use mxmoe::device::Gpu;
use mxmoe::op::{self, RowOrder};

use crate::env::{commit, driver_description, open_gpu, utc_now};
use crate::output::{check_writable, write_atomic};
use crate::problem::{DeviceProblem, HostProblem, Seeds, Shape};
use crate::rng::normal_bf16_bits;
use crate::routing_gen::{RoutingKind, active_experts, top_k};
use crate::strategy::{HostWeights, Strategy};
use mxmoe::device::PoolWatch;
use mxmoe::reference::{check_host_memory, sum_bytes, tensor_bytes};

/// Reduction dimension of the benchmarked projection.
const K: usize = 2048;
/// Output dimension.
const N: usize = 1024;
/// Experts per token.
const TOP_K: usize = 8;
/// LoRA rank.
const RANK: usize = 16;
/// LoRA scaling.
const SCALING: f32 = 0.5;
/// Seeds of SPEC §8 (weights 0, routing 1, LoRA 2) plus ours for `x` and `dy`.
const WEIGHT_SEED: u64 = 0;
const SEEDS: Seeds = Seeds {
    routing: 1,
    lora: 2,
    x: 3,
    dy: 4,
};
const MIB: f64 = (1u64 << 20) as f64;

/// Which routing regimes to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeArg {
    /// Dense routing, E = 128, T = 4096.
    Dense,
    /// Sparse routing, E = 256, T = 4096.
    Sparse,
    /// Balanced routing, E = 256, T ∈ {256, 1024, 4096, 16384}.
    Balanced,
    /// All of the above.
    All,
}

/// Options of `mxmoe bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Routing regime(s).
    #[arg(long, value_enum, default_value_t = ShapeArg::All)]
    pub shape: ShapeArg,
    /// Token counts, comma-separated; replaces every selected regime's default list.
    #[arg(long, value_delimiter = ',', value_parser = positive)]
    pub tokens: Vec<usize>,
    /// Timed iterations per configuration.
    #[arg(long, default_value_t = 50, value_parser = positive)]
    pub iters: usize,
    /// Untimed warm-up iterations per configuration.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Strategies to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub strategy: Vec<Strategy>,
    /// Also write the results as JSON to this file (written once, at the end, atomically; an
    /// existing file is kept until then).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// CUDA device ordinal (an error if it does not exist). Default: device 0, or the plan only
    /// when there is no GPU.
    #[arg(long, value_name = "N")]
    pub device: Option<usize>,
}

/// clap parser for a positive integer.
fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a positive integer ({e})")),
    }
}

/// One routing configuration.
#[derive(Clone, Copy, Debug)]
struct Config {
    routing: RoutingKind,
    experts: usize,
    tokens: usize,
}

impl Config {
    fn shape(&self) -> Shape {
        Shape {
            experts: self.experts,
            k: K,
            n: N,
            tokens: self.tokens,
            top_k: TOP_K,
            rank: RANK,
            scaling: SCALING,
            input: RowOrder::Scattered,
            output: RowOrder::Scattered,
            gates: false,
        }
    }
}

/// The configurations of SPEC §8, in run order (same expert count adjacent, so one weight
/// tensor serves consecutive configurations). Every size a configuration implies is checked
/// ([`check_config`]) before anything is allocated.
fn configs(args: &BenchArgs) -> Vec<Config> {
    let regimes: &[(RoutingKind, usize, &[usize])] = &[
        (RoutingKind::Dense, 128, &[4096]),
        (RoutingKind::Sparse, 256, &[4096]),
        (RoutingKind::Balanced, 256, &[256, 1024, 4096, 16384]),
    ];
    let selected = |kind: RoutingKind| match args.shape {
        ShapeArg::All => true,
        ShapeArg::Dense => kind == RoutingKind::Dense,
        ShapeArg::Sparse => kind == RoutingKind::Sparse,
        ShapeArg::Balanced => kind == RoutingKind::Balanced,
    };
    let mut out = Vec::new();
    for &(routing, experts, default_tokens) in regimes {
        if !selected(routing) {
            continue;
        }
        let tokens: &[usize] = if args.tokens.is_empty() {
            default_tokens
        } else {
            &args.tokens
        };
        out.extend(tokens.iter().map(|&tokens| Config {
            routing,
            experts,
            tokens,
        }));
    }
    out
}

/// Useful floating-point operations of one forward + backward (LoRA at rank `r`, not the padded
/// rank): forward `2LKN + 2LKr + 2LrN`; backward dX `2LNK + 2LrK`, YB `2LNr`, dA `2LrK`, dB `2LNr`.
fn flops(s: &Shape) -> f64 {
    let (l, k, n, r) = (s.rows() as f64, s.k as f64, s.n as f64, s.rank as f64);
    let forward = 2.0 * l * k * n + 2.0 * l * k * r + 2.0 * l * r * n;
    let backward =
        2.0 * l * n * k + 2.0 * l * r * k + 2.0 * l * n * r + 2.0 * l * r * k + 2.0 * l * n * r;
    forward + backward
}

/// Minimum bytes one forward + backward must move (our accounting, bf16 activations): the active
/// experts' weight traffic ([`Strategy::weight_traffic_bytes`]: stored weights read in forward
/// and dX, plus Strategy A's dequantization), `x` read, `out` written, `dy` read, `dx` written,
/// the active experts' LoRA factors read twice, and the full `dA`, `dB` written.
fn bytes(strategy: Strategy, s: &Shape, active: usize) -> f64 {
    let weights = strategy.weight_traffic_bytes(s.n, s.k, active);
    let activations = 2 * (s.x_rows() * s.k) * 2 + 2 * (s.out_rows() * s.n) * 2;
    let lora = 2 * active * s.rank * (s.k + s.n) * 2 + s.experts * s.rank * (s.k + s.n) * 2;
    (weights + activations + lora) as f64
}

/// SPEC §8's byte count (REF's "HBM GB/s"): the active weights once plus `x`, nothing else.
fn spec_bytes(strategy: Strategy, s: &Shape, active: usize) -> f64 {
    (strategy.spec_weight_bytes(s.n, s.k, active) + s.tokens * s.k * 2) as f64
}

/// A configuration before timing.
#[derive(Debug, serde::Serialize)]
struct PlanRow {
    routing: RoutingKind,
    experts: usize,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    gflop: f64,
}

/// One measured configuration.
#[derive(Debug, serde::Serialize)]
struct Row {
    strategy: Strategy,
    /// What the op layer reported running ("bf16", "A" or "B"; differs per call only for Auto).
    ran: &'static str,
    routing: RoutingKind,
    experts: usize,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    warmup: usize,
    iters: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    /// Host wall clock of the whole timed loop (synchronized) divided by the iterations.
    wall_ms_per_iter: f64,
    tokens_per_s: f64,
    slots_per_s: f64,
    flops: f64,
    tflops: f64,
    bytes: f64,
    gb_per_s: f64,
    spec_bytes: f64,
    spec_gb_per_s: f64,
    /// Device memory used after the uploads, above the configuration's baseline.
    resident_mib: f64,
    /// Largest `cuMemGetInfo` used-memory sample (after forward, after backward), above baseline.
    peak_sampled_mib: f64,
    /// Memory pool high-water mark above baseline (PyTorch's `max_memory_allocated` analogue).
    peak_pool_mib: Option<f64>,
    /// Every timed iteration, in order.
    times_ms: Vec<f64>,
}

impl Row {
    /// The peak to show: the pool watermark when available (it sees transients), else the samples.
    fn peak_mib(&self) -> f64 {
        self.peak_pool_mib.unwrap_or(self.peak_sampled_mib)
    }
}

/// Kernel resources, for the JSON header.
#[derive(Debug, serde::Serialize)]
struct KernelInfo {
    name: &'static str,
    registers: i32,
    static_smem_bytes: i32,
    local_bytes: i32,
}

/// Where and when the run happened.
#[derive(Debug, serde::Serialize)]
struct Header {
    device: Option<String>,
    compute_capability: Option<String>,
    sm_count: Option<u32>,
    memory_mib: Option<f64>,
    driver: String,
    commit: String,
    date: String,
    kernels: Vec<KernelInfo>,
}

/// The fixed part of the problem, for the JSON document.
#[derive(Debug, serde::Serialize)]
struct Problem {
    k: usize,
    n: usize,
    top_k: usize,
    rank: usize,
    scaling: f32,
    input: &'static str,
    output: &'static str,
    gates: bool,
    weight_seed: u64,
    seeds: Seeds,
}

/// The JSON document.
#[derive(Debug, serde::Serialize)]
struct Report {
    tool: &'static str,
    header: Header,
    problem: Problem,
    notes: Vec<String>,
    plan: Vec<PlanRow>,
    results: Vec<Row>,
}

/// Checks with checked arithmetic that a configuration's sizes exist and fit: the routing draw
/// (logits `[T, E]` f32 and the top-k choice) in host memory always; with a device, the host
/// problem (`x`, `dy`, the weights, in f32 and bf16) in host memory and the uploaded problem in
/// the device's free memory. Errors are typed ([`mxmoe::Error::SizeOverflow`],
/// [`mxmoe::Error::OutOfMemory`]) and name the configuration.
fn check_config(c: &Config, gpu: Option<&Gpu>) -> anyhow::Result<()> {
    let (t, e) = (c.tokens, c.experts);
    let label = format!("{} routing, E = {e}, T = {t}", c.routing.name());
    let Some(rows) = t.checked_mul(TOP_K) else {
        return Err(mxmoe::Error::SizeOverflow {
            what: format!("{label}: the routed rows T·k"),
            detail: format!("{t} · {TOP_K} overflows usize"),
        }
        .into());
    };
    let routing = sum_bytes(&[tensor_bytes(&[t, e], 4), tensor_bytes(&[rows], 8 + 4 + 4)]);
    check_host_memory(
        format!("{label}: the routing draw (logits [{t}, {e}] f32, top-{TOP_K} ids and weights)"),
        routing,
    )?;
    let Some(gpu) = gpu else { return Ok(()) };
    let lora = tensor_bytes(&[e * RANK, K + N], 1);
    // Host: x [T, K] and dy [T·k, N] as f32 and bf16, W [E, N, K] bf16 and its MXFP4 copy, LoRA.
    let host = sum_bytes(&[
        tensor_bytes(&[t, K], 6),
        tensor_bytes(&[rows, N], 6),
        tensor_bytes(&[e, N, K], 3),
        lora.and_then(|l| l.checked_mul(6)),
    ]);
    check_host_memory(
        format!("{label}: the host problem (x [{t}, {K}], dy [{rows}, {N}], W [{e}, {N}, {K}])"),
        host,
    )?;
    // Device, bf16: x, out, dy, dx, the per-slot dX and the routed copies (about 3·L·N + 2·L·K),
    // the weights, LoRA and its gradients.
    let device = sum_bytes(&[
        tensor_bytes(&[t, K], 4),
        tensor_bytes(&[rows, N], 6),
        tensor_bytes(&[rows, K], 4),
        tensor_bytes(&[e, N, K], 2),
        lora.and_then(|l| l.checked_mul(8)),
    ]);
    gpu.check_free_memory(
        format!(
            "{label}: the device problem (x [{t}, {K}], out and dy [{rows}, {N}], W [{e}, {N}, {K}])"
        ),
        device,
    )?;
    Ok(())
}

/// Runs the benchmark. Without a device (and no `--device`), prints the plan and returns
/// (nothing to time). The JSON file is written once, at the end.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let configs = configs(args);
    // Probe the JSON file's folder first, so a bad path fails before minutes of measuring; the
    // file itself (if it exists) is untouched until the results are written.
    if let Some(path) = &args.json {
        check_writable(path)?;
    }
    let strategies: Vec<Strategy> = if args.strategy.is_empty() {
        Strategy::ALL.to_vec()
    } else {
        args.strategy.clone()
    };
    let gpu = open_gpu(args.device)?;
    for c in &configs {
        check_config(c, gpu.as_ref().ok().map(|rt| rt.gpu()))?;
    }
    let header = header(gpu.as_ref().ok().map(|rt| rt.gpu()))?;
    let notes = notes(args);

    // The routing alone is cheap, so the plan (with active-expert counts) is known up front.
    let plan: Vec<PlanRow> = configs
        .iter()
        .map(|c| {
            let logits = c.routing.logits(c.tokens, c.experts, SEEDS.routing);
            let chosen = top_k(&logits, c.tokens, c.experts, TOP_K);
            PlanRow {
                routing: c.routing,
                experts: c.experts,
                tokens: c.tokens,
                rows: c.tokens * TOP_K, // checked by check_config
                active_experts: active_experts(&chosen.ids, c.experts),
                gflop: flops(&c.shape()) / 1e9,
            }
        })
        .collect();

    print_header(&header, &notes);
    let results = match &gpu {
        Ok(gpu) => measure_all(gpu, args, &configs, &strategies)?,
        Err(reason) => {
            print_plan(&plan);
            println!("{reason}: no GPU available, nothing to time.");
            Vec::new()
        }
    };
    if !results.is_empty() {
        print_results(&results);
    }
    if let Some(path) = &args.json {
        let problem = Problem {
            k: K,
            n: N,
            top_k: TOP_K,
            rank: RANK,
            scaling: SCALING,
            input: "scattered (x [T, K], token order)",
            output: "scattered ([T·k, N])",
            gates: false,
            weight_seed: WEIGHT_SEED,
            seeds: SEEDS,
        };
        let report = Report {
            tool: "mxmoe bench",
            header,
            problem,
            notes,
            plan,
            results,
        };
        let mut text =
            serde_json::to_string_pretty(&report).context("could not serialize the results")?;
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn header(gpu: Option<&Gpu>) -> anyhow::Result<Header> {
    let mut h = Header {
        device: None,
        compute_capability: None,
        sm_count: None,
        memory_mib: None,
        driver: driver_description(),
        commit: commit(),
        date: utc_now(),
        kernels: Vec::new(),
    };
    if let Some(gpu) = gpu {
        let l = gpu.limits();
        h.device = Some(l.name.clone());
        h.compute_capability = Some(format!(
            "{}.{}",
            l.compute_capability.0, l.compute_capability.1
        ));
        h.sm_count = Some(l.sm_count);
        h.memory_mib = Some(l.total_mem_bytes as f64 / MIB);
        for &name in mxmoe::shared::names::ALL {
            let r = gpu
                .function_resources(name)
                .with_context(|| format!("could not read the attributes of kernel {name}"))?;
            h.kernels.push(KernelInfo {
                name,
                registers: r.registers,
                static_smem_bytes: r.static_smem_bytes,
                local_bytes: r.local_bytes,
            });
        }
    }
    Ok(h)
}

fn notes(args: &BenchArgs) -> Vec<String> {
    vec![
        format!("Problem (SPEC §8): K={K}, N={N}, top_k={TOP_K}, r={RANK}, s={SCALING}; x [T, K] in token order, scattered output [T·k, N], no gates."),
        "Data: W_store = randn(E, N, K)/√K bf16 (seed 0), LoRA A, B = 0.01·randn (seed 2), routing top-k of softmax(logits) (seed 1), x = randn (seed 3); our own generator, not torch's stream.".into(),
        "dy: a fixed random [T·k, N] gradient (seed 4) instead of SPEC §8's all ones (loss = out.sum()); constant data is not allowed in our runs and costs the kernels the same.".into(),
        format!("Timing: one pair of CUDA events around each forward + backward on the op stream; {} warm-up + {} timed iterations; median (min, max). Routing is built once, outside the timed window.", args.warmup, args.iters),
        "FLOPs: forward 2LKN + 2LKr + 2LrN; backward dX 2LNK + 2LrK, YB 2LNr, dA 2LrK, dB 2LNr (L = T·k, r = 16 unpadded).".into(),
        "GB/s: (weight traffic + x, out, dy, dx once each + active LoRA twice + dA, dB written) / median time; weight traffic = 2·E_a·stored bytes per expert (bf16 N·K·2, MXFP4 N·K/2 + N·K/32) for bf16 and B, E_a·(MXFP4 bytes + 3·N·K·2) for A (dequantize, write, read twice). GB/s (SPEC): REF's HBM formula, (E_a·N·K·2 for bf16 and A, E_a·MXFP4 bytes for B) + T·K·2, over the median time.".into(),
        "Peak MiB: memory-pool high-water mark (CU_MEMPOOL_ATTR_USED_MEM_HIGH, reset before the configuration's uploads) minus the pool usage before them; it includes the resident weights, inputs and LoRA. Where pools are unavailable: the largest cuMemGetInfo used-memory sample after the forward and after the backward of an untimed iteration, minus the sample before the uploads.".into(),
    ]
}

/// Runs every configuration for every strategy. Weights are generated once per expert count.
fn measure_all(
    gpu: &Runtime,
    args: &BenchArgs,
    configs: &[Config],
    strategies: &[Strategy],
) -> anyhow::Result<Vec<Row>> {
    let mut weights: Option<HostWeights> = None;
    let mut rows = Vec::new();
    let total = configs.len() * strategies.len();
    let mut done = 0;
    for c in configs {
        let shape = c.shape();
        let w: &HostWeights = match &mut weights {
            Some(w) if w.experts == c.experts => w,
            slot => {
                // Free the previous tensor (up to 1 GiB) before drawing the next one.
                *slot = None;
                eprintln!("generating W_store [{}, {N}, {K}] bf16", c.experts);
                let bits =
                    normal_bf16_bits(c.experts * N * K, 1.0 / (K as f32).sqrt(), WEIGHT_SEED, 0);
                slot.insert(HostWeights::new(bits, c.experts, N, K))
            }
        };
        let problem = HostProblem::draw(shape, c.routing, SEEDS)?;
        let active = active_experts(&problem.ids, c.experts);
        for &strategy in strategies {
            done += 1;
            eprintln!(
                "[{done}/{total}] {} {} E={} T={} (active {active}): measuring",
                strategy.label(),
                c.routing.name(),
                c.experts,
                c.tokens
            );
            let row = measure(gpu, args, strategy, c, &problem, w, active).with_context(|| {
                format!(
                    "the {} benchmark failed at {} routing, E = {}, T = {}",
                    strategy.label(),
                    c.routing.name(),
                    c.experts,
                    c.tokens
                )
            })?;
            eprintln!(
                "[{done}/{total}] {} {} E={} T={}: median {:.3} ms ({:.3}–{:.3}), peak {:.1} MiB",
                strategy.label(),
                c.routing.name(),
                c.experts,
                c.tokens,
                row.median_ms,
                row.min_ms,
                row.max_ms,
                row.peak_mib()
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Device memory in use (`total − free`), bytes.
fn used_bytes(gpu: &Gpu) -> anyhow::Result<usize> {
    let (free, total) = gpu
        .mem_info()
        .context("could not read the device memory usage")?;
    Ok(total.saturating_sub(free))
}

fn measure(
    gpu: &Runtime,
    args: &BenchArgs,
    strategy: Strategy,
    c: &Config,
    problem: &HostProblem,
    w: &HostWeights,
    active: usize,
) -> anyhow::Result<Row> {
    let shape = c.shape();
    let pool = PoolWatch::new(gpu)?;
    gpu.synchronize()
        .context("the device did not become idle")?;
    let baseline = used_bytes(gpu)?;
    let pool_baseline = match &pool {
        Some(p) => {
            p.reset_peak()?;
            Some(p.used()?)
        }
        None => None,
    };

    if strategy != Strategy::Bf16 {
        // Quantize (once per weight tensor) before the memory baseline is taken.
        w.mx()?;
    }
    let device = DeviceProblem::upload(gpu, strategy, problem, w)?;
    let resident = used_bytes(gpu)?.saturating_sub(baseline);

    for _ in 0..args.warmup {
        drop(device.forward_backward(gpu, || Ok(()))?);
    }
    // One untimed iteration with used-memory samples after the forward and the backward.
    gpu.synchronize().context("the warm-up did not complete")?;
    let mut peak_sampled = used_bytes(gpu)?;
    let result = device.forward_backward(gpu, || {
        gpu.synchronize()
            .context("the forward pass did not complete")?;
        peak_sampled = peak_sampled.max(used_bytes(gpu)?);
        Ok(())
    })?;
    gpu.synchronize()
        .context("the backward pass did not complete")?;
    peak_sampled = peak_sampled.max(used_bytes(gpu)?);
    let ran = match (strategy, result.0.strategy) {
        (Strategy::Bf16, _) => "bf16",
        (_, op::Strategy::SelectiveDequant) => "A",
        (_, op::Strategy::Fused) => "B",
        (_, op::Strategy::Auto) => "auto",
    };
    drop(result);

    let new_event = || {
        gpu.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .context("could not create a CUDA event")
    };
    let events = (0..args.iters)
        .map(|_| Ok((new_event()?, new_event()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    gpu.synchronize()
        .context("the device did not become idle")?;
    let wall = std::time::Instant::now();
    for (start, end) in &events {
        start
            .record(gpu.stream())
            .context("could not record a CUDA event")?;
        let result = device.forward_backward(gpu, || Ok(()))?;
        end.record(gpu.stream())
            .context("could not record a CUDA event")?;
        drop(result);
    }
    gpu.synchronize()
        .context("the timed iterations did not complete")?;
    let wall_ms_per_iter = wall.elapsed().as_secs_f64() * 1e3 / args.iters as f64;
    let times_ms = events
        .iter()
        .map(|(s, e)| {
            s.elapsed_ms(e)
                .map(f64::from)
                .context("could not read a CUDA event time")
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;

    let peak_pool = match (&pool, pool_baseline) {
        (Some(p), Some(base)) => Some(p.peak()?.saturating_sub(base) as f64 / MIB),
        _ => None,
    };
    drop(device);

    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
    };
    let seconds = median_ms / 1e3;
    let (flops, bytes, spec_bytes) = (
        flops(&shape),
        bytes(strategy, &shape, active),
        spec_bytes(strategy, &shape, active),
    );
    Ok(Row {
        strategy,
        ran,
        routing: c.routing,
        experts: c.experts,
        tokens: c.tokens,
        rows: shape.rows(),
        active_experts: active,
        warmup: args.warmup,
        iters: args.iters,
        median_ms,
        min_ms: sorted[0],
        max_ms: sorted[sorted.len() - 1],
        mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
        wall_ms_per_iter,
        tokens_per_s: c.tokens as f64 / seconds,
        slots_per_s: shape.rows() as f64 / seconds,
        flops,
        tflops: flops / seconds / 1e12,
        bytes,
        gb_per_s: bytes / seconds / 1e9,
        spec_bytes,
        spec_gb_per_s: spec_bytes / seconds / 1e9,
        resident_mib: resident as f64 / MIB,
        peak_sampled_mib: peak_sampled.saturating_sub(baseline) as f64 / MIB,
        peak_pool_mib: peak_pool,
        times_ms,
    })
}

fn print_header(h: &Header, notes: &[String]) {
    println!("# mxmoe bench");
    println!();
    match &h.device {
        Some(name) => println!(
            "- card: {name} (compute capability {}, {} SMs, {:.0} MiB)",
            h.compute_capability.as_deref().unwrap_or("?"),
            h.sm_count.unwrap_or(0),
            h.memory_mib.unwrap_or(0.0)
        ),
        None => println!("- card: none"),
    }
    println!("- driver: {}", h.driver);
    println!("- commit: {}", h.commit);
    println!("- date: {}", h.date);
    for n in notes {
        println!("- {n}");
    }
    println!();
}

fn print_plan(plan: &[PlanRow]) {
    println!("| routing | E | T | L = T·k | active/E | GFLOP/iter |");
    println!("|---|---:|---:|---:|---:|---:|");
    for p in plan {
        println!(
            "| {} | {} | {} | {} | {}/{} | {:.1} |",
            p.routing.name(),
            p.experts,
            p.tokens,
            p.rows,
            p.active_experts,
            p.experts,
            p.gflop
        );
    }
    println!();
}

fn print_results(rows: &[Row]) {
    println!(
        "| strategy (ran) | routing | E | T | active/E | median ms | min ms | max ms | tokens/s | slots/s | TFLOP/s | GB/s | GB/s (SPEC) | resident MiB | peak MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} ({}) | {} | {} | {} | {}/{} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.strategy.label(),
            r.ran,
            r.routing.name(),
            r.experts,
            r.tokens,
            r.active_experts,
            r.experts,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.tokens_per_s,
            r.slots_per_s,
            r.tflops,
            r.gb_per_s,
            r.spec_gb_per_s,
            r.resident_mib,
            r.peak_mib()
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_count_matches_the_spec_terms() {
        let s = Config {
            routing: RoutingKind::Dense,
            experts: 128,
            tokens: 4096,
        }
        .shape();
        let l = 4096.0 * 8.0;
        let expected =
            4.0 * l * 2048.0 * 1024.0 + 6.0 * l * 2048.0 * 16.0 + 6.0 * l * 1024.0 * 16.0;
        assert_eq!(flops(&s), expected);
    }

    #[test]
    fn spec_bytes_match_ref_formula() {
        let s = Config {
            routing: RoutingKind::Dense,
            experts: 128,
            tokens: 4096,
        }
        .shape();
        assert_eq!(
            spec_bytes(Strategy::Bf16, &s, 128),
            (128 * 2048 * 1024 * 2 + 4096 * 2048 * 2) as f64
        );
    }
}
